// SPDX-License-Identifier: GPL-2.0-only
/* Test stage whose stack alone nearly fills the kernel's 512-byte limit. */
#include <rootlet/stage.h>

ROOTLET_STAGE(bigstack)
{
	volatile __u8 buf[496];
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	buf[0] = 1;
	buf[495] = (__u8)(end - data);
	return buf[0] + buf[495] > 1 ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
