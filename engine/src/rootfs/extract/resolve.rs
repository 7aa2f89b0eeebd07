//! Resolving a layer entry's parent directory inside the root: by the
//! kernel (`openat2(RESOLVE_IN_ROOT)`), or step by step when missing
//! directories are made.

use super::*;

impl Extractor<'_> {
    /// Opens (`O_PATH`) the directory at `rel`, resolved as if the root were
    /// `/`. With `create`, missing directories are made (0755, root-owned),
    /// following in-image symlinks whose targets are missing, like `mkdir -p`
    /// run in a chroot that also creates a dangling link's target.
    pub(super) fn open_dir(&self, rel: &Path, create: bool) -> rustix::io::Result<OwnedFd> {
        match self.resolve_dir(rel) {
            Err(Errno::NOENT) if create => self.create_dirs(rel),
            result => result,
        }
    }

    /// The directory at `rel` (made if missing), open for listing and
    /// xattrs: `open_dir`'s `O_PATH` descriptor allows neither.
    pub(super) fn open_dir_for_reading(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
        let dir = self.open_dir(rel, true)?;
        rustix::fs::openat(
            &dir,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    pub(super) fn resolve_dir(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
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

    pub(super) fn create_dirs(&self, rel: &Path) -> rustix::io::Result<OwnedFd> {
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
