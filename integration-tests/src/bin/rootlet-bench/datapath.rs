//! Per-packet cost: the live rootlet against the monolithic program and a bare chain.

use super::*;
use crate::libxdp::{self, LIBXDP_MAX_PROGS, Libxdp};
use rootlet_dataplane::{
    abi, freplace,
    loader::{Load, MapReuse, What},
    pins::Layout,
    spec::{ActionSet, XdpAction},
};

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

/// Bench only, freplace: `BENCH_ROOTLET_BEFORE`, the rootlet as it was
/// before its final verdict moved into `rootlet_stats` (two per-CPU lookups
/// per packet, and the counter index and proceed mask computed per stage),
/// with `n` `test_pass` extensions, on maps of its own: measured in the same
/// rounds as the live rootlet, so that the change has a same-run figure.
struct RootletBefore {
    rootlet: OwnedFd,
    /// The extensions and their links (the links keep them attached).
    _stages: Vec<(OwnedFd, OwnedFd)>,
}

impl RootletBefore {
    fn load(dir: &Path, n: u32) -> Result<RootletBefore> {
        // Its `struct rootlet_config_before`: num_positions, final_verdict,
        // slot_of[16], proceed_mask[16] (without the empty slot's bit).
        let proceed = ActionSet::default().bits();
        let mut words = vec![n, XdpAction::Pass as u32];
        words.extend((0..abi::MAX_SLOTS as u32).map(|i| if i < n { i } else { 0 }));
        words.extend((0..abi::MAX_SLOTS as u32).map(|i| if i < n { proceed } else { 0 }));
        let config: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let target = Load {
            bytes: rootlet_ebpf::BENCH_ROOTLET_BEFORE,
            what: What {
                stage: None,
                program: abi::FREPLACE_PROGRAM,
            },
            globals: vec![(abi::CONFIG_GLOBAL, &config, true)],
            reuse: None,
        }
        .xdp_target()?;
        let entry = rootlet_ebpf::stage("test_pass").ok_or("no embedded test_pass")?;
        let layout = Layout::new(dir.join("before"));
        let mut stages = vec![];
        for position in 0..n as usize {
            let func = abi::placeholder(position);
            let reuse = MapReuse::new(&layout)?;
            let ext = Load {
                bytes: entry.object,
                what: What {
                    stage: Some("before"),
                    program: entry.program,
                },
                globals: vec![],
                reuse: Some(&reuse),
            }
            .extension(&target, &func)?;
            let link = freplace::attach(ext.as_fd(), target.fd.as_fd(), &func)?;
            stages.push((ext, link));
        }
        Ok(RootletBefore {
            rootlet: target.fd,
            _stages: stages,
        })
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
pub(crate) struct Cost {
    median: f64,
    min: f64,
    max: f64,
    /// The first and third quartiles.
    q1: f64,
    q3: f64,
}

/// The `q` quantile (0..=1) of sorted `v`, interpolated between ranks.
fn quantile(v: &[f64], q: f64) -> f64 {
    match v.len() {
        0 => f64::NAN,
        n => {
            let at = q * (n - 1) as f64;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
        }
    }
}

impl Cost {
    fn of(mut v: Vec<f64>) -> Cost {
        v.sort_by(f64::total_cmp);
        Cost {
            median: quantile(&v, 0.5),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            q1: quantile(&v, 0.25),
            q3: quantile(&v, 0.75),
        }
    }

    /// Per run `r`, `f(a[r], b[r])`: a figure of two programs measured in
    /// the same round, so that drift between rounds cancels.
    fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Cost {
        Cost::of(a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect())
    }

    /// `median (min..max, IQR q1..q3)` with `digits` decimals.
    fn spread(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}..{:.d$}, IQR {:.d$}..{:.d$})",
            self.median,
            self.min,
            self.max,
            self.q1,
            self.q3,
            d = digits
        )
    }
}

/// Runs every program of `progs` `runs` times with `repeat` repetitions,
/// interleaved (so that drift affects them alike), after one warm-up run
/// each; the kernel-reported mean ns per repetition of every run.
fn measure(
    progs: &[BorrowedFd<'_>],
    packet: &[u8],
    runs_of: u32,
    repeat: u32,
) -> Result<Vec<Vec<f64>>> {
    let warm = (repeat / 10).max(1);
    let mut runs = vec![vec![]; progs.len()];
    for round in 0..=runs_of {
        for (i, p) in progs.iter().enumerate() {
            let repeat = if round == 0 { warm } else { repeat };
            let (ret, ns) = sys::prog_test_run(*p, packet, repeat)?;
            if ret != XDP_PASS {
                return Err(format!("a benchmarked program returned {ret}, not XDP_PASS").into());
            }
            if round > 0 {
                runs[i].push(f64::from(ns));
            }
        }
    }
    Ok(runs)
}

pub(crate) struct PerPacketRow {
    pub(crate) n: u32,
    /// Repetitions per run of this row (longer for the longest chain).
    pub(crate) repeat: u32,
    pub(crate) rootlet: Cost,
    pub(crate) mono: Cost,
    pub(crate) bare: Option<Cost>,
    /// libxdp's dispatcher holding `n` copies of `test_pass`, or why not.
    pub(crate) libxdp: std::result::Result<Cost, String>,
    /// Per run: (rootlet - mono) / n, (bare - mono) / n, (rootlet - bare) / n.
    pub(crate) root_mono: Cost,
    pub(crate) bare_mono: Option<Cost>,
    pub(crate) root_bare: Option<Cost>,
    /// Per run: rootlet / libxdp.
    pub(crate) root_libxdp: Option<Cost>,
    /// freplace: the rootlet before the one-lookup change
    /// (`BENCH_ROOTLET_BEFORE`), and per run its ratio to libxdp.
    pub(crate) before: Option<Cost>,
    pub(crate) before_libxdp: Option<Cost>,
    /// Packets the last stage counted as passed (proof the chain ran).
    pub(crate) last_stage_passes: Option<u64>,
    pub(crate) rootlet_insns: u32,
    pub(crate) mono_insns: u32,
    /// (bytes_xlated, bytes_jited) of the rootlet and the dispatcher.
    pub(crate) rootlet_image: Option<(u64, u64)>,
    pub(crate) libxdp_image: Option<(u64, u64)>,
}

/// The longest chain is measured with this many times the repetitions, so
/// that its per-stage figure resolves a fraction of a nanosecond.
const LONG_CHAIN_REPEAT: u32 = 4;

/// Per-change latency, freplace: libxdp adding its k-th program against
/// Rootlet replacing one stage of k, both at k = 10.
pub(crate) struct PerChange {
    pub(crate) k: u32,
    pub(crate) libxdp: std::result::Result<Vec<Duration>, String>,
    pub(crate) rootlet: Vec<Duration>,
}

/// Times per-change figure measured on each side.
const PER_CHANGE_TIMES: u32 = 5;

pub(crate) fn per_packet(
    args: &Args,
    dp: &Dataplane,
    key: RootletKey,
    scratch: &BpffsDir,
    packet: &[u8],
    tailcall: bool,
    libxdp: Option<&Libxdp<'_>>,
) -> Result<(Vec<PerPacketRow>, Option<PerChange>)> {
    let mut rows = vec![];
    let mut per_change = None;
    let mut linked = 0;
    let longest = STAGE_COUNTS.iter().copied().max().unwrap_or(0);
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
        let dispatcher = match libxdp {
            Some(l) if n > 0 => Some(l.dispatcher(n)?),
            _ => None,
        };
        let before = if tailcall || n == 0 {
            None
        } else {
            Some(RootletBefore::load(scratch.path(), n)?)
        };
        let mut progs = vec![rootlet.as_fd(), mono.as_fd()];
        if let Some(b) = &bare {
            progs.push(b.entry());
        }
        if let Some(b) = &before {
            progs.push(b.rootlet.as_fd());
        }
        if let Some(Ok((fd, _))) = &dispatcher {
            progs.push(fd.as_fd());
        }
        let repeat = if n == longest && n > 0 {
            args.repeat.saturating_mul(LONG_CHAIN_REPEAT)
        } else {
            args.repeat
        };
        let runs = measure(&progs, packet, args.runs, repeat)?;
        let (root, mo) = (&runs[0], &runs[1]);
        let bare_runs = bare.as_ref().map(|_| &runs[2]);
        let before_runs = before.as_ref().map(|_| &runs[2]);
        let libxdp_runs = match &dispatcher {
            Some(Ok(_)) => runs.last(),
            _ => None,
        };
        let nf = f64::from(n.max(1));
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
            repeat,
            rootlet: Cost::of(root.clone()),
            mono: Cost::of(mo.clone()),
            bare: bare_runs.map(|b| Cost::of(b.clone())),
            libxdp: match &dispatcher {
                Some(Ok(_)) => Ok(Cost::of(libxdp_runs.cloned().unwrap_or_default())),
                Some(Err(why)) => Err(why.clone()),
                None if n == 0 => Err("no program".into()),
                None => Err("not measured".into()),
            },
            root_mono: Cost::paired(root, mo, |a, b| (a - b) / nf),
            bare_mono: bare_runs.map(|b| Cost::paired(b, mo, |a, b| (a - b) / nf)),
            root_bare: bare_runs.map(|b| Cost::paired(root, b, |a, b| (a - b) / nf)),
            root_libxdp: libxdp_runs.map(|l| Cost::paired(root, l, |a, b| a / b)),
            before: before_runs.map(|b| Cost::of(b.clone())),
            before_libxdp: before_runs
                .zip(libxdp_runs)
                .map(|(b, l)| Cost::paired(b, l, |a, b| a / b)),
            last_stage_passes,
            rootlet_insns: state.rootlet.verified_insns,
            mono_insns,
            rootlet_image: libxdp::image_sizes(state.rootlet.id),
            libxdp_image: match &dispatcher {
                Some(Ok((_, info))) => libxdp::image_sizes(info.id),
                _ => None,
            },
        });
        if n == LIBXDP_MAX_PROGS
            && !tailcall
            && let Some(l) = libxdp
        {
            per_change = Some(PerChange {
                k: n,
                libxdp: l.time_adding(n, PER_CHANGE_TIMES)?,
                rootlet: time_replacing(dp, key, n)?,
            });
        }
    }
    Ok((rows, per_change))
}

/// Wall time of `Dataplane::apply` replacing the last of `n` stages with
/// `test_pass` (what libxdp loads), in process, `PER_CHANGE_TIMES` times;
/// in between, untimed, with the other object, so each timed one replaces.
fn time_replacing(dp: &Dataplane, key: RootletKey, n: u32) -> Result<Vec<Duration>> {
    let name = format!("s{}", n - 1);
    let mut took = vec![];
    for i in 0..PER_CHANGE_TIMES * 2 {
        let object = OBJECTS[i as usize % 2];
        let change = [Change::Replace(stage(&name, object, n as i32 - 1))];
        let start = Instant::now();
        dp.apply(key, &change, None)?;
        if object == "test_pass" {
            took.push(start.elapsed());
        }
    }
    Ok(took)
}

fn per_stage(a: f64, b: f64, n: u32) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{:+.2}", (a - b) / f64::from(n))
    }
}

pub(crate) fn print_per_packet(args: &Args, rows: &[PerPacketRow], tailcall: bool) {
    println!();
    println!(
        "1. Per-packet cost, ns/packet: BPF_PROG_TEST_RUN, kernel-reported mean per repetition \
         (whole ns), median of {} interleaved runs x {} repetitions ({}x that for {} stages)",
        args.runs,
        args.repeat,
        LONG_CHAIN_REPEAT,
        rows.last().map_or(0, |r| r.n)
    );
    println!(
        "   rootlet = the live rootlet + N test_pass stages; mono = BENCH_MONO (N stages inlined){}; \
         libxdp = libxdp's dispatcher (xdp-loader) with N test_pass",
        if tailcall {
            "; bare = BENCH_BARE_CHAIN (N bare tail calls)"
        } else {
            "; before = BENCH_ROOTLET_BEFORE (the rootlet before the one-lookup change) with N test_pass"
        }
    );
    println!();
    let mut head = format!("   {:>6} | {:>8} | {:>8} |", "stages", "rootlet", "mono");
    if tailcall {
        head.push_str(&format!(" {:>8} |", "bare"));
    }
    head.push_str(&format!(" {:>8} | {:>13} |", "libxdp", "(root-mono)/N"));
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
        match &r.libxdp {
            Ok(l) => line.push_str(&format!(" {:>8.1} |", l.median)),
            Err(_) => line.push_str(&format!(" {:>8} |", "-")),
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
    println!(
        "   Spread of every figure: median (min..max, IQR) over the runs, ns/packet; proof the chain ran:"
    );
    for r in rows {
        println!(
            "   {:>2} stages, {} repetitions per run, last stage counted {} passes; verified insns: \
             rootlet program {}, mono {}",
            r.n,
            r.repeat,
            r.last_stage_passes
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            r.rootlet_insns,
            r.mono_insns
        );
        println!("      rootlet  {}", r.rootlet.spread(1));
        println!("      mono     {}", r.mono.spread(1));
        if let Some(b) = r.bare {
            println!("      bare     {}", b.spread(1));
        }
        if let Some(b) = r.before {
            println!("      before   {}", b.spread(1));
        }
        match &r.libxdp {
            Ok(l) => println!("      libxdp   {}", l.spread(1)),
            Err(why) if r.n > 0 => println!("      libxdp   not measured: {why}"),
            Err(_) => {}
        }
    }
    println!();
    println!(
        "   Per-stage overhead, ns/stage, from each run's own figures (paired, so drift between runs \
         cancels): median (min..max, IQR)"
    );
    for r in rows.iter().filter(|r| r.n > 0) {
        let mut line = format!(
            "   {:>2} stages: (root-mono)/N {}",
            r.n,
            r.root_mono.spread(2)
        );
        if let (Some(bm), Some(rb)) = (r.bare_mono, r.root_bare) {
            line.push_str(&format!(
                "; (bare-mono)/N {}; (root-bare)/N {}",
                bm.spread(2),
                rb.spread(2)
            ));
        }
        println!("{line}");
    }
    print_against_libxdp(rows);
}

/// Rootlet against libxdp's dispatcher at each k, per run, and what the
/// kernel says about the two images.
fn print_against_libxdp(rows: &[PerPacketRow]) {
    println!();
    println!(
        "   Against libxdp (rootlet / libxdp, per run, median (min..max, IQR); goal <= 1.10; libxdp's \
         dispatcher holds at most {LIBXDP_MAX_PROGS} programs):"
    );
    for r in rows.iter().filter(|r| r.n > 0) {
        let images = match (r.rootlet_image, r.libxdp_image) {
            (Some((rx, rj)), Some((lx, lj))) => format!(
                " | images: rootlet {rx} B xlated / {rj} B jited, dispatcher {lx} B / {lj} B"
            ),
            (Some((rx, rj)), None) => format!(" | images: rootlet {rx} B xlated / {rj} B jited"),
            _ => String::new(),
        };
        match (&r.libxdp, r.root_libxdp) {
            (Ok(_), Some(ratio)) => println!(
                "   k = {:>2}: {}  {}{images}",
                r.n,
                ratio.spread(3),
                if ratio.max <= 1.10 {
                    "goal met in every run"
                } else if ratio.median <= 1.10 {
                    "goal met at the median, not in every run"
                } else {
                    "GOAL NOT MET"
                }
            ),
            (Err(why), _) => println!("   k = {:>2}: libxdp not measured: {why}{images}", r.n),
            _ => {}
        }
        if let Some(before) = r.before_libxdp {
            println!(
                "           before (BENCH_ROOTLET_BEFORE, same rounds): {}",
                before.spread(3)
            );
        }
    }
}

pub(crate) fn print_per_change(c: &Option<PerChange>, tailcall: bool) {
    println!();
    if tailcall {
        println!(
            "   Per change against libxdp: measured with the freplace backend only (libxdp's dispatcher is freplace)."
        );
        return;
    }
    let Some(c) = c else {
        println!("   Per change against libxdp: not measured (xdp-loader unavailable).");
        return;
    };
    let ms = |v: &[Duration]| Cost::of(v.iter().map(|d| d.as_secs_f64() * 1e3).collect()).spread(1);
    println!(
        "   Per change at k = {}, wall ms, median (min..max, IQR) of {PER_CHANGE_TIMES}:",
        c.k
    );
    match &c.libxdp {
        Ok(v) => println!(
            "      libxdp: `xdp-loader load` adding program {} to {}   {}",
            c.k,
            c.k - 1,
            ms(v)
        ),
        Err(why) => println!("      libxdp: not measured: {why}"),
    }
    println!(
        "      Rootlet: Dataplane::apply replacing stage {} of {} (in process; section 2 times it on 3 stages)   {}",
        c.k - 1,
        c.k,
        ms(&c.rootlet)
    );
}

// ---------------------------------------------------------------- changes
