//! `rootletd --check-config` on good and bad files: the exit code, the
//! summary, and errors that name the file, line, column and field.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, date_time_ymd,
};

fn rootletd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rootletd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run rootletd")
}

fn check(config: &Path) -> (bool, String, String) {
    let out = rootletd(&[
        "--check-config",
        "--config",
        config.to_str().expect("a UTF-8 path"),
    ]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// TLS files in a temporary directory: a CA, a server certificate, its key,
/// another key, an expired certificate, and a public key.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name = DistinguishedName::new();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf = |expired: bool| {
            let mut p = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            if expired {
                p.not_before = date_time_ymd(2000, 1, 1);
                p.not_after = date_time_ymd(2001, 1, 1);
            }
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &issuer).expect("sign");
            (cert.pem(), key)
        };
        let (server, server_key) = leaf(false);
        let (expired, _) = leaf(true);
        let other_key = KeyPair::generate().expect("key");
        let files = Files { dir };
        files.write("ca.pem", &ca.pem());
        files.write("server.pem", &server);
        files.write_key("server.key", &server_key.serialize_pem());
        files.write_key("other.key", &other_key.serialize_pem());
        files.write("expired.pem", &expired);
        files.write("release.pub", &other_key.public_key_pem());
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }

    /// A private key file, mode 0600 as rootletd requires.
    fn write_key(&self, name: &str, text: &str) -> PathBuf {
        let path = self.write(name, text);
        chmod(&path, 0o600);
        path
    }

    /// A full config with TLS; `cert` and `key` name files in the directory.
    fn config(&self, cert: &str, key: &str) -> String {
        format!(
            r#"[listen]
tcp = "127.0.0.1:50051"
unix = "{dir}/rootletd.sock"

[tls]
cert = "{dir}/{cert}"
key = "{dir}/{key}"
client_ca = "{dir}/ca.pem"

[metrics]
listen = "127.0.0.1:9464"

[bundles]
trusted_keys = ["{dir}/release.pub"]

[[authz.identity]]
name = "ops-admin"
role = "admin"

[[authz.identity]]
name = "team-ddos"
role = "owner"
stages = ["ddos", "ddos-*"]
"#,
            dir = self.dir.path().display()
        )
    }
}

#[test]
fn a_good_config_is_ok_with_a_summary() {
    let files = Files::new();
    let path = files.write("rootletd.toml", &files.config("server.pem", "server.key"));
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    let line = stdout.lines().last().expect("a summary line");
    assert!(
        line.starts_with(&format!("config OK: {}: ", path.display())),
        "{stdout}"
    );
    for part in [
        "tcp 127.0.0.1:50051 (mTLS)",
        "metrics 127.0.0.1:9464",
        "backend auto",
        "2 identities",
        "1 trusted key",
    ] {
        assert!(line.contains(part), "{part} missing in {line}");
    }
}

#[test]
fn an_empty_config_is_ok_for_local_use() {
    let files = Files::new();
    let path = files.write("empty.toml", "");
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("unix /run/rootlet/rootletd.sock"),
        "{stdout}"
    );
    assert!(stdout.contains("warning: bundles.trusted_keys"), "{stdout}");
}

#[test]
fn a_syntax_error_names_line_column_and_field() {
    let files = Files::new();
    let path = files.write("bad.toml", "[listen]\n\ntcp = \"localhost\"\n");
    let (ok, stdout, stderr) = check(&path);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!(
            "{}:3:7: listen.tcp: invalid socket address syntax",
            path.display()
        )),
        "{stderr}"
    );

    let path = files.write(
        "unknown.toml",
        "[metrics]\nlisten = \"127.0.0.1:1\"\npath = \"/m\"\n",
    );
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(
        stderr.contains(":3:1: metrics.path: unknown field `path`"),
        "{stderr}"
    );
}

#[test]
fn missing_and_mismatched_tls_files_are_invalid() {
    let files = Files::new();
    let path = files.write(
        "missing.toml",
        &files.config("nonexistent.pem", "server.key"),
    );
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(stderr.contains("tls.cert: cannot read"), "{stderr}");
    assert!(stderr.contains("nonexistent.pem"), "{stderr}");

    let path = files.write("mismatch.toml", &files.config("server.pem", "other.key"));
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(
        stderr.contains("tls: the certificate, key and CA do not make a TLS server"),
        "{stderr}"
    );

    let path = files.write("expired.toml", &files.config("expired.pem", "server.key"));
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(
        stderr.contains("tls.cert:") && stderr.contains("is valid only from"),
        "{stderr}"
    );

    let path = files.write("swapped.toml", &files.config("server.key", "server.pem"));
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(stderr.contains("holds no PEM certificate"), "{stderr}");
    assert!(stderr.contains("holds no PEM private key"), "{stderr}");
}

#[test]
fn tcp_without_tls_is_invalid() {
    let files = Files::new();
    let path = files.write("notls.toml", "[listen]\ntcp = \"0.0.0.0:50051\"\n");
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(
        stderr.contains("tls: listen.tcp is set, so [tls]"),
        "{stderr}"
    );
}

#[test]
fn insecure_tcp_beyond_loopback_is_refused_unless_the_risk_is_named() {
    let files = Files::new();
    let path = files.write(
        "open.toml",
        "[listen]\ntcp = \"0.0.0.0:50051\"\ninsecure_tcp = true\n",
    );
    let (ok, stdout, stderr) = check(&path);
    assert!(!ok, "plain TCP on 0.0.0.0 passes: {stdout}");
    assert!(
        stderr.contains("listen.insecure_tcp: plain TCP without TLS on 0.0.0.0:50051")
            && stderr.contains("allow_insecure_tcp_on_non_loopback"),
        "{stderr}"
    );

    let path = files.write(
        "open-v6.toml",
        "[listen]\ntcp = \"[::]:50051\"\ninsecure_tcp = true\n",
    );
    let (ok, stdout, _) = check(&path);
    assert!(!ok, "plain TCP on [::] passes: {stdout}");

    let path = files.write(
        "open-accepted.toml",
        "[listen]\ntcp = \"0.0.0.0:50051\"\ninsecure_tcp = true\nallow_insecure_tcp_on_non_loopback = true\n",
    );
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "the named override is accepted: {stderr}");
    assert!(
        stdout.contains("warning: listen.insecure_tcp")
            && stdout.contains("ANYONE WHO CAN REACH IT"),
        "still warned: {stdout}"
    );

    let path = files.write(
        "loopback.toml",
        "[listen]\ntcp = \"127.0.0.1:50051\"\ninsecure_tcp = true\n",
    );
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "plain TCP on loopback stays allowed: {stderr}");
    assert!(stdout.contains("warning: listen.insecure_tcp"), "{stdout}");
}

#[test]
fn a_tls_key_others_can_read_is_refused_unless_the_risk_is_named() {
    let files = Files::new();
    let key = files.path("server.key");
    let path = files.write("rootletd.toml", &files.config("server.pem", "server.key"));
    for mode in [0o644, 0o666, 0o640, 0o604] {
        chmod(&key, mode);
        let (ok, stdout, stderr) = check(&path);
        assert!(!ok, "a key of mode {mode:o} passes: {stdout}");
        assert!(
            stderr.contains(&format!(
                "tls.key: {} is accessible to group or others (mode {mode:o})",
                key.display()
            )) && stderr.contains("allow_key_access_by_group_or_others"),
            "{stderr}"
        );
    }

    let accepted = files.write(
        "accepted.toml",
        &files.config("server.pem", "server.key").replace(
            "client_ca = ",
            "allow_key_access_by_group_or_others = true\nclient_ca = ",
        ),
    );
    chmod(&key, 0o644);
    let (ok, stdout, stderr) = check(&accepted);
    assert!(ok, "the named override is accepted: {stderr}");
    assert!(
        stdout.contains("warning: tls.key:") && stdout.contains("mode 644"),
        "still warned: {stdout}"
    );

    chmod(&key, 0o600);
    let (ok, stdout, stderr) = check(&path);
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("tls.key"), "no warning at 0600: {stdout}");
    chmod(&key, 0o400);
    let (ok, _, stderr) = check(&path);
    assert!(ok, "0400 is fine: {stderr}");
}

#[test]
fn an_explicit_config_that_does_not_exist_is_an_error() {
    let files = Files::new();
    let (ok, _, stderr) = check(&files.path("nonexistent.toml"));
    assert!(!ok);
    assert!(
        stderr.contains("cannot read") && stderr.contains("nonexistent.toml"),
        "{stderr}"
    );
}

#[test]
fn help_describes_the_daemon() {
    let out = rootletd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("XDP pipelines"), "{help}");
    assert!(help.contains("--check-config"), "{help}");
    assert!(help.contains("/etc/rootlet/rootletd.toml"), "{help}");
}
