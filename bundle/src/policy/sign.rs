//! [`SignedPolicy`]: a policy and the ed25519 signatures over its digest,
//! with the same keys and key files as bundles ([`crate::sign`]), and
//! [`VerifiedPolicy`], which only [`SignedPolicy::verify`] makes.
//!
//! A signature signs [`POLICY_SIGNING_CONTEXT`] followed by the policy's
//! 32-byte digest; a bundle signature signs
//! [`SIGNING_CONTEXT`](crate::sign::SIGNING_CONTEXT) and the bundle's
//! digest. The two contexts differ, so a bundle signature is never a valid
//! policy signature, nor the reverse, even by the same key.
//!
//! The encoding (integers little-endian):
//!
//! ```text
//! magic        8 bytes  "RLTPOLCY"
//! version      u32      1
//! policy_len   u32      <= 64 MiB
//! policy       policy_len bytes: the canonical encoding (crate::policy::canonical)
//! count        u16      number of signatures, <= 64
//! count times, in strictly ascending order of key id:
//!   key_id     8 bytes  the first 8 bytes of sha256(ed25519 public key)
//!   signature  64 bytes
//! ```
//!
//! and nothing after. Decoding checks every length before using it (hostile
//! input costs at most its own size, and never panics) and refuses a policy
//! that is not in canonical form.

use ed25519_dalek::Signer;

use super::{PolicyDocument, PolicyError, Result, limits::MAX_DOCUMENT_SIZE};
use crate::{
    digest::Digest,
    format::{KEY_ID_LEN, MAX_SIGNATURES, Reader, SIGNATURE_LEN},
    sign::{BundleSignature, KeyId, Signature, SignatureProblem, SigningKey, VerifyingKey},
};

/// What a policy signature signs, before the policy's digest.
pub const POLICY_SIGNING_CONTEXT: &[u8] = b"rootlet-policy-v1\0";

/// Magic of a signed policy.
pub const POLICY_MAGIC: &[u8; 8] = b"RLTPOLCY";
/// The format version this crate writes and reads.
pub const POLICY_FORMAT_VERSION: u32 = 1;
/// Largest encoded signed policy.
pub const MAX_SIGNED_POLICY_SIZE: usize =
    8 + 4 + 4 + MAX_DOCUMENT_SIZE + 2 + MAX_SIGNATURES * (KEY_ID_LEN + SIGNATURE_LEN);

/// One signature on a policy: which key, and the signature.
pub type PolicySignature = BundleSignature;

/// A policy and the signatures over its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    pub policy: PolicyDocument,
    /// At most one per key; encoded in key-id order.
    pub signatures: Vec<PolicySignature>,
}

/// A policy with at least one valid signature by a trusted key. Only
/// [`SignedPolicy::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPolicy {
    policy: PolicyDocument,
    digest: Digest,
    signers: Vec<KeyId>,
}

impl VerifiedPolicy {
    /// The verified policy.
    pub fn policy(&self) -> &PolicyDocument {
        &self.policy
    }

    /// The verified policy, by value.
    pub fn into_policy(self) -> PolicyDocument {
        self.policy
    }

    /// Its digest (what the signatures cover).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The trusted keys whose signatures verified, in key-id order.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }
}

impl SignedPolicy {
    /// A policy with no signatures yet.
    pub fn new(policy: PolicyDocument) -> SignedPolicy {
        SignedPolicy {
            policy,
            signatures: Vec::new(),
        }
    }

    /// Signs the policy with `key`, replacing an earlier signature by the
    /// same key.
    pub fn sign(&mut self, key: &SigningKey) {
        let key_id = KeyId::of(&key.verifying_key());
        let signature = key.sign(&message(&self.policy.digest()));
        self.signatures.retain(|s| s.key_id != key_id);
        self.signatures.push(PolicySignature { key_id, signature });
        self.signatures.sort_by_key(|s| s.key_id);
    }

    /// Checks that at least one signature is a valid policy signature by
    /// one of the `trusted` keys: [`PolicyError::Unsigned`] if there is no
    /// signature, [`PolicyError::BadSignature`] if a trusted key's
    /// signature does not verify (and none does),
    /// [`PolicyError::UntrustedSignature`] if none is by a trusted key.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<VerifiedPolicy> {
        self.clone().into_verified(trusted)
    }

    /// [`SignedPolicy::verify`], without copying the policy.
    pub fn into_verified(self, trusted: &[VerifyingKey]) -> Result<VerifiedPolicy> {
        let digest = self.policy.digest();
        let signers = crate::sign::valid_signers(&self.signatures, &message(&digest), trusted)
            .map_err(|p| match p {
                SignatureProblem::Unsigned => PolicyError::Unsigned,
                SignatureProblem::Bad(key_id) => PolicyError::BadSignature { key_id },
                SignatureProblem::Untrusted(key_ids) => PolicyError::UntrustedSignature { key_ids },
            })?;
        Ok(VerifiedPolicy {
            policy: self.policy,
            digest,
            signers,
        })
    }

    /// The encoding (see the module docs): signatures in key-id order, one
    /// per key (the first, if `signatures` holds several), at most
    /// [`MAX_SIGNATURES`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let doc = self.policy.to_canonical_bytes();
        let mut sigs: Vec<([u8; KEY_ID_LEN], [u8; SIGNATURE_LEN])> = self
            .signatures
            .iter()
            .map(|s| (s.key_id.0, s.signature.to_bytes()))
            .collect();
        sigs.sort_by_key(|(id, _)| *id);
        sigs.dedup_by_key(|(id, _)| *id);
        sigs.truncate(MAX_SIGNATURES);
        let mut out = Vec::with_capacity(doc.len() + 18 + sigs.len() * 72);
        out.extend_from_slice(POLICY_MAGIC);
        out.extend_from_slice(&POLICY_FORMAT_VERSION.to_le_bytes());
        // The document is at most MAX_DOCUMENT_SIZE (the parser's limit),
        // far below u32::MAX.
        out.extend_from_slice(&u32::try_from(doc.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&doc);
        out.extend_from_slice(&(sigs.len() as u16).to_le_bytes());
        for (key_id, sig) in &sigs {
            out.extend_from_slice(key_id);
            out.extend_from_slice(sig);
        }
        out
    }

    /// Decodes a signed policy (see the module docs). Signatures are
    /// checked by [`SignedPolicy::verify`], not here.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedPolicy> {
        if bytes.len() > MAX_SIGNED_POLICY_SIZE {
            return Err(PolicyError::too_large(
                "signed policy",
                bytes.len(),
                MAX_SIGNED_POLICY_SIZE,
                "bytes",
            ));
        }
        let c = PolicyError::from_container;
        let mut r = Reader::new(bytes);
        r.magic_versions(POLICY_MAGIC, "signed policy", &[POLICY_FORMAT_VERSION])
            .map_err(c)?;
        let len = r
            .len_u32("policy length", "policy", MAX_DOCUMENT_SIZE)
            .map_err(c)?;
        let doc_offset = r.pos;
        let doc = r.bytes(len, "policy").map_err(c)?;
        let count_offset = r.pos;
        let count = usize::from(r.u16("signature count").map_err(c)?);
        if count > MAX_SIGNATURES {
            return Err(PolicyError::Malformed {
                offset: count_offset,
                msg: format!("{count} signatures; at most {MAX_SIGNATURES} are allowed"),
            });
        }
        let mut signatures: Vec<PolicySignature> = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.pos;
            let key_id = KeyId(r.array("signature key id").map_err(c)?);
            let sig: [u8; SIGNATURE_LEN] = r.array("signature").map_err(c)?;
            if signatures.last().is_some_and(|prev| prev.key_id >= key_id) {
                return Err(PolicyError::Malformed {
                    offset,
                    msg: format!("signature by key {key_id} is out of order or repeated"),
                });
            }
            signatures.push(PolicySignature {
                key_id,
                signature: Signature::from_bytes(&sig),
            });
        }
        r.finish().map_err(c)?;
        let policy =
            PolicyDocument::from_canonical_bytes(doc, "signed-policy").map_err(|e| match e {
                PolicyError::Malformed { offset, msg } => PolicyError::Malformed {
                    offset: doc_offset + offset,
                    msg,
                },
                other => other,
            })?;
        Ok(SignedPolicy { policy, signatures })
    }

    /// Whether `bytes` claims to be a signed policy, by its magic.
    pub fn is_signed_policy(bytes: &[u8]) -> bool {
        bytes.starts_with(POLICY_MAGIC)
    }
}

/// What a signature over a policy with `digest` signs.
fn message(digest: &Digest) -> Vec<u8> {
    let mut msg = POLICY_SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(digest.as_bytes());
    msg
}
