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
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const BLOBS: &str = "blobs";
const INDEX: &str = "index";
const INDEX_LOCK: &str = "index.lock";
const UNPACKED: &str = "unpacked";
const MOUNTS: &str = "mounts";
const BUILDS: &str = "builds";
/// Held by a build for as long as it runs, in its work dir.
const BUILD_LOCK: &str = "lock";

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

    /// The work dirs of builds: see [`StateDir::new_build`].
    pub fn builds(&self) -> PathBuf {
        self.root.join(BUILDS)
    }

    /// A work dir for a new build, `builds/build-*`, with its lock held
    /// until the [`BuildDir`] is dropped, which removes the dir.
    pub fn new_build(&self) -> Result<BuildDir> {
        let builds = self.builds();
        fs::create_dir_all(&builds).at(&builds)?;
        let dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&builds)
            .at(&builds)?;
        let lock_path = dir.path().join(BUILD_LOCK);
        let lock = File::create(&lock_path).at(&lock_path)?;
        lock.lock().at(&lock_path)?;
        Ok(BuildDir { dir, _lock: lock })
    }

    /// The work dirs in `builds/`, of running builds and of dead ones.
    pub(crate) fn build_dirs(&self) -> impl Iterator<Item = PathBuf> {
        fs::read_dir(self.builds())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
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

/// A running build's work dir: locked while it lives, so that `kiln cache
/// gc` leaves it alone, and removed when it is dropped.
pub struct BuildDir {
    // Fields drop in order: the dir goes before its lock is let go.
    dir: tempfile::TempDir,
    _lock: File,
}

impl BuildDir {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the build that made the work dir `dir` still runs (holds
    /// its lock); `None` when the dir has no lock file (yet).
    pub(crate) fn running(dir: &Path) -> Option<bool> {
        let lock = File::open(dir.join(BUILD_LOCK)).ok()?;
        Some(lock.try_lock().is_err())
    }
}
