//! Adoption of the agent's records: an apply that a crash interrupted left
//! its pending marker on each rootlet it targets. The kernel is the truth:
//! a rootlet that runs exactly the new version records it as applied (only
//! the status write was lost); any other keeps its previous version as
//! applied, with the attempt recorded as interrupted, and the drift its
//! status then reports is what the kernel runs. The stages either version
//! manages stay the bundle's, so a re-apply of either converges. The status
//! of a rootlet that no longer exists is dropped.

use std::time::SystemTime;

use super::{
    Agent, ApplyStatus, Attempt, HISTORY, Pending, Result, STATUS, bundles::HistoryEntry, unix_ms,
};
use crate::dataplane::spec::RootletKey;

impl Agent {
    /// Settles every pending apply against what the kernel runs.
    pub(super) fn reconcile(&self) -> Result<()> {
        let live: Vec<RootletKey> = self.dp.list();
        let mut applied = vec![];
        for (id, mut status) in self.kv.list::<ApplyStatus>(STATUS)? {
            let Some(key) = live.iter().copied().find(|k| k.to_string() == id) else {
                // No rootlet, no status: the interrupted apply never loaded
                // it, or a crash came between an unload and this record.
                self.kv.delete(STATUS, &id)?;
                continue;
            };
            let Some(pending) = status.pending.take() else {
                continue;
            };
            if pending.loads {
                status.loaded_by = Some(pending.bundle.clone());
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
        for (_, status) in self.kv.list::<ApplyStatus>(STATUS)? {
            if status.applied_digest.is_empty() {
                continue;
            }
            let history: Vec<HistoryEntry> =
                self.kv.get(HISTORY, &status.bundle)?.unwrap_or_default();
            if !history.iter().any(|h| h.digest == status.applied_digest) {
                let at = status.last_attempt.as_ref().map_or(0, |a| a.at_unix_ms);
                self.record_history(
                    &status.bundle,
                    &status.applied_version,
                    &status.applied_digest,
                    at,
                )?;
            }
        }
        Ok(())
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
            status.bundle = pending.bundle.clone();
            status.applied_version = pending.version.clone();
            status.applied_digest = pending.digest.clone();
            if let Some(t) = &target {
                status.managed.insert(
                    pending.bundle.clone(),
                    bundle
                        .manifest()
                        .stages_for(t)
                        .map(|s| s.name.clone())
                        .collect(),
                );
            }
        } else {
            attempt.outcome = "nack".into();
            attempt.error = "interrupted: the agent stopped before the apply finished; the status reports what the kernel runs".into();
            // Keep as the bundle's only what runs (or what its applied
            // version has): the rest was never linked.
            let previous = if status.bundle == pending.bundle && !status.applied_digest.is_empty() {
                let prev = self.stored(&status.applied_digest)?;
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
            status.managed.insert(pending.bundle.clone(), kept);
        }
        status.attempted(attempt);
        Ok(runs_new)
    }
}
