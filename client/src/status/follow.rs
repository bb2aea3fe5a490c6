//! `rootletctl status --watch`: follows each host's Watch stream and reads
//! a host again only when its stream says something changed there, instead
//! of reading the whole fleet every few seconds.
//!
//! One task per host keeps a Watch stream (every rootlet) open. An event,
//! or the stream being opened (again), makes the consumer read that host
//! again ([`super::read_one`]); events that arrive within [`SETTLE`] of
//! each other are one read per host and one redraw. A stream that breaks
//! shows its host unreachable, with why, until it is opened again, with
//! backoff. The fleet is shown again only when what it shows changed,
//! counters aside.
//!
//! Counters change with every packet and send no event: a watch shows
//! them as of the host's last change (`rootletctl host T stats` reads
//! them live).

use std::{collections::BTreeMap, time::Duration};

use futures::{StreamExt, stream};
use rootlet_proto::v1 as pb;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use super::{HostStatus, read_one};
use crate::transport::{Fleet, code_name};

/// Events closer together than this are one read and one redraw.
pub const SETTLE: Duration = Duration::from_millis(150);
/// The first and the longest wait before a broken stream is opened again.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Signals buffered between the hosts' streams and the consumer; a full
/// buffer makes a stream wait (the agent keeps its own bounded queue).
const QUEUE: usize = 1024;

/// Why the fleet was shown again: one per host whose stream said something.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Update {
    pub host: String,
    /// The Watch event's cause ("changed", "loaded", "snapshot", ...),
    /// "watching" when its stream was opened, or "lost: WHY" when it broke.
    pub cause: String,
}

enum Signal {
    /// Host `0`'s stream said `1` (an event's cause, or "watching").
    Event(usize, String),
    /// Host `0`'s stream could not be opened or broke, for reason `1`.
    Lost(usize, String),
}

/// Shows the fleet with `show` (its hosts sorted by name, and what made it
/// show them) once read, then again each time a host's Watch stream says it
/// changed, until `until`.
pub async fn follow(
    fleet: &Fleet,
    expect: Option<&str>,
    until: Instant,
    mut show: impl FnMut(&[HostStatus], &[Update]),
) -> Vec<HostStatus> {
    let n = fleet.hosts().len();
    let (tx, mut rx) = mpsc::channel::<Signal>(QUEUE);
    let watchers =
        futures::future::join_all((0..n).map(|i| watch_host(fleet, i, until, tx.clone())));
    drop(tx);
    let consumer = async {
        let mut hosts = super::read(fleet, expect).await;
        show(&hosts, &[]);
        let mut shown = shape(&hosts);
        // Fleet host i's row in `hosts` (sorted by name).
        let row = |hosts: &[HostStatus], i: usize| {
            let h = fleet.hosts().get(i)?;
            hosts
                .iter()
                .position(|r| r.name == h.name && r.address == h.address.to_string())
        };
        // Bounded by `until`, and by the watchers ending (then `rx` closes).
        loop {
            let first = match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => s,
                Ok(None) | Err(_) => break,
            };
            let mut batch = vec![first];
            let settled = (Instant::now() + SETTLE).min(until);
            while batch.len() < QUEUE {
                match tokio::time::timeout_at(settled, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            // The last signal of each host decides: read it again, or show
            // it lost.
            let mut last: BTreeMap<usize, Option<String>> = BTreeMap::new();
            let mut updates = Vec::new();
            for s in batch {
                let (i, cause, lost) = match s {
                    Signal::Event(i, cause) => (i, cause, None),
                    Signal::Lost(i, why) => (i, format!("lost: {why}"), Some(why)),
                };
                let name = fleet
                    .hosts()
                    .get(i)
                    .map(|h| h.name.clone())
                    .unwrap_or_default();
                let update = Update { host: name, cause };
                if !updates.contains(&update) {
                    updates.push(update);
                }
                last.insert(i, lost);
            }
            let reread: Vec<usize> = last
                .iter()
                .filter(|(_, l)| l.is_none())
                .map(|(i, _)| *i)
                .collect();
            let read: Vec<(usize, HostStatus)> = stream::iter(reread)
                .map(|i| async move { (i, read_one(fleet, i, expect).await) })
                .buffer_unordered(fleet.options().concurrency.max(1))
                .collect()
                .await;
            for (i, h) in read {
                if let Some(r) = row(&hosts, i) {
                    hosts[r] = h;
                }
            }
            for (i, why) in last {
                let (Some(why), Some(r)) = (why, row(&hosts, i)) else {
                    continue;
                };
                let h = &mut hosts[r];
                h.reachable = false;
                h.error = Some(format!("watch: {why}"));
                h.rootlets.clear();
                h.bundles.clear();
            }
            let now = shape(&hosts);
            if now != shown {
                show(&hosts, &updates);
                shown = now;
            }
        }
        hosts
    };
    let (_, hosts) = tokio::join!(watchers, consumer);
    hosts
}

/// What a redraw is for: the fleet without its counters, which change with
/// every packet (a read for an event that changed nothing else, such as a
/// reopened stream's snapshot, redraws nothing).
fn shape(hosts: &[HostStatus]) -> Option<serde_json::Value> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("counters");
                m.remove("final_verdict_count");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(hosts).ok()?;
    strip(&mut v);
    Some(v)
}

/// Keeps host `i`'s Watch stream open until `until`, sending what it says.
async fn watch_host(fleet: &Fleet, i: usize, until: Instant, tx: mpsc::Sender<Signal>) {
    let mut backoff = RETRY_MIN;
    // Bounded by `until`: every wait below ends there.
    while Instant::now() < until {
        let opened = tokio::time::timeout_at(
            until,
            fleet.call(i, "Watch", None, |mut c, _| async move {
                // No grpc-timeout: it would end the stream.
                c.watch(pb::WatchRequest { rootlet: None }).await
            }),
        )
        .await;
        let why = match opened {
            Err(_) => return,
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(mut events)) => {
                if tx.send(Signal::Event(i, "watching".into())).await.is_err() {
                    return;
                }
                backoff = RETRY_MIN;
                loop {
                    match tokio::time::timeout_at(until, events.message()).await {
                        Err(_) => return,
                        Ok(Ok(Some(e))) => {
                            if tx.send(Signal::Event(i, e.cause)).await.is_err() {
                                return;
                            }
                        }
                        Ok(Ok(None)) => break "the agent ended the stream".to_string(),
                        Ok(Err(s)) => break format!("{}: {}", code_name(s.code()), s.message()),
                    }
                }
            }
        };
        if tx.send(Signal::Lost(i, why)).await.is_err() {
            return;
        }
        tokio::time::sleep_until((Instant::now() + backoff).min(until)).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}
