//! `rootletctl host ...` end to end: the real `rootletctl` binary against a
//! real `rootletd` (`rootlet_integration_tests::fleet::RealFleet`, one
//! host in its own namespaces), addressed by inventory name (TCP with
//! mutual TLS through the fleet's forwarder) and by its Unix socket.
//! Every command is one process; its exit code, its table and its JSON
//! (parsed, with real values checked: stage names, program ids,
//! generations) are asserted. A `watch --count` runs while a change is
//! made; a `link --lease --hold` keeps a lease alive, stops when the lease
//! is lost (exit 1), and lets it expire when interrupted. `status --watch`
//! follows an agent's Watch stream: no reads while nothing changes (counted
//! by the agent's metrics), one for a change, the host lost and found again.
//!
//! Needs root, and `rootletd` and `rootletctl` built with the same profile
//! as the tests (`cargo build -p rootlet-server -p rootlet-client`); a test
//! fails, saying so, if one is missing.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rootlet_integration_tests::fleet::{RealFleet, sibling_binary};
use serde_json::Value;

/// Longest a single `rootletctl` run may take before it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(120);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\nstderr: {}", self.stdout, self.stderr))
    }

    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

fn rootletctl_bin() -> PathBuf {
    let bin = sibling_binary("rootletctl");
    assert!(
        bin.exists(),
        "{} is missing (cargo build -p rootlet-client --bin rootletctl)",
        bin.display()
    );
    bin
}

/// Runs `rootletctl` with `args` to its end (killed after [`RUN_LIMIT`]).
fn ctl(args: &[&str]) -> Run {
    let mut child = Command::new(rootletctl_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rootletctl");
    let t0 = Instant::now();
    // Bounded by RUN_LIMIT.
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if t0.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("rootletctl output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A `rootletctl` left running, its stdout read line by line.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Background {
    fn start(args: &[&str]) -> Background {
        let mut child = Command::new(rootletctl_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rootletctl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Background { child, lines }
    }

    /// The next line of stdout, within `limit`.
    fn line(&self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Waits (bounded) for the process to exit; its code and stderr.
    fn wait(mut self, limit: Duration) -> (i32, String) {
        let t0 = Instant::now();
        // Bounded by `limit`.
        let status = loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                break Some(s);
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = self.child.wait();
        (status.and_then(|s| s.code()).unwrap_or(-1), err)
    }

    fn signal(&self, sig: Signal) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        kill(Pid::from_raw(pid), sig).expect("signal rootletctl");
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sample objects the other tests use, as files.
fn objects(dir: &Path) -> (String, String, String) {
    let write = |name: &str| {
        let e = rootlet_ebpf::stage(name).expect("embedded object");
        let p = dir.join(format!("{name}.o"));
        std::fs::write(&p, e.object).expect("object file");
        p.display().to_string()
    };
    (write("sampler"), write("sampler_v2"), write("test_pass"))
}

fn stage<'a>(rootlet: &'a Value, name: &str) -> &'a Value {
    rootlet["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage {name} in {rootlet:#}"))
}

fn stage_names(rootlet: &Value) -> Vec<String> {
    rootlet["stages"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn program_id(stage: &Value) -> u64 {
    stage["program"]["id"].as_u64().unwrap_or(0)
}

fn generation(v: &Value) -> u64 {
    v["generation"].as_u64().expect("generation")
}

/// `rootletctl host TARGET [--inventory FILE]` and then `rest`.
fn args<'a>(target: &'a [&'a str], rest: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["host"];
    a.extend_from_slice(target);
    a.extend_from_slice(rest);
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn host_commands_drive_one_agent_over_mtls_and_its_unix_socket() {
    // One host, reached over TCP with mTLS (by inventory name) and over
    // its Unix socket (by address).
    let fleet = RealFleet::start(1, &[0]).await.expect("one agent");
    let inv = fleet.dir.join("hosts.toml");
    std::fs::write(&inv, fleet.inventory_toml()).expect("inventory");
    let inv = inv.display().to_string();
    let sock = format!("unix:{}", fleet.hosts[0].socket.display());
    let by_name: &[&str] = &["host-00", "--inventory", &inv];
    let by_addr: &[&str] = &[&sock];
    let (sampler, sampler_v2, pass) = objects(&fleet.dir);

    // caps: a table, and JSON with the probes.
    let t = ctl(&args(by_name, &["caps"])).ok();
    assert!(
        t.stdout.contains("kernel ") && t.stdout.contains("PROBE"),
        "{}",
        t.stdout
    );
    let caps = ctl(&args(by_name, &["caps", "--output", "json"]))
        .ok()
        .json();
    assert!(
        matches!(caps["backend"].as_str(), Some("freplace" | "tailcall")),
        "{caps:#}"
    );
    assert!(
        caps["probes"].as_array().is_some_and(|p| !p.is_empty()),
        "{caps:#}"
    );

    // Nothing loaded yet: an empty list; rl0 is no rootlet (exit 1, the
    // code and the ErrorInfo reason).
    let list = ctl(&args(by_addr, &["list", "--output", "json"]))
        .ok()
        .json();
    assert_eq!(list, Value::Array(vec![]));
    let t = ctl(&args(by_addr, &["list"])).ok();
    assert_eq!(t.stdout, "no rootlets\n");
    let missing = ctl(&args(by_name, &["get", "rl0"]));
    assert_eq!(missing.code, 1, "{}{}", missing.stdout, missing.stderr);
    assert!(
        missing.stderr.contains("GetRootlet: NOT_FOUND")
            && missing.stderr.contains("reason ROOTLET_NOT_FOUND"),
        "{}",
        missing.stderr
    );
    let missing = ctl(&args(by_addr, &["stats", "rl0", "--output", "json"]));
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    let e = missing.json();
    assert_eq!(e["error"]["code"], "NOT_FOUND", "{e:#}");
    assert_eq!(e["error"]["reason"], "ROOTLET_NOT_FOUND", "{e:#}");
    assert_eq!(e["error"]["rpc"], "GetStats", "{e:#}");

    // load, over mTLS.
    let loaded = ctl(&args(
        by_name,
        &["load", "rl0", "--mode", "generic", "--output", "json"],
    ))
    .ok()
    .json();
    let id = loaded["id"].as_str().expect("id").to_string();
    assert!(
        id.starts_with("netns:") && id.contains("/if:"),
        "{loaded:#}"
    );
    assert_eq!(loaded["interface"], "rl0");
    assert_eq!(loaded["mode"], "generic");
    assert_eq!(loaded["final_verdict"], "pass");
    assert!(program_id(&loaded) > 0, "{loaded:#}");
    assert!(stage_names(&loaded).is_empty());
    let mut gens = vec![generation(&loaded)];

    // A watch of this rootlet, bounded by --count 2: its snapshot, then
    // the link made meanwhile.
    let watch = Background::start(&args(
        by_addr,
        &["watch", &id, "--count", "2", "--output", "json"],
    ));
    let first = watch
        .line(Duration::from_secs(30))
        .expect("the watch's snapshot within 30 s");
    let first: Value = serde_json::from_str(&first).expect("an event as JSON");
    assert_eq!(first["cause"], "snapshot", "{first:#}");
    assert_eq!(first["rootlet_id"], id.as_str());

    // link (by id, JSON), then a second stage (by interface, table).
    let linked = ctl(&args(
        by_name,
        &[
            "link",
            &id,
            "sampler",
            &sampler,
            "--program",
            "sampler",
            "--priority",
            "10",
            "--output",
            "json",
        ],
    ))
    .ok()
    .json();
    gens.push(generation(&linked));
    let r = &linked["rootlet"];
    assert_eq!(stage_names(r), ["sampler"]);
    let s = stage(r, "sampler");
    let sampler_prog = program_id(s);
    assert!(sampler_prog > 0, "{s:#}");
    assert_eq!(s["pinned"], true);
    assert_eq!(s["loaded_generation"].as_u64(), Some(generation(&linked)));
    assert_eq!(linked["lease_id"], "");
    let sampler_digest = s["digest"].as_str().expect("digest").to_string();
    assert_eq!(sampler_digest.len(), 64, "{s:#}");

    // The watch saw the link: its second event, and then it ends by
    // itself (exit 0).
    let second = watch
        .line(Duration::from_secs(30))
        .expect("the link's event within 30 s");
    let second: Value = serde_json::from_str(&second).expect("an event as JSON");
    assert_eq!(second["cause"], "changed", "{second:#}");
    assert_eq!(stage_names(&second["rootlet"]), ["sampler"], "{second:#}");
    assert_eq!(
        generation(&second["rootlet"]),
        generation(&linked),
        "{second:#}"
    );
    let (code, err) = watch.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "watch --count 2 ends by itself: {err}");

    let t = ctl(&args(
        by_addr,
        &[
            "link",
            "rl0",
            "pass",
            &pass,
            "--program",
            "verdict",
            "--priority",
            "20",
            "--proceed-on",
            "pass",
            "--proceed-on",
            "drop",
        ],
    ))
    .ok();
    assert!(
        t.stdout.starts_with("linked stage pass: generation "),
        "{}",
        t.stdout
    );
    assert!(
        t.stdout.contains("STAGE") && t.stdout.contains("sampler"),
        "{}",
        t.stdout
    );

    // get, JSON and table: both stages in pipeline order with programs.
    let got = ctl(&args(by_name, &["get", &id, "--output", "json"]))
        .ok()
        .json();
    gens.push(generation(&got));
    assert_eq!(stage_names(&got), ["sampler", "pass"]);
    // The sampler's build stays (its digest and the generation that loaded
    // it); its program id may not (tail-call: one instance per parity).
    let s = stage(&got, "sampler");
    assert_eq!(s["digest"].as_str(), Some(sampler_digest.as_str()));
    assert_eq!(s["loaded_generation"].as_u64(), Some(gens[1]));
    let sampler_prog = program_id(s);
    assert!(sampler_prog > 0, "{got:#}");
    assert!(program_id(stage(&got, "pass")) > 0, "{got:#}");
    assert_eq!(
        stage(&got, "pass")["proceed_on"],
        serde_json::json!(["drop", "pass"]),
        "{got:#}"
    );
    let t = ctl(&args(by_addr, &["get", "rl0"])).ok();
    assert!(
        t.stdout.starts_with(&format!("rootlet {id} on rl0")),
        "{}",
        t.stdout
    );
    let table_line = t
        .stdout
        .lines()
        .find(|l| l.contains(" sampler "))
        .unwrap_or_else(|| panic!("no sampler row:\n{}", t.stdout));
    assert!(
        table_line.contains(&sampler_prog.to_string()),
        "{table_line}"
    );

    // replace the sampler with its second build: a new build, a new
    // generation.
    let replaced = ctl(&args(
        by_name,
        &[
            "replace",
            &id,
            "sampler",
            &sampler_v2,
            "--program",
            "sampler",
            "--priority",
            "10",
            "--output",
            "json",
        ],
    ))
    .ok()
    .json();
    gens.push(generation(&replaced));
    let s = stage(&replaced["rootlet"], "sampler");
    assert_ne!(s["digest"].as_str(), Some(sampler_digest.as_str()), "{s:#}");
    assert!(program_id(s) > 0, "{s:#}");
    assert_eq!(s["loaded_generation"].as_u64(), Some(generation(&replaced)));
    assert_eq!(stage_names(&replaced["rootlet"]), ["sampler", "pass"]);

    // unpin, pin.
    let unpinned = ctl(&args(
        by_addr,
        &["unpin", &id, "sampler", "--output", "json"],
    ))
    .ok()
    .json();
    gens.push(generation(&unpinned));
    assert_eq!(stage(&unpinned["rootlet"], "sampler")["pinned"], false);
    let pinned = ctl(&args(by_name, &["pin", &id, "sampler", "--output", "json"]))
        .ok()
        .json();
    gens.push(generation(&pinned));
    assert_eq!(stage(&pinned["rootlet"], "sampler")["pinned"], true);

    // stats: every stage's slot, JSON and table.
    let stats = ctl(&args(by_name, &["stats", &id, "--output", "json"]))
        .ok()
        .json();
    assert_eq!(stats["rootlet_id"], id.as_str());
    assert_eq!(stats["generation"].as_u64(), Some(generation(&pinned)));
    let slots: Vec<&str> = stats["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert!(
        slots.contains(&"sampler") && slots.contains(&"pass"),
        "{stats:#}"
    );
    let t = ctl(&args(by_addr, &["stats", "rl0"])).ok();
    assert!(
        t.stdout.contains("SLOT") && t.stdout.contains("sampler"),
        "{}",
        t.stdout
    );

    // list, JSON and table, by both addresses.
    let list = ctl(&args(by_addr, &["list", "--output", "json"]))
        .ok()
        .json();
    let rootlets = list.as_array().expect("an array");
    assert_eq!(rootlets.len(), 1, "{list:#}");
    assert_eq!(rootlets[0]["id"], id.as_str());
    assert_eq!(stage_names(&rootlets[0]), ["sampler", "pass"]);
    let listed = program_id(stage(&rootlets[0], "sampler"));
    assert!(listed > 0, "{list:#}");
    let t = ctl(&args(by_name, &["list"])).ok();
    assert!(
        t.stdout.contains(&id) && t.stdout.contains(&format!("sampler#{listed}")),
        "{}",
        t.stdout
    );

    // unlink.
    let unlinked = ctl(&args(by_addr, &["unlink", &id, "pass", "--output", "json"]))
        .ok()
        .json();
    gens.push(generation(&unlinked));
    assert_eq!(stage_names(&unlinked["rootlet"]), ["sampler"]);

    // Every change made a new generation.
    assert!(
        gens.windows(2).all(|w| w[0] < w[1]),
        "generations do not increase: {gens:?}"
    );

    // A change with a stale expected generation: FAILED_PRECONDITION, exit 1.
    let stale = ctl(&args(
        by_addr,
        &["unpin", &id, "sampler", "--expected-generation", "1"],
    ));
    assert_eq!(stale.code, 1, "{}", stale.stderr);
    assert!(stale.stderr.contains("SetStagePin: "), "{}", stale.stderr);

    // Usage errors: exit 2, nothing sent.
    let bad = ctl(&args(by_name, &["list", "--no-such-flag"]));
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let bad = ctl(&args(&["host-99", "--inventory", &inv], &["list"]));
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("no host \"host-99\""), "{}", bad.stderr);
    let bad = ctl(&args(
        by_addr,
        &["link", &id, "x", "/nonexistent.o", "--program", "x"],
    ));
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let bad = ctl(&args(&["127.0.0.1:1"], &["list"]));
    assert_eq!(
        bad.code, 2,
        "a TCP address without TLS flags: {}",
        bad.stderr
    );

    // unload; then the rootlet is gone.
    let t = ctl(&args(by_name, &["unload", &id])).ok();
    assert_eq!(t.stdout, format!("unloaded rootlet {id}\n"));
    let list = ctl(&args(by_addr, &["list", "--output", "json"]))
        .ok()
        .json();
    assert_eq!(list, Value::Array(vec![]));
    let gone = ctl(&args(by_addr, &["get", &id]));
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("NOT_FOUND"), "{}", gone.stderr);
}

/// One agent, reached by its Unix socket (`unix:PATH`), with a rootlet
/// loaded on rl0 by `rootletctl host ... load` (its JSON).
async fn one_agent_with_rl0() -> (RealFleet, String, Value) {
    let fleet = RealFleet::start(1, &[]).await.expect("one agent");
    let sock = format!("unix:{}", fleet.hosts[0].socket.display());
    let loaded = ctl(&[
        "host", &sock, "load", "rl0", "--mode", "generic", "--output", "json",
    ])
    .ok()
    .json();
    (fleet, sock, loaded)
}

#[tokio::test(flavor = "multi_thread")]
async fn host_link_hold_keeps_a_lease_alive_until_it_is_lost_or_interrupted() {
    let (fleet, sock, loaded) = one_agent_with_rl0().await;
    let t: &[&str] = &[&sock];
    let (_, _, pass) = objects(&fleet.dir);
    let id = loaded["id"].as_str().expect("id").to_string();
    let lease_of = |name: &str| -> Option<String> {
        let got = ctl(&args(t, &["get", &id, "--output", "json"])).ok().json();
        got["stages"].as_array().and_then(|s| {
            s.iter()
                .find(|s| s["name"] == name)
                .map(|s| s["lease_id"].as_str().unwrap_or_default().to_string())
        })
    };
    let hold = |name: &str| {
        Background::start(&args(
            t,
            &[
                "link",
                &id,
                name,
                &pass,
                "--program",
                "verdict",
                "--lease",
                "2s",
                "--hold",
            ],
        ))
    };
    // Bounded wait for `f`.
    let wait_for = |what: &str, limit: Duration, f: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < limit, "{what} within {limit:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // 1. Held: the stage outlives its 2 s lease several times over.
    let held = hold("held");
    let first = held.line(Duration::from_secs(30)).expect("link output");
    assert!(
        first.starts_with("linked stage held: generation "),
        "{first}"
    );
    assert!(first.contains(", lease "), "{first}");
    let lease = lease_of("held").expect("the stage is linked");
    assert!(!lease.is_empty(), "linked with a lease");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lease_of("held").as_deref(),
        Some(lease.as_str()),
        "the held lease is renewed"
    );

    // 2. Lost: unlinking the stage drops its lease; the next renewal is
    // refused and `--hold` exits 1 saying so.
    ctl(&args(t, &["unlink", &id, "held"])).ok();
    let (code, err) = held.wait(Duration::from_secs(20));
    assert_eq!(code, 1, "a lost lease exits 1: {err}");
    assert!(
        err.contains(&format!("lease {lease} of stage held lost")) && err.contains("NOT_FOUND"),
        "{err}"
    );

    // 3. Interrupted: rootletctl stops renewing (exit 0) and the agent
    // unlinks the stage once the lease expires.
    let held = hold("brief");
    let _ = held.line(Duration::from_secs(30)).expect("link output");
    wait_for("the leased stage", Duration::from_secs(10), &|| {
        lease_of("brief").is_some_and(|l| !l.is_empty())
    });
    held.signal(Signal::SIGINT);
    let (code, err) = held.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "Ctrl-C ends the hold: {err}");
    assert!(err.contains("stopped renewing lease"), "{err}");
    wait_for(
        "the agent to unlink the expired stage",
        Duration::from_secs(15),
        &|| lease_of("brief").is_none(),
    );

    // --hold needs --lease: a usage error.
    let bad = ctl(&args(
        t,
        &["link", &id, "x", &pass, "--program", "verdict", "--hold"],
    ));
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    let bad = ctl(&args(
        t,
        &[
            "link",
            &id,
            "x",
            &pass,
            "--program",
            "verdict",
            "--lease",
            "1500ms",
        ],
    ));
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

/// `rootlet_rpc_requests_total{method=M}` of the agent whose metrics are at
/// `addr`, every code added up.
fn rpcs(addr: std::net::SocketAddr, method: &str) -> u64 {
    let body = rootlet_integration_tests::rootletd::scrape(addr).expect("metrics");
    let label = format!("rootlet_rpc_requests_total{{method=\"{method}\",");
    body.lines()
        .filter(|l| l.starts_with(&label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// The next `status --watch --output json` line: the fleet as an array.
fn fleet_line(watch: &Background, limit: Duration, what: &str) -> Vec<Value> {
    let line = watch
        .line(limit)
        .unwrap_or_else(|| panic!("{what}: no update within {limit:?}"));
    match serde_json::from_str(&line) {
        Ok(Value::Array(hosts)) => hosts,
        _ => panic!("{what}: not a JSON array: {line}"),
    }
}

/// `rootletctl status --watch` follows each agent's Watch stream: it shows
/// the fleet once, reads a host again only when its stream says something
/// changed (no ListRootlets while nothing changes, where it used to read
/// every 2 s), shows the change, shows a host whose agent went away as
/// unreachable, and picks the host up again when an agent answers there.
#[tokio::test(flavor = "multi_thread")]
async fn status_watch_follows_the_watch_stream_and_reads_a_host_only_when_it_changes() {
    use rootlet_integration_tests::{api, fixture, fixture::Fixture, rootletd::Daemon};
    let f = Fixture::new();
    let mut d = Daemon::start(&f, fixture::backend()).expect("start rootletd");
    let mut c = d.connect().await.expect("connect");
    let loaded = api::load(&mut c, &f).await;
    // The inventory names a symlink to the socket, so that another agent
    // can take the host's place later.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("agent.sock");
    std::os::unix::fs::symlink(&d.socket, &sock).expect("symlink");
    let inv = dir.path().join("hosts.toml");
    std::fs::write(
        &inv,
        format!(
            "[[hosts]]\nname = \"h1\"\naddress = \"unix:{}\"\n",
            sock.display()
        ),
    )
    .expect("inventory");
    let inv = inv.display().to_string();
    let watch = Background::start(&[
        "status",
        "-i",
        &inv,
        "--watch",
        "--watch-timeout",
        "300s",
        "--output",
        "json",
    ]);
    let first = fleet_line(&watch, Duration::from_secs(30), "the first read");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["reachable"], true, "{first:?}");
    let r = &first[0]["rootlets"][0];
    assert_eq!(r["generation"].as_u64(), Some(loaded.generation), "{r:#}");
    assert_eq!(r["stages"], Value::Array(vec![]), "{r:#}");

    // Nothing changes: the stream's snapshot is read once (and shows
    // nothing new), then no read and no line for three of the old poll
    // intervals.
    assert!(
        watch.line(Duration::from_secs(3)).is_none(),
        "an update while nothing changed"
    );
    let quiet = rpcs(d.metrics, "ListRootlets");
    assert!(
        watch.line(Duration::from_secs(6)).is_none(),
        "an update while nothing changed"
    );
    assert_eq!(
        rpcs(d.metrics, "ListRootlets"),
        quiet,
        "the watch read the host while nothing changed: it polls"
    );

    // A change: a stage linked. The watch shows it, from one read.
    let (sampler, _, _) = objects(dir.path());
    let agent = format!("unix:{}", d.socket.display());
    let linked = ctl(&[
        "host",
        &agent,
        "link",
        &loaded.id,
        "sampler",
        &sampler,
        "--program",
        "sampler",
        "--priority",
        "10",
        "--output",
        "json",
    ])
    .ok()
    .json();
    let after = fleet_line(&watch, Duration::from_secs(30), "the link");
    let r = &after[0]["rootlets"][0];
    assert_eq!(stage_names(r), ["sampler"], "{r:#}");
    assert_eq!(r["generation"].as_u64(), Some(generation(&linked)), "{r:#}");
    let reads = rpcs(d.metrics, "ListRootlets") - quiet;
    assert!(
        (1..=3).contains(&reads),
        "{reads} reads of the host for one change"
    );

    // The agent goes away: the host is shown unreachable, with why.
    let pid = i32::try_from(d.child.id()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill rootletd");
    let lost = fleet_line(&watch, Duration::from_secs(30), "the agent's end");
    assert_eq!(lost[0]["reachable"], false, "{lost:?}");
    let why = lost[0]["error"].as_str().unwrap_or_default();
    assert!(why.starts_with("watch: "), "{lost:?}");
    assert_eq!(lost[0]["rootlets"], Value::Array(vec![]), "{lost:?}");

    // Another agent answers at the host's address: the stream is opened
    // again (with backoff) and the host is read, its empty agent shown.
    let f2 = Fixture::new();
    let mut d2 = Daemon::start(&f2, fixture::backend()).expect("start rootletd");
    d2.connect().await.expect("connect");
    std::fs::remove_file(&sock).expect("unlink the symlink");
    std::os::unix::fs::symlink(&d2.socket, &sock).expect("symlink");
    // Bounded: one update per reconnect attempt (at most a handful of
    // "lost" lines, whose reason may change), within 60 s.
    let t0 = Instant::now();
    let back = loop {
        let hosts = fleet_line(&watch, Duration::from_secs(30), "the new agent");
        if hosts[0]["reachable"] == true {
            break hosts;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{hosts:?}");
    };
    assert_eq!(back[0]["error"], Value::Null, "{back:?}");
    assert_eq!(back[0]["rootlets"], Value::Array(vec![]), "{back:?}");

    // Interrupted, the watch exits with the last state's code: 0.
    watch.signal(Signal::SIGINT);
    let (code, err) = watch.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{err}");
}

/// `rootletctl host T rollback` (RollbackRootlet): with nothing kept, exit
/// 1 with the reason (table and JSON); after a replace, back to the
/// previous build as a new generation, said to be instant (tail-call);
/// again, forward to the replacement (the generation before is kept each
/// time). freplace keeps nothing: every rollback exits 1 with
/// NO_INSTANT_ROLLBACK.
#[tokio::test(flavor = "multi_thread")]
async fn host_rollback_returns_a_rootlet_to_its_previous_generation() {
    let (fleet, sock, loaded) = one_agent_with_rl0().await;
    let t: &[&str] = &[&sock];
    let (sampler, sampler_v2, _) = objects(&fleet.dir);
    let id = loaded["id"].as_str().expect("id").to_string();
    let freplace =
        ctl(&args(t, &["caps", "--output", "json"])).ok().json()["backend"] == "freplace";

    // Nothing kept yet: exit 1, the RPC, code and reason; nothing changed.
    let none = ctl(&args(t, &["rollback", &id]));
    assert_eq!(none.code, 1, "{}{}", none.stdout, none.stderr);
    assert!(
        none.stderr.contains("RollbackRootlet: FAILED_PRECONDITION")
            && none.stderr.contains("reason NO_INSTANT_ROLLBACK"),
        "{}",
        none.stderr
    );
    let none = ctl(&args(t, &["rollback", &id, "--output", "json"]));
    assert_eq!(none.code, 1, "{}", none.stderr);
    let e = none.json();
    assert_eq!(e["error"]["rpc"], "RollbackRootlet", "{e:#}");
    assert_eq!(e["error"]["reason"], "NO_INSTANT_ROLLBACK", "{e:#}");
    let got = ctl(&args(t, &["get", &id, "--output", "json"])).ok().json();
    assert_eq!(generation(&got), generation(&loaded), "nothing changed");

    let link = |object: &str, verb: &str| {
        ctl(&args(
            t,
            &[
                verb,
                &id,
                "sampler",
                object,
                "--program",
                "sampler",
                "--output",
                "json",
            ],
        ))
        .ok()
        .json()
    };
    let linked = link(&sampler, "link");
    let v1 = stage(&linked["rootlet"], "sampler")["digest"].clone();
    let replaced = link(&sampler_v2, "replace");
    let v2 = stage(&replaced["rootlet"], "sampler")["digest"].clone();
    assert_ne!(v1, v2);

    let back = ctl(&args(t, &["rollback", &id, "--output", "json"]));
    if freplace {
        assert_eq!(back.code, 1, "{}", back.stderr);
        assert_eq!(back.json()["error"]["reason"], "NO_INSTANT_ROLLBACK");
        return;
    }
    let back = back.ok().json();
    assert_eq!(back["how"], "instant", "{back:#}");
    assert_eq!(generation(&back), generation(&replaced) + 1, "{back:#}");
    assert_eq!(
        back["restored_generation"].as_u64(),
        Some(generation(&linked))
    );
    let s = stage(&back["rootlet"], "sampler");
    assert_eq!(s["digest"], v1, "the first build runs again: {s:#}");
    assert_eq!(s["loaded_generation"].as_u64(), Some(generation(&linked)));
    assert!(program_id(s) > 0, "{s:#}");
    // What the agent reads back from the kernel says the same.
    let got = ctl(&args(t, &["get", &id, "--output", "json"])).ok().json();
    assert_eq!(generation(&got), generation(&back));
    assert_eq!(stage(&got, "sampler")["digest"], v1, "{got:#}");

    // The table, by interface name: forward again to the replacement.
    let fwd = ctl(&args(t, &["rollback", "rl0"])).ok();
    let want = format!(
        "rolled back rootlet rl0: generation {} runs generation {}'s pipeline (instant)\n",
        generation(&back) + 1,
        generation(&replaced)
    );
    assert!(fwd.stdout.starts_with(&want), "{}", fwd.stdout);
    assert!(
        fwd.stdout.contains("STAGE") && fwd.stdout.contains("sampler"),
        "{}",
        fwd.stdout
    );
    let got = ctl(&args(t, &["get", &id, "--output", "json"])).ok().json();
    assert_eq!(stage(&got, "sampler")["digest"], v2, "{got:#}");

    // A stale expected generation: exit 1, nothing changed.
    let stale = ctl(&args(t, &["rollback", &id, "--expected-generation", "1"]));
    assert_eq!(stale.code, 1, "{}", stale.stderr);
    assert!(
        stale.stderr.contains("RollbackRootlet: "),
        "{}",
        stale.stderr
    );
    let after = ctl(&args(t, &["get", &id, "--output", "json"])).ok().json();
    assert_eq!(generation(&after), generation(&got));
}
