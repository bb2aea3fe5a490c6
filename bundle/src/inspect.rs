//! Human-readable summaries of a bundle ([`Bundle::inspect`]) and of a
//! signed bundle ([`SignedBundle::inspect`]): what `rootletctl bundle
//! inspect` prints. Every string in a decoded manifest is free of control
//! characters (the parser refuses them), so the summary is safe to print
//! to a terminal.

use std::fmt::Write;

use crate::{bundle::Bundle, manifest::XdpAction, sign::SignedBundle};

impl Bundle {
    /// A multi-line summary: name, version, digest, size, rootlets, and
    /// the stages in execution order with their objects' sha256 and sizes
    /// and their policies (version, digest, maps with entry counts).
    pub fn inspect(&self) -> String {
        let m = self.manifest();
        let mut out = String::new();
        let _ = writeln!(out, "bundle   {} {}", m.name, m.version);
        let _ = writeln!(out, "digest   {}", self.digest());
        let size: usize = self.objects().values().map(|o| o.len()).sum();
        let _ = writeln!(
            out,
            "size     {} bytes ({} objects, {} bytes)",
            self.to_bytes().len(),
            self.objects().len(),
            size
        );

        let _ = writeln!(out, "rootlets ({})", m.rootlets.len());
        for r in &m.rootlets {
            let netns = r.netns.as_deref().unwrap_or("(own netns)");
            let _ = writeln!(
                out,
                "  {:<15}  netns {}  mode {}  final_verdict {}",
                r.interface, netns, r.mode, r.final_verdict
            );
        }

        let _ = writeln!(out, "stages ({}, in execution order)", m.stages.len());
        for s in m.stages_in_order() {
            let size = self
                .stage_object(s)
                .map_or_else(|| "?".to_string(), |o| o.len().to_string());
            let _ = writeln!(out, "  {:>6}  {}", s.priority, s.name);
            let _ = writeln!(
                out,
                "          object {} ({} bytes) program {}",
                s.object, size, s.program
            );
            let _ = writeln!(
                out,
                "          sha256 {}",
                s.sha256.as_deref().unwrap_or("?")
            );
            let _ = writeln!(
                out,
                "          owner {}  maps {}  lifetime {}  proceed_on [{}]  rootlets {}",
                s.owner,
                s.maps,
                s.lifetime,
                actions(&s.proceed_on),
                s.rootlets
                    .as_ref()
                    .map_or_else(|| "all".to_string(), |r| r.join(", ")),
            );
            for name in &s.policies {
                match self.policies().get(name) {
                    Some(p) => {
                        let d = &p.document;
                        let maps: Vec<String> = d
                            .maps
                            .iter()
                            .map(|(m, c)| format!("{m} ({})", c.entries.len()))
                            .collect();
                        let _ = writeln!(
                            out,
                            "          policy {name} version {} digest {} maps {}",
                            d.version,
                            d.digest(),
                            maps.join(", ")
                        );
                    }
                    None => {
                        let _ = writeln!(out, "          policy {name} (missing)");
                    }
                }
            }
        }
        out
    }
}

impl SignedBundle {
    /// [`Bundle::inspect`] followed by the signatures' key ids. Whether a
    /// signature is valid, and by a trusted key, is for
    /// [`SignedBundle::verify`] to say.
    pub fn inspect(&self) -> String {
        let mut out = self.bundle.inspect();
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

fn actions(a: &[XdpAction]) -> String {
    let names: Vec<&str> = a.iter().map(|a| a.name()).collect();
    names.join(", ")
}
