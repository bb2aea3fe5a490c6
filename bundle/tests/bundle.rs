//! Bundles: building from disk and memory, the canonical encoding (round
//! trip, determinism, a pinned digest), and decoding hostile input.

mod common;

use std::{collections::BTreeMap, fs};

use common::{MANIFEST, SMALL, fake_elf, project, small_bundle};
use rootlet_bundle::{
    Bundle, BundleError, MAX_BUNDLE_SIZE, MAX_MANIFEST_SIZE, MAX_OBJECT_SIZE, Manifest, sha256_hex,
};

type TestResult = Result<(), BundleError>;

/// An independent encoder following the format documented in
/// `rootlet_bundle::format`.
fn encode(manifest: &str, objects: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"RLTBUNDL".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(manifest.as_bytes());
    out.extend_from_slice(&(objects.len() as u32).to_le_bytes());
    for (name, data) in objects {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// A deterministic byte stream (xorshift64*).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[test]
fn builds_from_disk() -> TestResult {
    let (_dir, path) = project(MANIFEST)?;
    let b = Bundle::build(&path)?;
    let m = b.manifest();
    assert_eq!(m.name, "edge-pipeline");
    // Canonical order: execution order.
    let names: Vec<&str> = m.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["l4lb", "ddos"]);
    let keys: Vec<&str> = b.objects().keys().map(String::as_str).collect();
    assert_eq!(keys, ["ddos.o", "l4lb.o"]);
    let ddos = &m.stages[1];
    assert_eq!(ddos.object, "ddos.o");
    assert_eq!(
        ddos.sha256.as_deref(),
        Some(sha256_hex(rootlet_ebpf::DDOS).as_str())
    );
    assert_eq!(
        b.stage_object(ddos).map(|o| o.as_slice()),
        Some(rootlet_ebpf::DDOS)
    );
    assert!(b.manifest_text().contains("sha256 = \""));
    Ok(())
}

#[test]
fn round_trip_is_byte_for_byte() -> TestResult {
    let (_dir, path) = project(MANIFEST)?;
    let b = Bundle::build(&path)?;
    let bytes = b.to_bytes();
    assert_eq!(b.to_bytes(), bytes, "to_bytes is deterministic");
    let back = Bundle::from_bytes(&bytes)?;
    assert_eq!(back, b);
    assert_eq!(back.to_bytes(), bytes);
    assert_eq!(back.digest(), b.digest());
    assert_eq!(b.digest(), sha256_hex(&bytes));
    Ok(())
}

#[test]
fn same_inputs_give_the_same_bytes() -> TestResult {
    let (_d1, p1) = project(MANIFEST)?;
    let (_d2, p2) = project(MANIFEST)?;
    let b1 = Bundle::build(&p1)?.to_bytes();
    assert_eq!(b1, Bundle::build(&p2)?.to_bytes());

    // The same meaning written differently: comments, key order, stage
    // order, defaults spelled out.
    let reordered = r#"# Reordered.
version = "1.4.0"
name = "edge-pipeline"

[[rootlets]]
final_verdict = "drop"
interface = "eth1"
mode = "auto"

[[rootlets]]
netns = "/run/netns/edge"
interface = "eth0"

[[stages]]  # load balancer
owner = "team-lb"
name = "l4lb"
object = "./l4lb.o"
program = "l4lb"
priority = 10
proceed_on = ["tx", "pass"]
maps = "fresh"

[[stages]]
name = "ddos"
object = "objs/../objs/ddos.o"
program = "ddos"
priority = 20
maps = "keep"
lifetime = "lease"
lease_seconds = 30
owner = "team-ddos"
rootlets = ["eth0"]
"#;
    let (_d3, p3) = project(reordered)?;
    assert_eq!(b1, Bundle::build(&p3)?.to_bytes());
    Ok(())
}

#[test]
fn digest_is_pinned() -> TestResult {
    let b = small_bundle()?;
    let a = sha256_hex(&fake_elf(b"object a"));
    let bsha = sha256_hex(&fake_elf(b"object b"));
    let expected_text = format!(
        r#"name = "small"
version = "7"

[[rootlets]]
interface = "lo"
mode = "auto"
final_verdict = "pass"

[[stages]]
name = "a"
object = "a.o"
sha256 = "{a}"
program = "prog_a"
priority = 1
proceed_on = ["pass"]
maps = "fresh"
lifetime = "pin"
owner = "tests"

[[stages]]
name = "b"
object = "b.o"
sha256 = "{bsha}"
program = "prog_b"
priority = 2
proceed_on = ["pass"]
maps = "fresh"
lifetime = "lease"
lease_seconds = 60
owner = "tests"
"#
    );
    assert_eq!(b.manifest_text(), expected_text);
    let expected_bytes = encode(
        &expected_text,
        &[
            ("a.o", &fake_elf(b"object a")),
            ("b.o", &fake_elf(b"object b")),
        ],
    );
    assert_eq!(b.to_bytes(), expected_bytes);
    // Changing this digest breaks every signature made before: only with
    // a new format version.
    assert_eq!(
        b.digest(),
        "87c3965b555270ff6c67b811c9b2c814f209dd2d9e71fd7c998c85cc6b72cdd0"
    );
    Ok(())
}

#[test]
fn digest_follows_content() -> TestResult {
    let base = small_bundle()?.digest();
    let m = Manifest::parse(&SMALL.replace("priority = 1", "priority = 0"), "m.toml")?;
    let objects = BTreeMap::from([
        ("a.o".to_string(), fake_elf(b"object a")),
        ("b.o".to_string(), fake_elf(b"object b")),
    ]);
    assert_ne!(Bundle::from_parts(m, objects)?.digest(), base);

    let m = Manifest::parse(SMALL, "m.toml")?;
    let objects = BTreeMap::from([
        ("a.o".to_string(), fake_elf(b"object A")),
        ("b.o".to_string(), fake_elf(b"object b")),
    ]);
    assert_ne!(Bundle::from_parts(m, objects)?.digest(), base);
    Ok(())
}

#[test]
fn stages_may_share_an_object() -> TestResult {
    let text = MANIFEST.replace("object = \"l4lb.o\"", "object = \"objs/ddos.o\"");
    let (_dir, path) = project(&text)?;
    let b = Bundle::build(&path)?;
    assert_eq!(b.objects().len(), 1);
    assert!(b.manifest().stages.iter().all(|s| s.object == "ddos.o"));
    Bundle::from_bytes(&b.to_bytes())?;
    Ok(())
}

#[test]
fn different_objects_with_one_file_name_are_refused() -> TestResult {
    let text = MANIFEST.replace("object = \"l4lb.o\"", "object = \"ddos.o\"");
    let (dir, path) = project(&text)?;
    fs::write(dir.path().join("ddos.o"), rootlet_ebpf::DDOS_V2).map_err(|e| BundleError::Io {
        path: "ddos.o".into(),
        source: e,
    })?;
    match Bundle::build(&path) {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field {
            line,
            col,
            field,
            ..
        })) => {
            assert_eq!((line, col, field.as_str()), (25, 10, "stages[1].object"));
        }
        other => panic!("expected a name clash, got {other:?}"),
    }
    Ok(())
}

#[test]
fn objects_outside_the_manifest_directory_are_refused_unless_named() -> TestResult {
    let (dir, _) = project(MANIFEST)?;
    let io = |e: std::io::Error| BundleError::Io {
        path: "test".into(),
        source: e,
    };
    // The project lives in `inner/`; an object one level up is outside it.
    let inner = dir.path().join("inner");
    fs::create_dir_all(inner.join("objs")).map_err(io)?;
    fs::copy(dir.path().join("l4lb.o"), dir.path().join("outside.o")).map_err(io)?;
    fs::copy(dir.path().join("objs/ddos.o"), inner.join("objs/ddos.o")).map_err(io)?;
    let manifest = inner.join("manifest.toml");
    fs::write(
        &manifest,
        MANIFEST.replace("\"l4lb.o\"", "\"../outside.o\""),
    )
    .map_err(io)?;
    match Bundle::build(&manifest) {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field {
            field,
            msg,
            ..
        })) => {
            assert_eq!(field, "stages[1].object", "{msg}");
            assert!(msg.contains("outside the manifest's directory"), "{msg}");
        }
        other => panic!("expected a manifest field error, got {other:?}"),
    }
    // A symbolic link that leads out is refused the same way.
    std::os::unix::fs::symlink(dir.path().join("outside.o"), inner.join("link.o")).map_err(io)?;
    fs::write(&manifest, MANIFEST.replace("\"l4lb.o\"", "\"link.o\"")).map_err(io)?;
    assert!(matches!(
        Bundle::build(&manifest),
        Err(BundleError::Manifest(
            rootlet_bundle::located::LocatedError::Field { .. }
        ))
    ));
    // Named on purpose, it is built in.
    fs::write(
        &manifest,
        MANIFEST.replace("\"l4lb.o\"", "\"../outside.o\""),
    )
    .map_err(io)?;
    let b = Bundle::build_allowing(&manifest, &[dir.path().join("outside.o")])?;
    assert!(b.object("outside.o").is_some());
    Ok(())
}

#[test]
fn missing_object() -> TestResult {
    let (dir, path) = project(MANIFEST)?;
    let _ = fs::remove_file(dir.path().join("l4lb.o"));
    match Bundle::build(&path) {
        Err(BundleError::MissingObject { stage, object }) => {
            assert_eq!(stage, "l4lb");
            assert_eq!(object, dir.path().join("l4lb.o"));
        }
        other => panic!("expected MissingObject, got {other:?}"),
    }
    Ok(())
}

#[test]
fn objects_must_be_ebpf_elf() -> TestResult {
    let (dir, path) = project(MANIFEST)?;
    let write = |data: &[u8]| {
        fs::write(dir.path().join("l4lb.o"), data).map_err(|e| BundleError::Io {
            path: "l4lb.o".into(),
            source: e,
        })
    };
    write(b"int main() { return 0; }\n")?;
    assert!(
        matches!(Bundle::build(&path), Err(BundleError::NotElf { ref reason, .. }) if reason == "no ELF magic")
    );
    let mut x86 = fake_elf(b"");
    x86[18] = 62; // EM_X86_64
    write(&x86)?;
    assert!(matches!(
        Bundle::build(&path),
        Err(BundleError::NotElf { .. })
    ));
    write(b"\x7fELF")?;
    assert!(matches!(
        Bundle::build(&path),
        Err(BundleError::NotElf { .. })
    ));
    Ok(())
}

#[test]
fn recorded_sha256_is_checked_at_build() -> TestResult {
    let good = sha256_hex(rootlet_ebpf::L4LB);
    let text = MANIFEST.replace(
        "program = \"l4lb\"",
        &format!("program = \"l4lb\"\nsha256 = \"{good}\""),
    );
    let (_dir, path) = project(&text)?;
    Bundle::build(&path)?;

    let bad = sha256_hex(b"something else");
    let text = MANIFEST.replace(
        "program = \"l4lb\"",
        &format!("program = \"l4lb\"\nsha256 = \"{bad}\""),
    );
    let (_dir, path) = project(&text)?;
    match Bundle::build(&path) {
        Err(BundleError::DigestMismatch {
            expected, actual, ..
        }) => {
            assert_eq!(expected, bad);
            assert_eq!(actual, good);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn manifest_file_errors() -> TestResult {
    let (dir, path) = project(MANIFEST)?;
    fs::write(&path, b"name = \"x\"\nversion = \"\xff\"\n").map_err(|e| BundleError::Io {
        path: path.clone(),
        source: e,
    })?;
    assert!(matches!(
        Bundle::build(&path),
        Err(BundleError::Manifest(
            rootlet_bundle::located::LocatedError::Syntax {
                line: 2,
                col: 12,
                ..
            }
        ))
    ));
    assert!(matches!(
        Bundle::build(dir.path().join("nope.toml")),
        Err(BundleError::Io { .. })
    ));
    Ok(())
}

#[test]
fn from_parts_checks_its_inputs() -> TestResult {
    let m = Manifest::parse(SMALL, "m.toml")?;
    let a = fake_elf(b"object a");
    let b = fake_elf(b"object b");

    let only_a = BTreeMap::from([("a.o".to_string(), a.clone())]);
    assert!(matches!(
        Bundle::from_parts(m.clone(), only_a),
        Err(BundleError::MissingObject { ref stage, .. }) if stage == "b"
    ));

    let extra = BTreeMap::from([
        ("a.o".to_string(), a.clone()),
        ("b.o".to_string(), b.clone()),
        ("c.o".to_string(), b.clone()),
    ]);
    assert!(matches!(
        Bundle::from_parts(m.clone(), extra),
        Err(BundleError::UnusedObject { ref object }) if object == "c.o"
    ));

    let mut pinned = m.clone();
    pinned.stages[0].sha256 = Some(sha256_hex(b"not it"));
    let both = BTreeMap::from([
        ("a.o".to_string(), a.clone()),
        ("b.o".to_string(), b.clone()),
    ]);
    assert!(matches!(
        Bundle::from_parts(pinned, both.clone()),
        Err(BundleError::DigestMismatch { .. })
    ));

    // Values the parser would refuse are refused here too.
    let mut bad = m.clone();
    bad.stages[0].owner = String::new();
    assert!(matches!(
        Bundle::from_parts(bad, both.clone()),
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field { ref field, .. })) if field == "stages[0].owner"
    ));
    let mut path = m.clone();
    path.stages[0].object = "dir/a.o".into();
    let objects = BTreeMap::from([("dir/a.o".to_string(), a), ("b.o".to_string(), b)]);
    assert!(matches!(
        Bundle::from_parts(path, objects),
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field { ref field, .. })) if field == "stages[0].object"
    ));

    let huge = BTreeMap::from([("a.o".to_string(), fake_elf(&vec![0; MAX_OBJECT_SIZE]))]);
    assert!(matches!(
        Bundle::from_parts(m, huge),
        Err(BundleError::TooLarge { .. })
    ));
    Ok(())
}

#[test]
fn every_prefix_is_truncated() -> TestResult {
    let bytes = small_bundle()?.to_bytes();
    for len in 0..bytes.len() {
        match Bundle::from_bytes(&bytes[..len]) {
            Err(BundleError::Truncated { .. }) => {}
            other => panic!("prefix of {len} bytes: expected Truncated, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn every_prefix_of_a_real_bundle_is_refused() -> TestResult {
    let (_dir, path) = project(MANIFEST)?;
    let bytes = Bundle::build(&path)?.to_bytes();
    // Every length around each boundary, and a stride through the rest.
    for len in (0..bytes.len()).filter(|l| l % 97 == 0 || *l < 600 || bytes.len() - l < 64) {
        assert!(
            Bundle::from_bytes(&bytes[..len]).is_err(),
            "prefix of {len} bytes"
        );
    }
    Ok(())
}

#[test]
fn garbage_is_refused() {
    for seed in 1..200u64 {
        let len = (seed as usize * 37) % 3000;
        let mut junk = noise(seed, len);
        assert!(Bundle::from_bytes(&junk).is_err(), "seed {seed}");
        // Behind a valid magic and version too.
        let mut framed = b"RLTBUNDL\x01\x00\x00\x00".to_vec();
        framed.append(&mut junk);
        assert!(Bundle::from_bytes(&framed).is_err(), "seed {seed}");
    }
}

#[test]
fn every_byte_flip_is_caught_or_changes_the_digest() -> TestResult {
    let b = small_bundle()?;
    let bytes = b.to_bytes();
    for i in 0..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[i] ^= 0x01;
        // A flip inside the manifest text can give another valid bundle
        // (priority 1 -> 0); it never gives this one.
        if let Ok(other) = Bundle::from_bytes(&flipped) {
            assert_ne!(other.digest(), b.digest(), "flip at {i}");
        }
    }
    Ok(())
}

#[test]
fn object_bytes_are_checked_against_the_manifest() -> TestResult {
    let bytes = small_bundle()?.to_bytes();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1; // the last byte of b.o
    flipped[last] ^= 0xff;
    match Bundle::from_bytes(&flipped) {
        Err(BundleError::DigestMismatch {
            object,
            expected,
            actual,
        }) => {
            assert_eq!(object, "b.o");
            assert_eq!(expected, sha256_hex(&fake_elf(b"object b")));
            assert_ne!(actual, expected);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn container_rules() -> TestResult {
    let b = small_bundle()?;
    let text = b.manifest_text();
    let a = fake_elf(b"object a");
    let bo = fake_elf(b"object b");

    let malformed = |bytes: &[u8]| {
        matches!(
            Bundle::from_bytes(bytes),
            Err(BundleError::Malformed { .. })
        )
    };
    // Trailing bytes.
    let mut trailing = b.to_bytes();
    trailing.push(0);
    assert!(malformed(&trailing));
    // Bad magic, unknown version.
    let mut magic = b.to_bytes();
    magic[0] = b'X';
    assert!(malformed(&magic));
    let mut version = b.to_bytes();
    version[8] = 3;
    assert!(malformed(&version));
    // Version 2 (policies) without its policies section.
    version[8] = 2;
    assert!(matches!(
        Bundle::from_bytes(&version),
        Err(BundleError::Truncated { .. })
    ));
    // Objects out of order, or repeated.
    assert!(malformed(&encode(text, &[("b.o", &bo), ("a.o", &a)])));
    assert!(malformed(&encode(
        text,
        &[("a.o", &a), ("a.o", &a), ("b.o", &bo)]
    )));
    // Bad object names.
    assert!(malformed(&encode(text, &[("", &a)])));
    assert!(malformed(&encode(text, &[("../a.o", &a)])));
    // A manifest that is not UTF-8.
    let mut latin1 = encode(text, &[("a.o", &a), ("b.o", &bo)]);
    latin1[17] = 0xff;
    assert!(malformed(&latin1));

    // An object no stage uses; a stage whose object is not there.
    assert!(matches!(
        Bundle::from_bytes(&encode(text, &[("a.o", &a), ("b.o", &bo), ("c.o", &a)])),
        Err(BundleError::UnusedObject { .. })
    ));
    assert!(matches!(
        Bundle::from_bytes(&encode(text, &[("a.o", &a)])),
        Err(BundleError::MissingObject { .. })
    ));
    // A manifest that does not parse names the embedded file.
    match Bundle::from_bytes(&encode("name = ", &[])) {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Syntax {
            file, ..
        })) => assert_eq!(file, "bundle:manifest.toml"),
        other => panic!("expected a manifest syntax error, got {other:?}"),
    }
    // A manifest on disk is not a bundle's: no sha256.
    assert!(matches!(
        Bundle::from_bytes(&encode(SMALL, &[("a.o", &a), ("b.o", &bo)])),
        Err(BundleError::Manifest(
            rootlet_bundle::located::LocatedError::Field { .. }
        ))
    ));
    Ok(())
}

#[test]
fn size_limits() {
    let too_large =
        |bytes: &[u8]| matches!(Bundle::from_bytes(bytes), Err(BundleError::TooLarge { .. }));
    let header = |rest: &[u8]| {
        let mut h = b"RLTBUNDL\x01\x00\x00\x00".to_vec();
        h.extend_from_slice(rest);
        h
    };
    // A manifest length over 1 MiB: refused before reading it.
    assert!(too_large(&header(
        &(MAX_MANIFEST_SIZE as u32 + 1).to_le_bytes()
    )));
    assert!(too_large(&header(&u32::MAX.to_le_bytes())));
    // 65 objects.
    let mut count = 0u32.to_le_bytes().to_vec();
    count.extend_from_slice(&65u32.to_le_bytes());
    assert!(too_large(&header(&count)));
    // An object over 16 MiB.
    let mut object = 0u32.to_le_bytes().to_vec();
    object.extend_from_slice(&1u32.to_le_bytes());
    object.extend_from_slice(&3u16.to_le_bytes());
    object.extend_from_slice(b"a.o");
    object.extend_from_slice(&(MAX_OBJECT_SIZE as u32 + 1).to_le_bytes());
    assert!(too_large(&header(&object)));
    // Input over 64 MiB.
    assert!(too_large(&vec![0u8; MAX_BUNDLE_SIZE + 1]));
}

#[test]
fn hostile_manifests_are_refused_without_overflow() {
    let nested = format!("name = {}", "[".repeat(100_000));
    assert!(Bundle::from_bytes(&encode(&nested, &[])).is_err());
    let tables = "[a]\n".repeat(10_000);
    assert!(Bundle::from_bytes(&encode(&tables, &[])).is_err());
    assert!(Manifest::parse(&"x.".repeat(50_000), "m.toml").is_err());
}
