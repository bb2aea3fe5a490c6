//! The simulated agent's policies: `ApplyPolicy`, `GetPolicy` and
//! `RollbackPolicy` on a stage of a rootlet, from memory. As on a real
//! agent: a policy names its stage (NOT_FOUND where it is not linked),
//! `expected_version` is a precondition (FAILED_PRECONDITION, nothing
//! changed), the digest already held is a no-op, the last
//! [`POLICY_HISTORY`] versions are kept for `RollbackPolicy` (`to_version`
//! 0: the one before the current), and an idempotency key replays its
//! answer (or is refused for another request). Signatures are not checked
//! and entries are not typed (there are no maps): the only effect on the
//! simulated traffic is that a policy with an entry keyed `"0.0.0.0/0"` or
//! `"::/0"` drops every packet of its stage.

use std::sync::atomic::Ordering;

use rootlet_bundle::SignedPolicy;
use rootlet_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::{SimAgent, SimState, lock, now_ms};

/// Versions of each stage's policy kept (as the real agent's default).
pub const POLICY_HISTORY: usize = 10;

/// One policy a stage held.
#[derive(Debug, Clone)]
pub(crate) struct SimPolicy {
    pub version: u64,
    pub digest: String,
    pub at: i64,
    /// An entry keyed `0.0.0.0/0` or `::/0`: every packet drops.
    pub blocks_all: bool,
}

impl SimPolicy {
    fn of(bytes: &[u8]) -> Result<(String, SimPolicy), Status> {
        let signed = SignedPolicy::from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("policy: {e}")))?;
        let doc = &signed.policy;
        let blocks_all = doc.maps.values().any(|m| {
            m.entries
                .iter()
                .any(|e| matches!(e.key.as_str(), Some("0.0.0.0/0" | "::/0")))
        });
        Ok((
            doc.stage.clone(),
            SimPolicy {
                version: doc.version,
                digest: doc.digest().to_string(),
                at: now_ms(),
                blocks_all,
            },
        ))
    }
}

fn stage_of<'a>(
    st: &'a mut SimState,
    rootlet: Option<pb::RootletRef>,
    stage: &str,
) -> Result<(String, &'a mut super::SimStage), Status> {
    let r = SimAgent::find(st, rootlet)?;
    let id = r.id.clone();
    let s = r
        .stages
        .iter_mut()
        .find(|s| s.name == stage)
        .ok_or_else(|| Status::not_found(format!("stage `{stage}` is not linked on {id}")))?;
    Ok((id, s))
}

fn check_expected(stage: &str, expected: Option<u64>, current: u64) -> Result<(), Status> {
    match expected {
        Some(want) if want != current => Err(Status::failed_precondition(format!(
            "POLICY_VERSION_MISMATCH: stage `{stage}` holds policy version {current}, not the expected {want}; nothing changed"
        ))),
        _ => Ok(()),
    }
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Makes `p` the stage's policy (or nothing, if it holds it already).
fn install(id: String, s: &mut super::SimStage, p: SimPolicy) -> (pb::ApplyPolicyResponse, bool) {
    let previous_version = s.policy.as_ref().map_or(0, |c| c.version);
    let noop = s.policy.as_ref().is_some_and(|c| c.digest == p.digest);
    let resp = pb::ApplyPolicyResponse {
        rootlet_id: id,
        stage: s.name.clone(),
        version: p.version,
        digest: p.digest.clone(),
        previous_version,
        noop,
        maps: Vec::new(),
        atomic: true,
    };
    if !noop {
        s.policy_history.retain(|h| h.digest != p.digest);
        s.policy_history.insert(0, p.clone());
        s.policy_history.truncate(POLICY_HISTORY);
        s.policy = Some(p);
    }
    (resp, !noop)
}

impl SimAgent {
    /// Policy applies fail (INVALID_ARGUMENT naming an entry, as a policy
    /// a real agent's BTF check refuses) while set.
    pub fn set_policy_nack(&self, on: bool) {
        self.inner.policy_nack.store(on, Ordering::SeqCst);
    }

    /// ApplyPolicy and RollbackPolicy calls, whatever they did.
    pub fn policy_calls(&self) -> u64 {
        self.inner.policy_calls.load(Ordering::Relaxed)
    }

    /// The policy version stage `stage` of the rootlet on `ifname` holds
    /// (None: no such stage; Some(0): no policy).
    pub fn policy_of(&self, ifname: &str, stage: &str) -> Option<u64> {
        lock(&self.inner.state)
            .rootlets
            .values()
            .filter(|r| r.ifname == ifname)
            .flat_map(|r| r.stages.iter())
            .find(|s| s.name == stage)
            .map(|s| s.policy.as_ref().map_or(0, |p| p.version))
    }

    /// Applies a signed policy to the rootlet on `ifname` with no
    /// precondition, as someone else's tool would; returns the version.
    pub fn apply_policy_out_of_band(&self, ifname: &str, bytes: &[u8]) -> Result<u64, Status> {
        self.apply_policy_now(pb::ApplyPolicyRequest {
            rootlet: Some(pb::RootletRef {
                r#ref: Some(pb::rootlet_ref::Ref::Interface(pb::Interface {
                    netns: String::new(),
                    ifname: ifname.to_string(),
                })),
            }),
            policy: bytes.to_vec(),
            expected_version: None,
            idempotency_key: String::new(),
        })
        .map(|r| r.version)
    }

    fn replay(
        st: &SimState,
        key: &str,
        req_hash: &str,
    ) -> Option<Result<pb::ApplyPolicyResponse, Status>> {
        if key.is_empty() {
            return None;
        }
        st.policy_idempotency.get(key).map(|(h, resp)| {
            if h == req_hash {
                Ok(resp.clone())
            } else {
                Err(Status::already_exists(
                    "idempotency key reused for another request",
                ))
            }
        })
    }

    pub(crate) fn apply_policy_now(
        &self,
        req: pb::ApplyPolicyRequest,
    ) -> Result<pb::ApplyPolicyResponse, Status> {
        self.inner.policy_calls.fetch_add(1, Ordering::Relaxed);
        let (stage, p) = SimPolicy::of(&req.policy)?;
        let target = req.rootlet.clone();
        let rootlet = format!("{:?}", req.rootlet);
        let expected = format!("{:?}", req.expected_version);
        let req_hash = hash(&[
            b"apply",
            &req.policy,
            rootlet.as_bytes(),
            expected.as_bytes(),
        ]);
        let mut st = lock(&self.inner.state);
        if let Some(r) = Self::replay(&st, &req.idempotency_key, &req_hash) {
            return r;
        }
        if self.inner.policy_nack.load(Ordering::SeqCst) {
            return Err(Status::invalid_argument(format!(
                "policy v{} for stage `{stage}`: maps.simulated.entries[0].key: simulated failure; nothing changed",
                p.version
            )));
        }
        // The traffic so far was judged by the old policy.
        if let Ok(r) = Self::find(&mut st, req.rootlet.clone()) {
            self.advance(r);
        }
        let (id, s) = stage_of(&mut st, req.rootlet, &stage)?;
        check_expected(
            &stage,
            req.expected_version,
            s.policy.as_ref().map_or(0, |c| c.version),
        )?;
        let (resp, changed) = install(id, s, p);
        if changed {
            self.inner.applies.fetch_add(1, Ordering::Relaxed);
            if let Ok(r) = Self::find(&mut st, target) {
                self.notify(r, "policy");
            }
        }
        if !req.idempotency_key.is_empty() {
            st.policy_idempotency
                .insert(req.idempotency_key, (req_hash, resp.clone()));
        }
        Ok(resp)
    }

    pub(crate) fn rollback_policy_now(
        &self,
        req: pb::RollbackPolicyRequest,
    ) -> Result<pb::ApplyPolicyResponse, Status> {
        self.inner.policy_calls.fetch_add(1, Ordering::Relaxed);
        let sref = req
            .stage
            .ok_or_else(|| Status::invalid_argument("stage: required"))?;
        let req_hash = hash(&[
            b"rollback",
            format!("{:?}", sref.rootlet).as_bytes(),
            sref.stage.as_bytes(),
            &req.to_version.to_le_bytes(),
            format!("{:?}", req.expected_version).as_bytes(),
        ]);
        let mut st = lock(&self.inner.state);
        if let Some(r) = Self::replay(&st, &req.idempotency_key, &req_hash) {
            return r;
        }
        if let Ok(r) = Self::find(&mut st, sref.rootlet.clone()) {
            self.advance(r);
        }
        let rootlet = sref.rootlet.clone();
        let (id, s) = stage_of(&mut st, sref.rootlet, &sref.stage)?;
        let current = s.policy.as_ref().map_or(0, |c| c.version);
        check_expected(&sref.stage, req.expected_version, current)?;
        let to = req.to_version;
        let target = s
            .policy_history
            .iter()
            .find(|h| {
                if to == 0 {
                    h.version != current
                } else {
                    h.version == to
                }
            })
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "POLICY_HISTORY: stage `{}` keeps no version {to} to roll back to",
                    sref.stage
                ))
            })?;
        let (resp, changed) = install(
            id,
            s,
            SimPolicy {
                at: now_ms(),
                ..target
            },
        );
        if changed {
            self.inner.applies.fetch_add(1, Ordering::Relaxed);
            if let Ok(r) = Self::find(&mut st, rootlet) {
                self.notify(r, "policy");
            }
        }
        if !req.idempotency_key.is_empty() {
            st.policy_idempotency
                .insert(req.idempotency_key, (req_hash, resp.clone()));
        }
        Ok(resp)
    }

    pub(crate) fn get_policy_now(
        &self,
        req: pb::GetPolicyRequest,
    ) -> Result<pb::PolicyStatus, Status> {
        let sref = req
            .stage
            .ok_or_else(|| Status::invalid_argument("stage: required"))?;
        let mut st = lock(&self.inner.state);
        let (id, s) = stage_of(&mut st, sref.rootlet, &sref.stage)?;
        let current = s.policy.clone();
        Ok(pb::PolicyStatus {
            rootlet_id: id,
            stage: s.name.clone(),
            version: current.as_ref().map_or(0, |c| c.version),
            digest: current
                .as_ref()
                .map(|c| c.digest.clone())
                .unwrap_or_default(),
            drift: String::new(),
            history: s
                .policy_history
                .iter()
                .map(|h| pb::PolicyVersion {
                    version: h.version,
                    digest: h.digest.clone(),
                    applied_at_unix_ms: h.at,
                    applied_by: "simulated".into(),
                    current: current.as_ref().is_some_and(|c| c.digest == h.digest),
                })
                .collect(),
            maps: Vec::new(),
        })
    }
}
