//! Fleet rollouts end to end: 8 real `rootletd` agents, each in its own
//! network namespace with its own veth pair and traffic
//! (`rootlet_integration_tests::fleet`), driven by the `rootletctl`
//! rollout engine. One agent is reached over TCP with mutual TLS, the
//! others over their Unix sockets. Policy rollouts (`policy rollout`) run
//! on the same engine against the sample bundle's ddos stage. The
//! `real_agents_*` tests run the client's scenarios of
//! `client/tests/rollout.rs` (nack, abort, pause, deadline, undo) on 3-4
//! real agents, and kill an agent or the `rootletctl` binary mid-wave;
//! each checks that every host runs a version its journal record explains.
//! Upgrades bring new program builds (`rootlet_ebpf::SAMPLER_V2`,
//! `DDOS_V2`), and every agent is checked to run them: the new digests,
//! new program ids, another kernel tag for the sampler, and packets stamped
//! by its new build.
//!
//! Needs root, and `rootletd` and `rootletctl` built with the same profile
//! as the tests (`cargo build -p rootlet-server -p rootlet-client`); a test
//! fails, saying so, if one is missing.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rootlet_client::{
    plan::Plan,
    rollout::{
        self, BundleFile, Outcome, Start, StartRequest, control,
        journal::{self, HostState, JournalFile, RolloutState, StopKind},
        policy::PolicyFile,
        progress::Mode,
    },
    status,
    transport::{Fleet, TransportOptions},
};
use rootlet_dataplane::sys;
use rootlet_integration_tests::{fixture, fleet::RealFleet};

const HOSTS: usize = 8;
/// Host 3 is reached over TCP with mTLS.
const MTLS: &[usize] = &[3];
const PPS: u64 = 1000;

fn transport() -> TransportOptions {
    TransportOptions {
        concurrency: 8,
        rpc_timeout: Duration::from_secs(3),
        apply_timeout: Duration::from_secs(60),
        host_deadline: Duration::from_secs(90),
        retries: 2,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }
}

/// Canary 1, then 3 waves (25% = 2 hosts, 2 hosts, the last 3), gated on
/// health, apply and the aborted rate of every stage.
const PLAN: &str = r#"
soak = "1500ms"
progress_deadline = "2m"
max_unavailable = 1
canary = { hosts = 1 }

[[waves]]
percent = 25

[[waves]]
hosts = 2

[[waves]]
hosts = 3

[[gates.counters]]
stage = "*"
metric = "aborted_rate"
max = 0.01
window = "1s"
min_packets = 100

[[gates.counters]]
stage = "*"
metric = "drop_rate_change"
max = 0.05
window = "1s"
min_packets = 100
dry_run = true
"#;

fn request(fleet: &RealFleet, plan: &str, bundle: &Path, journal: &Path) -> StartRequest {
    StartRequest {
        hosts: fleet.inventory(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").expect("plan"),
        bundle: BundleFile::read(bundle).expect("bundle"),
        journal: journal.to_path_buf(),
        transport: transport(),
    }
}

async fn run(
    fleet: &RealFleet,
    plan: &str,
    bundle: &Path,
    journal: &Path,
) -> (Outcome, JournalFile) {
    let req = request(fleet, plan, bundle, journal);
    let j = match rollout::plan_start(&req).expect("journal") {
        Start::New(j) | Start::Resume(j) => j,
    };
    let engine = rollout::engine_for(journal, j, Some(Arc::clone(&req.bundle.bytes)), Mode::Lines)
        .expect("engine");
    tokio::time::timeout(Duration::from_secs(300), engine.run())
        .await
        .expect("the rollout ends within five minutes")
        .expect("journal written")
}

/// What every host reads back: the applied version of its rootlets.
async fn versions(fleet: &RealFleet) -> Vec<Vec<String>> {
    let f = Fleet::new(fleet.inventory(), transport());
    status::read(&f, None)
        .await
        .into_iter()
        .map(|h| {
            assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
            h.rootlets
                .iter()
                .map(|r| r.applied_version.clone())
                .collect()
        })
        .collect()
}

fn journal_path(fleet: &RealFleet, name: &str) -> PathBuf {
    fleet.dir.join(name)
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_and_waves_roll_out_and_an_aborting_stage_rolls_back() {
    let mut fleet = RealFleet::start(HOSTS, MTLS).await.expect("8 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let j = journal_path(&fleet, "rollout.json");

    // 1. The sample bundle everywhere, canary then three waves.
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let (outcome, jf) = run(&fleet, PLAN, &v1, &j).await;
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "{:?}\n{}",
        jf.journal.stop,
        fleet.log(0)
    );
    let sizes: Vec<usize> = jf.journal.steps.iter().map(|s| s.count).collect();
    assert_eq!(sizes, [1, 2, 2, 3]);
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.state == HostState::Healthy && h.uploaded)
    );
    // Every host reads back the new version, on its one rootlet.
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.0.0".to_string()]; HOSTS]
    );
    // The counter gates saw real traffic through every stage.
    for h in &jf.journal.hosts {
        let judged: Vec<_> = h
            .gates
            .iter()
            .filter(|g| g.gate == "aborted_rate")
            .collect();
        assert_eq!(judged.len(), 3, "{}: {:?}", h.host.name, h.gates);
        assert!(
            judged
                .iter()
                .all(|g| g.packets.unwrap_or(0) >= 100 && g.value == Some(0.0)),
            "{}: {:?}",
            h.host.name,
            judged
        );
    }
    for i in 0..HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic on 1.0.0"
        );
    }

    // 2. A bundle whose first stage aborts every packet: the canary's gate
    // trips, the canary goes back to 1.0.0 by itself, no other host is
    // touched, and traffic flows everywhere.
    let bad = fleet
        .sample_bundle("1.1.0-abort", true)
        .expect("bad bundle");
    let (outcome, jf) = run(&fleet, PLAN, &bad, &j).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(outcome.exit_code(), 3);
    let stop = jf.journal.stop.clone().expect("a stop reason");
    assert_eq!(stop.kind, StopKind::Gate);
    assert_eq!(stop.host.as_deref(), Some("host-00"));
    assert_eq!(stop.step, Some(0));
    assert!(
        stop.message
            .contains("aborted_rate of stage abort_all is 1.0000 > max 0.01"),
        "{}",
        stop.message
    );
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert!(
        jf.journal.hosts[1..]
            .iter()
            .all(|h| h.state == HostState::Pending)
    );
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.0.0".to_string()]; HOSTS]
    );
    for i in 0..HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic after the rollback"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_host_counts_against_max_unavailable_and_an_interrupted_rollout_resumes() {
    let mut fleet = RealFleet::start(HOSTS, MTLS).await.expect("8 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let j = journal_path(&fleet, "rollout.json");

    // 1. Host 6 (in the last wave) stops answering once the canary is
    // healthy: it is counted against max_unavailable = 1, and the rollout
    // completes without it, as INCOMPLETE (exit 4): host 6 is not on 1.0.0.
    let req = request(&fleet, PLAN, &v1, &j);
    let Start::New(jn) = rollout::plan_start(&req).expect("journal") else {
        panic!("a new rollout")
    };
    let engine = rollout::engine_for(&j, jn, Some(Arc::clone(&req.bundle.bytes)), Mode::Lines)
        .expect("engine");
    let task = tokio::spawn(engine.run());
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.steps_done).unwrap_or(0) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the canary never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.freeze(6, true).expect("SIGSTOP host-06");
    let (outcome, jf) = tokio::time::timeout(Duration::from_secs(300), task)
        .await
        .expect("the rollout ends")
        .expect("no panic")
        .expect("journal written");
    assert_eq!(outcome, Outcome::Incomplete, "{:?}", jf.journal.stop);
    assert_eq!(outcome.exit_code(), 4);
    assert_eq!(jf.journal.hosts[6].state, HostState::Unreachable);
    assert!(
        jf.journal.hosts[6].detail.contains("DEADLINE_EXCEEDED"),
        "{}",
        jf.journal.hosts[6].detail
    );
    assert_eq!(jf.journal.counts().get("healthy"), Some(&(HOSTS - 1)));
    fleet.freeze(6, false).expect("SIGCONT host-06");

    // A second silent host would be one too many: the rollout of 1.1.0
    // stops and puts back every host it changed.
    fleet.freeze(5, true).expect("SIGSTOP host-05");
    fleet.freeze(6, true).expect("SIGSTOP host-06");
    let v2 = fleet.sample_bundle("1.1.0", false).expect("bundle v2");
    let j2 = journal_path(&fleet, "rollout-2.json");
    let (outcome, jf) = run(&fleet, PLAN, &v2, &j2).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().expect("a stop reason");
    assert_eq!(stop.kind, StopKind::Unavailable, "{}", stop.message);
    assert!(
        stop.message.contains("host-05") && stop.message.contains("host-06"),
        "{}",
        stop.message
    );
    fleet.freeze(5, false).expect("SIGCONT");
    fleet.freeze(6, false).expect("SIGCONT");
    // Host 6 never got 1.0.0 (it was silent during that rollout).
    let mut expected = vec![vec!["1.0.0".to_string()]; HOSTS];
    expected[6].clear();
    assert_eq!(versions(&fleet).await, expected);

    // 2. An interrupted rollout resumes from its journal: 1.2.0 pauses after
    // its canary for a promote; the rootletctl running it goes away; a new
    // one continues without pushing the canary again.
    // 1.2.0 brings new builds of the sampler and ddos.
    let v1_sampler = running(&fleet, "sampler").await;
    let v1_ddos = running(&fleet, "ddos").await;
    let v3 = fleet.sample_bundle_v2("1.2.0").expect("bundle v3");
    let j3 = journal_path(&fleet, "rollout-3.json");
    let plan = PLAN.replace(
        "canary = { hosts = 1 }",
        "canary = { hosts = 1, pause = \"promote\" }",
    );
    let req = request(&fleet, &plan, &v3, &j3);
    let Start::New(jn) = rollout::plan_start(&req).expect("journal") else {
        panic!("a new rollout")
    };
    let engine = rollout::engine_for(&j3, jn, Some(Arc::clone(&req.bundle.bytes)), Mode::Lines)
        .expect("engine");
    let task = tokio::spawn(engine.run());
    let t0 = Instant::now();
    while journal::read(&j3).map(|x| x.state).ok() != Some(RolloutState::WaitingForPromote) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the canary never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let _ = task.await;
    let before = journal::read(&j3).expect("journal");
    assert_eq!(before.hosts[0].state, HostState::Healthy);
    let canary_generation = generation_of(&fleet, 0).await;
    control::request(&j3, control::Request::Promote).expect("promote");
    let (outcome, jf, _) = rollout::take_over(&j3, Mode::Lines, false)
        .await
        .expect("resume");
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert_eq!(
        jf.journal.hosts[0].updated_unix_ms, before.hosts[0].updated_unix_ms,
        "the finished canary is not touched again"
    );
    assert_eq!(
        generation_of(&fleet, 0).await,
        canary_generation,
        "and not pushed again"
    );
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.2.0".to_string()]; HOSTS]
    );
    assert!(v1_sampler[6].is_none(), "host 6 never got 1.0.0");
    assert_runs_v2(&fleet, &v1_sampler, &v1_ddos).await;
    for i in 0..HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic on 1.2.0"
        );
    }
}

async fn generation_of(fleet: &RealFleet, i: usize) -> u64 {
    let f = Fleet::new(fleet.inventory(), transport());
    let hosts = status::read(&f, None).await;
    hosts[i].rootlets.first().map_or(0, |r| r.generation)
}

/// What a host's kernel runs for one stage.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Running {
    program_id: u32,
    /// The kernel's tag of the program: a hash of its instructions.
    tag: [u8; 8],
    /// The object's digest, as the agent reports it.
    digest: String,
}

/// What every host runs for stage `name` (`None`: not running there), by
/// the agent's state and, for the tag, by the kernel.
async fn running(fleet: &RealFleet, name: &str) -> Vec<Option<Running>> {
    let f = Fleet::new(fleet.inventory(), transport());
    status::read(&f, None)
        .await
        .into_iter()
        .map(|h| {
            assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
            let s = h
                .rootlets
                .iter()
                .flat_map(|r| r.stages.iter())
                .find(|s| s.name == name)?;
            let program_id = s.program_id?;
            let prog = sys::prog_fd_by_id(program_id).expect("the program by id");
            let info = sys::prog_info(std::os::fd::AsFd::as_fd(&prog)).expect("program info");
            Some(Running {
                program_id,
                tag: info.tag,
                digest: s.digest.clone(),
            })
        })
        .collect()
}

/// The build that the sampler program `program_id` stamps on the packets
/// it counts (`sampler_counts[2]`, `ebpf/src/sampler.c`): `Some(n)` once
/// a packet went through build `n`, `None` for the first build, which has
/// no such entry. Panics if CPUs disagree, which would mean two builds
/// wrote one map.
fn sampler_build(program_id: u32) -> Option<u64> {
    let maps = fixture::maps_of_prog(program_id);
    let counts = maps.get("sampler_counts").expect("the sampler's map");
    let per_cpu = fixture::read_percpu_u64(counts, 2)?;
    let stamped: std::collections::BTreeSet<u64> =
        per_cpu.into_iter().filter(|b| *b != 0).collect();
    assert!(stamped.len() <= 1, "builds {stamped:?} in one map");
    Some(stamped.into_iter().next().unwrap_or(0))
}

/// Asserts that every host now runs the `_v2` builds of the sample
/// bundle's sampler and ddos (their digests, new programs where `before`
/// had one), that the kernel runs the sampler's new code (another tag),
/// and that packets go through it (it stamps build 2).
async fn assert_runs_v2(
    fleet: &RealFleet,
    before: &[Option<Running>],
    before_ddos: &[Option<Running>],
) {
    let v2 = rootlet_bundle::sha256_hex(rootlet_ebpf::SAMPLER_V2);
    let ddos_v2 = rootlet_bundle::sha256_hex(rootlet_ebpf::DDOS_V2);
    let now = running(fleet, "sampler").await;
    let now_ddos = running(fleet, "ddos").await;
    for (i, ((was, is), (was_ddos, is_ddos))) in before
        .iter()
        .zip(&now)
        .zip(before_ddos.iter().zip(&now_ddos))
        .enumerate()
    {
        let is = is
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} runs a sampler"));
        assert_eq!(is.digest, v2, "host {i} reports the new sampler build");
        let is_ddos = is_ddos
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} runs ddos"));
        assert_eq!(
            is_ddos.digest, ddos_v2,
            "host {i} reports the new ddos build"
        );
        if let Some(was) = was {
            assert_ne!(was.digest, is.digest, "host {i}: a new sampler object");
            assert_ne!(
                was.program_id, is.program_id,
                "host {i}: the new sampler build is a new program"
            );
            assert_ne!(
                was.tag, is.tag,
                "host {i}: the kernel runs the new sampler code"
            );
        }
        if let Some(was) = was_ddos {
            assert_ne!(
                was.program_id, is_ddos.program_id,
                "host {i}: the new ddos build is a new program"
            );
        }
        // The traffic every host carries goes through the new code.
        let t0 = Instant::now();
        while sampler_build(is.program_id) != Some(2) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "host {i}: no packet went through the new sampler build: {:?}",
                sampler_build(is.program_id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Four hosts, one per step (canary, then waves of one), gated on the
/// aborted rate; one host may be unavailable.
const SMALL_HOSTS: usize = 4;
const SMALL_PLAN: &str = r#"
soak = "1s"
progress_deadline = "2m"
max_unavailable = 1
canary = { hosts = 1 }

[[waves]]
hosts = 1

[[gates.counters]]
stage = "*"
metric = "aborted_rate"
max = 0.01
window = "1s"
min_packets = 100
"#;

fn spawn_rollout(
    fleet: &RealFleet,
    plan: &str,
    bundle: &Path,
    journal: &Path,
) -> tokio::task::JoinHandle<Result<(Outcome, JournalFile), journal::JournalError>> {
    let req = request(fleet, plan, bundle, journal);
    let j = match rollout::plan_start(&req).expect("journal") {
        Start::New(j) | Start::Resume(j) => j,
    };
    let engine = rollout::engine_for(journal, j, Some(Arc::clone(&req.bundle.bytes)), Mode::Lines)
        .expect("engine");
    tokio::spawn(engine.run())
}

async fn join(
    task: tokio::task::JoinHandle<Result<(Outcome, JournalFile), journal::JournalError>>,
) -> (Outcome, JournalFile) {
    tokio::time::timeout(Duration::from_secs(300), task)
        .await
        .expect("the rollout ends within five minutes")
        .expect("no panic")
        .expect("journal written")
}

/// The stages of every host's rootlets (one list per host; empty: no
/// rootlet).
async fn stages(fleet: &RealFleet) -> Vec<Vec<String>> {
    let f = Fleet::new(fleet.inventory(), transport());
    status::read(&f, None)
        .await
        .into_iter()
        .map(|h| {
            assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
            h.rootlets
                .iter()
                .flat_map(|r| r.stages.iter().map(|s| s.name.clone()))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn outcomes_are_asked_of_agents_killed_mid_apply_and_skipped_hosts_are_finished() {
    let mut fleet = RealFleet::start(SMALL_HOSTS, &[]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");

    // 1. Host 1 is down (stopped) when its wave starts, and back before the
    // end: it is tried again, and the rollout succeeds with it.
    fleet.freeze(1, true).expect("SIGSTOP host-01");
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let j1 = journal_path(&fleet, "r1.json");
    let task = spawn_rollout(&fleet, SMALL_PLAN, &v1, &j1);
    let t0 = Instant::now();
    while journal::read(&j1).map(|x| x.steps_done).unwrap_or(0) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "wave 1 never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.freeze(1, false).expect("SIGCONT host-01");
    let (outcome, jf) = join(task).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.hosts[1]);
    assert_eq!(jf.journal.hosts[1].state, HostState::Healthy);
    assert!(
        jf.journal
            .events
            .iter()
            .any(|e| e.message.contains("retrying 1 host skipped before")),
        "{:?}",
        jf.journal.events
    );
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.0.0".to_string()]; SMALL_HOSTS]
    );

    // 2. Host 1's agent dies in the middle of ApplyBundle (after the apply
    // took effect, before it answered) and comes back: rootletctl asks it
    // what the call did, counts the host as changed, and goes on.
    fleet
        .restart(1, Some("bundle-status-written"))
        .await
        .expect("host-01 armed to crash");
    let v1_sampler = running(&fleet, "sampler").await;
    let v1_ddos = running(&fleet, "ddos").await;
    for (i, r) in v1_sampler.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} runs 1.0.0's sampler"));
        assert_eq!(
            sampler_build(r.program_id),
            None,
            "host {i}: the first build"
        );
    }
    let v2 = fleet.sample_bundle_v2("1.1.0").expect("bundle v2");
    let j2 = journal_path(&fleet, "r2.json");
    let task = spawn_rollout(&fleet, SMALL_PLAN, &v2, &j2);
    let t0 = Instant::now();
    while !fleet.agent_exited(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "host-01 never crashed:\n{}",
            fleet.log(1)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.restart(1, None).await.expect("host-01 back");
    let (outcome, jf) = join(task).await;
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "{:?}\n{:?}\n{}",
        jf.journal.stop,
        jf.journal.hosts[1],
        fleet.log(1)
    );
    assert_eq!(jf.journal.hosts[1].state, HostState::Healthy);
    assert_eq!(jf.journal.hosts[1].changed, journal::Changed::Yes);
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.1.0".to_string()]; SMALL_HOSTS]
    );
    // 1.1.0 brings new builds of the sampler and ddos: every agent, the
    // one that crashed mid-apply too, runs them.
    assert_runs_v2(&fleet, &v1_sampler, &v1_ddos).await;

    // 3. Host 2's agent dies mid-apply and stays down: the outcome is
    // unknown, so it is one unavailable host (not a refusal that rolls the
    // fleet back); the others finish, and the rollout ends INCOMPLETE
    // (exit 4) naming it. Once it is back, `rollout resume` finishes it.
    fleet
        .restart(2, Some("bundle-status-written"))
        .await
        .expect("host-02 armed to crash");
    let v3 = fleet.sample_bundle("1.2.0", false).expect("bundle v3");
    let j3 = journal_path(&fleet, "r3.json");
    let (outcome, jf) = run(&fleet, SMALL_PLAN, &v3, &j3).await;
    assert_eq!(outcome, Outcome::Incomplete, "{:?}", jf.journal.stop);
    assert_eq!(outcome.exit_code(), 4);
    assert!(jf.journal.stop.is_none(), "{:?}", jf.journal.stop);
    let h2 = &jf.journal.hosts[2];
    assert_eq!(h2.state, HostState::Unreachable, "{}", h2.detail);
    assert_eq!(h2.changed, journal::Changed::Unknown, "{}", h2.detail);
    assert!(
        rollout::summary::human(&jf.journal, None).contains("host-02"),
        "the skipped host is listed"
    );
    for i in [0, 1, 3] {
        assert_eq!(jf.journal.hosts[i].state, HostState::Healthy);
    }
    fleet.restart(2, None).await.expect("host-02 back");
    let (outcome, jf, _) = rollout::take_over(&j3, Mode::Lines, false)
        .await
        .expect("resume");
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.hosts[2]);
    assert_eq!(
        versions(&fleet).await,
        vec![vec!["1.2.0".to_string()]; SMALL_HOSTS]
    );
    // 1.2.0 has the first builds again: every host loaded them back.
    let v1 = rootlet_bundle::sha256_hex(rootlet_ebpf::SAMPLER);
    for (i, r) in running(&fleet, "sampler").await.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|| panic!("host {i} runs a sampler"));
        assert_eq!(r.digest, v1, "host {i} runs the first sampler build again");
        assert_eq!(
            sampler_build(r.program_id),
            None,
            "host {i}: the first build"
        );
    }
    for i in 0..SMALL_HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic on 1.2.0"
        );
    }
}

/// A bundle `fw` of another team: one stage on `rl0`.
fn other_team_bundle(fleet: &RealFleet) -> PathBuf {
    let dir = fleet.dir.join("bundle-fw");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("sampler.o"), rootlet_ebpf::SAMPLER).expect("object");
    let manifest = dir.join("manifest.toml");
    std::fs::write(
        &manifest,
        "name = \"fw\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"rl0\"\n\
         [[stages]]\nname = \"fw_sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 90\nowner = \"fw\"\n",
    )
    .expect("manifest");
    let mut signed =
        rootlet_bundle::SignedBundle::new(rootlet_bundle::Bundle::build(&manifest).expect("build"));
    signed.sign(&rootlet_bundle::read_signing_key(&fleet.signing_key).expect("key"));
    let out = fleet.dir.join("fw-1.rlb");
    std::fs::write(&out, signed.to_bytes()).expect("bundle");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_first_install_rolled_back_or_aborted_leaves_hosts_without_the_bundle() {
    let mut fleet = RealFleet::start(SMALL_HOSTS, &[]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    // Host 0 already runs another team's stage (its own bundle).
    let fw = BundleFile::read(&other_team_bundle(&fleet)).expect("fw bundle");
    let f = Fleet::new(fleet.inventory(), transport());
    f.call(0, "ApplyBundle", None, |mut c, t| {
        let req = rootlet_proto::v1::ApplyBundleRequest {
            source: Some(rootlet_proto::v1::apply_bundle_request::Source::Bundle(
                fw.bytes.as_ref().clone(),
            )),
            idempotency_key: String::new(),
            expected_generations: Default::default(),
        };
        async move {
            c.apply_bundle(rootlet_client::transport::request(req, t))
                .await
        }
    })
    .await
    .expect("fw applied on host-00");
    let fw_only = vec![vec!["fw_sampler".to_string()], vec![], vec![], vec![]];
    assert_eq!(stages(&fleet).await, fw_only);

    // 1. A first install whose canary gate trips: the canary goes back to
    // having no edge at all (its other stage stays), ROLLED BACK, exit 3.
    let bad = fleet
        .sample_bundle("1.0.0-abort", true)
        .expect("bad bundle");
    let (outcome, jf) = run(&fleet, SMALL_PLAN, &bad, &journal_path(&fleet, "b.json")).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.hosts[0]);
    assert_eq!(outcome.exit_code(), 3);
    assert_eq!(jf.journal.state, RolloutState::RolledBack);
    assert_eq!(
        jf.journal.stop.as_ref().map(|s| s.kind),
        Some(StopKind::Gate)
    );
    let h0 = &jf.journal.hosts[0];
    assert_eq!(h0.state, HostState::RolledBack, "{}", h0.detail);
    assert!(h0.detail.contains("removed"), "{}", h0.detail);
    assert_eq!(stages(&fleet).await, fw_only);
    for i in 0..SMALL_HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic after the rollback"
        );
    }

    // 2. A good first install interrupted mid-wave (rootletctl goes away
    // while wave 1 soaks) and then aborted: the bundle is removed from
    // every host it reached, and only from those.
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let j = journal_path(&fleet, "a.json");
    let plan = SMALL_PLAN.replace("soak = \"1s\"", "soak = \"20s\"");
    let task = spawn_rollout(&fleet, &plan, &v1, &j);
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.hosts[1].state).ok() != Some(HostState::Pushed) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "wave 1 never pushed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let _ = task.await;
    let mid = stages(&fleet).await;
    assert!(mid[1].contains(&"sampler".to_string()), "{mid:?}");
    let (outcome, jf, _) = rollout::take_over(&j, Mode::Lines, true)
        .await
        .expect("abort");
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.hosts);
    assert_eq!(
        jf.journal.stop.as_ref().map(|s| s.kind),
        Some(StopKind::Abort)
    );
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(jf.journal.hosts[1].state, HostState::RolledBack);
    assert_eq!(stages(&fleet).await, fw_only);
    for i in 0..SMALL_HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic after the abort"
        );
    }

    // 3. On purpose: edge everywhere, then `bundle remove edge` through the
    // same engine and plan; every host is back to what it was, host 0 with
    // its other team's stage.
    let (outcome, jf) = run(&fleet, SMALL_PLAN, &v1, &journal_path(&fleet, "v1.json")).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    let j = journal_path(&fleet, "remove.json");
    let req = rollout::RemoveRequest {
        hosts: fleet.inventory(),
        selector: String::new(),
        plan: Plan::parse(SMALL_PLAN, "plan.toml").expect("plan"),
        name: "edge".into(),
        journal: j.clone(),
        transport: transport(),
    };
    let Start::New(jn) = rollout::plan_remove(&req).expect("journal") else {
        panic!("a new removal")
    };
    let engine = rollout::engine_for(&j, jn, None, Mode::Lines).expect("engine");
    let (outcome, jf) = join(tokio::spawn(engine.run())).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.hosts);
    assert_eq!(stages(&fleet).await, fw_only);
    for i in 0..SMALL_HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic after the removal"
        );
    }
}

/// A policy rollout's plan: canary, then the rest; gated on health, apply
/// (the pushed policy on every target) and the drop rate of the ddos stage,
/// which may rise by at most 0.2 over each host's own.
const POLICY_PLAN: &str = r#"
soak = "2s"
progress_deadline = "2m"
canary = { hosts = 1 }

[[waves]]
percent = 100

[[gates.counters]]
stage = "ddos"
metric = "drop_rate_change"
max = 0.2
window = "1s"
min_packets = 100
"#;

async fn run_policy(
    fleet: &RealFleet,
    plan: &str,
    policy: &Path,
    journal: &Path,
) -> (Outcome, JournalFile) {
    let req = rollout::PolicyRequest {
        hosts: fleet.inventory(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").expect("plan"),
        policy: PolicyFile::read(policy).expect("policy"),
        interface: None,
        empty: None,
        journal: journal.to_path_buf(),
        transport: transport(),
    };
    let j = match rollout::plan_policy(&req).expect("journal") {
        Start::New(j) | Start::Resume(j) => j,
    };
    let engine = rollout::engine_for(journal, j, Some(Arc::clone(&req.policy.bytes)), Mode::Lines)
        .expect("engine");
    tokio::time::timeout(Duration::from_secs(300), engine.run())
        .await
        .expect("the policy rollout ends within five minutes")
        .expect("journal written")
}

/// Per host: the ddos stage's policy version (as `status` reads it from
/// `Slot.policy_version`) and its dropped-packet counter.
async fn ddos(fleet: &RealFleet) -> Vec<(Option<u64>, u64)> {
    let f = Fleet::new(fleet.inventory(), transport());
    status::read(&f, None)
        .await
        .into_iter()
        .map(|h| {
            assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
            let s = h
                .rootlets
                .iter()
                .flat_map(|r| r.stages.iter())
                .find(|s| s.name == "ddos")
                .unwrap_or_else(|| panic!("{}: no ddos stage", h.name));
            (s.policy_version, s.counters.drop)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_rollout_blocks_a_source_everywhere_and_one_that_blocks_everything_rolls_back_by_itself()
 {
    let mut fleet = RealFleet::start(SMALL_HOSTS, &[1]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let (outcome, jf) = run(&fleet, SMALL_PLAN, &v1, &journal_path(&fleet, "b.json")).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(ddos(&fleet).await.iter().all(|(v, _)| v.is_none()));

    // 1. A blocklist of 192.0.2.0/24 (rule 1), canary then the rest: every
    // host reports v1, and packets from 192.0.2.77 are dropped by the ddos
    // stage on every host, counted by the data plane, while the peer's own
    // traffic passes.
    let blocklist = fleet
        .signed_policy(
            "ddos",
            1,
            "ddos_blocklist",
            &[("\"192.0.2.0/24\"", "1"), ("\"198.51.100.7/32\"", "2")],
        )
        .expect("policy v1");
    let j = journal_path(&fleet, "policy.json");
    let (outcome, jf) = run_policy(&fleet, POLICY_PLAN, &blocklist, &j).await;
    assert_eq!(
        outcome,
        Outcome::Succeeded,
        "{:?}\n{}",
        jf.journal.stop,
        fleet.log(0)
    );
    for h in &jf.journal.hosts {
        assert_eq!(h.state, HostState::Healthy, "{}: {}", h.host.name, h.detail);
        assert_eq!(h.rootlets.len(), 1, "{}", h.host.name);
        let apply = h.gates.iter().find(|g| g.gate == "apply").expect("apply");
        assert!(apply.detail.contains("holds policy v1"), "{}", apply.detail);
        let drop = h
            .gates
            .iter()
            .find(|g| g.gate == "drop_rate_change")
            .expect("a drop gate judged");
        assert!(drop.packets.unwrap_or(0) >= 100, "{drop:?}");
    }
    let before = ddos(&fleet).await;
    assert!(before.iter().all(|(v, _)| *v == Some(1)), "{before:?}");
    let blocked = std::net::Ipv4Addr::new(192, 0, 2, 77);
    for i in 0..SMALL_HOSTS {
        fleet.send_from(i, blocked, 200).expect("blocked source");
    }
    // The counters are read a moment later (bounded).
    let t0 = Instant::now();
    let after = loop {
        let now = ddos(&fleet).await;
        if now.iter().zip(&before).all(|(a, b)| a.1 >= b.1 + 200)
            || t0.elapsed() > Duration::from_secs(10)
        {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        assert!(
            a.1 >= b.1 + 200,
            "host {i}: ddos dropped {} -> {}",
            b.1,
            a.1
        );
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes the peer's own traffic under the blocklist"
        );
    }

    // 2. A policy that blocks everything: the canary's ddos drop rate goes
    // from 0 to 1, its gate trips, the canary goes back to v1 by itself
    // (RollbackPolicy), no other host is touched, and traffic flows again.
    let everything = fleet
        .signed_policy("ddos", 2, "ddos_blocklist", &[("\"0.0.0.0/0\"", "9")])
        .expect("policy v2");
    let (outcome, jf) = run_policy(&fleet, POLICY_PLAN, &everything, &j).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().expect("a stop reason");
    assert_eq!(stop.kind, StopKind::Gate);
    assert_eq!(stop.host.as_deref(), Some("host-00"));
    assert!(
        stop.message.contains("drop_rate_change of stage ddos"),
        "{}",
        stop.message
    );
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert!(
        jf.journal.hosts[0].detail.contains("back on v1"),
        "{}",
        jf.journal.hosts[0].detail
    );
    assert!(
        jf.journal.hosts[1..]
            .iter()
            .all(|h| h.state == HostState::Pending)
    );
    let now = ddos(&fleet).await;
    assert!(now.iter().all(|(v, _)| *v == Some(1)), "{now:?}");
    for i in 0..SMALL_HOSTS {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic after the rollback"
        );
    }
    // The canary's drops stopped growing once it was back on v1.
    let d0 = ddos(&fleet).await[0].1;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ddos(&fleet).await[0].1, d0);
}

// The client's rollout scenarios (nack, abort, pause, deadline, undo; in
// `client/tests/rollout.rs` against simulated agents) against real agents,
// and rollouts that survive a SIGKILLed agent or `rootletctl`. Each upgrade
// loads new program builds (the `_v2` objects), so "back on 1.0.0" is read
// as the 1.0.0 programs running again, not only as a version string.

/// What one host runs, read back from its agent: its rootlets' applied
/// versions, every stage with the digest of its object, and the bundle
/// ListBundles marks current.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRunning {
    versions: Vec<String>,
    stages: Vec<(String, String)>,
    current: Option<String>,
}

/// Every host's [`HostRunning`]; also checks that each stage's program is
/// loaded in the kernel (`bpftool prog show id`).
async fn hosts_running(fleet: &RealFleet) -> Vec<HostRunning> {
    let f = Fleet::new(fleet.inventory(), transport());
    let hosts = status::read(&f, None).await;
    let mut out = Vec::new();
    for h in hosts {
        assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
        let mut stages = Vec::new();
        for s in h.rootlets.iter().flat_map(|r| r.stages.iter()) {
            let id = s
                .program_id
                .unwrap_or_else(|| panic!("{}: stage {} has no program", h.name, s.name));
            let shown = std::process::Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string()])
                .output()
                .expect("bpftool");
            assert!(
                shown.status.success(),
                "{}: stage {}'s program {id} is not in the kernel",
                h.name,
                s.name
            );
            stages.push((s.name.clone(), s.digest.clone()));
        }
        out.push(HostRunning {
            versions: h
                .rootlets
                .iter()
                .map(|r| r.applied_version.clone())
                .collect(),
            stages,
            current: h
                .bundles
                .iter()
                .find(|b| b.current && b.name == "edge")
                .map(|b| b.version.clone()),
        });
    }
    out
}

/// Checks that every host runs a version of the bundle (the one ListBundles
/// marks current) that the rollout's journal explains:
/// the new one where the journal says it was pushed (healthy or pushed),
/// the previous one where it says the host was not touched, refused it, or
/// was put back; either where a push's answer never came. The previous
/// version is the one the journal recorded before the first push (checked
/// against `before`, what the host ran before the rollout), or, for a host
/// the rollout never reached, `before`'s. A host the journal could not put
/// back fails the check.
fn explained(j: &journal::Journal, before: &[HostRunning], now: &[HostRunning]) {
    assert_eq!(j.hosts.len(), now.len());
    assert_eq!(j.hosts.len(), before.len());
    for ((h, r), b) in j.hosts.iter().zip(now).zip(before) {
        let new = Some(j.bundle.version.clone());
        let old = b.current.clone();
        if h.previous_recorded {
            assert_eq!(
                h.previous.as_ref().map(|p| p.version.clone()),
                old,
                "{}: the journal recorded what it ran before",
                h.host.name
            );
        }
        let on = r.current.clone();
        let ok = match h.state {
            HostState::Healthy | HostState::Pushed => on == new,
            HostState::Pending
            | HostState::Prepared
            | HostState::Failed
            | HostState::RolledBack => on == old,
            HostState::Unreachable => match h.changed {
                journal::Changed::Yes => on == new,
                journal::Changed::No => on == old,
                journal::Changed::Unknown => on == new || on == old,
            },
            HostState::RollbackFailed => false,
        };
        assert!(
            ok,
            "{} runs {on:?}, which its journal record ({}, changed {:?}, previous {old:?}, new {new:?}) does not explain: {}",
            h.host.name,
            h.state.name(),
            h.changed,
            h.detail
        );
    }
}

/// 1.0.0 (the sample objects) everywhere, through a canary of one; returns
/// what every host runs then.
async fn install_v1(fleet: &RealFleet) -> Vec<HostRunning> {
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let (outcome, jf) = run(
        fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &journal_path(fleet, "v1.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    let v1 = hosts_running(fleet).await;
    assert!(v1.iter().all(|r| r.versions == ["1.0.0"]), "{v1:?}");
    v1
}

/// Checks that `now` runs other programs than `v1` on every stage both
/// have (the `_v2` builds were loaded).
fn new_programs(v1: &[HostRunning], now: &[HostRunning]) {
    for (a, b) in v1.iter().zip(now) {
        for (name, digest) in &b.stages {
            if let Some((_, old)) = a.stages.iter().find(|(n, _)| n == name)
                && (name == "sampler" || name == "ddos")
            {
                assert_ne!(old, digest, "stage {name} runs a new build");
            }
        }
    }
}

fn all_flow(fleet: &RealFleet, when: &str) {
    for i in 0..fleet.hosts.len() {
        assert!(
            fleet.traffic_flows(i, 50).expect("traffic"),
            "host {i} passes traffic {when}"
        );
    }
}

/// The sample bundle at `version` with the `_v2` objects and one more
/// stage (`sampler_b`, a second sampler at priority 15), signed.
fn v2_with_one_more_stage(fleet: &RealFleet, version: &str) -> PathBuf {
    let src = fleet.dir.join(format!("bundle-{version}-plus"));
    let objects = src.join("objects");
    std::fs::create_dir_all(&objects).expect("dir");
    for (name, bytes) in [
        ("sampler.o", rootlet_ebpf::SAMPLER_V2),
        ("ddos.o", rootlet_ebpf::DDOS_V2),
        ("l4lb.o", rootlet_ebpf::L4LB),
    ] {
        std::fs::write(objects.join(name), bytes).expect("object");
    }
    let mut manifest = rootlet_integration_tests::fleet::SAMPLE_MANIFEST.replacen(
        "version = \"1.0.0\"",
        &format!("version = \"{version}\""),
        1,
    );
    manifest.push_str(
        "\n[[stages]]\nname = \"sampler_b\"\nobject = \"objects/sampler.o\"\nprogram = \"sampler\"\npriority = 15\nowner = \"observability\"\n",
    );
    let path = src.join("manifest.toml");
    std::fs::write(&path, manifest).expect("manifest");
    signed_bundle(fleet, &path, &format!("edge-{version}-plus.rlb"))
}

fn signed_bundle(fleet: &RealFleet, manifest: &Path, name: &str) -> PathBuf {
    let mut signed =
        rootlet_bundle::SignedBundle::new(rootlet_bundle::Bundle::build(manifest).expect("build"));
    signed.sign(&rootlet_bundle::read_signing_key(&fleet.signing_key).expect("key"));
    let out = fleet.dir.join(name);
    std::fs::write(&out, signed.to_bytes()).expect("bundle");
    out
}

/// Applies a bundle `fw` of another team on host `i` directly (not a
/// rollout): `n` sampler stages on `rl0`, at priorities 40 and up.
async fn fill_with_other_team_stages(fleet: &RealFleet, i: usize, n: usize) {
    let dir = fleet.dir.join("bundle-fw-fill");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("sampler.o"), rootlet_ebpf::SAMPLER).expect("object");
    let mut m = "name = \"fw\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"rl0\"\n".to_string();
    for k in 0..n {
        m.push_str(&format!(
            "[[stages]]\nname = \"fw_{k}\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = {}\nowner = \"fw\"\n",
            40 + k
        ));
    }
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, m).expect("manifest");
    let fw = BundleFile::read(&signed_bundle(fleet, &manifest, "fw-fill.rlb")).expect("fw");
    let f = Fleet::new(fleet.inventory(), transport());
    f.call(i, "ApplyBundle", None, |mut c, t| {
        let req = rootlet_proto::v1::ApplyBundleRequest {
            source: Some(rootlet_proto::v1::apply_bundle_request::Source::Bundle(
                fw.bytes.as_ref().clone(),
            )),
            idempotency_key: String::new(),
            expected_generations: Default::default(),
        };
        async move {
            c.apply_bundle(rootlet_client::transport::request(req, t))
                .await
        }
    })
    .await
    .expect("fw applied");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_a_nack_in_a_wave_fails_the_apply_gate_and_the_canary_goes_back() {
    let mut fleet = RealFleet::start(3, &[]).await.expect("3 agents");
    fleet.start_traffic(PPS).expect("traffic");
    install_v1(&fleet).await;
    // Host 1's rootlet also runs 13 stages of another team: 16 of its 16
    // slots are taken, so a bundle with one more stage does not fit there
    // (the canary, host 0, has room).
    fill_with_other_team_stages(&fleet, 1, 13).await;
    let v1 = hosts_running(&fleet).await;
    assert_eq!(v1[1].stages.len(), 16, "{:?}", v1[1]);

    let v2 = v2_with_one_more_stage(&fleet, "2.0.0");
    let j = journal_path(&fleet, "nack.json");
    let (outcome, jf) = run(&fleet, "canary = { hosts = 1 }\n", &v2, &j).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.hosts);
    assert_eq!(outcome.exit_code(), 3);
    let stop = jf.journal.stop.clone().expect("a stop reason");
    assert!(
        stop.message.contains("apply gate failed on host-01"),
        "{}",
        stop.message
    );
    let h1 = &jf.journal.hosts[1];
    assert_eq!(h1.state, HostState::Failed, "{}", h1.detail);
    assert!(
        h1.detail.contains("at most 16 slots"),
        "the agent's own reason: {}",
        h1.detail
    );
    // The canary and host 2 (in host 1's wave) took 2.0.0 and are put back.
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(jf.journal.hosts[2].state, HostState::RolledBack);
    // Every host runs exactly what it ran before: the 1.0.0 programs again
    // (without sampler_b), host 1 its 16 stages.
    let now = hosts_running(&fleet).await;
    assert_eq!(now, v1);
    explained(&jf.journal, &v1, &now);
    all_flow(&fleet, "after the nack");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_an_operator_abort_rolls_back_the_paused_canaries() {
    let mut fleet = RealFleet::start(4, &[]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = install_v1(&fleet).await;
    // 2.0.0 (new programs) waits after its canary of two (a timed pause);
    // the operator aborts.
    let v2 = fleet.sample_bundle_v2("2.0.0").expect("bundle v2");
    let j = journal_path(&fleet, "abort.json");
    let plan = "canary = { hosts = 2, pause = \"30s\" }\n";
    let task = spawn_rollout(&fleet, plan, &v2, &j);
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.steps_done).unwrap_or(0) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the canary never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Mid-rollout, the canaries really run the new programs.
    let mid = hosts_running(&fleet).await;
    new_programs(&v1, &mid[..2]);
    assert_eq!(mid[2..], v1[2..]);
    explained(&journal::read(&j).expect("journal"), &v1, &mid);
    control::request(&j, control::Request::Abort).expect("abort");
    let (outcome, jf) = join(task).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(
        jf.journal.stop.as_ref().map(|s| s.kind),
        Some(StopKind::Abort)
    );
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(jf.journal.hosts[1].state, HostState::RolledBack);
    assert!(
        jf.journal.hosts[2..]
            .iter()
            .all(|h| h.state == HostState::Pending)
    );
    let now = hosts_running(&fleet).await;
    assert_eq!(now, v1);
    explained(&jf.journal, &v1, &now);
    all_flow(&fleet, "after the abort");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_an_operator_pause_holds_the_rollout_until_resume() {
    let mut fleet = RealFleet::start(3, &[]).await.expect("3 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let before = hosts_running(&fleet).await;
    let v1 = fleet.sample_bundle("1.0.0", false).expect("bundle v1");
    let j = journal_path(&fleet, "pause.json");
    let req = request(&fleet, "canary = { hosts = 1 }\n", &v1, &j);
    let Start::New(jn) = rollout::plan_start(&req).expect("journal") else {
        panic!("a new rollout")
    };
    // Paused before it starts: nothing reaches any agent until resumed.
    control::request(&j, control::Request::Pause).expect("pause");
    let engine = rollout::engine_for(&j, jn, Some(Arc::clone(&req.bundle.bytes)), Mode::Lines)
        .expect("engine");
    let task = tokio::spawn(engine.run());
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.state).ok() != Some(RolloutState::Paused) {
        assert!(t0.elapsed() < Duration::from_secs(20), "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let f = Fleet::new(fleet.inventory(), transport());
    for h in status::read(&f, None).await {
        assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
        assert!(
            h.rootlets.is_empty() && h.bundles.is_empty(),
            "{}: nothing applied while paused: {:?} {:?}",
            h.name,
            h.rootlets,
            h.bundles
        );
    }
    control::request(&j, control::Request::Resume).expect("resume");
    let (outcome, jf) = join(task).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(jf.journal.events.iter().any(|e| e.message == "resumed"));
    let now = hosts_running(&fleet).await;
    assert!(now.iter().all(|r| r.versions == ["1.0.0"]), "{now:?}");
    explained(&jf.journal, &before, &now);
    all_flow(&fleet, "on 1.0.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_a_step_past_its_progress_deadline_rolls_back() {
    let mut fleet = RealFleet::start(4, &[]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = install_v1(&fleet).await;
    // Host 2's agent is stopped: it hangs each call for its whole RPC
    // deadline (3 s), longer than a step may take (2.5 s); unavailable
    // hosts alone would be allowed.
    fleet.freeze(2, true).expect("SIGSTOP host-02");
    let v2 = fleet.sample_bundle_v2("2.0.0").expect("bundle v2");
    let plan = "progress_deadline = \"2500ms\"\nmax_unavailable = 3\ncanary = { hosts = 1 }\n";
    let (outcome, jf) = run(&fleet, plan, &v2, &journal_path(&fleet, "deadline.json")).await;
    fleet.freeze(2, false).expect("SIGCONT host-02");
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().expect("a stop reason");
    assert_eq!(stop.kind, StopKind::Deadline, "{}", stop.message);
    assert!(
        stop.message
            .starts_with("wave 1 was not healthy within progress_deadline"),
        "{}",
        stop.message
    );
    assert_eq!(stop.step, Some(1));
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    let now = hosts_running(&fleet).await;
    assert_eq!(now, v1);
    explained(&jf.journal, &v1, &now);
    all_flow(&fleet, "after the deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_undo_returns_every_host_to_the_previous_programs() {
    let mut fleet = RealFleet::start(3, &[1]).await.expect("3 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = install_v1(&fleet).await;
    let v2 = fleet.sample_bundle_v2("2.0.0").expect("bundle v2");
    let j = journal_path(&fleet, "undo.json");
    let (outcome, jf) = run(&fleet, "canary = { hosts = 1 }\n", &v2, &j).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.previous.as_ref().map(|p| p.version.as_str()) == Some("1.0.0"))
    );
    let on_v2 = hosts_running(&fleet).await;
    assert!(on_v2.iter().all(|r| r.versions == ["2.0.0"]), "{on_v2:?}");
    new_programs(&v1, &on_v2);
    explained(&jf.journal, &v1, &on_v2);

    let (outcome, jf, _) = rollout::undo(&j, Mode::Lines).await.expect("undo");
    assert_eq!(outcome, Outcome::Undone, "{:?}", jf.journal.hosts);
    assert_eq!(jf.journal.state, RolloutState::Undone);
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.state == HostState::RolledBack)
    );
    let now = hosts_running(&fleet).await;
    assert_eq!(now, v1);
    explained(&jf.journal, &v1, &now);
    all_flow(&fleet, "after the undo");
}

/// Canary, then waves of one, each soaking 2 s (long enough to kill
/// something in) under the aborted-rate gate; one host may be unavailable.
const SOAK_PLAN: &str = r#"
soak = "2s"
progress_deadline = "2m"
max_unavailable = 1
canary = { hosts = 1 }

[[waves]]
hosts = 1

[[gates.counters]]
stage = "*"
metric = "aborted_rate"
max = 0.01
window = "1s"
min_packets = 100
"#;

/// Waits (bounded) until host `i`'s record in journal `j` is `state`.
async fn wait_for_host(j: &Path, i: usize, state: HostState, what: &str) {
    let t0 = Instant::now();
    while journal::read(j)
        .ok()
        .and_then(|x| x.hosts.get(i).map(|h| h.state))
        != Some(state)
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_an_agent_killed_mid_wave_and_restarted_leaves_the_rollout_finished_or_rolled_back()
 {
    let mut fleet = RealFleet::start(SMALL_HOSTS, &[]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = install_v1(&fleet).await;
    let v2 = fleet.sample_bundle_v2("2.0.0").expect("bundle v2");
    let j = journal_path(&fleet, "killed-agent.json");
    let task = spawn_rollout(&fleet, SOAK_PLAN, &v2, &j);
    // Host 2 (wave 2) has taken 2.0.0 and soaks: its agent is SIGKILLed.
    wait_for_host(&j, 2, HostState::Pushed, "wave 2 never pushed").await;
    fleet.kill(2).expect("SIGKILL host-02");
    // The kernel keeps running what the agent applied: its pinned rootlet
    // passes traffic while no agent runs.
    assert!(
        fleet.traffic_flows(2, 50).expect("traffic"),
        "host-02 passes traffic with its agent dead"
    );
    // An operator (or systemd) starts it again, while the rollout runs.
    fleet.restart(2, None).await.expect("host-02 back");
    let (mut outcome, mut jf) = join(task).await;
    if outcome == Outcome::Incomplete {
        // It was counted unavailable and skipped: `rollout resume`
        // finishes it, as an operator would.
        (outcome, jf, _) = rollout::take_over(&j, Mode::Lines, false)
            .await
            .expect("resume");
    }
    let now = hosts_running(&fleet).await;
    explained(&jf.journal, &v1, &now);
    match outcome {
        Outcome::Succeeded => {
            assert!(now.iter().all(|r| r.versions == ["2.0.0"]), "{now:?}");
            new_programs(&v1, &now);
        }
        Outcome::RolledBack => assert_eq!(now, v1),
        other => panic!(
            "the rollout neither finished nor rolled back: {other:?} {:?}\n{:?}\n{}",
            jf.journal.stop,
            jf.journal.hosts[2],
            fleet.log(2)
        ),
    }
    eprintln!(
        "agent killed mid-wave: {outcome:?}; host-02: {} ({})",
        jf.journal.hosts[2].state.name(),
        jf.journal.hosts[2].detail
    );
    all_flow(&fleet, "after the rollout");

    // 2. 3.0.0 (the 1.0.0 builds again): host 2's agent is SIGKILLed while
    // it soaks and stays down until the rollout has ended; then it is
    // started again, and `rollout resume` finishes what was skipped.
    let before = now;
    let v3 = fleet.sample_bundle("3.0.0", false).expect("bundle v3");
    let j3 = journal_path(&fleet, "killed-agent-3.json");
    let task = spawn_rollout(&fleet, SOAK_PLAN, &v3, &j3);
    wait_for_host(&j3, 2, HostState::Pushed, "wave 2 never pushed").await;
    fleet.kill(2).expect("SIGKILL host-02");
    let (mut outcome, mut jf) = join(task).await;
    let ended = (outcome, jf.journal.hosts[2].state.name());
    fleet.restart(2, None).await.expect("host-02 back");
    if outcome == Outcome::Incomplete {
        (outcome, jf, _) = rollout::take_over(&j3, Mode::Lines, false)
            .await
            .expect("resume");
    }
    let now = hosts_running(&fleet).await;
    explained(&jf.journal, &before, &now);
    match outcome {
        Outcome::Succeeded => {
            assert!(now.iter().all(|r| r.versions == ["3.0.0"]), "{now:?}")
        }
        Outcome::RolledBack => assert_eq!(now, before),
        other => panic!(
            "the rollout neither finished nor rolled back: {other:?} {:?}\n{:?}\n{}",
            jf.journal.stop,
            jf.journal.hosts[2],
            fleet.log(2)
        ),
    }
    eprintln!(
        "agent killed mid-wave and left down: {ended:?}, then {outcome:?}; host-02: {} ({})",
        jf.journal.hosts[2].state.name(),
        jf.journal.hosts[2].detail
    );
    all_flow(&fleet, "after the second rollout");
}

/// Runs the real `rootletctl` binary with `args`; returns its exit code
/// and output. Bounded: killed after 3 minutes.
fn rootletctl(args: &[&str]) -> (i32, String) {
    let bin = rootlet_integration_tests::fleet::sibling_binary("rootletctl");
    let mut child = std::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo build -p rootlet-client --bin rootletctl)",
                bin.display()
            )
        });
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("rootletctl output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn real_agents_a_rootletctl_killed_mid_wave_is_resumed_or_aborted_from_its_journal() {
    let mut fleet = RealFleet::start(SMALL_HOSTS, &[1]).await.expect("4 agents");
    fleet.start_traffic(PPS).expect("traffic");
    let v1 = install_v1(&fleet).await;
    let inventory = fleet.dir.join("hosts.toml");
    std::fs::write(&inventory, fleet.inventory_toml()).expect("inventory");
    let plan = fleet.dir.join("plan.toml");
    std::fs::write(&plan, SOAK_PLAN).expect("plan");
    let bin = rootlet_integration_tests::fleet::sibling_binary("rootletctl");
    let start = |bundle: &Path, j: &Path| {
        let log = std::fs::File::create(j.with_extension("log")).expect("log");
        std::process::Command::new(&bin)
            .arg("rollout")
            .arg("start")
            .arg("-i")
            .arg(&inventory)
            .arg("-p")
            .arg(&plan)
            .arg("-b")
            .arg(bundle)
            .arg("-j")
            .arg(j)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (cargo build -p rootlet-client --bin rootletctl)",
                    bin.display()
                )
            })
    };

    // 1. rootletctl is SIGKILLed while wave 1 (host 1) soaks on 2.0.0.
    let v2 = fleet.sample_bundle_v2("2.0.0").expect("bundle v2");
    let j = journal_path(&fleet, "killed-ctl.json");
    let mut ctl = start(&v2, &j);
    wait_for_host(&j, 1, HostState::Pushed, "wave 1 never pushed").await;
    ctl.kill().expect("SIGKILL rootletctl");
    let _ = ctl.wait();
    let js = j.to_string_lossy().to_string();
    // What it left: the journal (nobody holds its lock now) and the
    // hosts, which it explains: the canary and host 1 on 2.0.0, the rest
    // untouched.
    assert!(!journal::JournalLock::is_held(&j));
    let left = journal::read(&j).expect("journal");
    assert!(!left.state.is_final(), "{}", left.state.name());
    let mid = hosts_running(&fleet).await;
    explained(&left, &v1, &mid);
    assert_eq!(mid[0].versions, ["2.0.0"]);
    assert_eq!(mid[1].versions, ["2.0.0"]);
    assert_eq!(mid[2..], v1[2..]);
    // `rollout status` reads the journal; `status` reads the agents.
    let (code, text) = rootletctl(&["rollout", "status", "-j", &js]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("host-01"), "{text}");
    let inv = inventory.to_string_lossy().to_string();
    let (_, text) = rootletctl(&["status", "-i", &inv]);
    assert!(text.contains("2.0.0") && text.contains("1.0.0"), "{text}");
    let canary_generation = generation_of(&fleet, 0).await;
    // `rollout resume` continues it here, from the journal: the hosts done
    // are not pushed again, and it finishes.
    let (code, text) = rootletctl(&["rollout", "resume", "-j", &js]);
    assert_eq!(code, 0, "{text}");
    let done = journal::read(&j).expect("journal");
    assert_eq!(done.state, RolloutState::Succeeded, "{text}");
    assert_eq!(generation_of(&fleet, 0).await, canary_generation);
    let now = hosts_running(&fleet).await;
    assert!(now.iter().all(|r| r.versions == ["2.0.0"]), "{now:?}");
    new_programs(&v1, &now);
    explained(&done, &v1, &now);
    let on_v2 = now;

    // 2. 3.0.0 (the 1.0.0 builds again), rootletctl SIGKILLed mid-wave
    // again; this time the operator aborts: every host it changed goes
    // back to 2.0.0's programs.
    let v3 = fleet.sample_bundle("3.0.0", false).expect("bundle v3");
    let j3 = journal_path(&fleet, "killed-ctl-3.json");
    let mut ctl = start(&v3, &j3);
    wait_for_host(&j3, 1, HostState::Pushed, "wave 1 never pushed").await;
    ctl.kill().expect("SIGKILL rootletctl");
    let _ = ctl.wait();
    let mid = hosts_running(&fleet).await;
    explained(&journal::read(&j3).expect("journal"), &on_v2, &mid);
    let js3 = j3.to_string_lossy().to_string();
    let (code, text) = rootletctl(&["rollout", "abort", "-j", &js3]);
    assert_eq!(code, 3, "rolled back: {text}");
    let done = journal::read(&j3).expect("journal");
    assert_eq!(done.state, RolloutState::RolledBack, "{text}");
    assert_eq!(done.hosts[0].state, HostState::RolledBack);
    assert_eq!(done.hosts[1].state, HostState::RolledBack);
    let now = hosts_running(&fleet).await;
    assert_eq!(now, on_v2);
    explained(&done, &on_v2, &now);
    all_flow(&fleet, "after the abort");
}
