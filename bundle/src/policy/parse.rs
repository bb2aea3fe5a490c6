//! [`PolicyDocument::parse`]: a policy written in TOML or JSON, read through
//! serde (derive with `deny_unknown_fields`, newtypes that check the rules
//! where they are read, and `serde_path_to_error` for the field's path), so
//! that every error names `file:line:col` and the field: the position is
//! the one the format's own deserializer reports (toml's spans, serde_json's
//! line and column).
//!
//! Entries keep their positions: in TOML through `toml::Spanned`; in JSON,
//! which has no spans, each entry, key and value is first read as a
//! borrowed `serde_json::value::RawValue`, whose place in the text is its
//! position, and then parsed on its own.
//!
//! The format is chosen by the file's extension (`.toml`, `.json`), and
//! otherwise by the content (JSON starts with `{`, which TOML cannot).

use std::{collections::HashMap, fmt, io::Read, marker::PhantomData, ops::Range, path::Path};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_path_to_error::Track;
use toml::Spanned;

use super::{
    Entry, MapContents, PolicyDocument, PolicyError, Position, Result, is_valid_map_name,
    limits::{MAX_DESCRIPTION_LEN, MAX_DOCUMENT_SIZE, MAX_ENTRIES, MAX_ENTRIES_PER_MAP, MAX_MAPS},
    value::EntryValue,
};
use crate::{
    located::{LocatedError, field_path as path_string, line_col},
    manifest::is_valid_name,
};

/// The two ways to write a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// By `path`'s extension (`.toml`, `.json`, in any case); otherwise
    /// JSON if the text starts with `{` (after white space), else TOML.
    pub fn of(path: &Path, text: &str) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("toml") => Format::Toml,
            Some("json") => Format::Json,
            _ if text.trim_start().starts_with('{') => Format::Json,
            _ => Format::Toml,
        }
    }
}

impl PolicyDocument {
    /// Reads and parses the policy file at `path` (at most
    /// [`MAX_DOCUMENT_SIZE`] bytes of UTF-8).
    pub fn read(path: impl AsRef<Path>) -> Result<PolicyDocument> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| PolicyError::io(path, e))?;
        let mut raw = Vec::new();
        file.take(MAX_DOCUMENT_SIZE as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| PolicyError::io(path, e))?;
        if raw.len() > MAX_DOCUMENT_SIZE {
            let size = std::fs::metadata(path).map_or(raw.len() as u64, |m| m.len());
            return Err(PolicyError::TooLarge {
                what: format!("policy {}", path.display()),
                size,
                limit: MAX_DOCUMENT_SIZE as u64,
                unit: "bytes",
            });
        }
        let name = path.display().to_string();
        let text = String::from_utf8(raw).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let before = String::from_utf8_lossy(e.as_bytes().get(..valid).unwrap_or_default());
            let (line, col) = line_col(&before, before.len());
            PolicyError::Document(LocatedError::Syntax {
                file: name.clone(),
                line,
                col,
                msg: "not valid UTF-8".to_string(),
            })
        })?;
        PolicyDocument::parse(&text, path)
    }

    /// Parses a policy written in TOML or JSON ([`Format::of`] `path`);
    /// `path` names the file in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<PolicyDocument> {
        let path = path.as_ref();
        let file = path.display().to_string();
        match Format::of(path, text) {
            Format::Toml => parse_toml(text, &file),
            Format::Json => parse_json(text, &file),
        }
    }

    /// Parses a policy written in `format`; `file` names it in errors.
    pub fn parse_as(text: &str, format: Format, file: &str) -> Result<PolicyDocument> {
        match format {
            Format::Toml => parse_toml(text, file),
            Format::Json => parse_json(text, file),
        }
    }
}

// ---------------------------------------------------------------------------
// The document's shape, generic over how an entry is read (`E`).

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "E: Deserialize<'de>"))]
struct RawDoc<E> {
    stage: StageName,
    version: Version,
    #[serde(default)]
    description: Option<Description>,
    maps: Maps<E>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "E: Deserialize<'de>"))]
struct RawMap<E> {
    entries: Entries<E>,
}

/// A stage name, checked as in manifests.
struct StageName(String);

impl<'de> Deserialize<'de> for StageName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !is_valid_name(&s) {
            return Err(de::Error::custom(format!(
                "{s:?} is not a stage name: 1 to 64 characters from A-Z a-z 0-9 _ . -"
            )));
        }
        Ok(StageName(s))
    }
}

/// A version number, at least 1.
struct Version(u64);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match u64::deserialize(d)? {
            0 => Err(de::Error::custom(
                "must be at least 1 (0 stands for \"no policy applied\")",
            )),
            n => Ok(Version(n)),
        }
    }
}

/// Free text, bounded, without control characters.
struct Description(String);

impl<'de> Deserialize<'de> for Description {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.chars().count() > MAX_DESCRIPTION_LEN {
            return Err(de::Error::custom(format!(
                "longer than {MAX_DESCRIPTION_LEN} characters"
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(de::Error::custom("must not contain control characters"));
        }
        Ok(Description(s))
    }
}

/// The maps, in the order written: at least one, at most [`MAX_MAPS`],
/// no name twice (serde's own maps keep the last of two).
struct Maps<E>(Vec<(String, RawMap<E>)>);

impl<'de, E: Deserialize<'de>> Deserialize<'de> for Maps<E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<E>(PhantomData<E>);
        impl<'de, E: Deserialize<'de>> Visitor<'de> for V<E> {
            type Value = Maps<E>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of maps, by name")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Maps<E>, A::Error> {
                let mut maps: Vec<(String, RawMap<E>)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if !is_valid_map_name(&name) {
                        return Err(de::Error::custom(format!(
                            "{name:?} is not a map name: 1 to 128 characters from A-Z a-z 0-9 _ ."
                        )));
                    }
                    if maps.iter().any(|(n, _)| *n == name) {
                        return Err(de::Error::custom(format!("map {name:?} is named twice")));
                    }
                    if maps.len() == MAX_MAPS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_MAPS} maps in one policy"
                        )));
                    }
                    let contents = map.next_value()?;
                    maps.push((name, contents));
                }
                if maps.is_empty() {
                    return Err(de::Error::custom("a policy sets at least one map"));
                }
                Ok(Maps(maps))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// A map's entries: at most [`MAX_ENTRIES_PER_MAP`], refused as soon as
/// one more is read.
struct Entries<E>(Vec<E>);

impl<'de, E: Deserialize<'de>> Deserialize<'de> for Entries<E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<E>(PhantomData<E>);
        impl<'de, E: Deserialize<'de>> Visitor<'de> for V<E> {
            type Value = Entries<E>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of entries ({ key = ..., value = ... })")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Entries<E>, A::Error> {
                let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(e) = seq.next_element()? {
                    if entries.len() == MAX_ENTRIES_PER_MAP {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_ENTRIES_PER_MAP} entries in one map"
                        )));
                    }
                    entries.push(e);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// An entry in TOML.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlEntry {
    key: Spanned<EntryValue>,
    value: Spanned<EntryValue>,
}

/// An entry in JSON, its key and value still raw (for their positions).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry<'a> {
    #[serde(borrow)]
    key: &'a RawValue,
    #[serde(borrow)]
    value: &'a RawValue,
}

// ---------------------------------------------------------------------------
// TOML.

fn parse_toml(text: &str, file: &str) -> Result<PolicyDocument> {
    check_size(text, file)?;
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
        PolicyError::Document(LocatedError::Syntax {
            file: file.to_string(),
            line,
            col,
            msg: e.message().trim_end().to_string(),
        })
    })?;
    let mut track = Track::new();
    let raw: RawDoc<Spanned<TomlEntry>> = RawDoc::deserialize(
        serde_path_to_error::Deserializer::new(de, &mut track),
    )
    .map_err(|e| {
        let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
        PolicyError::Document(LocatedError::Field {
            file: file.to_string(),
            line,
            col,
            field: path_string(&track.path()),
            msg: e.message().trim_end().to_string(),
        })
    })?;
    let mut lines = Lines::new(text);
    let mut pos = |span: Range<usize>| lines.position(span.start);
    finish(raw, file, |_, _, e| {
        let at = pos(e.span());
        let e = e.into_inner();
        Ok(Entry {
            at,
            key_at: pos(e.key.span()),
            value_at: pos(e.value.span()),
            key: e.key.into_inner().0,
            value: e.value.into_inner().0,
        })
    })
}

// ---------------------------------------------------------------------------
// JSON.

fn parse_json(text: &str, file: &str) -> Result<PolicyDocument> {
    check_size(text, file)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut track = Track::new();
    let raw: RawDoc<&RawValue> =
        RawDoc::deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
            .map_err(|e| json_error(file, &path_string(&track.path()), &e, (1, 1)))?;
    de.end().map_err(|e| json_error(file, "", &e, (1, 1)))?;

    // Where a borrowed slice of `text` starts in it (RawValue borrows from
    // the input; the subtraction is of two addresses in the same string).
    let offset = |s: &str| (s.as_ptr() as usize).saturating_sub(text.as_ptr() as usize);
    let mut lines = Lines::new(text);
    let mut pos = |s: &str| lines.position(offset(s));
    finish(raw, file, |map, index, raw| {
        let at = pos(raw.get());
        let field = super::entry_path(map, index);
        let e: JsonEntry<'_> = from_raw(raw.get(), at, file, &field)?;
        let key_at = pos(e.key.get());
        let value_at = pos(e.value.get());
        let key: EntryValue = from_raw(e.key.get(), key_at, file, &format!("{field}.key"))?;
        let value: EntryValue = from_raw(e.value.get(), value_at, file, &format!("{field}.value"))?;
        Ok(Entry {
            key: key.0,
            value: value.0,
            at,
            key_at,
            value_at,
        })
    })
}

/// Parses a piece of the JSON text that starts at `at`; errors carry
/// positions in the whole text and paths under `field`.
fn from_raw<'a, T: Deserialize<'a>>(
    raw: &'a str,
    at: Position,
    file: &str,
    field: &str,
) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(raw);
    let mut track = Track::new();
    T::deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track)).map_err(|e| {
        let inner = path_string(&track.path());
        let field = match inner.as_str() {
            "" => field.to_string(),
            p if p.starts_with('[') => format!("{field}{p}"),
            p => format!("{field}.{p}"),
        };
        json_error(file, &field, &e, (at.line, at.col))
    })
}

/// A serde_json error as a policy error, its line and column moved from a
/// piece of the text that starts at `base` to the whole text. serde_json
/// says column 0 when the offending character is the newline that starts
/// a line (a control character inside a string); columns here are 1-based,
/// so that is column 1.
fn json_error(file: &str, field: &str, e: &serde_json::Error, base: (usize, usize)) -> PolicyError {
    let (line, col) = match e.line() {
        0 => base,
        1 => (base.0, base.1 + e.column().saturating_sub(1)),
        l => (base.0 + l - 1, e.column().max(1)),
    };
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let msg = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
    match e.classify() {
        serde_json::error::Category::Data => PolicyError::Document(LocatedError::Field {
            file: file.to_string(),
            line,
            col,
            field: field.to_string(),
            msg,
        }),
        _ => PolicyError::Document(LocatedError::Syntax {
            file: file.to_string(),
            line,
            col,
            msg,
        }),
    }
}

// ---------------------------------------------------------------------------
// Shared.

fn check_size(text: &str, file: &str) -> Result<()> {
    if text.len() > MAX_DOCUMENT_SIZE {
        return Err(PolicyError::too_large(
            format!("policy {file}"),
            text.len(),
            MAX_DOCUMENT_SIZE,
            "bytes",
        ));
    }
    Ok(())
}

/// Turns the raw document into a [`PolicyDocument`]: each entry through
/// `entry` (map name, index, raw entry), then the rules that span entries
/// (no key twice in a map, [`MAX_ENTRIES`] in all).
fn finish<E>(
    raw: RawDoc<E>,
    file: &str,
    mut entry: impl FnMut(&str, usize, E) -> Result<Entry>,
) -> Result<PolicyDocument> {
    let mut maps = std::collections::BTreeMap::new();
    let mut total = 0usize;
    for (name, contents) in raw.maps.0 {
        let mut entries = Vec::with_capacity(contents.entries.0.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, e) in contents.entries.0.into_iter().enumerate() {
            let e = entry(&name, i, e)?;
            if let Some(first) = seen.insert(super::canonical::value_text(&e.key), i) {
                let line = entries.get(first).map_or(0, |f: &Entry| f.at.line);
                return Err(PolicyError::Document(LocatedError::Field {
                    file: file.to_string(),
                    line: e.key_at.line,
                    col: e.key_at.col,
                    field: format!("{}.key", super::entry_path(&name, i)),
                    msg: format!("the same key as entries[{first}] (line {line})"),
                }));
            }
            entries.push(e);
        }
        total += entries.len();
        if total > MAX_ENTRIES {
            return Err(PolicyError::too_large(
                format!("policy {file}"),
                total,
                MAX_ENTRIES,
                "entries",
            ));
        }
        maps.insert(name, MapContents { entries });
    }
    Ok(PolicyDocument {
        stage: raw.stage.0,
        version: raw.version.0,
        description: raw.description.map(|d| d.0),
        maps,
        source: file.to_string(),
    })
}

/// Positions of byte offsets in one text, in time linear in the text
/// for offsets asked in increasing order (as entries are), however long
/// its lines: line starts are found once, and the column counts from the
/// last offset asked when it is on the same line and not after.
struct Lines<'a> {
    text: &'a str,
    starts: Vec<usize>,
    last: Option<(usize, Position)>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines {
            text,
            starts,
            last: None,
        }
    }

    fn position(&mut self, offset: usize) -> Position {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let line_start = self.starts.get(line - 1).copied().unwrap_or(0);
        let (from, col) = match self.last {
            Some((o, p)) if p.line == line && o <= offset => (o, p.col),
            _ => (line_start, 1),
        };
        let col = col
            + self
                .text
                .get(from..offset)
                .map_or(offset - from, |s| s.chars().count());
        let p = Position { line, col };
        self.last = Some((offset, p));
        p
    }
}
