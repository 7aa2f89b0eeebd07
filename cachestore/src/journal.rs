//! The index's journal: small batches of entries, a file each, waiting to
//! be merged into the database.
//!
//! Opening RocksDB for writing costs a build 5–10 ms, whatever it writes:
//! the last writer's log is recovered into tables, and a new MANIFEST and
//! OPTIONS file are written (and the latter parsed back) and synced. Most
//! builds that write at all write a few small entries (a step, a stat, a
//! layer's table). Those go here instead, and the index merges the journal
//! into the database at its next read-write open, which a large batch, a
//! full journal, a removal or `kiln cache gc` makes.
//!
//! The index's lock file orders it all: batches are appended and merged
//! under its exclusive lock, and read under its shared lock. A batch is
//! written to a temporary name and renamed, and it ends with its blake3
//! hash: a batch cut short (a crash, a power loss before the data reached
//! the disk) reads as no batch, which costs cache hits, never wrong ones.
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use crate::error::{IoContext, Result};

/// What a batch file starts with (the format's version is in it).
const MAGIC: &[u8] = b"kiln-index-batch 1\n";
/// A batch's name: its number (the index's write count), zero-padded so
/// that names sort as numbers do.
const SUFFIX: &str = ".batch";
const HASH: usize = blake3::OUT_LEN;

/// One write's entries, in order: (column family, key, value).
pub type Batch = Vec<(String, Vec<u8>, Vec<u8>)>;

/// The journal's directory, beside the database.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(dir: PathBuf) -> Journal {
        Journal { dir }
    }

    /// Writes `entries` as batch number `number`. The caller holds the
    /// index's exclusive lock.
    pub fn append<'a>(
        &self,
        number: u64,
        entries: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [u8])>,
    ) -> Result<()> {
        // Private, as every dir in the state dir is.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .at(&self.dir)?;
        let bytes = encode(entries);
        let name = self.dir.join(format!("{number:020}{SUFFIX}"));
        let tmp = self.dir.join(format!("{number:020}.tmp"));
        fs::write(&tmp, &bytes).at(&tmp)?;
        fs::rename(&tmp, &name).at(&name)
    }

    /// The batches, oldest first; one that does not read whole is left
    /// out. The caller holds the index's lock, shared or exclusive.
    pub fn read(&self) -> Result<Vec<Batch>> {
        let mut names = self.names()?;
        names.sort();
        let mut batches = Vec::with_capacity(names.len());
        for name in names {
            let path = self.dir.join(&name);
            match fs::read(&path) {
                Ok(bytes) => batches.extend(decode(&bytes)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).at(&path),
            }
        }
        Ok(batches)
    }

    /// How many batches wait.
    pub fn len(&self) -> Result<usize> {
        Ok(self.names()?.len())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Removes every batch, and what a writer killed mid-write left. The
    /// caller holds the index's exclusive lock.
    pub fn clear(&self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at(&self.dir),
            _ => Ok(()),
        }
    }

    fn names(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).at(&self.dir),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.at(&self.dir)?.file_name();
            if let Some(name) = name.to_str().filter(|n| n.ends_with(SUFFIX)) {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
}

/// MAGIC, then per entry the family (u8 length), key and value (u32
/// lengths, little-endian), then the blake3 hash of all that.
fn encode<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [u8])>) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (family, key, value) in entries {
        let family = &family.as_bytes()[..family.len().min(u8::MAX as usize)];
        out.push(family.len() as u8);
        out.extend_from_slice(family);
        for part in [key, value] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<Batch> {
    let (body, hash) = bytes.split_at_checked(bytes.len().checked_sub(HASH)?)?;
    if blake3::hash(body).as_bytes() != hash {
        return None;
    }
    let mut rest = body.strip_prefix(MAGIC)?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let mut batch = Batch::new();
    while let Some(len) = take(1) {
        let family = String::from_utf8(take(len[0] as usize)?.to_vec()).ok()?;
        let mut part = || -> Option<Vec<u8>> {
            let len = u32::from_le_bytes(take(4)?.try_into().ok()?);
            Some(take(len as usize)?.to_vec())
        };
        let (key, value) = (part()?, part()?);
        batch.push((family, key, value));
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn entries(batch: &Batch) -> Vec<(&str, &[u8], &[u8])> {
        batch
            .iter()
            .map(|(f, k, v)| (f.as_str(), k.as_slice(), v.as_slice()))
            .collect()
    }

    #[test]
    fn batches_read_back_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("journal"));
        assert!(journal.read().unwrap().is_empty());
        let second: Batch = vec![("steps".into(), b"k".to_vec(), b"new".to_vec())];
        let first: Batch = vec![
            ("steps".into(), b"k".to_vec(), b"old".to_vec()),
            ("stats".into(), Vec::new(), vec![0; 70_000]),
        ];
        // Oldest first by number, whatever order they were written in.
        journal.append(10, entries(&second)).unwrap();
        journal.append(9, entries(&first)).unwrap();
        assert_eq!(journal.read().unwrap(), vec![first, second]);
        let meta = fs::metadata(dir.path().join("journal")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(journal.len().unwrap(), 2);
        journal.clear().unwrap();
        assert!(journal.is_empty().unwrap());
    }

    #[test]
    fn a_batch_cut_short_or_damaged_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().to_path_buf());
        let batch: Batch = vec![("views".into(), b"sha256:x".to_vec(), b"table".to_vec())];
        journal.append(1, entries(&batch)).unwrap();
        let path = dir.path().join(format!("{:020}{SUFFIX}", 1));
        let whole = fs::read(&path).unwrap();
        for cut in [0, 5, MAGIC.len() + 3, whole.len() - 1] {
            fs::write(&path, &whole[..cut]).unwrap();
            assert!(journal.read().unwrap().is_empty(), "cut at {cut}");
        }
        let mut flipped = whole.clone();
        flipped[MAGIC.len() + 2] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert!(journal.read().unwrap().is_empty());
        // A leftover temporary file is no batch, and clear takes it too.
        fs::write(dir.path().join("00000000000000000002.tmp"), &whole).unwrap();
        fs::write(&path, &whole).unwrap();
        assert_eq!(journal.read().unwrap(), vec![batch]);
        journal.clear().unwrap();
        assert!(!dir.path().exists());
    }
}
