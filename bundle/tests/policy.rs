//! Policy documents: parsing TOML and JSON with `file:line:col` errors,
//! the canonical bytes and digest, signing (with domain separation from
//! bundles), the signed encoding against hostile input, and diffs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{POLICY_JSON as JSON, POLICY_TOML as TOML};

use ed25519_dalek::Signer;
use rootlet_bundle::{
    BundleError, BundleSignature, KeyId, PolicyDocument, PolicyError, SignedBundle, SignedPolicy,
    generate_signing_key,
    policy::{EntryPart, Position, Value, sign::POLICY_SIGNING_CONTEXT},
    sign::SIGNING_CONTEXT,
};

fn toml_err(text: &str) -> String {
    PolicyDocument::parse(text, "p.toml")
        .unwrap_err()
        .to_string()
}

fn json_err(text: &str) -> String {
    PolicyDocument::parse(text, "p.json")
        .unwrap_err()
        .to_string()
}

#[test]
fn toml_and_json_parse_to_the_same_policy_and_digest() {
    let t = PolicyDocument::parse(TOML, "ddos.toml").unwrap();
    let j = PolicyDocument::parse(JSON, "ddos.json").unwrap();
    assert_eq!(t.stage, "ddos");
    assert_eq!(t.version, 7);
    assert_eq!(t.description.as_deref(), Some("block two nets"));
    assert_eq!(t.maps.len(), 2);
    assert_eq!(t.maps["ddos_blocklist"].entries.len(), 2);
    assert_eq!(
        t.maps["ddos_blocklist"].entries[1].key,
        Value::String("198.51.100.7/32".into())
    );
    assert_eq!(t, j);
    assert_eq!(t.to_canonical_bytes(), j.to_canonical_bytes());
    assert_eq!(t.digest(), j.digest());
    let canonical = String::from_utf8(t.to_canonical_bytes()).unwrap();
    assert_eq!(
        canonical,
        "{\"description\":\"block two nets\",\"maps\":{\"ddos_blocklist\":{\"entries\":[\n\
         {\"key\":\"192.0.2.0/24\",\"value\":0},\n\
         {\"key\":\"198.51.100.7/32\",\"value\":0}\n\
         ]},\"ddos_config\":{\"entries\":[\n\
         {\"key\":0,\"value\":{\"flags\":[1,2],\"on\":true,\"rate\":100}}\n\
         ]}},\"stage\":\"ddos\",\"version\":7}\n"
    );
    // The canonical bytes are a policy too, with the same digest.
    let again = PolicyDocument::parse(&canonical, "canonical").unwrap();
    assert_eq!(again.digest(), t.digest());
    // A change anywhere changes the digest.
    let v8 = PolicyDocument::parse(&TOML.replace("version = 7", "version = 8"), "x.toml").unwrap();
    assert_ne!(v8.digest(), t.digest());
    let other = PolicyDocument::parse(&TOML.replace("rate = 100", "rate = 101"), "x.toml").unwrap();
    assert_ne!(other.digest(), t.digest());
}

#[test]
fn the_format_is_chosen_by_extension_then_content() {
    assert!(PolicyDocument::parse(JSON, "no-extension").is_ok());
    assert!(PolicyDocument::parse(TOML, "no-extension").is_ok());
    // A .toml file is read as TOML even if it looks like JSON.
    assert!(
        toml_err(JSON).starts_with("p.toml:1:1: "),
        "{}",
        toml_err(JSON)
    );
}

#[test]
fn entries_keep_their_positions() {
    let t = PolicyDocument::parse(TOML, "ddos.toml").unwrap();
    let e = &t.maps["ddos_blocklist"].entries[1];
    assert_eq!(e.at, Position { line: 9, col: 3 });
    assert_eq!(e.key_at, Position { line: 9, col: 11 });
    assert_eq!(e.value_at, Position { line: 9, col: 38 });
    let j = PolicyDocument::parse(JSON, "ddos.json").unwrap();
    let e = &j.maps["ddos_blocklist"].entries[1];
    assert_eq!(e.at, Position { line: 9, col: 9 });
    assert_eq!(e.key_at, Position { line: 9, col: 16 });
    assert_eq!(e.value_at, Position { line: 9, col: 42 });
    let c = &j.maps["ddos_config"].entries[0];
    assert_eq!(c.value_at, Position { line: 5, col: 46 });
    // A later (typed) check points at them.
    let err = j
        .entry_error(
            "ddos_blocklist",
            1,
            EntryPart::Key,
            "",
            "not an IPv4 prefix",
        )
        .to_string();
    assert_eq!(
        err,
        "ddos.json:9:16: maps.ddos_blocklist.entries[1].key: not an IPv4 prefix"
    );
    let err = t
        .entry_error("ddos_config", 0, EntryPart::Value, ".rate", "out of range")
        .to_string();
    assert_eq!(
        err,
        "ddos.toml:13:31: maps.ddos_config.entries[0].value.rate: out of range"
    );
}

#[test]
fn toml_errors_name_file_line_col_and_field() {
    let cases: &[(&str, &str)] = &[
        // syntax
        ("stage = \"ddos\"\nversion = \n", "p.toml:2:11: "),
        // unknown key at the top
        (
            "stage = \"ddos\"\nversion = 1\nowner = \"x\"\n[maps.m]\nentries = []\n",
            "p.toml:3:1: owner: unknown field `owner`",
        ),
        // missing field
        (
            "stage = \"ddos\"\n[maps.m]\nentries = []\n",
            "missing field `version`",
        ),
        // wrong type
        (
            "stage = \"ddos\"\nversion = \"7\"\n[maps.m]\nentries = []\n",
            "p.toml:2:11: version: invalid type: string \"7\"",
        ),
        // version 0
        (
            "stage = \"ddos\"\nversion = 0\n[maps.m]\nentries = []\n",
            "p.toml:2:11: version: must be at least 1",
        ),
        // bad stage name
        (
            "stage = \"dd os\"\nversion = 1\n[maps.m]\nentries = []\n",
            "p.toml:1:9: stage: \"dd os\" is not a stage name",
        ),
        // no maps
        (
            "stage = \"ddos\"\nversion = 1\nmaps = {}\n",
            "p.toml:3:8: maps: a policy sets at least one map",
        ),
        // bad map name
        (
            "stage = \"ddos\"\nversion = 1\n[maps.\"a-b\"]\nentries = []\n",
            "is not a map name",
        ),
        // entries missing
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\n",
            "p.toml:3:1: maps.m: missing field `entries`",
        ),
        // unknown key in an entry
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [{ key = 1, value = 2, ttl = 3 }]\n",
            "p.toml:4:34: maps.m.entries[0].ttl: unknown field `ttl`",
        ),
        // missing value
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [{ key = 1 }]\n",
            "p.toml:4:12: maps.m.entries[0]: missing field `value`",
        ),
        // a float
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [{ key = 1, value = 1.5 }]\n",
            "p.toml:4:31: maps.m.entries[0].value: expected an integer, a string, a boolean, an array or an object, found a floating-point number",
        ),
        // a datetime, nested
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [{ key = 1, value = { at = 1979-05-27 } }]\n",
            "maps.m.entries[0].value.at: expected an integer, a string, a boolean, an array or an object, found a datetime",
        ),
        // duplicate key in one map (the same JSON value)
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [\n{ key = { a = 1, b = 2 }, value = 1 },\n{ key = { b = 2, a = 1 }, value = 2 },\n]\n",
            "p.toml:6:9: maps.m.entries[1].key: the same key as entries[0] (line 5)",
        ),
        // a map named twice is a TOML error already
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = []\n[maps.m]\nentries = []\n",
            "p.toml:5:",
        ),
        // a key written twice inside a value is a TOML error already
        (
            "stage = \"ddos\"\nversion = 1\n[maps.m]\nentries = [{ key = { a = 1, a = 2 }, value = 1 }]\n",
            "p.toml:4:",
        ),
    ];
    for (text, want) in cases {
        let e = toml_err(text);
        assert!(e.contains(want), "{text:?}\n  got:  {e}\n  want: {want}");
        assert!(e.starts_with("p.toml:"), "{e}");
    }
}

#[test]
fn json_errors_name_file_line_col_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            "{\"stage\": \"ddos\",\n \"version\": }",
            "p.json:2:13: expected value",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": []}}, \"owner\": 1}",
            "p.json:1:71: owner: unknown field `owner`",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 0, \"maps\": {\"m\": {\"entries\": []}}}",
            "p.json:1:30: version: must be at least 1",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": []}, \"m\": {\"entries\": []}}}",
            "maps: map \"m\" is named twice",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"stage\": \"x\", \"maps\": {\"m\": {\"entries\": []}}}",
            "duplicate field `stage`",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": 1, \"value\": null}]}}}",
            "p.json:2:26: maps.m.entries[0].value: expected an integer, a string, a boolean, an array or an object, found null",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": 1, \"value\": {\"a\": [1, 2.5]}}]}}}",
            "p.json:2:35: maps.m.entries[0].value.a[1]: expected an integer",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": {\"a\": 1, \"a\": 2}, \"value\": 1}]}}}",
            "maps.m.entries[0].key: member \"a\" is written twice",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": 1, \"value\": 1, \"x\": 1}]}}}",
            "p.json:2:28: maps.m.entries[0].x: unknown field `x`",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": 1, \"value\": 1},\n  {\"key\": 1, \"value\": 2}]}}}",
            "p.json:3:11: maps.m.entries[1].key: the same key as entries[0] (line 2)",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": [\n  {\"key\": 18446744073709551616, \"value\": 1}]}}}",
            "maps.m.entries[0].key: expected an integer",
        ),
        (
            "{\"stage\": \"ddos\", \"version\": 1, \"maps\": {\"m\": {\"entries\": []}}} x",
            "p.json:1:",
        ),
    ];
    for (text, want) in cases {
        let e = json_err(text);
        assert!(e.contains(want), "{text:?}\n  got:  {e}\n  want: {want}");
        assert!(e.starts_with("p.json:"), "{e}");
    }
}

#[test]
fn limits_are_enforced_with_positions() {
    use rootlet_bundle::policy::limits::{MAX_ENTRIES_PER_MAP, MAX_MAPS};
    // One map too many.
    let mut t = String::from("stage = \"ddos\"\nversion = 1\n");
    for i in 0..=MAX_MAPS {
        t.push_str(&format!("[maps.m{i}]\nentries = []\n"));
    }
    let e = toml_err(&t);
    assert!(
        e.contains(&format!("maps: more than {MAX_MAPS} maps in one policy")),
        "{e}"
    );
    // One entry too many, in JSON (the error is where it is read).
    let mut j = String::from("{\"stage\":\"ddos\",\"version\":1,\"maps\":{\"m\":{\"entries\":[\n");
    for i in 0..=MAX_ENTRIES_PER_MAP {
        if i > 0 {
            j.push_str(",\n");
        }
        j.push_str(&format!("{{\"key\":{i},\"value\":0}}"));
    }
    j.push_str("]}}}");
    let e = json_err(&j);
    assert!(
        e.starts_with(&format!("p.json:{}:", MAX_ENTRIES_PER_MAP + 2))
            && e.contains(&format!(
                "maps.m.entries: more than {MAX_ENTRIES_PER_MAP} entries in one map"
            )),
        "{e}"
    );
    // Exactly the limit is fine.
    let at_limit = j.rsplit_once(",\n").unwrap().0.to_string() + "]}}}";
    let doc = PolicyDocument::parse(&at_limit, "p.json").unwrap();
    assert_eq!(doc.maps["m"].entries.len(), MAX_ENTRIES_PER_MAP);
    // A description too long.
    let long = "x".repeat(1025);
    let e = toml_err(&format!(
        "stage = \"ddos\"\nversion = 1\ndescription = \"{long}\"\n[maps.m]\nentries = []\n"
    ));
    assert!(
        e.contains("p.toml:3:15: description: longer than 1024 characters"),
        "{e}"
    );
}

fn signed(keys: &[&rootlet_bundle::SigningKey]) -> SignedPolicy {
    let mut p = SignedPolicy::new(PolicyDocument::parse(TOML, "ddos.toml").unwrap());
    for k in keys {
        p.sign(k);
    }
    p
}

#[test]
fn sign_encode_decode_verify() {
    let (a, b, c) = (
        generate_signing_key().unwrap(),
        generate_signing_key().unwrap(),
        generate_signing_key().unwrap(),
    );
    let p = signed(&[&a, &b]);
    let bytes = p.to_bytes();
    assert!(bytes.starts_with(b"RLTPOLCY"));
    let back = SignedPolicy::from_bytes(&bytes).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.to_bytes(), bytes);
    let v = back.verify(&[b.verifying_key()]).unwrap();
    assert_eq!(v.signers(), &[KeyId::of(&b.verifying_key())]);
    assert_eq!(v.digest(), p.policy.digest());
    assert_eq!(v.policy().version, 7);
    let v = back
        .verify(&[a.verifying_key(), b.verifying_key(), c.verifying_key()])
        .unwrap();
    assert_eq!(v.signers().len(), 2);
    assert!(matches!(
        back.verify(&[c.verifying_key()]),
        Err(PolicyError::UntrustedSignature { .. })
    ));
    assert!(matches!(
        signed(&[]).verify(&[a.verifying_key()]),
        Err(PolicyError::Unsigned)
    ));
    // Signing again with the same key replaces its signature.
    let mut again = p.clone();
    again.sign(&a);
    assert_eq!(again.signatures.len(), 2);
}

#[test]
fn a_changed_policy_no_longer_verifies() {
    let a = generate_signing_key().unwrap();
    let mut p = signed(&[&a]);
    p.policy.version = 8;
    assert!(matches!(
        p.verify(&[a.verifying_key()]),
        Err(PolicyError::BadSignature { .. })
    ));
    // The same through the bytes: an entry edited inside the encoding
    // (same length, still canonical) breaks the signature.
    let bytes = signed(&[&a]).to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let at = text.find("198.51.100.7").unwrap();
    let mut forged = bytes.clone();
    forged[at + 11] = b'9';
    let decoded = SignedPolicy::from_bytes(&forged).unwrap();
    assert_eq!(
        decoded.policy.maps["ddos_blocklist"].entries[1].key,
        Value::String("198.51.100.9/32".into())
    );
    assert!(matches!(
        decoded.verify(&[a.verifying_key()]),
        Err(PolicyError::BadSignature { .. })
    ));
}

/// A bundle signature over a digest is never a policy signature over the
/// same digest, and the reverse: the contexts differ.
#[test]
fn bundle_and_policy_signatures_are_domain_separated() {
    let key = generate_signing_key().unwrap();
    let id = KeyId::of(&key.verifying_key());

    // What a bundle signature over the policy's digest would be.
    let mut p = signed(&[]);
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(p.policy.digest().as_bytes());
    p.signatures.push(BundleSignature {
        key_id: id,
        signature: key.sign(&msg),
    });
    assert!(matches!(
        p.verify(&[key.verifying_key()]),
        Err(PolicyError::BadSignature { key_id }) if key_id == id
    ));
    // ... and the policy context with the same digest does verify, so the
    // test above fails for the context alone.
    let mut msg = POLICY_SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(p.policy.digest().as_bytes());
    p.signatures[0].signature = key.sign(&msg);
    assert!(p.verify(&[key.verifying_key()]).is_ok());

    // What a policy signature over the bundle's digest would be.
    let bundle = common::small_bundle().unwrap();
    let mut sb = SignedBundle::new(bundle);
    let mut msg = POLICY_SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(sb.bundle.digest().as_bytes());
    sb.signatures.push(BundleSignature {
        key_id: id,
        signature: key.sign(&msg),
    });
    assert!(matches!(
        sb.verify(&[key.verifying_key()]),
        Err(BundleError::BadSignature { key_id }) if key_id == id
    ));
    sb.signatures.clear();
    sb.sign(&key);
    assert!(sb.verify(&[key.verifying_key()]).is_ok());
    // The policy and bundle encodings are not each other's either.
    assert!(SignedPolicy::from_bytes(&sb.to_bytes()).is_err());
    assert!(SignedBundle::from_bytes(&signed(&[&key]).to_bytes()).is_err());
}

#[test]
fn decoding_refuses_what_is_not_canonical() {
    let a = generate_signing_key().unwrap();
    let bytes = signed(&[&a]).to_bytes();
    // Trailing bytes, truncation, bad magic, bad version.
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        SignedPolicy::from_bytes(&longer),
        Err(PolicyError::Malformed { .. })
    ));
    assert!(matches!(
        SignedPolicy::from_bytes(&bytes[..bytes.len() - 1]),
        Err(PolicyError::Truncated { .. })
    ));
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(matches!(
        SignedPolicy::from_bytes(&magic),
        Err(PolicyError::Malformed { offset: 0, .. })
    ));
    let mut version = bytes.clone();
    version[8] = 2;
    let e = SignedPolicy::from_bytes(&version).unwrap_err().to_string();
    assert!(
        e.contains("unsupported signed policy format version 2"),
        "{e}"
    );

    // A valid policy in JSON, but not in canonical form (a space added).
    let doc = PolicyDocument::parse(TOML, "ddos.toml").unwrap();
    let canonical = doc.to_canonical_bytes();
    let spaced = String::from_utf8(canonical.clone()).unwrap().replacen(
        "\"version\":7",
        "\"version\": 7",
        1,
    );
    let mut enc = b"RLTPOLCY".to_vec();
    enc.extend_from_slice(&1u32.to_le_bytes());
    enc.extend_from_slice(&(spaced.len() as u32).to_le_bytes());
    enc.extend_from_slice(spaced.as_bytes());
    enc.extend_from_slice(&0u16.to_le_bytes());
    let e = SignedPolicy::from_bytes(&enc).unwrap_err().to_string();
    assert!(e.contains("not in canonical form"), "{e}");
    // The same bytes with the canonical document decode.
    let mut enc = b"RLTPOLCY".to_vec();
    enc.extend_from_slice(&1u32.to_le_bytes());
    enc.extend_from_slice(&(canonical.len() as u32).to_le_bytes());
    enc.extend_from_slice(&canonical);
    enc.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(SignedPolicy::from_bytes(&enc).unwrap().policy, doc);

    // Signatures out of order.
    let b = generate_signing_key().unwrap();
    let two = signed(&[&a, &b]).to_bytes();
    let n = two.len();
    let mut swapped = two.clone();
    let (first, second) = (n - 144, n - 72);
    let s1 = two[first..second].to_vec();
    let s2 = two[second..].to_vec();
    swapped[first..second].copy_from_slice(&s2);
    swapped[second..].copy_from_slice(&s1);
    let e = SignedPolicy::from_bytes(&swapped).unwrap_err().to_string();
    assert!(e.contains("out of order or repeated"), "{e}");
}

/// Random and mutated input never panics, and never decodes into
/// something that encodes differently (one policy, one encoding).
#[test]
fn decoding_hostile_bytes_never_panics() {
    let a = generate_signing_key().unwrap();
    let good = signed(&[&a]).to_bytes();
    let mut rng = fastrand::Rng::with_seed(0x5eed_9011c7);
    let mut decoded = 0;
    for round in 0..20_000 {
        let input: Vec<u8> = match round % 4 {
            // Random bytes, sometimes behind the right magic and version.
            0 => (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect(),
            1 => {
                let mut v = good[..12].to_vec();
                v.extend((0..rng.usize(0..512)).map(|_| rng.u8(..)));
                v
            }
            // The good encoding with a few bytes changed, cut or added.
            2 => {
                let mut v = good.clone();
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(..v.len());
                    v[i] = rng.u8(..);
                }
                v
            }
            _ => {
                let mut v = good.clone();
                let i = rng.usize(..v.len());
                if rng.bool() {
                    v.truncate(i);
                } else {
                    v.insert(i, rng.u8(..));
                }
                v
            }
        };
        if let Ok(p) = SignedPolicy::from_bytes(&input) {
            decoded += 1;
            assert_eq!(p.to_bytes(), input, "round {round}");
            let _ = p.verify(&[a.verifying_key()]);
        }
    }
    // Some mutations (inside a signature, or a string) still decode.
    assert!(decoded > 0);
}

/// Mutated documents never panic the parser, in either format, and what
/// parses has a canonical form that parses back to it.
#[test]
fn parsing_mutated_documents_never_panics() {
    let mut rng = fastrand::Rng::with_seed(0x7011c7);
    for round in 0..4_000 {
        let (base, name) = if round % 2 == 0 {
            (TOML, "m.toml")
        } else {
            (JSON, "m.json")
        };
        let mut v = base.as_bytes().to_vec();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(..v.len());
            match rng.u8(0..3) {
                0 => v[i] = rng.u8(..),
                1 => {
                    v.remove(i);
                }
                _ => v.insert(i, b"{}[]\",=:0a.\n-"[rng.usize(0..13)]),
            }
        }
        let text = String::from_utf8_lossy(&v);
        if let Ok(doc) = PolicyDocument::parse(&text, name) {
            let again =
                PolicyDocument::from_canonical_bytes(&doc.to_canonical_bytes(), "c").unwrap();
            assert_eq!(again, doc, "round {round}: {text}");
        }
    }
}
