//! The local cache index: RocksDB under the state dir, mapping each step's
//! cache key to what the step produced.
//!
//! RocksDB admits one writer process at a time, and builds sharing a state
//! dir run at once. So no build keeps the database open: lookups open it
//! read-only under a shared file lock, and writes open it read-write for
//! the moment they take under the same lock held exclusively, which others
//! wait on instead of failing. (A read-only open alongside a writer can
//! find the files its MANIFEST names already compacted away.)
//!
//! A read-only open is kept for the next read, as long as no writer has
//! been since: writers count their writes in the lock file, and a reader
//! that finds the count (and the index dir's mtime) as it was reuses the
//! database it opened, under the shared lock again. Opening is most of
//! what a lookup costs, and a no-change build looks up several times.
//!
//! Opening for writing costs more (a new log, the OPTIONS file, syncs), so
//! a build's entries (its stages' steps, the stat cache, layer tables) wait
//! for the next write, or for [`Index::flush`] at the build's end, and go
//! in one batch; until then this process reads them from memory. A small
//! batch of new entries goes to the journal (`journal.rs`) instead, which
//! readers read over the database, and which the next read-write open
//! merges: a large batch, a full journal, or a removal.
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::error::{CacheStoreError, Cause, IoContext, Result};
use crate::journal::Journal;
use crate::manifest::Layer;
use crate::state::StateDir;

/// Column family of step entries, by cache key.
const STEPS: &str = "steps";
/// The context stat cache: a file's identity (path, size, times, inode)
/// to its content hash, so unchanged files are not read again.
const STATS: &str = "stats";
/// The base-image cache: `reference#platform` to what it resolved to.
const BASES: &str = "bases";
/// When each step entry was last used (a hit), for GC: an old entry that
/// builds keep hitting is kept.
const USED: &str = "used";
/// Layers' metadata tables (what each path is, not its content), by
/// diff_id: COPY-only steps are built from them without unpacking.
const VIEWS: &str = "views";
const FAMILIES: &[&str] = &[STEPS, STATS, BASES, USED, VIEWS];
/// The journal holds fewer batches than this (the write that would make
/// it this many merges it), each of at most this many bytes (a larger one
/// goes to the database at once): every reader reads the whole journal.
const JOURNAL_BATCHES: usize = 16;
const JOURNAL_BATCH_BYTES: usize = 128 << 10;

/// A base image as last resolved: the digest its reference pointed at
/// (an index's, for multi-platform images) and the platform's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseEntry {
    pub top_digest: crate::digest::Digest,
    pub manifest: crate::manifest::ResolvedManifest,
    /// Seconds since the epoch.
    pub checked: u64,
    /// When `kiln warm` last warmed it (seconds since the epoch): `kiln
    /// cache gc` keeps the blobs and unpacked layers of a base warmed
    /// within its `--older-than`. `None`: only builds resolved it.
    #[serde(default)]
    pub warmed: Option<u64>,
}

/// What a step produced: its layer (none when it changed no file) and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEntry {
    pub layer: Option<Layer>,
    /// Seconds since the epoch; entries older than the TTL are misses.
    pub created: u64,
    /// A lazy layer: its compressed blob was never made, because nothing
    /// needed it. `layer`'s descriptor is then its uncompressed tar (the
    /// digest is the diff_id), which is not stored either: the files are
    /// kept in the layer's unpacked directory (`unpacked/<diff_id>`), and
    /// this blob in the store is the recipe (`kiln_engine`'s
    /// `build::blobs`) that writes the same tar from them. An older Kiln
    /// finds no blob for the descriptor and takes the entry as a miss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<crate::digest::Digest>,
}

impl StepEntry {
    pub fn new(layer: Option<Layer>) -> Self {
        StepEntry {
            layer,
            created: now_secs(),
            lazy: None,
        }
    }

    /// The diff_id of a lazy entry's layer, whose unpacked directory is
    /// the only copy of its files.
    pub fn lazy_diff_id(&self) -> Option<&crate::digest::Digest> {
        self.lazy
            .as_ref()
            .and(self.layer.as_ref().map(|l| &l.diff_id))
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
    journal: Journal,
    /// The last read-only open, shared by the clones.
    reader: Arc<Mutex<Option<Reader>>>,
    /// Entries not written yet (see the module's doc), shared by the
    /// clones.
    pending: Arc<Mutex<Pending>>,
}

/// Entries waiting for the next write, by family, then key.
type Pending = HashMap<&'static str, HashMap<Vec<u8>, Vec<u8>>>;

/// The journal's entries, the newest of each key, by family, then key.
type Journaled = HashMap<String, HashMap<Vec<u8>, Vec<u8>>>;

/// A read-only open of the index (none before the first merge) and the
/// journal, and the writes they have seen.
struct Reader {
    db: Option<Arc<DB>>,
    journal: Arc<Journaled>,
    stamp: Stamp,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("stamp", &self.stamp)
            .finish()
    }
}

/// What tells that a writer has been: the writes counted in the lock file
/// and the index dir's mtime (every read-write open makes a log file
/// there, so writers that do not count, older Kilns, change it too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    writes: u64,
    modified: Option<SystemTime>,
}

/// A read-only open of the index; the lock is let go after the reads.
struct ReadOnly {
    db: Option<Arc<DB>>,
    journal: Arc<Journaled>,
    _lock: File,
}

impl Index {
    pub fn open(state: &StateDir) -> Result<Index> {
        Ok(Index {
            path: state.index(),
            lock: state.index_lock(),
            journal: Journal::new(state.index_journal()),
            reader: Arc::default(),
            pending: Arc::default(),
        })
    }

    fn error(&self, e: impl Into<Cause>) -> CacheStoreError {
        CacheStoreError::Index {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn options(create: bool) -> Options {
        let mut opts = Options::default();
        opts.create_if_missing(create);
        opts.create_missing_column_families(create);
        opts.set_keep_log_file_num(2);
        opts.set_max_open_files(64);
        // The index is opened for every lookup, and its tables are few and
        // small: loading them on 16 threads per column family spawned ~150
        // threads a no-change build, and reading table stats only delays it.
        opts.set_max_file_opening_threads(1);
        opts.set_skip_stats_update_on_db_open(true);
        // Info lines (every option of every column family, each open) cost
        // a millisecond or two of formatting per open; warnings stay.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts
    }

    /// The lock file, opened for reading and counting writes (never
    /// truncated: it holds the count).
    fn lock_file(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock)
            .at(&self.lock)
    }

    /// The lock writers (and `clear`) hold alone.
    fn exclusive_lock(&self) -> Result<File> {
        let lock = self.lock_file()?;
        lock.lock().at(&self.lock)?;
        Ok(lock)
    }

    /// Readers share the lock writers hold alone: a read-only open must not
    /// meet a writer deleting the files its MANIFEST names (compaction).
    fn shared_lock(&self) -> Result<File> {
        let lock = self.lock_file()?;
        lock.lock_shared().at(&self.lock)?;
        Ok(lock)
    }

    /// The writes counted in the (locked) lock file; none when it is new.
    fn writes(&self, mut lock: &File) -> Result<u64> {
        let mut count = [0u8; 8];
        lock.seek(SeekFrom::Start(0)).at(&self.lock)?;
        match lock.read_exact(&mut count) {
            Ok(()) => Ok(u64::from_le_bytes(count)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            Err(e) => Err(e).at(&self.lock),
        }
    }

    /// Counts a write, under the exclusive lock.
    fn count_write(&self, mut lock: &File) -> Result<()> {
        // This process's read-only open is stale now, counted or not.
        *self.reader.lock().expect("index reader poisoned") = None;
        let writes = self.writes(lock)?.wrapping_add(1);
        lock.seek(SeekFrom::Start(0)).at(&self.lock)?;
        lock.write_all(&writes.to_le_bytes()).at(&self.lock)
    }

    /// Opens the database read-only under the shared lock, or reuses the
    /// last open when no writer has been since. Every family this Kiln
    /// writes is asked for; an index an older Kiln made, without some of
    /// them, is opened with the ones it has.
    fn open_read(&self) -> Result<ReadOnly> {
        let lock = self.shared_lock()?;
        let stamp = Stamp {
            writes: self.writes(&lock)?,
            modified: std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok(),
        };
        let mut reader = self.reader.lock().expect("index reader poisoned");
        if let Some(cached) = reader.as_ref().filter(|r| r.stamp == stamp) {
            return Ok(ReadOnly {
                db: cached.db.clone(),
                journal: cached.journal.clone(),
                _lock: lock,
            });
        }
        // The stale one first: two opens at once cost memory for nothing.
        *reader = None;
        let db = match self.path.join("CURRENT").exists() {
            true => Some(Arc::new(self.open_database_read_only()?)),
            false => None,
        };
        let mut journal = Journaled::new();
        for batch in self.journal.read()? {
            for (family, key, value) in batch {
                journal.entry(family).or_default().insert(key, value);
            }
        }
        let journal = Arc::new(journal);
        *reader = Some(Reader {
            db: db.clone(),
            journal: journal.clone(),
            stamp,
        });
        Ok(ReadOnly {
            db,
            journal,
            _lock: lock,
        })
    }

    fn open_database_read_only(&self) -> Result<DB> {
        let opts = Self::options(false);
        match DB::open_cf_for_read_only(&opts, &self.path, FAMILIES, false) {
            Ok(db) => Ok(db),
            Err(_) => {
                let families = DB::list_cf(&opts, &self.path).map_err(|e| self.error(e))?;
                DB::open_cf_for_read_only(&opts, &self.path, &families, false)
                    .map_err(|e| self.error(e))
            }
        }
    }

    /// Whether nothing was ever written (nor merged), so there is nothing
    /// to open or lock for a read.
    fn never_written(&self) -> Result<bool> {
        Ok(!self.path.join("CURRENT").exists() && self.journal.is_empty()?)
    }

    /// Reads many keys of one column family at once, read-only, so any
    /// number of builds read together. A family an older Kiln did not
    /// create reads as empty.
    fn get_raw(&self, family: &str, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut found = self.get_stored(family, keys)?;
        let pending = self.pending.lock().expect("index pending poisoned");
        if let Some(pending) = pending.get(family) {
            for (key, slot) in keys.iter().zip(&mut found) {
                if let Some(value) = pending.get(*key) {
                    *slot = Some(value.clone());
                }
            }
        }
        Ok(found)
    }

    /// [`Self::get_raw`] from the journal and the database alone.
    fn get_stored(&self, family: &str, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut found = vec![None; keys.len()];
        if keys.is_empty() || self.never_written()? {
            return Ok(found);
        }
        let read = self.open_read()?;
        let journaled = read.journal.get(family);
        let mut asked = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match journaled.and_then(|j| j.get(*key)) {
                Some(value) => found[i] = Some(value.clone()),
                None => asked.push(i),
            }
        }
        let Some((db, cf)) = read
            .db
            .as_ref()
            .and_then(|db| Some((db, db.cf_handle(family)?)))
        else {
            return Ok(found);
        };
        for (i, value) in asked
            .iter()
            .zip(db.multi_get_cf(asked.iter().map(|i| (cf, keys[*i]))))
        {
            found[*i] = value.map_err(|e| self.error(e))?;
        }
        Ok(found)
    }

    /// Looks up many keys at once; a key never recorded is `None`.
    pub fn get_steps(&self, keys: &[String]) -> Result<Vec<Option<StepEntry>>> {
        let raw: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        Ok(self
            .get_raw(STEPS, &raw)?
            .into_iter()
            // An entry that does not parse (a newer Kiln's?) is a miss.
            .map(|v| v.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
            .collect())
    }

    pub fn get_base(&self, key: &str) -> Result<Option<BaseEntry>> {
        Ok(self
            .get_raw(BASES, &[key.as_bytes()])?
            .pop()
            .flatten()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    pub fn put_base(&self, key: &str, entry: &BaseEntry) -> Result<()> {
        let value = serde_json::to_vec(entry).map_err(|e| self.error(e))?;
        self.defer(BASES, [(key.as_bytes().to_vec(), value)]);
        self.flush()
    }

    /// Records that these entries were just used. A use recorded in the
    /// last hour stands: a rebuild that hits then needs no write, and
    /// opening the index for writing (recovering its log, syncing) is most
    /// of what a no-change rebuild costs the index. GC counts in days.
    pub fn touch_steps(&self, keys: &[String]) -> Result<()> {
        const FRESH: u64 = 3600;
        let now = now_secs();
        let stale: Vec<&String> = keys
            .iter()
            .zip(self.last_used(keys)?)
            .filter(|(_, used)| used.is_none_or(|t| t.saturating_add(FRESH) < now))
            .map(|(key, _)| key)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let uses = stale
            .into_iter()
            .map(|key| (key.as_bytes().to_vec(), now.to_le_bytes().to_vec()));
        self.defer(USED, uses);
        self.flush()
    }

    /// When each entry was last used (its creation when never hit since).
    pub fn last_used(&self, keys: &[String]) -> Result<Vec<Option<u64>>> {
        let raw: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        Ok(self
            .get_raw(USED, &raw)?
            .into_iter()
            .map(|v| v.and_then(|b| Some(u64::from_le_bytes(b.try_into().ok()?))))
            .collect())
    }

    /// A layer's metadata table (opaque bytes), by diff_id.
    pub fn get_view(&self, diff_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.get_raw(VIEWS, &[diff_id.as_bytes()])?.remove(0))
    }

    /// Written with the next write or [`Self::flush`].
    pub fn put_view(&self, diff_id: &str, table: &[u8]) {
        self.defer(VIEWS, [(diff_id.as_bytes().to_vec(), table.to_vec())]);
    }

    /// Stat-cache lookups: opaque values by opaque keys.
    pub fn get_stats(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let raw: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        self.get_raw(STATS, &raw)
    }

    /// Written with the next write or [`Self::flush`].
    pub fn put_stats(&self, entries: Vec<(Vec<u8>, Vec<u8>)>) {
        self.defer(STATS, entries);
    }

    fn defer(&self, family: &'static str, entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_some() {
            let mut pending = self.pending.lock().expect("index pending poisoned");
            pending.entry(family).or_default().extend(entries);
        }
    }

    /// Writes the entries still waiting (see the module's doc), if any.
    pub fn flush(&self) -> Result<()> {
        if self
            .pending
            .lock()
            .expect("index pending poisoned")
            .is_empty()
        {
            return Ok(());
        }
        self.write_families(&[], |_, _| {})
    }

    /// Every entry, for listing, GC and verification.
    pub fn all_steps(&self) -> Result<Vec<(String, StepEntry)>> {
        let mut out = Vec::new();
        self.each(STEPS, |key, value| {
            if let Ok(entry) = serde_json::from_slice(value) {
                out.push((String::from_utf8_lossy(key).into_owned(), entry));
            }
        })?;
        Ok(out)
    }

    /// Every base-image entry, for GC.
    pub fn all_bases(&self) -> Result<Vec<(String, BaseEntry)>> {
        let mut out = Vec::new();
        self.each(BASES, |key, value| {
            if let Ok(entry) = serde_json::from_slice(value) {
                out.push((String::from_utf8_lossy(key).into_owned(), entry));
            }
        })?;
        Ok(out)
    }

    /// How many step entries there are, without decoding them.
    pub fn step_count(&self) -> Result<usize> {
        let mut count = 0;
        self.each(STEPS, |_, _| count += 1)?;
        Ok(count)
    }

    /// Calls `f` with every key and value of a family, in key order (a
    /// family an older Kiln did not create has none).
    fn each(&self, family: &str, mut f: impl FnMut(&[u8], &[u8])) -> Result<()> {
        if self.never_written()? {
            return Ok(());
        }
        let read = self.open_read()?;
        let journaled = read.journal.get(family).filter(|j| !j.is_empty());
        let mut merged = BTreeMap::new();
        if let Some((db, cf)) = read
            .db
            .as_ref()
            .and_then(|db| Some((db, db.cf_handle(family)?)))
        {
            for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
                let (key, value) = item.map_err(|e| self.error(e))?;
                match journaled {
                    // In order as they come, with nothing to merge.
                    None => f(&key, &value),
                    Some(_) => drop(merged.insert(key.into_vec(), value.into_vec())),
                }
            }
        }
        for (key, value) in journaled.into_iter().flatten() {
            merged.insert(key.clone(), value.clone());
        }
        for (key, value) in &merged {
            f(key, value);
        }
        Ok(())
    }

    /// Removes entries (GC, verify, prune).
    pub fn remove_steps(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() || self.never_written()? {
            return Ok(());
        }
        // Their use records too, or they would outlive them forever.
        self.write_families(&[STEPS, USED], |cfs, batch| {
            for cf in cfs {
                for key in keys {
                    batch.delete_cf(cf, key.as_bytes());
                }
            }
        })
    }

    /// Empties the index, every family (`kiln cache prune`): under the
    /// writers' lock, which also keeps readers out.
    pub fn clear(&self) -> Result<()> {
        let lock = self.exclusive_lock()?;
        self.pending.lock().expect("index pending poisoned").clear();
        self.journal.clear()?;
        match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&self.path),
            _ => self.count_write(&lock),
        }
    }

    /// Records entries, waiting for any other writer to finish first.
    pub fn put_steps(&self, entries: &[(String, StepEntry)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.defer_steps(entries)?;
        self.flush()
    }

    /// Records entries with the next write or [`Self::flush`]: a build's
    /// stages, at its end, in one read-write open.
    pub fn defer_steps(&self, entries: &[(String, StepEntry)]) -> Result<()> {
        let values = entries
            .iter()
            .map(|(k, e)| {
                let value = serde_json::to_vec(e).map_err(|e| self.error(e))?;
                Ok((k.as_bytes().to_vec(), value))
            })
            .collect::<Result<Vec<_>>>()?;
        self.defer(STEPS, values);
        Ok(())
    }

    /// Writes the entries waiting, under the writers' lock, with what
    /// `fill` adds to the batch (over `families`): to the journal when
    /// that is all and they are few, else to the database, opened
    /// read-write for the moment, with the journal merged first.
    fn write_families(
        &self,
        families: &[&str],
        fill: impl FnOnce(&[&rocksdb::ColumnFamily], &mut WriteBatch),
    ) -> Result<()> {
        let lock = self.exclusive_lock()?;
        // Taken now: if the write fails, they cost only time.
        let pending = std::mem::take(&mut *self.pending.lock().expect("index pending poisoned"));
        let entries = || {
            pending.iter().flat_map(|(family, entries)| {
                entries
                    .iter()
                    .map(|(k, v)| (*family, k.as_slice(), v.as_slice()))
            })
        };
        let bytes: usize = entries().map(|(_, k, v)| k.len() + v.len()).sum();
        if families.is_empty()
            && bytes <= JOURNAL_BATCH_BYTES
            && self.journal.len()? + 1 < JOURNAL_BATCHES
        {
            self.journal
                .append(self.writes(&lock)?.wrapping_add(1), entries())?;
            self.count_write(&lock)?;
            return Ok(());
        }
        let db =
            DB::open_cf(&Self::options(true), &self.path, FAMILIES).map_err(|e| self.error(e))?;
        let cf = |family: &str| {
            db.cf_handle(family)
                .ok_or_else(|| self.error(format!("no {family} column family")))
        };
        let mut batch = WriteBatch::default();
        // The journal first, oldest batch first: what follows is newer.
        for (family, key, value) in self.journal.read()?.into_iter().flatten() {
            // A family this Kiln does not know (a newer one's) is dropped.
            if let Ok(cf) = cf(&family) {
                batch.put_cf(cf, key, value);
            }
        }
        let cfs = families.iter().map(|f| cf(f)).collect::<Result<Vec<_>>>()?;
        fill(&cfs, &mut batch);
        for (family, key, value) in entries() {
            batch.put_cf(cf(family)?, key, value);
        }
        // Emptied before the write: should this process die between the
        // two, the journal's entries are lost, and a removal in this batch
        // is not undone by them at the next merge.
        self.journal.clear()?;
        db.write(batch).map_err(|e| self.error(e))?;
        // Into tables now: left in the log, it would be replayed by every
        // read-only open until the next read-write one, which the journal
        // makes rare (a 50k-file stat cache: 60 ms per open).
        let all: Vec<_> = FAMILIES.iter().filter_map(|f| db.cf_handle(f)).collect();
        db.flush_cfs_opt(&all, &rocksdb::FlushOptions::default())
            .map_err(|e| self.error(e))?;
        // Dropping the database before the lock lets the next writer in.
        drop(db);
        self.count_write(&lock)?;
        drop(lock);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest;
    use crate::manifest::{Descriptor, MediaType};

    fn layer(n: u8) -> Layer {
        Layer {
            descriptor: Descriptor::new(MediaType::ImageLayerGzip, digest::sha256(&[n]), n as u64),
            diff_id: digest::sha256(&[n, n]),
        }
    }

    #[test]
    fn records_and_finds_steps() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
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
    fn a_kept_read_only_open_sees_another_writers_entries() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        // Two opens stand for two builds (processes) on one state dir.
        let (reader, writer) = (Index::open(&state).unwrap(), Index::open(&state).unwrap());
        let keys = ["a".to_string(), "b".to_string()];
        let a = StepEntry::new(Some(layer(1)));
        writer.put_steps(&[("a".into(), a.clone())]).unwrap();
        assert_eq!(
            reader.get_steps(&keys).unwrap(),
            vec![Some(a.clone()), None]
        );
        let opened = || {
            reader
                .reader
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .journal
                .clone()
        };
        let kept = opened();
        // Kept while nobody writes...
        reader.get_steps(&keys).unwrap();
        assert!(Arc::ptr_eq(&kept, &opened()));
        // ...and opened again once someone has.
        let b = StepEntry::new(None);
        writer.put_steps(&[("b".into(), b.clone())]).unwrap();
        assert_eq!(reader.get_steps(&keys).unwrap(), vec![Some(a), Some(b)]);
        writer.clear().unwrap();
        assert_eq!(reader.get_steps(&keys).unwrap(), vec![None, None]);
    }

    #[test]
    fn removed_steps_take_their_use_records_along() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
        let keys = ["a".to_string(), "b".to_string()];
        index
            .put_steps(&keys.clone().map(|k| (k, StepEntry::new(Some(layer(1))))))
            .unwrap();
        index.touch_steps(&keys).unwrap();
        index.remove_steps(&keys[..1]).unwrap();
        let used = index.last_used(&keys).unwrap();
        assert!(used[0].is_none() && used[1].is_some(), "{used:?}");
    }

    #[test]
    fn a_use_within_the_hour_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
        let keys = ["recent".to_string(), "old".to_string()];
        let now = now_secs();
        index.defer(
            USED,
            [
                (b"recent".to_vec(), (now - 1800).to_le_bytes().to_vec()),
                (b"old".to_vec(), (now - 7200).to_le_bytes().to_vec()),
            ],
        );
        index.flush().unwrap();
        index.touch_steps(&keys).unwrap();
        let used = index.last_used(&keys).unwrap();
        assert_eq!(used[0], Some(now - 1800));
        assert!(used[1].is_some_and(|t| t >= now), "{used:?}");
    }

    #[test]
    fn writers_in_many_threads_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
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
    fn stat_cache_round_trips_and_is_separate_from_steps() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
        let keys = vec![b"a".to_vec(), b"b".to_vec()];
        assert_eq!(index.get_stats(&keys).unwrap(), vec![None, None]);
        index.put_stats(vec![(b"a".to_vec(), b"hash".to_vec())]);
        assert_eq!(
            index.get_stats(&keys).unwrap(),
            vec![Some(b"hash".to_vec()), None]
        );
        assert_eq!(index.get_steps(&["a".into()]).unwrap(), vec![None]);
    }

    /// Stat-cache and table entries wait for the next write (here of step
    /// entries) or a flush: this process reads them at once, another only
    /// once written, and clearing the index drops them too.
    #[test]
    fn cache_entries_go_with_the_next_write_or_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (index, other) = (Index::open(&state).unwrap(), Index::open(&state).unwrap());
        let a = vec![b"a".to_vec()];
        index.put_stats(vec![(a[0].clone(), b"hash".to_vec())]);
        index.put_view("sha256:t", b"table");
        assert_eq!(index.get_stats(&a).unwrap(), [Some(b"hash".to_vec())]);
        assert_eq!(index.get_view("sha256:t").unwrap().unwrap(), b"table");
        assert_eq!(other.get_stats(&a).unwrap(), [None]);
        index
            .put_steps(&[("k".into(), StepEntry::new(None))])
            .unwrap();
        assert_eq!(other.get_stats(&a).unwrap(), [Some(b"hash".to_vec())]);
        assert_eq!(other.get_view("sha256:t").unwrap().unwrap(), b"table");

        let b = vec![b"b".to_vec()];
        index.put_stats(vec![(b[0].clone(), b"hash b".to_vec())]);
        assert_eq!(other.get_stats(&b).unwrap(), [None]);
        index.flush().unwrap();
        assert_eq!(other.get_stats(&b).unwrap(), [Some(b"hash b".to_vec())]);

        index.put_stats(vec![(b"c".to_vec(), b"hash c".to_vec())]);
        index.clear().unwrap();
        index.flush().unwrap();
        assert_eq!(other.get_stats(&[b"c".to_vec()]).unwrap(), [None]);
    }

    /// Small writes go to the journal, which readers read over the
    /// database; the write that would fill it merges it, newest entry of
    /// each key winning, and so does a batch too large for it.
    #[test]
    fn small_writes_wait_in_the_journal_until_a_write_merges_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (index, other) = (Index::open(&state).unwrap(), Index::open(&state).unwrap());
        // A fixed time, so that entries made a second apart compare equal.
        let entry = |n| StepEntry {
            created: 1,
            ..StepEntry::new(Some(layer(n)))
        };
        let last = JOURNAL_BATCHES as u8 - 2;
        for n in 0..=last {
            let batch = [("k".into(), entry(n)), (format!("k{n}"), entry(n))];
            index.put_steps(&batch).unwrap();
            assert_eq!(other.get_steps(&["k".into()]).unwrap(), [Some(entry(n))]);
        }
        assert_eq!(index.journal.len().unwrap(), JOURNAL_BATCHES - 1);
        assert!(!state.index().join("CURRENT").exists());
        assert_eq!(other.all_steps().unwrap().len(), last as usize + 2);
        index.put_steps(&[("k".into(), entry(100))]).unwrap();
        assert!(index.journal.is_empty().unwrap());
        assert!(state.index().join("CURRENT").exists());
        assert_eq!(other.get_steps(&["k".into()]).unwrap(), [Some(entry(100))]);
        let keys: Vec<String> = (0..=last).map(|n| format!("k{n}")).collect();
        let found = other.get_steps(&keys).unwrap();
        assert_eq!(
            found,
            (0..=last).map(|n| Some(entry(n))).collect::<Vec<_>>()
        );

        index.put_steps(&[("k".into(), entry(101))]).unwrap();
        assert_eq!(index.journal.len().unwrap(), 1);
        index.put_stats(vec![(b"big".to_vec(), vec![7; JOURNAL_BATCH_BYTES + 1])]);
        index.flush().unwrap();
        assert!(index.journal.is_empty().unwrap());
        assert_eq!(other.get_steps(&["k".into()]).unwrap(), [Some(entry(101))]);
        let big = other.get_stats(&[b"big".to_vec()]).unwrap().remove(0);
        assert_eq!(big.map(|b| b.len()), Some(JOURNAL_BATCH_BYTES + 1));
    }

    /// A write that reaches the database leaves nothing in RocksDB's log
    /// for read-only opens to replay.
    #[test]
    fn a_database_write_leaves_no_log_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let index = Index::open(&state).unwrap();
        index.put_stats(vec![(b"big".to_vec(), vec![7; JOURNAL_BATCH_BYTES + 1])]);
        index.flush().unwrap();
        let logs: Vec<u64> = std::fs::read_dir(state.index())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len())
            .collect();
        assert!(logs.iter().all(|len| *len == 0), "logs: {logs:?}");
    }

    /// A removal merges the journal before it removes, so an entry that
    /// waited there is gone too and stays gone.
    #[test]
    fn a_removal_takes_what_the_journal_held() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let (index, other) = (Index::open(&state).unwrap(), Index::open(&state).unwrap());
        let keys = ["a".to_string(), "b".to_string()];
        index
            .put_steps(&keys.clone().map(|k| (k, StepEntry::new(Some(layer(1))))))
            .unwrap();
        assert_eq!(index.journal.len().unwrap(), 1);
        other.remove_steps(&keys[..1]).unwrap();
        assert!(index.journal.is_empty().unwrap());
        index.put_stats(vec![(b"s".to_vec(), b"h".to_vec())]);
        index.flush().unwrap();
        let found = other.get_steps(&keys).unwrap();
        assert!(found[0].is_none() && found[1].is_some(), "{found:?}");
        let listed: Vec<String> = other
            .all_steps()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(listed, ["b"]);
    }

    #[test]
    fn old_entries_expire() {
        let mut entry = StepEntry::new(None);
        assert!(!entry.expired(Duration::from_secs(60)));
        entry.created -= 120;
        assert!(entry.expired(Duration::from_secs(60)));
    }
}
