/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The test harness's sequence payloads (integration-tests/src/packet.rs,
 * `seq_payload`): an IPv4/UDP payload that starts with "RLSQ" and the
 * sequence number as a big-endian u64.
 */
#ifndef ROOTLET_TEST_SEQ_H
#define ROOTLET_TEST_SEQ_H

#include "../parse.h"

/* The packet's sequence number in *seq; 0 if it carries none. */
static __always_inline int test_seq_of(struct xdp_md *ctx, __u64 *seq)
{
	struct pkt p;
	__u8 *b;
	__u64 s = 0;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip || !p.l4 || p.ip->protocol != IPPROTO_UDP)
		return 0;
	b = (__u8 *)p.l4 + sizeof(struct udphdr);
	if ((void *)(b + 12) > p.end)
		return 0;
	if (b[0] != 'R' || b[1] != 'L' || b[2] != 'S' || b[3] != 'Q')
		return 0;
#pragma unroll
	for (int i = 4; i < 12; i++)
		s = (s << 8) | b[i];
	*seq = s;
	return 1;
}

#endif
