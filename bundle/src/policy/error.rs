//! [`PolicyError`]: every way a policy document, its encoding or its
//! signatures can be wrong, each with what a person needs to fix it (the
//! file, line and column, and the field's path, of a document error: a
//! [`LocatedError`], as a manifest's).

use std::{fmt, io, path::PathBuf};

use crate::{located::LocatedError, sign::KeyId};

/// Everything that can go wrong reading, encoding, signing or verifying a
/// policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not valid TOML or JSON, or valid but a key is unknown, missing,
    /// repeated, of the wrong type, or has a value the rules do not allow
    /// (`file:line:col: field: message`, the field a path such as
    /// `maps.ddos_blocklist.entries[3].key`, indices from 0). The shape
    /// manifests share ([`crate::BundleError::Manifest`]).
    #[error(transparent)]
    Document(#[from] LocatedError),

    /// Something is larger than the limits allow (see
    /// [`crate::policy::limits`]).
    #[error("{what} is too large: {size} {unit} (limit {limit})")]
    TooLarge {
        what: String,
        size: u64,
        limit: u64,
        /// "bytes", "entries", "maps".
        unit: &'static str,
    },

    /// The input ends before `what` does.
    #[error("truncated signed policy: input ends in {what} (at byte {offset})")]
    Truncated { what: &'static str, offset: usize },

    /// Input that is not a signed policy, or breaks a rule of its format
    /// other than a length (bad magic, a document not in canonical form,
    /// unsorted signatures, trailing bytes...).
    #[error("malformed signed policy at byte {offset}: {msg}")]
    Malformed { offset: usize, msg: String },

    /// The policy carries no signature at all.
    #[error("policy is unsigned")]
    Unsigned,

    /// The policy is signed, but by none of the trusted keys.
    #[error("policy is signed only by untrusted keys: {}", KeyIds(.key_ids))]
    UntrustedSignature { key_ids: Vec<KeyId> },

    /// A signature by a trusted key does not verify: the policy was changed
    /// after it was signed, the signature was forged or damaged, or it is a
    /// signature over something else (a bundle) by the same key.
    #[error("signature by trusted key {key_id} does not verify")]
    BadSignature { key_id: KeyId },

    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PolicyError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        PolicyError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn too_large(
        what: impl Into<String>,
        size: usize,
        limit: usize,
        unit: &'static str,
    ) -> Self {
        PolicyError::TooLarge {
            what: what.into(),
            size: size as u64,
            limit: limit as u64,
            unit,
        }
    }

    /// The container errors of [`crate::format`](mod@crate::format)'s
    /// reader, as policy errors; anything else is kept as its message.
    pub(crate) fn from_container(e: crate::BundleError) -> Self {
        use crate::BundleError as B;
        match e {
            B::Truncated { what, offset } => PolicyError::Truncated { what, offset },
            B::TooLarge { what, size, limit } => PolicyError::TooLarge {
                what,
                size,
                limit,
                unit: "bytes",
            },
            B::Malformed { offset, msg } => PolicyError::Malformed { offset, msg },
            other => PolicyError::Malformed {
                offset: 0,
                msg: other.to_string(),
            },
        }
    }
}

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
