//! The contents of a linked stage's maps, as the kernel holds them: list a
//! stage's maps, count and dump their entries, replace a policy map's
//! contents atomically, and write a plain map entry by entry with an undo.
//!
//! A **policy map** is a stage map of type `BPF_MAP_TYPE_ARRAY_OF_MAPS` with
//! one entry and a 4-byte key (`ROOTLET_POLICY_MAP` in `<rootlet/stage.h>`):
//! entry 0 holds the live inner map. Its contents change in two steps, so
//! that a caller can record what it is doing in between (crash
//! consistency): [`build_inner`] makes and fills a new inner map beside the
//! live one (nothing the data path sees changes), and [`swap`] is the one
//! update of entry 0 that makes it live. A packet is judged by the old
//! inner map or by the new one, never by a mix. Every other map is a
//! **plain map**: [`apply_plain`] writes it entry by entry, which is not
//! atomic (a packet may see part of the change), and undoes what it wrote
//! when an entry fails.
//!
//! Every operation holds the rootlet's lock, the one a stage change holds,
//! so a policy change never interleaves with a stage change of the same
//! rootlet; the writes ([`swap`], [`apply_plain`], [`PlainApplied::undo`])
//! also check, under it, that the stage still uses the map.
//!
//! # Layout
//! - this file: [`MapHandle`], [`Dataplane::stage_maps`], [`count`],
//!   [`dump`], [`build_inner`], [`swap`].
//! - [`plain`]: [`apply_plain`], [`plan_plain`] and the undo
//!   ([`PlainApplied`]).
//! - [`install`]: the empty inner map every policy map gets when its stage
//!   is loaded, and the inner definitions the `maps = "keep"` check
//!   compares.

mod install;
mod plain;

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
};

pub(crate) use install::{check_keep_inner, check_keep_types, install_empty};
pub use plain::{PlainApplied, PlainOp, apply_plain, plan_plain};

use crate::{
    Dataplane, Rootlet,
    error::{Entry, Error, PolicyError, Result},
    spec::{self, RootletKey},
    state::StageMap,
    sys::{self, MapInfo},
};

/// Map types whose value is one per possible CPU.
const PERCPU_TYPES: &[u32] = &[5, 6, 10, 21];
/// `BPF_MAP_TYPE_ARRAY_OF_MAPS`.
const ARRAY_OF_MAPS: u32 = 12;
/// ENOTSUPP: the kernel's "operation not supported" for map commands
/// (not EOPNOTSUPP).
const ENOTSUPP: i32 = 524;

/// A map of a linked stage, as [`Dataplane::stage_maps`] found it.
pub struct MapHandle {
    /// The kernel's name (at most 15 characters).
    pub name: String,
    pub id: u32,
    pub fd: OwnedFd,
    /// The map itself (for a policy map, the outer array of maps).
    pub info: MapInfo,
    /// For a policy map: the inner map live when the handle was made, or
    /// None when entry 0 was empty. [`count`] and [`dump`] read the one
    /// live when they run.
    pub inner: Option<InnerInfo>,
    /// The stage program's raw BTF, as the kernel holds it (from the
    /// program's `btf_id`; empty if it has none): the key and value types
    /// of every map of the stage, for `rootlet_schema`.
    pub btf: Arc<Vec<u8>>,
    /// The stage the map belongs to.
    pub stage: String,
    slot: u32,
    rootlet: Arc<Mutex<Rootlet>>,
}

impl std::fmt::Debug for MapHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapHandle")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("info", &self.info)
            .field("inner", &self.inner)
            .field("stage", &self.stage)
            .finish_non_exhaustive()
    }
}

/// The live inner map of a policy map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerInfo {
    pub id: u32,
    pub info: MapInfo,
}

/// A filled inner map, not yet live ([`build_inner`]). Dropping it before
/// [`swap`] frees it; after, the outer map holds it.
#[derive(Debug)]
pub struct Inner {
    pub fd: OwnedFd,
    pub id: u32,
    /// Filled with one `BPF_MAP_UPDATE_BATCH` (false: element by element,
    /// the map type has no batch operations on this kernel).
    pub batched: bool,
}

/// What [`swap`] replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapOutcome {
    /// The inner map that was live before (None: entry 0 was empty).
    pub old_inner_id: Option<u32>,
}

impl MapHandle {
    /// Whether this is a policy map (see the module's documentation).
    pub fn is_policy(&self) -> bool {
        is_policy(&self.info)
    }

    fn lock(&self) -> MutexGuard<'_, Rootlet> {
        crate::lock(&self.rootlet)
    }

    /// Under the lock: the stage still runs a program that uses this map.
    fn check_live(&self, r: &Rootlet) -> Result<()> {
        let stale = || PolicyError::Stale {
            stage: self.stage.clone(),
            map: self.name.clone(),
            id: self.id,
        };
        let same_stage = r
            .record
            .committed
            .pipeline
            .by_name(&self.stage)
            .is_some_and(|s| s.slot == self.slot);
        let prog = r.live.as_ref().and_then(|l| l.stage_prog(self.slot));
        match prog {
            Some(p) if same_stage && sys::prog_info(p)?.map_ids.contains(&self.id) => Ok(()),
            _ => Err(stale().into()),
        }
    }

    /// The map whose entries are the contents: the live inner map of a
    /// policy map (None if entry 0 is empty), else the map itself.
    fn contents(&self) -> Result<Option<(OwnedFd, MapInfo)>> {
        if !self.is_policy() {
            return Ok(Some((sys::dup(self.fd.as_fd())?, self.info.clone())));
        }
        Ok(live_inner(&self.name, self.fd.as_fd())?.map(|(fd, i)| (fd, i.info)))
    }
}

/// Whether `info` is a policy map's: an array of maps with one entry and a
/// 4-byte key.
pub fn is_policy(info: &MapInfo) -> bool {
    info.map_type == ARRAY_OF_MAPS && info.max_entries == 1 && info.key_size == 4
}

/// The number of bytes of one value as the kernel reads and writes it from
/// user space: per-CPU maps take one value per possible CPU, each rounded
/// up to 8 bytes, concatenated.
pub fn value_len(info: &MapInfo) -> Result<usize> {
    let size = info.value_size as usize;
    if !PERCPU_TYPES.contains(&info.map_type) {
        return Ok(size);
    }
    let cpus =
        aya::util::nr_cpus().map_err(|(what, source)| sys::SysError { call: what, source })?;
    Ok(size.div_ceil(8) * 8 * cpus)
}

/// Entry 0 of policy map `outer`: the live inner map, or None.
fn live_inner(name: &str, outer: BorrowedFd<'_>) -> Result<Option<(OwnedFd, InnerInfo)>> {
    let read = |source| PolicyError::Read {
        map: name.to_owned(),
        source,
    };
    let mut id = [0u8; 4];
    if !sys::map_lookup(outer, &0u32.to_ne_bytes(), &mut id).map_err(read)? {
        return Ok(None);
    }
    let id = u32::from_ne_bytes(id);
    let fd = sys::map_fd_by_id(id).map_err(read)?;
    let info = sys::map_info(fd.as_fd()).map_err(read)?;
    Ok(Some((fd, InnerInfo { id, info })))
}

impl Dataplane {
    /// Every map of stage `stage` of rootlet `key` (the stage's own maps,
    /// as [`StageMap::of`] lists them: not Rootlet's, not global data), in
    /// name order, each with its kernel info, its live inner map if it is
    /// a policy map, and the program's BTF.
    ///
    /// # Errors
    /// No such rootlet or stage; the stage's program is no longer loaded;
    /// a bpf(2) call fails.
    pub fn stage_maps(&self, key: RootletKey, stage: &str) -> Result<Vec<MapHandle>> {
        let rootlet = self.get(key)?;
        let r = crate::lock(&rootlet);
        let slot = r
            .record
            .committed
            .pipeline
            .by_name(stage)
            .ok_or_else(|| Error::Plan(spec::PlanError::NotLinked(stage.into())))?
            .slot;
        let prog = r
            .live
            .as_ref()
            .and_then(|l| l.stage_prog(slot))
            .ok_or_else(|| Error::Load {
                what: format!("stage `{stage}`"),
                message: "its program is no longer loaded".into(),
            })?;
        let btf = Arc::new(sys::prog_btf(prog)?.map(|(_, b)| b).unwrap_or_default());
        let mut maps = vec![];
        for m in StageMap::of(prog)? {
            let fd = sys::map_fd_by_id(m.id)?;
            let info = sys::map_info(fd.as_fd())?;
            let inner = if is_policy(&info) {
                live_inner(&m.name, fd.as_fd())?.map(|(_, i)| i)
            } else {
                None
            };
            maps.push(MapHandle {
                name: m.name,
                id: m.id,
                fd,
                info,
                inner,
                btf: Arc::clone(&btf),
                stage: stage.to_owned(),
                slot,
                rootlet: Arc::clone(&rootlet),
            });
        }
        Ok(maps)
    }

    /// The map `map` of stage `stage`: [`Dataplane::stage_maps`] by name (the
    /// object's C name, or the kernel's 15-character one).
    ///
    /// # Errors
    /// As [`Dataplane::stage_maps`], and [`PolicyError::NoMap`].
    pub fn stage_map_handle(&self, key: RootletKey, stage: &str, map: &str) -> Result<MapHandle> {
        let name = crate::object::truncate(map);
        self.stage_maps(key, stage)?
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                PolicyError::NoMap {
                    stage: stage.into(),
                    map: map.into(),
                }
                .into()
            })
    }
}

/// The number of entries in `map` (a policy map: in its live inner map, 0
/// when entry 0 is empty). An array always has `max_entries`.
///
/// # Errors
/// A bpf(2) call fails ([`PolicyError::Read`]).
pub fn count(map: &MapHandle) -> Result<u64> {
    let _r = map.lock();
    let Some((fd, info)) = map.contents()? else {
        return Ok(0);
    };
    let mut key = vec![0u8; info.key_size as usize];
    let mut next = key.clone();
    let mut n = 0u64;
    let mut first = true;
    // Bounded: a map never holds more than max_entries keys.
    while n <= u64::from(info.max_entries) {
        let prev = (!first).then_some(key.as_slice());
        if !sys::map_next_key(fd.as_fd(), prev, &mut next).map_err(|source| PolicyError::Read {
            map: map.name.clone(),
            source,
        })? {
            break;
        }
        std::mem::swap(&mut key, &mut next);
        first = false;
        n += 1;
    }
    Ok(n)
}

/// A page of `map`'s entries (a policy map: of its live inner map) as raw
/// key and value bytes, in the kernel's iteration order: at most `limit`
/// entries after the key `after` (from the start when None), and the key
/// to pass as `after` for the next page (None after the last). A per-CPU
/// map's value is one value per possible CPU, each padded to 8 bytes,
/// concatenated ([`value_len`]). If `after` is no longer in the map, the
/// kernel starts over from the first key.
///
/// # Errors
/// `after` is not the map's key size ([`PolicyError::Size`]); a bpf(2)
/// call fails.
#[allow(clippy::type_complexity)]
pub fn dump(
    map: &MapHandle,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>)> {
    let _r = map.lock();
    dump_unlocked(map, after, limit)
}

/// [`dump`], with the rootlet's lock already held.
#[allow(clippy::type_complexity)]
fn dump_unlocked(
    map: &MapHandle,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>)> {
    let Some((fd, info)) = map.contents()? else {
        return Ok((vec![], None));
    };
    let read = |source| PolicyError::Read {
        map: map.name.clone(),
        source,
    };
    let key_size = info.key_size as usize;
    if let Some(a) = after
        && a.len() != key_size
    {
        return Err(PolicyError::Size {
            map: map.name.clone(),
            entry: Entry::Key(a.to_vec()),
            part: "key",
            got: a.len(),
            want: key_size,
        }
        .into());
    }
    let vlen = value_len(&info)?;
    let limit = limit.max(1);
    let mut out = vec![];
    let mut prev: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
    let mut next = vec![0u8; key_size];
    // Bounded by `limit` entries and by max_entries steps.
    for _ in 0..=info.max_entries {
        if !sys::map_next_key(fd.as_fd(), prev.as_deref(), &mut next).map_err(read)? {
            return Ok((out, None));
        }
        if out.len() == limit {
            return Ok((out, prev));
        }
        let mut value = vec![0u8; vlen];
        // A key the data path deleted meanwhile (LRU) is skipped.
        if sys::map_lookup(fd.as_fd(), &next, &mut value).map_err(read)? {
            out.push((next.clone(), value));
        }
        prev = Some(next.clone());
    }
    Ok((out, None))
}

/// Checks `entries` against `info` before anything is written: sizes,
/// count, and no key twice. Returns the value length.
fn check_entries(name: &str, info: &MapInfo, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<usize> {
    let vlen = value_len(info)?;
    if entries.len() > info.max_entries as usize {
        return Err(PolicyError::TooMany {
            map: name.to_owned(),
            entries: entries.len(),
            max: info.max_entries,
        }
        .into());
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        for (part, got, want) in [
            ("key", k.len(), info.key_size as usize),
            ("value", v.len(), vlen),
        ] {
            if got != want {
                return Err(PolicyError::Size {
                    map: name.to_owned(),
                    entry: Entry::Index(i),
                    part,
                    got,
                    want,
                }
                .into());
            }
        }
    }
    // Repeated keys, by sorting the indices by key (a third of the time a
    // hash set of 100 000 keys takes): the later index of a pair is named.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_unstable_by(|&a, &b| entries[a].0.cmp(&entries[b].0).then(a.cmp(&b)));
    if let Some((first, i)) = order
        .windows(2)
        .filter(|w| entries[w[0]].0 == entries[w[1]].0)
        .map(|w| (w[0], w[1]))
        .min_by_key(|&(_, i)| i)
    {
        return Err(PolicyError::Duplicate {
            map: name.to_owned(),
            entry: Entry::Index(i),
            first,
        }
        .into());
    }
    Ok(vlen)
}

/// Makes a new inner map for policy map `outer`, with the live inner map's
/// parameters (type, key and value size, max entries, flags), and fills it
/// with `entries` (raw key and value bytes; per-CPU values as [`dump`]
/// returns them): with one `BPF_MAP_UPDATE_BATCH` where the map type has
/// batch operations, else element by element. Nothing the data path sees
/// has changed when it returns; [`swap`] makes it live.
///
/// # Errors
/// `outer` is not a policy map, or has no live inner map; an entry has the
/// wrong size, repeats a key, or the kernel refuses it (the error names
/// its index); more entries than the map holds. Nothing is left behind.
pub fn build_inner(outer: &MapHandle, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<Inner> {
    let _r = outer.lock();
    if !outer.is_policy() {
        return Err(PolicyError::NotPolicyMap {
            map: outer.name.clone(),
        }
        .into());
    }
    let (live_fd, live) =
        live_inner(&outer.name, outer.fd.as_fd())?.ok_or_else(|| PolicyError::NoLiveInner {
            map: outer.name.clone(),
        })?;
    let info = &live.info;
    check_entries(&outer.name, info, entries)?;
    let create = |source| PolicyError::Create {
        map: outer.name.clone(),
        source,
    };
    // Typed like the live one: older kernels refuse an inner map whose BTF
    // differs from the template's.
    let btf = match sys::map_btf(live_fd.as_fd()).map_err(create)? {
        Some(b) => Some((sys::btf_by_id(b.btf_id).map_err(create)?, b)),
        None => None,
    };
    let fd = sys::map_create_with_flags(
        info.map_type,
        info.key_size,
        info.value_size,
        info.max_entries,
        info.map_flags,
        &outer.name,
        btf.as_ref()
            .map(|(fd, b)| (fd.as_fd(), b.key_type_id, b.value_type_id)),
    )
    .map_err(create)?;
    let batched = fill(&outer.name, fd.as_fd(), entries)?;
    let id = sys::map_info(fd.as_fd())?.id;
    Ok(Inner { fd, id, batched })
}

/// Writes `entries` into an empty map nothing reads yet; returns whether
/// one batch did it.
fn fill(name: &str, fd: BorrowedFd<'_>, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<bool> {
    let write = |i: usize, source| PolicyError::Write {
        map: name.to_owned(),
        entry: Entry::Index(i),
        source,
    };
    if entries.is_empty() {
        return Ok(true);
    }
    let keys: Vec<u8> = entries
        .iter()
        .flat_map(|(k, _)| k.iter().copied())
        .collect();
    let values: Vec<u8> = entries
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    match sys::map_update_batch(fd, &keys, &values, entries.len()) {
        Ok(()) => return Ok(true),
        // No batch operations for this map type: element by element (an
        // entry the kernel refuses is then named by the loop below).
        Err(sys::BatchError { done: 0, error })
            if matches!(
                error.errno(),
                Some(libc::EINVAL | libc::EOPNOTSUPP) | Some(ENOTSUPP)
            ) => {}
        Err(sys::BatchError { done, error }) => return Err(write(done, error).into()),
    }
    for (i, (k, v)) in entries.iter().enumerate() {
        sys::map_update(fd, k, v).map_err(|e| write(i, e))?;
    }
    Ok(false)
}

/// Makes `inner` the live inner map of policy map `outer`: one update of
/// entry 0. From the next packet on, the stage judges by `inner`; a packet
/// already running keeps the inner map it looked up. The old inner map is
/// freed once nothing holds it.
///
/// # Errors
/// `outer` is not a policy map; the stage no longer uses `outer`
/// ([`PolicyError::Stale`]); the kernel refuses `inner` (parameters that
/// differ from the outer map's inner definition). On an error the live
/// inner map is unchanged.
pub fn swap(outer: &MapHandle, inner: &Inner) -> Result<SwapOutcome> {
    let r = outer.lock();
    if !outer.is_policy() {
        return Err(PolicyError::NotPolicyMap {
            map: outer.name.clone(),
        }
        .into());
    }
    outer.check_live(&r)?;
    let old = live_inner(&outer.name, outer.fd.as_fd())?.map(|(_, i)| i.id);
    let fd = inner.fd.as_raw_fd() as u32;
    sys::map_update(outer.fd.as_fd(), &0u32.to_ne_bytes(), &fd.to_ne_bytes()).map_err(
        |source| PolicyError::Write {
            map: outer.name.clone(),
            entry: Entry::Key(0u32.to_ne_bytes().to_vec()),
            source,
        },
    )?;
    Ok(SwapOutcome { old_inner_id: old })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lpm() -> MapInfo {
        MapInfo {
            id: 1,
            map_type: 11,
            name: "m".into(),
            key_size: 8,
            value_size: 4,
            max_entries: 2,
            map_flags: 1,
        }
    }

    fn entry(k: u8) -> (Vec<u8>, Vec<u8>) {
        (vec![k; 8], vec![0; 4])
    }

    #[test]
    fn entries_are_checked_before_the_kernel_is_touched() {
        assert_eq!(
            check_entries("m", &lpm(), &[entry(1), entry(2)]).unwrap(),
            4
        );
        let err = check_entries("m", &lpm(), &[entry(1), entry(2), entry(3)]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Policy(PolicyError::TooMany {
                    entries: 3,
                    max: 2,
                    ..
                })
            ),
            "{err}"
        );
        let err = check_entries("m", &lpm(), &[entry(1), entry(1)]).unwrap_err();
        assert_eq!(err.to_string(), "map `m`, entry 1: the same key as entry 0");
        let err = check_entries("m", &lpm(), &[entry(1), (vec![0; 8], vec![0; 3])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "map `m`, entry 1: the value is 3 bytes, the map's value is 4 bytes"
        );
    }

    #[test]
    fn a_policy_map_is_an_array_of_maps_with_one_entry() {
        let outer = MapInfo {
            map_type: ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
            ..lpm()
        };
        assert!(is_policy(&outer));
        assert!(!is_policy(&MapInfo {
            max_entries: 2,
            ..outer.clone()
        }));
        assert!(!is_policy(&lpm()));
    }
}
