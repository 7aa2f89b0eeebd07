//! Unpacking of one untrusted OCI/Docker layer tar onto a root filesystem.
//!
//! Layers come from registries, so every name in them is hostile until
//! proven otherwise. All paths are resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT)` relative to a descriptor of the root, which
//! treats the root as `/` exactly like a chroot: symlinks in the image
//! (absolute or with `..`) are followed *inside* it and can never reach the
//! host. Only parent directories are resolved that way; the final component
//! is always handled with `*at` calls on the resolved parent and is never
//! followed, so an existing symlink there is replaced rather than written
//! through. Missing parent directories are created (0755, root-owned), also
//! at the in-root target of a dangling symlink on the way.
//!
//! Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) only remove
//! what lower layers put there: objects this layer wrote are tracked by
//! inode and kept, whether they come before or after the marker in the tar.
//! [`extract_layer_dir`] instead unpacks a layer alone into an empty
//! directory in overlayfs's own format, for stacking: a whiteout becomes a
//! 0:0 character device and an opaque marker the `trusted.overlay.opaque`
//! xattr. `trusted.overlay.*` xattrs in a layer are never applied: they
//! would steer overlayfs.
//!
//! What is refused (the whole layer fails) and what is skipped:
//!
//! * A path or hard-link target whose `..` climbs above the root is refused
//!   ([`ExtractError::PathOutsideRoot`], [`ExtractError::HardlinkOutsideRoot`]),
//!   as Docker does: no well-formed layer contains one. Leading `/` and `./`
//!   are stripped, and `..` that stays inside (`a/../b`) is cleaned lexically.
//! * A hard link whose target does not exist in the root is refused
//!   ([`ExtractError::HardlinkTargetMissing`]); it is never looked up on the
//!   host. Whiteouts of `.`/`..` and malformed headers are refused too
//!   ([`ExtractError::InvalidEntry`]).
//! * The root entry itself (`./`) is skipped (the root's own metadata
//!   belongs to the caller), as are entry types with no filesystem meaning
//!   (global PAX headers, GNU volume labels...), with a warning.
//! * With [`extract_layer_keeping`], entries at or under a kept path, and
//!   entries that would replace a directory leading to one, are skipped,
//!   and whiteouts leave kept objects alone (`--isolation none`, where the
//!   root is the machine's own `/`).
//! * Extended attributes the filesystem does not support (`ENOTSUP`) or
//!   does not allow (`EPERM`) are skipped with a warning, as Docker does;
//!   xattrs on symlinks are skipped.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    AtFlags, Dir, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps, Uid,
    XattrFlags,
};
use rustix::io::Errno;
use tar::EntryType;

/// What one layer changed in the root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Filesystem entries written (files, directories, links, devices).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
}

/// Why a layer could not be applied. Paths are the entry's name as written
/// in the tar stream.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The tar stream itself is unreadable or malformed.
    #[error("reading layer tar stream: {0}")]
    Tar(#[source] io::Error),
    /// A filesystem operation on an entry failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The entry's path climbs out of the root with `..`.
    #[error("{path}: path escapes the root")]
    PathOutsideRoot { path: PathBuf },
    /// A hard link's target climbs out of the root with `..`.
    #[error("{path}: hard link target {target} escapes the root")]
    HardlinkOutsideRoot { path: PathBuf, target: PathBuf },
    /// A hard link's target is not in the root (nor earlier in the layer).
    #[error("{path}: hard link target {target} does not exist in the root")]
    HardlinkTargetMissing { path: PathBuf, target: PathBuf },
    /// The entry's header or name makes no sense.
    #[error("{path}: invalid entry: {reason}")]
    InvalidEntry { path: PathBuf, reason: String },
}

/// Unpacks one uncompressed layer tar stream onto `root`, an existing
/// directory holding the lower layers, applying whiteouts per the OCI image
/// spec. Nothing outside `root` is ever created, modified or deleted; see
/// the module documentation for which entries are refused or skipped.
///
/// Must run as root (or with the matching capabilities) to apply ownership,
/// device nodes and `security.*` xattrs. Regular-file content is streamed.
#[cfg(test)]
pub fn extract_layer<R: Read>(root: &Path, layer: R) -> Result<ExtractStats, ExtractError> {
    extract(root, layer, Format::Apply, &[])
}

/// [`extract_layer`] onto a root that holds things the layer must not touch:
/// the `keep` paths (relative to the root) and everything under them.
pub fn extract_layer_keeping<R: Read>(
    root: &Path,
    layer: R,
    keep: &[PathBuf],
) -> Result<ExtractStats, ExtractError> {
    extract(root, layer, Format::Apply, keep)
}

/// Unpacks one uncompressed layer tar stream into `dir`, an empty
/// directory, as an overlayfs lower layer: whiteouts and opaque markers are
/// recorded the way overlayfs reads them instead of being applied. A hard
/// link must point into the same layer.
pub fn extract_layer_dir<R: Read>(dir: &Path, layer: R) -> Result<ExtractStats, ExtractError> {
    extract(dir, layer, Format::Overlay, &[])
}

/// Unpacks a plain archive (`ADD archive.tar`) into `dir`, as Docker's
/// untar does: `.wh.` names are ordinary files (an archive is no layer),
/// AUFS metadata (`.wh..wh.*`) is skipped, and `owner`, when given
/// (`--chown`), replaces every entry's owner before modes are set, so
/// setuid bits survive it. Everything else is as [`extract_layer`].
pub fn extract_archive<R: Read>(
    dir: &Path,
    archive: R,
    owner: Option<(u32, u32)>,
) -> Result<ExtractStats, ExtractError> {
    extract(dir, archive, Format::Archive { owner }, &[])
}

/// What whiteouts do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Delete from the root what lower layers put there.
    Apply,
    /// Record them as overlayfs does (a layer alone in its own directory).
    Overlay,
    /// Nothing: a plain archive, owned by `owner` when given.
    Archive { owner: Option<(u32, u32)> },
}

fn extract<R: Read>(
    root: &Path,
    layer: R,
    format: Format,
    keep: &[PathBuf],
) -> Result<ExtractStats, ExtractError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ExtractError::Io {
        path: root.to_owned(),
        source: e.into(),
    })?;
    let mut extractor = Extractor {
        root: root_fd,
        format,
        created: HashSet::new(),
        keep,
        protected: keep
            .iter()
            .filter_map(|k| rustix::fs::lstat(root.join(k)).ok())
            .map(|st| file_id(&st))
            .collect(),
        dir_times: Vec::new(),
        stats: ExtractStats::default(),
    };
    let mut archive = tar::Archive::new(layer);
    for entry in archive.entries().map_err(ExtractError::Tar)? {
        extractor.apply(entry.map_err(ExtractError::Tar)?)?;
    }
    extractor.finish();
    Ok(extractor.stats)
}

/// Identifies a filesystem object: `(st_dev, st_ino)`.
type FileId = (u64, u64);

/// A directory whose mtime is set once the layer is done, since writing its
/// children changes it.
struct DirTime {
    rel: PathBuf,
    id: FileId,
    times: Timestamps,
}

struct Extractor<'k> {
    /// `O_PATH` descriptor of the root; everything is resolved from it.
    root: OwnedFd,
    format: Format,
    /// Objects this layer wrote (or, for directories, kept and updated).
    /// Opaque markers and whiteouts only remove what lower layers put there,
    /// whatever the order of the marker and the layer's own entries; keying
    /// by inode rather than name stays right when a path reached the object
    /// through an in-image symlink.
    created: HashSet<FileId>,
    /// Paths (relative to the root) this layer must leave alone, and the
    /// objects found there, which whiteouts must not remove.
    keep: &'k [PathBuf],
    protected: HashSet<FileId>,
    dir_times: Vec<DirTime>,
    stats: ExtractStats,
}

/// What an entry's name says about whiteouts.
#[derive(Clone, Copy)]
enum Whiteout<'a> {
    /// `.wh..wh..opq`: hide everything lower layers put in the directory.
    Opaque,
    /// `.wh.NAME`: delete `NAME` from lower layers.
    Name(&'a OsStr),
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// AUFS's own files (`.wh..wh.plnk`, `.wh..wh.aufs`...), the opaque marker
/// among them.
const AUFS_METADATA: &[u8] = b".wh..wh.";
/// Marks a directory that hides what lower layers have there.
pub const OVERLAY_OPAQUE: &str = "trusted.overlay.opaque";
/// Overlayfs's own xattrs: storage details, never image content.
pub const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// Same limit as the kernel's for symlink hops during one resolution.
const MAX_SYMLINK_HOPS: u32 = 40;

impl Extractor<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let raw = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let rel =
            clean_path(&raw).ok_or_else(|| ExtractError::PathOutsideRoot { path: raw.clone() })?;
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            tracing::debug!(path = %raw.display(), "skipping the layer's root entry");
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));

        match (whiteout_of(&name), self.format) {
            // As Docker's untar: a top-level `.wh..wh.*` and all below it.
            (_, Format::Archive { .. })
                if rel.as_os_str().as_bytes().starts_with(AUFS_METADATA) =>
            {
                tracing::debug!(path = %raw.display(), "skipping AUFS metadata in an archive");
                return Ok(());
            }
            (Some(_), Format::Archive { .. }) | (None, _) => {}
            (Some(whiteout), _) => return self.whiteout(&raw, parent_rel, whiteout),
        }

        let Some(kind) = Kind::of(entry.header(), &raw) else {
            let kind = entry.header().entry_type();
            if kind != EntryType::XGlobalHeader {
                tracing::warn!(path = %raw.display(), ?kind, "skipping unsupported tar entry type");
            }
            return Ok(());
        };

        let kept = self
            .keep
            .iter()
            .any(|k| rel.starts_with(k) || (k.starts_with(&rel) && !matches!(kind, Kind::Dir)));
        if kept {
            tracing::debug!(path = %raw.display(), "skipping an entry over a kept path");
            return Ok(());
        }

        let mut meta = Meta::read(&mut entry, &raw)?;
        if let Format::Archive {
            owner: Some((uid, gid)),
        } = self.format
        {
            meta.uid = Uid::from_raw(uid);
            meta.gid = Gid::from_raw(gid);
        }
        let io_err = |e: io::Error| ExtractError::Io {
            path: raw.clone(),
            source: e,
        };
        let parent = self
            .open_dir(parent_rel, true)
            .map_err(|e| io_err(e.into()))?;
        let parent = parent.as_fd();

        match kind {
            Kind::Dir => self.write_dir(parent, &name, &rel, &meta).map_err(io_err)?,
            Kind::File => {
                let bytes = self
                    .write_file(parent, &name, &meta, &mut entry)
                    .map_err(io_err)?;
                self.stats.bytes += bytes;
            }
            Kind::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| invalid(&raw, "symlink without a target"))?;
                self.write_symlink(parent, &name, &target, &meta)
                    .map_err(io_err)?;
            }
            Kind::Hardlink => self.write_hardlink(parent, &name, &raw, &entry)?,
            Kind::Node(file_type) => {
                let dev = match file_type {
                    FileType::Fifo => 0,
                    _ => device(entry.header(), &raw)?,
                };
                self.write_node(parent, &name, file_type, dev, &meta)
                    .map_err(io_err)?;
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Applies a whiteout or opaque marker found at `raw` in `parent_rel`.
    fn whiteout(
        &mut self,
        raw: &Path,
        parent_rel: &Path,
        whiteout: Whiteout<'_>,
    ) -> Result<(), ExtractError> {
        let io_err = |e: Errno| ExtractError::Io {
            path: raw.to_owned(),
            source: e.into(),
        };
        if let Whiteout::Name(name) = whiteout {
            if name.is_empty() || name == "." || name == ".." {
                return Err(invalid(raw, "whiteout of an invalid name"));
            }
        }
        if self.format == Format::Overlay {
            self.record_whiteout(parent_rel, whiteout).map_err(io_err)?;
            self.stats.whiteouts += 1;
            return Ok(());
        }
        match whiteout {
            Whiteout::Opaque => {
                // The marker means the directory exists in this layer.
                let dir = self.open_dir_for_reading(parent_rel).map_err(io_err)?;
                for child in list_dir(&dir).map_err(io_err)? {
                    prune(
                        dir.as_fd(),
                        child.as_c_str(),
                        &self.created,
                        &self.protected,
                    )
                    .map_err(io_err)?;
                }
            }
            Whiteout::Name(name) => {
                match self.open_dir(parent_rel, false) {
                    Ok(dir) => {
                        prune(dir.as_fd(), name, &self.created, &self.protected).map_err(io_err)?;
                    }
                    // Nothing below a missing directory or a file to delete.
                    Err(Errno::NOENT | Errno::NOTDIR) => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// [`Format::Overlay`]: an opaque directory gets the xattr, a whiteout
    /// a 0:0 character device (unless this layer wrote that name itself).
    fn record_whiteout(&mut self, parent_rel: &Path, whiteout: Whiteout<'_>) -> Result<(), Errno> {
        match whiteout {
            Whiteout::Opaque => {
                let dir = self.open_dir_for_reading(parent_rel)?;
                rustix::fs::fsetxattr(&dir, OVERLAY_OPAQUE, b"y", XattrFlags::empty())
            }
            Whiteout::Name(name) => {
                let dir = self.open_dir(parent_rel, true)?;
                if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                    if self.created.contains(&file_id(&st)) {
                        return Ok(());
                    }
                }
                rustix::fs::mknodat(&dir, name, FileType::CharacterDevice, Mode::empty(), 0)
            }
        }
    }

    fn write_dir(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        meta: &Meta,
    ) -> io::Result<()> {
        if !clear_slot(parent, name, true)? {
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700))?;
        }
        let dir = File::from(rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        rustix::fs::fchown(&dir, Some(meta.uid), Some(meta.gid))?;
        rustix::fs::fchmod(&dir, meta.mode)?;
        meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&dir, n, v, XattrFlags::empty()))?;
        let id = file_id(&rustix::fs::fstat(&dir)?);
        self.created.insert(id);
        self.dir_times.push(DirTime {
            rel: rel.to_owned(),
            id,
            times: meta.timestamps(),
        });
        Ok(())
    }

    /// Writes a regular file, streaming its content; returns its size.
    fn write_file(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        content: &mut impl Read,
    ) -> io::Result<u64> {
        clear_slot(parent, name, false)?;
        let mut file = File::from(rustix::fs::openat(
            parent,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?);
        let bytes = io::copy(content, &mut file)?;
        // chown clears setuid/setgid and file capabilities, so mode then
        // xattrs (security.capability) come after it.
        rustix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))?;
        rustix::fs::fchmod(&file, meta.mode)?;
        meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&file, n, v, XattrFlags::empty()))?;
        rustix::fs::futimens(&file, &meta.timestamps())?;
        self.created.insert(file_id(&rustix::fs::fstat(&file)?));
        Ok(bytes)
    }

    fn write_symlink(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        target: &[u8],
        meta: &Meta,
    ) -> io::Result<()> {
        clear_slot(parent, name, false)?;
        // The target is only data: it is never resolved here.
        rustix::fs::symlinkat(target, parent, name)?;
        rustix::fs::chownat(
            parent,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::utimensat(parent, name, &meta.timestamps(), AtFlags::SYMLINK_NOFOLLOW)?;
        if !meta.xattrs.is_empty() {
            tracing::debug!(name = %name.to_string_lossy(), "skipping xattrs on a symlink");
        }
        self.record(parent, name)?;
        Ok(())
    }

    /// Creates a device node or fifo (`dev` is 0 for fifos).
    fn write_node(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        file_type: FileType,
        dev: u64,
        meta: &Meta,
    ) -> io::Result<()> {
        clear_slot(parent, name, false)?;
        rustix::fs::mknodat(parent, name, file_type, Mode::from_raw_mode(0o600), dev)?;
        rustix::fs::chownat(
            parent,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        // fchmodat cannot refuse to follow, but `name` was just made by
        // mknodat in a root only this extraction writes to: it is the node.
        rustix::fs::chmodat(parent, name, meta.mode, AtFlags::empty())?;
        if !meta.xattrs.is_empty() {
            // Opening a device could have side effects, and fsetxattr
            // refuses O_PATH descriptors; the /proc magic link of one
            // reaches the node itself.
            let node = rustix::fs::openat(
                parent,
                name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&node));
            meta.set_xattrs(|n, v| rustix::fs::setxattr(&proc_path, n, v, XattrFlags::empty()))?;
        }
        rustix::fs::utimensat(parent, name, &meta.timestamps(), AtFlags::SYMLINK_NOFOLLOW)?;
        self.record(parent, name)?;
        Ok(())
    }

    /// Hard-links `name` to the entry's link target, resolved in the root.
    fn write_hardlink<R: Read>(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        raw: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), ExtractError> {
        let target_raw = entry
            .link_name_bytes()
            .map(|t| PathBuf::from(OsStr::from_bytes(&t)))
            .ok_or_else(|| invalid(raw, "hard link without a target"))?;
        let missing = || ExtractError::HardlinkTargetMissing {
            path: raw.to_owned(),
            target: target_raw.clone(),
        };
        let io_err = |e: Errno| ExtractError::Io {
            path: raw.to_owned(),
            source: e.into(),
        };
        let target_rel =
            clean_path(&target_raw).ok_or_else(|| ExtractError::HardlinkOutsideRoot {
                path: raw.to_owned(),
                target: target_raw.clone(),
            })?;
        let Some(target_name) = target_rel.file_name() else {
            return Err(invalid(raw, "hard link to the root directory"));
        };
        let target_dir = match self.open_dir(target_rel.parent().unwrap_or(Path::new("")), false) {
            Ok(dir) => dir,
            Err(Errno::NOENT | Errno::NOTDIR) => return Err(missing()),
            Err(e) => return Err(io_err(e)),
        };
        let target = match rustix::fs::statat(&target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => return Err(io_err(e)),
        };
        if file_type(&target) == FileType::Directory {
            return Err(invalid(raw, "hard link to a directory"));
        }
        let id = file_id(&target);
        // Already that very file (e.g. a link to itself): removing it first
        // would lose the target.
        let linked = matches!(
            rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW),
            Ok(st) if file_id(&st) == id
        );
        if !linked {
            clear_slot(parent, name, false).map_err(|e| ExtractError::Io {
                path: raw.to_owned(),
                source: e,
            })?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
            rustix::fs::linkat(&target_dir, target_name, parent, name, AtFlags::empty())
                .map_err(io_err)?;
        }
        self.created.insert(id);
        Ok(())
    }

    /// Remembers the object just created at `name` as this layer's own.
    fn record(&mut self, parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
        self.created.insert(file_id(&st));
        Ok(())
    }

    /// Sets the deferred directory mtimes. A directory since removed or
    /// replaced by a later entry (another inode) is left alone.
    fn finish(&mut self) {
        for dir in std::mem::take(&mut self.dir_times) {
            let Some(name) = dir.rel.file_name() else {
                continue;
            };
            let Ok(parent) = self.open_dir(dir.rel.parent().unwrap_or(Path::new("")), false) else {
                continue;
            };
            let same = matches!(
                rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW),
                Ok(st) if file_id(&st) == dir.id
            );
            if same {
                if let Err(e) =
                    rustix::fs::utimensat(&parent, name, &dir.times, AtFlags::SYMLINK_NOFOLLOW)
                {
                    tracing::warn!(path = %dir.rel.display(), error = %e, "setting directory mtime");
                }
            }
        }
    }

    /// Opens (`O_PATH`) the directory at `rel`, resolved as if the root were
    /// `/`. With `create`, missing directories are made (0755, root-owned),
    /// following in-image symlinks whose targets are missing, like `mkdir -p`
    /// run in a chroot that also creates a dangling link's target.
    fn open_dir(&self, rel: &Path, create: bool) -> rustix::io::Result<OwnedFd> {
        match self.resolve_dir(rel) {
            Err(Errno::NOENT) if create => self.create_dirs(rel),
            result => result,
        }
    }

    /// The directory at `rel` (made if missing), open for listing and
    /// xattrs: `open_dir`'s `O_PATH` descriptor allows neither.
    fn open_dir_for_reading(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let dir = self.open_dir(rel, true)?;
        rustix::fs::openat(
            &dir,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    fn resolve_dir(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        loop {
            match rustix::fs::openat2(
                &self.root,
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                // The kernel asks for a retry when a rename raced the lookup.
                Err(Errno::AGAIN) => continue,
                result => return result,
            }
        }
    }

    fn create_dirs(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let mut pending: VecDeque<OsString> = components(rel).collect();
        // `prefix` always names (through openat2) the directory `dir`.
        let mut prefix = PathBuf::new();
        let mut dir = self.resolve_dir(&prefix)?;
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            let candidate = prefix.join(&name);
            match self.resolve_dir(&candidate) {
                Ok(fd) => {
                    (dir, prefix) = (fd, candidate);
                    continue;
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(e),
            }
            // `name` is missing from `dir`, or is a symlink to something missing.
            match rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&dir, &name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    let made = rustix::fs::openat(
                        &dir,
                        &name,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    // Explicit, as the umask or a setgid parent may differ.
                    rustix::fs::chownat(
                        &dir,
                        &name,
                        Some(Uid::ROOT),
                        Some(Gid::ROOT),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )?;
                    rustix::fs::chmodat(&dir, &name, Mode::from_raw_mode(0o755), AtFlags::empty())?;
                    (dir, prefix) = (made, candidate);
                }
                Ok(st) if file_type(&st) == FileType::Symlink => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Errno::LOOP);
                    }
                    let target = rustix::fs::readlinkat(&dir, &name, Vec::new())?;
                    let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                    if target.is_absolute() {
                        prefix = PathBuf::new();
                        dir = self.resolve_dir(&prefix)?;
                    }
                    // Relative targets continue from `prefix`; their `..`
                    // are resolved (and clamped at the root) by openat2.
                    for (i, c) in components(target).enumerate() {
                        pending.insert(i, c);
                    }
                }
                Ok(_) => return Err(Errno::NOTDIR),
                Err(e) => return Err(e),
            }
        }
        Ok(dir)
    }
}

/// The kinds of entries written to the filesystem.
#[derive(Clone, Copy)]
enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
    /// A device node or fifo.
    Node(FileType),
}

impl Kind {
    /// `None` for entry types with no filesystem meaning.
    fn of(header: &tar::Header, raw: &Path) -> Option<Self> {
        Some(match header.entry_type() {
            // Old (pre-POSIX) archives mark directories with a trailing slash.
            EntryType::Regular
                if header.as_ustar().is_none() && raw.as_os_str().as_bytes().ends_with(b"/") =>
            {
                Kind::Dir
            }
            EntryType::Directory => Kind::Dir,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::Hardlink,
            EntryType::Char => Kind::Node(FileType::CharacterDevice),
            EntryType::Block => Kind::Node(FileType::BlockDevice),
            EntryType::Fifo => Kind::Node(FileType::Fifo),
            _ => return None,
        })
    }
}

/// The device number of a character or block device entry.
fn device(header: &tar::Header, raw: &Path) -> Result<u64, ExtractError> {
    let major = header.device_major().map_err(|e| invalid(raw, e))?;
    let minor = header.device_minor().map_err(|e| invalid(raw, e))?;
    match (major, minor) {
        (Some(major), Some(minor)) => Ok(rustix::fs::makedev(major, minor)),
        _ => Err(invalid(raw, "device without major/minor numbers")),
    }
}

/// Ownership, mode, times and xattrs of an entry, from its header and PAX
/// records (which take precedence).
struct Meta {
    uid: Uid,
    gid: Gid,
    /// Permission bits including setuid, setgid and sticky.
    mode: Mode,
    mtime: Timespec,
    atime: Option<Timespec>,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<Self, ExtractError> {
        let header = entry.header();
        let bad = |e: io::Error| invalid(path, e);
        let mut uid = header.uid().map_err(bad)?;
        let mut gid = header.gid().map_err(bad)?;
        let mode = header.mode().map_err(bad)? & 0o7777;
        let mtime = header.mtime().map_err(bad)?;
        let mut mtime = Timespec {
            tv_sec: i64::try_from(mtime).map_err(|_| invalid(path, "mtime out of range"))?,
            tv_nsec: 0,
        };
        let mut atime = None;
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(ExtractError::Tar)? {
            for extension in extensions {
                let extension = extension.map_err(ExtractError::Tar)?;
                let value = extension.value_bytes();
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| invalid(path, "invalid number in PAX record"))
                };
                let time =
                    || parse_pax_time(value).ok_or_else(|| invalid(path, "invalid PAX time"));
                match extension.key_bytes() {
                    b"uid" => uid = number()?,
                    b"gid" => gid = number()?,
                    b"mtime" => mtime = time()?,
                    b"atime" => atime = Some(time()?),
                    key => {
                        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                            if name.starts_with(OVERLAY_XATTR_PREFIX) {
                                tracing::warn!(path = %path.display(), "skipping an overlayfs xattr");
                                continue;
                            }
                            xattrs.push((OsStr::from_bytes(name).to_owned(), value.to_vec()));
                        }
                    }
                }
            }
        }
        let id = |n: u64| u32::try_from(n).map_err(|_| invalid(path, "uid/gid out of range"));
        Ok(Meta {
            uid: Uid::from_raw(id(uid)?),
            gid: Gid::from_raw(id(gid)?),
            mode: Mode::from_raw_mode(mode),
            mtime,
            atime,
            xattrs,
        })
    }

    fn timestamps(&self) -> Timestamps {
        Timestamps {
            last_access: self.atime.unwrap_or(self.mtime),
            last_modification: self.mtime,
        }
    }

    /// Applies the xattrs with `set`, tolerating filesystems without support.
    fn set_xattrs(
        &self,
        mut set: impl FnMut(&OsStr, &[u8]) -> rustix::io::Result<()>,
    ) -> io::Result<()> {
        for (name, value) in &self.xattrs {
            match set(name, value) {
                Ok(()) => {}
                Err(e @ (Errno::NOTSUP | Errno::PERM)) => {
                    tracing::warn!(xattr = %name.to_string_lossy(), error = %e, "skipping xattr");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Parses a PAX time: decimal seconds, optionally negative, with an
/// optional fraction (`-1.5` is half a second before `-1`).
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    // Nanoseconds: the first nine fraction digits, right-padded.
    let nanos = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(match (negative, nanos) {
        (false, _) => Timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        (true, 0) => Timespec {
            tv_sec: -secs,
            tv_nsec: 0,
        },
        (true, _) => Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        },
    })
}

/// Cleans an entry name to a relative path of normal components: leading
/// `/`, `.` and `..` that stays inside are resolved lexically. `None` when
/// `..` climbs above the root.
fn clean_path(raw: &Path) -> Option<PathBuf> {
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
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some("..".into()),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn whiteout_of(name: &OsStr) -> Option<Whiteout<'_>> {
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
fn clear_slot(parent: BorrowedFd<'_>, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
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
fn prune<P: rustix::path::Arg + Copy>(
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
fn list_dir(dir: &OwnedFd) -> rustix::io::Result<Vec<CString>> {
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
fn file_id(st: &Stat) -> FileId {
    (st.st_dev as u64, st.st_ino as u64)
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

fn invalid(path: &Path, reason: impl ToString) -> ExtractError {
    ExtractError::InvalidEntry {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use tar::{Builder, Header};

    const MTIME: u64 = 1_600_000_000;

    /// Builds a layer tar in memory. Names and link names are written raw
    /// into the header, so tests can produce what a hostile tool would.
    struct Layer(Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(Builder::new(Vec::new()))
        }

        fn entry(
            &mut self,
            kind: EntryType,
            name: &str,
            link: &str,
            mode: u32,
            data: &[u8],
            tweak: impl FnOnce(&mut Header),
        ) -> &mut Self {
            let mut h = Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            h.set_size(data.len() as u64);
            tweak(&mut h);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn dir(&mut self, name: &str) -> &mut Self {
            self.entry(EntryType::Directory, name, "", 0o755, b"", |_| {})
        }

        fn file(&mut self, name: &str, data: &str) -> &mut Self {
            self.entry(EntryType::Regular, name, "", 0o644, data.as_bytes(), |_| {})
        }

        fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Symlink, name, target, 0o777, b"", |_| {})
        }

        fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
            self.entry(EntryType::Link, name, target, 0o644, b"", |_| {})
        }

        fn bytes(&mut self) -> Vec<u8> {
            std::mem::replace(&mut self.0, Builder::new(Vec::new()))
                .into_inner()
                .unwrap()
        }
    }

    fn owner(uid: u64, gid: u64) -> impl FnOnce(&mut Header) {
        move |h| {
            h.set_uid(uid);
            h.set_gid(gid);
        }
    }

    fn read(path: impl AsRef<Path>) -> String {
        fs::read_to_string(path).unwrap()
    }

    fn lmeta(path: impl AsRef<Path>) -> fs::Metadata {
        fs::symlink_metadata(path).unwrap()
    }

    fn exists(path: impl AsRef<Path>) -> bool {
        fs::symlink_metadata(path).is_ok()
    }

    #[test]
    fn unpacks_every_entry_type_with_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // security.capability v2 granting cap_net_raw (bit 13), as ping has.
        let mut cap = [0u8; 20];
        cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
        let long = format!(
            "long/{}/{}/{}",
            "a".repeat(100),
            "b".repeat(100),
            "c".repeat(80)
        );
        let pax_long = format!("pax/{}/{}", "d".repeat(150), "e".repeat(150));
        let unicode = "dir/ünïcødé-文件.txt";

        let mut layer = Layer::new();
        layer
            .entry(EntryType::Directory, "./", "", 0o700, b"", |_| {})
            .entry(EntryType::Directory, "dir/", "", 0o750, b"", |h| {
                h.set_uid(1000);
                h.set_gid(1000);
                h.set_mtime(1_500_000_000);
            })
            .entry(
                EntryType::Regular,
                "dir/file",
                "",
                0o644,
                b"hello",
                owner(1000, 1000),
            )
            .entry(
                EntryType::Regular,
                "dir/suid",
                "",
                0o4755,
                b"#!",
                owner(1000, 1000),
            )
            .entry(
                EntryType::Regular,
                "dir/sgid",
                "",
                0o2755,
                b"",
                owner(0, 1000),
            )
            .entry(EntryType::Regular, "dir/secret", "", 0o000, b"s", |_| {})
            .entry(EntryType::Directory, "tmp/", "", 0o1777, b"", |_| {})
            .entry(
                EntryType::Symlink,
                "dir/link",
                "file",
                0o777,
                b"",
                owner(1000, 1000),
            )
            .symlink("dir/abs", "/etc/shadow")
            .hardlink("dir/hard", "dir/file")
            .hardlink("./dir/hard2", "/dir/file")
            .entry(EntryType::Fifo, "dir/fifo", "", 0o640, b"", |_| {})
            .entry(EntryType::Char, "dev/null", "", 0o666, b"", |h| {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            })
            .entry(EntryType::Block, "dev/loop0", "", 0o660, b"", |h| {
                h.set_device_major(7).unwrap();
                h.set_device_minor(0).unwrap();
            });
        layer
            .0
            .append_pax_extensions([
                ("SCHILY.xattr.user.kiln", &b"yes"[..]),
                ("SCHILY.xattr.security.capability", &cap[..]),
                ("mtime", &b"1600000000.25"[..]),
            ])
            .unwrap();
        layer.entry(EntryType::Regular, "dir/ping", "", 0o755, b"ELF", |_| {});
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(4);
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        layer.0.append_data(&mut h, &long, &b"long"[..]).unwrap();
        layer
            .0
            .append_pax_extensions([("path", pax_long.as_bytes())])
            .unwrap();
        layer
            .file("pax-placeholder", "pax")
            .file(unicode, "unicode");
        let bytes = layer.bytes();

        fs::set_permissions(root, fs::Permissions::from_mode(0o751)).unwrap();
        let stats = extract_layer(root, &bytes[..]).unwrap();
        assert_eq!(
            stats,
            ExtractStats {
                entries: 17,
                bytes: 5 + 2 + 1 + 3 + 4 + 3 + 7,
                whiteouts: 0
            }
        );

        let dir = lmeta(root.join("dir"));
        assert!(dir.is_dir());
        assert_eq!(
            (dir.mode() & 0o7777, dir.uid(), dir.gid()),
            (0o750, 1000, 1000)
        );
        // Set after its children were written.
        assert_eq!(dir.mtime(), 1_500_000_000);

        let file = lmeta(root.join("dir/file"));
        assert_eq!(read(root.join("dir/file")), "hello");
        assert_eq!(
            (file.mode() & 0o7777, file.uid(), file.gid()),
            (0o644, 1000, 1000)
        );
        assert_eq!(file.mtime(), MTIME as i64);
        assert_eq!(file.nlink(), 3);

        let suid = lmeta(root.join("dir/suid"));
        assert_eq!(
            (suid.mode() & 0o7777, suid.uid(), suid.gid()),
            (0o4755, 1000, 1000)
        );
        let sgid = lmeta(root.join("dir/sgid"));
        assert_eq!((sgid.mode() & 0o7777, sgid.gid()), (0o2755, 1000));
        assert_eq!(lmeta(root.join("dir/secret")).mode() & 0o7777, 0);
        assert_eq!(lmeta(root.join("tmp")).mode() & 0o7777, 0o1777);

        let link = lmeta(root.join("dir/link"));
        assert!(link.file_type().is_symlink());
        assert_eq!((link.uid(), link.gid()), (1000, 1000));
        assert_eq!(link.mtime(), MTIME as i64);
        assert_eq!(
            fs::read_link(root.join("dir/link")).unwrap(),
            Path::new("file")
        );
        assert_eq!(
            fs::read_link(root.join("dir/abs")).unwrap(),
            Path::new("/etc/shadow")
        );

        for hard in ["dir/hard", "dir/hard2"] {
            assert_eq!(lmeta(root.join(hard)).ino(), file.ino());
        }

        let fifo = lmeta(root.join("dir/fifo"));
        assert!(fifo.file_type().is_fifo());
        assert_eq!(fifo.mode() & 0o7777, 0o640);

        let null = lmeta(root.join("dev/null"));
        assert!(null.file_type().is_char_device());
        assert_eq!(null.mode() & 0o7777, 0o666);
        assert_eq!(
            (
                rustix::fs::major(null.rdev()),
                rustix::fs::minor(null.rdev())
            ),
            (1, 3)
        );
        let lp = lmeta(root.join("dev/loop0"));
        assert!(lp.file_type().is_block_device());
        assert_eq!(
            (rustix::fs::major(lp.rdev()), rustix::fs::minor(lp.rdev())),
            (7, 0)
        );
        // Created as a missing parent.
        let dev = lmeta(root.join("dev"));
        assert_eq!((dev.mode() & 0o7777, dev.uid(), dev.gid()), (0o755, 0, 0));

        let ping = root.join("dir/ping");
        let mut buf = [0u8; 64];
        let n = rustix::fs::getxattr(&ping, "user.kiln", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], b"yes");
        let n = rustix::fs::getxattr(&ping, "security.capability", &mut buf[..]).unwrap();
        assert_eq!(&buf[..n], &cap[..]);
        let ping = lmeta(&ping);
        assert_eq!(
            (ping.mtime(), ping.mtime_nsec()),
            (MTIME as i64, 250_000_000)
        );

        assert_eq!(read(root.join(&long)), "long");
        assert_eq!(read(root.join(&pax_long)), "pax");
        assert!(!exists(root.join("pax-placeholder")));
        assert_eq!(read(root.join(unicode)), "unicode");
        // The root entry (mode 0700) is skipped: the root keeps its own.
        assert_eq!(lmeta(root).mode() & 0o7777, 0o751);
    }

    #[test]
    fn applies_whiteouts_and_replacements_over_a_lower_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let lower = Layer::new()
            .file("gone.txt", "x")
            .dir("gonedir/")
            .dir("gonedir/sub/")
            .file("gonedir/sub/x", "x")
            .symlink("gonedir/out", "/")
            .file("opq1/old1", "old")
            .file("opq1/keepname", "old")
            .file("opq1/olddir/y", "old")
            .file("opq2/old2", "old")
            .file("opq2/sub/deep", "old")
            .file("opq3/sub/lower", "old")
            .file("opq3/lowerfile", "old")
            .file("d2f/child", "x")
            .file("f2d", "file")
            .file("kept.txt", "kept")
            .bytes();
        extract_layer(root, &lower[..]).unwrap();

        let upper = Layer::new()
            .file(".wh.gone.txt", "")
            .file(".wh.gonedir", "")
            .file(".wh.nothing", "")
            .file("nodir/.wh.nothing", "")
            // Same-layer entries before the opaque marker are kept...
            .file("opq1/keepname", "new")
            .dir("opq3/sub/")
            .file("opq1/.wh..wh..opq", "")
            .file("opq3/.wh..wh..opq", "")
            // ...and so are those after it.
            .file("opq1/olddir/new", "new")
            .file("opq2/.wh..wh..opq", "")
            .file("opq2/new_after", "new")
            // A whiteout only hides lower layers, not its own layer.
            .file("both", "mine")
            .file(".wh.both", "")
            .file("d2f", "now a file")
            .dir("f2d/")
            .file("f2d/inner", "inner")
            .bytes();
        let stats = extract_layer(root, &upper[..]).unwrap();
        assert_eq!(stats.whiteouts, 8);
        assert_eq!(stats.entries, 8);

        let names = |dir: &str| {
            let mut names: Vec<String> = fs::read_dir(root.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert!(!exists(root.join("gone.txt")));
        assert!(!exists(root.join("gonedir")));
        assert!(!exists(root.join("nodir")));
        assert!(!exists(root.join("nothing")));
        assert_eq!(names("opq1"), ["keepname", "olddir"]);
        assert_eq!(read(root.join("opq1/keepname")), "new");
        assert_eq!(names("opq1/olddir"), ["new"]);
        assert_eq!(names("opq2"), ["new_after"]);
        assert_eq!(names("opq3"), ["sub"]);
        assert!(names("opq3/sub").is_empty());
        assert_eq!(read(root.join("both")), "mine");
        assert!(lmeta(root.join("d2f")).is_file());
        assert_eq!(read(root.join("d2f")), "now a file");
        assert!(lmeta(root.join("f2d")).is_dir());
        assert_eq!(read(root.join("f2d/inner")), "inner");
        assert_eq!(read(root.join("kept.txt")), "kept");
        assert!(!root.join(".wh.gone.txt").exists());
        assert!(!root.join("opq1/.wh..wh..opq").exists());
    }

    /// A root inside a temp dir with sentinels beside it, to prove that
    /// nothing outside the root is touched.
    struct Sandbox {
        tmp: tempfile::TempDir,
        root: PathBuf,
        /// Unique per test, for names that could land on the host.
        tag: String,
    }

    impl Sandbox {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            fs::create_dir(&root).unwrap();
            fs::write(tmp.path().join("sentinel"), "sentinel").unwrap();
            fs::create_dir(tmp.path().join("sentineldir")).unwrap();
            fs::write(tmp.path().join("sentineldir/keep"), "keep").unwrap();
            let tag = tmp
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            Sandbox { tmp, root, tag }
        }

        /// Everything beside the root, with contents and link counts.
        fn outside(&self) -> Vec<String> {
            fn walk(dir: &Path, skip: &Path, out: &mut Vec<String>) {
                for e in fs::read_dir(dir).unwrap() {
                    let path = e.unwrap().path();
                    if path == skip {
                        continue;
                    }
                    let m = lmeta(&path);
                    let what = if m.is_dir() {
                        walk(&path, skip, out);
                        "dir".to_owned()
                    } else if m.file_type().is_symlink() {
                        format!("-> {}", fs::read_link(&path).unwrap().display())
                    } else {
                        read(&path)
                    };
                    out.push(format!(
                        "{} {:o} {} {what}",
                        path.display(),
                        m.mode(),
                        m.nlink()
                    ));
                }
            }
            let mut out = Vec::new();
            walk(self.tmp.path(), &self.root, &mut out);
            out.sort();
            out
        }

        /// Extracts the layers in order, checking after each that nothing
        /// beside the root or at host paths named `*{tag}` changed.
        fn extract(&self, layers: &[Vec<u8>]) -> Vec<Result<ExtractStats, ExtractError>> {
            let before = self.outside();
            let passwd = lmeta("/etc/passwd");
            layers
                .iter()
                .map(|layer| {
                    let result = extract_layer(&self.root, &layer[..]);
                    assert_eq!(self.outside(), before);
                    for dir in ["/", "/tmp", "/etc"] {
                        for e in fs::read_dir(dir).unwrap() {
                            let path = e.unwrap().path();
                            let name = path.file_name().unwrap().to_string_lossy();
                            assert!(
                                path == self.tmp.path() || !name.contains(&self.tag),
                                "{}",
                                path.display()
                            );
                        }
                    }
                    let now = lmeta("/etc/passwd");
                    assert_eq!((now.ino(), now.nlink()), (passwd.ino(), passwd.nlink()));
                    result
                })
                .collect()
        }
    }

    #[test]
    fn a_layer_alone_keeps_whiteouts_in_overlayfs_format() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut layer = Layer::new();
        layer
            .dir("etc/")
            .file("etc/.wh.gone", "")
            .file("mine", "mine")
            .file(".wh.mine", "")
            .file("opq/.wh..wh..opq", "")
            .file("opq/kept", "kept");
        // An xattr that would steer overlayfs is never applied.
        layer
            .0
            .append_pax_extensions([("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..])])
            .unwrap();
        layer.file("steered", "x");
        let stats = extract_layer_dir(dir, &layer.bytes()[..]).unwrap();
        assert_eq!(stats.whiteouts, 3);
        let gone = lmeta(dir.join("etc/gone"));
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!(read(dir.join("mine")), "mine", "a layer's own entry wins");
        let mut opaque = [0u8; 4];
        assert_eq!(
            rustix::fs::lgetxattr(dir.join("opq"), OVERLAY_OPAQUE, &mut opaque).unwrap(),
            1
        );
        assert_eq!(read(dir.join("opq/kept")), "kept");
        let mut value = [0u8; 16];
        assert!(
            rustix::fs::lgetxattr(dir.join("steered"), "trusted.overlay.redirect", &mut value)
                .is_err()
        );
    }

    #[test]
    fn refuses_dot_dot_escapes() {
        let sb = Sandbox::new();
        let t = &sb.tag;
        let results = sb.extract(&[
            Layer::new().file(&format!("../escape-{t}"), "x").bytes(),
            Layer::new()
                .file(&format!("../../../../../../../tmp/escape-{t}"), "x")
                .bytes(),
            Layer::new().file(&format!("a/../../b-{t}"), "x").bytes(),
            Layer::new().file("../.wh.sentinel", "").bytes(),
            Layer::new().file("../sentineldir/.wh..wh..opq", "").bytes(),
            Layer::new().dir("../sentineldir/").bytes(),
        ]);
        for r in results {
            assert!(
                matches!(r, Err(ExtractError::PathOutsideRoot { .. })),
                "{r:?}"
            );
        }
        assert_eq!(fs::read_dir(&sb.root).unwrap().count(), 0);
    }

    #[test]
    fn kept_paths_survive_entries_and_whiteouts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("kiln/state")).unwrap();
        fs::write(root.join("kiln/state/db"), "db").unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), "mounted").unwrap();
        fs::write(root.join("etc/old"), "old").unwrap();
        let keep = ["kiln/state", "etc/hosts"].map(PathBuf::from);
        let layer = Layer::new()
            .file("kiln/state/db", "overwritten")
            .file("etc/hosts", "image's")
            .file("etc/passwd", "root:x:0:0::/:/bin/sh")
            // A file where a directory leads to a kept path.
            .file("kiln", "not a dir")
            .bytes();
        extract_layer_keeping(root, &layer[..], &keep).unwrap();
        let whiteouts = Layer::new()
            .file("etc/.wh..wh..opq", "")
            .file("kiln/.wh.state", "")
            .bytes();
        extract_layer_keeping(root, &whiteouts[..], &keep).unwrap();
        assert_eq!(read(root.join("kiln/state/db")), "db");
        assert_eq!(read(root.join("etc/hosts")), "mounted");
        assert!(!exists(root.join("etc/old")));
        assert!(!exists(root.join("etc/passwd")));
    }

    #[test]
    fn absolute_and_harmless_dot_dot_paths_land_inside() {
        let sb = Sandbox::new();
        let t = &sb.tag;
        let results = sb.extract(&[Layer::new()
            .file(&format!("/abs-{t}"), "abs")
            .file(&format!("/x/../rel-{t}"), "rel")
            .bytes()]);
        results.into_iter().for_each(|r| {
            r.unwrap();
        });
        assert_eq!(read(sb.root.join(format!("abs-{t}"))), "abs");
        assert_eq!(read(sb.root.join(format!("rel-{t}"))), "rel");
    }

    #[test]
    fn symlinked_parents_stay_inside_the_root() {
        let sb = Sandbox::new();
        let t = &sb.tag;
        let host_dir = sb.tmp.path().join("sentineldir");
        let results = sb.extract(&[
            Layer::new()
                .symlink("evil", "/")
                .symlink("up", "../../..")
                .symlink("hostdir", host_dir.to_str().unwrap())
                .symlink("dangling", &format!("/nonexistent-{t}/sub"))
                .bytes(),
            Layer::new()
                .file(&format!("evil/pwned-{t}"), "1")
                .file(&format!("up/pwned2-{t}"), "2")
                .file(&format!("evil/tmp/pwned3-{t}"), "3")
                .file("hostdir/keep", "pwned")
                .file("dangling/file", "made inside")
                .bytes(),
            Layer::new()
                .file("up/.wh.sentinel", "")
                .file("evil/.wh.sentinel", "")
                .file("hostdir/.wh.keep", "")
                .file("up/sentineldir/.wh..wh..opq", "")
                .bytes(),
        ]);
        results.into_iter().for_each(|r| {
            r.unwrap();
        });
        let root = &sb.root;
        assert_eq!(read(root.join(format!("pwned-{t}"))), "1");
        assert_eq!(read(root.join(format!("pwned2-{t}"))), "2");
        assert_eq!(read(root.join(format!("tmp/pwned3-{t}"))), "3");
        // The whiteout removed the in-root copy of the host path.
        assert!(lmeta(root.join(host_dir.strip_prefix("/").unwrap())).is_dir());
        assert!(!exists(
            root.join(host_dir.strip_prefix("/").unwrap()).join("keep")
        ));
        assert_eq!(
            read(root.join(format!("nonexistent-{t}/sub/file"))),
            "made inside"
        );
        assert!(fs::symlink_metadata(root.join("evil"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn final_symlinks_are_replaced_not_followed() {
        let sb = Sandbox::new();
        let sentinel = sb.tmp.path().join("sentinel");
        let host_dir = sb.tmp.path().join("sentineldir");
        let results = sb.extract(&[
            Layer::new()
                .symlink("file", sentinel.to_str().unwrap())
                .symlink("rel", "../sentinel")
                .symlink("dir", host_dir.to_str().unwrap())
                .symlink("fifo", sentinel.to_str().unwrap())
                .symlink("link", "../sentinel")
                .file("target", "t")
                .dir("tree/")
                .symlink("tree/out", host_dir.to_str().unwrap())
                .symlink("tree/up", "../../..")
                .dir("tree/sub/")
                .symlink("tree/sub/outfile", sentinel.to_str().unwrap())
                .dir("opq/")
                .symlink("opq/out", host_dir.to_str().unwrap())
                .symlink("opq/up", "../..")
                .dir("wh/")
                .symlink("wh/out", host_dir.to_str().unwrap())
                .bytes(),
            Layer::new()
                .file("file", "replaced")
                .file("rel", "replaced")
                .dir("dir/")
                .entry(EntryType::Fifo, "fifo", "", 0o644, b"", |_| {})
                .hardlink("link", "target")
                // Removing directories never follows the links in them.
                .file("tree", "now a file")
                .file("opq/.wh..wh..opq", "")
                .file(".wh.wh", "")
                .bytes(),
        ]);
        results.into_iter().for_each(|r| {
            r.unwrap();
        });
        let root = &sb.root;
        assert_eq!(read(root.join("file")), "replaced");
        assert_eq!(read(root.join("rel")), "replaced");
        assert!(lmeta(root.join("dir")).is_dir());
        assert!(lmeta(root.join("fifo")).file_type().is_fifo());
        assert_eq!(
            lmeta(root.join("link")).ino(),
            lmeta(root.join("target")).ino()
        );
        assert_eq!(read(root.join("tree")), "now a file");
        assert_eq!(fs::read_dir(root.join("opq")).unwrap().count(), 0);
        assert!(!exists(root.join("wh")));
    }

    #[test]
    fn hardlinks_never_reach_host_files() {
        let sb = Sandbox::new();
        let sentinel = sb.tmp.path().join("sentinel");
        let results = sb.extract(&[
            Layer::new()
                .symlink("evil", "/")
                .symlink("up", "../../..")
                .bytes(),
            Layer::new().hardlink("passwd", "/etc/passwd").bytes(),
            Layer::new().hardlink("passwd2", "evil/etc/passwd").bytes(),
            Layer::new().hardlink("passwd3", "up/etc/passwd").bytes(),
            Layer::new()
                .hardlink("s", sentinel.to_str().unwrap())
                .bytes(),
            Layer::new().hardlink("s2", "up/sentinel").bytes(),
            Layer::new().hardlink("s3", "../sentinel").bytes(),
            Layer::new().hardlink("s4", "evil/../../sentinel").bytes(),
        ]);
        let mut results = results.into_iter();
        results.next().unwrap().unwrap();
        for r in results.by_ref().take(5) {
            assert!(
                matches!(r, Err(ExtractError::HardlinkTargetMissing { .. })),
                "{r:?}"
            );
        }
        for r in results {
            let err = r.unwrap_err();
            assert!(
                matches!(err, ExtractError::HardlinkOutsideRoot { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("escapes the root"), "{err}");
        }
        for name in ["passwd", "passwd2", "passwd3", "s", "s2", "s3", "s4"] {
            assert!(!exists(sb.root.join(name)), "{name}");
        }
    }

    #[test]
    fn invalid_whiteouts_and_loops_are_errors() {
        let sb = Sandbox::new();
        let results = sb.extract(&[
            Layer::new().file("dir/.wh..", "").bytes(),
            Layer::new().file(".wh...", "").bytes(),
            Layer::new()
                .symlink("a", "b")
                .symlink("b", "a")
                .file("a/x", "x")
                .bytes(),
            Layer::new().file("f", "").file("f/g", "").bytes(),
        ]);
        let mut results = results.into_iter();
        for _ in 0..2 {
            let r = results.next().unwrap();
            assert!(matches!(r, Err(ExtractError::InvalidEntry { .. })), "{r:?}");
        }
        let err = results.next().unwrap().unwrap_err();
        assert!(
            matches!(&err, ExtractError::Io { path, source }
                if path == Path::new("a/x") && source.raw_os_error() == Some(Errno::LOOP.raw_os_error())),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("a/x: "), "{err}");
        let err = results.next().unwrap().unwrap_err();
        assert!(
            matches!(&err, ExtractError::Io { source, .. }
                if source.raw_os_error() == Some(Errno::NOTDIR.raw_os_error())),
            "{err:?}"
        );
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = Layer::new().file("f", &"x".repeat(2000)).bytes();
        assert!(extract_layer(tmp.path(), &bytes[..1024]).is_err());
        assert!(matches!(
            extract_layer(&tmp.path().join("missing"), &bytes[..]),
            Err(ExtractError::Io { .. })
        ));
    }

    #[test]
    fn debian_style_absolute_symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let base = Layer::new()
            .dir("run/")
            .dir("run/lock/")
            .dir("var/")
            .symlink("var/run", "/run")
            .symlink("var/lock", "../run/lock")
            .symlink("lib", "usr/lib")
            .bytes();
        extract_layer(root, &base[..]).unwrap();
        let layer = Layer::new()
            .file("var/run/lock/x", "x")
            .file("var/lock/y", "y")
            .file("var/run/newdir/z", "z")
            .file("lib/pkg/libfoo.so", "so")
            .bytes();
        extract_layer(root, &layer[..]).unwrap();
        assert_eq!(read(root.join("run/lock/x")), "x");
        assert_eq!(read(root.join("run/lock/y")), "y");
        assert_eq!(read(root.join("run/newdir/z")), "z");
        assert_eq!(lmeta(root.join("run/newdir")).mode() & 0o7777, 0o755);
        assert_eq!(read(root.join("usr/lib/pkg/libfoo.so")), "so");
        for link in ["var/run", "var/lock", "lib"] {
            assert!(lmeta(root.join(link)).file_type().is_symlink(), "{link}");
        }
    }

    #[test]
    fn parses_pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("12"), Some((12, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("12.1234567891"), Some((12, 123_456_789)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("1.x"), None);
        assert_eq!(t("+1"), None);
    }
}
