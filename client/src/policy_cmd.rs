//! `rootletctl policy build|sign|verify|inspect|diff`: thin wrappers over
//! `rootlet_bundle::policy`, whose document errors already name the file,
//! line, column and field. A policy file on disk is either a source (TOML
//! or JSON, as a person writes it) or a signed policy (`.rlp`, what
//! `policy build` writes: the canonical document and 0 or more
//! signatures); `inspect` and `diff` read both.

use std::path::{Path, PathBuf};

use rootlet_bundle::{
    BundleError, KeyId, PolicyDocument, PolicyError, SignedPolicy,
    policy::{MapDiff, PolicyDiff, canonical::value_text},
    read_signing_key, read_verifying_key,
};

/// What can go wrong in a `policy` command.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCmdError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A key file (read by the bundle crate, which owns keys).
    #[error(transparent)]
    Key(#[from] BundleError),
}

impl PolicyCmdError {
    /// Whether the fault is in what the user gave (files, keys) rather than
    /// a policy that fails its checks (signatures, a damaged file).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PolicyCmdError::Key(_)
                | PolicyCmdError::Policy(
                    PolicyError::Document(_)
                        | PolicyError::TooLarge { .. }
                        | PolicyError::Io { .. }
                )
        )
    }
}

type Result<T> = std::result::Result<T, PolicyCmdError>;

/// Where `policy build` writes by default: `<stage>-<version>.rlp` in the
/// current directory.
pub fn default_output(policy: &PolicyDocument) -> PathBuf {
    PathBuf::from(format!("{}-{}.rlp", policy.stage, policy.version))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::rollout::journal::write_atomic(path, bytes).map_err(|e| {
        PolicyError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        }
        .into()
    })
}

/// Reads a signed policy (what `policy build` writes).
pub fn read_signed(path: &Path) -> Result<SignedPolicy> {
    let bytes = read_bounded(path)?;
    Ok(SignedPolicy::from_bytes(&bytes)?)
}

/// Reads a signed policy, or a policy source (TOML or JSON) as an
/// unsigned one.
pub fn read_any(path: &Path) -> Result<SignedPolicy> {
    let bytes = read_bounded(path)?;
    if SignedPolicy::is_signed_policy(&bytes) {
        return Ok(SignedPolicy::from_bytes(&bytes)?);
    }
    Ok(SignedPolicy::new(PolicyDocument::read(path)?))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let limit = rootlet_bundle::policy::sign::MAX_SIGNED_POLICY_SIZE;
    let file = std::fs::File::open(path).map_err(|e| PolicyError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| PolicyError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
    if bytes.len() > limit {
        return Err(PolicyError::TooLarge {
            what: path.display().to_string(),
            size: bytes.len() as u64,
            limit: limit as u64,
            unit: "bytes",
        }
        .into());
    }
    Ok(bytes)
}

/// Parses the policy source `file`, canonicalises it and writes it (signed
/// with `keys`, if any) to `out`; returns the output path and a report.
pub fn build(
    file: &Path,
    out: Option<&Path>,
    keys: &[PathBuf],
    object: Option<&Path>,
) -> Result<(PathBuf, String)> {
    let policy = PolicyDocument::read(file)?;
    if let Some(object) = object {
        check_types(&policy, object)?;
    }
    let out = out.map_or_else(|| default_output(&policy), Path::to_path_buf);
    let mut signed = SignedPolicy::new(policy);
    for k in keys {
        signed.sign(&read_signing_key(k)?);
    }
    let bytes = signed.to_bytes();
    write(&out, &bytes)?;
    let p = &signed.policy;
    let n = signed.signatures.len();
    Ok((
        out.clone(),
        format!(
            "built policy for stage {} version {} -> {} ({} bytes, {} map{}, {} entr{}, {n} signature{})\ndigest {}\n",
            p.stage,
            p.version,
            out.display(),
            bytes.len(),
            p.maps.len(),
            if p.maps.len() == 1 { "" } else { "s" },
            p.entry_count(),
            if p.entry_count() == 1 { "y" } else { "ies" },
            if n == 1 { "" } else { "s" },
            p.digest()
        ),
    ))
}

/// Checks every entry of `policy` against the map types of the stage
/// object at `object` (the checks the agent makes against the running
/// program's BTF), naming the first that does not fit at its
/// file:line:col.
pub fn check_types(policy: &PolicyDocument, object: &Path) -> Result<()> {
    use rootlet_bundle::policy::EntryPart;
    let bytes = std::fs::read(object).map_err(|source| PolicyError::Io {
        path: object.to_path_buf(),
        source,
    })?;
    let at_start = |field: String, msg: String| {
        PolicyError::Document(rootlet_bundle::located::LocatedError::Field {
            file: policy.source.clone(),
            line: 1,
            col: 1,
            field,
            msg,
        })
    };
    let schema = rootlet_schema::Schema::from_elf(&bytes).map_err(|e| {
        at_start(
            "stage".into(),
            format!("{}: its BTF: {e}", object.display()),
        )
    })?;
    for (name, contents) in &policy.maps {
        let Some(map) = schema.map(name) else {
            return Err(at_start(
                format!("maps.{name}"),
                format!("{} has no map `{name}`", object.display()),
            )
            .into());
        };
        let Some(entries) = map.entries() else {
            return Err(at_start(
                format!("maps.{name}"),
                "its values are kernel objects: a policy cannot set them".into(),
            )
            .into());
        };
        if contents.entries.len() > entries.max_entries as usize {
            return Err(at_start(
                format!("maps.{name}.entries"),
                format!(
                    "{} entries; the map holds at most {}",
                    contents.entries.len(),
                    entries.max_entries
                ),
            )
            .into());
        }
        for (i, e) in contents.entries.iter().enumerate() {
            // The codec's path starts with `key` or `value`: the rest is
            // the detail under the entry's part.
            let fail = |part: EntryPart, err: rootlet_schema::CodecError| {
                let detail = err
                    .path
                    .split_once('.')
                    .map_or(String::new(), |(_, rest)| format!(".{rest}"));
                policy.entry_error(name, i, part, &detail, err.message)
            };
            entries
                .decode_key(&e.key)
                .map_err(|err| fail(EntryPart::Key, err))?;
            entries
                .decode_value(&e.value)
                .map_err(|err| fail(EntryPart::Value, err))?;
        }
    }
    Ok(())
}

/// Adds signatures by `keys` to the signed policy at `path`, writing `out`
/// (or `path` in place).
pub fn sign(path: &Path, keys: &[PathBuf], out: Option<&Path>) -> Result<String> {
    let mut signed = read_signed(path)?;
    let mut ids = Vec::new();
    for k in keys {
        let key = read_signing_key(k)?;
        ids.push(KeyId::of(&key.verifying_key()).to_string());
        signed.sign(&key);
    }
    let out = out.unwrap_or(path);
    write(out, &signed.to_bytes())?;
    let n = signed.signatures.len();
    Ok(format!(
        "signed {} with key{} {}; {n} signature{} in total\n",
        out.display(),
        if ids.len() == 1 { "" } else { "s" },
        ids.join(", "),
        if n == 1 { "" } else { "s" }
    ))
}

/// Checks that a trusted key signed the policy at `path`.
pub fn verify(path: &Path, trusted: &[PathBuf]) -> Result<String> {
    let signed = read_signed(path)?;
    let keys = trusted
        .iter()
        .map(read_verifying_key)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let verified = signed.into_verified(&keys)?;
    let signers: Vec<String> = verified.signers().iter().map(ToString::to_string).collect();
    let p = verified.policy();
    Ok(format!(
        "OK: policy for stage {} version {} (digest {}) signed by {}\n",
        p.stage,
        p.version,
        verified.digest(),
        signers.join(", ")
    ))
}

/// The summary of a policy file (signed or source): stage, version,
/// digest, maps with entry counts, signers; with `entries`, every entry.
pub fn inspect(path: &Path, entries: bool) -> Result<String> {
    Ok(read_any(path)?.inspect(entries))
}

/// The differences between two policy files (signed or source), and
/// whether they are the same policy.
pub fn diff(old: &Path, new: &Path) -> Result<(String, bool)> {
    let (o, n) = (read_any(old)?.policy, read_any(new)?.policy);
    let d = PolicyDiff::between(&o, &n);
    Ok((render_diff(&o, &n, &d), d.is_same()))
}

/// `policy diff`'s text.
pub fn render_diff(old: &PolicyDocument, new: &PolicyDocument, d: &PolicyDiff) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if d.is_same() {
        let _ = writeln!(
            out,
            "same policy: stage {} version {} digest {}",
            new.stage,
            new.version,
            new.digest()
        );
        return out;
    }
    if let Some((a, b)) = &d.stage {
        let _ = writeln!(out, "stage {a} -> {b}");
    }
    match d.version {
        Some((a, b)) => {
            let _ = writeln!(out, "version {a} -> {b}");
        }
        None => {
            let _ = writeln!(out, "version {} (unchanged)", new.version);
        }
    }
    if let Some((a, b)) = &d.description {
        let show = |s: &Option<String>| {
            s.as_deref()
                .map_or("(none)".to_string(), |s| format!("{s:?}"))
        };
        let _ = writeln!(out, "description {} -> {}", show(a), show(b));
    }
    let _ = writeln!(out, "digest {} -> {}", old.digest(), new.digest());
    for (name, m) in &d.maps {
        match m {
            MapDiff::Changed {
                added,
                removed,
                changed,
            } => {
                let _ = writeln!(
                    out,
                    "map {name}: {} added, {} removed, {} changed",
                    added.len(),
                    removed.len(),
                    changed.len()
                );
                for e in added {
                    let _ = writeln!(
                        out,
                        "  + {} => {}",
                        value_text(&e.key),
                        value_text(&e.value)
                    );
                }
                for e in removed {
                    let _ = writeln!(
                        out,
                        "  - {} => {}",
                        value_text(&e.key),
                        value_text(&e.value)
                    );
                }
                for (a, b) in changed {
                    let _ = writeln!(
                        out,
                        "  ~ {} => {} -> {}",
                        value_text(&a.key),
                        value_text(&a.value),
                        value_text(&b.value)
                    );
                }
            }
            MapDiff::OnlyNew { entries } => {
                let _ = writeln!(
                    out,
                    "map {name}: only in the new policy, which sets its {entries} entr{}",
                    if *entries == 1 { "y" } else { "ies" }
                );
            }
            MapDiff::OnlyOld { entries } => {
                let _ = writeln!(
                    out,
                    "map {name}: only in the old policy ({entries} entr{}); the new one leaves it as it is",
                    if *entries == 1 { "y" } else { "ies" }
                );
            }
        }
    }
    out
}
