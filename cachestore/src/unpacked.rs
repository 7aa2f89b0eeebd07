//! Layers unpacked once and kept, for the overlay snapshotter to stack:
//! `unpacked/<hex of the diff_id>/`. A directory is made whole elsewhere
//! and renamed into place, so one found here is always complete; it is
//! never written again, since overlayfs lower layers must not change.
//!
//! A layer with a hard link into a layer below holds a copy of that file,
//! so its directory depends on the layers below as well: it is kept as
//! `unpacked/<hex of the diff_id>-<hex of the chain ID below>/`, the OCI
//! chain ID of the layers under it. Whether a layer needs them is a
//! property of its content alone, so a layer is only ever found under one
//! of the two names, and every other layer is still shared by all images
//! that have it, whatever their base.
//!
//! A step may ask which layer the previous run of the same step made
//! (`made-by/<reuse key>`, holding a diff_id): a COPY links the files it
//! would write unchanged from that layer's directory. A record whose
//! directory is gone (gc, prune) or that cannot be read is no record.
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::digest::{self, Digest};
use crate::error::{IoContext, Result};
use crate::state::StateDir;

const REMOVING: &str = ".removing-";

pub struct UnpackedLayers {
    dir: PathBuf,
    /// Which layer a step made last, by the step's reuse key.
    made_by: PathBuf,
}

impl UnpackedLayers {
    pub fn open(state: &StateDir) -> Result<Self> {
        let (dir, made_by) = (state.unpacked(), state.made_by());
        for dir in [&dir, &made_by] {
            fs::create_dir_all(dir).at(dir)?;
        }
        Ok(Self { dir, made_by })
    }

    /// The record of a reuse key: a file name, so only hex digits.
    fn made_by_path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(crate::CacheStoreError::Malformed {
                what: format!("reuse key {key:?}"),
                source: "not a hex digest".into(),
            });
        }
        Ok(self.made_by.join(key))
    }

    /// Records that the step whose reuse key is `key` made the layer
    /// `diff_id` (its directory here), in place of what it made before.
    pub fn record_made_by(&self, key: &str, diff_id: &Digest) -> Result<()> {
        let path = self.made_by_path(key)?;
        digest::hex(diff_id)?;
        let tmp = tempfile::NamedTempFile::new_in(&self.made_by).at(&self.made_by)?;
        fs::write(tmp.path(), diff_id.to_string()).at(tmp.path())?;
        tmp.persist(&path).map_err(|e| e.error).at(&path)?;
        Ok(())
    }

    /// The directory of the layer the step whose reuse key is `key` made
    /// last, if the record and the directory are both here.
    pub fn made_by(&self, key: &str) -> Result<Option<PathBuf>> {
        let path = self.made_by_path(key)?;
        let recorded = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(path),
        };
        // A torn or foreign record only costs the reuse.
        match digest::parse(recorded.trim()) {
            Ok(diff_id) if digest::hex(&diff_id).is_ok() => self.get(&diff_id),
            _ => {
                tracing::debug!(record = %path.display(), "unreadable made-by record");
                Ok(None)
            }
        }
    }

    /// Removes the made-by records whose layer directory is gone.
    fn prune_made_by(&self) -> Result<()> {
        for entry in fs::read_dir(&self.made_by).at(&self.made_by)? {
            let path = entry.at(&self.made_by)?.path();
            let live = fs::read_to_string(&path)
                .ok()
                .and_then(|text| digest::parse(text.trim()).ok())
                .and_then(|diff_id| self.path(&diff_id).ok())
                .is_some_and(|dir| dir.is_dir());
            if !live {
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(path),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn path(&self, diff_id: &Digest) -> Result<PathBuf> {
        Ok(self.dir.join(digest::hex(diff_id)?))
    }

    /// The name of a layer that depends on the layers `below` it.
    fn stacked_path(&self, diff_id: &Digest, below: &[&Digest]) -> Result<PathBuf> {
        let chain = chain_id(below)?;
        Ok(self.dir.join(format!(
            "{}-{}",
            digest::hex(diff_id)?,
            digest::hex(&chain)?
        )))
    }

    /// The layer's directory, if it is here. Its mtime records the use, for
    /// [`UnpackedLayers::gc`].
    pub fn get(&self, diff_id: &Digest) -> Result<Option<PathBuf>> {
        self.get_at(self.path(diff_id)?)
    }

    /// The directory of a layer that depends on the layers below it (see
    /// the module documentation), for the stack whose diff_ids, bottom
    /// first, are `below`.
    pub fn get_stacked(&self, diff_id: &Digest, below: &[&Digest]) -> Result<Option<PathBuf>> {
        self.get_at(self.stacked_path(diff_id, below)?)
    }

    fn get_at(&self, path: PathBuf) -> Result<Option<PathBuf>> {
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
    pub fn insert(&self, diff_id: &Digest, made: &Path) -> Result<PathBuf> {
        self.insert_at(self.path(diff_id)?, made)
    }

    /// [`UnpackedLayers::insert`] for a layer that depends on the layers
    /// `below` it, as [`UnpackedLayers::get_stacked`] finds it.
    pub fn insert_stacked(
        &self,
        diff_id: &Digest,
        below: &[&Digest],
        made: &Path,
    ) -> Result<PathBuf> {
        self.insert_at(self.stacked_path(diff_id, below)?, made)
    }

    fn insert_at(&self, path: PathBuf, made: &Path) -> Result<PathBuf> {
        match fs::rename(made, &path) {
            Ok(()) => Ok(path),
            Err(_) if path.is_dir() => {
                fs::remove_dir_all(made).at(made)?;
                Ok(path)
            }
            Err(e) => Err(e).at(&path),
        }
    }

    /// The directories here and when each was last used, but those of the
    /// layers in `keep` (alone or stacked), clearing what an interrupted
    /// removal left.
    fn entries(&self, keep: &HashSet<&Digest>) -> Result<Vec<(PathBuf, SystemTime)>> {
        let kept: HashSet<String> = keep
            .iter()
            .map(|d| digest::hex(d).map(str::to_string))
            .collect::<Result<_>>()?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).at(&self.dir)? {
            let entry = entry.at(&self.dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(REMOVING) {
                fs::remove_dir_all(entry.path()).at(entry.path())?;
                continue;
            }
            if name.split('-').next().is_some_and(|hex| kept.contains(hex)) {
                continue;
            }
            let used = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((entry.path(), used));
        }
        Ok(out)
    }

    /// Renamed away first, so a half-removed directory is never found.
    fn remove(&self, dir: &Path) -> Result<()> {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let doomed = self.dir.join(format!("{REMOVING}{name}"));
        fs::rename(dir, &doomed).at(dir)?;
        fs::remove_dir_all(&doomed).at(&doomed)
    }

    /// Removes the directories not used for `older_than` (all of them with
    /// zero), but those of the layers in `keep` (the only copy of a lazy
    /// layer). Only call it while no build runs: a build's mounts read
    /// them. Returns how many went.
    pub fn gc(&self, older_than: Duration, keep: &HashSet<&Digest>) -> Result<usize> {
        let mut removed = 0;
        for (dir, used) in self.entries(keep)? {
            if used.elapsed().is_ok_and(|age| age >= older_than) {
                self.remove(&dir)?;
                removed += 1;
            }
        }
        self.prune_made_by()?;
        Ok(removed)
    }

    /// Removes the least recently used directories until the rest take at
    /// most `budget` bytes on disk, sparing `keep` as [`UnpackedLayers::gc`]
    /// does (they still count). Only while no build runs. Returns how many
    /// went and the bytes freed.
    pub fn shrink_to(&self, budget: u64, keep: &HashSet<&Digest>) -> Result<(usize, u64)> {
        let mut kept = 0;
        for diff_id in keep {
            let dir = self.path(diff_id)?;
            if dir.is_dir() {
                kept += disk_usage(&dir).at(&dir)?;
            }
        }
        let budget = budget.saturating_sub(kept);
        let mut dirs: Vec<(PathBuf, SystemTime, u64)> = self
            .entries(keep)?
            .into_iter()
            .map(|(dir, used)| {
                let size = disk_usage(&dir).at(&dir)?;
                Ok((dir, used, size))
            })
            .collect::<Result<_>>()?;
        dirs.sort_by_key(|(_, used, _)| *used);
        let mut total: u64 = dirs.iter().map(|d| d.2).sum();
        let (mut removed, mut freed) = (0, 0);
        for (dir, _, size) in dirs {
            if total <= budget {
                break;
            }
            self.remove(&dir)?;
            total -= size;
            removed += 1;
            freed += size;
        }
        self.prune_made_by()?;
        Ok((removed, freed))
    }
}

/// The OCI chain ID of a stack of layers (diff_ids bottom first):
/// `ChainID(L0) = DiffID(L0)`, `ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1)
/// + " " + DiffID(Ln))`; that of no layers is the sha256 of nothing.
fn chain_id(diff_ids: &[&Digest]) -> Result<Digest> {
    let Some((first, rest)) = diff_ids.split_first() else {
        return Ok(digest::sha256(b""));
    };
    let mut chain = (*first).clone();
    for diff_id in rest {
        digest::hex(diff_id)?;
        chain = digest::sha256(format!("{chain} {diff_id}").as_bytes());
    }
    Ok(chain)
}

/// The disk blocks a tree takes (a file with several links in it counts
/// each time: an upper bound).
fn disk_usage(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            total += disk_usage(&entry?.path())?;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Digest {
        digest::sha256(b"a layer")
    }

    fn none() -> HashSet<&'static Digest> {
        HashSet::new()
    }

    #[test]
    fn kept_layers_survive_gc_and_count_against_the_budget() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let layers = UnpackedLayers::open(&state).unwrap();
        let ids: Vec<Digest> = (0..2).map(|i: u8| digest::sha256(&[i])).collect();
        for (i, id) in ids.iter().enumerate() {
            let made = state.path().join(format!("made{i}"));
            fs::create_dir(&made).unwrap();
            fs::write(made.join("data"), vec![b'x'; 64 * 1024]).unwrap();
            layers.insert(id, &made).unwrap();
        }
        let keep: HashSet<&Digest> = [&ids[0]].into();
        let one = disk_usage(&layers.path(&ids[0]).unwrap()).unwrap();
        // The kept layer takes the whole budget: the other goes.
        assert_eq!(layers.shrink_to(one, &keep).unwrap().0, 1);
        assert_eq!(layers.gc(Duration::ZERO, &keep).unwrap(), 0);
        assert!(layers.get(&ids[0]).unwrap().is_some());
        assert_eq!(layers.gc(Duration::ZERO, &none()).unwrap(), 1);
    }

    #[test]
    fn insert_get_and_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let layers = UnpackedLayers::open(&state).unwrap();
        assert_eq!(layers.get(&id()).unwrap(), None);
        for content in ["first", "second"] {
            let made = state.path().join(content);
            fs::create_dir(&made).unwrap();
            fs::write(made.join("f"), content).unwrap();
            let dir = layers.insert(&id(), &made).unwrap();
            assert!(!made.exists());
            // The first one made stays.
            assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), "first");
        }
        assert!(layers.get(&id()).unwrap().is_some());
        assert_eq!(layers.count().unwrap(), 1);
        let sha512 = format!("sha512:{}", "0".repeat(128));
        assert!(layers.get(&sha512.parse().unwrap()).is_err());
        assert_eq!(layers.gc(Duration::from_secs(3600), &none()).unwrap(), 0);
        assert_eq!(layers.shrink_to(u64::MAX, &none()).unwrap().0, 0);
        // A layer to keep (a warm base's) stays, however old.
        let kept_id = id();
        let keep = HashSet::from([&kept_id]);
        assert_eq!(layers.gc(Duration::ZERO, &keep).unwrap(), 0);
        assert_eq!(layers.gc(Duration::ZERO, &none()).unwrap(), 1);
        assert_eq!(layers.get(&id()).unwrap(), None);
    }

    #[test]
    fn a_stacked_layer_is_kept_per_stack_below_it() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let layers = UnpackedLayers::open(&state).unwrap();
        let (a, b) = (digest::sha256(b"a"), digest::sha256(b"b"));
        for (below, content) in [([&a], "on a"), ([&b], "on b")] {
            let made = state.path().join("made");
            fs::create_dir(&made).unwrap();
            fs::write(made.join("f"), content).unwrap();
            let dir = layers.insert_stacked(&id(), &below, &made).unwrap();
            assert_eq!(fs::read_to_string(dir.join("f")).unwrap(), content);
        }
        let on_a = layers.get_stacked(&id(), &[&a]).unwrap().unwrap();
        assert_eq!(fs::read_to_string(on_a.join("f")).unwrap(), "on a");
        // Neither is the layer alone, nor on another stack.
        assert_eq!(layers.get(&id()).unwrap(), None);
        assert_eq!(layers.get_stacked(&id(), &[&a, &b]).unwrap(), None);
        assert_eq!(layers.count().unwrap(), 2);
        // Keeping a layer keeps it on every stack.
        let kept_id = id();
        let keep = HashSet::from([&kept_id]);
        assert_eq!(layers.gc(Duration::ZERO, &keep).unwrap(), 0);
        let sha512: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert!(layers.get_stacked(&id(), &[&a, &sha512]).is_err());
    }

    #[test]
    fn made_by_records_name_a_layer_while_its_directory_is_here() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let layers = UnpackedLayers::open(&state).unwrap();
        let key = "ab".repeat(32);
        assert_eq!(layers.made_by(&key).unwrap(), None);
        // Not a file name: refused, never joined to the path.
        assert!(layers.made_by("../x").is_err());
        assert!(layers.record_made_by("", &id()).is_err());
        // Recorded before its directory is here: no reuse yet.
        layers.record_made_by(&key, &id()).unwrap();
        assert_eq!(layers.made_by(&key).unwrap(), None);
        let made = state.path().join("made");
        fs::create_dir(&made).unwrap();
        let dir = layers.insert(&id(), &made).unwrap();
        assert_eq!(layers.made_by(&key).unwrap(), Some(dir));
        // A later record replaces it.
        let other = digest::sha256(b"other");
        layers.record_made_by(&key, &other).unwrap();
        assert_eq!(layers.made_by(&key).unwrap(), None);
        // A torn record is no record.
        fs::write(state.made_by().join(&key), "sha256:12").unwrap();
        assert_eq!(layers.made_by(&key).unwrap(), None);
        // gc drops the records of layers no longer here, and keeps the rest.
        layers.record_made_by(&key, &id()).unwrap();
        let gone = "cd".repeat(32);
        layers.record_made_by(&gone, &other).unwrap();
        assert_eq!(layers.gc(Duration::from_secs(3600), &none()).unwrap(), 0);
        assert!(state.made_by().join(&key).exists());
        assert!(!state.made_by().join(&gone).exists());
        assert_eq!(layers.gc(Duration::ZERO, &none()).unwrap(), 1);
        assert!(!state.made_by().join(&key).exists());
        assert_eq!(layers.made_by(&key).unwrap(), None);
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let b = digest::parse(&format!("sha256:{}", "b".repeat(64))).unwrap();
        assert_eq!(chain_id(&[&a]).unwrap(), a);
        // printf 'sha256:aaa… sha256:bbb…' | sha256sum
        let expected = "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c";
        assert_eq!(chain_id(&[&a, &b]).unwrap().as_ref(), expected);
        assert_ne!(chain_id(&[&b, &a]).unwrap().as_ref(), expected);
    }

    #[test]
    fn shrinking_removes_the_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let layers = UnpackedLayers::open(&state).unwrap();
        let ids: Vec<Digest> = (0..3).map(|i: u8| digest::sha256(&[i])).collect();
        for (i, id) in ids.iter().enumerate() {
            let made = state.path().join(format!("made{i}"));
            fs::create_dir(&made).unwrap();
            fs::write(made.join("data"), vec![b'x'; 64 * 1024]).unwrap();
            let dir = layers.insert(id, &made).unwrap();
            // Used in order 1, 0, 2: layer 1 is the least recent.
            let age = [20, 30, 10][i];
            fs::File::open(&dir)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(age))
                .unwrap();
        }
        let one = disk_usage(&layers.path(&ids[0]).unwrap()).unwrap();
        let (removed, freed) = layers.shrink_to(2 * one, &none()).unwrap();
        assert_eq!((removed, freed), (1, one));
        assert!(layers.get(&ids[1]).unwrap().is_none());
        assert!(layers.get(&ids[0]).unwrap().is_some() && layers.get(&ids[2]).unwrap().is_some());
        assert_eq!(layers.shrink_to(0, &none()).unwrap().0, 2);
        assert_eq!(layers.count().unwrap(), 0);
    }
}
