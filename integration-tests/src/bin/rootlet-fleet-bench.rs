//! `rootlet-fleet-bench`: what the fleet client (`rootletctl rollout`)
//! costs at scale. It prints figures and asserts nothing about speed.
//!
//! 1. **1000 simulated agents** on loopback: a child process serves N
//!    in-memory agents (`rootlet_client_sim`: the rootlet.v1 API and
//!    health, with a SIMULATED data plane: no kernel, no eBPF, no signature
//!    checks), each on its own 127.0.0.1 port. Another child process runs
//!    `rootletctl rollout start` (the same code as the binary) against all
//!    of them: a canary of 1 host, then three waves (33%, 33%, 34%), soak
//!    0, gates on health, apply status and per-stage aborted rate. Then a
//!    second rollout (the hosts now have a previous version to record),
//!    and `rollout undo` of it. The client reports its own wall time,
//!    control-plane time and RPC count; its peak resident memory is its
//!    own `VmHWM`, measured apart from the agents.
//! 2. **8 real agents** (`rootlet_integration_tests::fleet`): each
//!    `rootletd` in its own namespaces with its own veth pair and traffic;
//!    the same plan with the sample bundle. Needs root and `rootletd` built
//!    with the same profile; skipped (and said so) otherwise.
//!
//! ```sh
//! cargo build --release -p rootlet-server --bin rootletd
//! cargo build --release -p rootlet-integration-tests --bin rootlet-fleet-bench
//! ./target/release/rootlet-fleet-bench            # --agents 1000 --real 8
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use serde_json::Value;

/// The longest simulated agents wait for the benchmark to finish with
/// them (they stop as soon as its end closes their stdin).
const OVERALL: Duration = Duration::from_secs(3600);
/// The longest one rollout may take: 180 s, plus 3 ms per host past the
/// first thousand (see `rollout_timeout`).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);

/// [`ROLLOUT_TIMEOUT`] for a fleet of `hosts`.
fn rollout_timeout(hosts: usize) -> Duration {
    ROLLOUT_TIMEOUT + Duration::from_millis(3 * hosts.saturating_sub(1000) as u64)
}

#[derive(Parser)]
#[command(about = "The cost of fleet rollouts to many agents (prints figures)")]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    agents: u32,
    /// Real agents (0: skip).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=32))]
    real: u32,
    /// Hosts in flight at once (rootletctl --concurrency).
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Subcommand)]
enum Mode {
    /// (internal) Serve simulated agents; print their addresses.
    SimAgents {
        #[arg(long)]
        count: u32,
        /// The fleet index of this process's first agent (its address:
        /// 127.0.0.1 + index / AGENTS_PER_IP).
        #[arg(long, default_value_t = 0)]
        first: u32,
        /// `REFERENCE=FILE`: make FILE's bundle pullable by every simulated
        /// agent as REFERENCE (repeatable).
        #[arg(long)]
        publish: Vec<String>,
    },
    /// (internal) Run rootletctl with these arguments; report peak memory.
    Client {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.mode {
        Some(Mode::SimAgents {
            count,
            first,
            publish,
        }) => sim_agents(count, first, &publish),
        Some(Mode::Client { args }) => {
            // The client runs within the usual default soft limit of open
            // files (1024), whatever the fleet's size: its descriptors must
            // grow with the concurrency, not the hosts.
            if let Err(e) = limit_files(CLIENT_FILES) {
                eprintln!("cannot limit the client's open files: {e}");
                return ExitCode::FAILURE;
            }
            let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            {
                let peak = peak.clone();
                // Samples the open descriptors every 20 ms until exit.
                std::thread::spawn(move || {
                    loop {
                        let n = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
                        peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                });
            }
            let code = rootlet_client::cli::run_from(
                std::iter::once("rootletctl".to_string()).chain(args),
            );
            eprintln!(
                "BENCH_CLIENT vmhwm_kb={} max_fds={}",
                vm_hwm_kb().unwrap_or(0),
                peak.load(std::sync::atomic::Ordering::Relaxed)
            );
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        None => match orchestrate(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rootlet-fleet-bench: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The client's soft limit of open files: the common default.
const CLIENT_FILES: u64 = 1024;
/// Simulated agents per loopback address (each listens on a port of it).
const AGENTS_PER_IP: u32 = 20_000;
/// Simulated agents per process: each needs a descriptor per agent, and a
/// hard limit of 20 000 open files (this machine's) cannot be raised
/// without CAP_SYS_RESOURCE.
const AGENTS_PER_PROCESS: u32 = 15_000;

/// Sets this process's soft limit of open files to `n` (the hard limit
/// stays, or is raised to `n` where it is lower: root may).
fn limit_files(n: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    setrlimit(Resource::RLIMIT_NOFILE, n, hard.max(n)).map_err(|e| e.to_string())
}

/// This process's peak resident set size, in KiB.
fn vm_hwm_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Serves `count` simulated agents until stdin closes (or ten minutes); a
/// line `REPORT` on stdin prints their counts so far on stdout.
fn sim_agents(count: u32, first: u32, publish: &[String]) -> ExitCode {
    for p in publish {
        let Some((reference, file)) = p.split_once('=') else {
            eprintln!("--publish {p}: expected REFERENCE=FILE");
            return ExitCode::FAILURE;
        };
        match std::fs::read(file) {
            Ok(bytes) => rootlet_client_sim::publish(reference, &bytes),
            Err(e) => {
                eprintln!("--publish {p}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A listening socket per agent, and a connection each while the client
    // talks to it: this process (not the client) needs more files.
    if let Err(e) = limit_files(u64::from(count) + 4096) {
        eprintln!(
            "cannot raise the simulator's open files to {}: {e}",
            count + 4096
        );
        return ExitCode::FAILURE;
    }
    rt.block_on(async move {
        let mut handles = Vec::with_capacity(count as usize);
        for i in 0..count {
            // 127.0.0.1, then 127.0.0.2, ...: AGENTS_PER_IP each.
            let ip = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::LOCALHOST) + (first + i) / AGENTS_PER_IP,
            );
            match rootlet_client_sim::spawn_on(ip, rootlet_client_sim::SimOptions { pps: 0 }).await
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    eprintln!("simulated agent: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let mut out = std::io::stdout().lock();
        for h in &handles {
            let _ = writeln!(out, "{}", h.addr);
        }
        let _ = writeln!(out, "READY");
        let _ = out.flush();
        drop(out);
        // Until the parent closes our stdin (bounded: ten minutes).
        let agents: Vec<rootlet_client_sim::SimAgent> =
            handles.iter().map(|h| h.agent.clone()).collect();
        let stdin_closed = tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "REPORT" {
                    let sum = |f: fn(&rootlet_client_sim::SimAgent) -> u64| -> u64 {
                        agents.iter().map(f).sum()
                    };
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "REPORT apply_bytes={} uploads={} pulls={}",
                        sum(rootlet_client_sim::SimAgent::apply_bytes),
                        sum(rootlet_client_sim::SimAgent::uploads),
                        sum(rootlet_client_sim::SimAgent::pulls),
                    );
                    let _ = out.flush();
                }
            }
        });
        let _ = tokio::time::timeout(OVERALL, stdin_closed).await;
        let served: u64 = handles.iter().map(|h| h.agent.rpcs()).sum();
        eprintln!(
            "BENCH_SIM rpcs={served} vmhwm_kb={}",
            vm_hwm_kb().unwrap_or(0)
        );
        ExitCode::SUCCESS
    })
}

/// What one client run reported.
#[derive(Debug, Default)]
struct Run {
    label: String,
    exit: i32,
    state: String,
    wall: Duration,
    client_wall_ms: u64,
    control_plane_ms: u64,
    rpcs: u64,
    vmhwm_kb: u64,
    /// The client's most open files at once (sampled every 20 ms).
    max_fds: u64,
    hosts: usize,
    /// What the simulated agents received in ApplyBundle requests during
    /// this run (encoded bytes), and how many carried the bundle's bytes
    /// or named it by reference; None where not counted (real agents).
    sent: Option<Sent>,
}

/// ApplyBundle traffic from the pusher to the simulated agents.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    apply_bytes: u64,
    uploads: u64,
    pulls: u64,
}

impl Sent {
    fn since(self, before: Sent) -> Sent {
        Sent {
            apply_bytes: self.apply_bytes.saturating_sub(before.apply_bytes),
            uploads: self.uploads.saturating_sub(before.uploads),
            pulls: self.pulls.saturating_sub(before.pulls),
        }
    }
}

/// One process of simulated agents: its stdin (for `REPORT`) and stdout.
struct SimProc {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

/// The processes serving the simulated agents.
struct Sims {
    procs: Vec<SimProc>,
}

impl SimProc {
    fn report(&mut self) -> Result<Sent, String> {
        writeln!(self.stdin, "REPORT").map_err(|e| format!("simulated agents: {e}"))?;
        self.stdin
            .flush()
            .map_err(|e| format!("simulated agents: {e}"))?;
        let line = match self.lines.next() {
            Some(Ok(l)) => l,
            _ => return Err("the simulated agents did not report".into()),
        };
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Sent {
            apply_bytes: field("apply_bytes"),
            uploads: field("uploads"),
            pulls: field("pulls"),
        })
    }
}

impl Sims {
    /// The agents' counts so far, over every process.
    fn report(&mut self) -> Result<Sent, String> {
        let mut all = Sent::default();
        for p in &mut self.procs {
            let x = p.report()?;
            all.apply_bytes += x.apply_bytes;
            all.uploads += x.uploads;
            all.pulls += x.pulls;
        }
        Ok(all)
    }

    /// `client(…)` with the agents' counts taken around it.
    fn run(&mut self, label: &str, args: &[String], hosts: usize) -> Result<Run, String> {
        let before = self.report()?;
        let mut run = client(label, args, hosts)?;
        run.sent = Some(self.report()?.since(before));
        Ok(run)
    }
}

impl Run {
    fn rps(&self) -> f64 {
        let ms = self.client_wall_ms.max(1);
        self.rpcs as f64 * 1000.0 / ms as f64
    }
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("current exe: {e}"))
}

/// Runs `rootletctl <args>` in a child process of this binary.
fn client(label: &str, args: &[String], hosts: usize) -> Result<Run, String> {
    let t0 = Instant::now();
    // ROOTLET_FLEET_BENCH_CLIENT_WRAPPER: a profiler to run the client under
    // (`heaptrack -o /tmp/client`, `valgrind --tool=massif`), split on
    // spaces; the figures then include the profiler's own cost.
    let wrapper = std::env::var("ROOTLET_FLEET_BENCH_CLIENT_WRAPPER").unwrap_or_default();
    let mut words: Vec<String> = wrapper.split_whitespace().map(str::to_string).collect();
    words.push(s(&exe()?));
    let mut child = Command::new(&words[0])
        .args(&words[1..])
        .arg("client")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn client: {e}"))?;
    let out = wait_output(&mut child, rollout_timeout(hosts))?;
    let wall = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.1);
    let figure = |name: &str| -> u64 {
        stderr
            .lines()
            .filter_map(|l| l.strip_prefix("BENCH_CLIENT "))
            .flat_map(str::split_whitespace)
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let vmhwm_kb = figure("vmhwm_kb");
    let max_fds = figure("max_fds");
    let v: Value = serde_json::from_slice(&out.0).map_err(|e| {
        format!(
            "{label}: the client printed no JSON summary ({e}); stderr:\n{stderr}\nstdout:\n{}",
            String::from_utf8_lossy(&out.0)
        )
    })?;
    Ok(Run {
        label: label.to_string(),
        exit: out.2,
        state: v["state"].as_str().unwrap_or("?").to_string(),
        wall,
        client_wall_ms: v["wall_ms"].as_u64().unwrap_or(0),
        control_plane_ms: v["control_plane_ms"].as_u64().unwrap_or(0),
        rpcs: v["rpcs"].as_u64().unwrap_or(0),
        vmhwm_kb,
        max_fds,
        hosts,
        sent: None,
    })
}

/// Waits for a child (killing it after `limit`); its stdout, stderr and
/// exit code.
fn wait_output(child: &mut Child, limit: Duration) -> Result<(Vec<u8>, Vec<u8>, i32), String> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stdout {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("a child ran longer than {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    Ok((out, err, status.code().unwrap_or(-1)))
}

/// Runs the client once: (label, arguments, hosts).
type RunClient<'a> = dyn FnMut(&str, &[String], usize) -> Result<Run, String> + 'a;

/// `rollout undo` of journal `j`, pushed to `runs` with its own part of
/// the control-plane time (the journal's figure is cumulative).
fn undo(
    runs: &mut Vec<Run>,
    fleet: &str,
    j: &Path,
    hosts: usize,
    run_client: &mut RunClient<'_>,
) -> Result<(), String> {
    let before = runs.last().map_or(0, |r| r.control_plane_ms);
    let args = ["rollout", "undo", "--journal", &s(j), "--output", "json"].map(String::from);
    let mut run = run_client(
        &format!("{fleet}: rollout undo (back to 1.0.0)"),
        &args,
        hosts,
    )?;
    run.control_plane_ms = run.control_plane_ms.saturating_sub(before);
    runs.push(run);
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn rollout_args(
    inv: &Path,
    plan: &Path,
    bundle: &Path,
    journal: &Path,
    concurrency: u32,
) -> Vec<String> {
    rollout_of(inv, plan, &s(bundle), journal, concurrency)
}

/// `rollout start` of `bundle`: a file, or a reference pinned by digest.
fn rollout_of(
    inv: &Path,
    plan: &Path,
    bundle: &str,
    journal: &Path,
    concurrency: u32,
) -> Vec<String> {
    vec![
        "rollout".into(),
        "start".into(),
        "--inventory".into(),
        s(inv),
        "--plan".into(),
        s(plan),
        "--bundle".into(),
        bundle.to_string(),
        "--journal".into(),
        s(journal),
        "--concurrency".into(),
        concurrency.to_string(),
        "--output".into(),
        "json".into(),
    ]
}

const PLAN: &str = r#"# canary 1, then 33%, 33%, 34%; no soak
soak = "0s"
max_unavailable = 0
canary = { hosts = 1 }
[[waves]]
percent = 33
[[waves]]
percent = 33
[[waves]]
percent = 34
[gates]
health = true
apply = true
[[gates.counters]]
stage = "*"
metric = "aborted_rate"
max = 0.001
min_packets = 100
"#;

fn orchestrate(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("rootlet-fleet-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let d = dir.path();
    let plan = d.join("plan.toml");
    std::fs::write(&plan, PLAN).map_err(|e| e.to_string())?;
    let key = d.join("release.key");
    rootlet_bundle::keygen(&key, d.join("release.pub")).map_err(|e| e.to_string())?;
    let v1 = rootlet_integration_tests::fleet::sample_bundle(d, "1.0.0", false, Some(&key))
        .map_err(|e| e.to_string())?;
    let v2 = rootlet_integration_tests::fleet::sample_bundle_objects(
        d,
        "1.1.0",
        false,
        true,
        Some(&key),
    )
    .map_err(|e| e.to_string())?;
    // 1.2.0 (the v2 objects again, a new version): the upgrade by
    // reference, from a real registry on loopback (the client pulls it
    // once; the simulated agents resolve it from their process's copy).
    let v3 = rootlet_integration_tests::fleet::sample_bundle_objects(
        d,
        "1.2.0",
        false,
        true,
        Some(&key),
    )
    .map_err(|e| e.to_string())?;
    let pki = rootlet_integration_tests::pki::Pki::new();
    let registry = rootlet_integration_tests::registry::TestRegistry::start(&pki);
    let pushed = match &registry {
        Ok(reg) => Some(push_reference(reg, &pki, &v3)?),
        Err(e) => {
            println!("SKIPPED the rollout by reference: no registry ({e})");
            None
        }
    };
    let size = std::fs::metadata(&v1).map(|m| m.len()).unwrap_or(0);
    println!(
        "rootlet-fleet-bench: bundle edge ({size} bytes: sampler, ddos, l4lb; 1.1.0 has new sampler and ddos programs), plan: canary 1 + waves 33%/33%/34%, soak 0, concurrency {}",
        args.concurrency
    );
    println!(
        "cpus: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Simulated agents.
    let n = args.agents as usize;
    println!(
        "\n== {n} agents with a SIMULATED data plane (in-memory rootlet.v1 API; no kernel, no eBPF), on 127.0.0.1"
    );
    let mut addrs = Vec::with_capacity(n);
    let mut procs = Vec::new();
    let t0 = Instant::now();
    let mut first = 0u32;
    while (first as usize) < n {
        let count = (n as u32 - first).min(AGENTS_PER_PROCESS);
        let mut sim_cmd = Command::new(exe()?);
        sim_cmd.args([
            "sim-agents",
            "--count",
            &count.to_string(),
            "--first",
            &first.to_string(),
        ]);
        if let Some(r) = &pushed {
            sim_cmd.arg("--publish").arg(format!("{r}={}", s(&v3)));
        }
        let mut child = sim_cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn simulated agents: {e}"))?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        // Bounded by the count of agents (+1 for READY).
        for _ in 0..=count {
            match lines.next() {
                Some(Ok(l)) if l == "READY" => break,
                Some(Ok(l)) => addrs.push(l),
                _ => {
                    let err = wait_output(&mut child, Duration::from_secs(5))
                        .map(|o| String::from_utf8_lossy(&o.1).into_owned())
                        .unwrap_or_default();
                    return Err(format!("the simulated agents did not start: {err}"));
                }
            }
        }
        let stdin = child.stdin.take().ok_or("no stdin")?;
        procs.push(SimProc {
            child,
            stdin,
            lines,
        });
        first += count;
    }
    println!(
        "started {} simulated agents in {} process(es) in {:.1}s",
        addrs.len(),
        procs.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut inv = String::new();
    for (i, a) in addrs.iter().enumerate() {
        inv.push_str(&format!(
            "[[hosts]]\nname = \"sim-{i:04}\"\naddress = \"{a}\"\ninsecure = true\nlabels = {{ zone = \"{}\", role = \"edge\" }}\n",
            ["a", "b", "c"][i % 3]
        ));
    }
    let inventory = d.join("sim-inventory.toml");
    std::fs::write(&inventory, inv).map_err(|e| e.to_string())?;
    let j = d.join("sim-journal.json");
    let mut runs = Vec::new();
    let mut sims = Sims { procs };
    runs.push(sims.run(
        &format!("sim {n}: rollout 1.0.0 (first install)"),
        &rollout_args(&inventory, &plan, &v1, &j, args.concurrency),
        n,
    )?);
    runs.push(sims.run(
        &format!("sim {n}: rollout 1.1.0 (upgrade, bytes)"),
        &rollout_args(&inventory, &plan, &v2, &j, args.concurrency),
        n,
    )?);
    undo(&mut runs, &format!("sim {n}"), &j, n, &mut |l, a, h| {
        sims.run(l, a, h)
    })?;
    // (`registry` serves until the end of this function.)
    if let Some(r) = &pushed {
        runs.push(
            sims.run(
                &format!("sim {n}: rollout 1.2.0 (upgrade, by reference)"),
                &[
                    rollout_of(&inventory, &plan, r, &j, args.concurrency),
                    vec!["--registry-ca".into(), s(pki.ca_path())],
                ]
                .concat(),
                n,
            )?,
        );
    }
    // The agents' own figures, then stop them.
    for (i, p) in sims.procs.into_iter().enumerate() {
        let SimProc {
            mut child, stdin, ..
        } = p;
        drop(stdin);
        let out = wait_output(&mut child, Duration::from_secs(30)).unwrap_or_default();
        let err = String::from_utf8_lossy(&out.1);
        if let Some(line) = err.lines().find(|l| l.starts_with("BENCH_SIM")) {
            println!("simulated agents, process {i} (not the client): {line}");
        }
    }

    // 2. Real agents.
    if args.real > 0 {
        let m = args.real as usize;
        println!(
            "\n== {m} real rootletd agents, each in its own network namespace with a veth pair and traffic"
        );
        match real(m, d, &plan, &v1, &v2, args.concurrency) {
            Ok(mut r) => runs.append(&mut r),
            Err(e) => println!("SKIPPED the real agents: {e}"),
        }
    }

    println!(
        "\n{:<48} {:>6} {:>12} {:>10} {:>10} {:>8} {:>9} {:>10} {:>8} {:>26}  client peak RSS",
        "run",
        "hosts",
        "state",
        "wall",
        "client",
        "ctl-plane",
        "RPCs",
        "RPC/s",
        "max fds",
        "ApplyBundle bytes sent"
    );
    for r in &runs {
        let sent = r.sent.map_or_else(
            || "-".to_string(),
            |x| {
                format!(
                    "{:.1} MiB ({}u/{}r)",
                    x.apply_bytes as f64 / (1024.0 * 1024.0),
                    x.uploads,
                    x.pulls
                )
            },
        );
        println!(
            "{:<48} {:>6} {:>12} {:>9.2}s {:>9.2}s {:>8.2}s {:>9} {:>10.0} {:>8} {:>26}  {:.1} MiB (exit {})",
            r.label,
            r.hosts,
            r.state,
            r.wall.as_secs_f64(),
            r.client_wall_ms as f64 / 1000.0,
            r.control_plane_ms as f64 / 1000.0,
            r.rpcs,
            r.rps(),
            r.max_fds,
            sent,
            r.vmhwm_kb as f64 / 1024.0,
            r.exit
        );
    }
    println!(
        "\nwall: the client process, start to exit; client: the rollout as rootletctl measures it; ctl-plane: time in prepare, push, gate and rollback phases (no soak, no pauses); ApplyBundle bytes sent: the encoded requests the simulated agents received during the run, with how many carried the bundle (u) or its reference (r); the by-reference run also pulls the bundle once into the client; max fds: the client's most open files at once, under a soft limit of {CLIENT_FILES}.\ntotal benchmark time {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn real(
    m: usize,
    d: &Path,
    plan: &Path,
    v1: &Path,
    v2: &Path,
    concurrency: u32,
) -> Result<Vec<Run>, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut fleet = rt
        .block_on(rootlet_integration_tests::fleet::RealFleet::start(
            m,
            &[m / 2],
        ))
        .map_err(|e| e.to_string())?;
    fleet.start_traffic(1000).map_err(|e| e.to_string())?;
    // Bundles signed with the fleet's key.
    let b1 = fleet
        .sample_bundle("1.0.0", false)
        .map_err(|e| e.to_string())?;
    let b2 = fleet.sample_bundle_v2("1.1.0").map_err(|e| e.to_string())?;
    let _ = (v1, v2);
    let inventory = d.join("real-inventory.toml");
    std::fs::write(&inventory, fleet.inventory_toml()).map_err(|e| e.to_string())?;
    let j = d.join("real-journal.json");
    let mut runs = Vec::new();
    runs.push(client(
        &format!("real {m}: rollout 1.0.0 (first install)"),
        &rollout_args(&inventory, plan, &b1, &j, concurrency),
        m,
    )?);
    runs.push(client(
        &format!("real {m}: rollout 1.1.0 (upgrade)"),
        &rollout_args(&inventory, plan, &b2, &j, concurrency),
        m,
    )?);
    undo(&mut runs, &format!("real {m}"), &j, m, &mut client)?;
    drop(fleet);
    Ok(runs)
}

/// Pushes `bundle` to `reg`; the reference pinned by digest.
fn push_reference(
    reg: &rootlet_integration_tests::registry::TestRegistry,
    pki: &rootlet_integration_tests::pki::Pki,
    bundle: &Path,
) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let args = rootlet_client::cli::RegistryArgs {
        ca: Some(pki.ca_path().to_path_buf()),
        credentials: None,
    };
    let out = rt
        .block_on(rootlet_client::registry_cmd::push(
            bundle,
            &format!("{}/bench/edge:1.2.0", reg.host()),
            &args,
        ))
        .map_err(|e| format!("push to the registry: {e}"))?;
    out.lines()
        .find(|l| l.contains("@sha256:"))
        .map(str::to_string)
        .ok_or_else(|| format!("push printed no pinned reference: {out}"))
}
