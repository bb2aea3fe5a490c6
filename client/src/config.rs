//! Reading the TOML files a person writes (inventory, rollout plan) so that
//! every error names the file, line and column and the field's path
//! (`waves[1].percent`, indices from 0), in the one error shape of
//! `rootlet-bundle` ([`rootlet_bundle::located::LocatedError`], re-exported
//! as [`ConfigError`]): the text is parsed into `toml`'s spanned document
//! tree and walked by hand, with [`Fields`] checking each table's keys
//! against the ones the schema allows.
//!
//! The bundle manifest left this walker for serde with spans (see
//! `rootlet_bundle::manifest`); these two files have not moved yet, and
//! their tests assert today's messages. Moving them is the same change:
//! derived types with `toml::Spanned` values, read through
//! `rootlet_bundle::located::toml_error`.
//!
//! Also durations (`"500ms"`, `"30s"`, `"5m"`, `"1h30m"`), which plans use.

use std::{fmt, path::Path, time::Duration};

/// Largest config file read (inventories of a few thousand hosts fit).
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

pub use rootlet_bundle::located::{LocatedError as ConfigError, Result, Src, join, line_col};

use std::{borrow::Cow, collections::HashMap, ops::Range};

use rootlet_bundle::located::LocatedError;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

pub type Value<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<Cow<'i, str>>;

/// Parses `text` as TOML into its spanned tree; errors carry `file`'s name.
pub fn parse<'a>(file: &'a str, text: &'a str) -> Result<(Src<'a>, Spanned<DeTable<'a>>)> {
    let src = Src { file, text };
    let doc = DeTable::parse(text).map_err(|e| src.toml_syntax(&e))?;
    Ok((src, doc))
}

/// Reads a config file (at most [`MAX_CONFIG_SIZE`] bytes, UTF-8).
pub fn read(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = path.display().to_string();
    let io = |e: std::io::Error| ConfigError::Io {
        file: file.clone(),
        msg: e.to_string(),
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut raw = Vec::new();
    f.take(MAX_CONFIG_SIZE + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() as u64 > MAX_CONFIG_SIZE {
        return Err(ConfigError::Io {
            file,
            msg: format!("larger than {MAX_CONFIG_SIZE} bytes"),
        });
    }
    String::from_utf8(raw).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(e.as_bytes().get(..valid).unwrap_or_default());
        let (line, col) = line_col(&text, valid);
        ConfigError::Syntax {
            file: file.clone(),
            line,
            col,
            msg: "not valid UTF-8".into(),
        }
    })
}

/// A duration string (see [`parse_duration`]).
pub fn duration(src: &Src<'_>, v: &Value<'_>, field: &str) -> Result<Duration> {
    let s = string(src, v, field)?;
    parse_duration(s).map_err(|msg| src.err(&v.span(), field, msg))
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"` and sums of them
/// (`"1h30m"`, `"1m 30s"`). `"0s"` is zero; a bare number is refused so
/// that the unit is never a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration; write a number and a unit (ms, s, m, h, d), e.g. \"30s\", \"5m\", \"1h30m\""
        )
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    let mut parts = 0;
    while !rest.is_empty() && parts < 8 {
        parts += 1;
        rest = rest.trim_start();
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(bad());
        }
        let (num, tail) = rest.split_at(digits);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(d);
        rest = tail;
    }
    if !rest.trim().is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A duration as people write it: `"1h30m"`, `"45s"`, `"250ms"`, `"0s"`.
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d < Duration::from_secs(1) {
            return write!(f, "{}ms", d.as_millis());
        }
        if d < Duration::from_secs(10) && d.subsec_millis() != 0 {
            return write!(f, "{:.1}s", d.as_secs_f64());
        }
        let s = d.as_secs();
        let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
        let mut out = String::new();
        if h > 0 {
            out.push_str(&format!("{h}h"));
        }
        if m > 0 {
            out.push_str(&format!("{m}m"));
        }
        if sec > 0 || out.is_empty() {
            out.push_str(&format!("{sec}s"));
        }
        f.write_str(&out)
    }
}

/// Serde helpers for durations as milliseconds in JSON (the journal).
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "30", "s", "3x", "1.5s", "-1s", "10s junk"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(Human(Duration::from_secs(5400)).to_string(), "1h30m");
        assert_eq!(Human(Duration::from_millis(250)).to_string(), "250ms");
        assert_eq!(Human(Duration::from_millis(2500)).to_string(), "2.5s");
        assert_eq!(Human(Duration::ZERO).to_string(), "0s");
    }
}
