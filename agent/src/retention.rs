//! What the agent's store keeps, and for how long: signed bundles as raw
//! bytes, kept while something refers to them; idempotency records for a
//! time to live.
//!
//! - A stored bundle is kept while a bundle's history (the versions kept
//!   for rollback) or a rootlet's apply status (its applied or pending
//!   version) names its digest. Any other (a NACKed bundle, the new version
//!   of an apply a crash interrupted and adoption put back) is deleted by
//!   the next sweep: when the agent opens, and from then on every
//!   [`Agent::sweep_period`]. A NACK deletes its own bundle at once.
//! - A stored policy document is kept while a stage's kept versions
//!   (`[limits] policy_history`) or an apply in flight names it. A version
//!   that leaves a history deletes its document at once (`commit_policy`);
//!   the sweep deletes what a crash or a failed apply left.
//! - An idempotency record (a mutation's response, kept so that a retry
//!   with the same key gets it again) lives for the configured time to live
//!   (`[limits] idempotency_ttl_seconds`, 24 h by default). Past it, the
//!   record is ignored at once and deleted by the next sweep: a call with
//!   that key is then a new request (it runs again against what the host
//!   runs then, and the key may name another request).
//! - Stores written before bundles were raw bytes (a JSON string of hex in
//!   table `bundles`) and idempotency records without a time are migrated
//!   when the agent opens.

use std::{collections::BTreeSet, time::Duration, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    Agent, AgentError, ApplyStatus, BUNDLES, HISTORY, IDEMPOTENCY, LEGACY_BUNDLES, NOT_RUNNING,
    Result, STATUS, bundles::HistoryEntry, lock, unix_ms,
};

/// The default time to live of an idempotency record.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(86_400);
/// The longest time between two sweeps.
const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(60);
/// The shortest time between two sweeps.
const MIN_SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// A mutation's stored response.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Idempotent {
    request_hash: String,
    response: Vec<u8>,
    at_unix_ms: i64,
}

/// An idempotency record as this or an earlier agent stored it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum StoredIdempotent {
    Timed(Idempotent),
    /// Before records had a time: (request hash, response).
    Untimed(String, Vec<u8>),
}

impl Agent {
    /// How often the background sweeps the store.
    pub fn sweep_period(&self) -> Duration {
        self.idempotency_ttl
            .clamp(MIN_SWEEP_PERIOD, MAX_SWEEP_PERIOD)
    }

    /// Moves what an earlier agent stored into today's form: bundles from
    /// hex in JSON to raw bytes, idempotency records to records with a time
    /// (now: they live one time to live from this upgrade). Each bundle is
    /// written before its old record goes, so a crash midway loses nothing
    /// and the next open finishes.
    pub(super) fn migrate(&self) -> Result<()> {
        for (digest, hexed) in self.kv.list::<String>(LEGACY_BUNDLES)? {
            match hex::decode(&hexed) {
                Ok(bytes) => self.kv.put_bytes(BUNDLES, &digest, &bytes)?,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "a stored bundle is corrupt: dropped");
                }
            }
            self.kv.delete(LEGACY_BUNDLES, &digest)?;
        }
        // Statuses of an agent that kept one applied version per rootlet:
        // that version, as the one of its bundle. Statuses that name a
        // bundle's stages without their identity: the identity they run
        // with now.
        for (key, mut status) in self.kv.list::<ApplyStatus>(STATUS)? {
            let migrated = status.migrate();
            if self.identify_managed(&key, &mut status) || migrated {
                self.kv.put(STATUS, &key, &status)?;
            }
        }
        let now = unix_ms(SystemTime::now());
        for (key, record) in self.kv.list::<StoredIdempotent>(IDEMPOTENCY)? {
            if let StoredIdempotent::Untimed(request_hash, response) = record {
                let record = Idempotent {
                    request_hash,
                    response,
                    at_unix_ms: now,
                };
                self.kv.put(IDEMPOTENCY, &key, &record)?;
            }
        }
        Ok(())
    }

    /// Records the identity (`linked_generation`) of each managed stage of
    /// `status` that has none: a status of an earlier agent named the
    /// stages only, and that agent took whatever ran under those names as
    /// the bundle's; that is taken once more, and from now on the stage is
    /// the bundle's only while it is that one. A managed stage that does not
    /// run gets [`NOT_RUNNING`]: a stage of its name linked later is not the
    /// bundle's. A status with an apply pending is left to `reconcile`.
    /// True if it changed.
    fn identify_managed(&self, key: &str, status: &mut ApplyStatus) -> bool {
        if status.pending.is_some() {
            return false;
        }
        let Some(live) = self.dp.list().into_iter().find(|k| k.to_string() == key) else {
            return false;
        };
        let Ok(state) = self.dp.state(live) else {
            return false;
        };
        let mut changed = false;
        for (bundle, names) in &status.managed {
            let linked = status.linked.entry(bundle.clone()).or_default();
            for name in names {
                if linked.contains_key(name) {
                    continue;
                }
                match state.slots.iter().find(|s| &s.stage == name) {
                    // 0: linked by a data plane that did not record it; it
                    // stays the bundle's by name.
                    Some(slot) if slot.linked_generation == 0 => continue,
                    Some(slot) => linked.insert(name.clone(), slot.linked_generation),
                    None => linked.insert(name.clone(), NOT_RUNNING),
                };
                changed = true;
            }
        }
        status.linked.retain(|_, l| !l.is_empty());
        changed
    }

    /// Deletes what the store no longer needs: bundles nothing refers to,
    /// idempotency records past their time to live.
    pub fn sweep(&self) -> Result<()> {
        self.sweep_bundles()?;
        self.sweep_policies()?;
        self.sweep_idempotency()
    }

    /// Deletes every stored policy document that no kept version and no
    /// apply in flight names. Under the policy lock: an apply stores its
    /// document before it names it.
    fn sweep_policies(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.policy_lock);
        let kept = self.referenced_policies()?;
        let unreferenced: Vec<String> = self
            .kv
            .bytes_keys(crate::policy::DOCUMENTS)?
            .into_iter()
            .filter(|d| !kept.contains(d))
            .collect();
        Ok(self
            .kv
            .delete_bytes(crate::policy::DOCUMENTS, &unreferenced)?)
    }

    /// Deletes every stored bundle that no history and no apply status
    /// names. Under the bundle lock: an apply stores its bundle and names
    /// it (pending) before it lets go.
    fn sweep_bundles(&self) -> Result<()> {
        let _one_at_a_time = lock(&self.bundle_lock);
        let mut kept = BTreeSet::new();
        for (_, history) in self.kv.list::<Vec<HistoryEntry>>(HISTORY)? {
            kept.extend(history.into_iter().map(|h| h.digest));
        }
        for (_, status) in self.kv.list::<ApplyStatus>(STATUS)? {
            // Every bundle that runs here, not only the last applied.
            kept.extend(status.applied.into_values().map(|a| a.digest));
            kept.insert(status.applied_digest);
            kept.extend(status.pending.map(|p| p.digest));
            // An outstanding undo rebuilds its inverse from both versions.
            if let Some(u) = status.undo {
                kept.insert(u.digest);
                kept.insert(u.previous_digest);
            }
        }
        let unreferenced: Vec<String> = self
            .kv
            .bytes_keys(BUNDLES)?
            .into_iter()
            .filter(|d| !kept.contains(d))
            .collect();
        if !unreferenced.is_empty() {
            tracing::info!(bundles = ?unreferenced, "deleting stored bundles nothing refers to");
        }
        Ok(self.kv.delete_bytes(BUNDLES, &unreferenced)?)
    }

    fn expired(&self, at_unix_ms: i64, now: i64) -> bool {
        let ttl = i64::try_from(self.idempotency_ttl.as_millis()).unwrap_or(i64::MAX);
        now.saturating_sub(at_unix_ms) >= ttl
    }

    fn sweep_idempotency(&self) -> Result<()> {
        let now = unix_ms(SystemTime::now());
        let expired: Vec<String> = self
            .kv
            .list::<StoredIdempotent>(IDEMPOTENCY)?
            .into_iter()
            .filter(
                |(_, r)| matches!(r, StoredIdempotent::Timed(r) if self.expired(r.at_unix_ms, now)),
            )
            .map(|(k, _)| k)
            .collect();
        Ok(self.kv.delete_many(IDEMPOTENCY, &expired)?)
    }

    /// A response stored under an idempotency key, if `request_hash`
    /// matches; a conflict if the key was used for another request. A
    /// record past its time to live is no record.
    pub fn idempotent_get(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
    ) -> Result<Option<Vec<u8>>> {
        let stored: Option<StoredIdempotent> =
            self.kv.get(IDEMPOTENCY, &format!("{scope}\n{key}"))?;
        let (hash, response) = match stored {
            None => return Ok(None),
            Some(StoredIdempotent::Timed(r)) => {
                if self.expired(r.at_unix_ms, unix_ms(SystemTime::now())) {
                    return Ok(None);
                }
                (r.request_hash, r.response)
            }
            Some(StoredIdempotent::Untimed(hash, response)) => (hash, response),
        };
        if hash == request_hash {
            Ok(Some(response))
        } else {
            Err(AgentError::IdempotencyConflict(key.to_owned()))
        }
    }

    /// Stores the response of the call `key` made, for its time to live.
    pub fn idempotent_put(
        &self,
        scope: &str,
        key: &str,
        request_hash: &str,
        response: Vec<u8>,
    ) -> Result<()> {
        let record = Idempotent {
            request_hash: request_hash.to_owned(),
            response,
            at_unix_ms: unix_ms(SystemTime::now()),
        };
        Ok(self
            .kv
            .put(IDEMPOTENCY, &format!("{scope}\n{key}"), &record)?)
    }
}
