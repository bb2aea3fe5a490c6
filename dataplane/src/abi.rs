//! Mirrors `ebpf/include/rootlet/abi.h`: the constants and the byte layout of
//! the configuration the agent writes for the rootlets.

use super::spec::{Pipeline, XdpAction};

pub const MAX_SLOTS: usize = 16;
pub const NUM_COUNTERS: usize = 6;
/// Counter index of "slot enabled but empty: the placeholder proceeded".
pub const COUNT_EMPTY: usize = 5;

/// Names shared with the C programs.
pub const STATS_MAP: &str = "rootlet_stats";
/// The tail-call rootlet's count of packets it handled with its final
/// verdict (and that of freplace rootlets built before [`FINAL_COUNTER`]).
pub const FINAL_MAP: &str = "rootlet_final";
pub const GEN_MAP: &str = "rootlet_gen";
/// The rootlet's hop array: the first stage, by parity.
pub const FIRST_MAP: &str = "rootlet_first";
/// A stage's hop array: what runs after its slot, by parity.
pub const NEXT_MAP: &str = "rootlet_next";
/// A gate's array: the unpinned stage it stands for, by parity.
pub const OWNER_MAP: &str = "rootlet_owner";
pub const GATE_PROGRAM: &str = "rootlet_gate";
/// The kernel name of a chain program's `struct rootlet_hop_config` (its
/// global-data section `ROOTLET_HOP_SECTION`), and the C variable in it.
pub const HOP_CONFIG_MAP: &str = ".bss.rootlet";
pub const HOP_CONFIG_GLOBAL: &str = "rootlet_hop";
/// Size of `struct rootlet_hop_config`.
pub const HOP_CONFIG_SIZE: usize = 16;
pub const CONFIG_GLOBAL: &str = "ROOTLET_CONFIG";
pub const STAGE_SLOT_GLOBAL: &str = "ROOTLET_STAGE_SLOT";
pub const STAGE_PARITY_GLOBAL: &str = "ROOTLET_STAGE_PARITY";
pub const FREPLACE_PROGRAM: &str = "rootlet";
pub const CHAIN_PROGRAM: &str = "rootlet_chain";
/// A stage built with `<rootlet/stage.h>` holds program `NAME` (standalone
/// and freplace: no tail call) and `NAME__chain`, which the tail-call
/// backend loads instead (ROOTLET_CHAIN_SUFFIX).
pub const CHAIN_SUFFIX: &str = "__chain";

/// The tail-call program of stage program `program` built with stage.h.
pub fn chain_program(program: &str) -> String {
    format!("{program}{CHAIN_SUFFIX}")
}

/// Size of `struct rootlet_percpu`, the per-CPU value of `rootlet_stats`:
/// counters by generation parity, slot and counter.
pub const PERCPU_SIZE: usize = 8 * 2 * MAX_SLOTS * NUM_COUNTERS;

/// Size of `struct rootlet_final`, the per-CPU value of `rootlet_final`:
/// the final verdict's count by generation parity.
pub const FINAL_SIZE: usize = 8 * 2;

/// Where the freplace rootlet counts the packets it handles with its final
/// verdict: parity, slot and counter of `struct rootlet_percpu`
/// (`ROOTLET_FINAL_*`). Parity 1, which the freplace rootlet counts nothing
/// else in, so that a packet costs it one map lookup; counter `COUNT_EMPTY`,
/// no action's, so that a reading of an action over both parities does not
/// take it for one.
pub const FINAL_COUNTER: (usize, usize, usize) = (1, 0, COUNT_EMPTY);

/// Offset of counter `counter` of `slot` in parity `parity` of `struct
/// rootlet_percpu`.
pub fn counter_offset(parity: usize, slot: usize, counter: usize) -> usize {
    8 * ((parity * MAX_SLOTS + slot) * NUM_COUNTERS + counter)
}

/// In a hop configuration's proceed-on mask: PASS goes on to a program that
/// counts every packet it gets, so the stage does not count its PASS.
pub const HOP_PASS_UNCOUNTED: u32 = 1 << 8;

/// The freplace placeholder function at `position`.
pub fn placeholder(position: usize) -> String {
    format!("stage_{position}")
}

fn push(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_ne_bytes());
}

/// `struct rootlet_config` for the freplace rootlet: positions in execution
/// order, each with its slot's first counter index and its proceed-on mask
/// with `COUNT_EMPTY`'s bit (an empty slot goes on), so that the rootlet
/// computes neither per packet.
pub fn rootlet_config(pipeline: &Pipeline, final_verdict: XdpAction) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * (2 + 2 * MAX_SLOTS));
    push(&mut out, pipeline.stages.len() as u32);
    push(&mut out, final_verdict as u32);
    for i in 0..MAX_SLOTS {
        push(
            &mut out,
            pipeline
                .stages
                .get(i)
                .map_or(0, |s| s.slot * NUM_COUNTERS as u32),
        );
    }
    for i in 0..MAX_SLOTS {
        push(
            &mut out,
            pipeline
                .stages
                .get(i)
                .map_or(0, |s| s.proceed_on.bits() | 1 << COUNT_EMPTY),
        );
    }
    out
}

/// `config` (a `struct rootlet_hop_config`) with parity `parity`'s entries
/// set: go on after the actions of `proceed_mask`; return `final_verdict`
/// when nothing follows. The other parity's entries are left as they are.
pub fn set_hop_config(
    config: &mut [u8; HOP_CONFIG_SIZE],
    parity: u32,
    proceed_mask: u32,
    final_verdict: XdpAction,
) {
    let p = 4 * (parity as usize & 1);
    config[p..p + 4].copy_from_slice(&proceed_mask.to_ne_bytes());
    config[8 + p..12 + p].copy_from_slice(&(final_verdict as u32).to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ActionSet, StageRecord};

    #[test]
    fn rootlet_config_holds_counter_indexes_and_masks_with_the_empty_bit() {
        let stage = |slot: u32, proceed_on: ActionSet| StageRecord {
            name: format!("s{slot}"),
            slot,
            priority: 0,
            proceed_on,
            pin: false,
            owner: String::new(),
            program: String::new(),
            digest: String::new(),
            chainable: true,
            linked_generation: 0,
            loaded_generation: 0,
            counts_base: Default::default(),
        };
        let pipeline = Pipeline {
            stages: vec![
                stage(7, ActionSet::default()),
                stage(2, ActionSet::of(&[XdpAction::Tx])),
            ],
        };
        let c = rootlet_config(&pipeline, XdpAction::Drop);
        let word = |i: usize| u32::from_ne_bytes(c[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(c.len(), 4 * (2 + 2 * MAX_SLOTS));
        assert_eq!([word(0), word(1)], [2, XdpAction::Drop as u32]);
        // counter_base: the slot's first counter in parity 0.
        assert_eq!([word(2), word(3), word(4)], [7 * 6, 2 * 6, 0]);
        let empty = 1 << COUNT_EMPTY;
        let m = 2 + MAX_SLOTS;
        assert_eq!(
            [word(m), word(m + 1), word(m + 2)],
            [
                1 << XdpAction::Pass as u32 | empty,
                1 << XdpAction::Tx as u32 | empty,
                0
            ]
        );
        // The final verdict's cell is outside every slot's parity-0 counters.
        let (p, slot, counter) = FINAL_COUNTER;
        assert!(counter_offset(p, slot, counter) >= counter_offset(1, 0, 0));
        assert!(counter_offset(p, slot, counter) + 8 <= PERCPU_SIZE);
    }

    #[test]
    fn hop_config_parities_are_independent() {
        let mut c = [0u8; HOP_CONFIG_SIZE];
        set_hop_config(&mut c, 1, 0b100, XdpAction::Drop);
        set_hop_config(&mut c, 0, 0b1000, XdpAction::Pass);
        let word = |i: usize| u32::from_ne_bytes(c[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(
            [word(0), word(1), word(2), word(3)],
            [
                0b1000,
                0b100,
                XdpAction::Pass as u32,
                XdpAction::Drop as u32
            ]
        );
    }
}
