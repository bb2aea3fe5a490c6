//! Signing: key files, sign and verify with trusted, untrusted and
//! tampered bundles, the signed encoding, and `inspect`.

mod common;

use std::{collections::BTreeMap, fs, os::unix::fs::PermissionsExt};

use common::{MANIFEST, SMALL, fake_elf, project, small_bundle};
use rootlet_bundle::{
    Bundle, BundleError, KeyId, Manifest, SignedBundle, SigningKey, generate_signing_key, keygen,
    read_signing_key, read_verifying_key, sha256_hex, signing_key_from_pem, verifying_key_from_pem,
    verifying_key_to_pem,
};

type TestResult = Result<(), BundleError>;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn signed_small(signer: &SigningKey) -> Result<SignedBundle, BundleError> {
    let mut s = SignedBundle::new(small_bundle()?);
    s.sign(signer);
    Ok(s)
}

#[test]
fn keygen_writes_pem_files() -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| BundleError::Io {
        path: "tempdir".into(),
        source: e,
    })?;
    let private = dir.path().join("ops.key");
    let public = dir.path().join("ops.pub");
    let id = keygen(&private, &public)?;

    let mode = fs::metadata(&private)
        .map_err(|e| BundleError::Io {
            path: private.clone(),
            source: e,
        })?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = fs::read_to_string(&private).unwrap_or_default();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let pub_pem = fs::read_to_string(&public).unwrap_or_default();
    assert!(
        pub_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "{pub_pem}"
    );

    let sk = read_signing_key(&private)?;
    let vk = read_verifying_key(&public)?;
    assert_eq!(sk.verifying_key(), vk);
    assert_eq!(KeyId::of(&vk), id);
    assert_eq!(id.to_string().len(), 16);
    assert_eq!(id.to_string().parse::<KeyId>().ok(), Some(id));
    assert_eq!(verifying_key_to_pem(&vk), pub_pem);

    // OpenSSL reads both files, and derives the same public key from the
    // private one (Debian's openssl; it refuses PKCS#8 v2 ed25519 keys).
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .map_err(|e| BundleError::Io {
                path: "openssl".into(),
                source: e,
            })?;
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok::<_, BundleError>(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    openssl(&[
        "pkey".as_ref(),
        "-in".as_ref(),
        private.as_os_str(),
        "-noout".as_ref(),
    ])?;
    let derived = openssl(&[
        "pkey".as_ref(),
        "-in".as_ref(),
        private.as_os_str(),
        "-pubout".as_ref(),
    ])?;
    assert_eq!(derived, pub_pem);
    openssl(&[
        "pkey".as_ref(),
        "-pubin".as_ref(),
        "-in".as_ref(),
        public.as_os_str(),
        "-noout".as_ref(),
    ])?;

    // Existing files are never overwritten.
    assert!(matches!(
        keygen(&private, dir.path().join("other.pub")),
        Err(BundleError::Io { .. })
    ));
    assert_eq!(read_signing_key(&private)?.to_bytes(), sk.to_bytes());

    // Files that are not keys.
    assert!(matches!(
        read_verifying_key(&private),
        Err(BundleError::Key { .. })
    ));
    assert!(matches!(
        signing_key_from_pem("hello", "x.key"),
        Err(BundleError::Key { .. })
    ));
    assert!(matches!(
        verifying_key_from_pem("", "x.pub"),
        Err(BundleError::Key { .. })
    ));
    Ok(())
}

#[test]
fn generated_keys_differ() -> TestResult {
    let a = generate_signing_key()?;
    let b = generate_signing_key()?;
    assert_ne!(a.to_bytes(), b.to_bytes());
    Ok(())
}

#[test]
fn trusted_signature_verifies() -> TestResult {
    let ops = key(1);
    let s = signed_small(&ops)?;
    let v = s.verify(&[key(9).verifying_key(), ops.verifying_key()])?;
    assert_eq!(v.signers(), [KeyId::of(&ops.verifying_key())]);
    assert_eq!(v.bundle(), &s.bundle);
    assert_eq!(
        s.clone()
            .into_verified(&[ops.verifying_key()])?
            .into_bundle(),
        s.bundle
    );
    Ok(())
}

#[test]
fn unsigned_is_its_own_error() -> TestResult {
    let s = SignedBundle::new(small_bundle()?);
    assert!(matches!(
        s.verify(&[key(1).verifying_key()]),
        Err(BundleError::Unsigned)
    ));
    Ok(())
}

#[test]
fn untrusted_signature() -> TestResult {
    let s = signed_small(&key(1))?;
    match s.verify(&[key(2).verifying_key()]) {
        Err(BundleError::UntrustedSignature { key_ids }) => {
            assert_eq!(key_ids, [KeyId::of(&key(1).verifying_key())]);
        }
        other => panic!("expected UntrustedSignature, got {other:?}"),
    }
    assert!(matches!(
        s.verify(&[]),
        Err(BundleError::UntrustedSignature { .. })
    ));
    Ok(())
}

#[test]
fn one_trusted_signature_is_enough() -> TestResult {
    let mut s = signed_small(&key(1))?;
    s.sign(&key(2));
    s.sign(&key(3));
    assert_eq!(s.signatures.len(), 3);
    let v = s.verify(&[key(2).verifying_key()])?;
    assert_eq!(v.signers(), [KeyId::of(&key(2).verifying_key())]);
    // Signing again with the same key replaces its signature.
    s.sign(&key(2));
    assert_eq!(s.signatures.len(), 3);
    Ok(())
}

#[test]
fn tampered_manifest_breaks_the_signature() -> TestResult {
    let ops = key(1);
    let s = signed_small(&ops)?;
    // Another bundle (stage a now runs first at priority 0) with the old
    // signatures.
    let m = Manifest::parse(&SMALL.replace("priority = 1", "priority = 0"), "m.toml")?;
    let objects = BTreeMap::from([
        ("a.o".to_string(), fake_elf(b"object a")),
        ("b.o".to_string(), fake_elf(b"object b")),
    ]);
    let forged = SignedBundle {
        bundle: Bundle::from_parts(m, objects)?,
        signatures: s.signatures.clone(),
    };
    let bytes = forged.to_bytes();
    let decoded = SignedBundle::from_bytes(&bytes)?;
    match decoded.verify(&[ops.verifying_key()]) {
        Err(BundleError::BadSignature { key_id }) => {
            assert_eq!(key_id, KeyId::of(&ops.verifying_key()));
        }
        other => panic!("expected BadSignature, got {other:?}"),
    }
    Ok(())
}

#[test]
fn tampered_object_is_a_digest_mismatch() -> TestResult {
    let (_dir, path) = project(MANIFEST)?;
    let ops = key(1);
    let mut s = SignedBundle::new(Bundle::build(&path)?);
    s.sign(&ops);
    let mut bytes = s.to_bytes();
    // A byte of the last object (l4lb.o), before the signature section.
    let i = bytes.len() - 2 - 72 - 100;
    bytes[i] ^= 0x80;
    match SignedBundle::from_bytes(&bytes) {
        Err(BundleError::DigestMismatch { object, .. }) => assert_eq!(object, "l4lb.o"),
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn every_byte_flip_fails_verification() -> TestResult {
    let ops = key(1);
    let bytes = signed_small(&ops)?.to_bytes();
    let trusted = [ops.verifying_key()];
    SignedBundle::from_bytes(&bytes)?.verify(&trusted)?;
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut flipped = bytes.clone();
            flipped[i] ^= bit;
            let result = SignedBundle::from_bytes(&flipped).and_then(|s| s.verify(&trusted));
            assert!(result.is_err(), "flip {bit:#x} at byte {i} went unnoticed");
        }
    }
    Ok(())
}

#[test]
fn signed_round_trip_and_prefixes() -> TestResult {
    let mut s = signed_small(&key(1))?;
    s.sign(&key(2));
    let bytes = s.to_bytes();
    let back = SignedBundle::from_bytes(&bytes)?;
    assert_eq!(back, s);
    assert_eq!(back.to_bytes(), bytes);
    for len in 0..bytes.len() {
        match SignedBundle::from_bytes(&bytes[..len]) {
            Err(BundleError::Truncated { .. }) => {}
            other => panic!("prefix of {len} bytes: expected Truncated, got {other:?}"),
        }
    }
    // Trailing bytes, and signatures out of order.
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        SignedBundle::from_bytes(&trailing),
        Err(BundleError::Malformed { .. })
    ));
    let n = bytes.len();
    let mut swapped = bytes[..n - 144].to_vec();
    swapped.extend_from_slice(&bytes[n - 72..]);
    swapped.extend_from_slice(&bytes[n - 144..n - 72]);
    assert!(matches!(
        SignedBundle::from_bytes(&swapped),
        Err(BundleError::Malformed { .. })
    ));
    Ok(())
}

#[test]
fn unsigned_bytes_decode_as_unsigned() -> TestResult {
    let b = small_bundle()?;
    let s = SignedBundle::from_bytes(&b.to_bytes())?;
    assert!(s.signatures.is_empty());
    assert_eq!(s.bundle, b);
    assert!(matches!(s.verify(&[]), Err(BundleError::Unsigned)));
    Ok(())
}

#[test]
fn signatures_are_deterministic() -> TestResult {
    // ed25519 signatures are deterministic, so signed bytes are too.
    assert_eq!(
        signed_small(&key(1))?.to_bytes(),
        signed_small(&key(1))?.to_bytes()
    );
    Ok(())
}

#[test]
fn inspect_summarises() -> TestResult {
    let (_dir, path) = project(MANIFEST)?;
    let mut s = SignedBundle::new(Bundle::build(&path)?);
    let unsigned = s.inspect();
    assert!(unsigned.contains("signatures (0): unsigned"), "{unsigned}");
    s.sign(&key(1));
    let text = s.inspect();
    for needle in [
        "edge-pipeline 1.4.0".to_string(),
        format!("digest   {}", s.bundle.digest()),
        sha256_hex(rootlet_ebpf::DDOS),
        format!("object ddos.o ({} bytes)", rootlet_ebpf::DDOS.len()),
        format!("object l4lb.o ({} bytes)", rootlet_ebpf::L4LB.len()),
        "lifetime lease 30s".to_string(),
        "proceed_on [pass, tx]".to_string(),
        format!("key {}", KeyId::of(&key(1).verifying_key())),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
    // Execution order: l4lb (10) before ddos (20).
    assert!(text.find("l4lb").unwrap_or(usize::MAX) < text.find("  ddos").unwrap_or(0));
    Ok(())
}
