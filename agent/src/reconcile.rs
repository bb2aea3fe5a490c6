//! Adoption of the agent's records: an apply that a crash interrupted left
//! its pending marker on each rootlet it targets. The kernel is the truth.
//! If the apply went through on some of its rootlets and not on others,
//! those that run the new version are first put back on the previous one
//! (or, for a first install, without the bundle), so that an apply stays
//! all or nothing across a crash. Then a rootlet that runs exactly the new
//! version records it as applied (only the status write was lost); any
//! other keeps its previous version as applied, with the attempt recorded
//! as interrupted, and the drift its status then reports is what the kernel
//! runs. The stages either version manages stay the bundle's, so a
//! re-apply of either converges. A put-back that fails is an outstanding
//! undo (`undo.rs`): outcome `undo_failed`, retried in the background. The
//! status of a rootlet that no longer exists is dropped.

use std::{collections::BTreeMap, time::SystemTime};

use super::{
    Agent, AgentError, ApplyStatus, Attempt, HISTORY, NOT_RUNNING, Pending, Result, STATUS,
    bundles::{HistoryEntry, Undo, same_target, spec_of},
    undo::UndoOutstanding,
    unix_ms,
};
use rootlet_dataplane::spec::{Change, RootletKey, StageSpec};

impl Agent {
    /// Settles every pending apply against what the kernel runs.
    pub(super) fn reconcile(&self) -> Result<()> {
        let live: Vec<RootletKey> = self.dp.list();
        let mut interrupted = vec![];
        // Interrupted applies that never loaded a rootlet they target.
        let mut never_loaded = vec![];
        for (id, status) in self.kv.list::<ApplyStatus>(STATUS)? {
            let Some(key) = live.iter().copied().find(|k| k.to_string() == id) else {
                // No rootlet, no status: the interrupted apply never loaded
                // it, or a crash came between an unload and this record.
                never_loaded.extend(status.pending);
                self.kv.delete(STATUS, &id)?;
                continue;
            };
            if let Some(pending) = status.pending.clone() {
                let runs_new = self.runs_new(key, &status, &pending).unwrap_or(false);
                interrupted.push((id, key, status, pending, runs_new));
            }
        }
        // Half applied: back to what ran before, where it went through. A
        // put-back that fails is an outstanding undo, as when an apply's own
        // undo fails (`undo.rs`): recorded, reported and retried, never left
        // as a rootlet that silently runs the version its siblings refused.
        let mut not_put_back = BTreeMap::new();
        for (id, key, status, pending, runs_new) in &interrupted {
            let same =
                |p: &Pending| p.digest == pending.digest && p.at_unix_ms == pending.at_unix_ms;
            let mixed = interrupted.iter().any(|(.., p, new)| same(p) && !new)
                || never_loaded.iter().any(same);
            if *runs_new && mixed {
                let put_back = self
                    .injected_undo_fault(*key)
                    .and_then(|()| self.restore(*key, status, pending));
                match put_back {
                    Ok(()) => {
                        tracing::warn!(rootlet = %key, bundle = %pending.bundle, "an interrupted apply went through on some rootlets only: put back")
                    }
                    Err(e) => {
                        tracing::error!(rootlet = %key, error = %e, "cannot put back a rootlet of an interrupted apply; retrying in the background");
                        not_put_back.insert(*key, e.to_string());
                    }
                }
                if !self.dp.list().contains(key) {
                    self.kv.delete(STATUS, id)?;
                }
            }
        }
        let mut applied = vec![];
        for (id, key, mut status, pending, _) in interrupted {
            if !self.dp.list().contains(&key) {
                continue;
            }
            status.pending = None;
            if pending.loads {
                status.loaded_by = Some(pending.bundle.clone());
            }
            if let Some(error) = not_put_back.get(&key) {
                let now = unix_ms(SystemTime::now());
                let undo = self.interrupted_undo(key, &status, &pending)?;
                status.undo = Some(UndoOutstanding::of(
                    &undo,
                    &pending.bundle,
                    &pending.version,
                    &pending.digest,
                    error,
                    now,
                ));
                status.attempted(Attempt {
                    version: pending.version.clone(),
                    digest: pending.digest.clone(),
                    outcome: "undo_failed".into(),
                    error: format!(
                        "interrupted by a restart of the agent after it went through here but not on \
                         every rootlet; putting this one back failed ({error}), and the agent retries"
                    ),
                    at_unix_ms: now,
                    idempotency_key: pending.idempotency_key.clone(),
                });
                self.undo_failed_once(key, 1);
                self.kv.put(STATUS, &id, &status)?;
                continue;
            }
            let ran = match self.settle(key, &mut status, &pending) {
                Ok(ran) => ran,
                Err(e) => {
                    // Adoption must not fail on it: record that it could not
                    // be settled; the status's drift still reads the kernel.
                    tracing::error!(rootlet = %key, error = %e, "cannot settle an interrupted apply");
                    status.attempted(Attempt {
                        version: pending.version.clone(),
                        digest: pending.digest.clone(),
                        outcome: "nack".into(),
                        error: format!(
                            "interrupted by a restart of the agent, and cannot be settled: {e}"
                        ),
                        at_unix_ms: unix_ms(SystemTime::now()),
                        idempotency_key: pending.idempotency_key.clone(),
                    });
                    false
                }
            };
            tracing::warn!(
                rootlet = %key,
                bundle = %pending.bundle,
                version = %pending.version,
                applied = ran,
                "an apply was interrupted by a restart; recorded what the kernel runs"
            );
            self.kv.put(STATUS, &id, &status)?;
            if ran {
                applied.push(pending);
            }
        }
        for p in applied {
            self.record_history(&p.bundle, &p.version, &p.digest, p.at_unix_ms)?;
        }
        // A crash after the statuses and before the history: the applied
        // version is still the newest one of its bundle.
        // Every bundle applied on the rootlet, not only the last one.
        for (_, mut status) in self.kv.list::<ApplyStatus>(STATUS)? {
            status.migrate();
            for (name, applied) in &status.applied {
                if applied.digest.is_empty() {
                    continue;
                }
                let history: Vec<HistoryEntry> = self.kv.get(HISTORY, name)?.unwrap_or_default();
                if !history.iter().any(|h| h.digest == applied.digest) {
                    let at = match applied.at_unix_ms {
                        0 => status.last_attempt.as_ref().map_or(0, |a| a.at_unix_ms),
                        at => at,
                    };
                    self.record_history(name, &applied.version, &applied.digest, at)?;
                }
            }
        }
        Ok(())
    }

    /// Whether `key` runs exactly the version `pending` applies.
    fn runs_new(&self, key: RootletKey, status: &ApplyStatus, pending: &Pending) -> Result<bool> {
        let bundle = self.stored(&pending.digest)?;
        let Some(target) = self.target_on(&bundle, key) else {
            return Ok(false);
        };
        let managed = status
            .managed
            .get(&pending.bundle)
            .cloned()
            .unwrap_or_default();
        Ok(Self::drift_of(&self.dp.state(key)?, &bundle, &target, &managed)?.is_empty())
    }

    /// Puts `key` back on the version it ran before `pending` (or without
    /// the bundle, unloading a rootlet the apply loaded).
    fn restore(&self, key: RootletKey, status: &ApplyStatus, pending: &Pending) -> Result<()> {
        if let Some(applied) = status.applied_of(&pending.bundle) {
            let prev = self.stored(&applied.digest)?;
            if let Some(target) = self.target_on(&prev, key) {
                let changes = self.changes_for(key, &prev, status, &target)?.changes;
                if !changes.is_empty() {
                    self.dp.apply(key, &changes, None)?;
                }
                return Ok(());
            }
        }
        let state = self.dp.state(key)?;
        let theirs = |s: &rootlet_dataplane::state::SlotState| {
            status.is_bundles(&pending.bundle, &s.stage, s.linked_generation)
        };
        if pending.loads && state.slots.iter().all(theirs) {
            return Ok(self.dp.unload_rootlet(key)?);
        }
        let unlinks: Vec<Change> = state
            .slots
            .iter()
            .filter(|s| theirs(s))
            .map(|s| Change::Unlink {
                name: s.stage.clone(),
            })
            .collect();
        if !unlinks.is_empty() {
            self.dp.apply(key, &unlinks, None)?;
        }
        Ok(())
    }

    /// What the interrupted `pending` apply changed on `key`, which runs
    /// its version: the difference between the version `status` applied
    /// before (none: a first install) and the pending one, as the undo of a
    /// failed apply records it, so that the retry inverts exactly that.
    fn interrupted_undo(
        &self,
        key: RootletKey,
        status: &ApplyStatus,
        pending: &Pending,
    ) -> Result<Undo> {
        let new = self.stored(&pending.digest)?;
        let target = self.target_on(&new, key).ok_or_else(|| {
            AgentError::NotFound(format!(
                "bundle `{}` {} does not target {key}",
                pending.bundle, pending.version
            ))
        })?;
        let previous = if let Some(applied) = status.applied_of(&pending.bundle) {
            let prev = self.stored(&applied.digest)?;
            same_target(&prev, &target).map(|t| (prev, t))
        } else {
            None
        };
        let before: Vec<StageSpec> = match &previous {
            Some((prev, t)) => prev
                .manifest()
                .stages_for(t)
                .map(|s| spec_of(prev, s))
                .collect::<Result<_>>()?,
            None => vec![],
        };
        let after: Vec<StageSpec> = new
            .manifest()
            .stages_for(&target)
            .map(|s| spec_of(&new, s))
            .collect::<Result<_>>()?;
        let mut applied = vec![];
        for spec in &after {
            match before.iter().find(|b| b.name == spec.name) {
                None => applied.push(Change::Link(spec.clone())),
                Some(b) if b.digest() != spec.digest() || b.owner != spec.owner => {
                    applied.push(Change::Replace(spec.clone()))
                }
                Some(_) => {}
            }
        }
        for b in &before {
            if !after.iter().any(|a| a.name == b.name) {
                applied.push(Change::Unlink {
                    name: b.name.clone(),
                });
            }
        }
        Ok(Undo {
            key,
            loaded_now: pending.loads,
            applied,
            replaced: BTreeMap::new(),
            generation: 0,
            previous,
        })
    }

    /// Records on `status` what the kernel of `key` runs after the
    /// interrupted `pending` apply; true if it runs the new version.
    fn settle(&self, key: RootletKey, status: &mut ApplyStatus, pending: &Pending) -> Result<bool> {
        let now = unix_ms(SystemTime::now());
        let state = self.dp.state(key)?;
        let bundle = self.stored(&pending.digest)?;
        let target = self.target_on(&bundle, key);
        let managed = status
            .managed
            .get(&pending.bundle)
            .cloned()
            .unwrap_or_default();
        let runs_new = match &target {
            Some(t) => Self::drift_of(&state, &bundle, t, &managed)?.is_empty(),
            None => false,
        };
        let mut attempt = Attempt {
            version: pending.version.clone(),
            digest: pending.digest.clone(),
            outcome: "ack".into(),
            error: String::new(),
            at_unix_ms: now,
            idempotency_key: pending.idempotency_key.clone(),
        };
        if runs_new {
            status.set_applied(
                &pending.bundle,
                &pending.version,
                &pending.digest,
                pending.at_unix_ms,
            );
            if let Some(t) = &target {
                let names: Vec<String> = bundle
                    .manifest()
                    .stages_for(t)
                    .map(|s| s.name.clone())
                    .collect();
                // The kernel runs exactly this version, which the
                // interrupted apply left: its stages are the ones running.
                let linked = names
                    .iter()
                    .filter_map(|n| {
                        let slot = state.slots.iter().find(|s| &s.stage == n)?;
                        Some((n.clone(), slot.linked_generation))
                    })
                    .collect();
                status.managed.insert(pending.bundle.clone(), names);
                status.linked.insert(pending.bundle.clone(), linked);
            }
        } else {
            attempt.outcome = "nack".into();
            attempt.error = "interrupted: the agent stopped before the apply finished; the status reports what the kernel runs".into();
            // Keep as the bundle's only what runs (or what its applied
            // version has): the rest was never linked.
            let previous = if let Some(applied) = status.applied_of(&pending.bundle) {
                let prev = self.stored(&applied.digest)?;
                self.target_on(&prev, key)
                    .map(|t| {
                        prev.manifest()
                            .stages_for(&t)
                            .map(|s| s.name.clone())
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            } else {
                vec![]
            };
            let kept: Vec<String> = managed
                .into_iter()
                .filter(|m| previous.contains(m) || state.slots.iter().any(|s| &s.stage == m))
                .collect();
            // A kept stage keeps the identity recorded for it. One the
            // interrupted apply linked has none: it gets the identity it
            // runs with (nobody could link between the crash and this
            // restart), or NOT_RUNNING, so that a stage of its name that a
            // team links later is not taken for the bundle's.
            let linked = status.linked.entry(pending.bundle.clone()).or_default();
            linked.retain(|n, _| kept.contains(n));
            for name in &kept {
                if linked.contains_key(name) {
                    continue;
                }
                match state.slots.iter().find(|s| &s.stage == name) {
                    Some(slot) if slot.linked_generation == 0 => {}
                    Some(slot) => {
                        linked.insert(name.clone(), slot.linked_generation);
                    }
                    None => {
                        linked.insert(name.clone(), NOT_RUNNING);
                    }
                }
            }
            status.linked.retain(|_, l| !l.is_empty());
            status.managed.insert(pending.bundle.clone(), kept);
        }
        status.attempted(attempt);
        Ok(runs_new)
    }
}
