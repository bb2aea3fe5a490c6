//! Human-readable summaries of a policy ([`PolicyDocument::inspect`]) and
//! of a signed policy ([`SignedPolicy::inspect`]): what `rootletctl policy
//! inspect` prints. Every string in a parsed policy is free of control
//! characters except inside entries, which are printed as (escaped) JSON.

use std::fmt::Write;

use super::{PolicyDocument, SignedPolicy, canonical::value_text};

impl PolicyDocument {
    /// A multi-line summary: stage, version, description, digest, and each
    /// map with its entry count; with `entries`, every entry too (as
    /// canonical JSON, `key => value`).
    pub fn inspect(&self, entries: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "policy   stage {} version {}",
            self.stage, self.version
        );
        if let Some(d) = &self.description {
            let _ = writeln!(out, "about    {d}");
        }
        let _ = writeln!(out, "digest   {}", self.digest());
        let _ = writeln!(
            out,
            "maps ({}, {} entries)",
            self.maps.len(),
            self.entry_count()
        );
        for (name, contents) in &self.maps {
            let n = contents.entries.len();
            let _ = writeln!(
                out,
                "  {name}  {n} entr{}",
                if n == 1 { "y" } else { "ies" }
            );
            if entries {
                for e in &contents.entries {
                    let _ = writeln!(
                        out,
                        "    {} => {}",
                        value_text(&e.key),
                        value_text(&e.value)
                    );
                }
            }
        }
        out
    }
}

impl SignedPolicy {
    /// [`PolicyDocument::inspect`] followed by the signatures' key ids.
    /// Whether a signature is valid, and by a trusted key, is for
    /// [`SignedPolicy::verify`] to say.
    pub fn inspect(&self, entries: bool) -> String {
        let mut out = self.policy.inspect(entries);
        if self.signatures.is_empty() {
            out.push_str("signatures (0): unsigned\n");
        } else {
            let _ = writeln!(out, "signatures ({})", self.signatures.len());
            for s in &self.signatures {
                let _ = writeln!(out, "  key {}", s.key_id);
            }
        }
        out
    }
}
