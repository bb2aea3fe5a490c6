//! `rootletctl` as a person runs it, against simulated agents: files on
//! disk, commands, exit codes (0 success, 1 failed, 2 usage, 3 rolled back).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use rootlet_client::cli::{EXIT_FAILED, EXIT_OK, EXIT_ROLLED_BACK, EXIT_USAGE, run_from};
use rootlet_client_sim::{self as sim, SimOptions};

fn ctl(args: &[&str]) -> i32 {
    run_from(std::iter::once("rootletctl").chain(args.iter().copied()))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bundle_rollout_status_and_exit_codes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agents: Vec<_> = (0..4)
        .map(|_| rt.block_on(sim::spawn(SimOptions { pps: 5000 })).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Bundles: keys, build (signed), verify, inspect; a bad manifest is a
    // usage error.
    std::fs::write(d.join("sampler.o"), rootlet_ebpf::SAMPLER).unwrap();
    std::fs::write(d.join("abort.o"), rootlet_ebpf::TEST_ABORT).unwrap();
    let manifest = |version: &str, abort: bool| {
        let mut m = format!(
            "name = \"edge\"\nversion = \"{version}\"\n[[rootlets]]\ninterface = \"rl0\"\n\
             [[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 10\nowner = \"obs\"\n"
        );
        if abort {
            m.push_str("[[stages]]\nname = \"abort_all\"\nobject = \"abort.o\"\nprogram = \"verdict\"\npriority = 1\nowner = \"obs\"\n");
        }
        let p = d.join(format!("{version}.toml"));
        std::fs::write(&p, m).unwrap();
        p
    };
    let (key, public) = (d.join("ops.key"), d.join("ops.pub"));
    assert_eq!(
        ctl(&[
            "bundle",
            "keygen",
            "--private",
            s(&key),
            "--public",
            s(&public)
        ]),
        EXIT_OK
    );
    let (v1, v2) = (d.join("v1.rlb"), d.join("v2.rlb"));
    let m1 = manifest("v1", false);
    assert_eq!(
        ctl(&["bundle", "build", s(&m1), "-o", s(&v1), "--key", s(&key)]),
        EXIT_OK
    );
    let m2 = manifest("v2", true);
    assert_eq!(
        ctl(&["bundle", "build", s(&m2), "-o", s(&v2), "--key", s(&key)]),
        EXIT_OK
    );
    assert_eq!(
        ctl(&["bundle", "verify", s(&v1), "--trusted", s(&public)]),
        EXIT_OK
    );
    assert_eq!(ctl(&["bundle", "inspect", s(&v1)]), EXIT_OK);
    std::fs::write(d.join("bad.toml"), "name = \"edge\"\nversion = 1\n").unwrap();
    assert_eq!(
        ctl(&["bundle", "build", s(&d.join("bad.toml"))]),
        EXIT_USAGE
    );
    // An object outside the manifest's directory: refused, unless named.
    let sub = d.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    let outside = sub.join("outside.toml");
    std::fs::write(
        &outside,
        std::fs::read_to_string(&m1)
            .unwrap()
            .replace("\"sampler.o\"", "\"../sampler.o\""),
    )
    .unwrap();
    let out = d.join("outside.rlb");
    assert_eq!(
        ctl(&["bundle", "build", s(&outside), "-o", s(&out)]),
        EXIT_USAGE
    );
    assert!(!out.exists());
    assert_eq!(
        ctl(&[
            "bundle",
            "build",
            s(&outside),
            "-o",
            s(&out),
            "--allow-object",
            s(&d.join("sampler.o"))
        ]),
        EXIT_OK
    );

    // Inventory and plan.
    let mut inv = String::new();
    for (i, a) in agents.iter().enumerate() {
        inv.push_str(&format!(
            "[[hosts]]\nname = \"h{i}\"\naddress = \"{}\"\ninsecure = true\nlabels = {{ role = \"edge\" }}\n",
            a.addr
        ));
    }
    let inventory = d.join("hosts.toml");
    std::fs::write(&inventory, inv).unwrap();
    let plan = d.join("plan.toml");
    std::fs::write(
        &plan,
        "soak = \"200ms\"\ncanary = { hosts = 1 }\n[[waves]]\npercent = 50\n\
         [[gates.counters]]\nmetric = \"aborted_rate\"\nmax = 0.01\nwindow = \"200ms\"\nmin_packets = 10\n",
    )
    .unwrap();
    assert_eq!(ctl(&["plan", s(&plan), "--hosts", "4"]), EXIT_OK);
    assert_eq!(
        ctl(&["inventory", s(&inventory), "-l", "role=edge"]),
        EXIT_OK
    );
    let bad_plan = d.join("bad-plan.toml");
    std::fs::write(&bad_plan, "[[waves]]\npercent = 0\n").unwrap();
    assert_eq!(ctl(&["plan", s(&bad_plan)]), EXIT_USAGE);

    let journal = d.join("j.json");
    let start = |bundle: &Path, selector: &str| {
        ctl(&[
            "rollout",
            "start",
            "-i",
            s(&inventory),
            "-p",
            s(&plan),
            "-b",
            s(bundle),
            "-j",
            s(&journal),
            "-l",
            selector,
            "--rpc-timeout",
            "2s",
        ])
    };
    // A selector matching nothing is a usage error.
    assert_eq!(start(&v1, "role=core"), EXIT_USAGE);
    assert_eq!(start(&v1, "role=edge"), EXIT_OK);
    assert!(
        agents
            .iter()
            .all(|a| a.agent.version_of("rl0").as_deref() == Some("v1"))
    );
    assert_eq!(ctl(&["rollout", "status", "-j", s(&journal)]), EXIT_OK);
    assert_eq!(
        ctl(&["rollout", "status", "-j", s(&journal), "--output", "json"]),
        EXIT_OK
    );
    assert_eq!(
        ctl(&["status", "-i", s(&inventory), "--expect", "v1"]),
        EXIT_OK
    );
    // Drift: a version other than the expected one.
    assert_eq!(
        ctl(&[
            "status",
            "-i",
            s(&inventory),
            "--expect",
            "v9",
            "--output",
            "json"
        ]),
        EXIT_FAILED
    );
    // Drift: a stage of the bundle replaced behind the agent's back. The
    // host still says v1, but does not count as running it.
    agents[1].agent.replace_out_of_band("rl0", "sampler");
    assert_eq!(
        ctl(&["status", "-i", s(&inventory), "--expect", "v1"]),
        EXIT_FAILED
    );
    let hosts = rt.block_on(async {
        let fleet = rootlet_client::transport::Fleet::new(
            rootlet_client::inventory::Inventory::load(&inventory)
                .unwrap()
                .hosts,
            Default::default(),
        );
        rootlet_client::status::read(&fleet, Some("v1")).await
    });
    let drifted: Vec<&str> = hosts
        .iter()
        .filter(|h| h.has_drift())
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(drifted, ["h1"]);
    let r = &hosts[1].rootlets[0];
    assert_eq!(r.applied_version, "v1");
    assert_eq!(r.stage_drift.len(), 1);
    assert_eq!(r.stage_drift[0].stage, "sampler");
    assert!(rootlet_client::status::table(&hosts).contains("stage sampler: replaced out of band"));
    // A finished rollout cannot be steered.
    assert_eq!(ctl(&["rollout", "pause", "-j", s(&journal)]), EXIT_USAGE);

    // v2 aborts packets: the canary gate trips and the rollout rolls back.
    assert_eq!(start(&v2, ""), EXIT_ROLLED_BACK);
    assert!(
        agents
            .iter()
            .all(|a| a.agent.version_of("rl0").as_deref() == Some("v1"))
    );
    assert_eq!(
        ctl(&["rollout", "status", "-j", s(&journal)]),
        EXIT_ROLLED_BACK
    );

    // `bundle remove` with the same plan: no host runs edge afterwards.
    let removal = d.join("rm.json");
    assert_eq!(
        ctl(&[
            "bundle",
            "remove",
            "edge",
            "-i",
            s(&inventory),
            "-p",
            s(&plan),
            "-j",
            s(&removal),
            "--rpc-timeout",
            "2s",
        ]),
        EXIT_OK
    );
    assert!(agents.iter().all(|a| a.agent.stages_of("rl0").is_none()));
    assert_eq!(ctl(&["status", "-i", s(&inventory)]), EXIT_OK);

    // A host that does not answer: status says so (exit 1).
    agents[2].agent.set_silent(true);
    assert_eq!(
        ctl(&["status", "-i", s(&inventory), "--rpc-timeout", "1s"]),
        EXIT_FAILED
    );
    agents[2].agent.set_silent(false);
    drop(agents);
    rt.shutdown_background();
}

/// `status --watch` against a simulated agent: the fleet shown once, again
/// when the agent's Watch stream says a stage was linked (and only then: no
/// redraw while nothing changes), and the watch ends by itself at
/// --watch-timeout with exit 0.
#[test]
fn status_watch_shows_a_change_from_the_stream_and_stops_at_its_timeout() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = rt.block_on(sim::spawn(SimOptions { pps: 1000 })).unwrap();
    agent.agent.add_foreign_stage("rl0", "team_fw", "fw", 1);
    let dir = tempfile::tempdir().unwrap();
    let inventory = dir.path().join("hosts.toml");
    std::fs::write(
        &inventory,
        format!(
            "[[hosts]]\nname = \"watched\"\naddress = \"{}\"\ninsecure = true\n",
            agent.addr
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_rootletctl"))
        .args([
            "status",
            "-i",
            s(&inventory),
            "--watch",
            "--watch-timeout",
            "8s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Quiet for longer than the old 2 s poll, then a change.
    std::thread::sleep(std::time::Duration::from_secs(4));
    agent.agent.add_foreign_stage("rl0", "team_lb", "lb", 2);
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = stdout.lines().filter(|l| l.starts_with("watched ")).count();
    assert_eq!(
        shown, 2,
        "shown once, then once for the link: {elapsed:?}:\n{stdout}"
    );
    assert!(stdout.contains("-- watched: changed"), "{stdout}");
    let (before, after) = stdout.split_once("-- watched: changed").unwrap();
    assert!(
        before.contains("team_fw") && !before.contains("team_lb"),
        "{before}"
    );
    assert!(after.contains("team_lb"), "{after}");
    assert!(
        elapsed >= std::time::Duration::from_secs(7)
            && elapsed < std::time::Duration::from_secs(30),
        "stops by itself at --watch-timeout: {elapsed:?}"
    );
    drop(rt);
}

#[test]
fn policy_rollout_steered_like_a_rollout_and_status_shows_policy_versions() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agents: Vec<_> = (0..3)
        .map(|_| rt.block_on(sim::spawn(SimOptions { pps: 5000 })).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("sampler.o"), rootlet_ebpf::SAMPLER).unwrap();
    std::fs::write(
        d.join("m.toml"),
        "name = \"edge\"\nversion = \"v1\"\n[[rootlets]]\ninterface = \"rl0\"\n\
         [[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 10\nowner = \"obs\"\n",
    )
    .unwrap();
    let bundle = d.join("v1.rlb");
    assert_eq!(
        ctl(&["bundle", "build", s(&d.join("m.toml")), "-o", s(&bundle)]),
        EXIT_OK
    );
    let mut inv = String::new();
    for (i, a) in agents.iter().enumerate() {
        inv.push_str(&format!(
            "[[hosts]]\nname = \"h{i}\"\naddress = \"{}\"\ninsecure = true\n",
            a.addr
        ));
    }
    let inventory = d.join("hosts.toml");
    std::fs::write(&inventory, inv).unwrap();
    let plan = d.join("plan.toml");
    std::fs::write(
        &plan,
        "soak = \"300ms\"\ncanary = { hosts = 1 }\n\
         [[gates.counters]]\nstage = \"sampler\"\nmetric = \"drop_rate_change\"\nmax = 0.1\nwindow = \"200ms\"\nmin_packets = 10\n",
    )
    .unwrap();
    let bj = d.join("b.json");
    assert_eq!(
        ctl(&[
            "rollout",
            "start",
            "-i",
            s(&inventory),
            "-p",
            s(&plan),
            "-b",
            s(&bundle),
            "-j",
            s(&bj)
        ]),
        EXIT_OK
    );
    let read = || {
        rt.block_on(async {
            let fleet = rootlet_client::transport::Fleet::new(
                rootlet_client::inventory::Inventory::load(&inventory)
                    .unwrap()
                    .hosts,
                Default::default(),
            );
            rootlet_client::status::read(&fleet, None).await
        })
    };
    let hosts = read();
    assert!(
        hosts
            .iter()
            .all(|h| h.rootlets[0].stages[0].policy_version.is_none())
    );
    let table = rootlet_client::status::table(&hosts);
    assert!(table.contains("POLICY"), "{table}");
    assert!(table.contains("sampler=-"), "{table}");

    // Signed policies: a blocklist, and one that blocks everything.
    let policy = |version: u64, key: &str| {
        let text = format!(
            "stage = \"sampler\"\nversion = {version}\n[maps.blocklist]\nentries = [{{ key = \"{key}\", value = 0 }}]\n"
        );
        let src = d.join(format!("p{version}.toml"));
        std::fs::write(&src, &text).unwrap();
        let doc = rootlet_bundle::PolicyDocument::parse(&text, &src).unwrap();
        let out = d.join(format!("p{version}.rlp"));
        std::fs::write(&out, rootlet_bundle::SignedPolicy::new(doc).to_bytes()).unwrap();
        out
    };
    let (p1, p2) = (policy(1, "192.0.2.0/24"), policy(2, "0.0.0.0/0"));
    let pj = d.join("p.json");
    let rollout = |p: &Path| {
        ctl(&[
            "policy",
            "rollout",
            s(p),
            "-i",
            s(&inventory),
            "-p",
            s(&plan),
            "-j",
            s(&pj),
        ])
    };
    // Not a policy: a usage error.
    assert_eq!(rollout(&bundle), EXIT_USAGE);
    assert_eq!(rollout(&p1), EXIT_OK);
    assert!(
        agents
            .iter()
            .all(|a| a.agent.policy_of("rl0", "sampler") == Some(1))
    );
    let hosts = read();
    assert!(
        hosts
            .iter()
            .all(|h| h.rootlets[0].stages[0].policy_version == Some(1))
    );
    let table = rootlet_client::status::table(&hosts);
    assert!(table.contains("sampler=v1"), "{table}");
    let json = serde_json::to_string(&hosts).unwrap();
    assert!(json.contains("\"policy_version\":1"), "{json}");
    assert_eq!(
        ctl(&["status", "-i", s(&inventory), "--output", "json"]),
        EXIT_OK
    );
    // The steering commands read the policy rollout's journal.
    assert_eq!(ctl(&["rollout", "status", "-j", s(&pj)]), EXIT_OK);

    // Blocking everything raises the canary's drop rate: rolled back by
    // itself (exit 3), every host on v1.
    assert_eq!(rollout(&p2), EXIT_ROLLED_BACK);
    assert!(
        agents
            .iter()
            .all(|a| a.agent.policy_of("rl0", "sampler") == Some(1))
    );
    assert_eq!(ctl(&["rollout", "status", "-j", s(&pj)]), EXIT_ROLLED_BACK);

    // A finished policy rollout undone: back to v1 from v1 is nothing.
    assert_eq!(rollout(&p1), EXIT_OK);
    assert_eq!(ctl(&["rollout", "undo", "-j", s(&pj)]), EXIT_OK);
    assert!(
        agents
            .iter()
            .all(|a| a.agent.policy_of("rl0", "sampler") == Some(1))
    );
    drop(agents);
    rt.shutdown_background();
}
