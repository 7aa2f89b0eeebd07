//! Hard links in a layer unpacked alone ([`Format::Overlay`]) whose target
//! is in a lower layer: where overlayfs would find the target in the stack
//! of layer directories, and a copy of it.
//!
//! The lower directories are untrusted content like the layer itself, so
//! the lookup never leaves them: every step is one name, opened with
//! `O_NOFOLLOW` in a directory already reached, and symlinks on the way are
//! followed by the code here, inside the stack (an absolute target or `..`
//! above the top restarts at, or stays at, the stack's root), as
//! `RESOLVE_IN_ROOT` does for a single root.

use super::*;

/// A directory of the merged view: the layers that have it, top first,
/// down to the first opaque one (or the first layer where the name is not
/// a directory), each opened for reading.
type Merged = Vec<(usize, OwnedFd)>;

/// Whether `st` is an overlayfs whiteout (a 0:0 character device).
fn is_whiteout(st: &Stat) -> bool {
    file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Whether the directory `dir` hides what lower layers have at its path.
fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 1];
    matches!(rustix::fs::fgetxattr(dir, OVERLAY_OPAQUE, &mut value), Ok(1) if value == *b"y")
}

fn open_dir_at(dir: impl AsFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Finds `rel` (a cleaned relative path with a final name) in the merged
/// view of `layers` (bottom first) as overlayfs shows it: the parent
/// directories are resolved through the stack, following symlinks inside
/// it; the top-most layer that has the final name wins, unless that is a
/// whiteout, or a whiteout, an opaque directory or a non-directory of a
/// layer above hides the path. The final name is not followed. Returns the
/// index of the layer holding it and its parent directory there.
pub(super) fn find_in_stack(
    layers: &[BorrowedFd<'_>],
    rel: &Path,
) -> rustix::io::Result<Option<(usize, OwnedFd)>> {
    let Some(name) = rel.file_name() else {
        return Ok(None);
    };
    let Some(parent) = resolve_dir(layers, rel.parent().unwrap_or(Path::new("")))? else {
        return Ok(None);
    };
    for (layer, dir) in parent {
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(e),
            Ok(st) if is_whiteout(&st) => return Ok(None),
            Ok(_) => return Ok(Some((layer, dir))),
        }
    }
    Ok(None)
}

/// The merged directory at `rel`, or `None` when the path is missing,
/// hidden or not a directory in the merged view.
fn resolve_dir(layers: &[BorrowedFd<'_>], rel: &Path) -> rustix::io::Result<Option<Merged>> {
    let root = || -> rustix::io::Result<Merged> {
        layers
            .iter()
            .enumerate()
            .rev()
            .map(|(i, fd)| Ok((i, open_dir_at(fd, OsStr::new("."))?)))
            .collect()
    };
    // The merged directories from the root down to the current one.
    let mut path = vec![root()?];
    let mut pending: VecDeque<OsString> = components(rel).collect();
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if path.len() > 1 {
                path.pop();
            }
            continue;
        }
        let dir = path.last().expect("the root is never popped");
        // The top-most layer with `name` here decides what it is.
        let mut top = None;
        for (i, (_, fd)) in dir.iter().enumerate() {
            match rustix::fs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e),
                Ok(st) => {
                    top = Some((i, st));
                    break;
                }
            }
        }
        let Some((i, st)) = top else {
            return Ok(None);
        };
        match file_type(&st) {
            FileType::Symlink => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Errno::LOOP);
                }
                let target = rustix::fs::readlinkat(&dir[i].1, &name, Vec::new())?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    path.truncate(1);
                }
                for (at, c) in components(target).enumerate() {
                    pending.insert(at, c);
                }
            }
            FileType::Directory => {
                let mut merged = Merged::new();
                for (layer, fd) in &dir[i..] {
                    match rustix::fs::statat(fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                        Err(Errno::NOENT) => continue,
                        Err(e) => return Err(e),
                        Ok(st) if file_type(&st) == FileType::Directory => {
                            let opened = open_dir_at(fd, &name)?;
                            let opaque = is_opaque(&opened);
                            merged.push((*layer, opened));
                            if opaque {
                                break;
                            }
                        }
                        // A whiteout or a non-directory hides the layers below.
                        Ok(_) => break,
                    }
                }
                path.push(merged);
            }
            // A whiteout, or a non-directory where a directory is needed.
            _ => return Ok(None),
        }
    }
    Ok(path.pop())
}

/// The metadata of a lower object (`st`, and `file` when it is a regular
/// file opened for reading), for its copy:
/// ownership, mode, times and, for regular files, xattrs (overlayfs's own
/// excepted). A node's or symlink's xattrs are not copied: the extractor
/// writes none on symlinks, and a node's are reached only through /proc.
#[allow(clippy::unnecessary_cast)] // the field types vary by architecture
pub(super) fn lower_meta(st: &Stat, file: Option<&File>) -> io::Result<Meta> {
    let mut xattrs = Vec::new();
    if let Some(file) = file {
        let mut names = vec![0u8; 4096];
        let len = loop {
            match rustix::fs::flistxattr(file, &mut names) {
                Ok(len) => break len,
                Err(Errno::RANGE) => names.resize(names.len() * 4, 0),
                Err(Errno::NOTSUP) => break 0,
                Err(e) => return Err(e.into()),
            }
        };
        for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if name.starts_with(OVERLAY_XATTR_PREFIX) {
                continue;
            }
            let name = OsStr::from_bytes(name);
            let mut value = vec![0u8; 256];
            let len = loop {
                match rustix::fs::fgetxattr(file, name, &mut value) {
                    Ok(len) => break len,
                    Err(Errno::RANGE) => value.resize(value.len() * 4, 0),
                    Err(e) => return Err(e.into()),
                }
            };
            value.truncate(len);
            xattrs.push((name.to_owned(), value));
        }
    }
    Ok(Meta {
        uid: Uid::from_raw(st.st_uid),
        gid: Gid::from_raw(st.st_gid),
        mode: Mode::from_raw_mode(st.st_mode & 0o7777),
        mtime: Timespec {
            tv_sec: st.st_mtime as i64,
            tv_nsec: st.st_mtime_nsec as _,
        },
        atime: Some(Timespec {
            tv_sec: st.st_atime as i64,
            tv_nsec: st.st_atime_nsec as _,
        }),
        xattrs,
    })
}
