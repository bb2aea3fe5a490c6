//! The crash and fault suite (issue #16): rootletd dies at every crash
//! point of every change RPC, under steady traffic, and is started again on
//! the same store and bpffs root. Each case asserts, from the kernel:
//!
//! - the pipeline: the old one when the crash came before the swap point,
//!   the new one from the swap on (a strict per-step table, per backend: a
//!   step a backend never reaches lets the call finish);
//! - no loss while the agent was dead: the witness stage, linked last,
//!   counted every packet the sender put on the wire exactly once, and its
//!   count grew between the death and the restart (traffic flowed then);
//! - no leak: the pins under the agent's root, and the programs, maps and
//!   links the agent holds (through its pins and its descriptors), are
//!   those of the same state reached without a crash; after a final unload
//!   the kernel's program, map and link counts (`bpftool … list -j`) are
//!   back to the baseline taken before the first load.
//!
//! The crash is `ROOTLETD_CRASH_AT`: rootletd calls `abort()` at the named
//! step. For the kernel that is a SIGKILL at that point: the process dies
//! without unwinding, and the kernel releases what only its descriptors
//! held; it is deterministic where a SIGKILL sent from outside is not.
//!
//! Global kernel counts are shared by every process on the host: the tests
//! of this binary hold [`SERIAL`], and nothing else may run on the host at
//! the same time (the VM tier, CI). On a host shared with other test runs,
//! `ROOTLET_CRASH_SHARED_HOST=1` skips only the global-count comparison
//! (the per-agent counts and the pins are still compared).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use rootlet_bundle::policy::{PolicyDocument, SignedPolicy};
use rootlet_integration_tests::{
    agentd::{Agent, serving},
    api::{self, link, stage},
    fixture,
    netns::VethPair,
    rootletd::{Process, crash_step_wanted, exited, rootletd_with},
    traffic::{RawSocket, UdpSink},
    witness::{self, Traffic, Witnessed},
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use tonic::{Code, transport::Channel};

/// One test of this binary at a time: they compare global kernel counts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SINK_PORT: u16 = 6300;

/// The data plane's crash points, in order.
const DP_STEPS: [&str; 7] = [
    "store-pending",
    "rootlet-loaded",
    "stage-attached",
    "built",
    "swapped",
    "store-committed",
    "released",
];

/// Whether a crash at `step` of one data-plane change leaves the new
/// pipeline (true), the old one (false), or is never reached by this
/// backend, so the call finishes (None).
fn dp_outcome(step: &str) -> Option<bool> {
    match step {
        "store-pending" | "stage-attached" | "built" => Some(false),
        // Only freplace loads a new rootlet instance per generation.
        "rootlet-loaded" => (fixture::backend_name() == "freplace").then_some(false),
        "swapped" | "store-committed" | "released" => Some(true),
        _ => panic!("no such data-plane step {step}"),
    }
}

/// Packets per second: modest natively, fewer in the VM tier (emulated,
/// 20-35x slower), where the data-plane counts judge all the same.
fn rate() -> u64 {
    std::env::var("ROOTLET_CRASH_PPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn shared_host() -> bool {
    std::env::var("ROOTLET_CRASH_SHARED_HOST").is_ok_and(|v| v == "1")
}

/// The pipeline as the agent reads it back from the kernel: (stage, object
/// digest, pinned), in slot order.
type Pipeline = Vec<(String, String, bool)>;

fn digest_of(object: &str) -> String {
    rootlet_bundle::sha256_hex(rootlet_ebpf::stage(object).expect("object").object)
}

fn pipeline_of(stages: &[(&str, &str, bool)]) -> Pipeline {
    stages
        .iter()
        .map(|(s, o, p)| ((*s).to_owned(), digest_of(o), *p))
        .collect()
}

/// Kernel objects: (programs, maps, links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    progs: usize,
    maps: usize,
    links: usize,
}

/// `bpftool WHAT list -j` (`-f`: with the bpffs paths pinning each). An
/// object another process frees between bpftool's id walk and its lookup
/// fails the listing (EAGAIN on a link going away): tried again, 10 times
/// at most.
fn bpftool_list(what: &str) -> Vec<serde_json::Value> {
    let run = || {
        std::process::Command::new("bpftool")
            .args([what, "list", "-j", "-f"])
            .output()
            .expect("bpftool")
    };
    let mut out = run();
    for _ in 0..9 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        out = run();
    }
    assert!(out.status.success(), "bpftool {what} list: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array().cloned().unwrap_or_default()
}

/// Every program, map and link on the host that something can still
/// reach, by `bpftool … list -j`: a map counts when a descriptor of any
/// process, a bpffs pin or a program holds it.
///
/// A map that nothing reaches (no descriptor, pin or program) cannot be
/// closed by anyone, so it is not counted but printed as an orphan. On
/// the native 6.18 host this suite leaves such orphans: empty
/// `rootlet_next` prog arrays (2 entries, owner XDP) that no process, pin
/// or program holds, about one to three per test, after a crash-free run
/// too; the 6.12 guest leaves none. They are not lazy freeing: they stay
/// (one for more than 30 min, a run's for more than 10). Nor do the data
/// plane's own sequences leave them: a rootlet's 16 hop arrays are all
/// gone within 1 s (at most one still listed right after, freed by the
/// kernel's deferred work) after load, link, replaces, unlink and unload
/// in process; after `rootlet-dp` is killed (SIGKILL) or aborts at
/// stage-attached, built or swapped, is adopted, and its pins go; and
/// the probe's `tailcall::verify_programs` leaves none. Measured on
/// 2026-12-03, after this suite stopped reading footprints with the agent
/// stopped (two starts per point, the pins read while it serves): none of
/// its six tests leaves one (117 orphans listed before and after each, all
/// from earlier runs that day), nor do the soak, the policy suite or the
/// data-plane suite. What changed is when the observers read: a kernel
/// reference of the kind `prog_array_map_clear` takes for its clearing
/// work (taken whether or not `schedule_work` queues it) is a candidate,
/// if a reopening by id ([`held`]) released a hop array's last user
/// reference a second time while the first clearing was pending; but the
/// suite still reads once per point with the agent stopped, so that is
/// not proven. The freplace backend has no hop arrays: guests never show
/// them.
/// Everything user space holds is still counted exactly.
fn global_counts() -> Counts {
    let progs = bpftool_list("prog");
    let maps = bpftool_list("map");
    let links = bpftool_list("link");
    let mut reached: BTreeSet<u64> = progs
        .iter()
        .flat_map(|p| p["map_ids"].as_array().cloned().unwrap_or_default())
        .filter_map(|id| id.as_u64())
        .collect();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(info) = std::fs::read_to_string(fd.path()) else {
                    continue;
                };
                reached.extend(
                    info.lines()
                        .filter_map(|l| l.strip_prefix("map_id:"))
                        .filter_map(|v| v.trim().parse::<u64>().ok()),
                );
            }
        }
    }
    let mut counted = 0;
    for m in &maps {
        let id = m["id"].as_u64().unwrap_or(0);
        let pinned = m["pinned"].as_array().is_some_and(|p| !p.is_empty());
        if pinned || reached.contains(&id) {
            counted += 1;
        } else {
            eprintln!(
                "orphan map (no descriptor, pin or program holds it): id {id} {} {}",
                m["type"], m["name"]
            );
        }
    }
    Counts {
        progs: progs.len(),
        maps: counted,
        links: links.len(),
    }
}

/// The ids of the BPF objects behind a descriptor's fdinfo.
fn fdinfo_ids(fdinfo: &str, into: &mut BTreeSet<(&'static str, u32)>) {
    for line in fdinfo.lines() {
        for (prefix, kind) in [
            ("prog_id:", "prog"),
            ("map_id:", "map"),
            ("link_id:", "link"),
        ] {
            if let Some(v) = line.strip_prefix(prefix)
                && let Ok(id) = v.trim().parse()
            {
                into.insert((kind, id));
            }
        }
    }
}

/// What an agent holds in the kernel: the objects behind its pins and its
/// descriptors, with each program's maps and each link's program.
fn held(root: &std::path::Path, pid: Option<u32>) -> BTreeSet<(&'static str, u32)> {
    let mut ids = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(fd) = rootlet_dataplane::sys::obj_get(&p) {
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
                    .unwrap_or_default();
                fdinfo_ids(&info, &mut ids);
            }
        }
    }
    if let Some(pid) = pid
        && let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
    {
        for e in fds.flatten() {
            fdinfo_ids(
                &std::fs::read_to_string(e.path()).unwrap_or_default(),
                &mut ids,
            );
        }
    }
    // What those hold in turn: each program's maps, each link's program,
    // each program array's programs; to a fixed point.
    let mut seen = BTreeSet::new();
    loop {
        let next: Vec<_> = ids.difference(&seen).copied().collect();
        if next.is_empty() {
            break;
        }
        for (kind, id) in next {
            seen.insert((kind, id));
            use rootlet_dataplane::sys as k;
            use std::os::fd::AsFd;
            match kind {
                "prog" => {
                    if let Ok(fd) = k::prog_fd_by_id(id)
                        && let Ok(info) = k::prog_info(fd.as_fd())
                    {
                        ids.extend(info.map_ids.into_iter().map(|m| ("map", m)));
                    }
                }
                "link" => {
                    if let Ok(fd) = k::link_fd_by_id(id)
                        && let Ok(info) = k::link_info(fd.as_fd())
                    {
                        ids.insert(("prog", info.prog_id));
                    }
                }
                _ => {
                    // BPF_MAP_TYPE_PROG_ARRAY: a lookup gives a program id.
                    if let Ok(fd) = k::map_fd_by_id(id)
                        && let Ok(info) = k::map_info(fd.as_fd())
                        && info.map_type == 3
                    {
                        for i in 0..info.max_entries {
                            let mut v = [0u8; 4];
                            if let Ok(true) = k::map_lookup(fd.as_fd(), &i.to_ne_bytes(), &mut v) {
                                ids.insert(("prog", u32::from_ne_bytes(v)));
                            }
                        }
                    }
                }
            }
        }
    }
    ids
}

/// What a state leaves behind: the pins under the root, and how many
/// programs, maps and links the agent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    pins: Vec<String>,
    held: BTreeMap<&'static str, usize>,
}

/// One agent on one rootlet (a second veth pair for a second rootlet),
/// restarted as a process with and without a crash point.
struct Rig {
    a: Agent,
    second: VethPair,
    path: PathBuf,
    addr: String,
    child: Mutex<Option<Process>>,
    baseline: Counts,
}

impl Rig {
    async fn new() -> Rig {
        let mut a = Agent::start().await;
        if let Some(r) = a.running.take() {
            r.shutdown().await.expect("graceful shutdown");
        }
        let second = VethPair::new().expect("second veth pair");
        let (path, addr) = a.process_config();
        let baseline = global_counts();
        Rig {
            a,
            second,
            path,
            addr,
            child: Mutex::new(None),
            baseline,
        }
    }

    /// Starts rootletd (with `crash`, if any) and waits until it serves.
    async fn start(&self, crash: Option<&str>) -> RootletClient<Channel> {
        let env: Vec<(&str, &str)> = crash
            .map(|s| ("ROOTLETD_CRASH_AT", s))
            .into_iter()
            .collect();
        let old = self.child().replace(rootletd_with(&self.path, &env));
        assert!(old.is_none(), "one agent at a time");
        serving(&self.addr, &self.a).await
    }

    /// Stops the agent cleanly.
    fn child(&self) -> std::sync::MutexGuard<'_, Option<Process>> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent process, taken out of the rig.
    fn take(&self) -> Option<Process> {
        self.child().take()
    }

    async fn stop(&self) {
        let child = self.take();
        if let Some(mut child) = child {
            assert!(exited(&mut child, true).await.success(), "a clean exit");
        }
    }

    fn r2(&self) -> Option<pb::RootletRef> {
        Some(pb::RootletRef {
            r#ref: Some(pb::rootlet_ref::Ref::Interface(pb::Interface {
                netns: self.second.host().path().display().to_string(),
                ifname: self.second.host_if().into(),
            })),
        })
    }

    fn targets(&self) -> String {
        format!(
            "{}[[rootlets]]\ninterface = \"{}\"\nnetns = \"{}\"\nmode = \"generic\"\n",
            api::targets(&self.a.f),
            self.second.host_if(),
            self.second.host().path().display()
        )
    }

    /// What the agent holds: through its pins, and through its descriptors
    /// while it runs.
    fn footprint(&self) -> Footprint {
        let pid = self.child().as_ref().map(|c| c.id());
        self.footprint_of(pid)
    }

    /// What the pins hold: all that outlives the agent, and so all that a
    /// crash could leak; the same whether the agent runs or not (a running
    /// agent adds no pin unless a change is under way, and none is while
    /// the suite judges). Taken with the agent serving, it saves a restart
    /// per crash point (a restart is seconds in the VM tier).
    fn pinned(&self) -> Footprint {
        self.footprint_of(None)
    }

    fn footprint_of(&self, pid: Option<u32>) -> Footprint {
        let mut held_by_kind = BTreeMap::new();
        for (kind, _) in held(&self.a.f.root, pid) {
            *held_by_kind.entry(kind).or_insert(0) += 1;
        }
        Footprint {
            pins: self.a.f.pins(),
            held: held_by_kind,
        }
    }

    /// The veth pair of rootlet `i` (0: the first, 1: the second).
    fn pair(&self, i: usize) -> &VethPair {
        [&self.a.f.pair, &self.second][i]
    }

    /// The data plane's key of rootlet `i`.
    fn key(&self, i: usize) -> rootlet_dataplane::spec::RootletKey {
        let pair = self.pair(i);
        rootlet_dataplane::spec::RootletKey {
            netns_ino: rootlet_dataplane::netns::inode(Some(pair.host().path()))
                .expect("the namespace's inode"),
            ifindex: pair.host_ifindex(),
        }
    }

    /// Rootlet `i` is gone, as the running agent and the kernel see it: no
    /// ListRootlets entry, no apply status, no XDP program on its
    /// interface, no pin under its directory; packets sent to its
    /// interface reach the host's socket (nothing is left to drop them).
    async fn assert_gone(&self, c: &mut RootletClient<Channel>, i: usize, why: &str) {
        let pair = self.pair(i);
        let netns = pair.host().path().display().to_string();
        let listed = c
            .list_rootlets(pb::ListRootletsRequest::default())
            .await
            .expect("ListRootlets")
            .into_inner();
        assert!(
            !listed.rootlets.iter().any(|r| r
                .interface
                .as_ref()
                .is_some_and(|f| f.ifname == pair.host_if() && f.netns == netns)),
            "{why}: rootlet {} is not listed: {listed:?}",
            i + 1
        );
        let status = c
            .get_apply_status(pb::GetApplyStatusRequest {
                rootlet: [self.a.rootlet(), self.r2()][i].clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            status.as_ref().map_err(|e| e.code()).err(),
            Some(Code::NotFound),
            "{why}: rootlet {} has no apply status: {status:?}",
            i + 1
        );
        let link = pair
            .host()
            .ip(&["-j", "link", "show", "dev", pair.host_if()])
            .expect("ip link");
        assert!(
            !link.contains("\"xdp") && !link.contains("\"prog\""),
            "{why}: no XDP program on rootlet {}'s interface: {link}",
            i + 1
        );
        let dir = rootlet_dataplane::pins::Layout::new(&self.a.f.root).rootlet_dir(self.key(i));
        assert!(
            !dir.exists(),
            "{why}: no pins of rootlet {} under {}",
            i + 1,
            dir.display()
        );
        let sink = UdpSink::bind(pair.host(), SocketAddrV4::new(pair.host_ip(), 0)).expect("sink");
        let raw = RawSocket::open(pair.peer(), pair.peer_if()).expect("raw socket");
        let template = pair.udp_to_host(40000, sink.port(), vec![]);
        assert_eq!(raw.send_seq(&template, 0..20, 100).expect("send"), 20);
        let got = sink
            .recv_n(20, Instant::now() + Duration::from_secs(5))
            .expect("recv");
        assert_eq!(
            got.len(),
            20,
            "{why}: every packet to rootlet {}'s interface passes to the host",
            i + 1
        );
    }

    /// The data plane's store holds no record of rootlet `i` (read with
    /// the agent stopped: one process at a time holds the store).
    fn assert_no_record(&self, i: usize, why: &str) {
        let store = rootlet_dataplane::store::Store::open(&self.a.f.store).expect("the store");
        let key = self.key(i);
        assert_eq!(
            store.get(key).expect("read the store"),
            None,
            "{why}: no store record of rootlet {}",
            i + 1
        );
    }

    /// Unloads every rootlet: no pin left, and (on a host of its own) the
    /// kernel's counts are the baseline again.
    async fn unload_all(&self, c: &mut RootletClient<Channel>, why: &str) {
        for r in [self.a.rootlet(), self.r2()] {
            match c
                .unload_rootlet(pb::UnloadRootletRequest {
                    rootlet: r,
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {}
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => panic!("{why}: unload: {e:?}"),
            }
        }
        let pins = self.a.f.pins();
        assert!(
            pins.is_empty(),
            "{why}: pins left after the unload: {pins:?}"
        );
        let fp = self.footprint();
        assert!(
            fp.held.values().all(|n| *n == 0),
            "{why}: the agent still holds {:?} after the unload",
            fp.held
        );
        if !shared_host() {
            // Freed objects go after an RCU grace period: wait for it.
            let mut now = global_counts();
            let end = Instant::now() + Duration::from_secs(30);
            while now != self.baseline && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(100));
                now = global_counts();
            }
            assert_eq!(
                now, self.baseline,
                "{why}: the kernel's program, map and link counts are back to the baseline"
            );
        }
    }
}

async fn load(c: &mut RootletClient<Channel>, iface: pb::Interface) {
    c.load_rootlet(pb::LoadRootletRequest {
        interface: Some(iface),
        mode: pb::XdpMode::Generic as i32,
        final_verdict: pb::XdpAction::Pass as i32,
        idempotency_key: String::new(),
    })
    .await
    .expect("load rootlet");
}

async fn get(
    c: &mut RootletClient<Channel>,
    r: Option<pb::RootletRef>,
) -> Option<pb::RootletState> {
    match c.get_rootlet(pb::GetRootletRequest { rootlet: r }).await {
        Ok(s) => Some(s.into_inner()),
        Err(e) if e.code() == Code::NotFound => None,
        Err(e) => panic!("get rootlet: {e:?}"),
    }
}

/// The pipeline the kernel runs on `r` (None: no rootlet), and the kernel
/// id of the witness stage's program.
async fn running(
    c: &mut RootletClient<Channel>,
    r: Option<pb::RootletRef>,
) -> Option<(Pipeline, Option<u32>)> {
    let s = get(c, r).await?;
    assert_eq!(s.drift, "", "no drift after the restart: {s:?}");
    let mut slots = s.slots.clone();
    slots.sort_by_key(|x| x.position);
    let witness = slots
        .iter()
        .find(|x| x.stage == "w")
        .and_then(|x| x.program.as_ref())
        .map(|p| p.id);
    Some((
        slots
            .into_iter()
            .map(|x| (x.stage, x.digest, x.pinned))
            .collect(),
        witness,
    ))
}

/// An RPC under test, sent once per crash point.
type Rpc<'a> = &'a (
        dyn Fn(
    RootletClient<Channel>,
    usize,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>,
> + Sync
    );

/// What one RPC's cases share.
struct Case<'a> {
    /// The RPC's name, for messages.
    rpc: &'a str,
    /// Crash points, each with its outcome: Some(true) new, Some(false)
    /// old, None not reached (the call finishes: new).
    steps: Vec<(&'a str, Option<bool>)>,
    /// The old and new pipelines of the first rootlet (None: not loaded),
    /// and of the second rootlet.
    old: [Option<Pipeline>; 2],
    new: [Option<Pipeline>; 2],
    /// For a policy apply: the blocklist the ddos stage holds in the old
    /// and in the new state.
    policy: Option<[Vec<String>; 2]>,
    /// Steps after which the agent puts back a rootlet the change went
    /// through on (an apply over several rootlets).
    put_back: &'a [&'a str],
    /// Rootlets (by index) the change takes away: where the new state
    /// lacks one, its absence is checked in full ([`Rig::assert_gone`])
    /// and a LoadRootlet there must succeed afterwards.
    gone: &'a [usize],
}

/// Runs every crash point of `case`: for each one, `setup` brings the
/// agent to the old state (from no rootlet at all), traffic starts through
/// the first rootlet, `rpc` is sent to an agent armed to crash, the agent
/// dies, is started again, and the pipeline, the packets and the footprint
/// are judged. Finally everything is unloaded: the baseline again.
async fn run_case<S, SF>(rig: &mut Rig, case: Case<'_>, setup: S, rpc: Rpc<'_>)
where
    S: Fn(RootletClient<Channel>, pb::Interface, pb::Interface) -> SF,
    SF: std::future::Future<Output = RootletClient<Channel>>,
{
    let pair = (
        api::interface(&rig.a.f),
        pb::Interface {
            netns: rig.second.host().path().display().to_string(),
            ifname: rig.second.host_if().into(),
        },
    );
    let ifaces = || pair.clone();
    let refs = [rig.a.rootlet(), rig.r2()];
    // Brings a fresh agent to the old state, checks it, and stops it: the
    // witness stage's program id.
    let prepare = |c: RootletClient<Channel>, why: String| {
        let (i1, i2) = ifaces();
        let (refs, setup, case) = (refs.clone(), &setup, &case);
        async move {
            let mut c = setup(c, i1, i2).await;
            for (i, r) in refs.iter().enumerate() {
                assert_eq!(
                    running(&mut c, r.clone()).await.map(|p| p.0),
                    case.old[i],
                    "{why}: set up"
                );
            }
            if let Some(p) = &case.policy {
                assert_eq!(
                    blocklist(&mut c, refs[0].clone()).await,
                    p[0],
                    "{why}: set up"
                );
            }
            let (_, witness_prog) = running(&mut c, refs[0].clone())
                .await
                .expect("the first rootlet runs");
            witness_prog.expect("a witness stage")
        }
    };
    // The footprints of the old and the new state reached without a crash,
    // as a judgement reads them: what the pins hold with an agent serving
    // that was started again on that state (adoption lets go of what dies
    // with an agent, such as an unpinned stage). The old state's is read
    // with the agent stopped too, as each crash point's set-up is.
    let c = rig.start(None).await;
    prepare(c, format!("{}: reference", case.rpc)).await;
    rig.stop().await;
    let old_stopped = rig.pinned();
    let c = rig.start(None).await;
    let old_fp = rig.pinned();
    rpc(c, 0).await.expect("the RPC without a crash");
    rig.stop().await;
    let mut c = rig.start(None).await;
    let new_fp = rig.pinned();
    rig.unload_all(&mut c, &format!("{}: reference", case.rpc))
        .await;
    let mut witness_prog = prepare(c, format!("{}: first set-up", case.rpc)).await;
    rig.stop().await;

    let started = Instant::now();
    let steps: Vec<_> = case
        .steps
        .iter()
        .filter(|(s, _)| crash_step_wanted(s))
        .collect();
    for (n, (step, outcome)) in steps.iter().enumerate() {
        let why = format!("{} at {step}", case.rpc);
        assert_eq!(
            rig.pinned(),
            old_stopped,
            "{why}: the old state's footprint"
        );

        // Traffic through the first rootlet from here to the judgement.
        let traffic = Traffic::start(&rig.a.f.pair, SINK_PORT, rate(), Duration::from_secs(120))
            .expect("traffic");
        let c = rig.start(Some(step)).await;
        let answer = rpc(c, n + 1).await;
        let mut child = rig.take().expect("the agent");
        let crashed = answer.is_err();
        let status = exited(&mut child, !crashed).await;
        match outcome {
            Some(_) => {
                assert!(
                    crashed,
                    "{why}: the call failed, the agent died: {answer:?}"
                );
                assert!(!status.success(), "{why}: the agent aborted: {status}");
            }
            None => assert!(
                answer.is_ok() && status.success(),
                "{why}: a step {} never reaches lets the call finish: {answer:?} {status}",
                fixture::backend_name()
            ),
        }
        // The agent is dead: the data plane goes on alone.
        let at_death = Witnessed::of_prog(witness_prog).expect("witness").total();
        std::thread::sleep(Duration::from_millis(300));
        let before_restart = Witnessed::of_prog(witness_prog).expect("witness").total();
        assert!(
            before_restart > at_death,
            "{why}: traffic flowed while the agent was dead ({at_death} then {before_restart})"
        );
        let mut c = rig.start(None).await;
        let new = outcome.unwrap_or(true);
        let want = if new { &case.new } else { &case.old };
        for (i, r) in refs.iter().enumerate() {
            assert_eq!(
                running(&mut c, r.clone()).await.map(|p| p.0),
                want[i],
                "{why}: rootlet {}: the {} pipeline",
                i + 1,
                if new { "new" } else { "old" }
            );
        }
        if let Some(p) = &case.policy {
            assert_eq!(
                blocklist(&mut c, refs[0].clone()).await,
                p[usize::from(new)],
                "{why}: the {} policy",
                if new { "new" } else { "old" }
            );
        }
        for &i in case.gone {
            if want[i].is_none() {
                rig.assert_gone(&mut c, i, &why).await;
            }
        }
        assert!(traffic.is_flowing(), "{why}: traffic flowed throughout");
        let (_, witness_after) = running(&mut c, refs[0].clone())
            .await
            .expect("the first rootlet runs");
        let witness_after = witness_after.expect("the witness stage");
        let run = traffic
            .finish(|| Witnessed::of_prog(witness_after))
            .expect("judge the traffic");
        assert!(
            run.judgement.is_clean() && run.sent() > 0,
            "{why}: zero loss through the crash and the restart: {}",
            run.summary()
        );
        // The restart settled: its pins hold what the state it is in holds
        // (read, like the references, with the agent serving).
        let fp = rig.pinned();
        let want_fp = if new { &new_fp } else { &old_fp };
        // A rootlet the agent put back runs the old pipeline in a newer
        // generation: with freplace its pins are under `gen-N` of that
        // number. The same pins, generation numbers aside, and as many.
        let put_back = !new && case.put_back.contains(step);
        let shape = |pins: &[String]| -> Vec<String> {
            let mut v: Vec<String> = pins
                .iter()
                .map(|p| {
                    if put_back {
                        generation_blind(p)
                    } else {
                        p.clone()
                    }
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            shape(&fp.pins),
            shape(&want_fp.pins),
            "{why}: no leaked pin: the pins of the {} state{}",
            if new { "new" } else { "old" },
            if put_back {
                " (generation numbers aside: put back)"
            } else {
                ""
            }
        );
        // A crash before the swap drops the generation the old state kept
        // for a rollback (the backend may have half rewritten it), so it
        // can hold less than the reference, never more. A rootlet put back
        // by the agent (an apply over several rootlets that went through on
        // some only) keeps the version it left as its previous one: at most
        // what the old and the new state held together.
        let bound = |kind: &str| {
            let of = |f: &Footprint| f.held.get(kind).copied().unwrap_or(0);
            match (new, case.put_back.contains(step)) {
                (true, _) => of(want_fp),
                (false, false) => of(&old_fp),
                (false, true) => of(&old_fp) + of(&new_fp),
            }
        };
        for kind in ["prog", "map", "link"] {
            let held = fp.held.get(kind).copied().unwrap_or(0);
            if new {
                assert_eq!(
                    held,
                    bound(kind),
                    "{why}: no leaked {kind}: {:?} against {:?}",
                    fp.held,
                    want_fp.held
                );
            } else {
                assert!(
                    held <= bound(kind),
                    "{why}: no leaked {kind}: {:?} against at most {}",
                    fp.held,
                    bound(kind)
                );
            }
        }
        let gone: Vec<usize> = case
            .gone
            .iter()
            .copied()
            .filter(|&i| want[i].is_none())
            .collect();
        // The data plane's store is read with the agent stopped (one
        // process at a time holds it): only where a rootlet went.
        if !gone.is_empty() {
            drop(c);
            rig.stop().await;
            for &i in &gone {
                rig.assert_no_record(i, &why);
            }
            c = rig.start(None).await;
        }
        // Nothing of a rootlet that went stands in the way of a new one.
        for &i in &gone {
            let iface = [pair.0.clone(), pair.1.clone()][i].clone();
            c.load_rootlet(pb::LoadRootletRequest {
                interface: Some(iface),
                mode: pb::XdpMode::Generic as i32,
                final_verdict: pb::XdpAction::Pass as i32,
                idempotency_key: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("{why}: a new LoadRootlet on rootlet {}: {e:?}", i + 1));
        }
        rig.unload_all(&mut c, &why).await;
        if n + 1 < steps.len() {
            witness_prog = prepare(c, format!("{why}: the next set-up")).await;
        }
        rig.stop().await;
    }
    if steps.is_empty() {
        let mut c = rig.start(None).await;
        rig.unload_all(&mut c, case.rpc).await;
        drop(c);
        rig.stop().await;
    }
    eprintln!(
        "{}: {} crash points in {:?}",
        case.rpc,
        steps.len(),
        started.elapsed()
    );
}

/// A pin path with its generation directory's number taken out
/// (`…/gen-4/slot-0` → `…/gen-*/slot-0`).
fn generation_blind(pin: &str) -> String {
    pin.split('/')
        .map(|part| match part.strip_prefix("gen-") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => "gen-*",
            _ => part,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn dp_steps() -> Vec<(&'static str, Option<bool>)> {
    DP_STEPS.iter().map(|s| (*s, dp_outcome(s))).collect()
}

/// The first rootlet with `stages` linked one by one (name, object,
/// priority), the witness last.
async fn with_stages(
    mut c: RootletClient<Channel>,
    iface: pb::Interface,
    stages: &[(&str, &str, i32)],
) -> RootletClient<Channel> {
    load(&mut c, iface.clone()).await;
    let r = Some(pb::RootletRef {
        r#ref: Some(pb::rootlet_ref::Ref::Interface(iface)),
    });
    for (name, object, prio) in stages {
        c.link_stage(link(r.clone(), stage(name, object, *prio)))
            .await
            .expect("link");
    }
    c.link_stage(link(r, stage("w", witness::OBJECT, 90)))
        .await
        .expect("link the witness");
    c
}

fn key(rpc: &str, n: usize) -> String {
    format!("crash-{rpc}-{n}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_stage_change_keeps_the_old_or_the_new_pipeline_by_the_table() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    let r1 = rig.a.rootlet();
    let base = [("a", "sampler", 10)];
    let old = pipeline_of(&[("a", "sampler", true), ("w", witness::OBJECT, true)]);

    // LinkStage: b between a and the witness.
    let r = r1.clone();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let r = r.clone();
        Box::pin(async move {
            let mut req = link(r, stage("b", "test_pass", 20));
            req.idempotency_key = key("link", n);
            c.link_stage(req).await.map(|_| ())
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    };
    let case = Case {
        rpc: "LinkStage",
        steps: dp_steps(),
        old: [Some(old.clone()), None],
        new: [
            Some(pipeline_of(&[
                ("a", "sampler", true),
                ("b", "test_pass", true),
                ("w", witness::OBJECT, true),
            ])),
            None,
        ],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    run_case(&mut rig, case, |c, i, _| with_stages(c, i, &base), &rpc).await;

    // ReplaceStage: a's object.
    let r = r1.clone();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let r = r.clone();
        Box::pin(async move {
            c.replace_stage(pb::ReplaceStageRequest {
                rootlet: r,
                stage: Some(stage("a", "sampler_v2", 10)),
                idempotency_key: key("replace", n),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    };
    let case = Case {
        rpc: "ReplaceStage",
        steps: dp_steps(),
        old: [Some(old.clone()), None],
        new: [
            Some(pipeline_of(&[
                ("a", "sampler_v2", true),
                ("w", witness::OBJECT, true),
            ])),
            None,
        ],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    run_case(&mut rig, case, |c, i, _| with_stages(c, i, &base), &rpc).await;

    // UnlinkStage: b goes again.
    let r = r1.clone();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let r = r.clone();
        Box::pin(async move {
            c.unlink_stage(pb::UnlinkStageRequest {
                rootlet: r,
                stage: "b".into(),
                idempotency_key: key("unlink", n),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    };
    let with_b = [("a", "sampler", 10), ("b", "test_pass", 20)];
    let case = Case {
        rpc: "UnlinkStage",
        steps: dp_steps(),
        old: [
            Some(pipeline_of(&[
                ("a", "sampler", true),
                ("b", "test_pass", true),
                ("w", witness::OBJECT, true),
            ])),
            None,
        ],
        new: [Some(old.clone()), None],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    run_case(&mut rig, case, |c, i, _| with_stages(c, i, &with_b), &rpc).await;

    // SetStagePin: a unpinned.
    let r = r1.clone();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let r = r.clone();
        Box::pin(async move {
            c.set_stage_pin(pb::SetStagePinRequest {
                rootlet: r,
                stage: "a".into(),
                pin: false,
                idempotency_key: key("pin", n),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
    };
    let case = Case {
        rpc: "SetStagePin",
        steps: dp_steps(),
        old: [Some(old.clone()), None],
        new: [
            Some(pipeline_of(&[
                ("a", "sampler", false),
                ("w", witness::OBJECT, true),
            ])),
            None,
        ],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    run_case(&mut rig, case, |c, i, _| with_stages(c, i, &base), &rpc).await;
}

fn apply(bytes: Vec<u8>, key: String) -> pb::ApplyBundleRequest {
    pb::ApplyBundleRequest {
        source: Some(pb::apply_bundle_request::Source::Bundle(bytes)),
        idempotency_key: key,
        ..Default::default()
    }
}

/// Version 1 of bundle `edge` (a = sampler, then the witness), and version
/// 2 (a = sampler_v2, b = test_pass, the witness), for `targets`.
fn versions(rig: &Rig, targets: &str) -> (Vec<u8>, Vec<u8>) {
    let w = witness::OBJECT;
    let v1 = rig.a.bundle_for(
        "edge",
        "1.0",
        targets,
        &[("a", "sampler", 10, "ops"), ("w", w, 90, "ops")],
        true,
    );
    let v2 = rig.a.bundle_for(
        "edge",
        "2.0",
        targets,
        &[
            ("a", "sampler_v2", 10, "ops"),
            ("b", "test_pass", 20, "ops"),
            ("w", w, 90, "ops"),
        ],
        true,
    );
    (v1, v2)
}

fn v1_pipeline() -> Pipeline {
    pipeline_of(&[("a", "sampler", true), ("w", witness::OBJECT, true)])
}

fn v2_pipeline() -> Pipeline {
    pipeline_of(&[
        ("a", "sampler_v2", true),
        ("b", "test_pass", true),
        ("w", witness::OBJECT, true),
    ])
}

type Boxed = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_two_rootlet_apply_puts_both_back_until_every_one_committed() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    let (v1, v2) = versions(&rig, &rig.targets());
    // One rootlet's swap is not the apply's: until every rootlet committed,
    // a restart puts every one back on 1.0 (reconcile.rs).
    let mut steps: Vec<(&str, Option<bool>)> = DP_STEPS
        .iter()
        .map(|s| (*s, dp_outcome(s).map(|_| false)))
        .collect();
    steps.extend([
        ("bundle-pending", Some(false)),
        ("bundle-rootlet-committed", Some(false)),
        ("bundle-committed", Some(true)),
        ("bundle-status-written", Some(true)),
    ]);
    let case = Case {
        rpc: "ApplyBundle (two rootlets)",
        steps,
        old: [Some(v1_pipeline()), Some(v1_pipeline())],
        new: [Some(v2_pipeline()), Some(v2_pipeline())],
        policy: None,
        // The first rootlet's swap, and after it.
        put_back: &[
            "swapped",
            "store-committed",
            "released",
            "bundle-rootlet-committed",
        ],
        gone: &[],
    };
    let setup = |mut c: RootletClient<Channel>, _: pb::Interface, _: pb::Interface| {
        let v1 = v1.clone();
        async move {
            c.apply_bundle(apply(v1, String::new())).await.expect("1.0");
            c
        }
    };
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let v2 = v2.clone();
        Box::pin(async move { c.apply_bundle(apply(v2, key("apply", n))).await.map(|_| ()) })
            as Boxed
    };
    run_case(&mut rig, case, setup, &rpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_rollback_keeps_the_old_or_the_new_pipeline_by_the_table() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    let (v1, v2) = versions(&rig, &api::targets(&rig.a.f));
    // One rootlet: its data-plane swap is the rollback's swap.
    let mut steps = dp_steps();
    steps.extend([
        ("bundle-pending", Some(false)),
        ("bundle-rootlet-committed", Some(true)),
        ("bundle-committed", Some(true)),
        ("bundle-status-written", Some(true)),
    ]);
    let case = Case {
        rpc: "Rollback",
        steps,
        old: [Some(v2_pipeline()), None],
        new: [Some(v1_pipeline()), None],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    let setup = |mut c: RootletClient<Channel>, _: pb::Interface, _: pb::Interface| {
        let (v1, v2) = (v1.clone(), v2.clone());
        async move {
            c.apply_bundle(apply(v1, String::new())).await.expect("1.0");
            c.apply_bundle(apply(v2, String::new())).await.expect("2.0");
            c
        }
    };
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        Box::pin(async move {
            c.rollback(pb::RollbackRequest {
                name: "edge".into(),
                idempotency_key: key("rollback", n),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }) as Boxed
    };
    run_case(&mut rig, case, setup, &rpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_load_leaves_no_rootlet_or_a_whole_one() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    let base = [("a", "sampler", 10)];
    let old = pipeline_of(&[("a", "sampler", true), ("w", witness::OBJECT, true)]);
    // A load's swap is the attachment of its first generation.
    let steps = vec![
        ("store-pending", Some(false)),
        ("rootlet-loaded", dp_outcome("rootlet-loaded")),
        // No stage: nothing is attached.
        ("stage-attached", None),
        // freplace builds the first generation (a rootlet instance, no
        // stage); the tail-call backend builds nothing for it.
        ("built", dp_outcome("rootlet-loaded")),
        ("swapped", Some(true)),
        ("store-committed", Some(true)),
        ("released", None),
    ];
    let second = pb::Interface {
        netns: rig.second.host().path().display().to_string(),
        ifname: rig.second.host_if().into(),
    };
    let case = Case {
        rpc: "LoadRootlet",
        steps,
        old: [Some(old.clone()), None],
        new: [Some(old), Some(vec![])],
        policy: None,
        put_back: &[],
        gone: &[],
    };
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let second = second.clone();
        Box::pin(async move {
            c.load_rootlet(pb::LoadRootletRequest {
                interface: Some(second),
                mode: pb::XdpMode::Generic as i32,
                final_verdict: pb::XdpAction::Pass as i32,
                idempotency_key: key("load", n),
            })
            .await
            .map(|_| ())
        }) as Boxed
    };
    run_case(&mut rig, case, |c, i, _| with_stages(c, i, &base), &rpc).await;
}

/// UnloadRootlet of the second rootlet, loaded by a bundle (so that it has
/// an apply status), while the first carries the witness under traffic.
/// A crash before the unload's marker keeps the whole rootlet; from the
/// marker on, a restart finishes the unload, and nothing of the rootlet is
/// left (`Rig::assert_gone`, the store, a new load there); the first
/// rootlet runs on untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_an_unload_leaves_the_whole_rootlet_or_none() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    let base = [("a", "sampler", 10)];
    let first = pipeline_of(&[("a", "sampler", true), ("w", witness::OBJECT, true)]);
    let second_targets = format!(
        "[[rootlets]]\ninterface = \"{}\"\nnetns = \"{}\"\nmode = \"generic\"\n",
        rig.second.host_if(),
        rig.second.host().path().display()
    );
    let bundle = rig.a.bundle_for(
        "edge-second",
        "1.0",
        &second_targets,
        &[("s", "test_pass", 10, "ops")],
        true,
    );
    // The data plane's marker first, then its detach and its pins; the
    // agent's status last. The marker is the first write of an unload, so
    // from it on the rootlet is to go.
    let steps = vec![
        // Under the lock, before the marker: nothing written, the whole
        // rootlet stays (and its apply status).
        ("unload-begun", Some(false)),
        ("unload-marked", Some(true)),
        ("unload-detached", Some(true)),
        ("unload-pins-removed", Some(true)),
        ("unload-removed", Some(true)),
    ];
    let case = Case {
        rpc: "UnloadRootlet",
        steps,
        old: [
            Some(first.clone()),
            Some(pipeline_of(&[("s", "test_pass", true)])),
        ],
        new: [Some(first), None],
        policy: None,
        put_back: &[],
        gone: &[1],
    };
    let setup = |c: RootletClient<Channel>, i: pb::Interface, _: pb::Interface| {
        let bundle = bundle.clone();
        async move {
            let mut c = with_stages(c, i, &base).await;
            c.apply_bundle(apply(bundle, String::new()))
                .await
                .expect("the second rootlet's bundle");
            c
        }
    };
    let r2 = rig.r2();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let r2 = r2.clone();
        Box::pin(async move {
            c.unload_rootlet(pb::UnloadRootletRequest {
                rootlet: r2,
                idempotency_key: key("unload", n),
            })
            .await
            .map(|_| ())
        }) as Boxed
    };
    run_case(&mut rig, case, setup, &rpc).await;
}

const POLICY_STAGE: &str = "a-ddos";

fn blocklist_text(version: u64, prefixes: &[&str]) -> String {
    let mut t = format!(
        "stage = \"{POLICY_STAGE}\"\nversion = {version}\n\n[maps.ddos_blocklist]\nentries = [\n"
    );
    for p in prefixes {
        t.push_str(&format!("  {{ key = \"{p}\", value = 0 }},\n"));
    }
    t.push_str("]\n");
    t
}

fn signed_policy(rig: &Rig, text: &str) -> Vec<u8> {
    let doc = PolicyDocument::parse(text, "test.toml").expect("a valid document");
    let mut s = SignedPolicy::new(doc);
    s.sign(&rig.a.signing_key);
    s.to_bytes()
}

/// Every key of the ddos stage's blocklist, sorted (empty: no ddos stage).
async fn blocklist(c: &mut RootletClient<Channel>, r: Option<pb::RootletRef>) -> Vec<String> {
    let mut keys = vec![];
    let mut token = String::new();
    for _ in 0..100 {
        let page = c
            .dump_map(pb::DumpMapRequest {
                stage: Some(pb::StageRef {
                    rootlet: r.clone(),
                    stage: POLICY_STAGE.into(),
                }),
                map: "ddos_blocklist".into(),
                page_token: token.clone(),
                page_size: 100,
            })
            .await
            .expect("DumpMap")
            .into_inner();
        for e in page.entries {
            let k: serde_json::Value = serde_json::from_str(&e.key_json).expect("json key");
            keys.push(k.as_str().expect("an LPM key is a string").to_owned());
        }
        if page.next_page_token.is_empty() {
            keys.sort();
            return keys;
        }
        token = page.next_page_token;
    }
    panic!("DumpMap never ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_a_policy_apply_keeps_the_old_or_the_new_policy_by_the_table() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new().await;
    // Prefixes the traffic (from 169.254.77.2) is not in: every packet
    // passes whichever policy holds.
    let old = ["192.0.2.0/24"];
    let new = ["198.51.100.0/24", "203.0.113.0/24"];
    let base = [(POLICY_STAGE, "ddos", 10)];
    let pipeline = pipeline_of(&[(POLICY_STAGE, "ddos", true), ("w", witness::OBJECT, true)]);
    let steps = rootlet_agent::crash::Step::POLICY
        .iter()
        .map(|s| {
            let name = s.name();
            (
                name,
                Some(!matches!(name, "policy-built" | "policy-pending")),
            )
        })
        .collect();
    let case = Case {
        rpc: "ApplyPolicy",
        steps,
        old: [Some(pipeline.clone()), None],
        new: [Some(pipeline), None],
        put_back: &[],
        gone: &[],
        policy: Some([
            old.iter().map(|s| (*s).to_owned()).collect(),
            new.iter().map(|s| (*s).to_owned()).collect(),
        ]),
    };
    let v1 = signed_policy(&rig, &blocklist_text(1, &old));
    let v2 = signed_policy(&rig, &blocklist_text(2, &new));
    let r1 = rig.a.rootlet();
    let setup = |c: RootletClient<Channel>, i: pb::Interface, _: pb::Interface| {
        let (v1, r1) = (v1.clone(), r1.clone());
        async move {
            let mut c = with_stages(c, i, &base).await;
            c.apply_policy(pb::ApplyPolicyRequest {
                rootlet: r1,
                policy: v1,
                ..Default::default()
            })
            .await
            .expect("policy 1");
            c
        }
    };
    let r = r1.clone();
    let rpc = move |mut c: RootletClient<Channel>, n: usize| {
        let (v2, r1) = (v2.clone(), r.clone());
        Box::pin(async move {
            c.apply_policy(pb::ApplyPolicyRequest {
                rootlet: r1,
                policy: v2,
                idempotency_key: key("policy", n),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }) as Boxed
    };
    run_case(&mut rig, case, setup, &rpc).await;
}
