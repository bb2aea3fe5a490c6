//! The one module that owns connections to agents: a tonic [`Channel`] per
//! host (mTLS with the inventory's CA, client certificate and key and
//! server name; plain TCP for `insecure = true`; a Unix socket for
//! `unix:` addresses), opened lazily on first use and kept for the run.
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
    sync::atomic::{AtomicU64, Ordering},
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
    /// `None` where the host's settings are unusable (reported per call).
    channels: Vec<Result<Channel, String>>,
    opts: TransportOptions,
    permits: Semaphore,
    rpcs: AtomicU64,
}

impl Fleet {
    /// Prepares a (lazy) channel per host. TLS files are read here, once
    /// per distinct path; a host whose settings cannot be used fails each
    /// call with that reason.
    pub fn new(hosts: Vec<Host>, opts: TransportOptions) -> Fleet {
        let mut files: HashMap<PathBuf, Result<Vec<u8>, String>> = HashMap::new();
        let channels = hosts
            .iter()
            .map(|h| channel(h, &opts, &mut files))
            .collect();
        let permits = Semaphore::new(opts.concurrency.clamp(1, Semaphore::MAX_PERMITS));
        Fleet {
            hosts,
            channels,
            opts,
            permits,
            rpcs: AtomicU64::new(0),
        }
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
        match self.channels.get(host) {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(e)) => Err(RpcError::local(what, e.clone())),
            None => Err(RpcError::local(what, format!("no host #{host}"))),
        }
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
    channel(host, opts, &mut HashMap::new())
}

fn read_cached(
    files: &mut HashMap<PathBuf, Result<Vec<u8>, String>>,
    path: &Path,
) -> Result<Vec<u8>, String> {
    files
        .entry(path.to_path_buf())
        .or_insert_with(|| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        })
        .clone()
}

fn channel(
    host: &Host,
    opts: &TransportOptions,
    files: &mut HashMap<PathBuf, Result<Vec<u8>, String>>,
) -> Result<Channel, String> {
    let bad = |e: tonic::transport::Error| format!("host {}: {e}", host.name);
    let endpoint = match (&host.address, &host.security) {
        (Address::Unix(path), _) => {
            Endpoint::from_shared(format!("unix:{}", path.display())).map_err(bad)?
        }
        (Address::Tcp(a), Security::Tls(tls)) => {
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read_cached(files, &tls.ca)?))
                .identity(Identity::from_pem(
                    read_cached(files, &tls.cert)?,
                    read_cached(files, &tls.key)?,
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
