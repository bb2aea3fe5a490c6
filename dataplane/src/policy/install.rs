//! The inner maps a stage's policy maps start with: when a stage is
//! loaded, before any packet can reach it, every policy map whose entry 0
//! is empty gets an empty inner map made from the object's inner
//! definition (a map kept with `maps = "keep"`, and the other parity's
//! instance of a tail-call stage, already hold one and keep it). So a live
//! inner map always exists, and its `bpf_map_info` gives the parameters of
//! the next one ([`super::build_inner`]).

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use crate::{
    error::{Error, Result},
    object::{self, CheckError, MapDef},
    sys::{self, MapInfo},
};

/// An inner map definition, with its key and value type ids in the
/// object's BTF (which aya loads with the same ids).
struct InnerDef {
    def: MapDef,
    btf_types: Option<(u32, u32)>,
}

/// The inner map definitions of `object`'s maps of maps, by the kernel's
/// (15-character) name of the outer map.
fn inner_defs(object: &[u8]) -> std::result::Result<BTreeMap<String, InnerDef>, CheckError> {
    let obj = crate::object::parse(object)?;
    Ok(obj
        .maps
        .iter()
        .filter_map(|(name, m)| {
            let inner = m.inner()?;
            let btf_types = match &inner {
                aya_obj::Map::Btf(b) => Some((b.def.btf_key_type_id, b.def.btf_value_type_id)),
                aya_obj::Map::Legacy(_) => None,
            };
            Some((
                object::truncate(name).to_owned(),
                InnerDef {
                    def: MapDef {
                        name: name.clone(),
                        map_type: inner.map_type(),
                        key_size: inner.key_size(),
                        value_size: inner.value_size(),
                        max_entries: inner.max_entries(),
                        map_flags: inner.map_flags(),
                    },
                    btf_types,
                },
            ))
        })
        .collect())
}

/// Gives every policy map of `prog` (a stage program of `object`, just
/// loaded, not yet reachable by a packet) whose entry 0 is empty an empty
/// inner map.
pub(crate) fn install_empty(prog: BorrowedFd<'_>, object: &[u8], stage: &str) -> Result<()> {
    let check = |source| Error::Check {
        stage: stage.to_owned(),
        source,
    };
    let defs = inner_defs(object).map_err(check)?;
    // The object's BTF as aya loaded it, for the program and the inner
    // map template alike: the empty inner map is typed like the template.
    let prog_btf = match sys::prog_info(prog)?.btf_id {
        0 => None,
        id => Some(sys::btf_by_id(id)?),
    };
    for (name, fd) in crate::prog_maps(prog)? {
        if !object::is_stage_map(&name) {
            continue;
        }
        let info = sys::map_info(fd.as_fd())?;
        if !super::is_policy(&info) {
            continue;
        }
        let mut id = [0u8; 4];
        if sys::map_lookup(fd.as_fd(), &0u32.to_ne_bytes(), &mut id)? {
            continue;
        }
        let InnerDef { def, btf_types } = defs.get(&name).ok_or_else(|| Error::Load {
            what: format!("stage `{stage}`"),
            message: format!("policy map `{name}` has no inner map definition in the object"),
        })?;
        let btf = match (&prog_btf, btf_types) {
            (Some(fd), Some((k, v))) if *v != 0 => Some((fd.as_fd(), *k, *v)),
            _ => None,
        };
        let inner = sys::map_create_with_flags(
            def.map_type,
            def.key_size,
            def.value_size,
            def.max_entries,
            def.map_flags,
            &name,
            btf,
        )?;
        let inner_fd = inner.as_raw_fd() as u32;
        sys::map_update(fd.as_fd(), &0u32.to_ne_bytes(), &inner_fd.to_ne_bytes())?;
    }
    Ok(())
}

/// For `maps = "keep"`: each policy map of the new object must describe the
/// same inner map as the running one's live inner map (`running`: the
/// running stage's maps by kernel name), else the new program would be
/// verified against one layout and run on another. A policy map whose
/// entry 0 is empty has nothing to keep.
pub(crate) fn check_keep_inner(
    stage: &str,
    object: &[u8],
    running: &BTreeMap<String, std::os::fd::OwnedFd>,
) -> Result<()> {
    let check = |source| Error::Check {
        stage: stage.to_owned(),
        source,
    };
    let defs = inner_defs(object).map_err(check)?;
    for (name, InnerDef { def, .. }) in defs {
        let Some(fd) = running.get(&name) else {
            continue;
        };
        let info = sys::map_info(fd.as_fd())?;
        if !super::is_policy(&info) {
            continue;
        }
        let Some((_, live)) = super::live_inner(&name, fd.as_fd())? else {
            continue;
        };
        def.check_same(&live.info).map_err(check)?;
    }
    Ok(())
}

/// For `maps = "keep"`: every map both the running program (`running`,
/// its BTF read from the kernel) and the new object define must mean the
/// same (`rootlet_schema::MapSchema::compatible_with`: types, member
/// names, enumerators; a policy map's inner definition too), beyond the
/// sizes [`check_keep_inner`] and `StageObject::check_keep` compare. A
/// running program without BTF has no types to compare.
pub(crate) fn check_keep_types(stage: &str, object: &[u8], running: BorrowedFd<'_>) -> Result<()> {
    let Some((_, btf)) = sys::prog_btf(running)? else {
        return Ok(());
    };
    let check = |source| Error::Check {
        stage: stage.to_owned(),
        source,
    };
    let old = rootlet_schema::Schema::from_btf(&btf)
        .map_err(|e| check(CheckError::Elf(format!("the running program's BTF: {e}"))))?;
    let new = rootlet_schema::Schema::from_elf(object)
        .map_err(|e| check(CheckError::Elf(format!("its BTF: {e}"))))?;
    for m in &new.maps {
        if !object::is_stage_map(&m.kernel_name) {
            continue;
        }
        let Some(o) = old.map(&m.name) else { continue };
        o.compatible_with(m).map_err(|e| {
            check(CheckError::MapTypeChanged {
                name: m.name.clone(),
                reason: e.reason,
            })
        })?;
    }
    Ok(())
}

impl MapDef {
    /// The inner definition `self` against a live inner map: the same
    /// parameters, or `IncompatibleMap` naming the policy map.
    fn check_same(&self, live: &MapInfo) -> std::result::Result<(), CheckError> {
        let as_info = MapInfo {
            id: 0,
            map_type: self.map_type,
            name: object::truncate(&self.name).to_owned(),
            key_size: self.key_size,
            value_size: self.value_size,
            max_entries: self.max_entries,
            map_flags: self.map_flags,
        };
        let fields = object::differing_fields(live, self);
        if fields.is_empty() {
            return Ok(());
        }
        Err(CheckError::IncompatibleMap {
            name: format!("{} (its inner map)", self.name),
            fields,
            old: object::describe_info(live),
            new: object::describe_info(&as_info),
        })
    }
}
