//! A build's root filesystems: safe path resolution inside a root,
//! extraction of untrusted layers, and snapshots of what a step changed.
pub mod extract;
pub mod meta_view;
pub mod overlay;
pub mod owners;
pub mod snapshot;
pub mod table_tee;

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Copies a whole tree, keeping owners, modes, links, devices and xattrs.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dest)
        .status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "copying {} to {} failed",
            src.display(),
            dest.display()
        )));
    }
    Ok(())
}

/// A path inside the root that the image's symlinks make unusable. It
/// travels inside an [`io::Error`] (see [`LinkError::into_io`]), so the
/// callers of [`resolve_in_root`] and [`create_dir_all_in_root`] keep their
/// signatures; its message says which link, where to, and what is wrong,
/// where the bare OS error would say only "No such file or directory".
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{} is a symlink to {}, which does not exist in the image", link.display(), target.display())]
    Dangling { link: PathBuf, target: PathBuf },
    #[error("{} is a symlink to {}: too many levels of symbolic links", link.display(), target.display())]
    Loop { link: PathBuf, target: PathBuf },
}

impl LinkError {
    pub(crate) fn into_io(self) -> io::Error {
        let kind = match self {
            LinkError::Dangling { .. } => io::ErrorKind::NotFound,
            LinkError::Loop { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// The link error an I/O error carries, if any.
    pub(crate) fn of(e: &io::Error) -> Option<&LinkError> {
        e.get_ref()?.downcast_ref()
    }

    /// Takes the link error out of an I/O error, or gives the error back.
    pub(crate) fn take(e: io::Error) -> Result<LinkError, io::Error> {
        if LinkError::of(&e).is_none() {
            return Err(e);
        }
        let inner = e.into_inner().expect("a link error is a custom error");
        Ok(*inner.downcast().expect("checked to be a link error"))
    }
}

/// Explains a "not found" met at `path` (inside the root, as the image
/// spells it): when a symlink on the way points at something missing, the
/// error names it. Any other error is returned as it is.
pub(crate) fn explain_not_found(root: &Path, path: &Path, e: io::Error) -> io::Error {
    if e.kind() != io::ErrorKind::NotFound || LinkError::of(&e).is_some() {
        return e;
    }
    match dangling_link(root, path, 0) {
        Some(link) => link.into_io(),
        None => e,
    }
}

/// The first symlink on `path` whose target does not exist, following a
/// chain of links to its last (the one that dangles).
fn dangling_link(root: &Path, path: &Path, depth: usize) -> Option<LinkError> {
    if depth > MAX_SYMLINK_HOPS as usize {
        return None; // a loop: resolve_in_root says so itself
    }
    let mut prefix = PathBuf::from("/");
    for c in components(&clean_relative(path)) {
        prefix.push(c);
        let host = resolve_in_root(root, &prefix, false).ok()?;
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if !meta.file_type().is_symlink() {
            continue;
        }
        let reached = resolve_in_root(root, &prefix, true).ok()?;
        if std::fs::symlink_metadata(reached).is_ok() {
            continue;
        }
        let target = std::fs::read_link(&host).ok()?;
        // A relative target is relative to the link's directory.
        let next = prefix.parent().unwrap_or(Path::new("/")).join(&target);
        return dangling_link(root, &next, depth + 1).or(Some(LinkError::Dangling {
            link: prefix,
            target,
        }));
    }
    None
}

/// Resolves `path` as a process chrooted at `root` would: symlinks (absolute
/// or with `..`) are followed inside the root and can never leave it. The
/// last component is followed only when `follow_final` is set. Missing
/// components are fine: the rest is appended as written. A loop is a
/// [`LinkError::Loop`].
pub fn resolve_in_root(root: &Path, path: &Path, follow_final: bool) -> io::Result<PathBuf> {
    let resolved = resolve_links(path, follow_final, |candidate| {
        let at = root.join(candidate);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::read_link(&at).map(Some),
            _ => Ok(None),
        }
    })?;
    Ok(root.join(resolved))
}

/// The resolution both a root on disk and the metadata view of one use:
/// `link` tells whether a path (relative to the root) is a symlink and
/// where to; it is asked of every component on the way, but the last
/// when `follow_final` is unset. Returns the path relative to the root.
pub(crate) fn resolve_links(
    path: &Path,
    follow_final: bool,
    mut link: impl FnMut(&Path) -> io::Result<Option<PathBuf>>,
) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<OsString> = components(path).collect();
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        if pending.is_empty() && !follow_final {
            return Ok(candidate);
        }
        match link(&candidate)? {
            Some(target) => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(LinkError::Loop {
                        link: Path::new("/").join(candidate),
                        target,
                    }
                    .into_io());
                }
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for (i, c) in components(&target).enumerate() {
                    pending.insert(i, c);
                }
            }
            None => resolved = candidate,
        }
    }
    Ok(resolved)
}

/// The kernel's limit on symlink hops in one resolution.
const MAX_SYMLINK_HOPS: u32 = 40;

/// The normal components of `path`, with `..` kept (resolved by the caller)
/// and `/` and `.` dropped.
pub(crate) fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Cleans a path lexically to a relative one with no `..` escaping the top.
pub fn clean_relative(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in components(path) {
        if c == ".." {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out
}

/// Empties `root` of everything but the `keep` paths (relative to it), their
/// contents and the directories that lead to them: `--isolation none`
/// clears the machine's own `/` this way before a stage's base goes there.
/// A symlink is removed, never followed; a directory on another
/// filesystem (a mount nobody listed) is kept, never crossed.
pub fn clear_root(root: &Path, keep: &[PathBuf]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fn clear(root: &Path, rel: &Path, keep: &[PathBuf], dev: u64) -> io::Result<()> {
        for entry in std::fs::read_dir(root.join(rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            if keep.iter().any(|k| path.starts_with(k)) {
                continue;
            }
            let leads_to_kept = keep.iter().any(|k| k.starts_with(&path));
            if entry.file_type()?.is_dir() {
                if entry.metadata()?.dev() != dev {
                    continue;
                }
                match leads_to_kept {
                    true => clear(root, &path, keep, dev)?,
                    false => std::fs::remove_dir_all(entry.path())?,
                }
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
    clear(root, Path::new(""), keep, std::fs::metadata(root)?.dev())
}

/// Creates `dir` (a path inside the root) and its missing parents, resolving
/// every existing component inside the root. Returns the host path and the
/// host paths of the directories it created, outermost first.
pub fn create_dir_all_in_root(root: &Path, dir: &Path) -> io::Result<(PathBuf, Vec<PathBuf>)> {
    let mut current = PathBuf::from("/");
    let mut created = Vec::new();
    for c in components(&clean_relative(dir)) {
        current.push(c);
        let host = resolve_in_root(root, &current, true)?;
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", current.display()),
                ))
            }
            Err(_) => {
                std::fs::create_dir(&host).map_err(|e| explain_not_found(root, &current, e))?;
                created.push(host);
            }
        }
    }
    Ok((resolve_in_root(root, dir, true)?, created))
}

/// The xattrs of `path` (never followed), overlayfs's own left out: they
/// describe where a file is stored, not the file. In the order the
/// filesystem lists them; none when it has no xattr support.
pub(crate) fn content_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let names = xattr_names(path).unwrap_or_default();
    if names.is_empty() {
        return Vec::new();
    }
    // One buffer of the largest size an xattr value may have, for all.
    let mut value = vec![0u8; 64 * 1024];
    names
        .into_iter()
        .filter(|name| !name.starts_with(extract::OVERLAY_XATTR_PREFIX))
        .filter_map(|name| {
            let len = rustix::fs::lgetxattr(path, OsStr::from_bytes(&name), &mut value).ok()?;
            Some((name, value[..len].to_vec()))
        })
        .collect()
}

/// Which paths of a root a layer records, for both snapshotters: none at
/// or under an `--ignore-path`, and none inside /proc, /sys and /dev (the
/// directories themselves are recorded). Paths are relative to the root.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    skip_contents: Vec<PathBuf>,
    ignore: Vec<PathBuf>,
}

impl Recorded {
    pub fn new(skip_contents: &[&str], ignore: &[PathBuf]) -> Recorded {
        Recorded {
            skip_contents: skip_contents.iter().map(PathBuf::from).collect(),
            ignore: ignore.to_vec(),
        }
    }

    pub fn ignores(&self, path: &Path) -> bool {
        self.ignore.iter().any(|i| path.starts_with(i))
    }

    /// Whether a directory's contents go unrecorded.
    pub fn skips_contents_of(&self, dir: &Path) -> bool {
        self.skip_contents.iter().any(|s| s == dir)
    }

    pub fn records(&self, path: &Path) -> bool {
        !self.ignores(path)
            && !self
                .skip_contents
                .iter()
                .any(|s| path.starts_with(s) && path != s)
    }
}

/// The blake3 of a file's content.
pub(crate) fn hash_file(path: &Path) -> io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(*hasher.finalize().as_bytes())
}

/// Seconds since the epoch (0 before it).
pub(crate) fn unix_secs(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a directory's new mtime was set on purpose (`touch -d`) rather
/// than moved by entries made or removed in it between `since` and `until`
/// (unix seconds). Only the former is a change of the directory's own: the
/// latter shows in its entries, or is a mount point or temp file gone again.
pub(crate) fn mtime_set_outside(mtime: i64, since: i64, until: i64) -> bool {
    // File times come from a coarse clock.
    const SLACK: i64 = 2;
    mtime < since - SLACK || mtime > until + SLACK
}

/// [`content_xattrs`] sorted by name, for comparing two paths.
pub(crate) fn sorted_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut all = content_xattrs(path);
    all.sort();
    all
}

/// The names of `path`'s xattrs (never followed).
pub(crate) fn xattr_names(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut buf)?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// The path of `host` (inside `root`) relative to the root.
pub fn relative_to_root(root: &Path, host: &Path) -> PathBuf {
    host.strip_prefix(root).unwrap_or(host).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_paths_leave_out_ignored_paths_and_mounted_contents() {
        let r = Recorded::new(&["proc"], &[PathBuf::from("var/run")]);
        assert!(r.records(Path::new("proc")));
        assert!(!r.records(Path::new("proc/1/status")));
        assert!(r.skips_contents_of(Path::new("proc")));
        assert!(!r.records(Path::new("var/run")));
        assert!(!r.records(Path::new("var/run/x.pid")));
        // Components, not string prefixes.
        assert!(r.records(Path::new("var/runner")));
        assert!(r.records(Path::new("procfile")));
    }
    use std::os::unix::fs::symlink;

    #[test]
    fn clearing_a_root_keeps_only_the_kept_paths_and_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["kiln/state/x", "usr/bin", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "kiln/kiln",
            "kiln/other",
            "usr/bin/sh",
            "etc/hosts",
            "etc/passwd",
            "junk",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), "p").unwrap();
        symlink(outside.path(), root.join("link")).unwrap();
        let keep = ["kiln/kiln", "kiln/state", "etc/hosts"].map(PathBuf::from);
        clear_root(root, &keep).unwrap();
        let mut left: Vec<String> = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p.clone());
                }
                left.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
        left.sort();
        assert_eq!(
            left,
            [
                "etc",
                "etc/hosts",
                "kiln",
                "kiln/kiln",
                "kiln/state",
                "kiln/state/x"
            ]
        );
        assert!(
            outside.path().join("precious").exists(),
            "followed a symlink"
        );
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("run/lock")).unwrap();
        std::fs::create_dir_all(root.join("var")).unwrap();
        symlink("/run", root.join("var/run")).unwrap();
        symlink("../../../../..", root.join("up")).unwrap();
        symlink("/", root.join("slash")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/var/run/lock"), true).unwrap(),
            root.join("run/lock")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("up/etc/passwd"), true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/slash/../../x"), true).unwrap(),
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("var/run"), false).unwrap(),
            root.join("var/run")
        );
    }

    #[test]
    fn symlink_loops_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        symlink("b", dir.path().join("a")).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        assert!(resolve_in_root(dir.path(), Path::new("a/x"), true).is_err());
    }

    #[test]
    fn a_loop_names_the_link() {
        let dir = tempfile::tempdir().unwrap();
        symlink("/dev", dir.path().join("dev")).unwrap();
        let e = resolve_in_root(dir.path(), Path::new("/dev"), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/dev is a symlink to /dev: too many levels of symbolic links"
        );
    }

    #[test]
    fn creating_through_a_dangling_link_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        symlink("/srv/missing", root.join("app")).unwrap();
        let e = create_dir_all_in_root(root, Path::new("/app/sub")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            "/app is a symlink to /srv/missing, which does not exist in the image"
        );
        // A chain names its last link, the one that dangles; a relative
        // target is shown as written.
        std::fs::create_dir(root.join("srv")).unwrap();
        symlink("../gone/x", root.join("srv/missing")).unwrap();
        let e = create_dir_all_in_root(root, Path::new("/app")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/srv/missing is a symlink to ../gone/x, which does not exist in the image"
        );
        // Once the target's parent exists, the link leads somewhere.
        std::fs::create_dir(root.join("gone")).unwrap();
        let (made, _) = create_dir_all_in_root(root, Path::new("/app/sub")).unwrap();
        assert_eq!(made, root.join("gone/x/sub"));
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let e = io::Error::from(io::ErrorKind::NotFound);
        let e = explain_not_found(dir.path(), Path::new("/no/link/here"), e);
        assert!(LinkError::of(&e).is_none());
        let e = io::Error::from_raw_os_error(13);
        let e = explain_not_found(dir.path(), Path::new("/x"), e);
        assert_eq!(e.raw_os_error(), Some(13));
    }

    #[test]
    fn creates_dirs_through_in_root_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink("/", root.join("escape")).unwrap();
        let (made, created) = create_dir_all_in_root(&root, Path::new("/escape/app/sub")).unwrap();
        assert_eq!(made, root.join("app/sub"));
        assert_eq!(created, [root.join("app"), root.join("app/sub")]);
        assert!(root.join("app/sub").is_dir());
        assert!(!dir.path().join("app").exists());
    }
}
