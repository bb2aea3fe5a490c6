// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage whose map asks libbpf-style loaders to pin it by name
 * (LIBBPF_PIN_BY_NAME), as Debian's xdpfilt_* do: counts the packets it
 * sees in pinned_hits[0] and passes them. Rootlet must give each stage its
 * own map and pin it nowhere outside its bpffs root.
 */
#include <rootlet/stage.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pinned_hits SEC(".maps");

ROOTLET_STAGE(pinned)
{
	__u32 zero = 0;
	__u64 *hits = bpf_map_lookup_elem(&pinned_hits, &zero);

	if (hits)
		__sync_fetch_and_add(hits, 1);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
