//! The agent: what `rootletd` does on top of the data plane, independent of
//! gRPC. Authorization of every call, stage ownership, leases, bundles
//! applied as transactions over every rootlet they touch, the apply status
//! of each rootlet (the applied version of every bundle on it,
//! `last_attempt`), bundle history for
//! rollback, and change events for watchers.
//!
//! Every method here blocks (the data plane makes syscalls); the API layer
//! calls them from `spawn_blocking`.
//!
//! **Architecture invariant:** the agent knows nothing about gRPC; `api/`
//! translates requests and errors.

pub mod authz;
mod bundles;
pub mod crash;
pub mod policy;
mod reconcile;
mod remove;
pub mod retention;
mod rollback;
mod undo;

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rootlet_bundle::{BundleError, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub use authz::{Authz, AuthzConfig, Caller, Denied, Grant, IdentityConfig, Role};
pub use bundles::{ApplyOutcome, BundleSource, StageDrift, StatusView};
pub use rollback::{RollbackHow, RollbackOutcome};
use rootlet_dataplane::{
    self as dataplane, Dataplane, budget,
    kv::{Kv, KvError},
    spec::{Change, InterfaceRef, RootletKey, RootletSpec, StageSpec},
    state::RootletState,
};
pub use undo::{UndoChange, UndoCounts, UndoOutstanding};

/// One per-slot, per-action packet counter, as the agent reads it from the
/// kernel at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSample {
    /// The rootlet id (`netns:<inode>/if:<ifindex>`).
    pub rootlet: String,
    pub slot: u32,
    pub stage: String,
    /// `aborted`, `drop`, `pass`, `tx`, `redirect`, `empty`.
    pub action: &'static str,
    pub packets: u64,
}

/// What the agent needs from `rootletd`'s configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub dataplane: dataplane::Config,
    /// The agent's own store (`state_dir/agent.redb`).
    pub store_path: std::path::PathBuf,
    /// Keys whose bundle signatures are accepted (files of PEM public keys).
    pub trusted_keys: Vec<std::path::PathBuf>,
    pub authz: AuthzConfig,
    pub allow_unsigned: bool,
    /// How many applied bundles per name are kept for rollback (at least 1).
    pub history: usize,
    /// Plain TCP without client certificates was configured.
    pub insecure_tcp: bool,
    /// How often the background compares every rootlet with the kernel.
    pub drift_check: Option<Duration>,
    /// How long an idempotency record is replayed (see [`retention`]).
    pub idempotency_ttl: Duration,
    /// How many applied policy versions per stage are kept for rollback
    /// (at least 1).
    pub policy_history: usize,
}

/// Why the agent refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Dataplane(#[from] dataplane::Error),
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
    #[error("policy: {0}")]
    Policy(#[from] rootlet_bundle::PolicyError),
    #[error("bundle `{name}` {version} was not applied: {source}; {}", restored_note(.unrestored))]
    Nack {
        name: String,
        version: String,
        rootlet: String,
        #[source]
        source: Box<AgentError>,
        /// Rootlets the undo could not put back, with why: they may run a
        /// mix (GetApplyStatus reports their drift).
        unrestored: Vec<(String, String)>,
    },
    #[error("bundle `{name}`: {current} is its current version here, not {expected}")]
    NotCurrent {
        name: String,
        expected: String,
        current: String,
    },
    /// The stage's owner read at the start of a call is not its owner
    /// under the rootlet's lock, where the change applies: another caller
    /// unlinked it, linked it again or re-assigned it meanwhile. Nothing
    /// changed; a retry is authorised against the new owner.
    #[error("stage `{stage}` on {rootlet} {} during the call; nothing changed, retry", owner_change(.read, .now))]
    OwnerChanged {
        rootlet: String,
        stage: String,
        /// The owner when the call started (None: no such stage).
        read: Option<String>,
        /// The owner under the lock (None: the stage is gone).
        now: Option<String>,
    },
    /// A bundle names a stage that runs on the rootlet but that the bundle
    /// does not manage (linked by a team or another bundle): the bundle
    /// could not put it back if its apply failed.
    #[error(
        "stage `{stage}` on {rootlet} (owner `{owner}`) is not managed by bundle `{bundle}`; unlink it first"
    )]
    NotManagedByBundle {
        rootlet: String,
        stage: String,
        bundle: String,
        owner: String,
    },
    /// A rootlet rollback would change a stage that a bundle put there
    /// (by identity): the bundle's record would no longer say what runs.
    #[error(
        "stage `{stage}` on {rootlet} belongs to bundle `{bundle}`, and the previous generation differs in it; roll the bundle back instead (its Rollback RPC, or `rootletctl rollout undo` of the rollout that pushed it)"
    )]
    ManagedByBundle {
        rootlet: String,
        stage: String,
        bundle: String,
    },
    /// The undo of a failed bundle apply lost the race with other changes
    /// to the rootlet every time it tried.
    #[error("{rootlet} kept changing during the undo ({attempts} attempts); retry")]
    UndoContended { rootlet: String, attempts: usize },
    /// A failure made on purpose by a test-only fault point
    /// (`crash::FAIL_UNDO_ENV`).
    #[error("{0}")]
    InjectedFault(String),
    #[error("map `{map}` of stage `{stage}` took another policy during the dump; start it again")]
    DumpInterrupted { stage: String, map: String },
    #[error("stage `{stage}` keeps no {} to roll back to", if *.to == 0 { "earlier policy version".to_owned() } else { format!("policy version {}", .to) })]
    NoPolicyToRollBack { stage: String, to: u64 },
    #[error("stage `{stage}` runs policy version {current}, not {expected}")]
    PolicyVersionMismatch {
        stage: String,
        expected: u64,
        current: u64,
    },
    #[error("no earlier version of bundle `{0}` to roll back to")]
    NothingToRollBack(String),
    #[error("idempotency key `{0}` was already used for a different request")]
    IdempotencyConflict(String),
    #[error(transparent)]
    Store(#[from] KvError),
    #[error("cannot read trusted key {path}: {source}")]
    TrustedKey {
        path: String,
        #[source]
        source: BundleError,
    },
    /// A bundle named by an OCI reference could not be fetched. The API
    /// layer pulls it (this crate has no registry client); nothing changed.
    #[error("bundle {reference}: {detail}")]
    Fetch {
        reference: String,
        failure: FetchFailure,
        detail: String,
    },
}

/// Why a bundle named by reference could not be fetched: the one
/// vocabulary for the API layer's status mapping, whatever client pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure {
    /// Not `registry/repo@sha256:<hex>`.
    Reference,
    /// The agent's configuration does not allow-list the registry.
    NotAllowed,
    NotFound,
    Unavailable,
    /// The registry's certificate was refused.
    Tls,
    /// The registry refused the agent's credentials.
    Denied,
    /// The manifest or the layer is not what its digest says.
    DigestMismatch,
    /// The artifact is not a Rootlet bundle.
    NotABundle,
    TooLarge,
    /// Anything else the registry answered.
    Registry,
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

fn owner_name(owner: &Option<String>) -> String {
    match owner {
        Some(o) => format!("`{o}`"),
        None => "none".to_owned(),
    }
}

/// The identity recorded for a managed stage that did not run when its
/// identity was taken (see [`ApplyStatus::linked`]): no stage has it, so
/// any stage of that name linked later is another's, as one linked again
/// after the bundle's was unlinked is.
pub const NOT_RUNNING: u64 = u64::MAX;

/// What happened to a stage between a call's read and its lock: a new
/// owner, or (the same owner) a new stage of the same name, one that was
/// unlinked and linked again.
fn owner_change(read: &Option<String>, now: &Option<String>) -> String {
    if read == now {
        format!("was unlinked and linked again (owner {})", owner_name(now))
    } else {
        format!(
            "changed owner (from {} to {})",
            owner_name(read),
            owner_name(now)
        )
    }
}

fn restored_note(unrestored: &[(String, String)]) -> String {
    if unrestored.is_empty() {
        return "every rootlet keeps its previous version".into();
    }
    let which: Vec<String> = unrestored
        .iter()
        .map(|(rootlet, why)| format!("{rootlet} ({why})"))
        .collect();
    format!(
        "the undo failed on {}: they run part of this version until the agent's retry of the undo \
         restores them (outcome undo_failed; see their apply status); every other rootlet keeps \
         its previous version",
        which.join(", ")
    )
}

/// One bundle attempt on a rootlet, as xDS clients report ACK/NACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub version: String,
    pub digest: String,
    /// "ack", "nack", "removed", or "undo_failed": the apply failed and
    /// its undo could not put this rootlet back ([`ApplyStatus::undo`]
    /// says why; the agent retries it). Once a retry restores the rootlet
    /// the outcome becomes "nack".
    pub outcome: String,
    pub error: String,
    pub at_unix_ms: i64,
    /// The idempotency key of the call that made the attempt, if any.
    #[serde(default)]
    pub idempotency_key: String,
}

/// An apply (or removal) under way on a rootlet, written before the data
/// plane changes anything: if the agent dies before the outcome is
/// recorded, adoption finds it and records what the kernel runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub bundle: String,
    pub version: String,
    pub digest: String,
    pub idempotency_key: String,
    /// The apply loads the rootlet.
    pub loads: bool,
    pub at_unix_ms: i64,
}

/// The version of one bundle that runs on a rootlet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: String,
    pub digest: String,
    /// When it was applied (0: recorded by an earlier agent).
    #[serde(default)]
    pub at_unix_ms: i64,
}

/// The bundle state of one rootlet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyStatus {
    /// The bundle last applied successfully here (name, version, digest),
    /// one of [`Self::applied`]; kept for callers that know one bundle per
    /// rootlet. Maintained by [`Self::set_applied`] and
    /// [`Self::clear_applied`].
    pub bundle: String,
    pub applied_version: String,
    pub applied_digest: String,
    /// By bundle name: the version of every bundle applied here (several
    /// bundles with distinct stages can share a rootlet). A store written
    /// by an earlier agent has only the scalars above: [`Agent::open`]
    /// migrates it.
    #[serde(default)]
    pub applied: BTreeMap<String, Applied>,
    pub last_attempt: Option<Attempt>,
    /// By bundle name: the stages that bundle put here. While an apply is
    /// pending: those of the running and of the new version, so that
    /// whatever a crash left is still the bundle's to replace or unlink.
    pub managed: BTreeMap<String, Vec<String>>,
    /// By bundle name, then stage: the data plane's `linked_generation` of
    /// each stage of [`Self::managed`] as that bundle left it (the
    /// generation that linked it into its slot, kept across replacements).
    /// It is the stage's identity: a stage unlinked and linked again (by
    /// hand, by a team) gets a new one, whoever owns it, so a same-name
    /// stage that is not the one the bundle left is not the bundle's (see
    /// [`Self::is_bundles`]). Written with `managed`, in the same status
    /// record. A store of an earlier agent has none, and an interrupted
    /// apply leaves the stages it linked without one: the agent fills them
    /// in from the kernel when it opens (the one running under the name, or
    /// [`NOT_RUNNING`] when none runs, so that a stage of the name linked
    /// later is not the bundle's). Still missing only for a stage that runs
    /// with no identity of its own (linked by a data plane that recorded
    /// none): that stage is the bundle's by name, as before.
    #[serde(default)]
    pub linked: BTreeMap<String, BTreeMap<String, u64>>,
    /// The bundle whose apply loaded this rootlet (removing it unloads the
    /// rootlet when no other stage is left).
    #[serde(default)]
    pub loaded_by: Option<String>,
    #[serde(default)]
    pub pending: Option<Pending>,
    /// The latest attempts made by calls with an idempotency key, newest
    /// first (at most [`KEYED_ATTEMPTS`]).
    #[serde(default)]
    pub keyed: Vec<Attempt>,
    /// The undo of a failed apply that could not put this rootlet back,
    /// retried in the background until it succeeds or is superseded (see
    /// `undo.rs`).
    #[serde(default)]
    pub undo: Option<UndoOutstanding>,
}

/// How many keyed attempts a rootlet's status keeps.
pub const KEYED_ATTEMPTS: usize = 32;

impl ApplyStatus {
    /// The version of `bundle` applied here, if one is.
    pub fn applied_of(&self, bundle: &str) -> Option<&Applied> {
        self.applied.get(bundle).filter(|a| !a.digest.is_empty())
    }

    /// Records that `bundle` `version` runs here, as the last applied.
    pub fn set_applied(&mut self, bundle: &str, version: &str, digest: &str, at_unix_ms: i64) {
        self.applied.insert(
            bundle.to_owned(),
            Applied {
                version: version.to_owned(),
                digest: digest.to_owned(),
                at_unix_ms,
            },
        );
        self.bundle = bundle.to_owned();
        self.applied_version = version.to_owned();
        self.applied_digest = digest.to_owned();
    }

    /// Records that no version of `bundle` runs here. If it was the last
    /// applied, the newest other bundle that still runs here becomes it.
    pub fn clear_applied(&mut self, bundle: &str) {
        self.applied.remove(bundle);
        if self.bundle != bundle {
            return;
        }
        let newest = self
            .applied
            .iter()
            .filter(|(_, a)| !a.digest.is_empty())
            .max_by_key(|(_, a)| a.at_unix_ms)
            .map(|(name, a)| (name.clone(), a.clone()));
        match newest {
            Some((name, a)) => {
                self.bundle = name;
                self.applied_version = a.version;
                self.applied_digest = a.digest;
            }
            None => {
                self.applied_version.clear();
                self.applied_digest.clear();
            }
        }
    }

    /// A status an earlier agent wrote (only the scalars) with its applied
    /// bundle in [`Self::applied`]; true if it changed.
    pub fn migrate(&mut self) -> bool {
        if !self.applied.is_empty() || self.applied_digest.is_empty() {
            return false;
        }
        self.applied.insert(
            self.bundle.clone(),
            Applied {
                version: self.applied_version.clone(),
                digest: self.applied_digest.clone(),
                at_unix_ms: 0,
            },
        );
        true
    }

    /// Whether the stage named `stage` that runs here with
    /// `linked_generation` is `bundle`'s: the bundle manages that name and
    /// either recorded no identity for it or recorded this one. The rule is
    /// the identity, not the owner: an owner can be the same after a hand
    /// unlink and a link again (the bundle stage's owner linking it by hand
    /// is not the bundle linking it), an identity cannot.
    pub fn is_bundles(&self, bundle: &str, stage: &str, linked_generation: u64) -> bool {
        self.managed
            .get(bundle)
            .is_some_and(|m| m.iter().any(|s| s == stage))
            && self
                .linked
                .get(bundle)
                .and_then(|l| l.get(stage))
                .is_none_or(|g| *g == linked_generation)
    }

    /// Records `attempt` as the last one (and as keyed, if it has a key).
    pub fn attempted(&mut self, attempt: Attempt) {
        if !attempt.idempotency_key.is_empty() {
            self.keyed
                .retain(|a| a.idempotency_key != attempt.idempotency_key);
            self.keyed.insert(0, attempt.clone());
            self.keyed.truncate(KEYED_ATTEMPTS);
        }
        self.last_attempt = Some(attempt);
    }
}

/// A stage linked with a lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub key: RootletKey,
    pub stage: String,
    pub holder: String,
    pub ttl: Duration,
    pub expires: Instant,
}

impl Lease {
    pub fn expires_unix_ms(&self) -> i64 {
        let left = self.expires.saturating_duration_since(Instant::now());
        unix_ms(SystemTime::now() + left)
    }
}

/// A change watchers hear about.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: RootletKey,
    /// "loaded", "changed", "unloaded", "lease-expired", "drift".
    pub cause: &'static str,
}

/// A change to one stage.
#[derive(Debug, Clone)]
pub enum StageOp {
    Link {
        spec: StageSpec,
        lease: Option<Duration>,
    },
    Replace {
        spec: StageSpec,
        lease: Option<Duration>,
    },
    Unlink {
        name: String,
    },
    SetPin {
        name: String,
        pin: bool,
    },
}

impl StageOp {
    fn name(&self) -> &str {
        match self {
            StageOp::Link { spec, .. } | StageOp::Replace { spec, .. } => &spec.name,
            StageOp::Unlink { name } | StageOp::SetPin { name, .. } => name,
        }
    }
}

/// What a stage change did.
#[derive(Debug, Clone)]
pub struct ChangeOutcome {
    pub generation: u64,
    pub lease: Option<Lease>,
}

const STATUS: &str = "status";
/// Signed bundles by digest, raw bytes ([`Kv::put_bytes`]).
const BUNDLES: &str = "bundle_bytes";
/// Where agents before raw bytes kept bundles (hex in JSON); emptied by
/// [`retention`] when the agent opens.
const LEGACY_BUNDLES: &str = "bundles";
const HISTORY: &str = "history";
const IDEMPOTENCY: &str = "idempotency";
/// Longest lease.
pub const MAX_LEASE: Duration = Duration::from_secs(86_400);

pub struct Agent {
    dp: Dataplane,
    kv: Kv,
    authz: Authz,
    trusted: Vec<VerifyingKey>,
    allow_unsigned: bool,
    history: usize,
    leases: Mutex<BTreeMap<String, Lease>>,
    events: broadcast::Sender<Event>,
    /// Bundle applies span rootlets: one at a time.
    bundle_lock: Mutex<()>,
    insecure_tcp: bool,
    crash: crash::CrashAt,
    /// The drift last reported to watchers, per rootlet.
    drift_seen: Mutex<BTreeMap<RootletKey, String>>,
    /// How often the background compares every rootlet with the kernel.
    drift_check: Option<Duration>,
    idempotency_ttl: Duration,
    /// Policy applies: one at a time.
    policy_lock: Mutex<()>,
    policy_history: usize,
    /// Test-only fault injection of undo failures (`ROOTLETD_FAIL_UNDO`).
    fail_undo: crash::FailUndo,
    /// Outstanding undos: how many, their retry times, and counters.
    undos: undo::Undos,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Agent {
    /// Opens the data plane (adopting pinned state) and the agent's store.
    /// While another process holds the store (an old agent still shutting
    /// down), waits for it, up to `wait`.
    pub fn open(config: &Options) -> Result<Arc<Agent>> {
        Self::open_waiting(config, Duration::from_secs(120))
    }

    pub fn open_waiting(config: &Options, wait: Duration) -> Result<Arc<Agent>> {
        let deadline = Instant::now() + wait;
        let crash = crash::CrashAt::from_env();
        let mut dp_config = config.dataplane.clone();
        dp_config.crash_at = crash.dataplane;
        let dp = loop {
            match Dataplane::open(dp_config.clone()) {
                Err(dataplane::Error::StoreLocked { path }) if Instant::now() < deadline => {
                    tracing::warn!(store = %path.display(), "the store is held by another process; waiting");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => break other?,
            }
        };
        let kv = Kv::open_timed(
            &config.store_path,
            &[
                STATUS,
                LEGACY_BUNDLES,
                HISTORY,
                IDEMPOTENCY,
                policy::CURRENT,
                policy::HISTORY,
                policy::PENDING,
            ],
            budget::Step::AgentStore,
        )?;
        kv.open_bytes_table(BUNDLES)?;
        kv.open_bytes_table(policy::DOCUMENTS)?;
        let mut trusted = vec![];
        for path in &config.trusted_keys {
            let key = rootlet_bundle::read_verifying_key(path).map_err(|source| {
                AgentError::TrustedKey {
                    path: Path::new(path).display().to_string(),
                    source,
                }
            })?;
            trusted.push(key);
        }
        let agent = Agent {
            dp,
            kv,
            authz: Authz::new(config.authz.clone()),
            trusted,
            allow_unsigned: config.allow_unsigned,
            history: config.history.max(1),
            leases: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(1024).0,
            bundle_lock: Mutex::new(()),
            insecure_tcp: config.insecure_tcp,
            crash,
            drift_seen: Mutex::new(BTreeMap::new()),
            drift_check: config.drift_check,
            idempotency_ttl: config.idempotency_ttl,
            policy_lock: Mutex::new(()),
            policy_history: config.policy_history.max(1),
            fail_undo: crash::FailUndo::from_env(),
            undos: undo::Undos::default(),
        };
        agent.migrate()?;
        agent.reconcile()?;
        agent.reconcile_policies()?;
        agent.sweep()?;
        agent.count_undos()?;
        Ok(Arc::new(agent))
    }

    /// Plain TCP without client certificates was configured.
    pub fn insecure_tcp(&self) -> bool {
        self.insecure_tcp
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// What `caller` may do.
    pub fn grant(&self, caller: Caller) -> Result<Grant> {
        Ok(self.authz.grant(caller)?)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, key: RootletKey, cause: &'static str) {
        let _ = self.events.send(Event { key, cause });
    }

    /// Resolves an interface to its rootlet key.
    pub fn key_of(&self, iface: &InterfaceRef) -> Result<RootletKey> {
        let netns = iface.netns.as_deref();
        Ok(RootletKey {
            netns_ino: dataplane::netns::inode(netns)?,
            ifindex: dataplane::netns::ifindex(netns, &iface.ifname)?,
        })
    }

    pub fn load_rootlet(&self, grant: &Grant, spec: RootletSpec) -> Result<RootletKey> {
        grant.admin("load rootlets")?;
        let key = self.dp.load_rootlet(spec)?;
        self.emit(key, "loaded");
        Ok(key)
    }

    pub fn unload_rootlet(&self, grant: &Grant, key: RootletKey) -> Result<()> {
        grant.admin("unload rootlets")?;
        self.dp.unload_rootlet(key)?;
        // A crash from here on leaves a status (and leases, in memory only)
        // of a rootlet that is gone: `reconcile` drops such a status.
        self.crash.point(crash::Step::UnloadRemoved);
        lock(&self.leases).retain(|_, l| l.key != key);
        self.kv.delete(STATUS, &key.to_string())?;
        // An undo outstanding on it is superseded: nothing is left to undo.
        self.count_undos()?;
        self.emit(key, "unloaded");
        Ok(())
    }

    pub fn state(&self, grant: &Grant, key: RootletKey) -> Result<RootletState> {
        grant.read()?;
        let state = self.dp.state(key)?;
        self.note_drift(key, state.drift.as_deref());
        Ok(state)
    }

    /// Tells watchers (cause "drift") when `key`'s drift is new or
    /// different from what they last heard.
    fn note_drift(&self, key: RootletKey, drift: Option<&str>) {
        let mut seen = lock(&self.drift_seen);
        match drift {
            Some(d) if seen.get(&key).map(String::as_str) != Some(d) => {
                seen.insert(key, d.to_owned());
                drop(seen);
                tracing::warn!(%key, drift = %d, "drift");
                self.emit(key, "drift");
            }
            Some(_) => {}
            None => {
                seen.remove(&key);
            }
        }
    }

    /// Compares every rootlet with the kernel, telling watchers of drift.
    pub fn check_drift(&self) {
        for key in self.dp.list() {
            match self.dp.drift(key) {
                Ok(d) => self.note_drift(key, d.as_deref()),
                Err(e) => tracing::debug!(%key, error = %e, "drift check"),
            }
        }
    }

    pub fn list(&self, grant: &Grant) -> Result<Vec<RootletKey>> {
        grant.read()?;
        Ok(self.dp.list())
    }

    pub fn status(&self, key: RootletKey) -> Result<ApplyStatus> {
        let mut status: ApplyStatus = self.kv.get(STATUS, &key.to_string())?.unwrap_or_default();
        // Migrated when the agent opens; this covers a record read before.
        status.migrate();
        Ok(status)
    }

    /// Whether the agent holds an apply status for `key`.
    pub fn has_status(&self, key: RootletKey) -> Result<bool> {
        Ok(self
            .kv
            .get::<ApplyStatus>(STATUS, &key.to_string())?
            .is_some())
    }

    /// The lease of `stage` on `key`, if it has one.
    pub fn lease_of(&self, key: RootletKey, stage: &str) -> Option<Lease> {
        lock(&self.leases)
            .values()
            .find(|l| l.key == key && l.stage == stage)
            .cloned()
    }

    fn owner_of(&self, key: RootletKey, stage: &str) -> Result<Option<String>> {
        Ok(self
            .dp
            .state(key)?
            .slots
            .into_iter()
            .find(|s| s.stage == stage)
            .map(|s| s.owner))
    }

    /// Links, replaces, unlinks or (un)pins one stage.
    pub fn change(
        &self,
        grant: &Grant,
        key: RootletKey,
        op: StageOp,
        expected: Option<u64>,
    ) -> Result<ChangeOutcome> {
        grant.mutate("change stages")?;
        let current_owner = self.owner_of(key, op.name())?;
        grant.stage(op.name(), current_owner.as_deref())?;
        let (change, lease_ttl) = match op {
            StageOp::Link { spec, lease } => (
                Change::Link(self.stage_terms(grant, spec, lease, &current_owner)?),
                lease,
            ),
            StageOp::Replace { spec, lease } => (
                Change::Replace(self.stage_terms(grant, spec, lease, &current_owner)?),
                lease,
            ),
            StageOp::Unlink { name } => (Change::Unlink { name }, None),
            StageOp::SetPin { name, pin } => (Change::SetPin { name, pin }, None),
        };
        let name = match &change {
            Change::Link(s) | Change::Replace(s) => s.name.clone(),
            Change::Unlink { name } | Change::SetPin { name, .. } => name.clone(),
        };
        // Authorised again under the rootlet's lock, against the pipeline the
        // change applies to: the owner cannot change between the check and
        // the change. The owner read before the lock (which the new stage
        // keeps) must still be the owner, or no owner must still be none:
        // otherwise a stage unlinked and linked again by another team
        // meanwhile would be replaced or unlinked under the first owner's
        // authority, or linked with an owner it no longer has.
        let generation = self.dp.apply_guarded(
            key,
            std::slice::from_ref(&change),
            expected,
            |pipeline| -> Result<()> {
                let owner = pipeline.by_name(&name).map(|s| s.owner.as_str());
                if current_owner.as_deref() != owner {
                    return Err(AgentError::OwnerChanged {
                        rootlet: key.to_string(),
                        stage: name.clone(),
                        read: current_owner.clone(),
                        now: owner.map(str::to_owned),
                    });
                }
                Ok(grant.stage(&name, owner)?)
            },
        );
        if let Err(AgentError::Dataplane(dataplane::Error::Drifted { reason, .. })) = &generation {
            self.note_drift(key, Some(reason));
        }
        let generation = generation?;
        let lease = match (&change, lease_ttl) {
            (Change::Unlink { .. }, _) | (Change::Link(_) | Change::Replace(_), None) => {
                lock(&self.leases).retain(|_, l| !(l.key == key && l.stage == name));
                None
            }
            (_, Some(ttl)) => Some(self.grant_lease(key, &name, grant.caller.name(), ttl)),
            (Change::SetPin { .. }, None) => self.lease_of(key, &name),
        };
        self.emit(key, "changed");
        Ok(ChangeOutcome { generation, lease })
    }

    /// The owner (kept from the running stage, else the caller) and the
    /// lifetime (a lease is never pinned) of a stage to link or replace.
    fn stage_terms(
        &self,
        grant: &Grant,
        mut spec: StageSpec,
        lease: Option<Duration>,
        current_owner: &Option<String>,
    ) -> Result<StageSpec> {
        spec.owner = current_owner
            .clone()
            .unwrap_or_else(|| grant.caller.name().to_owned());
        if let Some(ttl) = lease {
            if ttl.is_zero() || ttl > MAX_LEASE {
                return Err(AgentError::InvalidArgument {
                    field: "stage.lease_seconds".into(),
                    message: format!("must be 1..={}", MAX_LEASE.as_secs()),
                });
            }
            spec.pin = false;
        }
        Ok(spec)
    }

    fn grant_lease(&self, key: RootletKey, stage: &str, holder: &str, ttl: Duration) -> Lease {
        let mut leases = lock(&self.leases);
        let id = leases
            .values()
            .find(|l| l.key == key && l.stage == stage)
            .map(|l| l.id.clone())
            .unwrap_or_else(|| hex::encode(rand_id()));
        let lease = Lease {
            id: id.clone(),
            key,
            stage: stage.to_owned(),
            holder: holder.to_owned(),
            ttl,
            expires: Instant::now() + ttl,
        };
        leases.insert(id, lease.clone());
        lease
    }

    /// Extends a lease by its time to live.
    pub fn renew_lease(&self, grant: &Grant, id: &str) -> Result<Lease> {
        let mut leases = lock(&self.leases);
        let lease = leases
            .get_mut(id)
            .ok_or_else(|| AgentError::NotFound(format!("no lease `{id}`")))?;
        if !grant.is_admin() && lease.holder != grant.caller.name() {
            return Err(Denied::PermissionDenied {
                who: grant.caller.name().to_owned(),
                what: format!("renew lease `{id}` held by {}", lease.holder),
            }
            .into());
        }
        lease.expires = Instant::now() + lease.ttl;
        Ok(lease.clone())
    }

    /// Unlinks the stages whose leases expired; returns how many.
    pub fn reap_leases(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<Lease> = {
            let mut leases = lock(&self.leases);
            let ids: Vec<String> = leases
                .values()
                .filter(|l| l.expires <= now)
                .map(|l| l.id.clone())
                .collect();
            ids.iter().filter_map(|id| leases.remove(id)).collect()
        };
        for lease in &expired {
            let result = self.dp.apply(
                lease.key,
                &[Change::Unlink {
                    name: lease.stage.clone(),
                }],
                None,
            );
            match result {
                Ok(generation) => {
                    tracing::info!(target: "audit", who = %lease.holder, what = "lease expired: unlink", stage = %lease.stage, rootlet = %lease.key, generation, outcome = "ok");
                    self.emit(lease.key, "lease-expired");
                }
                Err(e) => {
                    tracing::warn!(stage = %lease.stage, rootlet = %lease.key, error = %e, "cannot unlink the stage of an expired lease")
                }
            }
        }
        expired.len()
    }

    /// Background work until `shutdown` turns true: the lease reaper, the
    /// retry of outstanding undos (when due, see `undo.rs`) and the periodic
    /// drift check (`[dataplane] drift_check_seconds`).
    pub async fn run_background(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        // Disabled: a period no test or host waits for.
        let mut drift_tick = tokio::time::interval(
            self.drift_check
                .unwrap_or(Duration::from_secs(86_400 * 365)),
        );
        let drift_check = self.drift_check.is_some();
        let mut sweep_tick = tokio::time::interval(self.sweep_period());
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let agent = self.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.reap_leases()).await;
                    let agent = self.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || agent.retry_undos()).await {
                        tracing::warn!(error = %e, "cannot retry the outstanding undos");
                    }
                }
                _ = drift_tick.tick(), if drift_check => {
                    let agent = self.clone();
                    let _ = tokio::task::spawn_blocking(move || agent.check_drift()).await;
                }
                _ = sweep_tick.tick() => {
                    let agent = self.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || agent.sweep()).await {
                        tracing::warn!(error = %e, "cannot sweep the agent's store");
                    }
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Per-slot per-action counters of every rootlet, for metrics.
    pub fn slot_samples(&self) -> Vec<SlotSample> {
        let mut out = vec![];
        for key in self.dp.list() {
            let Ok(state) = self.dp.state(key) else {
                continue;
            };
            for slot in state.slots {
                let c = slot.counters;
                for (action, packets) in [
                    ("aborted", c.aborted),
                    ("drop", c.drop),
                    ("pass", c.pass),
                    ("tx", c.tx),
                    ("redirect", c.redirect),
                    ("empty", c.empty),
                ] {
                    out.push(SlotSample {
                        rootlet: key.to_string(),
                        slot: slot.slot,
                        stage: slot.stage.clone(),
                        action,
                        packets,
                    });
                }
            }
        }
        out
    }
}

fn rand_id() -> [u8; 12] {
    let mut id = [0u8; 12];
    if getrandom(&mut id).is_err() {
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id.copy_from_slice(&n.to_le_bytes()[..12]);
    }
    id
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nack(unrestored: Vec<(String, String)>) -> String {
        AgentError::Nack {
            name: "edge".into(),
            version: "2.0".into(),
            rootlet: "netns:1/if:2".into(),
            source: Box::new(AgentError::NotFound("boom".into())),
            unrestored,
        }
        .to_string()
    }

    #[test]
    fn an_owner_change_says_whether_the_owner_or_only_the_stage_changed() {
        let changed = |read: Option<&str>, now: Option<&str>| {
            AgentError::OwnerChanged {
                rootlet: "netns:1/if:2".into(),
                stage: "lb".into(),
                read: read.map(str::to_owned),
                now: now.map(str::to_owned),
            }
            .to_string()
        };
        assert_eq!(
            changed(Some("team-a"), Some("ops")),
            "stage `lb` on netns:1/if:2 changed owner (from `team-a` to `ops`) during the call; nothing changed, retry"
        );
        assert_eq!(
            changed(None, Some("ops")),
            "stage `lb` on netns:1/if:2 changed owner (from none to `ops`) during the call; nothing changed, retry"
        );
        // Same owner, another stage of the name (a bundle's premise on the
        // stage's identity): not "from `ops` to `ops`".
        assert_eq!(
            changed(Some("ops"), Some("ops")),
            "stage `lb` on netns:1/if:2 was unlinked and linked again (owner `ops`) during the call; nothing changed, retry"
        );
    }

    #[test]
    fn each_bundle_keeps_its_applied_version_and_a_removal_falls_back_to_the_newest_other() {
        let mut s = ApplyStatus::default();
        s.set_applied("edge", "1.0", "e1", 10);
        s.set_applied("sampling", "1.0", "s1", 20);
        s.set_applied("lb", "3.0", "l3", 15);
        assert_eq!(s.applied_of("edge").map(|a| a.digest.as_str()), Some("e1"));
        assert_eq!((s.bundle.as_str(), s.applied_digest.as_str()), ("lb", "l3"));
        // Removing the last applied: the newest other becomes it.
        s.clear_applied("lb");
        assert_eq!(
            (
                s.bundle.as_str(),
                s.applied_version.as_str(),
                s.applied_digest.as_str()
            ),
            ("sampling", "1.0", "s1")
        );
        // Removing another leaves the last applied as it is.
        s.clear_applied("edge");
        assert_eq!(
            (s.bundle.as_str(), s.applied_digest.as_str()),
            ("sampling", "s1")
        );
        assert!(s.applied_of("edge").is_none());
        s.clear_applied("sampling");
        assert!(
            s.applied.is_empty() && s.applied_version.is_empty() && s.applied_digest.is_empty()
        );
    }

    #[test]
    fn a_status_of_an_earlier_agent_migrates_its_one_applied_version() {
        let old = r#"{"bundle":"edge","applied_version":"1.0","applied_digest":"e1",
            "last_attempt":null,"managed":{"edge":["ddos"]}}"#;
        let mut s: ApplyStatus = serde_json::from_str(old).expect("an earlier agent's status");
        assert!(s.applied.is_empty());
        assert!(s.migrate());
        assert_eq!(
            s.applied_of("edge"),
            Some(&Applied {
                version: "1.0".into(),
                digest: "e1".into(),
                at_unix_ms: 0
            })
        );
        assert!(!s.migrate(), "once");
        let mut none = ApplyStatus::default();
        assert!(!none.migrate() && none.applied.is_empty());
    }

    #[test]
    fn a_managed_stage_is_the_bundles_only_while_it_is_the_one_the_bundle_left() {
        let mut s = ApplyStatus::default();
        s.managed
            .insert("edge".into(), vec!["ddos".into(), "lb".into()]);
        s.linked
            .insert("edge".into(), BTreeMap::from([("ddos".to_owned(), 4)]));
        assert!(s.is_bundles("edge", "ddos", 4), "the stage it linked");
        assert!(!s.is_bundles("edge", "ddos", 7), "linked again since");
        assert!(s.is_bundles("edge", "lb", 9), "no identity: by name");
        s.linked
            .get_mut("edge")
            .expect("edge")
            .insert("lb".into(), NOT_RUNNING);
        assert!(
            !s.is_bundles("edge", "lb", 9),
            "not running when identified: a later stage of the name is another's"
        );
        assert!(!s.is_bundles("edge", "other", 4), "not managed");
        assert!(!s.is_bundles("sampling", "ddos", 4), "another bundle's");
        // A status of an earlier agent has no identities: by name.
        let old: ApplyStatus = serde_json::from_str(
            r#"{"bundle":"edge","applied_version":"1.0","applied_digest":"e1",
            "last_attempt":null,"managed":{"edge":["ddos"]}}"#,
        )
        .expect("an earlier agent's status");
        assert!(old.linked.is_empty() && old.is_bundles("edge", "ddos", 3));
    }

    #[test]
    fn a_nack_says_whether_the_undo_restored_every_rootlet() {
        assert_eq!(
            nack(vec![]),
            "bundle `edge` 2.0 was not applied: boom; every rootlet keeps its previous version"
        );
        let failed = nack(vec![("netns:1/if:3".into(), "EPERM".into())]);
        assert!(
            !failed.contains("every rootlet keeps its previous version")
                && failed.contains("the undo failed on netns:1/if:3 (EPERM)")
                && failed.contains("undo_failed"),
            "{failed}"
        );
    }
}
