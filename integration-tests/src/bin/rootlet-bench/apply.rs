//! The cost of a change: one-stage replacements, verified instructions, multi-slot switches.

use super::*;

use crate::datapath::PerPacketRow;
use rootlet_integration_tests::{
    api,
    rootletd::{Budget, Daemon, Memory},
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use tonic::transport::Channel;

#[derive(Default)]
pub(crate) struct Latencies(Vec<Duration>);

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

pub(crate) struct Single {
    all: Latencies,
    /// Replacements SPACING apart, after the back-to-back ones.
    spaced: Latencies,
    /// By object the stage was replaced with.
    by_object: [Latencies; 2],
    /// By object: (stage insns, new rootlet instance insns) as read back.
    insns: [Vec<(u32, u32)>; 2],
}

pub(crate) fn single_replacements(args: &Args, dp: &Dataplane, key: RootletKey) -> Result<Single> {
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
/// The pause between spaced 3-stage switches.
const MULTI_SPACING: Duration = Duration::from_millis(300);

fn range(v: &[u32]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}..{b}"),
        _ => "-".into(),
    }
}

pub(crate) fn print_single(args: &Args, s: &Single, rows: &[PerPacketRow], tailcall: bool) {
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

pub(crate) fn multi_replacements(
    args: &Args,
    dp: &Dataplane,
    key: RootletKey,
) -> Result<Latencies> {
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

pub(crate) fn print_multi(args: &Args, single: &Single, multi: &Latencies) {
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

// ---------------------------------------------------------------- over gRPC

/// What the changes over gRPC cost: wall time from the RPC call to its
/// reply, and rootletd's budget of each change (scraped before and after
/// it, outside the timed window).
pub(crate) struct OverRpc {
    pub(crate) single: Latencies,
    pub(crate) single_steps: Vec<Budget>,
    /// One-stage replacements SPACING apart, after the back-to-back ones.
    pub(crate) spaced: Latencies,
    pub(crate) spaced_steps: Vec<Budget>,
    pub(crate) multi: Latencies,
    pub(crate) multi_steps: Vec<Budget>,
    /// 3-stage switches MULTI_SPACING apart, after the back-to-back ones.
    pub(crate) multi_spaced: Latencies,
    pub(crate) multi_spaced_steps: Vec<Budget>,
    /// aya 0.14's `EbpfLoader::new()` in this process (it parses the
    /// kernel BTF, which every load pays): the median of 5.
    pub(crate) loader_new: Duration,
    /// Idle after startup, idle after the changes.
    pub(crate) idle: Memory,
    pub(crate) after: Memory,
}

/// The time rootletd is left idle before its memory is read: longer than
/// the 2 s its idle blocking threads (the RPCs run on them) are kept.
pub(crate) const SETTLE: Duration = Duration::from_secs(3);

/// Starts a rootletd of its own on a new fixture and times, over its Unix
/// socket, one-stage ReplaceStage calls and 3-stage ApplyBundle switches.
pub(crate) fn over_rpc(args: &Args, backend: BackendChoice) -> Result<OverRpc> {
    let loader_new = {
        let mut v: Vec<Duration> = (0..5)
            .map(|_| {
                let start = Instant::now();
                drop(aya::EbpfLoader::new());
                start.elapsed()
            })
            .collect();
        v.sort_unstable();
        v[2]
    };
    let f = Fixture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut d = Daemon::start(&f, backend)?;
    let out = rt.block_on(async {
        let mut c = d.connect().await?;
        tokio::time::sleep(SETTLE).await;
        let idle = d.memory()?;
        api::load(&mut c, &f).await;
        let rootlet = api::rootlet_ref(&f);
        for (i, o) in ["test_pass", OBJECTS[1], "test_pass"].iter().enumerate() {
            c.link_stage(api::link(
                rootlet.clone(),
                api::stage(&format!("s{i}"), o, i as i32),
            ))
            .await?;
        }

        let (single, single_steps) = replacements(
            &mut c,
            &d,
            &rootlet,
            args.replacements as usize,
            Duration::ZERO,
        )
        .await?;
        let spaced = (args.replacements as usize).min(SPACED);
        let (spaced, spaced_steps) = replacements(&mut c, &d, &rootlet, spaced, SPACING).await?;

        // The 3-stage switch: one bundle of s0, s1, s2, alternating the
        // object all three run, so that each apply replaces three programs.
        for i in 0..3 {
            c.unlink_stage(pb::UnlinkStageRequest {
                rootlet: rootlet.clone(),
                stage: format!("s{i}"),
                ..Default::default()
            })
            .await?;
        }
        let bundles: Vec<Vec<u8>> = OBJECTS
            .iter()
            .enumerate()
            .map(|(v, o)| {
                let stages: Vec<(String, &str, i32)> =
                    (0..3).map(|i| (format!("s{i}"), *o, i)).collect();
                let stages: Vec<(&str, &str, i32, &str)> = stages
                    .iter()
                    .map(|(n, o, p)| (n.as_str(), *o, *p, "local"))
                    .collect();
                api::bundle(
                    d.dir.path(),
                    "bench",
                    &format!("{v}.0.0"),
                    &api::targets(&f),
                    &stages,
                )
                .to_bytes()
            })
            .collect();
        let apply = |b: &Vec<u8>| pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(b.clone())),
            ..Default::default()
        };
        c.apply_bundle(apply(&bundles[1])).await?;
        let requests: Vec<_> = bundles.iter().map(apply).collect();
        let (multi, multi_steps) = switches(
            &mut c,
            &d,
            &rootlet,
            &requests,
            (0, args.multi as usize),
            Duration::ZERO,
        )
        .await?;
        // Spaced far enough apart for the loader pool to refill (six
        // parses at most), as changes from an operator or a controller are.
        let n = (args.multi as usize).min(SPACED);
        let (multi_spaced, multi_spaced_steps) = switches(
            &mut c,
            &d,
            &rootlet,
            &requests,
            (args.multi as usize, n),
            MULTI_SPACING,
        )
        .await?;
        tokio::time::sleep(SETTLE).await;
        let after = d.memory()?;
        Ok(OverRpc {
            single,
            single_steps,
            spaced,
            spaced_steps,
            multi,
            multi_steps,
            multi_spaced,
            multi_spaced_steps,
            loader_new,
            idle,
            after,
        })
    });
    // The client's connection runs on `rt`: closed before rootletd is
    // stopped, so that it does not wait for it.
    drop(rt);
    drop(d);
    out
}

/// `n` 3-stage ApplyBundle switches, alternating `requests` from index
/// `start` (which must differ from what runs), `pause` apart: each one's wall time and
/// rootletd's budget of it. Each must replace all three programs.
async fn switches(
    c: &mut RootletClient<Channel>,
    d: &Daemon,
    rootlet: &Option<pb::RootletRef>,
    requests: &[pb::ApplyBundleRequest],
    (start, n): (usize, usize),
    pause: Duration,
) -> Result<(Latencies, Vec<Budget>)> {
    let mut out = Latencies::default();
    let mut steps = vec![];
    let ids = |s: &pb::RootletState| -> Vec<u32> {
        s.slots
            .iter()
            .map(|s| s.program.as_ref().map_or(0, |p| p.id))
            .collect()
    };
    let get = pb::GetRootletRequest {
        rootlet: rootlet.clone(),
    };
    for i in 0..n {
        tokio::time::sleep(pause).await;
        let req = requests[(start + i) % requests.len()].clone();
        let was = ids(&c.get_rootlet(get.clone()).await?.into_inner());
        let before = d.budget()?;
        let start = Instant::now();
        let reply = c.apply_bundle(req).await?.into_inner();
        let took = start.elapsed();
        let budget = d.budget()?.since(&before);
        let now = ids(&c.get_rootlet(get.clone()).await?.into_inner());
        let replaced = was.iter().zip(&now).filter(|(a, b)| a != b).count();
        if reply.noop || replaced != 3 || now.len() != 3 || budget.changes != 1 {
            return Err(format!(
                "3-stage switch {i}: replaced {replaced} of {} programs, {} changes timed",
                now.len(),
                budget.changes
            )
            .into());
        }
        out.0.push(took);
        steps.push(budget);
    }
    Ok((out, steps))
}

/// `n` ReplaceStage calls of s1, alternating OBJECTS, `pause` apart:
/// each one's wall time and rootletd's budget of it.
async fn replacements(
    c: &mut RootletClient<Channel>,
    d: &Daemon,
    rootlet: &Option<pb::RootletRef>,
    n: usize,
    pause: Duration,
) -> Result<(Latencies, Vec<Budget>)> {
    let mut out = Latencies::default();
    let mut steps = vec![];
    for i in 0..n {
        tokio::time::sleep(pause).await;
        let req = pb::ReplaceStageRequest {
            rootlet: rootlet.clone(),
            stage: Some(api::stage("s1", OBJECTS[i % 2], 1)),
            ..Default::default()
        };
        let before = d.budget()?;
        let start = Instant::now();
        let reply = c.replace_stage(req).await?.into_inner();
        let took = start.elapsed();
        let budget = d.budget()?.since(&before);
        let program = reply
            .rootlet
            .as_ref()
            .and_then(|r| r.slots.iter().find(|s| s.stage == "s1"))
            .and_then(|s| s.program.as_ref())
            .ok_or("the reply has no program in s1")?;
        if program.id == 0 || budget.changes != 1 {
            return Err(format!(
                "replacement {i}: {} changes timed, program {program:?}",
                budget.changes
            )
            .into());
        }
        out.0.push(took);
        steps.push(budget);
    }
    Ok((out, steps))
}

/// The median of `v` (0 if empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// rootletd's step labels, from the data plane's own list, and `other`
/// (the time no step covers) last.
fn step_names() -> impl Iterator<Item = &'static str> {
    rootlet_dataplane::budget::Step::ALL
        .into_iter()
        .map(|s| s.name())
        .chain(["other"])
}

pub(crate) fn print_rpc(args: &Args, r: &OverRpc) {
    println!();
    println!(
        "5. Changes over gRPC on the Unix socket, against a rootletd process the bench started: \
         from the RPC call to its reply (the new generation is live when rootletd replies)"
    );
    println!();
    println!(
        "   one-stage ReplaceStage (s1, 3 stages)  {}",
        r.single.summary()
    );
    println!(
        "   the same, {} ms apart                {}",
        SPACING.as_millis(),
        r.spaced.summary()
    );
    println!(
        "   3-stage ApplyBundle switch            {}",
        r.multi.summary()
    );
    println!(
        "   the same, {} ms apart                {}",
        MULTI_SPACING.as_millis(),
        r.multi_spaced.summary()
    );
    if args.replacements < 100 || args.multi < 100 {
        println!("   (nearest rank: with n < 100 samples, p99 is the maximum)");
    }
    println!();
    println!(
        "   Per step, from rootletd's metrics (rootlet_apply_step_seconds_total) around each change: \
         the median per change, and the step's share of the sum of the changes' totals \
         (exclusive: the steps add up to rootletd's total)"
    );
    println!();
    println!(
        "   {:<26}{:>20}{:>20}{:>20}{:>20}",
        "step",
        "one-stage",
        format!("{} ms apart", SPACING.as_millis()),
        "3-stage",
        format!("3-stage, {} ms", MULTI_SPACING.as_millis())
    );
    let cell = |steps: &[Budget], name: &str| {
        let sum: f64 = steps.iter().map(|b| b.total).sum();
        let of: Vec<f64> = steps.iter().map(|b| b.step(name)).collect();
        let share = of.iter().sum::<f64>() / sum.max(f64::MIN_POSITIVE);
        format!("{:>9.3} ms {:>5.1}%", median(of) * 1e3, share * 100.0)
    };
    for name in step_names() {
        println!(
            "   {:<26}{:>20}{:>20}{:>20}{:>20}",
            name,
            cell(&r.single_steps, name),
            cell(&r.spaced_steps, name),
            cell(&r.multi_steps, name),
            cell(&r.multi_spaced_steps, name)
        );
    }
    let total = |steps: &[Budget]| median(steps.iter().map(|b| b.total).collect()) * 1e3;
    let outside = |lat: &Latencies, steps: &[Budget]| {
        let per: Vec<f64> = lat
            .0
            .iter()
            .zip(steps)
            .map(|(d, b)| d.as_secs_f64() - b.total)
            .collect();
        median(per) * 1e3
    };
    println!(
        "   {:<26}{:>12.3} ms{:>17.3} ms{:>17.3} ms{:>17.3} ms",
        "rootletd total",
        total(&r.single_steps),
        total(&r.spaced_steps),
        total(&r.multi_steps),
        total(&r.multi_spaced_steps)
    );
    println!(
        "   {:<26}{:>12.3} ms{:>17.3} ms{:>17.3} ms{:>17.3} ms",
        "outside it (client, h2)",
        outside(&r.single, &r.single_steps),
        outside(&r.spaced, &r.spaced_steps),
        outside(&r.multi, &r.multi_steps),
        outside(&r.multi_spaced, &r.multi_spaced_steps)
    );
    println!(
        "   (aya 0.14's EbpfLoader::new(), which every load calls, parses the kernel BTF: {} here)",
        ms(r.loader_new)
    );
    println!();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let line = |what: &str, m: &Memory| {
        println!(
            "   {what:<24} VmRSS {:>6.1} MiB (anonymous {:.1}, file {:.1}), VmHWM {:>6.1} MiB, {} threads",
            mib(m.rss_kib),
            mib(m.anon_kib),
            mib(m.file_kib),
            mib(m.hwm_kib),
            m.threads
        )
    };
    println!(
        "6. rootletd memory (/proc/PID/status), each after {} s idle",
        SETTLE.as_secs()
    );
    println!();
    line("after startup", &r.idle);
    line("after the changes", &r.after);
}
