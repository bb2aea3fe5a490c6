//! Bundles as OCI artifacts against a real registry: Debian's
//! `docker-registry`, started by the harness on 127.0.0.1 with TLS from the
//! test PKI (`rootlet_integration_tests::registry`). `rootletctl bundle
//! push` then `pull` gives back the same bytes; a tampered layer, a missing
//! artifact, an untrusted certificate and a registry that is down each give
//! their own error, and `pull` writes nothing.
//!
//! Agents pull too (ApplyBundle by reference): a real rootletd that
//! allow-lists the registry pulls a pushed bundle and runs it, verified as
//! uploaded bytes are; every failed pull (unlisted registry, unpinned
//! reference, missing artifact, tampered layer, untrusted certificate,
//! registry down, a reader's call) has its own code and reason and changes
//! nothing. A rollout by reference against real agents sends each host the
//! reference, and the registry's own access log shows each host pulled.
//! Against a registry with basic auth, `rootletctl` and the agent use their
//! credentials files, and wrong or missing ones are the registry's refusal.
//!
//! Needs `docker-registry` (scripts/install-deps.sh); a test fails, saying
//! so, if it is missing.

use std::{fs, path::Path};

use rootlet_client::{cli::RegistryArgs, registry_cmd};
use rootlet_integration_tests::{
    agentd::{Agent, restart},
    api, fleet,
    pki::Pki,
    registry::TestRegistry,
    rootletd,
};
use rootlet_oci::{BundleRef, OciError, Registry};
use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use rootlet_server::config::RegistryConfig;
use tonic::{Code, transport::Channel};

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

/// The `[[registry]]` table that allow-lists `reg`, trusting `ca`.
fn allow(reg: &TestRegistry, ca: &Path) -> RegistryConfig {
    RegistryConfig {
        host: reg.host(),
        ca: Some(ca.to_path_buf()),
        credentials: None,
        timeout_seconds: 5,
    }
}

/// Pushes `bytes` to `reg` as `repo:tag`; the reference pinned by digest.
async fn push_bytes(reg: &TestRegistry, pki: &Pki, repo: &str, bytes: &[u8]) -> String {
    let r = BundleRef::parse(&format!("{}/{repo}:t", reg.host())).expect("reference");
    Registry::new(&registry_cmd::options(&args(pki)))
        .expect("client")
        .push(&r, bytes)
        .await
        .expect("push")
        .to_string()
}

fn by_reference(reference: &str, key: &str) -> pb::ApplyBundleRequest {
    pb::ApplyBundleRequest {
        source: Some(pb::apply_bundle_request::Source::Reference(
            reference.to_string(),
        )),
        idempotency_key: key.to_string(),
        ..Default::default()
    }
}

/// What the agent runs and keeps: the rootlet's generation and stages,
/// and every bundle version it holds.
async fn held(
    a: &Agent,
    c: &mut RootletClient<Channel>,
) -> (u64, Vec<(String, String)>, Vec<String>) {
    let state = c
        .get_rootlet(pb::GetRootletRequest {
            rootlet: a.rootlet(),
        })
        .await
        .map(|r| r.into_inner())
        .ok();
    let bundles = c
        .list_bundles(pb::ListBundlesRequest::default())
        .await
        .expect("list bundles")
        .into_inner()
        .bundles
        .into_iter()
        .map(|b| format!("{} {} {}", b.name, b.version, b.digest))
        .collect();
    let (generation, stages) = state.map_or((0, vec![]), |s| {
        (
            s.generation,
            s.slots.into_iter().map(|x| (x.stage, x.digest)).collect(),
        )
    });
    (generation, stages, bundles)
}

/// The agent's `rootlet_bundle_pulls_total{outcome=…}` and
/// `rootlet_bundle_pulled_bytes_total`.
fn pulls(a: &Agent, outcome: &str) -> (u64, u64) {
    let addr = a
        .running
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .expect("metrics address");
    let text = rootletd::scrape(addr).expect("scrape");
    let value = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    (
        value(&format!(
            "rootlet_bundle_pulls_total{{outcome=\"{outcome}\"}} "
        )),
        value("rootlet_bundle_pulled_bytes_total "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pulls_a_bundle_by_reference_and_verifies_it_as_uploaded_bytes() {
    let reg_pki = Pki::new();
    let reg = TestRegistry::start(&reg_pki).expect("registry");
    let allowed = allow(&reg, reg_pki.ca_path());
    let a = Agent::start_edited(80 << 20, move |c| c.registry = vec![allowed.clone()]).await;
    let mut ops = a.client("ops").await;
    let v1 = a.bundle("1.0", &[("sampler", "sampler", 10)], true);
    let pinned = push_bytes(&reg, &reg_pki, "fleet/edge", &v1).await;

    // A reader is refused before anything is fetched.
    let mut mon = a.client("mon").await;
    let e = mon
        .apply_bundle(by_reference(&pinned, ""))
        .await
        .expect_err("a reader may not apply");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        reg.blob_gets(&rootlet_oci_digest(&v1)),
        0,
        "a reader made the agent pull"
    );

    let r = ops
        .apply_bundle(by_reference(&pinned, "pull-1"))
        .await
        .expect("applied by reference")
        .into_inner();
    assert_eq!(r.version, "1.0");
    assert!(
        !r.noop && r.rootlets.len() == 1 && r.rootlets[0].changed,
        "{r:?}"
    );
    assert_eq!(
        r.digest,
        rootlet_bundle::SignedBundle::from_bytes(&v1)
            .expect("v1")
            .bundle
            .digest()
    );
    let (_, stages, bundles) = held(&a, &mut ops).await;
    assert_eq!(
        stages.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["sampler"]
    );
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    assert_eq!(pulls(&a, "ok"), (1, v1.len() as u64));
    assert_eq!(reg.blob_gets(&rootlet_oci_digest(&v1)), 1);

    // A retry with the key is answered from the first call: no second pull.
    let again = ops
        .apply_bundle(by_reference(&pinned, "pull-1"))
        .await
        .expect("retried")
        .into_inner();
    assert_eq!(again, r);
    assert_eq!(pulls(&a, "ok").0, 1, "the retry pulled again");

    // An unsigned bundle by reference is refused exactly as its upload is.
    let unsigned = a.bundle("2.0", &[("sampler", "sampler", 10)], false);
    let pinned2 = push_bytes(&reg, &reg_pki, "fleet/edge", &unsigned).await;
    let before = held(&a, &mut ops).await;
    let pulled = ops
        .apply_bundle(by_reference(&pinned2, ""))
        .await
        .expect_err("unsigned");
    let uploaded = ops
        .apply_bundle(pb::ApplyBundleRequest {
            source: Some(pb::apply_bundle_request::Source::Bundle(unsigned)),
            ..Default::default()
        })
        .await
        .expect_err("unsigned");
    assert_eq!(
        (pulled.code(), api::reason(&pulled)),
        (uploaded.code(), api::reason(&uploaded))
    );
    assert_eq!(api::reason(&pulled), "BUNDLE_UNSIGNED", "{pulled:?}");
    assert_eq!(
        held(&a, &mut ops).await,
        before,
        "a refused pull changed something"
    );
    assert_eq!(pulls(&a, "ok").0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_pull_is_named_and_changes_nothing() {
    let reg_pki = Pki::new();
    let mut reg = TestRegistry::start(&reg_pki).expect("registry");
    let allowed = allow(&reg, reg_pki.ca_path());
    let mut a = {
        let allowed = allowed.clone();
        Agent::start_edited(80 << 20, move |c| c.registry = vec![allowed.clone()]).await
    };
    let mut ops = a.client("ops").await;
    let v1 = a.bundle("1.0", &[("sampler", "sampler", 10)], true);
    let pinned1 = push_bytes(&reg, &reg_pki, "fleet/edge", &v1).await;
    ops.apply_bundle(by_reference(&pinned1, ""))
        .await
        .expect("v1 applies");
    let v2 = a.bundle(
        "2.0",
        &[("sampler", "sampler", 10), ("ddos", "ddos", 20)],
        true,
    );
    let pinned2 = push_bytes(&reg, &reg_pki, "fleet/edge", &v2).await;
    let digest2 = pinned2.rsplit_once('@').expect("pinned").1.to_string();
    let before = held(&a, &mut ops).await;

    // A refusal, its code and reason, and that nothing changed.
    async fn refused(
        a: &Agent,
        ops: &mut RootletClient<Channel>,
        before: &(u64, Vec<(String, String)>, Vec<String>),
        reference: &str,
        code: Code,
        reason: &str,
        says: &str,
    ) {
        let e = ops
            .apply_bundle(by_reference(reference, ""))
            .await
            .expect_err(reference);
        assert_eq!(
            (e.code(), api::reason(&e).as_str()),
            (code, reason),
            "{reference}: {e:?}"
        );
        assert!(e.message().contains(says), "{reference}: {}", e.message());
        assert_eq!(
            &held(a, ops).await,
            before,
            "{reference}: something changed"
        );
        assert!(pulls(a, reason).0 >= 1, "{reason} is not counted");
    }
    let other_port = format!(
        "127.0.0.1:{}/fleet/edge@{digest2}",
        reg.host()
            .rsplit_once(':')
            .map_or(0, |(_, p)| p.parse::<u16>().unwrap_or(1) ^ 1)
    );
    refused(
        &a,
        &mut ops,
        &before,
        &other_port,
        Code::FailedPrecondition,
        "REGISTRY_NOT_ALLOWED",
        "allow-list",
    )
    .await;
    refused(
        &a,
        &mut ops,
        &before,
        &format!("{}/fleet/edge:t", reg.host()),
        Code::InvalidArgument,
        "REGISTRY_REFERENCE",
        "not pinned by digest",
    )
    .await;
    refused(
        &a,
        &mut ops,
        &before,
        &format!("{}/fleet/edge@sha256:{}", reg.host(), "0".repeat(64)),
        Code::NotFound,
        "REGISTRY_NOT_FOUND",
        "not found in registry",
    )
    .await;

    // The layer of 2.0, changed in the registry's storage.
    let layer = reg.blob_path(&rootlet_oci_digest(&v2));
    let mut stored = fs::read(&layer).expect("stored layer");
    let last = stored.len() - 1;
    stored[last] ^= 0xff;
    fs::write(&layer, &stored).expect("tamper");
    refused(
        &a,
        &mut ops,
        &before,
        &pinned2,
        Code::DataLoss,
        "REGISTRY_DIGEST_MISMATCH",
        "layer digest mismatch",
    )
    .await;
    stored[last] ^= 0xff;
    fs::write(&layer, &stored).expect("untamper");

    // An agent that trusts another CA for the registry.
    let dir = tempfile::tempdir().expect("tempdir");
    let rogue = dir.path().join("rogue-ca.pem");
    fs::write(&rogue, reg_pki.rogue_ca_pem()).expect("rogue CA");
    let untrusting = RegistryConfig {
        ca: Some(rogue),
        ..allowed.clone()
    };
    restart(&mut a, move |c| c.registry = vec![untrusting.clone()]).await;
    let mut ops = a.client("ops").await;
    let before = held(&a, &mut ops).await;
    refused(
        &a,
        &mut ops,
        &before,
        &pinned2,
        Code::Unavailable,
        "REGISTRY_TLS",
        "certificate",
    )
    .await;

    // The registry down.
    restart(&mut a, move |c| c.registry = vec![allowed.clone()]).await;
    let mut ops = a.client("ops").await;
    reg.stop();
    refused(
        &a,
        &mut ops,
        &before,
        &pinned2,
        Code::Unavailable,
        "REGISTRY_UNAVAILABLE",
        "unavailable",
    )
    .await;
    assert_eq!(pulls(&a, "ok").0, 0, "no pull succeeded after the restart");
}

/// A credentials file (`user:password`, mode 0600) in `dir`.
fn credentials(dir: &Path, name: &str, line: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    fs::write(&path, format!("{line}\n")).expect("credentials");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_basic_auth_takes_the_credentials_files_and_names_a_refusal() {
    let reg_pki = Pki::new();
    // A password with a colon: the file's line splits at the first one.
    let reg = TestRegistry::start_with_auth(&reg_pki, "fleet", "s3cret:x").expect("registry");
    let dir = tempfile::tempdir().expect("tempdir");
    let good = credentials(dir.path(), "good", "fleet:s3cret:x");
    let wrong = credentials(dir.path(), "wrong", "fleet:guess");
    let with = |c: Option<&Path>| RegistryArgs {
        ca: Some(reg_pki.ca_path().to_path_buf()),
        credentials: c.map(Path::to_path_buf),
    };
    let file = fleet::sample_bundle(dir.path(), "1.0.0", false, None).expect("sample bundle");
    let reference = format!("{}/fleet/edge:1.0", reg.host());

    // rootletctl: no credentials, or wrong ones, are the registry's refusal.
    for c in [None, Some(wrong.as_path())] {
        let e = registry_cmd::push(&file, &reference, &with(c))
            .await
            .expect_err("refused without the right credentials");
        assert!(
            matches!(
                e,
                registry_cmd::RegistryCmdError::Oci(OciError::Denied { .. })
            ),
            "{c:?}: {e}"
        );
        assert!(e.to_string().contains("refused access"), "{e}");
    }
    let out = registry_cmd::push(&file, &reference, &with(Some(&good)))
        .await
        .expect("push with credentials");
    let pinned = out
        .lines()
        .find(|l| l.contains("@sha256:"))
        .expect("pinned")
        .to_string();
    let pulled = dir.path().join("pulled.rlb");
    registry_cmd::pull(&pinned, &pulled, &with(Some(&good)))
        .await
        .expect("pull with credentials");
    assert_eq!(
        fs::read(&pulled).expect("pulled"),
        fs::read(&file).expect("file")
    );
    fs::remove_file(&pulled).expect("remove");
    let e = registry_cmd::pull(&pinned, &pulled, &with(Some(&wrong)))
        .await
        .expect_err("wrong credentials");
    assert!(
        matches!(
            e,
            registry_cmd::RegistryCmdError::Oci(OciError::Denied { .. })
        ),
        "{e}"
    );
    assert!(!pulled.exists());

    // An agent with its credentials file pulls; with wrong ones it is
    // refused as REGISTRY_DENIED and nothing changes.
    let allowed = RegistryConfig {
        credentials: Some(good.clone()),
        ..allow(&reg, reg_pki.ca_path())
    };
    let mut a = {
        let allowed = allowed.clone();
        Agent::start_edited(80 << 20, move |c| c.registry = vec![allowed.clone()]).await
    };
    let mut ops = a.client("ops").await;
    let push_signed = |version: &str| {
        let bytes = a.bundle(version, &[("sampler", "sampler", 10)], true);
        let r = BundleRef::parse(&format!("{}/fleet/edge:{version}", reg.host())).expect("ref");
        let client = Registry::new(&registry_cmd::options(&with(Some(&good)))).expect("client");
        async move { client.push(&r, &bytes).await.expect("push").to_string() }
    };
    let v1 = push_signed("1.0").await;
    let r = ops
        .apply_bundle(by_reference(&v1, ""))
        .await
        .expect("pulled with the agent's credentials")
        .into_inner();
    assert_eq!(r.version, "1.0");
    let pinned2 = push_signed("2.0").await;
    let wrong_config = RegistryConfig {
        credentials: Some(wrong),
        ..allowed
    };
    restart(&mut a, move |c| c.registry = vec![wrong_config.clone()]).await;
    let mut ops = a.client("ops").await;
    let before = held(&a, &mut ops).await;
    let e = ops
        .apply_bundle(by_reference(&pinned2, ""))
        .await
        .expect_err("wrong credentials");
    assert_eq!(
        (e.code(), api::reason(&e).as_str()),
        (Code::FailedPrecondition, "REGISTRY_DENIED"),
        "{e:?}"
    );
    assert!(e.message().contains("refused access"), "{}", e.message());
    assert_eq!(held(&a, &mut ops).await, before);
}

/// The plan of the rollout by reference: a canary, then the rest.
const PLAN: &str = r#"
soak = "1s"
progress_deadline = "2m"
max_unavailable = 0
canary = { hosts = 1 }

[[waves]]
hosts = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_by_reference_sends_each_host_the_reference_and_each_pulls_it() {
    let reg_pki = Pki::new();
    let reg = TestRegistry::start(&reg_pki).expect("registry");
    let extra = format!(
        "[[registry]]\nhost = \"{}\"\nca = {:?}\n",
        reg.host(),
        reg_pki.ca_path().display().to_string()
    );
    let mut fleet = fleet::RealFleet::start_with(2, &[], &extra)
        .await
        .expect("2 agents");
    // The agents run in their hosts' namespaces: the registry's address
    // is forwarded into each.
    fleet
        .reach(reg.host().parse().expect("registry address"))
        .expect("registry reachable from the agents");
    let file = fleet.sample_bundle("1.0.0", false).expect("bundle");
    let bytes = fs::read(&file).expect("bundle bytes");
    let out = registry_cmd::push(
        &file,
        &format!("{}/fleet/edge:1.0.0", reg.host()),
        &args(&reg_pki),
    )
    .await
    .expect("push");
    let pinned = out
        .lines()
        .find(|l| l.contains("@sha256:"))
        .expect("pinned reference")
        .to_string();
    let inventory = fleet.dir.join("hosts.toml");
    fs::write(&inventory, fleet.inventory_toml()).expect("inventory");
    let plan = fleet.dir.join("plan.toml");
    fs::write(&plan, PLAN).expect("plan");
    let journal = fleet.dir.join("by-reference.json");

    let bin = fleet::sibling_binary("rootletctl");
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("rollout")
        .arg("start")
        .arg("-i")
        .arg(&inventory)
        .arg("-p")
        .arg(&plan)
        .arg("-b")
        .arg(&pinned)
        .arg("--registry-ca")
        .arg(reg_pki.ca_path())
        .arg("-j")
        .arg(&journal);
    let (code, text) = tokio::task::spawn_blocking(move || run_bounded(cmd))
        .await
        .expect("rootletctl ran");
    assert_eq!(code, Some(0), "{text}");

    let j = rootlet_client::rollout::journal::read(&journal).expect("journal");
    assert_eq!(j.bundle.reference.as_deref(), Some(pinned.as_str()));
    assert_eq!(
        j.bundle.path,
        std::path::PathBuf::new(),
        "no file behind it"
    );
    assert_eq!(j.bundle.version, "1.0.0");
    let f = rootlet_client::transport::Fleet::new(
        fleet.inventory(),
        rootlet_client::transport::TransportOptions::default(),
    );
    for h in rootlet_client::status::read(&f, None).await {
        assert!(h.error.is_none(), "{}: {:?}", h.name, h.error);
        let versions: Vec<&str> = h
            .rootlets
            .iter()
            .map(|r| r.applied_version.as_str())
            .collect();
        assert_eq!(versions, ["1.0.0"], "{}", h.name);
    }
    // The registry served the layer once to rootletctl (to plan and check)
    // and once to each host: the hosts pulled it, nobody uploaded it.
    assert_eq!(
        reg.blob_gets(&rootlet_oci_digest(&bytes)),
        1 + fleet.hosts.len(),
        "{text}"
    );
}

/// Runs `cmd` (stdin closed, output captured), killed after 3 minutes; its
/// exit code and its stdout and stderr.
fn run_bounded(mut cmd: std::process::Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{cmd:?}: {e} (cargo build -p rootlet-client --bin rootletctl)")
        });
    let t0 = std::time::Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(180) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}
