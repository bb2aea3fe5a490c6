// SPDX-License-Identifier: GPL-2.0-only
/*
 * Test stage: the data plane's own record of which packets went through it.
 * For every packet with a sequence payload (seq.h) it adds one to
 * witness_seen.count[seq] (sequence numbers from WITNESS_WINDOW on are
 * counted in `beyond`), and returns XDP_PASS. Linked last, it sees exactly
 * the packets every stage before it passed on, once each: the traffic tests
 * judge losses and duplicates by it, not by what a socket received
 * (integration-tests/src/witness.rs reads it).
 */
#include <rootlet/stage.h>
#include "seq.h"

/* integration-tests/src/witness.rs: WINDOW */
#define WITNESS_WINDOW (1 << 18)

struct witness {
	__u32 beyond;   /* packets whose sequence number is >= WITNESS_WINDOW */
	__u32 unnumbered; /* packets without a sequence payload */
	__u32 count[WITNESS_WINDOW];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct witness);
} witness_seen SEC(".maps");

ROOTLET_STAGE(witness)
{
	__u32 zero = 0;
	struct witness *w = bpf_map_lookup_elem(&witness_seen, &zero);
	__u64 seq;

	if (!w)
		return XDP_PASS;
	if (!test_seq_of(ctx, &seq)) {
		__sync_fetch_and_add(&w->unnumbered, 1);
	} else if (seq < WITNESS_WINDOW) {
		__u32 idx = seq;

		/*
		 * The compiler knows idx < WITNESS_WINDOW and would drop the
		 * mask; the verifier needs it on the register that indexes.
		 */
		asm volatile("" : "+r"(idx));
		idx &= WITNESS_WINDOW - 1;
		__sync_fetch_and_add(&w->count[idx], 1);
	} else {
		__sync_fetch_and_add(&w->beyond, 1);
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
