//! Policies: versioned documents of the desired contents of one or more
//! maps of one stage, written in TOML or JSON, encoded canonically,
//! digested and signed with the bundle keys.
//!
//! ```toml
//! stage = "ddos"          # the stage whose maps it sets
//! version = 7             # the author's version number, at least 1
//! description = "…"       # optional
//!
//! [maps.ddos_blocklist]   # a map of the stage, by its name in the object
//! entries = [
//!   { key = "192.0.2.0/24", value = 0 },
//! ]
//! ```
//!
//! A document is the *full* desired contents of every map it names (an
//! empty `entries` empties the map); maps it does not name are not
//! touched. Keys and values stay untyped JSON ([`serde_json::Value`]) here:
//! whoever has the stage's BTF (the agent, or `rootletctl policy build
//! --object`) checks them, and every [`Entry`] keeps where it was written
//! so that such a check can name `file:line:col`.
//!
//! # Layout
//!
//! - [`error`]: [`PolicyError`], the errors.
//! - [`parse`]: [`PolicyDocument::parse`] (TOML or JSON) and its rules.
//! - [`value`]: what an entry's key or value may be (no floats, no nulls,
//!   no repeated members, bounded depth).
//! - [`canonical`]: the canonical bytes and the digest.
//! - [`sign`]: [`SignedPolicy`], [`VerifiedPolicy`] and their encoding.
//! - [`diff`]: what changes from one document to another, per map, by key.
//! - [`inspect`]: human-readable summaries.

pub mod canonical;
pub mod diff;
pub mod error;
pub mod inspect;
pub mod parse;
pub mod sign;
pub mod value;

use std::{collections::BTreeMap, fmt};

pub use diff::{MapDiff, PolicyDiff};
pub use error::PolicyError;
pub use serde_json::Value;
pub use sign::{POLICY_SIGNING_CONTEXT, PolicySignature, SignedPolicy, VerifiedPolicy};

/// `Result` with [`PolicyError`].
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// The limits of a policy document; larger input is refused with its
/// position (or [`PolicyError::TooLarge`]).
pub mod limits {
    /// Largest document, as written (TOML or JSON) and as encoded: 64 MiB.
    pub const MAX_DOCUMENT_SIZE: usize = 64 << 20;
    /// Most maps one document sets.
    pub const MAX_MAPS: usize = 64;
    /// Most entries of one map (the kernel's maps hold far fewer in
    /// practice; the stage's `max_entries` is checked by the agent).
    pub const MAX_ENTRIES_PER_MAP: usize = 1_000_000;
    /// Most entries of all maps together.
    pub const MAX_ENTRIES: usize = 4_000_000;
    /// Longest map name: `[A-Za-z0-9_.]{1,128}` (a C identifier, or the
    /// kernel's 15-character name).
    pub const MAX_MAP_NAME_LEN: usize = 128;
    /// Longest description, in characters.
    pub const MAX_DESCRIPTION_LEN: usize = 1024;
    /// Deepest nesting of arrays and objects inside one key or value.
    pub const MAX_VALUE_DEPTH: usize = 32;
}

/// 1-based line and column (in characters) in the text a document was
/// read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A policy: the desired contents of some maps of one stage.
///
/// Two documents are equal when they mean the same (the same canonical
/// bytes): where they were read from does not count.
#[derive(Debug, Clone)]
pub struct PolicyDocument {
    /// The stage whose maps it sets (`[A-Za-z0-9_.-]{1,64}`, as stage names
    /// in manifests).
    pub stage: String,
    /// The author's version number, at least 1.
    pub version: u64,
    /// Free text, at most 1024 characters, no control characters.
    pub description: Option<String>,
    /// By map name; at least one.
    pub maps: BTreeMap<String, MapContents>,
    /// Where it was read from (a file name), for errors.
    pub source: String,
}

/// The full desired contents of one map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapContents {
    /// In the order written; no two with the same key (as JSON values).
    pub entries: Vec<Entry>,
}

/// One entry of a map: its key and value, as written, and where.
///
/// Equality compares the key and value only.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: Value,
    pub value: Value,
    /// Where the entry starts.
    pub at: Position,
    /// Where its key is.
    pub key_at: Position,
    /// Where its value is.
    pub value_at: Position,
}

impl Entry {
    /// An entry written nowhere in particular (built in code).
    pub fn new(key: Value, value: Value) -> Entry {
        Entry {
            key,
            value,
            at: Position::default(),
            key_at: Position::default(),
            value_at: Position::default(),
        }
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key && self.value == other.value
    }
}

impl Eq for Entry {}

impl PartialEq for PolicyDocument {
    fn eq(&self, other: &Self) -> bool {
        self.stage == other.stage
            && self.version == other.version
            && self.description == other.description
            && self.maps == other.maps
    }
}

impl Eq for PolicyDocument {}

/// Which part of an entry an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPart {
    Entry,
    Key,
    Value,
}

impl PolicyDocument {
    /// The number of entries of all maps.
    pub fn entry_count(&self) -> usize {
        self.maps.values().map(|m| m.entries.len()).sum()
    }

    /// An error about entry `index` of map `map` (its key, value, or the
    /// whole entry), at the position it was written, for checks made
    /// after parsing (the types, against the stage's BTF). `detail` extends
    /// the field path (`.backends[2].ip`, or "").
    ///
    /// An entry that does not exist gives an error at the document's
    /// start.
    pub fn entry_error(
        &self,
        map: &str,
        index: usize,
        part: EntryPart,
        detail: &str,
        msg: impl Into<String>,
    ) -> PolicyError {
        let entry = self.maps.get(map).and_then(|m| m.entries.get(index));
        let (at, suffix) = match (entry, part) {
            (Some(e), EntryPart::Entry) => (e.at, ""),
            (Some(e), EntryPart::Key) => (e.key_at, ".key"),
            (Some(e), EntryPart::Value) => (e.value_at, ".value"),
            (None, EntryPart::Entry) => (Position::default(), ""),
            (None, EntryPart::Key) => (Position::default(), ".key"),
            (None, EntryPart::Value) => (Position::default(), ".value"),
        };
        PolicyError::Document(crate::located::LocatedError::Field {
            file: self.source.clone(),
            line: at.line,
            col: at.col,
            field: format!("{}{suffix}{detail}", entry_path(map, index)),
            msg: msg.into(),
        })
    }
}

/// `maps.<map>.entries[<index>]`, the field path of an entry.
pub fn entry_path(map: &str, index: usize) -> String {
    format!("maps.{map}.entries[{index}]")
}

/// Whether `s` is a valid map name: `[A-Za-z0-9_.]{1,128}`.
pub fn is_valid_map_name(s: &str) -> bool {
    (1..=limits::MAX_MAP_NAME_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}
