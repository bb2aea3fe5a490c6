//! Fleet rollouts end to end: 8 real `rootletd` agents, each in its own
//! network namespace with its own veth pair and traffic
//! (`rootlet_integration_tests::fleet`), driven by the `rootletctl`
//! rollout engine. One agent is reached over TCP with mutual TLS, the
//! others over their Unix sockets.
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
        progress::Mode,
    },
    status,
    transport::{Fleet, TransportOptions},
};
use rootlet_integration_tests::fleet::RealFleet;

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
    // completes without it.
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
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
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
    let v3 = fleet.sample_bundle("1.2.0", false).expect("bundle v3");
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
