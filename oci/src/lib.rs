//! Signed Rootlet bundles as OCI artifacts: the media types, `push` of a
//! signed bundle's bytes to a registry, and `pull` of them back, by tag or
//! by digest, with every digest checked here before a byte is returned.
//!
//! # Layout
//!
//! An artifact is one OCI image manifest (`application/vnd.oci.image.manifest.v1+json`)
//! whose `artifactType` is [`ARTIFACT_TYPE`], whose config is the empty
//! JSON object `{}` with [`CONFIG_MEDIA_TYPE`], and whose single layer is
//! the signed bundle's bytes (`bundle/src/format.rs`, magic `RLTSIGND`)
//! with [`LAYER_MEDIA_TYPE`]. Nothing here parses the bundle or checks its
//! signatures: the caller does that with `rootlet-bundle`, on the bytes
//! this crate returned, exactly as for bytes read from a file or uploaded.
//!
//! The HTTP and TLS side is `oci-client` (reqwest over rustls, with the
//! ring provider tonic also uses: one TLS stack in the process). This
//! crate knows nothing of gRPC, the agent or the kernel.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// `artifactType` of a Rootlet bundle's manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.rootlet.bundle.v1";
/// Media type of the artifact's config (the empty JSON object).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.rootlet.bundle.config.v1+json";
/// Media type of the one layer: a signed bundle's bytes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.rootlet.bundle.signed.v1";
/// Largest manifest accepted (it names two small descriptors).
pub const MAX_MANIFEST_SIZE: usize = 64 << 10;
/// Largest layer accepted: the largest signed bundle.
pub const MAX_LAYER_SIZE: usize = rootlet_bundle::format::MAX_SIGNED_SIZE;

const CONFIG_BYTES: &[u8] = b"{}";

/// What went wrong talking to a registry, or with what it sent.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid OCI reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error(
        "OCI reference {0:?} is not pinned by digest: name it as registry/repo@sha256:<64 hex digits>"
    )]
    NotByDigest(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("registry {registry} is unavailable: {detail}")]
    Unavailable { registry: String, detail: String },
    #[error("registry {registry}: TLS: {detail}")]
    Tls { registry: String, detail: String },
    #[error("{reference}: not found in registry {registry}")]
    NotFound { reference: String, registry: String },
    #[error("registry {registry} refused access to {reference}: {detail}")]
    Denied {
        reference: String,
        registry: String,
        detail: String,
    },
    #[error("{reference}: {what} digest mismatch: expected {expected}, received {actual}")]
    DigestMismatch {
        reference: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{reference}: not a Rootlet bundle artifact: {detail}")]
    NotABundle { reference: String, detail: String },
    #[error("{reference}: {what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        reference: String,
        what: &'static str,
        size: u64,
        limit: usize,
    },
    #[error("registry {registry}: {detail}")]
    Registry { registry: String, detail: String },
}

/// A parsed reference, `registry[:port]/repo[:tag][@sha256:…]`.
#[derive(Debug, Clone)]
pub struct BundleRef(Reference);

impl BundleRef {
    /// Parses `s`. A reference without a registry host is refused rather
    /// than sent to Docker Hub: a fleet names its registry.
    ///
    /// # Errors
    ///
    /// [`OciError::Reference`].
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let bad = |reason: String| OciError::Reference {
            reference: s.to_string(),
            reason,
        };
        let first = s.split('/').next().unwrap_or_default();
        let has_host =
            s.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
        if !has_host {
            return Err(bad(
                "it must start with a registry host (host[:port]/repo)".into()
            ));
        }
        let r: Reference = s.parse().map_err(|e| bad(format!("{e}")))?;
        if let Some(d) = r.digest() {
            check_digest_syntax(d).map_err(bad)?;
        }
        Ok(BundleRef(r))
    }

    /// Parses `s` and requires a digest (`@sha256:…`), as agents do.
    ///
    /// # Errors
    ///
    /// [`OciError::Reference`], [`OciError::NotByDigest`].
    pub fn parse_pinned(s: &str) -> Result<Self, OciError> {
        let r = Self::parse(s)?;
        if r.0.digest().is_none() {
            return Err(OciError::NotByDigest(s.to_string()));
        }
        Ok(r)
    }

    /// Whether `s` looks like a reference rather than a file path: it
    /// parses and is pinned by digest.
    pub fn looks_like_reference(s: &str) -> bool {
        Self::parse_pinned(s).is_ok()
    }

    /// The registry, `host[:port]`, as an allow-list names it.
    pub fn registry(&self) -> &str {
        self.0.registry()
    }

    /// The digest, if the reference is pinned.
    pub fn digest(&self) -> Option<&str> {
        self.0.digest()
    }

    /// The same repository pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> BundleRef {
        BundleRef(Reference::with_digest(
            self.0.registry().to_string(),
            self.0.repository().to_string(),
            digest.to_string(),
        ))
    }
}

impl std::fmt::Display for BundleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.whole())
    }
}

fn check_digest_syntax(d: &str) -> Result<(), String> {
    match d.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => {
            Ok(())
        }
        _ => Err(format!(
            "digest {d:?} is not sha256:<64 lowercase hex digits>"
        )),
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How to reach one registry: the CA that signs its certificate, and
/// basic-auth credentials if it wants them.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// PEM CA certificate(s) to trust, *instead of* the system roots.
    pub ca: Option<PathBuf>,
    /// A file holding one line `username:password`.
    pub credentials: Option<PathBuf>,
    /// Plain HTTP instead of TLS (only for tests of the refusal paths;
    /// agents never set it).
    pub insecure_http: bool,
    /// Bound on connecting and on each read.
    pub timeout: Option<Duration>,
}

/// Reads a `username:password` file (the password may contain `:`).
///
/// # Errors
///
/// [`OciError::Io`], [`OciError::Credentials`].
pub fn read_credentials(path: &Path) -> Result<(String, String), OciError> {
    let text = std::fs::read_to_string(path).map_err(|source| OciError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or_default().trim();
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => Err(OciError::Credentials {
            path: path.to_path_buf(),
            reason: "expected one line username:password".into(),
        }),
    }
}

/// A client of OCI registries with one set of options.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
}

impl Registry {
    /// Builds a client. Installs rustls' ring provider as the process
    /// default if none is installed (reqwest is built without one, so the
    /// process has a single TLS stack).
    ///
    /// # Errors
    ///
    /// [`OciError::Io`] or [`OciError::Credentials`] for the files named.
    pub fn new(opts: &RegistryOptions) -> Result<Self, OciError> {
        // Err only means a provider is already installed: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cfg = ClientConfig {
            protocol: if opts.insecure_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: opts.timeout,
            read_timeout: opts.timeout,
            ..ClientConfig::default()
        };
        if let Some(ca) = &opts.ca {
            let data = std::fs::read(ca).map_err(|source| OciError::Io {
                path: ca.clone(),
                source,
            })?;
            cfg.tls_certs_only.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let auth = match &opts.credentials {
            Some(p) => {
                let (u, pw) = read_credentials(p)?;
                RegistryAuth::Basic(u, pw)
            }
            None => RegistryAuth::Anonymous,
        };
        let client = Client::try_from(cfg).map_err(|e| OciError::Registry {
            registry: "-".into(),
            detail: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(Registry { client, auth })
    }

    /// Pushes `signed` (a signed bundle's bytes) as an artifact to
    /// `reference` (a tag, or the repository alone: tagged `latest`);
    /// returns the reference pinned to the manifest's digest, the one to
    /// give a rollout.
    ///
    /// # Errors
    ///
    /// Any [`OciError`] of the registry.
    pub async fn push(&self, reference: &BundleRef, signed: &[u8]) -> Result<BundleRef, OciError> {
        let r = &reference.0;
        let e = |err| map_err(reference, err);
        self.client
            .store_auth_if_needed(r.resolve_registry(), &self.auth)
            .await;
        let layer_digest = sha256(signed);
        let config_digest = sha256(CONFIG_BYTES);
        self.client
            .push_blob(r, signed.to_vec(), &layer_digest)
            .await
            .map_err(e)?;
        self.client
            .push_blob(r, CONFIG_BYTES.to_vec(), &config_digest)
            .await
            .map_err(e)?;
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: descriptor(CONFIG_MEDIA_TYPE, config_digest, CONFIG_BYTES.len()),
            layers: vec![descriptor(LAYER_MEDIA_TYPE, layer_digest, signed.len())],
            subject: None,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
            annotations: None,
        };
        let body = serde_json::to_vec(&manifest).map_err(|err| OciError::Registry {
            registry: r.registry().to_string(),
            detail: format!("cannot encode the manifest: {err}"),
        })?;
        let digest = sha256(&body);
        let content_type = OCI_IMAGE_MEDIA_TYPE
            .parse()
            .map_err(|_| OciError::Registry {
                registry: r.registry().to_string(),
                detail: "invalid manifest content type".into(),
            })?;
        self.client
            .push_manifest_raw(r, body, content_type)
            .await
            .map_err(e)?;
        Ok(reference.with_digest(&digest))
    }

    /// Pulls the signed bundle's bytes of `reference`. The manifest's
    /// digest is checked against the reference's (when it has one), the
    /// manifest must be a Rootlet bundle artifact with one layer of at
    /// most [`MAX_LAYER_SIZE`] bytes, and the layer's bytes must hash to
    /// the digest the manifest names. Nothing is returned otherwise.
    ///
    /// # Errors
    ///
    /// Any [`OciError`].
    pub async fn pull(&self, reference: &BundleRef) -> Result<Vec<u8>, OciError> {
        let r = &reference.0;
        let (raw, _) = self
            .client
            .pull_manifest_raw(r, &self.auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|err| map_err(reference, err))?;
        if raw.len() > MAX_MANIFEST_SIZE {
            return Err(OciError::TooLarge {
                reference: reference.to_string(),
                what: "manifest",
                size: raw.len() as u64,
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let actual = sha256(&raw);
        if let Some(expected) = r.digest()
            && expected != actual
        {
            return Err(OciError::DigestMismatch {
                reference: reference.to_string(),
                what: "manifest",
                expected: expected.to_string(),
                actual,
            });
        }
        let not_bundle = |detail: String| OciError::NotABundle {
            reference: reference.to_string(),
            detail,
        };
        let manifest: OciImageManifest =
            serde_json::from_slice(&raw).map_err(|err| not_bundle(format!("manifest: {err}")))?;
        if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE)
            && manifest.config.media_type != CONFIG_MEDIA_TYPE
        {
            return Err(not_bundle(format!(
                "artifact type {:?}, config media type {:?}",
                manifest.artifact_type, manifest.config.media_type
            )));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(not_bundle(format!(
                "{} layers, expected one",
                manifest.layers.len()
            )));
        };
        if layer.media_type != LAYER_MEDIA_TYPE {
            return Err(not_bundle(format!(
                "layer media type {:?}",
                layer.media_type
            )));
        }
        check_digest_syntax(&layer.digest).map_err(not_bundle)?;
        let size = u64::try_from(layer.size).unwrap_or(u64::MAX);
        if size > MAX_LAYER_SIZE as u64 {
            return Err(OciError::TooLarge {
                reference: reference.to_string(),
                what: "layer",
                size,
                limit: MAX_LAYER_SIZE,
            });
        }
        let mut stream = self
            .client
            .pull_blob_stream(r, layer)
            .await
            .map_err(|err| map_err(reference, err))?
            .stream;
        // The bound is the manifest's size: a registry that sends more is
        // cut off, not buffered.
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| {
                // oci-client checks the digest as the stream ends, and
                // reports a mismatch as an io::Error wrapping its
                // DigestError; every other stream error is the transfer.
                match err.get_ref().and_then(|e| e.downcast_ref::<DigestError>()) {
                    Some(d) => OciError::DigestMismatch {
                        reference: reference.to_string(),
                        what: "layer",
                        expected: layer.digest.clone(),
                        actual: d.to_string(),
                    },
                    None => OciError::Unavailable {
                        registry: r.registry().to_string(),
                        detail: format!("reading {}: {err}", layer.digest),
                    },
                }
            })?;
            if bytes.len() + chunk.len() > size as usize {
                return Err(OciError::DigestMismatch {
                    reference: reference.to_string(),
                    what: "layer",
                    expected: format!("{} ({size} bytes)", layer.digest),
                    actual: "more bytes than the manifest declares".into(),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let actual = sha256(&bytes);
        if actual != layer.digest {
            return Err(OciError::DigestMismatch {
                reference: reference.to_string(),
                what: "layer",
                expected: layer.digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn descriptor(media_type: &str, digest: String, size: usize) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.to_string(),
        digest,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        urls: None,
        annotations: None,
        artifact_type: None,
    }
}

fn map_err(reference: &BundleRef, err: OciDistributionError) -> OciError {
    use OciDistributionError as E;
    let registry = reference.registry().to_string();
    let reference_s = reference.to_string();
    match err {
        E::ImageManifestNotFoundError(_) => OciError::NotFound {
            reference: reference_s,
            registry,
        },
        E::ServerError { code: 404, .. } => OciError::NotFound {
            reference: reference_s,
            registry,
        },
        E::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) =>
        {
            OciError::NotFound {
                reference: reference_s,
                registry,
            }
        }
        e @ (E::AuthenticationFailure(_)
        | E::UnauthorizedError { .. }
        | E::ServerError {
            code: 401 | 403, ..
        }) => OciError::Denied {
            reference: reference_s,
            registry,
            detail: e.to_string(),
        },
        E::RequestError(e) if e.is_connect() || e.is_timeout() => {
            let detail = chain(&e);
            // reqwest reports a refused certificate as a connect error;
            // it is the operator's CA, not the registry's availability.
            if detail.contains("certificate") {
                OciError::Tls { registry, detail }
            } else {
                OciError::Unavailable { registry, detail }
            }
        }
        E::DigestError(e) => OciError::DigestMismatch {
            reference: reference_s,
            what: "blob",
            expected: "the digest the manifest names".into(),
            actual: e.to_string(),
        },
        e => OciError::Registry {
            registry,
            detail: chain(&e),
        },
    }
}

/// `e` with its sources, `a: b: c` (reqwest's own message hides the cause,
/// e.g. "connection refused" or a certificate error).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut n = 0;
    while let Some(c) = cur
        && n < 8
    {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
        n += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_name_a_registry_and_digests_are_checked() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = BundleRef::parse_pinned(&format!("127.0.0.1:5000/fleet/fw@{d}")).expect("parse");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.digest(), Some(d.as_str()));
        assert!(matches!(
            BundleRef::parse_pinned("127.0.0.1:5000/fleet/fw:v1"),
            Err(OciError::NotByDigest(_))
        ));
        assert!(matches!(
            BundleRef::parse("fleet/fw:v1"),
            Err(OciError::Reference { .. })
        ));
        assert!(matches!(
            BundleRef::parse("bundle.rlb"),
            Err(OciError::Reference { .. })
        ));
        assert!(BundleRef::parse("127.0.0.1:5000/fw@sha256:abc").is_err());
        assert!(!BundleRef::looks_like_reference("./dist/fw-1.0.rlb"));
    }
}
