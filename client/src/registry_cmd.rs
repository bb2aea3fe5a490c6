//! `rootletctl bundle push|pull`: a signed bundle to and from an OCI
//! registry, through `rootlet-oci` (which checks every digest).

use std::path::{Path, PathBuf};

use rootlet_bundle::{BundleError, SignedBundle};
use rootlet_oci::{BundleRef, OciError, Registry, RegistryOptions};

use crate::cli::RegistryArgs;

/// What `bundle push|pull` reports.
#[derive(Debug, thiserror::Error)]
pub enum RegistryCmdError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

impl RegistryCmdError {
    /// Whether the operator named something wrong (exit 2) rather than the
    /// registry failing (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RegistryCmdError::Oci(
                OciError::Reference { .. }
                    | OciError::NotByDigest(_)
                    | OciError::Io { .. }
                    | OciError::Credentials { .. }
            ) | RegistryCmdError::Bundle(_)
        )
    }
}

/// The registry options of the command line.
pub fn options(a: &RegistryArgs) -> RegistryOptions {
    RegistryOptions {
        ca: a.ca.clone(),
        credentials: a.credentials.clone(),
        insecure_http: false,
        timeout: Some(std::time::Duration::from_secs(30)),
    }
}

/// `bundle push FILE REF`: the file must be a signed bundle (its objects
/// and encoding are checked, as `bundle inspect` does); prints the pinned
/// reference.
pub async fn push(
    file: &Path,
    reference: &str,
    a: &RegistryArgs,
) -> Result<String, RegistryCmdError> {
    let bytes = std::fs::read(file).map_err(|source| BundleError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let signed = SignedBundle::from_bytes(&bytes)?;
    let r = BundleRef::parse(reference)?;
    let pinned = Registry::new(&options(a))?.push(&r, &bytes).await?;
    let m = signed.bundle.manifest();
    Ok(format!(
        "pushed {} {} ({} bytes, {} signature(s))\n{pinned}\n",
        m.name,
        m.version,
        bytes.len(),
        signed.signatures.len()
    ))
}

/// `bundle pull REF -o FILE`: writes the bundle only once its digests
/// matched and it decodes as a signed bundle.
pub async fn pull(
    reference: &str,
    out: &Path,
    a: &RegistryArgs,
) -> Result<String, RegistryCmdError> {
    let r = BundleRef::parse(reference)?;
    let bytes = Registry::new(&options(a))?.pull(&r).await?;
    let signed = SignedBundle::from_bytes(&bytes)?;
    crate::rollout::journal::write_atomic(out, &bytes).map_err(|e| RegistryCmdError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let m = signed.bundle.manifest();
    Ok(format!(
        "pulled {} {} ({} bytes) to {}\n",
        m.name,
        m.version,
        bytes.len(),
        out.display()
    ))
}

/// The bytes of the bundle `reference` names, for `rollout start --bundle
/// REF`: the reference must be pinned by digest (agents pull only pinned
/// references, so the rollout names exactly what they will run). The
/// caller decodes them (`BundleFile::pulled`).
pub async fn fetch(reference: &str, a: &RegistryArgs) -> Result<Vec<u8>, RegistryCmdError> {
    let r = BundleRef::parse_pinned(reference)?;
    Ok(Registry::new(&options(a))?.pull(&r).await?)
}
