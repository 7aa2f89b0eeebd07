//! The local cache index: RocksDB under the state dir, mapping each step's
//! cache key to what the step produced.
//!
//! RocksDB admits one writer process at a time, and builds sharing a state
//! dir run at once. So no build keeps the database open: lookups open it
//! read-only (which never conflicts with a writer), and writes open it
//! read-write for the moment they take, under an exclusive file lock that
//! other writers wait on instead of failing.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::error::{CacheStoreError, IoContext, Result};
use crate::manifest::Layer;

/// Column family of step entries, by cache key.
const STEPS: &str = "steps";
const FAMILIES: &[&str] = &[STEPS];

/// What a step produced: its layer (none when it changed no file) and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    pub layer: Option<Layer>,
    /// Seconds since the epoch; entries older than the TTL are misses.
    pub created: u64,
}

impl StepEntry {
    pub fn new(layer: Option<Layer>) -> Self {
        StepEntry {
            layer,
            created: now_secs(),
        }
    }

    pub fn expired(&self, ttl: Duration) -> bool {
        self.created.saturating_add(ttl.as_secs()) < now_secs()
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone)]
pub struct Index {
    path: PathBuf,
    lock: PathBuf,
}

impl Index {
    pub fn open(state_dir: &Path) -> Result<Index> {
        std::fs::create_dir_all(state_dir).at(state_dir)?;
        Ok(Index {
            path: state_dir.join("index"),
            lock: state_dir.join("index.lock"),
        })
    }

    fn error(&self, e: impl ToString) -> CacheStoreError {
        CacheStoreError::Index {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn options(create: bool) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.create_missing_column_families(create);
        opts.set_keep_log_file_num(2);
        opts.set_max_open_files(64);
        opts
    }

    /// Looks up many keys at once; a key never recorded is `None`.
    pub fn get_steps(&self, keys: &[String]) -> Result<Vec<Option<StepEntry>>> {
        if keys.is_empty() || !self.path.join("CURRENT").exists() {
            return Ok(vec![None; keys.len()]);
        }
        let db = DB::open_cf_for_read_only(&Self::options(false), &self.path, FAMILIES, false)
            .map_err(|e| self.error(e))?;
        let cf = db
            .cf_handle(STEPS)
            .ok_or_else(|| self.error("no steps column family"))?;
        db.multi_get_cf(keys.iter().map(|k| (cf, k.as_bytes())))
            .into_iter()
            .map(|r| match r.map_err(|e| self.error(e))? {
                // An entry that does not parse (a newer Kiln's?) is a miss.
                Some(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
                None => Ok(None),
            })
            .collect()
    }

    /// Records entries, waiting for any other writer to finish first.
    pub fn put_steps(&self, entries: &[(String, StepEntry)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let lock = File::create(&self.lock).at(&self.lock)?;
        lock.lock().at(&self.lock)?;
        let db =
            DB::open_cf(&Self::options(true), &self.path, FAMILIES).map_err(|e| self.error(e))?;
        let cf = db
            .cf_handle(STEPS)
            .ok_or_else(|| self.error("no steps column family"))?;
        let mut batch = WriteBatch::default();
        for (key, entry) in entries {
            let value = serde_json::to_vec(entry).map_err(|e| self.error(e))?;
            batch.put_cf(cf, key.as_bytes(), value);
        }
        db.write(batch).map_err(|e| self.error(e))?;
        // Dropping the database before the lock lets the next writer in.
        drop(db);
        drop(lock);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Descriptor;

    fn layer(n: u8) -> Layer {
        Layer {
            descriptor: Descriptor {
                media_type: crate::manifest::OCI_LAYER_GZIP.into(),
                digest: format!("sha256:{}", hex::encode([n; 32])),
                size: n as u64,
                platform: None,
                annotations: None,
            },
            diff_id: format!("sha256:{}", hex::encode([n + 1; 32])),
        }
    }

    #[test]
    fn records_and_finds_steps() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        let keys = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(index.get_steps(&keys).unwrap(), vec![None, None, None]);
        let a = StepEntry::new(Some(layer(1)));
        let b = StepEntry::new(None);
        index
            .put_steps(&[("a".into(), a.clone()), ("b".into(), b.clone())])
            .unwrap();
        assert_eq!(
            index.get_steps(&keys).unwrap(),
            vec![Some(a), Some(b), None]
        );
    }

    #[test]
    fn writers_in_many_threads_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let index = index.clone();
                s.spawn(move || {
                    for i in 0..5 {
                        let entry = StepEntry::new(Some(layer(t * 10 + i)));
                        index.put_steps(&[(format!("{t}-{i}"), entry)]).unwrap();
                        // A reader never fails while writers come and go.
                        index.get_steps(&[format!("{t}-{i}")]).unwrap();
                    }
                });
            }
        });
        let keys: Vec<String> = (0..4)
            .flat_map(|t| (0..5).map(move |i| format!("{t}-{i}")))
            .collect();
        assert!(index.get_steps(&keys).unwrap().iter().all(Option::is_some));
    }

    #[test]
    fn old_entries_expire() {
        let mut entry = StepEntry::new(None);
        assert!(!entry.expired(Duration::from_secs(60)));
        entry.created -= 120;
        assert!(entry.expired(Duration::from_secs(60)));
    }
}
