// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage: a "ddos" whose blocklist policy map changed its inner value
 * (a u64, not the u32 rule id): the outer map is the same, the inner
 * definition is not, so it cannot keep the running stage's policy.
 *
 * Built a second time with -DDDOS_VALUE=__s32 -DDDOS_MAX=262144
 * (TEST_DDOS_RETYPED): the same sizes as ddos.c's, but a signed value, a
 * change only the BTF types show, which must be refused too.
 */
#include <rootlet/stage.h>
#include "../parse.h"

struct ddos_key {
	__u32 prefixlen;
	rootlet_ipv4_t addr;
};

#ifndef DDOS_VALUE
#define DDOS_VALUE __u64
#endif
#ifndef DDOS_MAX
#define DDOS_MAX 65536
#endif

ROOTLET_POLICY_MAP(ddos_blocklist, BPF_MAP_TYPE_LPM_TRIE, struct ddos_key, DDOS_VALUE, DDOS_MAX,
		   BPF_F_NO_PREALLOC);

ROOTLET_STAGE(ddos)
{
	struct pkt p;
	struct ddos_key key;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip)
		return XDP_PASS;
	key.prefixlen = 32;
	key.addr = p.ip->saddr;
	return rootlet_policy_lookup(&ddos_blocklist, &key) ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
