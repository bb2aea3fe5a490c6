//! What an entry's key or value may be: a JSON value made of integers,
//! strings, booleans, arrays and objects, read through serde from TOML or
//! JSON alike, so that the same entry written in either gives the same
//! [`Value`] (and the same canonical bytes).
//!
//! Refused, with the position the deserializer reports:
//! - floating-point numbers (BPF map keys and values hold integers, and a
//!   float has no one canonical spelling); a JSON integer beyond the 64-bit
//!   range reads as a float and is refused the same way;
//! - `null` (TOML has none, and no BTF type means it);
//! - TOML datetimes;
//! - an object that names a member twice (serde_json would keep the last);
//! - nesting deeper than [`MAX_VALUE_DEPTH`](super::limits::MAX_VALUE_DEPTH).
//!
//! Integers beyond what TOML can write (above `i64::MAX`) are written as
//! strings (`"0xffffffffffffffff"`), which the typed check decodes.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::limits::MAX_VALUE_DEPTH;

/// The name toml gives the one member of the map a datetime reads as.
const TOML_DATETIME_FIELD: &str = "$__toml_private_datetime";

/// An entry's key or value, checked as the module docs say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryValue(pub Value);

impl<'de> de::Deserialize<'de> for EntryValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Seed { depth: 0 }.deserialize(deserializer).map(EntryValue)
    }
}

#[derive(Clone, Copy)]
struct Seed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Seed {
    fn deeper<E: de::Error>(self) -> Result<Seed, E> {
        if self.depth >= MAX_VALUE_DEPTH {
            return Err(E::custom(format!(
                "nested deeper than {MAX_VALUE_DEPTH} arrays or objects"
            )));
        }
        Ok(Seed {
            depth: self.depth + 1,
        })
    }
}

fn float<E: de::Error>() -> E {
    E::custom(
        "expected an integer, a string, a boolean, an array or an object, found a \
         floating-point number (BPF maps hold integers; write numbers beyond 64 bits, or in \
         hex, as strings: \"0xffffffffffffffff\")",
    )
}

impl<'de> Visitor<'de> for Seed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer, a string, a boolean, an array or an object")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(v) = u64::try_from(v) {
            return Ok(Value::from(v));
        }
        i64::try_from(v)
            .map(Value::from)
            .map_err(|_| E::custom("integer out of the 64-bit range; write it as a string"))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(Value::from)
            .map_err(|_| E::custom("integer out of the 64-bit range; write it as a string"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Value, E> {
        Err(float())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Err(E::custom(
            "expected an integer, a string, a boolean, an array or an object, found null",
        ))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let seed = self.deeper()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(seed)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let seed = self.deeper()?;
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == TOML_DATETIME_FIELD {
                return Err(de::Error::custom(
                    "expected an integer, a string, a boolean, an array or an object, found a \
                     datetime",
                ));
            }
            if members.contains_key(&name) {
                return Err(de::Error::custom(format!(
                    "member {name:?} is written twice"
                )));
            }
            let value = map.next_value_seed(seed)?;
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}
