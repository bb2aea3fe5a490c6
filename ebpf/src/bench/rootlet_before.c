// SPDX-License-Identifier: GPL-2.0-only
/*
 * Bench only: the freplace rootlet as it was before its final verdict moved
 * into rootlet_stats (a second per-CPU lookup per packet, rootlet_final) and
 * before the agent precomputed each position's counter index and proceed
 * mask. rootlet-bench runs it beside the live rootlet and libxdp's
 * dispatcher, in the same rounds, so that the change is measured in one run.
 * Its own copy of the configuration it read then; otherwise src/rootlet.c at
 * that commit.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rootlet/counters.h"

struct rootlet_config_before {
	__u32 num_positions;
	__u32 final_verdict;
	__u32 slot_of[ROOTLET_MAX_SLOTS];
	__u32 proceed_mask[ROOTLET_MAX_SLOTS];
};

volatile const struct rootlet_config_before ROOTLET_CONFIG = {
	.num_positions = 0,
	.final_verdict = XDP_PASS,
};

/*
 * A placeholder: what runs in a position no stage (any longer) replaces.
 * The kernel lets an extension that may change packet data (any stage: its
 * tail-call path counts) replace only a function that may too, so each
 * placeholder has a call to bpf_xdp_adjust_head() the verifier cannot rule
 * out but that never runs (`ret` is volatile and always ROOTLET_PROCEED).
 */
#define PLACEHOLDER(n)                                           \
	__attribute__((noinline)) int stage_##n(struct xdp_md *ctx) \
	{                                                        \
		volatile int ret = ROOTLET_PROCEED;              \
		if (!ctx)                                        \
			return XDP_ABORTED;                      \
		if (ret == -1)                                   \
			bpf_xdp_adjust_head(ctx, 0);             \
		return ret;                                      \
	}

PLACEHOLDER(0)  PLACEHOLDER(1)  PLACEHOLDER(2)  PLACEHOLDER(3)
PLACEHOLDER(4)  PLACEHOLDER(5)  PLACEHOLDER(6)  PLACEHOLDER(7)
PLACEHOLDER(8)  PLACEHOLDER(9)  PLACEHOLDER(10) PLACEHOLDER(11)
PLACEHOLDER(12) PLACEHOLDER(13) PLACEHOLDER(14) PLACEHOLDER(15)

/*
 * A stage's verdict as the index of its counter (abi.h): an action, or
 * ROOTLET_COUNT_EMPTY for ROOTLET_PROCEED (the placeholder ran), or
 * XDP_ABORTED for anything else, as the kernel takes it.
 */
static __always_inline __u32 rootlet_counter_of(int verdict)
{
	__u32 v = verdict;

	if (v > XDP_REDIRECT)
		v = v == ROOTLET_PROCEED ? ROOTLET_COUNT_EMPTY : XDP_ABORTED;
	return v;
}

/*
 * The per-packet path, kept as short as libxdp's dispatcher's plus one
 * counter increment per stage (docs/BENCHMARKS.md): the counters are
 * looked up once per packet, not once per stage; a stage's counter is one
 * add at an index computed from its slot (read-only data) and its verdict;
 * "go on" is one bit test of the position's proceed_mask, into which the
 * empty placeholder's bit is or-ed (an empty slot always goes on), and a
 * verdict that stops is already a valid action.
 */
SEC("xdp")
int rootlet(struct xdp_md *ctx)
{
	__u32 n = ROOTLET_CONFIG.num_positions;
	__u32 zero = 0;
	struct rootlet_percpu *p = bpf_map_lookup_elem(&rootlet_stats, &zero);
	__u64 *count;
	__u32 c;

	/* Never: key 0 of a one-entry array always exists. */
	if (!p)
		return XDP_ABORTED;
	count = &p->count[0][0][0];

#define RUN(i)                                                                 \
	if (i >= n)                                                            \
		goto done;                                                     \
	c = rootlet_counter_of(stage_##i(ctx));                                \
	count[rootlet_bound(ROOTLET_CONFIG.slot_of[i] * ROOTLET_NUM_COUNTERS + c, \
			    ROOTLET_MAX_SLOTS * ROOTLET_NUM_COUNTERS - 1)] += 1;   \
	if (!(((ROOTLET_CONFIG.proceed_mask[i] | (1u << ROOTLET_COUNT_EMPTY)) >> c) & 1)) \
		return c;

	RUN(0)  RUN(1)  RUN(2)  RUN(3)  RUN(4)  RUN(5)  RUN(6)  RUN(7)
	RUN(8)  RUN(9)  RUN(10) RUN(11) RUN(12) RUN(13) RUN(14) RUN(15)
#undef RUN
done:
	rootlet_count_final(0);
	return ROOTLET_CONFIG.final_verdict;
}

char LICENSE[] SEC("license") = "GPL";
