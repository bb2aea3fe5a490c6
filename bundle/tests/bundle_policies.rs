//! Bundles that carry initial policies for their stages: embedded in
//! canonical form, covered by the digest and the signatures, listed by
//! inspect, and refused with a precise error when they do not fit their
//! stage. A bundle without policies keeps its old bytes (see
//! `digest_is_pinned` in tests/bundle.rs).
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeMap, fs};

use common::{MANIFEST, fake_elf, project};
use rootlet_bundle::{
    Bundle, BundleError, Manifest, PolicyDocument, SignedBundle, generate_signing_key,
};

const BLOCKLIST: &str = r#"stage = "ddos"
version = 3
[maps.ddos_blocklist]
entries = [
  { key = "192.0.2.0/24", value = 0 },
]
"#;

const BLOCKLIST_JSON: &str = r#"{"maps": {"ddos_blocklist": {"entries": [
  {"value": 0, "key": "192.0.2.0/24"}]}}, "version": 3, "stage": "ddos"}"#;

const VIPS: &str = r#"{"stage": "l4lb", "version": 1, "maps": {"l4lb_vips": {"entries": []}}}"#;

/// MANIFEST with `policies` for the ddos stage (and, if given, l4lb).
fn manifest_with(ddos: &str, l4lb: Option<&str>) -> String {
    let mut m = MANIFEST.replace(
        "owner = \"team-ddos\"\n",
        &format!("owner = \"team-ddos\"\npolicies = [{ddos}]\n"),
    );
    if let Some(l) = l4lb {
        m = m.replace(
            "owner = \"team-lb\"\n",
            &format!("owner = \"team-lb\"\npolicies = [{l}]\n"),
        );
    }
    m
}

#[test]
fn policies_are_embedded_listed_and_round_trip() {
    let (dir, manifest) = project(&manifest_with(
        "\"policies/blocklist.toml\"",
        Some("\"vips.json\""),
    ))
    .unwrap();
    fs::create_dir_all(dir.path().join("policies")).unwrap();
    fs::write(dir.path().join("policies/blocklist.toml"), BLOCKLIST).unwrap();
    fs::write(dir.path().join("vips.json"), VIPS).unwrap();
    let b = Bundle::build(&manifest).unwrap();

    let ddos = b
        .manifest()
        .stages
        .iter()
        .find(|s| s.name == "ddos")
        .unwrap();
    assert_eq!(ddos.policies, ["blocklist.json"]);
    let p = b.stage_policies(ddos);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].version, 3);
    assert_eq!(p[0].maps["ddos_blocklist"].entries.len(), 1);
    let l4lb = b
        .manifest()
        .stages
        .iter()
        .find(|s| s.name == "l4lb")
        .unwrap();
    assert_eq!(b.stage_policies(l4lb)[0].stage, "l4lb");
    assert!(
        b.manifest_text()
            .contains("policies = [\"blocklist.json\"]\n")
    );
    assert_eq!(b.policies().len(), 2);

    let bytes = b.to_bytes();
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes(), "format version 2");
    let back = Bundle::from_bytes(&bytes).unwrap();
    assert_eq!(back, b);
    assert_eq!(back.digest(), b.digest());
    assert_eq!(back.to_bytes(), bytes);

    let text = b.inspect();
    assert!(
        text.contains(&format!(
            "policy blocklist.json version 3 digest {} maps ddos_blocklist (1)",
            p[0].digest()
        )),
        "{text}"
    );

    // The same policy in JSON gives the same bundle.
    fs::remove_file(dir.path().join("policies/blocklist.toml")).unwrap();
    fs::write(dir.path().join("policies/blocklist.json"), BLOCKLIST_JSON).unwrap();
    let m = fs::read_to_string(&manifest)
        .unwrap()
        .replace("blocklist.toml", "blocklist.json");
    fs::write(&manifest, m).unwrap();
    assert_eq!(Bundle::build(&manifest).unwrap().digest(), b.digest());

    // Another policy version: another digest.
    fs::write(
        dir.path().join("policies/blocklist.json"),
        BLOCKLIST_JSON.replace("\"version\": 3", "\"version\": 4"),
    )
    .unwrap();
    assert_ne!(Bundle::build(&manifest).unwrap().digest(), b.digest());
}

#[test]
fn no_policies_means_the_old_bytes() {
    let (_dir, plain) = project(MANIFEST).unwrap();
    let (_dir2, empty) = project(&manifest_with("", None)).unwrap();
    let a = Bundle::build(&plain).unwrap();
    let e = Bundle::build(&empty).unwrap();
    assert_eq!(a.to_bytes(), e.to_bytes());
    assert!(!a.manifest_text().contains("policies"));
    assert_eq!(&a.to_bytes()[8..12], &1u32.to_le_bytes());
    for s in &a.manifest().stages {
        assert!(a.stage_policies(s).is_empty());
    }
}

#[test]
fn the_signature_covers_the_policies() {
    let (dir, manifest) = project(&manifest_with("\"blocklist.toml\"", None)).unwrap();
    fs::write(dir.path().join("blocklist.toml"), BLOCKLIST).unwrap();
    let key = generate_signing_key().unwrap();
    let mut signed = SignedBundle::new(Bundle::build(&manifest).unwrap());
    signed.sign(&key);
    let bytes = signed.to_bytes();
    assert!(
        SignedBundle::from_bytes(&bytes)
            .unwrap()
            .verify(&[key.verifying_key()])
            .is_ok()
    );
    // One character of the embedded policy changed, still canonical.
    let at = bytes
        .windows(12)
        .position(|w| w == b"192.0.2.0/24")
        .unwrap();
    let mut forged = bytes.clone();
    forged[at + 6] = b'9';
    let decoded = SignedBundle::from_bytes(&forged).unwrap();
    let ddos = decoded
        .bundle
        .manifest()
        .stages
        .iter()
        .find(|s| s.name == "ddos")
        .unwrap();
    assert_eq!(
        decoded.bundle.stage_policies(ddos)[0].maps["ddos_blocklist"].entries[0].key,
        "192.0.9.0/24"
    );
    assert!(matches!(
        decoded.verify(&[key.verifying_key()]),
        Err(BundleError::BadSignature { .. })
    ));
}

#[test]
fn policies_that_do_not_fit_are_refused_with_their_position() {
    let build = |manifest: &str, files: &[(&str, &str)]| {
        let (dir, m) = project(manifest).unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        Bundle::build(&m).map_err(|e| e.to_string())
    };
    // Line 22 of MANIFEST + 1 is the `policies` line of the ddos stage.
    let line = MANIFEST
        .lines()
        .position(|l| l == "owner = \"team-ddos\"")
        .unwrap()
        + 2;

    // A policy for another stage.
    let e = build(
        &manifest_with("\"vips.json\"", None),
        &[("vips.json", VIPS)],
    )
    .unwrap_err();
    assert!(
        e.contains(&format!("manifest.toml:{line}:13: stages[0].policies[0]: "))
            && e.contains("sets maps of stage \"l4lb\", not of this stage (\"ddos\")"),
        "{e}"
    );
    // A file that is not there.
    let e = build(&manifest_with("\"gone.toml\"", None), &[]).unwrap_err();
    assert!(
        e.contains(&format!(
            "manifest.toml:{line}:13: stages[0].policies[0]: cannot read"
        )),
        "{e}"
    );
    // A policy with an error: the policy file's own position.
    let e = build(
        &manifest_with("\"bad.toml\"", None),
        &[(
            "bad.toml",
            "stage = \"ddos\"\nversion = 0\n[maps.m]\nentries = []\n",
        )],
    )
    .unwrap_err();
    assert!(
        e.contains("bad.toml:2:11: version: must be at least 1"),
        "{e}"
    );
    // Two policies of one stage that set the same map.
    let e = build(
        &manifest_with("\"a.toml\", \"b.toml\"", None),
        &[("a.toml", BLOCKLIST), ("b.toml", BLOCKLIST)],
    )
    .unwrap_err();
    assert!(
        e.contains("stage \"ddos\": policies a.json and b.json both set map \"ddos_blocklist\""),
        "{e}"
    );
    // Two files embedded under one name.
    let e = build(
        &manifest_with("\"a.toml\", \"a.json\"", None),
        &[("a.toml", BLOCKLIST), ("a.json", BLOCKLIST_JSON)],
    )
    .unwrap_err();
    assert!(
        e.contains("stages[0].policies[1]: \"a.json\" is listed twice"),
        "{e}"
    );
    // Outside the manifest's directory.
    let (dir, m) = project(&manifest_with("\"../outside.toml\"", None)).unwrap();
    let outside = dir.path().parent().unwrap().join("outside.toml");
    fs::write(&outside, BLOCKLIST).unwrap();
    let e = Bundle::build(&m).unwrap_err().to_string();
    let _ = fs::remove_file(&outside);
    assert!(e.contains("outside the manifest's directory"), "{e}");
}

#[test]
fn from_parts_checks_the_policies() {
    let text = common::SMALL.replace(
        "owner = \"tests\"\n\n[[stages]]",
        "owner = \"tests\"\npolicies = [\"a.json\"]\n\n[[stages]]",
    );
    let m = Manifest::parse(&text, "small.toml").unwrap();
    let objects = || {
        BTreeMap::from([
            ("a.o".to_string(), fake_elf(b"object a")),
            ("b.o".to_string(), fake_elf(b"object b")),
        ])
    };
    let policy = |stage: &str| {
        PolicyDocument::parse(
            &format!("stage = \"{stage}\"\nversion = 1\n[maps.m]\nentries = []\n"),
            "p.toml",
        )
        .unwrap()
    };
    let ok = Bundle::from_parts_with_policies(
        m.clone(),
        objects(),
        BTreeMap::from([("a.json".to_string(), policy("a"))]),
    )
    .unwrap();
    assert_eq!(Bundle::from_bytes(&ok.to_bytes()).unwrap(), ok);
    assert!(matches!(
        Bundle::from_parts(m.clone(), objects()),
        Err(BundleError::MissingPolicy { .. })
    ));
    assert!(matches!(
        Bundle::from_parts_with_policies(
            m.clone(),
            objects(),
            BTreeMap::from([("a.json".to_string(), policy("b"))]),
        ),
        Err(BundleError::PolicyStage { .. })
    ));
    assert!(matches!(
        Bundle::from_parts_with_policies(
            m,
            objects(),
            BTreeMap::from([
                ("a.json".to_string(), policy("a")),
                ("z.json".to_string(), policy("a"))
            ]),
        ),
        Err(BundleError::UnusedPolicy { .. })
    ));
}
