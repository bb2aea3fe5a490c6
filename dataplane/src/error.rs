//! The data plane's error type. Each variant keeps what an operator needs:
//! the syscall and errno, the verifier log, the check that failed, the stage.

use std::{io, path::PathBuf};

use super::{object::CheckError, spec::PlanError, spec::RootletKey, sys::SysError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface `{ifname}` not found in network namespace {netns}")]
    InterfaceNotFound { ifname: String, netns: String },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a rootlet is already loaded on {0}")]
    RootletExists(RootletKey),
    #[error("no rootlet on {0}")]
    NoRootlet(RootletKey),
    #[error("{0}")]
    Plan(#[from] PlanError),
    #[error("stage `{stage}`: {source}")]
    Check {
        stage: String,
        #[source]
        source: CheckError,
    },
    /// Displays one line of the log (the verifier's reason), never all of
    /// it: a log runs to megabytes, and this text travels in statuses and
    /// attempts.
    #[error(
        "stage `{stage}`: the verifier rejected program `{program}`: {errno}: {} ({} bytes of verifier log)",
        verifier_reason(log),
        log.len()
    )]
    Verifier {
        stage: String,
        program: String,
        errno: io::Error,
        log: String,
    },
    #[error(
        "stage `{stage}`: cannot be placed at position {position} of {total} in tail-call mode: {reason}"
    )]
    Placement {
        stage: String,
        position: usize,
        total: usize,
        reason: &'static str,
    },
    #[error("loading {what}: {message}")]
    Load { what: String, message: String },
    #[error("kernel: {0}")]
    Sys(#[from] SysError),
    #[error("{what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the {backend} backend is not available on this kernel: probe `{probe}` failed: {reason}"
    )]
    BackendUnavailable {
        backend: super::spec::Backend,
        probe: &'static str,
        reason: String,
    },
    /// Rootlet's own programs for `backend` fail this kernel's verifier:
    /// a bug in Rootlet, not a kernel limitation.
    #[error(
        "bug in Rootlet: its {backend} program `{program}` fails the verifier of kernel {kernel} ({message}: {}); please report it with this message and its verifier log ({} bytes, in the error's details)",
        verifier_reason(log),
        log.len()
    )]
    ProgramsRejected {
        backend: super::spec::Backend,
        kernel: String,
        program: String,
        message: String,
        log: String,
    },
    #[error(
        "rootlet {key} has drifted: {reason}; it will not be changed until it is unloaded and loaded again"
    )]
    Drifted { key: RootletKey, reason: String },
    #[error("no instant rollback on {key}: {reason}")]
    NoRollback {
        key: RootletKey,
        reason: &'static str,
    },
    #[error("version mismatch on {key}: expected {expected}, current is {current}")]
    VersionMismatch {
        key: RootletKey,
        expected: u64,
        current: u64,
    },
    #[error("store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("store {path} is held by another process (another agent still running?)")]
    StoreLocked { path: PathBuf },
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

/// Which entry of a map operation failed: the index in the caller's list,
/// or, for an entry the caller did not list (a plain map's key to delete,
/// a key to restore), the key itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Index(usize),
    Key(Vec<u8>),
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Index(i) => write!(f, "entry {i}"),
            Entry::Key(k) => write!(f, "key {}", hex::encode(k)),
        }
    }
}

/// A failed operation on a stage's map ([`crate::policy`]): every variant
/// names the map (the kernel's name), and the entry where there is one.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("stage `{stage}` has no map `{map}`")]
    NoMap { stage: String, map: String },
    #[error(
        "map `{map}` is not a policy map (an array of maps with one entry, <rootlet/stage.h> ROOTLET_POLICY_MAP); write it with apply_plain"
    )]
    NotPolicyMap { map: String },
    #[error("map `{map}` is a policy map; replace its contents with build_inner and swap")]
    IsPolicyMap { map: String },
    #[error("map `{map}` (type {map_type}) holds no data that can be written: {why}")]
    Unsupported {
        map: String,
        map_type: u32,
        why: &'static str,
    },
    #[error(
        "policy map `{map}` has no live inner map (entry 0 is empty), so the parameters of a new one are unknown"
    )]
    NoLiveInner { map: String },
    #[error(
        "stage `{stage}` changed since map `{map}` (id {id}) was listed: its program no longer uses that map; list its maps again"
    )]
    Stale { stage: String, map: String, id: u32 },
    #[error("map `{map}`, {entry}: the {part} is {got} bytes, the map's {part} is {want} bytes")]
    Size {
        map: String,
        entry: Entry,
        part: &'static str,
        got: usize,
        want: usize,
    },
    #[error("map `{map}`, {entry}: the same key as entry {first}")]
    Duplicate {
        map: String,
        entry: Entry,
        first: usize,
    },
    #[error("map `{map}`: {entries} entries, the map holds at most {max}")]
    TooMany {
        map: String,
        entries: usize,
        max: u32,
    },
    #[error("map `{map}`: creating the new inner map: {source}")]
    Create {
        map: String,
        #[source]
        source: SysError,
    },
    #[error("map `{map}`, {entry}: {source}")]
    Write {
        map: String,
        entry: Entry,
        #[source]
        source: SysError,
    },
    #[error("map `{map}`: {source}")]
    Read {
        map: String,
        #[source]
        source: SysError,
    },
    /// Undoing a plain map's entry-by-entry apply failed: the map holds a
    /// mix of the two contents until an undo succeeds. `cause` is why it
    /// was undone (the apply's error, or a caller's undo).
    #[error(
        "map `{map}`: {cause}; undoing it failed at {entry} ({source}), so {left} entries are not restored"
    )]
    UndoFailed {
        map: String,
        cause: String,
        entry: Entry,
        left: usize,
        #[source]
        source: SysError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The verifier's reason in `log`: its last line that is not a statistic
/// (the kernel ends a log with "processed N insns …"), at most 200
/// characters.
pub fn verifier_reason(log: &str) -> &str {
    let line = log
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .unwrap_or("no verifier log");
    match line.char_indices().nth(200) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}
