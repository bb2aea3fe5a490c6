//! Real traffic through a [`VethPair`](crate::netns::VethPair): raw frames
//! in and out of an interface ([`RawSocket`]), a UDP socket to receive on
//! ([`UdpSink`]), a paced sender thread ([`Blaster`]) and a thread recording
//! which sequence numbers arrive ([`SeqReceiver`]).
//!
//! Every wait here is bounded by a timeout or deadline, and every loop by a
//! count or a time limit, so a test that goes wrong fails instead of
//! hanging.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::panic;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::packet::{ParsedUdp, UdpFrame, payload_seq, seq_payload};
use crate::sys;

/// Largest frame a [`RawSocket`] receives whole: an IPv4 packet of 65535
/// bytes plus Ethernet and VLAN headers, rounded up.
const RAW_BUF: usize = 65600;
/// Largest UDP payload.
const UDP_BUF: usize = 65536;
/// A blocking send gives up after this long (SO_SNDTIMEO).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Receive buffer of every socket here (SO_RCVBUFFORCE), so bursts are not
/// dropped while the receiving thread is descheduled: with the default
/// (~208 KiB) an AF_PACKET socket on veth holds only ~200 XDP_TX'd frames.
const RCVBUF: usize = 8 << 20;
/// Most frames [`RawSocket::drain`] / [`UdpSink::drain`] discard in one
/// call.
const DRAIN_LIMIT: usize = 1_000_000;
/// Longest [`BlastConfig::max_duration`] / [`SeqReceiver`] lifetime.
pub const MAX_RUN_TIME: Duration = Duration::from_secs(600);
/// Most arrivals a [`SeqReceiver`] records; it stops after that many.
pub const MAX_RECORDED: usize = 1_000_000;
/// How often the background threads look at their stop flags.
const POLL_SLICE: Duration = Duration::from_millis(20);

/// An AF_PACKET/SOCK_RAW socket bound to one interface of a namespace:
/// sends whole Ethernet frames out of it and receives every frame it
/// receives (frames it sends itself, `PACKET_OUTGOING`, are skipped).
///
/// The socket belongs to the namespace it was opened in and works from any
/// thread. Its receive buffer is 8 MiB, so thousands of frames can queue.
#[derive(Debug)]
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
    buf: Mutex<Vec<u8>>,
}

impl RawSocket {
    /// Opens a socket on interface `ifname` of `netns`.
    pub fn open(netns: &Netns, ifname: &str) -> io::Result<RawSocket> {
        let ifindex = netns.ifindex(ifname)?;
        RawSocket::open_ifindex(netns, ifindex)
    }

    /// Opens a socket on the interface with index `ifindex` in `netns`.
    pub fn open_ifindex(netns: &Netns, ifindex: u32) -> io::Result<RawSocket> {
        let fd = netns.try_run(|| sys::packet_socket(ifindex))??;
        sys::set_send_timeout(fd.as_fd(), SEND_TIMEOUT)?;
        sys::set_recv_buffer(fd.as_fd(), RCVBUF)?;
        Ok(RawSocket {
            fd,
            ifindex,
            buf: Mutex::new(vec![0; RAW_BUF]),
        })
    }

    /// The interface index the socket is bound to (in its namespace).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Another handle to the same kernel socket (one receive queue shared
    /// by both), e.g. to send from one thread and receive on another.
    pub fn try_clone(&self) -> io::Result<RawSocket> {
        Ok(RawSocket {
            fd: self.fd.try_clone()?,
            ifindex: self.ifindex,
            buf: Mutex::new(vec![0; RAW_BUF]),
        })
    }

    /// Sends one frame (Ethernet header first, no FCS) out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let n = sys::send(self.fd.as_fd(), frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    /// Sends one frame per sequence number in `seqs`: `template` with a
    /// [`seq_payload`] of `payload_len` bytes. Stops at the first error.
    pub fn send_seq(
        &self,
        template: &UdpFrame,
        seqs: Range<u64>,
        payload_len: usize,
    ) -> io::Result<u64> {
        let mut sent = 0;
        for seq in seqs {
            self.send(
                &template
                    .with_payload(seq_payload(seq, payload_len))
                    .to_bytes(),
            )?;
            sent += 1;
        }
        Ok(sent)
    }

    /// The next frame received within `timeout`, or `None`.
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        self.recv_matching(timeout, |_| true)
    }

    /// The next frame received within `timeout` for which `pred` holds;
    /// frames it rejects are discarded.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some((len, pkttype)) = sys::recv_frame(self.fd.as_fd(), &mut buf)? {
                if len > buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("received a {len}-byte frame, larger than {RAW_BUF}"),
                    ));
                }
                if pkttype != sys::PACKET_OUTGOING && pred(&buf[..len]) {
                    return Ok(Some(buf[..len].to_vec()));
                }
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            sys::poll_readable(self.fd.as_fd(), deadline - now)?;
        }
    }

    /// The next IPv4/UDP frame received within `timeout` for which `pred`
    /// holds, parsed; other frames are discarded.
    pub fn recv_udp(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&ParsedUdp) -> bool,
    ) -> io::Result<Option<ParsedUdp>> {
        let frame =
            self.recv_matching(timeout, |f| ParsedUdp::parse(f).is_some_and(|p| pred(&p)))?;
        Ok(frame.and_then(|f| ParsedUdp::parse(&f)))
    }

    /// Discards every frame queued now; returns how many (outgoing ones not
    /// counted). Does not wait.
    pub fn drain(&self) -> io::Result<usize> {
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for _ in 0..DRAIN_LIMIT {
            match sys::recv_frame(self.fd.as_fd(), &mut buf)? {
                Some((_, pkttype)) if pkttype != sys::PACKET_OUTGOING => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        Ok(n)
    }
}

/// A nonblocking UDP socket bound in a namespace, to receive datagrams on.
#[derive(Debug)]
pub struct UdpSink {
    sock: UdpSocket,
    local: SocketAddrV4,
}

impl UdpSink {
    /// Binds `addr` (port 0 picks a free port; see [`UdpSink::port`]) in
    /// `netns`, with an 8 MiB receive buffer.
    pub fn bind(netns: &Netns, addr: SocketAddrV4) -> io::Result<UdpSink> {
        let sock = netns.try_run(|| UdpSocket::bind(addr))??;
        sock.set_nonblocking(true)?;
        sys::set_recv_buffer(sock.as_fd(), RCVBUF)?;
        let local = match sock.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => return Err(io::Error::other(format!("bound to IPv6 {a}"))),
        };
        Ok(UdpSink { sock, local })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<UdpSink> {
        Ok(UdpSink {
            sock: self.sock.try_clone()?,
            local: self.local,
        })
    }

    /// The next datagram (payload and sender) within `timeout`, or `None`.
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<(Vec<u8>, SocketAddr)>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0; UDP_BUF];
        loop {
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    buf.truncate(n);
                    return Ok(Some((buf, from)));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            sys::poll_readable(self.sock.as_fd(), deadline - now)?;
        }
    }

    /// Payloads received until `n` have arrived or `deadline` passes.
    pub fn recv_n(&self, n: usize, deadline: Instant) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while out.len() < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.recv_timeout(deadline - now)? {
                Some((payload, _)) => out.push(payload),
                None => break,
            }
        }
        Ok(out)
    }

    /// Payloads received until `deadline` (always waits that long).
    pub fn recv_all(&self, deadline: Instant) -> io::Result<Vec<Vec<u8>>> {
        self.recv_n(usize::MAX, deadline)
    }

    /// Payloads received until none has come for `idle`, or `deadline`
    /// passes.
    pub fn recv_until_idle(&self, idle: Duration, deadline: Instant) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.recv_timeout(idle.min(deadline - now))? {
                Some((payload, _)) => out.push(payload),
                None => break,
            }
        }
        Ok(out)
    }

    /// Discards every datagram queued now; returns how many. Does not wait.
    pub fn drain(&self) -> io::Result<usize> {
        let mut buf = vec![0; UDP_BUF];
        let mut n = 0;
        while n < DRAIN_LIMIT {
            match self.sock.recv_from(&mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// What a [`Blaster`] sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlastConfig {
    /// Addressing of every frame; its payload is replaced by
    /// [`seq_payload`]`(seq, payload_len)`.
    pub template: UdpFrame,
    /// Payload length (at least [`crate::packet::SEQ_HEADER_LEN`]).
    pub payload_len: usize,
    /// Sequence number of the first frame; they count up by one.
    pub first_seq: u64,
    /// Frames to send at most.
    pub count: u64,
    /// Frames per second at most (> 0): schedule slot `i` is due
    /// `i / rate_pps` seconds after the start, and a sender more than
    /// [`LATE_SLACK`] late skips slots rather than bursting
    /// ([`BlastReport::late`]).
    pub rate_pps: u64,
    /// Time to send for at most (≤ [`MAX_RUN_TIME`]).
    pub max_duration: Duration,
}

impl BlastConfig {
    /// `count` frames like `template` with 64-byte payloads, sequence
    /// numbers from 0, at 10 000 frames/s, for at most 10 s.
    pub fn new(template: UdpFrame, count: u64) -> BlastConfig {
        BlastConfig {
            template,
            payload_len: 64,
            first_seq: 0,
            count,
            rate_pps: 10_000,
            max_duration: Duration::from_secs(10),
        }
    }
}

/// What a [`Blaster`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlastReport {
    /// Sequence number of the first frame.
    pub first_seq: u64,
    /// Frames it tried to send: sequence numbers
    /// `first_seq..first_seq + attempted`.
    pub attempted: u64,
    /// Frames the kernel accepted.
    pub sent: u64,
    /// Sequence numbers whose send failed.
    pub failed: Vec<u64>,
    /// The first send error, if any.
    pub first_error: Option<String>,
    /// Schedule slots skipped because the sender was more than
    /// [`LATE_SLACK`] behind (frames it could not send on time); sequence
    /// numbers stay consecutive over the frames it did send.
    pub late: u64,
    /// The longest the sender was behind its schedule.
    pub max_lag: Duration,
    /// Time from start to the last send.
    pub elapsed: Duration,
}

impl BlastReport {
    /// Every sequence number it tried to send.
    pub fn attempted_seqs(&self) -> Range<u64> {
        self.first_seq..self.first_seq + self.attempted
    }

    /// The sequence numbers the kernel accepted.
    pub fn sent_seqs(&self) -> BTreeSet<u64> {
        let failed: BTreeSet<u64> = self.failed.iter().copied().collect();
        self.attempted_seqs()
            .filter(|s| !failed.contains(s))
            .collect()
    }
}

/// Sends sequence-numbered UDP frames from a [`RawSocket`] on a background
/// thread, paced to [`BlastConfig::rate_pps`], until [`BlastConfig::count`]
/// frames have gone, [`BlastConfig::max_duration`] has passed or it is
/// stopped. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Blaster {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<BlastReport>>,
}

impl Blaster {
    /// Starts sending from (a clone of) `socket`.
    pub fn start(socket: &RawSocket, config: BlastConfig) -> io::Result<Blaster> {
        if config.rate_pps == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "rate_pps must be > 0",
            ));
        }
        if config.max_duration > MAX_RUN_TIME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_duration {:?} exceeds {MAX_RUN_TIME:?}",
                    config.max_duration
                ),
            ));
        }
        let socket = socket.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = thread::Builder::new()
            .name("blaster".into())
            .spawn(move || blast(&socket, &config, &thread_stop))?;
        Ok(Blaster {
            stop,
            handle: Some(handle),
        })
    }

    /// Asks the thread to stop after the current frame.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread to finish (it will, within `max_duration`) and
    /// returns its report. A panic in it is resumed here.
    pub fn join(mut self) -> BlastReport {
        let handle = self.handle.take().expect("joined once");
        match handle.join() {
            Ok(report) => report,
            Err(payload) => panic::resume_unwind(payload),
        }
    }
}

impl Drop for Blaster {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.stop();
            let _ = handle.join();
        }
    }
}

/// How far a [`Blaster`] may fall behind its schedule and still catch up:
/// at most this long's worth of frames goes out back to back.
pub const LATE_SLACK: Duration = Duration::from_millis(5);

/// The schedule of a paced sender: slot `i` is due `i / rate_pps` after the
/// start. A sender that falls behind by more than [`LATE_SLACK`] (it was
/// descheduled, the machine stalled) does not burst to catch up: it skips
/// the slots it missed and counts them, so the wire never sees more than
/// `LATE_SLACK × rate_pps` frames back to back.
#[derive(Clone, Debug)]
struct Pacer {
    rate_pps: u64,
    /// The next slot.
    slot: u64,
    /// Slots skipped because they were late.
    skipped: u64,
    /// The longest the sender was behind its schedule.
    max_lag: Duration,
}

/// What a [`Pacer`] says to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    /// Wait this long for the next slot.
    Wait(Duration),
    /// Send one frame now.
    Send,
}

impl Pacer {
    fn new(rate_pps: u64) -> Pacer {
        Pacer {
            rate_pps: rate_pps.max(1),
            slot: 0,
            skipped: 0,
            max_lag: Duration::ZERO,
        }
    }

    fn due(&self, slot: u64) -> Duration {
        let ns = u128::from(slot) * 1_000_000_000 / u128::from(self.rate_pps);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// At `elapsed` since the start: wait, or send (the caller then sends
    /// one frame and the slot is used).
    fn next(&mut self, elapsed: Duration) -> Pace {
        let due = self.due(self.slot);
        if elapsed < due {
            return Pace::Wait(due - elapsed);
        }
        let lag = elapsed - due;
        self.max_lag = self.max_lag.max(lag);
        if lag > LATE_SLACK {
            // The slot due now (the last one not later than `elapsed`).
            let now_slot =
                u64::try_from(elapsed.as_nanos() * u128::from(self.rate_pps) / 1_000_000_000)
                    .unwrap_or(u64::MAX);
            self.skipped += now_slot.saturating_sub(self.slot);
            self.slot = now_slot.max(self.slot);
        }
        self.slot += 1;
        Pace::Send
    }
}

fn blast(socket: &RawSocket, config: &BlastConfig, stop: &AtomicBool) -> BlastReport {
    let start = Instant::now();
    let mut report = BlastReport {
        first_seq: config.first_seq,
        attempted: 0,
        sent: 0,
        failed: Vec::new(),
        first_error: None,
        late: 0,
        max_lag: Duration::ZERO,
        elapsed: Duration::ZERO,
    };
    let mut pacer = Pacer::new(config.rate_pps);
    'frames: while report.attempted < config.count {
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'frames;
            }
            let elapsed = start.elapsed();
            if elapsed >= config.max_duration {
                break 'frames;
            }
            match pacer.next(elapsed) {
                Pace::Send => break,
                Pace::Wait(d) => thread::sleep(d.min(POLL_SLICE)),
            }
        }
        let Some(seq) = config.first_seq.checked_add(report.attempted) else {
            break;
        };
        let frame = config
            .template
            .with_payload(seq_payload(seq, config.payload_len))
            .to_bytes();
        report.attempted += 1;
        match socket.send(&frame) {
            Ok(()) => report.sent += 1,
            Err(e) => {
                report.failed.push(seq);
                report.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    report.late = pacer.skipped;
    report.max_lag = pacer.max_lag;
    report.elapsed = start.elapsed();
    report
}

/// Which sequence numbers a [`SeqReceiver`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqReport {
    /// Sequence numbers in arrival order (duplicates kept).
    pub seqs: Vec<u64>,
    /// Arrivals whose payload was not a [`seq_payload`].
    pub invalid: u64,
    /// For a raw receiver ([`SeqReceiver::start_raw`]), every frame it
    /// accepted, parsed, in arrival order; empty for a UDP one.
    pub frames: Vec<ParsedUdp>,
    /// How long the receiver ran.
    pub elapsed: Duration,
}

impl SeqReport {
    /// Number of arrivals with a sequence number.
    pub fn received(&self) -> usize {
        self.seqs.len()
    }

    /// The distinct sequence numbers seen.
    pub fn unique(&self) -> BTreeSet<u64> {
        self.seqs.iter().copied().collect()
    }

    /// Arrivals of a sequence number seen before.
    pub fn duplicates(&self) -> usize {
        self.seqs.len() - self.unique().len()
    }

    /// Sequence numbers in `expected` not seen.
    pub fn missing(&self, expected: Range<u64>) -> Vec<u64> {
        let seen = self.unique();
        expected.filter(|s| !seen.contains(s)).collect()
    }

    /// Distinct sequence numbers seen outside `expected`.
    pub fn unexpected(&self, expected: Range<u64>) -> Vec<u64> {
        self.unique()
            .into_iter()
            .filter(|s| !expected.contains(s))
            .collect()
    }

    /// Whether every sequence number in `expected` was seen.
    pub fn has_all(&self, expected: Range<u64>) -> bool {
        self.missing(expected).is_empty()
    }
}

type FrameFilter = Box<dyn FnMut(&ParsedUdp) -> bool + Send>;

enum Source {
    Udp(UdpSink),
    Raw(RawSocket, FrameFilter),
}

/// Records, on a background thread, the sequence numbers of the
/// [`seq_payload`]s arriving on a [`UdpSink`] (or, with
/// [`SeqReceiver::start_raw`], in UDP frames on a [`RawSocket`]), until
/// [`SeqReceiver::finish`] or its time limit. Dropping it stops and joins
/// the thread.
#[derive(Debug)]
pub struct SeqReceiver {
    stop: Arc<AtomicBool>,
    idle_ns: Arc<AtomicU64>,
    handle: Option<JoinHandle<io::Result<SeqReport>>>,
}

impl SeqReceiver {
    /// Starts recording datagrams arriving on (a clone of) `sink`, for at
    /// most `max_duration` (≤ [`MAX_RUN_TIME`]).
    pub fn start(sink: &UdpSink, max_duration: Duration) -> io::Result<SeqReceiver> {
        SeqReceiver::spawn(Source::Udp(sink.try_clone()?), max_duration)
    }

    /// Starts recording the IPv4/UDP frames arriving on (a clone of)
    /// `socket` for which `filter` holds (e.g. frames an XDP program sent
    /// back with `XDP_TX`), keeping each parsed frame in
    /// [`SeqReport::frames`]; for at most `max_duration`.
    pub fn start_raw(
        socket: &RawSocket,
        filter: impl FnMut(&ParsedUdp) -> bool + Send + 'static,
        max_duration: Duration,
    ) -> io::Result<SeqReceiver> {
        SeqReceiver::spawn(
            Source::Raw(socket.try_clone()?, Box::new(filter)),
            max_duration,
        )
    }

    fn spawn(source: Source, max_duration: Duration) -> io::Result<SeqReceiver> {
        if max_duration > MAX_RUN_TIME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("max_duration {max_duration:?} exceeds {MAX_RUN_TIME:?}"),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let idle_ns = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_idle) = (Arc::clone(&stop), Arc::clone(&idle_ns));
        let handle = thread::Builder::new()
            .name("seq-receiver".into())
            .spawn(move || receive(source, max_duration, &thread_stop, &thread_idle))?;
        Ok(SeqReceiver {
            stop,
            idle_ns,
            handle: Some(handle),
        })
    }

    /// Stops once nothing has arrived for `idle` (counted from the later of
    /// this call and the last arrival, so frames still in flight are
    /// caught), or at the time limit, and returns the report. Errors are
    /// the receiving socket's; a panic in the thread is resumed here.
    pub fn finish(mut self, idle: Duration) -> io::Result<SeqReport> {
        self.idle_ns.store(
            u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.stop.store(true, Ordering::Release);
        let handle = self.handle.take().expect("finished once");
        match handle.join() {
            Ok(result) => result,
            Err(payload) => panic::resume_unwind(payload),
        }
    }
}

impl Drop for SeqReceiver {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.stop.store(true, Ordering::Release);
            let _ = handle.join();
        }
    }
}

fn receive(
    mut source: Source,
    max_duration: Duration,
    stop: &AtomicBool,
    idle_ns: &AtomicU64,
) -> io::Result<SeqReport> {
    let start = Instant::now();
    let mut report = SeqReport::default();
    let mut last_arrival = start;
    // (when the stop request was seen, the idle time asked for)
    let mut stopping: Option<(Instant, Duration)> = None;
    while report.seqs.len() + report.frames.len() < MAX_RECORDED {
        let now = Instant::now();
        let elapsed = now.duration_since(start);
        if elapsed >= max_duration {
            break;
        }
        if stopping.is_none() && stop.load(Ordering::Acquire) {
            stopping = Some((now, Duration::from_nanos(idle_ns.load(Ordering::Relaxed))));
        }
        let mut wait = POLL_SLICE.min(max_duration - elapsed);
        if let Some((seen, idle)) = stopping {
            let quiet = now.duration_since(last_arrival.max(seen));
            if quiet >= idle {
                break;
            }
            wait = wait.min(idle - quiet);
        }
        let arrived = match &mut source {
            Source::Udp(sink) => match sink.recv_timeout(wait)? {
                Some((payload, _)) => {
                    record(&mut report, payload_seq(&payload));
                    true
                }
                None => false,
            },
            Source::Raw(socket, filter) => match socket.recv_udp(wait, |p| filter(p))? {
                Some(parsed) => {
                    record(&mut report, parsed.seq());
                    report.frames.push(parsed);
                    true
                }
                None => false,
            },
        };
        if arrived {
            last_arrival = Instant::now();
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

fn record(report: &mut SeqReport, seq: Option<u64>) {
    match seq {
        Some(seq) => report.seqs.push(seq),
        None => report.invalid += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_report_accounting() {
        let report = SeqReport {
            seqs: vec![3, 1, 2, 2, 9],
            ..SeqReport::default()
        };
        assert_eq!(report.received(), 5);
        assert_eq!(report.duplicates(), 1);
        assert_eq!(report.missing(0..5), vec![0, 4]);
        assert_eq!(report.unexpected(0..5), vec![9]);
        assert!(report.has_all(1..4));
        assert!(!report.has_all(0..4));
    }

    #[test]
    fn the_pacer_keeps_its_rate_and_skips_rather_than_bursts() {
        let ms = Duration::from_millis;
        let mut p = Pacer::new(1000); // one slot per millisecond
        assert_eq!(p.next(Duration::ZERO), Pace::Send);
        assert_eq!(
            p.next(Duration::from_micros(200)),
            Pace::Wait(Duration::from_micros(800))
        );
        assert_eq!(p.next(ms(1)), Pace::Send);
        // A little late (within the slack): it catches up, slot by slot.
        let sends = (0..3).filter(|_| p.next(ms(4)) == Pace::Send).count();
        assert_eq!(sends, 3, "slots 2, 3 and 4 go out");
        assert!(matches!(p.next(ms(4)), Pace::Wait(_)));
        assert_eq!(p.skipped, 0);
        // A one-second stall: it does not send the 1000 frames it missed.
        assert_eq!(p.next(ms(1005)), Pace::Send);
        assert_eq!(p.skipped, 1000, "slots 5..1005 skipped");
        assert!(
            matches!(p.next(ms(1005)), Pace::Wait(_)),
            "no burst after a stall"
        );
        assert!(p.max_lag >= ms(1000));
    }

    #[test]
    fn blast_report_seqs() {
        let report = BlastReport {
            first_seq: 10,
            attempted: 5,
            sent: 4,
            failed: vec![12],
            first_error: Some("x".into()),
            late: 0,
            max_lag: Duration::ZERO,
            elapsed: Duration::ZERO,
        };
        assert_eq!(report.attempted_seqs(), 10..15);
        assert_eq!(
            report.sent_seqs().into_iter().collect::<Vec<_>>(),
            vec![10, 11, 13, 14]
        );
    }
}
