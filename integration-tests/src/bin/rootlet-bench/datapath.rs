//! Per-packet cost: the live rootlet against the monolithic program and a bare chain.

use super::*;

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
pub(crate) struct Cost {
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

pub(crate) struct PerPacketRow {
    pub(crate) n: u32,
    pub(crate) rootlet: Cost,
    pub(crate) mono: Cost,
    pub(crate) bare: Option<Cost>,
    /// Packets the last stage counted as passed (proof the chain ran).
    pub(crate) last_stage_passes: Option<u64>,
    pub(crate) rootlet_insns: u32,
    pub(crate) mono_insns: u32,
}

pub(crate) fn per_packet(
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

pub(crate) fn print_per_packet(args: &Args, rows: &[PerPacketRow], tailcall: bool) {
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
