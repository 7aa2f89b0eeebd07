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
//! would steer overlayfs. A hard link there is resolved in the stack of
//! this layer over the lower layers' directories, as overlayfs would show
//! it (see `lower.rs`): to a file of this layer it stays a hard link, to
//! one of a lower layer it becomes a copy ([`extract_layer_dir`]).
//!
//! What is refused (the whole layer fails) and what is skipped:
//!
//! * A path or hard-link target whose `..` climbs above the root is refused
//!   ([`ExtractError::PathOutsideRoot`], [`ExtractError::HardlinkOutsideRoot`]),
//!   as Docker does: no well-formed layer contains one. Leading `/` and `./`
//!   are stripped, and `..` that stays inside (`a/../b`) is cleaned lexically.
//! * A hard link whose target does not exist in the root (or in the stack
//!   of layers) is refused ([`ExtractError::HardlinkTargetMissing`]); it is
//!   never looked up on the host. Whiteouts of `.`/`..` and malformed headers are refused too
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

use super::owners;

mod fsops;
mod lower;
mod meta;
mod resolve;

use fsops::*;
use meta::*;

/// What one layer changed in the root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Filesystem entries written (files, directories, links, devices).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
    /// Hard links into a lower layer written as copies
    /// ([`extract_layer_dir`]): the directory depends on the layers below.
    pub copied: u64,
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
    /// A layer unpacked alone with [`Lowers::Unknown`] links to something
    /// not in it, which may be in the layers below.
    #[error("{path}: hard link target {target} is not in this layer; the layers below are needed")]
    NeedsLowerLayers { path: PathBuf, target: PathBuf },
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
    extract(root, layer, Format::Apply, &[], Lowers::Unknown)
}

/// [`extract_layer`] onto a root that holds things the layer must not touch:
/// the `keep` paths (relative to the root) and everything under them.
pub fn extract_layer_keeping<R: Read>(
    root: &Path,
    layer: R,
    keep: &[PathBuf],
) -> Result<ExtractStats, ExtractError> {
    extract(root, layer, Format::Apply, keep, Lowers::Unknown)
}

/// The layers below one that [`extract_layer_dir`] unpacks alone, where
/// its hard links may point.
#[derive(Debug, Clone, Copy)]
pub enum Lowers<'a> {
    /// Not known yet: a hard link to something not in the layer fails with
    /// [`ExtractError::NeedsLowerLayers`], so that the caller can unpack
    /// the layers below first and try again.
    Unknown,
    /// The unpacked directories of the layers below, bottom first (none
    /// for a first layer). They are only read.
    Dirs(&'a [PathBuf]),
}

/// Unpacks one uncompressed layer tar stream into `dir`, an empty
/// directory, as an overlayfs lower layer over `lowers`: whiteouts and
/// opaque markers are recorded the way overlayfs reads them instead of
/// being applied. A hard link to a file of this layer is a hard link; one
/// to a file of a lower layer is a copy of it ([`ExtractStats::copied`]).
pub fn extract_layer_dir<R: Read>(
    dir: &Path,
    layer: R,
    lowers: Lowers<'_>,
) -> Result<ExtractStats, ExtractError> {
    extract(dir, layer, Format::Overlay, &[], lowers)
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
    extract(
        dir,
        archive,
        Format::Archive { owner },
        &[],
        Lowers::Unknown,
    )
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
    lowers: Lowers<'_>,
) -> Result<ExtractStats, ExtractError> {
    let open = |dir: &Path| {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ExtractError::Io {
            path: dir.to_owned(),
            source: e.into(),
        })
    };
    let root_fd = open(root)?;
    let lowers = match lowers {
        Lowers::Unknown => None,
        Lowers::Dirs(dirs) => Some(dirs.iter().map(|d| open(d)).collect::<Result<_, _>>()?),
    };
    let mut extractor = Extractor {
        root: root_fd,
        lowers,
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
        recorded: owners::recorded(),
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
    /// [`Format::Overlay`]: the lower layers' directories (`O_PATH`, bottom
    /// first), `None` when not known.
    lowers: Option<Vec<OwnedFd>>,
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
    /// Not root: owners (and modes disk cannot keep) are recorded in an
    /// xattr, device nodes skipped (`rootfs/owners.rs`).
    recorded: bool,
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
            Kind::Hardlink => {
                self.stats.bytes += self.write_hardlink(parent, &name, &raw, &entry)?;
            }
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
        match self.recorded {
            false => {
                rustix::fs::fchown(&dir, Some(meta.uid), Some(meta.gid))?;
                rustix::fs::fchmod(&dir, meta.mode)?;
                meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&dir, n, v, XattrFlags::empty()))?;
            }
            true => {
                // The layer's own override, if any, gives way to the header's.
                meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&dir, n, v, XattrFlags::empty()))?;
                owners::set(&dir, meta.stat(), true)?;
            }
        }
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
        match self.recorded {
            false => {
                rustix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))?;
                rustix::fs::fchmod(&file, meta.mode)?;
                meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&file, n, v, XattrFlags::empty()))?;
            }
            true => {
                meta.set_xattrs(|n, v| rustix::fs::fsetxattr(&file, n, v, XattrFlags::empty()))?;
                owners::set(&file, meta.stat(), false)?;
            }
        }
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
        match self.recorded {
            false => rustix::fs::chownat(
                parent,
                name,
                Some(meta.uid),
                Some(meta.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )?,
            // A symlink cannot carry a user xattr: 0:0 if it is ever
            // written into a layer again.
            true => {
                tracing::debug!(name = %name.to_string_lossy(), uid = meta.uid.as_raw(), gid = meta.gid.as_raw(), "a symlink's owner is not kept by a build that is not root")
            }
        }
        rustix::fs::utimensat(parent, name, &meta.timestamps(), AtFlags::SYMLINK_NOFOLLOW)?;
        if !meta.xattrs.is_empty() {
            tracing::debug!(name = %name.to_string_lossy(), "skipping xattrs on a symlink");
        }
        self.record(parent, name)?;
        Ok(())
    }

    /// Creates a device node or fifo (`dev` is 0 for fifos). Real nodes
    /// even in a layer dir: overlayfs shows a node only where a layer has
    /// one; the state dir being 0700 keeps them from other users.
    fn write_node(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        file_type: FileType,
        dev: u64,
        meta: &Meta,
    ) -> io::Result<()> {
        clear_slot(parent, name, false)?;
        if self.recorded {
            // Only root may make device nodes. Base layers are reused as
            // they are, never written again, so nothing is lost from them.
            if file_type != FileType::Fifo {
                tracing::debug!(name = %name.to_string_lossy(), "skipping a device node: not root");
                return Ok(());
            }
            rustix::fs::mknodat(parent, name, file_type, Mode::from_raw_mode(0o600), dev)?;
            rustix::fs::chmodat(
                parent,
                name,
                meta.mode & Mode::from_raw_mode(0o777),
                AtFlags::empty(),
            )?;
            rustix::fs::utimensat(parent, name, &meta.timestamps(), AtFlags::SYMLINK_NOFOLLOW)?;
            return self.record(parent, name);
        }
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

    /// Hard-links `name` to the entry's link target, resolved in the root;
    /// returns the bytes written (those of a copy).
    fn write_hardlink<R: Read>(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        raw: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<u64, ExtractError> {
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
        // The directory holding the target, and whether it is a lower
        // layer's rather than this root.
        let (target_dir, lower) = if self.format == Format::Overlay {
            let mut stack: Vec<BorrowedFd<'_>> =
                self.lowers.iter().flatten().map(|fd| fd.as_fd()).collect();
            stack.push(self.root.as_fd());
            let top = stack.len() - 1;
            match lower::find_in_stack(&stack, &target_rel) {
                Ok(Some((layer, dir))) => (dir, layer != top),
                Ok(None) | Err(Errno::NOENT | Errno::NOTDIR) if self.lowers.is_none() => {
                    return Err(ExtractError::NeedsLowerLayers {
                        path: raw.to_owned(),
                        target: target_raw.clone(),
                    })
                }
                Ok(None) | Err(Errno::NOENT | Errno::NOTDIR) => return Err(missing()),
                Err(e) => return Err(io_err(e)),
            }
        } else {
            match self.open_dir(target_rel.parent().unwrap_or(Path::new("")), false) {
                Ok(dir) => (dir, false),
                Err(Errno::NOENT | Errno::NOTDIR) => return Err(missing()),
                Err(e) => return Err(io_err(e)),
            }
        };
        let target = match rustix::fs::statat(&target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => return Err(io_err(e)),
        };
        if file_type(&target) == FileType::Directory {
            return Err(invalid(raw, "hard link to a directory"));
        }
        if lower {
            // A copy, not a link: a hard link across layer directories
            // would share the inode of a lower directory, which is cache
            // state other stacks read and must never change (a chown,
            // chmod or write here would reach it), and overlayfs breaks
            // such links at copy-up anyway. It has the target's content
            // and metadata, as the link would see them.
            self.stats.copied += 1;
            return self
                .copy_from_lower(parent, name, &target_dir, target_name, &target)
                .map_err(|e| ExtractError::Io {
                    path: raw.to_owned(),
                    source: e,
                });
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
        Ok(0)
    }

    /// Writes at `name` a copy of `target_name` in `dir`, a lower layer's
    /// directory (`st` is its `lstat`); returns the bytes written.
    fn copy_from_lower(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        dir: &OwnedFd,
        target_name: &OsStr,
        st: &Stat,
    ) -> io::Result<u64> {
        match file_type(st) {
            FileType::RegularFile => {
                // O_NONBLOCK: were it swapped for a fifo, opening must not hang.
                let file = File::from(rustix::fs::openat(
                    dir,
                    target_name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )?);
                let st = rustix::fs::fstat(&file)?;
                if file_type(&st) != FileType::RegularFile {
                    return Err(io::Error::other("lower layer changed while being read"));
                }
                let meta = lower::lower_meta(&st, Some(&file))?;
                self.write_file(parent, name, &meta, &mut &file)
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, target_name, Vec::new())?;
                let meta = lower::lower_meta(st, None)?;
                self.write_symlink(parent, name, target.as_bytes(), &meta)?;
                Ok(0)
            }
            FileType::Directory => Err(io::Error::other("hard link to a directory")),
            node => {
                let meta = lower::lower_meta(st, None)?;
                self.write_node(parent, name, node, st.st_rdev, &meta)?;
                Ok(0)
            }
        }
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
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
