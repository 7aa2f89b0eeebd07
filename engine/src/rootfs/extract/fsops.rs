//! Path cleaning, whiteout names and the `*at` filesystem helpers the
//! extractor builds on.

use super::*;

/// Cleans an entry name to a relative path of normal components: leading
/// `/`, `.` and `..` that stays inside are resolved lexically. `None` when
/// `..` climbs above the root.
pub(super) fn clean_path(raw: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// Components of a symlink target to resolve: `.` and `/` dropped, `..` kept.
pub(super) fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

pub(super) fn whiteout_of(name: &OsStr) -> Option<Whiteout<'_>> {
    let bytes = name.as_bytes();
    if bytes == OPAQUE_MARKER {
        return Some(Whiteout::Opaque);
    }
    bytes
        .strip_prefix(WHITEOUT_PREFIX)
        .map(|hidden| Whiteout::Name(OsStr::from_bytes(hidden)))
}

/// Makes room for a new entry at `name` in `parent`. An existing directory
/// is kept when `keep_dir` (returns `true`); anything else there is removed,
/// directories recursively, without following symlinks.
pub(super) fn clear_slot(parent: BorrowedFd<'_>, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
        Ok(st) if keep_dir && file_type(&st) == FileType::Directory => Ok(true),
        Ok(_) => {
            prune(parent, name, &HashSet::new(), &HashSet::new())?;
            Ok(false)
        }
    }
}

/// Removes `name` from `dir` without following symlinks, sparing objects in
/// `keep` and, untouched with all they hold, those in `protected`; a
/// directory survives if it is kept or still holds something kept. Returns
/// whether `name` is gone.
///
/// Every step is an `*at` call on a single name in an already opened
/// directory, and directories are opened with `O_NOFOLLOW`, so a symlink in
/// the tree is unlinked, never traversed.
pub(super) fn prune<P: rustix::path::Arg + Copy>(
    dir: BorrowedFd<'_>,
    name: P,
    keep: &HashSet<FileId>,
    protected: &HashSet<FileId>,
) -> rustix::io::Result<bool> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => return Ok(true),
        result => result?,
    };
    if protected.contains(&file_id(&st)) {
        return Ok(false);
    }
    let kept = keep.contains(&file_id(&st));
    if file_type(&st) != FileType::Directory {
        if !kept {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
        }
        return Ok(!kept);
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut emptied = true;
    for child in list_dir(&sub)? {
        emptied &= prune(sub.as_fd(), child.as_c_str(), keep, protected)?;
    }
    if kept || !emptied {
        return Ok(false);
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(true)
}

/// The names in a directory opened for reading, without `.` and `..`;
/// collected first so the caller can remove entries while walking.
pub(super) fn list_dir(dir: &OwnedFd) -> rustix::io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[allow(clippy::unnecessary_cast)] // the field types vary by architecture
pub(super) fn file_id(st: &Stat) -> FileId {
    (st.st_dev as u64, st.st_ino as u64)
}

pub(super) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

pub(super) fn invalid(path: &Path, reason: impl ToString) -> ExtractError {
    ExtractError::InvalidEntry {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}
