//! Judging a traffic test by what the data plane saw, not by what a socket
//! received.
//!
//! A busy machine drops datagrams between the XDP verdict and a receiving
//! socket (a starved receiver overflows its buffer), so "the socket got
//! every sequence number" is not evidence about the data plane, and "the
//! socket got nothing" proves no drop. Instead:
//!
//! - [`Witnessed`] reads what the witness stage (`ebpf/src/test/witness.c`,
//!   object `test_witness`) recorded: linked last, it counts every packet
//!   with a sequence payload that every stage before it passed on, by
//!   sequence number. [`Witnessed::judge`] compares that with what the
//!   sender put on the wire: a [`Judgement`] of lost and duplicated packets.
//!   The rootlet's per-slot counters are the other half of the evidence
//!   (each test asserts them).
//! - [`Delivery`] is the separate socket check: every packet the data plane
//!   passed either reached the socket or is one the kernel counted as
//!   dropped by the stack ([`StackDrops`]); it explains itself when it
//!   fails.
//! - [`LinkDrops`] are the veth's own drop counters, reported when packets
//!   never reached the data plane at all.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use rootlet_dataplane::sys;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use crate::netns::{Netns, VethPair};
use crate::traffic::{
    BlastConfig, BlastReport, Blaster, RawSocket, SeqReceiver, SeqReport, UdpSink,
};

/// Sequence numbers `0..WINDOW` are counted one by one
/// (`WITNESS_WINDOW` in `ebpf/src/test/witness.c`); later ones only in
/// total.
pub const WINDOW: u64 = 1 << 18;
/// The witness stage's map.
pub const MAP: &str = "witness_seen";
/// The witness stage's object in the embedded catalog.
pub const OBJECT: &str = "test_witness";

/// Bytes before the per-sequence counts in the map's value
/// (`beyond`, `unnumbered`).
const HEADER: usize = 8;

/// What the witness stage counted.
#[derive(Clone, PartialEq, Eq)]
pub struct Witnessed {
    counts: Vec<u32>,
    /// Packets with a sequence number of [`WINDOW`] or more.
    pub beyond: u32,
    /// Packets without a sequence payload.
    pub unnumbered: u32,
}

impl fmt::Debug for Witnessed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Witnessed")
            .field("numbered", &self.total())
            .field("distinct", &self.seen().len())
            .field("beyond", &self.beyond)
            .field("unnumbered", &self.unnumbered)
            .finish()
    }
}

impl Witnessed {
    /// Reads the witness map (`witness_seen`) through `map`.
    pub fn read(map: BorrowedFd<'_>) -> io::Result<Witnessed> {
        let window = usize::try_from(WINDOW).map_err(io::Error::other)?;
        let mut value = vec![0u8; HEADER + 4 * window];
        if !sys::map_lookup(map, &0u32.to_ne_bytes(), &mut value).map_err(io::Error::other)? {
            return Err(io::Error::other("the witness map has no entry 0"));
        }
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        Ok(Witnessed {
            beyond: word(&value[0..4]),
            unnumbered: word(&value[4..8]),
            counts: value[HEADER..].chunks_exact(4).map(word).collect(),
        })
    }

    /// Reads the witness map of the program with kernel id `prog_id` (a
    /// running `test_witness` stage).
    pub fn of_prog(prog_id: u32) -> io::Result<Witnessed> {
        let prog = sys::prog_fd_by_id(prog_id).map_err(io::Error::other)?;
        let maps = rootlet_dataplane::prog_maps(prog.as_fd()).map_err(io::Error::other)?;
        let map = maps.get(MAP).ok_or_else(|| {
            io::Error::other(format!(
                "program {prog_id} has no map `{MAP}` (maps: {:?}): is it the witness stage?",
                maps.keys().collect::<Vec<_>>()
            ))
        })?;
        Witnessed::read(map.as_fd())
    }

    /// How many times the packet with sequence number `seq` went through
    /// (0 for `seq` ≥ [`WINDOW`]).
    pub fn count(&self, seq: u64) -> u32 {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.counts.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Every sequence number seen at least once.
    pub fn seen(&self) -> BTreeSet<u64> {
        (0..)
            .zip(&self.counts)
            .filter(|(_, c)| **c > 0)
            .map(|(s, _)| s)
            .collect()
    }

    /// Packets with a sequence number below [`WINDOW`], duplicates included.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| u64::from(*c)).sum()
    }

    /// What went through, against `sent`: every sequence number the sender
    /// put on the wire (each once).
    pub fn judge(&self, sent: &BTreeSet<u64>) -> Judgement {
        let seen = self.seen();
        Judgement {
            sent: sent.len() as u64,
            lost: sent.difference(&seen).copied().collect(),
            duplicated: seen
                .iter()
                .filter(|s| self.count(**s) > 1)
                .map(|s| (*s, self.count(*s)))
                .collect(),
            unexpected: seen.difference(sent).copied().collect(),
            beyond: self.beyond,
        }
    }
}

/// Whether the data plane passed every packet sent, exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// How many distinct sequence numbers were sent.
    pub sent: u64,
    /// Sent, never seen by the witness: lost (or dropped by a stage).
    pub lost: Vec<u64>,
    /// Seen more than once: (sequence number, times).
    pub duplicated: Vec<(u64, u32)>,
    /// Seen, never sent.
    pub unexpected: Vec<u64>,
    /// Packets numbered past the witness's window, which it cannot judge.
    pub beyond: u32,
}

impl Judgement {
    /// Every packet sent went through once, and nothing else did.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.beyond == 0
    }
}

impl fmt::Display for Judgement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "of {} packets sent, the data plane lost {} {}, duplicated {} {:?}, passed {} never sent {}",
            self.sent,
            self.lost.len(),
            ranges(&self.lost),
            self.duplicated.len(),
            &self.duplicated[..self.duplicated.len().min(10)],
            self.unexpected.len(),
            ranges(&self.unexpected),
        )?;
        if self.beyond > 0 {
            write!(
                f,
                "; {} packets were numbered past the witness's window",
                self.beyond
            )?;
        }
        Ok(())
    }
}

/// `[a-b, c, ...]`, the first 20 runs of consecutive numbers.
fn ranges(seqs: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = vec![];
    for &s in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => runs.push((s, s)),
        }
    }
    let shown: Vec<String> = runs
        .iter()
        .take(20)
        .map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let more = if runs.len() > 20 {
        format!(", ... {} runs in all", runs.len())
    } else {
        String::new()
    };
    format!("[{}{more}]", shown.join(", "))
}

/// The receiving namespace's counts of datagrams its stack dropped after
/// the data plane passed them: the UDP MIB's `InErrors` (which includes
/// `RcvbufErrors`, a full socket buffer) and the IP MIB's `InDiscards`,
/// from `/proc/thread-self/net/snmp` read inside the namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackDrops {
    pub udp_in_errors: u64,
    pub udp_rcvbuf_errors: u64,
    pub ip_in_discards: u64,
}

impl StackDrops {
    /// The counts of `netns` now.
    pub fn read(netns: &Netns) -> io::Result<StackDrops> {
        // thread-self: /proc/self/net is the namespace of the main thread.
        let snmp = netns.try_run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
        let field = |proto: &str, name: &str| -> io::Result<u64> {
            let mut rows = snmp
                .lines()
                .filter(|l| l.starts_with(&format!("{proto}: ")));
            let (names, values) = (rows.next(), rows.next());
            let (Some(names), Some(values)) = (names, values) else {
                return Err(io::Error::other(format!("no {proto} rows in snmp")));
            };
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
                .ok_or_else(|| io::Error::other(format!("no {proto} {name} in snmp")))
        };
        Ok(StackDrops {
            udp_in_errors: field("Udp", "InErrors")?,
            udp_rcvbuf_errors: field("Udp", "RcvbufErrors")?,
            ip_in_discards: field("Ip", "InDiscards")?,
        })
    }

    /// The drops counted since `earlier`.
    pub fn since(&self, earlier: &StackDrops) -> StackDrops {
        StackDrops {
            udp_in_errors: self.udp_in_errors.saturating_sub(earlier.udp_in_errors),
            udp_rcvbuf_errors: self
                .udp_rcvbuf_errors
                .saturating_sub(earlier.udp_rcvbuf_errors),
            ip_in_discards: self.ip_in_discards.saturating_sub(earlier.ip_in_discards),
        }
    }

    /// Datagrams dropped (`RcvbufErrors` is part of `InErrors`).
    pub fn total(&self) -> u64 {
        self.udp_in_errors + self.ip_in_discards
    }
}

/// The socket check, made against what the data plane passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Passed by the data plane, never received by the socket.
    pub not_received: Vec<u64>,
    /// Received by the socket, never passed by the data plane.
    pub received_not_passed: Vec<u64>,
    /// Arrivals of one sequence number more than once.
    pub duplicates: usize,
    /// What the stack counted as dropped meanwhile.
    pub stack_drops: StackDrops,
}

impl Delivery {
    /// Compares the socket's `received` with the data plane's `passed`
    /// (the witness's [`Witnessed::seen`], restricted to what was sent),
    /// given the stack's drops during the run.
    pub fn check(
        passed: &BTreeSet<u64>,
        received: &SeqReport,
        stack_drops: StackDrops,
    ) -> Delivery {
        let got = received.unique();
        Delivery {
            not_received: passed.difference(&got).copied().collect(),
            received_not_passed: got.difference(passed).copied().collect(),
            duplicates: received.duplicates(),
            stack_drops,
        }
    }

    /// Every packet the data plane passed reached the socket, or the stack
    /// counted as many drops as went missing; the socket got nothing the
    /// data plane did not pass, and nothing twice.
    pub fn is_explained(&self) -> bool {
        self.received_not_passed.is_empty()
            && self.duplicates == 0
            && self.not_received.len() as u64 <= self.stack_drops.total()
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.not_received.is_empty() {
            write!(f, "the socket received every packet the data plane passed")?;
        } else {
            write!(
                f,
                "{} packets the data plane passed did not reach the socket {}; the stack counted {} drops meanwhile ({:?}){}",
                self.not_received.len(),
                ranges(&self.not_received),
                self.stack_drops.total(),
                self.stack_drops,
                if self.not_received.len() as u64 <= self.stack_drops.total() {
                    ": dropped after the data plane (a starved receiver), not a data-plane loss"
                } else {
                    ": more than the stack accounts for"
                },
            )?;
        }
        if !self.received_not_passed.is_empty() {
            write!(
                f,
                "; {} received that the data plane never passed {}",
                self.received_not_passed.len(),
                ranges(&self.received_not_passed)
            )?;
        }
        if self.duplicates > 0 {
            write!(f, "; {} duplicate arrivals", self.duplicates)?;
        }
        Ok(())
    }
}

/// An interface's own drop counters (`ip -s link`): frames the veth pair
/// dropped before the data plane could see them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkDrops {
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl LinkDrops {
    /// The counters of `ifname` in `netns` now.
    pub fn read(netns: &Netns, ifname: &str) -> io::Result<LinkDrops> {
        let out = netns.ip(&["-j", "-s", "link", "show", "dev", ifname])?;
        let json: serde_json::Value = serde_json::from_str(&out).map_err(io::Error::other)?;
        let stats = &json[0]["stats64"];
        let get = |dir: &str| stats[dir]["dropped"].as_u64().unwrap_or(0);
        Ok(LinkDrops {
            rx_dropped: get("rx"),
            tx_dropped: get("tx"),
        })
    }

    /// The drops counted since `earlier`.
    pub fn since(&self, earlier: &LinkDrops) -> LinkDrops {
        LinkDrops {
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }
}

/// Steady, sequence-numbered traffic from a pair's peer to a UDP socket in
/// its host namespace, for a test to judge with the witness stage: start
/// it, make the changes under test, then [`Traffic::finish`].
pub struct Traffic<'a> {
    blaster: Blaster,
    receiver: SeqReceiver,
    pair: &'a VethPair,
    stack_before: StackDrops,
    host_link_before: LinkDrops,
    peer_link_before: LinkDrops,
    _sink: UdpSink,
}

/// What a [`Traffic`] run did and what the data plane and the socket saw.
#[derive(Debug)]
pub struct TrafficRun {
    pub sent: BlastReport,
    pub witnessed: Witnessed,
    pub judgement: Judgement,
    pub delivery: Delivery,
    /// Frames the veth pair dropped before the data plane (host rx, peer
    /// tx).
    pub link_drops: (LinkDrops, LinkDrops),
}

impl<'a> Traffic<'a> {
    /// Starts sending to `HOST_IP:sink_port` at `rate_pps` for at most
    /// `max_duration` (and at most [`WINDOW`] frames).
    pub fn start(
        pair: &'a VethPair,
        sink_port: u16,
        rate_pps: u64,
        max_duration: Duration,
    ) -> io::Result<Traffic<'a>> {
        let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), sink_port))?;
        let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
        let stack_before = StackDrops::read(pair.host())?;
        let host_link_before = LinkDrops::read(pair.host(), pair.host_if())?;
        let peer_link_before = LinkDrops::read(pair.peer(), pair.peer_if())?;
        let receiver = SeqReceiver::start(&sink, max_duration + Duration::from_secs(30))?;
        let mut config = BlastConfig::new(pair.udp_to_host(40000, sink_port, vec![]), WINDOW);
        config.rate_pps = rate_pps;
        config.max_duration = max_duration;
        let blaster = Blaster::start(&raw, config)?;
        Ok(Traffic {
            blaster,
            receiver,
            pair,
            stack_before,
            host_link_before,
            peer_link_before,
            _sink: sink,
        })
    }

    /// Whether the sender is still sending (it stops at its count or time
    /// limit): a test asserts this after the changes it judges, so they
    /// happened while packets flowed.
    pub fn is_flowing(&self) -> bool {
        !self.blaster.is_finished()
    }

    /// Stops the sender, lets the last frames arrive, and judges the run by
    /// the witness `witness()` reads then.
    pub fn finish(self, witness: impl FnOnce() -> io::Result<Witnessed>) -> io::Result<TrafficRun> {
        self.blaster.stop();
        let sent = self.blaster.join();
        let received = self.receiver.finish(Duration::from_millis(500))?;
        let witnessed = witness()?;
        let pair = self.pair;
        let stack = StackDrops::read(pair.host())?.since(&self.stack_before);
        let host_link = LinkDrops::read(pair.host(), pair.host_if())?.since(&self.host_link_before);
        let peer_link = LinkDrops::read(pair.peer(), pair.peer_if())?.since(&self.peer_link_before);
        let on_wire = sent.sent_seqs();
        let judgement = witnessed.judge(&on_wire);
        let passed: BTreeSet<u64> = witnessed.seen().intersection(&on_wire).copied().collect();
        let delivery = Delivery::check(&passed, &received, stack);
        Ok(TrafficRun {
            sent,
            witnessed,
            judgement,
            delivery,
            link_drops: (host_link, peer_link),
        })
    }
}

impl TrafficRun {
    /// Packets that went on the wire.
    pub fn sent(&self) -> u64 {
        self.sent.sent
    }

    /// One line that says what happened, for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{}; sender: {} sent, {} failed, {} slots skipped late (max lag {:?}); veth drops: host rx {}, peer tx {}; socket: {}",
            self.judgement,
            self.sent.sent,
            self.sent.failed.len(),
            self.sent.late,
            self.sent.max_lag,
            self.link_drops.0.rx_dropped,
            self.link_drops.1.tx_dropped,
            self.delivery,
        )
    }

    /// Panics unless the data plane passed every packet exactly once and
    /// the socket check is explained. The data-plane verdict comes first:
    /// a socket drop can never fail it, and a data-plane loss can never
    /// pass it.
    pub fn assert_clean(&self) {
        assert!(
            self.sent.sent > 0 && self.sent.failed.is_empty(),
            "the sender failed: {}",
            self.summary()
        );
        assert!(
            self.judgement.is_clean(),
            "the data plane mis-handled packets: {}",
            self.summary()
        );
        assert!(
            self.delivery.is_explained(),
            "socket delivery does not match what the data plane passed: {}",
            self.summary()
        );
        if !self.delivery.not_received.is_empty() {
            eprintln!("note: {}", self.delivery);
        }
    }
}

/// How long [`Crossings`] waits for a data-plane count to advance: long
/// enough for the VM tier (20-35x slower) at the modest rates the tests
/// send.
pub const ADVANCE_LIMIT: Duration = Duration::from_secs(30);

/// Evidence that traffic flowed across every change a test judges, by a
/// data-plane count (the witness's total, a rootlet's pinned counters):
/// just before each change the count must advance, and again just after
/// it, each wait bounded by [`ADVANCE_LIMIT`]. A test makes its changes
/// between [`Crossings::before`] and [`Crossings::after`] and ends with
/// [`Crossings::assert_flowed`], so a change that landed after the traffic
/// had stopped (or before it began) fails the test instead of passing it
/// trivially.
#[derive(Debug)]
pub struct Crossings {
    /// One per change, in order.
    pub changes: Vec<Crossing>,
    open: Option<(String, u64)>,
    limit: Duration,
}

/// What the data plane counted around one change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub what: String,
    /// Counted in the wait just before the change.
    pub before: u64,
    /// Counted in the wait just after it.
    pub after: u64,
}

impl Default for Crossings {
    fn default() -> Crossings {
        Crossings::new()
    }
}

impl Crossings {
    pub fn new() -> Crossings {
        Crossings::with_limit(ADVANCE_LIMIT)
    }

    /// [`Crossings::new`], waiting at most `limit` for each advance.
    pub fn with_limit(limit: Duration) -> Crossings {
        Crossings {
            changes: vec![],
            open: None,
            limit,
        }
    }

    /// Call just before change `what`: waits until `count` advances (at
    /// most the limit, [`ADVANCE_LIMIT`] by default) and records by how
    /// much.
    pub fn before(&mut self, what: &str, count: impl FnMut() -> u64) {
        assert!(
            self.open.is_none(),
            "Crossings::before({what:?}) before the previous change's after()"
        );
        let before = advance(count, self.limit);
        self.open = Some((what.to_owned(), before));
    }

    /// Call just after the change: waits until `count` advances past its
    /// value now (bounded like [`Crossings::before`]) and records by how
    /// much.
    pub fn after(&mut self, count: impl FnMut() -> u64) {
        let Some((what, before)) = self.open.take() else {
            panic!("Crossings::after() without before()");
        };
        let after = advance(count, self.limit);
        self.changes.push(Crossing {
            what,
            before,
            after,
        });
    }

    /// Panics unless at least one change was judged and the data plane
    /// counted packets both just before and just after each of them.
    pub fn assert_flowed(&self) {
        assert!(self.open.is_none(), "a change without after()");
        assert!(!self.changes.is_empty(), "no change was judged");
        let dry: Vec<&Crossing> = self
            .changes
            .iter()
            .filter(|c| c.before == 0 || c.after == 0)
            .collect();
        assert!(
            dry.is_empty(),
            "no packet counted just before or just after these changes \
             (they were not made under traffic): {dry:?}"
        );
    }
}

/// How much `count` advanced from its value now, once it has (or 0 after
/// `limit`).
fn advance(mut count: impl FnMut() -> u64, limit: Duration) -> u64 {
    let start = count();
    let end = Instant::now() + limit;
    loop {
        let now = count();
        if now > start {
            return now - start;
        }
        if Instant::now() >= end {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn witnessed(seqs: &[u64]) -> Witnessed {
        let mut counts = vec![0; 16];
        for &s in seqs {
            counts[s as usize] += 1;
        }
        Witnessed {
            counts,
            beyond: 0,
            unnumbered: 0,
        }
    }

    #[test]
    fn a_clean_run_is_clean() {
        let w = witnessed(&[0, 1, 2, 3]);
        let j = w.judge(&(0..4).collect());
        assert!(j.is_clean(), "{j}");
    }

    #[test]
    fn losses_duplicates_and_strays_are_each_caught() {
        let w = witnessed(&[0, 2, 2, 3, 9]);
        let j = w.judge(&(0..5).collect());
        assert!(!j.is_clean());
        assert_eq!(j.lost, vec![1, 4]);
        assert_eq!(j.duplicated, vec![(2, 2)]);
        assert_eq!(j.unexpected, vec![9]);
        assert!(j.to_string().contains("lost 2 [1, 4]"), "{j}");
    }

    #[test]
    fn socket_losses_are_explained_only_by_counted_stack_drops() {
        let passed: BTreeSet<u64> = (0..10).collect();
        let received = SeqReport {
            seqs: vec![0, 1, 2, 3, 4, 5, 6, 7],
            ..SeqReport::default()
        };
        let dropped = StackDrops {
            udp_in_errors: 2,
            udp_rcvbuf_errors: 2,
            ip_in_discards: 0,
        };
        let d = Delivery::check(&passed, &received, dropped);
        assert!(d.is_explained(), "{d}");
        let d = Delivery::check(&passed, &received, StackDrops::default());
        assert!(!d.is_explained(), "{d}");
        assert!(d.to_string().contains("more than the stack accounts for"));
        let stray = SeqReport {
            seqs: (0..11).collect(),
            ..SeqReport::default()
        };
        assert!(!Delivery::check(&passed, &stray, StackDrops::default()).is_explained());
    }

    #[test]
    fn crossings_need_packets_on_both_sides_of_every_change() {
        let mut n = 0;
        let mut flowing = || {
            n += 1;
            n
        };
        let mut c = Crossings::new();
        c.before("one", &mut flowing);
        c.after(&mut flowing);
        c.assert_flowed();
        assert_eq!(c.changes[0].before, 1);
        assert_eq!(c.changes[0].after, 1);
    }

    #[test]
    fn a_change_after_the_traffic_stopped_fails_the_crossings() {
        let mut n = 0;
        let mut c = Crossings::with_limit(Duration::from_millis(30));
        c.before("under traffic", || {
            n += 1;
            n
        });
        c.after(|| n);
        let late = std::panic::catch_unwind(|| c.assert_flowed());
        assert!(late.is_err(), "{:?}", c.changes);
        assert_eq!(c.changes[0].after, 0);
    }

    #[test]
    fn ranges_are_compact() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "[1-3, 7, 9-10]");
        assert_eq!(ranges(&[]), "[]");
    }
}
