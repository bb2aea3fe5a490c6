/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Write a Rootlet stage once, run it three ways.
 *
 *     #include <rootlet/stage.h>
 *
 *     ROOTLET_STAGE(my_stage)
 *     {
 *             ... look at ctx ...
 *             return XDP_PASS;    // "proceed" by default
 *     }
 *
 * The object holds two programs. `my_stage` is an ordinary SEC("xdp")
 * program with no tail call and no counter: loaded alone (ip link, aya,
 * libxdp's xdp-loader, also under libxdp's dispatcher, whose freplace
 * refuses an extension that "changes packet data" where its placeholder
 * does not, and to the verifier every tail call does) it returns its
 * verdict, and Rootlet's freplace backend loads it as the extension of a
 * placeholder, where it returns its verdict to the rootlet. It comes first
 * in the object, so a loader that takes the first program takes it.
 *
 * `my_stage__chain` is the same body in tail-call mode; only Rootlet's
 * tail-call backend loads it (the agent sets ROOTLET_STAGE_SLOT and
 * ROOTLET_STAGE_PARITY at load time; one instance per generation parity).
 * It tail-calls the next stage of its parity straight from rootlet_next,
 * its slot's hop array, if the verdict is in its proceed-on mask
 * (rootlet_hop, its own global data): one static tail call per stage. It
 * counts its verdict in the rootlet's per-slot counters, except a PASS that
 * goes on to a program that counts every packet it gets: the agent derives
 * those from the counts further down the chain, so a packet costs no
 * counter update until it stops. An object without a `__chain` program
 * (an unmodified XDP program, or one built with a stage.h older than this
 * split) is loaded as it is, and can only be the last stage.
 *
 * A stage's mutable globals (.data, .bss) belong to one instance: in
 * tail-call mode packets of the two parities see different copies. Keep
 * state that packets share in maps, which both instances share.
 *
 * The maps below are replaced by the interface's own maps when the agent
 * loads the chain program; otherwise they are tiny and unused (a loader
 * that loads the whole object, like libxdp, creates them; the standalone
 * program never touches them).
 */
#ifndef ROOTLET_STAGE_H
#define ROOTLET_STAGE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "counters.h"

/*
 * Address types. A map's key or value member of one of these types is
 * shown and accepted as an address by the agent (docs/POLICY.md):
 * rootlet_ipv4_t "192.0.2.1" (network order), rootlet_ipv6_t "2001:db8::1",
 * rootlet_mac_t "02:00:00:00:00:01". The typedef's name carries the
 * meaning, so use these names rather than their definitions.
 */
typedef __be32 rootlet_ipv4_t;
typedef __u8 rootlet_ipv6_t[16];
typedef __u8 rootlet_mac_t[6];

/*
 * Policy maps: the contents a stage enforces (a blocklist, a service
 * table), replaced as a whole, atomically, by the agent.
 *
 *     ROOTLET_POLICY_MAP(my_rules, BPF_MAP_TYPE_LPM_TRIE, struct my_key,
 *                        struct my_rule, 65536, BPF_F_NO_PREALLOC);
 *
 *     struct my_rule *r = rootlet_policy_lookup(&my_rules, &key);
 *
 * declares `my_rules`, an array of maps with one entry (key __u32 0) that
 * holds the live inner map, whose definition (type, key and value types,
 * max entries, flags) follows the macro's arguments. The agent builds the
 * next policy in a new inner map beside the live one, fills it, and swaps
 * it in with one update of entry 0: a packet is judged by the old policy
 * or by the new one, never by a mix.
 *
 * rootlet_policy_lookup() reads entry 0 and then looks the key up in that
 * inner map. A stage that looks up the same policy map more than once per
 * packet must take the inner map once, with rootlet_policy_inner(), and
 * look every key up in it (bpf_map_lookup_elem(inner, &key)), so that one
 * packet sees one policy. An empty entry 0 is an empty policy: both return
 * NULL, and a stage must then do what it does for a key that is absent
 * (a default never blackholes). Rootlet installs an empty inner map in
 * entry 0 before a stage it loads can run, and keeps the inner map (and so
 * the policy) of a map kept with maps = "keep"; a stage loaded by another
 * loader (standalone, libxdp) starts with entry 0 empty.
 *
 * The map works the same way in all three modes (standalone, freplace,
 * tail-call): both tail-call instances of a stage share it.
 */
#define ROOTLET_POLICY_MAP(name, inner_type, key_type, value_type, entries, flags) \
	struct {                                                                   \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);                          \
		__uint(max_entries, 1);                                            \
		__type(key, __u32);                                                \
		__array(values, struct {                                           \
			__uint(type, inner_type);                                  \
			__uint(max_entries, entries);                              \
			__uint(map_flags, flags);                                  \
			__type(key, key_type);                                     \
			__type(value, value_type);                                 \
		});                                                                \
	} name SEC(".maps");                                                       \
	/* Never used: clang writes the inner map's key and value types to   \
	 * BTF only as forward declarations, which no loader can size;        \
	 * these pointers make it write them in full. */                      \
	key_type *name##__key_type;                                                \
	value_type *name##__value_type

/* The live inner map of policy map `outer`, or NULL (an empty policy). */
static __always_inline void *rootlet_policy_inner(void *outer)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(outer, &zero);
}

/*
 * `key` in the live inner map of policy map `outer`, or NULL when the key
 * is absent or the policy empty. One lookup of entry 0 per call.
 */
static __always_inline void *rootlet_policy_lookup(void *outer, const void *key)
{
	void *inner = rootlet_policy_inner(outer);

	if (!inner)
		return 0;
	return bpf_map_lookup_elem(inner, key);
}

/* Tail-call mode: the stable slot id this program was loaded for. */
volatile const __u32 ROOTLET_STAGE_SLOT = 0;
/* Tail-call mode: the generation parity this instance runs in. */
volatile const __u32 ROOTLET_STAGE_PARITY = 0;

#ifdef ROOTLET_BUILD
/* A build number, to tell two builds of the same source apart. */
volatile const __u32 ROOTLET_STAGE_BUILD = ROOTLET_BUILD;
#endif

/*
 * This program's hop configuration (abi.h). Global data: in tail-call mode
 * the agent writes it, per parity, before the program can be reached; loaded
 * any other way it stays zero and unused.
 */
volatile struct rootlet_hop_config rootlet_hop SEC(ROOTLET_HOP_SECTION);

/*
 * The slot's hop array: entry p is what runs after this slot in the
 * generations of parity p (the next stage, or the gate of an unpinned
 * one); empty when this slot is the last.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} rootlet_next SEC(".maps");

/*
 * Tail-calls entry `parity` of `hop`; returns only if it is empty. Each
 * site has a constant map and a constant index, so the x86-64 JIT emits a
 * direct jump that it patches when the entry changes, not the indirect
 * tail call (a retpoline with Spectre v2 mitigations). See
 * docs/BENCHMARKS-HISTORY.md.
 */
#define rootlet_hop_to(ctx, hop, parity)                    \
	do {                                                \
		if (parity)                                 \
			bpf_tail_call_static(ctx, hop, 1);  \
		else                                        \
			bpf_tail_call_static(ctx, hop, 0);  \
	} while (0)

/*
 * After `verdict` in parity P (a constant): go on to the next stage, or
 * stop, or, if nothing follows, return the final verdict. P is constant and
 * the verifier knows it, so every access is at a fixed address and every
 * tail call a direct jump; plain bpf_tail_call (not _static) keeps the
 * map and index out of callee-saved registers, which the JIT would
 * otherwise save and restore at every stage.
 */
#define rootlet_onward(ctx, verdict, P)                                          \
	do {                                                                     \
		if ((verdict) == XDP_PASS &&                                     \
		    (rootlet_hop.proceed_mask[P] & ROOTLET_HOP_PASS_UNCOUNTED)) {  \
			bpf_tail_call(ctx, &rootlet_next, P);                    \
			/* Nothing follows after all: count it here. */          \
			rootlet_count(P, ROOTLET_STAGE_SLOT, XDP_PASS);          \
			rootlet_count_final(P);                                  \
			return rootlet_hop.final_verdict[P];                     \
		}                                                                \
		rootlet_count(P, ROOTLET_STAGE_SLOT, verdict);                   \
		if (!rootlet_proceeds(verdict, rootlet_hop.proceed_mask[P]))     \
			return rootlet_normalize(verdict);                       \
		bpf_tail_call(ctx, &rootlet_next, P);                            \
		rootlet_count_final(P);                                          \
		return rootlet_hop.final_verdict[P];                             \
	} while (0)

/* The chain program's end: count, then continue the chain or stop. */
static __always_inline int rootlet_chain_return(struct xdp_md *ctx, int verdict)
{
	if (ROOTLET_STAGE_PARITY)
		rootlet_onward(ctx, verdict, 1);
	rootlet_onward(ctx, verdict, 0);
}

/*
 * The standalone program first (loaders that take an object's first
 * program take it), then the chain program; the body is inlined in both.
 */
#define ROOTLET_STAGE(name)                                              \
	static __always_inline int name##__body(struct xdp_md *ctx);     \
	SEC("xdp") int name(struct xdp_md *ctx)                          \
	{                                                                \
		return name##__body(ctx);                                \
	}                                                                \
	SEC("xdp") int name##__chain(struct xdp_md *ctx)                 \
	{                                                                \
		return rootlet_chain_return(ctx, name##__body(ctx));     \
	}                                                                \
	static __always_inline int name##__body(struct xdp_md *ctx)

#endif
