//! `--isolation none` builds on the machine's own `/`: what clearing and
//! unpacking over it must never touch. Kept in the engine, so every caller
//! gets the guard, whatever it passes.
use std::io;
use std::path::{Path, PathBuf};

use crate::rootfs::clean_relative;

/// What must survive, as paths relative to `/`: every mount point (/proc,
/// /dev, volumes, the files a runtime mounts over /etc), Kiln itself, its
/// state, the context, Docker's config (credentials), `/kaniko`, the
/// caller's `files` (Dockerfile, certificates, outputs) and `ignored`
/// paths (relative, as `--ignore-path` gives them).
pub(crate) fn kept_paths(
    state_dir: &Path,
    context: &Path,
    files: &[PathBuf],
    ignored: &[PathBuf],
) -> io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io::Error::new(e.kind(), format!("/proc/self/mountinfo: {e}")))?;
    // Field 5 is the mount point, with spaces and such octal-escaped.
    let mounts = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape_octal));
    let docker_config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    let paths = ["/proc", "/sys", "/dev", "/kaniko"]
        .map(PathBuf::from)
        .into_iter()
        .chain([
            std::env::current_exe()?,
            state_dir.to_path_buf(),
            context.to_path_buf(),
        ])
        .chain(docker_config)
        .chain(files.iter().cloned())
        .chain(ignored.iter().map(|p| Path::new("/").join(p)));
    let mut kept = Vec::new();
    for path in paths {
        let absolute = std::path::absolute(&path).unwrap_or(path);
        // The path as written (its parent resolved) and, when it is a
        // symlink, where it leads: both must survive.
        let written = match (absolute.parent(), absolute.file_name()) {
            (Some(parent), Some(name)) => parent
                .canonicalize()
                .map(|parent| parent.join(name))
                .unwrap_or_else(|_| absolute.clone()),
            _ => absolute.clone(),
        };
        for real in [Some(written), absolute.canonicalize().ok()]
            .into_iter()
            .flatten()
        {
            let relative = clean_relative(&real);
            if relative.as_os_str().is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "--isolation none: {} is / itself, which the build replaces",
                        absolute.display()
                    ),
                ));
            }
            kept.push(relative);
        }
    }
    // Mount points are kept, never crossed; `/` is one and is the root.
    kept.extend(
        mounts
            .map(|m| clean_relative(&m))
            .filter(|m| !m.as_os_str().is_empty()),
    );
    kept.sort();
    kept.dedup();
    Ok(kept)
}

/// `\040`-style escapes, as /proc/self/mountinfo writes them.
fn unescape_octal(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_octal("/a\\040b\\011c"), PathBuf::from("/a b\tc"));
        assert_eq!(unescape_octal("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn kiln_its_state_and_every_mount_are_kept() {
        let state = tempfile::tempdir().unwrap();
        let kept = kept_paths(state.path(), Path::new("/nonexistent-ctx"), &[], &[]).unwrap();
        for must in ["proc", "sys", "dev", "kaniko", "nonexistent-ctx"] {
            assert!(kept.contains(&PathBuf::from(must)), "{must} in {kept:?}");
        }
        assert!(kept.contains(&clean_relative(&state.path().canonicalize().unwrap())));
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
        assert!(kept.contains(&clean_relative(&exe)));
    }

    #[test]
    fn keeping_slash_itself_is_refused() {
        let err = kept_paths(Path::new("/"), Path::new("/ctx"), &[], &[]).unwrap_err();
        assert!(err.to_string().contains("is / itself"), "{err}");
    }
}
