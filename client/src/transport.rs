//! The one module that owns connections to agents: a tonic [`Channel`] per
//! host (mTLS with the inventory's CA, client certificate and key and
//! server name; plain TCP for `insecure = true`; a Unix socket for
//! `unix:` addresses), made when a call to that host needs it and kept
//! only among the most recently used ([`Fleet`]'s `open`, a few times the
//! concurrency): the client's connections, descriptors and TLS state grow
//! with the hosts in flight, not with the fleet. The TLS files are read
//! once per distinct path.
//!
//! Every call goes through [`Fleet::call`]: a per-call deadline (sent as
//! `grpc-timeout` and enforced here too), retries with exponential backoff
//! and full jitter on `UNAVAILABLE` only (never on a deadline: a mutation
//! that timed out may have happened), and a count of RPCs sent. Callers
//! bound how many hosts are in flight with [`Fleet::permit`].

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rootlet_proto::v1::rootlet_client::RootletClient;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, SemaphorePermit};
use tonic::{
    Code, Request, Response, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    config,
    inventory::{Address, Host, Security},
};

/// The gRPC service name agents report health for.
pub const HEALTH_SERVICE: &str = "rootlet.v1.Rootlet";

/// How the client talks to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportOptions {
    /// Hosts in flight at once.
    pub concurrency: usize,
    /// Deadline of one call (not ApplyBundle).
    #[serde(with = "config::millis")]
    pub rpc_timeout: Duration,
    /// Deadline of one ApplyBundle or Rollback call (the agent loads and
    /// verifies programs).
    #[serde(with = "config::millis")]
    pub apply_timeout: Duration,
    /// Deadline of all the calls for one host in one phase (prepare, push,
    /// evaluate, roll back), retries included.
    #[serde(with = "config::millis")]
    pub host_deadline: Duration,
    /// Retries after an UNAVAILABLE answer (0: try once).
    pub retries: u32,
    /// First backoff; doubled after each retry, up to `backoff_max`.
    #[serde(with = "config::millis")]
    pub backoff_base: Duration,
    #[serde(with = "config::millis")]
    pub backoff_max: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            concurrency: 64,
            rpc_timeout: Duration::from_secs(10),
            apply_timeout: Duration::from_secs(60),
            host_deadline: Duration::from_secs(120),
            retries: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {}: {message}{}", code_name(*code), if *attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() })]
pub struct RpcError {
    pub what: &'static str,
    pub code: Code,
    pub message: String,
    pub attempts: u32,
}

impl RpcError {
    /// The host did not answer (UNAVAILABLE after every retry, a
    /// deadline, or the connection dropped: `UNKNOWN: transport error`,
    /// CANCELLED): it counts against `max_unavailable`. The agent itself
    /// answers with other codes.
    pub fn is_unreachable(&self) -> bool {
        self.outcome_unknown()
    }

    /// The call may or may not have happened: the connection dropped or
    /// no answer came (`UNKNOWN: transport error`, UNAVAILABLE, a
    /// deadline, CANCELLED). A mutation that ends so must be followed by
    /// asking the agent what it did, never counted as refused.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self.code,
            Code::Unknown | Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        )
    }

    fn local(what: &'static str, message: impl Into<String>) -> RpcError {
        RpcError {
            what,
            code: Code::InvalidArgument,
            message: message.into(),
            attempts: 0,
        }
    }
}

/// The spelling of a status code in messages: `UNAVAILABLE`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Connections to a set of hosts, and the limits every call obeys.
pub struct Fleet {
    hosts: Vec<Host>,
    /// The TLS files the hosts name, read once each (an error is reported
    /// by each call to a host that names the file).
    files: HashMap<PathBuf, Result<Vec<u8>, String>>,
    /// The channels of the hosts called most recently.
    open: Mutex<Open>,
    opts: TransportOptions,
    permits: Semaphore,
    rpcs: AtomicU64,
}

/// At most `cap` channels, by host, the least recently used dropped first
/// (a call in flight holds its own clone, so dropping one here closes the
/// connection only once nothing uses it). Written out rather than taken
/// from a crate: a map with a use counter, whose O(cap) eviction happens
/// once per newly connected host and is noise next to a TLS handshake.
struct Open {
    cap: usize,
    tick: u64,
    channels: HashMap<usize, (Channel, u64)>,
}

impl Open {
    fn get_or_insert(
        &mut self,
        host: usize,
        make: impl FnOnce() -> Result<Channel, String>,
    ) -> Result<Channel, String> {
        self.tick += 1;
        if let Some((c, used)) = self.channels.get_mut(&host) {
            *used = self.tick;
            return Ok(c.clone());
        }
        let c = make()?;
        if self.channels.len() >= self.cap
            && let Some(oldest) = self
                .channels
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| *h)
        {
            self.channels.remove(&oldest);
        }
        self.channels.insert(host, (c.clone(), self.tick));
        Ok(c)
    }
}

/// Channels kept per host allowed in flight: a host's step makes several
/// calls in a row, and the gates read hosts a step just changed.
const OPEN_PER_SLOT: usize = 2;

impl Fleet {
    /// Reads each TLS file the hosts name, once per distinct path; no
    /// connection is made until a call needs it. A host whose settings
    /// cannot be used fails each call with that reason.
    pub fn new(hosts: Vec<Host>, opts: TransportOptions) -> Fleet {
        let mut files: HashMap<PathBuf, Result<Vec<u8>, String>> = HashMap::new();
        for h in &hosts {
            if let Security::Tls(tls) = &h.security {
                for path in [&tls.ca, &tls.cert, &tls.key] {
                    read_cached(&mut files, path);
                }
            }
        }
        let slots = opts.concurrency.clamp(1, Semaphore::MAX_PERMITS);
        let permits = Semaphore::new(slots);
        let open = Mutex::new(Open {
            cap: slots.saturating_mul(OPEN_PER_SLOT).max(16),
            tick: 0,
            channels: HashMap::new(),
        });
        Fleet {
            hosts,
            files,
            open,
            opts,
            permits,
            rpcs: AtomicU64::new(0),
        }
    }

    /// Channels open now (at most a few times the concurrency).
    pub fn open_channels(&self) -> usize {
        lock(&self.open).channels.len()
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn options(&self) -> &TransportOptions {
        &self.opts
    }

    /// RPC attempts sent so far.
    pub fn rpcs(&self) -> u64 {
        self.rpcs.load(Ordering::Relaxed)
    }

    /// Waits for a slot among the hosts in flight.
    pub async fn permit(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquire cannot fail; if it
        // did, proceeding without a permit is the safe degradation.
        loop {
            if let Ok(p) = self.permits.acquire().await {
                return p;
            }
            tokio::task::yield_now().await;
        }
    }

    fn channel(&self, host: usize, what: &'static str) -> Result<Channel, RpcError> {
        let Some(h) = self.hosts.get(host) else {
            return Err(RpcError::local(what, format!("no host #{host}")));
        };
        lock(&self.open)
            .get_or_insert(host, || channel(h, &self.opts, &self.files))
            .map_err(|e| RpcError::local(what, e))
    }

    /// Calls `f` on host `host`'s Rootlet client with the RPC deadline (or
    /// `timeout`), retrying on UNAVAILABLE with backoff.
    pub async fn call<T, F, Fut>(
        &self,
        host: usize,
        what: &'static str,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T, RpcError>
    where
        F: Fn(RootletClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let channel = self.channel(host, what)?;
        let timeout = timeout.unwrap_or(self.opts.rpc_timeout);
        self.retrying(what, timeout, || {
            let client = RootletClient::new(channel.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(usize::MAX);
            f(client, timeout)
        })
        .await
    }

    /// grpc.health.v1 Check of [`HEALTH_SERVICE`]: true when SERVING.
    pub async fn health(&self, host: usize) -> Result<bool, RpcError> {
        let channel = self.channel(host, "health check")?;
        let timeout = self.opts.rpc_timeout;
        let status = self
            .retrying("health check", timeout, || {
                let mut client = HealthClient::new(channel.clone());
                async move {
                    client
                        .check(request(
                            HealthCheckRequest {
                                service: HEALTH_SERVICE.into(),
                            },
                            timeout,
                        ))
                        .await
                }
            })
            .await?;
        Ok(status.status == ServingStatus::Serving as i32)
    }

    async fn retrying<T, Fut>(
        &self,
        what: &'static str,
        timeout: Duration,
        mut attempt: impl FnMut() -> Fut,
    ) -> Result<T, RpcError>
    where
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut backoff = self.opts.backoff_base;
        let tries = self.opts.retries.saturating_add(1);
        let mut last = None;
        for n in 1..=tries {
            self.rpcs.fetch_add(1, Ordering::Relaxed);
            let status = match tokio::time::timeout(timeout, attempt()).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!(
                    "no answer within {}",
                    config::Human(timeout)
                )),
            };
            // A server that enforces our grpc-timeout answers CANCELLED
            // "Timeout expired": the same deadline, seen from its side.
            let code = match status.code() {
                Code::Cancelled if status.message().contains("Timeout expired") => {
                    Code::DeadlineExceeded
                }
                c => c,
            };
            last = Some(RpcError {
                what,
                code,
                message: status.message().to_string(),
                attempts: n,
            });
            if code != Code::Unavailable || n == tries {
                break;
            }
            // Full jitter: anywhere in [0, backoff].
            let ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=ms))).await;
            backoff = (backoff * 2).min(self.opts.backoff_max);
        }
        Err(last.unwrap_or_else(|| RpcError::local(what, "no attempt made")))
    }
}

/// A request carrying its deadline as `grpc-timeout`.
pub fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// A (lazy) channel to one host with the same TLS, Unix socket and
/// keep-alive settings as [`Fleet`]'s; for the single-host commands
/// (`rootletctl host`), which make their own calls so that they can read
/// an error's google.rpc details.
pub fn connect(host: &Host, opts: &TransportOptions) -> Result<Channel, String> {
    let mut files = HashMap::new();
    if let Security::Tls(tls) = &host.security {
        for path in [&tls.ca, &tls.cert, &tls.key] {
            read_cached(&mut files, path);
        }
    }
    channel(host, opts, &files)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read_cached(files: &mut HashMap<PathBuf, Result<Vec<u8>, String>>, path: &Path) {
    files.entry(path.to_path_buf()).or_insert_with(|| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    });
}

/// The bytes of a file [`read_cached`] read.
fn file(files: &HashMap<PathBuf, Result<Vec<u8>, String>>, path: &Path) -> Result<Vec<u8>, String> {
    files
        .get(path)
        .cloned()
        .unwrap_or_else(|| Err(format!("{} was not read", path.display())))
}

fn channel(
    host: &Host,
    opts: &TransportOptions,
    files: &HashMap<PathBuf, Result<Vec<u8>, String>>,
) -> Result<Channel, String> {
    let bad = |e: tonic::transport::Error| format!("host {}: {e}", host.name);
    let endpoint = match (&host.address, &host.security) {
        (Address::Unix(path), _) => {
            Endpoint::from_shared(format!("unix:{}", path.display())).map_err(bad)?
        }
        (Address::Tcp(a), Security::Tls(tls)) => {
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(file(files, &tls.ca)?))
                .identity(Identity::from_pem(
                    file(files, &tls.cert)?,
                    file(files, &tls.key)?,
                ));
            if let Some(name) = &tls.server_name {
                cfg = cfg.domain_name(name.clone());
            }
            Endpoint::from_shared(format!("https://{a}"))
                .map_err(bad)?
                .tls_config(cfg)
                .map_err(bad)?
        }
        (Address::Tcp(a), _) => Endpoint::from_shared(format!("http://{a}")).map_err(bad)?,
    };
    Ok(endpoint
        .connect_timeout(opts.rpc_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_host_is_retried_then_reported() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host {
            name: "gone".into(),
            address: Address::Unix(dir.path().join("nothing.sock")),
            labels: Default::default(),
            security: Security::Local,
        };
        let opts = TransportOptions {
            retries: 2,
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            rpc_timeout: Duration::from_secs(2),
            ..TransportOptions::default()
        };
        let fleet = Fleet::new(vec![host], opts);
        let e = fleet
            .call(0, "HasBundle", None, |mut c, t| async move {
                c.has_bundle(request(
                    rootlet_proto::v1::HasBundleRequest { digest: "x".into() },
                    t,
                ))
                .await
            })
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unavailable, "{e}");
        assert_eq!(e.attempts, 3);
        assert!(e.is_unreachable());
        assert_eq!(fleet.rpcs(), 3);
    }

    #[tokio::test]
    async fn channels_are_kept_for_the_hosts_in_flight_not_for_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let hosts: Vec<Host> = (0..200)
            .map(|i| Host {
                name: format!("h{i}"),
                address: Address::Unix(dir.path().join(format!("{i}.sock"))),
                labels: Default::default(),
                security: Security::Local,
            })
            .collect();
        let opts = TransportOptions {
            concurrency: 4,
            retries: 0,
            ..TransportOptions::default()
        };
        let fleet = Fleet::new(hosts, opts);
        assert_eq!(fleet.open_channels(), 0, "nothing is opened up front");
        for i in 0..200 {
            let e = fleet
                .call(i, "HasBundle", None, |mut c, t| async move {
                    c.has_bundle(request(
                        rootlet_proto::v1::HasBundleRequest { digest: "x".into() },
                        t,
                    ))
                    .await
                })
                .await
                .unwrap_err();
            assert!(e.is_unreachable(), "{e}");
            assert!(fleet.open_channels() <= 16, "{}", fleet.open_channels());
        }
        // The most recent host's channel is the one kept and reused.
        let before = fleet.open_channels();
        let _ = fleet.channel(199, "x").unwrap();
        assert_eq!(fleet.open_channels(), before);
    }

    #[test]
    fn unreadable_tls_files_fail_each_call() {
        let host = Host {
            name: "h".into(),
            address: Address::Tcp("127.0.0.1:1".into()),
            labels: Default::default(),
            security: Security::Tls(crate::inventory::TlsSettings {
                ca: "/nonexistent/ca.pem".into(),
                cert: "/nonexistent/c.pem".into(),
                key: "/nonexistent/c.key".into(),
                server_name: None,
            }),
        };
        let fleet = Fleet::new(vec![host], TransportOptions::default());
        let e = fleet.channel(0, "x").unwrap_err();
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
        assert!(!e.is_unreachable());
    }
}
