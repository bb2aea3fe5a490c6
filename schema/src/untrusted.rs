//! aya-obj on outside input, with its panics turned into refusals.
//!
//! aya-obj 0.3 assumes well-formed input in places. Found by the property
//! tests in `dataplane/tests/object_properties.rs`: a symbol outside its
//! section makes `Object::parse` subtract with overflow or slice out of
//! range; a string offset past the string section makes
//! `Btf::id_by_type_name_kind` slice out of range (its bound is the header's
//! `str_off + str_len`, not the strings it holds); BTF.ext with a bad record
//! makes it unwrap. Rather than re-validate every field aya-obj reads (and
//! miss the next one), every call into aya-obj on bytes that came from
//! outside goes through [`catching`]: a panic becomes the input's refusal.
//! The calls have no side effect, so nothing is left half done.
//!
//! What this cannot catch is a failed allocation, which aborts: callers
//! bound what aya-obj allocates from sizes the input only declares (see
//! the data plane's `object::parse`).

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `f`, aya-obj work on outside input; a panic in it is returned as
/// its message.
///
/// `AssertUnwindSafe`: `f` only reads the input and builds values it owns;
/// on a panic those are dropped and nothing that outlives the call is seen
/// half-updated.
pub fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned())
    })
}

/// aya-obj's validation of a little-endian BTF blob.
pub fn validate_btf(b: &[u8]) -> Result<(), crate::SchemaError> {
    match catching(|| aya_obj::btf::Btf::parse(b, object::Endianness::Little)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(crate::SchemaError::Malformed(e.to_string())),
        Err(why) => Err(crate::SchemaError::Malformed(format!("aya-obj: {why}"))),
    }
}
