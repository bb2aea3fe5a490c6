//! Helpers shared by the bundle and signing tests: manifests and objects
//! on disk (real eBPF objects from `rootlet-ebpf`) and small synthetic
//! objects for tests that pin exact bytes.
#![allow(dead_code)]

use std::{collections::BTreeMap, fs, path::PathBuf};

use rootlet_bundle::{Bundle, BundleError, Manifest};

pub const MANIFEST: &str = r#"name = "edge-pipeline"
version = "1.4.0"

[[rootlets]]
interface = "eth0"
netns = "/run/netns/edge"

[[rootlets]]
interface = "eth1"
final_verdict = "drop"

[[stages]]
name = "ddos"
object = "objs/ddos.o"
program = "ddos"
priority = 20
maps = "keep"
lifetime = "lease"
lease_seconds = 30
owner = "team-ddos"
rootlets = ["eth0"]

[[stages]]
name = "l4lb"
object = "l4lb.o"
program = "l4lb"
priority = 10
proceed_on = ["pass", "tx"]
owner = "team-lb"
"#;

/// A temp dir with `manifest.toml` (`text`), `objs/ddos.o` and `l4lb.o`.
pub fn project(text: &str) -> Result<(tempfile::TempDir, PathBuf), BundleError> {
    let dir = tempfile::tempdir().map_err(|e| BundleError::Io {
        path: "tempdir".into(),
        source: e,
    })?;
    let write = |rel: &str, data: &[u8]| -> Result<(), BundleError> {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| BundleError::Io {
                path: parent.into(),
                source: e,
            })?;
        }
        fs::write(&path, data).map_err(|e| BundleError::Io { path, source: e })
    };
    write("objs/ddos.o", rootlet_ebpf::DDOS)?;
    write("l4lb.o", rootlet_ebpf::L4LB)?;
    write("manifest.toml", text.as_bytes())?;
    let manifest = dir.path().join("manifest.toml");
    Ok((dir, manifest))
}

/// A minimal 64-bit little-endian eBPF ELF header followed by `tag`.
pub fn fake_elf(tag: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // ELFCLASS64
    elf[5] = 1; // little-endian
    elf[6] = 1; // EV_CURRENT
    elf[16] = 1; // ET_REL
    elf[18] = 247; // EM_BPF
    elf.extend_from_slice(tag);
    elf
}

pub const SMALL: &str = r#"name = "small"
version = "7"

[[rootlets]]
interface = "lo"

[[stages]]
name = "a"
object = "a.o"
program = "prog_a"
priority = 1
owner = "tests"

[[stages]]
name = "b"
object = "b.o"
program = "prog_b"
priority = 2
owner = "tests"
lifetime = "lease"
lease_seconds = 60
"#;

/// A small bundle of synthetic objects, built in memory.
pub fn small_bundle() -> Result<Bundle, BundleError> {
    let manifest = Manifest::parse(SMALL, "small.toml")?;
    let objects = BTreeMap::from([
        ("a.o".to_string(), fake_elf(b"object a")),
        ("b.o".to_string(), fake_elf(b"object b")),
    ]);
    Bundle::from_parts(manifest, objects)
}

/// A ddos policy, as TOML and as the same document in JSON: the policy
/// tests' and the property tests' starting point.
pub const POLICY_TOML: &str = r#"# the blocklist
stage = "ddos"
version = 7
description = "block two nets"

[maps.ddos_blocklist]
entries = [
  { key = "192.0.2.0/24", value = 0 },
  { key = "198.51.100.7/32", value = 0 },
]

[maps.ddos_config]
entries = [{ key = 0, value = { rate = 100, flags = [1, 2], on = true } }]
"#;

pub const POLICY_JSON: &str = r#"{
  "version": 7,
  "stage": "ddos",
  "maps": {
    "ddos_config": { "entries": [ { "value": { "on": true, "flags": [1, 2], "rate": 100 }, "key": 0 } ] },
    "ddos_blocklist": {
      "entries": [
        { "key": "192.0.2.0/24", "value": 0 },
        {"key":"198.51.100.7/32","value":0}
      ]
    }
  },
  "description": "block two nets"
}"#;
