//! Reading the TOML files a person writes (inventory, rollout plan) so that
//! every error names the file, line and column and the field's path
//! (`waves[1].percent`, indices from 0), as `rootlet-bundle` does for
//! manifests: the text is parsed into `toml`'s spanned document tree and
//! walked by hand, with [`Fields`] checking each table's keys against the
//! ones the schema allows.
//!
//! Also durations (`"500ms"`, `"30s"`, `"5m"`, `"1h30m"`), which plans use.

use std::{fmt, path::Path, time::Duration};

/// Largest config file read (inventories of a few thousand hosts fit).
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

pub use rootlet_bundle::located::{
    Fields, LocatedError as ConfigError, Result, Src, Value, boolean, integer, integer_in, join,
    line_col, number, string, table, tables, text, type_name, wrong_type,
};

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
