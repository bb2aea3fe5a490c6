//! A BTF blob read back type by type, after aya-obj has accepted it.
//!
//! Why this is hand-written: aya-obj 0.3 parses and validates BTF
//! (`aya_obj::btf::Btf::parse`, which [`Types::parse`] calls first, through
//! `untrusted::validate_btf`), but it
//! gives no way to read a type back: `type_by_id`, `types()`, `string_at`
//! and `type_name` are `pub(crate)`, and so are the fields of `Struct`,
//! `Array`, `Int`, `Enum`, `Var`, `DataSec` and the other `BtfType`
//! variants (aya-obj 0.6 is the same). A schema must follow a map's
//! definition to its key and value types and read every member, so this
//! module reads the type section itself. The data plane's `btf.rs` does the
//! same for its signature check, for the same reason.

use crate::SchemaError;

const BTF_MAGIC: u16 = 0xeb9f;

pub(crate) const KIND_INT: u32 = 1;
pub(crate) const KIND_PTR: u32 = 2;
pub(crate) const KIND_ARRAY: u32 = 3;
pub(crate) const KIND_STRUCT: u32 = 4;
pub(crate) const KIND_UNION: u32 = 5;
pub(crate) const KIND_ENUM: u32 = 6;
pub(crate) const KIND_FWD: u32 = 7;
pub(crate) const KIND_TYPEDEF: u32 = 8;
pub(crate) const KIND_VOLATILE: u32 = 9;
pub(crate) const KIND_CONST: u32 = 10;
pub(crate) const KIND_RESTRICT: u32 = 11;
pub(crate) const KIND_FUNC: u32 = 12;
pub(crate) const KIND_FUNC_PROTO: u32 = 13;
pub(crate) const KIND_VAR: u32 = 14;
pub(crate) const KIND_DATASEC: u32 = 15;
pub(crate) const KIND_FLOAT: u32 = 16;
pub(crate) const KIND_DECL_TAG: u32 = 17;
pub(crate) const KIND_TYPE_TAG: u32 = 18;
pub(crate) const KIND_ENUM64: u32 = 19;

/// `BTF_INT_SIGNED`, `BTF_INT_CHAR`, `BTF_INT_BOOL`.
pub(crate) const INT_SIGNED: u32 = 1;
pub(crate) const INT_CHAR: u32 = 2;
pub(crate) const INT_BOOL: u32 = 4;

/// One entry of a STRUCT/UNION (name, type, bit offset, bitfield size),
/// ENUM/ENUM64 (name, value), DATASEC (var type, offset, size) or
/// FUNC_PROTO (name, type).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub name_off: u32,
    pub ty: u32,
    /// STRUCT/UNION: bit offset; DATASEC: byte offset.
    pub offset: u32,
    /// STRUCT/UNION: bitfield size in bits (0 = not a bitfield);
    /// DATASEC: size.
    pub bits: u32,
    /// ENUM/ENUM64: the value, sign-extended for a signed enum.
    pub value: i128,
}

#[derive(Debug, Clone)]
pub(crate) struct BtfType {
    pub name_off: u32,
    pub kind: u32,
    pub kind_flag: bool,
    /// size, or the referenced type id, depending on kind
    pub size_or_type: u32,
    /// INT: encoding, offset, bits (the extra u32).
    pub int_data: u32,
    /// ARRAY: (element type, number of elements).
    pub array: (u32, u32),
    pub entries: Vec<Entry>,
}

/// The type section: types by id (id 0 is void) and the string section.
#[derive(Debug)]
pub(crate) struct Types {
    types: Vec<BtfType>,
    strings: Vec<u8>,
}

fn malformed(what: &str) -> SchemaError {
    SchemaError::Malformed(what.to_owned())
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, SchemaError> {
    off.checked_add(4)
        .and_then(|end| b.get(off..end))
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| malformed("read past the end of the type section"))
}

impl Types {
    /// Reads a little-endian BTF blob: header, types, strings.
    pub(crate) fn parse(b: &[u8]) -> Result<Self, SchemaError> {
        let magic = b
            .get(0..2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
            .ok_or_else(|| malformed("no header"))?;
        if magic != BTF_MAGIC {
            return Err(malformed("bad magic (not little-endian BTF)"));
        }
        crate::untrusted::validate_btf(b)?;

        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let section = |off: usize, len: usize| {
            hdr_len
                .checked_add(off)
                .and_then(|start| Some((start, start.checked_add(len)?)))
                .and_then(|(start, end)| b.get(start..end))
        };
        let tb =
            section(type_off, type_len).ok_or_else(|| malformed("type section out of bounds"))?;
        let strings = section(str_off, str_len)
            .ok_or_else(|| malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![BtfType {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            int_data: 0,
            array: (0, 0),
            entries: vec![],
        }];
        let mut off = 0;
        while off < tb.len() {
            let name_off = u32_at(tb, off)?;
            let info = u32_at(tb, off + 4)?;
            let size_or_type = u32_at(tb, off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as usize;
            let mut t = BtfType {
                name_off,
                kind,
                kind_flag,
                size_or_type,
                int_data: 0,
                array: (0, 0),
                entries: Vec::new(),
            };
            let entry = |name_off, ty, offset, bits, value| Entry {
                name_off,
                ty,
                offset,
                bits,
                value,
            };
            match kind {
                KIND_INT => {
                    t.int_data = u32_at(tb, off)?;
                    off += 4;
                }
                KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => {
                    t.array = (u32_at(tb, off)?, u32_at(tb, off + 8)?);
                    off += 12;
                }
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let (n, ty, o) =
                            (u32_at(tb, off)?, u32_at(tb, off + 4)?, u32_at(tb, off + 8)?);
                        let (offset, bits) = if kind_flag {
                            (o & 0xff_ffff, o >> 24)
                        } else {
                            (o, 0)
                        };
                        t.entries.push(entry(n, ty, offset, bits, 0));
                        off += 12;
                    }
                }
                KIND_DATASEC => {
                    for _ in 0..vlen {
                        let (ty, o, s) =
                            (u32_at(tb, off)?, u32_at(tb, off + 4)?, u32_at(tb, off + 8)?);
                        t.entries.push(entry(0, ty, o, s, 0));
                        off += 12;
                    }
                }
                KIND_ENUM => {
                    for _ in 0..vlen {
                        let (n, v) = (u32_at(tb, off)?, u32_at(tb, off + 4)?);
                        let value = if kind_flag {
                            i128::from(v as i32)
                        } else {
                            i128::from(v)
                        };
                        t.entries.push(entry(n, 0, 0, 0, value));
                        off += 8;
                    }
                }
                KIND_ENUM64 => {
                    for _ in 0..vlen {
                        let n = u32_at(tb, off)?;
                        let v = u64::from(u32_at(tb, off + 4)?)
                            | (u64::from(u32_at(tb, off + 8)?) << 32);
                        let value = if kind_flag {
                            i128::from(v as i64)
                        } else {
                            i128::from(v)
                        };
                        t.entries.push(entry(n, 0, 0, 0, value));
                        off += 12;
                    }
                }
                KIND_FUNC_PROTO => {
                    for _ in 0..vlen {
                        let (n, ty) = (u32_at(tb, off)?, u32_at(tb, off + 4)?);
                        t.entries.push(entry(n, ty, 0, 0, 0));
                        off += 8;
                    }
                }
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => {}
                _ => return Err(malformed(&format!("unknown BTF kind {kind}"))),
            }
            types.push(t);
        }
        Ok(Types { types, strings })
    }

    /// The string at `off`; "" past the end or if not UTF-8 (names are
    /// C identifiers; a hostile blob gets no panic).
    pub(crate) fn str_at(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    pub(crate) fn ty(&self, id: u32) -> Option<&BtfType> {
        self.types.get(id as usize)
    }

    /// Every type with its id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &BtfType)> {
        self.types.iter().enumerate().map(|(i, t)| (i as u32, t))
    }

    /// Follows typedefs and qualifiers (bounded: a typedef loop in a
    /// hostile blob ends as None).
    pub(crate) fn skip_modifiers(&self, mut id: u32) -> Option<(u32, &BtfType)> {
        for _ in 0..64 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some((id, t)),
            }
        }
        None
    }
}
