//! `rootletctl status`: reads back, from every selected agent, hosts ×
//! rootlets: the version and digest of each bundle applied (several
//! bundles can share a rootlet), the last attempt
//! (ack or nack, and why), the generation, each stage with its program id,
//! its policy version (`Slot.policy_version`) and counters, and drift (the kernel no longer runs what the agent
//! built; a stage of the bundle that the kernel does not run as the
//! bundle says, from `ApplyStatus.drift`; or the host does not run the
//! version asked for with `--expect`, where a rootlet with stage drift
//! does not count as running it), as a table for people or JSON for
//! programs. `--watch` follows each host's Watch stream ([`follow`]).

use std::fmt::Write;

mod follow;
pub use follow::{Update, follow};

use futures::{StreamExt, stream};
use rootlet_proto::v1 as pb;
use serde::Serialize;

use crate::{
    rollout::{gates::by_id, gates::short, journal::Counters, summary::fmt_time},
    transport::{Fleet, RpcError, request},
};

/// One rootlet on one host.
#[derive(Debug, Clone, Serialize)]
pub struct RootletStatus {
    pub id: String,
    pub interface: String,
    pub netns: String,
    pub generation: u64,
    /// The bundle applied here last (`ApplyStatus.bundle`).
    pub applied_version: String,
    pub applied_digest: String,
    /// Every bundle applied here, by name (`ApplyStatus.applied`; empty
    /// from an agent that reports only the last one).
    pub applied: Vec<AppliedBundle>,
    pub last_attempt: Option<Attempt>,
    pub stages: Vec<StageStatus>,
    /// The stages' counters added up (those counted).
    pub counters: Counters,
    /// Packets the rootlet handled with its final verdict.
    pub final_verdict_count: u64,
    /// Empty unless the kernel no longer runs what the agent built.
    pub drift: String,
    /// The bundle's stages the kernel does not run as the bundle says.
    pub stage_drift: Vec<StageDrift>,
    /// Set when `--expect` names another version than the one applied.
    pub version_drift: Option<String>,
    /// Set while the undo of a failed apply has not put the rootlet back:
    /// it runs part of that version and the agent retries the undo.
    pub undo: Option<UndoStatus>,
}

/// The version of one bundle applied on a rootlet.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedBundle {
    pub bundle: String,
    pub version: String,
    pub digest: String,
}

/// An outstanding undo (`ApplyStatus.undo`).
#[derive(Debug, Clone, Serialize)]
pub struct UndoStatus {
    pub bundle: String,
    pub version: String,
    pub error: String,
    pub attempts: u32,
    pub since_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub version: String,
    pub outcome: String,
    pub error: String,
    pub at_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageDrift {
    /// The bundle that manages the stage (empty: an older agent's report).
    pub bundle: String,
    pub stage: String,
    pub expected_digest: String,
    /// Empty: the stage is not running.
    pub running_digest: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub name: String,
    pub slot: u32,
    pub position: u32,
    pub owner: String,
    pub program_id: Option<u32>,
    pub program_name: Option<String>,
    pub pinned: bool,
    pub digest: String,
    /// The generation that loaded the stage's build: with `digest`, its
    /// stable identity (program ids change with tail-call generations).
    pub loaded_generation: u64,
    /// The generation its counters count from.
    pub counters_since_generation: u64,
    /// False: the rootlet cannot see this stage's verdicts and `counters`
    /// say nothing (shown as "-").
    pub counted: bool,
    pub counters: Counters,
    /// The version of the policy the stage's maps hold, as the kernel
    /// holds it (null: none).
    pub policy_version: Option<u64>,
    /// Its digest (null: none).
    pub policy_digest: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleVersion {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub current: bool,
    pub applied_at_unix_ms: i64,
}

/// One host.
#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub address: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub rootlets: Vec<RootletStatus>,
    pub bundles: Vec<BundleVersion>,
}

impl HostStatus {
    pub fn has_drift(&self) -> bool {
        self.rootlets.iter().any(|r| {
            !r.drift.is_empty()
                || !r.stage_drift.is_empty()
                || r.version_drift.is_some()
                || r.undo.is_some()
        })
    }
}

/// Reads every host of `fleet`; `expect` is a version (or digest) every
/// rootlet should run. Sorted by host name.
pub async fn read(fleet: &Fleet, expect: Option<&str>) -> Vec<HostStatus> {
    let n = fleet.hosts().len();
    let mut out: Vec<HostStatus> = stream::iter(0..n)
        .map(|i| read_one(fleet, i, expect))
        .buffer_unordered(fleet.options().concurrency.max(1))
        .collect()
        .await;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Reads host `i` of `fleet`, within one slot of its concurrency and the
/// host deadline; a host that fails is a row that says why.
pub async fn read_one(fleet: &Fleet, i: usize, expect: Option<&str>) -> HostStatus {
    let deadline = fleet.options().host_deadline;
    let _slot = fleet.permit().await;
    let host = fleet.hosts().get(i).cloned();
    let r = tokio::time::timeout(deadline, read_host(fleet, i, expect)).await;
    let (name, address) = host.map_or_else(Default::default, |h| (h.name, h.address.to_string()));
    match r {
        Ok(Ok((rootlets, bundles))) => HostStatus {
            name,
            address,
            reachable: true,
            error: None,
            rootlets,
            bundles,
        },
        Ok(Err(e)) => HostStatus {
            name,
            address,
            reachable: !e.is_unreachable(),
            error: Some(e.to_string()),
            rootlets: Vec::new(),
            bundles: Vec::new(),
        },
        Err(_) => HostStatus {
            name,
            address,
            reachable: false,
            error: Some(format!(
                "no answer within {}",
                crate::config::Human(deadline)
            )),
            rootlets: Vec::new(),
            bundles: Vec::new(),
        },
    }
}

async fn read_host(
    fleet: &Fleet,
    i: usize,
    expect: Option<&str>,
) -> Result<(Vec<RootletStatus>, Vec<BundleVersion>), RpcError> {
    let list = fleet
        .call(i, "ListRootlets", None, |mut c, t| async move {
            c.list_rootlets(request(pb::ListRootletsRequest {}, t))
                .await
        })
        .await?;
    let bundles = fleet
        .call(i, "ListBundles", None, |mut c, t| async move {
            c.list_bundles(request(pb::ListBundlesRequest {}, t)).await
        })
        .await?;
    let mut rootlets = Vec::new();
    for r in list.rootlets {
        let st = fleet
            .call(i, "GetApplyStatus", None, |mut c, t| {
                let id = r.id.clone();
                async move {
                    c.get_apply_status(request(
                        pb::GetApplyStatusRequest {
                            rootlet: Some(by_id(&id)),
                            idempotency_key: String::new(),
                        },
                        t,
                    ))
                    .await
                }
            })
            .await
            .ok();
        let mut total = Counters::default();
        let stages: Vec<StageStatus> = r
            .slots
            .iter()
            .map(|s| {
                let c = s.counters.unwrap_or_default();
                let c = Counters {
                    aborted: c.aborted,
                    drop: c.drop,
                    pass: c.pass,
                    tx: c.tx,
                    redirect: c.redirect,
                };
                if !s.uncounted {
                    total.add(&c);
                }
                StageStatus {
                    name: s.stage.clone(),
                    slot: s.slot,
                    position: s.position,
                    owner: s.owner.clone(),
                    program_id: s.program.as_ref().map(|p| p.id),
                    program_name: s.program.as_ref().map(|p| p.name.clone()),
                    pinned: s.pinned,
                    digest: s.digest.clone(),
                    loaded_generation: s.loaded_generation,
                    counters_since_generation: s.counters_since_generation,
                    counted: !s.uncounted,
                    counters: c,
                    policy_version: (s.policy_version != 0).then_some(s.policy_version),
                    policy_digest: (s.policy_version != 0 && !s.policy_digest.is_empty())
                        .then(|| s.policy_digest.clone()),
                }
            })
            .collect();
        let applied_digest = st
            .as_ref()
            .map(|s| s.applied_digest.clone())
            .unwrap_or_default();
        let applied_version = if r.applied_version.is_empty() {
            st.as_ref()
                .map(|s| s.applied_version.clone())
                .unwrap_or_default()
        } else {
            r.applied_version.clone()
        };
        let applied: Vec<AppliedBundle> = st
            .as_ref()
            .map(|s| {
                s.applied
                    .iter()
                    .map(|b| AppliedBundle {
                        bundle: b.name.clone(),
                        version: b.version.clone(),
                        digest: b.digest.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let stage_drift: Vec<pb::StageDrift> =
            st.as_ref().map(|s| s.drift.clone()).unwrap_or_default();
        let undo = st
            .as_ref()
            .and_then(|s| s.undo.clone())
            .map(|u| UndoStatus {
                bundle: u.bundle,
                version: u.version,
                error: u.error,
                attempts: u.attempts,
                since_unix_ms: u.since_unix_ms,
            });
        let version_drift = expect.and_then(|want| {
            // With several bundles on the rootlet, any of them may be the
            // one expected.
            let runs_it = (applied_version == want || applied_digest == want)
                || applied
                    .iter()
                    .any(|b| b.version == want || b.digest == want);
            if !runs_it {
                Some(format!(
                    "runs {}, expected {want}",
                    if applied_version.is_empty() {
                        "nothing"
                    } else {
                        &applied_version
                    }
                ))
            } else if !stage_drift.is_empty() || !r.drift.is_empty() {
                Some(format!(
                    "not on {want}: the kernel does not run it as the bundle says"
                ))
            } else {
                None
            }
        });
        let iface = r.interface.clone().unwrap_or_default();
        rootlets.push(RootletStatus {
            id: r.id.clone(),
            interface: iface.ifname,
            netns: iface.netns,
            generation: r.generation,
            applied_version,
            applied_digest,
            applied,
            last_attempt: r.last_attempt.map(|a| Attempt {
                version: a.version,
                outcome: a.outcome,
                error: a.error,
                at_unix_ms: a.at_unix_ms,
            }),
            stages,
            counters: total,
            final_verdict_count: r.final_verdict_count,
            drift: r.drift,
            stage_drift: stage_drift
                .into_iter()
                .map(|d| StageDrift {
                    bundle: d.bundle,
                    stage: d.stage,
                    expected_digest: d.expected_digest,
                    running_digest: d.running_digest,
                    reason: d.reason,
                })
                .collect(),
            version_drift,
            undo,
        });
    }
    let bundles = bundles
        .bundles
        .into_iter()
        .map(|b| BundleVersion {
            name: b.name,
            version: b.version,
            digest: b.digest,
            current: b.current,
            applied_at_unix_ms: b.applied_at_unix_ms,
        })
        .collect();
    Ok((rootlets, bundles))
}

/// The table for people: one line per host and rootlet.
pub fn table(hosts: &[HostStatus]) -> String {
    let mut rows: Vec<[String; 12]> = vec![[
        "HOST".into(),
        "ROOTLET".into(),
        "GEN".into(),
        "VERSION".into(),
        "DIGEST".into(),
        "LAST ATTEMPT".into(),
        "STAGES (program id)".into(),
        "POLICY".into(),
        "PASS/DROP/ABORTED".into(),
        "TX/REDIRECT".into(),
        "FINAL".into(),
        "DRIFT".into(),
    ]];
    for h in hosts {
        if let Some(e) = &h.error {
            rows.push([
                h.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("{}: {e}", if h.reachable { "ERROR" } else { "UNREACHABLE" }),
            ]);
            continue;
        }
        if h.rootlets.is_empty() {
            rows.push([
                h.name.clone(),
                "(none)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for r in &h.rootlets {
            let attempt = r.last_attempt.as_ref().map_or_else(
                || "-".to_string(),
                |a| {
                    let mut s = format!("{} {} {}", a.outcome, a.version, fmt_time(a.at_unix_ms));
                    if !a.error.is_empty() {
                        let _ = write!(s, " ({})", a.error.chars().take(60).collect::<String>());
                    }
                    s
                },
            );
            let stages = r
                .stages
                .iter()
                .map(|s| {
                    // name#program@build generation; "-": not counted.
                    format!(
                        "{}#{}@g{}{}",
                        s.name,
                        s.program_id
                            .map_or_else(|| "empty".to_string(), |id| id.to_string()),
                        s.loaded_generation,
                        if s.counted { "" } else { "(counters: -)" }
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            // stage=v7 per stage; "-": no policy.
            let policies = r
                .stages
                .iter()
                .map(|s| {
                    format!(
                        "{}={}",
                        s.name,
                        s.policy_version
                            .map_or_else(|| "-".to_string(), |v| format!("v{v}"))
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            let mut drift = Vec::new();
            if let Some(u) = &r.undo {
                drift.push(format!(
                    "UNDO FAILED: runs part of {} {} since {}, retrying ({} attempts): {}",
                    u.bundle,
                    u.version,
                    fmt_time(u.since_unix_ms),
                    u.attempts,
                    u.error.chars().take(80).collect::<String>()
                ));
            }
            if !r.drift.is_empty() {
                drift.push(format!("kernel: {}", r.drift));
            }
            for d in &r.stage_drift {
                drift.push(format!(
                    "stage {}: {} ({}){}",
                    d.stage,
                    d.reason,
                    if d.running_digest.is_empty() {
                        "not running".to_string()
                    } else {
                        format!(
                            "runs {}, the bundle has {}",
                            short(&d.running_digest),
                            short(&d.expected_digest)
                        )
                    },
                    if d.bundle.is_empty() {
                        String::new()
                    } else {
                        format!(" of bundle {}", d.bundle)
                    }
                ));
            }
            if let Some(v) = &r.version_drift {
                drift.push(v.clone());
            }
            let netns = if r.netns.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.netns)
            };
            rows.push([
                h.name.clone(),
                format!("{}{netns}", r.interface),
                r.generation.to_string(),
                version_cell(r),
                digest_cell(r),
                attempt,
                if stages.is_empty() {
                    "-".into()
                } else {
                    stages
                },
                if policies.is_empty() {
                    "-".into()
                } else {
                    policies
                },
                format!(
                    "{}/{}/{}",
                    r.counters.pass, r.counters.drop, r.counters.aborted
                ),
                format!("{}/{}", r.counters.tx, r.counters.redirect),
                r.final_verdict_count.to_string(),
                if drift.is_empty() {
                    "-".into()
                } else {
                    drift.join("; ")
                },
            ]);
        }
    }
    let mut out = columns(&rows);
    let down = hosts.iter().filter(|h| h.error.is_some()).count();
    let drift = hosts.iter().filter(|h| h.has_drift()).count();
    let _ = writeln!(
        out,
        "{} hosts: {} answered, {down} did not, {drift} with drift",
        hosts.len(),
        hosts.len() - down
    );
    out
}

/// The VERSION cell: the version applied, or with several bundles on the
/// rootlet each one's, as `name=version`.
fn version_cell(r: &RootletStatus) -> String {
    if r.applied.len() > 1 {
        return r
            .applied
            .iter()
            .map(|b| format!("{}={}", b.bundle, b.version))
            .collect::<Vec<_>>()
            .join(" ");
    }
    if r.applied_version.is_empty() {
        "-".into()
    } else {
        r.applied_version.clone()
    }
}

/// The DIGEST cell, in the order of [`version_cell`].
fn digest_cell(r: &RootletStatus) -> String {
    if r.applied.len() > 1 {
        return r
            .applied
            .iter()
            .map(|b| short(&b.digest))
            .collect::<Vec<_>>()
            .join(" ");
    }
    short(&r.applied_digest)
}

/// Rows as columns two spaces apart, each as wide as its widest cell (the
/// last column unpadded); rows may differ in length.
pub fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let cols = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let row = row.as_ref();
        let mut line = String::new();
        for (k, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if k + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outstanding_undo_is_shown_plainly_and_fails_the_status() {
        let rootlet = RootletStatus {
            id: "netns:1/if:2".into(),
            interface: "veth0".into(),
            netns: String::new(),
            generation: 7,
            applied_version: "1.0".into(),
            applied_digest: "d1".into(),
            applied: vec![],
            last_attempt: Some(Attempt {
                version: "2.0".into(),
                outcome: "undo_failed".into(),
                error: "generation mismatch".into(),
                at_unix_ms: 0,
            }),
            stages: vec![],
            counters: Counters::default(),
            final_verdict_count: 0,
            drift: String::new(),
            stage_drift: vec![],
            version_drift: None,
            undo: None,
        };
        let host = |undo: Option<UndoStatus>| HostStatus {
            name: "h1".into(),
            address: "localhost".into(),
            reachable: true,
            error: None,
            rootlets: vec![RootletStatus {
                undo,
                ..rootlet.clone()
            }],
            bundles: vec![],
        };
        let restored = host(None);
        assert!(!restored.has_drift());
        assert!(!table(std::slice::from_ref(&restored)).contains("UNDO FAILED"));
        let degraded = host(Some(UndoStatus {
            bundle: "edge".into(),
            version: "2.0".into(),
            error: "EPERM".into(),
            attempts: 3,
            since_unix_ms: 0,
        }));
        assert!(
            degraded.has_drift(),
            "status exits 1 while an undo is outstanding"
        );
        let text = table(&[degraded]);
        assert!(
            text.contains("undo_failed 2.0")
                && text.contains("UNDO FAILED: runs part of edge 2.0")
                && text.contains("retrying (3 attempts): EPERM"),
            "{text}"
        );
    }

    #[test]
    fn each_bundle_on_a_shared_rootlet_shows_its_version_and_its_drift() {
        let applied = |bundle: &str, version: &str, digest: &str| AppliedBundle {
            bundle: bundle.into(),
            version: version.into(),
            digest: digest.into(),
        };
        let rootlet = RootletStatus {
            id: "netns:1/if:2".into(),
            interface: "veth0".into(),
            netns: String::new(),
            generation: 3,
            applied_version: "2.1".into(),
            applied_digest: "d2".into(),
            applied: vec![
                applied("edge", "1.0", "d1"),
                applied("sampling", "2.1", "d2"),
            ],
            last_attempt: None,
            stages: vec![],
            counters: Counters::default(),
            final_verdict_count: 0,
            drift: String::new(),
            stage_drift: vec![StageDrift {
                bundle: "edge".into(),
                stage: "ddos".into(),
                expected_digest: "e1".into(),
                running_digest: "r1".into(),
                reason: "another object runs (replaced out of band)".into(),
            }],
            version_drift: None,
            undo: None,
        };
        let host = HostStatus {
            name: "h1".into(),
            address: "localhost".into(),
            reachable: true,
            error: None,
            rootlets: vec![rootlet],
            bundles: vec![],
        };
        let text = table(&[host]);
        assert!(
            text.contains("edge=1.0 sampling=2.1")
                && text.contains("stage ddos: another object runs (replaced out of band) (runs r1, the bundle has e1) of bundle edge"),
            "{text}"
        );
    }
}
