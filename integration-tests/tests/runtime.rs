//! rootletd's runtime, in-process on `127.0.0.1:0` with a throwaway PKI:
//! mutual TLS (a trusted client, no client certificate, an untrusted one),
//! health and reflection on TCP and the Unix socket, metrics, and a graceful
//! shutdown that ends open streams and removes the socket. Runs as root
//! (the agent adopts pinned state under its own bpffs root).

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use rootlet_integration_tests::{
    fixture,
    pki::{ClientIdentity, Pki},
};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use rootlet_server::{
    config::{Config, IdentityConfig, Role},
    runtime::{self, RuntimeError},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{
    Code,
    codegen::{Service, http::Uri},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

const ADMIN: &str = "test-admin";
const LIMIT: Duration = Duration::from_secs(20);

/// A config for one daemon: its own bpffs root, state directory and socket.
struct Setup {
    pki: Pki,
    config: Config,
    dir: tempfile::TempDir,
    bpffs_root: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        fixture::ensure_bpffs();
        let pki = Pki::new();
        let dir = tempfile::tempdir().expect("temporary directory");
        let bpffs_root = PathBuf::from("/sys/fs/bpf/rootlet-test").join(format!(
            "runtime-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut config = Config::default();
        config.listen.tcp = Some("127.0.0.1:0".parse().expect("address"));
        config.listen.unix = Some(dir.path().join("run/rootletd.sock"));
        config.tls = Some(pki.tls_config());
        config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
        config.dataplane.bpffs_root = bpffs_root.clone();
        config.dataplane.state_dir = dir.path().join("state");
        config.dataplane.backend = fixture::backend();
        config.bundles.allow_unsigned = true;
        config.authz.identity = vec![IdentityConfig {
            name: ADMIN.into(),
            role: Role::Admin,
            stages: vec![],
        }];
        Setup {
            pki,
            config,
            dir,
            bpffs_root,
        }
    }

    async fn start(&self) -> runtime::Running {
        let mut running = runtime::start(self.config.clone())
            .await
            .expect("rootletd starts");
        assert!(
            tokio::time::timeout(LIMIT, running.ready())
                .await
                .expect("adoption in time"),
            "the agent did not open"
        );
        running
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
    }
}

async fn tls_channel(
    pki: &Pki,
    addr: std::net::SocketAddr,
    client: Option<&ClientIdentity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
    }
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Connects tonic to a Unix socket.
#[derive(Clone)]
struct UnixConnector(PathBuf);

impl Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
    }
}

async fn unix_channel(path: &Path) -> Channel {
    Endpoint::from_static("http://rootletd.local")
        .timeout(Duration::from_secs(10))
        .connect_with_connector(UnixConnector(path.to_owned()))
        .await
        .expect("connect to the Unix socket")
}

async fn health(channel: Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check");
    ServingStatus::try_from(response.into_inner().status).expect("a known status")
}

async fn reflected_services(channel: Channel) -> Vec<String> {
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = v1::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("a reflection response")
        .expect("one response");
    match response.message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

async fn reflected_services_v1alpha(channel: Channel) -> Vec<String> {
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = v1alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    match responses
        .message()
        .await
        .expect("a response")
        .and_then(|r| r.message_response)
    {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: rootletd\r\n\r\n")
        .await
        .expect("send a scrape");
    let mut out = String::new();
    tokio::time::timeout(LIMIT, s.read_to_string(&mut out))
        .await
        .expect("scrape in time")
        .expect("read the scrape");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_reflection_and_metrics_over_mtls_and_the_unix_socket() {
    let setup = Setup::new();
    let running = setup.start().await;
    let tcp = running.tcp_addr.expect("a TCP address");
    assert_ne!(tcp.port(), 0, "port 0 was resolved");
    let admin = setup.pki.client(ADMIN);
    let channel = tls_channel(&setup.pki, tcp, Some(&admin))
        .await
        .expect("mTLS connect");

    assert_eq!(
        health(channel.clone(), "rootlet.v1.Rootlet").await,
        ServingStatus::Serving
    );
    assert_eq!(health(channel.clone(), "").await, ServingStatus::Serving);
    assert_eq!(
        reflected_services(channel.clone()).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "rootlet.v1.Rootlet",
        ]
    );
    assert!(
        reflected_services_v1alpha(channel.clone())
            .await
            .contains(&"rootlet.v1.Rootlet".to_owned())
    );

    // The trusted client reaches the API.
    RootletClient::new(channel.clone())
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("GetCapabilities as admin");

    // The Unix socket: mode 0600, same services, local callers are admins.
    let socket = running.unix_path.clone().expect("a Unix socket");
    let meta = std::fs::symlink_metadata(&socket).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let local = unix_channel(&socket).await;
    assert_eq!(
        health(local.clone(), "rootlet.v1.Rootlet").await,
        ServingStatus::Serving
    );
    assert!(
        reflected_services(local.clone())
            .await
            .contains(&"rootlet.v1.Rootlet".to_owned())
    );
    RootletClient::new(local)
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("GetCapabilities over the Unix socket");

    let metrics = scrape(running.metrics_addr.expect("a metrics address")).await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    assert!(metrics.contains("rootlet_build_info{version="), "{metrics}");

    let started = Instant::now();
    running.shutdown().await.expect("clean shutdown");
    assert!(
        started.elapsed() < runtime::GRACE,
        "nothing to wait for: {:?}",
        started.elapsed()
    );
    assert!(!socket.exists(), "the Unix socket is removed");
    assert!(
        tokio::net::TcpStream::connect(tcp).await.is_err(),
        "the TCP listener is closed"
    );
    assert!(setup.dir.path().join("state/dataplane.redb").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_trusted_certificate() {
    let setup = Setup::new();
    let running = setup.start().await;
    let tcp = running.tcp_addr.expect("a TCP address");

    // No client certificate: TLS succeeds, health answers, the API refuses.
    let anonymous = tls_channel(&setup.pki, tcp, None)
        .await
        .expect("TLS without a client certificate");
    assert_eq!(
        health(anonymous.clone(), "rootlet.v1.Rootlet").await,
        ServingStatus::Serving
    );
    let refused = RootletClient::new(anonymous)
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect_err("anonymous callers are refused");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A certificate from another CA: the handshake fails (TLS 1.3 reports
    // it on the first request rather than on connect).
    let rogue = setup.pki.rogue_client(ADMIN);
    match tls_channel(&setup.pki, tcp, Some(&rogue)).await {
        Err(_) => {}
        Ok(channel) => {
            let e = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect_err("an untrusted client certificate is refused");
            // The server closes the connection: no gRPC status from it.
            assert!(
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ),
                "{e:?}"
            );
        }
    }

    // A trusted certificate whose name the config does not know.
    let stranger = setup.pki.client("stranger");
    let channel = tls_channel(&setup.pki, tcp, Some(&stranger))
        .await
        .expect("mTLS connect");
    let denied = RootletClient::new(channel)
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect_err("unknown identities may do nothing");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    running.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_at_once() {
    let setup = Setup::new();
    let running = setup.start().await;
    let local = unix_channel(running.unix_path.as_deref().expect("a Unix socket")).await;
    let mut health_watch = HealthClient::new(local.clone())
        .watch(HealthCheckRequest {
            service: "rootlet.v1.Rootlet".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = health_watch
        .message()
        .await
        .expect("a status")
        .expect("one status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let started = Instant::now();
    let stopping = tokio::spawn(running.shutdown());
    // The watcher hears NOT_SERVING, then its stream ends with UNAVAILABLE.
    let mut ended = None;
    for _ in 0..4 {
        match tokio::time::timeout(LIMIT, health_watch.message())
            .await
            .expect("in time")
        {
            Ok(Some(status)) => assert_eq!(status.status, ServingStatus::NotServing as i32),
            Ok(None) => break,
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let ended = ended.expect("the stream ends with a status");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    tokio::time::timeout(LIMIT, stopping)
        .await
        .expect("shutdown in time")
        .expect("no panic")
        .expect("clean shutdown");
    assert!(
        started.elapsed() < runtime::GRACE,
        "an open stream held shutdown for {:?}",
        started.elapsed()
    );
}

/// `[health] listen`: plain TCP (no TLS, no client certificate: what
/// kubelet's gRPC probes can reach), serving grpc.health.v1 with the API's
/// statuses and nothing else: the API and reflection are UNIMPLEMENTED
/// there; a probe watching it hears NOT_SERVING when the daemon shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_listener_serves_probes_in_plain_tcp_and_nothing_else() {
    let mut setup = Setup::new();
    setup.config.health.listen = Some("127.0.0.1:0".parse().expect("address"));
    let running = setup.start().await;
    let addr = running.health_addr.expect("a health address");
    assert_ne!(addr.port(), 0, "port 0 was resolved");
    assert_ne!(Some(addr), running.tcp_addr);
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("plain connect");
    assert_eq!(health(plain.clone(), "").await, ServingStatus::Serving);
    assert_eq!(
        health(plain.clone(), "rootlet.v1.Rootlet").await,
        ServingStatus::Serving
    );
    let api = RootletClient::new(plain.clone())
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect_err("the API is not served on the health listener");
    assert_eq!(api.code(), Code::Unimplemented, "{api:?}");
    let reflection = v1::server_reflection_client::ServerReflectionClient::new(plain.clone())
        .server_reflection_info(tokio_stream::iter([v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        }]))
        .await
        .expect_err("reflection is not served on the health listener");
    assert_eq!(reflection.code(), Code::Unimplemented, "{reflection:?}");
    // The mTLS listener is unchanged: a plain client gets no answer there.
    let tcp = running.tcp_addr.expect("a TCP address");
    let on_tls = match Endpoint::from_shared(format!("http://{tcp}"))
        .expect("endpoint")
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Ok(c) => HealthClient::new(c)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok(),
        Err(_) => false,
    };
    assert!(
        !on_tls,
        "the API's listener answered a plaintext health check"
    );

    // A probe watching the health listener hears the shutdown.
    let mut watch = HealthClient::new(plain)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = watch
        .message()
        .await
        .expect("a status")
        .expect("one status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(running.shutdown());
    let next = tokio::time::timeout(LIMIT, watch.message())
        .await
        .expect("in time");
    match next {
        Ok(Some(s)) => assert_eq!(s.status, ServingStatus::NotServing as i32),
        other => panic!("the probe did not hear NOT_SERVING: {other:?}"),
    }
    tokio::time::timeout(LIMIT, stopping)
        .await
        .expect("shutdown in time")
        .expect("no panic")
        .expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the health listener is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_socket_and_stale_sockets_are_replaced() {
    let setup = Setup::new();
    let socket = setup.config.listen.unix.clone().expect("a socket path");
    std::fs::create_dir_all(socket.parent().expect("a directory")).expect("socket directory");
    // A socket file nobody listens on, as a killed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("a stale socket"));
    assert!(socket.exists());
    let running = setup.start().await;

    let mut second = setup.config.clone();
    second.listen.tcp = None;
    second.metrics.listen = None;
    match runtime::start(second).await {
        Err(RuntimeError::SocketInUse { path }) => assert_eq!(path, socket),
        other => panic!("expected SocketInUse, got {other:?}"),
    }
    assert!(socket.exists(), "the running daemon's socket is left alone");
    running.shutdown().await.expect("clean shutdown");
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_before_listening() {
    let setup = Setup::new();
    let mut config = setup.config.clone();
    config.tls = None;
    match runtime::start(config).await {
        Err(RuntimeError::Config(e)) => assert!(e.to_string().contains("tls"), "{e}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(
        !setup
            .config
            .listen
            .unix
            .as_deref()
            .expect("a socket")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_process_adopts_again_after_open_watches() {
    let setup = Setup::new();
    let running = setup.start().await;
    let local = unix_channel(running.unix_path.as_deref().expect("a Unix socket")).await;
    let mut watch = RootletClient::new(local)
        .watch(pb::WatchRequest { rootlet: None })
        .await
        .expect("Watch")
        .into_inner();
    running.shutdown().await.expect("clean shutdown");
    let ended = tokio::time::timeout(LIMIT, async {
        // Bounded: the stream ends at shutdown.
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await
    .expect("the Watch stream ends at shutdown");
    assert!(
        ended.as_ref().is_none_or(|s| s.code() == Code::Unavailable),
        "{ended:?}"
    );

    // The first daemon let go of the agent (and its stores): a second one
    // opens them at once.
    let started = Instant::now();
    let running = setup.start().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "adoption waited {:?}",
        started.elapsed()
    );
    running.shutdown().await.expect("clean shutdown");
}
