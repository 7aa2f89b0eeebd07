//! The overlay snapshotter's second half: after a RUN on an overlay of the
//! root, its upper dir holds exactly what the step changed. This turns the
//! upper dir into [`Changes`] and applies it onto the root (the lower dir),
//! moving files rather than copying them, so a step costs what it changed,
//! not what the root holds.
//!
//! Overlayfs marks a deleted path with a 0:0 character device and a
//! directory that replaced a lower one whole with the
//! `trusted.overlay.opaque` xattr; both become deletions here, so the layer
//! writer turns them into OCI whiteouts.
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Timespec, Timestamps};

use super::snapshot::{Changes, Snapshot};

const OVERLAY_XATTRS: &str = "trusted.overlay.";

/// What applying an upper dir did.
#[derive(Debug, Default)]
struct Applied {
    changes: Changes,
    /// Files replaced while they had other hard links in the root:
    /// (path, the old inode).
    relinked: Vec<(PathBuf, u64)>,
}

/// Applies `upper` onto `root` and returns what changed (paths relative to
/// the root, parents before children). `before` is the root's state before
/// the step: it names the other links of a replaced file.
pub fn apply_upper(upper: &Path, root: &Path, before: &Snapshot) -> io::Result<Changes> {
    let mut applied = Applied::default();
    apply_dir(upper, root, Path::new(""), false, &mut applied)?;
    let mut changes = applied.changes;
    // The other links of a replaced file follow it, as they did in the
    // step's (index=on) view and as on a plain filesystem.
    for (path, ino) in &applied.relinked {
        for other in before.paths_of_inode(*ino) {
            let host = root.join(&other);
            if other == *path || changes.upserts.contains(&other) {
                continue;
            }
            if fs::symlink_metadata(&host).is_ok_and(|m| m.ino() == *ino) {
                fs::remove_file(&host)?;
                fs::hard_link(root.join(path), &host)?;
                changes.upserts.push(other);
            }
        }
    }
    Ok(changes)
}

fn sorted_names(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
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

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    let mut value = [0u8; 4];
    matches!(
        rustix::fs::lgetxattr(path, "trusted.overlay.opaque", &mut value),
        Ok(1) if value[0] == b'y'
    )
}

/// Overlayfs's own xattrs describe the upper dir, not the image.
fn strip_overlay_xattrs(path: &Path) -> io::Result<()> {
    let mut names = vec![0u8; 4096];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names) else {
        return Ok(());
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OVERLAY_XATTRS.as_bytes()) {
            rustix::fs::lremovexattr(path, OsStr::from_bytes(name))?;
        }
    }
    Ok(())
}

/// Gives `dest` (a directory) the owner, mode, xattrs and times of `src`.
fn copy_dir_metadata(src: &Path, meta: &fs::Metadata, dest: &Path) -> io::Result<()> {
    std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let mut names = vec![0u8; 4096];
    if let Ok(n) = rustix::fs::llistxattr(src, &mut names) {
        for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if name.starts_with(OVERLAY_XATTRS.as_bytes()) {
                continue;
            }
            let name = OsStr::from_bytes(name);
            let mut value = vec![0u8; 65536];
            let len = rustix::fs::lgetxattr(src, name, &mut value)?;
            rustix::fs::lsetxattr(dest, name, &value[..len], rustix::fs::XattrFlags::empty())?;
        }
    }
    set_times(dest, meta)
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

/// `hidden`: an ancestor replaced its lower dir whole, so nothing below
/// it in the lower dir shows through.
fn apply_dir(
    upper: &Path,
    root: &Path,
    rel: &Path,
    hidden: bool,
    applied: &mut Applied,
) -> io::Result<()> {
    for name in sorted_names(&upper.join(rel))? {
        let r: PathBuf = rel.join(&name);
        let (up, low) = (upper.join(&r), root.join(&r));
        let meta = fs::symlink_metadata(&up)?;
        if is_whiteout(&meta) {
            remove_any(&low)?;
            applied.changes.deletes.push(r);
        } else if meta.is_dir() {
            let opaque = hidden || is_opaque(&up);
            match fs::symlink_metadata(&low) {
                Ok(m) if m.is_dir() && opaque => {
                    // Replaced whole: what only the lower dir had is gone.
                    for child in sorted_names(&low)? {
                        if fs::symlink_metadata(up.join(&child)).is_err() {
                            remove_any(&low.join(&child))?;
                            applied.changes.deletes.push(r.join(&child));
                        }
                    }
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&low)?;
                    fs::create_dir(&low)?;
                }
                Err(_) => fs::create_dir(&low)?,
            }
            applied.changes.upserts.push(r.clone());
            apply_dir(upper, root, &r, opaque, applied)?;
            // After the children moved in, which touched its times.
            copy_dir_metadata(&up, &meta, &low)?;
        } else {
            if let Ok(old) = fs::symlink_metadata(&low) {
                if old.is_file() && old.nlink() > 1 {
                    applied.relinked.push((r.clone(), old.ino()));
                }
            }
            remove_any(&low)?;
            fs::rename(&up, &low)?;
            strip_overlay_xattrs(&low)?;
            applied.changes.upserts.push(r);
        }
    }
    Ok(())
}
