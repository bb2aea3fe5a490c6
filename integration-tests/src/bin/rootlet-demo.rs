//! `rootlet-demo`: the three-stage pipeline (sampler → ddos → l4lb) on a veth
//! pair in fresh namespaces, with real traffic, the state read back from the
//! kernel, and a live replacement of a stage while packets flow.
//! Run by `scripts/demo.sh`; the backend comes from `ROOTLET_TEST_BACKEND`
//! (auto, freplace or tailcall), as for the tests.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use rootlet_dataplane::{
    Dataplane,
    spec::{Change, MapPolicy, RootletKey, XdpMode},
    state::RootletState,
};
use rootlet_integration_tests::{
    fixture::{self, Fixture},
    netns::{HOST_IP, PEER_IP, PEER_MAC},
    packet::{ParsedUdp, seq_payload},
    policy,
    traffic::{BlastConfig, Blaster, RawSocket, SeqReceiver, UdpSink},
};

const BLOCKED: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 100);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let f = Fixture::new();
    println!(
        "» namespaces {} (rootlet on {}) and {} (traffic from {})",
        f.pair.host().name(),
        f.pair.host_if(),
        f.pair.peer().name(),
        f.pair.peer_if()
    );
    let dp = f.open();
    println!("» kernel probe: {}", dp.capabilities().summary());
    let key = f.load(&dp);
    println!(
        "» rootlet loaded with the {} backend (bpffs: {})",
        dp.backend()?,
        f.root.display()
    );

    dp.apply(
        key,
        &[
            Change::Link(fixture::stage("sampler", "sampler", 10)),
            Change::Link(fixture::stage("ddos", "ddos", 20)),
            Change::Link(fixture::stage("lb", "l4lb", 30)),
        ],
        None,
    )?;
    configure(&dp, key)?;
    println!(
        "» linked sampler (10), ddos (20), lb (30); blocked {BLOCKED}; VIP {VIP}:7000 → backend {PEER_IP}"
    );
    if dp.state(key)?.mode == XdpMode::Driver {
        f.pair.attach_peer_xdp_pass()?;
    }

    let sink = UdpSink::bind(f.pair.host(), SocketAddrV4::new(HOST_IP, 6000))?;
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if())?;
    for i in 0..200 {
        raw.send(
            &f.pair
                .udp_to_host(40000, 6000, seq_payload(i, 64))
                .to_bytes(),
        )?;
    }
    for i in 0..50 {
        let mut fr = f.pair.udp_to_host(40000, 6000, seq_payload(i, 64));
        fr.src_ip = BLOCKED;
        raw.send(&fr.to_bytes())?;
    }
    for i in 0..100u16 {
        let mut fr = f
            .pair
            .udp_to_host(40000 + i, 7000, seq_payload(u64::from(i), 64));
        fr.dst_ip = VIP;
        raw.send(&fr.to_bytes())?;
    }
    let delivered = sink
        .recv_until_idle(
            Duration::from_millis(300),
            Instant::now() + Duration::from_secs(10),
        )?
        .len();
    let mut bounced = 0;
    let end = Instant::now() + Duration::from_secs(10);
    while bounced < 100 && Instant::now() < end {
        if raw
            .recv_matching(Duration::from_millis(300), |b| {
                ParsedUdp::parse(b).is_some_and(|p| p.dst_ip == PEER_IP && p.dst_port == 7000)
            })?
            .is_some()
        {
            bounced += 1;
        }
    }
    println!(
        "» sent 200 normal, 50 from {BLOCKED}, 100 to the VIP: {delivered} delivered, {bounced} sent back to the backend (XDP_TX)"
    );
    print_state(&dp.state(key)?);

    println!("» replacing ddos with ddos_v2 (maps kept) while 4000 packets flow at 2000/s");
    let receiver = SeqReceiver::start(&sink, Duration::from_secs(60))?;
    let mut config = BlastConfig::new(f.pair.udp_to_host(40001, 6000, vec![]), 4000);
    config.rate_pps = 2000;
    config.first_seq = 10_000;
    let blaster = Blaster::start(&raw, config)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut v2 = fixture::stage("ddos", "ddos_v2", 20);
    v2.maps = MapPolicy::Keep;
    let t = Instant::now();
    let generation = dp.apply(key, &[Change::Replace(v2)], None)?;
    let took = t.elapsed();
    let report = blaster.join();
    let seqs = receiver.finish(Duration::from_millis(300))?;
    let lost = seqs.missing(report.attempted_seqs()).len();
    println!(
        "» generation {generation} live after {took:.1?}; {} sent, {} received, {lost} lost",
        report.sent,
        seqs.received()
    );
    let mut probe = f
        .pair
        .udp_to_host(40000, 6000, seq_payload(1, 64))
        .to_bytes();
    probe[26..30].copy_from_slice(&BLOCKED.octets());
    let state = dp.state(key)?;
    println!(
        "» the blocklist survived the upgrade: a packet from {BLOCKED} → {}",
        verdict(fixture::test_run(&state, &probe))
    );
    print_state(&state);
    dp.unload_rootlet(key)?;
    println!("» unloaded; namespaces and pins removed");
    if lost > 0 {
        return Err(format!("{lost} packets lost during the replacement").into());
    }
    Ok(())
}

/// Fills the ddos and l4lb policies as the agent does: each a new inner map,
/// filled and swapped in at once.
fn configure(dp: &Dataplane, key: RootletKey) -> Result<()> {
    policy::replace(
        dp,
        key,
        "ddos",
        policy::BLOCKLIST,
        &[policy::block_entry(BLOCKED, 32, 0)],
    )?;
    policy::replace(
        dp,
        key,
        "lb",
        policy::SERVICES,
        &[(
            policy::vip_key(VIP, 7000, 17),
            policy::service_value(&[(PEER_IP, PEER_MAC)]),
        )],
    )?;
    Ok(())
}

fn verdict(v: u32) -> &'static str {
    [
        "XDP_ABORTED",
        "XDP_DROP",
        "XDP_PASS",
        "XDP_TX",
        "XDP_REDIRECT",
    ]
    .get(v as usize)
    .copied()
    .unwrap_or("?")
}

fn print_state(s: &RootletState) {
    println!(
        "  {} backend={} mode={:?} generation={} rootlet prog={} tag={} xdp link={}",
        s.ifname, s.backend, s.mode, s.generation, s.rootlet.id, s.rootlet.tag, s.xdp_link_id
    );
    println!(
        "  {:<4} {:<8} {:>5} {:>16} {:>6} {:>7} {:>6} {:>6} {:>5} {:>5}",
        "slot", "stage", "prog", "tag", "insns", "pass", "drop", "tx", "abrt", "empty"
    );
    for slot in &s.slots {
        let (id, tag, insns) = slot.prog.as_ref().map_or((0, "-".to_string(), 0), |p| {
            (p.id, p.tag.clone(), p.verified_insns)
        });
        let c = &slot.counters;
        println!(
            "  {:<4} {:<8} {:>5} {:>16} {:>6} {:>7} {:>6} {:>6} {:>5} {:>5}",
            slot.slot, slot.stage, id, tag, insns, c.pass, c.drop, c.tx, c.aborted, c.empty
        );
    }
}
