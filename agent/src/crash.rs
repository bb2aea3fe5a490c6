//! Crash injection for the agent's own steps, between the data plane's
//! commit and the agent's records, of a policy apply, and of an unload
//! (tests only). `ROOTLETD_CRASH_AT` names
//! one step, of the agent or of the data plane (`rootlet_dataplane::crash`);
//! rootletd aborts the process when it gets there. `ROOTLETD_PAUSE_AT`
//! names an agent step where it waits [`PAUSE`] instead, so that a test can
//! make a change in the middle of an apply; with `ROOTLETD_PAUSE_FILE` set
//! too, the pause is a handshake instead, as slow as the test needs (the VM
//! tier runs 20-35x slower): rootletd creates that file when it gets there
//! and goes on when the test removes it (at most [`PAUSE_FILE_LIMIT`]). `ROOTLETD_FAIL_UNDO=N` makes the
//! first N undo attempts fail ([`FailUndo`]).

use rootlet_dataplane::crash as dp;

/// The environment variable a test sets on a rootletd it starts.
pub const ENV: &str = "ROOTLETD_CRASH_AT";
/// The environment variable for a pause.
pub const PAUSE_ENV: &str = "ROOTLETD_PAUSE_AT";
/// How long a pause lasts.
pub const PAUSE: std::time::Duration = std::time::Duration::from_secs(3);
/// The environment variable naming a pause's handshake file.
pub const PAUSE_FILE_ENV: &str = "ROOTLETD_PAUSE_FILE";
/// The longest a handshake pause waits for its file to go.
pub const PAUSE_FILE_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The agent's steps of a bundle apply or removal, of a policy apply, and
/// of an unload, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The pending marker of an apply is written; no rootlet changed yet.
    BundlePending,
    /// One rootlet of an apply (or a removal) is committed by the data
    /// plane; its status is not written yet.
    BundleRootletCommitted,
    /// Every rootlet of an apply is committed; no status is written yet.
    BundleCommitted,
    /// The statuses are written; the history is not.
    BundleStatusWritten,
    /// A policy apply built its new inner maps; nothing is recorded and
    /// nothing packets see has changed.
    PolicyBuilt,
    /// A policy apply recorded what it is about to do; nothing packets see
    /// has changed.
    PolicyPending,
    /// A policy apply swapped one policy map (after each swap).
    PolicySwapped,
    /// A policy apply changed every map; its record is not written.
    PolicyApplied,
    /// A policy apply's record is written; its pending record is not gone.
    PolicyCommitted,
    /// UnloadRootlet: the data plane removed the rootlet; its apply status
    /// is not deleted yet (adoption drops it).
    UnloadRemoved,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::BundlePending,
        Step::BundleRootletCommitted,
        Step::BundleCommitted,
        Step::BundleStatusWritten,
        Step::PolicyBuilt,
        Step::PolicyPending,
        Step::PolicySwapped,
        Step::PolicyApplied,
        Step::PolicyCommitted,
        Step::UnloadRemoved,
    ];

    /// The steps of a policy apply, in order.
    pub const POLICY: [Step; 5] = [
        Step::PolicyBuilt,
        Step::PolicyPending,
        Step::PolicySwapped,
        Step::PolicyApplied,
        Step::PolicyCommitted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::BundlePending => "bundle-pending",
            Step::BundleRootletCommitted => "bundle-rootlet-committed",
            Step::BundleCommitted => "bundle-committed",
            Step::BundleStatusWritten => "bundle-status-written",
            Step::PolicyBuilt => "policy-built",
            Step::PolicyPending => "policy-pending",
            Step::PolicySwapped => "policy-swapped",
            Step::PolicyApplied => "policy-applied",
            Step::PolicyCommitted => "policy-committed",
            Step::UnloadRemoved => "unload-removed",
        }
    }
}

/// Where to crash: a step of the agent, or of the data plane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrashAt {
    pub agent: Option<Step>,
    pub dataplane: Option<dp::Step>,
    pub pause: Option<Step>,
}

impl CrashAt {
    /// From `ROOTLETD_CRASH_AT`; unset or unknown: nowhere (an unknown
    /// name is logged).
    pub fn from_env() -> CrashAt {
        let step = |var: &str| {
            let name = std::env::var(var).ok()?;
            let agent = Step::ALL.into_iter().find(|s| s.name() == name);
            let dataplane = dp::Step::from_name(&name);
            if agent.is_none() && dataplane.is_none() {
                tracing::warn!(%name, "{var}: no such step; nothing injected");
            } else {
                tracing::warn!(%name, "{var}: injection armed");
            }
            Some((agent, dataplane))
        };
        let (agent, dataplane) = step(ENV).unwrap_or_default();
        CrashAt {
            agent,
            dataplane,
            pause: step(PAUSE_ENV).and_then(|(a, _)| a),
        }
    }

    /// Aborts the process if `step` is the chosen one.
    pub fn point(&self, step: Step) {
        if self.pause == Some(step) {
            tracing::warn!(step = step.name(), "injected pause");
            match std::env::var_os(PAUSE_FILE_ENV) {
                Some(file) => handshake(std::path::Path::new(&file)),
                None => std::thread::sleep(PAUSE),
            }
        }
        if self.agent == Some(step) {
            tracing::warn!(step = step.name(), "injected crash");
            std::process::abort();
        }
    }
}

/// A handshake pause: creates `file`, then waits until it is gone (or
/// [`PAUSE_FILE_LIMIT`] has passed, or it cannot be created).
fn handshake(file: &std::path::Path) {
    if let Err(e) = std::fs::write(file, b"paused\n") {
        tracing::warn!(file = %file.display(), error = %e, "cannot create the pause file; no pause");
        return;
    }
    let end = std::time::Instant::now() + PAUSE_FILE_LIMIT;
    while file.exists() && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The environment variable that makes undos fail (tests only).
pub const FAIL_UNDO_ENV: &str = "ROOTLETD_FAIL_UNDO";

/// Test-only fault injection: `ROOTLETD_FAIL_UNDO=N` makes the first N
/// undo attempts of this process (the undo of a failed apply and each of
/// its retries) fail before they touch the kernel, as a failing syscall
/// would. No kernel-side way makes an undo fail deterministically; this
/// lets a test see the outcome `undo_failed`, its retry and its recovery.
#[derive(Debug, Default)]
pub struct FailUndo {
    left: std::sync::atomic::AtomicU64,
}

impl FailUndo {
    /// From `ROOTLETD_FAIL_UNDO`; unset or not a number: no failure.
    pub fn from_env() -> FailUndo {
        let n = std::env::var(FAIL_UNDO_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if n > 0 {
            tracing::warn!(attempts = n, "{FAIL_UNDO_ENV}: undo failures armed");
        }
        FailUndo {
            left: std::sync::atomic::AtomicU64::new(n),
        }
    }

    /// Whether this undo attempt is to fail (and one fewer is left).
    pub fn fires(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}
