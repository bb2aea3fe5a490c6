//! Policies: the desired contents of a stage's maps, applied as one
//! transaction (docs/POLICY.md).
//!
//! An apply verifies the signed document, checks that the caller owns the
//! stage, checks every entry against the map's BTF types (nothing touches
//! the kernel before every entry fits), builds a new inner map beside the
//! live one for each policy map, records what it is about to do, swaps the
//! inner maps in (one update each), writes the plain maps entry by entry,
//! and records the result.
//!
//! **The kernel decides what runs.** A record names the kernel ids it
//! produced (the inner map of a policy map, the map of a plain one); the
//! version reported for a stage is the recorded one only while its maps are
//! still those ids. After a crash, [`Agent::reconcile_policies`] compares the
//! pending record with the kernel: if any inner map of the new policy is
//! live, the apply is finished from the stored document (roll forward);
//! otherwise what the apply touched is put back (roll back). Either way the
//! maps hold the old policy or the new one, and the records say which.

use std::{collections::BTreeMap, time::SystemTime};

use rootlet_bundle::{PolicyDocument, SignedPolicy};
use rootlet_dataplane::{
    budget::{self, Step as Timed},
    policy::{self, MapHandle},
    spec::RootletKey,
};
use rootlet_schema::{MapSchema, Schema};
use serde::{Deserialize, Serialize};

use crate::{Agent, AgentError, Grant, Result, crash::Step, lock, unix_ms};

/// The applied policy of each stage, by [`stage_key`].
pub(crate) const CURRENT: &str = "policy_current";
/// The kept versions of each stage's policy, newest first.
pub(crate) const HISTORY: &str = "policy_history";
/// An apply in flight, by [`stage_key`] (at most one per stage).
pub(crate) const PENDING: &str = "policy_pending";
/// Policy documents by digest, raw bytes ([`crate::Kv::put_bytes`]): the
/// signed encoding, or the canonical one for a policy a bundle carried.
pub(crate) const DOCUMENTS: &str = "policy_bytes";

/// Most entries one dump page returns.
pub const MAX_PAGE: usize = 10_000;
/// The page size when the caller sets none.
pub const DEFAULT_PAGE: usize = 1_000;

/// A map's entries as the kernel's bytes: (key, value).
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

fn stage_key(key: RootletKey, stage: &str) -> String {
    format!("{key}\n{stage}")
}

/// One map as an applied policy left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedMap {
    /// The kernel's name of the map.
    pub name: String,
    /// The stage's map (a policy map's outer map).
    pub map_id: u32,
    /// Policy maps: the inner map the policy filled.
    pub inner_id: Option<u32>,
    pub entries: u64,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
}

impl AppliedMap {
    pub fn atomic(&self) -> bool {
        self.inner_id.is_some()
    }
}

/// The policy a stage's maps hold, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub stage: String,
    pub version: u64,
    pub digest: String,
    pub maps: Vec<AppliedMap>,
    pub applied_at_unix_ms: i64,
    pub applied_by: String,
}

/// One kept version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub digest: String,
    pub applied_at_unix_ms: i64,
    pub applied_by: String,
}

/// What an apply in flight recorded before it touched what packets see.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    /// The record the apply will write when done.
    new: PolicyRecord,
    /// The plain maps' contents before the apply, for the roll back.
    plain_before: Vec<(String, Entries)>,
}

/// What a stage's maps hold now, judged from the kernel.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    /// None: no policy (or the recorded one is no longer what the maps hold).
    pub current: Option<PolicyRecord>,
    /// Why the recorded policy is not what the maps hold.
    pub drift: Option<String>,
    pub history: Vec<VersionRecord>,
}

impl PolicyView {
    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.version)
    }
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct PolicyOutcome {
    pub record: PolicyRecord,
    pub previous_version: u64,
    pub noop: bool,
}

impl PolicyOutcome {
    /// Every map swapped with one update, and one map only: a packet saw
    /// the old policy or the new one.
    pub fn atomic(&self) -> bool {
        self.record.maps.len() == 1 && self.record.maps.iter().all(AppliedMap::atomic)
    }
}

/// A map of the stage with its types.
pub struct TypedMap {
    pub handle: MapHandle,
    /// None: the program has no BTF for it.
    pub schema: Option<MapSchema>,
}

impl TypedMap {
    /// The schema of the entries a policy writes (a policy map's inner
    /// map's; None for a map whose values are kernel objects).
    pub fn entry_schema(&self) -> Option<&MapSchema> {
        self.schema.as_ref()?.entries()
    }
}

/// The entries of one map of a policy, as the kernel's bytes.
struct Encoded {
    map: usize,
    entries: Entries,
}

impl Agent {
    /// The maps of `stage`, typed from its program's BTF.
    pub fn stage_maps(&self, grant: &Grant, key: RootletKey, stage: &str) -> Result<Vec<TypedMap>> {
        grant.read()?;
        self.typed_maps(key, stage)
    }

    fn typed_maps(&self, key: RootletKey, stage: &str) -> Result<Vec<TypedMap>> {
        let handles = self.dp.stage_maps(key, stage)?;
        let schema = handles
            .first()
            .map(|h| h.btf.clone())
            .filter(|btf| !btf.is_empty())
            .map(|btf| Schema::from_btf(&btf))
            .transpose()
            .map_err(|e| AgentError::InvalidArgument {
                field: "stage".into(),
                message: format!("stage `{stage}`: its program's BTF: {e}"),
            })?;
        Ok(handles
            .into_iter()
            .map(|handle| {
                let schema = schema.as_ref().and_then(|s| s.map(&handle.name)).cloned();
                TypedMap { handle, schema }
            })
            .collect())
    }

    /// A page of `map`'s entries, as JSON following its types. `after` is
    /// the last key of the previous page, with the inner map it came from.
    #[allow(clippy::type_complexity)]
    pub fn dump_map(
        &self,
        grant: &Grant,
        key: RootletKey,
        stage: &str,
        map: &str,
        after: Option<(u32, Vec<u8>)>,
        limit: usize,
    ) -> Result<(
        Vec<(serde_json::Value, serde_json::Value)>,
        Option<(u32, Vec<u8>)>,
        u32,
    )> {
        grant.read()?;
        let maps = self.typed_maps(key, stage)?;
        let typed = find_map(&maps, stage, map)?;
        let inner_id = typed.handle.inner.as_ref().map_or(0, |i| i.id);
        if let Some((from, _)) = &after
            && *from != inner_id
        {
            return Err(AgentError::DumpInterrupted {
                stage: stage.to_owned(),
                map: map.to_owned(),
            });
        }
        let limit = limit.clamp(1, MAX_PAGE);
        let (raw, next) = policy::dump(
            &typed.handle,
            after.as_ref().map(|(_, k)| k.as_slice()),
            limit,
        )?;
        let schema = typed.entry_schema();
        let mut out = Vec::with_capacity(raw.len());
        for (k, v) in raw {
            out.push(match schema {
                Some(s) => (
                    s.encode_key(&k).map_err(|e| encode_err(map, "key", &e))?,
                    s.encode_value(&v)
                        .map_err(|e| encode_err(map, "value", &e))?,
                ),
                // No types: hex, as bpftool prints without BTF.
                None => (hex::encode(&k).into(), hex::encode(&v).into()),
            });
        }
        Ok((out, next.map(|k| (inner_id, k)), inner_id))
    }

    /// The policy `stage` runs, judged from the kernel, and its kept versions.
    pub fn policy(&self, grant: &Grant, key: RootletKey, stage: &str) -> Result<PolicyView> {
        grant.read()?;
        self.policy_view(key, stage)
    }

    /// The policy version `stage`'s maps hold (0: none), for state reads.
    pub fn policy_version(&self, key: RootletKey, stage: &str) -> (u64, String) {
        match self.policy_view(key, stage) {
            Ok(PolicyView {
                current: Some(c), ..
            }) => (c.version, c.digest),
            _ => (0, String::new()),
        }
    }

    pub(crate) fn policy_view(&self, key: RootletKey, stage: &str) -> Result<PolicyView> {
        let sk = stage_key(key, stage);
        let history: Vec<VersionRecord> = self.kv.get(HISTORY, &sk)?.unwrap_or_default();
        let Some(record) = self.kv.get::<PolicyRecord>(CURRENT, &sk)? else {
            return Ok(PolicyView {
                history,
                ..PolicyView::default()
            });
        };
        let handles = match self.dp.stage_maps(key, stage) {
            Ok(h) => h,
            Err(e) => {
                return Ok(PolicyView {
                    current: None,
                    drift: Some(format!("the stage's maps cannot be read: {e}")),
                    history,
                });
            }
        };
        let drift = record.maps.iter().find_map(|m| {
            let Some(h) = handles.iter().find(|h| h.name == m.name) else {
                return Some(format!("the stage has no map `{}` any more", m.name));
            };
            if h.id != m.map_id {
                return Some(format!(
                    "map `{}` is a new map (id {}, the policy filled {}): the stage was replaced with new maps",
                    m.name, h.id, m.map_id
                ));
            }
            let live_inner = h.inner.as_ref().map(|i| i.id);
            if m.inner_id.is_some() && live_inner != m.inner_id {
                return Some(format!(
                    "policy map `{}` holds inner map {:?}, not the policy's {:?}: changed out of band",
                    m.name, live_inner, m.inner_id
                ));
            }
            None
        });
        Ok(match drift {
            Some(d) => PolicyView {
                current: None,
                drift: Some(d),
                history,
            },
            None => PolicyView {
                current: Some(record),
                drift: None,
                history,
            },
        })
    }

    /// Verifies a signed policy (or accepts an unsigned one if the config
    /// allows it): the document and its digest (computed once, by the
    /// verification).
    fn verify_policy(&self, bytes: &[u8]) -> Result<(PolicyDocument, String)> {
        let signed = SignedPolicy::from_bytes(bytes)?;
        if signed.signatures.is_empty() && self.allow_unsigned {
            let digest = signed.policy.digest().to_string();
            return Ok((signed.policy, digest));
        }
        let v = signed.into_verified(&self.trusted)?;
        let digest = v.digest().to_string();
        Ok((v.into_policy(), digest))
    }

    /// Applies a signed policy to the stage it names on `key`.
    pub fn apply_policy(
        &self,
        grant: &Grant,
        key: RootletKey,
        signed: &[u8],
        expected: Option<u64>,
    ) -> Result<PolicyOutcome> {
        grant.mutate("apply policies")?;
        let (doc, digest) = budget::time(Timed::Parse, || self.verify_policy(signed))?;
        self.apply_document(grant, key, &doc, &digest, signed, expected)
    }

    /// Applies kept version `to` (0: the one before the current) again.
    pub fn rollback_policy(
        &self,
        grant: &Grant,
        key: RootletKey,
        stage: &str,
        to: u64,
        expected: Option<u64>,
    ) -> Result<PolicyOutcome> {
        grant.mutate("roll back policies")?;
        let view = self.policy_view(key, stage)?;
        let current = view.version();
        let target = view
            .history
            .iter()
            .find(|h| {
                if to == 0 {
                    h.version != current
                } else {
                    h.version == to
                }
            })
            .cloned()
            .ok_or_else(|| AgentError::NoPolicyToRollBack {
                stage: stage.to_owned(),
                to,
            })?;
        let bytes = self
            .kv
            .get_bytes(DOCUMENTS, &target.digest)?
            .ok_or_else(|| {
                AgentError::NotFound(format!("policy {} is no longer kept", target.digest))
            })?;
        // Verified when it was stored; its signature still holds.
        let doc = SignedPolicy::from_bytes(&bytes)?.policy;
        self.apply_document(grant, key, &doc, &target.digest, &bytes, expected)
    }

    /// A bundle's initial policies for `stage` on `key`: applied only when
    /// the stage holds no policy (a policy pushed since is never
    /// overwritten by the bundle that brought the stage).
    pub(crate) fn apply_initial(
        &self,
        grant: &Grant,
        key: RootletKey,
        stage: &str,
        policies: &[&PolicyDocument],
    ) -> Result<()> {
        if policies.is_empty() || self.policy_view(key, stage)?.version() != 0 {
            return Ok(());
        }
        for doc in policies {
            let stored = SignedPolicy::new((*doc).clone()).to_bytes();
            self.apply_document(grant, key, doc, &doc.digest().to_string(), &stored, None)?;
        }
        Ok(())
    }

    /// Applies `doc` (whose digest is `digest` and stored form `bytes`)
    /// under the policy lock.
    pub(crate) fn apply_document(
        &self,
        grant: &Grant,
        key: RootletKey,
        doc: &PolicyDocument,
        digest: &str,
        bytes: &[u8],
        expected: Option<u64>,
    ) -> Result<PolicyOutcome> {
        let _one_at_a_time = lock(&self.policy_lock);
        let stage = doc.stage.as_str();
        let owner = self.owner_of(key, stage)?.ok_or_else(|| {
            AgentError::NotFound(format!("stage `{stage}` is not linked on {key}"))
        })?;
        grant.stage(stage, Some(&owner))?;
        let view = self.policy_view(key, stage)?;
        let previous_version = view.version();
        if let Some(want) = expected
            && want != previous_version
        {
            return Err(AgentError::PolicyVersionMismatch {
                stage: stage.to_owned(),
                expected: want,
                current: previous_version,
            });
        }
        let digest = digest.to_owned();
        if let Some(c) = &view.current
            && c.digest == digest
        {
            return Ok(PolicyOutcome {
                record: c.clone(),
                previous_version,
                noop: true,
            });
        }
        let maps = self.typed_maps(key, stage)?;
        let encoded = budget::time(Timed::Check, || encode(doc, &maps))?;
        self.kv.put_bytes(DOCUMENTS, &digest, bytes)?;

        // Build every policy map's inner map: nothing packets see changes.
        let mut built = BTreeMap::new();
        for e in &encoded {
            let h = &maps[e.map].handle;
            if h.is_policy() {
                built.insert(
                    e.map,
                    budget::time(Timed::Build, || policy::build_inner(h, &e.entries))?,
                );
            }
        }
        self.crash.point(Step::PolicyBuilt);

        // What the maps hold now: a plain map's contents (journalled, for
        // the roll back, and the difference to apply), a policy map's from
        // the document that filled it (reading back a large LPM trie key by
        // key costs more than the whole swap).
        let old_encoded = budget::time(Timed::Plan, || -> Result<Vec<Encoded>> {
            let old_doc = match &view.current {
                Some(c) => self.stored_document(&c.digest)?,
                None => None,
            };
            Ok(match &old_doc {
                Some(d) => encode(d, &maps).unwrap_or_default(),
                None => vec![],
            })
        })?;
        let mut plain_before = vec![];
        let mut applied = vec![];
        for e in &encoded {
            let h = &maps[e.map].handle;
            let (added, removed, changed) = if h.is_policy() {
                let before = old_encoded
                    .iter()
                    .find(|o| o.map == e.map)
                    .map_or(&[][..], |o| o.entries.as_slice());
                difference(before, &e.entries)
            } else {
                let before = current_entries(h)?;
                let d = difference(&before, &e.entries);
                plain_before.push((h.name.clone(), before));
                d
            };
            applied.push(AppliedMap {
                name: h.name.clone(),
                map_id: h.id,
                inner_id: built.get(&e.map).map(|i| i.id),
                entries: e.entries.len() as u64,
                added,
                removed,
                changed,
            });
        }
        let record = PolicyRecord {
            stage: stage.to_owned(),
            version: doc.version,
            digest: digest.clone(),
            maps: applied,
            applied_at_unix_ms: unix_ms(SystemTime::now()),
            applied_by: grant.caller.name().to_owned(),
        };
        let sk = stage_key(key, stage);
        self.kv.put(
            PENDING,
            &sk,
            &Pending {
                new: record.clone(),
                plain_before,
            },
        )?;
        self.crash.point(Step::PolicyPending);

        // Swap: each policy map with one update.
        for e in &encoded {
            if let Some(inner) = built.get(&e.map) {
                budget::time(Timed::Swap, || policy::swap(&maps[e.map].handle, inner))?;
                self.crash.point(Step::PolicySwapped);
            }
        }
        // Plain maps, entry by entry, each undone on failure.
        let mut done_plain = vec![];
        for e in &encoded {
            let h = &maps[e.map].handle;
            if h.is_policy() {
                continue;
            }
            match policy::apply_plain(h, &e.entries) {
                Ok(applied) => done_plain.push((e.map, applied)),
                Err(err) => {
                    self.undo_apply(key, stage, &maps, &encoded, &built, done_plain);
                    self.kv.delete(PENDING, &sk)?;
                    return Err(err.into());
                }
            }
        }
        self.crash.point(Step::PolicyApplied);
        self.commit_policy(key, &record)?;
        self.crash.point(Step::PolicyCommitted);
        self.kv.delete(PENDING, &sk)?;
        self.emit(key, "policy");
        Ok(PolicyOutcome {
            record,
            previous_version,
            noop: false,
        })
    }

    /// Puts back what a failed apply did: plain maps it wrote, and the
    /// previous policy in the policy maps it swapped.
    fn undo_apply(
        &self,
        key: RootletKey,
        stage: &str,
        maps: &[TypedMap],
        encoded: &[Encoded],
        built: &BTreeMap<usize, policy::Inner>,
        done_plain: Vec<(usize, policy::PlainApplied)>,
    ) {
        for (map, applied) in done_plain.into_iter().rev() {
            if let Err(e) = applied.undo(&maps[map].handle) {
                tracing::error!(%key, stage, error = %e, "cannot undo a plain map's policy writes");
            }
        }
        let swapped: Vec<usize> = encoded
            .iter()
            .filter(|e| built.contains_key(&e.map))
            .map(|e| e.map)
            .collect();
        if !swapped.is_empty()
            && let Err(e) = self.restore_previous(key, stage, maps, &swapped)
        {
            tracing::error!(%key, stage, error = %e, "cannot put the previous policy back");
        }
    }

    /// Fills the policy maps `which` with the current record's document
    /// again (empty if none).
    fn restore_previous(
        &self,
        key: RootletKey,
        stage: &str,
        maps: &[TypedMap],
        which: &[usize],
    ) -> Result<()> {
        let old = self
            .kv
            .get::<PolicyRecord>(CURRENT, &stage_key(key, stage))?;
        let old_doc = match &old {
            Some(r) => self.stored_document(&r.digest)?,
            None => None,
        };
        let entries = match &old_doc {
            Some(d) => encode(d, maps)?,
            None => vec![],
        };
        for &m in which {
            let contents = entries
                .iter()
                .find(|e| e.map == m)
                .map_or(&[][..], |e| e.entries.as_slice());
            let inner = policy::build_inner(&maps[m].handle, contents)?;
            policy::swap(&maps[m].handle, &inner)?;
        }
        Ok(())
    }

    /// A document this agent stored (verified when it came).
    fn stored_document(&self, digest: &str) -> Result<Option<PolicyDocument>> {
        Ok(self
            .kv
            .get_bytes(DOCUMENTS, digest)?
            .map(|b| SignedPolicy::from_bytes(&b).map(|s| s.policy))
            .transpose()?)
    }

    fn commit_policy(&self, key: RootletKey, record: &PolicyRecord) -> Result<()> {
        let sk = stage_key(key, &record.stage);
        let mut history: Vec<VersionRecord> = self.kv.get(HISTORY, &sk)?.unwrap_or_default();
        history.retain(|h| h.digest != record.digest);
        history.insert(
            0,
            VersionRecord {
                version: record.version,
                digest: record.digest.clone(),
                applied_at_unix_ms: record.applied_at_unix_ms,
                applied_by: record.applied_by.clone(),
            },
        );
        let dropped: Vec<String> = history
            .split_off(self.policy_history.min(history.len()))
            .into_iter()
            .map(|v| v.digest)
            .collect();
        self.kv.write(|w| {
            w.put(CURRENT, &sk, record)?;
            w.put(HISTORY, &sk, &history)
        })?;
        self.forget_documents(dropped)
    }

    /// Deletes the stored documents of versions that left a history, unless
    /// another record or an apply in flight still names them. At once, as a
    /// bundle's are: left to the periodic sweep (up to a minute), every
    /// apply of a new version added a document to the store and its pages to
    /// redb's cache (the policy-only soak's growth, ~400 B per apply). A
    /// crash before the delete leaves them to the next sweep.
    fn forget_documents(&self, dropped: Vec<String>) -> Result<()> {
        if dropped.is_empty() {
            return Ok(());
        }
        let kept = self.referenced_policies()?;
        let unreferenced: Vec<String> = dropped.into_iter().filter(|d| !kept.contains(d)).collect();
        Ok(self.kv.delete_bytes(DOCUMENTS, &unreferenced)?)
    }

    /// After a restart: finishes or undoes every apply a crash interrupted,
    /// from what the kernel holds (see the module's doc).
    pub(crate) fn reconcile_policies(&self) -> Result<()> {
        for (sk, pending) in self.kv.list::<Pending>(PENDING)? {
            let Some((rootlet, stage)) = sk.split_once('\n') else {
                self.kv.delete(PENDING, &sk)?;
                continue;
            };
            let Some(key) = self
                .dp
                .list()
                .into_iter()
                .find(|k| k.to_string() == rootlet)
            else {
                tracing::warn!(
                    rootlet,
                    stage,
                    "an interrupted policy apply's rootlet is gone"
                );
                self.kv.delete(PENDING, &sk)?;
                continue;
            };
            if let Err(e) = self.resume_policy(key, stage, &pending) {
                tracing::error!(%key, stage, error = %e, "cannot resolve an interrupted policy apply");
            }
            self.kv.delete(PENDING, &sk)?;
        }
        Ok(())
    }

    fn resume_policy(&self, key: RootletKey, stage: &str, pending: &Pending) -> Result<()> {
        // Committed already (the crash came between the record and the
        // pending record's removal): the kernel holds the new policy.
        if self
            .kv
            .get::<PolicyRecord>(CURRENT, &stage_key(key, stage))?
            == Some(pending.new.clone())
        {
            return Ok(());
        }
        let maps = self.typed_maps(key, stage)?;
        let live_inner = |name: &str| {
            maps.iter()
                .find(|m| m.handle.name == name)
                .and_then(|m| m.handle.inner.as_ref().map(|i| i.id))
        };
        let any_swapped = pending
            .new
            .maps
            .iter()
            .any(|m| m.inner_id.is_some() && live_inner(&m.name) == m.inner_id);
        if !any_swapped {
            // Roll back: the policy maps never changed; the plain maps get
            // their journalled contents (a no-op if they were not written).
            for (name, before) in &pending.plain_before {
                if let Some(m) = maps.iter().find(|m| &m.handle.name == name) {
                    policy::apply_plain(&m.handle, before)?;
                }
            }
            tracing::warn!(%key, stage, version = pending.new.version, "an interrupted policy apply was rolled back");
            return Ok(());
        }
        // Roll forward: the new policy is live in part; finish it from the
        // stored document.
        let bytes = self
            .kv
            .get_bytes(DOCUMENTS, &pending.new.digest)?
            .ok_or_else(|| AgentError::NotFound(format!("policy {}", pending.new.digest)))?;
        let doc = SignedPolicy::from_bytes(&bytes)?.policy;
        let encoded = encode(&doc, &maps)?;
        let mut record = pending.new.clone();
        for e in &encoded {
            let h = &maps[e.map].handle;
            let Some(applied) = record.maps.iter_mut().find(|m| m.name == h.name) else {
                continue;
            };
            if h.is_policy() {
                if live_inner(&h.name) != applied.inner_id {
                    let inner = policy::build_inner(h, &e.entries)?;
                    policy::swap(h, &inner)?;
                    applied.inner_id = Some(inner.id);
                }
            } else {
                policy::apply_plain(h, &e.entries)?;
            }
        }
        self.commit_policy(key, &record)?;
        tracing::warn!(%key, stage, version = record.version, "an interrupted policy apply was finished");
        self.emit(key, "policy");
        Ok(())
    }

    /// Digests of every policy document a record or a pending apply names
    /// (the sweep keeps them).
    pub(crate) fn referenced_policies(&self) -> Result<std::collections::BTreeSet<String>> {
        let mut kept = std::collections::BTreeSet::new();
        for (_, h) in self.kv.list::<Vec<VersionRecord>>(HISTORY)? {
            kept.extend(h.into_iter().map(|v| v.digest));
        }
        for (_, p) in self.kv.list::<Pending>(PENDING)? {
            kept.insert(p.new.digest);
        }
        Ok(kept)
    }
}

fn find_map<'a>(maps: &'a [TypedMap], stage: &str, name: &str) -> Result<&'a TypedMap> {
    maps.iter()
        .find(|m| m.handle.name == name || m.schema.as_ref().is_some_and(|s| s.name == name))
        .ok_or_else(|| {
            let known: Vec<&str> = maps.iter().map(|m| m.handle.name.as_str()).collect();
            AgentError::NotFound(format!(
                "stage `{stage}` has no map `{name}` (its maps: {})",
                known.join(", ")
            ))
        })
}

fn encode_err(map: &str, what: &str, e: &dyn std::fmt::Display) -> AgentError {
    AgentError::InvalidArgument {
        field: format!("maps.{map}.{what}"),
        message: e.to_string(),
    }
}

/// Checks and encodes every entry of `doc` against the maps' types: the
/// first entry that does not fit is an error naming map, entry and field.
fn encode(doc: &PolicyDocument, maps: &[TypedMap]) -> Result<Vec<Encoded>> {
    encode_with(doc, |name| {
        let typed = find_map(maps, &doc.stage, name)?;
        let index = maps
            .iter()
            .position(|m| std::ptr::eq(m, typed))
            .unwrap_or_default();
        // The bytes the kernel takes for one value here (a per-CPU map:
        // one value per possible CPU of this host).
        let info = typed
            .handle
            .inner
            .as_ref()
            .map_or(&typed.handle.info, |i| &i.info);
        let value_len = policy::value_len(info)?;
        Ok((index, typed.entry_schema(), Some(value_len)))
    })
}

/// Checks a bundle's initial policies for `stage` against the types of the
/// stage's object, before the bundle changes anything.
pub(crate) fn check_against_object(
    stage: &str,
    object: &[u8],
    policies: &[&PolicyDocument],
) -> Result<()> {
    if policies.is_empty() {
        return Ok(());
    }
    let schema = Schema::from_elf(object).map_err(|e| AgentError::InvalidArgument {
        field: format!("stages.{stage}.object"),
        message: format!("its BTF: {e}"),
    })?;
    for doc in policies {
        encode_with(doc, |name| {
            let (i, m) = schema
                .maps
                .iter()
                .enumerate()
                .find(|(_, m)| m.name == name || m.kernel_name == name)
                .ok_or_else(|| {
                    AgentError::NotFound(format!("stage `{stage}`'s object has no map `{name}`"))
                })?;
            // The host's CPUs are not known here: per-CPU values are
            // counted by the agent that applies them.
            Ok((i, m.entries(), None))
        })?;
    }
    Ok(())
}

/// [`encode`], with `lookup` giving a map's index and entry schema by name.
fn encode_with<'s>(
    doc: &PolicyDocument,
    lookup: impl Fn(&str) -> Result<(usize, Option<&'s MapSchema>, Option<usize>)>,
) -> Result<Vec<Encoded>> {
    let mut out = vec![];
    for (name, contents) in &doc.maps {
        let (index, schema, value_len) = lookup(name)?;
        let schema = schema.ok_or_else(|| AgentError::InvalidArgument {
            field: format!("maps.{name}"),
            message: "the stage's program carries no BTF types for this map, or its values \
                      are kernel objects"
                .into(),
        })?;
        let max = schema.max_entries as usize;
        if contents.entries.len() > max {
            return Err(AgentError::InvalidArgument {
                field: format!("maps.{name}.entries"),
                message: format!(
                    "{} entries; the map holds at most {max}",
                    contents.entries.len()
                ),
            });
        }
        let mut entries = Vec::with_capacity(contents.entries.len());
        let mut seen = std::collections::HashMap::with_capacity(contents.entries.len());
        for (i, entry) in contents.entries.iter().enumerate() {
            // The codec's path starts at `key` or `value`.
            let bad = |e: rootlet_schema::CodecError| AgentError::InvalidArgument {
                field: format!("maps.{name}.entries[{i}].{}", e.path),
                message: e.message,
            };
            let k = schema.decode_key(&entry.key).map_err(bad)?;
            let v = schema.decode_value(&entry.value).map_err(bad)?;
            if let Some(want) = value_len
                && v.len() != want
                && schema.map_type.is_per_cpu()
            {
                return Err(AgentError::InvalidArgument {
                    field: format!("maps.{name}.entries[{i}].value"),
                    message: format!(
                        "{} values, one per CPU; this host has {} possible CPUs",
                        entry.value.as_array().map_or(1, Vec::len),
                        want / (schema.value_size.div_ceil(8).max(1) as usize * 8)
                    ),
                });
            }
            if let Some(first) = seen.insert(k.clone(), i) {
                return Err(AgentError::InvalidArgument {
                    field: format!("maps.{name}.entries[{i}].key"),
                    message: format!("the same key as entries[{first}]"),
                });
            }
            entries.push((k, v));
        }
        out.push(Encoded {
            map: index,
            entries,
        });
    }
    Ok(out)
}

/// What a map (a policy map's live inner map) holds now.
fn current_entries(h: &MapHandle) -> Result<Entries> {
    let mut all = vec![];
    let mut after: Option<Vec<u8>> = None;
    // Bounded: a map holds at most max_entries.
    for _ in 0..=(h.info.max_entries as usize / MAX_PAGE + 1) {
        let (page, next) = policy::dump(h, after.as_deref(), MAX_PAGE)?;
        all.extend(page);
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    Ok(all)
}

/// Entries added, removed and changed going from `old` to `new`.
fn difference(old: &[(Vec<u8>, Vec<u8>)], new: &[(Vec<u8>, Vec<u8>)]) -> (u64, u64, u64) {
    let old: std::collections::HashMap<&[u8], &[u8]> = old
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let mut added = 0;
    let mut changed = 0;
    let mut kept = 0;
    for (k, v) in new {
        match old.get(k.as_slice()) {
            None => added += 1,
            Some(o) => {
                kept += 1;
                if *o != v.as_slice() {
                    changed += 1;
                }
            }
        }
    }
    (added, old.len() as u64 - kept, changed)
}
