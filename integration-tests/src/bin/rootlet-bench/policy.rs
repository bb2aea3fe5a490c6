//! Policy maps: the per-packet cost of a lookup through a policy map
//! against the same lookup in a plain map, and the wall time and this
//! process's peak memory of applying and swapping a large LPM policy
//! (`policy::build_inner` + `policy::swap`) against a raw batch update into
//! a fresh map, side by side in one run; then the same policy through
//! rootletd (ApplyPolicy over its Unix socket: the signed document decoded,
//! every entry typed against the program's BTF, the swap, the store), with
//! rootletd's own peak memory.

use std::net::Ipv4Addr;

use super::*;
use rootlet_dataplane::policy;
use rootlet_integration_tests::policy as samples;
use rootlet_proto::v1 as pb;

/// `BPF_MAP_TYPE_LPM_TRIE`, `BPF_F_NO_PREALLOC`: the blocklist's inner map.
const LPM_TRIE: u32 = 11;
const NO_PREALLOC: u32 = 1;
/// ENOTSUPP (the kernel's, not EOPNOTSUPP).
const ENOTSUPP: i32 = 524;
/// Lookups per packet of `BENCH_POLICY_LOOKUP` (BENCH_LOOKUPS).
const LOOKUPS: f64 = 8.0;
/// Apply and raw-update rounds per child process, and child processes per
/// method (the median of all their rounds is reported).
const ROUNDS: usize = 5;
const CHILDREN: usize = 3;

pub(crate) struct Policy {
    entries: usize,
    /// Mean ns per packet of each run: policy map, plain map.
    lookup: (Vec<f64>, Vec<f64>),
    /// build_inner + swap, and build_inner alone, per round.
    apply: Vec<Duration>,
    build: Vec<Duration>,
    batched: bool,
    /// Raw update into a fresh map, per round; whether by batch.
    raw: Vec<Duration>,
    raw_batched: bool,
    /// The first round's peak RSS above the RSS before it, in a process
    /// that ran only that method (KiB).
    apply_peak_kib: u64,
    raw_peak_kib: u64,
    /// Each child process's VmHWM at its end (KiB).
    apply_hwm_kib: u64,
    raw_hwm_kib: u64,
    /// ApplyPolicy through rootletd, per round.
    agent: AgentApply,
}

/// ApplyPolicy of the same entries through a rootletd of its own.
#[derive(Default)]
struct AgentApply {
    rounds: Vec<Duration>,
    /// The signed policy's size.
    bytes: usize,
    /// rootletd's VmHWM once serving with the stage linked, and after the
    /// rounds (KiB).
    hwm_before_kib: u64,
    hwm_after_kib: u64,
    /// rootletd's budget over the rounds (`rootlet_apply_*`).
    budget: rootlet_integration_tests::rootletd::Budget,
}

/// [`ROUNDS`] ApplyPolicy calls of `n` /32 entries (two sets in turn, so
/// that each is a change) to a rootletd of its own, timed from the call to
/// the answer, and its VmHWM before and after.
fn through_agent(args: &Args, n: usize) -> Result<AgentApply> {
    use rootlet_integration_tests::{api, rootletd::Daemon};
    let backend = match args.backend.as_str() {
        "freplace" => BackendChoice::Freplace,
        _ => BackendChoice::TailCall,
    };
    let f = Fixture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut d = Daemon::start(&f, backend)?;
    // Unsigned (the bench's rootletd allows it): a signature costs one
    // ed25519 check of a digest, which the document's sha256 dominates.
    let document = |version: u64, base: u32| -> Result<Vec<u8>> {
        let mut t = format!(
            "stage = \"policy-bench\"\nversion = {version}\n\n[maps.{}]\nentries = [\n",
            samples::BLOCKLIST
        );
        for i in 0..n as u32 {
            t.push_str(&format!(
                "{{ key = \"{}/32\", value = 0 }},\n",
                Ipv4Addr::from(base + i)
            ));
        }
        t.push_str("]\n");
        let doc = rootlet_bundle::PolicyDocument::parse(&t, "bench.toml")?;
        Ok(rootlet_bundle::SignedPolicy::new(doc).to_bytes())
    };
    let docs = [document(1, 0x0a00_0000)?, document(2, 0x0b00_0000)?];
    let out = rt.block_on(async {
        let mut c = d.connect().await?;
        api::load(&mut c, &f).await;
        let rootlet = api::rootlet_ref(&f);
        c.link_stage(api::link(
            rootlet.clone(),
            api::stage("policy-bench", "ddos", 90),
        ))
        .await?;
        let hwm_before_kib = d.memory()?.hwm_kib;
        let before = d.budget()?;
        let mut rounds = vec![];
        for r in 0..ROUNDS {
            let mut doc = docs[r % 2].clone();
            if r >= 2 {
                // Later rounds: the same contents as a new version.
                let text = rootlet_bundle::SignedPolicy::from_bytes(&doc)?;
                let mut p = text.policy;
                p.version = r as u64 + 1;
                doc = rootlet_bundle::SignedPolicy::new(p).to_bytes();
            }
            let t0 = Instant::now();
            let a = c
                .apply_policy(pb::ApplyPolicyRequest {
                    rootlet: rootlet.clone(),
                    policy: doc,
                    ..Default::default()
                })
                .await?
                .into_inner();
            rounds.push(t0.elapsed());
            if a.maps.first().map(|m| m.entries) != Some(n as u64) {
                return Err::<_, Box<dyn std::error::Error>>(
                    format!("rootletd applied {a:?}, not {n} entries").into(),
                );
            }
        }
        Ok(AgentApply {
            rounds,
            bytes: docs[0].len(),
            hwm_before_kib,
            hwm_after_kib: d.memory()?.hwm_kib,
            budget: d.budget()?.since(&before),
        })
    })?;
    drop(d);
    Ok(out)
}

/// `n` distinct /32 entries, 10.0.0.0 upwards, rule 0.
fn entries(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n as u32)
        .map(|i| samples::block_entry(Ipv4Addr::from(0x0a00_0000 + i), 32, 0))
        .collect()
}

/// VmRSS and VmHWM of this process, in KiB.
fn rss_hwm() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a peak-memory window: resets VmHWM to the current RSS
/// (`echo 5 > /proc/self/clear_refs`) and returns that RSS.
fn peak_start() -> Result<u64> {
    std::fs::write("/proc/self/clear_refs", "5")?;
    Ok(rss_hwm()?.0)
}

/// How far the peak rose above `start` since [`peak_start`].
fn peak_since(start: u64) -> Result<u64> {
    Ok(rss_hwm()?.1.saturating_sub(start))
}

/// Writes `keys`/`values` (`n` elements back to back) into `map` the way a
/// tool would without Rootlet: one batch, or element by element where the
/// map type has no batch operations. Returns whether one batch did it.
fn raw_fill(map: BorrowedFd<'_>, keys: &[u8], values: &[u8], n: usize) -> Result<bool> {
    match sys::map_update_batch(map, keys, values, n) {
        Ok(()) => return Ok(true),
        Err(sys::BatchError { done: 0, error })
            if matches!(
                error.errno(),
                Some(libc::EINVAL | libc::EOPNOTSUPP) | Some(ENOTSUPP)
            ) => {}
        Err(e) => return Err(format!("batch update: {} after {}", e.error, e.done).into()),
    }
    let (k, v) = (keys.len() / n, values.len() / n);
    for i in 0..n {
        sys::map_update(map, &keys[i * k..(i + 1) * k], &values[i * v..(i + 1) * v])?;
    }
    Ok(false)
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<OwnedFd> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()?;
    prog.load()?;
    Ok(sys::dup(prog.fd()?.as_fd())?)
}

/// Per-packet cost: `BENCH_POLICY_LOOKUP`'s two programs, each map holding
/// the same `set`, on a frame whose source is in it.
fn lookups(args: &Args, f: &Fixture, set: &[(Vec<u8>, Vec<u8>)]) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut ebpf = EbpfLoader::new().load(rootlet_ebpf::BENCH_POLICY_LOOKUP)?;
    let through_policy = load_xdp(&mut ebpf, "policy_lookup")?;
    let plain_prog = load_xdp(&mut ebpf, "plain_lookup")?;
    let maps = rootlet_dataplane::prog_maps(through_policy.as_fd())?;
    let outer = maps.get("bench_policy").ok_or("no bench_policy map")?;
    let maps = rootlet_dataplane::prog_maps(plain_prog.as_fd())?;
    let plain = maps.get("bench_plain").ok_or("no bench_plain map")?;
    let keys: Vec<u8> = set.iter().flat_map(|(k, _)| k.clone()).collect();
    let values: Vec<u8> = set.iter().flat_map(|(_, v)| v.clone()).collect();
    raw_fill(plain.as_fd(), &keys, &values, set.len())?;
    let inner =
        sys::map_create_with_flags(LPM_TRIE, 8, 4, 262_144, NO_PREALLOC, "bench_inner", None)?;
    raw_fill(inner.as_fd(), &keys, &values, set.len())?;
    let inner_fd = inner.as_raw_fd() as u32;
    sys::map_update(outer.as_fd(), &0u32.to_ne_bytes(), &inner_fd.to_ne_bytes())?;

    let mut frame = f.pair.udp_to_host(40000, 9, vec![0; 22]);
    frame.src_ip = Ipv4Addr::from(0x0a00_0000 + set.len() as u32 / 2);
    let packet = frame.to_bytes();
    let (mut a, mut b) = (vec![], vec![]);
    for round in 0..=args.runs {
        let repeat = if round == 0 {
            (args.repeat / 10).max(1)
        } else {
            args.repeat
        };
        for (prog, out) in [(&through_policy, &mut a), (&plain_prog, &mut b)] {
            let (ret, ns) = sys::prog_test_run(prog.as_fd(), &packet, repeat)?;
            if ret != XDP_PASS {
                return Err(format!("a lookup missed its key (returned {ret})").into());
            }
            if round > 0 {
                out.push(f64::from(ns));
            }
        }
    }
    Ok((a, b))
}

/// One method's rounds, measured in a process of its own
/// (`--policy-child`), so that its peak memory is its own and not pages the
/// allocator kept from the other method.
struct Child {
    rounds: Vec<Duration>,
    /// build_inner alone (apply only).
    build: Vec<Duration>,
    batched: bool,
    /// The first round's rise of VmHWM above VmRSS before it (KiB).
    rise_kib: u64,
    /// The process's VmHWM at the end (KiB): the same setup in both.
    hwm_kib: u64,
}

/// Measures the per-packet part here, and each update method in a child
/// process (this binary with `--policy-child apply|raw`).
pub(crate) fn policy_maps(args: &Args, f: &Fixture) -> Result<Policy> {
    let n = args.policy_entries as usize;
    let lookup = lookups(args, f, &entries(n))?;
    let exe = std::env::current_exe()?;
    let child = |method: &str| -> Result<Child> {
        let out = std::process::Command::new(&exe)
            .args(["--backend", &args.backend, "--policy-entries"])
            .arg(n.to_string())
            .args(["--policy-child", method])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "policy child `{method}` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("policy-child "))
            .ok_or("the policy child printed no figures")?;
        let mut c = Child {
            rounds: vec![],
            build: vec![],
            batched: false,
            rise_kib: 0,
            hwm_kib: 0,
        };
        for field in line.split_whitespace() {
            let (k, v) = field.split_once('=').ok_or("bad figure")?;
            let ms = |v: &str| -> Result<Vec<Duration>> {
                v.split(',')
                    .filter(|x| !x.is_empty())
                    .map(|x| Ok(Duration::from_secs_f64(x.parse::<f64>()? / 1e3)))
                    .collect()
            };
            match k {
                "rounds" => c.rounds = ms(v)?,
                "build" => c.build = ms(v)?,
                "batched" => c.batched = v == "true",
                "rise_kib" => c.rise_kib = v.parse()?,
                "hwm_kib" => c.hwm_kib = v.parse()?,
                _ => {}
            }
        }
        Ok(c)
    };
    // The two methods' processes alternate, so that drift (the host is
    // shared) hits them alike; the memory figures are the largest seen.
    let mut p = Policy {
        entries: n,
        lookup,
        apply: vec![],
        build: vec![],
        batched: false,
        raw: vec![],
        raw_batched: false,
        apply_peak_kib: 0,
        raw_peak_kib: 0,
        apply_hwm_kib: 0,
        raw_hwm_kib: 0,
        agent: AgentApply::default(),
    };
    for _ in 0..CHILDREN {
        let apply = child("apply")?;
        p.apply.extend(apply.rounds);
        p.build.extend(apply.build);
        p.batched = apply.batched;
        p.apply_peak_kib = p.apply_peak_kib.max(apply.rise_kib);
        p.apply_hwm_kib = p.apply_hwm_kib.max(apply.hwm_kib);
        let raw = child("raw")?;
        p.raw.extend(raw.rounds);
        p.raw_batched = raw.batched;
        p.raw_peak_kib = p.raw_peak_kib.max(raw.rise_kib);
        p.raw_hwm_kib = p.raw_hwm_kib.max(raw.hwm_kib);
    }
    p.agent = through_agent(args, n)?;
    Ok(p)
}

/// `--policy-child apply|raw`: a ddos stage linked into `key`, then
/// [`ROUNDS`] of one method with `--policy-entries` entries; prints one
/// `policy-child` line of figures.
pub(crate) fn child(args: &Args, method: &str, dp: &Dataplane, key: RootletKey) -> Result<()> {
    let n = args.policy_entries as usize;
    dp.apply(
        key,
        &[Change::Link(stage("policy-bench", "ddos", 90))],
        None,
    )?;
    let outer = dp.stage_map_handle(key, "policy-bench", samples::BLOCKLIST)?;
    let live = outer.inner.clone().ok_or("no live inner map")?;
    let set = entries(n);
    // The raw update's input as a tool would hold it: keys and values back
    // to back, laid out before its clock starts.
    let (keys, values): (Vec<u8>, Vec<u8>) = if method == "raw" {
        (
            set.iter().flat_map(|(k, _)| k.clone()).collect(),
            set.iter().flat_map(|(_, v)| v.clone()).collect(),
        )
    } else {
        (vec![], vec![])
    };
    let (mut rounds, mut build, mut batched, mut rise) = (vec![], vec![], false, None);
    for _ in 0..ROUNDS {
        let start = peak_start()?;
        let t0 = Instant::now();
        if method == "apply" {
            let inner = policy::build_inner(&outer, &set)?;
            build.push(t0.elapsed());
            policy::swap(&outer, &inner)?;
            rounds.push(t0.elapsed());
            batched = inner.batched;
        } else {
            let fresh = sys::map_create_with_flags(
                live.info.map_type,
                live.info.key_size,
                live.info.value_size,
                live.info.max_entries,
                live.info.map_flags,
                "raw_bench",
                None,
            )?;
            batched = raw_fill(fresh.as_fd(), &keys, &values, n)?;
            rounds.push(t0.elapsed());
        }
        rise.get_or_insert(peak_since(start)?);
    }
    if method == "apply" && policy::count(&outer)? != n as u64 {
        return Err("the swapped-in policy does not hold every entry".into());
    }
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "policy-child rounds={} build={} batched={batched} rise_kib={} hwm_kib={}",
        list(&rounds),
        list(&build),
        rise.unwrap_or(0),
        rss_hwm()?.1
    );
    Ok(())
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn median_ms(v: &[Duration]) -> f64 {
    median_f(v.iter().map(|d| d.as_secs_f64() * 1e3).collect())
}

pub(crate) fn print_policy(args: &Args, p: &Policy) {
    println!();
    println!("7. Policy maps");
    let (a, b) = (median_f(p.lookup.0.clone()), median_f(p.lookup.1.clone()));
    let diff = median_f(
        p.lookup
            .0
            .iter()
            .zip(&p.lookup.1)
            .map(|(x, y)| x - y)
            .collect(),
    );
    println!(
        "   per packet, {LOOKUPS} lookups of its /32 source in a {}-entry LPM trie (median of {} runs of {}):",
        p.entries, args.runs, args.repeat
    );
    println!(
        "     through a policy map    {a:>8.1} ns  ({:.1} ns a lookup)",
        a / LOOKUPS
    );
    println!(
        "     in a plain map          {b:>8.1} ns  ({:.1} ns a lookup)",
        b / LOOKUPS
    );
    println!(
        "     policy map's extra cost {:>8.2} ns a lookup (paired by run)",
        diff / LOOKUPS
    );
    let how = |batched: bool| {
        if batched {
            "BPF_MAP_UPDATE_BATCH"
        } else {
            "element by element: the LPM trie has no batch update on this kernel"
        }
    };
    println!(
        "   {} /32 entries, median of {} rounds in {CHILDREN} processes a method (inner map filled {}):",
        p.entries,
        p.apply.len(),
        how(p.batched)
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "     build_inner + swap      {:>8.1} ms (build_inner {:.1} ms); peak RSS +{:.1} MiB during it, VmHWM {:.1} MiB",
        median_ms(&p.apply),
        median_ms(&p.build),
        mib(p.apply_peak_kib),
        mib(p.apply_hwm_kib)
    );
    println!(
        "     raw into a fresh map    {:>8.1} ms ({}); peak RSS +{:.1} MiB during it, VmHWM {:.1} MiB",
        median_ms(&p.raw),
        how(p.raw_batched),
        mib(p.raw_peak_kib),
        mib(p.raw_hwm_kib)
    );
    println!(
        "     ratio                   {:>8.2}x the raw update",
        median_ms(&p.apply) / median_ms(&p.raw)
    );
    println!(
        "     (the raw update's keys and values are laid out before its clock starts; \
         build_inner's checks and layout are timed; each method runs in a process of its own \
         with the same setup, and its peak RSS is that process's, not the kernel's map memory)"
    );
    let a = &p.agent;
    println!(
        "   through rootletd: ApplyPolicy of the same {} entries ({:.1} MiB signed policy) over its Unix socket, median of {} rounds:",
        p.entries,
        a.bytes as f64 / (1 << 20) as f64,
        a.rounds.len()
    );
    println!(
        "     call to answer          {:>8.1} ms ({:.2}x the raw update); rootletd VmHWM {:.1} MiB -> {:.1} MiB",
        median_ms(&a.rounds),
        median_ms(&a.rounds) / median_ms(&p.raw),
        mib(a.hwm_before_kib),
        mib(a.hwm_after_kib)
    );
    let per = |step: &str| a.budget.step(step) * 1e3 / a.budget.changes.max(1) as f64;
    println!(
        "     per apply, mean: {:.1} ms decode + verify (parse), {:.1} ms typing (check), {:.1} ms previous document (plan), \
         {:.1} ms fill (build), {:.1} ms swap, {:.1} ms agent store, {:.1} ms other",
        per("parse"),
        per("check"),
        per("plan"),
        per("build"),
        per("swap"),
        per("agent_store"),
        per("other")
    );
}
