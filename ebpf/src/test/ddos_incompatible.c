// SPDX-License-Identifier: GPL-2.0-only
/* Test stage: a "ddos" whose blocklist map changed value size (u32, not u64). */
#include <rootlet/stage.h>
#include "../parse.h"

struct ddos_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ddos_key);
	__type(value, __u32);
} ddos_blocklist SEC(".maps");

ROOTLET_STAGE(ddos)
{
	struct pkt p;
	struct ddos_key key;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip)
		return XDP_PASS;
	key.prefixlen = 32;
	key.addr = p.ip->saddr;
	return bpf_map_lookup_elem(&ddos_blocklist, &key) ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
