//! Signing: ed25519 keys and their files, key ids, [`SignedBundle`] (a
//! bundle and its signatures, encoded as in [`crate::format`](mod@crate::format)) and
//! [`VerifiedBundle`], which only [`SignedBundle::verify`] makes.
//!
//! A signature signs [`SIGNING_CONTEXT`] followed by the bundle's 32-byte
//! digest (the sha256 of its encoding), so a bundle signature can never be
//! taken for a signature over anything else the same key signs.
//!
//! Key files are PEM: the private key as PKCS#8 (`PRIVATE KEY`, written
//! with mode 0600), the public key as SubjectPublicKeyInfo (`PUBLIC KEY`);
//! both are what `openssl pkey` reads and writes for ed25519. A key id is
//! the first 8 bytes of the sha256 of the 32-byte public key, written as 16
//! hex digits.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    str::FromStr,
};

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use ed25519_dalek::{
    Signer,
    pkcs8::{
        DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey,
        spki::der::pem::LineEnding,
    },
};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::{
    bundle::Bundle,
    error::{BundleError, Result},
    format::{self, KEY_ID_LEN},
};

/// What a bundle signature signs, before the bundle's digest.
pub const SIGNING_CONTEXT: &[u8] = b"rootlet-bundle-v1\0";

/// Largest key file read.
const MAX_KEY_FILE: usize = 64 << 10;

/// Identifies a public key: the first 8 bytes of sha256(public key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = hex::FromHexError;

    /// 16 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; KEY_ID_LEN];
        hex::decode_to_slice(s, &mut id)?;
        Ok(KeyId(id))
    }
}

/// One signature on a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSignature {
    /// Which key signed; the verifier looks the key up among those it
    /// trusts.
    pub key_id: KeyId,
    pub signature: Signature,
}

/// A bundle and the signatures over its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBundle {
    pub bundle: Bundle,
    /// At most one per key; encoded in key-id order.
    pub signatures: Vec<BundleSignature>,
}

/// A bundle with at least one valid signature by a trusted key. Only
/// [`SignedBundle::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    bundle: Bundle,
    signers: Vec<KeyId>,
}

impl VerifiedBundle {
    /// The verified bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The verified bundle, by value.
    pub fn into_bundle(self) -> Bundle {
        self.bundle
    }

    /// The trusted keys whose signatures verified, in key-id order.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }
}

impl SignedBundle {
    /// A bundle with no signatures yet.
    pub fn new(bundle: Bundle) -> SignedBundle {
        SignedBundle {
            bundle,
            signatures: Vec::new(),
        }
    }

    /// Signs the bundle with `key`, replacing an earlier signature by the
    /// same key.
    pub fn sign(&mut self, key: &SigningKey) {
        let key_id = KeyId::of(&key.verifying_key());
        let signature = key.sign(&message(&self.bundle));
        self.signatures.retain(|s| s.key_id != key_id);
        self.signatures.push(BundleSignature { key_id, signature });
        self.signatures.sort_by_key(|s| s.key_id);
    }

    /// Checks that at least one signature is a valid signature by one of
    /// the `trusted` keys. Fails with [`BundleError::Unsigned`] if there is
    /// no signature at all, [`BundleError::BadSignature`] if a trusted
    /// key's signature does not verify (and none does),
    /// [`BundleError::UntrustedSignature`] if no signature is by a trusted
    /// key.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<VerifiedBundle> {
        let signers = self.valid_signers(trusted)?;
        Ok(VerifiedBundle {
            bundle: self.bundle.clone(),
            signers,
        })
    }

    /// [`SignedBundle::verify`], without copying the bundle.
    pub fn into_verified(self, trusted: &[VerifyingKey]) -> Result<VerifiedBundle> {
        let signers = self.valid_signers(trusted)?;
        Ok(VerifiedBundle {
            bundle: self.bundle,
            signers,
        })
    }

    fn valid_signers(&self, trusted: &[VerifyingKey]) -> Result<Vec<KeyId>> {
        valid_signers(&self.signatures, &message(&self.bundle), trusted).map_err(|p| match p {
            SignatureProblem::Unsigned => BundleError::Unsigned,
            SignatureProblem::Bad(key_id) => BundleError::BadSignature { key_id },
            SignatureProblem::Untrusted(key_ids) => BundleError::UntrustedSignature { key_ids },
        })
    }

    /// The encoding: the bundle's bytes and the signatures (see
    /// [`crate::format`](mod@crate::format)). Signatures are written in key-id order, one per
    /// key (the first, if `signatures` holds several).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut sigs: Vec<([u8; KEY_ID_LEN], [u8; 64])> = self
            .signatures
            .iter()
            .map(|s| (s.key_id.0, s.signature.to_bytes()))
            .collect();
        sigs.sort_by_key(|(id, _)| *id);
        sigs.dedup_by_key(|(id, _)| *id);
        sigs.truncate(format::MAX_SIGNATURES);
        format::encode_signed(&self.bundle.to_bytes(), &sigs)
    }

    /// Decodes a signed bundle, or an unsigned bundle's bytes (which give
    /// no signatures), checking the bundle as [`Bundle::from_bytes`] does.
    /// Signatures are checked by [`SignedBundle::verify`], not here.
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedBundle> {
        if !format::is_signed(bytes) {
            return Ok(SignedBundle::new(Bundle::from_bytes(bytes)?));
        }
        let raw = format::decode_signed(bytes)?;
        let bundle = Bundle::from_bytes(raw.bundle)?;
        let signatures = raw
            .signatures
            .iter()
            .map(|(key_id, sig)| BundleSignature {
                key_id: KeyId(*key_id),
                signature: Signature::from_bytes(sig),
            })
            .collect();
        Ok(SignedBundle { bundle, signatures })
    }
}

/// Why no signature verified (see [`SignedBundle::verify`]).
pub(crate) enum SignatureProblem {
    Unsigned,
    /// A trusted key's signature does not verify (and none does).
    Bad(KeyId),
    /// No signature is by a trusted key; all the signatures' key ids.
    Untrusted(Vec<KeyId>),
}

/// The trusted keys whose signatures in `signatures` are valid over `msg`,
/// in key-id order (at least one); bundles and policies alike.
pub(crate) fn valid_signers(
    signatures: &[BundleSignature],
    msg: &[u8],
    trusted: &[VerifyingKey],
) -> std::result::Result<Vec<KeyId>, SignatureProblem> {
    if signatures.is_empty() {
        return Err(SignatureProblem::Unsigned);
    }
    let mut signers = Vec::new();
    let mut bad = None;
    for sig in signatures {
        let keys = trusted.iter().filter(|k| KeyId::of(k) == sig.key_id);
        let mut matched = false;
        let mut valid = false;
        for key in keys {
            matched = true;
            if key.verify_strict(msg, &sig.signature).is_ok() {
                valid = true;
                break;
            }
        }
        if valid {
            if !signers.contains(&sig.key_id) {
                signers.push(sig.key_id);
            }
        } else if matched && bad.is_none() {
            bad = Some(sig.key_id);
        }
    }
    signers.sort();
    match (signers.is_empty(), bad) {
        (false, _) => Ok(signers),
        (true, Some(key_id)) => Err(SignatureProblem::Bad(key_id)),
        (true, None) => Err(SignatureProblem::Untrusted(
            signatures.iter().map(|s| s.key_id).collect(),
        )),
    }
}

/// What a signature over `bundle` signs.
fn message(bundle: &Bundle) -> Vec<u8> {
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&bundle.digest_bytes());
    msg
}

/// A new signing key from the operating system's random source.
pub fn generate_signing_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| BundleError::Random { msg: e.to_string() })?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

/// Generates a key pair and writes the private key to `private_path`
/// (mode 0600) and the public key to `public_path` (mode 0644), both PEM.
/// Neither file may exist yet. Returns the new key's id.
pub fn keygen(private_path: impl AsRef<Path>, public_path: impl AsRef<Path>) -> Result<KeyId> {
    let (private_path, public_path) = (private_path.as_ref(), public_path.as_ref());
    let key = generate_signing_key()?;
    // PKCS#8 v1 (RFC 8410: the seed only, no public key), the form OpenSSL
    // writes and reads for ed25519; OpenSSL 3 refuses the v2 form (with the
    // public key) that `SigningKey::to_pkcs8_pem` writes.
    let private_pem = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .map_err(|e| key_error(private_path, e))?;
    let public = key.verifying_key();
    let public_pem = verifying_key_to_pem(&public);
    write_new(private_path, private_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(public_path, public_pem.as_bytes(), 0o644) {
        let _ = fs::remove_file(private_path);
        return Err(e);
    }
    Ok(KeyId::of(&public))
}

/// A public key as PEM (SubjectPublicKeyInfo).
pub fn verifying_key_to_pem(key: &VerifyingKey) -> String {
    // Encoding a valid key cannot fail; fall back to nothing if it does.
    key.to_public_key_pem(LineEnding::LF).unwrap_or_default()
}

/// Parses a PEM (PKCS#8) private key; `path` names it in errors.
pub fn signing_key_from_pem(pem: &str, path: impl AsRef<Path>) -> Result<SigningKey> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| key_error(path.as_ref(), e))
}

/// Parses a PEM (SubjectPublicKeyInfo) public key; `path` names it in
/// errors.
pub fn verifying_key_from_pem(pem: &str, path: impl AsRef<Path>) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| key_error(path.as_ref(), e))
}

/// Reads a private key file written by [`keygen`].
pub fn read_signing_key(path: impl AsRef<Path>) -> Result<SigningKey> {
    let path = path.as_ref();
    let pem = read_key_file(path)?;
    signing_key_from_pem(&pem, path)
}

/// Reads a public key file written by [`keygen`].
pub fn read_verifying_key(path: impl AsRef<Path>) -> Result<VerifyingKey> {
    let path = path.as_ref();
    let pem = read_key_file(path)?;
    verifying_key_from_pem(&pem, path)
}

fn read_key_file(path: &Path) -> Result<String> {
    let file = fs::File::open(path).map_err(|e| BundleError::io(path, e))?;
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| BundleError::io(path, e))?;
    if raw.len() > MAX_KEY_FILE {
        return Err(BundleError::Key {
            path: path.to_path_buf(),
            msg: format!("larger than {MAX_KEY_FILE} bytes: not a key file"),
        });
    }
    String::from_utf8(raw).map_err(|_| BundleError::Key {
        path: path.to_path_buf(),
        msg: "not a PEM file (not UTF-8)".to_string(),
    })
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| BundleError::io(path, e))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| BundleError::io(path, e))
}

fn key_error(path: &Path, e: impl fmt::Display) -> BundleError {
    BundleError::Key {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}
