//! Keeping the state dir healthy: statistics, garbage collection,
//! verification after crashes, and pruning.
use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime};

use crate::blobs::BlobStore;
use crate::digest::{self, Digest};
use crate::error::{IoContext, Result};
use crate::index::{now_secs, Index, StepEntry};
use crate::state::{BuildDir, StateDir};
use crate::unpacked::UnpackedLayers;

/// Blobs younger than this are never collected: a running build may have
/// written them without having recorded its entries yet.
const GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub entries: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub entries_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub build_dirs_removed: usize,
    /// Unpacked layer directories removed (`unpacked/`).
    pub unpacked_removed: usize,
    /// Builds running during the GC: while there are any, blobs are kept
    /// (a running build may rely on a blob no entry names yet).
    pub live_builds: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub bad_blobs_removed: usize,
    pub entries_without_blobs: usize,
    pub temp_files_removed: usize,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.bad_blobs_removed == 0 && self.entries_without_blobs == 0
    }
}

/// Every stored blob: (digest, size, modified).
fn blobs(store: &BlobStore) -> Result<Vec<(Digest, u64, SystemTime)>> {
    let dir = store.sha256_dir();
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let meta = entry.metadata().at(entry.path())?;
        let digest = digest::parse(&format!("sha256:{}", entry.file_name().to_string_lossy()))?;
        out.push((digest, meta.len(), meta.modified().at(entry.path())?));
    }
    Ok(out)
}

pub fn stats(store: &BlobStore, index: &Index) -> Result<Stats> {
    let blobs = blobs(store)?;
    Ok(Stats {
        entries: index.all_steps()?.len(),
        blobs: blobs.len(),
        blob_bytes: blobs.iter().map(|b| b.1).sum(),
    })
}

/// Removes entries older than `older_than`, then blobs no entry refers to
/// (oldest first, and only until the store is under `max_size` when one is
/// given), then the work dirs of builds that are gone. Unpacked layers
/// not used for `older_than` go too, when no build is running, and with
/// `max_size` the least recently used until blobs and unpacked layers
/// together fit. What a base warmed within `older_than` names (its config,
/// its layers and their unpacked directories) stays.
pub fn gc(
    state: &StateDir,
    store: &BlobStore,
    index: &Index,
    older_than: Duration,
    max_size: Option<u64>,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    (report.build_dirs_removed, report.live_builds) = remove_abandoned_builds(state)?;
    let (warm_blobs, warm_diff_ids) = kept_warm(store, index, older_than)?;
    let entries = index.all_steps()?;
    let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    // An entry lives `older_than` past its last use (its creation if unused).
    let (expired, kept): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .zip(index.last_used(&keys)?)
        .partition(|((_, e), used)| {
            let last = used.unwrap_or(e.created).max(e.created);
            last.saturating_add(older_than.as_secs()) < now_secs()
        });
    let kept: Vec<(String, StepEntry)> = kept.into_iter().map(|(entry, _)| entry).collect();
    report.entries_removed = expired.len();
    index.remove_steps(&expired.into_iter().map(|((k, _), _)| k).collect::<Vec<_>>())?;
    let mut referenced = referenced(&kept);
    referenced.extend(warm_blobs);
    // Unpacked layers are left alone while a build may be stacking them;
    // a live lazy entry's directory is its layer's only copy, and a warm
    // base's are what the warmer made ready.
    let mut spared: HashSet<&Digest> = kept.iter().filter_map(|(_, e)| e.lazy_diff_id()).collect();
    spared.extend(&warm_diff_ids);
    let unpacked = match report.live_builds {
        0 => Some(UnpackedLayers::open(state)?),
        _ => None,
    };
    if let Some(unpacked) = &unpacked {
        report.unpacked_removed = unpacked.gc(older_than, &spared)?;
    }

    let all = blobs(store)?;
    let mut total: u64 = all.iter().map(|b| b.1).sum();
    let mut candidates: Vec<_> = all
        .into_iter()
        .filter(|(d, _, modified)| {
            !referenced.contains(d) && modified.elapsed().is_ok_and(|age| age > GRACE)
        })
        .collect();
    candidates.sort_by_key(|(_, _, modified)| *modified);
    for (digest, size, _) in candidates {
        if report.live_builds > 0 || max_size.is_some_and(|max| total <= max) {
            break;
        }
        let path = store.path(&digest)?;
        fs::remove_file(&path).at(&path)?;
        total -= size;
        report.blobs_removed += 1;
        report.bytes_freed += size;
    }
    // What the blobs leave of the budget is the unpacked layers'.
    if let (Some(max), Some(unpacked)) = (max_size, &unpacked) {
        let (removed, freed) = unpacked.shrink_to(max.saturating_sub(total), &spared)?;
        report.unpacked_removed += removed;
        report.bytes_freed += freed;
    }
    Ok(report)
}

/// The blobs entries need: their layers', and lazy layers' recipes.
fn referenced(entries: &[(String, StepEntry)]) -> HashSet<Digest> {
    entries
        .iter()
        .flat_map(|(_, e)| {
            let layer = e.layer.as_ref().map(|l| l.descriptor.digest.clone());
            layer.into_iter().chain(e.lazy.clone())
        })
        .collect()
}

/// What the bases `kiln warm` warmed within `older_than` name: their
/// configs' and layers' blobs, and their layers' diff_ids (the unpacked
/// directories). A base's config that is not stored names no diff_id.
fn kept_warm(
    store: &BlobStore,
    index: &Index,
    older_than: Duration,
) -> Result<(HashSet<Digest>, HashSet<Digest>)> {
    let (mut blobs, mut diff_ids) = (HashSet::new(), HashSet::new());
    for (_, base) in index.all_bases()? {
        let cold = |warmed: u64| warmed.saturating_add(older_than.as_secs()) < now_secs();
        if base.warmed.is_none_or(cold) {
            continue;
        }
        let m = &base.manifest.manifest;
        blobs.insert(m.config.digest.clone());
        blobs.extend(m.layers.iter().map(|l| l.digest.clone()));
        let Ok(config) = store.read(&m.config.digest) else {
            continue;
        };
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap_or_default();
        let listed = config["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten();
        diff_ids.extend(listed.filter_map(|d| digest::parse(d.as_str()?).ok()));
    }
    Ok((blobs, diff_ids))
}

/// A build holds its work dir's lock while it runs ([`StateDir::new_build`]);
/// a dir whose lock can be taken belongs to a build that died. Returns
/// (removed, live).
fn remove_abandoned_builds(state: &StateDir) -> Result<(usize, usize)> {
    let (mut removed, mut live) = (0, 0);
    for dir in state.build_dirs() {
        let abandoned = match BuildDir::running(&dir) {
            Some(running) => !running,
            // No lock file yet: only an old dir is certainly abandoned.
            None => fs::symlink_metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > GRACE)),
        };
        if abandoned {
            fs::remove_dir_all(&dir).at(&dir)?;
            removed += 1;
        } else {
            live += 1;
        }
    }
    Ok((removed, live))
}

/// Re-hashes every blob (a bad one is removed, so it is fetched or built
/// again instead of served), drops entries whose layer is gone, and clears
/// temp files no writer holds. A lazy entry's layer is there when its
/// recipe blob and its unpacked directory are (the directory's files are
/// checked against the diff_id when the blob is made from them).
pub fn verify(state: &StateDir, store: &BlobStore, index: &Index) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    for (digest, _, _) in blobs(store)? {
        report.blobs_checked += 1;
        if !store.verify(&digest)? {
            report.bad_blobs_removed += 1;
        }
    }
    let unpacked = state.unpacked();
    let mut orphans = Vec::new();
    for (key, entry) in index.all_steps()? {
        let there = match (&entry.layer, &entry.lazy) {
            (None, _) => true,
            (Some(layer), None) => store.contains(&layer.descriptor.digest)?,
            (Some(layer), Some(recipe)) => {
                store.contains(recipe)? && unpacked.join(digest::hex(&layer.diff_id)?).is_dir()
            }
        };
        if !there {
            orphans.push(key);
        }
    }
    report.entries_without_blobs = orphans.len();
    index.remove_steps(&orphans)?;
    let tmp = store.tmp_dir();
    for entry in fs::read_dir(&tmp).at(&tmp)?.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > GRACE));
        if old && fs::remove_file(entry.path()).is_ok() {
            report.temp_files_removed += 1;
        }
    }
    Ok(report)
}

/// Empties the cache: the whole index (entries, their use, the stat and
/// base-image caches), every blob, the unpacked layers, the work dirs of
/// dead builds and the `RUN --mount=type=cache` directories. Refused while
/// a build runs, with nothing removed but dead builds' work dirs.
pub fn prune(state: &StateDir, store: &BlobStore, index: &Index) -> Result<GcReport> {
    let (build_dirs_removed, live_builds) = remove_abandoned_builds(state)?;
    if live_builds > 0 {
        return Err(crate::CacheStoreError::Busy {
            state_dir: state.path().to_path_buf(),
            live_builds,
        });
    }
    let entries_removed = index.step_count()?;
    index.clear()?;
    let mut report = GcReport {
        entries_removed,
        build_dirs_removed,
        ..GcReport::default()
    };
    for (digest, size, _) in blobs(store)? {
        let path = store.path(&digest)?;
        fs::remove_file(&path).at(&path)?;
        report.blobs_removed += 1;
        report.bytes_freed += size;
    }
    report.unpacked_removed = UnpackedLayers::open(state)?.gc(Duration::ZERO, &HashSet::new())?;
    let mounts = state.mounts();
    if mounts.exists() {
        fs::remove_dir_all(&mounts).at(&mounts)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Descriptor, Layer, MediaType};

    fn age(store: &BlobStore, digest: &Digest) {
        let old = SystemTime::now() - 2 * GRACE;
        fs::File::options()
            .write(true)
            .open(store.path(digest).unwrap())
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    fn entry_for(digest: &Digest, created: u64) -> StepEntry {
        StepEntry {
            layer: Some(Layer {
                descriptor: Descriptor::new(MediaType::ImageLayerGzip, digest.clone(), 1),
                diff_id: digest.clone(),
            }),
            created,
            lazy: None,
        }
    }

    /// A lazy entry: its recipe blob, and its layer's unpacked directory.
    fn lazy_entry(state: &StateDir, store: &BlobStore, diff_id: &Digest) -> StepEntry {
        let recipe = store.put(diff_id.as_ref().as_bytes()).unwrap().digest;
        age(store, &recipe);
        let dir = state.unpacked().join(digest::hex(diff_id).unwrap());
        fs::create_dir_all(&dir).unwrap();
        fs::File::open(&dir)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(10 * 86400))
            .unwrap();
        StepEntry {
            layer: Some(Layer {
                descriptor: Descriptor::new(MediaType::ImageLayer, diff_id.clone(), 1),
                diff_id: diff_id.clone(),
            }),
            created: now_secs() - 5,
            lazy: Some(recipe),
        }
    }

    #[test]
    fn a_live_lazy_entry_keeps_its_recipe_and_unpacked_dir_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let index = Index::open(&state).unwrap();
        let (live, gone) = (digest::sha256(b"live"), digest::sha256(b"gone"));
        let entry = lazy_entry(&state, &store, &live);
        let orphan = lazy_entry(&state, &store, &gone);
        index
            .put_steps(&[("l".into(), entry.clone()), ("o".into(), orphan)])
            .unwrap();
        // The unpacked dir of `o` is gone: verify drops that entry alone.
        fs::remove_dir(state.unpacked().join(digest::hex(&gone).unwrap())).unwrap();
        let report = verify(&state, &store, &index).unwrap();
        assert_eq!(report.entries_without_blobs, 1);
        assert_eq!(
            index.all_steps().unwrap(),
            [("l".to_string(), entry.clone())]
        );
        // Old unpacked dirs go, but not the live lazy one; its recipe stays.
        let report = gc(&state, &store, &index, Duration::from_secs(86400), Some(0)).unwrap();
        assert_eq!(report.entries_removed, 0);
        assert!(state.unpacked().join(digest::hex(&live).unwrap()).is_dir());
        assert!(store.contains(entry.lazy.as_ref().unwrap()).unwrap());
        assert!(verify(&state, &store, &index).unwrap().clean());
        // Once the entry expires, both go.
        let report = gc(&state, &store, &index, Duration::from_secs(1), None).unwrap();
        assert_eq!((report.entries_removed, report.unpacked_removed), (1, 1));
        assert!(!store.contains(entry.lazy.as_ref().unwrap()).unwrap());
    }

    #[test]
    fn gc_removes_expired_entries_and_unreferenced_old_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let index = Index::open(&state).unwrap();
        let kept = store.put(b"kept").unwrap().digest;
        let expired = store.put(b"expired").unwrap().digest;
        let fresh_orphan = store.put(b"being written by a build").unwrap().digest;
        for d in [&kept, &expired] {
            age(&store, d);
        }
        let now = crate::index::now_secs();
        index
            .put_steps(&[
                ("k".into(), entry_for(&kept, now)),
                ("e".into(), entry_for(&expired, now - 10 * 86400)),
            ])
            .unwrap();
        // Old but still in use: kept.
        index
            .put_steps(&[("used".into(), entry_for(&kept, now - 10 * 86400))])
            .unwrap();
        index.touch_steps(&["used".into()]).unwrap();
        let report = gc(&state, &store, &index, Duration::from_secs(86400), None).unwrap();
        assert_eq!((report.entries_removed, report.blobs_removed), (1, 1));
        assert_eq!(stats(&store, &index).unwrap().entries, 2);
        assert!(store.contains(&kept).unwrap());
        assert!(!store.contains(&expired).unwrap());
        assert!(store.contains(&fresh_orphan).unwrap());
    }

    #[test]
    fn verify_repairs_what_a_crash_or_bit_rot_left() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let index = Index::open(&state).unwrap();
        let good = store.put(b"good").unwrap().digest;
        let bad = store.put(b"bad").unwrap().digest;
        fs::write(store.path(&bad).unwrap(), b"rotten").unwrap();
        let now = crate::index::now_secs();
        index
            .put_steps(&[
                ("g".into(), entry_for(&good, now)),
                ("b".into(), entry_for(&bad, now)),
            ])
            .unwrap();
        let report = verify(&state, &store, &index).unwrap();
        assert!(!report.clean());
        assert_eq!(
            (report.bad_blobs_removed, report.entries_without_blobs),
            (1, 1)
        );
        assert!(verify(&state, &store, &index).unwrap().clean());
        assert_eq!(index.all_steps().unwrap().len(), 1);
    }

    #[test]
    fn prune_waits_for_live_builds_then_empties_the_whole_index() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let store = BlobStore::open(&state).unwrap();
        let index = Index::open(&state).unwrap();
        let digest = digest::sha256(b"a");
        let key = "k".to_string();
        index
            .put_steps(&[(key.clone(), entry_for(&digest, now_secs()))])
            .unwrap();
        index.touch_steps(std::slice::from_ref(&key)).unwrap();
        index.put_stats(vec![(b"stat".to_vec(), b"hash".to_vec())]);
        index.flush().unwrap();
        let live = dir.path().join("builds/build-live");
        fs::create_dir_all(&live).unwrap();
        fs::write(live.join("lock"), b"").unwrap();
        let held = fs::File::open(live.join("lock")).unwrap();
        held.lock().unwrap();
        assert!(prune(&state, &store, &index).is_err());
        assert!(index.get_steps(std::slice::from_ref(&key)).unwrap()[0].is_some());
        drop(held);
        let report = prune(&state, &store, &index).unwrap();
        assert_eq!(report.entries_removed, 1);
        assert!(index.get_steps(std::slice::from_ref(&key)).unwrap()[0].is_none());
        assert_eq!(index.last_used(std::slice::from_ref(&key)).unwrap(), [None]);
        assert_eq!(index.get_stats(&[b"stat".to_vec()]).unwrap(), [None]);
    }

    #[test]
    fn abandoned_build_dirs_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let live = dir.path().join("builds/build-live");
        let dead = dir.path().join("builds/build-dead");
        for d in [&live, &dead] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("lock"), b"").unwrap();
        }
        let held = fs::File::open(live.join("lock")).unwrap();
        held.lock().unwrap();
        assert_eq!(remove_abandoned_builds(&state).unwrap(), (1, 1));
        assert!(live.exists() && !dead.exists());
    }
}
