// SPDX-License-Identifier: GPL-2.0-only
/*
 * L4 load-balancer stage: IPv4 UDP/TCP packets to the configured VIP:port
 * are rewritten towards a backend chosen by flow hash (destination MAC and
 * IP, checksums updated incrementally) and sent back out with XDP_TX.
 * Everything else proceeds (XDP_PASS).
 */
#include <rootlet/stage.h>
#include "parse.h"

#define L4LB_MAX_BACKENDS 64

struct l4lb_service {
	__u32 vip;   /* network order */
	__u16 port;  /* network order */
	__u8 proto;  /* IPPROTO_UDP or IPPROTO_TCP */
	__u8 pad;
	__u32 num_backends;
};

struct l4lb_backend {
	__u32 ip;    /* network order */
	__u8 mac[6];
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct l4lb_service);
} l4lb_service SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, L4LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct l4lb_backend);
} l4lb_backends SEC(".maps");

/* Flow hash; integration-tests/src/packet.rs computes the same. */
static __always_inline __u32 flow_hash(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport, __u8 proto)
{
	__u32 h = saddr ^ daddr ^ (((__u32)sport << 16) | dport) ^ proto;

	h *= 0x9e3779b1;
	h ^= h >> 16;
	return h;
}

ROOTLET_STAGE(l4lb)
{
	struct pkt p;
	struct l4lb_service *svc;
	struct l4lb_backend *be;
	__u32 zero = 0, idx, old_daddr;
	__u16 sport, dport, *l4sum;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip || !p.l4)
		return XDP_PASS;
	svc = bpf_map_lookup_elem(&l4lb_service, &zero);
	if (!svc || svc->num_backends == 0 || svc->num_backends > L4LB_MAX_BACKENDS)
		return XDP_PASS;
	if (p.ip->daddr != svc->vip || p.ip->protocol != svc->proto)
		return XDP_PASS;
	if (p.ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = p.l4;

		if ((void *)(udp + 1) > p.end)
			return XDP_PASS;
		sport = udp->source;
		dport = udp->dest;
		l4sum = &udp->check;
	} else {
		struct tcphdr *tcp = p.l4;

		if ((void *)(tcp + 1) > p.end)
			return XDP_PASS;
		sport = tcp->source;
		dport = tcp->dest;
		l4sum = &tcp->check;
	}
	if (dport != svc->port)
		return XDP_PASS;

	idx = flow_hash(p.ip->saddr, p.ip->daddr, sport, dport, p.ip->protocol) % svc->num_backends;
	be = bpf_map_lookup_elem(&l4lb_backends, &idx);
	if (!be)
		return XDP_PASS;

	old_daddr = p.ip->daddr;
	p.ip->daddr = be->ip;
	csum_replace4(&p.ip->check, old_daddr, be->ip);
	if (p.ip->protocol == IPPROTO_TCP || *l4sum != 0) {
		csum_replace4(l4sum, old_daddr, be->ip);
		if (p.ip->protocol == IPPROTO_UDP && *l4sum == 0)
			*l4sum = 0xffff;
	}
	__builtin_memcpy(p.eth->h_source, p.eth->h_dest, ETH_ALEN);
	__builtin_memcpy(p.eth->h_dest, be->mac, ETH_ALEN);
	return XDP_TX;
}

char LICENSE[] SEC("license") = "GPL";
