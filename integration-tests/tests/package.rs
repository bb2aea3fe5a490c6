//! The `rootlet` Debian package: built with cargo-deb from the binaries this
//! test run built (`scripts/build-deb.sh --profile dev --no-build`),
//! installed on this machine with dpkg, its files checked, its unit
//! verified with `systemd-analyze verify` (no warning either), its
//! postinst's `rootletd --check-config` seen refusing a broken
//! configuration (the package stays unconfigured) and accepting it again,
//! then purged, leaving nothing of it.
//!
//! Needs root, dpkg, systemd-analyze and cargo-deb (scripts/install-deps.sh
//! installs it); fails, saying so, if one is missing or if a `rootlet`
//! package or a /usr/bin/rootletd is already on this machine (it would not
//! touch either).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

const PACKAGE: &str = "rootlet";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above integration-tests")
        .to_path_buf()
}

/// Runs `cmd` to its end: its exit code and its stdout and stderr together.
fn run(cmd: &mut Command) -> (i32, String) {
    let what = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn installed() -> bool {
    let (code, text) = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", PACKAGE]));
    code == 0 && text.contains("install ok")
}

/// Purges the package when the test ends, passed or not.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn the_deb_installs_checks_its_config_verifies_its_unit_and_purges_cleanly() {
    assert!(
        !installed(),
        "a `{PACKAGE}` package is already installed on this machine; this test would replace it"
    );
    assert!(
        !Path::new("/usr/bin/rootletd").exists(),
        "/usr/bin/rootletd exists and is not from this test's package"
    );
    let root = workspace();
    let (code, text) = run(Command::new(root.join("scripts/build-deb.sh"))
        .args(["--profile", "dev", "--no-build"])
        .current_dir(&root));
    assert_eq!(code, 0, "build-deb.sh:\n{text}");
    let deb = root.join(
        text.lines()
            .rev()
            .find(|l| l.ends_with(".deb"))
            .unwrap_or_else(|| panic!("build-deb.sh printed no .deb path:\n{text}")),
    );
    assert!(deb.exists(), "{}", deb.display());

    let _purge = Purge;
    let (code, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(code, 0, "dpkg -i:\n{text}");
    // The postinst checked the configuration it installed.
    assert!(
        text.contains("config OK: /etc/rootlet/rootletd.toml"),
        "{text}"
    );

    // The files.
    for (path, want) in [
        ("/usr/bin/rootletd", 0o755),
        ("/usr/bin/rootletctl", 0o755),
        ("/usr/lib/systemd/system/rootletd.service", 0o644),
        ("/etc/rootlet/rootletd.toml", 0o644),
        ("/usr/share/doc/rootlet/examples/rootletd.toml", 0o644),
        ("/usr/share/man/man8/rootletd.8.gz", 0o644),
        ("/usr/share/man/man1/rootletctl.1.gz", 0o644),
        ("/usr/share/man/man1/rootletctl-host.1.gz", 0o644),
        ("/usr/share/bash-completion/completions/rootletctl", 0o644),
        ("/usr/share/zsh/vendor-completions/_rootletd", 0o644),
        (
            "/usr/share/fish/vendor_completions.d/rootletctl.fish",
            0o644,
        ),
        ("/etc/rootlet/tls", 0o700),
        ("/etc/rootlet/keys", 0o755),
    ] {
        assert_eq!(mode(path), want, "{path}: mode {:o}", mode(path));
    }
    let (code, text) = run(Command::new("/usr/bin/rootletctl").arg("--version"));
    assert!(code == 0 && text.starts_with("rootletctl "), "{text}");
    let (code, text) = run(Command::new("/usr/bin/rootletd").arg("--version"));
    assert!(code == 0 && text.starts_with("rootletd "), "{text}");
    let (_, conffiles) =
        run(Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}", PACKAGE]));
    assert!(
        conffiles.contains("/etc/rootlet/rootletd.toml"),
        "the config is a conffile: {conffiles}"
    );
    // The unit runs the package's binary, and verifies without a word.
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/rootletd.service").expect("unit");
    assert!(
        unit.contains("ExecStartPre=/usr/bin/rootletd --check-config")
            && unit.contains("ExecStart=/usr/bin/rootletd --config")
            && !unit.contains("/usr/local"),
        "{unit}"
    );
    let (code, text) = run(Command::new("systemd-analyze")
        .args(["verify", "/usr/lib/systemd/system/rootletd.service"]));
    assert!(
        code == 0 && text.trim().is_empty(),
        "systemd-analyze verify (exit {code}):\n{text}"
    );

    // A configuration the agent would refuse: configuring the package
    // fails, saying why, and leaves it unconfigured.
    std::fs::write(
        "/etc/rootlet/rootletd.toml",
        "[dataplane]\nbackend = \"bogus\"\n",
    )
    .expect("break the config");
    let (code, text) = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert_ne!(code, 0, "dpkg -i with a broken config:\n{text}");
    assert!(text.contains("backend"), "the check says why:\n{text}");
    let (_, status) = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}", PACKAGE]));
    assert!(status.contains("half-configured"), "{status}");
    // Fixed, it configures.
    std::fs::write("/etc/rootlet/rootletd.toml", "").expect("an empty config");
    let (code, text) = run(Command::new("dpkg").args(["--configure", PACKAGE]));
    assert_eq!(code, 0, "dpkg --configure:\n{text}");
    assert!(installed());

    // Purged: nothing of it is left.
    let (code, text) = run(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert_eq!(code, 0, "dpkg --purge:\n{text}");
    assert!(!installed());
    for path in [
        "/usr/bin/rootletd",
        "/usr/bin/rootletctl",
        "/usr/lib/systemd/system/rootletd.service",
        "/usr/share/man/man8/rootletd.8.gz",
        "/etc/rootlet",
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after the purge");
    }
}
