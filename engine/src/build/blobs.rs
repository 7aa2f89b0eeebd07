//! Layer blobs made or fetched when something needs them, not before.
//!
//! - A base image's layers are pulled, and a `--cache-repo` hit's layer
//!   fetched, only when a step unpacks them or the target's image holds
//!   them: a stage whose steps all hit, read only through `COPY --from`
//!   steps that hit too, costs no transfer.
//! - A lazy layer (the overlay snapshotter, in a stage outside the target's
//!   image, with no `--cache-repo` to fill) is never compressed when
//!   written: its step's upper dir, kept as the layer's unpacked directory,
//!   holds its files, and its identity is its diff_id, the sha256 of the
//!   uncompressed tar, which is measured instead of stored. A [`Recipe`]
//!   (the tar's names and fixed mtime) is stored beside it, and the day a
//!   build needs the blob, the same tar is written again from the same
//!   directory, compressed, checked against the diff_id, and recorded in
//!   the index in place of the lazy layer.
//!
//! A layer blob this build writes for the target's image, or for
//! `--cache-repo`, starts uploading there as soon as it is in the store
//! ([`NewLayers`], `crate::uploads`), while the next steps run.
//!
//! With the walk snapshotter every layer is compressed when written: the
//! root is changed by the steps after it, so no directory keeps a layer's
//! files, and keeping its uncompressed tar instead would store more bytes
//! than the blob to save the compression alone.
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use kiln_cachestore::digest::{self, Digest};
use kiln_cachestore::registry;
use kiln_cachestore::state::StateDir;
use kiln_cachestore::{BlobStore, StepEntry};

use super::unpack::Arrivals;
use super::{blocking, Builder};
use crate::error::BuildError;
use crate::image::Layer;
use crate::layer::LayerWriter;
use crate::rootfs::meta_view::LayerTable;
use crate::rootfs::snapshot::Changes;

/// Where a layer blob the store lacks comes from.
#[derive(Debug, Clone)]
pub(super) enum BlobSource {
    /// A base image's layer, from the registry the reference names.
    Base(String),
    /// A `--cache-repo` hit's layer: the entry's key and the entry.
    Remote(String, Box<StepEntry>),
    /// A lazy layer: its recipe blob, and the keys of the index entries
    /// that hold it, which get the blob once it is made.
    Lazy { recipe: Digest, keys: Vec<String> },
}

/// The sources of the blobs this build may need, by the digest the
/// layer's descriptor names.
#[derive(Default)]
pub(super) struct Pending {
    sources: Mutex<HashMap<Digest, BlobSource>>,
    /// Lazy layers already made, by the digest they had.
    made: Mutex<HashMap<Digest, Layer>>,
}

impl Pending {
    pub(super) fn add(&self, digest: &Digest, source: BlobSource) {
        let mut sources = self.sources.lock().expect("pending blobs poisoned");
        match (sources.get_mut(digest), source) {
            (Some(BlobSource::Lazy { keys, .. }), BlobSource::Lazy { keys: more, .. }) => {
                keys.extend(more);
            }
            (Some(_), _) => {}
            (None, source) => {
                sources.insert(digest.clone(), source);
            }
        }
    }

    fn get(&self, digest: &Digest) -> Option<BlobSource> {
        let sources = self.sources.lock().expect("pending blobs poisoned");
        sources.get(digest).cloned()
    }
}

/// Where the layer blobs this build writes go as soon as they are written:
/// to the destinations when the stage being built is in the target's
/// image, and to `--cache-repo` (when filling it) when the step being run
/// is cached. Base layers and hits are not new: the outputs push those
/// the destination lacks.
#[derive(Default)]
pub(super) struct NewLayers {
    in_image: AtomicBool,
    cached_step: AtomicBool,
    /// Upload sessions opened ahead, and those the image's steps have
    /// asked for so far (its config's, and one per miss).
    opened: AtomicUsize,
    asked: AtomicUsize,
}

impl NewLayers {
    /// A stage starts: whether the target's image holds its layers.
    pub(super) fn stage(&self, in_image: bool) {
        self.in_image.store(in_image, Ordering::Relaxed);
    }

    /// A step starts: whether its result goes to the cache.
    pub(super) fn step(&self, cached: bool) {
        self.cached_step.store(cached, Ordering::Relaxed);
    }
}

/// One name of a layer's tar, in order: an entry read from the root, or
/// the whiteout of a deleted path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Name {
    Entry(PathBuf),
    Whiteout(PathBuf),
}

/// The tar's names for a step's changes: changed paths with their parent
/// directories (so a layer alone restores their metadata), then whiteouts
/// for what was deleted, one stream sorted by name, parents first.
pub(super) fn layer_names(changes: &Changes) -> Vec<Name> {
    let mut names: BTreeMap<PathBuf, Option<&Path>> = BTreeMap::new();
    for p in changes.upserts.iter().chain(&changes.deletes) {
        for parent in p.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            names.insert(parent.to_path_buf(), None);
        }
    }
    names.extend(changes.upserts.iter().map(|p| (p.clone(), None)));
    names.extend(
        changes
            .deletes
            .iter()
            .map(|p| (crate::layer::whiteout_name(p), Some(p.as_path()))),
    );
    names
        .into_iter()
        .map(|(name, deleted)| match deleted {
            None => Name::Entry(name),
            Some(deleted) => Name::Whiteout(deleted.to_path_buf()),
        })
        .collect()
}

/// Writes `names` from `root` into `writer`.
pub(super) fn write_names(
    writer: &mut LayerWriter,
    root: &Path,
    names: &[Name],
) -> Result<(), BuildError> {
    for name in names {
        match name {
            Name::Entry(path) => writer.add(root, path)?,
            Name::Whiteout(deleted) => writer.whiteout(deleted)?,
        }
    }
    Ok(())
}

/// What writes a lazy layer's tar again from its directory: the names in
/// order and the fixed mtime (`--reproducible`) it was written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recipe {
    pub(super) fixed_mtime: Option<u64>,
    pub(super) names: Vec<Name>,
}

const RECIPE_MAGIC: &[u8] = b"kiln-layer-recipe/1\n";

impl Recipe {
    /// The magic line, `mtime <secs>|-`, then each name as `e` (entry) or
    /// `w` (whiteout), its bytes and a NUL (no path holds one).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = RECIPE_MAGIC.to_vec();
        let mtime = self.fixed_mtime.map_or("-".into(), |t| t.to_string());
        out.extend_from_slice(format!("mtime {mtime}\n").as_bytes());
        for name in &self.names {
            let (tag, path) = match name {
                Name::Entry(p) => (b'e', p),
                Name::Whiteout(p) => (b'w', p),
            };
            out.push(tag);
            out.extend_from_slice(path.as_os_str().as_bytes());
            out.push(0);
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Recipe> {
        let rest = bytes.strip_prefix(RECIPE_MAGIC)?;
        let end = rest.iter().position(|b| *b == b'\n')?;
        let mtime = std::str::from_utf8(&rest[..end])
            .ok()?
            .strip_prefix("mtime ")?;
        let fixed_mtime = match mtime {
            "-" => None,
            secs => Some(secs.parse().ok()?),
        };
        let mut names = Vec::new();
        let mut records = &rest[end + 1..];
        while let Some((&tag, tail)) = records.split_first() {
            let len = tail.iter().position(|b| *b == 0)?;
            let path = PathBuf::from(OsStr::from_bytes(&tail[..len]));
            names.push(match tag {
                b'e' => Name::Entry(path),
                b'w' => Name::Whiteout(path),
                _ => return None,
            });
            records = &tail[len + 1..];
        }
        Some(Recipe { fixed_mtime, names })
    }
}

/// A lazy layer's unpacked directory, if it is still there.
pub(super) fn lazy_dir(state: &StateDir, diff_id: &Digest) -> Option<PathBuf> {
    let dir = state.unpacked().join(digest::hex(diff_id).ok()?);
    dir.is_dir().then_some(dir)
}

/// Whether a lazy entry's layer can still be made: its recipe and its
/// directory are there.
pub(super) fn lazy_usable(
    state: &StateDir,
    store: &BlobStore,
    entry: &StepEntry,
) -> Result<bool, BuildError> {
    let (Some(recipe), Some(layer)) = (&entry.lazy, &entry.layer) else {
        return Ok(false);
    };
    Ok(store.contains(recipe)? && lazy_dir(state, &layer.diff_id).is_some())
}

/// How [`Builder::write_names_layer`] writes a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayerForm {
    /// Compressed into the store, its upload started.
    Blob,
    /// Only measured, its recipe stored: the caller registers the lazy
    /// layer with its entry's key.
    Lazy,
}

/// What writing a layer made.
pub(super) struct Written {
    pub layer: Layer,
    /// A lazy layer's recipe.
    pub recipe: Option<Digest>,
    /// The layer's metadata table, when asked for (`None` also when the
    /// view cannot serve the layer).
    pub table: Option<LayerTable>,
}

impl Builder<'_> {
    /// Writes the layer of `names` from `root` in `form`, with its
    /// metadata table made from the same tar when `table` asks for it.
    pub(super) fn write_names_layer(
        &self,
        root: &Path,
        names: Vec<Name>,
        form: LayerForm,
        table: bool,
    ) -> Result<Written, BuildError> {
        let fixed_mtime = self.options.fixed_time;
        let mut writer = match form {
            LayerForm::Lazy => LayerWriter::measure(fixed_mtime),
            LayerForm::Blob => LayerWriter::new(self.store, self.options.compression, fixed_mtime)?,
        };
        if table {
            writer = writer.with_table()?;
        }
        write_names(&mut writer, root, &names)?;
        let (layer, table) = writer.finish_with_table()?;
        let recipe = match form {
            LayerForm::Lazy => {
                let recipe = Recipe { fixed_mtime, names }.encode();
                Some(self.store.put(&recipe)?.digest)
            }
            LayerForm::Blob => {
                self.upload_new(&layer);
                None
            }
        };
        Ok(Written {
            layer,
            recipe,
            table,
        })
    }

    /// A step of the image's stage that may write a layer starts: the
    /// destinations' upload sessions for that layer (and, the first time,
    /// for the image's config, which is new with it) open while it runs.
    /// A miss in an earlier stage opens none: a `COPY --from` of what it
    /// made may still be found by its content, leaving the image as it
    /// was and the sessions to be cancelled, at the end, for nothing.
    pub(super) fn expect_layer(&self) {
        if !self.new_layers.in_image.load(Ordering::Relaxed) {
            return;
        }
        let wanted = self.new_layers.asked.fetch_add(1, Ordering::Relaxed) + 2;
        let opened = self.new_layers.opened.fetch_max(wanted, Ordering::Relaxed);
        for _ in opened..wanted {
            self.uploads.open_ahead();
        }
    }

    /// Starts uploading a layer blob just written where it goes
    /// ([`NewLayers`]); the build goes on meanwhile.
    fn upload_new(&self, layer: &Layer) {
        let digest = &layer.descriptor.digest;
        if self.new_layers.in_image.load(Ordering::Relaxed) {
            self.uploads.layer(digest);
        }
        let filling = self
            .remote
            .as_ref()
            .filter(|_| self.options.cache_repo_push);
        if let Some(remote) =
            filling.filter(|_| self.new_layers.cached_step.load(Ordering::Relaxed))
        {
            self.uploads.blob(remote.repo(), digest);
        }
    }

    /// Makes sure the store holds the blobs of `layers`: pulled, fetched
    /// from `--cache-repo` or, for a lazy layer, made (its descriptor then
    /// becomes the blob's). With `for_unpack`, a layer the overlay
    /// snapshotter has unpacked already needs none.
    pub(super) async fn ensure_blobs(
        &self,
        layers: &mut [Layer],
        for_unpack: bool,
    ) -> Result<(), BuildError> {
        let fetches = self.missing_blobs(layers, for_unpack)?;
        self.fetch_blobs(&fetches, None).await
    }

    /// The blobs of `layers` to fetch for [`Self::ensure_blobs`], with
    /// where from; lazy layers are made now instead.
    pub(super) fn missing_blobs(
        &self,
        layers: &mut [Layer],
        for_unpack: bool,
    ) -> Result<Vec<(Digest, BlobSource)>, BuildError> {
        let unpacked = match for_unpack {
            true => self.roots.unpacked()?,
            false => None,
        };
        let mut fetches = Vec::new();
        for i in 0..layers.len() {
            let layer = &layers[i];
            if let Some(made) = self.made(&layer.descriptor.digest) {
                layers[i] = made;
                continue;
            }
            if self.store.contains(&layer.descriptor.digest)? {
                continue;
            }
            if let Some(unpacked) = unpacked {
                let below: Vec<&Digest> = layers[..i].iter().map(|l| &l.diff_id).collect();
                if unpacked.get(&layer.diff_id)?.is_some()
                    || unpacked.get_stacked(&layer.diff_id, &below)?.is_some()
                {
                    continue;
                }
            }
            match self.pending.get(&layer.descriptor.digest) {
                Some(BlobSource::Lazy { recipe, keys }) => {
                    let made = blocking(|| self.make_lazy(layer, &recipe, &keys))?;
                    layers[i] = made;
                }
                Some(source) => fetches.push((layer.descriptor.digest.clone(), source)),
                // Not in the store and nowhere to get it: opening it says so.
                None => {}
            }
        }
        Ok(fetches)
    }

    /// Fetches blobs concurrently into the store, marking each in
    /// `arrivals` (when given) as it is stored.
    pub(super) async fn fetch_blobs(
        &self,
        fetches: &[(Digest, BlobSource)],
        arrivals: Option<&Arrivals>,
    ) -> Result<(), BuildError> {
        if fetches.is_empty() {
            return Ok(());
        }
        let start = Instant::now();
        let fetches = fetches.iter().map(|(digest, source)| async move {
            match source {
                BlobSource::Base(reference) => {
                    let r = registry::parse_reference(reference)?;
                    self.registry
                        .pull_blob(&r, digest, self.store)
                        .await
                        .map_err(|source| BuildError::BaseImage {
                            reference: reference.clone(),
                            source: Box::new(source),
                        })?;
                }
                BlobSource::Remote(key, entry) => {
                    let remote = self.remote.as_ref().expect("a remote hit has a remote");
                    remote.fetch_layer(key, entry, self.store).await?;
                }
                BlobSource::Lazy { .. } => unreachable!("made by missing_blobs"),
            }
            if let Some(arrivals) = arrivals {
                arrivals.arrived(digest);
            }
            Ok::<_, BuildError>(())
        });
        let fetched = futures_util::future::try_join_all(fetches).await;
        self.counters.timed("pull", start);
        fetched.map(drop)
    }

    /// Fetches `fetches` while `unpack` runs (blocking): each layer it
    /// unpacks waits only for its own blob ([`Arrivals`]). With the overlay
    /// snapshotter every layer goes to its own directory, so a layer
    /// unpacks as soon as its blob is stored, beside others (as many as
    /// the cores, `Unpacker::layer_dirs`); with the walk snapshotter the
    /// layers apply in order, while the later ones still download.
    ///
    /// A layer's blob is stored whole, its digest checked, before it
    /// unpacks: teeing the body into the extractor would start a big
    /// layer sooner, but a retried download, or a digest that fails at
    /// the end, would have to undo an extraction, which over the walk
    /// snapshotter's root cannot be done. Across layers the overlap is
    /// real, and no unverified byte is ever extracted.
    ///
    /// The fetches run on a thread of their own, driving the runtime
    /// through its handle, while this thread unpacks. That needs a
    /// multi-thread runtime (the CLI's): on a current-thread one, nothing
    /// would poll the connections while the unpack blocks, so there the
    /// blobs are all fetched first.
    pub(super) async fn fetch_while<T>(
        &self,
        fetches: Vec<(Digest, BlobSource)>,
        unpack: impl FnOnce() -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let Some(handle) = handle.filter(|_| !fetches.is_empty()) else {
            self.fetch_blobs(&fetches, None).await?;
            return blocking(unpack);
        };
        let arrivals = self.roots.arrivals();
        arrivals.expect(fetches.iter().map(|(d, _)| d));
        let (fetched, unpacked) = blocking(|| {
            std::thread::scope(|s| {
                let fetcher = s.spawn(|| {
                    let fetched = handle.block_on(self.fetch_blobs(&fetches, Some(arrivals)));
                    // Whatever did not come now never will: unpacks
                    // waiting for it stop.
                    arrivals.stopped();
                    fetched
                });
                let unpacked = unpack();
                (fetcher.join(), unpacked)
            })
        });
        arrivals.clear();
        // A failed fetch first: it says why an unpack had nothing to read.
        match fetched {
            Ok(fetched) => fetched?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        unpacked
    }

    fn made(&self, digest: &Digest) -> Option<Layer> {
        let made = self.pending.made.lock().expect("pending blobs poisoned");
        made.get(digest).cloned()
    }

    /// Makes a lazy layer's blob from its directory, checks that it holds
    /// the same tar, and records it in the entries that held the layer.
    fn make_lazy(
        &self,
        layer: &Layer,
        recipe: &Digest,
        keys: &[String],
    ) -> Result<Layer, BuildError> {
        let start = Instant::now();
        let invalid = |message: String| BuildError::Layer {
            layer: layer.diff_id.clone(),
            message,
        };
        let dir = lazy_dir(&self.state, &layer.diff_id)
            .ok_or_else(|| invalid("its unpacked directory is gone".into()))?;
        let recipe_bytes = self.store.read(recipe)?;
        let Recipe { fixed_mtime, names } = Recipe::decode(&recipe_bytes)
            .ok_or_else(|| invalid(format!("its recipe {recipe} is malformed")))?;
        let mut writer = LayerWriter::new(self.store, self.options.compression, fixed_mtime)?;
        write_names(&mut writer, &dir, &names)?;
        let made = writer.finish()?;
        if made.diff_id != layer.diff_id {
            return Err(invalid(format!(
                "written again from {}, its tar is {}: the directory changed",
                dir.display(),
                made.diff_id
            )));
        }
        let entries = self.index.get_steps(keys)?;
        let updated: Vec<(String, StepEntry)> = keys
            .iter()
            .zip(entries)
            .filter_map(|(key, entry)| {
                let entry = entry.filter(|e| e.lazy.as_ref() == Some(recipe))?;
                let entry = StepEntry {
                    layer: Some(made.clone()),
                    lazy: None,
                    ..entry
                };
                Some((key.clone(), entry))
            })
            .collect();
        self.index.put_steps(&updated)?;
        self.pending
            .made
            .lock()
            .expect("pending blobs poisoned")
            .insert(layer.descriptor.digest.clone(), made.clone());
        self.counters.timed("layers", start);
        Ok(made)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_reads_back_as_written() {
        let recipe = Recipe {
            fixed_mtime: Some(0),
            names: vec![
                Name::Entry("a".into()),
                Name::Entry(PathBuf::from(OsStr::from_bytes(b"a/\xff name"))),
                Name::Whiteout("a/gone".into()),
            ],
        };
        assert_eq!(Recipe::decode(&recipe.encode()), Some(recipe.clone()));
        let none = Recipe {
            fixed_mtime: None,
            names: Vec::new(),
        };
        assert_eq!(Recipe::decode(&none.encode()), Some(none));
        let mut truncated = recipe.encode();
        truncated.pop();
        assert_eq!(Recipe::decode(&truncated), None);
        assert_eq!(Recipe::decode(b"not a recipe"), None);
    }

    #[test]
    fn names_put_parents_first_and_whiteouts_in_order() {
        let changes = Changes {
            upserts: vec!["d/e/f".into()],
            deletes: vec!["d/gone".into()],
        };
        assert_eq!(
            layer_names(&changes),
            [
                Name::Entry("d".into()),
                Name::Whiteout("d/gone".into()),
                Name::Entry("d/e".into()),
                Name::Entry("d/e/f".into()),
            ]
        );
    }
}
