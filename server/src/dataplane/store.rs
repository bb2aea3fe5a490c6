//! The embedded transactional store (redb) for what the kernel cannot hold:
//! specs, owners, priorities, proceed-on masks, object digests and the
//! generation of each rootlet's set of stages. The kernel is the truth for
//! what is attached; the store only describes it. One process at a time
//! holds the store open (redb locks the file), which makes that process the
//! only writer of the rootlets it records.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    error::{Error, Result},
    spec::{Backend, Pipeline, RootletKey, RootletSpec, XdpMode},
};

const ROOTLETS: TableDefinition<&str, &[u8]> = TableDefinition::new("rootlets");

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
    /// The mode the XDP link was created in (driver or generic).
    pub attached_mode: XdpMode,
    /// The last generation known to be live.
    pub committed: Generation,
    /// A generation being built; after a crash, adoption decides from the
    /// kernel whether it became live.
    pub pending: Option<Generation>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| store_err(path, e))?;
        }
        let db = Database::create(path).map_err(|e| store_err(path, e))?;
        let store = Store {
            db,
            path: path.to_owned(),
        };
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        txn.open_table(ROOTLETS).map_err(|e| store.err(e))?;
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        store_err(&self.path, e)
    }

    pub fn get(&self, key: RootletKey) -> Result<Option<RootletRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ROOTLETS).map_err(|e| self.err(e))?;
        let value = table
            .get(key.to_string().as_str())
            .map_err(|e| self.err(e))?;
        value
            .map(|v| serde_json::from_slice(v.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    pub fn list(&self) -> Result<Vec<RootletRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ROOTLETS).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = entry.map_err(|e| self.err(e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| self.err(e))?);
        }
        Ok(out)
    }

    /// Writes `record` in one durable transaction.
    pub fn put(&self, record: &RootletRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(ROOTLETS).map_err(|e| self.err(e))?;
            table
                .insert(record.key.to_string().as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    pub fn delete(&self, key: RootletKey) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(ROOTLETS).map_err(|e| self.err(e))?;
            table
                .remove(key.to_string().as_str())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: path.to_owned(),
        message: e.to_string(),
    }
}
