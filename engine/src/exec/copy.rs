//! COPY (and ADD's local sources): sources from the build context or
//! another stage's root, written into the step's root with Docker's rules
//! for destinations, ownership and modes. Every destination path is
//! resolved inside the root. What `.dockerignore` excludes is invisible to
//! a copy from the context. A copy knows nothing of archives: ADD diverts
//! the files it extracts ([`copy_diverting`]). A copy may link, rather than
//! copy, the files the previous run of the same COPY made ([`Reuse`]).
use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use super::copy_selection::{expand_sources, Selected};
use crate::context::{Filter, Ignore};
use crate::excerpt::excerpt;
use crate::rootfs::owners;
use crate::rootfs::{
    clean_relative, create_dir_all_in_root, relative_to_root, resolve_in_root, LinkError,
};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("invalid pattern {:?}: {source}", excerpt(.pattern))]
    Pattern {
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("no source files were specified: {:?} matches nothing", excerpt(.0))]
    NoMatch(String),
    #[error("{}: no such file or directory", excerpt(.0))]
    Missing(String),
    #[error("{}: no such file or directory (excluded by .dockerignore)", excerpt(.0))]
    Ignored(String),
    #[error("--exclude: {0}")]
    Exclude(#[source] crate::context::PatternError),
    #[error(
        "when using {instruction} with more than one source file, the destination must be a directory and end with a /: {}",
        excerpt(.dest)
    )]
    DestNotDir {
        /// COPY or ADD.
        instruction: &'static str,
        dest: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image's symlinks lead the destination nowhere; the message
    /// names the link, so no path is added.
    #[error(transparent)]
    Link(LinkError),
}

impl CopyError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> CopyError {
        let path = path.into();
        move |source| match LinkError::take(source) {
            Ok(link) => CopyError::Link(link),
            Err(source) => CopyError::Io { path, source },
        }
    }
}

/// Where sources are read from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The build context: paths are relative to it and cannot leave it.
    Context(&'a Path),
    /// Another stage's root (COPY --from): paths resolve inside it, and
    /// ownership is preserved unless --chown says otherwise.
    Root(&'a Path),
}

#[derive(Clone, Copy)]
pub struct CopyRequest<'a> {
    pub source: Source<'a>,
    pub sources: &'a [String],
    /// Absolute destination inside the root (WORKDIR already applied); a
    /// trailing `/` means a directory.
    pub dest: &'a str,
    pub chown: Option<(u32, u32)>,
    pub chmod: Option<u32>,
    /// `.dockerignore` rules, for [`Source::Context`].
    pub ignore: Option<&'a Ignore>,
    /// `--exclude` patterns (`.dockerignore` syntax), matched against a
    /// source as written and against the paths inside a directory source,
    /// relative to it.
    pub excludes: &'a [String],
    /// `--parents`: each source keeps its path (below a `/./` pivot when
    /// there is one) under the destination.
    pub parents: bool,
}

/// The part of a source's path `--parents` keeps: all of it, or what
/// follows a `/./` pivot in the source as written (`./x/./y/*.txt` keeps
/// `y/...`).
fn kept_by_parents(written: &str, rel: &Path) -> PathBuf {
    let mut trimmed = written;
    while let Some(rest) = trimmed.strip_prefix("./") {
        trimmed = rest;
    }
    match trimmed.find("/./") {
        Some(at) => {
            let pivot = clean_relative(Path::new(&trimmed[..at]));
            rel.strip_prefix(&pivot).unwrap_or(rel).to_path_buf()
        }
        None => rel.to_path_buf(),
    }
}

/// Copies the sources into `root` and returns the top-level paths it wrote
/// (relative to the root), for the snapshot to look at.
pub fn copy(req: &CopyRequest, root: &Path) -> Result<Vec<PathBuf>, CopyError> {
    copy_diverting(req, root, |_| Ok(None))
}

/// [`copy`], leaving to `reuse` the files the layer it names already holds
/// as the copy would write them. Only a copy from the context reuses, of a
/// single source (no path is then written twice), by a process that
/// applies owners rather than records them.
pub fn copy_reusing(
    req: &CopyRequest,
    root: &Path,
    reuse: &Reuse,
) -> Result<Vec<PathBuf>, CopyError> {
    let recorded = owners::recorded();
    copy_sources(req, root, &|_| Ok(None), recorded, Some(reuse))
}

/// The threads every copy of the build writes a directory's entries
/// with, started by the first that copies one: a copy of files alone
/// (most COPYs) writes them on its own thread, and starting 8 threads
/// took it 1-2 ms. Creating files waits on the filesystem more than it
/// computes: on ext4 here, 8 writers create files 2.7x faster than one,
/// on 2 cores.
fn writers() -> io::Result<&'static rayon::ThreadPool> {
    type Pool = Result<rayon::ThreadPool, String>;
    static WRITERS: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
    let pool = WRITERS.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(8)
            .thread_name(|i| format!("kiln-copy-{i}"))
            .build()
            .map_err(|e| format!("starting the copy's writer threads: {e}"))
    });
    pool.as_ref().map_err(|e| io::Error::other(e.clone()))
}

/// [`copy`], offering each selected regular file to `divert` first: it may
/// write the file into the root its own way and return the top-level path
/// it wrote (ADD extracts an archive into the destination), or return
/// `None` to leave the file to the copy.
pub fn copy_diverting<E>(
    req: &CopyRequest,
    root: &Path,
    divert: impl Fn(&Path) -> Result<Option<PathBuf>, E> + Sync,
) -> Result<Vec<PathBuf>, E>
where
    E: From<CopyError> + Send,
{
    // Taken here: the writers' threads are not the caller's.
    let recorded = owners::recorded();
    copy_sources(req, root, &divert, recorded, None)
}

/// What the previous run of the same COPY made (on the same parent, with
/// the overlay snapshotter): its layer's directory, an overlayfs lower
/// that nothing writes (`kiln_cachestore::unpacked`). A regular file the
/// copy would write exactly as that layer holds it (content, mode, owner,
/// mtime; the layer's file has no xattrs) is not written into the root:
/// once the step's overlay is unmounted, [`Reuse::link_into`] links the
/// layer's file into the step's upper dir instead. The inode the two
/// layers then share is never written either: the upper dir becomes a
/// layer directory in turn, and a later step that changes the file copies
/// it up. What the new copy does not write is simply not there.
pub struct Reuse {
    /// The previous layer's directory.
    previous: PathBuf,
    /// Where the step's root is mounted: a path the copy writes there is
    /// the same path in `previous`.
    root: PathBuf,
    /// The files left out of the root: each one's path relative to the
    /// root, and the previous layer's file.
    deferred: Mutex<Vec<(PathBuf, PathBuf)>>,
    /// The inodes deferred (device, inode): each is linked once at most,
    /// so no two names of the new layer share one (its tar would hold a
    /// hard link the copy never made).
    taken: Mutex<HashSet<(u64, u64)>>,
}

impl Reuse {
    /// `previous`: the previous layer's directory; `root`: where the
    /// step's root is mounted.
    pub fn new(previous: PathBuf, root: PathBuf) -> Reuse {
        Reuse {
            previous,
            root,
            deferred: Mutex::default(),
            taken: Mutex::default(),
        }
    }

    /// The previous layer's directory at `host_dir` (a directory in the
    /// root), when each part of its path there is a real directory: a
    /// symlink in a cached layer is never followed.
    fn dir_for(&self, host_dir: &Path) -> Option<PathBuf> {
        let rel = host_dir.strip_prefix(&self.root).ok()?;
        let mut dir = self.previous.clone();
        for part in rel.components() {
            let Component::Normal(name) = part else {
                return None;
            };
            dir.push(name);
            if !fs::symlink_metadata(&dir).ok()?.is_dir() {
                return None;
            }
        }
        Some(dir)
    }

    /// Whether the regular file `src` (`meta`), copied to `dest` in the
    /// root with the owner and mode `want`, would be the previous layer's
    /// file `previous`: then it is deferred, and the copy leaves it.
    fn defer(
        &self,
        src: &Path,
        meta: &fs::Metadata,
        want: owners::Stat,
        dest: &Path,
        previous: &Path,
    ) -> io::Result<bool> {
        let Ok(prev) = fs::symlink_metadata(previous) else {
            return Ok(false);
        };
        let same = prev.is_file()
            && prev.len() == meta.len()
            && (prev.uid(), prev.gid(), prev.mode() & 0o7777) == (want.uid, want.gid, want.mode)
            && (prev.mtime(), prev.mtime_nsec()) == (meta.mtime(), meta.mtime_nsec());
        if !same || has_xattrs(previous) {
            return Ok(false);
        }
        // Something there already (from a lower layer) is replaced as usual.
        match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(_) => return Ok(false),
        }
        let Ok(rel) = dest.strip_prefix(&self.root) else {
            return Ok(false);
        };
        if !same_content(src, previous, meta.len())? {
            return Ok(false);
        }
        if !lock(&self.taken).insert((prev.dev(), prev.ino())) {
            return Ok(false);
        }
        lock(&self.deferred).push((rel.to_path_buf(), previous.to_path_buf()));
        Ok(true)
    }

    /// Links the deferred files into `upper`, the step's upper dir, once
    /// its overlay is unmounted (overlayfs forbids changing it while
    /// mounted); returns how many. Their directories are there: the copy
    /// made them, or set their metadata, through the overlay.
    pub fn link_into(&self, upper: &Path) -> Result<usize, CopyError> {
        let deferred = std::mem::take(&mut *lock(&self.deferred));
        if deferred.is_empty() {
            return Ok(0);
        }
        writers().map_err(CopyError::io(upper))?.install(|| {
            deferred.par_iter().try_for_each(|(rel, previous)| {
                let dest = upper.join(rel);
                fs::hard_link(previous, &dest).map_err(CopyError::io(dest))
            })
        })?;
        Ok(deferred.len())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a file has extended attributes (or they cannot be listed).
fn has_xattrs(path: &Path) -> bool {
    !matches!(
        rustix::fs::llistxattr(path, &mut [0u8; 0][..]),
        Ok(0) | Err(rustix::io::Errno::NOTSUP)
    )
}

/// Whether the first `len` bytes of two files (of that size) are the same.
fn same_content(a: &Path, b: &Path, len: u64) -> io::Result<bool> {
    let (mut a, mut b) = (fs::File::open(a)?.take(len), fs::File::open(b)?.take(len));
    let (mut x, mut y) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        let n = read_full(&mut a, &mut x)?;
        if read_full(&mut b, &mut y)? != n || x[..n] != y[..n] {
            return Ok(false);
        }
        if n < x.len() {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Makes `dir` inside `root` with its missing parents, each new one owned
/// by `owner`: the directory on the host and those it created, top first.
pub fn create_dirs_owned(
    root: &Path,
    dir: &Path,
    owner: (u32, u32),
) -> Result<(PathBuf, Vec<PathBuf>), CopyError> {
    make_dirs(root, dir, owner, owners::recorded())
}

/// [`create_dirs_owned`], the owner recorded when `recorded`.
fn make_dirs(
    root: &Path,
    dir: &Path,
    (uid, gid): (u32, u32),
    recorded: bool,
) -> Result<(PathBuf, Vec<PathBuf>), CopyError> {
    let (host_dir, created) = create_dir_all_in_root(root, dir).map_err(CopyError::io(dir))?;
    for d in &created {
        owners::chown(d, (uid, gid), recorded).map_err(CopyError::io(d))?;
    }
    Ok((host_dir, created))
}

fn copy_sources<E: From<CopyError>>(
    req: &CopyRequest,
    root: &Path,
    divert: &impl Fn(&Path) -> Result<Option<PathBuf>, E>,
    recorded: bool,
    reuse: Option<&Reuse>,
) -> Result<Vec<PathBuf>, E> {
    let (src_root, in_root) = match req.source {
        Source::Context(p) => (p, false),
        Source::Root(p) => (p, true),
    };
    let filter = match (&req.source, req.ignore) {
        (Source::Context(dir), Some(ignore)) if !ignore.is_empty() => {
            Some(Filter { root: dir, ignore })
        }
        _ => None,
    };
    let excludes = match req.excludes.is_empty() {
        true => None,
        false => Some(Ignore::parse(&req.excludes.join("\n")).map_err(CopyError::Exclude)?),
    };
    let sources: Vec<Selected> = expand_sources(src_root, req.sources, filter)?
        .into_iter()
        .filter(|s| excludes.as_ref().is_none_or(|e| !e.excludes(&s.rel)))
        .collect();
    let dest_is_dir =
        req.dest.ends_with('/') || sources.len() > 1 || req.dest == "/" || req.parents;
    if req.sources.len() > 1 && !req.dest.ends_with('/') {
        return Err(CopyError::DestNotDir {
            instruction: "COPY",
            dest: req.dest.to_string(),
        }
        .into());
    }
    let copier = Copier {
        owner: (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        ),
        chown: req.chown.or(if in_root { None } else { Some((0, 0)) }),
        chmod: req.chmod,
        filter,
        excludes: excludes.as_ref(),
        recorded,
        in_root,
        // See `copy_reusing`.
        reuse: reuse.filter(|_| !in_root && !recorded && sources.len() == 1),
    };
    let dest = Path::new(req.dest);
    let mut touched = Vec::new();
    for Selected {
        index,
        rel,
        host: src,
    } in sources
    {
        // With --parents, the source's own path goes under dest.
        let kept = kept_by_parents(&req.sources[index], &rel);
        let parents_target = req.parents.then(|| dest.join(&kept));
        let meta = fs::metadata(&src).map_err(CopyError::io(&src))?;
        if meta.is_file() {
            if let Some(top) = divert(&src)? {
                touched.push(top);
                continue;
            }
        }
        let target = if let Some(target) = parents_target {
            target
        } else if meta.is_dir() {
            // A directory's contents are copied, not the directory itself.
            dest.to_path_buf()
        } else {
            let existing_dir = resolve_in_root(root, dest, true)
                .map(|p| p.is_dir())
                .unwrap_or(false);
            if dest_is_dir || existing_dir {
                dest.join(src.file_name().unwrap_or_default())
            } else {
                dest.to_path_buf()
            }
        };
        // The directory that receives the copy: dest itself for a directory
        // source, the target's parent for a file.
        let dir = match meta.is_dir() {
            true => target.as_path(),
            false => target.parent().unwrap_or(Path::new("/")),
        };
        // Directories a COPY creates belong to the --chown owner (or root).
        let (host_dir, created) = make_dirs(root, dir, copier.chown.unwrap_or((0, 0)), recorded)?;
        if req.parents {
            // The parents it made under dest take their source dirs' modes.
            let pivot: PathBuf = rel
                .iter()
                .take(rel.iter().count() - kept.iter().count())
                .collect();
            let host_dest = resolve_in_root(root, dest, true).map_err(CopyError::io(dest))?;
            for d in &created {
                let sub = d.strip_prefix(&host_dest).unwrap_or(Path::new(""));
                let from = src_root.join(&pivot).join(sub);
                match fs::symlink_metadata(&from) {
                    Ok(m) if m.is_dir() && !sub.as_os_str().is_empty() => {
                        set_mode(d, m.mode() & 0o7777, copier.recorded).map_err(CopyError::io(d))?
                    }
                    _ => {}
                }
            }
        }
        // The receiving directory is in the step's upper dir when made now.
        let made = created.last() == Some(&host_dir);
        let host_target = if meta.is_dir() {
            if made {
                // Only a directory the copy made takes the source's mode.
                let mode = match copier.recorded && in_root {
                    true => owners::get(&src, &meta).mode,
                    false => meta.mode() & 0o7777,
                };
                set_mode(&host_dir, mode, copier.recorded).map_err(CopyError::io(&host_dir))?;
            }
            copier
                .copy_contents(&src, &src, &host_dir, copier.reused_dir(&host_dir, made))
                .map_err(CopyError::io(&src))?;
            host_dir
        } else {
            let host_target = host_dir.join(target.file_name().unwrap_or_default());
            let previous = copier.reused_dir(&host_dir, made);
            copier
                .copy_entry(&src, &src, &host_target, false, previous.as_deref())
                .map_err(CopyError::io(&src))?;
            host_target
        };
        let top = created.first().unwrap_or(&host_target);
        touched.push(relative_to_root(root, top));
    }
    Ok(touched)
}

struct Copier<'a> {
    /// Who owns what this process creates.
    owner: (u32, u32),
    chown: Option<(u32, u32)>,
    chmod: Option<u32>,
    /// `.dockerignore`, for a copy from the context.
    filter: Option<Filter<'a>>,
    /// `--exclude`, matched relative to the directory source being copied.
    excludes: Option<&'a Ignore>,
    /// Not root: owners are recorded, not applied (`rootfs/owners.rs`).
    /// Taken once: the copy runs on a thread pool.
    recorded: bool,
    /// The sources are in a root (`COPY --from`), where owners recorded
    /// this way are read back.
    in_root: bool,
    /// Files the previous run of this COPY made, to link rather than copy.
    reuse: Option<&'a Reuse>,
}

impl Copier<'_> {
    /// Copies a directory: the directory itself (created or merged), then
    /// its contents. `top` is the source as selected, which `--exclude`
    /// patterns are relative to.
    fn copy_dir(&self, top: &Path, src: &Path, dest: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        self.make_dir(src, dest, &meta)?;
        // Its metadata was just set through the overlay: it is in the
        // step's upper dir, where reused files are linked.
        self.copy_contents(top, src, dest, self.reused_dir(dest, true))
    }

    /// With [`Reuse`], the previous layer's directory at `dest`, when the
    /// files the copy leaves in `dest` can be linked there afterwards:
    /// `in_upper`, the copy made `dest` or set its metadata (an untouched
    /// directory of a lower layer is not in the step's upper dir).
    fn reused_dir(&self, dest: &Path, in_upper: bool) -> Option<PathBuf> {
        self.reuse
            .filter(|_| in_upper)
            .and_then(|reuse| reuse.dir_for(dest))
    }

    /// Copies the entries of `src` into the existing directory `dest`, a
    /// real directory inside the root (made or checked by the caller), so
    /// `dest/name` is inside the root too; a symlink there is replaced,
    /// never followed. Entries are copied in parallel: each has a name of
    /// its own, and file creation mostly waits on the filesystem.
    /// `previous`: the previous layer's `dest`, with [`Reuse`].
    fn copy_contents(
        &self,
        top: &Path,
        src: &Path,
        dest: &Path,
        previous: Option<PathBuf>,
    ) -> io::Result<()> {
        let entries: Vec<_> = fs::read_dir(src)?.collect::<io::Result<_>>()?;
        // In a setgid directory new entries take its group, not ours.
        let ours = fs::metadata(dest)?.mode() & 0o2000 == 0;
        // Run inline when already on a writer (a subdirectory's entries).
        writers()?.install(|| {
            entries.par_iter().try_for_each(|entry| {
                let path = entry.path();
                if self.filter.is_some_and(|f| !f.shows(&path))
                    || self
                        .excludes
                        .is_some_and(|e| e.excludes(path.strip_prefix(top).unwrap_or(&path)))
                {
                    return Ok(());
                }
                let previous = previous.as_deref();
                self.copy_entry(top, &path, &dest.join(entry.file_name()), ours, previous)
            })
        })
    }

    /// `ours`: what this process creates in dest's directory is owned by
    /// it. `previous`: the previous layer's directory at dest's, to reuse
    /// a file from.
    fn copy_entry(
        &self,
        top: &Path,
        src: &Path,
        dest: &Path,
        ours: bool,
        previous: Option<&Path>,
    ) -> io::Result<()> {
        let meta = fs::symlink_metadata(src)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return self.copy_dir(top, src, dest);
        }
        if let (Some(reuse), Some(previous), true) = (self.reuse, previous, ft.is_file()) {
            let (uid, gid) = self.chown.unwrap_or((meta.uid(), meta.gid()));
            let mode = self.chmod.unwrap_or(meta.mode() & 0o7777);
            let want = owners::Stat { uid, gid, mode };
            let name = dest.file_name().unwrap_or_default();
            if reuse.defer(src, &meta, want, dest, &previous.join(name))? {
                return Ok(());
            }
        }
        remove_non_dir_or_dir(dest)?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(src)?, dest)?;
        } else if ft.is_file() {
            fs::copy(src, dest)?;
        } else {
            // Devices, fifos and sockets in a context are not copied.
            return Ok(());
        }
        self.apply_metadata(src, dest, &meta, ours)
    }

    fn make_dir(&self, src: &Path, dest: &Path, meta: &fs::Metadata) -> io::Result<()> {
        match fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(dest)?;
                fs::create_dir(dest)?;
            }
            Err(_) => fs::create_dir(dest)?,
        }
        self.apply_metadata(src, dest, meta, false)
    }

    /// Gives `dest` its owner, mode and mtime. `made`: a file or link this
    /// process just made (so owned by it, a file with its source's mode),
    /// for which calls that would change nothing are skipped: a COPY of
    /// many small files is mostly such calls.
    fn apply_metadata(
        &self,
        src: &Path,
        dest: &Path,
        src_meta: &fs::Metadata,
        made: bool,
    ) -> io::Result<()> {
        if self.recorded {
            return self.record_metadata(src, dest, src_meta);
        }
        let (uid, gid) = self.chown.unwrap_or((src_meta.uid(), src_meta.gid()));
        let chowned = !made || (uid, gid) != self.owner;
        if chowned {
            lchown(dest, Some(uid), Some(gid))?;
        }
        if src_meta.file_type().is_symlink() {
            return Ok(());
        }
        // A chown clears setuid and setgid, so the mode comes after it.
        if chowned || self.chmod.is_some() {
            let mode = self.chmod.unwrap_or(src_meta.mode() & 0o7777);
            fs::set_permissions(dest, fs::Permissions::from_mode(mode))?;
        }
        set_mtime(dest, src_meta)
    }

    /// [`Copier::apply_metadata`] in a process that is not root: the owner
    /// and mode are recorded (`rootfs/owners.rs`), read from the source's
    /// record when it is in a root; a symlink's owner is not kept.
    fn record_metadata(&self, src: &Path, dest: &Path, src_meta: &fs::Metadata) -> io::Result<()> {
        let source = match self.in_root {
            true => owners::get(src, src_meta),
            false => owners::Stat {
                uid: src_meta.uid(),
                gid: src_meta.gid(),
                mode: src_meta.mode() & 0o7777,
            },
        };
        let (uid, gid) = self.chown.unwrap_or((source.uid, source.gid));
        if src_meta.file_type().is_symlink() {
            return owners::set_owner(dest, (uid, gid));
        }
        let mode = self.chmod.unwrap_or(source.mode);
        owners::set(dest, owners::Stat { uid, gid, mode }, src_meta.is_dir())?;
        set_mtime(dest, src_meta)
    }
}

/// Gives `dest` the mtime (and atime) of the source `meta` describes.
fn set_mtime(dest: &Path, src_meta: &fs::Metadata) -> io::Result<()> {
    let mtime = filetime_of(src_meta);
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dest,
        &rustix::fs::Timestamps {
            last_access: mtime,
            last_modification: mtime,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Sets `path`'s mode, or records it when the process is not root.
fn set_mode(path: &Path, mode: u32, recorded: bool) -> io::Result<()> {
    match recorded {
        false => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
        true => owners::set_mode(path, mode),
    }
}

fn filetime_of(meta: &fs::Metadata) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: meta.mtime(),
        tv_nsec: meta.mtime_nsec() as _,
    }
}

/// Clears the way for a new non-directory entry.
fn remove_non_dir_or_dir(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::copy_selection::selected_context_sources;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _dir: tempfile::TempDir,
        ctx: PathBuf,
        root: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("src/sub")).unwrap();
        fs::write(ctx.join("a.txt"), "a").unwrap();
        fs::write(ctx.join("b.txt"), "b").unwrap();
        fs::write(ctx.join("src/sub/x"), "x").unwrap();
        fs::set_permissions(ctx.join("src/sub/x"), fs::Permissions::from_mode(0o750)).unwrap();
        symlink("../a.txt", ctx.join("src/link")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "").unwrap();
        Fixture {
            _dir: dir,
            ctx,
            root,
        }
    }

    fn run(f: &Fixture, sources: &[&str], dest: &str) -> Result<Vec<PathBuf>, CopyError> {
        run_with(f, sources, dest, None, &[], false)
    }

    fn run_with(
        f: &Fixture,
        sources: &[&str],
        dest: &str,
        ignore: Option<&Ignore>,
        excludes: &[&str],
        parents: bool,
    ) -> Result<Vec<PathBuf>, CopyError> {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        copy(
            &CopyRequest {
                source: Source::Context(&f.ctx),
                sources: &strings(sources),
                dest,
                chown: None,
                chmod: None,
                ignore,
                excludes: &strings(excludes),
                parents,
            },
            &f.root,
        )
    }

    #[test]
    fn file_to_file_and_to_dir() {
        let f = fixture();
        run(&f, &["a.txt"], "/app/renamed").unwrap();
        assert_eq!(fs::read_to_string(f.root.join("app/renamed")).unwrap(), "a");
        run(&f, &["a.txt"], "/app/dir/").unwrap();
        assert!(f.root.join("app/dir/a.txt").is_file());
        run(&f, &["b.txt"], "/app/dir").unwrap(); // existing dir
        assert!(f.root.join("app/dir/b.txt").is_file());
    }

    #[test]
    fn dirs_copy_their_contents_and_keep_links_and_modes() {
        let f = fixture();
        let touched = run(&f, &["src"], "/opt").unwrap();
        assert_eq!(touched, [PathBuf::from("opt")]);
        let x = fs::metadata(f.root.join("opt/sub/x")).unwrap();
        assert_eq!(x.mode() & 0o7777, 0o750);
        assert_eq!((x.uid(), x.gid()), (0, 0));
        assert_eq!(
            fs::read_link(f.root.join("opt/link")).unwrap(),
            PathBuf::from("../a.txt")
        );
    }

    #[test]
    fn globs_and_multiple_sources_need_a_dir() {
        let f = fixture();
        run(&f, &["*.txt"], "/t/").unwrap();
        assert!(f.root.join("t/a.txt").is_file() && f.root.join("t/b.txt").is_file());
        assert!(run(&f, &["a.txt", "b.txt"], "/t2").is_err());
        assert!(run(&f, &["*.nothing"], "/t/").is_err());
        assert!(run(&f, &["missing"], "/t/").is_err());
    }

    #[test]
    fn dockerignore_hides_sources_globs_and_dir_entries() {
        let f = fixture();
        fs::write(f.ctx.join("src/sub/x.log"), "log").unwrap();
        let ignore = Ignore::parse("**/*.log\nb.txt\nsrc/link\n").unwrap();
        let run =
            |sources: &[&str], dest: &str| run_with(&f, sources, dest, Some(&ignore), &[], false);
        run(&["*.txt"], "/g/").unwrap();
        assert!(f.root.join("g/a.txt").is_file() && !f.root.join("g/b.txt").exists());
        let err = run(&["b.txt"], "/b").unwrap_err().to_string();
        assert!(err.contains("excluded by .dockerignore"), "{err}");
        assert!(
            run(&["b.*"], "/b/").is_err(),
            "a glob matching only hidden files"
        );
        run(&["."], "/all/").unwrap();
        assert!(f.root.join("all/src/sub/x").is_file());
        assert!(!f.root.join("all/src/sub/x.log").exists());
        assert!(!f.root.join("all/src/link").exists());
        assert!(!f.root.join("all/b.txt").exists());
        // The key hashes exactly what the copy sees.
        let hash = || {
            selected_context_sources(&f.ctx, &ignore, &[".".into()])
                .unwrap()
                .digest(None)
                .unwrap()
        };
        let before = hash();
        fs::write(f.ctx.join("src/sub/x.log"), "changed").unwrap();
        fs::write(f.ctx.join("b.txt"), "changed").unwrap();
        assert_eq!(before, hash(), "hidden files do not count");
        fs::write(f.ctx.join("a.txt"), "changed").unwrap();
        assert_ne!(before, hash());
    }

    #[test]
    fn excludes_and_parents() {
        let f = fixture();
        fs::write(f.ctx.join("src/sub/notes.md"), "md").unwrap();
        fs::write(f.ctx.join("src/top.md"), "md").unwrap();
        fs::set_permissions(f.ctx.join("src/sub"), fs::Permissions::from_mode(0o700)).unwrap();
        let run = |sources: &[&str], dest: &str, excludes: &[&str], parents: bool| {
            run_with(&f, sources, dest, None, excludes, parents)
        };
        // Matched against the sources as written, and inside a directory
        // source relative to it: `*.md` is its top level only.
        run(&["*.txt", "src"], "/e/", &["b.*", "*.md"], false).unwrap();
        assert!(f.root.join("e/a.txt").is_file());
        assert!(!f.root.join("e/b.txt").exists());
        assert!(!f.root.join("e/top.md").exists());
        assert!(f.root.join("e/sub/notes.md").is_file());
        run(&["src"], "/e2/", &["**/*.md", "link"], false).unwrap();
        assert!(!f.root.join("e2/sub/notes.md").exists() && !f.root.join("e2/link").exists());
        assert!(f.root.join("e2/sub/x").is_file());

        // --parents keeps the path, below a /./ pivot when there is one.
        run(&["a.txt", "src/sub/x", "src/top.md"], "/p/", &[], true).unwrap();
        assert!(f.root.join("p/a.txt").is_file());
        assert!(f.root.join("p/src/sub/x").is_file());
        assert!(f.root.join("p/src/top.md").is_file());
        let sub = fs::metadata(f.root.join("p/src/sub")).unwrap();
        assert_eq!(
            sub.mode() & 0o7777,
            0o700,
            "parents keep their source modes"
        );
        run(&["./src/./sub/*"], "/q/", &[], true).unwrap();
        assert!(f.root.join("q/sub/x").is_file() && !f.root.join("q/src").exists());
        run(&["src/sub"], "/r/", &[], true).unwrap();
        assert!(f.root.join("r/src/sub/x").is_file());
    }

    #[test]
    fn sources_and_dests_cannot_escape() {
        let f = fixture();
        symlink("/", f.root.join("up")).unwrap();
        run(&f, &["../../../../etc/hostname"], "/x").unwrap_err();
        run(&f, &["a.txt"], "/up/escaped").unwrap();
        assert!(f.root.join("escaped").is_file());
    }

    #[test]
    fn a_dest_through_a_dangling_symlink_names_the_link() {
        let f = fixture();
        symlink("/srv/missing", f.root.join("app")).unwrap();
        let err = run(&f, &["a.txt"], "/app/").unwrap_err();
        assert!(matches!(err, CopyError::Link(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "/app is a symlink to /srv/missing, which does not exist in the image"
        );
        // Nothing was made outside the root or at the link's target.
        assert!(!f.root.join("srv").exists());
    }

    #[test]
    fn not_root_owners_and_modes_are_recorded_and_read_back_from_a_root() {
        use crate::rootfs::owners::{self, tests::as_unprivileged, Stat};
        let f = fixture();
        let stat = |p: &str| {
            let path = f.root.join(p);
            owners::get(&path, &fs::symlink_metadata(&path).unwrap())
        };
        let copy_as = |source, sources: &[&str], dest: &str, chown, chmod| {
            let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
            as_unprivileged(|| {
                copy(
                    &CopyRequest {
                        source,
                        sources: &sources,
                        dest,
                        chown,
                        chmod,
                        ignore: None,
                        excludes: &[],
                        parents: false,
                    },
                    &f.root,
                )
            })
            .unwrap()
        };
        copy_as(
            Source::Context(&f.ctx),
            &["src"],
            "/app/",
            Some((1234, 2345)),
            None,
        );
        let owned = |mode| Stat {
            uid: 1234,
            gid: 2345,
            mode,
        };
        // The directory the copy made, and what it copied, are the owner's.
        assert_eq!(stat("app"), owned(0o755));
        assert_eq!(stat("app/sub/x"), owned(0o750));
        // A symlink cannot carry the record: 0:0 in the image.
        assert!(fs::symlink_metadata(f.root.join("app/link"))
            .unwrap()
            .is_symlink());
        assert_eq!(stat("app/link").uid, 0);
        copy_as(
            Source::Context(&f.ctx),
            &["a.txt"],
            "/ro",
            None,
            Some(0o4500),
        );
        assert_eq!(
            stat("ro"),
            Stat {
                uid: 0,
                gid: 0,
                mode: 0o4500
            }
        );
        // The file stays readable and writable for this process.
        assert_eq!(
            fs::metadata(f.root.join("ro")).unwrap().mode() & 0o7777,
            0o700
        );
        // COPY --from: the source root's records are read back.
        copy_as(
            Source::Root(&f.root),
            &["/app/sub/x"],
            "/copied",
            None,
            None,
        );
        assert_eq!(stat("copied"), owned(0o750));
    }
}
