//! The bundle manifest: its types, and [`Manifest::parse`], which reads the
//! TOML a person writes and checks it against the schema and its rules,
//! reporting every error with the field's path and its line and column.
//!
//! The TOML is read into `toml`'s spanned document tree
//! ([`toml::de::DeTable`]) and walked by hand rather than through serde, so
//! that every error (unknown key, wrong type, bad value, broken rule) can
//! name both the field (`stages[1].priority`, indices from 0) and where it
//! is in the file ([`crate::located`] says why serde's derive does not
//! serve here).
//!
//! The same parser reads the manifest embedded in a bundle, where two more
//! rules hold: every stage records its object's `sha256`, and its `object`
//! is the name of an embedded file rather than a path.

use std::{collections::HashMap, fmt, ops::Range, path::Path};

use toml::de::{DeTable, DeValue};

use crate::{
    error::{BundleError, Result},
    located::{self, Fields, Src, Value, integer, string, tables},
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
// The parser.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A manifest on disk: objects are paths, sha256 is optional.
    Source,
    /// A bundle's manifest: objects are embedded names, sha256 is required.
    Embedded,
}

/// A located-TOML error about `field` at `span`, as a bundle error.
fn ferr(src: &Src<'_>, span: &Range<usize>, field: &str, msg: impl Into<String>) -> BundleError {
    src.err(span, field, msg).into()
}

fn wrong_type(src: &Src<'_>, v: &Value<'_>, field: &str, expected: &str) -> BundleError {
    located::wrong_type(src, v, field, expected).into()
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
    let doc = DeTable::parse(text).map_err(|e| {
        let src = &Src { file, text };
        let (line, col) = located::line_col(src.text, e.span().map_or(0, |s| s.start));
        BundleError::ManifestSyntax {
            file: file.to_string(),
            line,
            col,
            msg: e.message().to_string(),
        }
    })?;
    let src = &Src { file, text };
    let root = doc.get_ref();
    let fields = Fields::of(
        src,
        root,
        &doc.span(),
        "",
        &["name", "version", "rootlets", "stages"],
    )?;

    let name_v = fields.required("name")?;
    let name = string(src, name_v, "name")?;
    if !is_valid_name(name) {
        return Err(ferr(
            src,
            &name_v.span(),
            "name",
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . -",
        ));
    }

    let version_v = fields.required("version")?;
    let version = string(src, version_v, "version")?;
    check_text(src, version_v, "version", version, MAX_VERSION_LEN)?;

    let rootlets_v = fields.required("rootlets")?;
    let rootlet_items = tables(src, rootlets_v, "rootlets")?;
    if rootlet_items.is_empty() {
        return Err(ferr(
            src,
            &rootlets_v.span(),
            "rootlets",
            "a bundle must target at least one rootlet",
        ));
    }
    if rootlet_items.len() > MAX_ROOTLETS {
        return Err(ferr(
            src,
            &rootlets_v.span(),
            "rootlets",
            format!("at most {MAX_ROOTLETS} rootlets"),
        ));
    }
    let mut rootlets: Vec<RootletTarget> = Vec::with_capacity(rootlet_items.len());
    let mut seen_rootlets: HashMap<(String, Option<String>), usize> = HashMap::new();
    for (i, (table, span)) in rootlet_items.iter().enumerate() {
        let path = format!("rootlets[{i}]");
        let (rootlet, if_span) = parse_rootlet(src, table, span, &path)?;
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
    if let Some(stages_v) = fields.optional("stages") {
        let stage_items = tables(src, stages_v, "stages")?;
        if stage_items.len() > MAX_STAGES {
            return Err(ferr(
                src,
                &stages_v.span(),
                "stages",
                format!("at most {MAX_STAGES} stages"),
            ));
        }
        let mut seen_stages: HashMap<String, usize> = HashMap::new();
        for (i, (table, span)) in stage_items.iter().enumerate() {
            let path = format!("stages[{i}]");
            let (stage, name_span, object_span, policy_spans) =
                parse_stage(src, table, span, &path, mode, &rootlets)?;
            positions
                .objects
                .push(located::line_col(src.text, object_span.start));
            positions.policies.push(
                policy_spans
                    .iter()
                    .map(|s| located::line_col(src.text, s.start))
                    .collect(),
            );
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
        name: name.to_string(),
        version: version.to_string(),
        rootlets,
        stages,
    };
    Ok((manifest, positions))
}

/// Returns the rootlet and the span of its interface value.
fn parse_rootlet(
    src: &Src<'_>,
    table: &DeTable<'_>,
    span: &Range<usize>,
    path: &str,
) -> Result<(RootletTarget, Range<usize>)> {
    let fields = Fields::of(
        src,
        table,
        span,
        path,
        &["interface", "netns", "mode", "final_verdict"],
    )?;

    let if_v = fields.required("interface")?;
    let if_field = format!("{path}.interface");
    let interface = string(src, if_v, &if_field)?;
    if !is_valid_ifname(interface) {
        return Err(ferr(
            src,
            &if_v.span(),
            &if_field,
            "not a valid interface name (1 to 15 bytes, no '/', ':', whitespace or control characters)",
        ));
    }

    let netns = match fields.optional("netns") {
        None => None,
        Some(v) => {
            let field = format!("{path}.netns");
            let s = string(src, v, &field)?;
            check_text(src, v, &field, s, MAX_PATH_LEN)?;
            if !s.starts_with('/') {
                return Err(ferr(
                    src,
                    &v.span(),
                    &field,
                    "must be an absolute path to a network-namespace file",
                ));
            }
            Some(s.to_string())
        }
    };

    let mode = match fields.optional("mode") {
        None => XdpMode::default(),
        Some(v) => keyword(src, v, &format!("{path}.mode"), &XdpMode::ALL, |m| m.name())?,
    };

    let final_verdict = match fields.optional("final_verdict") {
        None => XdpAction::Pass,
        Some(v) => action(src, v, &format!("{path}.final_verdict"))?,
    };

    Ok((
        RootletTarget {
            interface: interface.to_string(),
            netns,
            mode,
            final_verdict,
        },
        if_v.span(),
    ))
}

/// Returns the stage and the spans of its name, object and policies
/// values.
#[allow(clippy::type_complexity)]
fn parse_stage(
    src: &Src<'_>,
    table: &DeTable<'_>,
    span: &Range<usize>,
    path: &str,
    mode: Mode,
    rootlets: &[RootletTarget],
) -> Result<(Stage, Range<usize>, Range<usize>, Vec<Range<usize>>)> {
    let fields = Fields::of(
        src,
        table,
        span,
        path,
        &[
            "name",
            "object",
            "sha256",
            "program",
            "priority",
            "proceed_on",
            "maps",
            "lifetime",
            "lease_seconds",
            "owner",
            "rootlets",
            "policies",
        ],
    )?;

    let name_v = fields.required("name")?;
    let name_field = format!("{path}.name");
    let name = string(src, name_v, &name_field)?;
    if !is_valid_name(name) {
        return Err(ferr(
            src,
            &name_v.span(),
            &name_field,
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . -",
        ));
    }

    let object_v = fields.required("object")?;
    let object_field = format!("{path}.object");
    let object = string(src, object_v, &object_field)?;
    match mode {
        Mode::Source => {
            check_text(src, object_v, &object_field, object, MAX_PATH_LEN)?;
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

    let sha256 = match (fields.optional("sha256"), mode) {
        (Some(v), _) => {
            let field = format!("{path}.sha256");
            let s = string(src, v, &field)?;
            if !is_sha256_hex(s) {
                return Err(ferr(
                    src,
                    &v.span(),
                    &field,
                    "must be 64 lowercase hex digits",
                ));
            }
            Some(s.to_string())
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

    let program_v = fields.required("program")?;
    let program_field = format!("{path}.program");
    let program = string(src, program_v, &program_field)?;
    if program.is_empty() || program.len() > MAX_PROGRAM_LEN || !program.bytes().all(is_name_byte) {
        return Err(ferr(
            src,
            &program_v.span(),
            &program_field,
            "must be 1 to 128 characters from A-Z a-z 0-9 _ . -",
        ));
    }

    let priority_v = fields.required("priority")?;
    let priority_field = format!("{path}.priority");
    let priority = integer(src, priority_v, &priority_field)?;
    let priority = i32::try_from(priority).map_err(|_| {
        ferr(
            src,
            &priority_v.span(),
            &priority_field,
            format!("{priority} is out of range for a 32-bit integer"),
        )
    })?;

    let proceed_on = match fields.optional("proceed_on") {
        None => vec![XdpAction::Pass],
        Some(v) => {
            let field = format!("{path}.proceed_on");
            let items = array(src, v, &field)?;
            let mut actions = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
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

    let maps = match fields.optional("maps") {
        None => MapPolicy::default(),
        Some(v) => keyword(src, v, &format!("{path}.maps"), &MapPolicy::ALL, |m| {
            m.name()
        })?,
    };

    let lease_seconds = match fields.optional("lease_seconds") {
        None => None,
        Some(v) => {
            let field = format!("{path}.lease_seconds");
            let n = integer(src, v, &field)?;
            let n = u32::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_LEASE_SECONDS).contains(n))
                .ok_or_else(|| {
                    ferr(
                        src,
                        &v.span(),
                        &field,
                        format!("must be between 1 and {MAX_LEASE_SECONDS}"),
                    )
                })?;
            Some((n, v))
        }
    };
    let lifetime_v = fields.optional("lifetime");
    let lifetime_field = format!("{path}.lifetime");
    let lease = match lifetime_v {
        None => false,
        Some(v) => match string(src, v, &lifetime_field)? {
            "pin" => false,
            "lease" => true,
            other => {
                return Err(ferr(
                    src,
                    &v.span(),
                    &lifetime_field,
                    format!("unknown lifetime {other:?}; expected one of \"pin\", \"lease\""),
                ));
            }
        },
    };
    let lifetime = match (lease, lease_seconds, lifetime_v) {
        (true, Some((seconds, _)), _) => Lifetime::Lease { seconds },
        (true, None, lifetime_v) => {
            let at = lifetime_v.map_or_else(|| span.clone(), |v| v.span());
            return Err(ferr(
                src,
                &at,
                &format!("{path}.lease_seconds"),
                "required when lifetime = \"lease\"",
            ));
        }
        (false, Some((_, v)), _) => {
            return Err(ferr(
                src,
                &v.span(),
                &format!("{path}.lease_seconds"),
                "only allowed when lifetime = \"lease\"",
            ));
        }
        (false, None, _) => Lifetime::Pin,
    };

    let owner_v = fields.required("owner")?;
    let owner_field = format!("{path}.owner");
    let owner = string(src, owner_v, &owner_field)?;
    check_text(src, owner_v, &owner_field, owner, MAX_OWNER_LEN)?;

    let targets = match fields.optional("rootlets") {
        None => None,
        Some(v) => {
            let field = format!("{path}.rootlets");
            let items = array(src, v, &field)?;
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
                let s = string(src, item, &item_field)?;
                if !rootlets.iter().any(|r| r.interface == s) {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        format!("no rootlet of this bundle is on interface {s:?}"),
                    ));
                }
                if names.iter().any(|n| n == s) {
                    return Err(ferr(
                        src,
                        &item.span(),
                        &item_field,
                        format!("{s:?} is listed twice"),
                    ));
                }
                names.push(s.to_string());
            }
            Some(names)
        }
    };

    let (policies, policy_spans) = match fields.optional("policies") {
        None => (Vec::new(), Vec::new()),
        Some(v) => stage_policies(src, v, &format!("{path}.policies"), mode)?,
    };

    Ok((
        Stage {
            name: name.to_string(),
            object: object.to_string(),
            sha256,
            program: program.to_string(),
            priority,
            proceed_on,
            maps,
            lifetime,
            owner: owner.to_string(),
            rootlets: targets,
            policies,
        },
        name_v.span(),
        object_v.span(),
        policy_spans,
    ))
}

/// A stage's `policies`: paths (on disk) or embedded names (in a bundle),
/// at most [`MAX_STAGE_POLICIES`], none twice (nor two that would be
/// embedded under the same name); each with its span.
fn stage_policies(
    src: &Src<'_>,
    v: &Value<'_>,
    field: &str,
    mode: Mode,
) -> Result<(Vec<String>, Vec<Range<usize>>)> {
    let items = array(src, v, field)?;
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
    let mut spans = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_field = format!("{field}[{i}]");
        let s = string(src, item, &item_field)?;
        let name = match mode {
            Mode::Source => {
                check_text(src, item, &item_field, s, MAX_PATH_LEN)?;
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
                s.to_string()
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
        names.push(s.to_string());
        spans.push(item.span());
    }
    Ok((names, spans))
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

fn array<'t, 'i>(src: &Src<'_>, v: &'t Value<'i>, field: &str) -> Result<&'t [Value<'i>]> {
    match v.get_ref() {
        DeValue::Array(a) => Ok(a),
        _ => Err(wrong_type(src, v, field, "an array")),
    }
}

/// A string of 1..=`max` characters without control characters.
fn check_text(src: &Src<'_>, v: &Value<'_>, field: &str, s: &str, max: usize) -> Result<()> {
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
    Ok(())
}

fn action(src: &Src<'_>, v: &Value<'_>, field: &str) -> Result<XdpAction> {
    keyword(src, v, field, &XdpAction::ALL, |a| a.name())
}

/// One of a fixed set of lowercase words.
fn keyword<T: Copy>(
    src: &Src<'_>,
    v: &Value<'_>,
    field: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T> {
    let s = string(src, v, field)?;
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
