//! The policy case of a rollout (`rootletctl policy rollout`): what the one
//! engine ([`super::engine`]) does to a host when what it rolls out is a
//! signed policy rather than a bundle. Plan, steps, soak, counter gates,
//! journal, resume, abort and undo are the engine's, unchanged; this
//! module only knows the host calls:
//!
//! - **targets**: the rootlets of the host whose pipeline has the policy's
//!   stage (`ListRootlets`), or only the one on `--interface`;
//! - **prepare**: the policy each target holds now (`GetPolicy`), recorded
//!   in the journal before anything is pushed;
//! - **push**: `ApplyPolicy` on each target, with `expected_version` = the
//!   version recorded for it (a concurrent change is refused, never
//!   overwritten) and an idempotency key made of the digest, the rollout,
//!   the step and the rootlet; a host without the stage is a NACK;
//! - **apply gate**: `GetPolicy` on each target reports the pushed digest
//!   and no drift;
//! - **put back**: `RollbackPolicy` to the version each target held before
//!   (only while it still holds the rollout's version). A target that held
//!   no policy before can go back to "no policy" only through the signed
//!   `--empty-policy` (the agent keeps no "none" version to return to);
//!   without one, it keeps the new policy and is reported as not put back.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use rootlet_bundle::SignedPolicy;
use rootlet_proto::v1 as pb;
use tonic::Code;

use super::{
    RolloutError,
    engine::idempotency_key,
    gates::{self, by_id, short},
    journal::{GateResult, PolicyBefore, PolicyRef, Verdict},
};
use crate::transport::{Fleet, RpcError, request};

/// A signed policy read from disk. Its signatures are the agents' to check
/// (with their trusted keys); here it is only decoded, for its stage,
/// version and digest.
pub struct PolicyFile {
    pub path: PathBuf,
    pub bytes: Arc<Vec<u8>>,
    pub stage: String,
    pub version: u64,
    pub digest: String,
}

impl PolicyFile {
    pub fn read(path: &Path) -> Result<PolicyFile, RolloutError> {
        let bad = |msg: String| RolloutError::Usage(format!("{}: {msg}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let signed = SignedPolicy::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        let p = &signed.policy;
        Ok(PolicyFile {
            path: path.to_path_buf(),
            stage: p.stage.clone(),
            version: p.version,
            digest: p.digest().to_string(),
            bytes: Arc::new(bytes),
        })
    }

    /// The file at `path` again, checked to be the policy with `digest`.
    pub fn reread(path: &Path, digest: &str) -> Result<PolicyFile, String> {
        let f = PolicyFile::read(path).map_err(|e| e.to_string())?;
        if f.digest != digest {
            return Err(format!(
                "{} now holds another policy ({}), not the one this rollout recorded ({})",
                path.display(),
                short(&f.digest),
                short(digest)
            ));
        }
        Ok(f)
    }
}

/// The ids of the rootlets of host `i` whose pipeline has stage
/// `p.stage`, on `p.interface` only if set.
pub async fn targets(fleet: &Fleet, i: usize, p: &PolicyRef) -> Result<Vec<String>, RpcError> {
    let list = fleet
        .call(i, "ListRootlets", None, |mut c, t| async move {
            c.list_rootlets(request(pb::ListRootletsRequest {}, t))
                .await
        })
        .await?;
    Ok(list
        .rootlets
        .iter()
        .filter(|r| r.slots.iter().any(|s| s.stage == p.stage))
        .filter(|r| match (&p.interface, &r.interface) {
            (None, _) => true,
            (Some((netns, ifname)), Some(iface)) => {
                iface.ifname == *ifname && iface.netns == *netns
            }
            (Some(_), None) => false,
        })
        .map(|r| r.id.clone())
        .collect())
}

fn stage_ref(id: &str, stage: &str) -> pb::StageRef {
    pb::StageRef {
        rootlet: Some(by_id(id)),
        stage: stage.to_string(),
    }
}

/// `GetPolicy` of `stage` on rootlet `id` of host `i`.
pub async fn get(
    fleet: &Fleet,
    i: usize,
    id: &str,
    stage: &str,
) -> Result<pb::PolicyStatus, RpcError> {
    fleet
        .call(i, "GetPolicy", None, |mut c, t| async move {
            c.get_policy(request(
                pb::GetPolicyRequest {
                    stage: Some(stage_ref(id, stage)),
                },
                t,
            ))
            .await
        })
        .await
}

/// What each of `ids` holds now.
pub async fn before(
    fleet: &Fleet,
    i: usize,
    stage: &str,
    ids: &[String],
) -> Result<BTreeMap<String, PolicyBefore>, RpcError> {
    let mut out = BTreeMap::new();
    for id in ids {
        let st = get(fleet, i, id, stage).await?;
        out.insert(
            id.clone(),
            PolicyBefore {
                version: st.version,
                digest: st.digest,
            },
        );
    }
    Ok(out)
}

/// Whether pushing `p` changes anything on these rootlets.
pub fn changes(p: &PolicyRef, ids: &[String], before: &BTreeMap<String, PolicyBefore>) -> bool {
    ids.iter()
        .any(|id| before.get(id).is_none_or(|b| b.digest != p.digest))
}

/// What pushing to one host did.
pub enum PushOutcome {
    /// Every target holds the policy.
    Applied,
    /// The agent refused it on some target; `changed`: an earlier target
    /// of the same host took it.
    Refused { error: RpcError, changed: bool },
    /// No answer; `changed`: a target took it (or may have).
    Unknown { error: RpcError, changed: bool },
}

/// `ApplyPolicy` of `bytes` on every target of host `i` that does not hold
/// it yet, each under `expected_version` = what prepare recorded.
#[allow(clippy::too_many_arguments)]
pub async fn push(
    fleet: &Fleet,
    i: usize,
    bytes: &Arc<Vec<u8>>,
    p: &PolicyRef,
    rollout: &str,
    step: &str,
    ids: &[String],
    before: &BTreeMap<String, PolicyBefore>,
) -> PushOutcome {
    if ids.is_empty() {
        let where_ = match &p.interface {
            Some((netns, ifname)) if netns.is_empty() => format!(" on {ifname}"),
            Some((netns, ifname)) => format!(" on {ifname} in {netns}"),
            None => String::new(),
        };
        return PushOutcome::Refused {
            error: RpcError {
                what: "ApplyPolicy",
                code: Code::FailedPrecondition,
                message: format!(
                    "stage `{}` is not linked on any rootlet of this host{where_}",
                    p.stage
                ),
                attempts: 0,
            },
            changed: false,
        };
    }
    let mut changed = false;
    for id in ids {
        let was = before.get(id).map_or(0, |b| b.version);
        if before.get(id).is_some_and(|b| b.digest == p.digest) {
            continue;
        }
        let req = pb::ApplyPolicyRequest {
            rootlet: Some(by_id(id)),
            policy: bytes.as_ref().clone(),
            expected_version: Some(was),
            idempotency_key: idempotency_key(
                "apply-policy",
                &p.digest,
                rollout,
                &format!("{step}/{id}"),
            ),
        };
        let reply = super::engine::mutate(fleet, i, "ApplyPolicy", |mut c, t| {
            let req = req.clone();
            async move { c.apply_policy(request(req, t)).await }
        })
        .await;
        match reply {
            Ok(_) => changed = true,
            Err(e) if e.outcome_unknown() => {
                return PushOutcome::Unknown {
                    error: e,
                    changed: true,
                };
            }
            Err(e) if e.code == Code::FailedPrecondition => {
                // Someone (or an earlier attempt of this very push, whose
                // idempotency record is gone) changed the stage since
                // prepare: fine only if it holds this policy now.
                match get(fleet, i, id, &p.stage).await {
                    Ok(st) if st.digest == p.digest && st.drift.is_empty() => changed = true,
                    Ok(st) => {
                        return PushOutcome::Refused {
                            error: RpcError {
                                message: format!(
                                    "{} (rootlet {id} holds policy {} now, {} when the rollout recorded it)",
                                    e.message,
                                    version_text(st.version),
                                    version_text(was)
                                ),
                                ..e
                            },
                            changed,
                        };
                    }
                    Err(e2) if e2.outcome_unknown() => {
                        return PushOutcome::Unknown { error: e2, changed };
                    }
                    Err(_) => return PushOutcome::Refused { error: e, changed },
                }
            }
            Err(e) => {
                return PushOutcome::Refused {
                    error: RpcError {
                        message: format!("rootlet {id}: {}", e.message),
                        ..e
                    },
                    changed,
                };
            }
        }
    }
    PushOutcome::Applied
}

/// `v7`, or `none` for 0.
pub fn version_text(v: u64) -> String {
    if v == 0 {
        "none".into()
    } else {
        format!("v{v}")
    }
}

/// The apply gate of a policy rollout: every target reports the pushed
/// digest and no drift.
pub async fn gate(
    fleet: &Fleet,
    i: usize,
    p: &PolicyRef,
    ids: &[String],
) -> Result<GateResult, RpcError> {
    let mut bad = Vec::new();
    for id in ids {
        let st = get(fleet, i, id, &p.stage).await?;
        if !st.drift.is_empty() {
            bad.push(format!(
                "rootlet {id}: stage {} does not hold its recorded policy: {}",
                p.stage, st.drift
            ));
        } else if st.digest != p.digest {
            bad.push(format!(
                "rootlet {id}: stage {} holds policy {} ({}), not v{} ({})",
                p.stage,
                version_text(st.version),
                short(&st.digest),
                p.version,
                short(&p.digest)
            ));
        }
    }
    Ok(GateResult {
        gate: "apply".into(),
        stage: String::new(),
        verdict: if bad.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail
        },
        value: None,
        max: None,
        packets: None,
        detail: if bad.is_empty() {
            format!(
                "{} rootlet(s): stage {} holds policy v{} ({})",
                ids.len(),
                p.stage,
                p.version,
                short(&p.digest)
            )
        } else {
            bad.join("; ")
        },
    })
}

/// Puts every target of host `i` back to the policy it held before
/// (`before`), only while it holds the rollout's policy. `empty` is the
/// `--empty-policy` for targets that held none. Returns what it did.
#[allow(clippy::too_many_arguments)]
pub async fn put_back(
    fleet: &Fleet,
    i: usize,
    what: &str,
    rollout: &str,
    p: &PolicyRef,
    ids: &[String],
    before: &BTreeMap<String, PolicyBefore>,
    empty: Option<&Result<PolicyFile, String>>,
) -> Result<String, String> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for id in ids {
        let Some(b) = before.get(id) else { continue };
        if b.digest == p.digest {
            continue;
        }
        // What it holds now: only the rollout's own policy is put back.
        match get(fleet, i, id, &p.stage).await {
            Ok(st) if st.digest == b.digest && st.drift.is_empty() => {
                done.push(format!("{id}: on {} already", version_text(b.version)));
                continue;
            }
            Ok(st) if st.digest != p.digest => {
                failed.push(format!(
                    "{id}: holds {} ({}){}, neither the rollout's v{} nor the {} it had: left as it is",
                    version_text(st.version),
                    short(&st.digest),
                    if st.drift.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", st.drift)
                    },
                    p.version,
                    version_text(b.version),
                ));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                failed.push(format!("{id}: {e}"));
                continue;
            }
        }
        let key = idempotency_key(what, &b.digest, rollout, &format!("policy/{id}"));
        let reply = if b.version == 0 {
            match empty {
                Some(Ok(e)) => {
                    let req = pb::ApplyPolicyRequest {
                        rootlet: Some(by_id(id)),
                        policy: e.bytes.as_ref().clone(),
                        expected_version: Some(p.version),
                        idempotency_key: key,
                    };
                    super::engine::mutate(fleet, i, "ApplyPolicy", |mut c, t| {
                        let req = req.clone();
                        async move { c.apply_policy(request(req, t)).await }
                    })
                    .await
                    .map(|_| format!("{id}: empty policy v{} (it had none)", e.version))
                }
                Some(Err(msg)) => Err(RpcError {
                    what: "ApplyPolicy",
                    code: Code::FailedPrecondition,
                    message: format!("the --empty-policy cannot be read: {msg}"),
                    attempts: 0,
                }),
                None => Err(RpcError {
                    what: "RollbackPolicy",
                    code: Code::FailedPrecondition,
                    message: format!(
                        "it had no policy before, and the agent keeps no \"no policy\" version to return to; \
                         it keeps v{} (give `policy rollout --empty-policy` to put such hosts back)",
                        p.version
                    ),
                    attempts: 0,
                }),
            }
        } else {
            let req = pb::RollbackPolicyRequest {
                stage: Some(stage_ref(id, &p.stage)),
                to_version: b.version,
                expected_version: Some(p.version),
                idempotency_key: key,
            };
            super::engine::mutate(fleet, i, "RollbackPolicy", |mut c, t| {
                let req = req.clone();
                async move { c.rollback_policy(request(req, t)).await }
            })
            .await
            .and_then(|r| {
                if r.digest == b.digest {
                    Ok(format!("{id}: back on v{}", b.version))
                } else {
                    Err(RpcError {
                        what: "RollbackPolicy",
                        code: Code::Internal,
                        message: format!(
                            "rolled back to v{} but it holds {} now, not the {} recorded",
                            b.version,
                            short(&r.digest),
                            short(&b.digest)
                        ),
                        attempts: 1,
                    })
                }
            })
        };
        match reply {
            Ok(msg) => done.push(msg),
            Err(e) if e.code == Code::FailedPrecondition && e.attempts > 0 => {
                // Not on the rollout's version (any more): already back,
                // never changed, or changed by someone else since.
                match get(fleet, i, id, &p.stage).await {
                    Ok(st) if st.digest == b.digest => {
                        done.push(format!("{id}: on {} already", version_text(b.version)));
                    }
                    Ok(st) => failed.push(format!(
                        "{id}: holds {} ({}), neither the rollout's v{} nor the {} it had: left as it is ({})",
                        version_text(st.version),
                        short(&st.digest),
                        p.version,
                        version_text(b.version),
                        e.message
                    )),
                    Err(e2) => failed.push(format!("{id}: {e}; then {e2}")),
                }
            }
            Err(e) => failed.push(format!(
                "{id}: could not return to {}: {e}",
                version_text(b.version)
            )),
        }
    }
    if failed.is_empty() {
        Ok(if done.is_empty() {
            format!("stage {}: nothing to put back", p.stage)
        } else {
            format!("stage {} {}", p.stage, done.join(", "))
        })
    } else {
        Err(format!("stage {}: {}", p.stage, failed.join("; ")))
    }
}

/// The counters of the targets of host `i`, for the gates.
pub async fn sample(
    fleet: &Fleet,
    i: usize,
    ids: &[String],
) -> Result<super::journal::Sample, RpcError> {
    let refs: Vec<pb::RootletRef> = ids.iter().map(|id| by_id(id)).collect();
    gates::sample(fleet, i, &refs).await
}
