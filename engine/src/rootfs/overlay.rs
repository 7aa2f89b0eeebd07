//! The overlay snapshotter. Every layer is unpacked once into a directory
//! of its own (see `kiln_cachestore::unpacked`) in overlayfs's format, and
//! a root is an overlay of those directories. A step runs on a fresh upper
//! dir over them, so what it changed is the upper dir alone: reading it
//! costs what the step changed, not what the root holds, and once the
//! step's layer is written from it, the upper dir becomes that layer's
//! directory. Nothing is unpacked twice and nothing is copied.
//!
//! Overlayfs marks a deleted path with a 0:0 character device and a
//! directory that replaced a lower one whole with the
//! `trusted.overlay.opaque` xattr; both become deletions in [`Changes`], so
//! the layer writer turns them into OCI whiteouts.
//!
//! The mounts live in a mount namespace of Kiln's own
//! ([`enter_private_mount_namespace`]): they vanish with the process,
//! however it ends.
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::{Mode, OFlags, Timespec, Timestamps};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

use super::extract::{OVERLAY_OPAQUE, OVERLAY_XATTR_PREFIX};
use super::snapshot::Changes;
use super::{mtime_set_outside, sorted_xattrs, unix_secs, xattr_names, Recorded};

/// Moves this process into a mount namespace of its own, where the overlay
/// snapshotter may mount (see `BuildOptions::own_mount_namespace`). Call it
/// while the process has one thread.
pub fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: called before any other thread exists.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS)? };
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    Ok(())
}

/// An overlay mount, detached when dropped.
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::DETACH) {
            tracing::warn!(target = %self.target.display(), error = %e, "unmounting an overlay");
        }
    }
}

/// Mounts an overlay of `lowers` (bottom first) at `target`: read-only, or
/// writable into `upper` (with `work`, overlayfs's scratch dir) when given.
/// A read-only overlay needs two lowers; an empty dir serves as the second.
pub fn mount(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
) -> io::Result<Mounted> {
    // Every dir is named by descriptor, so the options stay short however
    // many layers there are, and no path's `,` or `:` can break them.
    let open = |dir: &Path| {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let named = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_raw_fd());
    let fds: Vec<OwnedFd> = lowers
        .iter()
        .rev()
        .map(|l| open(l))
        .collect::<Result<_, _>>()?;
    let lowerdir: Vec<String> = fds.iter().map(named).collect();
    // No redirects or metadata-only copy-ups: an upper dir must hold whole
    // files, as a layer does.
    let mut options = format!(
        "lowerdir={},redirect_dir=off,metacopy=off",
        lowerdir.join(":")
    );
    let upper_fds = match upper {
        Some((upper, work)) => vec![open(upper)?, open(work)?],
        None => Vec::new(),
    };
    let flags = match &upper_fds[..] {
        [upper, work] => {
            options += &format!(",upperdir={},workdir={}", named(upper), named(work));
            MountFlags::empty()
        }
        _ => MountFlags::RDONLY,
    };
    // index=on keeps hard links whole across copy-up. volatile skips the
    // syncs: unmounting a writable overlay otherwise syncs the whole
    // filesystem under the upper dir (0.1 s and more after a build wrote),
    // and a step's own fsyncs (dpkg's, per file) wait for the disk. An
    // upper dir is a cache, like an extracted layer, which is not synced
    // either; buildah mounts its build containers volatile too. Older
    // kernels (volatile: 5.10) or filesystems without file handles (index)
    // refuse them, so each is dropped in turn.
    let extras: &[&str] = match upper {
        Some(_) => &[",index=on,volatile", ",index=on", ",volatile", ""],
        None => &[""],
    };
    let attempts = extras.iter().map(|extra| format!("{options}{extra}"));
    let mut last = None;
    for options in attempts {
        let options = std::ffi::CString::new(options).map_err(io::Error::other)?;
        match rustix::mount::mount(
            "overlay",
            target,
            "overlay",
            flags,
            Some(options.as_c_str()),
        ) {
            Ok(()) => {
                return Ok(Mounted {
                    target: target.to_path_buf(),
                })
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("one attempt at least").into())
}

/// Overlayfs's view of one path in one lower layer.
enum Lower {
    Found(fs::Metadata),
    /// A whiteout, or a non-directory on the way: nothing below shows.
    Hidden,
    /// Not there; `opaque` when an ancestor hides the layers below.
    Missing {
        opaque: bool,
    },
}

fn lower_entry(layer: &Path, rel: &Path) -> Lower {
    if rel.as_os_str().is_empty() {
        return fs::symlink_metadata(layer).map_or(Lower::Missing { opaque: false }, Lower::Found);
    }
    let mut host = layer.to_path_buf();
    let mut opaque = false;
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        host.push(part);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            return Lower::Missing { opaque };
        };
        if is_whiteout(&meta) {
            return Lower::Hidden;
        }
        if parts.peek().is_none() {
            return Lower::Found(meta);
        }
        // Symlinks are never followed: they are image content.
        if !meta.is_dir() {
            return Lower::Hidden;
        }
        opaque |= is_opaque(&host);
    }
    Lower::Missing { opaque }
}

/// What the stack shows at `rel`: the topmost layer holding it and its
/// metadata.
fn lookup(lowers: &[PathBuf], rel: &Path) -> Option<(usize, fs::Metadata)> {
    for (i, layer) in lowers.iter().enumerate().rev() {
        match lower_entry(layer, rel) {
            Lower::Found(meta) => return Some((i, meta)),
            Lower::Hidden | Lower::Missing { opaque: true } => return None,
            Lower::Missing { opaque: false } => {}
        }
    }
    None
}

/// The names the stack shows in the directory `rel`.
fn lower_children(lowers: &[PathBuf], rel: &Path) -> io::Result<Vec<OsString>> {
    let mut shown = Vec::new();
    let mut hidden = HashSet::new();
    for layer in lowers.iter().rev() {
        match lower_entry(layer, rel) {
            Lower::Found(meta) if meta.is_dir() => {
                let dir = layer.join(rel);
                for entry in fs::read_dir(&dir)? {
                    let entry = entry?;
                    let name = entry.file_name();
                    if !hidden.insert(name.clone()) {
                        continue;
                    }
                    if !is_whiteout(&entry.metadata()?) {
                        shown.push(name);
                    }
                }
                if is_opaque(&dir) {
                    break;
                }
            }
            Lower::Found(_) | Lower::Hidden | Lower::Missing { opaque: true } => break,
            Lower::Missing { opaque: false } => {}
        }
    }
    Ok(shown)
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    let mut value = [0u8; 4];
    matches!(
        rustix::fs::lgetxattr(path, OVERLAY_OPAQUE, &mut value),
        Ok(1) if value[0] == b'y'
    )
}

fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes overlayfs's bookkeeping xattrs (origin, impure...), keeping
/// only the opaque mark, so the upper dir reads as a plain lower layer.
fn strip_overlay_xattrs(path: &Path) -> io::Result<()> {
    for name in xattr_names(path).unwrap_or_default() {
        if name.starts_with(OVERLAY_XATTR_PREFIX) && name != OVERLAY_OPAQUE.as_bytes() {
            rustix::fs::lremovexattr(path, OsStr::from_bytes(&name))?;
        }
    }
    Ok(())
}

/// Turns a step's upper dir, over `lowers` (bottom first), into its
/// changes, and leaves it fit to be the step's layer directory:
///
/// * paths `recorded` leaves out (`--ignore-path`, under /proc...) are
///   removed;
/// * a directory copied up for nothing (empty, same mode, owner and xattrs
///   as below, no mtime set outside the step, which started at `since`: a
///   mount point was made and removed in it) is dropped;
/// * the other hard links of a copied-up file join it, as they did in the
///   step's view (index=on) and as on a plain filesystem;
/// * overlayfs's bookkeeping xattrs are stripped.
pub fn settle_upper(
    upper: &Path,
    lowers: &[PathBuf],
    recorded: &Recorded,
    since: SystemTime,
) -> io::Result<Changes> {
    let mut settler = Settler {
        upper,
        lowers,
        recorded,
        step: (unix_secs(since), unix_secs(SystemTime::now())),
        changes: Changes::default(),
        linked: Vec::new(),
    };
    settler.dir(Path::new(""), false, true)?;
    strip_overlay_xattrs(upper)?;
    settler.relink()?;
    Ok(settler.changes)
}

struct Settler<'a> {
    upper: &'a Path,
    lowers: &'a [PathBuf],
    recorded: &'a Recorded,
    /// The step's start and end (unix seconds).
    step: (i64, i64),
    changes: Changes,
    /// Copied-up files that had other links below: (path, layer, inode).
    linked: Vec<(PathBuf, usize, u64)>,
}

impl Settler<'_> {
    /// `hidden`: an ancestor replaced its lower dir whole, so nothing
    /// below it in the lower layers shows through. `shown`: the lower
    /// layers show a directory at `rel` (else nothing below it is looked up).
    fn dir(&mut self, rel: &Path, hidden: bool, shown: bool) -> io::Result<()> {
        for name in sorted_names(&self.upper.join(rel))? {
            let r = rel.join(&name);
            let up = self.upper.join(&r);
            if !self.recorded.records(&r) {
                remove_any(&up)?;
                continue;
            }
            let meta = fs::symlink_metadata(&up)?;
            if is_whiteout(&meta) {
                self.changes.deletes.push(r);
                continue;
            }
            let below = match shown && !hidden {
                true => lookup(self.lowers, &r),
                false => None,
            };
            if !meta.is_dir() {
                if let Some((layer, low)) = &below {
                    if meta.is_file() && low.is_file() && low.nlink() > 1 {
                        self.linked.push((r.clone(), *layer, low.ino()));
                    }
                }
                strip_overlay_xattrs(&up)?;
                self.changes.upserts.push(r);
                continue;
            }
            let opaque = hidden || is_opaque(&up);
            if opaque {
                for child in lower_children(self.lowers, &r)? {
                    if fs::symlink_metadata(up.join(&child)).is_err()
                        && self.recorded.records(&r.join(&child))
                    {
                        self.changes.deletes.push(r.join(&child));
                    }
                }
            }
            let mark = (self.changes.upserts.len(), self.changes.deletes.len());
            self.changes.upserts.push(r.clone());
            let shown = below.as_ref().is_some_and(|(_, low)| low.is_dir());
            self.dir(&r, opaque, shown)?;
            strip_overlay_xattrs(&up)?;
            let empty = mark == (self.changes.upserts.len() - 1, self.changes.deletes.len())
                && fs::read_dir(&up)?.next().is_none();
            // The xattrs are read last, for the few dirs it still decides.
            let unchanged = || {
                below.as_ref().is_some_and(|(layer, low)| {
                    low.is_dir()
                        && low.mode() == meta.mode()
                        && low.uid() == meta.uid()
                        && low.gid() == meta.gid()
                        && (low.mtime() == meta.mtime()
                            || !mtime_set_outside(meta.mtime(), self.step.0, self.step.1))
                        && sorted_xattrs(&self.lowers[*layer].join(&r)) == sorted_xattrs(&up)
                })
            };
            if !opaque && empty && unchanged() {
                fs::remove_dir(&up)?;
                self.changes.upserts.pop();
            }
        }
        Ok(())
    }

    /// Links into the upper dir the other names of each copied-up file
    /// that had several: found in the one layer that held the file.
    fn relink(&mut self) -> io::Result<()> {
        let mut by_layer: HashMap<usize, Vec<(PathBuf, u64)>> = HashMap::new();
        for (path, layer, ino) in std::mem::take(&mut self.linked) {
            by_layer.entry(layer).or_default().push((path, ino));
        }
        for (layer, files) in by_layer {
            let inodes: HashMap<u64, &PathBuf> = files.iter().map(|(p, i)| (*i, p)).collect();
            let mut names = Vec::new();
            find_inodes(&self.lowers[layer], Path::new(""), &inodes, &mut names)?;
            for (other, ino) in names {
                let copied = inodes[&ino];
                let shown =
                    lookup(self.lowers, &other).is_some_and(|(l, m)| l == layer && m.ino() == ino);
                if other == **copied || !shown || !self.visible_in_upper(&other) {
                    continue;
                }
                self.make_parents(&other)?;
                fs::hard_link(self.upper.join(copied), self.upper.join(&other))?;
                self.changes.upserts.push(other);
            }
        }
        Ok(())
    }

    /// Whether the step left `rel` alone: nothing at it or above it in the
    /// upper dir hides it.
    fn visible_in_upper(&self, rel: &Path) -> bool {
        let mut host = self.upper.to_path_buf();
        for part in rel.components() {
            host.push(part);
            match fs::symlink_metadata(&host) {
                Err(_) => return true,
                Ok(m) if !m.is_dir() => return false,
                Ok(_) if is_opaque(&host) => return false,
                Ok(_) => {}
            }
        }
        false
    }

    /// Makes the missing parents of `rel` in the upper dir, as the lower
    /// layers have them.
    fn make_parents(&mut self, rel: &Path) -> io::Result<()> {
        let mut made = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            made.push(part);
            let host = self.upper.join(&made);
            if host.exists() {
                continue;
            }
            fs::create_dir(&host)?;
            if let Some((_, low)) = lookup(self.lowers, &made) {
                std::os::unix::fs::lchown(&host, Some(low.uid()), Some(low.gid()))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(low.mode() & 0o7777))?;
                set_times(&host, &low)?;
            }
            self.changes.upserts.push(made.clone());
        }
        Ok(())
    }
}

/// Collects (path, inode) of the regular files under `dir/rel` whose inode
/// is in `inodes`.
fn find_inodes<T>(
    dir: &Path,
    rel: &Path,
    inodes: &HashMap<u64, T>,
    out: &mut Vec<(PathBuf, u64)>,
) -> io::Result<()> {
    for entry in fs::read_dir(dir.join(rel))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let r = rel.join(entry.file_name());
        if meta.is_dir() {
            find_inodes(dir, &r, inodes, out)?;
        } else if meta.is_file() && inodes.contains_key(&meta.ino()) {
            out.push((r, meta.ino()));
        }
    }
    Ok(())
}

fn set_times(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let ts = |secs: i64, nanos: i64| Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &Timestamps {
            last_access: ts(meta.atime(), meta.atime_nsec()),
            last_modification: ts(meta.mtime(), meta.mtime_nsec()),
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower layer in overlayfs's format, made by hand.
    fn whiteout(path: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .unwrap();
    }

    fn opaque_dir(path: &Path) {
        fs::create_dir_all(path).unwrap();
        rustix::fs::setxattr(path, OVERLAY_OPAQUE, b"y", rustix::fs::XattrFlags::empty()).unwrap();
    }

    #[test]
    fn the_stack_is_read_as_overlayfs_does() {
        let dir = tempfile::tempdir().unwrap();
        let (bottom, top) = (dir.path().join("bottom"), dir.path().join("top"));
        for d in ["etc", "data/sub", "gone"] {
            fs::create_dir_all(bottom.join(d)).unwrap();
        }
        fs::write(bottom.join("etc/passwd"), "root").unwrap();
        fs::write(bottom.join("data/a"), "a").unwrap();
        fs::write(bottom.join("data/sub/b"), "b").unwrap();
        fs::create_dir_all(top.join("data")).unwrap();
        fs::write(top.join("data/c"), "c").unwrap();
        whiteout(&top.join("gone"));
        opaque_dir(&top.join("etc"));
        let lowers = [bottom.clone(), top.clone()];

        assert_eq!(lookup(&lowers, Path::new("data/a")).unwrap().0, 0);
        assert_eq!(lookup(&lowers, Path::new("data/c")).unwrap().0, 1);
        assert!(lookup(&lowers, Path::new("gone")).is_none());
        assert!(lookup(&lowers, Path::new("etc/passwd")).is_none());
        let mut data = lower_children(&lowers, Path::new("data")).unwrap();
        data.sort();
        assert_eq!(data, ["a", "c", "sub"]);
        assert!(lower_children(&lowers, Path::new("etc"))
            .unwrap()
            .is_empty());
        let mut root = lower_children(&lowers, Path::new("")).unwrap();
        root.sort();
        assert_eq!(root, ["data", "etc"]);
    }

    #[test]
    fn an_upper_dir_settles_into_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::create_dir_all(lower.join("app/old")).unwrap();
        fs::write(lower.join("app/old/x"), "x").unwrap();
        fs::write(lower.join("app/y"), "y").unwrap();
        fs::write(lower.join("f"), "f").unwrap();
        fs::hard_link(lower.join("f"), lower.join("f2")).unwrap();
        // The step: /etc copied up for a mount point and nothing else, /srv
        // given an xattr, /app replaced whole, /f written, /proc/x ignored.
        fs::create_dir_all(upper.join("etc")).unwrap();
        // /opt copied up and given an old mtime (touch -d).
        fs::create_dir_all(lower.join("opt")).unwrap();
        fs::create_dir_all(upper.join("opt")).unwrap();
        let past = rustix::fs::Timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 0,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            upper.join("opt"),
            &rustix::fs::Timestamps {
                last_access: past,
                last_modification: past,
            },
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        fs::create_dir_all(lower.join("srv")).unwrap();
        fs::create_dir_all(upper.join("srv")).unwrap();
        rustix::fs::setxattr(
            upper.join("srv").as_path(),
            "user.kiln",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        opaque_dir(&upper.join("app"));
        fs::write(upper.join("app/new"), "new").unwrap();
        fs::write(upper.join("f"), "F").unwrap();
        fs::create_dir_all(upper.join("proc")).unwrap();
        fs::write(upper.join("proc/x"), "").unwrap();
        whiteout(&upper.join("gone"));

        let changes = settle_upper(
            &upper,
            std::slice::from_ref(&lower),
            &Recorded::new(&["proc"], &[]),
            SystemTime::now(),
        )
        .unwrap();
        let strs = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
        };
        let mut upserts = strs(&changes.upserts);
        upserts.sort();
        let mut deletes = strs(&changes.deletes);
        deletes.sort();
        assert_eq!(upserts, ["app", "app/new", "f", "f2", "opt", "proc", "srv"]);
        assert_eq!(deletes, ["app/old", "app/y", "gone"]);
        assert!(!upper.join("etc").exists(), "the idle copy-up is dropped");
        assert!(!upper.join("proc/x").exists());
        let (f, f2) = (
            fs::metadata(upper.join("f")).unwrap(),
            fs::metadata(upper.join("f2")).unwrap(),
        );
        assert_eq!(f.ino(), f2.ino(), "the other link follows the written file");
        assert!(
            is_opaque(&upper.join("app")),
            "the opaque mark stays for stacking"
        );
    }
}
