// SPDX-License-Identifier: GPL-2.0-only
/*
 * Benchmark baseline: the rootlet's logic with NUM_STAGES trivial stages
 * compiled into one program (counting and proceed checks included, calls
 * inlined). Compare with rootlet + N verdict stages.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "rootlet/counters.h"

volatile const __u32 NUM_STAGES = 0;

static __always_inline int trivial(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int mono(struct xdp_md *ctx)
{
	__u32 n = NUM_STAGES;
	int ret;

#define RUN(i)                                             \
	if (i >= n)                                        \
		goto done;                                 \
	ret = trivial(ctx);                                \
	rootlet_count(0, i, ret);                          \
	if (!rootlet_proceeds(ret, 1u << XDP_PASS))        \
		return rootlet_normalize(ret);

	RUN(0)  RUN(1)  RUN(2)  RUN(3)  RUN(4)  RUN(5)  RUN(6)  RUN(7)
	RUN(8)  RUN(9)  RUN(10) RUN(11) RUN(12) RUN(13) RUN(14) RUN(15)
#undef RUN
done:
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
