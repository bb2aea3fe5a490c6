// SPDX-License-Identifier: GPL-2.0-only
/*
 * Benchmark: BENCH_LOOKUPS lookups of the packet's IPv4 source (a /32
 * key) in a policy map (<rootlet/stage.h> rootlet_policy_lookup: entry 0
 * of the outer array, then the inner LPM trie) against the same lookups in
 * a plain LPM trie; several per packet, so that the difference stands out
 * of the kernel's 1 ns resolution. Each returns XDP_PASS when every lookup
 * found the key, XDP_DROP when not, so that the benchmark can check it.
 */
#include <rootlet/stage.h>
#include "../parse.h"

#define BENCH_ENTRIES 262144
/* integration-tests/src/bin/rootlet-bench/policy.rs: LOOKUPS */
#define BENCH_LOOKUPS 8

struct bench_key {
	__u32 prefixlen;
	rootlet_ipv4_t addr;
};

ROOTLET_POLICY_MAP(bench_policy, BPF_MAP_TYPE_LPM_TRIE, struct bench_key, __u32, BENCH_ENTRIES,
		   BPF_F_NO_PREALLOC);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, BENCH_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct bench_key);
	__type(value, __u32);
} bench_plain SEC(".maps");

static __always_inline int source_key(struct xdp_md *ctx, struct bench_key *key)
{
	struct pkt p;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip)
		return -1;
	key->prefixlen = 32;
	key->addr = p.ip->saddr;
	return 0;
}

SEC("xdp")
int policy_lookup(struct xdp_md *ctx)
{
	struct bench_key key;

	if (source_key(ctx, &key) < 0)
		return XDP_ABORTED;
	int found = 0;

#pragma unroll
	for (int i = 0; i < BENCH_LOOKUPS; i++)
		found += rootlet_policy_lookup(&bench_policy, &key) != 0;
	return found == BENCH_LOOKUPS ? XDP_PASS : XDP_DROP;
}

SEC("xdp")
int plain_lookup(struct xdp_md *ctx)
{
	struct bench_key key;

	if (source_key(ctx, &key) < 0)
		return XDP_ABORTED;
	int found = 0;

#pragma unroll
	for (int i = 0; i < BENCH_LOOKUPS; i++)
		found += bpf_map_lookup_elem(&bench_plain, &key) != 0;
	return found == BENCH_LOOKUPS ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
