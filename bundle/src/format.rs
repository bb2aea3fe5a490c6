//! The binary encodings of a bundle and of a signed bundle, and their size
//! limits. Nothing here knows what a manifest means: [`crate::bundle`] and
//! [`crate::sign`] give the pieces their meaning.
//!
//! All integers are little-endian. A bundle (unsigned) is:
//!
//! ```text
//! magic        8 bytes  "RLTBUNDL"
//! version      u32      1
//! manifest_len u32      <= 1 MiB
//! manifest     manifest_len bytes of UTF-8 TOML (the canonical manifest)
//! count        u32      number of objects, <= 64
//! count times, in strictly ascending byte order of name:
//!   name_len   u16      1..=128
//!   name       name_len bytes ([A-Za-z0-9_.-], not starting with '.')
//!   data_len   u32      <= 16 MiB
//!   data       data_len bytes (an eBPF ELF object)
//! ```
//!
//! and nothing after; the whole is at most 64 MiB. A bundle whose stages
//! carry policies (`policies` in the manifest) is written as version 2:
//! the same, followed by
//!
//! ```text
//! policy_count u32      1..=256
//! policy_count times, in strictly ascending byte order of name:
//!   name_len   u16      1..=128
//!   name       name_len bytes (as object names, ending in ".json")
//!   data_len   u32      <= 64 MiB
//!   data       data_len bytes: the policy's canonical encoding
//!              (crate::policy::canonical)
//! ```
//!
//! so a bundle without policies has exactly the bytes (and digest) it had
//! before policies existed, and an agent that predates them refuses one
//! that carries them ("unsupported bundle format version 2") rather than
//! applying its programs without their data. A signed bundle wraps those
//! bytes:
//!
//! ```text
//! magic        8 bytes  "RLTSIGND"
//! version      u32      1
//! bundle_len   u32      <= 64 MiB
//! bundle       bundle_len bytes: a bundle, as above
//! count        u16      number of signatures, <= 64
//! count times, in strictly ascending order of key id:
//!   key_id     8 bytes  the first 8 bytes of sha256(ed25519 public key)
//!   signature  64 bytes ed25519 signature (see crate::sign for the message)
//! ```
//!
//! Decoding checks every length against its limit before using it, so
//! hostile input costs at most its own size, and reports the first problem
//! as a typed error: [`BundleError::Truncated`], [`BundleError::TooLarge`]
//! or [`BundleError::Malformed`].

use crate::error::{BundleError, Result};

/// Magic of a bundle.
pub const BUNDLE_MAGIC: &[u8; 8] = b"RLTBUNDL";
/// Magic of a signed bundle.
pub const SIGNED_MAGIC: &[u8; 8] = b"RLTSIGND";
/// The format version this crate writes and reads (of a bundle without
/// policies, and of a signed bundle).
pub const FORMAT_VERSION: u32 = 1;
/// The format version of a bundle that carries policies.
pub const FORMAT_VERSION_POLICIES: u32 = 2;
/// Most policies in a bundle.
pub const MAX_POLICIES: usize = 256;

/// Largest manifest.
pub const MAX_MANIFEST_SIZE: usize = 1 << 20;
/// Largest object.
pub const MAX_OBJECT_SIZE: usize = 16 << 20;
/// Largest encoded bundle (unsigned).
pub const MAX_BUNDLE_SIZE: usize = 64 << 20;
/// Most objects in a bundle.
pub const MAX_OBJECTS: usize = 64;
/// Most signatures on a bundle.
pub const MAX_SIGNATURES: usize = 64;
/// Largest encoded signed bundle.
pub const MAX_SIGNED_SIZE: usize =
    8 + 4 + 4 + MAX_BUNDLE_SIZE + 2 + MAX_SIGNATURES * SIGNATURE_ENTRY_SIZE;

/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
const SIGNATURE_ENTRY_SIZE: usize = KEY_ID_LEN + SIGNATURE_LEN;
const MAX_OBJECT_NAME_LEN: usize = crate::manifest::MAX_OBJECT_NAME_LEN;

/// A decoded bundle's pieces, borrowed from the input.
pub(crate) struct RawBundle<'a> {
    pub manifest: &'a [u8],
    /// Offset of the manifest in the input, for error messages.
    pub manifest_offset: usize,
    pub objects: Vec<(&'a str, &'a [u8])>,
    /// Empty in a version 1 bundle.
    pub policies: Vec<(&'a str, &'a [u8])>,
}

/// A decoded signed bundle's pieces, borrowed from the input.
pub(crate) struct RawSigned<'a> {
    pub bundle: &'a [u8],
    pub signatures: Vec<([u8; KEY_ID_LEN], [u8; SIGNATURE_LEN])>,
}

/// Encodes a bundle. `objects` and `policies` must each be sorted by
/// name, unique, and within the limits; [`crate::Bundle`] makes sure of
/// that. No policies: version 1; some: version 2.
pub(crate) fn encode_bundle<'a>(
    manifest: &str,
    objects: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
    policies: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(BUNDLE_MAGIC);
    let version = if policies.len() == 0 {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_POLICIES
    };
    out.extend_from_slice(&version.to_le_bytes());
    put_u32(&mut out, manifest.len());
    out.extend_from_slice(manifest.as_bytes());
    put_entries(&mut out, objects);
    if policies.len() > 0 {
        put_entries(&mut out, policies);
    }
    out
}

fn put_entries<'a>(out: &mut Vec<u8>, entries: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>) {
    put_u32(out, entries.len());
    for (name, data) in entries {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        put_u32(out, data.len());
        out.extend_from_slice(data);
    }
}

/// Encodes a signed bundle. `signatures` must be sorted by key id and
/// unique.
pub(crate) fn encode_signed(
    bundle: &[u8],
    signatures: &[([u8; KEY_ID_LEN], [u8; SIGNATURE_LEN])],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(bundle.len() + 18 + signatures.len() * SIGNATURE_ENTRY_SIZE);
    out.extend_from_slice(SIGNED_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    put_u32(&mut out, bundle.len());
    out.extend_from_slice(bundle);
    out.extend_from_slice(&(signatures.len() as u16).to_le_bytes());
    for (key_id, sig) in signatures {
        out.extend_from_slice(key_id);
        out.extend_from_slice(sig);
    }
    out
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lengths are bounded by the limits, all far below u32::MAX.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

/// Decodes a bundle's container (not its manifest).
pub(crate) fn decode_bundle(bytes: &[u8]) -> Result<RawBundle<'_>> {
    if bytes.len() > MAX_BUNDLE_SIZE {
        return Err(BundleError::too_large(
            "bundle",
            bytes.len(),
            MAX_BUNDLE_SIZE,
        ));
    }
    let mut r = Reader::new(bytes);
    let version = r.magic_versions(
        BUNDLE_MAGIC,
        "bundle",
        &[FORMAT_VERSION, FORMAT_VERSION_POLICIES],
    )?;

    let manifest_len = r.len_u32("manifest length", "manifest", MAX_MANIFEST_SIZE)?;
    let manifest_offset = r.pos;
    let manifest = r.bytes(manifest_len, "manifest")?;

    let count = r.len_u32("object count", "object count", MAX_OBJECTS)?;
    let objects = entries(&mut r, count, "object", MAX_OBJECT_SIZE)?;
    let policies = if version == FORMAT_VERSION_POLICIES {
        let count_offset = r.pos;
        let count = r.len_u32("policy count", "policy count", MAX_POLICIES)?;
        if count == 0 {
            return Err(BundleError::malformed(
                count_offset,
                "a version 2 bundle carries at least one policy",
            ));
        }
        let policies = entries(
            &mut r,
            count,
            "policy",
            crate::policy::limits::MAX_DOCUMENT_SIZE,
        )?;
        if let Some((name, _)) = policies.iter().find(|(n, _)| !n.ends_with(".json")) {
            return Err(BundleError::malformed(
                count_offset,
                format!("policy name {name:?} does not end in \".json\""),
            ));
        }
        policies
    } else {
        Vec::new()
    };
    r.finish()?;
    Ok(RawBundle {
        manifest,
        manifest_offset,
        objects,
        policies,
    })
}

/// `count` named entries (objects or policies), in strictly ascending
/// order of name.
fn entries<'a>(
    r: &mut Reader<'a>,
    count: usize,
    kind: &str,
    max_size: usize,
) -> Result<Vec<(&'a str, &'a [u8])>> {
    // The names of the fields, for Truncated errors.
    let (name_len_what, name_what, len_what, data_what) = if kind == "policy" {
        (
            "policy name length",
            "policy name",
            "policy length",
            "policy data",
        )
    } else {
        (
            "object name length",
            "object name",
            "object length",
            "object data",
        )
    };
    let mut out: Vec<(&str, &[u8])> = Vec::with_capacity(count);
    for _ in 0..count {
        let name_offset = r.pos;
        let name_len = usize::from(r.u16(name_len_what)?);
        if name_len == 0 || name_len > MAX_OBJECT_NAME_LEN {
            return Err(BundleError::malformed(
                name_offset,
                format!("{kind} name length {name_len} is not in 1..={MAX_OBJECT_NAME_LEN}"),
            ));
        }
        let name = r.bytes(name_len, name_what)?;
        let name = std::str::from_utf8(name)
            .ok()
            .filter(|n| crate::manifest::is_valid_object_name(n))
            .ok_or_else(|| {
                BundleError::malformed(
                    name_offset + 2,
                    format!("{kind} name is not a valid file name"),
                )
            })?;
        if let Some((prev, _)) = out.last()
            && *prev >= name
        {
            return Err(BundleError::malformed(
                name_offset,
                format!("{kind} {name:?} is out of order or repeated (after {prev:?})"),
            ));
        }
        let what = format!("{kind} {name}");
        let data_len = r.len_u32(len_what, &what, max_size)?;
        let data = r.bytes(data_len, data_what)?;
        out.push((name, data));
    }
    Ok(out)
}

/// Decodes a signed bundle's container; the bundle inside is not decoded.
pub(crate) fn decode_signed(bytes: &[u8]) -> Result<RawSigned<'_>> {
    if bytes.len() > MAX_SIGNED_SIZE {
        return Err(BundleError::too_large(
            "signed bundle",
            bytes.len(),
            MAX_SIGNED_SIZE,
        ));
    }
    let mut r = Reader::new(bytes);
    r.magic(SIGNED_MAGIC, "signed bundle")?;
    let bundle_len = r.len_u32("bundle length", "bundle", MAX_BUNDLE_SIZE)?;
    let bundle = r.bytes(bundle_len, "bundle")?;
    let count_offset = r.pos;
    let count = usize::from(r.u16("signature count")?);
    if count > MAX_SIGNATURES {
        return Err(BundleError::malformed(
            count_offset,
            format!("{count} signatures; at most {MAX_SIGNATURES} are allowed"),
        ));
    }
    let mut signatures: Vec<([u8; KEY_ID_LEN], [u8; SIGNATURE_LEN])> = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = r.pos;
        let key_id: [u8; KEY_ID_LEN] = r.array("signature key id")?;
        let sig: [u8; SIGNATURE_LEN] = r.array("signature")?;
        if let Some((prev, _)) = signatures.last()
            && *prev >= key_id
        {
            return Err(BundleError::malformed(
                offset,
                format!(
                    "signature by key {} is out of order or repeated",
                    hex::encode(key_id)
                ),
            ));
        }
        signatures.push((key_id, sig));
    }
    r.finish()?;
    Ok(RawSigned { bundle, signatures })
}

/// Whether `bytes` claims to be a signed bundle, by its magic (or as much
/// of it as there is, so a truncated signed bundle reads as truncated).
pub(crate) fn is_signed(bytes: &[u8]) -> bool {
    let n = bytes.len().min(SIGNED_MAGIC.len());
    n > 0 && bytes.get(..n) == SIGNED_MAGIC.get(..n)
}

/// A cursor over untrusted input: every read is bounds-checked. Also
/// reads signed policies ([`crate::policy::sign`]).
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(BundleError::Truncated {
                what,
                offset: self.buf.len(),
            })?;
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let b = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A u32 length (or count) of `thing`, at most `limit`.
    pub(crate) fn len_u32(
        &mut self,
        what: &'static str,
        thing: &str,
        limit: usize,
    ) -> Result<usize> {
        let n = self.u32(what)?;
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limit {
            return Err(BundleError::too_large(thing, n, limit));
        }
        Ok(n)
    }

    /// The magic, then the format version, which must be
    /// [`FORMAT_VERSION`].
    pub(crate) fn magic(&mut self, magic: &[u8; 8], what: &str) -> Result<()> {
        self.magic_versions(magic, what, &[FORMAT_VERSION])
            .map(|_| ())
    }

    /// The magic, then the format version, which must be one of
    /// `versions`; returns it.
    pub(crate) fn magic_versions(
        &mut self,
        magic: &[u8; 8],
        what: &str,
        versions: &[u32],
    ) -> Result<u32> {
        let have = self
            .buf
            .get(..magic.len().min(self.buf.len()))
            .unwrap_or_default();
        if !magic.starts_with(have) {
            return Err(BundleError::malformed(
                0,
                format!("not a {what} (bad magic)"),
            ));
        }
        self.bytes(magic.len(), "magic")?;
        let version_offset = self.pos;
        let version = self.u32("format version")?;
        if !versions.contains(&version) {
            let reads: Vec<String> = versions.iter().map(u32::to_string).collect();
            return Err(BundleError::malformed(
                version_offset,
                format!(
                    "unsupported {what} format version {version} (this build reads {})",
                    reads.join(", ")
                ),
            ));
        }
        Ok(version)
    }

    pub(crate) fn finish(self) -> Result<()> {
        if self.pos != self.buf.len() {
            return Err(BundleError::malformed(
                self.pos,
                format!("{} trailing bytes", self.buf.len() - self.pos),
            ));
        }
        Ok(())
    }
}
