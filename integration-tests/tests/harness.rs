//! Tests of the harness itself: namespaces, the veth pair, raw and UDP
//! sockets, the blaster and receiver, and XDP_TX back to the peer.
//!
//! They need root. Each makes its own uniquely named namespaces, so they run
//! concurrently, and each finishes in a few seconds.

use std::collections::BTreeSet;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rootlet_integration_tests::netns::{Netns, VethPair, XdpMode};
use rootlet_integration_tests::packet::{
    ParsedUdp, ipv4_checksum_valid, payload_seq, seq_payload, udp_checksum_valid,
};
use rootlet_integration_tests::traffic::{BlastConfig, Blaster, RawSocket, SeqReceiver, UdpSink};

fn secs(s: u64) -> Instant {
    Instant::now() + Duration::from_secs(s)
}

#[test]
fn veth_pair_delivers_100_udp_frames() -> io::Result<()> {
    let pair = VethPair::new()?;
    let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), 0))?;
    let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
    assert_eq!(raw.ifindex(), pair.peer_ifindex());
    let template = pair.udp_to_host(40000, sink.port(), Vec::new());
    assert_eq!(raw.send_seq(&template, 0..100, 100)?, 100);

    let got = sink.recv_n(100, secs(5))?;
    let seqs: Vec<u64> = got
        .iter()
        .map(|p| payload_seq(p).expect("seq payload"))
        .collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), 100, "received {seqs:?}");
    assert_eq!(unique, (0..100).collect(), "received {seqs:?}");
    assert!(got.iter().all(|p| p.len() == 100));

    // The source address is the peer's, as built.
    raw.send(&template.with_payload(seq_payload(7, 20)).to_bytes())?;
    let (payload, from) = sink
        .recv_timeout(Duration::from_secs(2))?
        .expect("one more datagram");
    assert_eq!(payload_seq(&payload), Some(7));
    assert_eq!(
        from,
        SocketAddr::V4(SocketAddrV4::new(pair.peer_ip(), 40000))
    );
    Ok(())
}

#[test]
fn raw_sockets_see_frames_and_skip_outgoing() -> io::Result<()> {
    let pair = VethPair::new()?;
    // A bound port, so the host answers nothing (no ICMP unreachable).
    let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), 0))?;
    let peer_raw = RawSocket::open(pair.peer(), pair.peer_if())?;
    let host_raw = RawSocket::open_ifindex(pair.host(), pair.host_ifindex())?;
    let frame = pair
        .udp_to_host(1234, sink.port(), seq_payload(42, 64))
        .to_bytes();
    peer_raw.send(&frame)?;

    // The host side receives exactly the bytes sent.
    let got = host_raw
        .recv_timeout(Duration::from_secs(2))?
        .expect("frame on rl0");
    assert_eq!(got, frame);
    assert!(ipv4_checksum_valid(&got) && udp_checksum_valid(&got));
    let parsed = ParsedUdp::parse(&got).expect("parses");
    assert_eq!(parsed.src_mac, pair.peer_mac());
    assert_eq!(parsed.dst_mac, pair.host_mac());
    assert_eq!(parsed.seq(), Some(42));

    // The sender does not see its own frame.
    assert_eq!(peer_raw.recv_timeout(Duration::from_millis(200))?, None);
    assert_eq!(sink.drain()?, 1);
    assert_eq!(host_raw.drain()?, 0);
    Ok(())
}

#[test]
fn blaster_and_seq_receiver() -> io::Result<()> {
    let pair = VethPair::new()?;
    let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), 0))?;
    let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
    let receiver = SeqReceiver::start(&sink, Duration::from_secs(10))?;
    let config = BlastConfig {
        first_seq: 1000,
        rate_pps: 20_000,
        payload_len: 200,
        ..BlastConfig::new(pair.udp_to_host(40001, sink.port(), Vec::new()), 2000)
    };
    let started = Instant::now();
    let blaster = Blaster::start(&raw, config)?;
    let sent = blaster.join();
    assert_eq!(sent.attempted, 2000);
    assert_eq!(sent.sent, 2000, "{:?}", sent.first_error);
    assert_eq!(sent.attempted_seqs(), 1000..3000);
    // Paced: 2000 frames at 20k/s take about 100 ms.
    assert!(
        sent.elapsed >= Duration::from_millis(90),
        "{:?}",
        sent.elapsed
    );
    let report = receiver.finish(Duration::from_millis(200))?;
    assert!(
        report.has_all(1000..3000),
        "missing {:?}",
        report.missing(1000..3000)
    );
    assert_eq!(report.duplicates(), 0);
    assert_eq!(report.invalid, 0);
    assert!(report.unexpected(1000..3000).is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));

    // Bounds: a blaster stops at max_duration, and when asked to.
    let slow = BlastConfig {
        rate_pps: 100,
        max_duration: Duration::from_millis(300),
        ..BlastConfig::new(pair.udp_to_host(40002, sink.port(), Vec::new()), 1_000_000)
    };
    // Frame i is due at i * 10 ms, so at most 30 fit in 300 ms.
    let report = Blaster::start(&raw, slow.clone())?.join();
    assert!((10..=30).contains(&report.attempted), "{report:?}");
    assert!(report.elapsed < Duration::from_secs(1), "{report:?}");
    let blaster = Blaster::start(
        &raw,
        BlastConfig {
            max_duration: Duration::from_secs(60),
            ..slow
        },
    )?;
    std::thread::sleep(Duration::from_millis(50));
    blaster.stop();
    let report = blaster.join();
    assert!(report.attempted < 100, "{report:?}");
    assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
    Ok(())
}

#[test]
fn netns_deleted_on_drop() -> io::Result<()> {
    let ns = Netns::new()?;
    let name = ns.name().to_owned();
    let path = ns.path().to_owned();
    assert!(path.exists());
    assert!(Netns::exists(&name)?);
    // A second one gets another name.
    let other = Netns::new()?;
    assert_ne!(other.name(), name);
    drop(ns);
    assert!(!Netns::exists(&name)?, "{name} still listed");
    assert!(!path.exists());
    assert!(Netns::exists(other.name())?);

    let pair = VethPair::new()?;
    let names = [pair.host().name().to_owned(), pair.peer().name().to_owned()];
    let listed = Netns::list()?;
    assert!(
        names.iter().all(|n| listed.contains(n)),
        "{names:?} not in {listed:?}"
    );
    drop(pair);
    let listed = Netns::list()?;
    assert!(
        names.iter().all(|n| !listed.contains(n)),
        "{names:?} still in {listed:?}"
    );
    Ok(())
}

#[test]
fn run_enters_the_namespace_and_propagates_panics() -> io::Result<()> {
    let pair = VethPair::new()?;
    let ns_ino = std::fs::metadata(pair.host().path())?.ino();
    let inside = pair
        .host()
        .run(|| std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()))?;
    let outside = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    assert_eq!(inside, ns_ino);
    assert_ne!(outside, ns_ino);
    // Borrowing from the caller's stack works (scoped thread).
    let ifname = String::from("rl0");
    assert_eq!(
        pair.host()
            .run(|| nix::net::if_::if_nametoindex(ifname.as_str()))?,
        pair.host_ifindex()
    );
    assert!(
        pair.peer().ifindex("rl0").is_err(),
        "rl0 is not in the peer namespace"
    );

    let caught = panic::catch_unwind(AssertUnwindSafe(|| {
        pair.peer().run(|| panic!("boom inside"))
    }));
    let payload = caught.expect_err("the panic propagates");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom inside"));
    Ok(())
}

#[test]
fn exec_and_ip_report_failures() -> io::Result<()> {
    let ns = Netns::new()?;
    let out = ns.exec(&["ip", "-o", "link", "show", "lo"])?;
    assert!(out.contains("lo"), "{out}");
    let err = ns
        .exec(&["ip", "link", "show", "nosuchif0"])
        .expect_err("fails");
    assert!(err.to_string().contains("nosuchif0"), "{err}");
    assert!(
        err.to_string().contains("does not exist"),
        "stderr is in the error: {err}"
    );
    let err = ns.ip(&["link", "show", "nosuchif1"]).expect_err("fails");
    assert!(err.to_string().contains("does not exist"), "{err}");
    Ok(())
}

#[test]
fn peer_gro_toggles() -> io::Result<()> {
    let pair = VethPair::new()?;
    pair.set_peer_gro(true)?;
    assert!(pair.peer_gro()?);
    pair.set_peer_gro(false)?;
    assert!(!pair.peer_gro()?);
    Ok(())
}

/// A native-mode XDP program on rl0 returning XDP_TX sends frames back to
/// rl1, provided rl1 has an XDP program of its own.
#[test]
fn native_xdp_tx_reaches_peer_with_peer_xdp_pass() -> io::Result<()> {
    let pair = VethPair::new()?;
    pair.attach_peer_xdp_pass()?;
    let shown = pair.peer().ip(&["link", "show", "dev", pair.peer_if()])?;
    assert!(shown.contains("xdp"), "{shown}");
    pair.host().attach_xdp(
        pair.host_if(),
        rootlet_ebpf::TEST_TX,
        "xdp",
        XdpMode::Native,
    )?;

    let raw = RawSocket::open(pair.peer(), pair.peer_if())?;
    let receiver = SeqReceiver::start_raw(&raw, |p| p.dst_port == 7777, Duration::from_secs(10))?;
    let template = pair.udp_to_host(40003, 7777, Vec::new());
    assert_eq!(raw.send_seq(&template, 0..200, 64)?, 200);
    let report = receiver.finish(Duration::from_millis(300))?;
    assert!(
        report.has_all(0..200),
        "missing {:?}",
        report.missing(0..200)
    );
    // TEST_TX bounces frames unchanged.
    let first = report.frames.first().expect("a frame");
    assert_eq!(first.dst_mac, pair.host_mac());
    assert_eq!(first.src_ip, pair.peer_ip());

    pair.host().detach_xdp(pair.host_if(), XdpMode::Native)?;
    pair.detach_peer_xdp()?;
    Ok(())
}
