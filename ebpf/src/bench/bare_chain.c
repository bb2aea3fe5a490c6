// SPDX-License-Identifier: GPL-2.0-only
/*
 * Benchmark baseline: a bare hand-written tail-call chain. Link i (LINK
 * set at load time) tail-calls link i+1 in bare_links; the last returns
 * XDP_PASS. No counters, no proceed-on masks, no generations.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

volatile const __u32 LINK = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
} bare_links SEC(".maps");

SEC("xdp")
int bare_chain(struct xdp_md *ctx)
{
	bpf_tail_call(ctx, &bare_links, LINK);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
