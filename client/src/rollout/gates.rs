//! Gates: what the agents themselves say about a changed host, judged
//! against the plan.
//!
//! - health: grpc.health.v1 `Check` of `rootlet.v1.Rootlet` is SERVING;
//! - apply: every rootlet the bundle applied to still reports the new
//!   digest and no per-stage drift (`GetApplyStatus`), so a NACK or a
//!   change behind the rollout's back is caught; for `bundle remove`, no
//!   rootlet still runs the version removed (or it is gone); for a policy
//!   rollout, every target's stage holds the pushed policy's digest with
//!   no drift (`GetPolicy`);
//! - counters: per stage, `GetStats` now against the sample taken right
//!   after the push (`post`), and for `drop_rate_change` against the
//!   host's own drop rate before the change (between `baseline_start` and
//!   `baseline`, or since the stage was loaded when there is no
//!   `baseline_start`). A stage with fewer than `min_packets` packets in
//!   the window is idle and not judged, and so is an uncounted stage under
//!   a `*` gate (a gate naming it fails: it can never be judged); a gate
//!   over its threshold fails at once, even before its window has passed;
//!   a `dry_run` gate is reported, never enforced.

use rootlet_proto::v1::{self as pb, rootlet_ref::Ref};
use tonic::Code;

use super::journal::{Counters, GateResult, HostRecord, PolicyRef, Sample, Verdict, now_ms};
use crate::{
    plan::{CounterGate, Metric, Plan},
    transport::{Fleet, RpcError, request},
};

/// A rootlet ref by id.
pub fn by_id(id: &str) -> pb::RootletRef {
    pb::RootletRef {
        r#ref: Some(Ref::Id(id.to_string())),
    }
}

/// A rootlet ref by interface (`netns` empty: the agent's own).
pub fn by_interface(netns: &str, ifname: &str) -> pb::RootletRef {
    pb::RootletRef {
        r#ref: Some(Ref::Interface(pb::Interface {
            netns: netns.to_string(),
            ifname: ifname.to_string(),
        })),
    }
}

/// The counters of every stage of `rootlets` on host `host`, summed by
/// stage name. A rootlet the agent does not have (NOT_FOUND: not loaded
/// yet) contributes nothing.
pub async fn sample(
    fleet: &Fleet,
    host: usize,
    rootlets: &[pb::RootletRef],
) -> Result<Sample, RpcError> {
    let mut s = Sample::default();
    for r in rootlets {
        let reply = fleet
            .call(host, "GetStats", None, |mut c, t| {
                let r = r.clone();
                async move {
                    c.get_stats(request(pb::GetStatsRequest { rootlet: Some(r) }, t))
                        .await
                }
            })
            .await;
        match reply {
            Ok(stats) => {
                for slot in stats.slots {
                    if slot.uncounted {
                        s.uncounted.insert(slot.stage.clone());
                    }
                    let c = slot.counters.unwrap_or_default();
                    s.stages.entry(slot.stage).or_default().add(&Counters {
                        aborted: c.aborted,
                        drop: c.drop,
                        pass: c.pass,
                        tx: c.tx,
                        redirect: c.redirect,
                    });
                }
            }
            Err(e) if e.code == Code::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    s.at_unix_ms = now_ms();
    Ok(s)
}

/// Judges every counter gate on every stage it covers. `last` is the
/// final evaluation of the step, where a window that has not quite passed
/// (clock granularity) counts as passed.
pub fn judge_counters(
    gates: &[CounterGate],
    rec: &HostRecord,
    now: &Sample,
    last: bool,
) -> Vec<GateResult> {
    let mut out = Vec::new();
    let empty = Sample::default();
    let post = rec.post.as_ref().unwrap_or(&empty);
    let elapsed_ms = u64::try_from(now.at_unix_ms.saturating_sub(post.at_unix_ms)).unwrap_or(0);
    for g in gates {
        let stages: Vec<&String> = now.stages.keys().filter(|s| g.covers(s)).collect();
        if stages.is_empty() {
            out.push(GateResult {
                gate: g.metric.name().into(),
                stage: g.stage.clone(),
                verdict: Verdict::Idle,
                value: None,
                max: Some(g.max),
                packets: None,
                detail: if g.stage == "*" {
                    "no stages on this host".into()
                } else {
                    format!("no stage {:?} on this host", g.stage)
                },
            });
            continue;
        }
        for stage in stages {
            if now.uncounted.contains(stage) {
                // Zeros from a stage nobody counts would pass any gate. A
                // gate that names the stage cannot be met, so it fails; a
                // gate over every stage says it could not judge this one.
                let named = g.stage != "*";
                out.push(GateResult {
                    gate: g.metric.name().into(),
                    stage: stage.clone(),
                    verdict: if named { Verdict::Fail } else { Verdict::Idle },
                    value: None,
                    max: Some(g.max),
                    packets: None,
                    detail: format!(
                        "stage {stage} is not counted: a plain XDP program last in a tail-call chain returns its verdict to the kernel{}",
                        if named { "; this gate can never be judged" } else { ": not judged" }
                    ),
                });
                continue;
            }
            let zero = Counters::default();
            let d = now
                .stages
                .get(stage)
                .unwrap_or(&zero)
                .since(post.stages.get(stage).unwrap_or(&zero));
            out.push(judge(
                g,
                stage,
                &d,
                baseline_drop_rate(rec, stage),
                elapsed_ms,
                last,
            ));
        }
    }
    out
}

/// The stage's drop rate before the change: over the baseline window if
/// there is one, else since the stage was loaded; 0 for a new stage.
pub fn baseline_drop_rate(rec: &HostRecord, stage: &str) -> f64 {
    let Some(b) = rec.baseline.as_ref().and_then(|b| b.stages.get(stage)) else {
        return 0.0;
    };
    let window = match rec
        .baseline_start
        .as_ref()
        .and_then(|s| s.stages.get(stage))
    {
        Some(start) if b.since(start).total() > 0 => b.since(start),
        _ => *b,
    };
    ratio(window.drop, window.total())
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

/// One gate on one stage's window `d`.
pub fn judge(
    g: &CounterGate,
    stage: &str,
    d: &Counters,
    base_drop_rate: f64,
    elapsed_ms: u64,
    last: bool,
) -> GateResult {
    let packets = d.total();
    let value = match g.metric {
        Metric::AbortedRate => ratio(d.aborted, packets),
        Metric::AbortedPackets => d.aborted as f64,
        Metric::DropRate => ratio(d.drop, packets),
        Metric::DropRateChange => ratio(d.drop, packets) - base_drop_rate,
    };
    let window_ms = u64::try_from(g.window.as_millis()).unwrap_or(u64::MAX);
    let idle = packets < g.min_packets || (g.metric.is_rate() && packets == 0);
    let over = value > g.max;
    let (verdict, detail) = if idle {
        (
            Verdict::Idle,
            format!(
                "{packets} packets in {elapsed_ms} ms, fewer than min_packets {}: not judged",
                g.min_packets
            ),
        )
    } else if over && g.dry_run {
        (
            Verdict::DryRunFail,
            format!(
                "dry run: {} = {} > max {} (not enforced)",
                g.metric,
                fmt_value(g.metric, value),
                g.max
            ),
        )
    } else if over {
        (
            Verdict::Fail,
            format!(
                "{} of stage {stage} is {} > max {} over {elapsed_ms} ms ({packets} packets{})",
                g.metric,
                fmt_value(g.metric, value),
                g.max,
                if g.metric == Metric::DropRateChange {
                    format!(", baseline drop rate {base_drop_rate:.4}")
                } else {
                    String::new()
                }
            ),
        )
    } else if elapsed_ms < window_ms && !last {
        (
            Verdict::Waiting,
            format!("{elapsed_ms} of {window_ms} ms of window so far"),
        )
    } else {
        (
            Verdict::Pass,
            format!(
                "{} = {} <= max {}",
                g.metric,
                fmt_value(g.metric, value),
                g.max
            ),
        )
    };
    GateResult {
        gate: g.metric.name().into(),
        stage: stage.into(),
        verdict,
        value: Some(value),
        max: Some(g.max),
        packets: Some(packets),
        detail,
    }
}

fn fmt_value(m: Metric, v: f64) -> String {
    if m.is_rate() {
        format!("{v:.4}")
    } else {
        format!("{v:.0}")
    }
}

/// Evaluates every gate of `plan` on one host; `policy`: a policy
/// rollout's, whose apply gate is the policy's ([`super::policy::gate`]).
/// Errors are the host not answering (or refusing the calls).
#[allow(clippy::too_many_arguments)]
pub async fn evaluate(
    fleet: &Fleet,
    host: usize,
    rec: &HostRecord,
    plan: &Plan,
    digest: &str,
    removing: bool,
    policy: Option<&PolicyRef>,
    last: bool,
) -> Result<Vec<GateResult>, RpcError> {
    let mut out = Vec::new();
    if plan.gates.health {
        let serving = fleet.health(host).await.or_else(|e| match e.code {
            // An agent without the health service cannot pass the gate,
            // but it answered.
            Code::Unimplemented | Code::NotFound => Ok(false),
            _ => Err(e),
        })?;
        out.push(GateResult {
            gate: "health".into(),
            stage: String::new(),
            verdict: if serving {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            value: None,
            max: None,
            packets: None,
            detail: if serving {
                "SERVING".into()
            } else {
                "the agent does not report rootlet.v1.Rootlet as SERVING".into()
            },
        });
    }
    if plan.gates.apply
        && let Some(p) = policy
    {
        out.push(super::policy::gate(fleet, host, p, &rec.rootlets).await?);
    } else if plan.gates.apply {
        let mut bad = Vec::new();
        for id in &rec.rootlets {
            let st = fleet
                .call(host, "GetApplyStatus", None, |mut c, t| async move {
                    c.get_apply_status(request(
                        pb::GetApplyStatusRequest {
                            rootlet: Some(by_id(id)),
                            idempotency_key: String::new(),
                        },
                        t,
                    ))
                    .await
                })
                .await;
            let st = match st {
                Ok(st) => st,
                // Removing: the rootlet went with the bundle.
                Err(e) if removing && e.code == Code::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Several bundles can share the rootlet: the bundle rolled out
            // is the one whose digest it lists (the scalars are only the
            // bundle applied there last).
            let runs = |d: &str| st.applied_digest == d || st.applied.iter().any(|b| b.digest == d);
            let ours = st
                .applied
                .iter()
                .find(|b| b.digest == digest)
                .map(|b| b.name.clone());
            let drift: Vec<pb::StageDrift> = st
                .drift
                .iter()
                .filter(|d| d.bundle.is_empty() || ours.as_ref().is_none_or(|n| *n == d.bundle))
                .cloned()
                .collect();
            if removing {
                if let Some(prev) = &rec.previous
                    && runs(&prev.digest)
                {
                    bad.push(format!(
                        "rootlet {id} still runs {} ({})",
                        prev.version,
                        short(&prev.digest)
                    ));
                }
            } else if !runs(digest) {
                let last_attempt = st
                    .last_attempt
                    .map(|a| format!("; last attempt {} {}: {}", a.version, a.outcome, a.error))
                    .unwrap_or_default();
                bad.push(format!(
                    "rootlet {id} runs {} ({}){last_attempt}",
                    if st.applied_version.is_empty() {
                        "nothing"
                    } else {
                        &st.applied_version
                    },
                    short(&st.applied_digest)
                ));
            } else if !drift.is_empty() {
                bad.push(format!(
                    "rootlet {id} runs {} but the kernel differs: {}",
                    st.applied
                        .iter()
                        .find(|b| b.digest == digest)
                        .map_or(st.applied_version.as_str(), |b| b.version.as_str()),
                    drift_text(&drift)
                ));
            }
        }
        out.push(GateResult {
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
            detail: if bad.is_empty() && removing {
                format!("{} rootlet(s) without the bundle", rec.rootlets.len())
            } else if bad.is_empty() {
                format!("{} rootlet(s) on {}", rec.rootlets.len(), short(digest))
            } else {
                bad.join("; ")
            },
        });
    }
    if !plan.gates.counters.is_empty() {
        let refs: Vec<pb::RootletRef> = rec.rootlets.iter().map(|id| by_id(id)).collect();
        let now = sample(fleet, host, &refs).await?;
        out.extend(judge_counters(&plan.gates.counters, rec, &now, last));
    }
    Ok(out)
}

/// Per-stage drift as one line: `ddos: replaced out of band (runs
/// 1a2b3c…, the bundle has 4d5e6f…)`.
pub fn drift_text(drift: &[pb::StageDrift]) -> String {
    drift
        .iter()
        .map(|d| {
            let running = if d.running_digest.is_empty() {
                "not running".to_string()
            } else {
                format!("runs {}", short(&d.running_digest))
            };
            format!(
                "{}: {} ({running}, the bundle has {})",
                d.stage,
                d.reason,
                short(&d.expected_digest)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The first 12 hex digits of a digest, for people.
pub fn short(digest: &str) -> String {
    if digest.is_empty() {
        "-".into()
    } else {
        digest.get(..12).unwrap_or(digest).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        inventory::{Address, Host, Security},
        rollout::journal::HostRecord,
    };

    fn gate(metric: Metric, max: f64) -> CounterGate {
        CounterGate {
            stage: "*".into(),
            metric,
            max,
            window: Duration::from_secs(10),
            min_packets: 100,
            dry_run: false,
        }
    }

    fn c(aborted: u64, drop: u64, pass: u64) -> Counters {
        Counters {
            aborted,
            drop,
            pass,
            ..Default::default()
        }
    }

    fn sample(at: i64, stages: &[(&str, Counters)]) -> Sample {
        Sample {
            at_unix_ms: at,
            stages: stages.iter().map(|(s, c)| (s.to_string(), *c)).collect(),
            uncounted: Default::default(),
        }
    }

    #[test]
    fn an_uncounted_stage_is_never_judged_by_its_zeros() {
        let r = rec();
        let mut now = sample(20_000, &[("plain", c(0, 0, 0)), ("ddos", c(0, 0, 500))]);
        now.uncounted.insert("plain".into());
        let mut named = gate(Metric::DropRate, 0.1);
        named.stage = "plain".into();
        named.min_packets = 0;
        let res = judge_counters(std::slice::from_ref(&named), &r, &now, true);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].verdict, Verdict::Fail, "{}", res[0].detail);
        assert!(res[0].detail.contains("not counted"), "{}", res[0].detail);
        let res = judge_counters(&[gate(Metric::DropRate, 0.1)], &r, &now, true);
        let plain = res
            .iter()
            .find(|g| g.stage == "plain")
            .expect("plain judged");
        assert_eq!(plain.verdict, Verdict::Idle);
        assert!(plain.detail.contains("not counted"), "{}", plain.detail);
        let ddos = res.iter().find(|g| g.stage == "ddos").expect("ddos judged");
        assert_eq!(ddos.verdict, Verdict::Pass);
    }

    fn rec() -> HostRecord {
        HostRecord::new(
            Host {
                name: "h".into(),
                address: Address::Unix("/x".into()),
                labels: Default::default(),
                security: Security::Local,
            },
            0,
        )
    }

    #[test]
    fn aborted_rate() {
        let g = gate(Metric::AbortedRate, 0.001);
        // 2 aborted of 1000 after the push: 0.002 > 0.001, fails even
        // before the window has passed.
        let r = judge(&g, "s", &c(2, 0, 998), 0.0, 1000, false);
        assert_eq!(r.verdict, Verdict::Fail, "{}", r.detail);
        assert_eq!(r.value, Some(0.002));
        // Under the threshold: waits for the window, then passes.
        let r = judge(&g, "s", &c(0, 0, 1000), 0.0, 1000, false);
        assert_eq!(r.verdict, Verdict::Waiting);
        let r = judge(&g, "s", &c(0, 0, 1000), 0.0, 10_000, false);
        assert_eq!(r.verdict, Verdict::Pass);
        // Idle: 50 packets < min_packets, even if all aborted.
        let r = judge(&g, "s", &c(50, 0, 0), 0.0, 10_000, false);
        assert_eq!(r.verdict, Verdict::Idle);
        // Dry run: reported, not enforced.
        let mut dry = g.clone();
        dry.dry_run = true;
        let r = judge(&dry, "s", &c(500, 0, 500), 0.0, 10_000, true);
        assert_eq!(r.verdict, Verdict::DryRunFail);
    }

    #[test]
    fn drop_rate_change_against_baseline() {
        let mut r = rec();
        // Before: 10% drops between baseline_start and baseline.
        r.baseline_start = Some(sample(0, &[("ddos", c(0, 100, 900))]));
        r.baseline = Some(sample(10_000, &[("ddos", c(0, 200, 1800))]));
        assert!((baseline_drop_rate(&r, "ddos") - 0.1).abs() < 1e-9);
        // A new stage has no baseline.
        assert_eq!(baseline_drop_rate(&r, "new"), 0.0);
        // Without baseline_start: since load.
        r.baseline_start = None;
        assert!((baseline_drop_rate(&r, "ddos") - 0.1).abs() < 1e-9);

        r.post = Some(sample(20_000, &[("ddos", c(0, 200, 1800))]));
        let g = gate(Metric::DropRateChange, 0.05);
        // After: 30% drops, +0.2 over the baseline.
        let now = sample(31_000, &[("ddos", c(0, 500, 2500))]);
        let res = judge_counters(std::slice::from_ref(&g), &r, &now, false);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].verdict, Verdict::Fail, "{}", res[0].detail);
        assert!((res[0].value.unwrap() - 0.2).abs() < 1e-9);
        // After: 12% drops, +0.02: passes once the window has passed.
        let now = sample(31_000, &[("ddos", c(0, 260, 2240))]);
        let res = judge_counters(std::slice::from_ref(&g), &r, &now, false);
        assert_eq!(res[0].verdict, Verdict::Pass, "{}", res[0].detail);
    }

    #[test]
    fn stage_selection() {
        let mut r = rec();
        r.post = Some(sample(0, &[]));
        let mut g = gate(Metric::AbortedPackets, 0.0);
        g.stage = "l4lb".into();
        g.min_packets = 0;
        let now = sample(20_000, &[("ddos", c(5, 0, 0)), ("l4lb", c(0, 0, 10))]);
        let res = judge_counters(std::slice::from_ref(&g), &r, &now, true);
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].stage, "l4lb");
        assert_eq!(res[0].verdict, Verdict::Pass);
        g.stage = "*".into();
        let res = judge_counters(std::slice::from_ref(&g), &r, &now, true);
        assert_eq!(res.len(), 2);
        assert_eq!(res[0].verdict, Verdict::Fail);
        g.stage = "gone".into();
        let res = judge_counters(std::slice::from_ref(&g), &r, &now, true);
        assert_eq!(res[0].verdict, Verdict::Idle);
    }
}
