//! `rootlet-bench`: prints what a rootlet costs, for one backend. Figures
//! only: nothing here asserts on speed.
//!
//! ```text
//! rootlet-bench --backend freplace|tailcall [--repeat N] [--runs R]
//!               [--replacements M] [--multi K]
//! ```
//!
//! 1. Per-packet cost (BPF_PROG_TEST_RUN, `--repeat` repetitions per run,
//!    median of `--runs` runs of the kernel-reported mean ns per repetition)
//!    of a live rootlet with 0, 1, 3 and 10 trivial stages (`test_pass`),
//!    against `BENCH_MONO` (the rootlet's logic with N trivial stages
//!    inlined in one program) and, for the tail-call backend, a bare
//!    hand-written chain of N tail calls (`BENCH_BARE_CHAIN`).
//! 2. Wall-clock latency of `--replacements` one-stage replacements
//!    (`Dataplane::apply`) on a rootlet with 3 stages.
//! 3. Instructions the verifier processed for one such replacement, against
//!    rebuilding the monolithic program with 3 and 10 stages.
//! 4. Tail-call backend: latency of one apply() that replaces 3 stages at
//!    once (`--multi` times), against a one-stage replacement.
//!
//! It runs as root, in fresh network namespaces (the integration tests'
//! [`Fixture`]), with its own bpffs directories, all removed at exit.

use std::{
    error::Error,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use aya::{Ebpf, EbpfLoader, programs::Xdp};
use clap::Parser;
use rootlet_dataplane::{
    Config, Dataplane,
    spec::{BackendChoice, Change, RootletKey, StageSpec, XdpMode},
    sys,
};
use rootlet_integration_tests::fixture::{Fixture, stage};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const XDP_PASS: u32 = 2;
/// Stage counts of the per-packet comparison.
const STAGE_COUNTS: [u32; 4] = [0, 1, 3, 10];
/// The two objects a replaced stage alternates between.
const OBJECTS: [&str; 2] = ["sampler_v2", "test_pass"];

#[derive(Parser)]
#[command(about = "Prints what a Rootlet costs per packet and per change, for one backend")]
struct Args {
    /// freplace or tailcall.
    #[arg(long, value_parser = ["freplace", "tailcall"])]
    backend: String,
    /// BPF_PROG_TEST_RUN repetitions per run.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    repeat: u32,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=101))]
    runs: u32,
    /// One-stage replacements to time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    replacements: u32,
    /// Three-stage replacements to time (tail-call backend only).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    multi: u32,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rootlet-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let backend = match args.backend.as_str() {
        "freplace" => BackendChoice::Freplace,
        _ => BackendChoice::TailCall,
    };
    let tailcall = backend == BackendChoice::TailCall;
    let env = Environment::detect();
    print_header(args, &env);

    let f = Fixture::new();
    let scratch = BpffsDir::new()?;
    let dp = Dataplane::open(Config {
        backend,
        ..f.config()
    })?;
    let key = dp.load_rootlet(f.rootlet_spec(XdpMode::Auto))?;
    let got = dp.state(key)?.backend.to_string();
    if got != args.backend {
        return Err(format!("asked for backend {}, got {got}", args.backend).into());
    }
    // 14 + 20 + 8 + 22 = 64 bytes, peer to host, UDP port 9 (discard).
    let packet = f.pair.udp_to_host(40000, 9, vec![0; 22]).to_bytes();
    if packet.len() != 64 {
        return Err(format!("the test frame is {} bytes, not 64", packet.len()).into());
    }

    let per_packet = per_packet(args, &dp, key, &scratch, &packet, tailcall)?;
    print_per_packet(args, &per_packet, tailcall);

    // Back to 3 stages for the change measurements.
    let unlink: Vec<Change> = (3..10)
        .map(|i| Change::Unlink {
            name: format!("s{i}"),
        })
        .collect();
    dp.apply(key, &unlink, None)?;

    let single = single_replacements(args, &dp, key)?;
    print_single(args, &single, &per_packet, tailcall);
    if tailcall {
        let multi = multi_replacements(args, &dp, key)?;
        print_multi(args, &single, &multi);
    } else {
        println!();
        println!("4. Multi-slot atomic switch: measured for the tail-call backend only.");
    }

    dp.unload_rootlet(key)?;
    Ok(())
}

// ---------------------------------------------------------------- environment

struct Environment {
    kernel: String,
    arch: &'static str,
    cpu_model: String,
    cpus: usize,
    hypervisor_flag: bool,
    dmi: String,
    clocksources: String,
    /// QEMU without KVM: software emulation (TCG).
    emulated: bool,
    verdict: String,
    jit: String,
    stats: String,
    spectre_v2: String,
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl Environment {
    fn detect() -> Environment {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let cpu_model = field("model name").unwrap_or_else(|| "unknown".into());
        let hypervisor_flag =
            field("flags").is_some_and(|f| f.split_whitespace().any(|x| x == "hypervisor"));
        let vendor = read_trim("/sys/class/dmi/id/sys_vendor");
        let product = read_trim("/sys/class/dmi/id/product_name");
        let dmi = match (&vendor, &product) {
            (None, None) => "none".to_owned(),
            (v, p) => format!(
                "{} / {}",
                v.as_deref().unwrap_or("-"),
                p.as_deref().unwrap_or("-")
            ),
        };
        let clocksources =
            read_trim("/sys/devices/system/clocksource/clocksource0/available_clocksource")
                .unwrap_or_else(|| "unknown".into());
        let qemu = dmi.contains("QEMU") || cpu_model.contains("QEMU");
        let kvm = clocksources.split_whitespace().any(|c| c == "kvm-clock");
        // QEMU names its CPU "QEMU TCG CPU ..." under TCG; with KVM the
        // guest has kvm-clock.
        let emulated = cpu_model.contains("TCG") || (qemu && !kvm);
        let verdict = if emulated {
            "EMULATED (QEMU without KVM, i.e. TCG): absolute figures are not native ones \
             (docs/VM-TIER.md: code runs ~20-35x slower); compare figures within this run only"
                .to_owned()
        } else if hypervisor_flag && kvm {
            "hardware-virtualized guest (KVM), not emulated".to_owned()
        } else if hypervisor_flag {
            "virtualized guest (hypervisor flag set), no sign of emulation".to_owned()
        } else {
            "bare metal (no hypervisor flag)".to_owned()
        };
        Environment {
            kernel: read_trim("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            arch: std::env::consts::ARCH,
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            hypervisor_flag,
            dmi,
            clocksources,
            emulated,
            verdict,
            jit: read_trim("/proc/sys/net/core/bpf_jit_enable").unwrap_or_else(|| "?".into()),
            stats: read_trim("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_else(|| "?".into()),
            spectre_v2: read_trim("/sys/devices/system/cpu/vulnerabilities/spectre_v2")
                .unwrap_or_else(|| "?".into()),
        }
    }
}

fn print_header(args: &Args, env: &Environment) {
    println!("rootlet-bench");
    println!("  kernel       {} ({})", env.kernel, env.arch);
    println!("  backend      {}", args.backend);
    println!("  environment  {}", env.verdict);
    println!(
        "               found: cpu \"{}\" x{}, hypervisor flag {}, DMI {}, clocksources [{}]",
        env.cpu_model,
        env.cpus,
        if env.hypervisor_flag { "yes" } else { "no" },
        env.dmi,
        env.clocksources
    );
    println!(
        "  bpf          bpf_jit_enable={}, bpf_stats_enabled={}, spectre_v2: {}",
        env.jit, env.stats, env.spectre_v2
    );
    println!(
        "  test runs    {} repetitions per run, median of {} runs, 64-byte Ethernet/IPv4/UDP frame",
        args.repeat, args.runs
    );
    if env.emulated {
        println!();
        println!(
            "  *** UNDER EMULATION (QEMU TCG): every time below is many times what native hardware gives ***"
        );
    }
}

// ---------------------------------------------------------------- bpffs scratch

/// A bpffs directory for the baselines' pins; removed on drop.
struct BpffsDir(PathBuf);

impl BpffsDir {
    fn new() -> Result<BpffsDir> {
        let dir = PathBuf::from(format!("/sys/fs/bpf/rootlet-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        if !rootlet_dataplane::is_bpffs(&dir) {
            return Err(format!("{} is not on bpffs", dir.display()).into());
        }
        Ok(BpffsDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- baselines

fn xdp_fd(ebpf: &mut Ebpf, program: &str) -> Result<OwnedFd> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("no program {program}"))?
        .try_into()?;
    prog.load()?;
    Ok(sys::dup(prog.fd()?.as_fd())?)
}

/// `BENCH_MONO` with `n` stages compiled in.
fn load_mono(n: u32) -> Result<(Ebpf, OwnedFd)> {
    let mut ebpf = EbpfLoader::new()
        .override_global("NUM_STAGES", &n, true)
        .load(rootlet_ebpf::BENCH_MONO)?;
    let fd = xdp_fd(&mut ebpf, "mono")?;
    Ok((ebpf, fd))
}

/// A bare chain of `n` tail calls: copies of `BENCH_BARE_CHAIN` with
/// LINK = 0..=n sharing one `bare_links` (pinned under `dir`); the entry
/// (LINK = 0) is first, `bare_links[i]` is the copy with LINK = i + 1, and
/// the copy with LINK = n finds `bare_links[n]` empty and returns XDP_PASS.
struct BareChain {
    _links: OwnedFd,
    progs: Vec<(Ebpf, OwnedFd)>,
}

impl BareChain {
    fn load(dir: &Path, n: u32) -> Result<BareChain> {
        let pin = dir.join(format!("bare_links-{n}"));
        let mut progs = vec![];
        for link in 0..=n {
            let mut ebpf = EbpfLoader::new()
                .override_global("LINK", &link, true)
                .map_pin_path("bare_links", pin.as_path())
                .load(rootlet_ebpf::BENCH_BARE_CHAIN)?;
            let fd = xdp_fd(&mut ebpf, "bare_chain")?;
            progs.push((ebpf, fd));
        }
        let links = sys::obj_get(&pin)?;
        for (i, (_, fd)) in progs.iter().enumerate().skip(1) {
            let index = (i as u32 - 1).to_ne_bytes();
            let value = (fd.as_raw_fd() as u32).to_ne_bytes();
            sys::map_update(links.as_fd(), &index, &value)?;
        }
        Ok(BareChain {
            _links: links,
            progs,
        })
    }

    fn entry(&self) -> BorrowedFd<'_> {
        self.progs[0].1.as_fd()
    }
}

// ---------------------------------------------------------------- per packet

/// One figure: the median of the kernel-reported mean ns per repetition
/// over the runs, and the smallest and largest run.
///
/// The wall clock around the syscall is no use here: for a program not
/// attached to any interface (the baselines) a test run with repeat > 1
/// first adds it to the kernel's XDP dispatcher and removes it afterwards,
/// which costs milliseconds per syscall outside the timed loop.
#[derive(Clone, Copy, Default)]
struct Cost {
    median: f64,
    min: f64,
    max: f64,
}

impl Cost {
    fn of(mut v: Vec<f64>) -> Cost {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Cost {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Runs every program of `progs` `runs` times, interleaved (so that drift
/// affects them alike), after one warm-up run each.
fn measure(progs: &[BorrowedFd<'_>], packet: &[u8], args: &Args) -> Result<Vec<Cost>> {
    let warm = (args.repeat / 10).max(1);
    let mut runs = vec![vec![]; progs.len()];
    for round in 0..=args.runs {
        for (i, p) in progs.iter().enumerate() {
            let repeat = if round == 0 { warm } else { args.repeat };
            let (ret, ns) = sys::prog_test_run(*p, packet, repeat)?;
            if ret != XDP_PASS {
                return Err(format!("a benchmarked program returned {ret}, not XDP_PASS").into());
            }
            if round > 0 {
                runs[i].push(f64::from(ns));
            }
        }
    }
    Ok(runs.into_iter().map(Cost::of).collect())
}

struct PerPacketRow {
    n: u32,
    rootlet: Cost,
    mono: Cost,
    bare: Option<Cost>,
    /// Packets the last stage counted as passed (proof the chain ran).
    last_stage_passes: Option<u64>,
    rootlet_insns: u32,
    mono_insns: u32,
}

fn per_packet(
    args: &Args,
    dp: &Dataplane,
    key: RootletKey,
    scratch: &BpffsDir,
    packet: &[u8],
    tailcall: bool,
) -> Result<Vec<PerPacketRow>> {
    let mut rows = vec![];
    let mut linked = 0;
    for n in STAGE_COUNTS {
        while linked < n {
            let s = stage(&format!("s{linked}"), "test_pass", linked as i32);
            dp.apply(key, &[Change::Link(s)], None)?;
            linked += 1;
        }
        let state = dp.state(key)?;
        if state.slots.len() != n as usize {
            return Err(format!("rootlet has {} stages, expected {n}", state.slots.len()).into());
        }
        let rootlet = sys::prog_fd_by_id(state.rootlet.id)?;
        let (_mono_obj, mono) = load_mono(n)?;
        let mono_insns = sys::prog_info(mono.as_fd())?.verified_insns;
        let bare = if tailcall {
            Some(BareChain::load(scratch.path(), n)?)
        } else {
            None
        };
        let mut progs = vec![rootlet.as_fd(), mono.as_fd()];
        if let Some(b) = &bare {
            progs.push(b.entry());
        }
        let costs = measure(&progs, packet, args)?;
        let last_stage_passes = match n {
            0 => None,
            _ => dp
                .state(key)?
                .slots
                .iter()
                .find(|s| s.stage == format!("s{}", n - 1))
                .map(|s| s.counters.pass),
        };
        rows.push(PerPacketRow {
            n,
            rootlet: costs[0],
            mono: costs[1],
            bare: costs.get(2).copied(),
            last_stage_passes,
            rootlet_insns: state.rootlet.verified_insns,
            mono_insns,
        });
    }
    Ok(rows)
}

fn per_stage(a: f64, b: f64, n: u32) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:+.2}", (a - b) / f64::from(n))
    }
}

fn print_per_packet(args: &Args, rows: &[PerPacketRow], tailcall: bool) {
    println!();
    println!(
        "1. Per-packet cost, ns/packet: BPF_PROG_TEST_RUN, kernel-reported mean per repetition \
         (whole ns), median of {} runs x {} repetitions",
        args.runs, args.repeat
    );
    println!(
        "   rootlet = the live rootlet + N test_pass stages; mono = BENCH_MONO (N stages inlined){}",
        if tailcall {
            "; bare = BENCH_BARE_CHAIN (N bare tail calls)"
        } else {
            ""
        }
    );
    println!();
    let mut head = format!("   {:>6} | {:>8} | {:>8} |", "stages", "rootlet", "mono");
    if tailcall {
        head.push_str(&format!(" {:>8} |", "bare"));
    }
    head.push_str(&format!(" {:>13} |", "(root-mono)/N"));
    if tailcall {
        head.push_str(&format!(
            " {:>13} | {:>13} |",
            "(bare-mono)/N", "(root-bare)/N"
        ));
    }
    println!("{head}");
    println!("   {}", "-".repeat(head.len() - 3));
    for r in rows {
        let (rt, mo) = (r.rootlet.median, r.mono.median);
        let mut line = format!("   {:>6} | {rt:>8.1} | {mo:>8.1} |", r.n);
        if let Some(b) = r.bare {
            line.push_str(&format!(" {:>8.1} |", b.median));
        }
        line.push_str(&format!(" {:>13} |", per_stage(rt, mo, r.n)));
        if let Some(b) = r.bare {
            line.push_str(&format!(
                " {:>13} | {:>13} |",
                per_stage(b.median, mo, r.n),
                per_stage(rt, b.median, r.n)
            ));
        }
        println!("{line}");
    }
    let ends = rows.first().zip(rows.last()).filter(|(a, b)| b.n > a.n);
    if let Some((first, last)) = ends {
        let span = f64::from(last.n - first.n);
        let slope = |a: Cost, b: Cost| (b.median - a.median) / span;
        println!();
        println!(
            "   Marginal cost of one more stage ({}->{} stages): rootlet {:.2} ns, mono {:.2} ns{}",
            first.n,
            last.n,
            slope(first.rootlet, last.rootlet),
            slope(first.mono, last.mono),
            match (first.bare, last.bare) {
                (Some(a), Some(b)) => format!(", bare tail call {:.2} ns", slope(a, b)),
                _ => String::new(),
            }
        );
        println!(
            "   Fixed cost with no stage (rootlet - mono at 0 stages): {:+.1} ns",
            first.rootlet.median - first.mono.median
        );
    }
    println!();
    println!("   Spread (min..max over the runs), verified insns, and proof the chain ran:");
    for r in rows {
        let spread = |c: Cost| format!("{:.0}..{:.0}", c.min, c.max);
        println!(
            "   {:>2} stages: rootlet {:>7} mono {:>7}{}  | insns: rootlet program {}, mono {} | last stage counted {} passes",
            r.n,
            spread(r.rootlet),
            spread(r.mono),
            r.bare
                .map(|b| format!(" bare {:>7}", spread(b)))
                .unwrap_or_default(),
            r.rootlet_insns,
            r.mono_insns,
            r.last_stage_passes
                .map_or_else(|| "-".to_owned(), |p| p.to_string())
        );
    }
}

// ---------------------------------------------------------------- changes

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        if v.is_empty() {
            return Duration::ZERO;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    fn max(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "p50 {:>9}  p99 {:>9}  max {:>9}  (n={})",
            ms(self.percentile(50.0)),
            ms(self.percentile(99.0)),
            ms(self.max()),
            self.0.len()
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Single {
    all: Latencies,
    /// Replacements SPACING apart, after the back-to-back ones.
    spaced: Latencies,
    /// By object the stage was replaced with.
    by_object: [Latencies; 2],
    /// By object: (stage insns, new rootlet instance insns) as read back.
    insns: [Vec<(u32, u32)>; 2],
}

fn single_replacements(args: &Args, dp: &Dataplane, key: RootletKey) -> Result<Single> {
    let mut out = Single {
        all: Latencies::default(),
        spaced: Latencies::default(),
        by_object: Default::default(),
        insns: Default::default(),
    };
    let specs: Vec<StageSpec> = OBJECTS.iter().map(|o| stage("s1", o, 1)).collect();
    for i in 0..args.replacements as usize {
        let which = i % 2;
        let change = [Change::Replace(specs[which].clone())];
        let before = dp.state(key)?.generation;
        let start = Instant::now();
        let generation = dp.apply(key, &change, None)?;
        let took = start.elapsed();
        if generation != before + 1 {
            return Err(format!("replacement {i} did not make a new generation").into());
        }
        out.all.0.push(took);
        out.by_object[which].0.push(took);
        let state = dp.state(key)?;
        let slot = state
            .slots
            .iter()
            .find(|s| s.stage == "s1")
            .ok_or("stage s1 is gone")?;
        let stage_insns = slot.prog.as_ref().map_or(0, |p| p.verified_insns);
        out.insns[which].push((stage_insns, state.rootlet.verified_insns));
    }
    // A tail-call change waits, before it rebuilds the inactive parity, for
    // the RCU grace period the previous flip started: back to back it pays
    // the rest of that wait, spaced out it does not.
    for i in 0..(args.replacements as usize).min(SPACED) {
        std::thread::sleep(SPACING);
        let change = [Change::Replace(specs[i % 2].clone())];
        let start = Instant::now();
        dp.apply(key, &change, None)?;
        out.spaced.0.push(start.elapsed());
    }
    Ok(out)
}

/// Spaced replacements: how many, and how far apart.
const SPACED: usize = 50;
const SPACING: Duration = Duration::from_millis(100);

fn range(v: &[u32]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}..{b}"),
        _ => "-".into(),
    }
}

fn print_single(args: &Args, s: &Single, rows: &[PerPacketRow], tailcall: bool) {
    println!();
    println!(
        "2. One-stage replacement on a rootlet with 3 stages: wall clock per apply(), {} replacements \
         of stage s1 alternating {} / {}",
        args.replacements, OBJECTS[0], OBJECTS[1]
    );
    println!();
    println!("   all          {}", s.all.summary());
    for (i, o) in OBJECTS.iter().enumerate() {
        println!("   to {:<11}{}", o, s.by_object[i].summary());
    }
    println!(
        "   {} ms apart {}  (then: {} more, each after a pause)",
        SPACING.as_millis(),
        s.spaced.summary(),
        s.spaced.0.len()
    );
    println!();
    println!(
        "3. Verified instructions: one-stage replacement vs rebuilding the monolithic program"
    );
    println!();
    for (i, o) in OBJECTS.iter().enumerate() {
        let stage: Vec<u32> = s.insns[i].iter().map(|x| x.0).collect();
        let root: Vec<u32> = s.insns[i].iter().map(|x| x.1).collect();
        let sums: Vec<u32> = s.insns[i].iter().map(|x| x.0 + x.1).collect();
        if tailcall {
            println!(
                "   replace s1 with {:<10}  {:>6} insns (the new stage program; the rootlet is not reloaded)",
                o,
                range(&stage)
            );
        } else {
            println!(
                "   replace s1 with {:<10}  {:>6} insns (stage {} + new rootlet instance {})",
                o,
                range(&sums),
                range(&stage),
                range(&root)
            );
        }
    }
    for r in rows.iter().filter(|r| r.n == 3 || r.n == 10) {
        println!(
            "   rebuild mono, {:>2} stages   {:>6} insns",
            r.n, r.mono_insns
        );
    }
}

fn multi_replacements(args: &Args, dp: &Dataplane, key: RootletKey) -> Result<Latencies> {
    let mut out = Latencies::default();
    let changes: Vec<Vec<Change>> = OBJECTS
        .iter()
        .map(|o| {
            (0..3)
                .map(|i| Change::Replace(stage(&format!("s{i}"), o, i)))
                .collect()
        })
        .collect();
    // Bring s0, s1, s2 to OBJECTS[1] first (untimed), so that every timed
    // change, alternating from OBJECTS[0], replaces exactly three programs.
    dp.apply(key, &changes[1], None)?;
    for i in 0..args.multi as usize {
        let before = dp.state(key)?;
        let start = Instant::now();
        dp.apply(key, &changes[i % 2], None)?;
        let took = start.elapsed();
        let after = dp.state(key)?;
        let replaced = before
            .slots
            .iter()
            .zip(&after.slots)
            .filter(|(a, b)| a.prog.as_ref().map(|p| p.id) != b.prog.as_ref().map(|p| p.id))
            .count();
        if replaced != 3 {
            return Err(
                format!("multi replacement {i} replaced {replaced} programs, not 3").into(),
            );
        }
        out.0.push(took);
    }
    Ok(out)
}

fn print_multi(args: &Args, single: &Single, multi: &Latencies) {
    println!();
    println!(
        "4. Multi-slot atomic switch (tail-call): one apply() replacing s0, s1, s2 at once, {} times",
        args.multi
    );
    println!();
    println!("   3 stages at once  {}", multi.summary());
    println!("   1 stage (from 2)  {}", single.all.summary());
    let per = |d: Duration| d.as_secs_f64() / 3.0;
    println!(
        "   3-stage p50 / 1-stage p50 = {:.2}x  (3-stage p50 per replaced stage {:.2} ms)",
        multi.percentile(50.0).as_secs_f64() / single.all.percentile(50.0).as_secs_f64(),
        per(multi.percentile(50.0)) * 1e3
    );
    if args.multi < 100 {
        println!("   (nearest rank: with n < 100 samples, p99 is the maximum)");
    }
}
