// SPDX-License-Identifier: GPL-2.0-only
/*
 * DDoS mitigation stage: drops IPv4 packets whose source is in the
 * ddos_blocklist LPM trie (key: prefix length, address in network order);
 * the value counts the drops per rule. Everything else proceeds (XDP_PASS).
 */
#include <rootlet/stage.h>
#include "parse.h"

struct ddos_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ddos_key);
	__type(value, __u64);
} ddos_blocklist SEC(".maps");

ROOTLET_STAGE(ddos)
{
	struct pkt p;
	struct ddos_key key;
	__u64 *hits;

	if (parse_ipv4(ctx, &p) < 0)
		return XDP_DROP; /* truncated: not worth the stack */
	if (!p.ip)
		return XDP_PASS;
	key.prefixlen = 32;
	key.addr = p.ip->saddr;
	hits = bpf_map_lookup_elem(&ddos_blocklist, &key);
	if (!hits)
		return XDP_PASS;
	__sync_fetch_and_add(hits, 1);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
