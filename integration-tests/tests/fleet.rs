//! Fleet rollouts end to end: 8 real `rootletd` agents, each in its own
//! network namespace with its own veth pair and traffic
//! (`rootlet_integration_tests::fleet`), driven by the `rootletctl`
//! rollout engine. One agent is reached over TCP with mutual TLS, the
//! others over their Unix sockets. Policy rollouts (`policy rollout`) run
//! on the same engine against the sample bundle's ddos stage. Upgrades
//! bring new program builds (`rootlet_ebpf::SAMPLER_V2`, `DDOS_V2`), and
//! every agent is checked to run them: the new digests, new program ids,
//! another kernel tag for the sampler, and packets stamped by its new build.
//!
//! Needs root, and `rootletd` built with the same profile as the tests
//! (`cargo build -p rootlet-server`); the test fails, saying so, if it is
//! missing.

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
