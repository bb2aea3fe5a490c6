//! Fleet rollouts of a signed bundle: `rollout start` (or resume),
//! `pause`, `resume`, `promote`, `abort`, `undo` and `status`; `bundle
//! remove`, the same rollout with `RemoveBundle` as its push; and `policy
//! rollout`, the same rollout with `ApplyPolicy` as its push
//! ([`journal::Action`], [`policy`]). One engine runs all three, and the
//! steering commands work on any of their journals.
//!
//! - [`engine`]: the state machine (canary, waves, soak, gates, rollback).
//! - [`gates`]: what agents report, judged against the plan.
//! - [`journal`]: the JSON journal a rollout resumes from.
//! - [`policy`]: a policy rollout's host calls (targets, push, apply gate,
//!   put back).
//! - [`control`]: operator requests to a running rollout.
//! - [`progress`]: bars or log lines.
//! - [`summary`]: what a person (or a program) reads at the end.

pub mod control;
pub mod engine;
pub mod gates;
pub mod journal;
pub mod policy;
pub mod progress;
pub mod summary;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rootlet_bundle::SignedBundle;
use sha2::{Digest, Sha256};

pub use engine::{Engine, Outcome};
use journal::{
    Action, BundleRef, EmptyPolicyRef, FORMAT, HostRecord, Journal, JournalError, JournalFile,
    JournalLock, PolicyRef, RolloutState, now_ms,
};
use policy::PolicyFile;

use crate::{
    inventory::Host,
    plan::Plan,
    transport::{Fleet, TransportOptions},
};

/// Why a rollout command could not run (as opposed to a rollout that ran
/// and was rolled back).
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", .path.display())]
    Bundle {
        path: PathBuf,
        #[source]
        source: rootlet_bundle::BundleError,
    },
}

/// A signed bundle read from disk, or pulled from a registry.
pub struct BundleFile {
    pub path: PathBuf,
    pub bytes: Arc<Vec<u8>>,
    pub signed: SignedBundle,
    /// Pulled from this reference (pinned by digest): hosts are sent the
    /// reference, not the bytes.
    pub reference: Option<String>,
}

impl BundleFile {
    pub fn read(path: &Path) -> Result<BundleFile, RolloutError> {
        let bytes = std::fs::read(path).map_err(|e| RolloutError::Bundle {
            path: path.to_path_buf(),
            source: rootlet_bundle::BundleError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let signed = SignedBundle::from_bytes(&bytes).map_err(|source| RolloutError::Bundle {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(BundleFile {
            path: path.to_path_buf(),
            bytes: Arc::new(bytes),
            signed,
            reference: None,
        })
    }

    /// A bundle pulled from `reference` (pinned by digest), whose bytes
    /// `rootlet-oci` has checked against the manifest's digests.
    pub fn pulled(reference: String, bytes: Vec<u8>) -> Result<BundleFile, RolloutError> {
        let signed = SignedBundle::from_bytes(&bytes).map_err(|source| RolloutError::Bundle {
            path: PathBuf::from(&reference),
            source,
        })?;
        Ok(BundleFile {
            path: PathBuf::new(),
            bytes: Arc::new(bytes),
            signed,
            reference: Some(reference),
        })
    }

    fn reference(&self) -> BundleRef {
        let b = &self.signed.bundle;
        let m = b.manifest();
        BundleRef {
            name: m.name.clone(),
            version: m.version.clone(),
            digest: b.digest(),
            path: if self.reference.is_some() {
                PathBuf::new()
            } else {
                std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone())
            },
            size: self.bytes.len() as u64,
            reference: self.reference.clone(),
            targets: m
                .rootlets
                .iter()
                .map(|r| (r.netns.clone().unwrap_or_default(), r.interface.clone()))
                .collect(),
        }
    }
}

/// What `rollout start` needs.
pub struct StartRequest {
    pub hosts: Vec<Host>,
    pub selector: String,
    pub plan: Plan,
    pub bundle: BundleFile,
    pub journal: PathBuf,
    pub transport: TransportOptions,
}

/// A new journal for `req` (not yet written).
pub fn new_journal(req: &StartRequest) -> Journal {
    fresh_journal(
        Action::Apply,
        req.bundle.reference(),
        None,
        &req.hosts,
        &req.selector,
        &req.plan,
        &req.transport,
    )
}

/// What `bundle remove` needs: the same plan, waves and gates as a
/// rollout, and the name of the bundle to remove.
pub struct RemoveRequest {
    pub hosts: Vec<Host>,
    pub selector: String,
    pub plan: Plan,
    pub name: String,
    pub journal: PathBuf,
    pub transport: TransportOptions,
}

/// The version a removal journal records (it has none of its own).
pub const REMOVAL: &str = "(removal)";

/// A new journal that removes bundle `req.name` (not yet written). A
/// journal of a finished rollout at `req.journal` is kept as
/// `<journal>.<id>`; an unfinished one of the same removal is resumed; any
/// other unfinished one is an error.
pub fn plan_remove(req: &RemoveRequest) -> Result<Start, RolloutError> {
    let same = |old: &Journal| old.action == Action::Remove && old.bundle.name == req.name;
    if let Some(old) = take_journal(&req.journal, same)? {
        return Ok(Start::Resume(old));
    }
    let bref = BundleRef {
        name: req.name.clone(),
        version: REMOVAL.into(),
        digest: String::new(),
        path: PathBuf::new(),
        size: 0,
        reference: None,
        targets: Vec::new(),
    };
    Ok(Start::New(fresh_journal(
        Action::Remove,
        bref,
        None,
        &req.hosts,
        &req.selector,
        &req.plan,
        &req.transport,
    )))
}

fn fresh_journal(
    action: Action,
    bref: BundleRef,
    policy: Option<PolicyRef>,
    hosts: &[Host],
    selector: &str,
    plan: &Plan,
    transport: &TransportOptions,
) -> Journal {
    let created = now_ms();
    let mut h = Sha256::new();
    h.update(bref.name.as_bytes());
    h.update(bref.digest.as_bytes());
    h.update(selector.as_bytes());
    h.update(created.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(fastrand::u64(..).to_le_bytes());
    let rollout_id = hex::encode(h.finalize()).chars().take(16).collect();
    let steps = plan.steps(hosts.len());
    let mut hosts: Vec<HostRecord> = hosts
        .iter()
        .map(|h| HostRecord::new(h.clone(), 0))
        .collect();
    for (s, step) in steps.iter().enumerate() {
        for i in step.hosts() {
            if let Some(h) = hosts.get_mut(i) {
                h.step = s;
            }
        }
    }
    let mut j = Journal {
        format: FORMAT,
        rollout_id,
        action,
        created_unix_ms: created,
        updated_unix_ms: created,
        bundle: bref,
        policy,
        selector: selector.to_string(),
        plan: plan.clone(),
        transport: transport.clone(),
        steps,
        state: RolloutState::Running,
        current_step: 0,
        steps_done: 0,
        promotes_seen: 0,
        stop: None,
        hosts,
        events: Vec::new(),
        control_plane_ms: 0,
    };
    j.event(format!(
        "{} of {} {} to {} hosts ({})",
        match action {
            Action::Apply => "rollout",
            Action::Remove => "removal",
            Action::Policy => "policy rollout",
        },
        j.bundle.name,
        j.bundle.version,
        j.hosts.len(),
        if j.selector.is_empty() {
            "all hosts"
        } else {
            &j.selector
        }
    ));
    j
}

/// The journal at `path`, if it holds an unfinished rollout that `same`
/// says is this one (to resume). Otherwise a finished journal is kept as
/// `<journal>.<id>` and moved aside (`None`: start anew), and an unfinished
/// one of another rollout is an error.
fn take_journal(
    path: &Path,
    same: impl Fn(&Journal) -> bool,
) -> Result<Option<Journal>, RolloutError> {
    if !path.exists() {
        return Ok(None);
    }
    let old = journal::read(path)?;
    if old.state.is_resumable() && same(&old) {
        return Ok(Some(old));
    }
    if !old.state.is_final() {
        return Err(RolloutError::Usage(format!(
            "{} holds the unfinished rollout {} of {} {} ({}); resume it (rollout resume), abort or undo it, or use another --journal",
            path.display(),
            old.rollout_id,
            old.bundle.name,
            old.bundle.version,
            old.state.name()
        )));
    }
    let archive = journal::sibling(path, &format!(".{}", old.rollout_id));
    std::fs::rename(path, &archive).map_err(|e| JournalError::Io {
        path: archive.clone(),
        source: e,
    })?;
    control::reset(path)?;
    Ok(None)
}

/// What `start` decided to do with an existing journal.
pub enum Start {
    New(Journal),
    /// The same bundle's unfinished rollout: resume it.
    Resume(Journal),
}

/// Decides between a new rollout and resuming the journal at
/// `req.journal`. A finished journal is kept as `<journal>.<id>` and
/// replaced; an unfinished one for another bundle is an error.
pub fn plan_start(req: &StartRequest) -> Result<Start, RolloutError> {
    let digest = req.bundle.signed.bundle.digest();
    if let Some(old) = take_journal(&req.journal, |old| old.bundle.digest == digest)? {
        return Ok(Start::Resume(old));
    }
    Ok(Start::New(new_journal(req)))
}

/// What `policy rollout` needs.
pub struct PolicyRequest {
    pub hosts: Vec<Host>,
    pub selector: String,
    pub plan: Plan,
    pub policy: PolicyFile,
    /// `--interface` (netns, ifname): only that rootlet of each host.
    pub interface: Option<(String, String)>,
    /// `--empty-policy`: for rootlets that had no policy before.
    pub empty: Option<PolicyFile>,
    pub journal: PathBuf,
    pub transport: TransportOptions,
}

/// A new policy rollout, or the unfinished one of the same policy (and
/// stage, and interface) in `req.journal` to resume; as [`plan_start`].
pub fn plan_policy(req: &PolicyRequest) -> Result<Start, RolloutError> {
    let p = &req.policy;
    if let Some(e) = &req.empty
        && e.stage != p.stage
    {
        return Err(RolloutError::Usage(format!(
            "--empty-policy {} sets stage `{}`, not `{}`",
            e.path.display(),
            e.stage,
            p.stage
        )));
    }
    let same = |old: &Journal| {
        old.action == Action::Policy
            && old
                .policy
                .as_ref()
                .is_some_and(|o| o.digest == p.digest && o.interface == req.interface)
    };
    if let Some(old) = take_journal(&req.journal, same)? {
        return Ok(Start::Resume(old));
    }
    let path = std::path::absolute(&p.path).unwrap_or_else(|_| p.path.clone());
    let pref = PolicyRef {
        stage: p.stage.clone(),
        version: p.version,
        digest: p.digest.clone(),
        path: path.clone(),
        size: p.bytes.len() as u64,
        interface: req.interface.clone(),
        empty: req.empty.as_ref().map(|e| EmptyPolicyRef {
            version: e.version,
            digest: e.digest.clone(),
            path: std::path::absolute(&e.path).unwrap_or_else(|_| e.path.clone()),
        }),
    };
    let bref = BundleRef {
        name: p.stage.clone(),
        version: format!("v{}", p.version),
        digest: p.digest.clone(),
        path,
        size: p.bytes.len() as u64,
        reference: None,
        targets: req.interface.iter().cloned().collect(),
    };
    Ok(Start::New(fresh_journal(
        Action::Policy,
        bref,
        Some(pref),
        &req.hosts,
        &req.selector,
        &req.plan,
        &req.transport,
    )))
}

/// An engine over journal `j` at `path`: connections to its hosts and its
/// bundle file (if still readable and unchanged).
pub fn engine_for(
    path: &Path,
    j: Journal,
    bundle: Option<Arc<Vec<u8>>>,
    mode: progress::Mode,
) -> Result<Engine, RolloutError> {
    let hosts: Vec<Host> = j.hosts.iter().map(|h| h.host.clone()).collect();
    let fleet = Arc::new(Fleet::new(hosts, j.transport.clone()));
    let steps = j.steps.len();
    let control = control::watch(path);
    Ok(Engine::new(
        JournalFile::new(path.to_path_buf(), j),
        fleet,
        bundle,
        control,
        progress::Progress::new(mode, steps),
    ))
}

/// The bundle bytes of journal `j`, read again from its file and checked
/// against its digest; None for a removal, which pushes no bytes, and for a
/// bundle named by reference, which pushes the reference.
pub fn bundle_of(j: &Journal) -> Result<Option<Arc<Vec<u8>>>, String> {
    match j.action {
        Action::Remove => Ok(None),
        Action::Apply if j.bundle.reference.is_some() => Ok(None),
        Action::Apply => bundle_bytes(j).map(Some),
        Action::Policy => {
            PolicyFile::reread(&j.bundle.path, &j.bundle.digest).map(|f| Some(f.bytes))
        }
    }
}

fn bundle_bytes(j: &Journal) -> Result<Arc<Vec<u8>>, String> {
    let f = BundleFile::read(&j.bundle.path).map_err(|e| e.to_string())?;
    let digest = f.signed.bundle.digest();
    if digest != j.bundle.digest {
        return Err(format!(
            "{} now holds another bundle ({}), not the one this rollout pushes ({})",
            j.bundle.path.display(),
            gates::short(&digest),
            gates::short(&j.bundle.digest)
        ));
    }
    Ok(f.bytes)
}

/// Takes over a journal nobody runs: resumes it (or, with `abort`, rolls
/// it back).
pub async fn take_over(
    path: &Path,
    mode: progress::Mode,
    abort: bool,
) -> Result<(Outcome, JournalFile, u64), RolloutError> {
    let _lock = JournalLock::acquire(path)?;
    let j = journal::read(path)?;
    let bundle = if abort || !j.state.is_resumable() || j.action == Action::Remove {
        None
    } else {
        bundle_of(&j).map_err(RolloutError::Usage)?
    };
    let mut engine = engine_for(path, j, bundle, mode)?;
    let fleet = engine.fleet_arc();
    if abort && !engine.jf.journal.state.is_final() {
        let stop = journal::StopReason {
            kind: journal::StopKind::Abort,
            message: "aborted by the operator while no rootletctl was running it".into(),
            step: Some(engine.jf.journal.current_step),
            host: None,
            at_unix_ms: now_ms(),
        };
        let outcome = engine.roll_back(Some(stop), false).await?;
        return Ok((outcome, engine.jf, fleet.rpcs()));
    }
    let (outcome, jf) = engine.run().await?;
    Ok((outcome, jf, fleet.rpcs()))
}

/// `rollout undo`: every host the rollout changed back to its previous
/// version.
pub async fn undo(
    path: &Path,
    mode: progress::Mode,
) -> Result<(Outcome, JournalFile, u64), RolloutError> {
    let _lock = JournalLock::acquire(path)?;
    let j = journal::read(path)?;
    if !j.state.is_final() && j.state != RolloutState::RollingBack {
        return Err(RolloutError::Usage(format!(
            "rollout {} is {} and nobody is running it: `rollout abort` rolls it back",
            j.rollout_id,
            j.state.name()
        )));
    }
    let mut engine = engine_for(path, j, None, mode)?;
    engine.jf.journal.event("undo requested");
    let outcome = engine.roll_back(None, true).await?;
    let rpcs = engine.fleet().rpcs();
    Ok((outcome, engine.jf, rpcs))
}
