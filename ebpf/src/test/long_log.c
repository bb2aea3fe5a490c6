// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage the verifier rejects late, with a long log: a thousand rounds of
 * unrolled instructions (each one a line of the verifier log), then a read
 * of the packet at an offset that depends on all of them, without a
 * bounds check. The log runs to hundreds of kilobytes.
 */
#include <rootlet/stage.h>

ROOTLET_STAGE(long_log)
{
	__u8 *data = (void *)(long)ctx->data;
	__u64 acc = ctx->ingress_ifindex;

#pragma clang loop unroll(full)
	for (int i = 0; i < 1000; i++)
		acc ^= (acc >> 3) + i;

	return data[acc & 0xff] == 0xff ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
