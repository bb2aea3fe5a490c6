//! The JSON form of map entries (docs/POLICY.md, "JSON form of map
//! entries"): [`MapSchema::encode_key`]/[`MapSchema::encode_value`] turn the
//! kernel's bytes into JSON that follows the BTF types, as `bpftool map
//! dump` prints them, and [`MapSchema::decode_key`]/[`MapSchema::decode_value`]
//! turn JSON back into bytes, refusing whatever does not fit the type with
//! the path of the field ([`CodecError`]).
//!
//! Integers are host (little-endian) order; the address typedefs and
//! LPM-trie addresses are network order (the bytes as they are).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value};

use crate::maps::{BPF_MAP_TYPE_LPM_TRIE, MapSchema};
use crate::types::{Composite, Member, Type};

/// A value that does not fit its type: where (`value.backends[2].ip`) and
/// why. Callers prefix the entry (`entries[3]`) with [`CodecError::within`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CodecError {
    pub path: String,
    pub message: String,
}

impl CodecError {
    /// The same error under `prefix`: `entries[3]` + `value.ip` is
    /// `entries[3].value.ip`.
    pub fn within(self, prefix: &str) -> CodecError {
        CodecError {
            path: format!("{prefix}.{}", self.path),
            message: self.message,
        }
    }
}

/// Where a value is, built as the codec descends and written out only for
/// an error (a 100 000-entry policy formats no path it does not need).
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(r) => f.write_str(r),
            Path::Field(p, n) => write!(f, "{p}.{n}"),
            Path::Index(p, i) => write!(f, "{p}[{i}]"),
        }
    }
}

fn err<T>(path: &Path<'_>, message: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError {
        path: path.to_string(),
        message: message.into(),
    })
}

/// A JSON value, short, for error messages.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        let mut end = 57;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// An integer as JSON: a number when it fits i64 or u64, else a decimal
/// string (JSON numbers beyond 64 bits lose precision in most parsers).
pub(crate) fn int_json(v: i128) -> Value {
    if let Ok(x) = i64::try_from(v) {
        Value::from(x)
    } else if let Ok(x) = u64::try_from(v) {
        Value::from(x)
    } else {
        Value::String(v.to_string())
    }
}

impl MapSchema {
    /// The JSON form of a key (`bytes` of `key_size`).
    ///
    /// # Errors
    /// [`CodecError`] when the bytes are not the size the map's type says;
    /// any bytes of that size encode.
    pub fn encode_key(&self, bytes: &[u8]) -> Result<Value, CodecError> {
        let path = Path::Root("key");
        if bytes.len() != self.key_size as usize {
            return err(
                &path,
                format!("{} bytes, not {}", bytes.len(), self.key_size),
            );
        }
        if let Some(lpm) = self.lpm()
            && let Some(s) = lpm.encode(bytes)
        {
            return Ok(Value::String(s));
        }
        encode(&self.key, bytes, &path)
    }

    /// The JSON form of a value (`bytes` of `value_size`; for a per-CPU map,
    /// one value per possible CPU, each padded to 8 bytes as the kernel
    /// returns them, encoded as a JSON array of the CPUs' values).
    ///
    /// # Errors
    /// [`CodecError`] when the bytes are not the size the map's type says;
    /// any bytes of that size encode.
    pub fn encode_value(&self, bytes: &[u8]) -> Result<Value, CodecError> {
        let path = Path::Root("value");
        if self.map_type.is_per_cpu() {
            let stride = per_cpu_stride(self.value_size);
            if stride == 0 || bytes.is_empty() || !bytes.len().is_multiple_of(stride) {
                return err(
                    &path,
                    format!(
                        "{} bytes are not a whole number of per-CPU values of {stride} bytes",
                        bytes.len()
                    ),
                );
            }
            let n = self.value_size as usize;
            return bytes
                .chunks(stride)
                .enumerate()
                .map(|(i, c)| encode(&self.value, &c[..n], &Path::Index(&path, i)))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array);
        }
        if bytes.len() != self.value_size as usize {
            return err(
                &path,
                format!("{} bytes, not {}", bytes.len(), self.value_size),
            );
        }
        encode(&self.value, bytes, &path)
    }

    /// The bytes of a key given in JSON.
    ///
    /// # Errors
    /// [`CodecError`] with the path (`key`, `value.backends[2].ip`) of what
    /// does not fit the type.
    pub fn decode_key(&self, v: &Value) -> Result<Vec<u8>, CodecError> {
        let path = Path::Root("key");
        if let Some(lpm) = self.lpm() {
            return lpm.decode(self, v, &path);
        }
        let mut out = vec![0; self.key_size as usize];
        decode(&self.key, v, &mut out, &path)?;
        Ok(out)
    }

    /// The bytes of a value given in JSON (for a per-CPU map, a JSON array
    /// of one value per CPU; the caller checks the count against the
    /// possible CPUs).
    ///
    /// # Errors
    /// [`CodecError`] with the path (`key`, `value.backends[2].ip`) of what
    /// does not fit the type.
    pub fn decode_value(&self, v: &Value) -> Result<Vec<u8>, CodecError> {
        let path = Path::Root("value");
        if self.map_type.is_per_cpu() {
            let Value::Array(cpus) = v else {
                return err(
                    &path,
                    format!(
                        "{} is not an array of per-CPU values (a {} map holds one value per CPU)",
                        show(v),
                        self.map_type.name()
                    ),
                );
            };
            if cpus.is_empty() {
                return err(&path, "no per-CPU value");
            }
            let stride = per_cpu_stride(self.value_size);
            let mut out = vec![0; stride * cpus.len()];
            for (i, (cpu, chunk)) in cpus.iter().zip(out.chunks_mut(stride)).enumerate() {
                let n = self.value_size as usize;
                decode(&self.value, cpu, &mut chunk[..n], &Path::Index(&path, i))?;
            }
            return Ok(out);
        }
        let mut out = vec![0; self.value_size as usize];
        decode(&self.value, v, &mut out, &path)?;
        Ok(out)
    }

    /// The LPM form of this map's key, if it has one: an LPM trie whose
    /// key is `{ u32 prefixlen; <4 or 16 bytes of address> }`, whatever the
    /// member names.
    fn lpm(&self) -> Option<Lpm> {
        if self.map_type.0 != BPF_MAP_TYPE_LPM_TRIE {
            return None;
        }
        let Type::Struct(c) = &self.key else {
            return None;
        };
        let [len, addr] = c.members.as_slice() else {
            return None;
        };
        let plain = |m: &Member| m.bitfield.is_none() && m.name.is_some();
        let addr_size = addr.ty.size();
        let ok = plain(len)
            && plain(addr)
            && len.offset == 0
            && matches!(len.ty, Type::Int { size: 4, .. })
            && addr.offset == 4
            && matches!(addr_size, 4 | 16)
            && c.size == 4 + addr_size
            && no_opaque(&addr.ty);
        ok.then_some(Lpm {
            v6: addr_size == 16,
        })
    }
}

fn no_opaque(t: &Type) -> bool {
    match t {
        Type::Opaque { .. } => false,
        Type::Array { elem, .. } => no_opaque(elem),
        Type::Struct(c) | Type::Union(c) => c.members.iter().all(|m| no_opaque(&m.ty)),
        _ => true,
    }
}

/// The kernel's per-CPU value stride in user space: `round_up(value_size, 8)`.
fn per_cpu_stride(value_size: u32) -> usize {
    (value_size as usize).div_ceil(8) * 8
}

/// An LPM-trie key: prefix length (host order) then the address (network order).
struct Lpm {
    v6: bool,
}

impl Lpm {
    fn bits(&self) -> u32 {
        if self.v6 { 128 } else { 32 }
    }

    /// `"192.0.2.0/24"`, or None if the key is not canonical (a prefix
    /// longer than the address, or a bit set beyond the prefix): such a
    /// key is shown in its struct form instead.
    fn encode(&self, b: &[u8]) -> Option<String> {
        let len = u32::from_le_bytes(b[0..4].try_into().ok()?);
        let addr = &b[4..];
        if len > self.bits() || !host_bits_clear(addr, len) {
            return None;
        }
        Some(if self.v6 {
            let a: [u8; 16] = addr.try_into().ok()?;
            format!("{}/{len}", Ipv6Addr::from(a))
        } else {
            let a: [u8; 4] = addr.try_into().ok()?;
            format!("{}/{len}", Ipv4Addr::from(a))
        })
    }

    fn decode(&self, m: &MapSchema, v: &Value, path: &Path<'_>) -> Result<Vec<u8>, CodecError> {
        let family = if self.v6 { "IPv6" } else { "IPv4" };
        let mut out = vec![0; m.key_size as usize];
        match v {
            Value::String(s) => {
                let Some((addr, len)) = s.split_once('/') else {
                    return err(
                        path,
                        format!("{} is not an {family} prefix (address/length)", show(v)),
                    );
                };
                let len: u32 = match len.parse() {
                    Ok(l) if !len.starts_with('+') => l,
                    _ => {
                        return err(path, format!("{}: {len:?} is not a prefix length", show(v)));
                    }
                };
                if self.v6 {
                    let a: Ipv6Addr = addr.parse().or_else(|_| {
                        err(
                            path,
                            format!("{}: {addr:?} is not an IPv6 address", show(v)),
                        )
                    })?;
                    out[4..].copy_from_slice(&a.octets());
                } else {
                    let a: Ipv4Addr = addr.parse().or_else(|_| {
                        err(
                            path,
                            format!("{}: {addr:?} is not an IPv4 address", show(v)),
                        )
                    })?;
                    out[4..].copy_from_slice(&a.octets());
                }
                out[..4].copy_from_slice(&len.to_le_bytes());
            }
            Value::Object(_) => decode(&m.key, v, &mut out, path)?,
            _ => {
                return err(
                    path,
                    format!(
                        "{} is not an {family} prefix such as {}",
                        show(v),
                        if self.v6 {
                            "\"2001:db8::/32\""
                        } else {
                            "\"192.0.2.0/24\""
                        }
                    ),
                );
            }
        }
        let len = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        if len > self.bits() {
            return err(
                path,
                format!(
                    "{}: prefix length {len} is longer than {}",
                    show(v),
                    self.bits()
                ),
            );
        }
        if !host_bits_clear(&out[4..], len) {
            let mut net = out[4..].to_vec();
            clear_host_bits(&mut net, len);
            let suggest = if self.v6 {
                let a: [u8; 16] = net.as_slice().try_into().unwrap_or_default();
                Ipv6Addr::from(a).to_string()
            } else {
                let a: [u8; 4] = net.as_slice().try_into().unwrap_or_default();
                Ipv4Addr::from(a).to_string()
            };
            return err(
                path,
                format!(
                    "{} has bits set beyond its /{len} prefix (the prefix is {suggest}/{len})",
                    show(v)
                ),
            );
        }
        Ok(out)
    }
}

fn host_bits_clear(addr: &[u8], len: u32) -> bool {
    let mut a = addr.to_vec();
    clear_host_bits(&mut a, len);
    a == addr
}

fn clear_host_bits(addr: &mut [u8], len: u32) {
    for (i, byte) in addr.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if start >= len {
            *byte = 0;
        } else if start + 8 > len {
            *byte &= 0xffu8 << (8 - (len - start));
        }
    }
}

// ---- encoding ------------------------------------------------------------

fn encode(t: &Type, b: &[u8], path: &Path<'_>) -> Result<Value, CodecError> {
    debug_assert_eq!(b.len(), t.size() as usize);
    Ok(match t {
        Type::Int { size, signed } => int_to_json(read_le(b), size * 8, *signed),
        Type::Char { signed } => int_to_json(read_le(b), 8, *signed),
        Type::Bool => Value::Bool(b[0] != 0),
        Type::Enum {
            size,
            signed,
            values,
            ..
        } => enum_to_json(values, read_le(b), size * 8, *signed),
        Type::Array { elem, len } => {
            if matches!(**elem, Type::Char { .. })
                && let Some(s) = text(b)
            {
                return Ok(Value::String(s.to_owned()));
            }
            let n = elem.size() as usize;
            let mut out = Vec::with_capacity(*len as usize);
            for (i, c) in b.chunks(n).enumerate() {
                out.push(encode(elem, c, &Path::Index(path, i))?);
            }
            Value::Array(out)
        }
        Type::Struct(c) | Type::Union(c) => {
            let mut obj = Map::new();
            encode_members(c, b, path, &mut obj)?;
            Value::Object(obj)
        }
        Type::Ipv4 => {
            let a: [u8; 4] = b.try_into().unwrap_or_default();
            Value::String(Ipv4Addr::from(a).to_string())
        }
        Type::Ipv6 => {
            let a: [u8; 16] = b.try_into().unwrap_or_default();
            Value::String(Ipv6Addr::from(a).to_string())
        }
        Type::Mac => Value::String(
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        Type::Opaque { .. } => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Value::String(format!("0x{hex}"))
        }
    })
}

/// A struct's or union's members into `obj`; an anonymous member's own
/// members go into the same object, as C reaches them.
fn encode_members(
    c: &Composite,
    b: &[u8],
    path: &Path<'_>,
    obj: &mut Map<String, Value>,
) -> Result<(), CodecError> {
    for m in &c.members {
        let Some(name) = &m.name else {
            if let Type::Struct(inner) | Type::Union(inner) = &m.ty {
                let (o, s) = (m.offset as usize, m.ty.size() as usize);
                encode_members(inner, &b[o..o + s], path, obj)?;
            }
            continue;
        };
        let here = Path::Field(path, name);
        let v = match m.bitfield {
            Some(bf) => {
                let raw = read_bits(b, bf.bit_offset, bf.bits);
                match &m.ty {
                    Type::Enum { values, signed, .. } => {
                        enum_to_json(values, raw, bf.bits, *signed)
                    }
                    Type::Bool => Value::Bool(raw != 0),
                    Type::Int { signed, .. } | Type::Char { signed } => {
                        int_to_json(raw, bf.bits, *signed)
                    }
                    _ => return err(&here, "a bitfield of a type that is not an integer"),
                }
            }
            None => {
                let (o, s) = (m.offset as usize, m.ty.size() as usize);
                encode(&m.ty, &b[o..o + s], &here)?
            }
        };
        obj.insert(name.clone(), v);
    }
    Ok(())
}

/// NUL-terminated UTF-8 text with only NULs after it, if `b` is that.
fn text(b: &[u8]) -> Option<&str> {
    let nul = b.iter().position(|&c| c == 0)?;
    if b[nul..].iter().any(|&c| c != 0) {
        return None;
    }
    std::str::from_utf8(&b[..nul]).ok()
}

fn read_le(b: &[u8]) -> u128 {
    b.iter()
        .rev()
        .fold(0u128, |acc, &x| (acc << 8) | u128::from(x))
}

fn read_bits(b: &[u8], bit_offset: u32, bits: u32) -> u128 {
    let mut v = 0u128;
    for i in 0..bits {
        let bit = (bit_offset + i) as usize;
        if b.get(bit / 8).is_some_and(|x| x >> (bit % 8) & 1 == 1) {
            v |= 1 << i;
        }
    }
    v
}

fn write_bits(b: &mut [u8], bit_offset: u32, bits: u32, v: u128) {
    for i in 0..bits {
        let bit = (bit_offset + i) as usize;
        if let Some(x) = b.get_mut(bit / 8) {
            if v >> i & 1 == 1 {
                *x |= 1 << (bit % 8);
            } else {
                *x &= !(1 << (bit % 8));
            }
        }
    }
}

/// `raw` (the low `bits` bits, two's complement) as a number.
fn signed_value(raw: u128, bits: u32, signed: bool) -> Option<i128> {
    if signed && bits > 0 && raw >> (bits - 1) & 1 == 1 {
        // sign-extend
        let ext = if bits >= 128 {
            raw
        } else {
            raw | (!0u128 << bits)
        };
        Some(ext as i128)
    } else {
        i128::try_from(raw).ok()
    }
}

fn int_to_json(raw: u128, bits: u32, signed: bool) -> Value {
    match signed_value(raw, bits, signed) {
        Some(v) => int_json(v),
        None => Value::String(raw.to_string()),
    }
}

fn enum_to_json(values: &[crate::types::Enumerator], raw: u128, bits: u32, signed: bool) -> Value {
    let v = signed_value(raw, bits, signed);
    match values.iter().find(|e| Some(e.value) == v) {
        Some(e) => Value::String(e.name.clone()),
        None => int_to_json(raw, bits, signed),
    }
}

// ---- decoding ------------------------------------------------------------

/// Decodes `v` as `t` into `out` (zeroed, `t.size()` bytes).
fn decode(t: &Type, v: &Value, out: &mut [u8], path: &Path<'_>) -> Result<(), CodecError> {
    match t {
        Type::Int { size, signed } => {
            let raw = int_from_json(v, size * 8, *signed, path)?;
            out.copy_from_slice(&raw.to_le_bytes()[..*size as usize]);
        }
        Type::Char { signed } => {
            // A lone char is a number (a string is a number too, as for
            // every integer: "0" is 0, not '0').
            out[0] = int_from_json(v, 8, *signed, path)? as u8;
        }
        Type::Bool => out[0] = u8::from(bool_from_json(v, path)?),
        Type::Enum {
            name,
            size,
            signed,
            values,
        } => {
            let raw = enum_from_json(name, values, v, size * 8, *signed, path)?;
            out.copy_from_slice(&raw.to_le_bytes()[..*size as usize]);
        }
        Type::Array { elem, len } => {
            let n = elem.size() as usize;
            if let (Type::Char { .. }, Value::String(s)) = (&**elem, v) {
                if s.as_bytes().contains(&0) {
                    return err(path, "a string with a NUL in it");
                }
                if s.len() >= *len as usize {
                    return err(
                        path,
                        format!(
                            "a string of {} bytes does not fit char[{len}] with its NUL",
                            s.len()
                        ),
                    );
                }
                out[..s.len()].copy_from_slice(s.as_bytes());
                return Ok(());
            }
            let Value::Array(items) = v else {
                return err(path, format!("{} is not an array of {len}", show(v)));
            };
            // Fewer elements than the array holds leave the rest zero, as a
            // missing struct member is zero (and as in a C initializer).
            if items.len() > *len as usize {
                return err(
                    path,
                    format!("an array of {} elements; it holds {len}", items.len()),
                );
            }
            for (i, (item, chunk)) in items.iter().zip(out.chunks_mut(n)).enumerate() {
                decode(elem, item, chunk, &Path::Index(path, i))?;
            }
        }
        Type::Struct(c) => {
            let Value::Object(obj) = v else {
                return err(
                    path,
                    format!("{} is not an object (struct {})", show(v), c.name),
                );
            };
            decode_composite(c, false, obj, out, path)?;
        }
        Type::Union(c) => {
            let Value::Object(obj) = v else {
                return err(
                    path,
                    format!("{} is not an object (union {})", show(v), c.name),
                );
            };
            decode_composite(c, true, obj, out, path)?;
        }
        Type::Ipv4 => {
            let a: Ipv4Addr = v.as_str().and_then(|s| s.parse().ok()).map_or_else(
                || err(path, format!("{} is not an IPv4 address", show(v))),
                Ok,
            )?;
            out.copy_from_slice(&a.octets());
        }
        Type::Ipv6 => {
            let a: Ipv6Addr = v.as_str().and_then(|s| s.parse().ok()).map_or_else(
                || err(path, format!("{} is not an IPv6 address", show(v))),
                Ok,
            )?;
            out.copy_from_slice(&a.octets());
        }
        Type::Mac => {
            let mac = v.as_str().and_then(parse_mac).map_or_else(
                || {
                    err(
                        path,
                        format!(
                            "{} is not a MAC address such as \"02:00:00:00:00:01\"",
                            show(v)
                        ),
                    )
                },
                Ok,
            )?;
            out.copy_from_slice(&mac);
        }
        Type::Opaque { why, .. } => {
            return err(path, format!("cannot be written: it is {why}"));
        }
    }
    Ok(())
}

/// The names an object may use for `c`'s members: its named members and,
/// through anonymous members, theirs.
fn owns(c: &Composite, name: &str) -> bool {
    c.members.iter().any(|m| match (&m.name, &m.ty) {
        (Some(n), _) => n == name,
        (None, Type::Struct(inner) | Type::Union(inner)) => owns(inner, name),
        (None, _) => false,
    })
}

fn decode_composite(
    c: &Composite,
    union: bool,
    obj: &Map<String, Value>,
    out: &mut [u8],
    path: &Path<'_>,
) -> Result<(), CodecError> {
    if let Some(unknown) = obj.keys().find(|k| !owns(c, k)) {
        let names: Vec<String> = member_names(c);
        return err(
            &Path::Field(path, unknown),
            format!(
                "{} has no member {unknown:?} (its members: {})",
                if union { "the union" } else { "the struct" },
                names.join(", ")
            ),
        );
    }
    // For a union, which bytes a member already set, and by whom: two
    // members that disagree about the same bytes are an error, not "the
    // last one wins".
    let mut claimed: Vec<Option<&str>> = if union { vec![None; out.len()] } else { vec![] };
    let mut scratch = if union { vec![0u8; out.len()] } else { vec![] };
    for m in &c.members {
        let (lo, hi, label) = match (&m.name, m.bitfield) {
            (_, Some(bf)) => (
                (bf.bit_offset / 8) as usize,
                (bf.bit_offset + bf.bits).div_ceil(8) as usize,
                m.name.as_deref().unwrap_or(""),
            ),
            (Some(n), None) => (
                m.offset as usize,
                (m.offset + m.ty.size()) as usize,
                n.as_str(),
            ),
            (None, None) => (
                m.offset as usize,
                (m.offset + m.ty.size()) as usize,
                "(anonymous)",
            ),
        };
        let target: &mut [u8] = if union {
            scratch.iter_mut().for_each(|x| *x = 0);
            &mut scratch
        } else {
            &mut *out
        };
        let given = match &m.name {
            Some(name) => {
                let Some(v) = obj.get(name) else { continue };
                let here = Path::Field(path, name);
                match m.bitfield {
                    Some(bf) => {
                        let raw = match &m.ty {
                            Type::Enum {
                                name: ename,
                                values,
                                signed,
                                ..
                            } => enum_from_json(ename, values, v, bf.bits, *signed, &here)?,
                            Type::Bool => u128::from(bool_from_json(v, &here)?),
                            Type::Int { signed, .. } | Type::Char { signed } => {
                                int_from_json(v, bf.bits, *signed, &here)?
                            }
                            _ => return err(&here, "a bitfield of a type that is not an integer"),
                        };
                        write_bits(target, bf.bit_offset, bf.bits, raw);
                    }
                    None => decode(&m.ty, v, &mut target[lo..hi], &here)?,
                }
                true
            }
            None => {
                let (Type::Struct(inner) | Type::Union(inner)) = &m.ty else {
                    continue;
                };
                let sub: Map<String, Value> = obj
                    .iter()
                    .filter(|(k, _)| owns(inner, k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if sub.is_empty() {
                    continue;
                }
                decode_composite(
                    inner,
                    matches!(m.ty, Type::Union(_)),
                    &sub,
                    &mut target[lo..hi],
                    path,
                )?;
                true
            }
        };
        if union && given {
            for i in lo..hi.min(out.len()) {
                match claimed[i] {
                    Some(other) if out[i] != scratch[i] => {
                        return err(
                            path,
                            format!(
                                "members {other} and {label} of the union disagree about byte {i}"
                            ),
                        );
                    }
                    Some(_) => {}
                    None => {
                        out[i] = scratch[i];
                        claimed[i] = Some(label);
                    }
                }
            }
        }
    }
    Ok(())
}

fn member_names(c: &Composite) -> Vec<String> {
    let mut names = Vec::new();
    for m in &c.members {
        match (&m.name, &m.ty) {
            (Some(n), _) => names.push(n.clone()),
            (None, Type::Struct(inner) | Type::Union(inner)) => names.extend(member_names(inner)),
            _ => {}
        }
    }
    names
}

fn bool_from_json(v: &Value, path: &Path<'_>) -> Result<bool, CodecError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        _ => err(path, format!("{} is not a bool (true or false)", show(v))),
    }
}

/// An integer of `bits` bits from a JSON number or a string (decimal, or
/// hex with `0x`), range-checked; the result is its two's complement in
/// the low `bits` bits.
fn int_from_json(v: &Value, bits: u32, signed: bool, path: &Path<'_>) -> Result<u128, CodecError> {
    let (neg, mag): (bool, u128) = match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                (false, u128::from(u))
            } else if let Some(i) = n.as_i64() {
                (true, u128::from(i.unsigned_abs()))
            } else {
                return err(path, format!("{} is not an integer", show(v)));
            }
        }
        Value::String(s) => match parse_int(s) {
            Some(x) => x,
            None => {
                return err(
                    path,
                    format!("{} is not an integer (decimal, or hex with 0x)", show(v)),
                );
            }
        },
        _ => return err(path, format!("{} is not an integer", show(v))),
    };
    let kind = format!("{}{bits}", if signed { "i" } else { "u" });
    let out_of_range = || {
        let (lo, hi) = if signed {
            (
                format!("-{}", 1u128 << (bits - 1)),
                ((1u128 << (bits - 1)) - 1).to_string(),
            )
        } else {
            ("0".to_owned(), (u128::MAX >> (128 - bits)).to_string())
        };
        err(
            path,
            format!("{} is out of range for {kind} ({lo} to {hi})", show(v)),
        )
    };
    let mask = u128::MAX >> (128 - bits);
    if neg && mag != 0 {
        if !signed || mag > 1u128 << (bits - 1) {
            return out_of_range();
        }
        Ok(mag.wrapping_neg() & mask)
    } else {
        let max = if signed {
            (1u128 << (bits - 1)) - 1
        } else {
            mask
        };
        if mag > max {
            return out_of_range();
        }
        Ok(mag)
    }
}

/// `123`, `-5`, `0x1f`, `-0x1f`: (negative, magnitude).
fn parse_int(s: &str) -> Option<(bool, u128)> {
    let (neg, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let mag = if let Some(hex) = rest.strip_prefix("0x").or_else(|| rest.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(hex, 16).ok()?
    } else {
        if rest.is_empty() || !rest.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()?
    };
    Some((neg, mag))
}

fn enum_from_json(
    name: &str,
    values: &[crate::types::Enumerator],
    v: &Value,
    bits: u32,
    signed: bool,
    path: &Path<'_>,
) -> Result<u128, CodecError> {
    if let Value::String(s) = v {
        if let Some(e) = values.iter().find(|e| e.name == *s) {
            return int_from_json(&Value::String(e.value.to_string()), bits, signed, path);
        }
        if parse_int(s).is_none() {
            let names: Vec<&str> = values.iter().map(|e| e.name.as_str()).collect();
            return err(
                path,
                format!(
                    "{} is not an enumerator of enum {name} ({})",
                    show(v),
                    names.join(", ")
                ),
            );
        }
    }
    int_from_json(v, bits, signed, path)
}

/// `02:00:00:00:00:01` (hex digits in either case).
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in &mut out {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}
