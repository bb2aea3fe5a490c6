//! [`BundleError`], the one error type of this crate: every way a manifest,
//! a bundle, a key file or a signature can be wrong, each with what a
//! person needs to fix it (the file, line and column of a manifest error,
//! a [`LocatedError`];
//! the object and both digests of a mismatch; the key ids of signatures).

use std::{fmt, io, path::PathBuf};

use crate::{located::LocatedError, sign::KeyId};

/// Everything that can go wrong building, decoding, signing or verifying a
/// bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The manifest is not valid TOML, or is valid TOML but a key is
    /// unknown, missing, of the wrong type or has a value the schema does
    /// not allow (`file:line:col: field: message`, the field a path such
    /// as `stages[1].priority`, indices from 0). The shape policy
    /// documents share ([`crate::policy::PolicyError::Document`]).
    #[error(transparent)]
    Manifest(#[from] LocatedError),

    /// A stage names an object that is not on disk (build) or not embedded
    /// in the bundle (decode).
    #[error("stage {stage:?}: object {object} does not exist")]
    MissingObject { stage: String, object: PathBuf },

    /// An object that no stage uses.
    #[error("object {object} is not used by any stage")]
    UnusedObject { object: String },

    /// An object that is not an eBPF ELF file.
    #[error("object {object}: not an eBPF ELF file: {reason}")]
    NotElf { object: String, reason: String },

    /// An object whose sha256 is not the one the manifest records.
    #[error("object {object}: sha256 is {actual}, the manifest records {expected}")]
    DigestMismatch {
        object: String,
        expected: String,
        actual: String,
    },

    /// The input ends before `what` does.
    #[error("truncated bundle: input ends in {what} (at byte {offset})")]
    Truncated { what: &'static str, offset: usize },

    /// Something is larger than the format allows.
    #[error("{what} is too large: {size} bytes (limit {limit})")]
    TooLarge { what: String, size: u64, limit: u64 },

    /// Input that is not a bundle, or breaks a rule of the format other
    /// than a length (bad magic, unsorted or duplicate entries, an object
    /// no stage uses, trailing bytes...).
    #[error("malformed bundle at byte {offset}: {msg}")]
    Malformed { offset: usize, msg: String },

    /// A stage names a policy that is not embedded in the bundle.
    #[error("stage {stage:?}: policy {policy} is not in the bundle")]
    MissingPolicy { stage: String, policy: String },

    /// A policy that no stage carries.
    #[error("policy {policy} is not carried by any stage")]
    UnusedPolicy { policy: String },

    /// A stage carries a policy for another stage.
    #[error("policy {policy} sets maps of stage {policy_stage:?}, but stage {stage:?} carries it")]
    PolicyStage {
        policy: String,
        policy_stage: String,
        stage: String,
    },

    /// Two policies of one stage set the same map.
    #[error("stage {stage:?}: policies {first} and {second} both set map {map:?}")]
    PolicyOverlap {
        stage: String,
        map: String,
        first: String,
        second: String,
    },

    /// A policy the bundle carries (or a policy file its manifest names)
    /// is wrong.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),

    /// The bundle carries no signature at all.
    #[error("bundle is unsigned")]
    Unsigned,

    /// The bundle is signed, but by none of the trusted keys.
    #[error("bundle is signed only by untrusted keys: {}", KeyIds(.key_ids))]
    UntrustedSignature { key_ids: Vec<KeyId> },

    /// A signature by a trusted key does not verify: the bundle was changed
    /// after it was signed, or the signature was forged or damaged.
    #[error("signature by trusted key {key_id} does not verify")]
    BadSignature { key_id: KeyId },

    /// A key file that cannot be parsed.
    #[error("{}: {msg}", .path.display())]
    Key { path: PathBuf, msg: String },

    /// The operating system's random source failed (generating a key).
    #[error("cannot get randomness from the operating system: {msg}")]
    Random { msg: String },

    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BundleError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        BundleError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn malformed(offset: usize, msg: impl Into<String>) -> Self {
        BundleError::Malformed {
            offset,
            msg: msg.into(),
        }
    }

    pub(crate) fn too_large(what: impl Into<String>, size: usize, limit: usize) -> Self {
        BundleError::TooLarge {
            what: what.into(),
            size: size as u64,
            limit: limit as u64,
        }
    }
}

/// `Result` with [`BundleError`].
pub type Result<T, E = BundleError> = std::result::Result<T, E>;

struct KeyIds<'a>(&'a [KeyId]);

impl fmt::Display for KeyIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}
