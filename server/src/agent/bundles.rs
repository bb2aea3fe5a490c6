//! Bundles applied as one transaction over every rootlet they target:
//! verify the signature and every object's digest, check who may ship each
//! stage, then per rootlet link/replace/unlink what the bundle manages, as
//! one new generation each. If any rootlet fails, every rootlet already
//! changed goes back to what it ran before, and the attempt is a NACK with
//! the reason. The same digest again is a no-op. The last K versions of
//! each bundle are kept for rollback.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use rootlet_bundle::{Bundle, BundleError, Lifetime, SignedBundle};
use serde::{Deserialize, Serialize};

use super::{
    AgentError, ApplyStatus, Attempt, BUNDLES, Grant, HISTORY, Result, STATUS, lock, unix_ms,
};
use crate::dataplane::spec::{ActionSet, Change, InterfaceRef, RootletKey, RootletSpec, StageSpec};

/// Where the bundle comes from.
pub enum BundleSource {
    Bytes(Vec<u8>),
    /// A digest the agent already holds.
    Digest(String),
}

/// What an apply did, per rootlet: (key, generation, changed).
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub noop: bool,
    pub rootlets: Vec<(RootletKey, u64, bool)>,
}

/// How to put one rootlet back if a later rootlet of the same apply fails.
struct Undo {
    key: RootletKey,
    /// The apply loaded the rootlet: unload it.
    loaded_now: bool,
    /// The rootlet's new generation went live.
    applied: bool,
    /// Its stages before.
    before: Vec<String>,
    /// The version of this bundle it ran before, and its target entry.
    previous: Option<(Bundle, rootlet_bundle::RootletTarget)>,
}

/// A bundle stage as a data-plane stage.
fn spec_of(bundle: &Bundle, stage: &rootlet_bundle::Stage) -> Result<StageSpec> {
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

/// One version of a bundle, as kept for rollback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub version: String,
    pub digest: String,
    pub applied_at_unix_ms: i64,
}

impl super::Agent {
    pub fn has_bundle(&self, digest: &str) -> Result<bool> {
        Ok(self.kv.get::<String>(BUNDLES, digest)?.is_some())
    }

    fn stored_bundle(&self, digest: &str) -> Result<Vec<u8>> {
        let hexed: String = self.kv.get(BUNDLES, digest)?.ok_or_else(|| {
            AgentError::NotFound(format!("no bundle with digest {digest} on this agent"))
        })?;
        hex::decode(hexed)
            .map_err(|e| AgentError::NotFound(format!("stored bundle {digest} is corrupt: {e}")))
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

    /// Applies a bundle to every rootlet it targets, or to none.
    pub fn apply_bundle(
        &self,
        grant: &Grant,
        source: BundleSource,
        expected: &BTreeMap<String, u64>,
    ) -> Result<ApplyOutcome> {
        let bytes = match source {
            BundleSource::Bytes(b) => b,
            BundleSource::Digest(d) => self.stored_bundle(&d)?,
        };
        let bundle = self.verify(&bytes)?;
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
        let mut targets = vec![];
        for t in &manifest.rootlets {
            let iface = InterfaceRef {
                netns: t.netns.as_ref().map(Into::into),
                ifname: t.interface.clone(),
            };
            let key = self.key_of(&iface)?;
            for stage in manifest.stages_for(t) {
                let owner = self.owner_of_if_loaded(key, &stage.name)?;
                grant.stage(&stage.name, owner.as_deref())?;
            }
            targets.push((key, iface, t));
        }
        self.kv.put(BUNDLES, &digest, &hex::encode(&bytes))?;

        let statuses: Vec<ApplyStatus> = targets
            .iter()
            .map(|(k, ..)| self.status(*k))
            .collect::<Result<_>>()?;
        if statuses.iter().all(|s| s.applied_digest == digest)
            && targets.iter().all(|(k, ..)| self.dp.list().contains(k))
        {
            let rootlets = targets
                .iter()
                .map(|(k, ..)| Ok((*k, self.dp.state(*k)?.generation, false)))
                .collect::<Result<_>>()?;
            return Ok(ApplyOutcome {
                name: manifest.name,
                version: manifest.version,
                digest,
                noop: true,
                rootlets,
            });
        }

        // Apply rootlet by rootlet; remember how to undo each.
        let mut done: Vec<Undo> = vec![];
        let mut outcome = vec![];
        let mut failure = None;
        for ((key, iface, target), status) in targets.iter().zip(&statuses) {
            let mut undo = Undo {
                key: *key,
                loaded_now: false,
                applied: false,
                before: vec![],
                previous: None,
            };
            let result = (|| -> Result<(u64, bool)> {
                if !self.dp.list().contains(key) {
                    grant.admin("load rootlets (the bundle targets an interface without one)")?;
                    self.dp.load_rootlet(RootletSpec {
                        iface: iface.clone(),
                        mode: target.mode,
                        final_verdict: target.final_verdict,
                    })?;
                    undo.loaded_now = true;
                    self.emit(*key, "loaded");
                }
                if status.bundle == manifest.name && !status.applied_digest.is_empty() {
                    let prev = self.verify(&self.stored_bundle(&status.applied_digest)?)?;
                    let t = prev
                        .manifest()
                        .rootlets
                        .iter()
                        .find(|t| t.interface == target.interface && t.netns == target.netns)
                        .cloned();
                    undo.previous = t.map(|t| (prev, t));
                }
                let state = self.dp.state(*key)?;
                undo.before = state.slots.into_iter().map(|s| s.stage).collect();
                let changes = self.changes_for(*key, &bundle, status, target)?;
                let expected_gen = expected.get(&key.to_string()).copied();
                let generation = self.dp.apply(*key, &changes, expected_gen)?;
                undo.applied = true;
                Ok((generation, generation != state.generation))
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
            // Undo, newest first: back to the previous version of this
            // bundle, or without its stages; unload rootlets it loaded.
            for undo in done.iter().rev() {
                if let Err(e) = self.undo(undo) {
                    tracing::error!(rootlet = %undo.key, error = %e, "cannot restore a rootlet after a failed bundle apply");
                }
            }
            for ((key, ..), mut status) in targets.iter().zip(statuses) {
                status.last_attempt = Some(Attempt {
                    version: manifest.version.clone(),
                    digest: digest.clone(),
                    outcome: "nack".into(),
                    error: error.to_string(),
                    at_unix_ms: now,
                });
                if self.dp.list().contains(key) {
                    self.kv.put(STATUS, &key.to_string(), &status)?;
                }
            }
            return Err(AgentError::Nack {
                name: manifest.name,
                version: manifest.version,
                rootlet: failed_key.to_string(),
                source: Box::new(error),
            });
        }

        for ((key, _, target), mut status) in targets.iter().zip(statuses) {
            status.bundle = manifest.name.clone();
            status.applied_version = manifest.version.clone();
            status.applied_digest = digest.clone();
            status.managed.insert(
                manifest.name.clone(),
                manifest
                    .stages_for(target)
                    .map(|s| s.name.clone())
                    .collect(),
            );
            status.last_attempt = Some(Attempt {
                version: manifest.version.clone(),
                digest: digest.clone(),
                outcome: "ack".into(),
                error: String::new(),
                at_unix_ms: now,
            });
            self.kv.put(STATUS, &key.to_string(), &status)?;
            for stage in manifest.stages_for(target) {
                if let Lifetime::Lease { seconds } = stage.lifetime {
                    let ttl = std::time::Duration::from_secs(u64::from(seconds));
                    self.grant_lease(*key, &stage.name, grant.caller.name(), ttl);
                }
            }
            self.emit(*key, "changed");
        }
        self.record_history(&manifest.name, &manifest.version, &digest, now)?;
        Ok(ApplyOutcome {
            name: manifest.name,
            version: manifest.version,
            digest,
            noop: false,
            rootlets: outcome,
        })
    }

    fn owner_of_if_loaded(&self, key: RootletKey, stage: &str) -> Result<Option<String>> {
        if !self.dp.list().contains(&key) {
            return Ok(None);
        }
        self.owner_of(key, stage)
    }

    /// The changes that make `key` run `bundle`'s stages for `target`:
    /// link what is new, replace what the bundle already manages (a no-op
    /// for unchanged stages), unlink what its previous version had. A stage
    /// of the same name that the bundle does not manage is a conflict: the
    /// bundle could not put it back if the apply failed.
    fn changes_for(
        &self,
        key: RootletKey,
        bundle: &Bundle,
        status: &ApplyStatus,
        target: &rootlet_bundle::RootletTarget,
    ) -> Result<Vec<Change>> {
        let manifest = bundle.manifest();
        let running: Vec<String> = self
            .dp
            .state(key)?
            .slots
            .into_iter()
            .map(|s| s.stage)
            .collect();
        let managed = status
            .managed
            .get(&manifest.name)
            .cloned()
            .unwrap_or_default();
        let mut changes = vec![];
        for stage in manifest.stages_for(target) {
            let spec = spec_of(bundle, stage)?;
            changes.push(if !running.contains(&stage.name) {
                Change::Link(spec)
            } else if managed.contains(&stage.name) {
                Change::Replace(spec)
            } else {
                return Err(AgentError::Conflict(format!(
                    "stage `{}` on {key} is not managed by bundle `{}`; unlink it first",
                    stage.name, manifest.name
                )));
            });
        }
        for name in &managed {
            if !manifest.stages_for(target).any(|s| &s.name == name) && running.contains(name) {
                changes.push(Change::Unlink { name: name.clone() });
            }
        }
        Ok(changes)
    }

    /// Puts a rootlet back as it was before a failed bundle apply.
    fn undo(&self, undo: &Undo) -> Result<()> {
        if undo.loaded_now {
            self.dp.unload_rootlet(undo.key)?;
            self.emit(undo.key, "unloaded");
            return Ok(());
        }
        if !undo.applied {
            return Ok(());
        }
        let running: Vec<String> = self
            .dp
            .state(undo.key)?
            .slots
            .into_iter()
            .map(|s| s.stage)
            .collect();
        let mut changes: Vec<Change> = running
            .iter()
            .filter(|s| !undo.before.contains(s))
            .map(|s| Change::Unlink { name: s.clone() })
            .collect();
        if let Some((prev, target)) = &undo.previous {
            for stage in prev.manifest().stages_for(target) {
                let spec = spec_of(prev, stage)?;
                if running.contains(&stage.name) {
                    changes.push(Change::Replace(spec));
                } else if undo.before.contains(&stage.name) {
                    changes.push(Change::Link(spec));
                }
            }
        }
        if !changes.is_empty() {
            self.dp.apply(undo.key, &changes, None)?;
            self.emit(undo.key, "changed");
        }
        Ok(())
    }

    fn record_history(&self, name: &str, version: &str, digest: &str, now: i64) -> Result<()> {
        let mut history: Vec<HistoryEntry> = self.kv.get(HISTORY, name)?.unwrap_or_default();
        history.retain(|h| h.digest != digest);
        history.insert(
            0,
            HistoryEntry {
                version: version.to_owned(),
                digest: digest.to_owned(),
                applied_at_unix_ms: now,
            },
        );
        for dropped in history.split_off(self.history.min(history.len())) {
            self.kv.delete(BUNDLES, &dropped.digest)?;
        }
        Ok(self.kv.put(HISTORY, name, &history)?)
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
    ) -> Result<ApplyOutcome> {
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
        )
    }
}
