// SPDX-License-Identifier: GPL-2.0-only
/* Test stage the verifier rejects: reads the packet without a bounds check. */
#include <rootlet/stage.h>

ROOTLET_STAGE(bad_verifier)
{
	__u8 *data = (void *)(long)ctx->data;

	return data[20] == 0xff ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
