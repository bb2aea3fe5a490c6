//! The rollout state machine. Steps run in order (canary, then waves); a
//! step is:
//!
//! 1. **prepare**: for each host, the version of this bundle it runs now
//!    (`ListBundles`, the entry marked current) and its counters
//!    (`GetStats`), both recorded in the journal, which is saved before
//!    anything is pushed;
//! 2. **push**: `HasBundle`, then `ApplyBundle` with the bytes only where
//!    the agent lacks the digest, under an idempotency key made of the
//!    digest, the rollout and the step; then the counters right after;
//! 3. **soak**: gates evaluated every window (or a fifth of the soak), at
//!    least every second, until the soak and the longest window have
//!    passed; a failure ends the step at once (a counter gate over its
//!    threshold fails before its window has passed);
//! 4. the step's hosts are healthy; the plan's pause follows.
//!
//! Hosts that do not answer are marked unreachable and count against
//! `max_unavailable`; after the last step they are tried once more, and a
//! rollout that still skipped some ends incomplete. A push whose outcome
//! is unknown (a dropped connection, no answer) is settled by asking the
//! agent what the call with its idempotency key did. A failed gate, too
//! many unreachable hosts, a step over its progress deadline, an operator
//! abort or a pause that waited longer than `pause_timeout` stops the
//! rollout: every host it changed goes back to its previous version
//! (`ApplyBundle` by that digest; the agent keeps the last versions), or,
//! after a first install, loses the bundle (`RemoveBundle`), and the
//! journal says exactly why. For `bundle remove` the push is
//! `RemoveBundle` and the rest is the same; for `policy rollout`, prepare
//! records each target rootlet's policy, the push is `ApplyPolicy`, the
//! apply gate `GetPolicy` and the put back `RollbackPolicy`
//! ([`super::policy`]), and the rest is the same.
//!
//! The engine owns the journal; host work runs concurrently (bounded by
//! the transport's concurrency) and only returns results, which this loop
//! records.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use rootlet_proto::v1::{self as pb, apply_bundle_request::Source};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{
    control::{Control, POLL_INTERVAL},
    gates::{self, by_id, by_interface, short},
    journal::{
        Action, Changed, GateResult, HostState, JournalError, JournalFile, RolloutState, Sample,
        StopKind, StopReason, Verdict, Version, now_ms,
    },
    policy,
    progress::Progress,
};
use crate::{
    config::Human,
    plan::{Pause, StepKind},
    transport::{Fleet, RpcError, request},
};

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Every host that answered is on the new version; some hosts were
    /// skipped (unreachable to the end, after a last retry).
    Incomplete,
    /// Stopped, and every changed host is back on its previous version
    /// (a first install: without the bundle).
    RolledBack,
    /// Stopped, and some host could not be put back; or `undo` could not
    /// put every host back.
    Failed,
    /// `rollout undo` put every changed host back.
    Undone,
}

impl Outcome {
    /// The process exit code: 0 success (or undone), 3 rolled back, 4
    /// incomplete (hosts skipped), 1 failed.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Succeeded | Outcome::Undone => crate::cli::EXIT_OK,
            Outcome::RolledBack => crate::cli::EXIT_ROLLED_BACK,
            Outcome::Incomplete => crate::cli::EXIT_INCOMPLETE,
            Outcome::Failed => crate::cli::EXIT_FAILED,
        }
    }

    pub fn of(state: RolloutState) -> Option<Outcome> {
        match state {
            RolloutState::Succeeded => Some(Outcome::Succeeded),
            RolloutState::Incomplete => Some(Outcome::Incomplete),
            RolloutState::RolledBack => Some(Outcome::RolledBack),
            RolloutState::Failed => Some(Outcome::Failed),
            RolloutState::Undone => Some(Outcome::Undone),
            _ => None,
        }
    }
}

/// The idempotency key of one mutation: sha256 of what it does, the
/// bundle digest, the rollout and the step (so a retry, or a resumed
/// rollout, repeats the same request, and nothing else does).
pub fn idempotency_key(action: &str, digest: &str, rollout: &str, step: &str) -> String {
    let mut h = Sha256::new();
    for part in ["rootletctl", action, digest, rollout, step] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The most time between two gate evaluations of a soak.
const MAX_EVALUATION_INTERVAL: Duration = Duration::from_secs(1);
/// The least (short windows do not make the agents busier than this).
const MIN_EVALUATION_INTERVAL: Duration = Duration::from_millis(100);

/// What pushing to one host did.
enum Pushed {
    Ok {
        uploaded: bool,
        rootlets: Vec<String>,
        post: Sample,
    },
    /// The agent refused or failed the apply (it keeps its previous
    /// version; a policy rollout's host with several rootlets may have
    /// taken it on some: `Changed::Yes`).
    Nack(RpcError, Changed),
    Unreachable(RpcError, Changed),
}

pub struct Engine {
    pub jf: JournalFile,
    fleet: Arc<Fleet>,
    /// The signed bundle, when pushing is possible.
    bundle: Option<Arc<Vec<u8>>>,
    control: watch::Receiver<Control>,
    ui: Progress,
}

type EResult<T> = Result<T, JournalError>;

impl Engine {
    pub fn new(
        jf: JournalFile,
        fleet: Arc<Fleet>,
        bundle: Option<Arc<Vec<u8>>>,
        control: watch::Receiver<Control>,
        ui: Progress,
    ) -> Engine {
        Engine {
            jf,
            fleet,
            bundle,
            control,
            ui,
        }
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The connections, shared (their RPC count outlives the engine).
    pub fn fleet_arc(&self) -> Arc<Fleet> {
        self.fleet.clone()
    }

    fn control(&self) -> Control {
        self.control.borrow().clone()
    }

    fn label(&self, s: usize) -> String {
        self.jf
            .journal
            .steps
            .get(s)
            .map_or_else(|| format!("step {s}"), |st| st.kind.to_string())
    }

    fn stop(
        &self,
        kind: StopKind,
        step: Option<usize>,
        host: Option<String>,
        message: String,
    ) -> StopReason {
        StopReason {
            kind,
            message,
            step,
            host,
            at_unix_ms: now_ms(),
        }
    }

    /// Runs (or resumes) the rollout to its end.
    pub async fn run(mut self) -> EResult<(Outcome, JournalFile)> {
        let incomplete = self.jf.journal.state == RolloutState::Incomplete;
        if !incomplete && let Some(o) = Outcome::of(self.jf.journal.state) {
            return Ok((o, self.jf));
        }
        if incomplete {
            // `rollout resume` of a rollout that skipped hosts: only those
            // are left to do.
            self.jf.journal.state = RolloutState::Running;
            self.jf.journal.event("resumed to finish the skipped hosts");
            self.jf.save()?;
            return self.finish().await;
        }
        if self.jf.journal.state == RolloutState::RollingBack {
            let outcome = self.roll_back(None, false).await?;
            self.ui.finish();
            return Ok((outcome, self.jf));
        }
        self.jf.journal.state = RolloutState::Running;
        // Hosts of unfinished steps that did not answer last time get
        // another chance (they have not been changed).
        let current = self.jf.journal.current_step;
        for h in &mut self.jf.journal.hosts {
            if h.step >= current && h.state == HostState::Unreachable && h.changed == Changed::No {
                h.set(HostState::Pending, "");
            }
        }
        self.jf.save()?;

        if let Some(stop) = self.baseline().await? {
            return self.finish_stopped(stop).await;
        }
        let steps = self.jf.journal.steps.len();
        // Bounded: one iteration per step.
        while self.jf.journal.current_step < steps {
            let s = self.jf.journal.current_step;
            if let Some(stop) = self.run_step(s).await? {
                return self.finish_stopped(stop).await;
            }
            self.jf.journal.steps_done = s + 1;
            let label = self.label(s);
            self.jf.journal.event(format!("{label} healthy"));
            self.jf.save()?;
            let pause = self.jf.journal.steps.get(s).and_then(|st| st.pause);
            if let Some(p) = pause
                && s + 1 < steps
                && let Some(stop) = self.pause_after(s, p).await?
            {
                return self.finish_stopped(stop).await;
            }
            self.jf.journal.current_step = s + 1;
            self.jf.save()?;
        }
        self.finish().await
    }

    /// After the last step: hosts skipped because they did not answer get
    /// one more try (those that came back are pushed and gated like any
    /// other); then the rollout succeeded, or is incomplete and lists the
    /// hosts still skipped.
    async fn finish(mut self) -> EResult<(Outcome, JournalFile)> {
        let steps = self.jf.journal.steps.len();
        // Bounded: one pass over the steps.
        for s in 0..steps {
            let skipped = self.hosts_of(s, &[HostState::Unreachable]);
            if skipped.is_empty() {
                continue;
            }
            let label = self.label(s);
            self.jf.journal.event(format!(
                "{label}: retrying {} skipped before",
                plural(skipped.len(), "host")
            ));
            for &i in &skipped {
                if let Some(h) = self.jf.journal.hosts.get_mut(i) {
                    h.set(HostState::Pending, "");
                }
            }
            self.jf.save()?;
            if let Some(stop) = self.run_step(s).await? {
                return self.finish_stopped(stop).await;
            }
        }
        let skipped: Vec<String> = self
            .jf
            .journal
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Unreachable)
            .map(|h| h.host.name.clone())
            .collect();
        let outcome = if skipped.is_empty() {
            self.jf.journal.state = RolloutState::Succeeded;
            self.jf.journal.event("succeeded");
            Outcome::Succeeded
        } else {
            self.jf.journal.state = RolloutState::Incomplete;
            let not_done = match self.jf.journal.action {
                Action::Apply => format!("not on {}", self.jf.journal.bundle.version),
                Action::Remove => format!("may still run `{}`", self.jf.journal.bundle.name),
                Action::Policy => format!(
                    "stage {} not on policy {}",
                    self.jf.journal.bundle.name, self.jf.journal.bundle.version
                ),
            };
            let msg = format!(
                "incomplete: {} skipped, {not_done} ({}); `rollout resume` tries them again",
                plural(skipped.len(), "host"),
                skipped.join(", ")
            );
            self.ui.line(msg.clone());
            self.jf.journal.event(msg);
            Outcome::Incomplete
        };
        self.jf.save()?;
        self.ui.finish();
        Ok((outcome, self.jf))
    }

    async fn finish_stopped(mut self, stop: StopReason) -> EResult<(Outcome, JournalFile)> {
        let outcome = self.roll_back(Some(stop), false).await?;
        self.ui.finish();
        Ok((outcome, self.jf))
    }

    /// Rolls back (`undo == false`: the rollout stopped for `stop`) or
    /// undoes (`undo == true`) every host the rollout changed.
    pub async fn roll_back(&mut self, stop: Option<StopReason>, undo: bool) -> EResult<Outcome> {
        if let Some(stop) = stop {
            self.ui.line(format!("stopping: {}", stop.message));
            self.jf.journal.event(format!("stopped: {}", stop.message));
            self.jf.journal.stop = Some(stop);
        }
        if !undo {
            self.jf.journal.state = RolloutState::RollingBack;
        }
        self.jf.save()?;
        let t0 = Instant::now();
        let targets: Vec<usize> = self
            .jf
            .journal
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.changed != Changed::No && h.state != HostState::RolledBack)
            .map(|(i, _)| i)
            .collect();
        let what = if undo { "undo" } else { "rollback" };
        if !targets.is_empty() {
            self.ui.line(format!(
                "{what}: returning {} host{} to the previous version",
                targets.len(),
                if targets.len() == 1 { "" } else { "s" }
            ));
        }
        let fleet = self.fleet.clone();
        let rollout = self.jf.journal.rollout_id.clone();
        let name = self.jf.journal.bundle.name.clone();
        let new_digest = self.jf.journal.bundle.digest.clone();
        let jobs: Vec<(usize, Option<Version>, Vec<String>, PolicyBefores)> = targets
            .iter()
            .filter_map(|&i| {
                self.jf.journal.hosts.get(i).map(|h| {
                    (
                        i,
                        h.previous.clone(),
                        h.rootlets.clone(),
                        h.policy_before.clone(),
                    )
                })
            })
            .collect();
        let policy = self
            .jf
            .journal
            .policy
            .clone()
            .filter(|_| self.jf.journal.action == Action::Policy);
        // The policy that rootlets without one before go back to, read
        // once (and checked against the journal's digest).
        let empty = policy
            .as_ref()
            .and_then(|p| p.empty.as_ref())
            .filter(|_| !jobs.is_empty())
            .map(|e| policy::PolicyFile::reread(&e.path, &e.digest));
        let deadline = fleet.options().host_deadline;
        let concurrency = fleet.options().concurrency.max(1);
        let mut results = stream::iter(jobs)
            .map(|(i, previous, ids, before)| {
                let fleet = &fleet;
                let rollout = &rollout;
                let name = &name;
                let new_digest = &new_digest;
                let policy = &policy;
                let empty = &empty;
                async move {
                    let _slot = fleet.permit().await;
                    let work = async {
                        match policy {
                            Some(p) => {
                                policy::put_back(
                                    fleet,
                                    i,
                                    what,
                                    rollout,
                                    p,
                                    &ids,
                                    &before,
                                    empty.as_ref(),
                                )
                                .await
                            }
                            None => {
                                put_back(
                                    fleet,
                                    i,
                                    what,
                                    rollout,
                                    name,
                                    new_digest,
                                    previous.as_ref(),
                                )
                                .await
                            }
                        }
                    };
                    let r = match tokio::time::timeout(deadline, work).await {
                        Ok(r) => r,
                        Err(_) => Err(format!(
                            "could not be put back: no answer within {}",
                            Human(deadline)
                        )),
                    };
                    (i, r)
                }
            })
            .buffer_unordered(concurrency);
        let mut clean = true;
        // Bounded: one item per target.
        while let Some((i, r)) = results.next().await {
            let Some(h) = self.jf.journal.hosts.get_mut(i) else {
                continue;
            };
            match r {
                Ok(detail) => {
                    h.set(HostState::RolledBack, detail);
                    h.changed = Changed::No;
                }
                Err(e) => {
                    clean = false;
                    self.ui.line(format!("{what}: {}: {e}", h.host.name));
                    h.set(HostState::RollbackFailed, e);
                }
            }
            self.jf.changed()?;
        }
        drop(results);
        self.jf.journal.control_plane_ms += u64::try_from(t0.elapsed().as_millis()).unwrap_or(0);
        let outcome = match (undo, clean) {
            (true, true) => Outcome::Undone,
            (false, true) => Outcome::RolledBack,
            (_, false) => Outcome::Failed,
        };
        self.jf.journal.state = match outcome {
            Outcome::Undone => RolloutState::Undone,
            Outcome::RolledBack => RolloutState::RolledBack,
            _ => RolloutState::Failed,
        };
        self.jf.journal.event(format!(
            "{what} {}",
            if clean {
                "complete"
            } else {
                "incomplete: some hosts could not be put back"
            }
        ));
        self.jf.save()?;
        Ok(outcome)
    }

    /// The counters at the rollout's start, for gates that compare with a
    /// baseline window; then waits for that window before the first push.
    async fn baseline(&mut self) -> EResult<Option<StopReason>> {
        let window = self.jf.journal.plan.baseline_window();
        if window.is_zero() || self.jf.journal.steps_done > 0 {
            return Ok(None);
        }
        let t0 = Instant::now();
        let todo: Vec<usize> = self
            .jf
            .journal
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.baseline_start.is_none() && h.state == HostState::Pending)
            .map(|(i, _)| i)
            .collect();
        let targets = self.interface_refs();
        let policy = self
            .jf
            .journal
            .policy
            .clone()
            .filter(|_| self.jf.journal.action == Action::Policy);
        let fleet = self.fleet.clone();
        let concurrency = fleet.options().concurrency.max(1);
        let mut results = stream::iter(todo)
            .map(|i| {
                let fleet = &fleet;
                let targets = &targets;
                let policy = &policy;
                async move {
                    let _slot = fleet.permit().await;
                    let s = match policy {
                        // A policy's targets are the rootlets with its stage.
                        Some(p) => match policy::targets(fleet, i, p).await {
                            Ok(ids) => policy::sample(fleet, i, &ids).await,
                            Err(e) => Err(e),
                        },
                        None => gates::sample(fleet, i, targets).await,
                    };
                    (i, s)
                }
            })
            .buffer_unordered(concurrency);
        while let Some((i, r)) = results.next().await {
            if let (Some(h), Ok(s)) = (self.jf.journal.hosts.get_mut(i), r) {
                h.baseline_start = Some(s);
            }
        }
        drop(results);
        self.jf.journal.control_plane_ms += u64::try_from(t0.elapsed().as_millis()).unwrap_or(0);
        self.jf.save()?;
        let oldest = self
            .jf
            .journal
            .hosts
            .iter()
            .filter_map(|h| h.baseline_start.as_ref().map(|s| s.at_unix_ms))
            .min()
            .unwrap_or_else(now_ms);
        let waited =
            Duration::from_millis(u64::try_from(now_ms().saturating_sub(oldest)).unwrap_or(0));
        if waited < window {
            self.ui.line(format!(
                "measuring the baseline for {} before the first push",
                Human(window - waited)
            ));
            return self.wait(window - waited, None, "baseline").await;
        }
        Ok(None)
    }

    /// Waits `d`, watching for an abort (and the step's deadline).
    async fn wait(
        &mut self,
        d: Duration,
        deadline: Option<(usize, Instant)>,
        what: &str,
    ) -> EResult<Option<StopReason>> {
        let end = Instant::now() + d;
        // Bounded by `end`.
        loop {
            let now = Instant::now();
            if self.control().abort {
                return Ok(Some(self.abort_reason(deadline.map(|(s, _)| s))));
            }
            if let Some((s, dl)) = deadline
                && now > dl
            {
                return Ok(Some(self.deadline_reason(s)));
            }
            if now >= end {
                return Ok(None);
            }
            if let Some((s, _)) = deadline {
                self.ui.tick(
                    s,
                    format!(
                        "{what} {} left",
                        Human((end - now).max(Duration::from_secs(1)))
                    ),
                );
            }
            tokio::time::sleep(POLL_INTERVAL.min(end - now)).await;
        }
    }

    fn abort_reason(&self, step: Option<usize>) -> StopReason {
        let c = self.control();
        let by = if c.by.is_empty() {
            String::new()
        } else {
            format!(" by {}", c.by)
        };
        let at = step
            .map(|s| format!(" during {}", self.label(s)))
            .unwrap_or_default();
        self.stop(
            StopKind::Abort,
            step,
            None,
            format!("aborted{by}{at} (rootletctl rollout abort)"),
        )
    }

    fn deadline_reason(&self, s: usize) -> StopReason {
        self.stop(
            StopKind::Deadline,
            Some(s),
            None,
            format!(
                "{} was not healthy within progress_deadline {}",
                self.label(s),
                Human(self.jf.journal.plan.progress_deadline)
            ),
        )
    }

    /// Waits while the operator has paused the rollout. Returns how long it
    /// waited, or why it must stop.
    async fn wait_if_paused(&mut self, s: usize) -> EResult<Result<Duration, StopReason>> {
        if !self.control().paused {
            return Ok(Ok(Duration::ZERO));
        }
        let t0 = Instant::now();
        let limit = self.jf.journal.plan.pause_timeout;
        let label = self.label(s);
        self.jf.journal.state = RolloutState::Paused;
        self.jf.journal.event(format!("paused before {label}"));
        self.jf.save()?;
        self.ui.line(format!(
            "paused by the operator before {label}; `rootletctl rollout resume --journal {}` continues",
            self.jf.path.display()
        ));
        self.ui.phase(s, &label, "paused");
        // Bounded by `limit`.
        let result = loop {
            let c = self.control();
            if c.abort {
                break Err(self.abort_reason(Some(s)));
            }
            if !c.paused {
                break Ok(t0.elapsed());
            }
            if t0.elapsed() >= limit {
                break Err(self.stop(
                    StopKind::PauseTimeout,
                    Some(s),
                    None,
                    format!("paused for longer than pause_timeout {}", Human(limit)),
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        if result.is_ok() {
            self.jf.journal.state = RolloutState::Running;
            self.jf.journal.event("resumed");
            self.jf.save()?;
            self.ui.line("resumed");
        }
        Ok(result)
    }

    /// The plan's pause after step `s`.
    async fn pause_after(&mut self, s: usize, pause: Pause) -> EResult<Option<StopReason>> {
        let label = self.label(s);
        let (limit, promote_only) = match pause {
            Pause::For(d) => (d, false),
            Pause::UntilPromote => (self.jf.journal.plan.pause_timeout, true),
        };
        if promote_only {
            self.jf.journal.state = RolloutState::WaitingForPromote;
            self.jf
                .journal
                .event(format!("{label} healthy; waiting for promote"));
            self.ui.line(format!(
                "{label} is healthy; waiting for `rootletctl rollout promote --journal {}`",
                self.jf.path.display()
            ));
        } else {
            self.ui
                .line(format!("{label} is healthy; pausing {}", Human(limit)));
        }
        self.jf.save()?;
        let seen = self.jf.journal.promotes_seen;
        let t0 = Instant::now();
        // Bounded by `limit`.
        let result = loop {
            let c = self.control();
            if c.abort {
                break Some(self.abort_reason(Some(s)));
            }
            if c.promotes > seen {
                self.jf.journal.promotes_seen = c.promotes;
                self.jf.journal.event(format!("promoted after {label}"));
                self.ui.line("promoted");
                break None;
            }
            if t0.elapsed() >= limit {
                break promote_only.then(|| {
                    self.stop(
                        StopKind::PauseTimeout,
                        Some(s),
                        None,
                        format!(
                            "no promote within pause_timeout {} after {label}",
                            Human(limit)
                        ),
                    )
                });
            }
            tokio::time::sleep(
                POLL_INTERVAL.min(
                    limit
                        .saturating_sub(t0.elapsed())
                        .max(Duration::from_millis(1)),
                ),
            )
            .await;
        };
        if result.is_none() {
            self.jf.journal.state = RolloutState::Running;
            self.jf.save()?;
        }
        Ok(result)
    }

    /// The bundle's rootlets by interface (before the push, ids are not
    /// known).
    fn interface_refs(&self) -> Vec<pb::RootletRef> {
        self.jf
            .journal
            .bundle
            .targets
            .iter()
            .map(|(netns, ifname)| by_interface(netns, ifname))
            .collect()
    }

    fn hosts_of(&self, s: usize, states: &[HostState]) -> Vec<usize> {
        self.jf
            .journal
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.step == s && states.contains(&h.state))
            .map(|(i, _)| i)
            .collect()
    }

    fn over_budget(&self, s: usize) -> Option<StopReason> {
        let j = &self.jf.journal;
        let budget = j.plan.max_unavailable.of(j.hosts.len());
        let down: Vec<String> = j
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Unreachable)
            .map(|h| format!("{} ({})", h.host.name, h.detail))
            .collect();
        if down.len() <= budget {
            return None;
        }
        let mut list = down.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        if down.len() > 5 {
            list.push_str(&format!("; and {} more", down.len() - 5));
        }
        Some(self.stop(
            StopKind::Unavailable,
            Some(s),
            None,
            format!(
                "{} host{} stopped answering, more than max_unavailable allows ({budget}): {list}",
                down.len(),
                if down.len() == 1 { "" } else { "s" }
            ),
        ))
    }

    /// One step: prepare, push, soak and gates.
    async fn run_step(&mut self, s: usize) -> EResult<Option<StopReason>> {
        let label = self.label(s);
        let Some(step) = self.jf.journal.steps.get(s).cloned() else {
            return Ok(None);
        };
        let done = self
            .hosts_of(s, &[HostState::Healthy, HostState::Unreachable])
            .len();
        self.ui.step_started(s, &label, step.count, done);
        self.jf
            .journal
            .event(format!("{label} started ({})", plural(step.count, "host")));
        let t_step = Instant::now();
        let mut deadline = t_step + self.jf.journal.plan.progress_deadline;

        match self.wait_if_paused(s).await? {
            Ok(paused) => deadline += paused,
            Err(stop) => return Ok(Some(stop)),
        }
        if self.control().abort {
            return Ok(Some(self.abort_reason(Some(s))));
        }

        // 1. Prepare: previous version and baseline counters.
        self.ui
            .phase(s, &label, "recording previous versions and baselines");
        self.prepare(s).await?;
        self.jf.save()?;
        if let Some(stop) = self.over_budget(s) {
            return Ok(Some(stop));
        }
        if Instant::now() > deadline {
            return Ok(Some(self.deadline_reason(s)));
        }

        // 2. Push.
        self.ui.phase(s, &label, "pushing");
        if let Some(stop) = self.push(s).await? {
            self.jf.flush()?;
            return Ok(Some(stop));
        }
        self.jf.flush()?;
        if let Some(stop) = self.over_budget(s) {
            return Ok(Some(stop));
        }
        if self.control().abort {
            return Ok(Some(self.abort_reason(Some(s))));
        }

        // 3. Soak and gates.
        if let Some(stop) = self.soak(s, deadline).await? {
            return Ok(Some(stop));
        }

        let healthy = self.hosts_of(s, &[HostState::Healthy]).len();
        let down = self.hosts_of(s, &[HostState::Unreachable]).len();
        let msg = if down == 0 {
            format!(
                "healthy ({}) in {}",
                plural(healthy, "host"),
                Human(t_step.elapsed())
            )
        } else {
            format!(
                "healthy ({healthy} hosts, {down} unreachable) in {}",
                Human(t_step.elapsed())
            )
        };
        self.ui.step_finished(s, &label, msg);
        Ok(None)
    }

    async fn prepare(&mut self, s: usize) -> EResult<()> {
        let t0 = Instant::now();
        let todo = self.hosts_of(s, &[HostState::Pending]);
        let fleet = self.fleet.clone();
        let targets = self.interface_refs();
        let name = self.jf.journal.bundle.name.clone();
        let policy = self
            .jf
            .journal
            .policy
            .clone()
            .filter(|_| self.jf.journal.action == Action::Policy);
        let deadline = fleet.options().host_deadline;
        let concurrency = fleet.options().concurrency.max(1);
        let mut results = stream::iter(todo)
            .map(|i| {
                let fleet = &fleet;
                let targets = &targets;
                let name = &name;
                let policy = &policy;
                async move {
                    let _slot = fleet.permit().await;
                    let work = async {
                        if let Some(p) = policy {
                            let ids = policy::targets(fleet, i, p).await?;
                            let before = policy::before(fleet, i, &p.stage, &ids).await?;
                            let baseline = policy::sample(fleet, i, &ids).await?;
                            return Ok::<_, RpcError>(Prepared {
                                previous: None,
                                baseline,
                                policy: Some((ids, before)),
                            });
                        }
                        let list = fleet
                            .call(i, "ListBundles", None, |mut c, t| async move {
                                c.list_bundles(request(pb::ListBundlesRequest {}, t)).await
                            })
                            .await?;
                        let previous = list
                            .bundles
                            .iter()
                            .find(|b| b.name == *name && b.current)
                            .map(|b| Version {
                                version: b.version.clone(),
                                digest: b.digest.clone(),
                            });
                        let baseline = gates::sample(fleet, i, targets).await?;
                        Ok(Prepared {
                            previous,
                            baseline,
                            policy: None,
                        })
                    };
                    (i, with_deadline(deadline, "prepare", work).await)
                }
            })
            .buffer_unordered(concurrency);
        while let Some((i, r)) = results.next().await {
            let Some(h) = self.jf.journal.hosts.get_mut(i) else {
                continue;
            };
            match r {
                Ok(Prepared {
                    previous,
                    baseline,
                    policy,
                }) => {
                    // A host tried before (skipped, or a push whose outcome
                    // was unknown) keeps what it ran before the rollout
                    // first touched it.
                    if !h.previous_recorded {
                        h.previous = previous;
                        h.previous_recorded = true;
                    }
                    if let Some((ids, before)) = policy {
                        // Rootlets seen before keep what they held then; a
                        // rootlet new since is recorded as it is now.
                        for (id, b) in before {
                            h.policy_before.entry(id).or_insert(b);
                        }
                        h.rootlets = ids;
                    }
                    h.baseline = Some(baseline);
                    h.set(HostState::Prepared, "");
                }
                Err(e) if e.is_unreachable() => {
                    self.ui.line(format!("{}: unreachable: {e}", h.host.name));
                    h.set(HostState::Unreachable, e.to_string());
                    self.ui.host_done(s);
                }
                Err(e) => {
                    // It answered, but refused: it cannot be rolled out to.
                    self.ui.line(format!("{}: {e}", h.host.name));
                    h.set(HostState::Failed, e.to_string());
                }
            }
        }
        drop(results);
        self.jf.journal.control_plane_ms += u64::try_from(t0.elapsed().as_millis()).unwrap_or(0);
        if let Some((name, detail)) = self
            .jf
            .journal
            .hosts
            .iter()
            .find(|h| h.step == s && h.state == HostState::Failed)
            .map(|h| (h.host.name.clone(), h.detail.clone()))
        {
            // Reported by push(), which stops on failed hosts.
            self.jf.journal.event(format!("{name}: {detail}"));
        }
        Ok(())
    }

    async fn push(&mut self, s: usize) -> EResult<Option<StopReason>> {
        let t0 = Instant::now();
        let label = self.label(s);
        if let Some(h) = self
            .jf
            .journal
            .hosts
            .iter()
            .find(|h| h.step == s && h.state == HostState::Failed)
        {
            let msg = format!(
                "{label}: {} refused the preparation calls: {}",
                h.host.name, h.detail
            );
            let name = h.host.name.clone();
            return Ok(Some(self.stop(StopKind::Gate, Some(s), Some(name), msg)));
        }
        let todo = self.hosts_of(s, &[HostState::Prepared]);
        if todo.is_empty() {
            return Ok(None);
        }
        let action = self.jf.journal.action;
        let removing = action == Action::Remove;
        let bundle = self.bundle.clone();
        let reference = self.jf.journal.bundle.reference.clone();
        // What a host without the bundle is sent: a bundle named by
        // reference is never uploaded.
        let payload = match (&reference, &bundle) {
            (Some(r), _) if action == Action::Apply => Some(Payload::Reference(r.as_str())),
            (_, Some(b)) => Some(Payload::Bytes(b)),
            _ => None,
        };
        if payload.is_none() && !removing {
            let msg = format!(
                "{label}: the {} file is not available, so nothing can be pushed",
                if action == Action::Policy {
                    "policy"
                } else {
                    "bundle"
                }
            );
            return Ok(Some(self.stop(StopKind::Gate, Some(s), None, msg)));
        }
        let name = self.jf.journal.bundle.name.clone();
        let fleet = self.fleet.clone();
        let digest = self.jf.journal.bundle.digest.clone();
        let rollout = self.jf.journal.rollout_id.clone();
        let step_name = format!(
            "{s}:{}",
            step_key(self.jf.journal.steps.get(s).map(|st| st.kind))
        );
        let policy = self.jf.journal.policy.clone();
        let jobs: Vec<(usize, Option<Version>, Vec<String>, PolicyBefores)> = todo
            .iter()
            .filter_map(|&i| {
                self.jf.journal.hosts.get(i).map(|h| {
                    (
                        i,
                        h.previous.clone(),
                        h.rootlets.clone(),
                        h.policy_before.clone(),
                    )
                })
            })
            .collect();
        let stopping = AtomicBool::new(false);
        let control = self.control.clone();
        let deadline = fleet.options().host_deadline;
        let concurrency = fleet.options().concurrency.max(1);
        let apply_gate = self.jf.journal.plan.gates.apply;
        let targets = self.interface_refs();
        let mut results = stream::iter(jobs)
            .map(|(i, previous, ids, before)| {
                let targets = &targets;
                let policy = &policy;
                let name = &name;
                let fleet = &fleet;
                let bundle = &bundle;
                let digest = &digest;
                let rollout = &rollout;
                let step_name = &step_name;
                let stopping = &stopping;
                let control = &control;
                async move {
                    let _slot = fleet.permit().await;
                    if stopping.load(Ordering::Relaxed) || control.borrow().abort {
                        return (i, None);
                    }
                    // Whether this push changes the host: a new digest, or a
                    // bundle there is to remove.
                    let was_new = match (action, policy) {
                        (Action::Remove, _) => previous.is_some(),
                        (Action::Policy, Some(p)) => policy::changes(p, &ids, &before),
                        _ => previous.as_ref().is_none_or(|p| p.digest != *digest),
                    };
                    let work = async {
                        match (bundle, payload) {
                            (Some(bundle), _) if action == Action::Policy => {
                                push_policy(
                                    fleet,
                                    i,
                                    bundle,
                                    policy.as_ref(),
                                    rollout,
                                    step_name,
                                    &ids,
                                    &before,
                                )
                                .await
                            }
                            (_, Some(payload)) if !removing => {
                                push_host(
                                    fleet, i, payload, digest, rollout, step_name, was_new, targets,
                                )
                                .await
                            }
                            _ => {
                                remove_host(fleet, i, name, previous.as_ref(), rollout, step_name)
                                    .await
                            }
                        }
                    };
                    let r = match tokio::time::timeout(deadline, work).await {
                        Ok(r) => r,
                        Err(_) => Pushed::Unreachable(
                            RpcError {
                                what: "push",
                                code: tonic::Code::DeadlineExceeded,
                                message: format!(
                                    "not done within host_deadline {}",
                                    Human(deadline)
                                ),
                                attempts: 1,
                            },
                            Changed::Unknown,
                        ),
                    };
                    (i, Some((r, was_new)))
                }
            })
            .buffer_unordered(concurrency);
        let mut failure: Option<(String, String)> = None;
        while let Some((i, r)) = results.next().await {
            let Some(h) = self.jf.journal.hosts.get_mut(i) else {
                continue;
            };
            let Some((r, was_new)) = r else { continue };
            match r {
                Pushed::Ok {
                    uploaded,
                    rootlets,
                    post,
                } => {
                    h.uploaded = uploaded;
                    h.rootlets = rootlets;
                    h.post = Some(post);
                    h.changed = if was_new { Changed::Yes } else { Changed::No };
                    h.set(HostState::Pushed, "");
                }
                Pushed::Nack(e, changed) => {
                    let msg = match action {
                        Action::Remove => format!("the agent did not remove the bundle: {e}"),
                        Action::Apply => format!("the agent did not apply the bundle: {e}"),
                        Action::Policy => format!("the agent did not apply the policy: {e}"),
                    };
                    h.changed = changed;
                    self.ui.line(format!("{}: {msg}", h.host.name));
                    h.set(HostState::Failed, msg.clone());
                    if apply_gate {
                        stopping.store(true, Ordering::Relaxed);
                        failure.get_or_insert((h.host.name.clone(), msg));
                    }
                }
                Pushed::Unreachable(e, changed) => {
                    self.ui.line(format!("{}: unreachable: {e}", h.host.name));
                    h.changed = match (changed, was_new) {
                        (_, false) => Changed::No,
                        (c, true) => c,
                    };
                    h.set(HostState::Unreachable, e.to_string());
                }
            }
            self.ui.host_done(s);
            self.jf.changed()?;
            let budget = self
                .jf
                .journal
                .plan
                .max_unavailable
                .of(self.jf.journal.hosts.len());
            if self.jf.journal.unreachable() > budget {
                stopping.store(true, Ordering::Relaxed);
            }
        }
        drop(results);
        self.jf.journal.control_plane_ms += u64::try_from(t0.elapsed().as_millis()).unwrap_or(0);
        let (pushed, uploads) = self
            .jf
            .journal
            .hosts
            .iter()
            .filter(|h| h.step == s && h.state == HostState::Pushed)
            .fold((0, 0), |(p, u), h| (p + 1, u + usize::from(h.uploaded)));
        if action == Action::Policy {
            self.jf
                .journal
                .event(format!("{label}: pushed to {}", plural(pushed, "host")));
        } else {
            self.jf.journal.event(format!(
                "{label}: pushed to {} ({uploads} uploads, {} already had the digest)",
                plural(pushed, "host"),
                pushed - uploads
            ));
        }
        Ok(failure.map(|(host, msg)| {
            self.stop(
                StopKind::Gate,
                Some(s),
                Some(host.clone()),
                format!("apply gate failed on {host} in {label}: {msg}"),
            )
        }))
    }

    /// Soaks the step's pushed hosts, evaluating gates along the way.
    async fn soak(&mut self, s: usize, deadline: Instant) -> EResult<Option<StopReason>> {
        let label = self.label(s);
        if self.hosts_of(s, &[HostState::Pushed]).is_empty() {
            // Nothing new to watch (a resumed step whose hosts are healthy).
            return Ok(None);
        }
        let plan = self.jf.journal.plan.clone();
        let window = plan.longest_window();
        let total = plan.soak.max(window);
        // At least every second, whatever the windows: a gate over its
        // threshold (with min_packets met) fails at once, not when its
        // window closes.
        let interval = if !window.is_zero() {
            window
        } else {
            plan.soak / 5
        }
        .clamp(MIN_EVALUATION_INTERVAL, MAX_EVALUATION_INTERVAL);
        let t0 = Instant::now();
        let mut next = t0 + interval.min(total);
        if !plan.soak.is_zero() {
            self.ui
                .phase(s, &label, format!("soaking {}", Human(total)));
        }
        // Bounded: at most total / interval + 1 evaluations.
        for _ in 0..=(total.as_millis() / interval.as_millis().max(1)) + 1 {
            let now = Instant::now();
            let until = next.min(t0 + total);
            if until > now
                && let Some(stop) = self
                    .wait(until - now, Some((s, deadline)), "soaking")
                    .await?
            {
                return Ok(Some(stop));
            }
            let last = Instant::now() >= t0 + total;
            if let Some(stop) = self.evaluate(s, last).await? {
                return Ok(Some(stop));
            }
            if Instant::now() > deadline {
                return Ok(Some(self.deadline_reason(s)));
            }
            if last {
                break;
            }
            next += interval;
        }
        for i in self.hosts_of(s, &[HostState::Pushed]) {
            if let Some(h) = self.jf.journal.hosts.get_mut(i) {
                h.set(HostState::Healthy, "");
            }
        }
        self.jf.save()?;
        Ok(None)
    }

    async fn evaluate(&mut self, s: usize, last: bool) -> EResult<Option<StopReason>> {
        let t0 = Instant::now();
        let label = self.label(s);
        let todo = self.hosts_of(s, &[HostState::Pushed]);
        let fleet = self.fleet.clone();
        let plan = self.jf.journal.plan.clone();
        let digest = self.jf.journal.bundle.digest.clone();
        let removing = self.jf.journal.action == Action::Remove;
        let policy = self
            .jf
            .journal
            .policy
            .clone()
            .filter(|_| self.jf.journal.action == Action::Policy);
        let recs: Vec<(usize, super::journal::HostRecord)> = todo
            .iter()
            .filter_map(|&i| self.jf.journal.hosts.get(i).map(|h| (i, h.clone())))
            .collect();
        let deadline = fleet.options().host_deadline;
        let concurrency = fleet.options().concurrency.max(1);
        let mut results = stream::iter(recs)
            .map(|(i, rec)| {
                let fleet = &fleet;
                let plan = &plan;
                let digest = &digest;
                let policy = &policy;
                async move {
                    let _slot = fleet.permit().await;
                    let work = gates::evaluate(
                        fleet,
                        i,
                        &rec,
                        plan,
                        digest,
                        removing,
                        policy.as_ref(),
                        last,
                    );
                    (i, with_deadline(deadline, "gates", work).await)
                }
            })
            .buffer_unordered(concurrency);
        let mut failures: Vec<(usize, String, String)> = Vec::new();
        while let Some((i, r)) = results.next().await {
            let Some(h) = self.jf.journal.hosts.get_mut(i) else {
                continue;
            };
            match r {
                Ok(results) => {
                    let failed: Vec<&GateResult> = results
                        .iter()
                        .filter(|g| g.verdict == Verdict::Fail)
                        .collect();
                    if let Some(first) = failed.first() {
                        let msg = describe(first);
                        failures.push((i, h.host.name.clone(), msg.clone()));
                        h.set(HostState::Failed, msg);
                    }
                    h.gates = results;
                }
                Err(e) if e.is_unreachable() => {
                    self.ui.line(format!("{}: unreachable: {e}", h.host.name));
                    h.set(HostState::Unreachable, e.to_string());
                }
                Err(e) => {
                    let msg = format!("gates could not be read: {e}");
                    failures.push((i, h.host.name.clone(), msg.clone()));
                    h.set(HostState::Failed, msg);
                }
            }
            self.jf.changed()?;
        }
        drop(results);
        self.jf.journal.control_plane_ms += u64::try_from(t0.elapsed().as_millis()).unwrap_or(0);
        failures.sort_by_key(|(i, ..)| *i);
        if let Some((_, host, msg)) = failures.first() {
            let more = if failures.len() > 1 {
                format!(" (and {} more hosts)", failures.len() - 1)
            } else {
                String::new()
            };
            let stop = self.stop(
                StopKind::Gate,
                Some(s),
                Some(host.clone()),
                format!("gate failed on {host} in {label}: {msg}{more}"),
            );
            self.ui.step_finished(s, &label, "FAILED");
            return Ok(Some(stop));
        }
        Ok(self.over_budget(s))
    }
}

/// `1 host`, `2 hosts`.
pub fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// A gate result as one line.
fn describe(g: &GateResult) -> String {
    if g.stage.is_empty() {
        format!("{}: {}", g.gate, g.detail)
    } else {
        g.detail.clone()
    }
}

fn step_key(kind: Option<StepKind>) -> String {
    kind.map_or_else(|| "?".into(), |k| k.to_string())
}

async fn with_deadline<T>(
    deadline: Duration,
    what: &'static str,
    work: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(RpcError {
            what,
            code: tonic::Code::DeadlineExceeded,
            message: format!("not done within host_deadline {}", Human(deadline)),
            attempts: 1,
        }),
    }
}

/// Most times a mutation whose outcome is unknown is sent again under the
/// same idempotency key (the agent replays what it did, or does it once).
const MUTATION_TRIES: usize = 3;
/// Most times the agent is asked what a call with a key did.
const ASK_TRIES: usize = 10;

/// Puts host `i` back as it was before the rollout: its previous version
/// (`ApplyBundle` by digest), or, after a first install, without bundle
/// `name` (`RemoveBundle`, only while it runs `new_digest`, so that a
/// newer apply by someone else is not undone). Returns what it did.
async fn put_back(
    fleet: &Fleet,
    i: usize,
    what: &str,
    rollout: &str,
    name: &str,
    new_digest: &str,
    previous: Option<&Version>,
) -> Result<String, String> {
    match previous {
        Some(prev) => {
            let key = idempotency_key(what, &prev.digest, rollout, "");
            let req = pb::ApplyBundleRequest {
                source: Some(Source::Digest(prev.digest.clone())),
                idempotency_key: key,
                expected_generations: Default::default(),
            };
            mutate(fleet, i, "ApplyBundle", |mut c, t| {
                let req = req.clone();
                async move { c.apply_bundle(request(req, t)).await }
            })
            .await
            .map(|_| format!("back on {}", prev.version))
            .map_err(|e| {
                format!(
                    "could not return to {} ({}): {e}",
                    prev.version,
                    short(&prev.digest)
                )
            })
        }
        None => {
            let key = idempotency_key(&format!("{what}-remove"), new_digest, rollout, "");
            let req = pb::RemoveBundleRequest {
                name: name.to_string(),
                idempotency_key: key,
                expected_digest: new_digest.to_string(),
            };
            mutate(fleet, i, "RemoveBundle", |mut c, t| {
                let req = req.clone();
                async move { c.remove_bundle(request(req, t)).await }
            })
            .await
            .map(|r| {
                if r.noop {
                    format!("did not run bundle `{name}`: nothing to remove")
                } else {
                    format!("bundle `{name}` removed (it had no earlier version)")
                }
            })
            .map_err(|e| format!("could not remove bundle `{name}` (a first install): {e}"))
        }
    }
}

/// An idempotent mutation (it carries its idempotency key): sent again,
/// up to [`MUTATION_TRIES`] times, while its outcome is unknown.
pub(super) async fn mutate<T, F, Fut>(
    fleet: &Fleet,
    i: usize,
    what: &'static str,
    f: F,
) -> Result<T, RpcError>
where
    F: Fn(
        rootlet_proto::v1::rootlet_client::RootletClient<tonic::transport::Channel>,
        Duration,
    ) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = None;
    for _ in 0..MUTATION_TRIES {
        match fleet
            .call(i, what, Some(fleet.options().apply_timeout), &f)
            .await
        {
            Ok(r) => return Ok(r),
            Err(e) if e.outcome_unknown() => {
                last = Some(e);
                tokio::time::sleep(fleet.options().backoff_max).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(RpcError {
        what,
        code: tonic::Code::Unknown,
        message: "no attempt made".into(),
        attempts: 0,
    }))
}

/// `bundle remove` on one host: RemoveBundle of `name` (only while it
/// runs `previous`, what prepare saw), then the counters of what is left.
async fn remove_host(
    fleet: &Fleet,
    i: usize,
    name: &str,
    previous: Option<&Version>,
    rollout: &str,
    step: &str,
) -> Pushed {
    let expected = previous.map(|p| p.digest.clone()).unwrap_or_default();
    let req = pb::RemoveBundleRequest {
        name: name.to_string(),
        idempotency_key: idempotency_key("remove", &expected, rollout, step),
        expected_digest: expected,
    };
    let reply = mutate(fleet, i, "RemoveBundle", |mut c, t| {
        let req = req.clone();
        async move { c.remove_bundle(request(req, t)).await }
    })
    .await;
    let reply = match reply {
        Ok(r) => r,
        Err(e) if e.outcome_unknown() => return Pushed::Unreachable(e, Changed::Unknown),
        Err(e) => return Pushed::Nack(e, Changed::No),
    };
    let rootlets: Vec<String> = reply
        .rootlets
        .iter()
        .map(|r| r.rootlet_id.clone())
        .collect();
    let refs: Vec<pb::RootletRef> = rootlets.iter().map(|id| by_id(id)).collect();
    match gates::sample(fleet, i, &refs).await {
        Ok(post) => Pushed::Ok {
            uploaded: false,
            rootlets,
            post,
        },
        Err(e) => Pushed::Unreachable(
            e,
            if previous.is_some() {
                Changed::Yes
            } else {
                Changed::No
            },
        ),
    }
}

/// What prepare recorded for one host.
struct Prepared {
    /// The bundle's version it ran (bundle rollouts).
    previous: Option<Version>,
    baseline: Sample,
    /// A policy rollout: its targets and what each held.
    policy: Option<(Vec<String>, PolicyBefores)>,
}

/// The per-rootlet policies a host held before a policy rollout.
type PolicyBefores = std::collections::BTreeMap<String, super::journal::PolicyBefore>;

/// A policy rollout's push to one host ([`policy::push`]), then the
/// counters of its targets.
#[allow(clippy::too_many_arguments)]
async fn push_policy(
    fleet: &Fleet,
    i: usize,
    bytes: &Arc<Vec<u8>>,
    p: Option<&super::journal::PolicyRef>,
    rollout: &str,
    step: &str,
    ids: &[String],
    before: &PolicyBefores,
) -> Pushed {
    let Some(p) = p else {
        return Pushed::Nack(
            RpcError {
                what: "ApplyPolicy",
                code: tonic::Code::Internal,
                message: "the journal of this policy rollout names no policy".into(),
                attempts: 0,
            },
            Changed::No,
        );
    };
    let yes_or = |c: bool| if c { Changed::Yes } else { Changed::No };
    match policy::push(fleet, i, bytes, p, rollout, step, ids, before).await {
        policy::PushOutcome::Applied => {}
        policy::PushOutcome::Refused { error, changed } => {
            return Pushed::Nack(error, yes_or(changed));
        }
        policy::PushOutcome::Unknown { error, changed } => {
            return Pushed::Unreachable(
                error,
                if changed {
                    Changed::Unknown
                } else {
                    Changed::No
                },
            );
        }
    }
    match policy::sample(fleet, i, ids).await {
        Ok(post) => Pushed::Ok {
            uploaded: true,
            rootlets: ids.to_vec(),
            post,
        },
        Err(e) => Pushed::Unreachable(e, yes_or(policy::changes(p, ids, before))),
    }
}

/// What the agent says a call with an idempotency key did.
enum Keyed {
    /// It applied: the rootlets it applied to.
    Applied(Vec<String>),
    /// It was refused, and the agent kept its previous version.
    Refused(String),
    /// No call with that key took effect.
    NotApplied,
    /// The agent did not answer.
    NoAnswer(RpcError),
}

/// Asks host `i` (reconnecting, with backoff, up to [`ASK_TRIES`] times)
/// what the call with `key` did to the bundle's rootlets `targets`.
async fn ask_keyed(
    fleet: &Fleet,
    i: usize,
    key: &str,
    targets: &[pb::RootletRef],
    first: RpcError,
) -> Keyed {
    let mut last = first;
    let mut backoff = fleet.options().backoff_base.max(Duration::from_millis(50));
    for _ in 0..ASK_TRIES {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(fleet.options().backoff_max.max(Duration::from_secs(1)));
        let mut applied = Vec::new();
        let mut refused = None;
        let mut failed = None;
        for r in targets {
            let reply = fleet
                .call(i, "GetApplyStatus", None, |mut c, t| {
                    let req = pb::GetApplyStatusRequest {
                        rootlet: Some(r.clone()),
                        idempotency_key: key.to_string(),
                    };
                    async move { c.get_apply_status(request(req, t)).await }
                })
                .await;
            match reply {
                Ok(st) => match st.keyed_attempt {
                    Some(a) if a.outcome == "ack" => applied.push(st.rootlet_id),
                    Some(a) if a.outcome == "nack" => refused = Some(a.error),
                    _ => {}
                },
                // Not loaded: the call did not load it.
                Err(e) if e.code == tonic::Code::NotFound => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) if e.outcome_unknown() => {
                last = e;
                continue;
            }
            Some(e) => return Keyed::NoAnswer(e),
            None => {}
        }
        if let Some(err) = refused {
            return Keyed::Refused(err);
        }
        if !applied.is_empty() {
            return Keyed::Applied(applied);
        }
        return Keyed::NotApplied;
    }
    Keyed::NoAnswer(last)
}

/// What a host that does not hold the bundle is sent.
#[derive(Clone, Copy)]
enum Payload<'a> {
    /// The signed bundle's bytes.
    Bytes(&'a Arc<Vec<u8>>),
    /// Its OCI reference, pinned by digest: the agent pulls it.
    Reference(&'a str),
}

/// HasBundle, ApplyBundle (bytes or reference only if absent), then the
/// counters. An
/// ApplyBundle whose outcome is unknown (the connection dropped, no
/// answer) is followed by asking the agent, once it answers again, what
/// the call did ([`ask_keyed`]); it is sent again only if it did nothing.
#[allow(clippy::too_many_arguments)]
async fn push_host(
    fleet: &Fleet,
    i: usize,
    payload: Payload<'_>,
    digest: &str,
    rollout: &str,
    step: &str,
    was_new: bool,
    targets: &[pb::RootletRef],
) -> Pushed {
    let has = match fleet
        .call(i, "HasBundle", None, |mut c, t| async move {
            c.has_bundle(request(
                pb::HasBundleRequest {
                    digest: digest.to_string(),
                },
                t,
            ))
            .await
        })
        .await
    {
        Ok(r) => r.present,
        Err(e) if e.is_unreachable() => return Pushed::Unreachable(e, Changed::No),
        Err(e) => return Pushed::Nack(e, Changed::No),
    };
    let key = idempotency_key(
        match (has, payload) {
            (true, _) => "apply-digest",
            (false, Payload::Bytes(_)) => "apply-bytes",
            (false, Payload::Reference(_)) => "apply-reference",
        },
        digest,
        rollout,
        step,
    );
    let mut rootlets: Option<Vec<String>> = None;
    let mut last: Option<RpcError> = None;
    // Bounded: MUTATION_TRIES applies, each followed at most by ASK_TRIES asks.
    for _ in 0..MUTATION_TRIES {
        let reply = fleet
            .call(
                i,
                "ApplyBundle",
                Some(fleet.options().apply_timeout),
                |mut c, t| {
                    let source = match (has, payload) {
                        (true, _) => Source::Digest(digest.to_string()),
                        (false, Payload::Bytes(b)) => Source::Bundle(b.as_ref().clone()),
                        (false, Payload::Reference(r)) => Source::Reference(r.to_string()),
                    };
                    let req = pb::ApplyBundleRequest {
                        source: Some(source),
                        idempotency_key: key.clone(),
                        expected_generations: Default::default(),
                    };
                    async move { c.apply_bundle(request(req, t)).await }
                },
            )
            .await;
        match reply {
            Ok(r) => {
                rootlets = Some(r.rootlets.iter().map(|r| r.rootlet_id.clone()).collect());
                break;
            }
            Err(e) if e.outcome_unknown() => {
                match ask_keyed(fleet, i, &key, targets, e.clone()).await {
                    Keyed::Applied(ids) => {
                        rootlets = Some(ids);
                        break;
                    }
                    Keyed::Refused(msg) => {
                        return Pushed::Nack(
                            RpcError {
                                message: format!(
                                    "{msg} (the agent's record of the call after {e})"
                                ),
                                ..e
                            },
                            Changed::No,
                        );
                    }
                    Keyed::NotApplied => last = Some(e),
                    Keyed::NoAnswer(asked) => {
                        return Pushed::Unreachable(
                            RpcError {
                                message: format!(
                                    "{}; outcome unknown: asked what the call did, the agent did not answer ({asked})",
                                    e.message
                                ),
                                ..e
                            },
                            Changed::Unknown,
                        );
                    }
                }
            }
            Err(e) => return Pushed::Nack(e, Changed::No),
        }
    }
    let Some(rootlets) = rootlets else {
        let e = last.unwrap_or(RpcError {
            what: "ApplyBundle",
            code: tonic::Code::Unknown,
            message: "no attempt made".into(),
            attempts: 0,
        });
        // The agent answered every time that the call had not taken effect.
        return Pushed::Unreachable(
            RpcError {
                message: format!(
                    "{}; the agent says none of {MUTATION_TRIES} attempts took effect",
                    e.message
                ),
                ..e
            },
            Changed::No,
        );
    };
    let refs: Vec<pb::RootletRef> = rootlets.iter().map(|id| by_id(id)).collect();
    match gates::sample(fleet, i, &refs).await {
        Ok(post) => Pushed::Ok {
            uploaded: !has,
            rootlets,
            post,
        },
        Err(e) => Pushed::Unreachable(e, if was_new { Changed::Yes } else { Changed::No }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_part() {
        let k = idempotency_key("apply-bytes", "d", "r", "0:canary");
        assert_eq!(k.len(), 64);
        assert_eq!(k, idempotency_key("apply-bytes", "d", "r", "0:canary"));
        for other in [
            idempotency_key("apply-digest", "d", "r", "0:canary"),
            idempotency_key("apply-bytes", "e", "r", "0:canary"),
            idempotency_key("apply-bytes", "d", "s", "0:canary"),
            idempotency_key("apply-bytes", "d", "r", "1:wave 1"),
            // No ambiguity from where one part ends.
            idempotency_key("apply-bytesd", "", "r", "0:canary"),
        ] {
            assert_ne!(k, other);
        }
        assert_eq!(Outcome::RolledBack.exit_code(), 3);
        assert_eq!(Outcome::Failed.exit_code(), 1);
        assert_eq!(Outcome::Incomplete.exit_code(), 4);
        assert_eq!(Outcome::Succeeded.exit_code(), 0);
    }
}
