//! Mirrors `ebpf/include/rootlet/abi.h`: the constants and the byte layout of
//! the configuration the agent writes for the rootlets.

use super::spec::{Pipeline, XdpAction};

pub const MAX_SLOTS: usize = 16;
pub const NUM_COUNTERS: usize = 6;
/// Counter index of "slot enabled but empty: the placeholder proceeded".
pub const COUNT_EMPTY: usize = 5;
pub const END: u32 = MAX_SLOTS as u32;
pub const MODE_CHAIN: u32 = 1;

/// Names shared with the C programs.
pub const STATS_MAP: &str = "rootlet_stats";
pub const CHAINS_MAP: &str = "rootlet_chains";
pub const SCRATCH_MAP: &str = "rootlet_scratch";
pub const GEN_MAP: &str = "rootlet_gen";
/// The one-entry program array stages tail-call to continue the chain.
pub const CONT_MAP: &str = "rootlet_cont";
pub const CONTINUE_PROGRAM: &str = "rootlet_continue";
pub const CONFIG_GLOBAL: &str = "ROOTLET_CONFIG";
pub const STAGE_MODE_GLOBAL: &str = "ROOTLET_STAGE_MODE";
pub const FREPLACE_PROGRAM: &str = "rootlet";
pub const CHAIN_PROGRAM: &str = "rootlet_chain";

pub fn slot_map(slot: u32) -> String {
    format!("rootlet_slot_{slot}")
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

/// `struct rootlet_chain` for the tail-call rootlet: indexed by slot id.
pub fn rootlet_chain(pipeline: &Pipeline, final_verdict: XdpAction) -> Vec<u8> {
    let mut next = [END; MAX_SLOTS];
    let mut mask = [0u32; MAX_SLOTS];
    for (i, s) in pipeline.stages.iter().enumerate() {
        next[s.slot as usize] = pipeline.stages.get(i + 1).map_or(END, |n| n.slot);
        mask[s.slot as usize] = s.proceed_on.bits();
    }
    let mut out = Vec::with_capacity(4 * (2 + 2 * MAX_SLOTS));
    push(&mut out, pipeline.stages.first().map_or(END, |s| s.slot));
    push(&mut out, final_verdict as u32);
    next.iter().for_each(|&v| push(&mut out, v));
    mask.iter().for_each(|&v| push(&mut out, v));
    out
}
