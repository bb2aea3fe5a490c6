// SPDX-License-Identifier: GPL-2.0-only
/*
 * The smallest extension (BPF_PROG_TYPE_EXT) and target the EXT probe can
 * try: probe_target calls the global function probe_func, and probe_ext
 * replaces it. Nothing here is Rootlet's own code, so whether these load
 * and attach says only whether the kernel permits EXT; the real rootlet is
 * checked apart (dataplane/src/probe.rs).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__attribute__((noinline)) int probe_func(struct xdp_md *ctx)
{
	volatile int ret = XDP_PASS;

	if (!ctx)
		return XDP_ABORTED;
	return ret;
}

SEC("xdp")
int probe_target(struct xdp_md *ctx)
{
	return probe_func(ctx);
}

SEC("xdp")
int probe_ext(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "GPL";
