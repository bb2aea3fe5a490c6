//! `--soak N`: N applies of every kind against a rootletd process under
//! steady traffic, and what the agent holds before and after them (issue
//! #16: "no growth").
//!
//! N is rounded up to a multiple of 100, the mix's period. The mix, per
//! 50 applies: a policy apply (the ddos stage's blocklist,
//! alternating two contents), a bundle apply (alternating two versions of
//! a one-stage bundle), four Unlink/Link pairs of a team stage, and
//! ReplaceStage of `s1` alternating two objects for the rest. Traffic: a
//! paced [`Blaster`] from the veth's peer to a UDP sink behind the rootlet,
//! in segments (a sender lives at most [`traffic::MAX_RUN_TIME`]); each
//! segment's frames are compared with what the sink received and with what
//! the always-linked ddos stage counted.
//!
//! Held, read after a settle: VmRSS, open file descriptors, pins under
//! its bpffs root, the kernel programs, maps and links rootletd keeps alive
//! (the closure of what its fds and pins hold: a program's maps, a program
//! array's programs, a map-in-map's inner maps, a link's program), the
//! system-wide counts (other processes share the kernel: context only),
//! and the size of its state directory.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    os::fd::{AsFd, OwnedFd},
};

use super::*;
use crate::apply::SETTLE;

use rootlet_bundle::policy::{PolicyDocument, SignedPolicy};
use rootlet_integration_tests::{
    api,
    rootletd::Daemon,
    traffic::{self, BlastConfig, Blaster, RawSocket, SeqReceiver, UdpSink},
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use tonic::transport::Channel;

/// Applies before the baseline: one-time allocations (loader pools, caches,
/// the store's pages in redb's cache, the per-rootlet bounded histories)
/// are not growth. Ten cycles: with one (100 applies), the live heap still
/// grew ~240 KiB over the next 1 000 applies and then ~7 B per apply, flat
/// over the last 5 000 (docs/BENCHMARKS.md, Soak).
const WARMUP: usize = 10 * CYCLE;
/// Frames per second of the steady traffic.
const RATE_PPS: u64 = 2_000;
/// A traffic segment ends after this many applies or this long.
const SEGMENT_APPLIES: usize = 1_000;
const SEGMENT_TIME: Duration = Duration::from_secs(240);
/// The RSS growth tolerated after the warm-up, and why: glibc's allocator
/// keeps freed memory in its arenas (per thread, trimmed lazily), so RSS
/// moves by a few hundred KiB between reads with nothing leaked; a leak of
/// 100 bytes per apply would be ~1 MiB over 10 000 applies and show.
const RSS_TOLERANCE_KIB: u64 = 1024;
/// The growth of the live heap (glibc's count of bytes allocated and not
/// freed) tolerated after the warm-up. It has no fragmentation in it, so
/// it is tighter: a leak of 26 bytes per apply over 10 000 applies shows.
const HEAP_TOLERANCE_KIB: u64 = 256;
/// The store keeps bounded histories (bundle versions, policy versions):
/// once they are full it must not grow; its file may move by a page or so
/// as records are rewritten.
const STORE_TOLERANCE_BYTES: u64 = 64 * 1024;

const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;

/// What rootletd holds at one moment.
#[derive(Clone, Debug, Default)]
struct Held {
    rss_kib: u64,
    /// RssAnon: the heap and stacks (RssFile, the rest, is mapped files:
    /// the binary's pages as they are first touched).
    anon_kib: u64,
    /// glibc's heap (rootletd's `rootlet_heap_*_bytes`): allocated and not
    /// freed, and freed but held. A leak grows the first; fragmentation
    /// between trims moves RSS with the second.
    heap_kib: u64,
    heap_free_kib: u64,
    fds: usize,
    pins: usize,
    progs: usize,
    maps: usize,
    links: usize,
    store_bytes: u64,
    /// System-wide, from bpftool (every process's): context.
    all_progs: Option<usize>,
    all_maps: Option<usize>,
    all_links: Option<usize>,
}

#[derive(Default)]
struct Kinds {
    replace: usize,
    link: usize,
    unlink: usize,
    bundle: usize,
    policy: usize,
}

struct Segment {
    /// Applies done when the segment ended, and rootletd's VmRSS and
    /// RssAnon then (KiB, without a settle).
    applies: usize,
    rss_kib: u64,
    anon_kib: u64,
    heap_kib: u64,
    sent: u64,
    received: usize,
    duplicates: usize,
    counted: u64,
    late: u64,
}

/// The mix repeats every this many applies (two bundle versions, 50
/// applies apart): the state after the warm-up and at the end are the same
/// phase of it only when N is a multiple of it.
const CYCLE: usize = 100;

pub(crate) fn soak(args: &Args, backend: BackendChoice, n: usize) -> Result<()> {
    // Rounded up, so that the end runs what the baseline ran (the bundle's
    // stage alternates an object with maps and one without).
    let n = n.div_ceil(CYCLE) * CYCLE;
    let f = Fixture::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut d = Daemon::start(&f, backend)?;
    let out = rt.block_on(run(args, &f, &mut d, n));
    drop(rt);
    drop(d);
    out
}

async fn run(args: &Args, f: &Fixture, d: &mut Daemon, n: usize) -> Result<()> {
    let mut c = d.connect().await?;
    let pid = d.child.id();
    api::load(&mut c, f).await;
    let rootlet = api::rootlet_ref(f);
    // s1 is replaced, t linked and unlinked, b is the bundle's, d (ddos,
    // last) takes the policies and counts every frame.
    for (name, object, prio) in [("s1", OBJECTS[1], 10), ("t", "test_pass", 20)] {
        c.link_stage(api::link(rootlet.clone(), api::stage(name, object, prio)))
            .await?;
    }
    c.link_stage(api::link(rootlet.clone(), api::stage("d", "ddos", 100)))
        .await?;
    let bundles: Vec<pb::ApplyBundleRequest> = OBJECTS
        .iter()
        .enumerate()
        .map(|(v, o)| pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(
                api::bundle(
                    d.dir.path(),
                    "soak",
                    &format!("{v}.0.0"),
                    &api::targets(f),
                    &[("b", o, 50, "local")],
                )
                .to_bytes(),
            )),
            ..Default::default()
        })
        .collect();
    let sink = UdpSink::bind(f.pair.host(), SocketAddrV4::new(f.pair.host_ip(), 0))?;
    let raw = RawSocket::open(f.pair.peer(), f.pair.peer_if())?;
    let template = f.pair.udp_to_host(40000, sink.port(), Vec::new());
    let pins_root = f.root.clone();
    let state_dir = d.dir.path().join("state");
    let metrics = d.metrics;
    let held = || hold(pid, metrics, &pins_root, &state_dir);

    tokio::time::sleep(SETTLE).await;
    let start = held()?;
    let mut kinds = Kinds::default();
    let mut segments: Vec<Segment> = vec![];
    let mut policy_version = 0u64;
    let mut seq = 0u64;
    let mut i = 0usize;
    let began = Instant::now();
    let mut baseline = None;
    let total = WARMUP + n;
    while i < total {
        // One traffic segment, which ends at the warm-up's end too.
        let stop_at = if baseline.is_none() { WARMUP } else { total };
        let counted_before = counted(&mut c, &rootlet).await?;
        let receiver = SeqReceiver::start(&sink, traffic::MAX_RUN_TIME)?;
        let blaster = Blaster::start(
            &raw,
            BlastConfig {
                first_seq: seq,
                rate_pps: RATE_PPS,
                max_duration: traffic::MAX_RUN_TIME - Duration::from_secs(30),
                ..BlastConfig::new(template.clone(), u64::MAX)
            },
        )?;
        let seg_start = Instant::now();
        let mut in_segment = 0;
        while i < stop_at && in_segment < SEGMENT_APPLIES && seg_start.elapsed() < SEGMENT_TIME {
            one(
                &mut c,
                &rootlet,
                i,
                &bundles,
                &mut policy_version,
                &mut kinds,
                &args.soak_mix,
            )
            .await
            .map_err(|e| format!("apply {i}: {e}"))?;
            i += 1;
            in_segment += 1;
            if blaster.is_finished() {
                return Err(format!("the traffic stopped during apply {i}").into());
            }
        }
        blaster.stop();
        let report = blaster.join();
        let got = receiver.finish(Duration::from_millis(500))?;
        let counted_after = counted(&mut c, &rootlet).await?;
        let sent = report.sent_seqs();
        let unique = got.unique();
        let received = unique.intersection(&sent).count();
        let now = memory(pid)?;
        segments.push(Segment {
            applies: i,
            rss_kib: now.0,
            anon_kib: now.1,
            heap_kib: heap(metrics)?.0,
            sent: sent.len() as u64,
            received,
            duplicates: got.duplicates(),
            counted: counted_after.saturating_sub(counted_before),
            late: report.late,
        });
        seq += report.attempted;
        if i == WARMUP && baseline.is_none() {
            tokio::time::sleep(SETTLE).await;
            baseline = Some(held()?);
        }
    }
    let took = began.elapsed();
    tokio::time::sleep(SETTLE).await;
    let end = held()?;
    let baseline = baseline.ok_or("no baseline")?;
    print(args, n, &kinds, &start, &baseline, &end, &segments, took)
}

/// Apply `i` of the mix.
async fn one(
    c: &mut RootletClient<Channel>,
    rootlet: &Option<pb::RootletRef>,
    i: usize,
    bundles: &[pb::ApplyBundleRequest],
    policy_version: &mut u64,
    kinds: &mut Kinds,
    mix: &str,
) -> Result<()> {
    // One kind only: every apply of that kind (link: unlink and link in
    // turn; bundle: a switch each time).
    let k = match mix {
        "replace" => 0,
        "link" => 5 + i % 2,
        "bundle" => 30,
        "policy" => 10,
        _ => i % 50,
    };
    if k == 10 {
        *policy_version += 1;
        let blocked = if policy_version.is_multiple_of(2) {
            "203.0.113.9/32"
        } else {
            "198.51.100.0/24"
        };
        let text = format!(
            "stage = \"d\"\nversion = {policy_version}\n\n[maps.ddos_blocklist]\nentries = [\n  {{ key = \"{blocked}\", value = 0 }},\n]\n"
        );
        let doc = PolicyDocument::parse(&text, "soak.toml")?;
        c.apply_policy(pb::ApplyPolicyRequest {
            rootlet: rootlet.clone(),
            policy: SignedPolicy::new(doc).to_bytes(),
            ..Default::default()
        })
        .await?;
        kinds.policy += 1;
    } else if k == 30 {
        let which = (if mix == "bundle" { i } else { i / 50 }) % bundles.len();
        let reply = c.apply_bundle(bundles[which].clone()).await?.into_inner();
        if reply.noop && i >= 50 {
            return Err("a bundle switch was a no-op".into());
        }
        kinds.bundle += 1;
    } else if k % 10 == 5 {
        c.unlink_stage(pb::UnlinkStageRequest {
            rootlet: rootlet.clone(),
            stage: "t".into(),
            ..Default::default()
        })
        .await?;
        kinds.unlink += 1;
    } else if k % 10 == 6 {
        c.link_stage(api::link(rootlet.clone(), api::stage("t", "test_pass", 20)))
            .await?;
        kinds.link += 1;
    } else {
        c.replace_stage(pb::ReplaceStageRequest {
            rootlet: rootlet.clone(),
            stage: Some(api::stage("s1", OBJECTS[i % 2], 10)),
            ..Default::default()
        })
        .await?;
        kinds.replace += 1;
    }
    Ok(())
}

/// The ddos stage's pass count (every frame of the traffic passes it).
async fn counted(c: &mut RootletClient<Channel>, rootlet: &Option<pb::RootletRef>) -> Result<u64> {
    let s = c
        .get_stats(pb::GetStatsRequest {
            rootlet: rootlet.clone(),
        })
        .await?
        .into_inner();
    let d = s
        .slots
        .iter()
        .find(|s| s.stage == "d")
        .ok_or("stage d is not linked")?;
    if d.uncounted {
        return Err("stage d is uncounted".into());
    }
    Ok(d.counters.as_ref().map_or(0, |c| c.pass))
}

// ---------------------------------------------------------------- what it holds

/// VmRSS and RssAnon of `pid`, KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(format!("no {name}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// rootletd's heap in use and heap free (KiB), from its metrics.
fn heap(metrics: std::net::SocketAddr) -> Result<(u64, u64)> {
    let text = rootlet_integration_tests::rootletd::scrape(metrics)?;
    let gauge = |name: &str| -> Result<u64> {
        let bytes: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .ok_or(format!("no {name} in rootletd's metrics"))?;
        Ok(bytes / 1024)
    };
    Ok((
        gauge("rootlet_heap_in_use_bytes")?,
        gauge("rootlet_heap_free_bytes")?,
    ))
}

fn hold(
    pid: u32,
    metrics: std::net::SocketAddr,
    pins_root: &Path,
    state_dir: &Path,
) -> Result<Held> {
    let (heap_kib, heap_free_kib) = heap(metrics)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or(format!("no {name}"))?)
    };
    let rss_kib = field("VmRSS:")?;
    let anon_kib = field("RssAnon:")?;
    let mut fds = 0;
    let (mut progs, mut maps, mut links) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        fds += 1;
        let name = e.file_name();
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
                .unwrap_or_default();
        classify(&info, &mut progs, &mut maps, &mut links);
    }
    let mut pins = 0;
    for p in files_under(pins_root) {
        pins += 1;
        if let Ok(fd) = sys::obj_get(&p) {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                .unwrap_or_default();
            classify(&info, &mut progs, &mut maps, &mut links);
        }
    }
    close(&mut progs, &mut maps, &links);
    let store_bytes = files_under(state_dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    Ok(Held {
        rss_kib,
        anon_kib,
        heap_kib,
        heap_free_kib,
        fds,
        pins,
        progs: progs.len(),
        maps: maps.len(),
        links: links.len(),
        store_bytes,
        all_progs: bpftool_count("prog"),
        all_maps: bpftool_count("map"),
        all_links: bpftool_count("link"),
    })
}

/// A BPF fd's object, from its fdinfo: a link (and its program), a program
/// or a map.
fn classify(
    info: &str,
    progs: &mut BTreeSet<u32>,
    maps: &mut BTreeSet<u32>,
    links: &mut BTreeSet<u32>,
) {
    let field = |name: &str| -> Option<u32> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    if let Some(id) = field("link_id:") {
        links.insert(id);
        if let Some(p) = field("prog_id:").filter(|p| *p != 0) {
            progs.insert(p);
        }
    } else if let Some(id) = field("prog_id:") {
        progs.insert(id);
    } else if let Some(id) = field("map_id:") {
        maps.insert(id);
    }
}

/// Adds what the held objects keep alive, until nothing new: a program's
/// maps, a program array's programs, a map-in-map's inner maps.
fn close(progs: &mut BTreeSet<u32>, maps: &mut BTreeSet<u32>, _links: &BTreeSet<u32>) {
    let (mut seen_p, mut seen_m) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..64 {
        let mut changed = false;
        for p in progs.clone().difference(&seen_p.clone()) {
            seen_p.insert(*p);
            let Ok(fd) = sys::prog_fd_by_id(*p) else {
                continue;
            };
            if let Ok(info) = sys::prog_info(fd.as_fd()) {
                for m in info.map_ids {
                    changed |= maps.insert(m);
                }
            }
        }
        for m in maps.clone().difference(&seen_m.clone()) {
            seen_m.insert(*m);
            let Ok(fd) = sys::map_fd_by_id(*m) else {
                continue;
            };
            let Ok(info) = sys::map_info(fd.as_fd()) else {
                continue;
            };
            match info.map_type {
                BPF_MAP_TYPE_PROG_ARRAY => {
                    for id in array_values(&fd, info.max_entries) {
                        changed |= progs.insert(id);
                    }
                }
                BPF_MAP_TYPE_ARRAY_OF_MAPS => {
                    for id in array_values(&fd, info.max_entries) {
                        changed |= maps.insert(id);
                    }
                }
                BPF_MAP_TYPE_HASH_OF_MAPS => {
                    for id in hash_values(&fd, info.key_size as usize) {
                        changed |= maps.insert(id);
                    }
                }
                _ => {}
            }
        }
        if !changed {
            break;
        }
    }
}

/// The ids a program array or array of maps holds (a lookup from user
/// space returns the id).
fn array_values(fd: &OwnedFd, max_entries: u32) -> Vec<u32> {
    let mut out = vec![];
    for k in 0..max_entries.min(4096) {
        let mut v = [0u8; 4];
        if let Ok(true) = sys::map_lookup(fd.as_fd(), &k.to_ne_bytes(), &mut v) {
            out.push(u32::from_ne_bytes(v));
        }
    }
    out
}

fn hash_values(fd: &OwnedFd, key_size: usize) -> Vec<u32> {
    let mut out = vec![];
    let mut key: Option<Vec<u8>> = None;
    for _ in 0..65_536 {
        let mut next = vec![0u8; key_size];
        match sys::map_next_key(fd.as_fd(), key.as_deref(), &mut next) {
            Ok(true) => {}
            _ => break,
        }
        let mut v = [0u8; 4];
        if let Ok(true) = sys::map_lookup(fd.as_fd(), &next, &mut v) {
            out.push(u32::from_ne_bytes(v));
        }
        key = Some(next);
    }
    out
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `bpftool <what> list -j`'s length, if bpftool runs.
fn bpftool_count(what: &str) -> Option<usize> {
    let out = std::process::Command::new("bpftool")
        .args([what, "list", "-j"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array().map(Vec::len)
}

// ---------------------------------------------------------------- report

#[allow(clippy::too_many_arguments, reason = "one report of one run")]
fn print(
    args: &Args,
    n: usize,
    kinds: &Kinds,
    start: &Held,
    base: &Held,
    end: &Held,
    segments: &[Segment],
    took: Duration,
) -> Result<()> {
    println!();
    println!(
        "Soak: {n} applies ({}) after {WARMUP} warm-up applies, over gRPC on rootletd's Unix socket, \
         backend {}, under {RATE_PPS} frames/s",
        args.soak_mix, args.backend
    );
    println!(
        "   applies: {} ReplaceStage, {} LinkStage, {} UnlinkStage, {} ApplyBundle, {} ApplyPolicy \
         (warm-up included); {:.1} s, {:.1} ms per apply",
        kinds.replace,
        kinds.link,
        kinds.unlink,
        kinds.bundle,
        kinds.policy,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / (WARMUP + n) as f64
    );
    println!();
    println!(
        "   {:<34}{:>14}{:>14}{:>14}{:>12}  goal",
        "held by rootletd", "at start", "after warm-up", "at the end", "growth"
    );
    let mut met = true;
    let mut row = |what: &str, a: u64, b: u64, e: u64, tolerance: u64, unit: &str| {
        let growth = e as i64 - b as i64;
        let ok = growth <= tolerance as i64;
        met &= ok;
        println!(
            "   {what:<34}{a:>14}{b:>14}{e:>14}{growth:>+12}  {} (growth <= {tolerance}{unit})",
            if ok { "met" } else { "NOT MET" }
        );
    };
    row(
        "VmRSS (KiB)",
        start.rss_kib,
        base.rss_kib,
        end.rss_kib,
        RSS_TOLERANCE_KIB,
        " KiB",
    );
    row(
        "  of it RssAnon (KiB)",
        start.anon_kib,
        base.anon_kib,
        end.anon_kib,
        RSS_TOLERANCE_KIB,
        " KiB",
    );
    row(
        "heap in use (KiB, glibc)",
        start.heap_kib,
        base.heap_kib,
        end.heap_kib,
        HEAP_TOLERANCE_KIB,
        " KiB",
    );
    println!(
        "   {:<34}{:>14}{:>14}{:>14}{:>+12}  context (freed, held by the heap)",
        "  heap free (KiB, glibc)",
        start.heap_free_kib,
        base.heap_free_kib,
        end.heap_free_kib,
        end.heap_free_kib as i64 - base.heap_free_kib as i64
    );
    row(
        "open file descriptors",
        start.fds as u64,
        base.fds as u64,
        end.fds as u64,
        0,
        "",
    );
    row(
        "pins under its bpffs root",
        start.pins as u64,
        base.pins as u64,
        end.pins as u64,
        0,
        "",
    );
    row(
        "kernel programs it keeps alive",
        start.progs as u64,
        base.progs as u64,
        end.progs as u64,
        0,
        "",
    );
    row(
        "kernel maps it keeps alive",
        start.maps as u64,
        base.maps as u64,
        end.maps as u64,
        0,
        "",
    );
    row(
        "kernel links it keeps alive",
        start.links as u64,
        base.links as u64,
        end.links as u64,
        0,
        "",
    );
    row(
        "state directory (bytes)",
        start.store_bytes,
        base.store_bytes,
        end.store_bytes,
        STORE_TOLERANCE_BYTES,
        " B",
    );
    let opt = |v: Option<usize>| v.map_or("-".to_owned(), |v| v.to_string());
    for (what, a, b, e) in [
        (
            "system-wide programs (bpftool)",
            start.all_progs,
            base.all_progs,
            end.all_progs,
        ),
        (
            "system-wide maps (bpftool)",
            start.all_maps,
            base.all_maps,
            end.all_maps,
        ),
        (
            "system-wide links (bpftool)",
            start.all_links,
            base.all_links,
            end.all_links,
        ),
    ] {
        println!(
            "   {what:<34}{:>14}{:>14}{:>14}{:>12}  context (other processes share the kernel)",
            opt(a),
            opt(b),
            opt(e),
            match (b, e) {
                (Some(b), Some(e)) => format!("{:+}", e as i64 - b as i64),
                _ => "-".into(),
            }
        );
    }
    println!();
    println!(
        "   VmRSS / RssAnon / heap in use (KiB) at the end of each traffic segment, by applies done:"
    );
    for s in segments.iter() {
        println!(
            "     {:>7} applies  {:>7} / {:>7} / {:>7}",
            s.applies, s.rss_kib, s.anon_kib, s.heap_kib
        );
    }
    println!();
    let sent: u64 = segments.iter().map(|s| s.sent).sum();
    let received: usize = segments.iter().map(|s| s.received).sum();
    let duplicates: usize = segments.iter().map(|s| s.duplicates).sum();
    let counted: u64 = segments.iter().map(|s| s.counted).sum();
    let late: u64 = segments.iter().map(|s| s.late).sum();
    let lost = sent.saturating_sub(received as u64);
    let traffic_ok = lost == 0 && counted >= sent && duplicates == 0;
    println!(
        "   traffic: {} segments; {sent} frames sent, {received} received by the sink \
         ({lost} lost, {duplicates} duplicated), {counted} passes counted by the data plane \
         (stage d; {} more than sent: other frames on the veth), {late} schedule slots skipped \
         by the sender  -> {}",
        segments.len(),
        counted as i64 - sent as i64,
        if traffic_ok {
            "no loss"
        } else {
            "LOSS OR MISCOUNT"
        }
    );
    println!(
        "   verdict: {}",
        if met && traffic_ok {
            "every goal met"
        } else {
            "NOT every goal met"
        }
    );
    if met && traffic_ok {
        Ok(())
    } else {
        Err("soak: a goal was not met".into())
    }
}
