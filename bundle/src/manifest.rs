//! The bundle manifest: its types, and [`Manifest::parse`], which reads the
//! TOML a person writes and checks it against the schema and its rules,
//! reporting every error with the field's path and its line and column.
//!
//! The shape is read by serde (derived types with `deny_unknown_fields`,
//! every value a [`toml::Spanned`], `serde_path_to_error` for the field's
//! path), so serde refuses unknown keys, missing keys and wrong types at
//! the positions `toml` reports (the key, the table, the value); the rules
//! that are not about shape (names, limits, keywords, duplicate stages and
//! rootlets, lease bounds, `proceed_on` sets, stage targets) are checked
//! on the result, each at its value's span. Errors are
//! [`crate::located::LocatedError`]s, the shape policy documents share.
//!
//! The same parser reads the manifest embedded in a bundle, where two more
//! rules hold: every stage records its object's `sha256`, and its `object`
//! is the name of an embedded file rather than a path.

use std::{collections::HashMap, fmt, ops::Range, path::Path};

use serde::{
    Deserialize, Deserializer,
    de::{self, Visitor},
};
use toml::Spanned;

use crate::{
    error::{BundleError, Result},
    located::{self, Src, line_col},
};

/// Longest bundle or stage name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Longest owner string.
pub const MAX_OWNER_LEN: usize = 128;
/// Longest program name.
pub const MAX_PROGRAM_LEN: usize = 128;
/// Longest embedded object file name.
pub const MAX_OBJECT_NAME_LEN: usize = 128;
/// Longest object path (in a manifest on disk) or netns path.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest interface name (Linux's IFNAMSIZ less the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most rootlets one bundle targets.
pub const MAX_ROOTLETS: usize = 64;
/// Most stages in one bundle.
pub const MAX_STAGES: usize = 64;
/// Longest lease, in seconds (a day).
pub const MAX_LEASE_SECONDS: u32 = 86_400;
/// Most policies one stage carries.
pub const MAX_STAGE_POLICIES: usize = 16;

pub use rootlet_types::{MapPolicy, XdpAction, XdpMode};

/// How long a stage stays linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lifetime {
    /// Pinned: linked until unlinked, across agent restarts.
    #[default]
    Pin,
    /// Leased: unlinked unless renewed within `seconds` (1..=86400).
    Lease { seconds: u32 },
}

impl Lifetime {
    /// The manifest's spelling of the `lifetime` key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pin => "pin",
            Self::Lease { .. } => "lease",
        }
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pin => f.write_str("pin"),
            Self::Lease { seconds } => write!(f, "lease {seconds}s"),
        }
    }
}

/// A bundle's manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `[A-Za-z0-9_.-]{1,64}`.
    pub name: String,
    /// Free-form, 1..=64 characters; bundles are ordered by when they are
    /// applied, not by version.
    pub version: String,
    /// At least one.
    pub rootlets: Vec<RootletTarget>,
    /// Stage names are unique. May be empty (a bundle that empties its
    /// rootlets' pipelines).
    pub stages: Vec<Stage>,
}

/// A rootlet a bundle targets: an interface, in a network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootletTarget {
    pub interface: String,
    /// An absolute path to a network-namespace file; None for the agent's
    /// own namespace.
    pub netns: Option<String>,
    pub mode: XdpMode,
    /// Returned when every stage proceeds.
    pub final_verdict: XdpAction,
}

/// A stage: which program of which object, where in the pipeline, and on
/// which terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// `[A-Za-z0-9_.-]{1,64}`, unique in the bundle.
    pub name: String,
    /// In a manifest on disk, the object's path relative to the manifest's
    /// directory; in a bundle, the embedded object's file name.
    pub object: String,
    /// The object's sha256 (64 lowercase hex digits). Always present in a
    /// bundle; in a manifest on disk, optional, and checked when given.
    pub sha256: Option<String>,
    /// The `SEC("xdp")` program in the object.
    pub program: String,
    /// Lower runs first; ties run in name order.
    pub priority: i32,
    /// After which verdicts the packet goes on to the next stage.
    pub proceed_on: Vec<XdpAction>,
    pub maps: MapPolicy,
    pub lifetime: Lifetime,
    /// The owning team or identity.
    pub owner: String,
    /// The rootlets (by interface name) that get this stage; None for all.
    pub rootlets: Option<Vec<String>>,
    /// Initial policies for the stage's maps (see [`crate::policy`]): in a
    /// manifest on disk, paths relative to the manifest's directory; in a
    /// bundle, the embedded policies' names (`<file stem>.json`), sorted.
    /// Each policy's `stage` is this stage's name. Empty: none (and the
    /// manifest does not mention the key).
    pub policies: Vec<String>,
}

impl Stage {
    /// Whether this stage goes into `rootlet`.
    pub fn targets(&self, rootlet: &RootletTarget) -> bool {
        self.rootlets
            .as_ref()
            .is_none_or(|r| r.contains(&rootlet.interface))
    }
}

impl Manifest {
    /// Parses and checks a manifest written by a person. `path` names the
    /// file in errors (`path:line:col: field: message`).
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Manifest> {
        parse(text, &path.as_ref().display().to_string(), Mode::Source).map(|(m, _)| m)
    }

    /// Parses and checks the manifest embedded in a bundle: as
    /// [`Manifest::parse`], and every stage must record its `sha256` and
    /// name its object by an embedded file name.
    pub fn parse_embedded(text: &str, path: impl AsRef<Path>) -> Result<Manifest> {
        parse(text, &path.as_ref().display().to_string(), Mode::Embedded).map(|(m, _)| m)
    }

    /// The stages that go into `rootlet`, in manifest order.
    pub fn stages_for<'a>(&'a self, rootlet: &'a RootletTarget) -> impl Iterator<Item = &'a Stage> {
        self.stages.iter().filter(move |s| s.targets(rootlet))
    }

    /// The stages in execution order: by priority, then by name.
    pub fn stages_in_order(&self) -> Vec<&Stage> {
        let mut stages: Vec<&Stage> = self.stages.iter().collect();
        stages.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        stages
    }
}

/// Whether `s` is a valid bundle or stage name: `[A-Za-z0-9_.-]{1,64}`.
pub fn is_valid_name(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.len()) && s.bytes().all(is_name_byte)
}

/// Whether `s` is a valid embedded object name: `[A-Za-z0-9_.-]{1,128}`,
/// not starting with a dot.
pub fn is_valid_object_name(s: &str) -> bool {
    (1..=MAX_OBJECT_NAME_LEN).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes().all(is_name_byte)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// The name a policy file at `path` is embedded under: its file stem and
/// `.json` (the bundle carries the policy's canonical JSON), if that is a
/// valid embedded name.
pub fn policy_embedded_name(path: &str) -> Option<String> {
    if path.ends_with('/') {
        return None;
    }
    let stem = Path::new(path).file_stem()?.to_str()?;
    let name = format!("{stem}.json");
    is_valid_object_name(&name).then_some(name)
}

/// Whether `s` is 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------
// The parser: serde reads the shape, the rules are checked on its result.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A manifest on disk: objects are paths, sha256 is optional.
    Source,
    /// A bundle's manifest: objects are embedded names, sha256 is required.
    Embedded,
}

/// A value and where it is in the text.
type S<T> = Spanned<T>;

/// The manifest's shape. Every value is [`Spanned`] so that the rules
/// checked after serde (names, limits, cross-field rules) report it where
/// it is; unknown keys are refused by serde, at the key, in file order
/// (toml's `preserve_order`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawManifest {
    name: S<String>,
    version: S<String>,
    rootlets: S<Vec<S<RawRootlet>>>,
    #[serde(default)]
    stages: Option<S<Vec<S<RawStage>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawRootlet {
    interface: S<String>,
    #[serde(default)]
    netns: Option<S<String>>,
    #[serde(default)]
    mode: Option<S<String>>,
    #[serde(default)]
    final_verdict: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawStage {
    name: S<String>,
    object: S<String>,
    #[serde(default)]
    sha256: Option<S<String>>,
    program: S<String>,
    priority: S<Integer>,
    #[serde(default)]
    proceed_on: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    maps: Option<S<String>>,
    #[serde(default)]
    lifetime: Option<S<String>>,
    #[serde(default)]
    lease_seconds: Option<S<Integer>>,
    owner: S<String>,
    #[serde(default)]
    rootlets: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    policies: Option<S<Vec<S<String>>>>,
}

/// A TOML integer (any 64-bit value; the rules check the range), so that
/// a wrong type reads "expected an integer" rather than "expected i64".
struct Integer(i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Integer;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> std::result::Result<Integer, E> {
                Ok(Integer(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> std::result::Result<Integer, E> {
                i64::try_from(n)
                    .map(Integer)
                    .map_err(|_| E::custom("integer out of range"))
            }
        }
        d.deserialize_i64(V)
    }
}

/// A rule broken at `span`, as a bundle error.
fn ferr(src: &Src<'_>, span: &Range<usize>, field: &str, msg: impl Into<String>) -> BundleError {
    src.err(span, field, msg).into()
}

/// Where some values of a manifest are, for errors found later, reading
/// the files they name: per stage (in manifest order), the line and column
/// of its `object`, and of each of its `policies`.
#[derive(Debug, Default)]
pub(crate) struct Positions {
    pub objects: Vec<(usize, usize)>,
    pub policies: Vec<Vec<(usize, usize)>>,
}

/// [`Manifest::parse`], with the [`Positions`] of the files it names.
pub(crate) fn parse_source_with_positions(text: &str, file: &str) -> Result<(Manifest, Positions)> {
    parse(text, file, Mode::Source)
}

fn parse(text: &str, file: &str, mode: Mode) -> Result<(Manifest, Positions)> {
    let src = &Src { file, text };
    let de = toml::de::Deserializer::parse(text).map_err(|e| src.toml_syntax(&e))?;
    let mut track = serde_path_to_error::Track::new();
    let raw = RawManifest::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
        .map_err(|e| located::toml_error(src, &track.path(), &e))?;

    let name = checked_name(src, &raw.name, "name")?;
    let version = check_text(src, &raw.version, "version", MAX_VERSION_LEN)?;

    let rootlet_items = raw.rootlets.get_ref();
    if rootlet_items.is_empty() {
        return Err(ferr(
            src,
            &raw.rootlets.span(),
            "rootlets",
            "a bundle must target at least one rootlet",
        ));
    }
    if rootlet_items.len() > MAX_ROOTLETS {
        return Err(ferr(
            src,
            &raw.rootlets.span(),
            "rootlets",
            format!("at most {MAX_ROOTLETS} rootlets"),
        ));
    }
    let mut rootlets: Vec<RootletTarget> = Vec::with_capacity(rootlet_items.len());
    let mut seen_rootlets: HashMap<(String, Option<String>), usize> = HashMap::new();
    for (i, item) in rootlet_items.iter().enumerate() {
        let path = format!("rootlets[{i}]");
        let raw_rootlet = item.get_ref();
        let rootlet = parse_rootlet(src, raw_rootlet, &path)?;
        let if_span = raw_rootlet.interface.span();
        let key = (rootlet.interface.clone(), rootlet.netns.clone());
        if let Some(line) = seen_rootlets.insert(key, src.line(&if_span)) {
            return Err(ferr(
                src,
                &if_span,
                &format!("{path}.interface"),
                format!(
                    "rootlet {:?} is already targeted on line {line}",
                    rootlet.interface
                ),
            ));
        }
        rootlets.push(rootlet);
    }

    let mut stages = Vec::new();
    let mut positions = Positions::default();
    if let Some(stages_v) = &raw.stages {
        let stage_items = stages_v.get_ref();
        if stage_items.len() > MAX_STAGES {
            return Err(ferr(
                src,
                &stages_v.span(),
                "stages",
                format!("at most {MAX_STAGES} stages"),
            ));
        }
        let mut seen_stages: HashMap<String, usize> = HashMap::new();
        for (i, item) in stage_items.iter().enumerate() {
            let path = format!("stages[{i}]");
            let raw_stage = item.get_ref();
            let stage = parse_stage(src, raw_stage, &item.span(), &path, mode, &rootlets)?;
            positions
                .objects
                .push(line_col(text, raw_stage.object.span().start));
            positions.policies.push(
                raw_stage
                    .policies
                    .iter()
                    .flat_map(|p| p.get_ref())
                    .map(|p| line_col(text, p.span().start))
                    .collect(),
            );
            let name_span = raw_stage.name.span();
            if let Some(line) = seen_stages.insert(stage.name.clone(), src.line(&name_span)) {
                return Err(ferr(
                    src,
                    &name_span,
                    &format!("{path}.name"),
                    format!("stage {:?} is already defined on line {line}", stage.name),
                ));
            }
            stages.push(stage);
        }
    }

    let manifest = Manifest {
        name,
        version,
        rootlets,
        stages,
    };
    Ok((manifest, positions))
}

fn parse_rootlet(src: &Src<'_>, raw: &RawRootlet, path: &str) -> Result<RootletTarget> {
    let if_field = format!("{path}.interface");
    let interface = raw.interface.get_ref();
    if !is_valid_ifname(interface) {
        return Err(ferr(
            src,
            &raw.interface.span(),
            &if_field,
            "not a valid interface name (1 to 15 bytes, no '/', ':', whitespace or control characters)",
        ));
    }

    let netns = match &raw.netns {
        None => None,
        Some(v) => {
            let field = format!("{path}.netns");
            let s = check_text(src, v, &field, MAX_PATH_LEN)?;
            if !s.starts_with('/') {
                return Err(ferr(
                    src,
                    &v.span(),
                    &field,
                    "must be an absolute path to a network-namespace file",
                ));
            }
            Some(s)
        }
    };

    let mode = match &raw.mode {
        None => XdpMode::default(),
        Some(v) => keyword(src, v, &format!("{path}.mode"), &XdpMode::ALL, |m| m.name())?,
    };

    let final_verdict = match &raw.final_verdict {
        None => XdpAction::Pass,
        Some(v) => action(src, v, &format!("{path}.final_verdict"))?,
    };

    Ok(RootletTarget {
        interface: interface.clone(),
        netns,
        mode,
        final_verdict,
    })
}

/// The stage at `span` (its table), checked against the rules.
fn parse_stage(
    src: &Src<'_>,
    raw: &RawStage,
    span: &Range<usize>,
    path: &str,
    mode: Mode,
    rootlets: &[RootletTarget],
) -> Result<Stage> {
    let name = checked_name(src, &raw.name, &format!("{path}.name"))?;

    let object_field = format!("{path}.object");
    let object_v = &raw.object;
    let object = object_v.get_ref();
    match mode {
        Mode::Source => {
            check_text(src, object_v, &object_field, MAX_PATH_LEN)?;
            let file_name = Path::new(object).file_name().and_then(|n| n.to_str());
            if object.ends_with('/') || !file_name.is_some_and(is_valid_object_name) {
                return Err(ferr(
                    src,
                    &object_v.span(),
                    &object_field,
                    "the file name must be 1 to 128 characters from A-Z a-z 0-9 _ . -, not \
                     starting with '.' (it names the object in the bundle)",
                ));
            }
        }
        Mode::Embedded => {
            if !is_valid_object_name(object) {
                return Err(ferr(
                    src,
                    &object_v.span(),
                    &object_field,
                    "not a valid embedded object name (1 to 128 characters from A-Z a-z 0-9 _ . -, not starting with '.')",
                ));
            }
        }
    }

    let sha256 = match (&raw.sha256, mode) {
        (Some(v), _) => {
            if !is_sha256_hex(v.get_ref()) {
                return Err(ferr(
                    src,
                    &v.span(),
                    &format!("{path}.sha256"),
                    "must be 64 lowercase hex digits",
                ));
            }
            Some(v.get_ref().clone())
        }
        (None, Mode::Source) => None,
        (None, Mode::Embedded) => {
            return Err(ferr(
                src,
                span,
                &format!("{path}.sha256"),
                "missing: a bundle's manifest records every object's sha256",
            ));
        }
    };

    let program = raw.program.get_ref();
    if program.is_empty() || program.len() > MAX_PROGRAM_LEN || !program.bytes().all(is_name_byte) {
        return Err(ferr(
            src,
            &raw.program.span(),
            &format!("{path}.program"),
            "must be 1 to 128 characters from A-Z a-z 0-9 _ . -",
        ));
    }

    let priority = raw.priority.get_ref().0;
    let priority = i32::try_from(priority).map_err(|_| {
        ferr(
            src,
            &raw.priority.span(),
            &format!("{path}.priority"),
            format!("{priority} is out of range for a 32-bit integer"),
        )
    })?;

    let proceed_on = match &raw.proceed_on {
        None => vec![XdpAction::Pass],
        Some(v) => {
            let field = format!("{path}.proceed_on");
            let mut actions = Vec::with_capacity(v.get_ref().len());
            for (i, item) in v.get_ref().iter().enumerate() {
                let item_field = format!("{field}[{i}]");
                let a = action(src, item, &item_field)?;
                if actions.contains(&a) {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        format!("{:?} is listed twice", a.name()),
                    ));
                }
                actions.push(a);
            }
            actions
        }
    };

    let maps = match &raw.maps {
        None => MapPolicy::default(),
        Some(v) => keyword(src, v, &format!("{path}.maps"), &MapPolicy::ALL, |m| {
            m.name()
        })?,
    };

    let lifetime = lifetime(src, raw, span, path)?;

    let owner = check_text(src, &raw.owner, &format!("{path}.owner"), MAX_OWNER_LEN)?;

    let targets = match &raw.rootlets {
        None => None,
        Some(v) => {
            let field = format!("{path}.rootlets");
            let items = v.get_ref();
            if items.is_empty() {
                return Err(ferr(
                    src,
                    &v.span(),
                    &field,
                    "must name at least one rootlet; leave it out to target every rootlet",
                ));
            }
            let mut names: Vec<String> = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let item_field = format!("{field}[{i}]");
                let s = item.get_ref();
                if !rootlets.iter().any(|r| r.interface == *s) {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        format!("no rootlet of this bundle is on interface {s:?}"),
                    ));
                }
                if names.contains(s) {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        format!("{s:?} is listed twice"),
                    ));
                }
                names.push(s.clone());
            }
            Some(names)
        }
    };

    let policies = match &raw.policies {
        None => Vec::new(),
        Some(v) => stage_policies(src, v, &format!("{path}.policies"), mode)?,
    };

    Ok(Stage {
        name,
        object: object.clone(),
        sha256,
        program: program.clone(),
        priority,
        proceed_on,
        maps,
        lifetime,
        owner,
        rootlets: targets,
        policies,
    })
}

/// A stage's `lifetime` and `lease_seconds`, which go together.
fn lifetime(src: &Src<'_>, raw: &RawStage, span: &Range<usize>, path: &str) -> Result<Lifetime> {
    let lease_field = format!("{path}.lease_seconds");
    let lease_seconds = match &raw.lease_seconds {
        None => None,
        Some(v) => {
            let n = u32::try_from(v.get_ref().0)
                .ok()
                .filter(|n| (1..=MAX_LEASE_SECONDS).contains(n))
                .ok_or_else(|| {
                    ferr(
                        src,
                        &v.span(),
                        &lease_field,
                        format!("must be between 1 and {MAX_LEASE_SECONDS}"),
                    )
                })?;
            Some((n, v.span()))
        }
    };
    let lease = match &raw.lifetime {
        None => false,
        Some(v) => match v.get_ref().as_str() {
            "pin" => false,
            "lease" => true,
            other => {
                return Err(ferr(
                    src,
                    &v.span(),
                    &format!("{path}.lifetime"),
                    format!("unknown lifetime {other:?}; expected one of \"pin\", \"lease\""),
                ));
            }
        },
    };
    match (lease, lease_seconds) {
        (true, Some((seconds, _))) => Ok(Lifetime::Lease { seconds }),
        (true, None) => {
            let at = raw
                .lifetime
                .as_ref()
                .map_or_else(|| span.clone(), |v| v.span());
            Err(ferr(
                src,
                &at,
                &lease_field,
                "required when lifetime = \"lease\"",
            ))
        }
        (false, Some((_, at))) => Err(ferr(
            src,
            &at,
            &lease_field,
            "only allowed when lifetime = \"lease\"",
        )),
        (false, None) => Ok(Lifetime::Pin),
    }
}

/// A stage's `policies`: paths (on disk) or embedded names (in a bundle),
/// at most [`MAX_STAGE_POLICIES`], none twice (nor two that would be
/// embedded under the same name).
fn stage_policies(
    src: &Src<'_>,
    v: &S<Vec<S<String>>>,
    field: &str,
    mode: Mode,
) -> Result<Vec<String>> {
    let items = v.get_ref();
    if items.len() > MAX_STAGE_POLICIES {
        return Err(ferr(
            src,
            &v.span(),
            field,
            format!("at most {MAX_STAGE_POLICIES} policies per stage"),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    let mut embedded: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_field = format!("{field}[{i}]");
        let s = item.get_ref();
        let name = match mode {
            Mode::Source => {
                check_text(src, item, &item_field, MAX_PATH_LEN)?;
                policy_embedded_name(s).ok_or_else(|| {
                    ferr(
                        src,
                        &item.span(),
                        &item_field,
                        "the file name's stem must be 1 to 123 characters from A-Z a-z 0-9 _ . -, \
                         not starting with '.' (the policy is embedded as <stem>.json)",
                    )
                })?
            }
            Mode::Embedded => {
                if !is_valid_object_name(s) || !s.ends_with(".json") {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        "not a valid embedded policy name (1 to 128 characters from A-Z a-z 0-9 _ . -, \
                         not starting with '.', ending in \".json\")",
                    ));
                }
                s.clone()
            }
        };
        if embedded.contains(&name) {
            return Err(ferr(
                src,
                &item.span(),
                &item_field,
                format!("{s:?} is listed twice (or embeds as {name}, as another one does)"),
            ));
        }
        embedded.push(name);
        names.push(s.clone());
    }
    Ok(names)
}

/// Linux's rule for interface names (`dev_valid_name`).
fn is_valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IFNAME_LEN
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// A bundle or stage name ([`is_valid_name`]).
fn checked_name(src: &Src<'_>, v: &S<String>, field: &str) -> Result<String> {
    if !is_valid_name(v.get_ref()) {
        return Err(ferr(
            src,
            &v.span(),
            field,
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . -",
        ));
    }
    Ok(v.get_ref().clone())
}

/// A string of 1..=`max` characters without control characters.
fn check_text(src: &Src<'_>, v: &S<String>, field: &str, max: usize) -> Result<String> {
    let s = v.get_ref();
    if s.is_empty() {
        return Err(ferr(src, &v.span(), field, "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(ferr(
            src,
            &v.span(),
            field,
            format!("longer than {max} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ferr(
            src,
            &v.span(),
            field,
            "must not contain control characters",
        ));
    }
    Ok(s.clone())
}

fn action(src: &Src<'_>, v: &S<String>, field: &str) -> Result<XdpAction> {
    keyword(src, v, field, &XdpAction::ALL, |a| a.name())
}

/// One of a fixed set of lowercase words.
fn keyword<T: Copy>(
    src: &Src<'_>,
    v: &S<String>,
    field: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T> {
    let s = v.get_ref();
    all.iter().copied().find(|&t| name(t) == s).ok_or_else(|| {
        let expected: Vec<String> = all.iter().map(|&t| format!("{:?}", name(t))).collect();
        ferr(
            src,
            &v.span(),
            field,
            format!(
                "unknown value {s:?}; expected one of {}",
                expected.join(", ")
            ),
        )
    })
}
