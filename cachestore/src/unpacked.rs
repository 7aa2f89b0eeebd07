//! Layers unpacked once and kept, for the overlay snapshotter to stack:
//! `unpacked/<hex of the diff_id>/`. A directory is made whole elsewhere
//! and renamed into place, so one found here is always complete; it is
//! never written again, since overlayfs lower layers must not change.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::digest;
use crate::error::{IoContext, Result};

const REMOVING: &str = ".removing-";

pub struct UnpackedLayers {
    dir: PathBuf,
}

impl UnpackedLayers {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("unpacked");
        fs::create_dir_all(&dir).at(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.dir.join(digest::validate(diff_id)?))
    }

    /// The layer's directory, if it is here. Its mtime records the use, for
    /// [`UnpackedLayers::gc`].
    pub fn get(&self, diff_id: &str) -> Result<Option<PathBuf>> {
        let path = self.path(diff_id)?;
        match fs::File::open(&path) {
            Ok(dir) => {
                // Only the GC reads it: a failure costs nothing else.
                let _ = dir.set_modified(SystemTime::now());
                Ok(Some(path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(path),
        }
    }

    /// How many layers are here.
    pub fn count(&self) -> Result<usize> {
        let entries = fs::read_dir(&self.dir).at(&self.dir)?;
        Ok(entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with(REMOVING))
            .count())
    }

    /// Moves `made` (a complete directory on the same filesystem) in as the
    /// layer's directory. When another build got there first, `made` is
    /// removed and theirs is used: both hold the same diff_id.
    pub fn insert(&self, diff_id: &str, made: &Path) -> Result<PathBuf> {
        let path = self.path(diff_id)?;
        match fs::rename(made, &path) {
            Ok(()) => Ok(path),
            Err(_) if path.is_dir() => {
                fs::remove_dir_all(made).at(made)?;
                Ok(path)
            }
            Err(e) => Err(e).at(&path),
        }
    }

    /// Removes the directories not used for `older_than` (all of them with
    /// zero). Only call it while no build runs: a build's mounts read them.
    /// Returns how many went.
    pub fn gc(&self, older_than: Duration) -> Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).at(&self.dir)? {
            let entry = entry.at(&self.dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(REMOVING) {
                // Left by a GC that was interrupted.
                fs::remove_dir_all(entry.path()).at(entry.path())?;
                continue;
            }
            let unused = entry
                .metadata()
                .and_then(|m| m.modified())
                .map_or(true, |t| t.elapsed().is_ok_and(|age| age >= older_than));
            if unused {
                // Renamed away first, so a half-removed one is never found.
                let doomed = self.dir.join(format!("{REMOVING}{name}"));
                fs::rename(entry.path(), &doomed).at(entry.path())?;
                fs::remove_dir_all(&doomed).at(&doomed)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn insert_get_and_gc() {
        let state = tempfile::tempdir().unwrap();
        let layers = UnpackedLayers::open(state.path()).unwrap();
        assert_eq!(layers.get(ID).unwrap(), None);
        for content in ["first", "second"] {
            let made = state.path().join(content);
            fs::create_dir(&made).unwrap();
            fs::write(made.join("f"), content).unwrap();
            let dir = layers.insert(ID, &made).unwrap();
            assert!(!made.exists());
            // The first one made stays.
            assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "first");
        }
        assert!(layers.get(ID).unwrap().is_some());
        assert_eq!(layers.count().unwrap(), 1);
        assert!(layers.get("sha256:../../etc").is_err());
        assert_eq!(layers.gc(Duration::from_secs(3600)).unwrap(), 0);
        assert_eq!(layers.gc(Duration::ZERO).unwrap(), 1);
        assert_eq!(layers.get(ID).unwrap(), None);
    }
}
