// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage: a deliberately faulty stage that drops one packet in a
 * thousand (those whose sequence number ends in 999) and passes the rest.
 * It exists to show that the traffic tests catch a data plane that loses
 * packets: with it in the pipeline they must fail, naming those packets.
 */
#include <rootlet/stage.h>
#include "seq.h"

ROOTLET_STAGE(lossy)
{
	__u64 seq;

	if (test_seq_of(ctx, &seq) && seq % 1000 == 999)
		return XDP_DROP;
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
