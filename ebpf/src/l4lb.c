// SPDX-License-Identifier: GPL-2.0-only
/*
 * L4 load-balancer stage: IPv4 UDP/TCP packets to a configured service
 * (VIP, port, protocol) are rewritten towards one of its backends, chosen
 * by flow hash (destination MAC and IP, checksums updated incrementally),
 * and sent back out with XDP_TX. Everything else proceeds (XDP_PASS).
 *
 * The services and their backends are one policy map (l4lb_services,
 * <rootlet/stage.h> ROOTLET_POLICY_MAP): each service carries its backends
 * inline, so one swap changes both at once and a packet never meets a
 * service with another version's backends.
 */
#include <rootlet/stage.h>
#include "parse.h"

#define L4LB_MAX_BACKENDS 64
#define L4LB_MAX_SERVICES 64

struct l4lb_vip {
	rootlet_ipv4_t vip;
	__be16 port;
	__u8 proto; /* IPPROTO_UDP or IPPROTO_TCP */
	__u8 pad;
};

struct l4lb_backend {
	rootlet_ipv4_t ip;
	rootlet_mac_t mac;
	__u16 pad;
};

struct l4lb_service {
	__u32 num_backends; /* 1 to L4LB_MAX_BACKENDS; 0 passes the service's packets */
	struct l4lb_backend backends[L4LB_MAX_BACKENDS];
};

ROOTLET_POLICY_MAP(l4lb_services, BPF_MAP_TYPE_HASH, struct l4lb_vip, struct l4lb_service,
		   L4LB_MAX_SERVICES, 0);

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
	struct l4lb_vip vip = {};
	struct l4lb_service *svc;
	struct l4lb_backend *be;
	__u32 n, idx, old_daddr;
	__u16 sport, dport, *l4sum;

	if (parse_ipv4(ctx, &p) < 0 || !p.ip || !p.l4)
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
	vip.vip = p.ip->daddr;
	vip.port = dport;
	vip.proto = p.ip->protocol;
	svc = rootlet_policy_lookup(&l4lb_services, &vip);
	if (!svc)
		return XDP_PASS;
	n = svc->num_backends;
	if (n == 0 || n > L4LB_MAX_BACKENDS)
		return XDP_PASS;

	idx = flow_hash(p.ip->saddr, p.ip->daddr, sport, dport, p.ip->protocol) % n;
	/* idx < n <= L4LB_MAX_BACKENDS; older verifiers need it on the register. */
	be = &svc->backends[rootlet_bound(idx, L4LB_MAX_BACKENDS - 1)];

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
