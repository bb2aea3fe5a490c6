//! `rootletd` as a process, for tests that restart, crash or signal it:
//! spawn it with a config file (and environment), and wait, bounded, for
//! it to exit.

use std::{
    path::Path,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

/// Starts rootletd (built beside the test binary) with a config file.
pub fn rootletd(config: &Path) -> Child {
    rootletd_with(config, &[])
}

/// Starts rootletd as a process with `env` set.
pub fn rootletd_with(config: &Path, env: &[(&str, &str)]) -> Child {
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
    cmd.spawn()
        .expect("spawn rootletd (cargo build -p rootlet-server)")
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
