//! Rootlet bundles: versioned, content-addressed, signed artifacts that
//! `rootletctl` builds, signs and pushes and `rootletd` verifies and applies
//! as one transaction.
//!
//! A bundle is a TOML [`Manifest`] (which rootlets, which stages, on which
//! terms) and the eBPF ELF objects its stages run, each recorded in the
//! manifest by its sha256. Its encoding is canonical (the same inputs give
//! the same bytes), its [digest](Bundle::digest) is the sha256 of that
//! encoding, and ed25519 signatures sign the digest.
//!
//! ```no_run
//! # fn main() -> Result<(), rootlet_bundle::BundleError> {
//! use rootlet_bundle::{Bundle, SignedBundle, read_signing_key, read_verifying_key};
//!
//! // rootletctl: build, sign, encode.
//! let mut signed = SignedBundle::new(Bundle::build("edge/manifest.toml")?);
//! signed.sign(&read_signing_key("ops.key")?);
//! let bytes = signed.to_bytes();
//!
//! // rootletd: decode (checks every object's sha256), then verify.
//! let verified = SignedBundle::from_bytes(&bytes)?.into_verified(&[read_verifying_key("ops.pub")?])?;
//! for stage in verified.bundle().manifest().stages_in_order() {
//!     let _elf = verified.bundle().stage_object(stage);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`digest`]: [`Digest`], the one spelling of a digest (bare lowercase
//!   hex; `sha256:` accepted on input).
//! - [`error`]: [`BundleError`], the crate's one error type.
//! - [`manifest`]: the manifest's types and its parser, [`Manifest::parse`]
//!   (serde with spans, then the rules), whose errors name the field, line
//!   and column.
//! - [`located`]: [`located::LocatedError`], the one `file:line:col: field:
//!   message` error of manifests, policy documents and `rootletctl`'s
//!   config files, and the serde path and wording both readers share.
//! - [`canonical`]: the canonical TOML text of a manifest, which a bundle
//!   embeds ([`Manifest::to_canonical_toml`]).
//! - [`format`](mod@format): the binary encodings of bundles and signed bundles, and
//!   their size limits.
//! - [`bundle`]: [`Bundle`]: build from disk or memory, encode, decode,
//!   digest.
//! - [`sign`]: keys and key files, [`KeyId`], [`SignedBundle`],
//!   [`VerifiedBundle`].
//! - [`inspect`]: human-readable summaries ([`SignedBundle::inspect`]).
//! - [`policy`]: policy documents (TOML or JSON), their canonical bytes and
//!   digest, [`SignedPolicy`] and [`VerifiedPolicy`]; a bundle may carry
//!   initial policies for its stages ([`Bundle::stage_policies`]).
#![forbid(unsafe_code)]

pub mod bundle;
pub mod canonical;
pub mod digest;
pub mod error;
pub mod format;
pub mod inspect;
pub mod located;
pub mod manifest;
pub mod policy;
pub mod sign;

pub use bundle::{Bundle, EMBEDDED_MANIFEST_NAME, sha256_hex};
pub use digest::{Digest, DigestError};
pub use error::{BundleError, Result};
pub use format::{
    MAX_BUNDLE_SIZE, MAX_MANIFEST_SIZE, MAX_OBJECT_SIZE, MAX_OBJECTS, MAX_SIGNATURES,
};
pub use manifest::{Lifetime, Manifest, MapPolicy, RootletTarget, Stage, XdpAction, XdpMode};
pub use policy::{PolicyDocument, PolicyError, SignedPolicy, VerifiedPolicy};
pub use sign::{
    BundleSignature, KeyId, Signature, SignedBundle, SigningKey, VerifiedBundle, VerifyingKey,
    generate_signing_key, keygen, read_signing_key, read_verifying_key, signing_key_from_pem,
    verifying_key_from_pem, verifying_key_to_pem,
};
