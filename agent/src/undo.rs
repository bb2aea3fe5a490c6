//! Outstanding undos: when a bundle apply fails and its undo cannot put a
//! rootlet back, the rootlet's apply status keeps an [`UndoOutstanding`]
//! (in the agent's store, so it survives a restart), its attempt's outcome
//! is `undo_failed`, and the background retries the undo with bounded
//! exponential backoff ([`FIRST_RETRY`] doubling to [`MAX_RETRY`]) until it
//! succeeds. A retry takes the bundle lock like an apply, rebuilds the exact
//! inverse from the stored bundles, and applies it under the generation it
//! read (`Agent::undo`): it touches only stages still as the failed apply
//! left them.
//!
//! An operator supersedes it by acting: an ACKed ApplyBundle or Rollback of
//! that bundle on the rootlet, a RemoveBundle of that bundle, or unloading
//! the rootlet clears it. A stage change (LinkStage, ReplaceStage,
//! UnlinkStage) does not clear it, but the retry leaves the stage it changed
//! alone; when nothing is left to invert the undo is done.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    AgentError, ApplyStatus, Result, STATUS,
    bundles::{Undo, same_target, spec_of},
    lock, unix_ms,
};
use rootlet_dataplane::spec::{Change, RootletKey};

/// The first retry comes this long after a failure; each next one waits
/// twice as long, up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// One change of the failed apply, by stage name: the specs are rebuilt
/// from the stored bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "stage", rename_all = "snake_case")]
pub enum UndoChange {
    Link(String),
    Replace(String),
    Unlink(String),
}

/// An undo that failed on a rootlet, kept until it succeeds or is
/// superseded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoOutstanding {
    /// The bundle whose failed apply this undoes.
    pub bundle: String,
    /// The failed version and its digest (kept in the store meanwhile).
    pub version: String,
    pub digest: String,
    /// The version it ran before on this rootlet (empty: none).
    pub previous_digest: String,
    /// The failed apply loaded the rootlet.
    pub loaded_now: bool,
    /// What the failed apply changed here.
    pub applied: Vec<UndoChange>,
    /// Why the last attempt failed.
    pub error: String,
    /// Attempts so far (the first undo included).
    pub attempts: u32,
    pub since_unix_ms: i64,
    pub last_attempt_unix_ms: i64,
}

impl UndoOutstanding {
    /// The record of `undo`, whose first attempt failed with `error`.
    pub(super) fn of(
        undo: &Undo,
        bundle: &str,
        version: &str,
        digest: &str,
        error: &str,
        now: i64,
    ) -> UndoOutstanding {
        UndoOutstanding {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            digest: digest.to_owned(),
            previous_digest: undo
                .previous
                .as_ref()
                .map(|(b, _)| b.digest())
                .unwrap_or_default(),
            loaded_now: undo.loaded_now,
            applied: undo
                .applied
                .iter()
                .filter_map(|c| match c {
                    Change::Link(s) => Some(UndoChange::Link(s.name.clone())),
                    Change::Replace(s) => Some(UndoChange::Replace(s.name.clone())),
                    Change::Unlink { name } => Some(UndoChange::Unlink(name.clone())),
                    Change::SetPin { .. } => None,
                })
                .collect(),
            error: error.to_owned(),
            attempts: 1,
            since_unix_ms: now,
            last_attempt_unix_ms: now,
        }
    }
}

/// The wait before the retry that follows `attempts` failed attempts.
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
}

/// What metrics and health read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UndoCounts {
    /// Rootlets with an undo outstanding now.
    pub outstanding: usize,
    /// Retries made by this process (successful or not).
    pub retries: u64,
    /// Undo attempts that failed in this process (first undos included).
    pub failures: u64,
}

/// The agent's in-memory side of outstanding undos.
#[derive(Debug)]
pub(super) struct Undos {
    /// When each rootlet's next retry is due (absent: at once).
    next: std::sync::Mutex<BTreeMap<RootletKey, Instant>>,
    outstanding: watch::Sender<usize>,
    retries: AtomicU64,
    failures: AtomicU64,
}

impl Default for Undos {
    fn default() -> Self {
        Undos {
            next: Default::default(),
            outstanding: watch::channel(0).0,
            retries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

impl super::Agent {
    /// How many rootlets have an undo outstanding; changes as they do.
    pub fn undo_outstanding(&self) -> watch::Receiver<usize> {
        self.undos.outstanding.subscribe()
    }

    pub fn undo_counts(&self) -> UndoCounts {
        UndoCounts {
            outstanding: *self.undos.outstanding.borrow(),
            retries: self.undos.retries.load(Ordering::Relaxed),
            failures: self.undos.failures.load(Ordering::Relaxed),
        }
    }

    /// Counts one failed undo attempt (of an apply's own undo).
    pub(super) fn undo_failed_once(&self, key: RootletKey, attempts: u32) {
        self.undos.failures.fetch_add(1, Ordering::Relaxed);
        lock(&self.undos.next).insert(key, Instant::now() + backoff(attempts));
    }

    /// Recounts the outstanding undos from the store.
    pub(super) fn count_undos(&self) -> Result<()> {
        let n = self
            .kv
            .list::<ApplyStatus>(STATUS)?
            .iter()
            .filter(|(_, s)| s.undo.is_some())
            .count();
        self.undos.outstanding.send_if_modified(|c| {
            let changed = *c != n;
            *c = n;
            changed
        });
        Ok(())
    }

    /// An undo attempt: the injected fault, or the real undo.
    pub(super) fn try_undo(&self, undo: &Undo) -> Result<()> {
        // The rootlet that failed changed nothing: nothing to undo there.
        if undo.applied.is_empty() && !undo.loaded_now {
            return Ok(());
        }
        self.injected_undo_fault(undo.key)?;
        self.undo(undo)
    }

    /// The test-only fault of `ROOTLETD_FAIL_UNDO`, for any undo attempt:
    /// an apply's own undo, its retries, and adoption's put-back.
    pub(super) fn injected_undo_fault(&self, key: RootletKey) -> Result<()> {
        if self.fail_undo.fires() {
            return Err(AgentError::InjectedFault(format!(
                "{key}: injected undo failure ({})",
                super::crash::FAIL_UNDO_ENV
            )));
        }
        Ok(())
    }

    /// The undo `rec` stands for, rebuilt from the stored bundles.
    fn undo_of(&self, key: RootletKey, rec: &UndoOutstanding) -> Result<Undo> {
        let failed = self.stored(&rec.digest)?;
        let target = self.target_on(&failed, key).ok_or_else(|| {
            AgentError::NotFound(format!(
                "bundle `{}` {} does not target {key}",
                rec.bundle, rec.version
            ))
        })?;
        let spec = |name: &str| {
            let stage = failed
                .manifest()
                .stages_for(&target)
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    AgentError::NotFound(format!("stage `{name}` is not in {}", rec.version))
                })?;
            spec_of(&failed, stage)
        };
        let applied = rec
            .applied
            .iter()
            .map(|c| {
                Ok(match c {
                    UndoChange::Link(n) => Change::Link(spec(n)?),
                    UndoChange::Replace(n) => Change::Replace(spec(n)?),
                    UndoChange::Unlink(n) => Change::Unlink { name: n.clone() },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let previous = if rec.previous_digest.is_empty() {
            None
        } else {
            let prev = self.stored(&rec.previous_digest)?;
            same_target(&prev, &target).map(|t| (prev, t))
        };
        Ok(Undo {
            key,
            loaded_now: rec.loaded_now,
            applied,
            replaced: BTreeMap::new(),
            generation: 0,
            previous,
        })
    }

    /// Retries every outstanding undo whose time has come; serialized with
    /// applies by the bundle lock.
    pub fn retry_undos(&self) -> Result<()> {
        if *self.undos.outstanding.borrow() == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let _one_at_a_time = lock(&self.bundle_lock);
        for key in self.dp.list() {
            let mut status = self.status(key)?;
            let Some(rec) = status.undo.clone() else {
                continue;
            };
            if lock(&self.undos.next).get(&key).is_some_and(|t| *t > now) {
                continue;
            }
            self.undos.retries.fetch_add(1, Ordering::Relaxed);
            let result = self.undo_of(key, &rec).and_then(|u| self.try_undo(&u));
            let at = unix_ms(SystemTime::now());
            match result {
                Ok(()) => {
                    tracing::info!(rootlet = %key, bundle = %rec.bundle, version = %rec.version, attempts = rec.attempts + 1, "the retried undo restored the rootlet");
                    status.undo = None;
                    if let Some(a) = status
                        .last_attempt
                        .as_mut()
                        .filter(|a| a.outcome == "undo_failed" && a.digest == rec.digest)
                    {
                        a.outcome = "nack".into();
                        a.error = format!(
                            "{}; restored by a retry of the undo (attempt {})",
                            a.error,
                            rec.attempts + 1
                        );
                    }
                    for a in status
                        .keyed
                        .iter_mut()
                        .filter(|a| a.outcome == "undo_failed" && a.digest == rec.digest)
                    {
                        a.outcome = "nack".into();
                    }
                    lock(&self.undos.next).remove(&key);
                    if self.dp.list().contains(&key) {
                        self.kv.put(STATUS, &key.to_string(), &status)?;
                    } else {
                        // The retry unloaded the rootlet the apply loaded.
                        self.kv.delete(STATUS, &key.to_string())?;
                    }
                }
                Err(e) => {
                    let mut rec = rec;
                    rec.attempts = rec.attempts.saturating_add(1);
                    rec.error = e.to_string();
                    rec.last_attempt_unix_ms = at;
                    let wait = backoff(rec.attempts);
                    tracing::warn!(rootlet = %key, error = %e, attempts = rec.attempts, retry_in = ?wait, "the retried undo failed");
                    self.undo_failed_once(key, rec.attempts);
                    status.undo = Some(rec);
                    self.kv.put(STATUS, &key.to_string(), &status)?;
                }
            }
        }
        self.count_undos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn a_record_round_trips_through_the_store_format() {
        let rec = UndoOutstanding {
            bundle: "edge".into(),
            version: "2.0".into(),
            digest: "d2".into(),
            previous_digest: "d1".into(),
            loaded_now: false,
            applied: vec![
                UndoChange::Replace("sampler".into()),
                UndoChange::Unlink("ddos".into()),
                UndoChange::Link("lb".into()),
            ],
            error: "boom".into(),
            attempts: 3,
            since_unix_ms: 1,
            last_attempt_unix_ms: 2,
        };
        let json = serde_json::to_string(&rec).expect("json");
        assert!(
            json.contains(r#"{"kind":"unlink","stage":"ddos"}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<UndoOutstanding>(&json).expect("back"),
            rec
        );
    }
}
