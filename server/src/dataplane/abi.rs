//! Mirrors `ebpf/include/rootlet/abi.h`: the constants and the byte layout of
//! the configuration the agent writes for the rootlets.

use super::spec::{Pipeline, XdpAction};

pub const MAX_SLOTS: usize = 16;
pub const NUM_COUNTERS: usize = 6;
/// Counter index of "slot enabled but empty: the placeholder proceeded".
pub const COUNT_EMPTY: usize = 5;
pub const MODE_CHAIN: u32 = 1;

/// Names shared with the C programs.
pub const STATS_MAP: &str = "rootlet_stats";
pub const CHAINS_MAP: &str = "rootlet_chains";
pub const GEN_MAP: &str = "rootlet_gen";
/// The rootlet's hop array: the first stage, by parity.
pub const FIRST_MAP: &str = "rootlet_first";
/// A stage's hop array: what runs after its slot, by parity.
pub const NEXT_MAP: &str = "rootlet_next";
/// A gate's array: the unpinned stage it stands for, by parity.
pub const OWNER_MAP: &str = "rootlet_owner";
pub const GATE_PROGRAM: &str = "rootlet_gate";
pub const CONFIG_GLOBAL: &str = "ROOTLET_CONFIG";
pub const STAGE_MODE_GLOBAL: &str = "ROOTLET_STAGE_MODE";
pub const STAGE_SLOT_GLOBAL: &str = "ROOTLET_STAGE_SLOT";
pub const FREPLACE_PROGRAM: &str = "rootlet";
pub const CHAIN_PROGRAM: &str = "rootlet_chain";

/// Size of `struct rootlet_percpu`, the per-CPU value of `rootlet_stats`:
/// the packet's generation parity (8 bytes with padding), then the counters.
pub const PERCPU_SIZE: usize = 8 + 8 * MAX_SLOTS * NUM_COUNTERS;

/// Offset of counter `counter` of `slot` in `struct rootlet_percpu`.
pub fn counter_offset(slot: u32, counter: usize) -> usize {
    8 + 8 * (slot as usize * NUM_COUNTERS + counter)
}

/// The freplace placeholder function at `position`.
pub fn placeholder(position: usize) -> String {
    format!("stage_{position}")
}

fn push(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_ne_bytes());
}

/// `struct rootlet_config` for the freplace rootlet: positions in execution
/// order.
pub fn rootlet_config(pipeline: &Pipeline, final_verdict: XdpAction) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * (2 + 2 * MAX_SLOTS));
    push(&mut out, pipeline.stages.len() as u32);
    push(&mut out, final_verdict as u32);
    for i in 0..MAX_SLOTS {
        push(&mut out, pipeline.stages.get(i).map_or(0, |s| s.slot));
    }
    for i in 0..MAX_SLOTS {
        push(
            &mut out,
            pipeline.stages.get(i).map_or(0, |s| s.proceed_on.bits()),
        );
    }
    out
}

/// `struct rootlet_chain` for the tail-call rootlet: proceed-on masks by
/// slot id.
pub fn rootlet_chain(pipeline: &Pipeline, final_verdict: XdpAction) -> Vec<u8> {
    let mut mask = [0u32; MAX_SLOTS];
    for s in &pipeline.stages {
        mask[s.slot as usize] = s.proceed_on.bits();
    }
    let mut out = Vec::with_capacity(4 * (1 + MAX_SLOTS));
    push(&mut out, final_verdict as u32);
    mask.iter().for_each(|&v| push(&mut out, v));
    out
}
