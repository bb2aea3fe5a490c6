/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Per-slot, per-action packet counters, shared by both rootlets and by
 * stages in tail-call mode: one per-CPU struct rootlet_percpu (abi.h), by
 * generation parity (the freplace rootlet counts in parity 0).
 */
#ifndef ROOTLET_COUNTERS_H
#define ROOTLET_COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rootlet_percpu);
} rootlet_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rootlet_final);
} rootlet_final SEC(".maps");

/* An action the kernel does not know is an abort. */
static __always_inline int rootlet_normalize(int verdict)
{
	return (verdict >= XDP_ABORTED && verdict <= XDP_REDIRECT) ? verdict : XDP_ABORTED;
}

/*
 * `v` (never above `max`: callers check), bounded again in the very register
 * that indexes with it. Clang may test one register and index with a copy
 * (`w1 = w6; if w6 < 0x5 ...; use w1`); the Linux 6.1 verifier keeps the
 * bound on the tested register only and refuses the access, while 6.12's
 * carries it over to the copy. This compare is in the generated code, on
 * the register returned, so every verifier sees the bound. Check with
 * `llvm-objdump -d`: an `if rN <= max` right before rN is scaled and added.
 */
static __always_inline __u64 rootlet_bound(__u64 v, __u64 max)
{
	asm volatile("if %[v] <= %[max] goto +1;\n\t%[v] = %[max];" : [v] "+r"(v) : [max] "i"(max));
	return v;
}

/* Counts `verdict` (ROOTLET_PROCEED: the slot was empty) for `slot`. */
static __always_inline void rootlet_count(__u32 parity, __u32 slot, int verdict)
{
	__u32 zero = 0;
	__u32 idx = verdict == ROOTLET_PROCEED ? ROOTLET_COUNT_EMPTY : rootlet_normalize(verdict);
	struct rootlet_percpu *p = bpf_map_lookup_elem(&rootlet_stats, &zero);

	if (p && slot < ROOTLET_MAX_SLOTS)
		p->count[parity & 1][rootlet_bound(slot, ROOTLET_MAX_SLOTS - 1)]
			[rootlet_bound(idx, ROOTLET_COUNT_EMPTY)] += 1;
}

/* Counts a packet handled with the final verdict, in `parity` (a constant). */
static __always_inline void rootlet_count_final(__u32 parity)
{
	__u32 zero = 0;
	struct rootlet_final *f = bpf_map_lookup_elem(&rootlet_final, &zero);

	if (f)
		f->count[parity & 1] += 1;
}

static __always_inline int rootlet_proceeds(int verdict, __u32 mask)
{
	if (verdict == ROOTLET_PROCEED)
		return 1;
	return verdict >= XDP_ABORTED && verdict <= XDP_REDIRECT && (mask & (1u << verdict));
}

#endif
