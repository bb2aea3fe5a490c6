// SPDX-License-Identifier: GPL-2.0-only
/*
 * Sample stage: counts every packet and copies the head of 1 in
 * SAMPLE_EVERY packets into a ring buffer. Always proceeds (XDP_PASS).
 *
 * Built with -DROOTLET_BUILD=N (sampler_v2), it differs in code, not only
 * in data: every packet also stamps N, an immediate in the program, into
 * sampler_counts[2]. The kernel then runs a program with another tag, and a
 * test can see which build counted a packet.
 */
#include <rootlet/stage.h>
#include "parse.h"

#define SAMPLE_BYTES 64

volatile const __u32 SAMPLE_EVERY = 100;

struct sample {
	__u32 ifindex;
	__u32 len;      /* packet length */
	__u32 captured; /* bytes in data */
	__u8 data[SAMPLE_BYTES];
};

#ifdef ROOTLET_BUILD
#define SAMPLER_COUNTS 3
#else
#define SAMPLER_COUNTS 2
#endif

/* [0] packets seen, [1] packets sampled, [2] (ROOTLET_BUILD only) the build */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SAMPLER_COUNTS);
	__type(key, __u32);
	__type(value, __u64);
} sampler_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} sampler_samples SEC(".maps");

ROOTLET_STAGE(sampler)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 key = 0;
	__u64 *seen = bpf_map_lookup_elem(&sampler_counts, &key);
	struct sample *s;

	if (!seen)
		return XDP_PASS;
	*seen += 1;
#ifdef ROOTLET_BUILD
	key = 2;
	__u64 *build = bpf_map_lookup_elem(&sampler_counts, &key);
	if (build)
		*build = ROOTLET_BUILD;
#endif
	if (SAMPLE_EVERY == 0 || *seen % SAMPLE_EVERY != 0)
		return XDP_PASS;

	s = bpf_ringbuf_reserve(&sampler_samples, sizeof(*s), 0);
	if (!s)
		return XDP_PASS;
	s->ifindex = ctx->ingress_ifindex;
	s->len = end - data;
	s->captured = 0;
	for (int i = 0; i < SAMPLE_BYTES; i++) {
		__u8 *b = data + i;

		if ((void *)(b + 1) > end)
			break;
		s->data[i] = *b;
		s->captured = i + 1;
	}
	bpf_ringbuf_submit(s, 0);

	key = 1;
	__u64 *sampled = bpf_map_lookup_elem(&sampler_counts, &key);
	if (sampled)
		*sampled += 1;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
