//! The canonical encoding of a policy and its digest: the bytes a signed
//! policy (or a bundle) carries, and so what signatures cover.
//!
//! It is JSON, written here rather than by a serializer so that it depends
//! on nothing but this file (serde_json's `preserve_order` feature, turned
//! on by any crate of a build, would change the order of its maps):
//! - every object's members sorted by name (byte order), the document's
//!   too (`description`, `maps`, `stage`, `version`; `description` left out
//!   when there is none);
//! - maps by name, entries in the order written, each entry on a line of
//!   its own (`{"key":…,"value":…}`) so that positions in the canonical
//!   text name the entry's line;
//! - no other white space; strings escaped as serde_json escapes them
//!   (`"`, `\`, control characters), everything else as UTF-8; integers in
//!   decimal; the text ends with a newline.
//!
//! So the same policy written in TOML or in JSON, with any layout, comments
//! or member order, has the same bytes and the same [digest](PolicyDocument::digest):
//! the sha256 of those bytes.

use sha2::{Digest as _, Sha256};

use super::{PolicyDocument, PolicyError, Result, Value, limits::MAX_DOCUMENT_SIZE};
use crate::digest::Digest;

impl PolicyDocument {
    /// The canonical bytes (see the module docs).
    pub fn to_canonical_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(64 + 48 * self.entry_count());
        out.push('{');
        if let Some(d) = &self.description {
            out.push_str("\"description\":");
            string(&mut out, d);
            out.push(',');
        }
        out.push_str("\"maps\":{");
        for (i, (name, contents)) in self.maps.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            string(&mut out, name);
            out.push_str(":{\"entries\":[");
            for (j, e) in contents.entries.iter().enumerate() {
                out.push_str(if j == 0 { "\n" } else { ",\n" });
                out.push_str("{\"key\":");
                value(&mut out, &e.key);
                out.push_str(",\"value\":");
                value(&mut out, &e.value);
                out.push('}');
            }
            if !contents.entries.is_empty() {
                out.push('\n');
            }
            out.push_str("]}");
        }
        out.push_str("},\"stage\":");
        string(&mut out, &self.stage);
        out.push_str(",\"version\":");
        out.push_str(&self.version.to_string());
        out.push_str("}\n");
        out.into_bytes()
    }

    /// The sha256 of the canonical bytes.
    pub fn digest(&self) -> Digest {
        Digest::from_bytes(Sha256::digest(self.to_canonical_bytes()).into())
    }

    /// Decodes canonical bytes (as a signed policy or a bundle carries
    /// them): they must be a valid policy and exactly its canonical
    /// encoding, so that one policy has one encoding. `source` names it in
    /// errors.
    pub fn from_canonical_bytes(bytes: &[u8], source: &str) -> Result<PolicyDocument> {
        if bytes.len() > MAX_DOCUMENT_SIZE {
            return Err(PolicyError::too_large(
                format!("policy {source}"),
                bytes.len(),
                MAX_DOCUMENT_SIZE,
                "bytes",
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| PolicyError::Malformed {
            offset: e.valid_up_to(),
            msg: format!("policy {source} is not valid UTF-8"),
        })?;
        let doc = PolicyDocument::parse_as(text, super::parse::Format::Json, source)?;
        let canonical = doc.to_canonical_bytes();
        if canonical != bytes {
            let offset = canonical
                .iter()
                .zip(bytes)
                .position(|(a, b)| a != b)
                .unwrap_or(canonical.len().min(bytes.len()));
            return Err(PolicyError::Malformed {
                offset,
                msg: format!("policy {source} is not in canonical form"),
            });
        }
        Ok(doc)
    }
}

/// The canonical JSON text of one value (a key or a value of an entry):
/// what two entries' keys are compared by.
pub fn value_text(v: &Value) -> String {
    let mut out = String::new();
    value(&mut out, v);
    out
}

fn value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                value(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut members: Vec<(&String, &Value)> = members.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(out, name);
                out.push(':');
                value(out, v);
            }
            out.push('}');
        }
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn string(out: &mut String, s: &str) {
    // Serialising a &str cannot fail; fall back to an empty string if the
    // impossible happens (the decoder would then refuse the bytes).
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string()));
}
