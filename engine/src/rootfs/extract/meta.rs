//! What a tar entry is and the metadata it carries (kind, device, owner, mode,
//! times, xattrs), read from its header and PAX records.

use super::*;

/// The kinds of entries written to the filesystem.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
    /// A device node or fifo.
    Node(FileType),
}

impl Kind {
    /// `None` for entry types with no filesystem meaning.
    pub(super) fn of(header: &tar::Header, raw: &Path) -> Option<Self> {
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
pub(super) fn device(header: &tar::Header, raw: &Path) -> Result<u64, ExtractError> {
    let major = header.device_major().map_err(|e| invalid(raw, e))?;
    let minor = header.device_minor().map_err(|e| invalid(raw, e))?;
    match (major, minor) {
        (Some(major), Some(minor)) => Ok(rustix::fs::makedev(major, minor)),
        _ => Err(invalid(raw, "device without major/minor numbers")),
    }
}

/// Ownership, mode, times and xattrs of an entry, from its header and PAX
/// records (which take precedence).
pub(super) struct Meta {
    pub(super) uid: Uid,
    pub(super) gid: Gid,
    /// Permission bits including setuid, setgid and sticky.
    pub(super) mode: Mode,
    pub(super) mtime: Timespec,
    pub(super) atime: Option<Timespec>,
    pub(super) xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    pub(super) fn read<R: Read>(
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<Self, ExtractError> {
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

    /// The owner and mode, for [`owners::set`].
    pub(super) fn stat(&self) -> owners::Stat {
        owners::Stat {
            uid: self.uid.as_raw(),
            gid: self.gid.as_raw(),
            mode: self.mode.as_raw_mode(),
        }
    }

    pub(super) fn timestamps(&self) -> Timestamps {
        Timestamps {
            last_access: self.atime.unwrap_or(self.mtime),
            last_modification: self.mtime,
        }
    }

    /// Applies the xattrs with `set`, tolerating filesystems without support.
    pub(super) fn set_xattrs(
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
pub(super) fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
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
