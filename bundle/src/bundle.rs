//! [`Bundle`]: a manifest and the eBPF ELF objects it names, each checked
//! against the sha256 the manifest records; built from a manifest on disk
//! ([`Bundle::build`]) or from memory ([`Bundle::from_parts`]), and encoded
//! and decoded canonically ([`Bundle::to_bytes`], [`Bundle::from_bytes`];
//! the format is in [`crate::format`](mod@crate::format)).
//!
//! A bundle embeds the canonical text of its manifest (see
//! [`crate::canonical`]) in which every stage's `object` is the embedded
//! object's file name and every stage records its `sha256`. Its digest is
//! the sha256 of its encoding, and is what signatures sign.
//!
//! A stage may carry initial policies for its maps (the manifest's
//! `policies`, files relative to the manifest's directory): each is parsed,
//! must be for that stage, and is embedded in canonical form under
//! `<file stem>.json`, so the bundle's digest (and signatures) cover it.
//! The policies of one stage must not set the same map.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};

use crate::{
    error::{BundleError, Result},
    format::{
        self, MAX_BUNDLE_SIZE, MAX_MANIFEST_SIZE, MAX_OBJECT_SIZE, MAX_OBJECTS, MAX_POLICIES,
    },
    located::LocatedError,
    manifest::{Manifest, Stage, is_valid_object_name, policy_embedded_name},
    policy::{PolicyDocument, PolicyError, limits::MAX_DOCUMENT_SIZE},
};

/// The name a bundle's embedded manifest goes by in error messages.
pub const EMBEDDED_MANIFEST_NAME: &str = "bundle:manifest.toml";

/// `EM_BPF`, the ELF machine of eBPF objects.
const EM_BPF: u16 = 247;

/// A manifest, its objects and its policies, consistent with each other:
/// every stage's object is present, is an eBPF ELF file and has the sha256
/// the manifest records, and every object is some stage's; every stage's
/// policies are present and for that stage, and every policy is some
/// stage's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    manifest: Manifest,
    manifest_text: String,
    objects: BTreeMap<String, Arc<Vec<u8>>>,
    policies: BTreeMap<String, EmbeddedPolicy>,
    digest: [u8; 32],
}

/// A policy a bundle carries: the document and its canonical bytes (what
/// the bundle embeds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedPolicy {
    pub document: Arc<PolicyDocument>,
    pub bytes: Arc<Vec<u8>>,
}

impl EmbeddedPolicy {
    fn new(document: PolicyDocument) -> EmbeddedPolicy {
        let bytes = Arc::new(document.to_canonical_bytes());
        EmbeddedPolicy {
            document: Arc::new(document),
            bytes,
        }
    }
}

impl Bundle {
    /// Reads the manifest at `manifest_path` and the objects it names
    /// (paths relative to the manifest's directory) and builds a bundle.
    ///
    /// Each object is embedded under its file name; two stages may share
    /// an object, but two different objects may not have the same file name.
    /// A stage that records a `sha256` must match it. An object outside the
    /// manifest's directory (`../`, an absolute path, or a symbolic link
    /// that leads out) is refused: see [`Bundle::build_allowing`].
    pub fn build(manifest_path: impl AsRef<Path>) -> Result<Bundle> {
        Bundle::build_allowing(manifest_path, &[])
    }

    /// [`Bundle::build`], also accepting the objects at `outside` (paths
    /// someone named on purpose, such as on a command line) although they
    /// are outside the manifest's directory.
    pub fn build_allowing(manifest_path: impl AsRef<Path>, outside: &[PathBuf]) -> Result<Bundle> {
        let manifest_path = manifest_path.as_ref();
        let file = manifest_path.display().to_string();
        let raw = read_limited(manifest_path, MAX_MANIFEST_SIZE, "manifest")?;
        let text = String::from_utf8(raw).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let before = e.as_bytes().get(..valid).unwrap_or_default();
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let col = String::from_utf8_lossy(before.get(line_start..).unwrap_or_default())
                .chars()
                .count()
                + 1;
            BundleError::Manifest(LocatedError::Syntax {
                file: file.clone(),
                line,
                col,
                msg: "not valid UTF-8".to_string(),
            })
        })?;
        let (mut manifest, positions) = crate::manifest::parse_source_with_positions(&text, &file)?;
        let object_positions = &positions.objects;

        let dir = match manifest_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let root = fs::canonicalize(&dir).map_err(|e| BundleError::io(&dir, e))?;
        let allowed: Vec<PathBuf> = outside
            .iter()
            .filter_map(|p| fs::canonicalize(p).ok())
            .collect();
        // Embedded name -> (path it came from, bytes).
        let mut objects: BTreeMap<String, (PathBuf, Arc<Vec<u8>>)> = BTreeMap::new();
        for (i, stage) in manifest.stages.iter_mut().enumerate() {
            let path = dir.join(&stage.object);
            // A missing object is reported by read_object below.
            if let Ok(real) = fs::canonicalize(&path)
                && !real.starts_with(&root)
                && !allowed.contains(&real)
            {
                let (line, col) = object_positions.get(i).copied().unwrap_or((0, 0));
                return Err(BundleError::Manifest(LocatedError::Field {
                    file,
                    line,
                    col,
                    field: format!("stages[{i}].object"),
                    msg: format!(
                        "{:?} is {}, outside the manifest's directory {}; name it on the \
                         command line (--allow-object {}) to build it in",
                        stage.object,
                        real.display(),
                        root.display(),
                        real.display()
                    ),
                }));
            }
            // The parser has checked that the path has a valid file name.
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let data = match objects.get(&name) {
                Some((seen, data)) if *seen == path => Arc::clone(data),
                _ => {
                    let data = read_object(&path, &stage.name)?;
                    check_elf(&data).map_err(|reason| BundleError::NotElf {
                        object: path.display().to_string(),
                        reason,
                    })?;
                    let data = Arc::new(data);
                    if let Some((seen, other)) = objects.get(&name)
                        && *other != data
                    {
                        let (line, col) = object_positions.get(i).copied().unwrap_or((0, 0));
                        return Err(BundleError::Manifest(LocatedError::Field {
                            file,
                            line,
                            col,
                            field: format!("stages[{i}].object"),
                            msg: format!(
                                "{} and {} differ but have the same file name, which names \
                                 the object in the bundle",
                                path.display(),
                                seen.display()
                            ),
                        }));
                    }
                    objects.insert(name.clone(), (path.clone(), Arc::clone(&data)));
                    data
                }
            };
            if let Some(expected) = &stage.sha256 {
                let actual = sha256_hex(&data);
                if *expected != actual {
                    return Err(BundleError::DigestMismatch {
                        object: path.display().to_string(),
                        expected: expected.clone(),
                        actual,
                    });
                }
            }
            stage.object = name;
        }
        let objects = objects
            .into_iter()
            .map(|(name, (_, data))| (name, data))
            .collect();

        // Embedded name -> (path it came from, policy).
        let mut policies: BTreeMap<String, (PathBuf, PolicyDocument)> = BTreeMap::new();
        for (i, stage) in manifest.stages.iter_mut().enumerate() {
            for (j, rel) in stage.policies.iter_mut().enumerate() {
                let (line, col) = positions
                    .policies
                    .get(i)
                    .and_then(|p| p.get(j))
                    .copied()
                    .unwrap_or((0, 0));
                let at = |msg: String| {
                    BundleError::Manifest(LocatedError::Field {
                        file: file.clone(),
                        line,
                        col,
                        field: format!("stages[{i}].policies[{j}]"),
                        msg,
                    })
                };
                let path = dir.join(&*rel);
                if let Ok(real) = fs::canonicalize(&path)
                    && !real.starts_with(&root)
                    && !allowed.contains(&real)
                {
                    return Err(at(format!(
                        "{rel:?} is {}, outside the manifest's directory {}; name it on the \
                         command line (--allow-object {}) to build it in",
                        real.display(),
                        root.display(),
                        real.display()
                    )));
                }
                let doc = match PolicyDocument::read(&path) {
                    Ok(doc) => doc,
                    Err(PolicyError::Io { source, .. }) => {
                        return Err(at(format!("cannot read {}: {source}", path.display())));
                    }
                    Err(e) => return Err(e.into()),
                };
                if doc.stage != stage.name {
                    return Err(at(format!(
                        "{} sets maps of stage {:?}, not of this stage ({:?})",
                        path.display(),
                        doc.stage,
                        stage.name
                    )));
                }
                // The parser has checked that the path embeds under a
                // valid name.
                let name = policy_embedded_name(rel).unwrap_or_default();
                if let Some((seen, _)) = policies.get(&name) {
                    return Err(at(format!(
                        "{} and {} would both be embedded as {name}",
                        path.display(),
                        seen.display()
                    )));
                }
                policies.insert(name.clone(), (path, doc));
                *rel = name;
            }
        }
        let policies = policies
            .into_iter()
            .map(|(name, (_, doc))| (name, doc))
            .collect();
        Bundle::assemble(manifest, objects, policies)
    }

    /// Builds a bundle from a manifest whose stages name their objects by
    /// the keys of `objects`. Stages that record a `sha256` must match;
    /// the others get theirs filled in. Every object must be some stage's.
    pub fn from_parts(manifest: Manifest, objects: BTreeMap<String, Vec<u8>>) -> Result<Bundle> {
        Bundle::from_parts_with_policies(manifest, objects, BTreeMap::new())
    }

    /// [`Bundle::from_parts`], with the policies the stages name (by the
    /// keys of `policies`, each ending in `.json`).
    pub fn from_parts_with_policies(
        manifest: Manifest,
        objects: BTreeMap<String, Vec<u8>>,
        policies: BTreeMap<String, PolicyDocument>,
    ) -> Result<Bundle> {
        let objects = objects
            .into_iter()
            .map(|(name, data)| (name, Arc::new(data)))
            .collect();
        Bundle::assemble(manifest, objects, policies)
    }

    fn assemble(
        mut manifest: Manifest,
        objects: BTreeMap<String, Arc<Vec<u8>>>,
        policies: BTreeMap<String, PolicyDocument>,
    ) -> Result<Bundle> {
        if policies.len() > MAX_POLICIES {
            return Err(BundleError::too_large(
                "policy count",
                policies.len(),
                MAX_POLICIES,
            ));
        }
        let mut embedded = BTreeMap::new();
        for (name, doc) in policies {
            if !is_valid_object_name(&name) || !name.ends_with(".json") {
                return Err(BundleError::Malformed {
                    offset: 0,
                    msg: format!(
                        "policy name {name:?} is not a valid file name ending in \".json\""
                    ),
                });
            }
            let p = EmbeddedPolicy::new(doc);
            if p.bytes.len() > MAX_DOCUMENT_SIZE {
                return Err(BundleError::too_large(
                    format!("policy {name}"),
                    p.bytes.len(),
                    MAX_DOCUMENT_SIZE,
                ));
            }
            embedded.insert(name, p);
        }
        let policies = embedded;
        if objects.len() > MAX_OBJECTS {
            return Err(BundleError::too_large(
                "object count",
                objects.len(),
                MAX_OBJECTS,
            ));
        }
        for (name, data) in &objects {
            if data.len() > MAX_OBJECT_SIZE {
                return Err(BundleError::too_large(
                    format!("object {name}"),
                    data.len(),
                    MAX_OBJECT_SIZE,
                ));
            }
            check_elf(data).map_err(|reason| BundleError::NotElf {
                object: name.clone(),
                reason,
            })?;
        }
        for stage in &mut manifest.stages {
            let data = objects
                .get(&stage.object)
                .ok_or_else(|| BundleError::MissingObject {
                    stage: stage.name.clone(),
                    object: PathBuf::from(&stage.object),
                })?;
            let actual = sha256_hex(data);
            match &stage.sha256 {
                Some(expected) if *expected != actual => {
                    return Err(BundleError::DigestMismatch {
                        object: stage.object.clone(),
                        expected: expected.clone(),
                        actual,
                    });
                }
                _ => stage.sha256 = Some(actual),
            }
        }
        check_all_used(&manifest, &objects)?;
        check_policies(&manifest, &policies)?;

        let manifest_text = manifest.to_canonical_toml();
        if manifest_text.len() > MAX_MANIFEST_SIZE {
            return Err(BundleError::too_large(
                "manifest",
                manifest_text.len(),
                MAX_MANIFEST_SIZE,
            ));
        }
        // Parsing the canonical text checks the manifest (the caller's, if
        // it came from `from_parts`) and gives it its canonical order.
        let manifest = Manifest::parse_embedded(&manifest_text, EMBEDDED_MANIFEST_NAME)?;
        let encoded = encode(&manifest_text, &objects, &policies);
        if encoded.len() > MAX_BUNDLE_SIZE {
            return Err(BundleError::too_large(
                "bundle",
                encoded.len(),
                MAX_BUNDLE_SIZE,
            ));
        }
        Ok(Bundle {
            manifest,
            manifest_text,
            objects,
            policies,
            digest: Sha256::digest(&encoded).into(),
        })
    }

    /// Decodes and checks a bundle: the container (see [`crate::format`](mod@crate::format)),
    /// the manifest (as [`Manifest::parse_embedded`]), and every object
    /// against the sha256 the manifest records.
    pub fn from_bytes(bytes: &[u8]) -> Result<Bundle> {
        let raw = format::decode_bundle(bytes)?;
        let manifest_text = std::str::from_utf8(raw.manifest).map_err(|e| {
            BundleError::malformed(
                raw.manifest_offset + e.valid_up_to(),
                "manifest is not valid UTF-8",
            )
        })?;
        let manifest = Manifest::parse_embedded(manifest_text, EMBEDDED_MANIFEST_NAME)?;
        let objects: BTreeMap<String, Arc<Vec<u8>>> = raw
            .objects
            .iter()
            .map(|&(name, data)| (name.to_string(), Arc::new(data.to_vec())))
            .collect();
        for (name, data) in &objects {
            check_elf(data).map_err(|reason| BundleError::NotElf {
                object: name.clone(),
                reason,
            })?;
        }
        for stage in &manifest.stages {
            let data = objects
                .get(&stage.object)
                .ok_or_else(|| BundleError::MissingObject {
                    stage: stage.name.clone(),
                    object: PathBuf::from(&stage.object),
                })?;
            let actual = sha256_hex(data);
            // parse_embedded requires every stage's sha256.
            let expected = stage.sha256.clone().unwrap_or_default();
            if expected != actual {
                return Err(BundleError::DigestMismatch {
                    object: stage.object.clone(),
                    expected,
                    actual,
                });
            }
        }
        check_all_used(&manifest, &objects)?;
        let mut policies = BTreeMap::new();
        for &(name, data) in &raw.policies {
            let document = PolicyDocument::from_canonical_bytes(data, &format!("bundle:{name}"))?;
            policies.insert(
                name.to_string(),
                EmbeddedPolicy {
                    document: Arc::new(document),
                    bytes: Arc::new(data.to_vec()),
                },
            );
        }
        check_policies(&manifest, &policies)?;
        Ok(Bundle {
            manifest,
            manifest_text: manifest_text.to_string(),
            objects,
            policies,
            digest: Sha256::digest(bytes).into(),
        })
    }

    /// The canonical encoding: the same bundle always gives the same bytes,
    /// and `Bundle::from_bytes(&b.to_bytes())` gives `b` back.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(&self.manifest_text, &self.objects, &self.policies)
    }

    /// The sha256 of [`Bundle::to_bytes`], in lowercase hex.
    pub fn digest(&self) -> String {
        hex::encode(self.digest)
    }

    /// The sha256 of [`Bundle::to_bytes`].
    pub fn digest_bytes(&self) -> [u8; 32] {
        self.digest
    }

    /// The manifest, in canonical order (rootlets by interface, stages in
    /// execution order), every stage with its `sha256` and its object's
    /// embedded name.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The embedded manifest's text.
    pub fn manifest_text(&self) -> &str {
        &self.manifest_text
    }

    /// The objects, by embedded name.
    pub fn objects(&self) -> &BTreeMap<String, Arc<Vec<u8>>> {
        &self.objects
    }

    /// The object embedded as `name`.
    pub fn object(&self, name: &str) -> Option<&Arc<Vec<u8>>> {
        self.objects.get(name)
    }

    /// The object `stage` runs (always present for a stage of this
    /// bundle's manifest).
    pub fn stage_object(&self, stage: &Stage) -> Option<&Arc<Vec<u8>>> {
        self.objects.get(&stage.object)
    }

    /// The policies, by embedded name (empty for most bundles).
    pub fn policies(&self) -> &BTreeMap<String, EmbeddedPolicy> {
        &self.policies
    }

    /// The initial policies `stage` carries, in the order its manifest
    /// entry lists them (by name); each is for this stage, and no two set
    /// the same map. Empty for a stage without policies, or a stage of
    /// another bundle.
    pub fn stage_policies(&self, stage: &Stage) -> Vec<&PolicyDocument> {
        stage
            .policies
            .iter()
            .filter_map(|name| self.policies.get(name))
            .map(|p| p.document.as_ref())
            .collect()
    }
}

fn encode(
    manifest_text: &str,
    objects: &BTreeMap<String, Arc<Vec<u8>>>,
    policies: &BTreeMap<String, EmbeddedPolicy>,
) -> Vec<u8> {
    format::encode_bundle(
        manifest_text,
        objects.iter().map(|(n, d)| (n.as_str(), d.as_slice())),
        policies
            .iter()
            .map(|(n, p)| (n.as_str(), p.bytes.as_slice())),
    )
}

/// Every stage's policies are embedded and for that stage, no two of one
/// stage set the same map, and every embedded policy is some stage's.
fn check_policies(manifest: &Manifest, policies: &BTreeMap<String, EmbeddedPolicy>) -> Result<()> {
    for stage in &manifest.stages {
        let mut maps: BTreeMap<&str, &str> = BTreeMap::new();
        for name in &stage.policies {
            let p = policies
                .get(name)
                .ok_or_else(|| BundleError::MissingPolicy {
                    stage: stage.name.clone(),
                    policy: name.clone(),
                })?;
            if p.document.stage != stage.name {
                return Err(BundleError::PolicyStage {
                    policy: name.clone(),
                    policy_stage: p.document.stage.clone(),
                    stage: stage.name.clone(),
                });
            }
            for map in p.document.maps.keys() {
                if let Some(first) = maps.insert(map, name) {
                    return Err(BundleError::PolicyOverlap {
                        stage: stage.name.clone(),
                        map: map.clone(),
                        first: first.to_string(),
                        second: name.clone(),
                    });
                }
            }
        }
    }
    match policies
        .keys()
        .find(|name| !manifest.stages.iter().any(|s| s.policies.contains(name)))
    {
        Some(name) => Err(BundleError::UnusedPolicy {
            policy: name.clone(),
        }),
        None => Ok(()),
    }
}

fn check_all_used(manifest: &Manifest, objects: &BTreeMap<String, Arc<Vec<u8>>>) -> Result<()> {
    match objects
        .keys()
        .find(|name| !manifest.stages.iter().any(|s| s.object == **name))
    {
        Some(name) => Err(BundleError::UnusedObject {
            object: name.clone(),
        }),
        None => Ok(()),
    }
}

/// sha256 of `data`, in lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Checks that `data` is a 64-bit eBPF ELF file; the error is why not.
fn check_elf(data: &[u8]) -> std::result::Result<(), String> {
    if !data.starts_with(b"\x7fELF") {
        return Err("no ELF magic".to_string());
    }
    let Some(header) = data.get(..20) else {
        return Err(format!(
            "{} bytes is too short for an ELF header",
            data.len()
        ));
    };
    if header[4] != 2 {
        return Err("not a 64-bit ELF file".to_string());
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        d => return Err(format!("unknown ELF data encoding {d}")),
    };
    if machine != EM_BPF {
        return Err(format!("ELF machine is {machine}, not eBPF ({EM_BPF})"));
    }
    Ok(())
}

/// Reads a file of at most `limit` bytes.
fn read_limited(path: &Path, limit: usize, what: &str) -> Result<Vec<u8>> {
    let file = fs::File::open(path).map_err(|e| BundleError::io(path, e))?;
    read_capped(file, path, limit, what)
}

fn read_object(path: &Path, stage: &str) -> Result<Vec<u8>> {
    let file = fs::File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BundleError::MissingObject {
            stage: stage.to_string(),
            object: path.to_path_buf(),
        },
        _ => BundleError::io(path, e),
    })?;
    read_capped(
        file,
        path,
        MAX_OBJECT_SIZE,
        &format!("object {}", path.display()),
    )
}

fn read_capped(file: fs::File, path: &Path, limit: usize, what: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| BundleError::io(path, e))?;
    if data.len() > limit {
        let size = fs::metadata(path).map_or(data.len() as u64, |m| m.len());
        return Err(BundleError::TooLarge {
            what: what.to_string(),
            size,
            limit: limit as u64,
        });
    }
    Ok(data)
}
