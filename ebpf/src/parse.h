/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Bounds-checked packet parsing for the sample stages. */
#ifndef ROOTLET_PARSE_H
#define ROOTLET_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>

struct pkt {
	struct ethhdr *eth;
	struct iphdr *ip; /* NULL unless IPv4 */
	void *l4;         /* NULL unless UDP or TCP */
	void *end;
};

static __always_inline int parse_ipv4(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip;

	p->eth = data;
	p->ip = 0;
	p->l4 = 0;
	p->end = end;
	if ((void *)(p->eth + 1) > end)
		return -1;
	if (p->eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	ip = (void *)(p->eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return -1;
	p->ip = ip;
	if (ip->protocol == IPPROTO_UDP || ip->protocol == IPPROTO_TCP) {
		void *l4 = (void *)ip + ip->ihl * 4;
		__u32 need = ip->protocol == IPPROTO_UDP ? sizeof(struct udphdr) : sizeof(struct tcphdr);

		if (l4 + need <= end)
			p->l4 = l4;
	}
	return 0;
}

/* RFC 1624 incremental update of a 16-bit one's-complement checksum. */
static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 csum = (__u16)~*sum;

	csum += (__u16)~from;
	csum += (__u16)(~from >> 16);
	csum += (__u16)to;
	csum += (__u16)(to >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	*sum = (__u16)~csum;
}

#endif
