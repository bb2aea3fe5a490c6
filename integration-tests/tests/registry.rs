//! Bundles as OCI artifacts against a real registry: Debian's
//! `docker-registry`, started by the harness on 127.0.0.1 with TLS from the
//! test PKI (`rootlet_integration_tests::registry`). `rootletctl bundle
//! push` then `pull` gives back the same bytes; a tampered layer, a missing
//! artifact, an untrusted certificate and a registry that is down each give
//! their own error, and `pull` writes nothing.
//!
//! Needs `docker-registry` (scripts/install-deps.sh); a test fails, saying
//! so, if it is missing.

use std::{fs, path::Path};

use rootlet_client::{cli::RegistryArgs, registry_cmd};
use rootlet_integration_tests::{fleet, pki::Pki, registry::TestRegistry};
use rootlet_oci::{BundleRef, OciError, Registry};

fn args(pki: &Pki) -> RegistryArgs {
    RegistryArgs {
        ca: Some(pki.ca_path().to_path_buf()),
        credentials: None,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Pushes the sample bundle to `reg` as `repo:1.0`; returns the file and
/// the pinned reference `push` printed.
fn push_sample(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    reg: &TestRegistry,
    dir: &Path,
    repo: &str,
) -> (Vec<u8>, String) {
    let file = fleet::sample_bundle(dir, "1.0.0", false, None).expect("sample bundle");
    let reference = format!("{}/{repo}:1.0", reg.host());
    let out = rt
        .block_on(registry_cmd::push(&file, &reference, &args(pki)))
        .expect("push");
    let pinned = out
        .lines()
        .find(|l| l.contains("@sha256:"))
        .unwrap_or_else(|| panic!("push printed no pinned reference: {out}"))
        .to_string();
    assert!(
        pinned.starts_with(&format!("{}/{repo}@sha256:", reg.host())),
        "{pinned}"
    );
    (fs::read(&file).expect("read bundle"), pinned)
}

#[test]
fn push_then_pull_by_digest_and_by_tag_is_byte_identical() {
    let pki = Pki::new();
    let reg = TestRegistry::start(&pki).expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let (bytes, pinned) = push_sample(&rt, &pki, &reg, dir.path(), "fleet/edge");

    let by_digest = dir.path().join("pulled.rlb");
    let report = rt
        .block_on(registry_cmd::pull(&pinned, &by_digest, &args(&pki)))
        .expect("pull by digest");
    assert!(report.contains("pulled"), "{report}");
    assert_eq!(fs::read(&by_digest).expect("pulled file"), bytes);

    let by_tag = dir.path().join("tag.rlb");
    rt.block_on(registry_cmd::pull(
        &format!("{}/fleet/edge:1.0", reg.host()),
        &by_tag,
        &args(&pki),
    ))
    .expect("pull by tag");
    assert_eq!(fs::read(&by_tag).expect("pulled file"), bytes);

    // The manifest is a Rootlet artifact: its own media types.
    let r = BundleRef::parse_pinned(&pinned).expect("pinned");
    assert_eq!(
        rt.block_on(
            Registry::new(&registry_cmd::options(&args(&pki)))
                .expect("client")
                .pull(&r)
        )
        .expect("library pull"),
        bytes
    );
}

#[test]
fn a_tampered_layer_is_refused_and_nothing_is_written() {
    let pki = Pki::new();
    let reg = TestRegistry::start(&pki).expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let (bytes, pinned) = push_sample(&rt, &pki, &reg, dir.path(), "fleet/edge");

    // Flip one byte of the stored layer: the registry serves it as is.
    let layer = reg.blob_path(&rootlet_oci_digest(&bytes));
    let mut stored = fs::read(&layer).expect("stored layer");
    assert_eq!(stored, bytes, "the layer is stored verbatim");
    let last = stored.len() - 1;
    stored[last] ^= 0xff;
    fs::write(&layer, &stored).expect("tamper");

    let out = dir.path().join("pulled.rlb");
    let e = rt
        .block_on(registry_cmd::pull(&pinned, &out, &args(&pki)))
        .expect_err("a tampered layer must be refused");
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            registry_cmd::RegistryCmdError::Oci(OciError::DigestMismatch { what: "layer", .. })
        ),
        "{msg}"
    );
    assert!(msg.contains("layer digest mismatch"), "{msg}");
    assert!(!out.exists(), "nothing is written on a digest mismatch");
}

#[test]
fn a_missing_artifact_is_not_found() {
    let pki = Pki::new();
    let reg = TestRegistry::start(&pki).expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let (_, pinned) = push_sample(&rt, &pki, &reg, dir.path(), "fleet/edge");
    let out = dir.path().join("pulled.rlb");
    let absent = format!("{}/fleet/edge@sha256:{}", reg.host(), "0".repeat(64));
    for reference in [
        absent,
        pinned.replace("fleet/edge", "fleet/other"),
        format!("{}/fleet/edge:no-such-tag", reg.host()),
    ] {
        let e = rt
            .block_on(registry_cmd::pull(&reference, &out, &args(&pki)))
            .expect_err("absent");
        assert!(
            matches!(
                e,
                registry_cmd::RegistryCmdError::Oci(OciError::NotFound { .. })
            ),
            "{reference}: {e}"
        );
        assert!(e.to_string().contains("not found in registry"), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn a_registry_that_is_down_or_untrusted_is_named() {
    let pki = Pki::new();
    let mut reg = TestRegistry::start(&pki).expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = rt();
    let (_, pinned) = push_sample(&rt, &pki, &reg, dir.path(), "fleet/edge");
    let out = dir.path().join("pulled.rlb");

    // A CA that did not sign the registry's certificate.
    let rogue = dir.path().join("rogue-ca.pem");
    fs::write(&rogue, pki.rogue_ca_pem()).expect("rogue CA");
    let e = rt
        .block_on(registry_cmd::pull(
            &pinned,
            &out,
            &RegistryArgs {
                ca: Some(rogue),
                credentials: None,
            },
        ))
        .expect_err("untrusted certificate");
    assert!(
        matches!(e, registry_cmd::RegistryCmdError::Oci(OciError::Tls { .. })),
        "{e}"
    );
    assert!(e.to_string().contains(&reg.host()), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(!out.exists());

    reg.stop();
    let e = rt
        .block_on(registry_cmd::pull(&pinned, &out, &args(&pki)))
        .expect_err("registry down");
    assert!(
        matches!(
            e,
            registry_cmd::RegistryCmdError::Oci(OciError::Unavailable { .. })
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("registry {} is unavailable", reg.host())),
        "{e}"
    );
    assert!(!out.exists());
}

fn rootlet_oci_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", rootlet_bundle::sha256_hex(bytes))
}
