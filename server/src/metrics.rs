//! Prometheus metrics of `rootletd`, and the tiny HTTP/1 server that exposes
//! them on `GET /metrics` (OpenMetrics text).
//!
//! | series | kind | labels |
//! | --- | --- | --- |
//! | `rootlet_rpc_requests_total` | counter | `method`, `code` |
//! | `rootlet_rpc_duration_seconds` | histogram | `method` |
//! | `rootlet_bundle_applies_total` | counter | `outcome` (`ack`, `nack`, `undo_failed`, `noop`, `removed`) |
//! | `rootlet_applied_version` | gauge, always 1 | `rootlet`, `bundle`, `version` |
//! | `rootlet_slot_packets_total` | counter, read at scrape time | `rootlet`, `slot`, `stage`, `action` |
//! | `rootlet_build_info` | info | `version` |
//! | `rootlet_apply_changes_total` | counter | |
//! | `rootlet_apply_seconds_total` | counter | |
//! | `rootlet_apply_step_seconds_total` | counter | `step` |
//! | `rootlet_undo_outstanding` | gauge, read at scrape time | |
//! | `rootlet_undo_retries_total` | counter, read at scrape time | |
//! | `rootlet_undo_failures_total` | counter, read at scrape time | |
//! | `rootlet_heap_in_use_bytes` | gauge, read at scrape time | |
//! | `rootlet_heap_free_bytes` | gauge, read at scrape time | |
//!
//! The `rootlet_heap_*` gauges are glibc's own accounting (`mallinfo2`):
//! the bytes the process has allocated and not freed, and the freed bytes
//! the heap still holds (absent on other C libraries). A leak grows the
//! first; RSS also moves with the second (fragmentation, between trims).
//!
//! `rootlet_undo_outstanding` is how many rootlets have an undo of a failed
//! apply outstanding (their apply status says `undo_failed`; health is
//! degraded meanwhile); the counters are the undo attempts this process
//! retried, and the undo attempts (first undos and retries) that failed.
//!
//! The `rootlet_apply_*` series are the data plane's change budget
//! (`rootlet_dataplane::budget`), read at scrape time: the changes timed
//! (every mutating RPC, from its arrival until its reply is built, and
//! changes the agent makes by itself), their wall time, and each step's.
//! Each step's time excludes the steps timed inside it, so the steps and
//! `other` (the time no step covers) add up to the total.

use std::{
    collections::HashMap,
    convert::Infallible,
    fmt, io,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        info::Info,
    },
    registry::{Registry, Unit},
};
use rootlet_dataplane::budget;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};

pub use rootlet_agent::SlotSample;
pub use rootlet_agent::UndoCounts;

/// What reads the outstanding undos on each scrape.
pub type UndoSource = Box<dyn Fn() -> UndoCounts + Send + Sync>;

/// What reads the slot counters on each scrape.
pub type SlotSource = Box<dyn Fn() -> Vec<SlotSample> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppliedLabels {
    rootlet: String,
    bundle: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    rootlet: String,
    slot: u32,
    stage: String,
    action: &'static str,
}

fn rpc_histogram() -> Histogram {
    // Up to a minute: an RPC that loads programs waits for the verifier.
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// The metrics registry of one daemon.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    applies: Family<OutcomeLabels, Counter>,
    pulls: Family<OutcomeLabels, Counter>,
    pulled_bytes: Counter,
    applied: Family<AppliedLabels, Gauge>,
    /// (rootlet, bundle) → the version whose series `applied` holds.
    applied_current: Mutex<HashMap<(String, String), String>>,
    slots: Arc<SlotCollector>,
    undos: Arc<UndoCollector>,
}

/// Encodes the `rootlet_undo_*` series from the undo source on each scrape.
#[derive(Default)]
struct UndoCollector {
    source: RwLock<Option<UndoSource>>,
}

impl fmt::Debug for UndoCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UndoCollector").finish_non_exhaustive()
    }
}

impl Collector for UndoCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counts = match &*self.source.read().unwrap_or_else(|p| p.into_inner()) {
            Some(source) => source(),
            None => UndoCounts::default(),
        };
        let outstanding = encoder.encode_descriptor(
            "rootlet_undo_outstanding",
            "Rootlets whose undo of a failed bundle apply has not put them back yet (retried in the background)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(counts.outstanding).unwrap_or(i64::MAX))
            .encode(outstanding)?;
        let retries = encoder.encode_descriptor(
            "rootlet_undo_retries",
            "Retries of outstanding undos",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(counts.retries).encode(retries)?;
        let failures = encoder.encode_descriptor(
            "rootlet_undo_failures",
            "Undo attempts (first undos and retries) that failed",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(counts.failures).encode(failures)?;
        Ok(())
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Encodes `rootlet_slot_packets_total` from the slot source on each scrape.
#[derive(Default)]
struct SlotCollector {
    source: RwLock<Option<SlotSource>>,
}

impl fmt::Debug for SlotCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotCollector").finish_non_exhaustive()
    }
}

impl Collector for SlotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let samples = match &*self.source.read().unwrap_or_else(|p| p.into_inner()) {
            Some(source) => source(),
            None => vec![],
        };
        let mut family = encoder.encode_descriptor(
            "rootlet_slot_packets",
            "Packets each stage slot of a rootlet returned, by XDP action.",
            None,
            MetricType::Counter,
        )?;
        for s in samples {
            let labels = SlotLabels {
                rootlet: s.rootlet,
                slot: s.slot,
                stage: s.stage,
                action: s.action,
            };
            ConstCounter::new(s.packets).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
}

/// Encodes the change budget's totals on each scrape.
/// Encodes the `rootlet_heap_*` gauges from glibc on each scrape.
#[derive(Debug)]
struct HeapCollector;

impl Collector for HeapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(heap) = crate::memory::heap() else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "rootlet_heap_in_use",
                "Heap bytes allocated and not freed (glibc mallinfo2: uordblks + hblkhd)",
                heap.in_use,
            ),
            (
                "rootlet_heap_free",
                "Freed heap bytes the allocator still holds (glibc mallinfo2: fordblks)",
                heap.free,
            ),
        ] {
            let metric =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct BudgetCollector;

impl Collector for BudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let totals = budget::totals();
        let changes = encoder.encode_descriptor(
            "rootlet_apply_changes",
            "Changes timed: mutating RPCs, and changes the agent makes by itself",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(totals.changes).encode(changes)?;
        let total = encoder.encode_descriptor(
            "rootlet_apply",
            "Wall time of the changes timed, from the RPC's arrival to its reply",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(totals.total.as_secs_f64()).encode(total)?;
        let mut steps = encoder.encode_descriptor(
            "rootlet_apply_step",
            "Wall time of the changes timed, by step (exclusive; other is what no step covers)",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        let other = totals.other();
        for (step, d) in totals
            .steps
            .iter()
            .map(|(s, d)| (s.name(), *d))
            .chain([("other", other)])
        {
            ConstCounter::new(d.as_secs_f64())
                .encode(steps.encode_family(&StepLabels { step })?)?;
        }
        Ok(())
    }
}

/// The canonical name of a gRPC status code (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rootlet_rpc_requests",
            "gRPC requests handled, by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                rpc_histogram,
            );
        registry.register_with_unit(
            "rootlet_rpc_duration",
            "gRPC request handling time, by method",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let applies = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rootlet_bundle_applies",
            "Bundle applies on a rootlet: ack (applied), nack (refused or failed; the previous version stays), noop (already applied)",
            applies.clone(),
        );
        let pulls = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rootlet_bundle_pulls",
            "Bundles pulled from an OCI registry for ApplyBundle by reference: ok, or the REGISTRY_* reason of the failure",
            pulls.clone(),
        );
        let pulled_bytes = Counter::default();
        registry.register_with_unit(
            "rootlet_bundle_pulled",
            "Signed bundle bytes pulled from OCI registries",
            Unit::Bytes,
            pulled_bytes.clone(),
        );
        let applied = Family::<AppliedLabels, Gauge>::default();
        registry.register(
            "rootlet_applied_version",
            "The bundle version applied on each rootlet (value always 1)",
            applied.clone(),
        );
        registry.register(
            "rootlet_build",
            "The rootletd build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let slots = Arc::new(SlotCollector::default());
        registry.register_collector(Box::new(slots.clone()));
        registry.register_collector(Box::new(BudgetCollector));
        registry.register_collector(Box::new(HeapCollector));
        let undos = Arc::new(UndoCollector::default());
        registry.register_collector(Box::new(undos.clone()));
        Arc::new(Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            applies,
            pulls,
            pulled_bytes,
            applied,
            applied_current: Mutex::new(HashMap::new()),
            slots,
            undos,
        })
    }

    /// Counts one finished RPC. `method` is the RPC's name (`ApplyBundle`);
    /// keep the set of values small.
    pub fn observe_rpc(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code_name(code),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one bundle apply: `ack`, `nack`, `undo_failed` (refused, and
    /// its undo left rootlets running part of it), `noop` or `removed`.
    pub fn observe_apply(&self, outcome: &str) {
        self.applies
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one pull from a registry: `ok` with the bytes pulled, or the
    /// reason it failed (`REGISTRY_NOT_FOUND`, …).
    pub fn observe_pull(&self, outcome: &str, bytes: usize) {
        self.pulls
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.pulled_bytes.inc_by(bytes as u64);
    }

    /// Records that `rootlet` now runs `version` of `bundle`, replacing the
    /// series of the version it ran before.
    pub fn set_applied_version(&self, rootlet: &str, bundle: &str, version: &str) {
        let mut current = self
            .applied_current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (rootlet.to_owned(), bundle.to_owned());
        if let Some(old) = current.insert(key, version.to_owned())
            && old != version
        {
            self.applied.remove(&AppliedLabels {
                rootlet: rootlet.to_owned(),
                bundle: bundle.to_owned(),
                version: old,
            });
        }
        self.applied
            .get_or_create(&AppliedLabels {
                rootlet: rootlet.to_owned(),
                bundle: bundle.to_owned(),
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Forgets what `rootlet` runs of `bundle` (RemoveBundle removed it), and
    /// only that: other bundles on the rootlet keep their series.
    pub fn clear_applied_version(&self, rootlet: &str, bundle: &str) {
        let mut current = self
            .applied_current
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = current.remove(&(rootlet.to_owned(), bundle.to_owned())) {
            self.applied.remove(&AppliedLabels {
                rootlet: rootlet.to_owned(),
                bundle: bundle.to_owned(),
                version: old,
            });
        }
    }

    /// Sets what reads the per-slot packet counters on each scrape
    /// (replacing any earlier source). It runs on a blocking thread.
    pub fn set_slot_source(&self, f: SlotSource) {
        *self.slots.source.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Removes the slot source (the agent is going away).
    pub fn clear_slot_source(&self) {
        *self.slots.source.write().unwrap_or_else(|p| p.into_inner()) = None;
        *self.undos.source.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sets what reads the outstanding undos on each scrape.
    pub fn set_undo_source(&self, f: UndoSource) {
        *self.undos.source.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Every series, in the OpenMetrics text format. Calls the slot source,
    /// which may make syscalls: call from a blocking context.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a failing fmt::Write can fail, and String's does not.
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Concurrent scrape connections; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// The longest a scrape connection may stay open.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A bound metrics listener; [`MetricsListener::serve`] answers on it.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Binds `addr` (port 0: a free port; see [`MetricsListener::local_addr`]).
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> io::Result<MetricsListener> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    Ok(MetricsListener { listener, addr })
}

/// Binds `addr` and serves until `shutdown` resolves.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    bind(addr).await?.serve(metrics, shutdown).await
}

impl MetricsListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `GET /metrics` (404 elsewhere, 405 for other methods) until
    /// `shutdown` resolves; scrapes still running then are dropped. One
    /// request per connection, at most [`MAX_CONNECTIONS`] at a time.
    ///
    /// # Errors
    /// None so far: accept errors (such as running out of descriptors) are
    /// logged and retried after a pause.
    pub async fn serve(
        self,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _peer)) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        tracing::debug!("metrics: too many scrapes at once; closing a connection");
                        continue;
                    };
                    let metrics = metrics.clone();
                    connections.spawn(async move {
                        let _permit = permit;
                        let _ = stream.set_nodelay(true);
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(5))
                            .keep_alive(false)
                            .serve_connection(
                                TokioIo::new(stream),
                                service_fn(move |req| answer(req, metrics.clone())),
                            );
                        match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(error = %e, "metrics: connection failed"),
                            Err(_) => tracing::debug!("metrics: connection timed out"),
                        }
                    });
                }
            }
        }
        connections.abort_all();
        Ok(())
    }
}

async fn answer(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        ));
    }
    if req.method() != Method::GET {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return Ok(r);
    }
    // The slot source makes syscalls: keep them off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(text) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            Ok(r)
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding panicked");
            Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode metrics\n",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn lines(text: &str, prefix: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn series_are_encoded() {
        let m = Metrics::new();
        m.observe_rpc("ApplyBundle", tonic::Code::Ok, Duration::from_millis(12));
        m.observe_rpc("ApplyBundle", tonic::Code::Ok, Duration::from_millis(30));
        m.observe_rpc(
            "ApplyBundle",
            tonic::Code::PermissionDenied,
            Duration::from_millis(1),
        );
        m.observe_apply("ack");
        m.observe_apply("ack");
        m.observe_apply("nack");
        let text = m.encode();
        assert!(
            text.contains("# TYPE rootlet_rpc_requests counter"),
            "{text}"
        );
        assert!(
            text.contains(r#"rootlet_rpc_requests_total{method="ApplyBundle",code="OK"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"rootlet_rpc_requests_total{method="ApplyBundle",code="PERMISSION_DENIED"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rootlet_rpc_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"rootlet_rpc_duration_seconds_count{method="ApplyBundle"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"rootlet_rpc_duration_seconds_bucket{le="+Inf",method="ApplyBundle"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"rootlet_bundle_applies_total{outcome="ack"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"rootlet_bundle_applies_total{outcome="nack"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"rootlet_build_info{version=""#), "{text}");
        assert!(
            text.contains("# TYPE rootlet_slot_packets counter"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains(".."),
            "help texts end with one period: {text}"
        );
    }

    #[test]
    fn applied_version_replaces_the_previous_series() {
        let m = Metrics::new();
        m.set_applied_version("netns:1/if:2", "edge", "v1");
        m.set_applied_version("netns:1/if:3", "edge", "v1");
        m.set_applied_version("netns:1/if:2", "edge", "v2");
        m.set_applied_version("netns:1/if:2", "edge", "v2");
        let got = lines(&m.encode(), "rootlet_applied_version{");
        assert_eq!(
            {
                let mut g = got.clone();
                g.sort();
                g
            },
            [
                r#"rootlet_applied_version{rootlet="netns:1/if:2",bundle="edge",version="v2"} 1"#,
                r#"rootlet_applied_version{rootlet="netns:1/if:3",bundle="edge",version="v1"} 1"#,
            ]
        );
        m.clear_applied_version("netns:1/if:3", "edge");
        assert_eq!(lines(&m.encode(), "rootlet_applied_version{").len(), 1);
    }

    #[test]
    fn slot_counters_are_read_at_scrape_time() {
        let m = Metrics::new();
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = reads.clone();
        m.set_slot_source(Box::new(move || {
            let n = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            vec![
                SlotSample {
                    rootlet: "netns:1/if:2".into(),
                    slot: 0,
                    stage: "ddos".into(),
                    action: "drop",
                    packets: 10 * n,
                },
                SlotSample {
                    rootlet: "netns:1/if:2".into(),
                    slot: 1,
                    stage: "l\"b".into(),
                    action: "pass",
                    packets: 7,
                },
            ]
        }));
        let first = m.encode();
        assert!(
            first.contains(r#"rootlet_slot_packets_total{rootlet="netns:1/if:2",slot="0",stage="ddos",action="drop"} 10"#),
            "{first}"
        );
        assert!(
            first.contains(r#"rootlet_slot_packets_total{rootlet="netns:1/if:2",slot="1",stage="l\"b",action="pass"} 7"#),
            "{first}"
        );
        let second = m.encode();
        assert!(second.contains(r#"action="drop"} 20"#), "{second}");
        m.clear_slot_source();
        assert!(lines(&m.encode(), "rootlet_slot_packets_total").is_empty());
    }

    #[test]
    fn every_code_has_a_canonical_name() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }

    async fn http_get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn serves_get_metrics_and_stops() {
        let m = Metrics::new();
        m.observe_apply("noop");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(listener.serve(m, async {
            let _ = stopped.await;
        }));

        let ok = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(
            ok.contains(r#"rootlet_bundle_applies_total{outcome="noop"} 1"#),
            "{ok}"
        );

        let missing = http_get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let post = http_get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }
}
