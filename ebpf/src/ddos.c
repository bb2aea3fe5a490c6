// SPDX-License-Identifier: GPL-2.0-only
/*
 * DDoS mitigation stage: drops IPv4 packets whose source is in the
 * ddos_blocklist policy (an LPM trie from prefix to rule id, swapped as a
 * whole by the agent: <rootlet/stage.h>, ROOTLET_POLICY_MAP). Everything
 * else proceeds (XDP_PASS); an empty policy drops nothing.
 *
 * The drops of each rule are counted in ddos_hits[rule] (a per-CPU array,
 * a plain map that a policy swap leaves alone, so a rule keeps its count
 * across versions of the policy; rule ids from DDOS_MAX_RULES on are
 * counted in the last entry).
 */
#include <rootlet/stage.h>
#include "parse.h"

#define DDOS_MAX_RULES 1024

struct ddos_key {
	__u32 prefixlen;
	rootlet_ipv4_t addr;
};

/* Entries are allocated as they are added (BPF_F_NO_PREALLOC): the limit costs nothing. */
ROOTLET_POLICY_MAP(ddos_blocklist, BPF_MAP_TYPE_LPM_TRIE, struct ddos_key, __u32, 262144,
		   BPF_F_NO_PREALLOC);

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DDOS_MAX_RULES);
	__type(key, __u32);
	__type(value, __u64);
} ddos_hits SEC(".maps");

ROOTLET_STAGE(ddos)
{
	struct pkt p;
	struct ddos_key key;
	__u32 *rule, idx;
	__u64 *hits;

	if (parse_ipv4(ctx, &p) < 0)
		return XDP_DROP; /* truncated: not worth the stack */
	if (!p.ip)
		return XDP_PASS;
	key.prefixlen = 32;
	key.addr = p.ip->saddr;
	rule = rootlet_policy_lookup(&ddos_blocklist, &key);
	if (!rule)
		return XDP_PASS;
	idx = *rule < DDOS_MAX_RULES ? *rule : DDOS_MAX_RULES - 1;
	hits = bpf_map_lookup_elem(&ddos_hits, &idx);
	if (hits)
		*hits += 1;
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
