//! The state dir (`--cache-dir`) and where everything in it lives: this is
//! the one file that names a path inside it.
//!
//! ```text
//! blobs/          the blob store (BlobStore)
//! index/          the cache index, RocksDB (Index), locked through index.lock
//! index.journal/  small batches of index entries waiting to be merged (Journal)
//! unpacked/       layers unpacked for the overlay snapshotter (UnpackedLayers)
//! made-by/        which unpacked layer a COPY last made, by its reuse key (UnpackedLayers)
//! mounts/         RUN --mount=type=cache directories, each with a .lock beside it
//! overlay-probed  what an overlay mount here succeeded with (the engine's probe.rs)
//! builds/build-*  running builds' work dirs, each holding builds/build-*/lock
//! context-*       contexts fetched for a build (tar, git), for its length
//! ```
//!
//! The state dir is private (0700): it holds base images' files with their
//! own modes, cache mounts and contexts, none of them other users' business.
//! That includes a base image's device nodes in `unpacked/`: they stay real
//! nodes, as overlayfs can only show a lower layer's device node if that
//! layer has one (a placeholder file would show the build's RUN steps, and
//! `COPY --from`, a regular file instead), and behind a 0700 dir only its
//! owner (root, or rootless, a user who cannot create real nodes at all)
//! reaches them, as root reaches any device anyway.
use std::fs::{self, DirBuilder, File, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

const BLOBS: &str = "blobs";
const INDEX: &str = "index";
const INDEX_LOCK: &str = "index.lock";
const INDEX_JOURNAL: &str = "index.journal";
const UNPACKED: &str = "unpacked";
const MADE_BY: &str = "made-by";
const MOUNTS: &str = "mounts";
const BUILDS: &str = "builds";
const OVERLAY_PROBED: &str = "overlay-probed";
/// Held by a build for as long as it runs, in its work dir.
const BUILD_LOCK: &str = "lock";
/// The mode of the state dir and the dirs made in it.
const PRIVATE: u32 = 0o700;

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
    /// The state dir at `root`, made private (0700) if it is not there,
    /// with its sub-dirs; an existing one others may enter is made private,
    /// with a warning.
    pub fn open(root: impl Into<PathBuf>) -> Result<StateDir> {
        let root = root.into();
        private_dir(&root)?;
        let mode = fs::metadata(&root).at(&root)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            // Its sub-dirs are left as they are: they are unreachable now.
            match fs::set_permissions(&root, Permissions::from_mode(PRIVATE)) {
                Ok(()) => tracing::warn!(
                    "state dir {}: was mode {mode:04o}, readable by other users; made it {PRIVATE:04o}",
                    root.display()
                ),
                // Someone else's dir, shared on purpose: use it as it is.
                Err(e) => tracing::warn!(
                    "state dir {}: mode {mode:04o} lets other users read it, and it cannot be made {PRIVATE:04o}: {e}",
                    root.display()
                ),
            }
        }
        let state = StateDir { root };
        for dir in [
            state.blobs(),
            state.unpacked(),
            state.made_by(),
            state.mounts(),
            state.builds(),
        ] {
            private_dir(&dir)?;
        }
        Ok(state)
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

    /// The index's journal (see `journal.rs`).
    pub fn index_journal(&self) -> PathBuf {
        self.root.join(INDEX_JOURNAL)
    }

    /// The file lock readers and writers of the index take.
    pub fn index_lock(&self) -> PathBuf {
        self.root.join(INDEX_LOCK)
    }

    /// The overlay snapshotter's unpacked layers.
    pub fn unpacked(&self) -> PathBuf {
        self.root.join(UNPACKED)
    }

    /// Records of the layer a step made last, by the step's reuse key: a
    /// file per key holding the layer's diff_id.
    pub fn made_by(&self) -> PathBuf {
        self.root.join(MADE_BY)
    }

    /// The record of a successful overlay probe: the conditions it held
    /// under, so a build under the same ones need not mount one again.
    pub fn overlay_probed(&self) -> PathBuf {
        self.root.join(OVERLAY_PROBED)
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
        spread_subdirs(dir.path());
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

/// Marks `dir` a top of directory hierarchies (ext4's `FS_TOPDIR_FL`),
/// so that ext4 places each directory made in it (a layer unpacked, a
/// RUN's upper dir) in a block group of its own choosing rather than next
/// to its parent. Next to its parent lie the inodes of the previous
/// build's work dir: a filesystem without a journal will not reuse an
/// inode freed within the last 30 seconds, and checks every such inode
/// on each allocation, which made unpacking a base image after removing
/// a state dir 5 times slower per run. A hint: other filesystems ignore
/// it or refuse it, and nothing depends on it.
fn spread_subdirs(dir: &Path) {
    use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
    let Ok(file) = File::open(dir) else { return };
    if let Ok(flags) = ioctl_getflags(&file) {
        let _ = ioctl_setflags(&file, flags | IFlags::TOPDIR);
    }
}

/// Makes `dir` and its missing parents 0700 (an existing dir is left alone).
fn private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE)
        .create(dir)
        .at(dir)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_state_dir_and_its_sub_dirs_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), Permissions::from_mode(0o755)).unwrap();
        let state = StateDir::open(tmp.path().join("new/state")).unwrap();
        assert_eq!(mode(state.path()), 0o700);
        assert_eq!(mode(&tmp.path().join("new")), 0o700);
        for dir in [
            state.blobs(),
            state.unpacked(),
            state.made_by(),
            state.mounts(),
            state.builds(),
        ] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
        // Opening it again changes nothing.
        StateDir::open(state.path()).unwrap();
        assert_eq!(mode(state.path()), 0o700);
    }

    #[test]
    fn an_existing_state_dir_others_can_read_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        for old in [0o755, 0o750, 0o701, 0o777] {
            fs::create_dir_all(root.join("blobs")).unwrap();
            fs::write(root.join("blobs/kept"), "x").unwrap();
            fs::set_permissions(&root, Permissions::from_mode(old)).unwrap();
            let state = StateDir::open(&root).unwrap();
            assert_eq!(mode(state.path()), 0o700, "was {old:o}");
            assert_eq!(fs::read_to_string(root.join("blobs/kept")).unwrap(), "x");
        }
    }
}
