//! Owners and modes a build cannot give files on disk. A process that is not
//! root (and not root of a user namespace) cannot chown, so it records the
//! owner, and any mode it cannot keep on disk, in a user xattr, as
//! containers/storage does (`user.containers.override_stat`, same format).
//! The layer writer and the walk snapshotter read it back, so the tar
//! headers carry the intended owners. A file without it is owned by 0:0
//! with its mode on disk (Docker's COPY default).
//!
//! Only regular files and directories can carry a user xattr: a symlink or
//! fifo made by such a build is owned by 0:0 in the image, whatever
//! `--chown` said (a symlink's mode is always 0777 anyway).
//!
//! As root, none of this is used: owners are applied as they always were.
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rustix::io::Errno;

/// The xattr's name, as containers/storage spells it.
pub const OVERRIDE_XATTR: &str = "user.containers.override_stat";

/// Whether this process records owners instead of applying them: it is
/// not root, so it cannot chown (namespaces, chroot and rootless builds
/// all run as root, of the machine or of their user namespace).
pub fn recorded() -> bool {
    #[cfg(test)]
    if tests::FORCED.with(std::cell::Cell::get) {
        return true;
    }
    !rustix::process::geteuid().is_root()
}

/// An entry's owner and permission bits (with setuid, setgid, sticky).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Stat {
    /// `uid:gid:0mode`, containers/storage's format.
    pub fn format(&self) -> String {
        format!("{}:{}:0{:o}", self.uid, self.gid, self.mode & 0o7777)
    }

    /// Reads [`Stat::format`]'s form; containers/storage may add a fourth
    /// field (the file type), which the file itself tells here.
    pub fn parse(value: &[u8]) -> Option<Stat> {
        let text = std::str::from_utf8(value).ok()?;
        let mut fields = text.split(':');
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        let mode = u32::from_str_radix(fields.next()?, 8).ok()?;
        Some(Stat {
            uid,
            gid,
            mode: mode & 0o7777,
        })
    }
}

/// The mode kept on disk for an entry meant to have `mode`: what this
/// process needs to read it, write into it (later layers and steps) and
/// remove it (cleanup), without the bits only root may keep meaningful.
pub fn disk_mode(mode: u32, is_dir: bool) -> u32 {
    match is_dir {
        true => (mode & 0o777) | 0o700,
        false => (mode & 0o777) | 0o600,
    }
}

/// Where the xattr is read and written: a path, or an open file (the
/// extractor has descriptors, resolved inside the root).
pub trait Target {
    fn chmod(&self, mode: u32) -> io::Result<()>;
    fn set(&self, value: &[u8]) -> rustix::io::Result<()>;
    fn remove(&self) -> rustix::io::Result<()>;
}

impl Target for Path {
    fn chmod(&self, mode: u32) -> io::Result<()> {
        fs::set_permissions(self, fs::Permissions::from_mode(mode))
    }
    fn set(&self, value: &[u8]) -> rustix::io::Result<()> {
        rustix::fs::setxattr(self, OVERRIDE_XATTR, value, rustix::fs::XattrFlags::empty())
    }
    fn remove(&self) -> rustix::io::Result<()> {
        rustix::fs::removexattr(self, OVERRIDE_XATTR)
    }
}

impl Target for fs::File {
    fn chmod(&self, mode: u32) -> io::Result<()> {
        Ok(rustix::fs::fchmod(
            self,
            rustix::fs::Mode::from_raw_mode(mode),
        )?)
    }
    fn set(&self, value: &[u8]) -> rustix::io::Result<()> {
        rustix::fs::fsetxattr(self, OVERRIDE_XATTR, value, rustix::fs::XattrFlags::empty())
    }
    fn remove(&self) -> rustix::io::Result<()> {
        rustix::fs::fremovexattr(self, OVERRIDE_XATTR)
    }
}

/// Gives a regular file or directory `stat` as far as disk allows: the
/// mode it can keep, and the xattr when the owner is not 0:0 or the mode
/// differs from that on disk.
pub fn set(target: &(impl Target + ?Sized), stat: Stat, is_dir: bool) -> io::Result<()> {
    let on_disk = disk_mode(stat.mode, is_dir);
    target.chmod(on_disk)?;
    let plain = Stat {
        uid: 0,
        gid: 0,
        mode: on_disk,
    };
    let result = match stat == plain {
        true => match target.remove() {
            Err(Errno::NODATA) => Ok(()),
            other => other,
        },
        false => target.set(stat.format().as_bytes()),
    };
    result.map_err(|e| match e {
        Errno::NOTSUP => io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this filesystem has no user xattrs, where a build that is not root records owners ({OVERRIDE_XATTR}): put --cache-dir on one that has them (ext4, xfs, btrfs, tmpfs on Linux 6.6+)"),
        ),
        e => e.into(),
    })
}

/// `path`'s owner and mode as the image has them, given its metadata
/// (never followed): the xattr's, else 0:0 with the mode on disk.
pub fn get(path: &Path, meta: &fs::Metadata) -> Stat {
    let ft = meta.file_type();
    let recorded = (ft.is_file() || ft.is_dir()).then(|| read(path)).flatten();
    recorded.unwrap_or(Stat {
        uid: 0,
        gid: 0,
        mode: meta.mode() & 0o7777,
    })
}

/// The xattr of `path`, if it has a valid one.
fn read(path: &Path) -> Option<Stat> {
    let mut buf = [0u8; 64];
    let n = rustix::fs::lgetxattr(path, OVERRIDE_XATTR, &mut buf).ok()?;
    Stat::parse(&buf[..n])
}

/// Whether an xattr name is this module's: never image content.
pub fn is_override(name: &[u8]) -> bool {
    name == OVERRIDE_XATTR.as_bytes()
}

/// Changes only the mode of `path` (a file or directory), keeping the
/// owner it has in the image.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let stat = Stat {
        mode,
        ..get(path, &meta)
    };
    set(path, stat, meta.is_dir())
}

/// Gives `path` (never followed) its owner: applied, or recorded when
/// `recorded` ([`recorded`], taken by the caller once for many paths).
pub fn chown(path: &Path, owner: (u32, u32), recorded: bool) -> io::Result<()> {
    match recorded {
        false => std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1)),
        true => set_owner(path, owner),
    }
}

/// Changes only the owner of `path`, keeping its mode; a symlink or other
/// entry that cannot carry the xattr stays 0:0 (see the module's doc).
pub fn set_owner(path: &Path, (uid, gid): (u32, u32)) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !(meta.is_file() || meta.is_dir()) {
        if (uid, gid) != (0, 0) {
            tracing::debug!(path = %path.display(), uid, gid, "an owner a build that is not root cannot record on this kind of file: 0:0 in the image");
        }
        return Ok(());
    }
    let stat = Stat {
        uid,
        gid,
        ..get(path, &meta)
    };
    set(path, stat, meta.is_dir())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Tests run as root: this makes [`recorded`] true on this thread.
        pub(crate) static FORCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Runs `f` as a build that is not root would, on this thread.
    pub(crate) fn as_unprivileged<T>(f: impl FnOnce() -> T) -> T {
        FORCED.with(|c| c.set(true));
        let out = f();
        FORCED.with(|c| c.set(false));
        out
    }

    #[test]
    fn the_format_is_containers_storage_s() {
        let s = Stat {
            uid: 1234,
            gid: 2345,
            mode: 0o4750,
        };
        assert_eq!(s.format(), "1234:2345:04750");
        assert_eq!(Stat::parse(b"1234:2345:04750"), Some(s));
        assert_eq!(Stat::parse(b"1234:2345:04750:file"), Some(s));
        assert_eq!(Stat::parse(b"1234:x:0644"), None);
    }

    #[test]
    fn the_disk_keeps_what_this_process_needs() {
        assert_eq!(disk_mode(0o555, true), 0o755);
        assert_eq!(disk_mode(0o000, false), 0o600);
        assert_eq!(disk_mode(0o4755, false), 0o755);
    }

    #[test]
    fn owners_and_lost_modes_go_to_the_xattr_plain_files_carry_none() {
        let dir = tempfile::tempdir().unwrap();
        let (f, d) = (dir.path().join("f"), dir.path().join("d"));
        fs::write(&f, "x").unwrap();
        fs::create_dir(&d).unwrap();
        let owned = Stat {
            uid: 1234,
            gid: 2345,
            mode: 0o750,
        };
        set(f.as_path(), owned, false).unwrap();
        assert_eq!(get(&f, &fs::symlink_metadata(&f).unwrap()), owned);
        // 0o750 is kept on disk as 0o750.
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o750);

        // A directory no one may write into stays writable for this
        // process, its mode in the xattr.
        let locked = Stat {
            uid: 0,
            gid: 0,
            mode: 0o555,
        };
        set(d.as_path(), locked, true).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(get(&d, &fs::symlink_metadata(&d).unwrap()), locked);
        set_mode(&d, 0o755).unwrap();
        assert_eq!(
            rustix::fs::lgetxattr(&d, OVERRIDE_XATTR, &mut [0u8; 64]),
            Err(Errno::NODATA)
        );

        // 0:0 with the mode on disk needs no xattr.
        set_owner(&f, (0, 0)).unwrap();
        assert_eq!(
            rustix::fs::lgetxattr(&f, OVERRIDE_XATTR, &mut [0u8; 64]),
            Err(Errno::NODATA)
        );
        let plain = fs::symlink_metadata(&f).unwrap();
        assert_eq!(
            get(&f, &plain),
            Stat {
                uid: 0,
                gid: 0,
                mode: 0o750
            }
        );
    }
}
