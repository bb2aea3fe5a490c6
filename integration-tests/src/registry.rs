//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry, `scripts/install-deps.sh` installs it), run as
//! `docker-registry serve CONFIG` on `127.0.0.1` and a free port, with TLS
//! from the test [`Pki`] and storage in a temporary directory. Stopped
//! (killed and reaped) on drop; every wait is bounded.
//!
//! ```no_run
//! use rootlet_integration_tests::{pki::Pki, registry::TestRegistry};
//!
//! let pki = Pki::new();
//! let reg = TestRegistry::start(&pki).expect("registry");
//! println!("push to {}/fleet/edge:1.0", reg.host());
//! ```

use std::{
    fs, io,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::pki::Pki;

/// The registry binary (Debian's path; `ROOTLET_DOCKER_REGISTRY` overrides).
pub fn binary() -> PathBuf {
    std::env::var_os("ROOTLET_DOCKER_REGISTRY")
        .map_or_else(|| PathBuf::from("/usr/bin/docker-registry"), PathBuf::from)
}

/// How long the registry gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at a free port (another process may take the one we found
/// between our probe and the registry's bind).
const PORT_ATTEMPTS: usize = 3;

/// A running registry.
pub struct TestRegistry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry serving TLS with `pki`'s server certificate
    /// (valid for `127.0.0.1`).
    ///
    /// # Errors
    ///
    /// The binary is missing, or it did not listen within the bound (its
    /// log is in the error).
    pub fn start(pki: &Pki) -> io::Result<TestRegistry> {
        Self::start_with(pki, None)
    }

    /// [`TestRegistry::start`] with basic auth: only `user` with `password`
    /// may push or pull (an htpasswd file made by `htpasswd -B`, bcrypt
    /// being the only hash the registry accepts; Debian's apache2-utils).
    ///
    /// # Errors
    ///
    /// As [`TestRegistry::start`], or `htpasswd` failed.
    pub fn start_with_auth(pki: &Pki, user: &str, password: &str) -> io::Result<TestRegistry> {
        Self::start_with(pki, Some((user, password)))
    }

    fn start_with(pki: &Pki, auth: Option<(&str, &str)>) -> io::Result<TestRegistry> {
        let bin = binary();
        if !bin.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is missing: run scripts/install-deps.sh (Debian package docker-registry)",
                    bin.display()
                ),
            ));
        }
        let dir = tempfile::tempdir()?;
        let (cert, key) = pki.server();
        let htpasswd = match auth {
            None => None,
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-B", "-b", "-n", user, password])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("htpasswd: {e} (run scripts/install-deps.sh: apache2-utils)"),
                        )
                    })?;
                if !out.status.success() {
                    return Err(io::Error::other(format!(
                        "htpasswd failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )));
                }
                let path = dir.path().join("htpasswd");
                fs::write(&path, &out.stdout)?;
                Some(path)
            }
        };
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                config_yaml(dir.path(), addr, &cert, &key, htpasswd.as_deref()),
            )?;
            let log = dir.path().join("registry.log");
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log)?)
                .stderr(fs::File::create(dir.path().join("registry.err"))?)
                .spawn()?;
            match wait_listening(&mut child, addr) {
                Ok(()) => {
                    return Ok(TestRegistry {
                        child: Some(child),
                        addr,
                        dir,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err =
                        fs::read_to_string(dir.path().join("registry.err")).unwrap_or_default();
                    last = format!("{e}; registry log: {}", tail(&err));
                }
            }
        }
        Err(io::Error::other(format!(
            "docker-registry did not start: {last}"
        )))
    }

    /// `127.0.0.1:PORT`, the registry part of a reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the registry keeps its blobs (`docker/registry/v2/blobs/…`).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The stored file of blob `digest` (`sha256:…`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    /// How many times the registry answered a GET of blob `digest` with
    /// 200, from its access log (Apache combined format, on its stdout).
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .filter(|l| l.contains("\" 200 "))
            .count()
    }

    /// Kills the registry and waits for it (then connections are refused).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_yaml(
    dir: &Path,
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    htpasswd: Option<&Path>,
) -> String {
    let auth = htpasswd.map_or_else(String::new, |p| {
        format!(
            "auth:\n  htpasswd:\n    realm: rootlet-test\n    path: {}\n",
            p.display()
        )
    });
    auth + &format!(
        "version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n",
        storage = dir.join("storage").display(),
        cert = cert.display(),
        key = key.display(),
    )
}

fn wait_listening(child: &mut Child, addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("exited with {status}")));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("not listening on {addr} after {START_TIMEOUT:?}"),
    ))
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
