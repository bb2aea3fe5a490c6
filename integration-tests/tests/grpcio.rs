//! A stock, non-Rust gRPC client on rootletd's Unix socket (issue #13,
//! item 12): Python grpcio from PyPI (`scripts/install-deps.sh` installs it
//! in a venv), with stubs generated from `proto/` at test time, against a
//! real rootletd process managing a veth in a namespace the test creates.
//!
//! grpcio sends the percent-encoded socket path as `:authority` for a
//! `unix:` target, which h2 (under tonic) would reset with PROTOCOL_ERROR
//! before any request exists; rootletd makes it valid below h2
//! (`server/src/runtime/authority.rs`). So both a default channel and one
//! with `grpc.default_authority` (deploy/README.md) must work; a missing
//! python3 or grpcio fails the test, it never skips it.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use rootlet_integration_tests::fixture::{self, Fixture};

/// The Python that has grpcio: `ROOTLET_PYTHON`, else the venv
/// `scripts/install-deps.sh` makes.
fn python() -> PathBuf {
    let p = std::env::var_os("ROOTLET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/rootlet-grpcio/bin/python3"));
    let probe = Command::new(&p)
        .args(["-c", "import grpc, grpc_tools, grpc_status; print(grpc.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run scripts/install-deps.sh (it installs grpcio in /opt/rootlet-grpcio) or set ROOTLET_PYTHON",
                p.display()
            )
        });
    assert!(
        probe.status.success(),
        "{} lacks grpcio/grpcio-tools/grpcio-status (scripts/install-deps.sh installs them): {}",
        p.display(),
        String::from_utf8_lossy(&probe.stderr)
    );
    p
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_owned()
}

/// rootletd beside the test binary (`target/<profile>/rootletd`).
fn rootletd_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("exe");
    let dir = exe.parent().expect("dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    dir.join("rootletd")
}

struct Rootletd {
    child: Child,
}

impl Rootletd {
    /// Starts rootletd with only the Unix socket and waits, bounded, until it
    /// logs that it serves.
    fn start(f: &Fixture, dir: &Path, socket: &Path) -> Rootletd {
        let config = dir.join("rootletd.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nunix = {socket:?}\n[dataplane]\nbpffs_root = {root:?}\nstate_dir = {state:?}\nbackend = {backend:?}\n",
                socket = socket.display().to_string(),
                root = f.root.display().to_string(),
                state = dir.join("state").display().to_string(),
                backend = fixture::backend_name(),
            ),
        )
        .expect("config");
        let mut child = Command::new(rootletd_binary())
            .arg("--config")
            .arg(&config)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn rootletd (cargo build -p rootlet-server)");
        let (tx, rx) = mpsc::channel();
        for out in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("rootletd: {line}");
                    if line.trim_end().ends_with("serving") {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let mut d = Rootletd { child };
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("rootletd exited before serving: {status}");
            }
            assert!(Instant::now() < end, "rootletd never served");
        }
        d
    }
}

impl Drop for Rootletd {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the Python client; returns its stdout, panics with both streams
/// if it fails.
fn client(python: &Path, socket: &Path, extra: &[&str]) -> String {
    let script = workspace().join("integration-tests/python/grpcio_unix.py");
    let out = Command::new(python)
        .arg(&script)
        .arg("--proto-root")
        .arg(workspace().join("proto"))
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {extra:?} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    eprintln!("python {extra:?}:\n{stdout}{stderr}");
    stdout
}

#[test]
fn python_grpcio_over_the_unix_socket() {
    let python = python();
    let f = Fixture::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("rootletd.sock");
    let _agent = Rootletd::start(&f, dir.path(), &socket);

    // Default settings, then the documented setting: every call works,
    // errors arrive with their details.
    let netns = f.pair.host().path().display().to_string();
    let target = ["--netns", netns.as_str(), "--ifname", f.pair.host_if()];
    for authority in [None, Some("localhost")] {
        let mut args = target.to_vec();
        if let Some(a) = authority {
            args.extend(["--authority", a]);
        }
        let out = client(&python, &socket, &args);
        for step in [
            "GetCapabilities:",
            "LoadRootlet:",
            "GetRootlet:",
            "error: INVALID_ARGUMENT",
            "ALL_OK",
        ] {
            assert!(
                out.contains(step),
                "{authority:?}: {step} missing from:\n{out}"
            );
        }
    }
}
