// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage whose stack alone nearly fills the kernel's 512-byte limit: a
 * 488-byte map key must live on the stack because its address escapes.
 */
#include <rootlet/stage.h>

struct big_key {
	__u8 bytes[488];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct big_key);
	__type(value, __u32);
} bigstack_map SEC(".maps");

ROOTLET_STAGE(bigstack)
{
	struct big_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.bytes[0] = (__u8)ctx->ingress_ifindex;
	return bpf_map_lookup_elem(&bigstack_map, &key) ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
