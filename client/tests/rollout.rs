//! The rollout engine against simulated agents (in memory, no kernel):
//! canary and waves, gates, rollback, unavailable hosts, operator
//! controls, resuming from the journal, undo; and policy rollouts on the
//! same engine (`policy rollout`: nack, a drop gate that rolls back by
//! itself, abort, pause, resume, undo). The same scenarios run against
//! real agents in `integration-tests/tests/fleet.rs`.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rootlet_bundle::{Bundle, PolicyDocument, SignedBundle, SignedPolicy};
use rootlet_client::{
    inventory::{Address, Host, Security},
    plan::Plan,
    rollout::{
        self, BundleFile, Outcome, Start, StartRequest, control,
        journal::{self, HostState, JournalFile, RolloutState, StopKind},
        policy::PolicyFile,
        progress::Mode,
    },
    transport::TransportOptions,
};
use rootlet_client_sim::{self as sim, SimHandle, SimOptions};

struct Fleet {
    dir: tempfile::TempDir,
    agents: Vec<SimHandle>,
}

impl Fleet {
    async fn new(n: usize, pps: u64) -> Fleet {
        let mut agents = Vec::new();
        for _ in 0..n {
            agents.push(sim::spawn(SimOptions { pps }).await.unwrap());
        }
        Fleet {
            dir: tempfile::tempdir().unwrap(),
            agents,
        }
    }

    fn hosts(&self) -> Vec<Host> {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| Host {
                name: format!("host-{i:02}"),
                address: Address::Tcp(a.addr.to_string()),
                labels: Default::default(),
                security: Security::Insecure,
            })
            .collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An unsigned bundle `edge` `version` with a sampler stage, and an
    /// aborting stage if `abort`.
    fn bundle(&self, version: &str, abort: bool) -> PathBuf {
        let d = self.dir.path();
        std::fs::write(d.join("sampler.o"), rootlet_ebpf::SAMPLER).unwrap();
        std::fs::write(d.join("test_abort.o"), rootlet_ebpf::TEST_ABORT).unwrap();
        let mut m = format!(
            "name = \"edge\"\nversion = \"{version}\"\n[[rootlets]]\ninterface = \"rl0\"\n\
             [[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 10\nowner = \"obs\"\n"
        );
        if abort {
            m.push_str(
                "[[stages]]\nname = \"abort_all\"\nobject = \"test_abort.o\"\nprogram = \"verdict\"\npriority = 5\nowner = \"obs\"\n",
            );
        }
        let manifest = d.join(format!("manifest-{version}.toml"));
        std::fs::write(&manifest, m).unwrap();
        let out = d.join(format!("edge-{version}.rlb"));
        std::fs::write(
            &out,
            SignedBundle::new(Bundle::build(&manifest).unwrap()).to_bytes(),
        )
        .unwrap();
        out
    }

    /// An unsigned policy for stage `sampler`, version `version`, whose map
    /// `blocklist` holds `keys` (the simulated agent drops every packet of
    /// a stage whose policy has `0.0.0.0/0`).
    fn policy(&self, version: u64, keys: &[&str]) -> PathBuf {
        let entries: Vec<String> = keys
            .iter()
            .map(|k| format!("{{ key = \"{k}\", value = 0 }}"))
            .collect();
        let text = format!(
            "stage = \"sampler\"\nversion = {version}\n[maps.blocklist]\nentries = [{}]\n",
            entries.join(", ")
        );
        let src = self.dir.path().join(format!("policy-v{version}.toml"));
        std::fs::write(&src, &text).unwrap();
        let doc = PolicyDocument::parse(&text, &src).unwrap();
        let out = self.dir.path().join(format!("policy-v{version}.rlp"));
        std::fs::write(&out, SignedPolicy::new(doc).to_bytes()).unwrap();
        out
    }

    /// The policy version of stage `sampler` on every host (None: no such
    /// stage; 0: no policy).
    fn policies(&self) -> Vec<Option<u64>> {
        self.agents
            .iter()
            .map(|a| a.agent.policy_of("rl0", "sampler"))
            .collect()
    }

    fn policy_calls(&self) -> Vec<u64> {
        self.agents.iter().map(|a| a.agent.policy_calls()).collect()
    }

    fn versions(&self) -> Vec<Option<String>> {
        self.agents
            .iter()
            .map(|a| a.agent.version_of("rl0"))
            .collect()
    }
}

fn opts() -> TransportOptions {
    TransportOptions {
        concurrency: 8,
        rpc_timeout: Duration::from_secs(2),
        apply_timeout: Duration::from_secs(5),
        host_deadline: Duration::from_secs(10),
        retries: 1,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
    }
}

async fn run(fleet: &Fleet, plan: &str, bundle: &Path, journal: &Path) -> (Outcome, JournalFile) {
    let req = StartRequest {
        hosts: fleet.hosts(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").unwrap(),
        bundle: BundleFile::read(bundle).unwrap(),
        journal: journal.to_path_buf(),
        transport: opts(),
    };
    let j = match rollout::plan_start(&req).unwrap() {
        Start::New(j) => j,
        Start::Resume(j) => j,
    };
    let engine =
        rollout::engine_for(journal, j, Some(Arc::clone(&req.bundle.bytes)), Mode::Quiet).unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run())
        .await
        .expect("the rollout ends within a minute")
        .unwrap()
}

const PLAN: &str = r#"
soak = "300ms"
canary = { hosts = 1 }
[[waves]]
percent = 30
[[gates.counters]]
metric = "aborted_rate"
max = 0.01
window = "300ms"
min_packets = 20
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_and_waves_then_a_gate_rolls_back() {
    let fleet = Fleet::new(8, 2000).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("j.json");
    let (outcome, jf) = run(&fleet, PLAN, &v1, &j).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    // 8 hosts: canary 1, then 30% = 3 (rounded up), 3, and the last 1.
    let sizes: Vec<usize> = jf.journal.steps.iter().map(|s| s.count).collect();
    assert_eq!(sizes, [1, 3, 3, 1]);
    assert!(fleet.versions().iter().all(|v| v.as_deref() == Some("v1")));
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.state == HostState::Healthy && h.uploaded)
    );
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.previous.is_none() && h.previous_recorded)
    );

    // v2, whose stage aborts every packet: the canary's gate trips, it goes
    // back to v1, and no other host is touched.
    let v2 = fleet.bundle("v2", true);
    let (outcome, jf) = run(&fleet, PLAN, &v2, &j).await;
    assert_eq!(outcome, Outcome::RolledBack);
    assert_eq!(outcome.exit_code(), 3);
    let stop = jf.journal.stop.clone().unwrap();
    assert_eq!(stop.kind, StopKind::Gate);
    assert_eq!(stop.host.as_deref(), Some("host-00"));
    assert!(
        stop.message.contains("aborted_rate of stage abort_all"),
        "{}",
        stop.message
    );
    assert_eq!(jf.journal.state, RolloutState::RolledBack);
    assert!(fleet.versions().iter().all(|v| v.as_deref() == Some("v1")));
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert!(
        jf.journal.hosts[1..]
            .iter()
            .all(|h| h.state == HostState::Pending)
    );
    // The first journal was archived beside the new one.
    let archived = std::fs::read_dir(fleet.dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("j.json.")
        })
        .count();
    assert!(archived >= 1);

    // A v3 that is fine goes everywhere; agents that already hold a digest
    // get no upload; undo then returns every host to v1.
    let v3 = fleet.bundle("v3", false);
    let (outcome, jf) = run(&fleet, "canary = { hosts = 1 }\n", &v3, &j).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert!(fleet.versions().iter().all(|v| v.as_deref() == Some("v3")));
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.previous.as_ref().unwrap().version == "v1")
    );
    let (outcome, jf, _) = rollout::undo(&j, Mode::Quiet).await.unwrap();
    assert_eq!(outcome, Outcome::Undone);
    assert_eq!(jf.journal.state, RolloutState::Undone);
    assert!(fleet.versions().iter().all(|v| v.as_deref() == Some("v1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_host_counts_against_max_unavailable() {
    let fleet = Fleet::new(6, 0).await;
    let v1 = fleet.bundle("v1", false);
    fleet.agents[4].agent.set_silent(true);
    let plan = "max_unavailable = 1\ncanary = { hosts = 1 }\n[[waves]]\nhosts = 2\n";
    let (outcome, jf) = run(&fleet, plan, &v1, &fleet.path("a.json")).await;
    // Every other host is on v1, but host 4 never was: not SUCCEEDED.
    assert_eq!(outcome, Outcome::Incomplete, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.hosts[4].state, HostState::Unreachable);
    assert!(
        jf.journal.hosts[4].detail.contains("DEADLINE_EXCEEDED"),
        "{}",
        jf.journal.hosts[4].detail
    );
    assert_eq!(jf.journal.counts().get("healthy"), Some(&5));

    // With none allowed, the same host stops the rollout, and the hosts it
    // changed (the canary and the first wave) are rolled back: they had no
    // earlier version, so the bundle is removed from them, and the fleet
    // is as it was before (rolled back, exit 3).
    let fleet2 = Fleet::new(6, 0).await;
    let v1 = fleet2.bundle("v1", false);
    fleet2.agents[4].agent.set_silent(true);
    let plan = "canary = { hosts = 1 }\n[[waves]]\nhosts = 2\n";
    let (outcome, jf) = run(&fleet2, plan, &v1, &fleet2.path("b.json")).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:#?}", jf.journal.hosts);
    assert_eq!(outcome.exit_code(), 3);
    let stop = jf.journal.stop.clone().unwrap();
    assert_eq!(stop.kind, StopKind::Unavailable, "{}", stop.message);
    assert!(stop.message.contains("host-04"), "{}", stop.message);
    for i in [0, 1, 2] {
        let h = &jf.journal.hosts[i];
        assert_eq!(
            h.state,
            HostState::RolledBack,
            "{}: {}",
            h.host.name,
            h.detail
        );
        assert!(h.detail.contains("removed"), "{}", h.detail);
        // The rootlet the bundle loaded is gone with it.
        assert_eq!(fleet2.agents[i].agent.stages_of("rl0"), None);
    }
    fleet2.agents[4].agent.set_silent(false);
    assert_eq!(fleet2.versions(), vec![None; 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_host_that_returns_is_retried_and_resume_finishes_the_rest() {
    let fleet = Fleet::new(5, 0).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("s.json");
    // Host 1 (wave 1) is down when its wave starts and back before the end
    // (wave 2 soaks 3 s); host 3 (wave 2) stays down to the end.
    fleet.agents[1].agent.set_silent(true);
    fleet.agents[3].agent.set_silent(true);
    let plan = "soak = \"1s\"\nmax_unavailable = 2\ncanary = { hosts = 1 }\n[[waves]]\nhosts = 2\n";
    let j2 = j.clone();
    let a1 = fleet.agents[1].agent.clone();
    let waker = tokio::spawn(async move {
        let t0 = Instant::now();
        // Bounded: 30 s.
        while journal::read(&j2).map(|x| x.steps_done).unwrap_or(0) < 2 {
            if t0.elapsed() > Duration::from_secs(30) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a1.set_silent(false);
    });
    let (outcome, jf) = run(&fleet, plan, &v1, &j).await;
    waker.await.unwrap();
    // Not SUCCEEDED: host 3 is not on v1. Its own state and exit code, and
    // the host is listed.
    assert_eq!(outcome, Outcome::Incomplete, "{:?}", jf.journal.stop);
    assert_eq!(outcome.exit_code(), 4);
    assert_eq!(jf.journal.state, RolloutState::Incomplete);
    assert_eq!(jf.journal.hosts[1].state, HostState::Healthy);
    assert_eq!(jf.journal.hosts[3].state, HostState::Unreachable);
    let summary = rollout::summary::human(&jf.journal, None);
    assert!(summary.contains("INCOMPLETE"), "{summary}");
    assert!(summary.contains("host-03"), "{summary}");
    let mut expected = vec![Some("v1".to_string()); 5];
    expected[3] = None;
    assert_eq!(fleet.versions(), expected);

    // Back: `rollout resume` finishes it.
    fleet.agents[3].agent.set_silent(false);
    let (outcome, jf, _) = rollout::take_over(&j, Mode::Quiet, false).await.unwrap();
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.hosts[3].state, HostState::Healthy);
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 5]);
    // The hosts already healthy were not pushed again.
    assert_eq!(fleet.agents[0].agent.apply_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_gate_over_its_threshold_fails_before_its_window_closes() {
    let fleet = Fleet::new(2, 2000).await;
    let bad = fleet.bundle("v1-abort", true);
    let plan = r#"
soak = "10s"
canary = { hosts = 1 }
[[gates.counters]]
metric = "aborted_rate"
max = 0.01
window = "10s"
min_packets = 100
"#;
    let t0 = Instant::now();
    let (outcome, jf) = run(&fleet, plan, &bad, &fleet.path("g.json")).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().unwrap();
    assert!(
        stop.message.contains("aborted_rate of stage abort_all"),
        "{}",
        stop.message
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "judged only when the 10 s window closed: {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_install_rolled_back_keeps_another_teams_stage() {
    let fleet = Fleet::new(3, 2000).await;
    // Host 0 already runs another team's stage on rl0.
    fleet.agents[0]
        .agent
        .add_foreign_stage("rl0", "team_fw", "fw", 1);
    let bad = fleet.bundle("v1-abort", true);
    let (outcome, jf) = run(&fleet, PLAN, &bad, &fleet.path("f.json")).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(outcome.exit_code(), 3);
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(
        fleet.agents[0].agent.stages_of("rl0"),
        Some(vec!["team_fw".to_string()])
    );
    assert_eq!(fleet.agents[1].agent.stages_of("rl0"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_first_install_removes_the_bundle_from_every_host_it_reached() {
    let fleet = Fleet::new(4, 0).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("a.json");
    let plan = "canary = { hosts = 2, pause = \"30s\" }\n";
    let j2 = j.clone();
    let aborter = tokio::spawn(async move {
        let t0 = Instant::now();
        while journal::read(&j2).map(|x| x.steps_done).unwrap_or(0) < 1 {
            if t0.elapsed() > Duration::from_secs(20) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        control::request(&j2, control::Request::Abort).unwrap();
    });
    let (outcome, jf) = run(&fleet, plan, &v1, &j).await;
    aborter.await.unwrap();
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.stop.as_ref().unwrap().kind, StopKind::Abort);
    assert_eq!(fleet.versions(), vec![None; 4]);
    assert!(
        fleet
            .agents
            .iter()
            .all(|a| a.agent.stages_of("rl0").is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_fails_the_apply_gate() {
    let fleet = Fleet::new(3, 0).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("a.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let v2 = fleet.bundle("v2", false);
    fleet.agents[1].agent.set_nack(true);
    let (outcome, jf) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v2,
        &fleet.path("a.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::RolledBack);
    let stop = jf.journal.stop.clone().unwrap();
    assert!(
        stop.message.contains("apply gate failed on host-01"),
        "{}",
        stop.message
    );
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rollout_resumes_without_repushing() {
    let fleet = Fleet::new(5, 0).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("r.json");
    let plan = "canary = { hosts = 1, pause = \"promote\" }\n[[waves]]\nhosts = 2\n";
    let req = StartRequest {
        hosts: fleet.hosts(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").unwrap(),
        bundle: BundleFile::read(&v1).unwrap(),
        journal: j.clone(),
        transport: opts(),
    };
    let Start::New(jn) = rollout::plan_start(&req).unwrap() else {
        panic!("a new rollout")
    };
    let engine =
        rollout::engine_for(&j, jn, Some(Arc::clone(&req.bundle.bytes)), Mode::Quiet).unwrap();
    let task = tokio::spawn(engine.run());
    // Wait (bounded) until the canary is healthy and the rollout waits.
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.state).ok() != Some(RolloutState::WaitingForPromote) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the canary never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // "Crash": the process goes away mid-rollout.
    task.abort();
    let _ = task.await;
    assert_eq!(fleet.agents[0].agent.apply_calls(), 1);

    // A promote recorded while nobody runs it; then resume from the journal.
    control::request(&j, control::Request::Promote).unwrap();
    let (outcome, jf, _) = rollout::take_over(&j, Mode::Quiet, false).await.unwrap();
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    // The canary was not pushed again; every host runs v1.
    assert_eq!(fleet.agents[0].agent.apply_calls(), 1);
    assert!(fleet.agents[1..].iter().all(|a| a.agent.apply_calls() == 1));
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_abort_rolls_back() {
    let fleet = Fleet::new(4, 0).await;
    let v1 = fleet.bundle("v1", false);
    let v2 = fleet.bundle("v2", false);
    let j = fleet.path("o.json");
    let (outcome, _) = run(&fleet, "canary = { hosts = 1 }\n", &v1, &j).await;
    assert_eq!(outcome, Outcome::Succeeded);
    // v2 waits after its canary (a timed pause); the operator aborts.
    let plan = "canary = { hosts = 2, pause = \"30s\" }\n";
    let j2 = j.clone();
    let aborter = tokio::spawn(async move {
        let t0 = Instant::now();
        while journal::read(&j2).map(|x| x.steps_done).unwrap_or(0) < 1
            || journal::read(&j2).map(|x| x.bundle.version).ok().as_deref() != Some("v2")
        {
            if t0.elapsed() > Duration::from_secs(20) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        control::request(&j2, control::Request::Abort).unwrap();
    });
    let (outcome, jf) = run(&fleet, plan, &v2, &j).await;
    aborter.await.unwrap();
    assert_eq!(outcome, Outcome::RolledBack);
    assert_eq!(jf.journal.stop.as_ref().unwrap().kind, StopKind::Abort);
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 4]);
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(jf.journal.hosts[1].state, HostState::RolledBack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_progress_deadline_rolls_back() {
    let fleet = Fleet::new(4, 0).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("d.json");
    let (outcome, _) = run(&fleet, "canary = { hosts = 1 }\n", &v1, &j).await;
    assert_eq!(outcome, Outcome::Succeeded);
    // Host 2 hangs for its whole RPC deadline (2 s), longer than the step
    // may take (1 s); unavailable hosts alone would be allowed.
    fleet.agents[2].agent.set_silent(true);
    let v2 = fleet.bundle("v2", false);
    let plan = "progress_deadline = \"1s\"\nmax_unavailable = 3\ncanary = { hosts = 1 }\n";
    let (outcome, jf) = run(&fleet, plan, &v2, &j).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().unwrap();
    assert_eq!(stop.kind, StopKind::Deadline);
    assert_eq!(
        stop.message,
        "wave 1 was not healthy within progress_deadline 1s"
    );
    assert_eq!(stop.step, Some(1));
    fleet.agents[2].agent.set_silent(false);
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_pause_holds_the_next_step_until_resume() {
    let fleet = Fleet::new(3, 0).await;
    let v1 = fleet.bundle("v1", false);
    let j = fleet.path("p.json");
    // Paused before it starts: nothing is pushed until resumed.
    let plan = "canary = { hosts = 1 }\n";
    let req = StartRequest {
        hosts: fleet.hosts(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").unwrap(),
        bundle: BundleFile::read(&v1).unwrap(),
        journal: j.clone(),
        transport: opts(),
    };
    let Start::New(jn) = rollout::plan_start(&req).unwrap() else {
        panic!("a new rollout")
    };
    control::request(&j, control::Request::Pause).unwrap();
    let engine =
        rollout::engine_for(&j, jn, Some(Arc::clone(&req.bundle.bytes)), Mode::Quiet).unwrap();
    let task = tokio::spawn(engine.run());
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.state).ok() != Some(RolloutState::Paused) {
        assert!(t0.elapsed() < Duration::from_secs(10), "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fleet.agents.iter().all(|a| a.agent.apply_calls() == 0));
    control::request(&j, control::Request::Resume).unwrap();
    let (outcome, jf) = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Succeeded);
    assert!(jf.journal.events.iter().any(|e| e.message == "resumed"));
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 3]);
}

async fn remove(fleet: &Fleet, plan: &str, journal: &Path) -> (Outcome, JournalFile) {
    let req = rollout::RemoveRequest {
        hosts: fleet.hosts(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").unwrap(),
        name: "edge".into(),
        journal: journal.to_path_buf(),
        transport: opts(),
    };
    let j = match rollout::plan_remove(&req).unwrap() {
        Start::New(j) | Start::Resume(j) => j,
    };
    let engine = rollout::engine_for(journal, j, None, Mode::Quiet).unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run())
        .await
        .expect("the removal ends within a minute")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_remove_runs_as_a_rollout_and_rolls_back_like_one() {
    let fleet = Fleet::new(4, 0).await;
    fleet.agents[0]
        .agent
        .add_foreign_stage("rl0", "team_fw", "fw", 1);
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("v1.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);

    // Aborted while it waits after its canary: the canary gets v1 back.
    let j = fleet.path("rm.json");
    let plan = "canary = { hosts = 1, pause = \"30s\" }\n";
    let j2 = j.clone();
    let aborter = tokio::spawn(async move {
        let t0 = Instant::now();
        while journal::read(&j2).map(|x| x.steps_done).unwrap_or(0) < 1 {
            if t0.elapsed() > Duration::from_secs(20) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        control::request(&j2, control::Request::Abort).unwrap();
    });
    let (outcome, jf) = remove(&fleet, plan, &j).await;
    aborter.await.unwrap();
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 4]);
    assert_eq!(
        fleet.agents[0].agent.stages_of("rl0"),
        Some(vec!["team_fw".to_string(), "sampler".to_string()])
    );

    // To the end: no host runs edge; host 0 keeps the other team's stage.
    let (outcome, jf) = remove(&fleet, "canary = { hosts = 1 }\n", &j).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(
        jf.journal
            .hosts
            .iter()
            .all(|h| h.state == HostState::Healthy && h.changed == journal::Changed::Yes)
    );
    assert_eq!(
        fleet.agents[0].agent.stages_of("rl0"),
        Some(vec!["team_fw".to_string()])
    );
    assert!(
        fleet.agents[1..]
            .iter()
            .all(|a| a.agent.stages_of("rl0").is_none())
    );
    // Undo puts v1 back everywhere.
    let (outcome, _, _) = rollout::undo(&j, Mode::Quiet).await.unwrap();
    assert_eq!(outcome, Outcome::Undone);
    assert_eq!(fleet.versions(), vec![Some("v1".into()); 4]);
}

fn policy_request(
    fleet: &Fleet,
    plan: &str,
    policy: &Path,
    empty: Option<&Path>,
    journal: &Path,
) -> rollout::PolicyRequest {
    rollout::PolicyRequest {
        hosts: fleet.hosts(),
        selector: String::new(),
        plan: Plan::parse(plan, "plan.toml").unwrap(),
        policy: PolicyFile::read(policy).unwrap(),
        interface: None,
        empty: empty.map(|e| PolicyFile::read(e).unwrap()),
        journal: journal.to_path_buf(),
        transport: opts(),
    }
}

async fn run_policy(
    fleet: &Fleet,
    plan: &str,
    policy: &Path,
    empty: Option<&Path>,
    journal: &Path,
) -> (Outcome, JournalFile) {
    let req = policy_request(fleet, plan, policy, empty, journal);
    let j = match rollout::plan_policy(&req).unwrap() {
        Start::New(j) | Start::Resume(j) => j,
    };
    let engine =
        rollout::engine_for(journal, j, Some(Arc::clone(&req.policy.bytes)), Mode::Quiet).unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.run())
        .await
        .expect("the policy rollout ends within a minute")
        .unwrap()
}

/// A drop-rate gate: the stage's drop rate may rise by at most 0.2 over the
/// host's own before the change.
const DROP_GATE_PLAN: &str = r#"
soak = "600ms"
canary = { hosts = 1 }
[[waves]]
percent = 50
[[gates.counters]]
stage = "sampler"
metric = "drop_rate_change"
max = 0.2
window = "300ms"
min_packets = 20
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_rolls_out_on_the_same_engine_and_one_that_drops_everything_rolls_back_by_itself()
{
    let fleet = Fleet::new(5, 5000).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert_eq!(fleet.policies(), vec![Some(0); 5]);

    // A blocklist: canary, then waves of 50%, every host on policy v1.
    let p1 = fleet.policy(1, &["192.0.2.0/24", "198.51.100.7/32"]);
    let j = fleet.path("p.json");
    let (outcome, jf) = run_policy(&fleet, DROP_GATE_PLAN, &p1, None, &j).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.action, journal::Action::Policy);
    let sizes: Vec<usize> = jf.journal.steps.iter().map(|s| s.count).collect();
    assert_eq!(sizes, [1, 3, 1]);
    assert_eq!(fleet.policies(), vec![Some(1); 5]);
    for h in &jf.journal.hosts {
        assert_eq!(h.state, HostState::Healthy);
        assert_eq!(h.rootlets.len(), 1, "{h:?}");
        // What each rootlet held before was recorded: no policy.
        assert!(h.policy_before.values().all(|b| b.version == 0), "{h:?}");
        let apply = h.gates.iter().find(|g| g.gate == "apply").unwrap();
        assert!(apply.detail.contains("holds policy v1"), "{}", apply.detail);
    }

    // Policy v2 blocks everything: the canary's drop rate goes from 0 to 1,
    // its gate trips, it goes back to v1 and no other host sees v2.
    let before = fleet.policy_calls();
    let p2 = fleet.policy(2, &["0.0.0.0/0"]);
    let (outcome, jf) = run_policy(&fleet, DROP_GATE_PLAN, &p2, None, &j).await;
    assert_eq!(outcome, Outcome::RolledBack);
    let stop = jf.journal.stop.clone().unwrap();
    assert_eq!(stop.kind, StopKind::Gate);
    assert_eq!(stop.host.as_deref(), Some("host-00"));
    assert!(
        stop.message.contains("drop_rate_change of stage sampler"),
        "{}",
        stop.message
    );
    assert_eq!(fleet.policies(), vec![Some(1); 5]);
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
    let after = fleet.policy_calls();
    // The canary: one apply and one rollback; nobody else was called.
    assert_eq!(after[0] - before[0], 2);
    assert!((1..5).all(|i| after[i] == before[i]));
    // Traffic passes again on the canary: its drops stopped growing while
    // its passes grow.
    let counters = || fleet.agents[0].agent.counters_of("rl0", "sampler").unwrap();
    let c0 = counters();
    assert!(c0.drop > 0, "{c0:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c1 = counters();
    assert_eq!(c1.drop, c0.drop);
    assert!(c1.pass > c0.pass, "{c0:?} {c1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_nack_or_a_host_without_the_stage_fails_the_apply_gate() {
    let fleet = Fleet::new(4, 0).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let p1 = fleet.policy(1, &["192.0.2.0/24"]);
    let p2 = fleet.policy(2, &["192.0.2.0/24", "203.0.113.0/24"]);
    let j = fleet.path("p.json");
    let (outcome, _) = run_policy(&fleet, "canary = { hosts = 1 }\n", &p1, None, &j).await;
    assert_eq!(outcome, Outcome::Succeeded);

    // Host 2 refuses v2 (as an agent refuses an entry that does not fit):
    // the wave stops, and the hosts it changed go back to v1.
    fleet.agents[2].agent.set_policy_nack(true);
    let (outcome, jf) = run_policy(&fleet, "canary = { hosts = 1 }\n", &p2, None, &j).await;
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    let stop = jf.journal.stop.clone().unwrap();
    assert_eq!(stop.host.as_deref(), Some("host-02"));
    assert!(
        stop.message.contains("apply gate failed"),
        "{}",
        stop.message
    );
    assert!(
        stop.message.contains("simulated failure"),
        "{}",
        stop.message
    );
    assert_eq!(jf.journal.hosts[2].state, HostState::Failed);
    assert_eq!(jf.journal.hosts[2].changed, journal::Changed::No);
    assert_eq!(fleet.policies(), vec![Some(1); 4]);
    fleet.agents[2].agent.set_policy_nack(false);

    // A host whose pipeline lacks the stage: its push is a NACK.
    let bare = sim::spawn(SimOptions { pps: 0 }).await.unwrap();
    let mut hosts = fleet.hosts();
    hosts.insert(
        0,
        Host {
            name: "bare".into(),
            address: Address::Tcp(bare.addr.to_string()),
            labels: Default::default(),
            security: Security::Insecure,
        },
    );
    let mut req = policy_request(&fleet, "canary = { hosts = 1 }\n", &p2, None, &j);
    req.hosts = hosts;
    let Start::New(jn) = rollout::plan_policy(&req).unwrap() else {
        panic!("a new rollout")
    };
    let engine =
        rollout::engine_for(&j, jn, Some(Arc::clone(&req.policy.bytes)), Mode::Quiet).unwrap();
    let (outcome, jf) = engine.run().await.unwrap();
    assert_eq!(outcome, Outcome::RolledBack);
    let stop = jf.journal.stop.unwrap();
    assert_eq!(stop.host.as_deref(), Some("bare"));
    assert!(
        stop.message
            .contains("stage `sampler` is not linked on any rootlet of this host"),
        "{}",
        stop.message
    );
    assert_eq!(bare.agent.policy_calls(), 0);
    assert_eq!(fleet.policies(), vec![Some(1); 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_policy_rollout_puts_its_canary_back_and_undo_returns_every_host() {
    let fleet = Fleet::new(4, 0).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let p1 = fleet.policy(1, &["192.0.2.0/24"]);
    let p2 = fleet.policy(2, &["203.0.113.0/24"]);
    let empty = fleet.policy(3, &[]);
    let j = fleet.path("p.json");

    // A first push, aborted while it waits after its canary: the canary
    // had no policy, and goes back to "none" through --empty-policy.
    let plan = "canary = { hosts = 1, pause = \"30s\" }\n";
    let j2 = j.clone();
    let aborter = tokio::spawn(async move {
        let t0 = Instant::now();
        while journal::read(&j2).map(|x| x.steps_done).unwrap_or(0) < 1 {
            if t0.elapsed() > Duration::from_secs(20) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        control::request(&j2, control::Request::Abort).unwrap();
    });
    let (outcome, jf) = run_policy(&fleet, plan, &p1, Some(&empty), &j).await;
    aborter.await.unwrap();
    assert_eq!(outcome, Outcome::RolledBack, "{:?}", jf.journal.stop);
    assert_eq!(jf.journal.stop.unwrap().kind, StopKind::Abort);
    assert_eq!(fleet.policies(), vec![Some(3), Some(0), Some(0), Some(0)]);

    // Without --empty-policy, a host that had none cannot be put back: it
    // keeps the new policy, and the journal says so.
    let (outcome, _) = run_policy(&fleet, "canary = { hosts = 1 }\n", &p1, None, &j).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert_eq!(fleet.policies(), vec![Some(1); 4]);
    let (outcome, jf, _) = rollout::undo(&j, Mode::Quiet).await.unwrap();
    assert_eq!(outcome, Outcome::Failed);
    // Host 0 had v3 (the empty one) before: back on it; the others had none.
    assert_eq!(jf.journal.hosts[0].state, HostState::RolledBack);
    for h in &jf.journal.hosts[1..] {
        assert_eq!(h.state, HostState::RollbackFailed);
        assert!(h.detail.contains("it had no policy before"), "{}", h.detail);
    }
    assert_eq!(fleet.policies(), vec![Some(3), Some(1), Some(1), Some(1)]);

    // v2 everywhere, then undo: every host back on what it had (v3 or v1)
    // with RollbackPolicy; a host changed by someone else since is left
    // alone.
    let j3 = fleet.path("p2.json");
    let (outcome, _) = run_policy(&fleet, "canary = { hosts = 1 }\n", &p2, None, &j3).await;
    assert_eq!(outcome, Outcome::Succeeded);
    assert_eq!(fleet.policies(), vec![Some(2); 4]);
    let p9 = fleet.policy(9, &["192.0.2.9/32"]);
    fleet.agents[3]
        .agent
        .apply_policy_out_of_band("rl0", &std::fs::read(&p9).unwrap())
        .unwrap();
    let (outcome, jf, _) = rollout::undo(&j3, Mode::Quiet).await.unwrap();
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(fleet.policies(), vec![Some(3), Some(1), Some(1), Some(9)]);
    assert!(
        jf.journal.hosts[3].detail.contains("left as it is"),
        "{}",
        jf.journal.hosts[3].detail
    );
    assert!(
        jf.journal.hosts[..3]
            .iter()
            .all(|h| h.state == HostState::RolledBack)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_policy_rollout_pushes_nothing_and_an_interrupted_one_resumes_without_repushing() {
    let fleet = Fleet::new(3, 0).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let p1 = fleet.policy(1, &["192.0.2.0/24"]);
    let j = fleet.path("p.json");
    let req = policy_request(
        &fleet,
        "canary = { hosts = 1, pause = \"promote\" }\n",
        &p1,
        None,
        &j,
    );
    let Start::New(jn) = rollout::plan_policy(&req).unwrap() else {
        panic!("a new rollout")
    };
    control::request(&j, control::Request::Pause).unwrap();
    let engine =
        rollout::engine_for(&j, jn, Some(Arc::clone(&req.policy.bytes)), Mode::Quiet).unwrap();
    let task = tokio::spawn(engine.run());
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.state).ok() != Some(RolloutState::Paused) {
        assert!(t0.elapsed() < Duration::from_secs(10), "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.policy_calls(), vec![0; 3]);
    control::request(&j, control::Request::Resume).unwrap();
    let t0 = Instant::now();
    while journal::read(&j).map(|x| x.state).ok() != Some(RolloutState::WaitingForPromote) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the canary never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // "Crash" while it waits for promote; then promote and resume.
    task.abort();
    let _ = task.await;
    assert_eq!(fleet.policy_calls(), vec![1, 0, 0]);
    control::request(&j, control::Request::Promote).unwrap();
    let (outcome, jf, _) = rollout::take_over(&j, Mode::Quiet, false).await.unwrap();
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    // The canary was not pushed again.
    assert_eq!(fleet.policy_calls(), vec![1, 1, 1]);
    assert_eq!(fleet.policies(), vec![Some(1); 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_goes_to_every_rootlet_with_its_stage_or_only_to_the_interface_named() {
    let fleet = Fleet::new(2, 0).await;
    let d = fleet.dir.path();
    std::fs::write(d.join("sampler.o"), rootlet_ebpf::SAMPLER).unwrap();
    let manifest = d.join("two.toml");
    std::fs::write(
        &manifest,
        "name = \"edge\"\nversion = \"v1\"\n[[rootlets]]\ninterface = \"rl0\"\n[[rootlets]]\ninterface = \"rl1\"\n\
         [[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 10\nowner = \"obs\"\n",
    )
    .unwrap();
    let bundle = d.join("two.rlb");
    std::fs::write(
        &bundle,
        SignedBundle::new(Bundle::build(&manifest).unwrap()).to_bytes(),
    )
    .unwrap();
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &bundle,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let on = |iface: &str| -> Vec<Option<u64>> {
        fleet
            .agents
            .iter()
            .map(|a| a.agent.policy_of(iface, "sampler"))
            .collect()
    };

    // --interface rl1: only that rootlet of each host.
    let p1 = fleet.policy(1, &["192.0.2.0/24"]);
    let j = fleet.path("p.json");
    let mut req = policy_request(&fleet, "canary = { hosts = 1 }\n", &p1, None, &j);
    req.interface = Some((String::new(), "rl1".into()));
    let Start::New(jn) = rollout::plan_policy(&req).unwrap() else {
        panic!("a new rollout")
    };
    let engine =
        rollout::engine_for(&j, jn, Some(Arc::clone(&req.policy.bytes)), Mode::Quiet).unwrap();
    let (outcome, jf) = engine.run().await.unwrap();
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(jf.journal.hosts.iter().all(|h| h.rootlets.len() == 1));
    assert_eq!(on("rl0"), vec![Some(0); 2]);
    assert_eq!(on("rl1"), vec![Some(1); 2]);

    // No --interface: every rootlet with the stage; rl1 already holds v2's
    // predecessor v1, rl0 none; both end on v2, and undo puts each back to
    // what it had (rl1: v1 by RollbackPolicy; rl0: the empty policy).
    let p2 = fleet.policy(2, &["198.51.100.0/24"]);
    let empty = fleet.policy(5, &[]);
    let (outcome, jf) = run_policy(&fleet, "canary = { hosts = 1 }\n", &p2, Some(&empty), &j).await;
    assert_eq!(outcome, Outcome::Succeeded, "{:?}", jf.journal.stop);
    assert!(jf.journal.hosts.iter().all(|h| h.rootlets.len() == 2));
    assert_eq!(on("rl0"), vec![Some(2); 2]);
    assert_eq!(on("rl1"), vec![Some(2); 2]);
    let (outcome, jf, _) = rollout::undo(&j, Mode::Quiet).await.unwrap();
    assert_eq!(outcome, Outcome::Undone, "{:?}", jf.journal.hosts);
    assert_eq!(on("rl0"), vec![Some(5); 2]);
    assert_eq!(on("rl1"), vec![Some(1); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_push_refuses_to_overwrite_a_change_made_since_prepare() {
    let fleet = Fleet::new(1, 0).await;
    let v1 = fleet.bundle("v1", false);
    let (outcome, _) = run(
        &fleet,
        "canary = { hosts = 1 }\n",
        &v1,
        &fleet.path("b.json"),
    )
    .await;
    assert_eq!(outcome, Outcome::Succeeded);
    let p1 = PolicyFile::read(&fleet.policy(1, &["192.0.2.0/24"])).unwrap();
    let p7 = fleet.policy(7, &["203.0.113.0/24"]);
    let conn = rootlet_client::transport::Fleet::new(fleet.hosts(), opts());
    let pref = journal::PolicyRef {
        stage: "sampler".into(),
        version: 1,
        digest: p1.digest.clone(),
        path: p1.path.clone(),
        size: p1.bytes.len() as u64,
        interface: None,
        empty: None,
    };
    let ids = rollout::policy::targets(&conn, 0, &pref).await.unwrap();
    let before = rollout::policy::before(&conn, 0, "sampler", &ids)
        .await
        .unwrap();
    assert_eq!(before.values().next().unwrap().version, 0);
    // Someone applies v7 between prepare and push: the push is refused
    // (expected_version 0), and v7 stays.
    fleet.agents[0]
        .agent
        .apply_policy_out_of_band("rl0", &std::fs::read(&p7).unwrap())
        .unwrap();
    let r =
        rollout::policy::push(&conn, 0, &p1.bytes, &pref, "r1", "0:canary", &ids, &before).await;
    match r {
        rollout::policy::PushOutcome::Refused { error, changed } => {
            assert!(!changed);
            assert_eq!(error.code, tonic::Code::FailedPrecondition, "{error}");
            assert!(
                error
                    .message
                    .contains("holds policy v7 now, none when the rollout recorded it"),
                "{error}"
            );
        }
        _ => panic!("the push was not refused"),
    }
    assert_eq!(fleet.agents[0].agent.policy_of("rl0", "sampler"), Some(7));
}

/// The simulated agent answers RollbackRootlet as a real agent does for a
/// rootlet whose stages a bundle put there: FAILED_PRECONDITION naming the
/// bundle, nothing changed; an unknown rootlet is NOT_FOUND.
#[tokio::test]
async fn the_sim_refuses_a_rootlet_rollback_of_a_bundles_stages() {
    use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
    let fleet = Fleet::new(1, 0).await;
    let bytes = std::fs::read(fleet.bundle("1.0.0", false)).unwrap();
    let mut c = RootletClient::connect(format!("http://{}", fleet.agents[0].addr))
        .await
        .unwrap();
    c.apply_bundle(pb::ApplyBundleRequest {
        source: Some(pb::apply_bundle_request::Source::Bundle(bytes)),
        ..Default::default()
    })
    .await
    .unwrap();
    let rl0 = |ifname: &str| {
        Some(pb::RootletRef {
            r#ref: Some(pb::rootlet_ref::Ref::Interface(pb::Interface {
                netns: String::new(),
                ifname: ifname.into(),
            })),
        })
    };
    let before = c
        .get_rootlet(pb::GetRootletRequest {
            rootlet: rl0("rl0"),
        })
        .await
        .unwrap()
        .into_inner();
    let err = c
        .rollback_rootlet(pb::RollbackRootletRequest {
            rootlet: rl0("rl0"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("bundle `edge`"), "{err:?}");
    let after = c
        .get_rootlet(pb::GetRootletRequest {
            rootlet: rl0("rl0"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.generation, before.generation, "nothing changed");
    let err = c
        .rollback_rootlet(pb::RollbackRootletRequest {
            rootlet: rl0("nope"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}
