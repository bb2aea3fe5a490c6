//! Reading TOML that people write, so that every error names the file, line
//! and column and the field's path (`stages[1].priority`, indices from 0):
//! the text is parsed into `toml`'s spanned document tree and walked by
//! hand, with [`Fields`] checking each table's keys against the ones the
//! schema allows. Used by the manifest parser here and by `rootletctl`'s
//! inventory and plan files.
//!
//! Why not `#[derive(Deserialize)]` with `toml::Spanned` fields and
//! `serde_path_to_error` (tried with toml 1.2 and serde_path_to_error 0.1):
//! the positions come out the same in the cases tried (a value, a key, a
//! `[[stages]]` header for a missing key), but not the rest of what an
//! operator reads, and the errors are this crate's and `rootletctl`'s
//! interface (their tests assert them):
//! - wrong types read `invalid type: string "x", expected i32` instead of
//!   `expected an integer, found a string`, and out-of-range integers
//!   ``invalid value: integer `99999999999`, expected i32``;
//! - unknown keys read ``unknown field `aaa`, expected `name` or `priority` ``,
//!   and with two unknown keys serde names the first in key order, not in
//!   file order (without its `preserve_order` feature, toml's tables are
//!   sorted maps);
//! - missing keys read ``missing field `priority` ``;
//! - every `Spanned` adds `$__serde_spanned_private_value` segments to the
//!   path (`stages[0].$__serde_spanned_private_value.priority...`).
//!
//! Getting today's messages back would take a hand-written `Visitor` per
//! value kind and hand-written key checks: this walker again, behind serde.
//! The rules (names, limits, lease bounds, `proceed_on` values) need the
//! spans of single values either way. What the walker uses from `toml` is
//! its parser and its spanned tree ([`DeTable::parse`]), which also reports
//! syntax errors and duplicate keys.

use std::{borrow::Cow, collections::HashMap, ops::Range};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

/// An error in a config file, or reading it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocatedError {
    /// Not valid TOML.
    #[error("{file}:{line}:{col}: {msg}")]
    Syntax {
        file: String,
        line: usize,
        col: usize,
        msg: String,
    },
    /// Valid TOML, but a key is unknown, missing, of the wrong type or has
    /// a value the schema does not allow.
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

pub type Result<T, E = LocatedError> = std::result::Result<T, E>;

pub type Value<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<Cow<'i, str>>;

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

/// The text being parsed, to turn spans into positions in errors.
pub struct Src<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl<'a> Src<'a> {
    /// Parses `text` as TOML; errors carry `file`'s name.
    pub fn parse(file: &'a str, text: &'a str) -> Result<(Src<'a>, Spanned<DeTable<'a>>)> {
        let src = Src { file, text };
        let doc = DeTable::parse(text).map_err(|e| {
            let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
            LocatedError::Syntax {
                file: file.to_string(),
                line,
                col,
                msg: e.message().to_string(),
            }
        })?;
        Ok((src, doc))
    }

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

    /// The 1-based line of `span`.
    pub fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }
}

/// The keys of one table, checked against the keys the schema allows.
pub struct Fields<'t, 'i> {
    src: &'t Src<'t>,
    path: String,
    span: Range<usize>,
    values: HashMap<&'t str, &'t Value<'i>>,
}

impl<'t, 'i> Fields<'t, 'i> {
    /// Checks `table`'s keys (the first unknown one in file order is the
    /// error). `path` is the table's field path ("" for the root), `span`
    /// where a missing key is reported.
    pub fn of(
        src: &'t Src<'t>,
        table: &'t DeTable<'i>,
        span: &Range<usize>,
        path: &str,
        allowed: &[&str],
    ) -> Result<Self> {
        let mut entries: Vec<(&'t Key<'i>, &'t Value<'i>)> = table.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut values = HashMap::new();
        for (k, v) in entries {
            let key: &str = k.get_ref();
            if !allowed.contains(&key) {
                return Err(src.err(
                    &k.span(),
                    &join(path, key),
                    format!("unknown key; expected one of {}", allowed.join(", ")),
                ));
            }
            values.insert(key, v);
        }
        Ok(Fields {
            src,
            path: path.to_string(),
            span: span.clone(),
            values,
        })
    }

    /// The value of `key`, if present.
    pub fn optional(&self, key: &str) -> Option<&'t Value<'i>> {
        self.values.get(key).copied()
    }

    /// The value of `key`, or a "missing required key" error.
    pub fn required(&self, key: &str) -> Result<&'t Value<'i>> {
        self.optional(key).ok_or_else(|| {
            self.src
                .err(&self.span, &join(&self.path, key), "missing required key")
        })
    }

    /// The field path of `key` in this table.
    pub fn field(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Where the table is.
    pub fn span(&self) -> &Range<usize> {
        &self.span
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

/// "a string", "an integer"...
pub fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

pub fn wrong_type(src: &Src<'_>, v: &Value<'_>, field: &str, expected: &str) -> LocatedError {
    src.err(
        &v.span(),
        field,
        format!("expected {expected}, found {}", type_name(v.get_ref())),
    )
}

pub fn string<'t>(src: &Src<'_>, v: &'t Value<'_>, field: &str) -> Result<&'t str> {
    match v.get_ref() {
        DeValue::String(s) => Ok(s),
        _ => Err(wrong_type(src, v, field, "a string")),
    }
}

/// A non-empty string without control characters, at most `max` chars.
pub fn text<'t>(src: &Src<'_>, v: &'t Value<'_>, field: &str, max: usize) -> Result<&'t str> {
    let s = string(src, v, field)?;
    if s.is_empty() {
        return Err(src.err(&v.span(), field, "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(src.err(&v.span(), field, format!("longer than {max} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(src.err(&v.span(), field, "must not contain control characters"));
    }
    Ok(s)
}

pub fn integer(src: &Src<'_>, v: &Value<'_>, field: &str) -> Result<i64> {
    match v.get_ref() {
        DeValue::Integer(n) => i64::from_str_radix(n.as_str(), n.radix())
            .map_err(|_| src.err(&v.span(), field, "integer out of range")),
        _ => Err(wrong_type(src, v, field, "an integer")),
    }
}

/// A float, or an integer taken as one.
pub fn number(src: &Src<'_>, v: &Value<'_>, field: &str) -> Result<f64> {
    match v.get_ref() {
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .ok_or_else(|| src.err(&v.span(), field, "must be a finite number")),
        DeValue::Integer(_) => Ok(integer(src, v, field)? as f64),
        _ => Err(wrong_type(src, v, field, "a number")),
    }
}

pub fn boolean(src: &Src<'_>, v: &Value<'_>, field: &str) -> Result<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        _ => Err(wrong_type(src, v, field, "a boolean")),
    }
}

/// An integer in `range`.
pub fn integer_in(
    src: &Src<'_>,
    v: &Value<'_>,
    field: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<i64> {
    let n = integer(src, v, field)?;
    if !range.contains(&n) {
        return Err(src.err(
            &v.span(),
            field,
            format!(
                "must be between {} and {}, not {n}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(n)
}

/// A table (`[field]` or `field = { ... }`) and its span.
pub fn table<'t, 'i>(
    src: &Src<'_>,
    v: &'t Value<'i>,
    field: &str,
) -> Result<(&'t DeTable<'i>, Range<usize>)> {
    match v.get_ref() {
        DeValue::Table(t) => Ok((t, v.span())),
        _ => Err(wrong_type(src, v, field, "a table")),
    }
}

/// An array of tables (`[[field]]` or `field = [{...}, ...]`), each with
/// its span.
pub fn tables<'t, 'i>(
    src: &Src<'_>,
    v: &'t Value<'i>,
    field: &str,
) -> Result<Vec<(&'t DeTable<'i>, Range<usize>)>> {
    let DeValue::Array(items) = v.get_ref() else {
        return Err(wrong_type(
            src,
            v,
            field,
            &format!("an array of tables ([[{field}]])"),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.get_ref() {
            DeValue::Table(t) => Ok((t, item.span())),
            _ => Err(wrong_type(src, item, &format!("{field}[{i}]"), "a table")),
        })
        .collect()
}
