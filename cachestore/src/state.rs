//! The state dir (`--cache-dir`) and where everything in it lives: this is
//! the one file that names a path inside it.
//!
//! ```text
//! blobs/          the blob store (BlobStore)
//! index/          the cache index, RocksDB (Index), locked through index.lock
//! unpacked/       layers unpacked for the overlay snapshotter (UnpackedLayers)
//! mounts/         RUN --mount=type=cache directories, each with a .lock beside it
//! builds/build-*  running builds' work dirs, each holding builds/build-*/lock
//! context-*       contexts fetched for a build (tar, git), for its length
//! ```
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const BLOBS: &str = "blobs";
const INDEX: &str = "index";
const INDEX_LOCK: &str = "index.lock";
const UNPACKED: &str = "unpacked";
const MOUNTS: &str = "mounts";

/// The state dir: the blob store, the cache index, unpacked layers, cache
/// mounts and the work dirs of running builds.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Where one `RUN --mount=type=cache` directory lives, and the lock file
/// `sharing=locked` and `sharing=private` take for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    pub dir: PathBuf,
    pub lock: PathBuf,
}

impl StateDir {
    /// The state dir at `root`, made if it is not there.
    pub fn open(root: impl Into<PathBuf>) -> Result<StateDir> {
        let root = root.into();
        // Made with the default mode. Restricting who may read the state
        // (0700) belongs here, the one place the state dir is made.
        fs::create_dir_all(&root).at(&root)?;
        Ok(StateDir { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The blob store's directory.
    pub fn blobs(&self) -> PathBuf {
        self.root.join(BLOBS)
    }

    /// The cache index's database.
    pub fn index(&self) -> PathBuf {
        self.root.join(INDEX)
    }

    /// The file lock readers and writers of the index take.
    pub fn index_lock(&self) -> PathBuf {
        self.root.join(INDEX_LOCK)
    }

    /// The overlay snapshotter's unpacked layers.
    pub fn unpacked(&self) -> PathBuf {
        self.root.join(UNPACKED)
    }

    /// `RUN --mount=type=cache` directories, kept across builds.
    pub fn mounts(&self) -> PathBuf {
        self.root.join(MOUNTS)
    }

    /// The cache mount `id` names: a directory under [`StateDir::mounts`]
    /// named by the id's BLAKE3 hash, so any id is a safe file name.
    pub fn cache_mount(&self, id: &str) -> CacheMount {
        let dir = self
            .mounts()
            .join(blake3::hash(id.as_bytes()).to_hex().as_str());
        CacheMount {
            lock: dir.with_extension("lock"),
            dir,
        }
    }

    /// A directory for a context a build fetched (a tarball's, a Git
    /// checkout), removed when dropped.
    pub fn new_context_dir(&self) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("context-")
            .tempdir_in(&self.root)
            .at(&self.root)
    }
}
