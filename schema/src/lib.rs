//! The types of a stage's maps, read from its BTF, and the JSON form of
//! their entries.
//!
//! # Layout
//! - `btf`: the BTF type section read back (aya-obj validates it first;
//!   see the module for why the reading is hand-written).
//! - [`types`]: [`Type`], a self-contained type tree, and its printable
//!   schema (what the API returns as a map's key and value types).
//! - [`maps`]: [`Schema`] and [`MapSchema`], the maps of an object's
//!   `.maps` section, and [`MapSchema::compatible_with`].
//! - [`codec`]: JSON to bytes and back ([`MapSchema::decode_key`] …), with
//!   [`CodecError`] naming the field path.
//! - [`untrusted`]: every aya-obj call on outside input, with its panics
//!   caught (the data plane's object and BTF checks use it too).
//!
//! This crate touches no kernel: the data plane and the agent give it the
//! BTF they read (a program's `btf_id`), and `rootletctl` an object file.
#![forbid(unsafe_code)]

mod btf;
pub mod codec;
pub mod maps;
pub mod types;
pub mod untrusted;

pub use codec::CodecError;
pub use maps::{Incompatible, MapSchema, MapType, Schema};
pub use types::Type;

/// Why no schema could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("BTF is truncated or malformed: {0}")]
    Malformed(String),
    #[error("BTF is too complex: {0}")]
    TooComplex(String),
    #[error("not an ELF object: {0}")]
    Elf(String),
    #[error("the object has no .BTF section")]
    NoBtf,
    #[error("map {map}: {error}")]
    Map {
        map: String,
        error: Box<SchemaError>,
    },
}
