//! `rootletctl policy build|sign|verify|inspect|diff` as a person runs
//! them: the real binary, files on disk, its output and exit codes (diff:
//! 0 same, 1 different, 2 trouble).
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Runs rootletctl; returns (exit code, stdout, stderr).
fn ctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rootletctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const V1: &str = r#"stage = "ddos"
version = 1
description = "two nets"

[maps.ddos_blocklist]
entries = [
  { key = "192.0.2.0/24", value = 0 },
  { key = "198.51.100.7/32", value = 0 },
]
"#;

/// V1 in JSON, one entry changed, one removed, one added, version 2, and
/// a map more.
const V2: &str = r#"{
  "stage": "ddos",
  "version": 2,
  "description": "two nets",
  "maps": {
    "ddos_blocklist": { "entries": [
      { "key": "192.0.2.0/24", "value": 1 },
      { "key": "203.0.113.0/24", "value": 0 }
    ] },
    "ddos_config": { "entries": [ { "key": 0, "value": { "rate": 5 } } ] }
  }
}"#;

fn keys(d: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (k, p) = (d.join(format!("{name}.key")), d.join(format!("{name}.pub")));
    let (code, _, err) = ctl(&["bundle", "keygen", "--private", s(&k), "--public", s(&p)]);
    assert_eq!(code, 0, "{err}");
    (k, p)
}

#[test]
fn build_sign_verify_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (key, public) = keys(d, "ops");
    let (other_key, other) = keys(d, "other");
    std::fs::write(d.join("v1.toml"), V1).unwrap();
    std::fs::write(d.join("v1.json"), V1_JSON).unwrap();

    // build: unsigned, to a named file.
    let out = d.join("v1.rlp");
    let (code, text, err) = ctl(&["policy", "build", s(&d.join("v1.toml")), "-o", s(&out)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("built policy for stage ddos version 1")
            && text.contains("1 map, 2 entries, 0 signatures"),
        "{text}"
    );
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("digest "))
        .unwrap()
        .to_string();
    // The JSON form of the same policy has the same digest.
    let out_json = d.join("v1j.rlp");
    let (code, text, _) = ctl(&["policy", "build", s(&d.join("v1.json")), "-o", s(&out_json)]);
    assert_eq!(code, 0);
    assert!(text.contains(&format!("digest {digest}")), "{text}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&out_json).unwrap()
    );

    // verify: unsigned is a failure (1), not a usage error.
    let (code, _, err) = ctl(&["policy", "verify", s(&out), "--trusted-key", s(&public)]);
    assert_eq!(code, 1);
    assert!(err.contains("policy is unsigned"), "{err}");
    // sign in place, then verify.
    let (code, text, err) = ctl(&["policy", "sign", s(&out), "--key", s(&key)]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("1 signature in total"), "{text}");
    let (code, text, err) = ctl(&["policy", "verify", s(&out), "--trusted-key", s(&public)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with(&format!(
            "OK: policy for stage ddos version 1 (digest {digest}) signed by "
        )),
        "{text}"
    );
    // By a key nobody trusts.
    let (code, _, err) = ctl(&["policy", "verify", s(&out), "--trusted", s(&other)]);
    assert_eq!(code, 1);
    assert!(err.contains("signed only by untrusted keys"), "{err}");
    // build can sign as it writes, with several keys.
    let both = d.join("both.rlp");
    let (code, text, _) = ctl(&[
        "policy",
        "build",
        s(&d.join("v1.toml")),
        "-o",
        s(&both),
        "--key",
        s(&key),
        "--key",
        s(&other_key),
    ]);
    assert_eq!(code, 0);
    assert!(text.contains("2 signatures"), "{text}");

    // A source is not a signed policy.
    let (code, _, err) = ctl(&[
        "policy",
        "verify",
        s(&d.join("v1.toml")),
        "--trusted-key",
        s(&public),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("bad magic"), "{err}");

    // inspect: signed file or source.
    let (code, text, _) = ctl(&["policy", "inspect", s(&both)]);
    assert_eq!(code, 0);
    assert!(text.contains("policy   stage ddos version 1"), "{text}");
    assert!(text.contains(&format!("digest   {digest}")), "{text}");
    assert!(text.contains("  ddos_blocklist  2 entries"), "{text}");
    assert!(text.contains("signatures (2)"), "{text}");
    assert!(!text.contains("192.0.2.0/24"), "{text}");
    let (code, text, _) = ctl(&["policy", "inspect", s(&d.join("v1.toml")), "--entries"]);
    assert_eq!(code, 0);
    assert!(text.contains("    \"192.0.2.0/24\" => 0\n"), "{text}");
    assert!(text.contains("signatures (0): unsigned"), "{text}");

    // Errors in the source: usage (2), at file:line:col.
    std::fs::write(d.join("bad.toml"), V1.replace("version = 1", "version = 0")).unwrap();
    let (code, _, err) = ctl(&[
        "policy",
        "build",
        s(&d.join("bad.toml")),
        "-o",
        s(&d.join("x.rlp")),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml:2:11: version: must be at least 1"),
        "{err}"
    );
    assert!(!d.join("x.rlp").exists());
    // A damaged policy file fails (1).
    let mut bytes = std::fs::read(&out).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(d.join("cut.rlp"), bytes).unwrap();
    let (code, _, err) = ctl(&[
        "policy",
        "verify",
        s(&d.join("cut.rlp")),
        "--trusted-key",
        s(&public),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated signed policy"), "{err}");
}

const V1_JSON: &str = r#"{"stage":"ddos","version":1,"description":"two nets","maps":{"ddos_blocklist":{"entries":[
 {"key":"192.0.2.0/24","value":0},{"key":"198.51.100.7/32","value":0}]}}}"#;

#[test]
fn diff_by_map_and_key_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("v1.toml"), V1).unwrap();
    std::fs::write(d.join("v1.json"), V1_JSON).unwrap();
    std::fs::write(d.join("v2.json"), V2).unwrap();
    let rlp = d.join("v1.rlp");
    assert_eq!(
        ctl(&["policy", "build", s(&d.join("v1.toml")), "-o", s(&rlp)]).0,
        0
    );

    // The same policy, as source and as built file: 0.
    let (code, text, _) = ctl(&["policy", "diff", s(&d.join("v1.json")), s(&rlp)]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("same policy: stage ddos version 1 digest "),
        "{text}"
    );

    // Different: 1, per map, by key.
    let (code, text, err) = ctl(&["policy", "diff", s(&rlp), s(&d.join("v2.json"))]);
    assert_eq!(code, 1, "{err}");
    for want in [
        "version 1 -> 2\n",
        "map ddos_blocklist: 1 added, 1 removed, 1 changed\n",
        "  + \"203.0.113.0/24\" => 0\n",
        "  - \"198.51.100.7/32\" => 0\n",
        "  ~ \"192.0.2.0/24\" => 0 -> 1\n",
        "map ddos_config: only in the new policy, which sets its 1 entry\n",
    ] {
        assert!(text.contains(want), "want {want:?} in\n{text}");
    }
    // The other way round, the extra map is left as it is.
    let (code, text, _) = ctl(&["policy", "diff", s(&d.join("v2.json")), s(&rlp)]);
    assert_eq!(code, 1);
    assert!(
        text.contains(
            "map ddos_config: only in the old policy (1 entry); the new one leaves it as it is"
        ),
        "{text}"
    );
    // Only the version differs: still different.
    std::fs::write(d.join("v1b.toml"), V1.replace("version = 1", "version = 9")).unwrap();
    let (code, text, _) = ctl(&[
        "policy",
        "diff",
        s(&d.join("v1.toml")),
        s(&d.join("v1b.toml")),
    ]);
    assert_eq!(code, 1);
    assert!(
        text.contains("version 1 -> 9") && !text.contains("map "),
        "{text}"
    );

    // Trouble: 2.
    let (code, _, err) = ctl(&[
        "policy",
        "diff",
        s(&d.join("v1.toml")),
        s(&d.join("missing.toml")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.toml"), "{err}");
}

/// A bundle whose stage carries a policy: `bundle build` embeds it,
/// `bundle inspect` lists it; a policy error in it is a usage error at the
/// policy file's position.
#[test]
fn bundle_build_carries_policies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ddos.o"), rootlet_ebpf::DDOS).unwrap();
    std::fs::write(d.join("blocklist.toml"), V1).unwrap();
    let manifest = d.join("manifest.toml");
    std::fs::write(
        &manifest,
        "name = \"edge\"\nversion = \"v1\"\n[[rootlets]]\ninterface = \"rl0\"\n[[stages]]\n\
         name = \"ddos\"\nobject = \"ddos.o\"\nprogram = \"ddos\"\npriority = 10\nowner = \"sec\"\n\
         policies = [\"blocklist.toml\"]\n",
    )
    .unwrap();
    let out = d.join("edge.rlb");
    let (code, _, err) = ctl(&["bundle", "build", s(&manifest), "-o", s(&out)]);
    assert_eq!(code, 0, "{err}");
    let (code, text, _) = ctl(&["bundle", "inspect", s(&out)]);
    assert_eq!(code, 0);
    assert!(
        text.contains("policy blocklist.json version 1 digest ")
            && text.contains("maps ddos_blocklist (2)"),
        "{text}"
    );
    std::fs::write(
        d.join("blocklist.toml"),
        V1.replace("version = 1", "version = -1"),
    )
    .unwrap();
    let (code, _, err) = ctl(&["bundle", "build", s(&manifest), "-o", s(&out)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("blocklist.toml:2:11: version: "), "{err}");
}
