//! Operator requests to a running rollout: `<journal>.control`, a small
//! JSON file that `rollout pause|resume|promote|abort` rewrite atomically
//! and the running rollout polls every [`POLL_INTERVAL`]. Requests are
//! levels (paused, abort) and a counter (promotes), so a request is never
//! lost between two polls and polling it twice does no harm.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::journal::{JournalError, now_ms, sibling, write_atomic};

/// How often a running rollout reads the control file.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Do not start another step (or push) until resumed.
    pub paused: bool,
    /// Stop and roll back.
    pub abort: bool,
    /// Promote requests so far; one more than the rollout has seen ends a
    /// pause early (and clears `paused`).
    pub promotes: u64,
    pub updated_unix_ms: i64,
    /// Who asked, for the record (`$USER`).
    #[serde(default)]
    pub by: String,
}

/// An operator request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Promote,
    Abort,
}

/// The control file of `journal`.
pub fn path(journal: &Path) -> PathBuf {
    sibling(journal, ".control")
}

/// Reads the control file (absent or unreadable: no requests).
pub fn read(journal: &Path) -> Control {
    std::fs::read(path(journal))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records a request. Returns the new control state.
pub fn request(journal: &Path, req: Request) -> Result<Control, JournalError> {
    let mut c = read(journal);
    match req {
        Request::Pause => c.paused = true,
        Request::Resume => c.paused = false,
        Request::Promote => {
            c.paused = false;
            c.promotes = c.promotes.saturating_add(1);
        }
        Request::Abort => c.abort = true,
    }
    c.updated_unix_ms = now_ms();
    c.by = std::env::var("USER").unwrap_or_default();
    let bytes = serde_json::to_vec_pretty(&c).unwrap_or_default();
    write_atomic(&path(journal), &bytes)?;
    Ok(c)
}

/// Clears every request (a new rollout on this journal path).
pub fn reset(journal: &Path) -> Result<(), JournalError> {
    match std::fs::remove_file(path(journal)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::Io {
            path: path(journal),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Polls the control file into a watch channel until the sender's last
/// receiver is gone.
pub fn watch(journal: &Path) -> watch::Receiver<Control> {
    let journal = journal.to_path_buf();
    let (tx, rx) = watch::channel(read(&journal));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let c = read(&journal);
            tx.send_if_modified(|old| {
                if *old == c {
                    false
                } else {
                    *old = c;
                    true
                }
            });
        }
    });
    rx
}
