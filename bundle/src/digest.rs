//! [`Digest`]: the one spelling of a bundle's (or an object's) sha256.
//!
//! The canonical form is 64 lowercase hex digits, with no prefix: what every
//! rootlet.v1 response, every record of the agent and every line
//! `rootletctl` prints carry. On input (a digest an operator pastes), the
//! `sha256:` prefix and uppercase digits are accepted too; anything else is
//! refused, so a digest that cannot match never silently answers "absent".

use std::{fmt, str::FromStr};

/// A sha256 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a sha256 digest: expected 64 hex digits, optionally prefixed with `sha256:`")]
pub struct DigestError(pub String);

impl Digest {
    /// The prefix accepted (and dropped) on input.
    pub const PREFIX: &'static str = "sha256:";

    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `<64 hex>` or `sha256:<64 hex>`, in either case.
    ///
    /// # Errors
    /// Anything else (an empty string included).
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let bad = || DigestError(s.chars().take(80).collect());
        let hex = s.strip_prefix(Self::PREFIX).unwrap_or(s);
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex, &mut out).map_err(|_| bad())?;
        Ok(Digest(out))
    }

    /// The canonical form: 64 lowercase hex digits.
    pub fn canonical(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn both_spellings_parse_to_the_canonical_one() {
        let bare = Digest::parse(HEX).expect("bare");
        let prefixed = Digest::parse(&format!("sha256:{HEX}")).expect("prefixed");
        let upper = Digest::parse(&HEX.to_uppercase()).expect("uppercase");
        assert_eq!(bare, prefixed);
        assert_eq!(bare, upper);
        assert_eq!(prefixed.to_string(), HEX);
    }

    #[test]
    fn anything_else_is_refused() {
        for s in [
            "",
            "sha256:",
            &HEX[..63],
            &format!("{HEX}0"),
            &format!("sha512:{HEX}"),
            &format!("SHA256:{HEX}"),
            &format!(" {HEX}"),
            &HEX.replace('f', "g"),
        ] {
            assert!(Digest::parse(s).is_err(), "{s:?}");
        }
    }
}
