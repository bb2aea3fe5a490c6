//! What a rollout reports: a few lines for people (the result and exactly
//! why it stopped, the steps, hosts by state, and every host that did not
//! end healthy), a JSON document for programs, and the host table of
//! `rollout status`.

use std::{fmt::Write, time::Duration};

use serde::Serialize;
use serde_json::Value;

use super::{
    gates::short,
    journal::{Action, HostState, Journal, RolloutState},
};
use crate::config::Human;

/// Most hosts listed one per line in the human summary.
const MAX_LISTED: usize = 20;

/// Run figures the journal does not hold.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    pub wall: Duration,
    pub rpcs: u64,
}

fn headline(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Succeeded => "SUCCEEDED",
        RolloutState::Incomplete => "INCOMPLETE (hosts skipped)",
        RolloutState::RolledBack => "ROLLED BACK",
        RolloutState::Failed => "FAILED",
        RolloutState::Undone => "UNDONE",
        RolloutState::Running => "RUNNING",
        RolloutState::Paused => "PAUSED",
        RolloutState::WaitingForPromote => "WAITING FOR PROMOTE",
        RolloutState::RollingBack => "ROLLING BACK",
    }
}

/// The summary for people.
pub fn human(j: &Journal, run: Option<RunStats>) -> String {
    let mut out = String::new();
    let what = match j.action {
        Action::Apply => format!(
            "rollout {}: {} {} ({}) to",
            j.rollout_id,
            j.bundle.name,
            j.bundle.version,
            short(&j.bundle.digest)
        ),
        Action::Remove => format!("removal {}: bundle {} from", j.rollout_id, j.bundle.name),
        Action::Policy => format!(
            "policy rollout {}: stage {} policy {} ({}){} to",
            j.rollout_id,
            j.bundle.name,
            j.bundle.version,
            short(&j.bundle.digest),
            match j.policy.as_ref().and_then(|p| p.interface.as_ref()) {
                Some((netns, ifname)) if netns.is_empty() => format!(" on {ifname}"),
                Some((netns, ifname)) => format!(" on {ifname} in {netns}"),
                None => String::new(),
            }
        ),
    };
    let _ = writeln!(
        out,
        "{what} {} host{}{}",
        j.hosts.len(),
        if j.hosts.len() == 1 { "" } else { "s" },
        if j.selector.is_empty() {
            String::new()
        } else {
            format!(" ({})", j.selector)
        }
    );
    let mut result = headline(j.state).to_string();
    if let Some(run) = run {
        let _ = write!(
            result,
            " in {} (control plane {}, {} RPCs)",
            Human(run.wall),
            Human(Duration::from_millis(j.control_plane_ms)),
            run.rpcs
        );
    }
    if let Some(stop) = &j.stop {
        let _ = write!(result, ": {}", stop.message);
    }
    let _ = writeln!(out, "result: {result}");
    let steps: Vec<String> = j
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mark = if i < j.steps_done {
                "ok"
            } else if j.stop.as_ref().and_then(|st| st.step) == Some(i) {
                "STOPPED"
            } else if i == j.current_step && !j.state.is_final() {
                "running"
            } else {
                "not run"
            };
            format!("{} {} {mark}", s.kind, s.count)
        })
        .collect();
    let _ = writeln!(out, "steps:  {}", steps.join(" | "));
    let counts: Vec<String> = j.counts().iter().map(|(k, v)| format!("{v} {k}")).collect();
    let _ = writeln!(out, "hosts:  {}", counts.join(", "));
    let notable: Vec<_> = j
        .hosts
        .iter()
        .filter(|h| {
            matches!(
                h.state,
                HostState::Failed
                    | HostState::Unreachable
                    | HostState::RolledBack
                    | HostState::RollbackFailed
            )
        })
        .collect();
    let width = notable.iter().map(|h| h.host.name.len()).max().unwrap_or(0);
    for h in notable.iter().take(MAX_LISTED) {
        let _ = writeln!(
            out,
            "  {:<width$}  {:<15}  {}",
            h.host.name,
            h.state.name(),
            h.detail
        );
    }
    if notable.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "  ... and {} more (rootletctl rollout status --journal J)",
            notable.len() - MAX_LISTED
        );
    }
    let dry: Vec<String> = j
        .hosts
        .iter()
        .flat_map(|h| {
            h.gates
                .iter()
                .filter(|g| g.verdict == super::journal::Verdict::DryRunFail)
                .map(move |g| format!("{}: {}", h.host.name, g.detail))
        })
        .take(5)
        .collect();
    for d in dry {
        let _ = writeln!(out, "  (dry run) {d}");
    }
    out
}

/// The summary for programs, borrowed from the journal: written out as it
/// is serialized ([`Summary::write`]) rather than built as a JSON tree
/// first (that tree, a few KiB per host, was the client's peak memory at
/// the end of a large rollout).
#[derive(Serialize)]
pub struct Summary<'a> {
    rollout_id: &'a str,
    action: &'a super::journal::Action,
    bundle: BundleView<'a>,
    state: &'static str,
    exit_code: Option<i32>,
    stop: &'a Option<super::journal::StopReason>,
    selector: &'a str,
    current_step: usize,
    steps_done: usize,
    steps: Vec<StepView>,
    counts: std::collections::BTreeMap<&'static str, usize>,
    control_plane_ms: u64,
    wall_ms: Option<u64>,
    rpcs: Option<u64>,
    /// `rollout status`: whether a process runs the rollout now.
    #[serde(skip_serializing_if = "Option::is_none")]
    running: Option<bool>,
    /// `rollout status`: the operator requests pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    control: Option<Value>,
    hosts: Vec<HostView<'a>>,
}

#[derive(Serialize)]
struct BundleView<'a> {
    name: &'a str,
    version: &'a str,
    digest: &'a str,
}

#[derive(Serialize)]
struct StepView {
    kind: String,
    hosts: usize,
    pause: Option<String>,
}

#[derive(Serialize)]
struct HostView<'a> {
    name: &'a str,
    #[serde(serialize_with = "display")]
    address: &'a crate::inventory::Address,
    step: usize,
    state: &'static str,
    changed: &'a super::journal::Changed,
    previous: &'a Option<super::journal::Version>,
    uploaded: bool,
    rootlets: &'a [String],
    detail: &'a str,
    gates: &'a [super::journal::GateResult],
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl<'a> Summary<'a> {
    pub fn of(j: &'a Journal, run: Option<RunStats>, exit_code: Option<i32>) -> Summary<'a> {
        Summary {
            rollout_id: &j.rollout_id,
            action: &j.action,
            bundle: BundleView {
                name: &j.bundle.name,
                version: &j.bundle.version,
                digest: &j.bundle.digest,
            },
            state: j.state.name(),
            exit_code,
            stop: &j.stop,
            selector: &j.selector,
            current_step: j.current_step,
            steps_done: j.steps_done,
            steps: j
                .steps
                .iter()
                .map(|s| StepView {
                    kind: s.kind.to_string(),
                    hosts: s.count,
                    pause: s.pause.map(|p| p.to_string()),
                })
                .collect(),
            counts: j.counts(),
            control_plane_ms: j.control_plane_ms,
            wall_ms: run.map(|r| r.wall.as_millis() as u64),
            rpcs: run.map(|r| r.rpcs),
            running: None,
            control: None,
            hosts: j
                .hosts
                .iter()
                .map(|h| HostView {
                    name: &h.host.name,
                    address: &h.host.address,
                    step: h.step,
                    state: h.state.name(),
                    changed: &h.changed,
                    previous: &h.previous,
                    uploaded: h.uploaded,
                    rootlets: &h.rootlets,
                    detail: &h.detail,
                    gates: &h.gates,
                })
                .collect(),
        }
    }

    /// With what `rollout status` adds: whether a process runs it, and
    /// the operator requests pending.
    pub fn with_status(mut self, running: bool, control: Value) -> Self {
        self.running = Some(running);
        self.control = Some(control);
        self
    }

    /// Writes it as JSON (one line, or pretty) and a newline to `w`.
    pub fn write(&self, w: impl std::io::Write, pretty: bool) -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(w);
        if pretty {
            serde_json::to_writer_pretty(&mut w, self)?;
        } else {
            serde_json::to_writer(&mut w, self)?;
        }
        std::io::Write::write_all(&mut w, b"\n")?;
        std::io::Write::flush(&mut w)
    }
}

/// [`Summary`] as a JSON value (tests, and callers that add to it).
pub fn json(j: &Journal, run: Option<RunStats>, exit_code: Option<i32>) -> Value {
    serde_json::to_value(Summary::of(j, run, exit_code)).unwrap_or_default()
}

/// `rollout status`: the summary, the steps and every host.
pub fn status_table(j: &Journal) -> String {
    let mut out = human(j, None);
    let _ = writeln!(out, "events (latest last):");
    for e in j.events.iter().rev().take(8).rev() {
        let _ = writeln!(out, "  {}  {}", fmt_time(e.at_unix_ms), e.message);
    }
    let width = j
        .hosts
        .iter()
        .map(|h| h.host.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<width$}  {:<10}  {:<15}  {:<8}  {:<12}  DETAIL",
        "HOST", "STEP", "STATE", "CHANGED", "PREVIOUS"
    );
    for h in &j.hosts {
        let step = j
            .steps
            .get(h.step)
            .map_or_else(|| "?".into(), |s| s.kind.to_string());
        let changed = match h.changed {
            super::journal::Changed::No => "no",
            super::journal::Changed::Yes => "yes",
            super::journal::Changed::Unknown => "maybe",
        };
        let prev = match (&h.previous, h.previous_recorded) {
            (Some(p), _) => p.version.clone(),
            (None, true) => "(none)".into(),
            (None, false) => "-".into(),
        };
        let detail = if h.detail.is_empty() {
            h.gates
                .iter()
                .filter(|g| g.verdict != super::journal::Verdict::Pass)
                .map(|g| format!("{} {}: {:?}", g.gate, g.stage, g.verdict))
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            h.detail.clone()
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<10}  {:<15}  {:<8}  {:<12}  {}",
            h.host.name,
            step,
            h.state.name(),
            changed,
            prev,
            detail
        );
    }
    out
}

/// `HH:MM:SS` UTC of a Unix time in milliseconds.
pub fn fmt_time(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}Z", s / 3600, (s % 3600) / 60, s % 60)
}
