/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Rootlet ABI: the layout shared by the rootlet dispatchers, stages built
 * with <rootlet/stage.h>, and the Rust agent (dataplane/src/abi.rs
 * mirrors every definition here; change both together).
 */
#ifndef ROOTLET_ABI_H
#define ROOTLET_ABI_H

#include <linux/types.h>

/* Compile-time maximum of stages in one rootlet. */
#define ROOTLET_MAX_SLOTS 16

/*
 * Per-slot counters: one per XDP action (ABORTED, DROP, PASS, TX, REDIRECT)
 * plus ROOTLET_COUNT_EMPTY, counted when a slot is enabled but holds no
 * program (its owner exited): the placeholder proceeded.
 */
#define ROOTLET_NUM_COUNTERS 6
#define ROOTLET_COUNT_EMPTY 5

/* What a placeholder returns: "nothing here, go on". Never a real action. */
#define ROOTLET_PROCEED 31

/* freplace rootlet: read-only configuration set at load time. */
struct rootlet_config {
	__u32 num_positions;  /* stage_0 .. stage_{n-1} are called in order */
	__u32 final_verdict;  /* returned when every stage proceeds */
	/* by position: the stable slot id times ROOTLET_NUM_COUNTERS, the index
	 * of the slot's first counter in rootlet_percpu.count[0] */
	__u32 counter_base[ROOTLET_MAX_SLOTS];
	/* by position: bit a = go on after counter a (an action, and always
	 * ROOTLET_COUNT_EMPTY: an empty slot goes on) */
	__u32 proceed_mask[ROOTLET_MAX_SLOTS];
};

/*
 * Per-CPU counters, the only entry (key 0) of rootlet_stats, by generation
 * parity, slot and counter. The freplace rootlet counts every verdict in
 * parity 0. In the tail-call chain a program counts in its own parity, and
 * a stage whose PASS the next program accounts for
 * (ROOTLET_HOP_PASS_UNCOUNTED) does not count that PASS: the agent derives
 * it from what the rest of that parity's chain counted (tally.rs), so a
 * packet that passes stage after stage is counted once, where it stops.
 *
 * The freplace rootlet never counts in parity 1, so it counts the packets it
 * handles with its final verdict there, in count[ROOTLET_FINAL_PARITY]
 * [ROOTLET_FINAL_SLOT][ROOTLET_FINAL_COUNTER]: in the value it already looked
 * up, so a packet costs one map lookup, and the value keeps its size. The
 * cell of a counter that is no action, so that nothing reading the actions'
 * cells of both parities (a tail-call reading) takes it for one.
 */
struct rootlet_percpu {
	__u64 count[2][ROOTLET_MAX_SLOTS][ROOTLET_NUM_COUNTERS];
};
#define ROOTLET_FINAL_PARITY 1
#define ROOTLET_FINAL_SLOT 0
#define ROOTLET_FINAL_COUNTER ROOTLET_COUNT_EMPTY

/*
 * Per-CPU count of the packets the tail-call rootlet handled with its final
 * verdict (every stage proceeded, or there was none), the only entry (key 0)
 * of rootlet_final, by generation parity. A map of its own, not a field of
 * rootlet_percpu, so that rootlet_stats keeps its size for stages built
 * before it existed. The freplace rootlet counts its final verdict in
 * rootlet_percpu (above); freplace rootlets built before that counted it
 * here, in parity 0, and the agent still adds what they counted.
 */
struct rootlet_final {
	__u64 count[2];
};

/*
 * tail-call rootlet: what a program of the chain (the rootlet, a gate, a
 * stage) does after its verdict, by generation parity. Each program has its
 * own, in the global-data section ROOTLET_HOP_SECTION, so a packet reads it
 * with one load and no map lookup. The agent rewrites a parity's entries
 * only while no packet runs that parity, and never the other parity's.
 */
struct rootlet_hop_config {
	__u32 proceed_mask[2];  /* by parity: bit a = go on after action a, */
				/* and ROOTLET_HOP_PASS_UNCOUNTED */
	__u32 final_verdict[2]; /* by parity: the verdict when nothing follows */
};
/*
 * In proceed_mask: PASS goes on, and the program it goes on to counts every
 * packet it gets, so this one need not count its PASS. Never an action bit.
 */
#define ROOTLET_HOP_PASS_UNCOUNTED (1u << 8)
#define ROOTLET_HOP_SECTION ".bss.rootlet"

/* A stage built with <rootlet/stage.h> has two programs: NAME (standalone
 * and freplace: returns its verdict, no tail call) and NAME__chain (the
 * tail-call backend's: counts, then continues the chain). */
#define ROOTLET_CHAIN_SUFFIX "__chain"
/* In tail-call mode the agent loads one instance of a stage per generation
 * parity, with ROOTLET_STAGE_PARITY set: a packet's parity is which
 * instances it runs, so no program reads it at run time. */

#endif
