//! Property tests of every parser of outside input in this crate: bundle
//! decoding (plain and signed), manifests (through `Manifest::parse`, the
//! public entry point, whatever parses underneath) and policy documents
//! (TOML, JSON, canonical bytes, signed). For each: no panic on arbitrary
//! bytes or on a valid input with a few edits; an error that says where
//! (a byte offset inside the input, or `file:line:col` inside the text);
//! and a round trip where there is one (bundle build/encode/decode,
//! canonical policy JSON).
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

mod common;
#[path = "common/mutate.rs"]
mod mutate;

use std::collections::BTreeMap;

use proptest::prelude::*;
use rootlet_bundle::{
    Bundle, BundleError, Manifest, PolicyDocument, PolicyError, SignedBundle, SignedPolicy,
    generate_signing_key,
};
use serde_json::{Value, json};

/// A real bundle: the ddos and l4lb objects, two rootlets.
fn real_bundle() -> Vec<u8> {
    let (_dir, manifest) = common::project(common::MANIFEST).unwrap();
    Bundle::build(&manifest).unwrap().to_bytes()
}

/// A signed bundle with one signature.
fn signed_bundle() -> Vec<u8> {
    let mut s = SignedBundle::new(common::small_bundle().unwrap());
    s.sign(&generate_signing_key().unwrap());
    s.to_bytes()
}

/// Every error a bundle decode can give points inside the input.
fn precise_bundle_error(e: &BundleError, len: usize) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.is_empty());
    match e {
        BundleError::Truncated { offset, .. } | BundleError::Malformed { offset, .. } => {
            prop_assert!(*offset <= len, "{msg}: offset past the input's {len} bytes");
        }
        BundleError::Manifest(located) => {
            let position = located.position();
            prop_assert!(
                matches!(position, Some((line, col)) if line >= 1 && col >= 1),
                "{msg}"
            );
        }
        BundleError::DigestMismatch {
            expected, actual, ..
        } => {
            prop_assert_ne!(expected, actual);
        }
        _ => {}
    }
    Ok(())
}

/// A manifest of `stages` stages (priority, tag of its object), with
/// `version`.
fn manifest_text(version: u32, stages: &[(u32, Vec<u8>)]) -> String {
    let mut t =
        format!("name = \"gen\"\nversion = \"{version}\"\n\n[[rootlets]]\ninterface = \"lo\"\n");
    for (i, (prio, _)) in stages.iter().enumerate() {
        t.push_str(&format!(
            "\n[[stages]]\nname = \"s{i}\"\nobject = \"s{i}.o\"\nprogram = \"p{i}\"\npriority = {}\nowner = \"team\"\n",
            // Priorities are unique per rootlet.
            prio * 8 + i as u32 + 1
        ));
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Build, encode, decode: the same bundle, the same bytes, the same
    /// digest, for generated manifests and objects.
    #[test]
    fn built_bundles_round_trip(
        version in 1u32..1000,
        stages in prop::collection::vec((0u32..100, prop::collection::vec(any::<u8>(), 0..200)), 1..5),
    ) {
        let text = manifest_text(version, &stages);
        let manifest = Manifest::parse(&text, "gen.toml").unwrap();
        let objects: BTreeMap<_, _> = stages
            .iter()
            .enumerate()
            .map(|(i, (_, tag))| (format!("s{i}.o"), common::fake_elf(tag)))
            .collect();
        let built = Bundle::from_parts(manifest, objects.clone()).unwrap();
        let bytes = built.to_bytes();
        let decoded = Bundle::from_bytes(&bytes).unwrap();
        prop_assert_eq!(decoded.to_bytes(), bytes);
        prop_assert_eq!(decoded.digest(), built.digest());
        prop_assert_eq!(decoded.manifest_text(), built.manifest_text());
        for (name, data) in &objects {
            prop_assert_eq!(decoded.object(name).map(|o| o.as_slice()), Some(data.as_slice()));
        }
    }

    /// Arbitrary bytes, and arbitrary bytes after the magic of a bundle,
    /// never panic the decoder.
    #[test]
    fn arbitrary_bytes_never_panic_the_bundle_decoder(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        prefix in 0usize..64,
    ) {
        for input in [bytes.clone(), {
            let mut b = real_bundle_head()[..prefix.min(real_bundle_head().len())].to_vec();
            b.extend_from_slice(&bytes);
            b
        }] {
            if let Err(e) = Bundle::from_bytes(&input) {
                precise_bundle_error(&e, input.len())?;
            }
            let _ = SignedBundle::from_bytes(&input);
        }
    }
}

/// The first bytes of a real bundle (magic, version, first lengths).
fn real_bundle_head() -> &'static [u8] {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| real_bundle()[..64].to_vec())
}

fn real_bundle_bytes() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(real_bundle)
}

fn signed_bundle_bytes() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(signed_bundle)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A real bundle with a few edits: decodes to exactly its input
    /// (one bundle, one encoding), or fails with an error that points
    /// inside it. Never panics.
    #[test]
    fn mutated_bundles_fail_precisely(edits in mutate::edits(4)) {
        let input = mutate::apply(real_bundle_bytes(), &edits);
        match Bundle::from_bytes(&input) {
            Ok(b) => prop_assert_eq!(b.to_bytes(), input),
            Err(e) => precise_bundle_error(&e, input.len())?,
        }
    }

    /// The same for a signed bundle.
    #[test]
    fn mutated_signed_bundles_fail_precisely(edits in mutate::edits(4)) {
        let input = mutate::apply(signed_bundle_bytes(), &edits);
        match SignedBundle::from_bytes(&input) {
            Ok(b) => prop_assert_eq!(b.to_bytes(), input),
            Err(e) => precise_bundle_error(&e, input.len())?,
        }
    }

    /// A manifest with a few edits parses, or fails naming
    /// `file:line:col` inside it.
    #[test]
    fn mutated_manifests_fail_at_a_line(text in mutate::mutated_text(common::MANIFEST)) {
        if let Err(e) = Manifest::parse(&text, "m.toml") {
            mutate::located(&e.to_string(), "m.toml", &text)?;
        }
    }
}

/// A policy error from text is located in the text, or is about its
/// size.
fn precise_policy_error(e: &PolicyError, file: &str, text: &str) -> Result<(), TestCaseError> {
    match e {
        PolicyError::TooLarge { .. } => Ok(()),
        _ => mutate::located(&e.to_string(), file, text),
    }
}

/// A JSON value of the kinds a policy's keys and values are written in.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<bool>().prop_map(|b| json!(b)),
        "[ -~é€]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A policy document as JSON text: a stage, a version, maybe a
/// description, one to three maps of entries with distinct keys.
fn policy_json() -> impl Strategy<Value = String> {
    (
        "[a-z][a-z0-9_.-]{0,10}",
        1u64..u64::MAX,
        prop::option::of("[ -~é]{0,40}"),
        prop::collection::btree_map(
            "[a-z][a-z0-9_]{0,10}",
            prop::collection::vec((json_value(), json_value()), 0..5),
            1..4,
        ),
    )
        .prop_map(|(stage, version, description, maps)| {
            let maps: serde_json::Map<_, _> = maps
                .into_iter()
                .map(|(name, entries)| {
                    let mut seen = std::collections::BTreeSet::new();
                    let entries: Vec<_> = entries
                        .into_iter()
                        .filter(|(k, _)| seen.insert(k.to_string()))
                        .map(|(key, value)| json!({ "key": key, "value": value }))
                        .collect();
                    (name, json!({ "entries": entries }))
                })
                .collect();
            let mut doc = json!({ "stage": stage, "version": version, "maps": maps });
            if let Some(d) = description {
                doc["description"] = json!(d);
            }
            serde_json::to_string_pretty(&doc).unwrap()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any policy that parses has one canonical encoding: decoding it
    /// gives the same document, encoding that gives the same bytes, and
    /// the canonical text parsed as JSON is the same document again.
    #[test]
    fn policies_round_trip_through_canonical_json(text in policy_json()) {
        let doc = match PolicyDocument::parse(&text, "p.json") {
            Ok(d) => d,
            // Generated values may break a rule of the format (a key
            // equal to another after normalisation...): then precisely.
            Err(e) => return precise_policy_error(&e, "p.json", &text),
        };
        let bytes = doc.to_canonical_bytes();
        let back = PolicyDocument::from_canonical_bytes(&bytes, "c").unwrap();
        prop_assert_eq!(&back, &doc);
        prop_assert_eq!(back.to_canonical_bytes(), bytes.clone());
        prop_assert_eq!(back.digest(), doc.digest());
        let reparsed = PolicyDocument::parse(std::str::from_utf8(&bytes).unwrap(), "c.json").unwrap();
        prop_assert_eq!(reparsed, doc);
    }

    /// Signed policy encode/decode is exact, and edits of its bytes fail
    /// at an offset inside them or decode to exactly the input.
    #[test]
    fn signed_policies_round_trip_and_fail_precisely(edits in mutate::edits(4)) {
        let doc = PolicyDocument::parse(common::POLICY_TOML, "p.toml").unwrap();
        let mut signed = SignedPolicy::new(doc.clone());
        signed.sign(&signing_key());
        let bytes = signed.to_bytes();
        let back = SignedPolicy::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&back.policy, &doc);
        prop_assert_eq!(back.to_bytes(), bytes.clone());

        let input = mutate::apply(&bytes, &edits);
        match SignedPolicy::from_bytes(&input) {
            Ok(p) => prop_assert_eq!(p.to_bytes(), input),
            Err(PolicyError::Truncated { offset, .. } | PolicyError::Malformed { offset, .. }) => {
                prop_assert!(offset <= input.len());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

fn signing_key() -> rootlet_bundle::SigningKey {
    static K: std::sync::OnceLock<rootlet_bundle::SigningKey> = std::sync::OnceLock::new();
    K.get_or_init(|| generate_signing_key().unwrap()).clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A policy (TOML or JSON) with a few edits parses, or fails naming
    /// `file:line:col` inside it.
    #[test]
    fn mutated_policies_fail_at_a_line(
        toml in mutate::mutated_text(common::POLICY_TOML),
        json in mutate::mutated_text(common::POLICY_JSON),
    ) {
        for (text, file) in [(&toml, "p.toml"), (&json, "p.json")] {
            if let Err(e) = PolicyDocument::parse(text, file) {
                precise_policy_error(&e, file, text)?;
            }
        }
    }

    /// Canonical bytes with a few edits decode to exactly their input or
    /// fail; never panic.
    #[test]
    fn mutated_canonical_policies_never_panic(edits in mutate::edits(4)) {
        let bytes = PolicyDocument::parse(common::POLICY_TOML, "p.toml").unwrap().to_canonical_bytes();
        let input = mutate::apply(&bytes, &edits);
        match PolicyDocument::from_canonical_bytes(&input, "c") {
            Ok(d) => prop_assert_eq!(d.to_canonical_bytes(), input),
            Err(PolicyError::Malformed { offset, .. }) => prop_assert!(offset <= input.len()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
