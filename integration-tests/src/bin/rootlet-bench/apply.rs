//! The cost of a change: one-stage replacements, verified instructions, multi-slot switches.

use super::*;

use crate::datapath::PerPacketRow;

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
