//! The per-slot counters of the tail-call backend, derived from what its
//! programs count.
//!
//! In the chain, a stage counts each verdict in its parity's counters,
//! except a PASS that goes on to a program which counts every packet it
//! gets ([`Hop::pass_uncounted`], `ROOTLET_HOP_PASS_UNCOUNTED`). A packet
//! that passes stage after stage is thus counted once, where it stops, and
//! the stages it passed cost no counter update. Those PASSes are derived
//! here, from the end of the chain back: the packets the next program got,
//! less those this stage sent on with another action.
//!
//! Derivation needs the chain the counts were made under. Each parity runs
//! one chain from the rebuild that wired it to the next one, an epoch; the
//! kernel counts by parity. The record keeps, per parity, the chain of its
//! epoch and the raw counts it began with, and the totals of closed epochs.
//! An epoch closes when its parity is rebuilt, which starts only once no
//! packet runs that parity any more, and the closing is stored with the new
//! generation before any packet can run it: a crash at any point loses or
//! doubles nothing.

use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

use super::{
    abi::{self, MAX_SLOTS, NUM_COUNTERS},
    error::Result,
    spec::{Pipeline, XdpAction},
    sys,
};

/// Counts by slot and counter (`abi::NUM_COUNTERS`: the XDP actions, then
/// `abi::COUNT_EMPTY`).
pub type Slots = [[u64; NUM_COUNTERS]; MAX_SLOTS];

/// `rootlet_stats` summed over CPUs: by parity, slot and counter.
pub type Raw = [Slots; 2];

/// Reads a rootlet's per-CPU counters, summed over CPUs.
pub fn read(stats: BorrowedFd<'_>) -> Result<Raw> {
    let cpus =
        aya::util::nr_cpus().map_err(|(what, source)| sys::SysError { call: what, source })?;
    let mut buf = vec![0u8; abi::PERCPU_SIZE * cpus];
    let mut raw = Raw::default();
    if sys::map_lookup(stats, &0u32.to_ne_bytes(), &mut buf)? {
        for cpu in buf.chunks_exact(abi::PERCPU_SIZE) {
            for (parity, slots) in raw.iter_mut().enumerate() {
                for (slot, counters) in slots.iter_mut().enumerate() {
                    for (i, total) in counters.iter_mut().enumerate() {
                        let at = abi::counter_offset(parity, slot, i);
                        let bytes = cpu.get(at..at + 8).and_then(|b| b.try_into().ok());
                        *total += bytes.map_or(0, u64::from_ne_bytes);
                    }
                }
            }
        }
    }
    Ok(raw)
}

/// Reads a rootlet's count of its final verdict (`rootlet_final`), summed
/// over CPUs and parities: a plain count, which needs no derivation.
pub fn read_final(finals: BorrowedFd<'_>) -> Result<u64> {
    let cpus =
        aya::util::nr_cpus().map_err(|(what, source)| sys::SysError { call: what, source })?;
    let mut buf = vec![0u8; abi::FINAL_SIZE * cpus];
    let mut total = 0u64;
    if sys::map_lookup(finals, &0u32.to_ne_bytes(), &mut buf)? {
        for word in buf.chunks_exact(8) {
            total += word.try_into().map_or(0, u64::from_ne_bytes);
        }
    }
    Ok(total)
}

/// One stage of a chain, as its counts are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    pub slot: u32,
    /// The proceed-on mask (bit a: go on after action a).
    pub proceed: u32,
    /// The stage does not count the PASSes it sends on: the next program
    /// counts every packet it gets. Only for a stage built with
    /// <rootlet/stage.h> whose PASS goes on to another such stage.
    pub pass_uncounted: bool,
}

impl Hop {
    /// The hop configuration mask for this stage.
    pub fn mask(&self) -> u32 {
        self.proceed
            | if self.pass_uncounted {
                abi::HOP_PASS_UNCOUNTED
            } else {
                0
            }
    }
}

/// The chain of `pipeline`, in execution order.
pub fn chain(pipeline: &Pipeline) -> Vec<Hop> {
    let stages = &pipeline.stages;
    stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let proceed = s.proceed_on.bits();
            let next_counts = stages.get(i + 1).is_some_and(|n| n.chainable);
            Hop {
                slot: s.slot,
                proceed,
                pass_uncounted: s.chainable
                    && next_counts
                    && proceed & (1 << XdpAction::Pass as u32) != 0,
            }
        })
        .collect()
}

/// The counts of `chain`'s stages from the counts its programs made
/// (`counted`, one parity's).
pub fn derive(counted: &Slots, chain: &[Hop]) -> Slots {
    let mut out = *counted;
    // Every packet the program after this stage got.
    let mut next_got = 0u64;
    for (i, hop) in chain.iter().enumerate().rev() {
        let Some(counts) = out.get_mut(hop.slot as usize) else {
            continue;
        };
        if hop.pass_uncounted && i + 1 < chain.len() {
            let sent_on_counted: u64 = (0..NUM_COUNTERS)
                .filter(|&a| {
                    a == abi::COUNT_EMPTY
                        || (a != XdpAction::Pass as usize && hop.proceed & (1 << a) != 0)
                })
                .map(|a| counts[a])
                .sum();
            let pass = XdpAction::Pass as usize;
            counts[pass] += next_got.saturating_sub(sent_on_counted);
        }
        next_got = counts.iter().sum();
    }
    out
}

/// One parity's current epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Epoch {
    /// The raw counts when it began.
    base: Slots,
    /// The chain the parity runs.
    chain: Vec<Hop>,
}

impl Epoch {
    fn counts(&self, raw: &Slots) -> Slots {
        let mut delta = *raw;
        for (d, b) in delta.iter_mut().zip(&self.base) {
            for (d, b) in d.iter_mut().zip(b) {
                *d = d.saturating_sub(*b);
            }
        }
        derive(&delta, &self.chain)
    }
}

/// What a rootlet's counters add up to: closed epochs, and each parity's
/// current one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    closed: Slots,
    epochs: [Epoch; 2],
}

impl Tally {
    /// A tally starting from the counts `raw` (nothing counted yet).
    pub fn new(raw: &Raw) -> Tally {
        Tally {
            closed: Slots::default(),
            epochs: [0, 1].map(|p| Epoch {
                base: raw[p],
                chain: vec![],
            }),
        }
    }

    /// Closes the epoch of `parity`, which no packet may be running, and
    /// begins one running `chain`.
    pub fn begin(&mut self, parity: u32, raw: &Raw, chain: Vec<Hop>) {
        let p = parity as usize & 1;
        add(&mut self.closed, &self.epochs[p].counts(&raw[p]));
        self.epochs[p] = Epoch {
            base: raw[p],
            chain,
        };
    }

    /// The counts of every slot.
    pub fn counts(&self, raw: &Raw) -> Slots {
        let mut out = self.closed;
        for (epoch, raw) in self.epochs.iter().zip(raw) {
            add(&mut out, &epoch.counts(raw));
        }
        out
    }
}

fn add(to: &mut Slots, from: &Slots) {
    for (t, f) in to.iter_mut().zip(from) {
        for (t, f) in t.iter_mut().zip(f) {
            *t += f;
        }
    }
}

/// Keeps counts from going down between two reads. A read copies each
/// CPU's counters while packets may be halfway through the chain; a packet
/// seen sent on with an action other than PASS but not yet where it stopped
/// makes the PASS derived for that stage one lower than it will be.
#[derive(Debug, Default)]
pub struct Monotonic(std::sync::Mutex<Box<Slots>>);

impl Monotonic {
    pub fn report(&self, counts: Slots) -> Slots {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (l, c) in last.iter_mut().zip(&counts) {
            for (l, c) in l.iter_mut().zip(c) {
                *l = (*l).max(*c);
            }
        }
        **last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROP: usize = XdpAction::Drop as usize;
    const PASS: usize = XdpAction::Pass as usize;
    const TX: usize = XdpAction::Tx as usize;
    const PASS_BIT: u32 = 1 << PASS;

    fn hop(slot: u32, proceed: u32, pass_uncounted: bool) -> Hop {
        Hop {
            slot,
            proceed,
            pass_uncounted,
        }
    }

    /// What a chain of stages counts, packet by packet: `verdicts[i]` is
    /// the verdict each stage gives packet i until one stops it.
    fn run(chain: &[Hop], packets: &[Vec<usize>]) -> (Slots, Slots) {
        let mut counted = Slots::default();
        let mut truth = Slots::default();
        for verdicts in packets {
            for (i, hop) in chain.iter().enumerate() {
                let v = verdicts[i];
                let s = hop.slot as usize;
                truth[s][v] += 1;
                let goes_on = hop.proceed & (1 << v) != 0 && i + 1 < chain.len();
                if !(v == PASS && hop.pass_uncounted && goes_on) {
                    counted[s][v] += 1;
                }
                if !goes_on {
                    break;
                }
            }
        }
        (counted, truth)
    }

    #[test]
    fn passes_are_derived_from_where_packets_stop() {
        let chain = [
            hop(3, PASS_BIT, true),
            hop(0, PASS_BIT | 1 << TX, true),
            hop(7, PASS_BIT, false),
        ];
        let packets = vec![
            vec![PASS, PASS, PASS],
            vec![PASS, PASS, DROP],
            vec![DROP, PASS, PASS],
            vec![PASS, TX, PASS],
            vec![PASS, TX, TX],
            vec![PASS, DROP, PASS],
            vec![PASS, PASS, PASS],
        ];
        let (counted, truth) = run(&chain, &packets);
        assert_eq!(counted[3][PASS], 0, "the first stage counted no PASS");
        assert_eq!(derive(&counted, &chain), truth);
    }

    #[test]
    fn a_stage_before_an_uncounting_one_counts_its_own_pass() {
        // The last stage is a plain XDP program: its verdicts are unknown,
        // so the stage before it counts its PASSes itself.
        let pipeline_chain = [hop(1, PASS_BIT, false), hop(2, PASS_BIT, false)];
        let counted = {
            let mut c = Slots::default();
            c[1][PASS] = 5;
            c[1][DROP] = 2;
            c
        };
        assert_eq!(derive(&counted, &pipeline_chain), counted);
    }

    #[test]
    fn empty_slots_count_as_sent_on() {
        // Slot 4's owner exited: its gate counted 3 packets empty and sent
        // them on, with the 5 the stage passed while it ran.
        let chain = [hop(4, PASS_BIT, true), hop(5, PASS_BIT, false)];
        let mut counted = Slots::default();
        counted[4][abi::COUNT_EMPTY] = 3;
        counted[4][DROP] = 1;
        counted[5][PASS] = 8;
        let out = derive(&counted, &chain);
        assert_eq!(out[4][PASS], 5);
        assert_eq!(out[4][abi::COUNT_EMPTY], 3);
    }

    #[test]
    fn epochs_close_into_totals_and_survive_a_round_trip() {
        let a = [hop(0, PASS_BIT, true), hop(1, PASS_BIT, false)];
        let b = [hop(1, PASS_BIT, true), hop(0, PASS_BIT, false)];
        let mut raw = Raw::default();
        let mut tally = Tally::new(&raw);
        tally.begin(1, &raw, a.to_vec());
        // Parity 1 runs a: 10 packets pass both stages.
        raw[1][1][PASS] += 10;
        assert_eq!(tally.counts(&raw)[0][PASS], 10);
        // Parity 0 is rebuilt with the order reversed, then runs 4 packets.
        tally.begin(0, &raw, b.to_vec());
        raw[0][0][PASS] += 4;
        let stored: Tally = serde_json::from_slice(&serde_json::to_vec(&tally).unwrap()).unwrap();
        assert_eq!(stored, tally);
        // Parity 1 is rebuilt: its epoch (a) closes into the totals.
        let mut t = stored;
        t.begin(1, &raw, b.to_vec());
        let counts = t.counts(&raw);
        assert_eq!(counts[0][PASS], 14);
        assert_eq!(counts[1][PASS], 14);
    }

    #[test]
    fn reports_never_go_down() {
        let m = Monotonic::default();
        let mut c = Slots::default();
        c[0][PASS] = 5;
        assert_eq!(m.report(c)[0][PASS], 5);
        c[0][PASS] = 4;
        assert_eq!(m.report(c)[0][PASS], 5);
        c[0][PASS] = 9;
        assert_eq!(m.report(c)[0][PASS], 9);
    }
}
