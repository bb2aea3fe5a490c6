/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Write a Rootlet stage once, run it three ways.
 *
 *     #include <rootlet/stage.h>
 *
 *     ROOTLET_STAGE(my_stage)
 *     {
 *             ... look at ctx ...
 *             return XDP_PASS;    // "proceed" by default
 *     }
 *
 * The object is an ordinary SEC("xdp") program named my_stage. Loaded alone
 * (ip link, libxdp, aya) it returns its verdict; loaded by Rootlet as a
 * freplace stage it returns its verdict to the rootlet; loaded by Rootlet in
 * tail-call mode (ROOTLET_STAGE_MODE = ROOTLET_MODE_CHAIN, set by the agent)
 * it counts its verdict in the rootlet's per-slot counters and, if the
 * verdict is in its proceed-on mask, tail-calls the interface's shared
 * continuation, which runs the next slot of the chain.
 *
 * The maps below are replaced by the interface's own maps when the agent
 * loads the stage in tail-call mode; otherwise they are tiny and unused.
 */
#ifndef ROOTLET_STAGE_H
#define ROOTLET_STAGE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "counters.h"

volatile const __u32 ROOTLET_STAGE_MODE = ROOTLET_MODE_RETURN;

#ifdef ROOTLET_BUILD
/* A build number, to tell two builds of the same source apart. */
volatile const __u32 ROOTLET_STAGE_BUILD = ROOTLET_BUILD;
#endif

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct rootlet_chain);
} rootlet_chains SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rootlet_scratch);
} rootlet_scratch SEC(".maps");

/* Entry 0: the interface's rootlet_continue program, which runs the rest
 * of the chain. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} rootlet_cont SEC(".maps");

static __always_inline int rootlet_stage_return(struct xdp_md *ctx, int verdict)
{
	__u32 zero = 0;
	struct rootlet_scratch *s;
	struct rootlet_chain *c;
	__u32 slot;

	if (ROOTLET_STAGE_MODE != ROOTLET_MODE_CHAIN)
		return verdict;

	s = bpf_map_lookup_elem(&rootlet_scratch, &zero);
	if (!s)
		return rootlet_normalize(verdict);
	c = bpf_map_lookup_elem(&rootlet_chains, &s->gen);
	slot = s->cur;
	if (!c || slot >= ROOTLET_MAX_SLOTS)
		return rootlet_normalize(verdict);
	rootlet_count(slot, verdict);
	if (!rootlet_proceeds(verdict, c->proceed_mask[slot]))
		return rootlet_normalize(verdict);
	if (c->next[slot] >= ROOTLET_MAX_SLOTS)
		return c->final_verdict;
	/* The shared continuation runs the rest: one static tail call, so
	 * every stage stays small to verify. */
	s->cur = c->next[slot];
	bpf_tail_call_static(ctx, &rootlet_cont, 0);
	return XDP_ABORTED; /* no continuation loaded: cannot happen */
}

#define ROOTLET_STAGE(name)                                              \
	static __always_inline int name##__body(struct xdp_md *ctx);     \
	SEC("xdp") int name(struct xdp_md *ctx)                          \
	{                                                                \
		return rootlet_stage_return(ctx, name##__body(ctx));     \
	}                                                                \
	static __always_inline int name##__body(struct xdp_md *ctx)

#endif
