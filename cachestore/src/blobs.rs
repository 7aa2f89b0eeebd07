//! The content-addressed blob store: `blobs/sha256/<hex>` under the state dir.
//!
//! A blob is written to a temp file in the same filesystem, fsynced, checked
//! against its expected digest and only then renamed into place, so readers
//! never see a partial or wrong blob, whatever happens to the writer.
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{self, Digest, HashingWriter};
use crate::error::{CacheStoreError, IoContext, Result};
use crate::manifest::{canonical_json, Descriptor, MediaType};
use crate::state::StateDir;

/// Under the store's directory: the blobs by digest, and writes under way.
const SHA256: &str = "sha256";
const TMP: &str = "tmp";

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
}

impl BlobStore {
    pub fn open(state: &StateDir) -> Result<Self> {
        let root = state.blobs();
        let store = Self { root };
        for dir in [store.sha256_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).at(&dir)?;
        }
        Ok(store)
    }

    /// Where blobs are, each named by its digest's hex.
    pub(crate) fn sha256_dir(&self) -> PathBuf {
        self.root.join(SHA256)
    }

    /// Where blobs are written before they are checked and moved in.
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP)
    }

    /// The store's own directory (`blobs/` under the state dir).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, digest: &Digest) -> Result<PathBuf> {
        Ok(self.sha256_dir().join(digest::hex(digest)?))
    }

    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self.path(digest)?.is_file())
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path(digest)?;
        File::open(&path).at(path)
    }

    pub fn size(&self, digest: &Digest) -> Result<u64> {
        let path = self.path(digest)?;
        Ok(fs::metadata(&path).at(path)?.len())
    }

    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut buf)
            .at(self.path(digest)?)?;
        Ok(buf)
    }

    /// Stores `bytes` and returns their digest (small blobs: configs, manifests).
    /// A blob already here is complete (see [`BlobWriter::commit`]), so a
    /// rebuild that makes the same config and manifest writes and syncs
    /// nothing.
    pub fn put(&self, bytes: &[u8]) -> Result<StoredBlob> {
        let digest = crate::digest::sha256(bytes);
        if self.contains(&digest)? {
            return Ok(StoredBlob {
                digest,
                size: bytes.len() as u64,
            });
        }
        let mut w = self.writer()?;
        w.write_all(bytes).at(&w.tmp_path)?;
        w.commit(None)
    }

    /// Stores a JSON document in its canonical form and describes it.
    pub fn put_json<T: serde::Serialize>(
        &self,
        media_type: MediaType,
        value: &T,
    ) -> Result<Descriptor> {
        let stored = self.put(&canonical_json(value))?;
        Ok(Descriptor::new(media_type, stored.digest, stored.size))
    }

    /// Starts a streamed write; nothing is visible until [`BlobWriter::commit`].
    pub fn writer(&self) -> Result<BlobWriter> {
        let dir = self.tmp_dir();
        let tmp = tempfile::NamedTempFile::new_in(&dir).at(&dir)?;
        let tmp_path = tmp.path().to_path_buf();
        Ok(BlobWriter {
            inner: HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp)),
            store: self.clone(),
            tmp_path,
        })
    }

    /// Re-hashes a stored blob; a blob that does not verify is removed so it
    /// is fetched again instead of being served.
    pub fn verify(&self, digest: &Digest) -> Result<bool> {
        let path = self.path(digest)?;
        let mut file = File::open(&path).at(&path)?;
        let mut hw = HashingWriter::new(std::io::sink());
        std::io::copy(&mut file, &mut hw).at(&path)?;
        let (_, actual, _) = hw.finish();
        if actual == *digest {
            return Ok(true);
        }
        fs::remove_file(&path).at(&path)?;
        Ok(false)
    }
}

pub struct BlobWriter {
    inner: HashingWriter<BufWriter<tempfile::NamedTempFile>>,
    store: BlobStore,
    tmp_path: PathBuf,
}

impl BlobWriter {
    /// Flushes, fsyncs, checks the digest against `expected` (when given) and
    /// moves the blob into place.
    pub fn commit(self, expected: Option<&Digest>) -> Result<StoredBlob> {
        let (buf, digest, size) = self.inner.finish();
        let tmp = buf
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.tmp_path)?;
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(CacheStoreError::DigestMismatch {
                    what: "blob".into(),
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        tmp.as_file().sync_all().at(&self.tmp_path)?;
        let dest = self.store.path(&digest)?;
        tmp.persist(&dest).map_err(|e| e.error).at(&dest)?;
        Ok(StoredBlob { digest, size })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_read_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let blob = store.put(b"layer bytes").unwrap();
        assert_eq!(blob.digest, digest::sha256(b"layer bytes"));
        assert_eq!(store.read(&blob.digest).unwrap(), b"layer bytes");
        assert!(store.verify(&blob.digest).unwrap());
    }

    #[test]
    fn a_wrong_digest_is_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"abc").unwrap();
        let expected = digest::sha256(b"abd");
        assert!(matches!(
            w.commit(Some(&expected)),
            Err(CacheStoreError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&expected).unwrap());
        assert!(!store.contains(&digest::sha256(b"abc")).unwrap());
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_corrupted_blob_is_removed_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let blob = store.put(b"good").unwrap();
        fs::write(store.path(&blob.digest).unwrap(), b"bad").unwrap();
        assert!(!store.verify(&blob.digest).unwrap());
        assert!(!store.contains(&blob.digest).unwrap());
    }
}
