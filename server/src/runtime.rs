//! Runs `rootletd`: listens (TCP with mutual TLS, a Unix socket, metrics,
//! and `[health]`: gRPC health alone on plain TCP for probes), adopts the
//! pinned state through the agent, serves the API, and on
//! shutdown drains and lets go, never unloading anything: the pinned data
//! path keeps running without the daemon.
//!
//! In order, [`start`]:
//! 1. validates the config;
//! 2. creates the health service with `rootlet.v1.Rootlet` (and the server as
//!    a whole, `""`) NOT_SERVING;
//! 3. binds every listener and starts serving health and reflection there,
//!    so a prober can watch adoption; the Rootlet service answers
//!    UNAVAILABLE meanwhile;
//!
//! and then, in the background, the supervisor:
//! 4. opens the agent ([`Agent::open`], on a blocking thread: it adopts what
//!    is pinned), puts the Rootlet service in place, starts the agent's
//!    background work, points the slot metrics at it, and sets health
//!    SERVING;
//!    (and `rootlet.v1.Rootlet.Undo` SERVING unless an undo of a failed
//!    apply is outstanding: NOT_SERVING is then "degraded", see
//!    [`UNDO_HEALTH`]);
//! 5. on shutdown (or a server failing): sets health NOT_SERVING, stops
//!    accepting, lets in-flight calls finish for [`GRACE`] while open
//!    streams end at once with UNAVAILABLE, cuts what still runs, stops the
//!    background work, drops the agent and removes the Unix socket.
//!
//! Nothing global is installed here (no tracing subscriber, no signal
//! handler): `main.rs` does that, and tests run [`start`] in-process on
//! `127.0.0.1:0`.

mod authority;
mod gate;

use std::{
    fs, io,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rootlet_proto::v1::rootlet_server::SERVICE_NAME;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{
    Server,
    server::{Router, TcpIncoming},
};
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

use crate::{
    config::{Config, ConfigError, TlsConfig},
    metrics::{self, Metrics},
};
use gate::{Gate, Phase, Slot};
use rootlet_agent::{Agent, AgentError};

/// How long in-flight calls may run after shutdown begins.
pub const GRACE: Duration = Duration::from_secs(10);
/// How long, after the grace period, cut calls have to wind down.
const FORCE: Duration = Duration::from_secs(5);
/// How long the agent's background work has to stop.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {what} {addr}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: another process is serving on this socket (is rootletd already running?)", path.display())]
    SocketInUse { path: PathBuf },
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot read {what} {}", path.display())]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup")]
    Tls(#[source] tonic::transport::Error),
    #[error("building the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("cannot open the agent (adopting the pinned state)")]
    Agent(#[source] AgentError),
    #[error("the {server} server failed")]
    Serve {
        server: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the {0} server stopped on its own")]
    ServerStopped(&'static str),
    #[error("{0} panicked")]
    Panicked(&'static str),
}

/// `e` and its sources, joined by ": ", for a one-line report.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    // Bounded: error chains are short, but a cyclic one must not hang us.
    for _ in 0..16 {
        let Some(s) = source else { break };
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Where the daemon is, as [`Running::ready`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifecycle {
    Adopting,
    Serving,
    Stopped,
}

/// A started daemon. Dropping it shuts the daemon down in the background;
/// prefer [`Running::shutdown`], which waits for that.
#[derive(Debug)]
pub struct Running {
    /// The TCP address actually bound (port 0 resolved).
    pub tcp_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    /// The `[health]` listener's address (port 0 resolved).
    pub health_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    lifecycle: watch::Receiver<Lifecycle>,
    task: JoinHandle<Result<(), RuntimeError>>,
}

impl Running {
    /// Waits until the agent has adopted the pinned state and the API is
    /// served (true), or the daemon stopped before that (false: see
    /// [`Running::wait`] for why).
    pub async fn ready(&mut self) -> bool {
        match self.lifecycle.wait_for(|l| *l != Lifecycle::Adopting).await {
            Ok(l) => *l == Lifecycle::Serving,
            Err(_) => false,
        }
    }

    /// Shuts down (see the module docs) and waits until that is done.
    pub fn shutdown(mut self) -> impl Future<Output = Result<(), RuntimeError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait()
    }

    /// Waits until the daemon stops: after [`Running::shutdown`], or on its
    /// own when a server or the agent fails.
    pub async fn wait(mut self) -> Result<(), RuntimeError> {
        let task = &mut self.task;
        join(task.await, "the supervisor")
    }

    /// Serves until `shutdown` resolves, then shuts down; or returns the
    /// error that stopped the daemon first.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        tokio::select! {
            () = shutdown => self.shutdown().await,
            ended = &mut self.task => join(ended, "the supervisor"),
        }
    }
}

fn join<T>(
    r: Result<Result<T, RuntimeError>, tokio::task::JoinError>,
    what: &'static str,
) -> Result<T, RuntimeError> {
    r.map_err(|_| RuntimeError::Panicked(what))?
}

/// Starts the daemon and serves until `shutdown` resolves.
///
/// # Errors
/// See [`start`]; and whatever stops the daemon early: the agent cannot
/// open (adoption failed), a server fails.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RuntimeError> {
    start(config).await?.run_until(shutdown).await
}

/// Validates `config`, binds every listener and starts serving (see the
/// module docs); adoption continues in the background ([`Running::ready`]).
///
/// # Errors
/// The config is invalid; a listener cannot be bound; the Unix socket is in
/// use by a running process; the TLS files do not make a server identity.
pub async fn start(config: Config) -> Result<Running, RuntimeError> {
    config.validate()?;
    for w in config.warnings() {
        tracing::warn!(field = %w.field, "config: {}", w.message);
    }
    let metrics = Metrics::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let rootlet: Slot<crate::api::Served> = gate::slot(None);
    let (stop_servers_tx, stop_servers_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_servers_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut servers = JoinSet::new();

    let mut tcp_addr = None;
    if let Some(addr) = config.listen.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Listen {
                what: "tcp",
                addr: addr.to_string(),
                source,
            })?;
        let bound = local_addr(&listener, "tcp", addr)?;
        let mut builder = server_builder();
        match (&config.tls, config.listen.insecure_tcp) {
            (Some(tls), false) => {
                builder = builder
                    .tls_config(load_tls(tls)?)
                    .map_err(RuntimeError::Tls)?;
                tracing::info!(addr = %bound, "serving the API on TCP with mutual TLS");
            }
            _ => tracing::warn!(
                addr = %bound,
                "serving the API on TCP WITHOUT TLS (listen.insecure_tcp): every caller is admin and traffic is readable"
            ),
        }
        let router = routes(builder, health_service.clone(), &phase_rx, &rootlet)?;
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let signal = stopped();
        servers.spawn(async move {
            (
                "tcp",
                router.serve_with_incoming_shutdown(incoming, signal).await,
            )
        });
        tcp_addr = Some(bound);
    }

    let mut unix_socket = None;
    if let Some(path) = &config.listen.unix {
        let (listener, socket) = bind_unix(path)?;
        tracing::info!(path = %path.display(), "serving the API on a Unix socket (mode 0600)");
        let router = routes(
            server_builder(),
            health_service.clone(),
            &phase_rx,
            &rootlet,
        )?;
        let signal = stopped();
        servers.spawn(async move {
            // Stock gRPC clients' invalid :authority made valid below h2
            // (runtime/authority.rs).
            let incoming =
                tokio_stream::StreamExt::map(UnixListenerStream::new(listener), |conn| {
                    conn.map(authority::FixAuthority::new)
                });
            (
                "unix",
                router.serve_with_incoming_shutdown(incoming, signal).await,
            )
        });
        unix_socket = Some(socket);
    }

    let mut health_addr = None;
    if let Some(addr) = config.health.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RuntimeError::Listen {
                what: "health",
                addr: addr.to_string(),
                source,
            })?;
        let bound = local_addr(&listener, "health", addr)?;
        tracing::info!(addr = %bound, "serving gRPC health alone on plain TCP (for probes)");
        // The same reporter as the API's listeners: NOT_SERVING while
        // adopting and once shutting down. No phase gate: a probe during
        // shutdown must hear NOT_SERVING, not be refused.
        let router = server_builder().add_service(health_service.clone());
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let signal = stopped();
        servers.spawn(async move {
            (
                "health",
                router.serve_with_incoming_shutdown(incoming, signal).await,
            )
        });
        health_addr = Some(bound);
    }

    let (metrics_stop, metrics_stopped) = oneshot::channel::<()>();
    let mut metrics_addr = None;
    let mut metrics_task = None;
    if let Some(addr) = config.metrics.listen {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| RuntimeError::Listen {
                what: "metrics",
                addr: addr.to_string(),
                source,
            })?;
        metrics_addr = Some(listener.local_addr());
        tracing::info!(addr = %listener.local_addr(), "serving metrics on /metrics");
        metrics_task = Some(tokio::spawn(listener.serve(metrics.clone(), async {
            let _ = metrics_stopped.await;
        })));
    }

    let (lifecycle_tx, lifecycle) = watch::channel(Lifecycle::Adopting);
    let (stop, stop_rx) = oneshot::channel();
    let supervisor = Supervisor {
        config,
        metrics: metrics.clone(),
        health,
        phase: phase_tx,
        rootlet,
        servers,
        stop_servers: stop_servers_tx,
        metrics_stop,
        metrics_task,
        lifecycle: lifecycle_tx,
        _unix_socket: unix_socket,
    };
    Ok(Running {
        tcp_addr,
        unix_path: supervisor.config.listen.unix.clone(),
        metrics_addr,
        health_addr,
        metrics,
        stop: Some(stop),
        lifecycle,
        task: tokio::spawn(supervisor.run(stop_rx)),
    })
}

fn local_addr(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, RuntimeError> {
    listener
        .local_addr()
        .map_err(|source| RuntimeError::Listen {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// The health service that says whether the agent is degraded: SERVING
/// while no undo of a failed apply is outstanding, NOT_SERVING while one is
/// (and before the agent serves, and at shutdown). `""` and
/// `rootlet.v1.Rootlet` stay SERVING meanwhile: the API must keep answering
/// so that an operator can act.
pub const UNDO_HEALTH: &str = "rootlet.v1.Rootlet.Undo";

/// Keeps [`UNDO_HEALTH`] in step with the outstanding undos.
async fn undo_health_task(health: HealthReporter, mut outstanding: watch::Receiver<usize>) {
    loop {
        let n = *outstanding.borrow_and_update();
        let status = if n == 0 {
            ServingStatus::Serving
        } else {
            tracing::warn!(
                outstanding = n,
                "degraded: an undo of a failed apply is outstanding"
            );
            ServingStatus::NotServing
        };
        health.set_service_status(UNDO_HEALTH, status).await;
        if outstanding.changed().await.is_err() {
            return;
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    // "" is the server as a whole: it is only useful once the API is.
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
    // Serving is [`undo_health_task`]'s to say.
    if status == ServingStatus::NotServing {
        health.set_service_status(UNDO_HEALTH, status).await;
    }
}

/// HTTP/2 keepalive pings find dead peers (and keep NATs open) for
/// long-lived Watch and KeepAlive streams. TCP_NODELAY and TCP keepalive are
/// set on the TCP incoming stream itself (`Server::tcp_nodelay` only applies
/// to `Server::serve`, which binds its own listener).
fn server_builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Health, reflection (v1 and v1alpha) and the Rootlet service, each behind
/// a gate.
fn routes<H: Health>(
    builder: Server,
    health: HealthServer<H>,
    phase: &watch::Receiver<Phase>,
    rootlet: &Slot<crate::api::Served>,
) -> Result<Router, RuntimeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rootlet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = reflection().build_v1().map_err(RuntimeError::Reflection)?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(RuntimeError::Reflection)?;
    let mut builder = builder;
    Ok(builder
        .add_service(Gate::always(health, phase.clone()))
        .add_service(Gate::always(v1, phase.clone()))
        .add_service(Gate::always(v1alpha, phase.clone()))
        .add_service(Gate::new(
            rootlet.clone(),
            phase.clone(),
            "rootletd is adopting the pinned state; retry shortly",
        )))
}

fn load_tls(tls: &TlsConfig) -> Result<tonic::transport::ServerTlsConfig, RuntimeError> {
    let read = |what, path: &Path| {
        fs::read(path).map_err(|source| RuntimeError::ReadTls {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert = read("tls.cert", &tls.cert)?;
    let key = read("tls.key", &tls.key)?;
    let ca = read("tls.client_ca", &tls.client_ca)?;
    crate::config::server_tls(&cert, &key, &ca).map_err(RuntimeError::Tls)
}

/// The Unix socket file this process bound; removed on drop if it is still
/// the same file.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            match fs::remove_file(&self.path) {
                Ok(()) => tracing::debug!(path = %self.path.display(), "removed the Unix socket"),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the Unix socket")
                }
            }
        }
    }
}

/// Binds the Unix socket at `path` (mode 0600), creating its directory
/// (mode 0750) and replacing a stale socket file; refuses when a process
/// still answers on it.
fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), RuntimeError> {
    let listen_error = |source| RuntimeError::Listen {
        what: "unix",
        addr: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(listen_error)?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(RuntimeError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(path = %path.display(), "replacing a stale Unix socket");
            fs::remove_file(path).map_err(listen_error)?;
        }
        Ok(_) => {
            return Err(RuntimeError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    let meta = fs::symlink_metadata(path).map_err(listen_error)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

type ServerEnd = (&'static str, Result<(), tonic::transport::Error>);

/// What runs the daemon after [`start`]: adoption, then serving, then the
/// shutdown sequence.
struct Supervisor {
    config: Config,
    metrics: Arc<Metrics>,
    health: HealthReporter,
    phase: watch::Sender<Phase>,
    rootlet: Slot<crate::api::Served>,
    servers: JoinSet<ServerEnd>,
    stop_servers: watch::Sender<bool>,
    metrics_stop: oneshot::Sender<()>,
    metrics_task: Option<JoinHandle<io::Result<()>>>,
    lifecycle: watch::Sender<Lifecycle>,
    /// Dropped last: removes the socket file.
    _unix_socket: Option<SocketFile>,
}

fn server_failure(ended: Result<ServerEnd, tokio::task::JoinError>) -> RuntimeError {
    match ended {
        Ok((server, Ok(()))) => RuntimeError::ServerStopped(server),
        Ok((server, Err(source))) => RuntimeError::Serve { server, source },
        Err(_) => RuntimeError::Panicked("a gRPC server"),
    }
}

impl Supervisor {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Result<(), RuntimeError> {
        let config = self.config.clone();
        tracing::info!("opening the agent: adopting the pinned state");
        let mut opening = tokio::task::spawn_blocking(move || {
            // The loader pool's parses leave freed memory in the arenas.
            rootlet_dataplane::warm::after_refill(crate::memory::trim);
            let agent = Agent::open(&config.agent_options());
            // Probing and adopting loaded programs: hand their heap back.
            crate::memory::trim();
            agent
        });
        let mut adopting = true;
        let mut agent = None;
        let mut failure = None;
        tokio::select! {
            opened = &mut opening => {
                adopting = false;
                match join(opened.map(|r| r.map_err(RuntimeError::Agent)), "opening the agent") {
                    Ok(a) => agent = Some(a),
                    Err(e) => failure = Some(e),
                }
            }
            _ = &mut stop => tracing::info!("shutdown requested while adopting"),
            Some(ended) = self.servers.join_next() => failure = Some(server_failure(ended)),
        }

        let (background_stop, background_stopped) = watch::channel(false);
        let mut background = None;
        let mut undo_health = None;
        if let Some(agent) = &agent {
            let max = self.config.limits.max_message_bytes;
            gate::set(
                &self.rootlet,
                Some(crate::api::service(
                    agent.clone(),
                    self.metrics.clone(),
                    Arc::new(crate::registry::Pulls::new(&self.config.registry)),
                    max,
                )),
            );
            let weak = Arc::downgrade(agent);
            self.metrics.set_slot_source(Box::new(move || {
                weak.upgrade().map(|a| a.slot_samples()).unwrap_or_default()
            }));
            let weak = Arc::downgrade(agent);
            self.metrics.set_undo_source(Box::new(move || {
                weak.upgrade().map(|a| a.undo_counts()).unwrap_or_default()
            }));
            undo_health = Some(tokio::spawn(undo_health_task(
                self.health.clone(),
                agent.undo_outstanding(),
            )));
            background = Some(tokio::spawn(
                agent.clone().run_background(background_stopped),
            ));
            set_health(&self.health, ServingStatus::Serving).await;
            let _ = self.lifecycle.send(Lifecycle::Serving);
            tracing::info!("serving");
            tokio::select! {
                _ = &mut stop => tracing::info!("shutting down"),
                Some(ended) = self.servers.join_next() => failure = Some(server_failure(ended)),
            }
        }
        if let Some(e) = &failure {
            tracing::error!(error = %error_chain(e), "shutting down after a failure");
        }

        if let Some(task) = undo_health {
            task.abort();
        }
        self.stop_serving().await;
        let _ = background_stop.send(true);
        if let Some(task) = background
            && tokio::time::timeout(BACKGROUND_STOP, task).await.is_err()
        {
            tracing::warn!("the agent's background work did not stop in time");
        }
        if adopting {
            // Adoption cannot be interrupted: let it finish, then let go.
            tracing::info!("waiting for adoption to finish before exiting");
            if let Ok(Ok(a)) = opening.await {
                agent = Some(a);
            }
        }
        gate::set(&self.rootlet, None);
        self.metrics.clear_slot_source();
        if let Some(agent) = agent {
            let weak = Arc::downgrade(&agent);
            drop(agent);
            if weak.upgrade().is_some() {
                tracing::warn!(
                    "the agent is still referenced after shutdown (a call outlived the grace period)"
                );
            }
        }
        let _ = self.lifecycle.send(Lifecycle::Stopped);
        tracing::info!("stopped; the pinned data path keeps running");
        failure.map_or(Ok(()), Err)
    }

    /// Health NOT_SERVING, stop accepting, drain (see the module docs), then
    /// stop the metrics server.
    async fn stop_serving(&mut self) {
        set_health(&self.health, ServingStatus::NotServing).await;
        let _ = self.phase.send(Phase::Draining);
        let _ = self.stop_servers.send(true);
        if tokio::time::timeout(GRACE, drain(&mut self.servers))
            .await
            .is_err()
        {
            tracing::warn!(grace = ?GRACE, "calls still running after the grace period: cutting them");
            let _ = self.phase.send(Phase::Stopped);
            if tokio::time::timeout(FORCE, drain(&mut self.servers))
                .await
                .is_err()
            {
                tracing::warn!("connections still open; abandoning them");
                self.servers.abort_all();
            }
        }
        let _ = self.phase.send(Phase::Stopped);
        let (stop, _) = oneshot::channel();
        let _ = std::mem::replace(&mut self.metrics_stop, stop).send(());
        if let Some(task) = self.metrics_task.take()
            && tokio::time::timeout(FORCE, task).await.is_err()
        {
            tracing::warn!("the metrics server did not stop in time");
        }
    }
}

/// Waits for every server to end, logging failures. Bounded by the set's
/// size.
async fn drain(servers: &mut JoinSet<ServerEnd>) {
    while let Some(ended) = servers.join_next().await {
        match ended {
            Ok((server, Ok(()))) => tracing::debug!(server, "server stopped"),
            Ok((server, Err(e))) => {
                tracing::warn!(server, error = %error_chain(&e), "server failed while stopping")
            }
            Err(e) => tracing::warn!(error = %e, "server task ended abnormally"),
        }
    }
}
