//! `rootletctl bundle build|sign|verify|inspect|keygen`: thin wrappers
//! over `rootlet-bundle`, whose manifest errors already name the file,
//! line, column and field.

use std::path::{Path, PathBuf};

use rootlet_bundle::{Bundle, BundleError, SignedBundle, read_signing_key, read_verifying_key};

/// Where `bundle build` writes by default: `<name>-<version>.rlb` in the
/// current directory (characters other than `A-Za-z0-9_.-` become `_`).
pub fn default_output(bundle: &Bundle) -> PathBuf {
    let m = bundle.manifest();
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    PathBuf::from(format!("{}-{}.rlb", clean(&m.name), clean(&m.version)))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    crate::rollout::journal::write_atomic(path, bytes).map_err(|e| BundleError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn read_signed(path: &Path) -> Result<SignedBundle, BundleError> {
    let bytes = std::fs::read(path).map_err(|e| BundleError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    SignedBundle::from_bytes(&bytes)
}

/// Builds (and, with keys, signs) the bundle of `manifest`; returns the
/// output path and a report. Objects outside the manifest's directory are
/// refused, except those in `allowed` (named on the command line).
pub fn build(
    manifest: &Path,
    out: Option<&Path>,
    keys: &[PathBuf],
    allowed: &[PathBuf],
) -> Result<(PathBuf, String), BundleError> {
    let bundle = Bundle::build_allowing(manifest, allowed)?;
    let out = out.map_or_else(|| default_output(&bundle), Path::to_path_buf);
    let mut signed = SignedBundle::new(bundle);
    for k in keys {
        signed.sign(&read_signing_key(k)?);
    }
    let bytes = signed.to_bytes();
    write(&out, &bytes)?;
    let m = signed.bundle.manifest();
    let report = format!(
        "built {} {} -> {} ({} bytes, {} stage{}, {} signature{})\ndigest {}\n",
        m.name,
        m.version,
        out.display(),
        bytes.len(),
        m.stages.len(),
        if m.stages.len() == 1 { "" } else { "s" },
        signed.signatures.len(),
        if signed.signatures.len() == 1 {
            ""
        } else {
            "s"
        },
        signed.bundle.digest()
    );
    Ok((out, report))
}

/// Adds signatures by `keys` to the bundle at `path`, writing `out` (or
/// `path` in place).
pub fn sign(path: &Path, keys: &[PathBuf], out: Option<&Path>) -> Result<String, BundleError> {
    let mut signed = read_signed(path)?;
    let mut ids = Vec::new();
    for k in keys {
        let key = read_signing_key(k)?;
        ids.push(rootlet_bundle::KeyId::of(&key.verifying_key()).to_string());
        signed.sign(&key);
    }
    let out = out.unwrap_or(path);
    write(out, &signed.to_bytes())?;
    Ok(format!(
        "signed {} with key{} {}; {} signature{} in total\n",
        out.display(),
        if ids.len() == 1 { "" } else { "s" },
        ids.join(", "),
        signed.signatures.len(),
        if signed.signatures.len() == 1 {
            ""
        } else {
            "s"
        }
    ))
}

/// Checks the bundle's objects and that a trusted key signed it.
pub fn verify(path: &Path, trusted: &[PathBuf]) -> Result<String, BundleError> {
    let signed = read_signed(path)?;
    let keys = trusted
        .iter()
        .map(read_verifying_key)
        .collect::<Result<Vec<_>, _>>()?;
    let verified = signed.verify(&keys)?;
    let signers: Vec<String> = verified.signers().iter().map(ToString::to_string).collect();
    let m = verified.bundle().manifest();
    Ok(format!(
        "OK: {} {} (digest {}) signed by {}\n",
        m.name,
        m.version,
        verified.bundle().digest(),
        signers.join(", ")
    ))
}

/// The human-readable summary of a bundle file.
pub fn inspect(path: &Path) -> Result<String, BundleError> {
    Ok(read_signed(path)?.inspect())
}

/// Generates a key pair.
pub fn keygen(private: &Path, public: &Path) -> Result<String, BundleError> {
    let id = rootlet_bundle::keygen(private, public)?;
    Ok(format!(
        "key {id}: private {} (keep it secret), public {} (give it to the agents' [bundles] trusted_keys)\n",
        private.display(),
        public.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_sign_verify_inspect() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("sampler.o"), rootlet_ebpf::SAMPLER).unwrap();
        std::fs::write(
            d.join("manifest.toml"),
            "name = \"edge\"\nversion = \"v1\"\n[[rootlets]]\ninterface = \"rl0\"\n[[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = 10\nowner = \"obs\"\n",
        )
        .unwrap();
        keygen(&d.join("a.key"), &d.join("a.pub")).unwrap();
        keygen(&d.join("b.key"), &d.join("b.pub")).unwrap();
        let out = d.join("edge.rlb");
        let (_, report) = build(&d.join("manifest.toml"), Some(&out), &[], &[]).unwrap();
        assert!(report.contains("0 signatures"), "{report}");
        assert!(matches!(
            verify(&out, &[d.join("a.pub")]),
            Err(BundleError::Unsigned)
        ));
        sign(&out, &[d.join("a.key")], None).unwrap();
        assert!(
            verify(&out, &[d.join("a.pub")])
                .unwrap()
                .starts_with("OK: edge v1")
        );
        assert!(matches!(
            verify(&out, &[d.join("b.pub")]),
            Err(BundleError::UntrustedSignature { .. })
        ));
        assert!(inspect(&out).unwrap().contains("sampler"));

        // Manifest errors name the field, line and column.
        std::fs::write(
            d.join("bad.toml"),
            "name = \"edge\"\nversion = \"v1\"\n[[rootlets]]\ninterface = \"rl0\"\n[[stages]]\nname = \"sampler\"\nobject = \"sampler.o\"\nprogram = \"sampler\"\npriority = \"high\"\nowner = \"obs\"\n",
        )
        .unwrap();
        let e = build(&d.join("bad.toml"), Some(&out), &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("bad.toml:9:12: stages[0].priority: expected an integer, found a string"),
            "{e}"
        );
    }
}
