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
//!
//! And the Kubernetes DaemonSet (deploy/kubernetes/): validated, and
//! checked against the configuration its Secret carries.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

const PACKAGE: &str = "rootlet";
/// The venv scripts/install-deps.sh installs kubernetes-validate into.
const K8S_VENV: &str = "/opt/rootlet-k8s";

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

/// deploy/kubernetes/rootletd.yaml: valid for Kubernetes 1.37 (strict:
/// no unknown field) by `kubernetes-validate` (PyPI, installed by
/// scripts/install-deps.sh), and consistent with the configuration its
/// Secret carries (deploy/kubernetes/rootletd.toml): host network, bpffs and
/// the state directory from the host, the capabilities, gRPC probes on the
/// configuration's plain health listener, the ports, and each file the
/// configuration names placed by the Secret volume's items, with a mode
/// `rootletd --check-config` accepts; the configuration, with those files
/// in place as the Secret would place them, passes `--check-config`.
#[test]
fn the_daemonset_validates_and_mounts_what_its_configuration_names() {
    use serde_json::Value;
    let root = workspace();
    let manifest = root.join("deploy/kubernetes/rootletd.yaml");
    let venv = Path::new(K8S_VENV);
    assert!(
        venv.join("bin/kubernetes-validate").exists(),
        "{K8S_VENV}/bin/kubernetes-validate is missing (scripts/install-deps.sh installs it)"
    );
    let (code, text) = run(Command::new(venv.join("bin/kubernetes-validate"))
        .args(["--strict", "-k", "1.37.0"])
        .arg(&manifest));
    assert_eq!(code, 0, "kubernetes-validate:\n{text}");
    assert!(
        text.contains("passed for resource daemonset/rootletd"),
        "{text}"
    );

    // The manifest as JSON (PyYAML, from the same venv).
    let (code, json) = run(Command::new(venv.join("bin/python3"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&manifest));
    assert_eq!(code, 0, "{json}");
    let docs: Vec<Value> = serde_json::from_str(&json).expect("the manifest as JSON");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    assert_eq!(
        c["args"],
        serde_json::json!(["--config", "/etc/rootlet/rootletd.toml"])
    );
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    for cap in ["BPF", "PERFMON", "NET_ADMIN"] {
        assert!(
            caps["add"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == cap)),
            "{cap} in {caps}"
        );
    }
    assert_eq!(c["securityContext"]["privileged"], false);
    let volume = |name: &str| {
        pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    };
    let mounted_at = |name: &str| {
        c["volumeMounts"]
            .as_array()
            .and_then(|v| v.iter().find(|m| m["name"] == name))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume {name} is not mounted"))
            .to_string()
    };

    // The configuration the Secret carries.
    let config_path = root.join("deploy/kubernetes/rootletd.toml");
    let config_text = std::fs::read_to_string(&config_path).expect("the Kubernetes config");
    let config = rootlet_server::config::Config::parse(&config_text, &config_path)
        .expect("the Kubernetes config parses");
    let health = config.health.listen.expect("[health] listen is set");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["grpc"]["port"].as_u64(),
            Some(u64::from(health.port())),
            "{probe} probes the health listener: {}",
            c[probe]
        );
    }
    assert_eq!(c["readinessProbe"]["grpc"]["service"], "rootlet.v1.Rootlet");
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port {name}"))
    };
    assert_eq!(
        Some(port("api")),
        config.listen.tcp.map(|a| u64::from(a.port()))
    );
    assert_eq!(port("health"), u64::from(health.port()));
    assert_eq!(
        Some(port("metrics")),
        config.metrics.listen.map(|a| u64::from(a.port()))
    );
    // bpffs, the state and the socket from the host.
    assert_eq!(volume("bpffs")["hostPath"]["path"], "/sys/fs/bpf");
    assert!(config.dataplane.bpffs_root.starts_with(mounted_at("bpffs")));
    assert!(config.dataplane.state_dir.starts_with(mounted_at("state")));
    assert_eq!(
        volume("state")["hostPath"]["path"].as_str(),
        config.dataplane.state_dir.to_str()
    );
    let socket = config.listen.unix.clone().expect("a Unix socket");
    assert!(socket.starts_with(mounted_at("run")));

    // Each file the configuration names comes from the Secret's items.
    let secret = volume("config")["secret"].clone();
    assert_eq!(secret["secretName"], "rootletd");
    let etc = PathBuf::from(mounted_at("config"));
    assert_eq!(etc, Path::new("/etc/rootlet"));
    let items: Vec<(String, String)> = secret["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["key"].as_str().expect("key").to_string(),
                i["path"].as_str().expect("path").to_string(),
            )
        })
        .collect();
    let tls = config.tls.clone().expect("[tls]");
    let mut named = vec![
        PathBuf::from("/etc/rootlet/rootletd.toml"),
        tls.cert.clone(),
        tls.key.clone(),
        tls.client_ca.clone(),
    ];
    named.extend(config.bundles.trusted_keys.iter().cloned());
    for file in &named {
        let rel = file
            .strip_prefix(&etc)
            .unwrap_or_else(|_| panic!("{} is not under {}", file.display(), etc.display()));
        assert!(
            items.iter().any(|(_, p)| Path::new(p) == rel),
            "{} is placed by no item of the Secret volume: {items:?}",
            file.display()
        );
    }
    // Placed as kubelet places them (defaultMode for each file), the
    // configuration passes --check-config.
    let mode = secret["defaultMode"].as_u64().expect("defaultMode");
    assert_eq!(mode, 0o400, "the TLS key must be its owner's only");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = rootlet_integration_tests::pki::Pki::new();
    let (cert, key) = pki.server();
    let keygen = dir.path().join("keygen");
    let (code, text) = run(
        Command::new(rootlet_integration_tests::fleet::sibling_binary(
            "rootletctl",
        ))
        .args(["bundle", "keygen", "--private"])
        .arg(keygen.with_extension("key"))
        .arg("--public")
        .arg(keygen.with_extension("pub")),
    );
    assert_eq!(code, 0, "rootletctl bundle keygen:\n{text}");
    let rewritten = config_text.replace("/etc/rootlet/", &format!("{}/", dir.path().display()));
    for (key_name, rel) in &items {
        let dest = dir.path().join(rel);
        std::fs::create_dir_all(dest.parent().expect("a parent")).expect("mkdir");
        let content = match key_name.as_str() {
            "rootletd.toml" => rewritten.clone().into_bytes(),
            "server.pem" => std::fs::read(&cert).expect("cert"),
            "server.key" => std::fs::read(&key).expect("key"),
            "ca.pem" => pki.ca_pem().as_bytes().to_vec(),
            "release.pub" => std::fs::read(keygen.with_extension("pub")).expect("public key"),
            other => panic!("a Secret key the test does not know: {other}"),
        };
        std::fs::write(&dest, content).expect("write");
        std::fs::set_permissions(
            &dest,
            std::fs::Permissions::from_mode(u32::try_from(mode).expect("mode")),
        )
        .expect("chmod");
    }
    let (code, text) = run(
        Command::new(rootlet_integration_tests::fleet::sibling_binary("rootletd"))
            .arg("--check-config")
            .arg("--config")
            .arg(dir.path().join("rootletd.toml")),
    );
    assert_eq!(code, 0, "rootletd --check-config:\n{text}");
    assert!(
        text.contains("config OK") && text.contains("(plain, health only)"),
        "{text}"
    );
}
