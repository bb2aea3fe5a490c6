// SPDX-License-Identifier: GPL-2.0-only
/*
 * The tail-call rootlet, for kernels that refuse BPF_PROG_TYPE_EXT.
 *
 * Routing is by hop arrays, two entries each, indexed by generation parity:
 * rootlet_first holds the first stage, and the hop array of slot K (each
 * stage's rootlet_next) the stage after slot K. Every stage and gate is
 * loaded once per parity (ROOTLET_STAGE_PARITY), and an instance of parity
 * p only ever tail-calls entry p. The agent rebuilds the inactive parity's
 * entries and each of its programs' rootlet_hop (proceed-on mask, final
 * verdict), then flips rootlet_gen with one map update. A packet reads the
 * generation once, here, and from then on runs the programs of one parity,
 * so it never sees a mix of two generations.
 *
 * rootlet_gate stands in the hop arrays for an unpinned stage: the stage
 * itself sits in its slot's owner array, which only its owner holds, and
 * the kernel empties that array when the owner exits. The gate then counts
 * the slot as empty and goes on.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rootlet/stage.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rootlet_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} rootlet_first SEC(".maps");

/*
 * The gate's slot owner array: entry p is the unpinned stage's instance in
 * parity p (entries 2 and 3 keep the instances of the other parity's stage
 * for the next rebuild; the gate never reads them).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} rootlet_owner SEC(".maps");

SEC("xdp")
int rootlet_chain(struct xdp_md *ctx)
{
	__u32 zero = 0, parity;
	__u64 *gen;

	gen = bpf_map_lookup_elem(&rootlet_gen, &zero);
	if (!gen)
		return XDP_ABORTED;
	parity = *gen & 1;
	rootlet_hop_to(ctx, &rootlet_first, parity);
	/* No stage. */
	if (parity) {
		rootlet_count_final(1);
		return rootlet_hop.final_verdict[1];
	}
	rootlet_count_final(0);
	return rootlet_hop.final_verdict[0];
}

SEC("xdp")
int rootlet_gate(struct xdp_md *ctx)
{
	rootlet_hop_to(ctx, &rootlet_owner, ROOTLET_STAGE_PARITY);
	/* The owner exited: the slot is empty, go on. */
	return rootlet_chain_return(ctx, ROOTLET_PROCEED);
}

char LICENSE[] SEC("license") = "GPL";
