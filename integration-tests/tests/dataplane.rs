//! The data plane on a real kernel, parameterised by backend
//! (`ROOTLET_TEST_BACKEND`): the tail-call run is native, the freplace run
//! boots a kernel that permits BPF_PROG_TYPE_EXT (scripts/vm-run). Real
//! programs, real packets from a peer namespace through a veth pair.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use rootlet_dataplane::{
    Error,
    object::CheckError,
    spec::{ActionSet, Backend, Change, MapPolicy, XdpAction, XdpMode},
    sys,
};
use rootlet_integration_tests::{
    fixture::{self, Fixture, Step, maps_of_prog, read_u64, slot, stage, test_run},
    netns::{HOST_IP, PEER_IP, PEER_MAC},
    packet::{
        ParsedUdp, UdpFrame, ipv4_checksum_valid, payload_seq, seq_payload, udp_checksum_valid,
    },
    policy,
    traffic::{RawSocket, UdpSink},
    witness::{self, Crossings, Delivery, StackDrops, Traffic, TrafficRun, Witnessed},
};

const BLOCKED: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 3);
const VIP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 100);
const VIP_PORT: u16 = 7000;
const SINK_PORT: u16 = 6000;

/// Makes the ddos stage's blocklist exactly `ip`/32 (rule 0), as the agent
/// does: a new inner map swapped in.
fn block(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    ip: Ipv4Addr,
) {
    policy::replace(
        dp,
        key,
        "ddos",
        policy::BLOCKLIST,
        &[policy::block_entry(ip, 32, 0)],
    )
    .expect("block");
}

fn is_blocked(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    ip: Ipv4Addr,
) -> bool {
    let k = policy::ddos_key(ip, 32);
    policy::entries(dp, key, "ddos", policy::BLOCKLIST)
        .expect("blocklist")
        .iter()
        .any(|(key, _)| *key == k)
}

/// One UDP service, VIP:VIP_PORT, with the peer as its one backend.
fn configure_lb(dp: &rootlet_dataplane::Dataplane, key: rootlet_dataplane::spec::RootletKey) {
    policy::replace(
        dp,
        key,
        "lb",
        policy::SERVICES,
        &[(
            policy::vip_key(VIP, VIP_PORT, 17),
            policy::service_value(&[(PEER_IP, PEER_MAC)]),
        )],
    )
    .expect("service");
}

fn deadline(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// The backend the data plane picked must be the one under test.
fn assert_backend(dp: &rootlet_dataplane::Dataplane) -> Backend {
    let b = dp.backend().expect("a backend");
    match fixture::backend_name() {
        "freplace" => assert_eq!(b, Backend::Freplace),
        "tailcall" => assert_eq!(b, Backend::TailCall),
        _ => eprintln!("backend chosen by the probe: {b}"),
    }
    b
}

#[test]
fn three_stage_pipeline_verdicts_and_counters() {
    let f = Fixture::new();
    let dp = f.open();
    assert_backend(&dp);
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("lb", "l4lb", 30)),
            Change::Link(stage("sampler", "sampler", 10)),
            Change::Link(stage("ddos", "ddos", 20)),
            Change::Link(stage("w", witness::OBJECT, 40)),
        ],
        None,
    )
    .expect("link three stages");
    block(&dp, key, BLOCKED);
    configure_lb(&dp, key);
    let state = dp.state(key).expect("state");
    assert_eq!(
        state
            .slots
            .iter()
            .map(|s| s.stage.as_str())
            .collect::<Vec<_>>(),
        ["sampler", "ddos", "lb", "w"],
        "execution order is by priority"
    );
    if state.mode == XdpMode::Driver {
        f.pair
            .attach_peer_xdp_pass()
            .expect("peer XDP for native XDP_TX");
    }

    let sink = UdpSink::bind(f.pair.host(), SocketAddrV4::new(HOST_IP, SINK_PORT)).expect("sink");
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    let stack_before = StackDrops::read(f.pair.host()).expect("snmp");
    for i in 0..50u64 {
        raw.send(
            &f.pair
                .udp_to_host(40000, SINK_PORT, seq_payload(i, 64))
                .to_bytes(),
        )
        .expect("send");
    }
    for i in 0..20u64 {
        let mut frame = f
            .pair
            .udp_to_host(40000, SINK_PORT, seq_payload(1000 + i, 64));
        frame.src_ip = BLOCKED;
        raw.send(&frame.to_bytes()).expect("send");
    }
    for i in 0..30u64 {
        let mut frame = f
            .pair
            .udp_to_host(40000 + i as u16, VIP_PORT, seq_payload(2000 + i, 64));
        frame.dst_ip = VIP;
        raw.send(&frame.to_bytes()).expect("send");
    }

    let got = sink
        .recv_until_idle(Duration::from_millis(500), deadline(20))
        .expect("receive");
    // What the data plane passed decides; the socket is checked against it.
    let seen = witnessed(&dp, key, "w").expect("witness");
    let judgement = seen.judge(&(0..50).collect());
    assert!(
        judgement.is_clean(),
        "passed packets go through once, blocked and VIP ones do not: {judgement}"
    );
    let received = rootlet_integration_tests::traffic::SeqReport {
        seqs: got.iter().filter_map(|p| payload_seq(p)).collect(),
        ..Default::default()
    };
    let stack = StackDrops::read(f.pair.host())
        .expect("snmp")
        .since(&stack_before);
    let delivery = Delivery::check(&seen.seen(), &received, stack);
    assert!(delivery.is_explained(), "{delivery}");

    let mut bounced = 0;
    let end = deadline(20);
    while bounced < 30 && Instant::now() < end {
        let Some(frame) = raw
            .recv_matching(Duration::from_millis(500), |b| {
                ParsedUdp::parse(b).is_some_and(|p| p.dst_port == VIP_PORT)
            })
            .expect("raw recv")
        else {
            continue;
        };
        let p = ParsedUdp::parse(&frame).expect("udp");
        assert_eq!(p.dst_ip, PEER_IP, "rewritten to the backend");
        assert_eq!(p.dst_mac, PEER_MAC);
        assert!(
            ipv4_checksum_valid(&frame) && udp_checksum_valid(&frame),
            "checksums updated"
        );
        bounced += 1;
    }
    // How many were sent back is the data plane's count (lb's tx, below);
    // the raw socket checks what the ones that came back look like.
    assert!(bounced > 0, "VIP packets come back with XDP_TX");

    let state = dp.state(key).expect("state");
    let (s, d, l) = (
        slot(&state, "sampler"),
        slot(&state, "ddos"),
        slot(&state, "lb"),
    );
    assert_eq!(s.counters.pass, 100, "{:?}", s.counters);
    assert_eq!(d.counters.drop, 20, "{:?}", d.counters);
    assert_eq!(d.counters.pass, 80, "{:?}", d.counters);
    assert_eq!(l.counters.tx, 30, "{:?}", l.counters);
    assert_eq!(l.counters.pass, 50, "{:?}", l.counters);
    assert_eq!(slot(&state, "w").counters.pass, 50);
    for st in [s, d, l] {
        assert_eq!(st.counters.empty + st.counters.aborted, 0);
        let prog = st.prog.as_ref().expect("a program");
        assert!(prog.verified_insns > 0 && prog.id > 0 && prog.tag.len() == 16);
    }
    let sampler_maps = maps_of_prog(s.prog.as_ref().map(|p| p.id).unwrap_or_default());
    assert_eq!(
        read_u64(&sampler_maps["sampler_counts"], 0, true),
        100,
        "the stage's own map counts too"
    );
    dp.unload_rootlet(key).expect("unload");
    assert!(
        f.pins().is_empty(),
        "unload removes every pin: {:?}",
        f.pins()
    );
}

/// The witness's record, read through stage `name` of the rootlet `key`.
fn witnessed(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    name: &str,
) -> std::io::Result<Witnessed> {
    let map = dp
        .stage_map(key, name, witness::MAP)
        .map_err(std::io::Error::other)?;
    Witnessed::read(map.as_fd())
}

/// Packets the witness (stage `name` of rootlet `key`) has counted so far:
/// what [`Crossings`] waits on around each change (0 if it cannot be read,
/// which never advances and so fails the crossing).
fn witnessed_total(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    name: &str,
) -> u64 {
    witnessed(dp, key, name).map_or(0, |w| w.total())
}

/// Stage `a` (alternately `objects[0]` and `objects[1]`, ending on
/// `objects[1]`), then the sampler, then the witness, under steady traffic
/// while `a` is replaced ten times, the witness counting packets just
/// before and just after each replacement; traffic goes on for `tail`
/// after the last one. Returns the run and the final state.
fn replace_under_traffic(
    objects: [&str; 2],
    tail: Duration,
) -> (TrafficRun, rootlet_dataplane::state::RootletState) {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("a", objects[1], 10)),
            Change::Link(stage("s", "sampler", 20)),
            Change::Link(stage("w", witness::OBJECT, 30)),
        ],
        None,
    )
    .expect("link");
    let traffic =
        Traffic::start(&f.pair, SINK_PORT, 2000, Duration::from_secs(120)).expect("traffic");
    let mut crossings = Crossings::new();
    let replacements = 10;
    for i in 0..replacements {
        crossings.before(&format!("replacement {i}"), || {
            witnessed_total(&dp, key, "w")
        });
        dp.apply(
            key,
            &[Change::Replace(stage("a", objects[i % 2], 10))],
            None,
        )
        .expect("replace under traffic");
        crossings.after(|| witnessed_total(&dp, key, "w"));
    }
    std::thread::sleep(tail);
    assert!(
        traffic.is_flowing(),
        "traffic stopped before the replacements were done: they were not made under traffic"
    );
    crossings.assert_flowed();
    let run = traffic
        .finish(|| witnessed(&dp, key, "w"))
        .expect("judge the run");
    let state = dp.state(key).expect("state");
    assert_eq!(
        state.generation,
        2 + replacements as u64,
        "one generation per change"
    );
    (run, state)
}

#[test]
fn live_replacement_loses_no_packet() {
    let (run, state) =
        replace_under_traffic(["sampler_v2", "test_pass"], Duration::from_millis(200));
    run.assert_clean();
    let a = slot(&state, "a");
    assert_eq!(a.counters.empty, 0, "no packet saw the placeholder");
    assert_eq!(
        a.counters.pass,
        run.sent(),
        "every packet went through one version of `a`: {:?}; {}",
        a.counters,
        run.summary()
    );
    assert_eq!(
        slot(&state, "w").counters.total(),
        run.sent(),
        "the witness's slot counted every packet too"
    );
}

/// The judgement cannot pass a data plane that loses packets: with a stage
/// that drops one packet in a thousand swapped in under traffic, it names
/// exactly the packets that stage dropped, and the socket check does not
/// hide them.
#[test]
fn a_stage_that_drops_one_packet_in_a_thousand_fails_the_judgement() {
    // The lossy version runs for the last 2.5 s at least: 5000 packets.
    let (run, state) =
        replace_under_traffic(["test_pass", "test_lossy"], Duration::from_millis(2500));
    let a = slot(&state, "a");
    assert!(!run.judgement.is_clean(), "{}", run.summary());
    assert!(
        !run.judgement.lost.is_empty() && run.judgement.lost.iter().all(|s| s % 1000 == 999),
        "lost exactly packets ...999: {}",
        run.summary()
    );
    assert_eq!(
        run.judgement.lost.len() as u64,
        a.counters.drop,
        "the lost packets are the ones `a` counted as dropped: {:?}; {}",
        a.counters,
        run.summary()
    );
    assert!(run.judgement.duplicated.is_empty() && run.judgement.unexpected.is_empty());
    assert!(
        run.delivery
            .not_received
            .iter()
            .all(|s| !run.judgement.lost.contains(s)),
        "the socket check only judges what the data plane passed"
    );
    assert!(
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.assert_clean())).is_err(),
        "assert_clean fails the run"
    );
}

/// Sends `n` frames (sequence numbers from `first`) to the sink; returns
/// what the data plane did with them: how many `last` passed (on to the
/// host) and how many `bounce` sent back with XDP_TX, from the rootlet's
/// counters. What the sockets got is checked against that: the sink got
/// what `last` passed, less what the stack counted as dropped, and the peer
/// no more bounced frames than `bounce` sent.
fn passed_and_bounced(
    f: &Fixture,
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    (sink, raw): (&UdpSink, &RawSocket),
    first: u64,
    n: u64,
) -> (u64, u64) {
    let counts = || {
        let state = dp.state(key).expect("state");
        let (b, l) = (
            slot(&state, "bounce").counters,
            slot(&state, "last").counters,
        );
        (b.total(), l.pass, b.tx, l.total())
    };
    let (total0, pass0, tx0, last0) = counts();
    let stack_before = StackDrops::read(f.pair.host()).expect("snmp");
    for i in first..first + n {
        raw.send(
            &f.pair
                .udp_to_host(40000, SINK_PORT, seq_payload(i, 64))
                .to_bytes(),
        )
        .expect("send");
    }
    // Every frame is counted by the first stage once it has been handled.
    assert!(
        fixture::wait_for(Duration::from_secs(20), || counts().0 >= total0 + n),
        "the data plane saw all {n} frames"
    );
    let (total, pass, tx, last) = counts();
    assert_eq!(total, total0 + n, "and no others");
    // A TX that proceeds went on to `last`: only the rest were sent back.
    let (passed, bounced) = (pass - pass0, (tx - tx0) - (last - last0));
    let delivered = sink
        .recv_until_idle(Duration::from_millis(300), deadline(10))
        .expect("receive")
        .iter()
        .filter_map(|p| payload_seq(p))
        .filter(|s| (first..first + n).contains(s))
        .count() as u64;
    let stack = StackDrops::read(f.pair.host())
        .expect("snmp")
        .since(&stack_before);
    assert!(
        delivered <= passed && delivered + stack.total() >= passed,
        "the sink got {delivered} of the {passed} packets the data plane passed, and the stack counted {stack:?}"
    );
    let mut came_back = 0;
    let end = deadline(10);
    while came_back < bounced && Instant::now() < end {
        let frame = raw
            .recv_matching(Duration::from_millis(300), |b| {
                ParsedUdp::parse(b).is_some_and(|p| p.dst_port == SINK_PORT)
            })
            .expect("raw recv");
        if frame.is_some() {
            came_back += 1;
        }
    }
    assert!(
        came_back > 0 || bounced == 0,
        "frames the data plane sent back reach the peer ({bounced} sent back)"
    );
    (passed, bounced)
}

#[test]
fn a_proceed_on_change_keeps_the_program_and_takes_effect() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("bounce", "test_tx", 10)),
            Change::Link(stage("last", "test_pass", 20)),
        ],
        None,
    )
    .expect("link");
    if dp.state(key).expect("state").mode == XdpMode::Driver {
        f.pair
            .attach_peer_xdp_pass()
            .expect("peer XDP for native XDP_TX");
    }
    let sink = UdpSink::bind(f.pair.host(), SocketAddrV4::new(HOST_IP, SINK_PORT)).expect("sink");
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    // The running program, and (tail-call) the instance kept for the other
    // parity: a change that keeps the stage runs one of those two.
    let prog_ids = |dp: &rootlet_dataplane::Dataplane| {
        let state = dp.state(key).expect("state");
        let s = slot(&state, "bounce");
        (s.prog.as_ref().map(|p| p.id).expect("a program"), s.twin_id)
    };
    let (id, twin) = prog_ids(&dp);
    let kept = |running: u32, expected: u32, expected_twin: Option<u32>| match expected_twin {
        // freplace attaches the same program to the next rootlet instance.
        None => assert_eq!(running, expected, "the program is kept, not reloaded"),
        Some(t) => assert_eq!(
            running, t,
            "the instance loaded with the stage runs, none is loaded"
        ),
    };

    assert_eq!(
        passed_and_bounced(&f, &dp, key, (&sink, &raw), 0, 10),
        (0, 10),
        "TX is not in the default proceed-on set: every packet bounces"
    );

    // The same object with TX added: the running program is kept, and the
    // chain now goes on after TX.
    let mut tx_proceeds = stage("bounce", "test_tx", 10);
    tx_proceeds.proceed_on = ActionSet::of(&[XdpAction::Pass, XdpAction::Tx]);
    let before = dp.state(key).expect("state").generation;
    let generation = dp
        .apply(key, &[Change::Replace(tx_proceeds)], None)
        .expect("change proceed-on");
    assert_eq!(generation, before + 1, "a new generation");
    let (after, after_twin) = prog_ids(&dp);
    kept(after, id, twin);
    if twin.is_some() {
        assert_eq!(
            after_twin,
            Some(id),
            "the first instance is kept for the other parity"
        );
    }
    assert_eq!(
        passed_and_bounced(&f, &dp, key, (&sink, &raw), 100, 10),
        (10, 0),
        "after TX the chain goes on to `last`, which passes"
    );

    // And back, in the other parity.
    dp.apply(
        key,
        &[Change::Replace(stage("bounce", "test_tx", 10))],
        None,
    )
    .expect("restore proceed-on");
    assert_eq!(prog_ids(&dp), (id, twin), "back to the first instance");
    assert_eq!(
        passed_and_bounced(&f, &dp, key, (&sink, &raw), 200, 5),
        (0, 5)
    );

    let state = dp.state(key).expect("state");
    let (b, l) = (slot(&state, "bounce"), slot(&state, "last"));
    assert_eq!(b.counters.tx, 25, "{:?}", b.counters);
    assert_eq!(l.counters.pass, 10, "{:?}", l.counters);
    assert_eq!(b.counters.empty + l.counters.empty, 0);
}

#[test]
fn multi_slot_change_is_atomic_under_traffic() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("a", "sampler", 10)),
            Change::Link(stage("b", "sampler", 20)),
            Change::Link(stage("w", witness::OBJECT, 30)),
        ],
        None,
    )
    .expect("link");
    let traffic =
        Traffic::start(&f.pair, SINK_PORT, 2000, Duration::from_secs(120)).expect("traffic");
    // Each load of a stage counts in its own map: if no packet ever sees a
    // mix of generations, `a` and `b` of one generation count the same.
    let mut generations = vec![];
    let ids = |dp: &rootlet_dataplane::Dataplane| {
        let st = dp.state(key).expect("state");
        let id = |n: &str| slot(&st, n).prog.as_ref().map(|p| p.id).unwrap_or_default();
        (
            maps_of_prog(id("a")).remove("sampler_counts"),
            maps_of_prog(id("b")).remove("sampler_counts"),
        )
    };
    generations.push(ids(&dp));
    // The witness counts packets just before and just after each change,
    // so every generation is judged under traffic.
    let mut crossings = Crossings::new();
    for round in 0..6 {
        let object = if round % 2 == 0 {
            "sampler_v2"
        } else {
            "sampler"
        };
        crossings.before(&format!("round {round}"), || witnessed_total(&dp, key, "w"));
        dp.apply(
            key,
            &[
                Change::Replace(stage("a", object, 10)),
                Change::Replace(stage("b", object, 20)),
            ],
            None,
        )
        .expect("replace both at once");
        generations.push(ids(&dp));
        crossings.after(|| witnessed_total(&dp, key, "w"));
    }
    assert!(
        traffic.is_flowing(),
        "traffic stopped before the changes were done"
    );
    crossings.assert_flowed();
    let run = traffic
        .finish(|| witnessed(&dp, key, "w"))
        .expect("judge the run");
    run.assert_clean();
    let mut total = 0;
    for (i, (a, b)) in generations.iter().enumerate() {
        let (a, b) = (a.as_ref().expect("a's map"), b.as_ref().expect("b's map"));
        let (na, nb) = (read_u64(a, 0, true), read_u64(b, 0, true));
        assert_eq!(
            na, nb,
            "generation {i}: a saw {na} packets, b saw {nb}: a packet saw a mix"
        );
        total += na;
    }
    assert_eq!(
        total,
        run.sent(),
        "every packet went through exactly one generation: {}",
        run.summary()
    );
}

#[test]
fn unpinned_stage_is_detached_when_its_owner_is_killed() {
    let f = Fixture::new();
    let ns = format!("load={}:{}", f.netns_path().display(), f.pair.host_if());
    let held = f.dp_hold(&[
        &ns,
        "link=pin:test_pass:10",
        "link=gone:test_drop:20:unpinned",
    ]);
    let sink = UdpSink::bind(f.pair.host(), SocketAddrV4::new(HOST_IP, SINK_PORT)).expect("sink");
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    for i in 0..10 {
        raw.send(
            &f.pair
                .udp_to_host(40000, SINK_PORT, seq_payload(i, 64))
                .to_bytes(),
        )
        .expect("send");
    }
    let got = sink
        .recv_until_idle(Duration::from_millis(300), deadline(5))
        .expect("recv");
    assert!(
        got.is_empty(),
        "the unpinned drop stage drops while its owner lives"
    );

    held.kill();
    // The kernel releases the owner's references asynchronously.
    let mut received = 0;
    let end = deadline(20);
    let mut seq = 100;
    while received == 0 && Instant::now() < end {
        raw.send(
            &f.pair
                .udp_to_host(40000, SINK_PORT, seq_payload(seq, 64))
                .to_bytes(),
        )
        .expect("send");
        seq += 1;
        received = sink
            .recv_until_idle(Duration::from_millis(100), deadline(1))
            .expect("recv")
            .len();
    }
    assert!(
        received > 0,
        "packets flow through the placeholder once the owner is gone"
    );

    let dp = f.open();
    let key = dp.list()[0];
    let state = dp.state(key).expect("state");
    assert!(
        slot(&state, "gone").prog.is_none(),
        "the unpinned stage is gone: {state:#?}"
    );
    assert!(
        slot(&state, "gone").counters.empty > 0,
        "and counted as an empty slot"
    );
    // The data plane's count, not the silent socket, shows the drops: the
    // 10 sent while the owner lived, and any sent after the kill before the
    // kernel let the stage go; every later one found the slot empty.
    let gone = slot(&state, "gone").counters;
    assert!(
        gone.drop >= 10 && gone.drop + gone.empty == 10 + (seq - 100),
        "the unpinned drop stage dropped the 10 packets sent while its owner lived, \
         and each of the {} sent after was dropped or found it empty: {gone:?}",
        seq - 100
    );
    assert!(slot(&state, "pin").prog.is_some(), "the pinned stage stays");
    let before = state.generation;
    dp.apply(key, &[Change::Link(stage("new", "test_pass", 30))], None)
        .expect("change after adoption");
    let state = dp.state(key).expect("state");
    assert_eq!(state.generation, before + 1);
    assert_eq!(
        state
            .slots
            .iter()
            .map(|s| s.stage.as_str())
            .collect::<Vec<_>>(),
        ["pin", "new"]
    );
}

#[test]
fn pinned_stages_outlive_their_process_and_are_adopted_without_disruption() {
    let f = Fixture::new();
    let ns = format!("load={}:{}", f.netns_path().display(), f.pair.host_if());
    f.dp(&[
        &ns,
        "link=sampler:sampler:10",
        "link=ddos:ddos:20",
        "link=lb:l4lb:30",
        &format!("link=w:{}:40", witness::OBJECT),
    ]);
    // The process is gone; the pipeline is not.
    let traffic =
        Traffic::start(&f.pair, SINK_PORT, 2000, Duration::from_secs(120)).expect("traffic");
    // The rootlet's own pinned count of packets that went through every
    // stage: no process holds the rootlet before the adoption.
    let finals = || f.pinned_finals();
    let mut crossings = Crossings::new();
    crossings.before("adoption", finals);

    let dp = f.open();
    let key = dp.list()[0];
    crossings.after(finals);
    let state = dp.state(key).expect("adopted state");
    assert!(state.drift.is_none(), "{:?}", state.drift);
    assert_eq!(state.slots.len(), 4);
    assert!(state.slots.iter().all(|s| s.prog.is_some()));
    crossings.before("policy", finals);
    block(&dp, key, BLOCKED);
    crossings.after(finals);
    crossings.before("replacement", finals);
    dp.apply(
        key,
        &[Change::Replace(stage("sampler", "sampler_v2", 10))],
        None,
    )
    .expect("change after adoption");
    crossings.after(finals);
    assert!(
        traffic.is_flowing(),
        "traffic flowed across the adoption and the change"
    );
    crossings.assert_flowed();
    let run = traffic
        .finish(|| witnessed(&dp, key, "w"))
        .expect("judge the run");
    run.assert_clean();
    // Every packet is counted once per stage: before the restart, after it,
    // and across the change (tail-call: passes are derived, and the record
    // of how is carried over by the store).
    let state = dp.state(key).expect("state");
    let (s, d, l) = (
        slot(&state, "sampler"),
        slot(&state, "ddos"),
        slot(&state, "lb"),
    );
    let sent = run.sent();
    assert_eq!(s.counters.pass, sent, "{:?}", s.counters);
    assert_eq!(s.counters.total(), sent, "{:?}", s.counters);
    assert_eq!(d.counters.total(), sent, "{:?}", d.counters);
    assert_eq!(l.counters.total(), d.counters.pass, "{:?}", l.counters);
    let mut frame = f
        .pair
        .udp_to_host(40000, SINK_PORT, seq_payload(9999, 64))
        .to_bytes();
    frame[26..30].copy_from_slice(&BLOCKED.octets());
    assert_eq!(
        test_run(&dp.state(key).expect("state"), &frame),
        XdpAction::Drop as u32,
        "ddos still drops"
    );
}

#[test]
fn bad_inputs_leave_the_running_pipeline_untouched() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("ddos", "ddos", 10)),
            Change::Link(stage("a", "test_pass", 20)),
        ],
        None,
    )
    .expect("link");
    block(&dp, key, BLOCKED);
    let mut before = dp.state(key).expect("state");
    let mut pins = f.pins();
    let ids = |s: &rootlet_dataplane::state::RootletState| {
        (
            s.generation,
            s.rootlet.id,
            s.slots
                .iter()
                .map(|s| s.prog.as_ref().map(|p| p.id))
                .collect::<Vec<_>>(),
        )
    };

    let mut garbage = stage("x", "test_pass", 5);
    garbage.object = std::sync::Arc::new(b"\x7fELF but not really".to_vec());
    let cases: Vec<(&str, Change)> = vec![
        ("bad ELF", Change::Link(garbage)),
        ("verifier", Change::Link(stage("x", "test_bad_verifier", 5))),
        ("licence", Change::Link(stage("x", "test_proprietary", 5))),
        ("rootlet as stage", {
            let mut s = stage("x", "test_pass", 5);
            s.object = std::sync::Arc::new(rootlet_ebpf::ROOTLET.to_vec());
            s.program = "rootlet".into();
            Change::Link(s)
        }),
        ("incompatible map", {
            let mut s = stage("ddos", "test_ddos_incompatible", 10);
            s.maps = MapPolicy::Keep;
            Change::Replace(s)
        }),
        ("retyped map", {
            let mut s = stage("ddos", "test_ddos_retyped", 10);
            s.maps = MapPolicy::Keep;
            Change::Replace(s)
        }),
        (
            "plain program not last",
            Change::Link(stage("x", "test_plain", 5)),
        ),
        ("bigstack", Change::Link(stage("x", "test_bigstack", 5))),
    ];
    for (what, change) in cases {
        let result = dp.apply(key, &[change], None);
        match (what, &result) {
            (
                "bad ELF",
                Err(Error::Check {
                    source: CheckError::Elf(_),
                    ..
                }),
            ) => {}
            ("verifier", Err(Error::Verifier { log, .. })) => {
                assert!(
                    log.contains("invalid access to packet"),
                    "the verifier log is returned: {log}"
                )
            }
            (
                "licence",
                Err(Error::Check {
                    source: CheckError::License(_),
                    ..
                }),
            ) => {}
            (
                "rootlet as stage",
                Err(Error::Check {
                    source: CheckError::IsRootlet,
                    ..
                }),
            ) => {}
            (
                "incompatible map",
                Err(Error::Check {
                    source: CheckError::IncompatibleMap { .. },
                    ..
                }),
            ) => {}
            // The same sizes, but the inner value is signed now: only the
            // BTF types tell, and they must.
            (
                "retyped map",
                Err(Error::Check {
                    source: CheckError::MapTypeChanged { name, reason },
                    ..
                }),
            ) if name == "ddos_blocklist" && reason.contains("\"u32\" became \"i32\"") => {}
            ("plain program not last", Err(Error::Placement { .. }))
                if backend == Backend::TailCall => {}
            ("plain program not last", Ok(_)) if backend == Backend::Freplace => {
                // freplace returns to the rootlet after every stage: fine anywhere.
                dp.apply(key, &[Change::Unlink { name: "x".into() }], None)
                    .expect("unlink");
                before = dp.state(key).expect("state");
                pins = f.pins();
                continue;
            }
            (
                "bigstack",
                Err(Error::Check {
                    source: CheckError::Stack { .. },
                    ..
                }),
            ) if backend == Backend::Freplace => {}
            ("bigstack", Ok(_)) if backend == Backend::TailCall => {
                // a tail call replaces the rootlet's frame: the stage alone fits.
                dp.apply(key, &[Change::Unlink { name: "x".into() }], None)
                    .expect("unlink");
                before = dp.state(key).expect("state");
                pins = f.pins();
                continue;
            }
            _ => panic!("{what}: unexpected {result:?}"),
        }
        let after = dp.state(key).expect("state");
        assert_eq!(
            ids(&after),
            ids(&before),
            "{what}: the running pipeline changed"
        );
        assert_eq!(
            f.pins(),
            pins,
            "{what}: pins of the failed attempt were left behind"
        );
        assert!(
            is_blocked(&dp, key, BLOCKED),
            "{what}: the blocklist survived"
        );
    }
}

#[test]
fn maps_are_kept_across_upgrades_on_request() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("ddos", "ddos", 10))], None)
        .expect("link");
    block(&dp, key, BLOCKED);
    let inner_id = |dp: &rootlet_dataplane::Dataplane| {
        dp.stage_map_handle(key, "ddos", policy::BLOCKLIST)
            .expect("blocklist")
            .inner
            .expect("a live inner map")
            .id
    };
    let policy_before = inner_id(&dp);
    let mut keep = stage("ddos", "ddos_v2", 10);
    keep.maps = MapPolicy::Keep;
    dp.apply(key, &[Change::Replace(keep)], None)
        .expect("replace keeping maps");
    assert!(
        is_blocked(&dp, key, BLOCKED),
        "kept: the blocklist survived the upgrade"
    );
    assert_eq!(
        inner_id(&dp),
        policy_before,
        "kept: the very inner map the policy was swapped into"
    );
    let frame = frame_from(&f, BLOCKED, 1);
    assert_eq!(
        test_run(&dp.state(key).expect("state"), &frame),
        XdpAction::Drop as u32
    );
    dp.apply(key, &[Change::Replace(stage("ddos", "ddos", 10))], None)
        .expect("replace fresh");
    assert!(
        !is_blocked(&dp, key, BLOCKED),
        "fresh: a new, empty blocklist"
    );
    assert_ne!(inner_id(&dp), policy_before, "new maps, a new inner map");
    assert_eq!(
        test_run(&dp.state(key).expect("state"), &frame),
        XdpAction::Pass as u32,
        "new: the empty policy passes everything"
    );
}

#[test]
fn a_crash_at_any_step_leaves_the_old_or_the_new_pipeline() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link");
    drop(dp);
    let pass = f
        .pair
        .udp_to_host(40000, SINK_PORT, seq_payload(1, 64))
        .to_bytes();
    let mut expected_generation = 2;
    let mut expect_drop = false;
    for step in Step::ALL {
        // Alternate the stage between PASS and DROP so old and new differ.
        let object = if expect_drop {
            "test_pass"
        } else {
            "test_drop"
        };
        let out = f
            .dp_command()
            .arg("--crash-at")
            .arg(step.name())
            .arg(format!("replace=a:{object}:10"))
            .output()
            .expect("run rootlet-dp");
        let crashed = !out.status.success();
        let applies = step != Step::RootletLoaded || backend == Backend::Freplace;
        assert_eq!(
            crashed,
            applies,
            "{step:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if crashed {
            assert_eq!(
                out.status.code(),
                None,
                "{step:?}: died of a signal (abort)"
            );
        }
        let dp = f.open();
        let state = dp
            .state(key)
            .unwrap_or_else(|e| panic!("{step:?}: adoption failed: {e}"));
        assert!(state.drift.is_none(), "{step:?}: {:?}", state.drift);
        let new = state.generation == expected_generation + 1;
        assert!(
            new || state.generation == expected_generation,
            "{step:?}: generation {}",
            state.generation
        );
        // A crash up to the swap leaves the old generation, from the swap
        // on the new one; a run that did not crash committed it.
        let after_swap = matches!(step, Step::Swapped | Step::StoreCommitted | Step::Released);
        assert_eq!(
            new,
            !crashed || after_swap,
            "{step:?} (crashed: {crashed}): the old pipeline before the swap point, the new one after it"
        );
        if new {
            expected_generation += 1;
            expect_drop = !expect_drop;
        }
        let verdict = test_run(&state, &pass);
        let want = if expect_drop {
            XdpAction::Drop
        } else {
            XdpAction::Pass
        } as u32;
        assert_eq!(
            verdict, want,
            "{step:?} (crashed: {crashed}, new: {new}): the kernel runs a mix"
        );
        let gens: Vec<String> = f
            .pins()
            .into_iter()
            .filter(|p| p.contains("gen-") && !p.contains('/'))
            .collect();
        assert!(
            gens.len() <= 1,
            "{step:?}: stale generations left: {gens:?}"
        );
        let loading: Vec<String> = f
            .pins()
            .into_iter()
            .filter(|p| p.starts_with("loading/"))
            .collect();
        assert!(
            loading.is_empty(),
            "{step:?}: transient pins left: {loading:?}"
        );
        // And the data plane still changes afterwards.
        drop(dp);
    }
    let dp = f.open();
    dp.apply(key, &[Change::Unlink { name: "a".into() }], None)
        .expect("a change after every crash");
}

/// A rollback goes through the same steps as a change: a crash at any of
/// them leaves the generation before it or the rollback, never a mix, and
/// the rootlet changes afterwards. freplace keeps nothing to roll back to:
/// refused at every step, and nothing changes.
#[test]
fn a_crash_at_any_step_of_a_rollback_leaves_the_old_or_the_new_pipeline() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link");
    drop(dp);
    let pass = f
        .pair
        .udp_to_host(40000, SINK_PORT, seq_payload(1, 64))
        .to_bytes();
    // The stage's verdict now; it alternates with every replace.
    let mut drops = false;
    for step in Step::ALL {
        // A replace first, so that there is a previous generation (a crash
        // before a swap drops it) with the other verdict.
        let dp = f.open();
        drops = !drops;
        let object = if drops { "test_drop" } else { "test_pass" };
        let before = dp
            .apply(key, &[Change::Replace(stage("a", object, 10))], None)
            .expect("replace");
        drop(dp);
        let out = f
            .dp_command()
            .arg("--crash-at")
            .arg(step.name())
            .arg("rollback")
            .output()
            .expect("run rootlet-dp");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let dp = f.open();
        let state = dp
            .state(key)
            .unwrap_or_else(|e| panic!("{step:?}: adoption failed: {e}"));
        assert!(state.drift.is_none(), "{step:?}: {:?}", state.drift);
        if backend == Backend::Freplace {
            assert_eq!(out.status.code(), Some(1), "{step:?}: refused: {stderr}");
            assert!(stderr.contains("previous generation"), "{step:?}: {stderr}");
            assert_eq!(state.generation, before, "{step:?}: nothing changed");
            continue;
        }
        // A rollback has no rootlet to load, no stage to attach, nothing
        // to build: it passes every other step.
        let passes = matches!(
            step,
            Step::StorePending | Step::Swapped | Step::StoreCommitted | Step::Released
        );
        assert_eq!(!out.status.success(), passes, "{step:?}: {stderr}");
        if passes {
            assert_eq!(
                out.status.code(),
                None,
                "{step:?}: died of a signal (abort)"
            );
        }
        let rolled_back = state.generation == before + 1;
        assert!(
            rolled_back || state.generation == before,
            "{step:?}: generation {} after {before}",
            state.generation
        );
        assert_eq!(
            rolled_back,
            step != Step::StorePending,
            "{step:?}: a rollback is live from its swap on"
        );
        if rolled_back {
            drops = !drops;
        }
        let want = if drops {
            XdpAction::Drop
        } else {
            XdpAction::Pass
        } as u32;
        assert_eq!(
            test_run(&state, &pass),
            want,
            "{step:?} (rolled back: {rolled_back}): the kernel runs a mix"
        );
        drop(dp);
    }
    let dp = f.open();
    dp.apply(key, &[Change::Unlink { name: "a".into() }], None)
        .expect("a change after every crash");
}

fn slot_names(s: &rootlet_dataplane::state::RootletState) -> Vec<String> {
    s.slots.iter().map(|s| s.stage.clone()).collect()
}

#[test]
fn drift_is_reported_never_overwritten() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link");
    let state = dp.state(key).expect("state");
    assert!(state.drift.is_none());
    // Another tool detaches our link and attaches its own program.
    let link = sys::link_fd_by_id(state.xdp_link_id).expect("link by id");
    sys::link_detach(link.as_fd()).expect("detach");
    f.pair
        .host()
        .attach_xdp(
            f.pair.host_if(),
            rootlet_ebpf::TEST_PLAIN,
            "xdp",
            rootlet_integration_tests::netns::XdpMode::Generic,
        )
        .expect("foreign program");
    let state = dp.state(key).expect("state");
    assert!(
        state
            .drift
            .as_deref()
            .is_some_and(|d| d.contains("detached")),
        "{:?}",
        state.drift
    );
    let err = dp
        .apply(key, &[Change::Link(stage("b", "test_pass", 20))], None)
        .unwrap_err();
    assert!(matches!(err, Error::Drifted { .. }), "{err}");
    drop(dp);
    let dp = f.open();
    // After a restart the state reads as before it: the full state, with
    // the drift set (never an error, never a stub).
    let after = dp.state(key).expect("the state of a drifted rootlet");
    assert!(
        after
            .drift
            .as_deref()
            .is_some_and(|d| d.contains("detached")),
        "adoption reports drift: {after:?}"
    );
    assert_eq!(
        (after.generation, after.rootlet.id, slot_names(&after)),
        (state.generation, state.rootlet.id, slot_names(&state)),
        "the same state as before the restart"
    );
    let err = dp
        .apply(key, &[Change::Link(stage("b", "test_pass", 20))], None)
        .unwrap_err();
    assert!(matches!(err, Error::Drifted { .. }), "{err}");
    let foreign = f
        .pair
        .host()
        .ip(&["-j", "link", "show", "dev", f.pair.host_if()])
        .expect("ip link");
    assert!(
        foreign.contains("\"prog\""),
        "the foreign program is still attached: {foreign}"
    );
    dp.unload_rootlet(key).expect("unload a drifted rootlet");
}

#[test]
fn probe_matches_this_kernel() {
    use rootlet_dataplane::probe;
    let caps = probe::capabilities();
    eprintln!("{}", caps.summary());
    assert!(
        caps.xdp.permitted()
            && caps.xdp_link.permitted()
            && caps.link_update.permitted()
            && caps.tail_call.permitted()
    );
    match std::env::var("ROOTLET_EXPECT_EXT").as_deref() {
        Ok("permitted") => assert!(
            caps.ext_load.permitted() && caps.ext_attach.permitted(),
            "this kernel runs freplace (the VM tier shows it), but the probe says {:?} / {:?}",
            caps.ext_load,
            caps.ext_attach
        ),
        Ok("refused") => assert!(
            !caps.ext_load.permitted(),
            "expected EXT to be refused here"
        ),
        Ok(other) => panic!("ROOTLET_EXPECT_EXT={other}"),
        Err(_) => panic!("set ROOTLET_EXPECT_EXT=permitted|refused (the test command does)"),
    }
    // Rootlet's own programs pass the verifier of every kernel it supports,
    // whether or not the kernel permits their backend: a rejection is a bug.
    for backend in [Backend::Freplace, Backend::TailCall] {
        assert!(
            caps.programs(backend).verified(),
            "our {backend} programs fail the verifier of kernel {}: {:?}",
            caps.kernel,
            caps.programs(backend)
        );
    }
    // tcx: permitted from 6.6 on; before, the probe's typed answer says so
    // (a probe wrong for the kernel fails here, it is not skipped).
    let version = caps.kernel_version().expect("uname -r parses");
    if version >= probe::TCX_SINCE {
        assert!(
            caps.tcx.permitted(),
            "kernel {version} has tcx, the probe says {:?}",
            caps.tcx
        );
    } else {
        assert!(
            matches!(caps.tcx, probe::Probe::Unsupported { requires, .. } if requires == probe::TCX_SINCE),
            "kernel {version} predates tcx; the probe says {:?}",
            caps.tcx
        );
    }
    let auto = caps.choose(Default::default()).expect("some backend");
    assert_eq!(
        auto == Backend::Freplace,
        caps.ext_load.permitted() && caps.ext_attach.permitted()
    );
    if !caps.ext_load.permitted() {
        let err = caps
            .choose(rootlet_dataplane::spec::BackendChoice::Freplace)
            .unwrap_err();
        assert!(
            err.to_string().contains("ext_load"),
            "names the probe: {err}"
        );
    }
}

#[test]
fn sample_stages_also_run_standalone() {
    // Loaded by another loader (iproute2's libbpf) as plain XDP programs: the
    // stage header's chain code stays off, the verdict is returned as is.
    for (object, program) in [("sampler", "sampler"), ("ddos", "ddos"), ("l4lb", "l4lb")] {
        let pair = rootlet_integration_tests::netns::VethPair::new().expect("veth pair");
        let entry = rootlet_ebpf::stage(object).expect("object");
        pair.host()
            .attach_xdp(
                pair.host_if(),
                entry.object,
                "xdp",
                rootlet_integration_tests::netns::XdpMode::Generic,
            )
            .unwrap_or_else(|e| panic!("{program} loads standalone: {e}"));
        let shown = pair
            .host()
            .ip(&["-j", "link", "show", "dev", pair.host_if()])
            .expect("ip link");
        assert!(shown.contains(program), "{program} is attached: {shown}");
        assert_eq!(
            passed_of_20(&pair),
            20,
            "{program} standalone passes what it does not act on"
        );
    }
}

#[test]
fn tail_call_rollback_is_instant_and_freplace_says_why_not() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let key = f.load(&dp);
    let packet = f
        .pair
        .udp_to_host(40000, SINK_PORT, seq_payload(1, 64))
        .to_bytes();
    // `z` after `a`: on tail-call, `a`'s PASSes are derived from what `z`
    // counts, so the counts are checked across the rollbacks too.
    dp.apply(
        key,
        &[
            Change::Link(stage("a", "test_pass", 10)),
            Change::Link(stage("z", "test_pass", 20)),
        ],
        None,
    )
    .expect("link");
    let pass_prog = slot(&dp.state(key).expect("state"), "a")
        .prog
        .clone()
        .expect("prog")
        .id;
    dp.apply(key, &[Change::Replace(stage("a", "test_drop", 10))], None)
        .expect("replace");
    assert_eq!(
        test_run(&dp.state(key).expect("state"), &packet),
        XdpAction::Drop as u32
    );
    match backend {
        Backend::TailCall => {
            assert_eq!(
                dp.rollback(key).expect("instant rollback"),
                4,
                "a new generation"
            );
            let state = dp.state(key).expect("state");
            assert_eq!(
                test_run(&state, &packet),
                XdpAction::Pass as u32,
                "back on test_pass"
            );
            assert_eq!(
                slot(&state, "a").prog.as_ref().map(|p| p.id),
                Some(pass_prog),
                "the same program: nothing reloaded"
            );
            assert_eq!(dp.rollback(key).expect("and forth"), 5);
            assert_eq!(
                test_run(&dp.state(key).expect("state"), &packet),
                XdpAction::Drop as u32
            );
            let state = dp.state(key).expect("state");
            let (a, z) = (slot(&state, "a").counters, slot(&state, "z").counters);
            assert_eq!((a.drop, a.pass, a.total()), (2, 1, 3), "{a:?}");
            assert_eq!((z.pass, z.total()), (1, 1), "{z:?}");
            // A failed change empties the inactive parity: no rollback then.
            let err = dp.apply(
                key,
                &[Change::Link(stage("bad", "test_bad_verifier", 20))],
                None,
            );
            assert!(err.is_err());
            assert!(matches!(
                dp.rollback(key),
                Err(rootlet_dataplane::Error::NoRollback { .. })
            ));
            dp.apply(key, &[Change::Unlink { name: "a".into() }], None)
                .expect("changes go on");
        }
        Backend::Freplace => {
            let err = dp.rollback(key).unwrap_err();
            assert!(
                matches!(err, rootlet_dataplane::Error::NoRollback { .. }),
                "{err}"
            );
        }
    }
}

// ---- Foreign loaders (issue #13, item 13) ----

/// Sends 20 UDP packets from the peer; returns how many the host's XDP
/// program passed: what the socket got plus what the stack counted dropped
/// after XDP (programs loaded without Rootlet count nothing of their own).
fn passed_of_20(pair: &rootlet_integration_tests::netns::VethPair) -> u64 {
    let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(HOST_IP, SINK_PORT)).expect("sink");
    let raw = RawSocket::open(pair.peer(), pair.peer_if()).expect("raw");
    let before = StackDrops::read(pair.host()).expect("snmp");
    for i in 0..20 {
        raw.send(
            &pair
                .udp_to_host(40000, SINK_PORT, seq_payload(i, 64))
                .to_bytes(),
        )
        .expect("send");
    }
    let got = sink
        .recv_until_idle(Duration::from_millis(300), deadline(10))
        .expect("receive");
    let stack = StackDrops::read(pair.host()).expect("snmp").since(&before);
    got.len() as u64 + stack.total()
}

/// Runs `xdp-loader ARGS` (Debian's xdp-tools) inside `ns` with nsenter, so
/// the host's bpffs (libxdp's dispatcher pins there) stays visible, which
/// `ip netns exec` would hide. Returns (success, stdout, stderr).
fn xdp_loader(
    ns: &rootlet_integration_tests::netns::Netns,
    args: &[&str],
) -> (bool, String, String) {
    let net = format!("--net={}", ns.path().display());
    let out = std::process::Command::new("nsenter")
        .arg(&net)
        .arg("xdp-loader")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run xdp-loader (scripts/install-deps.sh installs xdp-tools): {e}")
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_stage_h_object_loads_under_libxdp() {
    // `xdp-loader load` takes the object's first program: the standalone
    // one, which has no tail call. Under libxdp's dispatcher (freplace) the
    // kernel refuses an extension that "changes packet data" where the
    // dispatcher's placeholder does not, and a tail call does; where EXT is
    // refused (this sandbox), libxdp falls back to attaching the program
    // alone, which the test checks and says.
    let ext = match std::env::var("ROOTLET_EXPECT_EXT").as_deref() {
        Ok("permitted") => true,
        Ok("refused") => false,
        other => {
            panic!("set ROOTLET_EXPECT_EXT=permitted|refused (the test command does): {other:?}")
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, delivered) in [("test_drop", 0), ("test_pass", 20)] {
        let pair = rootlet_integration_tests::netns::VethPair::new().expect("veth pair");
        let path = dir.path().join(format!("{name}.o"));
        std::fs::write(&path, rootlet_ebpf::stage(name).expect("object").object).expect("write");
        let path = path.to_str().expect("utf-8 path");
        let (ok, out, err) = xdp_loader(
            pair.host(),
            &["load", "-vv", "-m", "skb", pair.host_if(), path],
        );
        assert!(ok, "xdp-loader load {name}: {out}\n{err}");
        let fell_back = err.contains("Falling back to loading single prog without dispatcher");
        let (ok, status, serr) = xdp_loader(pair.host(), &["status", pair.host_if()]);
        assert!(ok, "xdp-loader status: {status}\n{serr}");
        let line = status
            .lines()
            .find(|l| l.contains("verdict"))
            .unwrap_or_else(|| panic!("{name}'s program `verdict` is attached: {status}"));
        let iface = status
            .lines()
            .find(|l| l.starts_with(pair.host_if()))
            .unwrap_or_else(|| panic!("{} is listed: {status}", pair.host_if()));
        assert!(iface.contains("skb"), "attached in skb mode: {status}");
        if ext {
            assert!(
                !fell_back
                    && iface.contains("xdp_dispatcher")
                    && line.trim_start().starts_with("=>"),
                "EXT is permitted here: libxdp must run {name} under its dispatcher\n{status}\n{err}"
            );
        } else {
            assert!(
                fell_back && !status.contains("xdp_dispatcher"),
                "EXT is refused here: libxdp must say it falls back to the program alone\n{status}\n{err}"
            );
            eprintln!(
                "{name}: EXT refused on this kernel, libxdp attached the program without its dispatcher"
            );
        }
        assert_eq!(
            passed_of_20(&pair),
            delivered,
            "{name} under xdp-loader: its verdict holds"
        );
        let (ok, out, err) = xdp_loader(pair.host(), &["unload", "-a", pair.host_if()]);
        assert!(ok, "xdp-loader unload: {out}\n{err}");
        let shown = pair
            .host()
            .ip(&["-j", "link", "show", "dev", pair.host_if()])
            .expect("ip link");
        assert!(!shown.contains("\"prog\""), "unloaded: {shown}");
    }
}

// ---- Foreign objects: maps pinned by name (issue #13, item 6) ----

/// Every path under /sys/fs/bpf (bounded: depth 6, 100 000 entries) whose
/// file name is one of `names`, outside `root`.
fn pins_named(names: &[&str], root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = vec![];
    let mut todo = vec![(std::path::PathBuf::from("/sys/fs/bpf"), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            assert!(seen < 100_000, "bpffs walk bounded");
            let path = entry.path();
            if path.starts_with(root) {
                continue;
            }
            if names.iter().any(|n| entry.file_name() == *n) {
                found.push(path.clone());
            }
            if depth < 6 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push((path, depth + 1));
            }
        }
    }
    found
}

/// The map `name` of the running program of stage `stage`.
fn stage_map(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    stage: &str,
    name: &str,
) -> (u32, std::os::fd::OwnedFd) {
    let state = dp.state(key).expect("state");
    let s = slot(&state, stage);
    let listed = s
        .maps
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{stage}'s state lists map {name}: {:?}", s.maps));
    assert!(
        listed.shared_with.is_empty(),
        "{stage}'s {name} is its own: {:?}",
        s.maps
    );
    let mut maps = maps_of_prog(s.prog.as_ref().expect("running").id);
    let fd = maps.remove(name).expect("the program uses the map");
    (listed.id, fd)
}

// ---------------------------------------------------------------------------
// Counters and stage identity (issue #13, items 2, 3 and 11): a stage's
// counters are its own life in its slot, the final verdict is counted, a
// stage the rootlet cannot see says so, and a build keeps one identity
// while its program ids change.
// ---------------------------------------------------------------------------

/// Sends `n` UDP packets from the peer through the veth pair to the rootlet.
fn send_udp(f: &Fixture, n: u64) {
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    for i in 0..n {
        raw.send(
            &f.pair
                .udp_to_host(40000, SINK_PORT, seq_payload(i, 64))
                .to_bytes(),
        )
        .expect("send");
    }
}

/// Debian's xdp-tools object with LIBBPF_PIN_BY_NAME maps
/// (`scripts/install-deps.sh` installs xdp-tools).
const XDPFILT: &str = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o";
const XDPFILT_MAPS: &[&str] = &[
    "xdp_stats_map",
    "filter_ports",
    "filter_ipv4",
    "filter_ipv6",
    "filter_ethernet",
];

#[test]
fn pin_by_name_maps_stay_inside_the_root_and_are_never_reused() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    let before = pins_named(&["pinned_hits"], &f.root);
    assert!(
        before.is_empty(),
        "a pinned_hits pin outside any test root: {before:?}"
    );

    // A stage whose map asks to be pinned by name counts what it sees.
    dp.apply(
        key,
        &[Change::Link(stage("pin-a", "test_pinned", 10))],
        None,
    )
    .expect("link pin-a");
    let outside = pins_named(&["pinned_hits"], &f.root);
    assert!(outside.is_empty(), "pinned outside the root: {outside:?}");
    send_udp(&f, 10);
    let (a_id, a_map) = stage_map(&dp, key, "pin-a", "pinned_hits");
    assert!(
        fixture::wait_for(Duration::from_secs(10), || read_u64(&a_map, 0, false) == 10),
        "pin-a counted 10 packets: {}",
        read_u64(&a_map, 0, false)
    );
    dp.apply(
        key,
        &[Change::Unlink {
            name: "pin-a".into(),
        }],
        None,
    )
    .expect("unlink pin-a");
    let anywhere = pins_named(&["pinned_hits"], std::path::Path::new("/nonexistent"));
    assert!(
        anywhere.is_empty(),
        "nothing stays after unlink: {anywhere:?}"
    );

    // A later stage of the same object starts from a map of its own.
    dp.apply(
        key,
        &[Change::Link(stage("pin-b", "test_pinned", 10))],
        None,
    )
    .expect("link pin-b");
    let (b_id, b_map) = stage_map(&dp, key, "pin-b", "pinned_hits");
    assert_ne!(a_id, b_id, "pin-b does not get pin-a's map");
    assert_eq!(read_u64(&b_map, 0, false), 0, "pin-b starts from zero");
    drop(a_map);

    // Debian's xdpfilt_* (an unmodified object: the last stage).
    let object = std::fs::read(XDPFILT)
        .unwrap_or_else(|e| panic!("{XDPFILT}: {e}; scripts/install-deps.sh installs xdp-tools"));
    let foreign_before = pins_named(XDPFILT_MAPS, &f.root);
    let mut filt = stage("filt", "test_pass", 20);
    filt.object = std::sync::Arc::new(object);
    filt.program = "xdpfilt_alw_all".into();
    dp.apply(key, &[Change::Link(filt)], None)
        .expect("link Debian's xdpfilt_alw_all");
    let state = dp.state(key).expect("state");
    let names: Vec<&str> = slot(&state, "filt")
        .maps
        .iter()
        .map(|m| m.name.as_str())
        .collect();
    for m in XDPFILT_MAPS {
        assert!(names.contains(m), "filt's state lists {m}: {names:?}");
    }
    assert_eq!(
        pins_named(XDPFILT_MAPS, &f.root),
        foreign_before,
        "xdpfilt's maps are pinned nowhere outside the root"
    );
    dp.apply(
        key,
        &[Change::Unlink {
            name: "filt".into(),
        }],
        None,
    )
    .expect("unlink filt");
    assert_eq!(pins_named(XDPFILT_MAPS, &f.root), foreign_before);
    let leftovers: Vec<_> = std::fs::read_dir(f.root.join("loading"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "no transient pins stay: {leftovers:?}"
    );
    dp.unload_rootlet(key).expect("unload");
}

/// The counters of stage `name`, once they add up to `total` (at most 10 s).
fn counters_reach(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    name: &str,
    total: u64,
) -> rootlet_dataplane::state::Counters {
    fixture::wait_for(Duration::from_secs(10), || {
        slot(&dp.state(key).expect("state"), name).counters.total() >= total
    });
    // Settle: a count above `total` must show too.
    std::thread::sleep(Duration::from_millis(100));
    slot(&dp.state(key).expect("state"), name).counters
}

#[test]
fn counters_item2_a_new_stage_starts_from_zero_in_a_reused_slot() {
    let f = Fixture::new();
    let dp = f.open();
    assert_backend(&dp);
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link a");
    send_udp(&f, 40);
    let a = counters_reach(&dp, key, "a", 40);
    assert_eq!((a.pass, a.total()), (40, 40), "{a:?}");
    let a_slot = slot(&dp.state(key).expect("state"), "a").slot;

    // Unlink a, then link b: b takes a's free slot id, and none of a's counts.
    dp.apply(key, &[Change::Unlink { name: "a".into() }], None)
        .expect("unlink a");
    let generation = dp
        .apply(key, &[Change::Link(stage("b", "test_pass", 10))], None)
        .expect("link b");
    let state = dp.state(key).expect("state");
    let b = slot(&state, "b");
    assert_eq!(b.slot, a_slot, "slot ids are reused once free");
    assert_eq!(
        b.counters.total(),
        0,
        "b inherits nothing: {:?}",
        b.counters
    );
    assert_eq!(b.linked_generation, generation);
    send_udp(&f, 10);
    let b = counters_reach(&dp, key, "b", 10);
    assert_eq!((b.pass, b.total()), (10, 10), "{b:?}");

    // Unlink b and link c in one change: c takes another slot id than the
    // one b is still counted in until the swap, and starts from zero.
    let generation = dp
        .apply(
            key,
            &[
                Change::Unlink { name: "b".into() },
                Change::Link(stage("c", "test_pass", 10)),
            ],
            None,
        )
        .expect("swap b for c");
    let state = dp.state(key).expect("state");
    let c = slot(&state, "c");
    assert_ne!(c.slot, a_slot, "not the slot the departing stage counts in");
    assert_eq!(c.counters.total(), 0, "{:?}", c.counters);
    assert_eq!(c.linked_generation, generation);
    send_udp(&f, 10);
    let c = counters_reach(&dp, key, "c", 10);
    assert_eq!((c.pass, c.total()), (10, 10), "{c:?}");

    // A replacement with another object is the same stage's life in its
    // slot: its counters go on, from the generation that linked it.
    let replaced = dp
        .apply(key, &[Change::Replace(stage("c", "sampler", 10))], None)
        .expect("replace c");
    let state = dp.state(key).expect("state");
    let c = slot(&state, "c");
    assert_eq!(
        c.counters.pass, 10,
        "cumulative across replace: {:?}",
        c.counters
    );
    assert_eq!(c.linked_generation, generation, "counting since its link");
    assert_eq!(c.loaded_generation, replaced, "a new build");
    send_udp(&f, 5);
    let c = counters_reach(&dp, key, "c", 15);
    assert_eq!((c.pass, c.total()), (15, 15), "{c:?}");
    dp.unload_rootlet(key).expect("unload");
}

#[test]
fn counters_item3_the_final_verdict_is_counted_and_an_unseen_stage_says_so() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let mut spec = f.rootlet_spec(XdpMode::Auto);
    spec.final_verdict = XdpAction::Drop;
    let key = dp.load_rootlet(spec).expect("load rootlet");
    let final_count = |want: u64| {
        fixture::wait_for(Duration::from_secs(10), || {
            dp.state(key).expect("state").final_verdict_count >= want
        });
        std::thread::sleep(Duration::from_millis(100));
        dp.state(key).expect("state").final_verdict_count
    };

    // No stage: every packet is handled with the final verdict.
    send_udp(&f, 10);
    assert_eq!(final_count(10), 10, "an empty pipeline's drops are counted");

    // Every stage proceeds: the final verdict's drops are counted, besides
    // the stages' passes.
    dp.apply(
        key,
        &[
            Change::Link(stage("a", "test_pass", 10)),
            Change::Link(stage("b", "test_pass", 20)),
        ],
        None,
    )
    .expect("link");
    send_udp(&f, 10);
    assert_eq!(final_count(20), 20);
    let state = dp.state(key).expect("state");
    for name in ["a", "b"] {
        let s = slot(&state, name);
        assert!(s.counted);
        assert_eq!((s.counters.pass, s.counters.total()), (10, 10), "{name}");
    }

    // A plain XDP program last: the tail-call chain cannot see its verdict
    // (it goes straight to the kernel), and the state says so.
    dp.apply(key, &[Change::Link(stage("p", "test_plain", 30))], None)
        .expect("link plain");
    send_udp(&f, 10);
    let a = counters_reach(&dp, key, "a", 20);
    assert_eq!(a.pass, 20);
    std::thread::sleep(Duration::from_millis(200));
    let state = dp.state(key).expect("state");
    let p = slot(&state, "p");
    match backend {
        Backend::TailCall => {
            assert!(!p.counted, "the rootlet cannot see a plain last stage");
            assert_eq!(state.final_verdict_count, 20, "its PASS is final");
            assert!(slot(&state, "b").counted);
            assert_eq!(slot(&state, "b").counters.pass, 20);
        }
        Backend::Freplace => {
            assert!(p.counted, "freplace sees every verdict");
            assert_eq!(p.counters.pass, 10, "{:?}", p.counters);
            assert_eq!(state.final_verdict_count, 30);
        }
    }
    dp.unload_rootlet(key).expect("unload");
}

/// The freplace rootlet counts its final verdict in `rootlet_stats` (one
/// lookup per packet); freplace rootlets built before that counted it in
/// `rootlet_final`, which every generation still keeps pinned. A rootlet of
/// that earlier layout, adopted after an upgrade, has its count there: the
/// agent adds the two, so the count neither drops nor doubles, across the
/// adoption and the first change of the new layout. (The tail-call rootlet
/// counts in `rootlet_final` still: there the added packets are its own.)
#[test]
fn counters_a_final_verdict_counted_in_the_earlier_layout_is_kept_after_an_upgrade() {
    let f = Fixture::new();
    let dp = f.open();
    assert_backend(&dp);
    let mut spec = f.rootlet_spec(XdpMode::Auto);
    spec.final_verdict = XdpAction::Drop;
    let key = dp.load_rootlet(spec).expect("load rootlet");
    let final_count = |dp: &rootlet_dataplane::Dataplane, want: u64| {
        fixture::wait_for(Duration::from_secs(10), || {
            dp.state(key).expect("state").final_verdict_count >= want
        });
        std::thread::sleep(Duration::from_millis(100));
        dp.state(key).expect("state").final_verdict_count
    };
    send_udp(&f, 10);
    assert_eq!(final_count(&dp, 10), 10, "counted where this layout counts");

    // What an earlier rootlet counted: 7 more packets in parity 0 of CPU 0
    // of the pinned rootlet_final, as its `rootlet_count_final(0)` did.
    let layout = rootlet_dataplane::pins::Layout::new(&f.root);
    let finals = sys::obj_get(&layout.final_counts(key)).expect("rootlet_final stays pinned");
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().rsplit(['-', ',']).next()?.parse::<usize>().ok())
        .map_or(1, |last| last + 1);
    let mut value = vec![0u8; rootlet_dataplane::abi::FINAL_SIZE * cpus];
    assert!(
        sys::map_lookup(finals.as_fd(), &0u32.to_ne_bytes(), &mut value).expect("lookup"),
        "key 0 of a per-CPU array exists"
    );
    let earlier = u64::from_ne_bytes(value[0..8].try_into().expect("8 bytes")) + 7;
    value[0..8].copy_from_slice(&earlier.to_ne_bytes());
    sys::map_update(finals.as_fd(), &0u32.to_ne_bytes(), &value).expect("update");
    assert_eq!(final_count(&dp, 17), 17, "both layouts' counts, added");

    // Adopted by a new agent, then rebuilt in this layout by a change.
    drop(dp);
    let dp = f.open();
    assert_eq!(final_count(&dp, 17), 17, "kept across the adoption");
    dp.apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link");
    send_udp(&f, 10);
    assert_eq!(
        final_count(&dp, 27),
        27,
        "kept across the rebuild, and counted on"
    );
    let a = slot(&dp.state(key).expect("state"), "a").counters;
    assert_eq!((a.pass, a.total()), (10, 10), "{a:?}");
    dp.unload_rootlet(key).expect("unload");
}

#[test]
fn counters_item11_a_build_keeps_its_identity_and_reports_every_instance() {
    let f = Fixture::new();
    let dp = f.open();
    let backend = assert_backend(&dp);
    let key = f.load(&dp);
    let linked = dp
        .apply(key, &[Change::Link(stage("a", "test_pass", 10))], None)
        .expect("link a");
    let instances = |state: &rootlet_dataplane::state::RootletState| {
        let a = slot(state, "a");
        let live: Vec<u32> = a
            .instances
            .iter()
            .filter(|i| i.live)
            .map(|i| i.id)
            .collect();
        assert_eq!(
            live,
            [a.prog.as_ref().expect("program").id],
            "exactly the live program is live: {:?}",
            a.instances
        );
        let mut ids: Vec<u32> = a.instances.iter().map(|i| i.id).collect();
        ids.sort_unstable();
        match backend {
            Backend::TailCall => {
                let mut parities: Vec<u32> = a.instances.iter().map(|i| i.parity).collect();
                parities.sort_unstable();
                assert_eq!(parities, [0, 1], "one instance per parity");
                assert_ne!(ids[0], ids[1]);
            }
            Backend::Freplace => assert_eq!(a.instances.len(), 1),
        }
        (a.digest.clone(), a.loaded_generation, ids)
    };
    let first = instances(&dp.state(key).expect("state"));
    assert_eq!(first.1, linked);

    // Other stages change, twice: a is not reloaded, so its identity and
    // its set of instances stay, whichever is live.
    for name in ["b", "c"] {
        dp.apply(key, &[Change::Link(stage(name, "test_pass", 20))], None)
            .expect("link another");
        let state = dp.state(key).expect("state");
        assert_eq!(
            instances(&state),
            first,
            "untouched in {}",
            state.generation
        );
    }

    // A new object: a new build, loaded now.
    let replaced = dp
        .apply(key, &[Change::Replace(stage("a", "sampler", 10))], None)
        .expect("replace a");
    let now = instances(&dp.state(key).expect("state"));
    assert_eq!(now.1, replaced);
    assert_ne!(now.0, first.0);
    assert!(now.2.iter().all(|id| !first.2.contains(id)), "new programs");
    dp.unload_rootlet(key).expect("unload");
}

/// The map ids of the two instances of `name` (tail-call), by map name.
fn instance_maps(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    name: &str,
) -> [std::collections::BTreeMap<String, u32>; 2] {
    let state = dp.state(key).expect("state");
    let s = slot(&state, name);
    assert_eq!(s.instances.len(), 2, "two instances: {:?}", s.instances);
    let ids = |id: u32| {
        maps_of_prog(id)
            .into_iter()
            .map(|(n, fd)| (n, sys::map_info(fd.as_fd()).expect("map info").id))
            .collect()
    };
    [ids(s.instances[0].id), ids(s.instances[1].id)]
}

/// A new tail-call stage is loaded twice (one instance per parity, the
/// second with the first's aya loader, `Load::xdp_after`): both instances
/// use the same maps, the rootlet's and the stage's own, kept ones too,
/// and each has only its global data (`.rodata`, `.bss`...) of its own.
#[test]
fn a_new_stages_two_instances_share_its_maps_and_own_only_their_data() {
    let f = Fixture::new();
    let dp = f.open();
    if assert_backend(&dp) != Backend::TailCall {
        eprintln!("freplace: one instance per stage, nothing to compare");
        return;
    }
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("ddos", "ddos", 10))], None)
        .expect("link");
    let check = |what: &str, [a, b]: &[std::collections::BTreeMap<String, u32>; 2]| {
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{what}: the same maps by name"
        );
        for (name, id) in a {
            if name.starts_with('.') {
                assert_ne!(id, &b[name], "{what}: {name} is each instance's own");
            } else {
                assert_eq!(id, &b[name], "{what}: {name} is shared");
            }
        }
        for name in [
            rootlet_dataplane::abi::STATS_MAP,
            rootlet_dataplane::abi::NEXT_MAP,
            policy::BLOCKLIST,
        ] {
            assert!(a.contains_key(name), "{what}: {name} in {a:?}");
        }
        // The read-only data holds the instance's parity: they differ.
        let rodata = |id: u32| {
            let map = sys::map_fd_by_id(id).expect("map by id");
            let size = sys::map_info(map.as_fd()).expect("map info").value_size as usize;
            let mut value = vec![0u8; size];
            assert!(
                sys::map_lookup(map.as_fd(), &0u32.to_ne_bytes(), &mut value).expect("lookup"),
                "{what}: .rodata has its entry"
            );
            value
        };
        let (ra, rb) = (a.get(".rodata"), b.get(".rodata"));
        let (Some(ra), Some(rb)) = (ra, rb) else {
            panic!("{what}: .rodata in both: {a:?} {b:?}");
        };
        assert_ne!(rodata(*ra), rodata(*rb), "{what}: one instance per parity");
    };
    let linked = instance_maps(&dp, key, "ddos");
    check("linked", &linked);
    let mut keep = stage("ddos", "ddos_v2", 10);
    keep.maps = MapPolicy::Keep;
    dp.apply(key, &[Change::Replace(keep)], None)
        .expect("replace keeping maps");
    let kept = instance_maps(&dp, key, "ddos");
    check("kept", &kept);
    assert_eq!(
        kept[0][policy::BLOCKLIST],
        linked[0][policy::BLOCKLIST],
        "kept: both new instances use the old blocklist"
    );
    dp.unload_rootlet(key).expect("unload");
}

// ---------------------------------------------------------------- policy maps

/// `n` addresses 10.`net`.x.y, each a /32 blocklist entry with rule `rule`.
fn address_set(net: u8, n: u32, rule: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(10, net, (i >> 8) as u8, i as u8);
            policy::block_entry(ip, 32, rule)
        })
        .collect()
}

/// A frame from `src` to the host with sequence number `seq`.
fn frame_from(f: &Fixture, src: Ipv4Addr, seq: u64) -> Vec<u8> {
    let mut frame = f.pair.udp_to_host(40000, SINK_PORT, seq_payload(seq, 64));
    frame.src_ip = src;
    frame.to_bytes()
}

/// Sends frames from `sources` in turn (sequence number `i` from
/// `sources[i % len]`), about `pps` a second, until `stop` is set or
/// `max` frames were sent; returns how many were sent.
fn alternate(
    f: &Fixture,
    sources: Vec<Ipv4Addr>,
    pps: u64,
    max: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    let frames: Vec<UdpFrame> = sources
        .iter()
        .map(|&src| {
            let mut fr = f.pair.udp_to_host(40000, SINK_PORT, vec![]);
            fr.src_ip = src;
            fr
        })
        .collect();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut seq = 0u64;
        while seq < max && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let due = start + Duration::from_micros(seq * 1_000_000 / pps);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let fr =
                frames[(seq % frames.len() as u64) as usize].with_payload(seq_payload(seq, 64));
            // A frame the veth refuses is simply not seen by the data plane.
            let _ = raw.send(&fr.to_bytes());
            seq += 1;
        }
        seq
    })
}

/// Which policy judged each packet, from what the data plane counted: the
/// witness before ddos (`reached`) and after it (`passed`). Packet `seq`
/// comes from source `seq % 2`: 0 is only in set A, 1 only in set B. A
/// packet from 0 that was dropped, or from 1 that passed, was judged by A;
/// the others by B. Returns the judged policies in sequence order, packets
/// that never reached the data plane left out.
fn judged(reached: &Witnessed, passed: &Witnessed, sent: u64) -> Vec<(u64, char)> {
    (0..sent)
        .filter(|&s| reached.count(s) > 0)
        .map(|s| {
            let through = passed.count(s) > 0;
            let from_a = s % 2 == 0;
            (s, if from_a != through { 'A' } else { 'B' })
        })
        .collect()
}

/// Changes of policy along `judged` (the sequence of verdicts).
fn transitions(judged: &[(u64, char)]) -> Vec<(u64, char)> {
    judged
        .windows(2)
        .filter(|w| w[0].1 != w[1].1)
        .map(|w| w[1])
        .collect()
}

/// Waits (bounded) until witness `name` has counted more than `n`.
fn wait_seen(
    dp: &rootlet_dataplane::Dataplane,
    key: rootlet_dataplane::spec::RootletKey,
    name: &str,
    n: u64,
) -> u64 {
    let end = deadline(60);
    loop {
        let seen = witnessed(dp, key, name).expect("witness").total();
        if seen > n || Instant::now() > end {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const SET: u32 = 30_000;

/// ddos between two witnesses, set A live, a flow from a source only in A
/// and one only in B alternating; `change` turns A into B while packets
/// flow. Returns the judged verdicts and how many packets the data plane
/// had counted before and after the change.
fn change_under_traffic(
    change: impl FnOnce(&rootlet_dataplane::Dataplane, rootlet_dataplane::spec::RootletKey),
) -> (Vec<(u64, char)>, u64, u64, u64) {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("w0", witness::OBJECT, 5)),
            Change::Link(stage("ddos", "ddos", 10)),
            Change::Link(stage("w1", witness::OBJECT, 20)),
        ],
        None,
    )
    .expect("link");
    policy::replace(&dp, key, "ddos", policy::BLOCKLIST, &address_set(1, SET, 1)).expect("set A");
    let (in_a, in_b) = (Ipv4Addr::new(10, 1, 100, 7), Ipv4Addr::new(10, 2, 100, 7));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Below the witness's window (2^18) whatever happens.
    let sender = alternate(&f, vec![in_a, in_b], 20_000, 250_000, stop.clone());
    let before = wait_seen(&dp, key, "w0", 2_000);
    change(&dp, key);
    let at_change = witnessed(&dp, key, "w0").expect("witness").total();
    let after = wait_seen(&dp, key, "w0", at_change + 2_000);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let reached = witnessed(&dp, key, "w0").expect("w0");
    let passed = witnessed(&dp, key, "w1").expect("w1");
    let state = dp.state(key).expect("state");
    assert_eq!(
        slot(&state, "ddos").counters.drop,
        reached.total() - passed.total(),
        "ddos dropped what the first witness saw and the second did not"
    );
    assert_eq!(reached.beyond, 0, "every packet within the witness window");
    (judged(&reached, &passed, sent), before, at_change, after)
}

/// The test: a swap between two large disjoint sets under traffic.
/// A flow whose source is only in A is dropped before the swap and passed
/// after it, the flow only in B the other way round, and along the packets
/// in order the verdicts change policy exactly once: no packet is judged by
/// a mix, and no flow alternates.
#[test]
fn policy_swap_under_traffic_never_mixes_two_large_sets() {
    let mut swapped = None;
    let (judged, before, at_swap, after) = change_under_traffic(|dp, key| {
        let outer = dp
            .stage_map_handle(key, "ddos", policy::BLOCKLIST)
            .expect("blocklist");
        let inner = rootlet_dataplane::policy::build_inner(&outer, &address_set(2, SET, 2))
            .expect("build B");
        swapped = Some(rootlet_dataplane::policy::swap(&outer, &inner).expect("swap"));
    });
    assert!(
        swapped.is_some_and(|s| s.old_inner_id.is_some()),
        "A was live"
    );
    assert!(
        before > 2_000 && after > at_swap + 2_000,
        "traffic overlapped the swap: {before} before, {at_swap} at it, {after} after"
    );
    let a = judged.iter().filter(|(_, p)| *p == 'A').count();
    let b = judged.len() - a;
    eprintln!(
        "judged by A: {a}, by B: {b}; counted {before} before the swap, {at_swap} at it, {after} after"
    );
    assert!(
        a >= 2_000 && b >= 2_000,
        "packets judged by A: {a}, by B: {b}"
    );
    let t = transitions(&judged);
    assert_eq!(
        t.len(),
        1,
        "one change of policy, from A to B; changes at (seq, policy): {:?}",
        &t[..t.len().min(20)]
    );
    assert_eq!(judged[0].1, 'A');
}

/// The judgement above can fail: the same change made entry by entry in
/// the live map (A's entries deleted, the flow's first, then B's added,
/// the flow's last) judges packets in between by neither set, and the
/// verdicts alternate.
#[test]
fn policy_an_entry_by_entry_change_under_traffic_is_seen_to_mix() {
    let (judged, _, _, _) = change_under_traffic(|dp, key| {
        let outer = dp
            .stage_map_handle(key, "ddos", policy::BLOCKLIST)
            .expect("blocklist");
        let live = sys::map_fd_by_id(outer.inner.as_ref().expect("live inner").id).expect("inner");
        let in_a = policy::ddos_key(Ipv4Addr::new(10, 1, 100, 7), 32);
        sys::map_delete(live.as_fd(), &in_a).expect("delete");
        for (k, _) in address_set(1, SET, 1) {
            sys::map_delete(live.as_fd(), &k).expect("delete");
        }
        let in_b = policy::ddos_key(Ipv4Addr::new(10, 2, 100, 7), 32);
        for (k, v) in address_set(2, SET, 2) {
            if k != in_b {
                sys::map_update(live.as_fd(), &k, &v).expect("add");
            }
        }
        sys::map_update(live.as_fd(), &in_b, &2u32.to_ne_bytes()).expect("add");
    });
    let t = transitions(&judged);
    eprintln!(
        "{} packets judged, {} changes of policy",
        judged.len(),
        t.len()
    );
    assert!(
        t.len() > 1,
        "a non-atomic change is judged a mix: {} changes of policy",
        t.len()
    );
}

/// A blocklist swapped in over traffic-free state drops exactly its
/// sources (a /24 and a /32; their neighbours pass), counts the drops per
/// rule, and the empty policy a new stage starts with drops nothing.
#[test]
fn policy_blocklist_swapped_in_drops_exactly_those_sources() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(
        key,
        &[
            Change::Link(stage("ddos", "ddos", 10)),
            Change::Link(stage("w", witness::OBJECT, 20)),
        ],
        None,
    )
    .expect("link");
    let outer = dp
        .stage_map_handle(key, "ddos", policy::BLOCKLIST)
        .expect("blocklist");
    assert!(outer.is_policy(), "{outer:?}");
    let empty = outer
        .inner
        .as_ref()
        .expect("an empty inner map was installed at load");
    assert_eq!(empty.info.map_type, 11, "an LPM trie");
    assert_eq!(rootlet_dataplane::policy::count(&outer).expect("count"), 0);
    assert!(!outer.btf.is_empty(), "the program's BTF from the kernel");

    let sources = [
        (Ipv4Addr::new(10, 9, 8, 1), true),   // in 10.9.8.0/24
        (Ipv4Addr::new(10, 9, 8, 254), true), // in 10.9.8.0/24
        (Ipv4Addr::new(10, 9, 9, 1), false),  // next /24
        (Ipv4Addr::new(10, 9, 7, 255), false),
        (Ipv4Addr::new(192, 0, 2, 7), true), // the /32
        (Ipv4Addr::new(192, 0, 2, 8), false),
    ];
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    let mut seq = 0u64;
    let send_round = |seq: &mut u64| -> Vec<(u64, Ipv4Addr, bool)> {
        let mut sent = vec![];
        for _ in 0..20 {
            for &(src, blocked) in &sources {
                raw.send(&frame_from(&f, src, *seq)).expect("send");
                sent.push((*seq, src, blocked));
                *seq += 1;
            }
        }
        sent
    };
    let wait_all = |n: u64| {
        let end = deadline(30);
        while slot(&dp.state(key).expect("state"), "ddos")
            .counters
            .total()
            < n
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The empty policy passes everything.
    let first = send_round(&mut seq);
    wait_all(seq);
    let w = witnessed(&dp, key, "w").expect("witness");
    assert!(
        first.iter().all(|(s, _, _)| w.count(*s) == 1),
        "an empty policy drops nothing"
    );

    let swapped = policy::replace(
        &dp,
        key,
        "ddos",
        policy::BLOCKLIST,
        &[
            policy::block_entry(Ipv4Addr::new(10, 9, 8, 0), 24, 3),
            policy::block_entry(Ipv4Addr::new(192, 0, 2, 7), 32, 4),
        ],
    )
    .expect("swap");
    assert_eq!(swapped.old_inner_id, Some(empty.id));
    let second = send_round(&mut seq);
    wait_all(seq);
    let w = witnessed(&dp, key, "w").expect("witness");
    for (s, src, blocked) in &second {
        assert_eq!(
            w.count(*s),
            u32::from(!blocked),
            "packet {s} from {src}: blocked {blocked}"
        );
    }
    let state = dp.state(key).expect("state");
    assert_eq!(
        slot(&state, "ddos").counters.drop,
        60,
        "3 blocked sources × 20"
    );
    let hits = dp.stage_map(key, "ddos", policy::HITS).expect("hits");
    assert_eq!(read_u64(&hits, 3, true), 40, "rule 3: the /24, two sources");
    assert_eq!(read_u64(&hits, 4, true), 20, "rule 4: the /32");
    let outer = dp
        .stage_map_handle(key, "ddos", policy::BLOCKLIST)
        .expect("blocklist");
    assert_eq!(rootlet_dataplane::policy::count(&outer).expect("count"), 2);
    let (page, next) = rootlet_dataplane::policy::dump(&outer, None, 1).expect("dump");
    assert_eq!(page.len(), 1);
    let (rest, end) = rootlet_dataplane::policy::dump(&outer, next.as_deref(), 10).expect("dump");
    assert_eq!((rest.len(), end), (1, None), "two pages, then the end");
    let mut keys: Vec<Vec<u8>> = page.iter().chain(&rest).map(|(k, _)| k.clone()).collect();
    keys.sort();
    let mut want = vec![
        policy::ddos_key(Ipv4Addr::new(10, 9, 8, 0), 24),
        policy::ddos_key(Ipv4Addr::new(192, 0, 2, 7), 32),
    ];
    want.sort();
    assert_eq!(keys, want);

    // A bad entry changes nothing and is named.
    let err = rootlet_dataplane::policy::build_inner(
        &outer,
        &[
            policy::block_entry(Ipv4Addr::new(10, 0, 0, 0), 8, 0),
            policy::block_entry(Ipv4Addr::new(10, 0, 0, 0), 33, 0),
        ],
    )
    .expect_err("a prefix length over 32");
    assert!(err.to_string().contains("entry 1"), "{err}");
    let err = rootlet_dataplane::policy::build_inner(
        &outer,
        &[(vec![0; 7], 0u32.to_ne_bytes().to_vec())],
    )
    .expect_err("a short key");
    assert!(
        matches!(
            &err,
            Error::Policy(rootlet_dataplane::error::PolicyError::Size {
                part: "key",
                got: 7,
                want: 8,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(rootlet_dataplane::policy::count(&outer).expect("count"), 2);
}

/// A plain map (ddos_hits, a per-CPU array) written entry by entry: a
/// write the kernel refuses midway is undone, so the map holds what it held;
/// an applied change is undone later from its journal form.
#[test]
fn policy_plain_map_apply_with_a_forced_failure_is_undone() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("ddos", "ddos", 10))], None)
        .expect("link");
    policy::replace(
        &dp,
        key,
        "ddos",
        policy::BLOCKLIST,
        &[policy::block_entry(BLOCKED, 32, 7)],
    )
    .expect("block");
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    for i in 0..10 {
        raw.send(&frame_from(&f, BLOCKED, i)).expect("send");
    }
    let hits = dp.stage_map(key, "ddos", policy::HITS).expect("hits");
    assert!(
        fixture::wait_for(Duration::from_secs(30), || read_u64(&hits, 7, true) == 10),
        "rule 7 counted the drops"
    );
    let map = dp
        .stage_map_handle(key, "ddos", policy::HITS)
        .expect("hits");
    assert!(!map.is_policy());
    let vlen = rootlet_dataplane::policy::value_len(&map.info).expect("value length");
    let live = policy::entries(&dp, key, "ddos", policy::HITS).expect("dump");
    assert_eq!(live.len(), 1024, "an array has every key");
    let per_cpu = |n: u64| {
        let mut v = n.to_ne_bytes().to_vec();
        v.resize(vlen, 0);
        v
    };
    let rule7 = live[7].1.clone();
    let desired = vec![
        (1u32.to_ne_bytes().to_vec(), per_cpu(111)),
        (7u32.to_ne_bytes().to_vec(), rule7.clone()),
        // Beyond the array: the kernel refuses it (E2BIG), after entry 0
        // was written.
        (5000u32.to_ne_bytes().to_vec(), per_cpu(1)),
    ];
    let err = rootlet_dataplane::policy::apply_plain(&map, &desired).expect_err("forced failure");
    match &err {
        Error::Policy(rootlet_dataplane::error::PolicyError::Write { map, entry, source }) => {
            assert_eq!(map, policy::HITS);
            assert_eq!(*entry, rootlet_dataplane::error::Entry::Index(2));
            assert_eq!(source.errno(), Some(libc::E2BIG), "{err}");
        }
        other => panic!("expected a write error naming entry 2: {other}"),
    }
    assert_eq!(
        policy::entries(&dp, key, "ddos", policy::HITS).expect("dump"),
        live,
        "the failed apply was undone: entry 1 is back to zero"
    );

    let applied = rootlet_dataplane::policy::apply_plain(&map, &desired[..2]).expect("apply");
    assert_eq!((applied.added, applied.removed, applied.changed), (0, 0, 1));
    assert_eq!(read_u64(&hits, 1, true), 111);
    let journal = serde_json::to_string(&applied).expect("journal");
    let back: rootlet_dataplane::policy::PlainApplied =
        serde_json::from_str(&journal).expect("journal back");
    back.undo(&map).expect("undo");
    assert_eq!(
        policy::entries(&dp, key, "ddos", policy::HITS).expect("dump"),
        live,
        "undone from the journal"
    );
    let err = rootlet_dataplane::policy::apply_plain(
        &dp.stage_map_handle(key, "ddos", policy::BLOCKLIST)
            .expect("blocklist"),
        &[],
    )
    .expect_err("a policy map is not written entry by entry");
    assert!(err.to_string().contains("is a policy map"), "{err}");
}

/// l4lb's services carry their backends inline, in one policy map: one
/// swap replaces a service with 4 backends by another service with 2, and
/// every packet is sent to the backend its flow hash picks among the
/// backends of the policy it met (integration-tests/src/packet.rs computes
/// the stage's hash).
#[test]
fn policy_l4lb_services_and_backends_change_in_one_swap() {
    let f = Fixture::new();
    let dp = f.open();
    let key = f.load(&dp);
    dp.apply(key, &[Change::Link(stage("lb", "l4lb", 10))], None)
        .expect("link");
    if dp.state(key).expect("state").mode == XdpMode::Driver {
        f.pair
            .attach_peer_xdp_pass()
            .expect("peer XDP for native XDP_TX");
    }
    let backends: Vec<(Ipv4Addr, [u8; 6])> = (0..4u8)
        .map(|i| {
            (
                Ipv4Addr::new(169, 254, 77, 10 + i),
                [0x02, 0, 0, 0, 0, 0x10 + i],
            )
        })
        .collect();
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if()).expect("raw");
    // Sends one packet to VIP:port from each source port; returns, for
    // each that came back (within 10 s, or 1 s when none should), its
    // source port and the backend it went to.
    let exchange = |port: u16, expect_back: bool| -> Vec<(u16, Ipv4Addr, [u8; 6])> {
        raw.drain().expect("drain");
        // The hash sees a port as loaded from the packet, so the flows
        // differ in the port's first byte.
        for sport in (0..20u16).map(|i| (0x90 + i) << 8 | 0x11) {
            let mut frame = f
                .pair
                .udp_to_host(sport, port, seq_payload(u64::from(sport), 64));
            frame.dst_ip = VIP;
            raw.send(&frame.to_bytes()).expect("send");
        }
        let mut back = vec![];
        let end = Instant::now() + Duration::from_secs(if expect_back { 10 } else { 1 });
        while back.len() < 20 && Instant::now() < end {
            if let Some(b) = raw
                .recv_matching(Duration::from_millis(300), |b| {
                    ParsedUdp::parse(b).is_some_and(|p| p.dst_port == port && p.dst_ip != VIP)
                })
                .expect("raw recv")
            {
                let p = ParsedUdp::parse(&b).expect("udp");
                back.push((p.src_port, p.dst_ip, p.dst_mac));
            }
        }
        back
    };
    let picked = |sport: u16, port: u16, n: usize| {
        backends[rootlet_integration_tests::packet::l4lb_flow_hash(
            PEER_IP.octets(),
            VIP.octets(),
            sport,
            port,
            17,
        ) as usize
            % n]
    };

    configure_lb(&dp, key);
    policy::replace(
        &dp,
        key,
        "lb",
        policy::SERVICES,
        &[(
            policy::vip_key(VIP, VIP_PORT, 17),
            policy::service_value(&backends),
        )],
    )
    .expect("4 backends");
    let back = exchange(VIP_PORT, true);
    assert_eq!(back.len(), 20, "every packet to the service came back");
    for (sport, ip, mac) in &back {
        assert_eq!(
            (*ip, *mac),
            picked(*sport, VIP_PORT, 4),
            "source port {sport}"
        );
    }
    assert!(
        back.iter()
            .map(|(_, ip, _)| ip)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1,
        "the flows spread over the backends"
    );

    let other = VIP_PORT + 1;
    policy::replace(
        &dp,
        key,
        "lb",
        policy::SERVICES,
        &[(
            policy::vip_key(VIP, other, 17),
            policy::service_value(&backends[..2]),
        )],
    )
    .expect("one swap: another service, 2 backends");
    assert!(
        exchange(VIP_PORT, false).is_empty(),
        "the old service is gone"
    );
    let back = exchange(other, true);
    assert_eq!(back.len(), 20);
    for (sport, ip, mac) in &back {
        assert_eq!((*ip, *mac), picked(*sport, other, 2), "source port {sport}");
    }
    let lb = slot(&dp.state(key).expect("state"), "lb").counters;
    assert_eq!((lb.tx, lb.pass), (40, 20), "{lb:?}");
}
