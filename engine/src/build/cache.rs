//! The cache decisions: which steps may use the cache, the local and
//! remote lookups of a stage's keys, and publishing new entries.
use std::collections::HashMap;

use kiln_cachestore::manifest::Descriptor;
use kiln_cachestore::StepEntry;

use super::blobs::{lazy_usable, BlobSource};
use super::Builder;
use crate::error::{BuildError, IoContext};
use crate::exec::copy_selection;
use crate::exec::mounts::SourceRoots;
use crate::image::Layer;
use crate::key;
use crate::plan::{Action, CopyFrom, StagePlan, Step};

/// A step found in the cache: its layer (none when it changed no file)
/// and when it was first built, which its history keeps, so a rebuild that
/// only hits gives the same image.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) layer: Option<Layer>,
    pub(crate) created: u64,
    /// Found in `--cache-repo` rather than the local index.
    pub(crate) remote: bool,
}

impl Hit {
    /// The hit an entry gives, found locally or in `--cache-repo`.
    fn of(entry: &StepEntry, remote: bool) -> Hit {
        Hit {
            layer: entry.layer.clone(),
            created: entry.created,
            remote,
        }
    }
}

/// A step's content key ([`Builder::lookup_by_content`]), and the entry
/// the index held under it, if it did (the step's hit).
pub(super) struct ByContent {
    pub(super) key: String,
    pub(super) entry: Option<StepEntry>,
}

impl ByContent {
    pub(super) fn hit(&self) -> bool {
        self.entry.is_some()
    }
}

/// The digest of what a `COPY --from` of `sources` reads in stage
/// `source`'s root, owners included; `None` when that root is not on disk
/// or the sources cannot be read there (the copy then reports why).
fn stage_content(reads: &SourceRoots, source: usize, sources: &[String]) -> Option<String> {
    let root = reads.stages.get(&source)?;
    let selection = copy_selection::selected_root_sources(root, sources).ok()?;
    selection.digest(None).ok()
}

/// The entries that make each side of [`Builder::lookup_by_content`] find
/// the other next time: a content hit's entry under the step's key,
/// and a copy that ran under its content key too.
pub(super) fn content_entries(
    keys: &[Option<String>],
    by_content: &[Option<ByContent>],
    entries: &[(String, StepEntry)],
) -> Vec<(String, StepEntry)> {
    keys.iter()
        .zip(by_content)
        .filter_map(|(k, c)| k.as_ref().zip(c.as_ref()))
        .filter_map(|(key, by_content)| match &by_content.entry {
            Some(entry) => Some((key.clone(), entry.clone())),
            None => {
                let (_, ran) = entries.iter().find(|(k, _)| k == key)?;
                Some((by_content.key.clone(), ran.clone()))
            }
        })
        .collect()
}

impl Builder<'_> {
    /// Looks every key up at once. A hit is an entry within the TTL whose
    /// layer blob is in the store, or whose lazy layer can still be made
    /// (`blobs.rs`); `Some(None)` is a hit that made no layer.
    pub(super) fn lookup(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
    ) -> Result<Vec<Option<Hit>>, BuildError> {
        let found = self.lookup_entries(stage, keys)?;
        Ok(found
            .iter()
            .map(|e| e.as_ref().map(|e| Hit::of(e, false)))
            .collect())
    }

    /// [`Self::lookup`]'s hits as the entries they were found in.
    fn lookup_entries(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
    ) -> Result<Vec<Option<StepEntry>>, BuildError> {
        let wanted: Vec<String> = keys
            .iter()
            .zip(&stage.steps)
            .filter_map(|(k, step)| k.clone().filter(|_| self.cacheable(step)))
            .collect();
        let found = self.index.get_steps(&wanted)?;
        let found: HashMap<&String, StepEntry> = wanted
            .iter()
            .zip(found)
            .filter_map(|(k, e)| e.map(|e| (k, e)))
            .collect();
        keys.iter()
            .map(|k| {
                let Some(entry) = k.as_ref().and_then(|k| found.get(k)) else {
                    return Ok(None);
                };
                if entry.expired(self.options.cache_ttl) {
                    return Ok(None);
                }
                let usable = match (&entry.layer, &entry.lazy) {
                    (Some(l), Some(recipe)) => {
                        let usable = lazy_usable(&self.state, self.store, entry)?;
                        if usable {
                            let (recipe, keys) = (recipe.clone(), vec![k.clone().expect("found")]);
                            self.pending
                                .add(&l.descriptor.digest, BlobSource::Lazy { recipe, keys });
                        }
                        usable
                    }
                    (Some(l), None) => self.store_has(&l.descriptor)?,
                    (None, _) => true,
                };
                Ok(usable.then(|| entry.clone()))
            })
            .collect()
    }

    /// [`Self::lookup_by_content`], then the remote tier for the content
    /// keys the index lacks, the layers of their hits then put where the
    /// steps read them, as other hits' are.
    pub(super) async fn hits_by_content(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
        first: &str,
        hits: &mut [Option<Hit>],
        reads: &SourceRoots,
    ) -> Result<Vec<Option<ByContent>>, BuildError> {
        // Hashing a large copy's sources is a lookup's cost, and shows as one.
        let start = std::time::Instant::now();
        let mut by_content =
            super::blocking(|| self.lookup_by_content(stage, keys, first, hits, reads))?;
        let missed = by_content
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref().filter(|c| !c.hit())?.key.clone())))
            .collect();
        for (i, entry) in self.remote_entries(missed).await? {
            hits[i] = Some(Hit::of(&entry, true));
            if let Some(c) = &mut by_content[i] {
                c.entry = Some(entry);
            }
        }
        self.counters.timed("lookup", start);
        let found: Vec<(usize, Layer)> = by_content
            .iter()
            .zip(hits.iter())
            .enumerate()
            .filter(|(_, (c, _))| c.as_ref().is_some_and(ByContent::hit))
            .filter_map(|(i, (_, h))| Some((i, h.as_ref()?.layer.clone()?)))
            .collect();
        let (at, mut layers): (Vec<usize>, Vec<Layer>) = found.into_iter().unzip();
        self.ensure_blobs(&mut layers, true).await?;
        for (i, layer) in at.into_iter().zip(layers) {
            if let Some(hit) = &mut hits[i] {
                hit.layer = Some(layer);
            }
        }
        Ok(by_content)
    }

    /// The content keys of a stage's `COPY --from=<stage>` misses
    /// ([`key::content_key`]), hashed from the source stages' roots in
    /// `reads`, and what the index holds under them: a hit there becomes
    /// the step's hit. They chain as keys do, a copy's content key being
    /// the parent of the next copy's; the chain stops at a step that
    /// missed and is no such copy. `first` is the stage's first parent.
    fn lookup_by_content(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
        first: &str,
        hits: &mut [Option<Hit>],
        reads: &SourceRoots,
    ) -> Result<Vec<Option<ByContent>>, BuildError> {
        let platform = stage.platform.to_string();
        let mut content_keys = vec![None; keys.len()];
        let mut parent = first.to_string();
        for (i, (step, key)) in stage.steps.iter().zip(keys).enumerate() {
            let Some(key) = key else { continue };
            let digest = match &step.action {
                Action::Copy {
                    from: CopyFrom::Stage(source),
                    add: None,
                    sources,
                    ..
                } if hits[i].is_none() && self.cacheable(step) => {
                    stage_content(reads, *source, sources)
                }
                _ => None,
            };
            match digest.and_then(|d| key::content_key(step, &parent, &platform, &d)) {
                Some(content_key) => {
                    parent = content_key.clone();
                    content_keys[i] = Some(content_key);
                }
                // Hits before any copy keep the chain the keys' own.
                None if hits[i].is_some() && content_keys.iter().all(Option::is_none) => {
                    parent = key.clone();
                }
                None => break,
            }
        }
        let found = self.lookup_entries(stage, &content_keys)?;
        Ok(content_keys
            .into_iter()
            .zip(found)
            .zip(hits.iter_mut())
            .map(|((content_key, entry), hit)| {
                let key = content_key?;
                if let Some(entry) = &entry {
                    *hit = Some(Hit::of(entry, false));
                }
                Some(ByContent { key, entry })
            })
            .collect())
    }

    /// Whether the store holds `d`'s blob at its recorded size. A blob of
    /// another size is damaged (hashing every hit would cost too much; the
    /// digest is checked on unpack and by the registry on push): it is
    /// removed, so the step runs again and writes it anew.
    fn store_has(&self, d: &Descriptor) -> Result<bool, BuildError> {
        if !self.store.contains(&d.digest)? {
            return Ok(false);
        }
        if self.store.size(&d.digest)? == d.size {
            return Ok(true);
        }
        let path = self.store.path(&d.digest)?;
        std::fs::remove_file(&path).at(&path)?;
        Ok(false)
    }

    /// Whether a step's result may come from and go to the cache.
    pub(super) fn cacheable(&self, step: &Step) -> bool {
        let opts = self.options;
        opts.cache
            && !opts.single_snapshot
            && match step.action {
                Action::Run { .. } => opts.cache_run_layers,
                Action::Copy { .. } => opts.cache_copy_layers,
                _ => true,
            }
    }

    /// Asks the remote tier, all at once, for every key the local tier
    /// missed.
    pub(super) async fn lookup_remote(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
        mut hits: Vec<Option<Hit>>,
    ) -> Result<Vec<Option<Hit>>, BuildError> {
        let missing: Vec<(usize, String)> = keys
            .iter()
            .zip(&stage.steps)
            .enumerate()
            .filter(|(i, (k, step))| k.is_some() && hits[*i].is_none() && self.cacheable(step))
            .map(|(i, (k, _))| (i, k.clone().expect("filtered")))
            .collect();
        for (i, entry) in self.remote_entries(missing).await? {
            hits[i] = Some(Hit::of(&entry, true));
        }
        Ok(hits)
    }

    /// The remote tier's entries for `wanted` (step, key) pairs, asked all
    /// at once. Each is recorded locally; its layer is fetched only when
    /// the build needs it (`blobs.rs`), and a later build finds it here
    /// once it is in the store.
    async fn remote_entries(
        &self,
        wanted: Vec<(usize, String)>,
    ) -> Result<Vec<(usize, StepEntry)>, BuildError> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        let store = self.store;
        let found =
            futures_util::future::try_join_all(wanted.into_iter().map(|(i, key)| async move {
                Ok::<_, BuildError>(match remote.get(&key, store).await? {
                    // Never published lazy; one that is has no blob to give.
                    Some(e) if !e.expired(self.options.cache_ttl) && e.lazy.is_none() => {
                        Some((i, key, e))
                    }
                    _ => None,
                })
            }))
            .await?;
        let mut fetched = Vec::new();
        let mut entries = Vec::new();
        for (i, key, entry) in found.into_iter().flatten() {
            if let Some(layer) = &entry.layer {
                let source = BlobSource::Remote(key.clone(), Box::new(entry.clone()));
                self.pending.add(&layer.descriptor.digest, source);
            }
            self.counters.remote_hit();
            fetched.push((key, entry.clone()));
            entries.push((i, entry));
        }
        self.index.put_steps(&fetched)?;
        Ok(entries)
    }

    /// Uploads a stage's new entries to the remote tier, in the
    /// background: each once its layer, uploaded since it was written, is
    /// there (`crate::uploads`). A lazy entry (a local hit by content made
    /// without blobs) has no blob to give, and stays local.
    pub(super) fn publish(&self, entries: &[(String, StepEntry)]) {
        let Some(remote) = self
            .remote
            .as_ref()
            .filter(|_| self.options.cache_repo_push)
        else {
            return;
        };
        for (key, entry) in entries.iter().filter(|(_, e)| e.lazy.is_none()) {
            self.uploads.entry(remote, key, entry);
        }
    }
}
