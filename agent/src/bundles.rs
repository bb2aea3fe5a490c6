//! Bundles applied as one transaction over every rootlet they target:
//! verify the signature and every object's digest, authorise every change
//! the apply makes (each link, replace and unlink, and each rootlet it
//! loads) for the caller, then per rootlet link/replace/unlink what the
//! bundle manages, as one new generation each. If any rootlet fails, every
//! rootlet already changed gets the exact inverse of what the apply changed
//! there, and the attempt is a NACK with the reason. An apply is a no-op
//! only when the kernel already runs exactly the bundle. The last K versions
//! of each bundle are kept for rollback; RemoveBundle returns each host to
//! "no version of this bundle".
//!
//! A signature proves where a bundle came from, not who may apply it: the
//! caller's role decides that, change by change.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use rootlet_bundle::{Bundle, BundleError, Lifetime, SignedBundle};
use serde::{Deserialize, Serialize};

use super::{
    AgentError, ApplyStatus, Attempt, BUNDLES, Grant, HISTORY, Pending, Result, STATUS,
    UndoOutstanding, crash::Step, lock, unix_ms,
};
use rootlet_dataplane::{
    kv::{Batch, KvError},
    spec::{ActionSet, Change, InterfaceRef, Pipeline, RootletKey, RootletSpec, StageSpec},
    state::{RootletState, SlotState},
};

/// Where the bundle comes from.
pub enum BundleSource {
    Bytes(Vec<u8>),
    /// A digest the agent already holds.
    Digest(String),
}

/// What an apply (or a removal) did, per rootlet: (key, generation,
/// changed); a rootlet the removal unloaded has generation 0.
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub noop: bool,
    /// RemoveBundle: the host no longer runs the bundle.
    pub removed: bool,
    pub rootlets: Vec<(RootletKey, u64, bool)>,
}

/// A stage the bundle manages that the kernel does not run as the bundle
/// says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDrift {
    /// The bundle that manages the stage (empty: none could be compared).
    pub bundle: String,
    pub stage: String,
    /// The bundle's object digest; empty for a stage of an earlier version
    /// that is still running.
    pub expected_digest: String,
    /// Empty: the stage is not running.
    pub running_digest: String,
    pub reason: String,
}

/// A rootlet's apply status with what is derived from the kernel.
#[derive(Debug, Clone)]
pub struct StatusView {
    pub status: ApplyStatus,
    pub drift: Vec<StageDrift>,
    pub keyed: Option<Attempt>,
}

/// How often an undo recomputes its inverse when the rootlet changed
/// under it.
const UNDO_ATTEMPTS: usize = 5;

/// How to put one rootlet back if a later rootlet of the same apply fails.
pub(super) struct Undo {
    pub(super) key: RootletKey,
    /// The apply loaded the rootlet: unload it (if it holds nothing else).
    pub(super) loaded_now: bool,
    /// What the apply changed, once its generation went live.
    pub(super) applied: Vec<Change>,
    /// The identity (`linked_generation`) of each stage the apply replaced,
    /// as it read it (empty when not known: an undo retried from the store).
    pub(super) replaced: BTreeMap<String, u64>,
    /// The generation the apply produced (0 until it went live).
    pub(super) generation: u64,
    /// The version of this bundle it ran before, and its target entry.
    pub(super) previous: Option<(Bundle, rootlet_bundle::RootletTarget)>,
}

/// A bundle stage as a data-plane stage.
pub(super) fn spec_of(bundle: &Bundle, stage: &rootlet_bundle::Stage) -> Result<StageSpec> {
    let object = bundle
        .stage_object(stage)
        .ok_or_else(|| AgentError::InvalidArgument {
            field: format!("stages.{}.object", stage.name),
            message: "not in the bundle".into(),
        })?;
    Ok(StageSpec {
        name: stage.name.clone(),
        object: Arc::clone(object),
        program: stage.program.clone(),
        priority: stage.priority,
        proceed_on: ActionSet::of(&stage.proceed_on),
        // A lease stage is held by its lease, renewed by the applier.
        pin: matches!(stage.lifetime, Lifetime::Pin),
        maps: stage.maps,
        owner: stage.owner.clone(),
    })
}

/// Why a running slot is not `spec` (None: it is).
fn differs(slot: &SlotState, spec: &StageSpec) -> Option<&'static str> {
    if slot.prog.is_none() {
        Some("emptied: its program is gone")
    } else if slot.digest != spec.digest() {
        Some("another object runs (replaced out of band)")
    } else if slot.priority != spec.priority || slot.proceed_set() != spec.proceed_on {
        Some("runs with another priority or proceed-on set")
    } else if slot.pinned != spec.pin {
        Some("pinned differently")
    } else {
        None
    }
}

/// The stage `change` is about.
pub(super) fn change_name(change: &Change) -> &str {
    match change {
        Change::Link(s) | Change::Replace(s) => &s.name,
        Change::Unlink { name } | Change::SetPin { name, .. } => name,
    }
}

/// Whether `grant` may make every one of `changes` to `pipeline`: the
/// right to touch each stage, as it is owned now.
pub(super) fn authorize(grant: &Grant, pipeline: &Pipeline, changes: &[Change]) -> Result<()> {
    for change in changes {
        let name = change_name(change);
        let owner = pipeline.by_name(name).map(|s| s.owner.as_str());
        grant.stage(name, owner)?;
    }
    Ok(())
}

/// What a plan read of a stage it replaces or unlinks: the change is made
/// only while the stage is still that one (checked under the rootlet's
/// lock, [`check_premises`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Premise {
    pub(super) stage: String,
    pub(super) owner: String,
    pub(super) linked_generation: u64,
}

/// The premise of each replace and unlink of `changes`, read from `slots`.
pub(super) fn premises(slots: &[SlotState], changes: &[Change]) -> Vec<Premise> {
    changes
        .iter()
        .filter(|c| matches!(c, Change::Replace(_) | Change::Unlink { .. }))
        .filter_map(|c| {
            let name = change_name(c);
            slots.iter().find(|s| s.stage == name).map(|s| Premise {
                stage: name.to_owned(),
                owner: s.owner.clone(),
                linked_generation: s.linked_generation,
            })
        })
        .collect()
}

/// Under the rootlet's lock: every stage a plan replaces or unlinks is
/// still the one it read (same owner, same identity), or the change is
/// refused as a stage call's is when its stage changed meanwhile
/// (`OwnerChanged`: nothing changed, retry).
pub(super) fn check_premises(
    key: RootletKey,
    pipeline: &Pipeline,
    premises: &[Premise],
) -> Result<()> {
    for p in premises {
        let now = pipeline.by_name(&p.stage);
        if now.map(|s| (s.owner.as_str(), s.linked_generation))
            != Some((p.owner.as_str(), p.linked_generation))
        {
            return Err(AgentError::OwnerChanged {
                rootlet: key.to_string(),
                stage: p.stage.clone(),
                read: Some(p.owner.clone()),
                now: now.map(|s| s.owner.clone()),
            });
        }
    }
    Ok(())
}

/// The changes that make a rootlet run a bundle, with what they rest on.
#[derive(Debug, Clone, Default)]
pub(super) struct Planned {
    pub(super) changes: Vec<Change>,
    pub(super) premises: Vec<Premise>,
    /// The identity (`linked_generation`) of each stage of the bundle that
    /// runs and that the plan does not link: what the bundle's record keeps
    /// for it once the apply commits (a stage the apply links has the
    /// generation the apply produces).
    pub(super) kept: BTreeMap<String, u64>,
}

impl Planned {
    /// The identity of every stage of `names` after the apply produced
    /// `generation`.
    pub(super) fn identities<'a>(
        &self,
        names: impl Iterator<Item = &'a str>,
        generation: u64,
    ) -> BTreeMap<String, u64> {
        names
            .filter_map(|name| {
                let linked = self
                    .changes
                    .iter()
                    .any(|c| matches!(c, Change::Link(s) if s.name == name));
                let id = if linked {
                    Some(generation)
                } else {
                    self.kept.get(name).copied()
                };
                id.map(|g| (name.to_owned(), g))
            })
            .collect()
    }
}

/// The rootlet target of `bundle` on the interface `target` names.
pub(super) fn same_target(
    bundle: &Bundle,
    target: &rootlet_bundle::RootletTarget,
) -> Option<rootlet_bundle::RootletTarget> {
    bundle
        .manifest()
        .rootlets
        .iter()
        .find(|t| t.interface == target.interface && t.netns == target.netns)
        .cloned()
}

/// One version of a bundle, as kept for rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: String,
    pub digest: String,
    pub applied_at_unix_ms: i64,
    /// RemoveBundle removed the bundle after this (the newest) version.
    #[serde(default)]
    pub removed: bool,
}

impl super::Agent {
    /// Whether the agent holds the bundle `digest`: a look-up of the key,
    /// which reads, decodes and verifies nothing.
    pub fn has_bundle(&self, digest: &str) -> Result<bool> {
        Ok(self.kv.contains_bytes(BUNDLES, digest)?)
    }

    fn stored_bundle(&self, digest: &str) -> Result<Vec<u8>> {
        self.kv.get_bytes(BUNDLES, digest)?.ok_or_else(|| {
            AgentError::NotFound(format!("no bundle with digest {digest} on this agent"))
        })
    }

    /// A bundle this agent stored (it verified it then).
    pub(super) fn stored(&self, digest: &str) -> Result<Bundle> {
        Ok(SignedBundle::from_bytes(&self.stored_bundle(digest)?)?.bundle)
    }

    /// Decodes and verifies a signed bundle (or accepts an unsigned one if
    /// the config allows it).
    fn verify(&self, bytes: &[u8]) -> Result<Bundle> {
        let signed = SignedBundle::from_bytes(bytes)?;
        match signed.verify(&self.trusted) {
            Ok(v) => Ok(v.into_bundle()),
            Err(BundleError::Unsigned) if self.allow_unsigned => Ok(signed.bundle),
            Err(e) => Err(e.into()),
        }
    }

    /// The rootlet target of `bundle` that is `key`, if any.
    pub(super) fn target_on(
        &self,
        bundle: &Bundle,
        key: RootletKey,
    ) -> Option<rootlet_bundle::RootletTarget> {
        bundle
            .manifest()
            .rootlets
            .iter()
            .find(|t| {
                let iface = InterfaceRef {
                    netns: t.netns.as_ref().map(Into::into),
                    ifname: t.interface.clone(),
                };
                self.key_of(&iface).is_ok_and(|k| k == key)
            })
            .cloned()
    }

    /// Where the kernel does not run `bundle` on `target` as the bundle
    /// says, and stages of `managed` (earlier versions) still running.
    pub(super) fn drift_of(
        state: &RootletState,
        bundle: &Bundle,
        target: &rootlet_bundle::RootletTarget,
        managed: &[String],
    ) -> Result<Vec<StageDrift>> {
        let mut drift = vec![];
        let manifest = bundle.manifest();
        for stage in manifest.stages_for(target) {
            let spec = spec_of(bundle, stage)?;
            let expected = spec.digest();
            match state.slots.iter().find(|s| s.stage == stage.name) {
                None => drift.push(StageDrift {
                    bundle: manifest.name.clone(),
                    stage: stage.name.clone(),
                    expected_digest: expected,
                    running_digest: String::new(),
                    reason: "not running (unlinked)".into(),
                }),
                Some(slot) => {
                    if let Some(why) = differs(slot, &spec) {
                        drift.push(StageDrift {
                            bundle: manifest.name.clone(),
                            stage: stage.name.clone(),
                            expected_digest: expected,
                            running_digest: if slot.prog.is_some() {
                                slot.digest.clone()
                            } else {
                                String::new()
                            },
                            reason: why.into(),
                        });
                    }
                }
            }
        }
        for name in managed {
            if manifest.stages_for(target).any(|s| &s.name == name) {
                continue;
            }
            if let Some(slot) = state.slots.iter().find(|s| &s.stage == name) {
                drift.push(StageDrift {
                    bundle: manifest.name.clone(),
                    stage: name.clone(),
                    expected_digest: String::new(),
                    running_digest: slot.digest.clone(),
                    reason: "not in this version, still running".into(),
                });
            }
        }
        Ok(drift)
    }

    /// The apply status of `key` with its drift from the bundle, derived
    /// from the kernel now, and the attempt of `idempotency_key`.
    pub fn apply_status(&self, key: RootletKey, idempotency_key: &str) -> Result<StatusView> {
        let status = self.status(key)?;
        let keyed = (!idempotency_key.is_empty())
            .then(|| {
                status
                    .keyed
                    .iter()
                    .find(|a| a.idempotency_key == idempotency_key)
                    .cloned()
            })
            .flatten();
        // Every bundle applied here, against its version; a bundle whose
        // stages run without an applied version (an interrupted first
        // install, an undo that failed) has each of them as drift.
        let mut drift = vec![];
        let mut state = None;
        for (name, applied) in &status.applied {
            if applied.digest.is_empty() {
                continue;
            }
            let bundle = match self.stored(&applied.digest) {
                Ok(b) => b,
                Err(e) => {
                    // Nothing to compare the kernel with: say so.
                    drift.push(StageDrift {
                        bundle: name.clone(),
                        stage: String::new(),
                        expected_digest: String::new(),
                        running_digest: String::new(),
                        reason: format!("cannot compare with the applied bundle: {e}"),
                    });
                    continue;
                }
            };
            let state = match &state {
                Some(s) => s,
                None => state.insert(self.dp.state(key)?),
            };
            if let Some(target) = self.target_on(&bundle, key) {
                // A stage of a managed name that is not the bundle's is not
                // the bundle's drift.
                let mut managed = status.managed.get(name).cloned().unwrap_or_default();
                managed.retain(|m| {
                    state
                        .slots
                        .iter()
                        .find(|s| &s.stage == m)
                        .is_none_or(|s| status.is_bundles(name, m, s.linked_generation))
                });
                drift.extend(Self::drift_of(state, &bundle, &target, &managed)?);
            }
        }
        for (bundle, names) in &status.managed {
            if status.applied_of(bundle).is_some() || names.is_empty() {
                continue;
            }
            let state = match &state {
                Some(s) => s,
                None => state.insert(self.dp.state(key)?),
            };
            for slot in state
                .slots
                .iter()
                .filter(|s| status.is_bundles(bundle, &s.stage, s.linked_generation))
            {
                drift.push(StageDrift {
                    bundle: bundle.clone(),
                    stage: slot.stage.clone(),
                    expected_digest: String::new(),
                    running_digest: slot.digest.clone(),
                    reason: format!("left by an unfinished apply of bundle `{bundle}`"),
                });
            }
        }
        Ok(StatusView {
            status,
            drift,
            keyed,
        })
    }

    /// Applies a bundle to every rootlet it targets, or to none.
    pub fn apply_bundle(
        &self,
        grant: &Grant,
        source: BundleSource,
        expected: &BTreeMap<String, u64>,
        idempotency_key: &str,
    ) -> Result<ApplyOutcome> {
        grant.mutate("apply bundles")?;
        let (bytes, stored) = match source {
            BundleSource::Bytes(b) => (b, false),
            BundleSource::Digest(d) => (self.stored_bundle(&d)?, true),
        };
        let bundle =
            rootlet_dataplane::budget::time(rootlet_dataplane::budget::Step::Check, || {
                self.verify(&bytes)
            })?;
        let manifest = bundle.manifest().clone();
        let digest = bundle.digest();
        let _one_at_a_time = lock(&self.bundle_lock);

        // Who may ship what: every stage, by its declared owner.
        for stage in &manifest.stages {
            if !grant.is_admin() && stage.owner != grant.caller.name() {
                return Err(super::Denied::PermissionDenied {
                    who: grant.caller.name().to_owned(),
                    what: format!("ship stage `{}` owned by {}", stage.name, stage.owner),
                }
                .into());
            }
        }
        // Initial policies fit their stage's object (before anything changes).
        for stage in &manifest.stages {
            let policies = bundle.stage_policies(stage);
            if let Some(object) = bundle.stage_object(stage) {
                crate::policy::check_against_object(&stage.name, object, &policies)?;
            }
        }
        // Every change, authorised before anything changes (and again under
        // each rootlet's lock as it changes).
        let mut targets = vec![];
        for t in &manifest.rootlets {
            let iface = InterfaceRef {
                netns: t.netns.as_ref().map(Into::into),
                ifname: t.interface.clone(),
            };
            let key = self.key_of(&iface)?;
            let status = self.status(key)?;
            let exists = self.dp.list().contains(&key);
            let planned = if exists {
                let planned = self.changes_for(key, &bundle, &status, t)?;
                authorize(grant, &self.pipeline_of(key)?, &planned.changes)?;
                planned
            } else {
                grant.admin("load rootlets (the bundle targets an interface without one)")?;
                let changes = manifest
                    .stages_for(t)
                    .map(|s| spec_of(&bundle, s).map(Change::Link))
                    .collect::<Result<Vec<_>>>()?;
                authorize(grant, &Pipeline::default(), &changes)?;
                Planned {
                    changes,
                    ..Planned::default()
                }
            };
            targets.push((key, iface, t, status, exists, planned));
        }

        // A no-op only if the record says so and the kernel agrees.
        let recorded = targets.iter().all(|(_, _, _, s, exists, _)| {
            *exists
                && s.applied_of(&manifest.name)
                    .is_some_and(|a| a.digest == digest)
                && s.pending.is_none()
        });
        if recorded && targets.iter().all(|t| t.5.changes.is_empty()) {
            let rootlets = targets
                .iter()
                .map(|(k, ..)| Ok((*k, self.dp.state(*k)?.generation, false)))
                .collect::<Result<_>>()?;
            return Ok(ApplyOutcome {
                name: manifest.name,
                version: manifest.version,
                digest,
                noop: true,
                removed: false,
                rootlets,
            });
        }
        // The bundle and every target's pending status, in one durable
        // transaction before any change: what a crash leaves is the
        // bundle's (one write rather than one per record, so one fsync).
        let now = unix_ms(SystemTime::now());
        let mut pendings = vec![];
        for (key, _, target, status, exists, _) in &targets {
            let mut pending = status.clone();
            pending.pending = Some(Pending {
                bundle: manifest.name.clone(),
                version: manifest.version.clone(),
                digest: digest.clone(),
                idempotency_key: idempotency_key.to_owned(),
                loads: !exists,
                at_unix_ms: now,
            });
            let managed = pending.managed.entry(manifest.name.clone()).or_default();
            for s in manifest.stages_for(target) {
                if !managed.contains(&s.name) {
                    managed.push(s.name.clone());
                }
            }
            pendings.push((key.to_string(), pending));
        }
        self.kv.write(|b| {
            if !stored {
                b.put_bytes(BUNDLES, &digest, &bytes)?;
            }
            for (key, pending) in &pendings {
                b.put(STATUS, key, pending)?;
            }
            Ok(())
        })?;
        self.crash.point(Step::BundlePending);

        // Apply rootlet by rootlet; remember how to undo each.
        let mut done: Vec<Undo> = vec![];
        let mut outcome = vec![];
        let mut failure = None;
        // The identity of each stage of the bundle, by rootlet, once applied.
        let mut identities = BTreeMap::new();
        for (key, iface, target, status, exists, planned) in &targets {
            let changes = &planned.changes;
            let mut undo = Undo {
                key: *key,
                loaded_now: false,
                applied: vec![],
                replaced: planned
                    .premises
                    .iter()
                    .map(|p| (p.stage.clone(), p.linked_generation))
                    .collect(),
                generation: 0,
                previous: None,
            };
            let result = (|| -> Result<(u64, bool)> {
                if !exists {
                    self.dp.load_rootlet(RootletSpec {
                        iface: iface.clone(),
                        mode: target.mode,
                        final_verdict: target.final_verdict,
                    })?;
                    undo.loaded_now = true;
                    self.emit(*key, "loaded");
                }
                // This bundle's version here, whichever bundle applied last.
                if let Some(applied) = status.applied_of(&manifest.name) {
                    let prev = self.stored(&applied.digest)?;
                    undo.previous = same_target(&prev, target).map(|t| (prev, t));
                }
                let before = self.dp.state(*key)?.generation;
                let expected_gen = expected.get(&key.to_string()).copied();
                // Under the lock: each stage replaced or unlinked is still
                // the one planned for, and the caller may change it.
                let generation =
                    self.dp
                        .apply_guarded(*key, changes, expected_gen, |pipeline| {
                            check_premises(*key, pipeline, &planned.premises)?;
                            authorize(grant, pipeline, changes)
                        })?;
                undo.applied = changes.clone();
                undo.generation = generation;
                identities.insert(
                    *key,
                    planned.identities(
                        manifest.stages_for(target).map(|s| s.name.as_str()),
                        generation,
                    ),
                );
                // The initial policies of the stages it runs now.
                for stage in manifest.stages_for(target) {
                    self.apply_initial(grant, *key, &stage.name, &bundle.stage_policies(stage))?;
                }
                self.crash.point(Step::BundleRootletCommitted);
                Ok((generation, generation != before || undo.loaded_now))
            })();
            done.push(undo);
            match result {
                Ok((generation, changed)) => outcome.push((*key, generation, changed)),
                Err(e) => {
                    failure = Some((*key, e));
                    break;
                }
            }
        }

        let now = unix_ms(SystemTime::now());
        if let Some((failed_key, error)) = failure {
            // Undo, newest first: the exact inverse of what the apply did.
            // An undo that fails is kept and retried (`undo.rs`).
            let mut unrestored = vec![];
            let mut outstanding = BTreeMap::new();
            for undo in done.iter().rev() {
                if let Err(e) = self.try_undo(undo) {
                    tracing::error!(rootlet = %undo.key, error = %e, "cannot restore a rootlet after a failed bundle apply; retrying in the background");
                    unrestored.push((undo.key.to_string(), e.to_string()));
                    self.undo_failed_once(undo.key, 1);
                    outstanding.insert(
                        undo.key,
                        UndoOutstanding::of(
                            undo,
                            &manifest.name,
                            &manifest.version,
                            &digest,
                            &e.to_string(),
                            now,
                        ),
                    );
                }
            }
            for ((key, _, target, status, _, _), undo) in targets
                .iter()
                .zip(done.iter().map(Some).chain(std::iter::repeat(None)))
            {
                let mut status = status.clone();
                let undo_failed = outstanding.remove(key);
                if undo_failed.is_some() {
                    // What the undo left is still the bundle's to converge.
                    let managed = status.managed.entry(manifest.name.clone()).or_default();
                    for s in manifest.stages_for(target) {
                        if !managed.contains(&s.name) {
                            managed.push(s.name.clone());
                        }
                    }
                }
                if undo.is_some_and(|u| u.loaded_now) {
                    status.loaded_by = Some(manifest.name.clone());
                }
                let outcome = if undo_failed.is_some() {
                    "undo_failed"
                } else {
                    "nack"
                };
                status.attempted(Attempt {
                    version: manifest.version.clone(),
                    digest: digest.clone(),
                    outcome: outcome.into(),
                    error: match &undo_failed {
                        Some(u) => format!("{error}; the undo failed: {}", u.error),
                        None => error.to_string(),
                    },
                    at_unix_ms: now,
                    idempotency_key: idempotency_key.to_owned(),
                });
                // An earlier outstanding undo stays unless this one replaces it.
                if undo_failed.is_some() {
                    status.undo = undo_failed;
                }
                if self.dp.list().contains(key) {
                    self.kv.put(STATUS, &key.to_string(), &status)?;
                } else {
                    self.kv.delete(STATUS, &key.to_string())?;
                }
            }
            self.count_undos()?;
            // A refused bundle is not kept (unless a version it is ran here,
            // or an outstanding undo needs it).
            if !self.in_history(&digest)? && unrestored.is_empty() {
                self.kv
                    .delete_bytes(BUNDLES, std::slice::from_ref(&digest))?;
            }
            return Err(AgentError::Nack {
                name: manifest.name,
                version: manifest.version,
                rootlet: failed_key.to_string(),
                source: Box::new(error),
                unrestored,
            });
        }

        self.crash.point(Step::BundleCommitted);
        // Every target's status and the bundle's history, in one durable
        // transaction (after every rootlet committed its change).
        let mut statuses = vec![];
        for ((key, _, target, status, _, _), undo) in targets.iter().zip(&done) {
            let mut status = status.clone();
            status.pending = None;
            // This version runs now: an undo outstanding here is superseded.
            status.undo = None;
            status.set_applied(&manifest.name, &manifest.version, &digest, now);
            status.managed.insert(
                manifest.name.clone(),
                manifest
                    .stages_for(target)
                    .map(|s| s.name.clone())
                    .collect(),
            );
            // Written with `managed`: the stages it names are these.
            status.linked.insert(
                manifest.name.clone(),
                identities.remove(key).unwrap_or_default(),
            );
            if undo.loaded_now {
                status.loaded_by = Some(manifest.name.clone());
            }
            status.attempted(Attempt {
                version: manifest.version.clone(),
                digest: digest.clone(),
                outcome: "ack".into(),
                error: String::new(),
                at_unix_ms: now,
                idempotency_key: idempotency_key.to_owned(),
            });
            statuses.push((key.to_string(), status));
        }
        self.kv.write(|b| {
            for (key, status) in &statuses {
                b.put(STATUS, key, status)?;
            }
            self.record_history_in(b, &manifest.name, &manifest.version, &digest, now)
        })?;
        for (key, _, target, _, _, _) in &targets {
            for stage in manifest.stages_for(target) {
                if let Lifetime::Lease { seconds } = stage.lifetime {
                    let ttl = std::time::Duration::from_secs(u64::from(seconds));
                    self.grant_lease(*key, &stage.name, grant.caller.name(), ttl);
                }
            }
            self.emit(*key, "changed");
        }
        self.crash.point(Step::BundleStatusWritten);
        self.count_undos()?;
        Ok(ApplyOutcome {
            name: manifest.name,
            version: manifest.version,
            digest,
            noop: false,
            removed: false,
            rootlets: outcome,
        })
    }

    /// The committed pipeline of `key` (stages and their owners).
    pub(super) fn pipeline_of(&self, key: RootletKey) -> Result<Pipeline> {
        let state = self.dp.state(key)?;
        Ok(Pipeline {
            stages: state
                .slots
                .iter()
                .map(|s| rootlet_dataplane::spec::StageRecord {
                    name: s.stage.clone(),
                    slot: s.slot,
                    priority: s.priority,
                    proceed_on: s.proceed_set(),
                    pin: s.pinned,
                    owner: s.owner.clone(),
                    program: String::new(),
                    digest: s.digest.clone(),
                    chainable: false,
                    linked_generation: s.linked_generation,
                    loaded_generation: s.loaded_generation,
                    counts_base: Default::default(),
                })
                .collect(),
        })
    }

    /// The changes that make `key` run `bundle`'s stages for `target`,
    /// derived from what the kernel runs: link what is missing (or
    /// emptied), replace what the bundle manages and does not run as the
    /// bundle says, unlink what its earlier versions had. A stage of the
    /// same name that is not the bundle's (it does not manage the name, or
    /// the stage is not the one it left: [`ApplyStatus::is_bundles`]) is a
    /// conflict: the bundle could not put it back if the apply failed.
    pub(super) fn changes_for(
        &self,
        key: RootletKey,
        bundle: &Bundle,
        status: &ApplyStatus,
        target: &rootlet_bundle::RootletTarget,
    ) -> Result<Planned> {
        let manifest = bundle.manifest();
        let slots = self.dp.state(key)?.slots;
        let managed = status
            .managed
            .get(&manifest.name)
            .cloned()
            .unwrap_or_default();
        let theirs = |slot: &SlotState| {
            status.is_bundles(&manifest.name, &slot.stage, slot.linked_generation)
        };
        let mut changes = vec![];
        let mut kept = BTreeMap::new();
        for stage in manifest.stages_for(target) {
            let spec = spec_of(bundle, stage)?;
            match slots.iter().find(|s| s.stage == stage.name) {
                Some(slot) if !theirs(slot) => {
                    return Err(AgentError::NotManagedByBundle {
                        rootlet: key.to_string(),
                        stage: stage.name.clone(),
                        bundle: manifest.name.clone(),
                        owner: slot.owner.clone(),
                    });
                }
                // An emptied slot is dropped by the next change: link anew.
                None => changes.push(Change::Link(spec)),
                Some(slot) if slot.prog.is_none() => changes.push(Change::Link(spec)),
                Some(slot) => {
                    kept.insert(stage.name.clone(), slot.linked_generation);
                    if differs(slot, &spec).is_some() {
                        changes.push(Change::Replace(spec));
                    }
                }
            }
        }
        // Only the stages the bundle left: a same-name stage of another
        // owner or life stays.
        for name in &managed {
            if !manifest.stages_for(target).any(|s| &s.name == name)
                && slots
                    .iter()
                    .any(|s| &s.stage == name && s.prog.is_some() && theirs(s))
            {
                changes.push(Change::Unlink { name: name.clone() });
            }
        }
        let premises = premises(&slots, &changes);
        Ok(Planned {
            changes,
            premises,
            kept,
        })
    }

    /// Puts a rootlet back as it was before a failed bundle apply: the
    /// exact inverse of what the apply changed there. Stages the apply did
    /// not touch (another team's, linked meanwhile) stay.
    pub(super) fn undo(&self, undo: &Undo) -> Result<()> {
        if undo.loaded_now {
            // Unloaded only if, under the rootlet's lock, it runs nothing but
            // what this apply linked (another team may have linked since).
            let unloaded = self.dp.unload_rootlet_if(undo.key, |pipeline| {
                Ok::<bool, AgentError>(pipeline.stages.iter().all(|s| {
                    undo.applied.iter().any(|c| {
                        matches!(c, Change::Link(spec) if spec.name == s.name && spec.digest() == s.digest)
                    })
                }))
            })?;
            if unloaded {
                self.emit(undo.key, "unloaded");
                return Ok(());
            }
        }
        // The inverse is computed against the pipeline it applies to and
        // applied under that generation: first the one the apply produced;
        // if another call changed the rootlet since, against the newer one,
        // whose stages this bundle no longer left as they are not touched.
        for _ in 0..UNDO_ATTEMPTS {
            let state = self.dp.state(undo.key)?;
            let inverse = self.inverse(undo, &state)?;
            if inverse.is_empty() {
                return Ok(());
            }
            match self.dp.apply(undo.key, &inverse, Some(state.generation)) {
                Err(rootlet_dataplane::Error::VersionMismatch { .. }) => continue,
                other => {
                    other?;
                    self.emit(undo.key, "changed");
                    return Ok(());
                }
            }
        }
        Err(AgentError::UndoContended {
            rootlet: undo.key.to_string(),
            attempts: UNDO_ATTEMPTS,
        })
    }

    /// The exact inverse of what `undo`'s apply changed, limited to the
    /// stages that are still as that apply left them in `state`: a stage
    /// the bundle linked or replaced still runs its object under its owner
    /// and is still the same stage (the identity the link gave it, or the
    /// one the replaced stage had: a stage unlinked and linked again since
    /// is another's), a stage it unlinked is still absent. A stage the
    /// bundle did not change, or that another call changed since, is never
    /// touched.
    fn inverse(
        &self,
        undo: &Undo,
        state: &rootlet_dataplane::state::RootletState,
    ) -> Result<Vec<Change>> {
        let previous = |name: &str| -> Result<StageSpec> {
            let (prev, target) = undo.previous.as_ref().ok_or_else(|| {
                AgentError::NotFound(format!(
                    "stage `{name}`: no earlier version of the bundle to restore it from"
                ))
            })?;
            let stage = prev
                .manifest()
                .stages_for(target)
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    AgentError::NotFound(format!("stage `{name}` is not in the earlier version"))
                })?;
            spec_of(prev, stage)
        };
        let running = |name: &str| state.slots.iter().find(|s| s.stage == name);
        // The identity the apply left a stage with (None: not known, an
        // undo retried from the store).
        let identity = |change: &Change| match change {
            Change::Link(_) => (undo.generation != 0).then_some(undo.generation),
            _ => undo.replaced.get(change_name(change)).copied(),
        };
        let as_left = |change: &Change, spec: &StageSpec| {
            running(&spec.name).is_some_and(|s| {
                s.digest == spec.digest()
                    && s.owner == spec.owner
                    && identity(change).is_none_or(|g| g == s.linked_generation)
            })
        };
        let mut inverse = vec![];
        for change in &undo.applied {
            let name = change_name(change);
            match change {
                Change::Link(spec) if as_left(change, spec) => inverse.push(Change::Unlink {
                    name: name.to_owned(),
                }),
                Change::Replace(spec) if as_left(change, spec) => {
                    inverse.push(Change::Replace(previous(name)?));
                }
                Change::Unlink { .. } if running(name).is_none() => {
                    inverse.push(Change::Link(previous(name)?));
                }
                Change::Link(_)
                | Change::Replace(_)
                | Change::Unlink { .. }
                | Change::SetPin { .. } => {}
            }
        }
        Ok(inverse)
    }

    /// Whether any bundle's history holds `digest`.
    pub(super) fn in_history(&self, digest: &str) -> Result<bool> {
        Ok(self
            .kv
            .list::<Vec<HistoryEntry>>(HISTORY)?
            .iter()
            .any(|(_, h)| h.iter().any(|e| e.digest == digest)))
    }

    pub(super) fn record_history(
        &self,
        name: &str,
        version: &str,
        digest: &str,
        now: i64,
    ) -> Result<()> {
        Ok(self
            .kv
            .write(|b| self.record_history_in(b, name, version, digest, now))?)
    }

    /// [`Self::record_history`]'s writes, in the batch `b`.
    fn record_history_in(
        &self,
        b: &mut Batch<'_>,
        name: &str,
        version: &str,
        digest: &str,
        now: i64,
    ) -> std::result::Result<(), KvError> {
        let mut history: Vec<HistoryEntry> = self.kv.get(HISTORY, name)?.unwrap_or_default();
        history.retain(|h| h.digest != digest);
        history.insert(
            0,
            HistoryEntry {
                version: version.to_owned(),
                digest: digest.to_owned(),
                applied_at_unix_ms: now,
                removed: false,
            },
        );
        let dropped: Vec<String> = history
            .split_off(self.history.min(history.len()))
            .into_iter()
            .map(|h| h.digest)
            .collect();
        b.delete_bytes(BUNDLES, &dropped)?;
        b.put(HISTORY, name, &history)
    }

    /// Every bundle name with its kept versions, newest first.
    pub fn list_bundles(&self, grant: &Grant) -> Result<Vec<(String, Vec<HistoryEntry>)>> {
        grant.read()?;
        Ok(self.kv.list(HISTORY)?)
    }

    /// Applies an earlier version of bundle `name` (the one before the
    /// current, or `to_digest`).
    pub fn rollback(
        &self,
        grant: &Grant,
        name: &str,
        to_digest: Option<&str>,
        idempotency_key: &str,
    ) -> Result<ApplyOutcome> {
        grant.mutate("roll bundles back")?;
        let bundles = self.kv.list::<Vec<HistoryEntry>>(HISTORY)?;
        let (name, history) = match (name, bundles.len()) {
            ("", 1) => bundles
                .into_iter()
                .next()
                .ok_or_else(|| AgentError::NothingToRollBack(String::new()))?,
            ("", _) => {
                return Err(AgentError::InvalidArgument {
                    field: "name".into(),
                    message: "this agent holds several bundles: name one".into(),
                });
            }
            (n, _) => bundles
                .into_iter()
                .find(|(b, _)| b == n)
                .ok_or_else(|| AgentError::NotFound(format!("no bundle named `{n}`")))?,
        };
        let target = match to_digest {
            Some(d) => history.iter().find(|h| h.digest == d),
            None => history.get(1),
        }
        .ok_or_else(|| AgentError::NothingToRollBack(name.clone()))?;
        self.apply_bundle(
            grant,
            BundleSource::Digest(target.digest.clone()),
            &BTreeMap::new(),
            idempotency_key,
        )
    }
}
