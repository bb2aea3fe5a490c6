/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The tail-call chain, for the rootlet's programs only (rootlet_chain.c):
 * the per-slot program arrays and the loop that enters the next slot.
 * Stages do not include this: they tail-call rootlet_continue instead.
 */
#ifndef ROOTLET_CHAIN_H
#define ROOTLET_CHAIN_H

#include "stage.h"

#define ROOTLET__SLOT_MAP(n)                                  \
	struct {                                              \
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY);        \
		__uint(max_entries, 2);                       \
		__type(key, __u32);                           \
		__type(value, __u32);                         \
	} rootlet_slot_##n SEC(".maps")

ROOTLET__SLOT_MAP(0);  ROOTLET__SLOT_MAP(1);  ROOTLET__SLOT_MAP(2);  ROOTLET__SLOT_MAP(3);
ROOTLET__SLOT_MAP(4);  ROOTLET__SLOT_MAP(5);  ROOTLET__SLOT_MAP(6);  ROOTLET__SLOT_MAP(7);
ROOTLET__SLOT_MAP(8);  ROOTLET__SLOT_MAP(9);  ROOTLET__SLOT_MAP(10); ROOTLET__SLOT_MAP(11);
ROOTLET__SLOT_MAP(12); ROOTLET__SLOT_MAP(13); ROOTLET__SLOT_MAP(14); ROOTLET__SLOT_MAP(15);

/*
 * Enter slot `slot` of generation `gen`; returns only if the slot is empty.
 *
 * Every call site has a constant map and a constant index
 * (bpf_tail_call_static keeps LLVM from merging the sites into one call
 * whose map is chosen at run time). The verifier can then track the map
 * and key of each site, and the x86-64 JIT patches a direct jump into it
 * when the entry changes, instead of the generic indirect tail call (a
 * retpoline on hosts with Spectre v2 mitigations): measured ~16 ns per
 * stage with merged sites, see docs/BENCHMARKS.md.
 */
#define ROOTLET__CASE(n, g) case n: bpf_tail_call_static(ctx, &rootlet_slot_##n, g); break
#define ROOTLET__SWITCH(g)                                                                       \
	switch (slot) {                                                                          \
	ROOTLET__CASE(0, g);  ROOTLET__CASE(1, g);  ROOTLET__CASE(2, g);  ROOTLET__CASE(3, g);   \
	ROOTLET__CASE(4, g);  ROOTLET__CASE(5, g);  ROOTLET__CASE(6, g);  ROOTLET__CASE(7, g);   \
	ROOTLET__CASE(8, g);  ROOTLET__CASE(9, g);  ROOTLET__CASE(10, g); ROOTLET__CASE(11, g);  \
	ROOTLET__CASE(12, g); ROOTLET__CASE(13, g); ROOTLET__CASE(14, g); ROOTLET__CASE(15, g);  \
	}
static __always_inline void rootlet_tail_call_slot(struct xdp_md *ctx, __u32 slot, __u32 gen)
{
	if (gen == 0) {
		ROOTLET__SWITCH(0)
	} else {
		ROOTLET__SWITCH(1)
	}
}
#undef ROOTLET__SWITCH
#undef ROOTLET__CASE

/*
 * Run the chain from `slot` on: tail-call it; if it is empty (the call
 * returned) count the placeholder and go on. Returns the final verdict when
 * the chain ends without a stage stopping it.
 */
static __always_inline int rootlet_chain_from(struct xdp_md *ctx, struct rootlet_scratch *s,
					      const struct rootlet_chain *c, __u32 slot)
{
	for (int i = 0; i < ROOTLET_MAX_SLOTS; i++) {
		if (slot >= ROOTLET_MAX_SLOTS)
			break;
		s->cur = slot;
		rootlet_tail_call_slot(ctx, slot, s->gen);
		rootlet_count(slot, ROOTLET_PROCEED);
		slot = c->next[slot];
	}
	return c->final_verdict;
}

#endif
