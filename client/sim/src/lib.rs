//! A **simulated** agent: the `rootlet.v1` API and grpc.health.v1 served
//! from memory, with no kernel, no eBPF and no signature checks. It exists
//! for the client's tests and for the fleet benchmark (1000 agents on
//! loopback), which label everything it measures "SIMULATED data plane".
//! `rootletctl` never uses it.
//!
//! What it models: bundles applied as one transaction per agent (a digest
//! already applied is a no-op), the bundle history (`ListBundles`, the
//! newest marked current), per-rootlet apply status, idempotency keys,
//! rootlets loaded on first apply, and stage counters that grow with
//! simulated traffic: `pps` packets per second per rootlet run through
//! its stages in priority order; a stage whose name starts with `abort`
//! aborts every packet (as `rootlet_ebpf::TEST_ABORT` does on a real
//! agent), every other stage passes it. `RemoveBundle` works as on a real
//! agent: the bundle's stages go, a rootlet the bundle loaded is unloaded
//! once it holds no other stage, and the history says "removed";
//! [`SimAgent::add_foreign_stage`] puts another team's stage beside a
//! bundle's. `GetApplyStatus` with an idempotency key reports the attempt
//! that key made. Policies ([`policy`]): `ApplyPolicy`, `GetPolicy` and
//! `RollbackPolicy` per stage and rootlet, with versions, the kept history,
//! `expected_version` and idempotency keys as on a real agent; a stage
//! whose policy has an entry keyed `"0.0.0.0/0"` (or `"::/0"`) blocks
//! everything: it drops every packet, and the stages after it see none.
//! `RollbackRootlet` is refused as a real agent refuses it for stages a
//! bundle put there (naming the bundle). Faults: [`SimAgent::set_silent`]
//! (every call hangs, like a stopped process), [`SimAgent::set_unhealthy`]
//! (health NOT_SERVING), [`SimAgent::set_nack`] (applies fail),
//! [`SimAgent::set_policy_nack`] (policy applies fail) and
//! [`SimAgent::replace_out_of_band`] (a stage changed behind the agent's
//! back: drift).
//!
//! A crate of its own so that it stays out of `rootletctl` and the
//! `rootlet-client` library: only tests and benchmarks depend on it
//! (`scripts/check-layers.sh` checks that the client does not).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod policy;

use futures::{Stream, StreamExt};
use rootlet_bundle::SignedBundle;
use rootlet_proto::v1::{self as pb, rootlet_server::RootletServer};
use sha2::{Digest, Sha256};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Request, Response, Status, Streaming, server::NamedService};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};

/// The service whose health the client checks (as the real agent's).
const HEALTH_SERVICE: &str = <RootletServer<SimAgent> as NamedService>::NAME;

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Longest a silent agent holds a call (the client's deadline ends it
/// first).
const SILENT_HOLD: Duration = Duration::from_secs(600);
/// Versions of each bundle kept (as the real agent's `history`).
const HISTORY: usize = 5;

/// How a simulated agent behaves.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Simulated packets per second per rootlet (0: idle).
    pub pps: u64,
}

#[derive(Debug, Clone)]
struct SimStage {
    slot: u32,
    name: String,
    owner: String,
    priority: i32,
    digest: String,
    prog_id: u32,
    aborts: bool,
    counters: pb::Counters,
    /// The bundle that manages it (empty: linked by someone else).
    bundle: String,
    /// The object digest the bundle says (`digest` is what runs).
    bundle_digest: String,
    /// The policy its maps hold, and the kept versions (newest first).
    policy: Option<policy::SimPolicy>,
    policy_history: Vec<policy::SimPolicy>,
}

#[derive(Debug, Clone)]
struct SimRootlet {
    id: String,
    netns: String,
    ifname: String,
    generation: u64,
    bundle: String,
    applied_version: String,
    applied_digest: String,
    last_attempt: Option<pb::Attempt>,
    stages: Vec<SimStage>,
    next_slot: u32,
    traffic_at: Instant,
    /// The bundle whose apply loaded it (empty: loaded otherwise).
    loaded_by: String,
}

#[derive(Debug, Clone)]
struct HistoryEntry {
    version: String,
    digest: String,
    at: i64,
}

#[derive(Default)]
struct SimState {
    /// The bundles this agent holds, by digest: shared with every other
    /// simulated agent of the process ([`intern`]).
    bundles: HashMap<String, Arc<[u8]>>,
    history: BTreeMap<String, Vec<HistoryEntry>>,
    rootlets: BTreeMap<(String, String), SimRootlet>,
    next_ifindex: u32,
    idempotency: HashMap<String, (String, pb::ApplyBundleResponse)>,
    /// The attempt each idempotency key made.
    keyed: HashMap<String, pb::Attempt>,
    /// ApplyPolicy and RollbackPolicy answers by idempotency key, with a
    /// hash of the request.
    policy_idempotency: HashMap<String, (String, pb::ApplyPolicyResponse)>,
    /// Bundles removed after their newest history entry.
    removed: std::collections::BTreeSet<String>,
}

struct Inner {
    opts: SimOptions,
    state: Mutex<SimState>,
    silent: AtomicBool,
    unhealthy: AtomicBool,
    nack: AtomicBool,
    policy_nack: AtomicBool,
    policy_calls: AtomicU64,
    rpcs: AtomicU64,
    applies: AtomicU64,
    apply_calls: AtomicU64,
    uploads: AtomicU64,
    pulls: AtomicU64,
    /// The encoded size of every ApplyBundle request received.
    apply_bytes: AtomicU64,
    next_prog: AtomicU32,
    /// Watch events: a change, a policy, an unload (receivers that lag
    /// lose the oldest, as the agent's own stream does).
    events: tokio::sync::broadcast::Sender<pb::WatchEvent>,
}

/// A simulated agent (cheap to clone: one shared state).
#[derive(Clone)]
pub struct SimAgent {
    inner: Arc<Inner>,
}

/// One copy of each bundle for all the simulated agents of a process:
/// thousands of agents that each kept their own copy of the same 80 KiB
/// bundle made the simulator, not the client, the benchmark's limit.
fn intern(digest: &str, bytes: Vec<u8>) -> Arc<[u8]> {
    static BUNDLES: std::sync::OnceLock<Mutex<HashMap<String, Arc<[u8]>>>> =
        std::sync::OnceLock::new();
    let mut all = BUNDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    all.entry(digest.to_string())
        .or_insert_with(|| Arc::from(bytes))
        .clone()
}

/// The simulator's stand-in for an OCI registry: bundles by pinned
/// reference, shared by every simulated agent of the process
/// ([`publish`]). The real pull (digests, allow-list, TLS) is rootletd's
/// and is tested against a real registry; the simulator serves the
/// fleet client's tests and benchmark, which measure what the client sends.
fn published() -> &'static Mutex<HashMap<String, Arc<[u8]>>> {
    static REGISTRY: std::sync::OnceLock<Mutex<HashMap<String, Arc<[u8]>>>> =
        std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Makes `bytes` pullable by every simulated agent as `reference`.
pub fn publish(reference: &str, bytes: &[u8]) {
    published()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(reference.to_string(), Arc::from(bytes));
}

fn lock(m: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimAgent {
    pub fn new(opts: SimOptions) -> SimAgent {
        SimAgent {
            inner: Arc::new(Inner {
                opts,
                state: Mutex::new(SimState::default()),
                silent: AtomicBool::new(false),
                unhealthy: AtomicBool::new(false),
                nack: AtomicBool::new(false),
                policy_nack: AtomicBool::new(false),
                policy_calls: AtomicU64::new(0),
                rpcs: AtomicU64::new(0),
                applies: AtomicU64::new(0),
                apply_calls: AtomicU64::new(0),
                uploads: AtomicU64::new(0),
                pulls: AtomicU64::new(0),
                apply_bytes: AtomicU64::new(0),
                next_prog: AtomicU32::new(100),
                events: tokio::sync::broadcast::channel(256).0,
            }),
        }
    }

    /// Every call hangs (up to ten minutes) while set.
    pub fn set_silent(&self, on: bool) {
        self.inner.silent.store(on, Ordering::SeqCst);
    }

    /// Health reports NOT_SERVING while set.
    pub fn set_unhealthy(&self, on: bool) {
        self.inner.unhealthy.store(on, Ordering::SeqCst);
    }

    /// Applies fail (FAILED_PRECONDITION) while set.
    pub fn set_nack(&self, on: bool) {
        self.inner.nack.store(on, Ordering::SeqCst);
    }

    /// Calls served (health included).
    pub fn rpcs(&self) -> u64 {
        self.inner.rpcs.load(Ordering::Relaxed)
    }

    /// Applies that changed something.
    pub fn applies(&self) -> u64 {
        self.inner.applies.load(Ordering::Relaxed)
    }

    /// ApplyBundle and Rollback calls, whatever they did.
    pub fn apply_calls(&self) -> u64 {
        self.inner.apply_calls.load(Ordering::Relaxed)
    }

    /// Applies that carried the bundle's bytes.
    pub fn uploads(&self) -> u64 {
        self.inner.uploads.load(Ordering::Relaxed)
    }

    /// Applies that named the bundle by reference (pulled from
    /// [`publish`]ed bundles).
    pub fn pulls(&self) -> u64 {
        self.inner.pulls.load(Ordering::Relaxed)
    }

    /// The bytes of every ApplyBundle request received (encoded): what a
    /// pusher sent this agent to change its bundle.
    pub fn apply_bytes(&self) -> u64 {
        self.inner.apply_bytes.load(Ordering::Relaxed)
    }

    /// The applied version of every rootlet (by interface name).
    pub fn versions(&self) -> BTreeMap<String, String> {
        lock(&self.inner.state)
            .rootlets
            .values()
            .map(|r| (r.ifname.clone(), r.applied_version.clone()))
            .collect()
    }

    /// The version of the rootlet on `ifname`, if loaded.
    pub fn version_of(&self, ifname: &str) -> Option<String> {
        self.versions().get(ifname).cloned()
    }

    /// The stages of the rootlet on `ifname` (None: no rootlet there).
    pub fn stages_of(&self, ifname: &str) -> Option<Vec<String>> {
        lock(&self.inner.state)
            .rootlets
            .values()
            .find(|r| r.ifname == ifname)
            .map(|r| r.stages.iter().map(|s| s.name.clone()).collect())
    }

    /// The counters of stage `stage` of the rootlet on `ifname`, with the
    /// simulated traffic run up to now.
    pub fn counters_of(&self, ifname: &str, stage: &str) -> Option<pb::Counters> {
        let mut st = lock(&self.inner.state);
        let r = st.rootlets.values_mut().find(|r| r.ifname == ifname)?;
        self.advance(r);
        r.stages
            .iter()
            .find(|s| s.name == stage)
            .map(|s| s.counters)
    }

    /// Replaces the program of stage `stage` on `ifname` behind the agent's
    /// back (as a person with bpftool could): `GetApplyStatus` then reports
    /// the stage's drift, derived from what runs.
    pub fn replace_out_of_band(&self, ifname: &str, stage: &str) {
        let prog_id = self.prog_id();
        let mut st = lock(&self.inner.state);
        if let Some(s) = st
            .rootlets
            .values_mut()
            .filter(|r| r.ifname == ifname)
            .flat_map(|r| r.stages.iter_mut())
            .find(|s| s.name == stage)
        {
            s.prog_id = prog_id;
            s.digest = format!("{:064x}", prog_id);
        }
    }

    /// Links stage `name` of team `owner` on `ifname` (loading the rootlet
    /// if needed), outside any bundle: what another team's own tooling
    /// would do on a real agent.
    pub fn add_foreign_stage(&self, ifname: &str, name: &str, owner: &str, priority: i32) {
        let prog_id = self.prog_id();
        let mut st = lock(&self.inner.state);
        let key = (String::new(), ifname.to_string());
        if !st.rootlets.contains_key(&key) {
            st.next_ifindex += 1;
            let id = format!("netns:4026531840/if:{}", st.next_ifindex + 1);
            st.rootlets.insert(
                key.clone(),
                SimRootlet {
                    id,
                    netns: String::new(),
                    ifname: ifname.to_string(),
                    generation: 0,
                    bundle: String::new(),
                    applied_version: String::new(),
                    applied_digest: String::new(),
                    last_attempt: None,
                    stages: Vec::new(),
                    next_slot: 0,
                    traffic_at: Instant::now(),
                    loaded_by: String::new(),
                },
            );
        }
        if let Some(r) = st.rootlets.get_mut(&key) {
            r.next_slot += 1;
            r.stages.push(SimStage {
                slot: r.next_slot - 1,
                name: name.to_string(),
                owner: owner.to_string(),
                priority,
                digest: String::new(),
                prog_id,
                aborts: name.starts_with("abort"),
                counters: pb::Counters::default(),
                bundle: String::new(),
                bundle_digest: String::new(),
                policy: None,
                policy_history: Vec::new(),
            });
            r.stages
                .sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
            r.generation += 1;
            self.notify(r, "changed");
        }
    }

    async fn enter(&self) -> Result<(), Status> {
        self.inner.rpcs.fetch_add(1, Ordering::Relaxed);
        if self.inner.silent.load(Ordering::SeqCst) {
            tokio::time::sleep(SILENT_HOLD).await;
            return Err(Status::unavailable("simulated agent stopped answering"));
        }
        Ok(())
    }

    /// Tells the watchers that `r` changed (`cause`, as the agent's Watch
    /// says it).
    fn notify(&self, r: &SimRootlet, cause: &str) {
        // No receiver (nobody watches) is not an error.
        let _ = self.inner.events.send(pb::WatchEvent {
            rootlet_id: r.id.clone(),
            cause: cause.into(),
            rootlet: Some(self.state_of(r)),
        });
    }

    fn prog_id(&self) -> u32 {
        self.inner.next_prog.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs the simulated traffic up to now.
    fn advance(&self, r: &mut SimRootlet) {
        let now = Instant::now();
        let dt = now.duration_since(r.traffic_at);
        let packets = (self.inner.opts.pps as f64 * dt.as_secs_f64()) as u64;
        if packets == 0 {
            return;
        }
        r.traffic_at = now;
        for s in r.stages.iter_mut() {
            if s.aborts {
                s.counters.aborted += packets;
                return;
            }
            if s.policy.as_ref().is_some_and(|p| p.blocks_all) {
                s.counters.drop += packets;
                return;
            }
            s.counters.pass += packets;
        }
    }

    fn state_of(&self, r: &SimRootlet) -> pb::RootletState {
        pb::RootletState {
            id: r.id.clone(),
            interface: Some(pb::Interface {
                netns: r.netns.clone(),
                ifname: r.ifname.clone(),
            }),
            backend: pb::Backend::Tailcall as i32,
            generation: r.generation,
            slots: r
                .stages
                .iter()
                .enumerate()
                .map(|(pos, s)| pb::Slot {
                    slot: s.slot,
                    position: pos as u32,
                    stage: s.name.clone(),
                    owner: s.owner.clone(),
                    priority: s.priority,
                    digest: s.digest.clone(),
                    pinned: true,
                    program: Some(pb::Program {
                        id: s.prog_id,
                        name: s.name.clone(),
                        ..Default::default()
                    }),
                    counters: Some(s.counters),
                    policy_version: s.policy.as_ref().map_or(0, |p| p.version),
                    policy_digest: s
                        .policy
                        .as_ref()
                        .map(|p| p.digest.clone())
                        .unwrap_or_default(),
                    ..Default::default()
                })
                .collect(),
            applied_version: r.applied_version.clone(),
            last_attempt: r.last_attempt.clone(),
            ..Default::default()
        }
    }

    fn find(st: &mut SimState, r: Option<pb::RootletRef>) -> Result<&mut SimRootlet, Status> {
        let r = r
            .and_then(|r| r.r#ref)
            .ok_or_else(|| Status::invalid_argument("rootlet: required"))?;
        let found = match r {
            pb::rootlet_ref::Ref::Id(id) => st.rootlets.values_mut().find(|x| x.id == id),
            pb::rootlet_ref::Ref::Interface(i) => st.rootlets.get_mut(&(i.netns, i.ifname)),
        };
        found.ok_or_else(|| Status::not_found("no such rootlet on this (simulated) agent"))
    }

    fn apply(&self, req: pb::ApplyBundleRequest) -> Result<pb::ApplyBundleResponse, Status> {
        self.inner.apply_calls.fetch_add(1, Ordering::Relaxed);
        self.inner
            .apply_bytes
            .fetch_add(prost::Message::encoded_len(&req) as u64, Ordering::Relaxed);
        let mut st = lock(&self.inner.state);
        let req_hash = {
            let mut h = Sha256::new();
            match &req.source {
                Some(pb::apply_bundle_request::Source::Bundle(b)) => h.update(b),
                Some(pb::apply_bundle_request::Source::Digest(d)) => h.update(d.as_bytes()),
                Some(pb::apply_bundle_request::Source::Reference(r)) => h.update(r.as_bytes()),
                None => {}
            }
            hex::encode(h.finalize())
        };
        if !req.idempotency_key.is_empty()
            && let Some((hash, resp)) = st.idempotency.get(&req.idempotency_key)
        {
            if *hash == req_hash {
                return Ok(resp.clone());
            }
            return Err(Status::already_exists(
                "idempotency key reused for another request",
            ));
        }
        let bytes = match req.source {
            Some(pb::apply_bundle_request::Source::Bundle(b)) => {
                self.inner.uploads.fetch_add(1, Ordering::Relaxed);
                b
            }
            Some(pb::apply_bundle_request::Source::Digest(d)) => {
                st.bundles.get(&d).map(|b| b.to_vec()).ok_or_else(|| {
                    Status::not_found(format!("no bundle with digest {d} on this agent"))
                })?
            }
            Some(pb::apply_bundle_request::Source::Reference(r)) => {
                let pulled = published()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&r)
                    .cloned();
                let bytes = pulled.ok_or_else(|| {
                    Status::not_found(format!("{r}: not found in the (simulated) registry"))
                })?;
                self.inner.pulls.fetch_add(1, Ordering::Relaxed);
                bytes.to_vec()
            }
            None => {
                return Err(Status::invalid_argument(
                    "source: a bundle or a digest is required",
                ));
            }
        };
        let signed = SignedBundle::from_bytes(&bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let bundle = signed.bundle;
        let m = bundle.manifest().clone();
        let digest = bundle.digest();
        st.bundles.insert(digest.clone(), intern(&digest, bytes));
        let keys: Vec<(String, String)> = m
            .rootlets
            .iter()
            .map(|t| (t.netns.clone().unwrap_or_default(), t.interface.clone()))
            .collect();
        let now = now_ms();
        let attempt = |outcome: &str, error: &str| pb::Attempt {
            version: m.version.clone(),
            outcome: outcome.into(),
            error: error.into(),
            at_unix_ms: now,
            digest: digest.clone(),
            idempotency_key: req.idempotency_key.clone(),
        };
        if self.inner.nack.load(Ordering::SeqCst) {
            let nack = attempt("nack", "simulated failure");
            for k in &keys {
                if let Some(r) = st.rootlets.get_mut(k) {
                    r.last_attempt = Some(nack.clone());
                }
            }
            if !req.idempotency_key.is_empty() {
                st.keyed.insert(req.idempotency_key.clone(), nack);
            }
            return Err(Status::failed_precondition(format!(
                "bundle `{}` {} was not applied: simulated failure; every rootlet keeps its previous version",
                m.name, m.version
            )));
        }
        let noop = keys.iter().all(|k| {
            st.rootlets
                .get(k)
                .is_some_and(|r| r.applied_digest == digest)
        });
        let mut outcomes = Vec::new();
        for (t, k) in m.rootlets.iter().zip(&keys) {
            if !st.rootlets.contains_key(k) {
                st.next_ifindex += 1;
                let id = format!("netns:4026531840/if:{}", st.next_ifindex + 1);
                st.rootlets.insert(
                    k.clone(),
                    SimRootlet {
                        id,
                        netns: k.0.clone(),
                        ifname: k.1.clone(),
                        generation: 0,
                        bundle: String::new(),
                        applied_version: String::new(),
                        applied_digest: String::new(),
                        last_attempt: None,
                        stages: Vec::new(),
                        next_slot: 0,
                        traffic_at: Instant::now(),
                        loaded_by: m.name.clone(),
                    },
                );
            }
            let Some(r) = st.rootlets.get_mut(k) else {
                continue;
            };
            self.advance(r);
            if !noop {
                let mut stages: Vec<&rootlet_bundle::Stage> = m.stages_for(t).collect();
                stages.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
                // Another team's stages stay as they are.
                let mut next: Vec<SimStage> = r
                    .stages
                    .iter()
                    .filter(|o| o.bundle != m.name && !stages.iter().any(|s| s.name == o.name))
                    .cloned()
                    .collect();
                for s in stages {
                    let old = r.stages.iter().find(|o| o.name == s.name);
                    // A replaced stage keeps its maps, and so its policy.
                    let (policy, policy_history) = old.map_or_else(Default::default, |o| {
                        (o.policy.clone(), o.policy_history.clone())
                    });
                    let (slot, counters) = match old {
                        Some(o) => (o.slot, o.counters),
                        None => {
                            r.next_slot += 1;
                            (r.next_slot - 1, pb::Counters::default())
                        }
                    };
                    next.push(SimStage {
                        slot,
                        name: s.name.clone(),
                        owner: s.owner.clone(),
                        priority: s.priority,
                        digest: s.sha256.clone().unwrap_or_default(),
                        prog_id: self.prog_id(),
                        aborts: s.name.starts_with("abort"),
                        counters,
                        bundle: m.name.clone(),
                        bundle_digest: s.sha256.clone().unwrap_or_default(),
                        policy,
                        policy_history,
                    });
                }
                next.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
                r.stages = next;
                r.generation += 1;
                r.bundle = m.name.clone();
                r.applied_version = m.version.clone();
                r.applied_digest = digest.clone();
                r.last_attempt = Some(attempt("ack", ""));
                self.notify(r, "changed");
            }
            outcomes.push(pb::RootletOutcome {
                rootlet_id: r.id.clone(),
                generation: r.generation,
                changed: !noop,
            });
        }
        if !req.idempotency_key.is_empty() {
            st.keyed
                .insert(req.idempotency_key.clone(), attempt("ack", ""));
        }
        st.removed.remove(&m.name);
        if !noop {
            self.inner.applies.fetch_add(1, Ordering::Relaxed);
            let h = st.history.entry(m.name.clone()).or_default();
            h.retain(|e| e.digest != digest);
            h.insert(
                0,
                HistoryEntry {
                    version: m.version.clone(),
                    digest: digest.clone(),
                    at: now,
                },
            );
            h.truncate(HISTORY);
        }
        let resp = pb::ApplyBundleResponse {
            digest,
            version: m.version,
            noop,
            rootlets: outcomes,
            removed: false,
        };
        if !req.idempotency_key.is_empty() {
            st.idempotency
                .insert(req.idempotency_key, (req_hash, resp.clone()));
        }
        Ok(resp)
    }

    /// RemoveBundle, as the real agent does it: the bundle's stages go,
    /// a rootlet it loaded goes once no other stage is left, and nothing
    /// else is touched.
    fn remove(&self, req: pb::RemoveBundleRequest) -> Result<pb::ApplyBundleResponse, Status> {
        self.inner.apply_calls.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.inner.state);
        let req_hash = format!("remove\0{}\0{}", req.name, req.expected_digest);
        if !req.idempotency_key.is_empty()
            && let Some((hash, resp)) = st.idempotency.get(&req.idempotency_key)
        {
            if *hash == req_hash {
                return Ok(resp.clone());
            }
            return Err(Status::already_exists(
                "idempotency key reused for another request",
            ));
        }
        let current = st
            .history
            .get(&req.name)
            .and_then(|h| h.first())
            .filter(|_| !st.removed.contains(&req.name))
            .cloned();
        if !req.expected_digest.is_empty()
            && let Some(c) = &current
            && c.digest != req.expected_digest
        {
            return Err(Status::failed_precondition(format!(
                "bundle `{}` runs {} here, not the expected digest",
                req.name, c.version
            )));
        }
        let now = now_ms();
        let Some(current) = current else {
            return Ok(pb::ApplyBundleResponse {
                noop: true,
                removed: true,
                ..Default::default()
            });
        };
        let attempt = pb::Attempt {
            version: current.version.clone(),
            outcome: "removed".into(),
            error: String::new(),
            at_unix_ms: now,
            digest: current.digest.clone(),
            idempotency_key: req.idempotency_key.clone(),
        };
        let mut outcomes = Vec::new();
        let mut gone = Vec::new();
        for (k, r) in st.rootlets.iter_mut() {
            if r.bundle != req.name && !r.stages.iter().any(|s| s.bundle == req.name) {
                continue;
            }
            self.advance(r);
            r.stages.retain(|s| s.bundle != req.name);
            r.generation += 1;
            r.bundle.clear();
            r.applied_version.clear();
            r.applied_digest.clear();
            r.last_attempt = Some(attempt.clone());
            if r.loaded_by == req.name && r.stages.is_empty() {
                gone.push(k.clone());
            } else {
                self.notify(r, "changed");
            }
            outcomes.push(pb::RootletOutcome {
                rootlet_id: r.id.clone(),
                generation: r.generation,
                changed: true,
            });
        }
        for k in gone {
            if let Some(r) = st.rootlets.remove(&k) {
                let _ = self.inner.events.send(pb::WatchEvent {
                    rootlet_id: r.id,
                    cause: "unloaded".into(),
                    rootlet: None,
                });
            }
        }
        st.removed.insert(req.name.clone());
        self.inner.applies.fetch_add(1, Ordering::Relaxed);
        let resp = pb::ApplyBundleResponse {
            digest: current.digest,
            version: current.version,
            noop: false,
            rootlets: outcomes,
            removed: true,
        };
        if !req.idempotency_key.is_empty() {
            st.keyed.insert(req.idempotency_key.clone(), attempt);
            st.idempotency
                .insert(req.idempotency_key, (req_hash, resp.clone()));
        }
        Ok(resp)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::rootlet_server::Rootlet for SimAgent {
    async fn get_capabilities(
        &self,
        _: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::Capabilities>, Status> {
        self.enter().await?;
        Ok(Response::new(pb::Capabilities {
            kernel: "SIMULATED".into(),
            probes: Vec::new(),
            backend: pb::Backend::Tailcall as i32,
        }))
    }

    async fn load_rootlet(
        &self,
        _: Request<pb::LoadRootletRequest>,
    ) -> Result<Response<pb::RootletState>, Status> {
        self.enter().await?;
        Err(Status::unimplemented(
            "the simulated agent loads rootlets through bundles only",
        ))
    }

    async fn get_verifier_log(
        &self,
        _: Request<pb::GetVerifierLogRequest>,
    ) -> Result<Response<pb::VerifierLog>, Status> {
        self.enter().await?;
        Err(Status::not_found(
            "the simulated agent loads no programs: no verifier log",
        ))
    }

    async fn list_rootlets(
        &self,
        _: Request<pb::ListRootletsRequest>,
    ) -> Result<Response<pb::ListRootletsResponse>, Status> {
        self.enter().await?;
        let mut st = lock(&self.inner.state);
        let mut rootlets = Vec::new();
        for r in st.rootlets.values_mut() {
            self.advance(r);
            rootlets.push(self.state_of(r));
        }
        Ok(Response::new(pb::ListRootletsResponse { rootlets }))
    }

    async fn get_rootlet(
        &self,
        req: Request<pb::GetRootletRequest>,
    ) -> Result<Response<pb::RootletState>, Status> {
        self.enter().await?;
        let mut st = lock(&self.inner.state);
        let r = Self::find(&mut st, req.into_inner().rootlet)?;
        self.advance(r);
        Ok(Response::new(self.state_of(r)))
    }

    async fn unload_rootlet(
        &self,
        _: Request<pb::UnloadRootletRequest>,
    ) -> Result<Response<pb::UnloadRootletResponse>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    async fn link_stage(
        &self,
        _: Request<pb::LinkStageRequest>,
    ) -> Result<Response<pb::ChangeResult>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    async fn replace_stage(
        &self,
        _: Request<pb::ReplaceStageRequest>,
    ) -> Result<Response<pb::ChangeResult>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    async fn unlink_stage(
        &self,
        _: Request<pb::UnlinkStageRequest>,
    ) -> Result<Response<pb::ChangeResult>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    async fn set_stage_pin(
        &self,
        _: Request<pb::SetStagePinRequest>,
    ) -> Result<Response<pb::ChangeResult>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    /// Refused as a real agent refuses it here: every simulated change is
    /// a bundle's, so the previous generation differs in a bundle's stage
    /// (which a rootlet rollback may not revert) wherever one runs; a
    /// rootlet without one keeps no earlier generation.
    async fn rollback_rootlet(
        &self,
        req: Request<pb::RollbackRootletRequest>,
    ) -> Result<Response<pb::RollbackRootletResponse>, Status> {
        self.enter().await?;
        let mut st = lock(&self.inner.state);
        let r = Self::find(&mut st, req.into_inner().rootlet)?;
        match r.stages.iter().find(|s| !s.bundle.is_empty()) {
            Some(s) => Err(Status::failed_precondition(format!(
                "stage `{}` on {} belongs to bundle `{}`, and the previous generation differs in it; \
                 roll the bundle back instead (its Rollback RPC, or `rootletctl rollout undo` of the \
                 rollout that pushed it)",
                s.name, r.id, s.bundle
            ))),
            _ => Err(Status::failed_precondition(format!(
                "no instant rollback on {}: no previous generation is kept (none yet, or the last \
                 change failed)",
                r.id
            ))),
        }
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.enter().await?;
        let mut st = lock(&self.inner.state);
        let r = Self::find(&mut st, req.into_inner().rootlet)?;
        self.advance(r);
        Ok(Response::new(pb::GetStatsResponse {
            rootlet_id: r.id.clone(),
            generation: r.generation,
            slots: r
                .stages
                .iter()
                .map(|s| pb::SlotStats {
                    slot: s.slot,
                    stage: s.name.clone(),
                    counters: Some(s.counters),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }))
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.enter().await?;
        // Every rootlet (a filter is not simulated): a snapshot of each,
        // then each change as it happens.
        let events = self.inner.events.subscribe();
        let snapshot: Vec<Result<pb::WatchEvent, Status>> = {
            let mut st = lock(&self.inner.state);
            st.rootlets
                .values_mut()
                .map(|r| {
                    self.advance(r);
                    Ok(pb::WatchEvent {
                        rootlet_id: r.id.clone(),
                        cause: "snapshot".into(),
                        rootlet: Some(self.state_of(r)),
                    })
                })
                .collect()
        };
        // A watcher that fell behind lost events: DATA_LOSS ends its stream
        // (tonic sends an error as the trailers), as the agent's does.
        let changes = tokio_stream::wrappers::BroadcastStream::new(events).map(|e| {
            e.map_err(|lag| Status::data_loss(format!("watcher fell behind: {lag}; watch again")))
        });
        Ok(Response::new(Box::pin(
            futures::stream::iter(snapshot).chain(changes),
        )))
    }

    async fn renew_lease(
        &self,
        _: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    type KeepAliveStream = BoxStream<pb::RenewLeaseResponse>;

    async fn keep_alive(
        &self,
        _: Request<Streaming<pb::RenewLeaseRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        self.enter().await?;
        Err(Status::unimplemented("not simulated"))
    }

    async fn has_bundle(
        &self,
        req: Request<pb::HasBundleRequest>,
    ) -> Result<Response<pb::HasBundleResponse>, Status> {
        self.enter().await?;
        let present = lock(&self.inner.state)
            .bundles
            .contains_key(&req.into_inner().digest);
        Ok(Response::new(pb::HasBundleResponse { present }))
    }

    async fn apply_bundle(
        &self,
        req: Request<pb::ApplyBundleRequest>,
    ) -> Result<Response<pb::ApplyBundleResponse>, Status> {
        self.enter().await?;
        self.apply(req.into_inner()).map(Response::new)
    }

    async fn get_apply_status(
        &self,
        req: Request<pb::GetApplyStatusRequest>,
    ) -> Result<Response<pb::ApplyStatus>, Status> {
        self.enter().await?;
        let req = req.into_inner();
        let mut st = lock(&self.inner.state);
        let keyed_attempt = (!req.idempotency_key.is_empty())
            .then(|| st.keyed.get(&req.idempotency_key).cloned())
            .flatten();
        let r = Self::find(&mut st, req.rootlet)?;
        Ok(Response::new(pb::ApplyStatus {
            rootlet_id: r.id.clone(),
            applied_version: r.applied_version.clone(),
            applied_digest: r.applied_digest.clone(),
            last_attempt: r.last_attempt.clone(),
            bundle: r.bundle.clone(),
            drift: r
                .stages
                .iter()
                .filter(|s| !s.bundle.is_empty() && s.digest != s.bundle_digest)
                .map(|s| pb::StageDrift {
                    bundle: s.bundle.clone(),
                    stage: s.name.clone(),
                    expected_digest: s.bundle_digest.clone(),
                    running_digest: s.digest.clone(),
                    reason: "replaced out of band".into(),
                })
                .collect(),
            keyed_attempt,
            undo: None,
            // The simulator models one bundle per rootlet.
            applied: if r.applied_digest.is_empty() {
                vec![]
            } else {
                vec![pb::AppliedBundle {
                    name: r.bundle.clone(),
                    version: r.applied_version.clone(),
                    digest: r.applied_digest.clone(),
                }]
            },
        }))
    }

    async fn list_bundles(
        &self,
        _: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesResponse>, Status> {
        self.enter().await?;
        let st = lock(&self.inner.state);
        let mut bundles = Vec::new();
        for (name, h) in &st.history {
            let removed = st.removed.contains(name);
            for (i, e) in h.iter().enumerate() {
                bundles.push(pb::BundleInfo {
                    name: name.clone(),
                    version: e.version.clone(),
                    digest: e.digest.clone(),
                    applied_at_unix_ms: e.at,
                    current: i == 0 && !removed,
                    removed: i == 0 && removed,
                });
            }
        }
        bundles.sort_by_key(|b| std::cmp::Reverse(b.applied_at_unix_ms));
        Ok(Response::new(pb::ListBundlesResponse { bundles }))
    }

    async fn remove_bundle(
        &self,
        req: Request<pb::RemoveBundleRequest>,
    ) -> Result<Response<pb::ApplyBundleResponse>, Status> {
        self.enter().await?;
        self.remove(req.into_inner()).map(Response::new)
    }

    async fn list_stage_maps(
        &self,
        _: Request<pb::ListStageMapsRequest>,
    ) -> Result<Response<pb::ListStageMapsResponse>, Status> {
        self.enter().await?;
        Err(Status::unimplemented(
            "the simulated agent has no maps: not simulated",
        ))
    }

    async fn dump_map(
        &self,
        _: Request<pb::DumpMapRequest>,
    ) -> Result<Response<pb::DumpMapResponse>, Status> {
        self.enter().await?;
        Err(Status::unimplemented(
            "the simulated agent has no maps: not simulated",
        ))
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        self.enter().await?;
        self.apply_policy_now(req.into_inner()).map(Response::new)
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        self.enter().await?;
        self.get_policy_now(req.into_inner()).map(Response::new)
    }

    async fn rollback_policy(
        &self,
        req: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        self.enter().await?;
        self.rollback_policy_now(req.into_inner())
            .map(Response::new)
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ApplyBundleResponse>, Status> {
        self.enter().await?;
        let r = req.into_inner();
        let to = {
            let st = lock(&self.inner.state);
            let (_, h) = if r.name.is_empty() {
                st.history.iter().next()
            } else {
                st.history.iter().find(|(n, _)| **n == r.name)
            }
            .ok_or_else(|| Status::not_found("no such bundle"))?;
            if r.to_digest.is_empty() {
                h.get(1).map(|e| e.digest.clone())
            } else {
                h.iter()
                    .find(|e| e.digest == r.to_digest)
                    .map(|e| e.digest.clone())
            }
            .ok_or_else(|| Status::failed_precondition("no earlier version to roll back to"))?
        };
        self.apply(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Digest(to)),
            idempotency_key: r.idempotency_key,
            expected_generations: Default::default(),
        })
        .map(Response::new)
    }
}

#[tonic::async_trait]
impl Health for SimAgent {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.enter().await?;
        let service = req.into_inner().service;
        if !service.is_empty() && service != HEALTH_SERVICE {
            return Err(Status::not_found(format!("unknown service {service}")));
        }
        let status = if self.inner.unhealthy.load(Ordering::SeqCst) {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not simulated"))
    }
}

/// A simulated agent serving on loopback; stops when dropped.
pub struct SimHandle {
    pub agent: SimAgent,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// Stops serving (connections are closed).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves a new simulated agent on `127.0.0.1:0`.
pub async fn spawn(opts: SimOptions) -> std::io::Result<SimHandle> {
    spawn_on(std::net::Ipv4Addr::LOCALHOST, opts).await
}

/// [`spawn`] on `ip` (any of 127.0.0.0/8: each has its own ports, so a
/// bench can serve more agents than one address has ephemeral ports).
pub async fn spawn_on(ip: std::net::Ipv4Addr, opts: SimOptions) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    let agent = SimAgent::new(opts);
    let (tx, rx) = oneshot::channel::<()>();
    let svc = RootletServer::new(agent.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let health = HealthServer::new(agent.clone());
    // TCP_NODELAY on every accepted socket, as rootletd sets it: without
    // it a response's frames waited on the client's delayed ACK, and the
    // fleet benchmark measured tens of milliseconds of Nagle per RPC, not
    // the client (24 s against 7 s for 10 000 hosts).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
    });
    Ok(SimHandle {
        agent,
        addr,
        shutdown: Some(tx),
        task: Some(task),
    })
}
