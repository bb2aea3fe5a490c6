//! The rollout journal: everything a rollout knows, as one JSON file,
//! written atomically (a temporary file, fsync, rename) after host state
//! changes (coalesced to a few writes a second within a phase, and always
//! before any push and at the end of every phase). A crashed or
//! interrupted rollout resumes from it without pushing the hosts it
//! already finished, and `rollout undo` reads from it which hosts changed
//! and what they ran before.
//!
//! Beside it: `<journal>.lock` (held by the process running the rollout;
//! see [`JournalLock`]) and `<journal>.control` (operator requests; see
//! [`super::control`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    inventory::Host,
    plan::{Plan, Step},
    transport::TransportOptions,
};

/// The journal's format version.
pub const FORMAT: u32 = 1;
/// Least time between two coalesced writes.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(250);
/// Most events kept.
const MAX_EVENTS: usize = 500;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Where the rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Running,
    /// Paused by the operator (`rollout pause`).
    Paused,
    /// A step's pause waits for `rollout promote`.
    WaitingForPromote,
    RollingBack,
    /// Every host is on the new version.
    Succeeded,
    /// Every host that answered is on the new version, but some were
    /// skipped (unreachable until the end, after a last retry); they are
    /// listed, and `rollout resume` tries them again.
    Incomplete,
    /// Stopped; every host it changed is back on its previous version.
    RolledBack,
    /// Stopped, and some host could not be put back (or could not be
    /// reached); see the hosts.
    Failed,
    /// `rollout undo` put every changed host back.
    Undone,
}

impl RolloutState {
    /// Whether nothing more will happen without an operator.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Incomplete
                | RolloutState::RolledBack
                | RolloutState::Failed
                | RolloutState::Undone
        )
    }

    /// Whether `rollout resume` (or `rollout start` with the same bundle)
    /// continues it: unfinished, or incomplete (hosts skipped).
    pub fn is_resumable(self) -> bool {
        !self.is_final() || self == RolloutState::Incomplete
    }

    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::WaitingForPromote => "waiting-for-promote",
            RolloutState::RollingBack => "rolling-back",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Incomplete => "incomplete",
            RolloutState::RolledBack => "rolled-back",
            RolloutState::Failed => "failed",
            RolloutState::Undone => "undone",
        }
    }
}

/// Where one host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    /// Not pushed yet.
    Pending,
    /// Its previous version and baseline are recorded; about to be pushed.
    Prepared,
    /// The agent acknowledged the new bundle; gates not passed yet.
    Pushed,
    /// Passed every gate after the soak.
    Healthy,
    /// Failed a gate (or the agent refused the bundle).
    Failed,
    /// Did not answer; counts against `max_unavailable`.
    Unreachable,
    /// Back on its previous version (or, after a first install, without
    /// the bundle).
    RolledBack,
    /// Could not be put back (see `detail`).
    RollbackFailed,
}

impl HostState {
    pub fn name(self) -> &'static str {
        match self {
            HostState::Pending => "pending",
            HostState::Prepared => "prepared",
            HostState::Pushed => "pushed",
            HostState::Healthy => "healthy",
            HostState::Failed => "failed",
            HostState::Unreachable => "unreachable",
            HostState::RolledBack => "rolled-back",
            HostState::RollbackFailed => "rollback-failed",
        }
    }
}

/// Whether a host runs something the rollout put there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Changed {
    #[default]
    No,
    Yes,
    /// A push whose answer never came: it may have happened.
    Unknown,
}

/// A bundle version on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub digest: String,
}

/// The policy a stage held on one rootlet before a policy rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBefore {
    /// 0: no policy.
    pub version: u64,
    pub digest: String,
}

/// Packet counters of one stage (summed over the host's rootlets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub aborted: u64,
    pub drop: u64,
    pub pass: u64,
    pub tx: u64,
    pub redirect: u64,
}

impl Counters {
    /// Packets a stage program returned a verdict for.
    pub fn total(&self) -> u64 {
        self.aborted
            .saturating_add(self.drop)
            .saturating_add(self.pass)
            .saturating_add(self.tx)
            .saturating_add(self.redirect)
    }

    /// `self - earlier`, per action (0 where a counter went backwards).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            aborted: self.aborted.saturating_sub(earlier.aborted),
            drop: self.drop.saturating_sub(earlier.drop),
            pass: self.pass.saturating_sub(earlier.pass),
            tx: self.tx.saturating_sub(earlier.tx),
            redirect: self.redirect.saturating_sub(earlier.redirect),
        }
    }

    pub fn add(&mut self, o: &Counters) {
        self.aborted = self.aborted.saturating_add(o.aborted);
        self.drop = self.drop.saturating_add(o.drop);
        self.pass = self.pass.saturating_add(o.pass);
        self.tx = self.tx.saturating_add(o.tx);
        self.redirect = self.redirect.saturating_add(o.redirect);
    }
}

/// Counters of every stage of a host at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub at_unix_ms: i64,
    pub stages: BTreeMap<String, Counters>,
    /// Stages whose verdicts the rootlet cannot see (`Slot.uncounted`):
    /// their counters are not evidence of anything.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub uncounted: BTreeSet<String>,
}

/// One gate's verdict on one host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    /// `health`, `apply`, or a counter metric.
    pub gate: String,
    /// The stage, for counter gates.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stage: String,
    pub verdict: Verdict,
    /// The measured value, for counter gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Packets the stage saw in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    pub detail: String,
}

/// What a gate said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// Fewer packets than `min_packets`: not judged.
    Idle,
    /// The window has not passed yet.
    Waiting,
    /// A dry-run gate over its threshold: reported only.
    DryRunFail,
}

/// One host of the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: Host,
    /// The step it belongs to.
    pub step: usize,
    pub state: HostState,
    pub changed: Changed,
    /// What it ran before (recorded before its first push, and kept
    /// through retries); None: no version of this bundle.
    pub previous: Option<Version>,
    /// Whether `previous` was recorded.
    pub previous_recorded: bool,
    /// The rootlet ids the new bundle applied to (a policy rollout: the
    /// rootlets whose pipeline has the policy's stage, recorded before the
    /// push).
    pub rootlets: Vec<String>,
    /// A policy rollout: the policy each of `rootlets` held before the
    /// rollout first touched it (by rootlet id; version 0: none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub policy_before: BTreeMap<String, PolicyBefore>,
    /// The bundle's bytes were uploaded (false: the agent had the digest).
    pub uploaded: bool,
    /// Counters at the rollout's start, just before the push, and just
    /// after it.
    pub baseline_start: Option<Sample>,
    pub baseline: Option<Sample>,
    pub post: Option<Sample>,
    /// The last gate evaluation.
    pub gates: Vec<GateResult>,
    /// Why it is unreachable, failed, or could not be rolled back.
    pub detail: String,
    pub updated_unix_ms: i64,
}

impl HostRecord {
    pub fn new(host: Host, step: usize) -> HostRecord {
        HostRecord {
            host,
            step,
            state: HostState::Pending,
            changed: Changed::No,
            previous: None,
            previous_recorded: false,
            rootlets: Vec::new(),
            policy_before: BTreeMap::new(),
            uploaded: false,
            baseline_start: None,
            baseline: None,
            post: None,
            gates: Vec::new(),
            detail: String::new(),
            updated_unix_ms: now_ms(),
        }
    }

    /// Sets the state and its reason.
    pub fn set(&mut self, state: HostState, detail: impl Into<String>) {
        self.state = state;
        self.detail = detail.into();
        self.updated_unix_ms = now_ms();
    }
}

/// Why a rollout stopped before finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopKind {
    /// A gate failed on a host.
    Gate,
    /// A step was not healthy within `progress_deadline`.
    Deadline,
    /// `rollout abort`.
    Abort,
    /// More hosts stopped answering than `max_unavailable` allows.
    Unavailable,
    /// A pause waited longer than `pause_timeout`.
    PauseTimeout,
}

/// Why, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopReason {
    pub kind: StopKind,
    pub message: String,
    /// The step it stopped in (index into `steps`).
    pub step: Option<usize>,
    /// The host whose gate failed.
    pub host: Option<String>,
    pub at_unix_ms: i64,
}

/// Something that happened, for `rollout status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_unix_ms: i64,
    pub message: String,
}

/// What is rolled out: a bundle; for a policy rollout, `name` is the
/// policy's stage, `version` `v<version>`, `digest` the policy's digest
/// and `targets` the `--interface` it is narrowed to (see [`PolicyRef`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// The signed bundle file (empty for a bundle named by reference).
    pub path: PathBuf,
    pub size: u64,
    /// The OCI reference, pinned by digest, the bundle was pulled from
    /// (`rollout start --bundle registry/repo@sha256:…`): a host that does
    /// not hold the bundle is sent this reference and pulls it itself;
    /// the rollout never uploads the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Interfaces (and netns) the bundle targets: `netns|ifname`.
    pub targets: Vec<(String, String)>,
}

/// What a rollout does to each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Apply the bundle (`ApplyBundle`).
    #[default]
    Apply,
    /// Remove the bundle by name (`RemoveBundle`): `rootletctl bundle
    /// remove`. The bundle has no file, version or digest then.
    Remove,
    /// Apply a signed policy to a stage (`ApplyPolicy`): `rootletctl policy
    /// rollout`; [`Journal::policy`] says which.
    Policy,
}

/// The policy a policy rollout pushes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    /// The stage whose maps it sets.
    pub stage: String,
    /// The author's version number (at least 1).
    pub version: u64,
    pub digest: String,
    /// The signed policy file.
    pub path: PathBuf,
    pub size: u64,
    /// `--interface` (and `--netns`): only the rootlet on that interface;
    /// None: every rootlet of the host whose pipeline has the stage.
    pub interface: Option<(String, String)>,
    /// `--empty-policy`: what a rootlet that had no policy before goes
    /// back to on rollback or undo (without it, such a rootlet cannot be
    /// put back: the agent keeps no "no policy" version to return to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty: Option<EmptyPolicyRef>,
}

/// The signed policy that puts a stage back to "no entries".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyPolicyRef {
    pub version: u64,
    pub digest: String,
    pub path: PathBuf,
}

/// The journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    pub format: u32,
    pub rollout_id: String,
    #[serde(default)]
    pub action: Action,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
    pub bundle: BundleRef,
    /// The policy, for [`Action::Policy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    pub selector: String,
    pub plan: Plan,
    pub transport: TransportOptions,
    pub steps: Vec<Step>,
    pub state: RolloutState,
    /// The step running, or next to run.
    pub current_step: usize,
    /// Steps that finished healthy.
    pub steps_done: usize,
    /// Promote requests already acted on (see the control file).
    pub promotes_seen: u64,
    pub stop: Option<StopReason>,
    pub hosts: Vec<HostRecord>,
    pub events: Vec<Event>,
    /// Wall time spent pushing and gating, pauses and soak excluded, in
    /// milliseconds (the control plane's own cost).
    pub control_plane_ms: u64,
}

impl Journal {
    /// Adds an event (the oldest go past [`MAX_EVENTS`]).
    pub fn event(&mut self, message: impl Into<String>) {
        self.events.push(Event {
            at_unix_ms: now_ms(),
            message: message.into(),
        });
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }

    /// Hosts per state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for h in &self.hosts {
            *m.entry(h.state.name()).or_default() += 1;
        }
        m
    }

    /// Hosts that did not answer.
    pub fn unreachable(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.state == HostState::Unreachable)
            .count()
    }
}

/// Errors reading or writing the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a rollout journal: {msg}", .path.display())]
    Corrupt { path: PathBuf, msg: String },
    #[error(
        "{}: another rootletctl is running this rollout (it holds {}); use `rollout pause|resume|promote|abort` to steer it",
        .path.display(), .lock.display()
    )]
    Busy { path: PathBuf, lock: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A sibling of the journal: `<journal><suffix>`.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads a journal.
pub fn read(path: &Path) -> Result<Journal, JournalError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let j: Journal = serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    if j.format != FORMAT {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            msg: format!("format {} (this rootletctl reads {FORMAT})", j.format),
        });
    }
    Ok(j)
}

/// Writes `value` as JSON to `path` atomically: a temporary file beside
/// it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = sibling(path, &format!(".tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

/// The journal of a running rollout: the data, and when it was last saved.
pub struct JournalFile {
    pub path: PathBuf,
    pub journal: Journal,
    last_save: Option<Instant>,
    dirty: bool,
}

impl JournalFile {
    pub fn new(path: PathBuf, journal: Journal) -> JournalFile {
        JournalFile {
            path,
            journal,
            last_save: None,
            dirty: true,
        }
    }

    /// Marks a change; saves if the last save is older than
    /// [`SAVE_INTERVAL`].
    pub fn changed(&mut self) -> Result<(), JournalError> {
        self.dirty = true;
        if self.last_save.is_none_or(|t| t.elapsed() >= SAVE_INTERVAL) {
            self.save()?;
        }
        Ok(())
    }

    /// Saves now if anything changed since the last save.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        if self.dirty { self.save() } else { Ok(()) }
    }

    /// Saves now.
    pub fn save(&mut self) -> Result<(), JournalError> {
        self.journal.updated_unix_ms = now_ms();
        let bytes = serde_json::to_vec(&self.journal).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        write_atomic(&self.path, &bytes)?;
        self.last_save = Some(Instant::now());
        self.dirty = false;
        Ok(())
    }
}

/// The exclusive lock of the process running (or undoing) a rollout: an
/// advisory lock on `<journal>.lock`, released when dropped or when the
/// process dies, so a crashed rollout never blocks its resumption.
pub struct JournalLock {
    _file: File,
}

impl JournalLock {
    /// Takes the lock, or fails at once with [`JournalError::Busy`].
    pub fn acquire(journal: &Path) -> Result<JournalLock, JournalError> {
        let path = sibling(journal, ".lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(JournalLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Busy {
                path: journal.to_path_buf(),
                lock: path,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
        }
    }

    /// Whether some process holds the lock now.
    pub fn is_held(journal: &Path) -> bool {
        matches!(
            JournalLock::acquire(journal),
            Err(JournalError::Busy { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Address, Security};

    fn sample_journal() -> Journal {
        let plan = Plan::default();
        let hosts: Vec<HostRecord> = (0..3)
            .map(|i| {
                HostRecord::new(
                    Host {
                        name: format!("h{i}"),
                        address: Address::Unix(format!("/run/h{i}.sock").into()),
                        labels: Default::default(),
                        security: Security::Local,
                    },
                    usize::from(i > 0),
                )
            })
            .collect();
        Journal {
            format: FORMAT,
            rollout_id: "r1".into(),
            action: Action::Apply,
            created_unix_ms: 1,
            updated_unix_ms: 1,
            bundle: BundleRef {
                name: "edge".into(),
                version: "v2".into(),
                digest: "d".into(),
                path: "b.rlb".into(),
                size: 10,
                reference: None,
                targets: vec![(String::new(), "rl0".into())],
            },
            policy: None,
            selector: String::new(),
            steps: plan.steps(3),
            plan,
            transport: TransportOptions::default(),
            state: RolloutState::Running,
            current_step: 0,
            steps_done: 0,
            promotes_seen: 0,
            stop: None,
            hosts,
            events: Vec::new(),
            control_plane_ms: 0,
        }
    }

    #[test]
    fn round_trip_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.json");
        let mut j = sample_journal();
        j.hosts[0].set(HostState::Healthy, "");
        j.hosts[0].previous = Some(Version {
            version: "v1".into(),
            digest: "p".into(),
        });
        j.hosts[0].post = Some(Sample {
            at_unix_ms: 5,
            stages: [(
                "ddos".to_string(),
                Counters {
                    pass: 10,
                    ..Default::default()
                },
            )]
            .into(),
            uncounted: Default::default(),
        });
        let mut f = JournalFile::new(path.clone(), j.clone());
        f.save().unwrap();
        let mut back = read(&path).unwrap();
        back.updated_unix_ms = j.updated_unix_ms;
        assert_eq!(back, j);

        let lock = JournalLock::acquire(&path).unwrap();
        assert!(matches!(
            JournalLock::acquire(&path),
            Err(JournalError::Busy { .. })
        ));
        drop(lock);
        assert!(!JournalLock::is_held(&path));

        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(read(&path), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn counters_math() {
        let a = Counters {
            aborted: 1,
            drop: 2,
            pass: 10,
            tx: 0,
            redirect: 0,
        };
        let b = Counters {
            aborted: 5,
            drop: 2,
            pass: 30,
            tx: 1,
            redirect: 0,
        };
        let d = b.since(&a);
        assert_eq!(d.total(), 25);
        assert_eq!(a.since(&b).total(), 0);
    }
}
