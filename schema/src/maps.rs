//! [`Schema`]: the maps an object defines in its `.maps` section, each a
//! [`MapSchema`] (kernel parameters and key/value [`Type`]s), read from
//! BTF the way libbpf reads BTF-defined maps (`__uint`, `__type`,
//! `__array`), and [`MapSchema::compatible_with`], whether a kept map keeps
//! its meaning across a replacement.

use serde::Serialize;

use crate::SchemaError;
use crate::btf::{self, Types};
use crate::types::{Builder, Type};

/// The kernel's limit on an object name, NUL included (`BPF_OBJ_NAME_LEN`).
const BPF_OBJ_NAME_LEN: usize = 16;

pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
pub const BPF_MAP_TYPE_PERF_EVENT_ARRAY: u32 = 4;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
pub const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
pub const BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE: u32 = 21;

/// `bpf_map_type` names as bpftool prints them, by value (include/uapi/linux/bpf.h).
const MAP_TYPE_NAMES: &[&str] = &[
    "unspec",
    "hash",
    "array",
    "prog_array",
    "perf_event_array",
    "percpu_hash",
    "percpu_array",
    "stack_trace",
    "cgroup_array",
    "lru_hash",
    "lru_percpu_hash",
    "lpm_trie",
    "array_of_maps",
    "hash_of_maps",
    "devmap",
    "sockmap",
    "cpumap",
    "xskmap",
    "sockhash",
    "cgroup_storage",
    "reuseport_sockarray",
    "percpu_cgroup_storage",
    "queue",
    "stack",
    "sk_storage",
    "devmap_hash",
    "struct_ops",
    "ringbuf",
    "inode_storage",
    "task_storage",
    "bloom_filter",
    "user_ringbuf",
    "cgrp_storage",
    "arena",
];

/// A `bpf_map_type` value; serialized as `{"id":11,"name":"lpm_trie"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapType(pub u32);

impl MapType {
    /// bpftool's name for it, or "unknown".
    pub fn name(self) -> &'static str {
        MAP_TYPE_NAMES
            .get(self.0 as usize)
            .copied()
            .unwrap_or("unknown")
    }

    /// Whether a lookup returns one value per possible CPU.
    pub fn is_per_cpu(self) -> bool {
        matches!(
            self.0,
            BPF_MAP_TYPE_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_ARRAY
                | BPF_MAP_TYPE_LRU_PERCPU_HASH
                | BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE
        )
    }

    pub fn is_map_of_maps(self) -> bool {
        matches!(
            self.0,
            BPF_MAP_TYPE_ARRAY_OF_MAPS | BPF_MAP_TYPE_HASH_OF_MAPS
        )
    }
}

impl std::fmt::Display for MapType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl Serialize for MapType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_json::json!({ "id": self.0, "name": self.name() }).serialize(s)
    }
}

/// One BTF-defined map: what the kernel creates and what its entries are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapSchema {
    /// The variable's name in the object (C name). For an inner map, the
    /// outer map's name.
    pub name: String,
    /// The name the kernel keeps: the first 15 bytes.
    pub kernel_name: String,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub key: Type,
    /// For a map of maps, the inner map's id (`u32`); for a per-CPU map,
    /// one CPU's value.
    pub value: Type,
    /// A map of maps' inner definition (`__array(values, struct {...})`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner: Option<Box<MapSchema>>,
}

/// Every map an object defines in `.maps`, in BTF order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schema {
    pub maps: Vec<MapSchema>,
}

/// Why a kept map does not keep its meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("map {map}: {reason}")]
pub struct Incompatible {
    pub map: String,
    pub reason: String,
}

impl Schema {
    /// The maps of raw BTF (header, types, strings), as the kernel returns
    /// it for a program's `btf_id` or as an ELF object's `.BTF` section.
    ///
    /// # Errors
    /// [`SchemaError::Malformed`] for BTF that is not little-endian, is
    /// cut short or refers to types that do not exist, or a map definition
    /// libbpf would not accept; [`SchemaError::TooComplex`] past the bounds
    /// of [`crate::types`] (depth, parts, size). A map's error is
    /// [`SchemaError::Map`], naming it.
    pub fn from_btf(raw_btf: &[u8]) -> Result<Schema, SchemaError> {
        let types = Types::parse(raw_btf)?;
        let Some((_, datasec)) = types
            .iter()
            .find(|(_, t)| t.kind == btf::KIND_DATASEC && types.str_at(t.name_off) == ".maps")
        else {
            return Ok(Schema { maps: vec![] });
        };
        let mut b = Builder::new(&types);
        let mut maps = Vec::with_capacity(datasec.entries.len());
        for v in &datasec.entries {
            let var = types
                .ty(v.ty)
                .filter(|t| t.kind == btf::KIND_VAR)
                .ok_or_else(|| SchemaError::Malformed(".maps holds a non-variable".into()))?;
            let name = types.str_at(var.name_off).to_owned();
            let map = map_def(&types, &mut b, &name, var.size_or_type, 0).map_err(|e| {
                SchemaError::Map {
                    map: name.clone(),
                    error: Box::new(e),
                }
            })?;
            maps.push(map);
        }
        Ok(Schema { maps })
    }

    /// The maps of an ELF object's `.BTF` section.
    ///
    /// # Errors
    /// [`SchemaError::Elf`], [`SchemaError::NoBtf`], or those of
    /// [`Schema::from_btf`].
    pub fn from_elf(object: &[u8]) -> Result<Schema, SchemaError> {
        use object::{Object as _, ObjectSection as _};
        let elf = object::read::File::parse(object).map_err(|e| SchemaError::Elf(e.to_string()))?;
        let btf = elf.section_by_name(".BTF").ok_or(SchemaError::NoBtf)?;
        let data = btf.data().map_err(|e| SchemaError::Elf(e.to_string()))?;
        Schema::from_btf(data)
    }

    /// A map by its C name or by its kernel (15-byte) name.
    pub fn map(&self, name: &str) -> Option<&MapSchema> {
        self.maps
            .iter()
            .find(|m| m.name == name)
            .or_else(|| self.maps.iter().find(|m| m.kernel_name == name))
    }
}

/// The kernel's name for a map called `name` in C.
pub fn kernel_name(name: &str) -> String {
    let mut end = name.len().min(BPF_OBJ_NAME_LEN - 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Reads one map definition struct (`struct { __uint(type, …); … }`).
fn map_def(
    types: &Types,
    b: &mut Builder<'_>,
    name: &str,
    def: u32,
    depth: u32,
) -> Result<MapSchema, SchemaError> {
    let bad = |what: String| SchemaError::Malformed(what);
    let (_, st) = types
        .skip_modifiers(def)
        .filter(|(_, t)| t.kind == btf::KIND_STRUCT)
        .ok_or_else(|| bad("its definition is not a struct".into()))?;
    let mut map_type = None;
    let (mut key_size, mut value_size, mut max_entries, mut map_flags) = (None, None, 0, 0);
    let (mut key, mut value, mut inner) = (None, None, None);
    for m in &st.entries {
        let field = types.str_at(m.name_off);
        // `__uint(name, val)` is `int (*name)[val]`.
        let uint = || -> Result<u32, SchemaError> {
            types
                .skip_modifiers(m.ty)
                .filter(|(_, t)| t.kind == btf::KIND_PTR)
                .and_then(|(_, p)| types.skip_modifiers(p.size_or_type))
                .filter(|(_, a)| a.kind == btf::KIND_ARRAY)
                .map(|(_, a)| a.array.1)
                .ok_or_else(|| bad(format!("{field} is not __uint(...)")))
        };
        // `__type(name, val)` is `typeof(val) *name`.
        let pointee = || -> Result<u32, SchemaError> {
            types
                .skip_modifiers(m.ty)
                .filter(|(_, t)| t.kind == btf::KIND_PTR)
                .map(|(_, p)| p.size_or_type)
                .ok_or_else(|| bad(format!("{field} is not __type(...)")))
        };
        match field {
            "type" => map_type = Some(uint()?),
            "max_entries" => max_entries = uint()?,
            "map_flags" => map_flags = uint()?,
            "key_size" => key_size = Some(uint()?),
            "value_size" => value_size = Some(uint()?),
            "key" => key = Some(b.build(pointee()?)?),
            "value" => value = Some(b.build(pointee()?)?),
            // `__array(values, struct {...})` is `typeof(struct {...}) *values[]`:
            // a map of maps' inner definition (a prog array's is a
            // function, which is no map).
            "values" => {
                let inner_def = types
                    .skip_modifiers(m.ty)
                    .filter(|(_, t)| t.kind == btf::KIND_ARRAY)
                    .and_then(|(_, a)| types.skip_modifiers(a.array.0))
                    .filter(|(_, t)| t.kind == btf::KIND_PTR)
                    .and_then(|(_, p)| types.skip_modifiers(p.size_or_type))
                    .filter(|(_, t)| t.kind == btf::KIND_STRUCT);
                if let Some((id, _)) = inner_def {
                    if depth > 0 {
                        return Err(bad("a map of maps inside a map of maps".into()));
                    }
                    inner = Some(Box::new(map_def(types, b, name, id, depth + 1)?));
                }
            }
            // pinning, numa_node, map_extra: nothing a schema shows.
            _ => {}
        }
    }
    let map_type = MapType(map_type.ok_or_else(|| bad("no map type".into()))?);
    let key = match (key, key_size) {
        (Some(k), Some(s)) if k.size() != s => {
            return Err(bad(format!("key type of {} bytes, key_size {s}", k.size())));
        }
        (Some(k), _) => k,
        (None, Some(s)) => Type::unsigned_of_size(s),
        (None, None) => Type::unsigned_of_size(0),
    };
    let value = match (value, value_size) {
        (Some(v), Some(s)) if v.size() != s => {
            return Err(bad(format!(
                "value type of {} bytes, value_size {s}",
                v.size()
            )));
        }
        (Some(v), _) => v,
        (None, Some(s)) => Type::unsigned_of_size(s),
        // A map of maps or a prog array holds ids (fds on update).
        (None, None)
            if inner.is_some()
                || map_type.is_map_of_maps()
                || map_type.0 == BPF_MAP_TYPE_PROG_ARRAY =>
        {
            Type::unsigned_of_size(4)
        }
        (None, None) => Type::unsigned_of_size(0),
    };
    Ok(MapSchema {
        name: name.to_owned(),
        kernel_name: kernel_name(name),
        map_type,
        key_size: key.size(),
        value_size: value.size(),
        max_entries,
        map_flags,
        key,
        value,
        inner,
    })
}

impl MapSchema {
    /// A policy map: an ARRAY_OF_MAPS with one entry and a 4-byte key,
    /// whose entry 0 holds the live inner map (`ROOTLET_POLICY_MAP`).
    pub fn is_policy_map(&self) -> bool {
        self.map_type.0 == BPF_MAP_TYPE_ARRAY_OF_MAPS && self.max_entries == 1 && self.key_size == 4
    }

    /// The schema a policy's entries for this map follow: the inner map's
    /// for a policy map, this map's for a map that holds data. None for a
    /// map whose values are kernel objects (a map of maps other than a
    /// policy map with an inner definition, a prog or perf event array):
    /// a policy cannot name those.
    pub fn entries(&self) -> Option<&MapSchema> {
        match &self.inner {
            Some(inner) if self.is_policy_map() => Some(inner),
            _ if self.map_type.is_map_of_maps() => None,
            _ if matches!(
                self.map_type.0,
                BPF_MAP_TYPE_PROG_ARRAY | BPF_MAP_TYPE_PERF_EVENT_ARRAY
            ) =>
            {
                None
            }
            _ => Some(self),
        }
    }

    /// Whether a map kept across a replacement (`maps = "keep"`) means the
    /// same to the new object as to the old: the same map type, key and
    /// value sizes, max entries and flags, and the same key and value
    /// types, member names and enumerators included (a renamed member or
    /// enumerator is a change of meaning); the C tags of structs, unions
    /// and enums are not compared (renaming `struct foo` changes no byte).
    /// For a map of maps, the inner definitions compare the same way.
    ///
    /// # Errors
    /// [`Incompatible`] naming the first difference, with the field path
    /// for a type (`key.addr: member addr at byte 4 became saddr at byte 4`).
    pub fn compatible_with(&self, other: &MapSchema) -> Result<(), Incompatible> {
        let no = |reason: String| Incompatible {
            map: self.name.clone(),
            reason,
        };
        let (a, b) = (self, other);
        if a.map_type != b.map_type {
            return Err(no(format!("map type {} became {}", a.map_type, b.map_type)));
        }
        for (what, x, y) in [
            ("key size", a.key_size, b.key_size),
            ("value size", a.value_size, b.value_size),
            ("max entries", a.max_entries, b.max_entries),
            ("map flags", a.map_flags, b.map_flags),
        ] {
            if x != y {
                return Err(no(format!("{what} {x} became {y}")));
            }
        }
        same_type(&a.key, &b.key, "key").map_err(&no)?;
        same_type(&a.value, &b.value, "value").map_err(&no)?;
        match (&a.inner, &b.inner) {
            (None, None) => Ok(()),
            (Some(x), Some(y)) => x.compatible_with(y).map_err(|e| Incompatible {
                map: self.name.clone(),
                reason: format!("inner map: {}", e.reason),
            }),
            _ => Err(no("the inner map definition was added or removed".into())),
        }
    }
}

/// `Ok` if `a` and `b` have the same layout, member names and
/// enumerators; else what differs first, at `path`.
fn same_type(a: &Type, b: &Type, path: &str) -> Result<(), String> {
    let differ = || {
        Err(format!(
            "{path}: {} became {}",
            serde_json::to_string(a).unwrap_or_default(),
            serde_json::to_string(b).unwrap_or_default()
        ))
    };
    match (a, b) {
        (
            Type::Enum {
                size: s1,
                signed: g1,
                values: v1,
                ..
            },
            Type::Enum {
                size: s2,
                signed: g2,
                values: v2,
                ..
            },
        ) => {
            if s1 != s2 || g1 != g2 || v1 != v2 {
                return differ();
            }
            Ok(())
        }
        (Type::Array { elem: e1, len: l1 }, Type::Array { elem: e2, len: l2 }) => {
            if l1 != l2 {
                return differ();
            }
            same_type(e1, e2, &format!("{path}[]"))
        }
        (Type::Struct(c1), Type::Struct(c2)) | (Type::Union(c1), Type::Union(c2)) => {
            if c1.size != c2.size || c1.members.len() != c2.members.len() {
                return differ();
            }
            for (m1, m2) in c1.members.iter().zip(&c2.members) {
                let here = format!("{path}.{}", m1.name.as_deref().unwrap_or("(anonymous)"));
                if m1.name != m2.name || m1.offset != m2.offset || m1.bitfield != m2.bitfield {
                    return Err(format!(
                        "{here}: member {} at byte {} became {} at byte {}",
                        m1.name.as_deref().unwrap_or("(anonymous)"),
                        m1.offset,
                        m2.name.as_deref().unwrap_or("(anonymous)"),
                        m2.offset
                    ));
                }
                same_type(&m1.ty, &m2.ty, &here)?;
            }
            Ok(())
        }
        (Type::Opaque { size: s1, .. }, Type::Opaque { size: s2, .. }) if s1 == s2 => Ok(()),
        _ if a == b => Ok(()),
        _ => differ(),
    }
}
