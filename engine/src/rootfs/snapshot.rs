//! Snapshots of a root: what is there after a step, compared with what was
//! there before, walked in parallel.
//!
//! A path counts as changed when its type, mode, owner, size, mtime, ctime,
//! inode, device or link target changed. A directory counts when its mode,
//! owner, inode or xattrs changed, or its mtime was set to a time outside
//! the step: entries made or removed in it show by themselves. ctime cannot
//! be set by a step, so a write that restores the mtime is still seen. The one blind spot of
//! metadata, a write within the same clock tick as the previous snapshot
//! ("racy" entries, as git calls them), is closed by hashing exactly those
//! files when they are recorded and comparing content later.
use std::collections::{HashMap, HashSet};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use super::{hash_file, mtime_set_outside, sorted_xattrs, unix_secs, Recorded};

/// How a snapshot decides that a path changed (`--snapshot-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Metadata (type, mode, owner, size, mtime, ctime, inode, device),
    /// plus content hashes for racy files. Never misses a visible change.
    #[default]
    Redo,
    /// Redo, plus a content hash of every regular file: for filesystems
    /// whose ctime cannot be trusted. Costs a read of every file.
    Full,
    /// Type and mtime only, as Kaniko's `time` mode: fastest, but blind to
    /// chmod, chown and writes that restore the mtime.
    Time,
}

/// Timestamps closer than this to the snapshot may hide a later write.
const RACY_WINDOW: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    rdev: u64,
    /// blake3 of the content: racy regular files, or all in `Full` mode.
    hash: Option<[u8; 32]>,
    /// Directories: blake3 of their xattrs, a change to a directory that
    /// its mode, owner and inode do not show.
    xattrs: Option<[u8; 32]>,
    /// When this was recorded (unix seconds).
    recorded: i64,
}

impl EntryMeta {
    /// Whether `new` differs from `self` in what `mode` looks at.
    fn changed(&self, new: &EntryMeta, mode: SnapshotMode, host: &Path) -> io::Result<bool> {
        let kind = |m: &EntryMeta| rustix::fs::FileType::from_raw_mode(m.mode);
        // A directory whose entries changed is written as their parent
        // anyway; so creating and removing a mount point, or a temp file,
        // leaves it out, as the overlay snapshotter does.
        if self.is_dir() && new.is_dir() {
            let dir = |m: &EntryMeta| (m.mode, m.uid, m.gid, m.ino, m.xattrs);
            return Ok(dir(self) != dir(new)
                || (self.mtime != new.mtime
                    && mtime_set_outside(new.mtime.0, self.recorded, new.recorded)));
        }
        if mode == SnapshotMode::Time {
            return Ok(kind(self) != kind(new) || self.mtime != new.mtime);
        }
        if !self.same_metadata(new) {
            return Ok(true);
        }
        match (self.hash, new.hash) {
            (Some(old), Some(new)) => Ok(old != new),
            (Some(old), None) => Ok(hash_file(host)? != old),
            _ => Ok(false),
        }
    }

    fn is_dir(&self) -> bool {
        rustix::fs::FileType::from_raw_mode(self.mode) == rustix::fs::FileType::Directory
    }

    fn same_metadata(&self, other: &EntryMeta) -> bool {
        (
            self.mode, self.uid, self.gid, self.size, self.mtime, self.ctime, self.ino, self.rdev,
        ) == (
            other.mode,
            other.uid,
            other.gid,
            other.size,
            other.mtime,
            other.ctime,
            other.ino,
            other.rdev,
        )
    }
}

/// What changed between two snapshots of a root, as relative paths.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Added or modified paths, sorted so parents come before children.
    pub upserts: Vec<PathBuf>,
    /// Deleted paths whose parent still exists (children of a deleted
    /// directory need no whiteout of their own).
    pub deletes: Vec<PathBuf>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// The recorded state of a root.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    entries: HashMap<PathBuf, EntryMeta>,
    recorded: Recorded,
    mode: SnapshotMode,
    /// Not root: owners and modes are read from `owners`' xattr. Taken
    /// once, as the walk runs on a thread pool.
    owners_recorded: bool,
}

impl Snapshot {
    /// Records the whole root, what `recorded` records of it.
    pub fn scan(root: &Path, mode: SnapshotMode, recorded: Recorded) -> io::Result<Snapshot> {
        let mut snapshot = Snapshot {
            entries: HashMap::new(),
            recorded,
            mode,
            owners_recorded: super::owners::recorded(),
        };
        snapshot.rescan(root, &[PathBuf::new()])?;
        Ok(snapshot)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Re-walks the given subtrees (relative paths; empty = the whole root),
    /// records their new state, and returns what changed in them. COPY and
    /// WORKDIR pass the paths they touched; RUN passes the whole root.
    pub fn rescan(&mut self, root: &Path, subtrees: &[PathBuf]) -> io::Result<Changes> {
        let now = SystemTime::now();
        // Each path walked once: a subtree inside another is dropped.
        let mut subtrees = subtrees.to_vec();
        subtrees.sort();
        subtrees.dedup_by(|later, earlier| later.starts_with(earlier));
        let subtrees = &subtrees[..];
        let mut fresh: Vec<(PathBuf, EntryMeta)> = Vec::new();
        for top in subtrees {
            let host = root.join(top);
            if top.as_os_str().is_empty() {
                fresh.extend(self.walk(root, Path::new(""), now)?);
                continue;
            }
            if !self.recorded.records(top) {
                continue;
            }
            match fs::symlink_metadata(&host) {
                Ok(meta) => {
                    let is_dir = meta.is_dir();
                    fresh.push((top.clone(), self.record(top, || host.clone(), &meta, now)));
                    if is_dir && !self.recorded.skips_contents_of(top) {
                        fresh.extend(self.walk(root, top, now)?);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }

        // Hash lookups, and sorting only what changed: ordered maps of
        // paths spent most of a 100k-file rescan comparing components.
        let mut changes = Changes::default();
        let mut seen = 0;
        for (path, meta) in &fresh {
            let changed = match self.entries.get(path) {
                None => true,
                Some(old) => {
                    seen += 1;
                    old.changed(meta, self.mode, &root.join(path))?
                }
            };
            if changed {
                changes.upserts.push(path.clone());
            }
        }
        changes.upserts.sort();
        let in_scope = |p: &Path| {
            subtrees
                .iter()
                .any(|top| top.as_os_str().is_empty() || p.starts_with(top))
        };
        // Everything recorded before was seen again: nothing is gone.
        let mut gone: Vec<PathBuf> = Vec::new();
        if seen != self.entries.keys().filter(|p| in_scope(p)).count() {
            let now_there: HashSet<&Path> = fresh.iter().map(|(p, _)| p.as_path()).collect();
            gone = self
                .entries
                .keys()
                .filter(|p| in_scope(p) && !now_there.contains(p.as_path()))
                .cloned()
                .collect();
            // Parents first, so a deleted directory covers its children.
            gone.sort();
        }
        // Recorded first, so a parent below is looked up as it is now.
        self.entries.extend(fresh);
        for path in gone {
            self.entries.remove(&path);
            let parent_is_dir = match path.parent() {
                Some(p) if p.as_os_str().is_empty() => true,
                Some(p) => self.entries.get(p).is_some_and(EntryMeta::is_dir),
                None => false,
            };
            // A deleted child of a deleted (or replaced) directory is covered by its parent.
            let parent_gone_or_replaced = path.parent().is_some_and(|p| {
                !p.as_os_str().is_empty() && changes.deletes.iter().any(|d| p.starts_with(d))
            });
            if parent_is_dir && !parent_gone_or_replaced {
                changes.deletes.push(path);
            }
        }
        Ok(changes)
    }

    fn walk(
        &self,
        root: &Path,
        rel: &Path,
        now: SystemTime,
    ) -> io::Result<Vec<(PathBuf, EntryMeta)>> {
        let dir = root.join(rel);
        let entries: Vec<fs::DirEntry> = fs::read_dir(&dir)?.collect::<io::Result<_>>()?;
        let nested: Vec<Vec<(PathBuf, EntryMeta)>> = entries
            .par_iter()
            .map(|entry| {
                let path = rel.join(entry.file_name());
                if self.recorded.ignores(&path) {
                    return Ok(Vec::new());
                }
                // DirEntry::metadata does not follow symlinks.
                let meta = entry.metadata()?;
                let mut out = vec![(
                    path.clone(),
                    self.record(&path, || entry.path(), &meta, now),
                )];
                if meta.is_dir() && !self.recorded.skips_contents_of(&path) {
                    out.extend(self.walk(root, &path, now)?);
                }
                Ok(out)
            })
            .collect::<io::Result<_>>()?;
        Ok(nested.into_iter().flatten().collect())
    }

    /// `host` makes the host path of `path`, needed only to hash a file's
    /// content or list a directory's xattrs.
    fn record(
        &self,
        path: &Path,
        host: impl Fn() -> PathBuf,
        meta: &Metadata,
        now: SystemTime,
    ) -> EntryMeta {
        let ctime =
            UNIX_EPOCH + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec() as u32);
        let racy = now.duration_since(ctime).map_or(true, |d| d < RACY_WINDOW);
        let hashed = meta.is_file()
            && match self.mode {
                SnapshotMode::Full => true,
                SnapshotMode::Redo => racy,
                SnapshotMode::Time => false,
            };
        // Not root: the owner and mode the build meant, as the layer
        // writer reads them (`owners.rs`); the file type is on disk.
        let (mode, uid, gid) = match self.owners_recorded {
            false => (meta.mode(), meta.uid(), meta.gid()),
            true => {
                let stat = super::owners::get(&host(), meta);
                ((meta.mode() & !0o7777) | stat.mode, stat.uid, stat.gid)
            }
        };
        EntryMeta {
            mode,
            uid,
            gid,
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            rdev: meta.rdev(),
            // An unreadable file counts as changed later (hash mismatch).
            hash: hashed.then(|| hash_file(&host()).unwrap_or([0; 32])),
            recorded: unix_secs(now),
            xattrs: meta.is_dir().then(|| {
                // Setting an xattr moves the ctime: a directory whose inode
                // and ctime are as recorded, with that ctime well before the
                // record (file times come from a coarse clock), keeps its
                // xattrs, and a rescan need not list them again.
                let kept = self.entries.get(path).and_then(|old| {
                    let same = old.ino == meta.ino()
                        && old.ctime == (meta.ctime(), meta.ctime_nsec())
                        && old.ctime.0 + 2 < old.recorded;
                    old.xattrs.filter(|_| same)
                });
                if let Some(hash) = kept {
                    return hash;
                }
                let mut hasher = blake3::Hasher::new();
                for (name, value) in sorted_xattrs(&host()) {
                    for part in [&name, &value] {
                        hasher.update(&(part.len() as u64).to_le_bytes());
                        hasher.update(part);
                    }
                }
                *hasher.finalize().as_bytes()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn paths(v: &[PathBuf]) -> Vec<String> {
        v.iter().map(|p| p.display().to_string()).collect()
    }

    #[test]
    fn sees_adds_modifies_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "1").unwrap();
        fs::write(root.join("keep"), "k").unwrap();
        fs::create_dir_all(root.join("proc/1")).unwrap();
        let mut snap =
            Snapshot::scan(root, SnapshotMode::Redo, Recorded::new(&["proc"], &[])).unwrap();
        assert!(!snap.entries.contains_key(Path::new("proc/1")));

        fs::write(root.join("a/b/f"), "2").unwrap(); // same size, racy
        fs::write(root.join("new"), "n").unwrap();
        fs::set_permissions(root.join("keep"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir_all(root.join("proc/2")).unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["a/b/f", "keep", "new"]);
        assert!(changes.deletes.is_empty());

        fs::remove_dir_all(root.join("a")).unwrap();
        symlink("/x", root.join("keep2")).unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["keep2"]);
        assert_eq!(paths(&changes.deletes), ["a"]);
        assert!(snap.rescan(root, &[PathBuf::new()]).unwrap().is_empty());
    }

    #[test]
    fn a_directory_changes_by_mode_owner_xattrs_or_a_time_set_on_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        let mut snap = Snapshot::scan(root, SnapshotMode::Redo, Recorded::new(&[], &[])).unwrap();
        // A mount point made and removed again around a RUN.
        fs::write(root.join("etc/hosts"), "").unwrap();
        fs::remove_file(root.join("etc/hosts")).unwrap();
        assert!(snap.rescan(root, &[PathBuf::new()]).unwrap().is_empty());
        rustix::fs::setxattr(
            root.join("etc"),
            "user.kiln",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["etc"]);
        fs::set_permissions(root.join("etc"), fs::Permissions::from_mode(0o700)).unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["etc"]);
        // touch -d 2001-09-09 /etc
        let past = rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        };
        let times = rustix::fs::Timestamps {
            last_access: past,
            last_modification: past,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            root.join("etc"),
            &times,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["etc"]);
    }

    #[test]
    fn a_dir_replaced_by_a_file_needs_no_child_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("d/e")).unwrap();
        fs::write(root.join("d/e/f"), "1").unwrap();
        let mut snap = Snapshot::scan(root, SnapshotMode::Redo, Recorded::new(&[], &[])).unwrap();
        fs::remove_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d"), "file now").unwrap();
        let changes = snap.rescan(root, &[PathBuf::new()]).unwrap();
        assert_eq!(paths(&changes.upserts), ["d"]);
        assert!(changes.deletes.is_empty(), "{:?}", changes.deletes);
    }

    #[test]
    fn modes_differ_in_what_they_see() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("f"), "1").unwrap();
        fs::create_dir(root.join("ignored")).unwrap();
        let ignore = [PathBuf::from("ignored")];
        let mut time =
            Snapshot::scan(root, SnapshotMode::Time, Recorded::new(&[], &ignore)).unwrap();
        let mut full =
            Snapshot::scan(root, SnapshotMode::Full, Recorded::new(&[], &ignore)).unwrap();
        assert!(full.entries[Path::new("f")].hash.is_some());
        assert!(!time.entries.contains_key(Path::new("ignored")));
        fs::set_permissions(root.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(root.join("ignored/x"), "x").unwrap();
        // chmod leaves the mtime alone: `time` is blind to it, `full` is not.
        assert!(time.rescan(root, &[PathBuf::new()]).unwrap().is_empty());
        assert_eq!(
            paths(&full.rescan(root, &[PathBuf::new()]).unwrap().upserts),
            ["f"]
        );
    }

    #[test]
    fn rescan_of_a_subtree_leaves_the_rest_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("app")).unwrap();
        fs::write(root.join("other"), "o").unwrap();
        let mut snap = Snapshot::scan(root, SnapshotMode::Redo, Recorded::new(&[], &[])).unwrap();
        fs::write(root.join("app/x"), "x").unwrap();
        fs::remove_file(root.join("other")).unwrap();
        let changes = snap.rescan(root, &[PathBuf::from("app/x")]).unwrap();
        assert_eq!(paths(&changes.upserts), ["app/x"]);
        assert!(changes.deletes.is_empty());
        assert!(snap.entries.contains_key(Path::new("other")));
    }
}
