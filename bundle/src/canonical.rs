//! The canonical TOML form of a manifest: the text a bundle embeds, and so
//! the text its digest covers.
//!
//! It is rendered here rather than by a TOML serializer so that it depends
//! on nothing but this file: every key is written, defaults included, in a
//! fixed order; rootlets are sorted by (interface, netns), stages by
//! execution order (priority, then name), `proceed_on` by the kernel's
//! action order, a stage's `rootlets` and `policies` by name. Comments and layout of the
//! manifest a person wrote do not survive, so two manifests that mean the
//! same thing give the same bundle.

use std::fmt::Write;

use crate::manifest::{Lifetime, Manifest, RootletTarget, Stage};

impl Manifest {
    /// The canonical TOML text of this manifest (see the module docs).
    pub fn to_canonical_toml(&self) -> String {
        let mut out = String::new();
        line(&mut out, "name", &quote(&self.name));
        line(&mut out, "version", &quote(&self.version));

        let mut rootlets: Vec<&RootletTarget> = self.rootlets.iter().collect();
        rootlets.sort_by(|a, b| (&a.interface, &a.netns).cmp(&(&b.interface, &b.netns)));
        for r in rootlets {
            out.push_str("\n[[rootlets]]\n");
            line(&mut out, "interface", &quote(&r.interface));
            if let Some(netns) = &r.netns {
                line(&mut out, "netns", &quote(netns));
            }
            line(&mut out, "mode", &quote(r.mode.name()));
            line(&mut out, "final_verdict", &quote(r.final_verdict.name()));
        }

        for s in self.stages_in_order() {
            stage(&mut out, s);
        }
        out
    }
}

fn stage(out: &mut String, s: &Stage) {
    out.push_str("\n[[stages]]\n");
    line(out, "name", &quote(&s.name));
    line(out, "object", &quote(&s.object));
    if let Some(sha256) = &s.sha256 {
        line(out, "sha256", &quote(sha256));
    }
    line(out, "program", &quote(&s.program));
    line(out, "priority", &s.priority.to_string());
    let mut proceed_on = s.proceed_on.clone();
    proceed_on.sort();
    let proceed_on: Vec<String> = proceed_on.iter().map(|a| quote(a.name())).collect();
    line(out, "proceed_on", &format!("[{}]", proceed_on.join(", ")));
    line(out, "maps", &quote(s.maps.name()));
    line(out, "lifetime", &quote(s.lifetime.name()));
    if let Lifetime::Lease { seconds } = s.lifetime {
        line(out, "lease_seconds", &seconds.to_string());
    }
    line(out, "owner", &quote(&s.owner));
    if let Some(rootlets) = &s.rootlets {
        let mut rootlets: Vec<&String> = rootlets.iter().collect();
        rootlets.sort();
        let rootlets: Vec<String> = rootlets.iter().map(|r| quote(r)).collect();
        line(out, "rootlets", &format!("[{}]", rootlets.join(", ")));
    }
    // Only when there are some: a manifest without policies keeps the text
    // (and so the bundle digest) it had before policies existed.
    if !s.policies.is_empty() {
        let mut policies: Vec<&String> = s.policies.iter().collect();
        policies.sort();
        let policies: Vec<String> = policies.iter().map(|p| quote(p)).collect();
        line(out, "policies", &format!("[{}]", policies.join(", ")));
    }
}

fn line(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str(" = ");
    out.push_str(value);
    out.push('\n');
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quote_escapes() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}
