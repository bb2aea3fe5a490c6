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
