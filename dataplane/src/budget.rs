//! Where the time of a change goes: each step of an apply adds its wall
//! time to the change that is running on this thread, and the totals are
//! kept per step for the process (`rootletd` exports them as
//! `rootlet_apply_step_seconds_total{step}`; `rootlet-bench` prints them
//! per change).
//!
//! A change is timed from [`begin`] to the drop of its guard; [`time`]
//! outside a change costs one thread-local read and records nothing. A
//! nested [`begin`] (the agent times a bundle apply, the data plane each
//! rootlet's apply) joins the outer change.
//!
//! Step times are exclusive: a step timed inside another (the verifier's
//! loads inside the backend's build) counts for itself and not for the
//! outer one, so the steps and [`other`] add up to the change's total.
//!
//! A policy apply (the agent's `policy.rs`) is a change too, with the same
//! steps in its own terms: [`Step::Parse`] decodes and verifies the signed
//! document, [`Step::Check`] types every entry against the BTF,
//! [`Step::Plan`] reads the previous document for the difference,
//! [`Step::Build`] fills the new inner maps, [`Step::Swap`] swaps them in.

use std::{
    cell::RefCell,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// A step of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// Comparing the rootlet with the kernel before the change (drift).
    Drift,
    /// Checks on the new objects (`object::inspect`: ELF, BTF, signature).
    Check,
    /// Computing the next pipeline, and reading the live counts it stamps.
    Plan,
    /// Matching a `keep` stage's maps with the running stage's.
    MapReuse,
    /// aya parsing and relocating an object, and creating its maps.
    Parse,
    /// BPF_PROG_LOAD: the verifier (and the JIT).
    Verify,
    /// Waiting for the grace period of the parity to be rebuilt.
    Grace,
    /// The backend's build of the next generation beside the live one,
    /// apart from its [`Step::Parse`], [`Step::Verify`] and
    /// [`Step::Grace`] (map and pin syscalls, program arrays).
    Build,
    /// The one kernel operation that makes the new generation live.
    Swap,
    /// Durable writes to the data plane's store (pending, committed).
    Store,
    /// Durable writes to the agent's store (apply status, history, bundles).
    AgentStore,
    /// Dropping the old generation's pins and descriptors.
    Release,
    /// Reading the new state back for the RPC's reply (the API layer).
    Respond,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Drift,
        Step::Check,
        Step::Plan,
        Step::MapReuse,
        Step::Parse,
        Step::Verify,
        Step::Grace,
        Step::Build,
        Step::Swap,
        Step::Store,
        Step::AgentStore,
        Step::Release,
        Step::Respond,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Step::Drift => "drift",
            Step::Check => "check",
            Step::Plan => "plan",
            Step::MapReuse => "map_reuse",
            Step::Parse => "parse",
            Step::Verify => "verify",
            Step::Grace => "grace",
            Step::Build => "build",
            Step::Swap => "swap",
            Step::Store => "store",
            Step::AgentStore => "agent_store",
            Step::Release => "release",
            Step::Respond => "respond",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const STEPS: usize = Step::ALL.len();

/// The time of each step of one change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    pub steps: [Duration; STEPS],
    pub total: Duration,
}

impl Record {
    pub fn get(&self, step: Step) -> Duration {
        self.steps[step.index()]
    }
}

/// What none of the steps covers: `total` minus the sum of the steps
/// (zero if they sum to more).
pub fn other(total: Duration, steps: impl IntoIterator<Item = (Step, Duration)>) -> Duration {
    total.saturating_sub(steps.into_iter().map(|(_, d)| d).sum())
}

/// The change being timed on a thread: when it began, its steps, and the
/// sum of its steps so far (what a [`Span`] subtracts of inner steps).
struct Current {
    start: Instant,
    record: Record,
    timed: Duration,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

static TOTAL_NS: [AtomicU64; STEPS] = [const { AtomicU64::new(0) }; STEPS];
static CHANGES: AtomicU64 = AtomicU64::new(0);
static CHANGE_NS: AtomicU64 = AtomicU64::new(0);

/// Ends the timing of a change when dropped (if it began one).
#[must_use]
pub struct Guard(bool);

/// Starts timing a change on this thread, unless one is being timed.
pub fn begin() -> Guard {
    begin_at(Instant::now())
}

/// [`begin`], for a change that started at `start` (the API layer's RPC,
/// received before it reached this thread).
pub fn begin_at(start: Instant) -> Guard {
    CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_some() {
            Guard(false)
        } else {
            *c = Some(Current {
                start,
                record: Record::default(),
                timed: Duration::ZERO,
            });
            Guard(true)
        }
    })
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let Some(Current {
            start, mut record, ..
        }) = CURRENT.with(|c| c.borrow_mut().take())
        else {
            return;
        };
        record.total = start.elapsed();
        for step in Step::ALL {
            TOTAL_NS[step.index()].fetch_add(nanos(record.get(step)), Ordering::Relaxed);
        }
        CHANGE_NS.fetch_add(nanos(record.total), Ordering::Relaxed);
        CHANGES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `f`, adding its wall time, less the steps timed inside it, to
/// `step` of the change being timed.
pub fn time<T>(step: Step, f: impl FnOnce() -> T) -> T {
    let span = span();
    let out = f();
    span.end(step);
    out
}

/// A part of a change being timed, from [`span`] to [`Span::end`].
#[must_use]
pub struct Span {
    start: Instant,
    timed: Duration,
}

/// Starts timing a step whose code is not one closure.
pub fn span() -> Span {
    Span {
        start: Instant::now(),
        timed: timed(),
    }
}

impl Span {
    /// Adds the time since [`span`], less the steps timed meanwhile, to
    /// `step` of the change being timed.
    pub fn end(self, step: Step) {
        let inner = timed().saturating_sub(self.timed);
        add(step, self.start.elapsed().saturating_sub(inner));
    }
}

fn timed() -> Duration {
    CURRENT.with(|c| c.borrow().as_ref().map_or(Duration::ZERO, |c| c.timed))
}

/// Adds `d` to `step` of the change being timed, if any.
pub fn add(step: Step, d: Duration) {
    CURRENT.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.record.steps[step.index()] += d;
            c.timed += d;
        }
    });
}

/// Totals for the process: changes timed, their total wall time, and each
/// step's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub changes: u64,
    pub total: Duration,
    pub steps: Vec<(Step, Duration)>,
}

impl Totals {
    /// The time of the changes that none of the steps covers.
    pub fn other(&self) -> Duration {
        other(self.total, self.steps.iter().copied())
    }
}

pub fn totals() -> Totals {
    Totals {
        changes: CHANGES.load(Ordering::Relaxed),
        total: Duration::from_nanos(CHANGE_NS.load(Ordering::Relaxed)),
        steps: Step::ALL
            .into_iter()
            .map(|s| {
                (
                    s,
                    Duration::from_nanos(TOTAL_NS[s.index()].load(Ordering::Relaxed)),
                )
            })
            .collect(),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_sums_its_steps_and_nested_begins_join_it() {
        let before = totals();
        {
            let _outer = begin();
            time(Step::Check, || std::thread::sleep(Duration::from_millis(2)));
            {
                let _inner = begin();
                time(Step::Swap, || std::thread::sleep(Duration::from_millis(1)));
            }
            // Still the outer change: the inner guard did not end it.
            time(Step::Swap, || std::thread::sleep(Duration::from_millis(1)));
        }
        // Outside a change nothing is recorded.
        time(Step::Verify, || {
            std::thread::sleep(Duration::from_millis(1))
        });
        let after = totals();
        let delta = |s: Step| {
            let get = |t: &Totals| t.steps.iter().find(|(x, _)| *x == s).map(|(_, d)| *d);
            get(&after).unwrap_or_default() - get(&before).unwrap_or_default()
        };
        assert!(after.changes > before.changes);
        assert!(delta(Step::Check) >= Duration::from_millis(2));
        assert!(delta(Step::Swap) >= Duration::from_millis(2));
        assert!(after.total - before.total >= Duration::from_millis(4));
    }

    #[test]
    fn an_inner_step_counts_for_itself_not_for_the_step_around_it() {
        let before = totals();
        {
            let _change = begin();
            let outer = span();
            time(Step::Build, || {
                std::thread::sleep(Duration::from_millis(2));
                time(Step::Verify, || {
                    std::thread::sleep(Duration::from_millis(20))
                });
            });
            outer.end(Step::Plan);
        }
        let after = totals();
        let delta = |s: Step| {
            let get = |t: &Totals| t.steps.iter().find(|(x, _)| *x == s).map(|(_, d)| *d);
            get(&after).unwrap_or_default() - get(&before).unwrap_or_default()
        };
        assert!(delta(Step::Verify) >= Duration::from_millis(20));
        // Other tests' changes may add to the totals meanwhile, but never
        // 20 ms of build or plan: neither holds the verify inside it.
        assert!(delta(Step::Build) >= Duration::from_millis(2));
        assert!(delta(Step::Build) < Duration::from_millis(20));
        assert!(delta(Step::Plan) < Duration::from_millis(20));
    }

    #[test]
    fn other_is_what_the_steps_leave() {
        let steps = [
            (Step::Build, Duration::from_millis(10)),
            (Step::Store, Duration::from_millis(3)),
        ];
        assert_eq!(
            other(Duration::from_millis(20), steps),
            Duration::from_millis(7)
        );
        assert_eq!(other(Duration::from_millis(5), steps), Duration::ZERO);
    }

    #[test]
    fn a_change_begun_earlier_counts_from_then() {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(3));
        let before = totals();
        drop(begin_at(start));
        let after = totals();
        // Other tests on other threads may end changes meanwhile: at least.
        assert!(after.total - before.total >= Duration::from_millis(3));
    }
}
