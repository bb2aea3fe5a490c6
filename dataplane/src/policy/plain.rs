//! Plain maps (every stage map that is not a policy map), written entry by
//! entry: **not atomic**, a packet may meet a map that holds part of the
//! change. The desired contents are compared with the live ones, and only
//! the difference is written (deletes first, so that a full map has room,
//! then updates); on any failure what was written is undone, in reverse.
//! The plan, with the value every touched key had before, is kept
//! ([`PlainApplied`], serializable) so that a caller can journal it and
//! undo the change later.
//!
//! An array's keys cannot be deleted: in an array, a key the desired
//! contents do not name is set to zero (which is what "absent" reads as).

use std::{collections::HashMap, os::fd::AsFd};

use serde::{Deserialize, Serialize};

use super::{MapHandle, check_entries};
use crate::{
    error::{Entry, PolicyError, Result},
    sys,
};

/// Array types: every key exists, none can be deleted.
const ARRAY_TYPES: &[u32] = &[2, 6];
/// Plain map types whose entries are data Rootlet can write (hash, array,
/// per-CPU hash and array, LRU hashes, LPM trie). The others hold file
/// descriptors (program arrays, maps of maps, devmaps, sockmaps), events
/// or per-object storage.
const WRITABLE_TYPES: &[u32] = &[1, 2, 5, 6, 9, 10, 11];

/// One write of a plain apply, with what it overwrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainOp {
    /// The index of the entry in the desired contents; None for a key the
    /// desired contents do not name (deleted, or zeroed in an array).
    pub index: Option<usize>,
    #[serde(with = "hex_bytes")]
    pub key: Vec<u8>,
    /// What is written (None: the key is deleted).
    #[serde(with = "hex_opt")]
    pub value: Option<Vec<u8>>,
    /// What the key held before (None: absent).
    #[serde(with = "hex_opt")]
    pub previous: Option<Vec<u8>>,
}

impl PlainOp {
    fn entry(&self) -> Entry {
        match self.index {
            Some(i) => Entry::Index(i),
            None => Entry::Key(self.key.clone()),
        }
    }
}

/// A plain map's change, planned ([`plan_plain`]) or applied
/// ([`apply_plain`]): every write in order, each with the value it
/// replaced, so that [`PlainApplied::undo`] restores the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainApplied {
    /// The kernel's name of the map.
    pub map: String,
    /// The map's id: an undo applies only to that very map.
    pub map_id: u32,
    pub ops: Vec<PlainOp>,
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// Compares `desired` (the full contents: raw keys and values, per-CPU
/// values as [`super::dump`] returns them) with `map`'s live contents and
/// plans the writes that make them equal, writing nothing.
///
/// # Errors
/// `map` is a policy map or holds no writable data; an entry has the wrong
/// size or repeats a key; more entries than the map holds; reading the map
/// fails.
pub fn plan_plain(map: &MapHandle, desired: &[(Vec<u8>, Vec<u8>)]) -> Result<PlainApplied> {
    let r = map.lock();
    map.check_live(&r)?;
    plan(map, desired)
}

fn plan(map: &MapHandle, desired: &[(Vec<u8>, Vec<u8>)]) -> Result<PlainApplied> {
    if map.is_policy() {
        return Err(PolicyError::IsPolicyMap {
            map: map.name.clone(),
        }
        .into());
    }
    let info = &map.info;
    if !WRITABLE_TYPES.contains(&info.map_type) {
        return Err(PolicyError::Unsupported {
            map: map.name.clone(),
            map_type: info.map_type,
            why: "its entries are file descriptors, events or per-object storage",
        }
        .into());
    }
    let vlen = check_entries(&map.name, info, desired)?;
    let is_array = ARRAY_TYPES.contains(&info.map_type);
    let mut live: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut order = vec![];
    let mut after: Option<Vec<u8>> = None;
    // Bounded: each page advances, and a map holds at most max_entries.
    for _ in 0..=info.max_entries / 1024 + 1 {
        let (page, next) = super::dump_unlocked(map, after.as_deref(), 1024)?;
        for (k, v) in page {
            order.push(k.clone());
            live.insert(k, v);
        }
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let wanted: HashMap<&[u8], usize> = desired
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_slice(), i))
        .collect();
    let zero = vec![0u8; vlen];
    let mut ops = vec![];
    let (mut added, mut removed, mut changed) = (0, 0, 0);
    for k in &order {
        if wanted.contains_key(k.as_slice()) {
            continue;
        }
        let previous = live[k].clone();
        if is_array {
            if previous == zero {
                continue;
            }
            ops.push(PlainOp {
                index: None,
                key: k.clone(),
                value: Some(zero.clone()),
                previous: Some(previous),
            });
            changed += 1;
        } else {
            ops.push(PlainOp {
                index: None,
                key: k.clone(),
                value: None,
                previous: Some(previous),
            });
            removed += 1;
        }
    }
    for (i, (k, v)) in desired.iter().enumerate() {
        let previous = live.get(k);
        if previous == Some(v) {
            continue;
        }
        if previous.is_some() {
            changed += 1;
        } else {
            added += 1;
        }
        ops.push(PlainOp {
            index: Some(i),
            key: k.clone(),
            value: Some(v.clone()),
            previous: previous.cloned(),
        });
    }
    Ok(PlainApplied {
        map: map.name.clone(),
        map_id: map.id,
        ops,
        added,
        removed,
        changed,
    })
}

/// Makes plain map `map` hold exactly `desired`, entry by entry (not
/// atomic; see the module's documentation), and returns what it did, with
/// the undo. On any failure, what was written is undone before it returns.
///
/// # Errors
/// As [`plan_plain`]; the stage no longer uses `map`; the kernel refuses a
/// write ([`PolicyError::Write`], naming the entry: its index in `desired`,
/// or the key for one it deletes), after which the map holds what it held
/// before; [`PolicyError::UndoFailed`] if the undo failed too.
pub fn apply_plain(map: &MapHandle, desired: &[(Vec<u8>, Vec<u8>)]) -> Result<PlainApplied> {
    let r = map.lock();
    map.check_live(&r)?;
    let applied = plan(map, desired)?;
    for (done, op) in applied.ops.iter().enumerate() {
        if let Err(source) = write(map, &op.key, op.value.as_deref()) {
            let failed = PolicyError::Write {
                map: map.name.clone(),
                entry: op.entry(),
                source,
            };
            revert(map, &applied.ops[..done], &failed.to_string())?;
            return Err(failed.into());
        }
    }
    Ok(applied)
}

impl PlainApplied {
    /// Restores what the map held before this change, for every key it
    /// touched (writes the map made since to those keys are overwritten).
    ///
    /// # Errors
    /// `map` is not the map this change was made to, or its stage no longer
    /// uses it ([`PolicyError::Stale`]); a write fails
    /// ([`PolicyError::UndoFailed`]).
    pub fn undo(&self, map: &MapHandle) -> Result<()> {
        let r = map.lock();
        if map.id != self.map_id {
            return Err(PolicyError::Stale {
                stage: map.stage.clone(),
                map: self.map.clone(),
                id: self.map_id,
            }
            .into());
        }
        map.check_live(&r)?;
        revert(map, &self.ops, "undo requested")
    }
}

fn write(map: &MapHandle, key: &[u8], value: Option<&[u8]>) -> sys::Result<()> {
    match value {
        Some(v) => sys::map_update(map.fd.as_fd(), key, v),
        None => sys::map_delete(map.fd.as_fd(), key),
    }
}

/// Puts back the previous value of every op in `ops`, last first.
fn revert(map: &MapHandle, ops: &[PlainOp], cause: &str) -> Result<()> {
    for (left, op) in ops.iter().rev().enumerate() {
        if let Err(source) = write(map, &op.key, op.previous.as_deref()) {
            return Err(PolicyError::UndoFailed {
                map: map.name.clone(),
                cause: cause.to_owned(),
                entry: op.entry(),
                left: ops.len() - left,
                source,
            }
            .into());
        }
    }
    Ok(())
}

/// Bytes as lowercase hex in the journal (serde's default, an array of
/// numbers, is four times longer).
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_form_round_trips() {
        let applied = PlainApplied {
            map: "m".into(),
            map_id: 7,
            ops: vec![PlainOp {
                index: None,
                key: vec![1, 2],
                value: None,
                previous: Some(vec![0xff]),
            }],
            added: 0,
            removed: 1,
            changed: 0,
        };
        let json = serde_json::to_string(&applied).unwrap();
        assert!(json.contains("\"0102\""), "{json}");
        assert_eq!(
            serde_json::from_str::<PlainApplied>(&json).unwrap(),
            applied
        );
    }
}
