//! A redb database of JSON values in named tables, one durable transaction
//! per write (or per [`Kv::write`] batch of writes): what both the data
//! plane's and the agent's stores are made of.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::budget::{self, Step};

/// A store error: the file, and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("store {path}: {message}")]
pub struct KvError {
    pub path: PathBuf,
    pub message: String,
    /// Another process holds the database.
    pub locked: bool,
}

pub struct Kv {
    db: Database,
    path: PathBuf,
    /// The step of a change its durable writes are timed as.
    step: Step,
}

type Table<'a> = TableDefinition<'a, &'static str, &'static [u8]>;

impl Kv {
    /// Opens (creating) the database and `tables`. Fails if another process
    /// holds it: redb locks the file.
    pub fn open(path: &Path, tables: &[&str]) -> Result<Self, KvError> {
        Self::open_timed(path, tables, Step::Store)
    }

    /// [`Kv::open`], with writes timed as `step` of the change that makes
    /// them (see [`crate::budget`]).
    pub fn open_timed(path: &Path, tables: &[&str], step: Step) -> Result<Self, KvError> {
        let err = |e: &dyn std::fmt::Display| KvError {
            path: path.to_owned(),
            message: e.to_string(),
            locked: false,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let db = Database::create(path).map_err(|e| KvError {
            locked: matches!(e, redb::DatabaseError::DatabaseAlreadyOpen),
            ..err(&e)
        })?;
        let kv = Kv {
            db,
            path: path.to_owned(),
            step,
        };
        let txn = kv.db.begin_write().map_err(|e| kv.err(e))?;
        for &t in tables {
            txn.open_table(Table::new(t)).map_err(|e| kv.err(e))?;
        }
        txn.commit().map_err(|e| kv.err(e))?;
        Ok(kv)
    }

    fn err(&self, e: impl std::fmt::Display) -> KvError {
        KvError {
            path: self.path.clone(),
            message: e.to_string(),
            locked: false,
        }
    }

    pub fn get<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
        let v = t.get(key).map_err(|e| self.err(e))?;
        v.map(|v| serde_json::from_slice(v.value()).map_err(|e| self.err(e)))
            .transpose()
    }

    pub fn list<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<(String, T)>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push((
                k.value().to_owned(),
                serde_json::from_slice(v.value()).map_err(|e| self.err(e))?,
            ));
        }
        Ok(out)
    }

    pub fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), KvError> {
        self.write(|b| b.put(table, key, value))
    }

    pub fn delete(&self, table: &str, key: &str) -> Result<(), KvError> {
        self.write(|b| b.delete(table, key))
    }

    /// The writes `f` makes, in one durable transaction: after a crash
    /// either all of them are in the store or none is. Nothing is written
    /// if `f` fails.
    pub fn write(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<(), KvError>,
    ) -> Result<(), KvError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        f(&mut Batch {
            kv: self,
            txn: &txn,
        })?;
        budget::time(self.step, || txn.commit()).map_err(|e| self.err(e))
    }
}

/// The writes of one [`Kv::write`] transaction.
pub struct Batch<'a> {
    kv: &'a Kv,
    txn: &'a redb::WriteTransaction,
}

impl Batch<'_> {
    pub fn put<T: Serialize>(&mut self, table: &str, key: &str, value: &T) -> Result<(), KvError> {
        let bytes = serde_json::to_vec(value).map_err(|e| self.kv.err(e))?;
        let mut t = self
            .txn
            .open_table(Table::new(table))
            .map_err(|e| self.kv.err(e))?;
        t.insert(key, bytes.as_slice())
            .map_err(|e| self.kv.err(e))?;
        Ok(())
    }

    pub fn delete(&mut self, table: &str, key: &str) -> Result<(), KvError> {
        let mut t = self
            .txn
            .open_table(Table::new(table))
            .map_err(|e| self.kv.err(e))?;
        t.remove(key).map_err(|e| self.kv.err(e))?;
        Ok(())
    }
}
