// SPDX-License-Identifier: GPL-2.0-only
/*
 * Maps whose types exercise rootlet-schema (schema/tests/objects.rs): enums,
 * arrays, char text, unions (an anonymous one too), bitfields, nested
 * structs, the address typedefs, IPv4 and IPv6 LPM keys, a policy map
 * (array of maps with an inner definition) and a per-CPU array. No program
 * uses them for anything; the program only keeps them referenced.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* The address typedefs of <rootlet/stage.h>, declared here so that this
 * object does not depend on the header's version. */
typedef __u32 rootlet_ipv4_t;
typedef __u8 rootlet_ipv6_t[16];
typedef __u8 rootlet_mac_t[6];

enum color { RED = 0, GREEN = 1, BLUE = 7 };
enum sign { NEG = -1, ZERO = 0 };

struct backend {
	rootlet_ipv4_t ip;
	rootlet_mac_t mac;
	__u16 weight;
};

struct service {
	char label[8];
	enum color color;
	__s16 offset;
	__u8 flags : 3;
	__u8 mode : 5;
	__u8 on;
	_Bool up;
	union {
		__u32 as_u32;
		__u8 as_bytes[4];
	};
	struct backend backends[3];
	rootlet_ipv6_t v6;
	__u64 big;
	__s64 neg;
	enum sign sign;
};

struct lpm4 {
	__u32 prefixlen;
	__u32 addr;
};

struct lpm6 {
	__u32 len;
	__u8 a[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct service);
} schema_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4);
	__type(value, __u64);
} schema_lpm4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6);
	__type(value, enum color);
} schema_lpm6 SEC(".maps");

/* A policy map: what ROOTLET_POLICY_MAP declares. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);
		__uint(max_entries, 100000);
		__uint(map_flags, BPF_F_NO_PREALLOC);
		__type(key, struct lpm4);
		__type(value, __u64);
	});
} schema_policy_with_a_long_name SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} schema_percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, rootlet_ipv6_t);
	__type(value, void *);
} schema_pointer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4);
	__type(key, __int128);
	__type(value, unsigned __int128);
} schema_wide SEC(".maps");

SEC("xdp")
int schema(struct xdp_md *ctx)
{
	__u32 k = 0;

	if (bpf_map_lookup_elem(&schema_services, &k) || bpf_map_lookup_elem(&schema_percpu, &k) ||
	    bpf_map_lookup_elem(&schema_policy_with_a_long_name, &k))
		return XDP_DROP;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
