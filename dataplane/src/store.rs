//! The embedded transactional store (redb) for what the kernel cannot hold:
//! specs, owners, priorities, proceed-on masks, object digests and the
//! generation of each rootlet's set of stages. The kernel is the truth for
//! what is attached; the store only describes it. One process at a time
//! holds the store open (redb locks the file), which makes that process the
//! only writer of the rootlets it records.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::kv::{Kv, KvError};

use super::{
    error::{Error, Result},
    spec::{Backend, HookKind, Pipeline, RootletKey, RootletSpec, XdpMode},
    tally::Tally,
};

/// A numbered set of stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub number: u64,
    pub pipeline: Pipeline,
}

/// Everything recorded about one rootlet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootletRecord {
    pub key: RootletKey,
    pub spec: RootletSpec,
    pub backend: Backend,
    /// Where the rootlet is attached (records before hooks were a kind are
    /// XDP).
    #[serde(default)]
    pub hook: HookKind,
    /// The mode the XDP link was created in (driver or generic).
    pub attached_mode: XdpMode,
    /// The last generation known to be live.
    pub committed: Generation,
    /// A generation being built; after a crash, adoption decides from the
    /// kernel whether it became live.
    pub pending: Option<Generation>,
    /// Tail-call backend: the generation before `committed`, whose programs
    /// and chain still sit in the inactive parity (an instant rollback).
    #[serde(default)]
    pub previous: Option<Generation>,
    /// Tail-call backend: what its counters add up to.
    #[serde(default)]
    pub tally: Tally,
    /// An unload of this rootlet began (written before anything of it is
    /// undone): adoption after a crash finishes it. Records before unloads
    /// were marked have none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unloading: bool,
}

pub struct Store {
    kv: Kv,
}

const ROOTLETS: &str = "rootlets";

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Store {
            kv: Kv::open(path, &[ROOTLETS]).map_err(store_err)?,
        })
    }

    pub fn get(&self, key: RootletKey) -> Result<Option<RootletRecord>> {
        self.kv.get(ROOTLETS, &key.to_string()).map_err(store_err)
    }

    pub fn list(&self) -> Result<Vec<RootletRecord>> {
        Ok(self
            .kv
            .list(ROOTLETS)
            .map_err(store_err)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// Writes `record` in one durable transaction.
    pub fn put(&self, record: &RootletRecord) -> Result<()> {
        self.kv
            .put(ROOTLETS, &record.key.to_string(), record)
            .map_err(store_err)
    }

    pub fn delete(&self, key: RootletKey) -> Result<()> {
        self.kv
            .delete(ROOTLETS, &key.to_string())
            .map_err(store_err)
    }
}

fn store_err(e: KvError) -> Error {
    if e.locked {
        return Error::StoreLocked { path: e.path };
    }
    Error::Store {
        path: e.path,
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{InterfaceRef, XdpAction};

    fn record() -> RootletRecord {
        RootletRecord {
            key: RootletKey {
                netns_ino: 4026531840,
                ifindex: 7,
            },
            spec: RootletSpec {
                iface: InterfaceRef {
                    netns: None,
                    ifname: "veth0".into(),
                },
                mode: XdpMode::Generic,
                final_verdict: XdpAction::Pass,
            },
            backend: Backend::TailCall,
            hook: HookKind::Xdp,
            attached_mode: XdpMode::Generic,
            committed: Generation {
                number: 3,
                pipeline: Pipeline::default(),
            },
            pending: None,
            previous: None,
            tally: Tally::default(),
            unloading: false,
        }
    }

    /// The unload marker leaves the stored format as it was while unset,
    /// so a record written before it existed reads as not unloading, and
    /// one without the marker reads the same to an agent before it.
    #[test]
    fn a_record_without_the_unload_marker_reads_as_not_unloading() {
        let plain = serde_json::to_value(record()).expect("serialize");
        assert!(plain.get("unloading").is_none(), "{plain}");
        let back: RootletRecord = serde_json::from_value(plain).expect("deserialize");
        assert_eq!(back, record());

        let marked = RootletRecord {
            unloading: true,
            ..record()
        };
        let v = serde_json::to_value(&marked).expect("serialize");
        assert_eq!(v["unloading"], serde_json::Value::Bool(true));
        let back: RootletRecord = serde_json::from_value(v).expect("deserialize");
        assert!(back.unloading);
    }
}
