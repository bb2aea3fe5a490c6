// SPDX-License-Identifier: GPL-2.0-only
/* Test stage: returns VERDICT (set with -DVERDICT=... by build.rs). */
#include <rootlet/stage.h>

ROOTLET_STAGE(verdict)
{
	return VERDICT;
}

char LICENSE[] SEC("license") = "GPL";
