//! [`Type`]: a self-contained type tree built from BTF (what a map's key or
//! value is), and its printable schema (`serde::Serialize`), e.g.
//! `{"struct":"ddos_key","size":8,"members":[{"name":"prefixlen","offset":0,"type":"u32"},…]}`.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::SchemaError;
use crate::btf::{self, Types};

/// The deepest a type may nest (struct in array in struct …).
pub const MAX_DEPTH: usize = 32;
/// The most nodes one key or value type may have: a hostile BTF whose
/// structs each hold many members of the next struct would otherwise grow
/// a tree exponentially.
pub const MAX_NODES: usize = 20_000;
/// The most nodes all the maps of one object may have together.
pub const MAX_TOTAL_NODES: usize = 200_000;
/// The largest key or value, in bytes (the kernel's limit for a map value
/// is smaller still: KMALLOC_MAX_SIZE, and 512 bytes for LPM keys).
pub const MAX_SIZE: u64 = 1 << 24;

/// A key or value type, with typedefs and qualifiers resolved, except the
/// address typedefs of `<rootlet/stage.h>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    /// An integer of 1, 2, 4, 8 or 16 bytes, host (little-endian) order.
    Int {
        size: u32,
        signed: bool,
    },
    /// `_Bool`: one byte, 0 or 1.
    Bool,
    /// `char`: one byte; an array of them may be text.
    Char {
        signed: bool,
    },
    Enum {
        name: String,
        size: u32,
        signed: bool,
        values: Vec<Enumerator>,
    },
    Array {
        elem: Box<Type>,
        len: u32,
    },
    Struct(Composite),
    Union(Composite),
    /// `rootlet_ipv4_t`: 4 bytes, network order.
    Ipv4,
    /// `rootlet_ipv6_t`: 16 bytes, network order.
    Ipv6,
    /// `rootlet_mac_t`: 6 bytes.
    Mac,
    /// Bytes whose meaning JSON cannot carry (a pointer, a float, …):
    /// encoded as hex for reading, refused for writing, with `why`.
    Opaque {
        size: u32,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enumerator {
    pub name: String,
    pub value: i128,
}

/// A struct's or union's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composite {
    /// The C tag; "" for an anonymous struct or union.
    pub name: String,
    pub size: u32,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// None for an anonymous struct or union member, whose members are
    /// reached as if they were the parent's (as in C).
    pub name: Option<String>,
    /// Byte offset of the member in its parent (for a bitfield, the bit
    /// offset is `bit_offset` from the parent's start).
    pub offset: u32,
    pub bitfield: Option<Bitfield>,
    pub ty: Type,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bitfield {
    /// Bit offset from the start of the parent.
    pub bit_offset: u32,
    /// Width in bits.
    pub bits: u32,
}

impl Type {
    /// The size in bytes.
    pub fn size(&self) -> u32 {
        match self {
            Type::Int { size, .. } | Type::Enum { size, .. } | Type::Opaque { size, .. } => *size,
            Type::Bool | Type::Char { .. } => 1,
            Type::Array { elem, len } => elem.size().saturating_mul(*len),
            Type::Struct(c) | Type::Union(c) => c.size,
            Type::Ipv4 => 4,
            Type::Ipv6 => 16,
            Type::Mac => 6,
        }
    }

    /// An unsigned integer of `size` bytes if that is a C integer size,
    /// else `size` bytes (`u8[size]`): the type of a map key or value
    /// the BTF gives only a size for.
    pub fn unsigned_of_size(size: u32) -> Type {
        match size {
            1 | 2 | 4 | 8 => Type::Int {
                size,
                signed: false,
            },
            _ => Type::Array {
                elem: Box::new(Type::Int {
                    size: 1,
                    signed: false,
                }),
                len: size,
            },
        }
    }

    /// The short name of a scalar type (`u32`, `i8`, `bool`, `ipv4`, …).
    fn scalar_name(&self) -> Option<String> {
        Some(match self {
            Type::Int { size, signed } => {
                format!("{}{}", if *signed { 'i' } else { 'u' }, size * 8)
            }
            Type::Bool => "bool".into(),
            Type::Char { .. } => "char".into(),
            Type::Ipv4 => "ipv4".into(),
            Type::Ipv6 => "ipv6".into(),
            Type::Mac => "mac".into(),
            _ => return None,
        })
    }
}

/// Builds [`Type`]s from one blob, within a node budget.
pub(crate) struct Builder<'a> {
    types: &'a Types,
    nodes: usize,
    total: usize,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(types: &'a Types) -> Self {
        Builder {
            types,
            nodes: 0,
            total: 0,
        }
    }

    /// The type of BTF id `id`. Pointers, floats and functions become
    /// [`Type::Opaque`]; malformed or too deep/large BTF is an error.
    pub(crate) fn build(&mut self, id: u32) -> Result<Type, SchemaError> {
        self.nodes = 0;
        self.ty(id, 0)
    }

    fn ty(&mut self, mut id: u32, depth: usize) -> Result<Type, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError::TooComplex(format!(
                "types nest deeper than {MAX_DEPTH}"
            )));
        }
        self.nodes += 1;
        self.total += 1;
        if self.total > MAX_TOTAL_NODES {
            return Err(SchemaError::TooComplex(format!(
                "the maps' types have more than {MAX_TOTAL_NODES} parts"
            )));
        }
        if self.nodes > MAX_NODES {
            return Err(SchemaError::TooComplex(format!(
                "a key or value type has more than {MAX_NODES} parts"
            )));
        }
        let t = self.types;
        // Typedefs and qualifiers are transparent, except the address
        // typedefs (checked at every step: `typedef rootlet_ipv4_t foo_t`
        // is still an address).
        let mut steps = 0;
        let bt = loop {
            let bt = t
                .ty(id)
                .ok_or_else(|| SchemaError::Malformed(format!("type id {id} out of range")))?;
            match bt.kind {
                btf::KIND_TYPEDEF => {
                    let name = t.str_at(bt.name_off);
                    let addr = match name {
                        "rootlet_ipv4_t" => Some(Type::Ipv4),
                        "rootlet_ipv6_t" => Some(Type::Ipv6),
                        "rootlet_mac_t" => Some(Type::Mac),
                        _ => None,
                    };
                    if let Some(addr) = addr {
                        let size = self.byte_size(bt.size_or_type, depth)?;
                        if size != addr.size() {
                            return Err(SchemaError::Malformed(format!(
                                "{name} is {size} bytes, not {}",
                                addr.size()
                            )));
                        }
                        return Ok(addr);
                    }
                    id = bt.size_or_type;
                }
                btf::KIND_VOLATILE | btf::KIND_CONST | btf::KIND_RESTRICT | btf::KIND_TYPE_TAG => {
                    id = bt.size_or_type
                }
                _ => break bt,
            }
            steps += 1;
            if steps > 64 {
                return Err(SchemaError::Malformed("a typedef loop".into()));
            }
        };
        let name = t.str_at(bt.name_off).to_owned();
        Ok(match bt.kind {
            0 => {
                return Err(SchemaError::Malformed("a key or value of type void".into()));
            }
            btf::KIND_INT => {
                let enc = (bt.int_data >> 24) & 0xf;
                let bits = bt.int_data & 0xff;
                let bit_off = (bt.int_data >> 16) & 0xff;
                let size = bt.size_or_type;
                if bit_off != 0 || bits != size.saturating_mul(8) {
                    return Err(SchemaError::Malformed(format!(
                        "integer {name} of {bits} bits at offset {bit_off} in {size} bytes"
                    )));
                }
                if enc & btf::INT_BOOL != 0 {
                    if size != 1 {
                        return Err(SchemaError::Malformed(format!("bool of {size} bytes")));
                    }
                    Type::Bool
                } else if enc & btf::INT_CHAR != 0 || (size == 1 && name == "char") {
                    Type::Char {
                        signed: enc & btf::INT_SIGNED != 0,
                    }
                } else if matches!(size, 1 | 2 | 4 | 8 | 16) {
                    Type::Int {
                        size,
                        signed: enc & btf::INT_SIGNED != 0,
                    }
                } else {
                    return Err(SchemaError::Malformed(format!("integer of {size} bytes")));
                }
            }
            btf::KIND_ENUM | btf::KIND_ENUM64 => {
                let size = bt.size_or_type;
                if !matches!(size, 1 | 2 | 4 | 8) {
                    return Err(SchemaError::Malformed(format!(
                        "enum {name} of {size} bytes"
                    )));
                }
                Type::Enum {
                    name,
                    size,
                    signed: bt.kind_flag,
                    values: bt
                        .entries
                        .iter()
                        .map(|e| Enumerator {
                            name: t.str_at(e.name_off).to_owned(),
                            value: e.value,
                        })
                        .collect(),
                }
            }
            btf::KIND_ARRAY => {
                let (elem, len) = bt.array;
                let elem = self.ty(elem, depth + 1)?;
                if u64::from(elem.size()) * u64::from(len) > MAX_SIZE {
                    return Err(SchemaError::TooComplex(format!(
                        "an array larger than {MAX_SIZE} bytes"
                    )));
                }
                if elem.size() == 0 {
                    return Err(SchemaError::Malformed(
                        "an array of zero-sized elements".into(),
                    ));
                }
                Type::Array {
                    elem: Box::new(elem),
                    len,
                }
            }
            btf::KIND_STRUCT | btf::KIND_UNION => {
                let size = bt.size_or_type;
                if u64::from(size) > MAX_SIZE {
                    return Err(SchemaError::TooComplex(format!(
                        "a struct larger than {MAX_SIZE} bytes"
                    )));
                }
                let mut members = Vec::with_capacity(bt.entries.len());
                for e in &bt.entries {
                    let mname = t.str_at(e.name_off);
                    let ty = self.ty(e.ty, depth + 1)?;
                    let what = || format!("member {mname} of {name}");
                    let (offset, bitfield) = if e.bits != 0 || e.offset % 8 != 0 {
                        // A bitfield: its bits must fit the parent and its
                        // type must be an integer or enum.
                        let bits = if e.bits != 0 { e.bits } else { ty.size() * 8 };
                        if !matches!(
                            ty,
                            Type::Int { .. } | Type::Enum { .. } | Type::Bool | Type::Char { .. }
                        ) || bits > 64
                            || u64::from(e.offset) + u64::from(bits) > u64::from(size) * 8
                        {
                            return Err(SchemaError::Malformed(format!(
                                "{} is a bitfield that does not fit",
                                what()
                            )));
                        }
                        (
                            e.offset / 8,
                            Some(Bitfield {
                                bit_offset: e.offset,
                                bits,
                            }),
                        )
                    } else {
                        let offset = e.offset / 8;
                        if u64::from(offset) + u64::from(ty.size()) > u64::from(size) {
                            return Err(SchemaError::Malformed(format!(
                                "{} lies outside it",
                                what()
                            )));
                        }
                        (offset, None)
                    };
                    let anonymous = mname.is_empty();
                    if anonymous && !matches!(ty, Type::Struct(_) | Type::Union(_)) {
                        return Err(SchemaError::Malformed(format!(
                            "an unnamed member of {name} that is not a struct or union"
                        )));
                    }
                    members.push(Member {
                        name: (!anonymous).then(|| mname.to_owned()),
                        offset,
                        bitfield,
                        ty,
                    });
                }
                let c = Composite {
                    name,
                    size,
                    members,
                };
                if bt.kind == btf::KIND_STRUCT {
                    Type::Struct(c)
                } else {
                    Type::Union(c)
                }
            }
            btf::KIND_PTR => Type::Opaque {
                size: 8,
                why: "a pointer, which a map entry written from outside cannot hold".into(),
            },
            btf::KIND_FLOAT => Type::Opaque {
                size: bt.size_or_type,
                why: "a floating-point number".into(),
            },
            btf::KIND_FWD => {
                return Err(SchemaError::Malformed(format!(
                    "{name} is declared but never defined"
                )));
            }
            k => {
                return Err(SchemaError::Malformed(format!(
                    "type id {id} (BTF kind {k}) is not a data type"
                )));
            }
        })
    }

    /// The size of `id` without building it (for the address typedefs).
    fn byte_size(&mut self, id: u32, depth: usize) -> Result<u32, SchemaError> {
        Ok(self.ty(id, depth + 1)?.size())
    }
}

impl Serialize for Type {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(n) = self.scalar_name() {
            return s.serialize_str(&n);
        }
        match self {
            Type::Enum {
                name,
                size,
                signed,
                values,
            } => {
                let mut m = s.serialize_map(Some(4))?;
                m.serialize_entry("enum", name)?;
                m.serialize_entry("size", size)?;
                m.serialize_entry("signed", signed)?;
                m.serialize_entry("values", &Enumerators(values))?;
                m.end()
            }
            Type::Array { elem, len } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("array", elem)?;
                m.serialize_entry("len", len)?;
                m.end()
            }
            Type::Struct(c) | Type::Union(c) => {
                let mut m = s.serialize_map(Some(3))?;
                let tag = if matches!(self, Type::Struct(_)) {
                    "struct"
                } else {
                    "union"
                };
                m.serialize_entry(tag, &c.name)?;
                m.serialize_entry("size", &c.size)?;
                m.serialize_entry("members", &c.members)?;
                m.end()
            }
            Type::Opaque { size, why } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("opaque", size)?;
                m.serialize_entry("why", why)?;
                m.end()
            }
            _ => unreachable!("scalars are named above"),
        }
    }
}

/// Enumerators as `[{"name":"A","value":0},…]` (a value may exceed what a
/// JSON number holds exactly in other tools: i128 is written as a number
/// when it fits i64/u64, else as a string).
struct Enumerators<'a>(&'a [Enumerator]);

impl Serialize for Enumerators<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for e in self.0 {
            seq.serialize_element(&serde_json::json!({
                "name": e.name,
                "value": crate::codec::int_json(e.value),
            }))?;
        }
        seq.end()
    }
}

impl Serialize for Member {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(n) = &self.name {
            m.serialize_entry("name", n)?;
        }
        m.serialize_entry("offset", &self.offset)?;
        if let Some(b) = &self.bitfield {
            m.serialize_entry("bit_offset", &b.bit_offset)?;
            m.serialize_entry("bits", &b.bits)?;
        }
        m.serialize_entry("type", &self.ty)?;
        m.end()
    }
}
