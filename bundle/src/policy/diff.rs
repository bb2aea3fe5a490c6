//! [`PolicyDiff`]: what applying one policy after another changes, map by
//! map and entry by entry, matching entries by key (their canonical JSON
//! text, as the parser's duplicate check does). What `rootletctl policy
//! diff` prints.
//!
//! A map only the old policy names is not touched by the new one (a policy
//! sets the maps it names, no others); the diff says so rather than
//! listing its entries as removed.

use std::collections::{BTreeMap, HashMap};

use super::{Entry, MapContents, PolicyDocument, canonical::value_text};

/// The differences between two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDiff {
    /// The stages, if they differ (old, new).
    pub stage: Option<(String, String)>,
    /// The versions, if they differ.
    pub version: Option<(u64, u64)>,
    /// The descriptions, if they differ.
    pub description: Option<(Option<String>, Option<String>)>,
    /// Every map either names whose contents differ (or that only one
    /// names), by name.
    pub maps: BTreeMap<String, MapDiff>,
}

/// How one map differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapDiff {
    /// Both name it: the entries the new one adds, removes and changes.
    Changed {
        /// In the new policy's order.
        added: Vec<Entry>,
        /// In the old policy's order.
        removed: Vec<Entry>,
        /// (old, new), in the new policy's order.
        changed: Vec<(Entry, Entry)>,
    },
    /// Only the new policy names it: it sets these entries.
    OnlyNew { entries: usize },
    /// Only the old policy names it: the new one leaves it as it is.
    OnlyOld { entries: usize },
}

impl PolicyDiff {
    /// `new` compared with `old`.
    pub fn between(old: &PolicyDocument, new: &PolicyDocument) -> PolicyDiff {
        let mut maps = BTreeMap::new();
        for (name, n) in &new.maps {
            match old.maps.get(name) {
                None => {
                    maps.insert(
                        name.clone(),
                        MapDiff::OnlyNew {
                            entries: n.entries.len(),
                        },
                    );
                }
                Some(o) => {
                    let d = map_diff(o, n);
                    if !d.is_same() {
                        maps.insert(name.clone(), d);
                    }
                }
            }
        }
        for (name, o) in &old.maps {
            if !new.maps.contains_key(name) {
                maps.insert(
                    name.clone(),
                    MapDiff::OnlyOld {
                        entries: o.entries.len(),
                    },
                );
            }
        }
        PolicyDiff {
            stage: (old.stage != new.stage).then(|| (old.stage.clone(), new.stage.clone())),
            version: (old.version != new.version).then_some((old.version, new.version)),
            description: (old.description != new.description)
                .then(|| (old.description.clone(), new.description.clone())),
            maps,
        }
    }

    /// Whether the two policies are the same (the same canonical bytes).
    pub fn is_same(&self) -> bool {
        self.stage.is_none()
            && self.version.is_none()
            && self.description.is_none()
            && self.maps.is_empty()
    }
}

impl MapDiff {
    fn is_same(&self) -> bool {
        matches!(self, MapDiff::Changed { added, removed, changed }
            if added.is_empty() && removed.is_empty() && changed.is_empty())
    }
}

fn map_diff(old: &MapContents, new: &MapContents) -> MapDiff {
    let old_by_key: HashMap<String, &Entry> = old
        .entries
        .iter()
        .map(|e| (value_text(&e.key), e))
        .collect();
    let mut new_keys = std::collections::HashSet::new();
    let (mut added, mut changed) = (Vec::new(), Vec::new());
    for e in &new.entries {
        let k = value_text(&e.key);
        match old_by_key.get(&k) {
            None => added.push(e.clone()),
            Some(o) if o.value != e.value => changed.push(((*o).clone(), e.clone())),
            Some(_) => {}
        }
        new_keys.insert(k);
    }
    let removed = old
        .entries
        .iter()
        .filter(|e| !new_keys.contains(&value_text(&e.key)))
        .cloned()
        .collect();
    MapDiff::Changed {
        added,
        removed,
        changed,
    }
}
