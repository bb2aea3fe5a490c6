//! [`LocatedError`], the one error shape of every document a person writes
//! and this workspace reads (a bundle manifest, a policy document,
//! `rootletctl`'s inventory and plan files): `file:line:col: field: message`,
//! the field a path such as `stages[1].priority` (indices from 0).
//!
//! Also what the serde readers share to produce it: [`Src`] (the text, to
//! turn byte spans into lines and columns), [`field_path`]
//! (`serde_path_to_error`'s path in this spelling, without the segments
//! `toml::Spanned` adds) and [`toml_error`] (a `toml` deserializer error,
//! with serde's wording translated into the one this crate has always
//! used: `expected an integer, found a string`, `unknown key; expected one
//! of ...`, `missing required key`).

use std::ops::Range;

use serde_path_to_error::{Path as SerdePath, Segment};

/// An error in a document a person wrote, or reading it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocatedError {
    /// Not valid TOML (or JSON).
    #[error("{file}:{line}:{col}: {msg}")]
    Syntax {
        file: String,
        line: usize,
        col: usize,
        msg: String,
    },
    /// Valid TOML (or JSON), but a key is unknown, missing, repeated, of
    /// the wrong type or has a value the schema does not allow.
    #[error("{file}:{line}:{col}: {field}: {msg}")]
    Field {
        file: String,
        line: usize,
        col: usize,
        field: String,
        msg: String,
    },
    /// The file cannot be read.
    #[error("{file}: {msg}")]
    Io { file: String, msg: String },
}

impl LocatedError {
    /// The 1-based line and column, if the error has a position.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            Self::Syntax { line, col, .. } | Self::Field { line, col, .. } => Some((*line, *col)),
            Self::Io { .. } => None,
        }
    }

    /// The field's path, for a field error.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

pub type Result<T, E = LocatedError> = std::result::Result<T, E>;

/// 1-based line and column (in characters) of byte `offset` of `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.as_bytes().get(..offset).unwrap_or_default();
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = match text.get(line_start..offset) {
        Some(s) => s.chars().count() + 1,
        None => offset - line_start + 1,
    };
    (line, col)
}

/// The text being read, to turn spans into positions in errors.
pub struct Src<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Src<'_> {
    /// An error about `field` at `span`.
    pub fn err(&self, span: &Range<usize>, field: &str, msg: impl Into<String>) -> LocatedError {
        let (line, col) = line_col(self.text, span.start);
        LocatedError::Field {
            file: self.file.to_string(),
            line,
            col,
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    /// A syntax error at `span`.
    pub fn syntax(&self, span: &Range<usize>, msg: impl Into<String>) -> LocatedError {
        let (line, col) = line_col(self.text, span.start);
        LocatedError::Syntax {
            file: self.file.to_string(),
            line,
            col,
            msg: msg.into(),
        }
    }

    /// The 1-based line of `span`.
    pub fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    /// A `toml` error from parsing the text (syntax, duplicate keys).
    pub fn toml_syntax(&self, e: &toml::de::Error) -> LocatedError {
        self.syntax(&e.span().unwrap_or(0..0), e.message().trim_end())
    }
}

/// `path.key`, or `key` at the root.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// serde_path_to_error's path in this crate's spelling
/// (`maps.x.entries[3].key`, `stages[0].priority`), without the segments
/// `toml::Spanned` adds (`$__serde_spanned_private_value`, ...).
pub fn field_path(path: &SerdePath) -> String {
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// An error of a serde-derived read of TOML (through
/// `serde_path_to_error`, whose path is `path`) as a field error at the
/// span toml reports: the value for a wrong type or value, the key for an
/// unknown key, the table for a missing key. Serde's messages are put in
/// this crate's words, and the field of an unknown or missing key is that
/// key's path, not its table's.
pub fn toml_error(src: &Src<'_>, path: &SerdePath, e: &toml::de::Error) -> LocatedError {
    let span = e.span().unwrap_or(0..0);
    let (field, msg) = serde_message(&field_path(path), e.message().trim_end());
    src.err(&span, &field, msg)
}

/// Serde's wording, translated: `invalid type: string "x", expected an
/// integer` reads `expected an integer, found a string`; ``unknown field
/// `x`, expected one of `a`, `b` `` reads `unknown key; expected one of a,
/// b` (at `path.x`); ``missing field `x` `` reads `missing required key`
/// (at `path.x`). Anything else (the readers' own messages) is kept.
fn serde_message(path: &str, msg: &str) -> (String, String) {
    if let Some(rest) = msg.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.rsplit_once(", expected ")
    {
        let expected = expected_kind(expected);
        return (
            path.to_string(),
            format!("expected {expected}, found {}", kind(found)),
        );
    }
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((key, expected)) = rest.split_once('`')
    {
        let expected = expected.trim_start_matches(", expected ").replace('`', "");
        let field = unknown_key_path(path, key);
        let msg = match expected.as_str() {
            "" | ", there are no fields" => "unknown key".to_string(),
            e => format!("unknown key; expected {e}"),
        };
        return (field, msg);
    }
    if let Some(key) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return (join(path, key), "missing required key".to_string());
    }
    (path.to_string(), msg.to_string())
}

/// serde_path_to_error records an unknown key in the path already (it is
/// read as a key before it is refused); add it where it does not.
fn unknown_key_path(path: &str, key: &str) -> String {
    if path == key || path.ends_with(&format!(".{key}")) {
        path.to_string()
    } else {
        join(path, key)
    }
}

/// What serde's own impls expect, as TOML names it.
fn expected_kind(expected: &str) -> &str {
    match expected {
        "a sequence" => "an array",
        "a map" => "a table",
        e => e,
    }
}

/// Serde's `Unexpected` as this crate names kinds of values.
fn kind(found: &str) -> &str {
    const KINDS: [(&str, &str); 8] = [
        ("string", "a string"),
        ("integer", "an integer"),
        ("floating point", "a float"),
        ("boolean", "a boolean"),
        ("sequence", "an array"),
        ("map", "a table"),
        ("unit", "nothing"),
        ("character", "a string"),
    ];
    KINDS
        .iter()
        .find(|(serde, _)| found.starts_with(serde))
        .map_or(found, |(_, ours)| ours)
}

#[cfg(test)]
mod tests {
    use super::serde_message;

    #[test]
    fn serde_messages_in_this_crates_words() {
        let m = |p: &str, s: &str| serde_message(p, s);
        assert_eq!(
            m(
                "stages[0].priority",
                "invalid type: string \"a, expected b\", expected an integer"
            ),
            (
                "stages[0].priority".into(),
                "expected an integer, found a string".into()
            )
        );
        assert_eq!(
            m(
                "stages[0].pin",
                "unknown field `pin`, expected `name` or `object`"
            ),
            (
                "stages[0].pin".into(),
                "unknown key; expected name or object".into()
            )
        );
        assert_eq!(
            m("stages[0]", "unknown field `pin`, expected one of `a`, `b`"),
            (
                "stages[0].pin".into(),
                "unknown key; expected one of a, b".into()
            )
        );
        assert_eq!(
            m("stages[0]", "missing field `owner`"),
            ("stages[0].owner".into(), "missing required key".into())
        );
        assert_eq!(
            m("", "missing field `name`"),
            ("name".into(), "missing required key".into())
        );
        assert_eq!(
            m("x", "must not be empty"),
            ("x".into(), "must not be empty".into())
        );
    }
}
