// SPDX-License-Identifier: GPL-2.0-only
/* An unmodified third-party XDP program: no <rootlet/stage.h>. Passes all. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int plain(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
