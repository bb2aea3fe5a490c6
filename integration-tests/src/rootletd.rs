//! `rootletd` as a process, for tests that restart, crash or signal it:
//! spawn it with a config file (and environment), and wait, bounded, for
//! it to exit; or as a [`Daemon`] of its own on a Unix socket, with its
//! metrics and memory read from outside (the bench, the budget test).

use std::{
    collections::BTreeMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use rootlet_dataplane::spec::BackendChoice;
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use rootlet_server::config::Config;
use tonic::{
    codegen::{Service, http::Uri},
    transport::{Channel, Endpoint},
};

use crate::fixture::Fixture;

/// A rootletd process, killed when dropped if it has not exited: a test
/// that fails while one runs leaves no agent behind (holding the test's
/// output pipe, its store and its pins).
pub struct Process(Child);

impl std::ops::Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts rootletd (built beside the test binary) with a config file.
/// `ROOTLET_CRASH_STEPS`: a comma-separated list of the crash points a
/// crash sweep visits (unset or empty: every one). Every point runs in the
/// native tier; the VM tier (20-35x slower, two rootletd starts per point)
/// sweeps the points on either side of each swap point (scripts/test.sh).
pub fn crash_step_wanted(step: &str) -> bool {
    match std::env::var("ROOTLET_CRASH_STEPS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == step),
        _ => true,
    }
}

pub fn rootletd(config: &Path) -> Process {
    rootletd_with(config, &[])
}

/// Starts rootletd as a process with `env` set.
pub fn rootletd_with(config: &Path, env: &[(&str, &str)]) -> Process {
    let exe = std::env::current_exe().expect("exe");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("dir");
    let mut cmd = Command::new(dir.join("rootletd"));
    cmd.arg("--config").arg(config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Process(
        cmd.spawn()
            .expect("spawn rootletd (cargo build -p rootlet-server)"),
    )
}

/// Waits (bounded) for `child` to exit; SIGTERM first if `term`.
pub async fn exited(child: &mut Child, term: bool) -> ExitStatus {
    if term {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("rootletd did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `rootletd` process of its own, on a Unix socket, with metrics on a
/// loopback port, managing the fixture's bpffs root with a state directory
/// of its own: for the bench, and for tests that read its metrics. Killed
/// (SIGTERM, bounded wait, then SIGKILL) on drop.
pub struct Daemon {
    pub child: Process,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Writes the config and starts rootletd; see [`Daemon::connect`].
    pub fn start(f: &Fixture, backend: BackendChoice) -> std::io::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("rootletd.sock");
        let metrics = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?
        };
        let mut c = Config::default();
        c.listen.tcp = None;
        c.listen.unix = Some(socket.clone());
        c.tls = None;
        c.metrics.listen = Some(metrics);
        c.dataplane.bpffs_root = f.root.clone();
        c.dataplane.state_dir = dir.path().join("state");
        c.dataplane.backend = backend;
        c.bundles.allow_unsigned = true;
        let path = dir.path().join("rootletd.toml");
        let text = toml::to_string(&c).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)?;
        Ok(Daemon {
            child: rootletd(&path),
            dir,
            socket,
            metrics,
        })
    }

    /// A client on the Unix socket, once rootletd answers on it (bounded).
    pub async fn connect(&mut self) -> Result<RootletClient<Channel>, String> {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("rootletd exited: {s}"));
            }
            if let Ok(ch) = unix_channel(&self.socket).await {
                let mut c = RootletClient::new(ch)
                    .max_decoding_message_size(80 << 20)
                    .max_encoding_message_size(80 << 20);
                if c.get_capabilities(pb::GetCapabilitiesRequest::default())
                    .await
                    .is_ok()
                {
                    return Ok(c);
                }
            }
            if Instant::now() > end {
                return Err("rootletd did not answer on its socket".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its change budget as its metrics report it now.
    pub fn budget(&self) -> Result<Budget, String> {
        Budget::parse(&scrape(self.metrics)?)
    }

    /// Its memory now, from /proc/PID/status.
    pub fn memory(&self) -> Result<Memory, String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .map_err(|e| e.to_string())?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {name} in /proc/PID/status"))
        };
        Ok(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            anon_kib: field("RssAnon:")?,
            file_kib: field("RssFile:")?,
            threads: field("Threads:")?,
        })
    }
}

/// A process's memory, as /proc/PID/status gives it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmRSS: resident now (anonymous + file-backed + shared memory).
    pub rss_kib: u64,
    /// VmHWM: the most resident at any time.
    pub hwm_kib: u64,
    /// RssAnon: the heap, stacks and other anonymous memory.
    pub anon_kib: u64,
    /// RssFile: resident pages of the executable and other mapped files.
    pub file_kib: u64,
    pub threads: u64,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// rootletd's change budget (`rootlet_apply_*`), in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    pub changes: u64,
    pub total: f64,
    /// By step label, `other` included.
    pub steps: BTreeMap<String, f64>,
}

impl Budget {
    pub fn parse(text: &str) -> Result<Budget, String> {
        let mut b = Budget::default();
        let (mut changes, mut total) = (None, None);
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let number = || value.parse::<f64>().map_err(|e| format!("`{line}`: {e}"));
            if name == "rootlet_apply_changes_total" {
                changes = Some(number()? as u64);
            } else if name == "rootlet_apply_seconds_total" {
                total = Some(number()?);
            } else if let Some(step) = name
                .strip_prefix("rootlet_apply_step_seconds_total{step=\"")
                .and_then(|s| s.strip_suffix("\"}"))
            {
                b.steps.insert(step.to_owned(), number()?);
            }
        }
        b.changes = changes.ok_or("no rootlet_apply_changes_total")?;
        b.total = total.ok_or("no rootlet_apply_seconds_total")?;
        if b.steps.is_empty() {
            return Err("no rootlet_apply_step_seconds_total".into());
        }
        Ok(b)
    }

    /// What happened between `earlier` and this.
    pub fn since(&self, earlier: &Budget) -> Budget {
        Budget {
            changes: self.changes.saturating_sub(earlier.changes),
            total: self.total - earlier.total,
            steps: self
                .steps
                .iter()
                .map(|(k, v)| (k.clone(), v - earlier.steps.get(k).copied().unwrap_or(0.0)))
                .collect(),
        }
    }

    pub fn step(&self, name: &str) -> f64 {
        self.steps.get(name).copied().unwrap_or(0.0)
    }
}

/// `GET /metrics` on `addr`: the body.
pub fn scrape(addr: SocketAddr) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect to metrics: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: rootletd\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read metrics: {e}"))?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
        _ => Err(format!("metrics answered: {out}")),
    }
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

/// A channel on rootletd's Unix socket (no TLS: h2 over the socket).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://rootletd.local")
        .timeout(Duration::from_secs(60))
        .connect_with_connector(UnixConnector(path.to_owned()))
        .await
}
