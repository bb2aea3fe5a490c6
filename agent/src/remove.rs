//! RemoveBundle: returns a host to "no version of this bundle", as one
//! authorised, idempotent operation. Every stage the bundle manages is
//! unlinked, and a rootlet the bundle loaded is unloaded when nothing else
//! runs on it; nothing the bundle did not create is touched (a stage of a
//! managed name that is not the one the bundle left, see
//! [`ApplyStatus::is_bundles`], stays). The removal is
//! recorded in the bundle's history and in each rootlet's status.

use std::time::SystemTime;

use super::{
    AgentError, ApplyStatus, Attempt, Grant, HISTORY, Result, STATUS,
    bundles::{ApplyOutcome, HistoryEntry, Premise, authorize, check_premises, premises},
    crash::Step,
    lock, unix_ms,
};
use rootlet_dataplane::spec::{Change, RootletKey};

/// What the removal does on one rootlet.
struct Plan {
    key: RootletKey,
    status: ApplyStatus,
    unlinks: Vec<Change>,
    /// What each unlink rests on (checked under the rootlet's lock).
    premises: Vec<Premise>,
    /// The bundle loaded the rootlet and nothing else will run on it.
    unload: bool,
}

impl super::Agent {
    /// Removes bundle `name` from every rootlet of this host that runs it.
    /// `expected_digest`: only while that is the bundle's current version.
    pub fn remove_bundle(
        &self,
        grant: &Grant,
        name: &str,
        expected_digest: Option<&str>,
        idempotency_key: &str,
    ) -> Result<ApplyOutcome> {
        grant.mutate("remove bundles")?;
        if name.is_empty() {
            return Err(AgentError::InvalidArgument {
                field: "name".into(),
                message: "the bundle name is required".into(),
            });
        }
        let _one_at_a_time = lock(&self.bundle_lock);
        let mut history: Vec<HistoryEntry> = self.kv.get(HISTORY, name)?.unwrap_or_default();
        let already_removed = history.first().is_none_or(|h| h.removed);
        let (version, digest) = history
            .first()
            .map(|h| (h.version.clone(), h.digest.clone()))
            .unwrap_or_default();
        if let Some(expected) = expected_digest {
            // After a removal, the removed version still counts: removing it
            // again is the same (no-op) removal.
            if digest != expected {
                return Err(AgentError::NotCurrent {
                    name: name.to_owned(),
                    expected: expected.to_owned(),
                    current: if digest.is_empty() {
                        "no version".into()
                    } else {
                        digest
                    },
                });
            }
        }

        // Every change, authorised before anything changes.
        let mut plans = vec![];
        for key in self.dp.list() {
            let status = self.status(key)?;
            if !status.managed.contains_key(name) {
                continue;
            }
            let state = self.dp.state(key)?;
            let theirs = |s: &rootlet_dataplane::state::SlotState| {
                status.is_bundles(name, &s.stage, s.linked_generation)
            };
            let unlinks: Vec<Change> = state
                .slots
                .iter()
                .filter(|s| theirs(s))
                .map(|s| Change::Unlink {
                    name: s.stage.clone(),
                })
                .collect();
            let premises = premises(&state.slots, &unlinks);
            let unload =
                status.loaded_by.as_deref() == Some(name) && state.slots.iter().all(theirs);
            authorize(grant, &self.pipeline_of(key)?, &unlinks)?;
            if unload {
                grant.admin("unload a rootlet (the bundle loaded it)")?;
            }
            plans.push(Plan {
                key,
                status,
                unlinks,
                premises,
                unload,
            });
        }
        let noop = already_removed && plans.iter().all(|p| p.unlinks.is_empty() && !p.unload);

        let now = unix_ms(SystemTime::now());
        let mut rootlets = vec![];
        for plan in plans {
            let key = plan.key;
            let mut generation = self.dp.state(key)?.generation;
            let before = generation;
            if !plan.unlinks.is_empty() {
                generation = self
                    .dp
                    .apply_guarded(key, &plan.unlinks, None, |pipeline| {
                        // Each stage is still the one the plan read.
                        check_premises(key, pipeline, &plan.premises)?;
                        authorize(grant, pipeline, &plan.unlinks)
                    })?;
                self.emit(key, "changed");
            }
            // The leases of the stages it unlinked, not of another's stage
            // of a managed name.
            lock(&self.leases).retain(|_, l| {
                !(l.key == key
                    && plan
                        .unlinks
                        .iter()
                        .any(|u| matches!(u, Change::Unlink { name } if *name == l.stage)))
            });
            let unloaded = plan.unload
                && self.dp.unload_rootlet_if(key, |pipeline| -> Result<bool> {
                    // Someone linked a stage meanwhile: the rootlet stays.
                    Ok(pipeline
                        .stages
                        .iter()
                        .all(|s| plan.status.is_bundles(name, &s.name, s.linked_generation)))
                })?;
            self.crash.point(Step::BundleRootletCommitted);
            if unloaded {
                lock(&self.leases).retain(|_, l| l.key != key);
                self.kv.delete(STATUS, &key.to_string())?;
                self.emit(key, "unloaded");
                rootlets.push((key, 0, true));
                continue;
            }
            let mut status = plan.status;
            status.managed.remove(name);
            status.linked.remove(name);
            status.pending = None;
            // Nothing of the bundle is left to undo.
            if status.undo.as_ref().is_some_and(|u| u.bundle == name) {
                status.undo = None;
            }
            // Another bundle that runs here stays applied (and becomes the
            // last applied if this one was).
            status.clear_applied(name);
            if !(noop
                && status
                    .last_attempt
                    .as_ref()
                    .is_some_and(|a| a.outcome == "removed"))
            {
                status.attempted(Attempt {
                    version: version.clone(),
                    digest: digest.clone(),
                    outcome: "removed".into(),
                    error: String::new(),
                    at_unix_ms: now,
                    idempotency_key: idempotency_key.to_owned(),
                });
            }
            self.kv.put(STATUS, &key.to_string(), &status)?;
            rootlets.push((key, generation, generation != before));
        }
        self.count_undos()?;
        if let Some(head) = history.first_mut()
            && !head.removed
        {
            head.removed = true;
            self.kv.put(HISTORY, name, &history)?;
        }
        Ok(ApplyOutcome {
            name: name.to_owned(),
            version,
            digest,
            noop,
            removed: true,
            rootlets,
        })
    }
}
