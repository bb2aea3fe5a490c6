//! `rootlet-bench`: prints what a rootlet costs, for one backend. Figures
//! only: nothing here asserts on speed.
//!
//! ```text
//! rootlet-bench --backend freplace|tailcall [--repeat N] [--runs R]
//!               [--replacements M] [--multi K]
//! ```
//!
//! 1. Per-packet cost (BPF_PROG_TEST_RUN, `--repeat` repetitions per run,
//!    `--runs` interleaved runs, every figure as its median with min..max
//!    and IQR) of a live rootlet with 0, 1, 3, 10 and 16 trivial stages
//!    (`test_pass`), against `BENCH_MONO` (the rootlet's logic with N
//!    trivial stages inlined in one program), libxdp's dispatcher holding N
//!    copies of `test_pass` (`xdp-loader`; where the kernel allows EXT) and,
//!    for the tail-call backend, a bare hand-written chain of N tail calls
//!    (`BENCH_BARE_CHAIN`); per-stage overheads and the ratio to libxdp per
//!    run. Then, freplace, libxdp's time to add a 10th program against
//!    Rootlet replacing one stage of 10.
//! 2. Wall-clock latency of `--replacements` one-stage replacements
//!    (`Dataplane::apply`) on a rootlet with 3 stages.
//! 3. Instructions the verifier processed for one such replacement, against
//!    rebuilding the monolithic program with 3 and 10 stages.
//! 4. Tail-call backend: latency of one apply() that replaces 3 stages at
//!    once (`--multi` times), against a one-stage replacement.
//! 5. Against a `rootletd` process the bench starts (own config, state and
//!    bpffs directories, Unix socket, on a fixture of its own), over gRPC on
//!    its Unix socket: `--replacements` one-stage ReplaceStage calls and
//!    `--multi` 3-stage ApplyBundle switches, from the call to the reply,
//!    and each step's median and share, from rootletd's
//!    `rootlet_apply_step_seconds_total` scraped around each change.
//! 6. That rootletd's VmRSS and VmHWM, idle after startup and after the
//!    changes.
//! 7. Policy maps (`--policy-only` runs this step alone): the per-packet
//!    cost of a lookup through a policy map against the same lookup in a
//!    plain LPM trie (`BENCH_POLICY_LOOKUP`), and applying and swapping a
//!    `--policy-entries` (100 000) LPM policy into a linked ddos stage
//!    (`policy::build_inner` + `policy::swap`): wall time and this
//!    process's peak RSS, against a raw update into a fresh map (one
//!    `BPF_MAP_UPDATE_BATCH`, or element by element where the LPM trie has
//!    none; the output says which). Printed after step 4.
//!
//!
//! `--soak [N]` runs only the soak instead (`soak.rs`): N applies (10 000
//! by default) of every kind against a rootletd under traffic, and what
//! rootletd holds before and after them.
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

mod apply;
mod datapath;
mod libxdp;
mod policy;
mod soak;

use apply::{
    multi_replacements, over_rpc, print_multi, print_rpc, print_single, single_replacements,
};
use datapath::{per_packet, print_per_change, print_per_packet};
use policy::{policy_maps, print_policy};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const XDP_PASS: u32 = 2;
/// Stage counts of the per-packet comparison.
const STAGE_COUNTS: [u32; 5] = [0, 1, 3, 10, 16];
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
    #[arg(long, default_value_t = 11, value_parser = clap::value_parser!(u32).range(1..=101))]
    runs: u32,
    /// One-stage replacements to time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    replacements: u32,
    /// Three-stage replacements to time (tail-call backend only).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    multi: u32,
    /// Entries of the LPM policy applied and swapped in step 7.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=262_144))]
    policy_entries: u32,
    /// Run the soak only: N applies of every kind against a rootletd under
    /// traffic, and whether what rootletd holds grows (10 000 when given
    /// without a value).
    #[arg(long, num_args = 0..=1, default_missing_value = "10000", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    soak: Option<u32>,
    /// The soak's applies: the mix (all), or one kind only, to tell which
    /// kind makes what grows.
    #[arg(long, default_value = "all", value_parser = ["all", "replace", "link", "bundle", "policy"])]
    soak_mix: String,
    /// Run step 7 (policy maps) only.
    #[arg(long)]
    policy_only: bool,
    /// Internal: one update method of step 7 in a process of its own.
    #[arg(long, hide = true, value_parser = ["apply", "raw"])]
    policy_child: Option<String>,
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
    if args.policy_child.is_none() {
        print_header(args, &env);
    }

    if let Some(n) = args.soak {
        return soak::soak(args, backend, n as usize);
    }

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

    if let Some(method) = &args.policy_child {
        policy::child(args, method, &dp, key)?;
        dp.unload_rootlet(key)?;
        return Ok(());
    }
    if args.policy_only {
        let p = policy_maps(args, &f)?;
        print_policy(args, &p);
        dp.unload_rootlet(key)?;
        return Ok(());
    }

    // libxdp on the veth's other end, in the bench's peer namespace.
    let libxdp = match libxdp::Libxdp::new(f.pair.peer(), f.pair.peer_if())? {
        Ok(l) => Some(l),
        Err(why) => {
            println!("  libxdp       not measured: {why}");
            None
        }
    };
    let (per_packet, per_change) =
        per_packet(args, &dp, key, &scratch, &packet, tailcall, libxdp.as_ref())?;
    drop(libxdp);
    print_per_packet(args, &per_packet, tailcall);
    print_per_change(&per_change, tailcall);

    // Back to 3 stages for the change measurements.
    let unlink: Vec<Change> = (3..STAGE_COUNTS[STAGE_COUNTS.len() - 1])
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

    let p = policy_maps(args, &f)?;
    print_policy(args, &p);

    dp.unload_rootlet(key)?;
    drop(dp);
    drop(f);

    let rpc = over_rpc(args, backend)?;
    print_rpc(args, &rpc);
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
