//! A redb database of JSON values in named tables, one durable transaction
//! per write (or per [`Kv::write`] batch of writes): what both the data
//! plane's and the agent's stores are made of. Large opaque values (signed
//! bundles) go into byte tables instead ([`Kv::put_bytes`]): stored as they
//! are, with a key index beside them so that asking whether a key exists
//! reads no value.

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

/// The key index of byte table `table`: the same keys, empty values.
fn index_of(table: &str) -> String {
    format!("{table}.keys")
}

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

    /// Every key of `table`, in order.
    pub fn keys(&self, table: &str) -> Result<Vec<String>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, _) = entry.map_err(|e| self.err(e))?;
            out.push(k.value().to_owned());
        }
        Ok(out)
    }

    /// Deletes `keys` from `table` in one durable transaction.
    pub fn delete_many(&self, table: &str, keys: &[String]) -> Result<(), KvError> {
        if keys.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
            for key in keys {
                t.remove(key.as_str()).map_err(|e| self.err(e))?;
            }
        }
        budget::time(self.step, || txn.commit()).map_err(|e| self.err(e))
    }

    /// Opens (creating) byte table `table` and its key index.
    pub fn open_bytes_table(&self, table: &str) -> Result<(), KvError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
        txn.open_table(Table::new(&index_of(table)))
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// Every key of byte table `table`, in order, from its index (no value
    /// is read).
    pub fn bytes_keys(&self, table: &str) -> Result<Vec<String>, KvError> {
        self.keys(&index_of(table))
    }

    /// The bytes stored under `key` in byte table `table`, as they were put.
    pub fn get_bytes(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(Table::new(table)).map_err(|e| self.err(e))?;
        let v = t.get(key).map_err(|e| self.err(e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Whether byte table `table` holds `key`: a look-up in its key index,
    /// which reads no value.
    pub fn contains_bytes(&self, table: &str, key: &str) -> Result<bool, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let index = index_of(table);
        let t = txn
            .open_table(Table::new(&index))
            .map_err(|e| self.err(e))?;
        Ok(t.get(key).map_err(|e| self.err(e))?.is_some())
    }

    /// Stores `value` under `key` in byte table `table` as it is (no
    /// encoding), and the key in its index, in one durable transaction.
    pub fn put_bytes(&self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.write(|b| b.put_bytes(table, key, value))
    }

    /// Deletes `keys` from byte table `table` and its index, in one durable
    /// transaction.
    pub fn delete_bytes(&self, table: &str, keys: &[String]) -> Result<(), KvError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write(|b| b.delete_bytes(table, keys))
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

    /// [`Kv::delete_bytes`], in this batch.
    pub fn delete_bytes(&mut self, table: &str, keys: &[String]) -> Result<(), KvError> {
        let mut t = self
            .txn
            .open_table(Table::new(table))
            .map_err(|e| self.kv.err(e))?;
        let index = index_of(table);
        let mut i = self
            .txn
            .open_table(Table::new(&index))
            .map_err(|e| self.kv.err(e))?;
        for key in keys {
            t.remove(key.as_str()).map_err(|e| self.kv.err(e))?;
            i.remove(key.as_str()).map_err(|e| self.kv.err(e))?;
        }
        Ok(())
    }

    /// [`Kv::put_bytes`], in this batch.
    pub fn put_bytes(&mut self, table: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        let mut t = self
            .txn
            .open_table(Table::new(table))
            .map_err(|e| self.kv.err(e))?;
        t.insert(key, value).map_err(|e| self.kv.err(e))?;
        let index = index_of(table);
        let mut i = self
            .txn
            .open_table(Table::new(&index))
            .map_err(|e| self.kv.err(e))?;
        i.insert(key, [].as_slice()).map_err(|e| self.kv.err(e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn byte_tables_keep_bytes_as_they_are_with_an_index_of_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let kv = Kv::open(&path, &["json"]).unwrap();
        kv.open_bytes_table("raw").unwrap();
        // Not JSON, not UTF-8.
        let value = [b'"', 0xff, 0, 1, 2];
        kv.put_bytes("raw", "a", &value).unwrap();
        kv.put_bytes("raw", "b", b"").unwrap();
        assert_eq!(
            kv.get_bytes("raw", "a").unwrap().as_deref(),
            Some(&value[..])
        );
        assert!(kv.contains_bytes("raw", "a").unwrap() && kv.contains_bytes("raw", "b").unwrap());
        assert!(!kv.contains_bytes("raw", "c").unwrap());
        assert_eq!(kv.bytes_keys("raw").unwrap(), ["a", "b"]);
        kv.delete_bytes("raw", &["a".into()]).unwrap();
        assert_eq!(kv.get_bytes("raw", "a").unwrap(), None);
        assert!(!kv.contains_bytes("raw", "a").unwrap());
        drop(kv);
        // Durable, and the JSON tables are untouched by it.
        let kv = Kv::open(&path, &["json"]).unwrap();
        assert_eq!(kv.bytes_keys("raw").unwrap(), ["b"]);
        assert!(kv.list::<String>("json").unwrap().is_empty());
        kv.put("json", "k", &"v").unwrap();
        kv.put("json", "l", &"w").unwrap();
        kv.delete_many("json", &["k".into()]).unwrap();
        assert_eq!(kv.keys("json").unwrap(), ["l"]);
    }
}
