// SPDX-License-Identifier: GPL-2.0-only
/*
 * The tail-call rootlet, for kernels that refuse BPF_PROG_TYPE_EXT. Stages
 * live in per-slot program arrays indexed by generation parity; the chain
 * (first slot, next slot, proceed-on masks, final verdict) of each parity is
 * in rootlet_chains. The agent rebuilds the inactive parity, then flips
 * rootlet_gen with one map update: a packet reads the generation once, at
 * entry, and carries it in rootlet_scratch through every tail call, so it
 * never sees a mix of two generations.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rootlet/chain.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rootlet_gen SEC(".maps");

SEC("xdp")
int rootlet_chain(struct xdp_md *ctx)
{
	__u32 zero = 0, parity;
	struct rootlet_scratch *s;
	struct rootlet_chain *c;
	__u64 *gen;

	gen = bpf_map_lookup_elem(&rootlet_gen, &zero);
	s = bpf_map_lookup_elem(&rootlet_scratch, &zero);
	if (!gen || !s)
		return XDP_ABORTED;
	parity = *gen & 1;
	c = bpf_map_lookup_elem(&rootlet_chains, &parity);
	if (!c)
		return XDP_ABORTED;
	s->gen = parity;
	return rootlet_chain_from(ctx, s, c, c->first);
}

/*
 * Where a stage that proceeds goes: the rest of the chain from slot
 * s->cur, in the generation the packet entered with. Loaded (and verified)
 * once per interface, into rootlet_cont.
 */
SEC("xdp")
int rootlet_continue(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct rootlet_scratch *s;
	struct rootlet_chain *c;

	s = bpf_map_lookup_elem(&rootlet_scratch, &zero);
	if (!s)
		return XDP_ABORTED;
	c = bpf_map_lookup_elem(&rootlet_chains, &s->gen);
	if (!c)
		return XDP_ABORTED;
	return rootlet_chain_from(ctx, s, c, s->cur);
}

char LICENSE[] SEC("license") = "GPL";
