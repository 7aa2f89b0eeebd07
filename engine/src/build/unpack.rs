//! Layers unpacked into the state dir's unpacked layers, for the overlay
//! snapshotter to stack: what a build does the first time it needs a
//! layer, and what `kiln warm` does ahead of builds ([`BaseUnpacker`]);
//! and the blobs still on their way that an unpack waits for
//! ([`Arrivals`]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_cachestore::digest::Digest;
use kiln_cachestore::manifest::ResolvedManifest;
use kiln_cachestore::state::{BuildDir, StateDir};
use kiln_cachestore::unpacked::UnpackedLayers;
use kiln_cachestore::{BlobStore, Index};

use super::syscalls::{Host, Syscalls, UnpackInto};
use crate::error::{BuildError, IoContext};
use crate::image::Layer;
use crate::rootfs::extract::{ExtractError, ExtractStats, Lowers};
use crate::rootfs::table_tee::{TableTee, TeeReader};

/// Layer blobs being fetched while layers are unpacked, so that a layer
/// is unpacked as soon as its own blob is stored, not once the last one
/// is: the fetches mark each blob arrived, and an unpack waits here for
/// the blob it reads. A blob unpacks only once stored, i.e. once its
/// digest has been checked, so no byte of an untrusted blob that fails
/// its digest is ever extracted.
#[derive(Default)]
pub(crate) struct Arrivals {
    /// The blobs expected, and whether their fetching stopped without them.
    coming: Mutex<HashMap<Digest, bool>>,
    changed: Condvar,
}

impl Arrivals {
    /// The blobs about to be fetched.
    pub(crate) fn expect<'d>(&self, digests: impl IntoIterator<Item = &'d Digest>) {
        let mut coming = self.coming.lock().expect("arrivals poisoned");
        coming.extend(digests.into_iter().map(|d| (d.clone(), false)));
    }

    /// A blob is in the store.
    pub(crate) fn arrived(&self, digest: &Digest) {
        self.coming
            .lock()
            .expect("arrivals poisoned")
            .remove(digest);
        self.changed.notify_all();
    }

    /// Fetching has stopped: the blobs still expected never come.
    pub(crate) fn stopped(&self) {
        let mut coming = self.coming.lock().expect("arrivals poisoned");
        coming.values_mut().for_each(|failed| *failed = true);
        self.changed.notify_all();
    }

    /// Forgets the blobs that never came (their fetch's error is reported).
    pub(crate) fn clear(&self) {
        self.coming.lock().expect("arrivals poisoned").clear();
    }

    /// Waits until the blob is in the store, if it is on its way; fails if
    /// its fetching stopped without it.
    pub(crate) fn wait(&self, digest: &Digest) -> Result<(), BuildError> {
        let mut coming = self.coming.lock().expect("arrivals poisoned");
        loop {
            let failed = coming.get(digest).copied();
            match failed {
                None => return Ok(()),
                Some(true) => {
                    return Err(BuildError::Layer {
                        layer: digest.clone(),
                        message: "its blob could not be fetched".into(),
                    })
                }
                Some(false) => coming = self.changed.wait(coming).expect("arrivals poisoned"),
            }
        }
    }
}

/// Unpacks stored layers, with scratch space in a build's work dir.
pub(crate) struct Unpacker<'a> {
    pub(crate) sys: &'a dyn Syscalls,
    pub(crate) store: &'a BlobStore,
    pub(crate) work: PathBuf,
    /// The blobs still being fetched, which an unpack waits for.
    pub(crate) arrivals: Arrivals,
    /// Where the metadata table of a layer unpacked from its blob goes,
    /// made from the tar as it is extracted, when the index lacks it: a
    /// later COPY-only step on the layer then reads no blob for it.
    pub(crate) index: &'a Index,
    /// The tables made so.
    pub(crate) tables_made: AtomicUsize,
}

impl Unpacker<'_> {
    /// The unpacked directories of `layers` (bottom first), and how many
    /// were unpacked now: the missing
    /// ones are unpacked in parallel, each alone. A layer with a hard link
    /// into the layers below needs their directories, so it is unpacked
    /// again after them, bottom up, and kept for that stack only (see
    /// `kiln_cachestore::unpacked`).
    pub(crate) fn layer_dirs(
        &self,
        unpacked: &UnpackedLayers,
        layers: &[Layer],
    ) -> Result<(Vec<PathBuf>, usize), BuildError> {
        use rayon::prelude::*;
        let extracted = AtomicUsize::new(0);
        let below = |i: usize| -> Vec<&Digest> { layers[..i].iter().map(|l| &l.diff_id).collect() };
        let alone = layers
            .par_iter()
            .enumerate()
            .map(|(i, layer)| {
                if let Some(dir) = unpacked.get(&layer.diff_id)? {
                    return Ok(Some(dir));
                }
                if let Some(dir) = unpacked.get_stacked(&layer.diff_id, &below(i))? {
                    return Ok(Some(dir));
                }
                let made = self.scratch_dir()?;
                match self.unpack_layer(
                    layer,
                    made.path(),
                    UnpackInto::Dir {
                        lowers: Lowers::Unknown,
                    },
                )? {
                    Some(_) => {
                        extracted.fetch_add(1, Ordering::Relaxed);
                        Ok(Some(unpacked.insert(&layer.diff_id, &made.keep())?))
                    }
                    None => Ok(None),
                }
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let mut dirs = Vec::with_capacity(layers.len());
        for (i, (layer, dir)) in layers.iter().zip(alone).enumerate() {
            let dir = match dir {
                Some(dir) => dir,
                None => {
                    let made = self.scratch_dir()?;
                    let into = UnpackInto::Dir {
                        lowers: Lowers::Dirs(&dirs),
                    };
                    let stats = self
                        .unpack_layer(layer, made.path(), into)?
                        .expect("the layers below are given");
                    extracted.fetch_add(1, Ordering::Relaxed);
                    match stats.copied {
                        0 => unpacked.insert(&layer.diff_id, &made.keep())?,
                        _ => unpacked.insert_stacked(&layer.diff_id, &below(i), &made.keep())?,
                    }
                }
            };
            dirs.push(dir);
        }
        Ok((dirs, extracted.into_inner()))
    }

    /// An empty directory in the work dir to unpack a layer into, removed
    /// unless kept.
    fn scratch_dir(&self) -> Result<tempfile::TempDir, BuildError> {
        tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(&self.work)
            .at(&self.work)
    }

    /// Unpacks one stored layer, checking its diff_id. `None`: a layer
    /// unpacked alone with [`Lowers::Unknown`] links into the layers below.
    pub(crate) fn unpack_layer(
        &self,
        layer: &Layer,
        root: &Path,
        into: UnpackInto,
    ) -> Result<Option<ExtractStats>, BuildError> {
        self.arrivals.wait(&layer.descriptor.digest)?;
        let reader = crate::layer::open_layer(self.store, &layer.descriptor.digest)?;
        let tee = match super::tables::has_table(self.index, layer) {
            true => None,
            false => TableTee::start().ok(),
        };
        let mut teed = TeeReader {
            inner: kiln_cachestore::digest::HashingReader::new(reader),
            tee,
        };
        let stats = match self.sys.extract(&mut teed, root, into) {
            Ok(stats) => stats,
            Err(ExtractError::NeedsLowerLayers { .. }) => return Ok(None),
            Err(e) => {
                return Err(BuildError::Layer {
                    layer: layer.descriptor.digest.clone(),
                    message: e.to_string(),
                })
            }
        };
        let TeeReader {
            inner: hashing,
            tee,
        } = teed;
        let diff_id = hashing
            .finish()
            .map_err(|e| BuildError::io(layer.descriptor.digest.to_string(), e))?;
        if diff_id != layer.diff_id {
            return Err(BuildError::Layer {
                layer: layer.descriptor.digest.clone(),
                message: format!(
                    "diff_id mismatch: config says {}, content is {diff_id}",
                    layer.diff_id
                ),
            });
        }
        // Only now that the content is the layer's.
        if let Some(table) = tee.and_then(TableTee::finish) {
            super::tables::put_table(self.index, layer, &table);
            self.tables_made.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(stats))
    }
}

/// What [`BaseUnpacker::unpack`] did for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseUnpacked {
    /// The image's layers.
    pub layers: usize,
    /// Of those, the ones unpacked now (the rest were unpacked already).
    pub unpacked: usize,
    /// The metadata tables made while unpacking (see [`Unpacker::index`]).
    pub tables: usize,
    pub duration: Duration,
}

/// `kiln warm`'s unpacking: an image's layers put in the state dir's
/// unpacked layers, as the overlay snapshotter's first build on the node
/// would unpack them, so that build unpacks nothing. Safe while builds run
/// on the same state dir: each layer is made in a scratch dir and renamed
/// into place (the first one there stays), and the scratch space is a
/// locked build dir, so `kiln cache gc` leaves unpacked layers alone
/// meanwhile.
pub struct BaseUnpacker<'a> {
    store: &'a BlobStore,
    index: &'a Index,
    unpacked: UnpackedLayers,
    // Dropped last: the unpacker's scratch dirs live in it.
    work: BuildDir,
}

impl<'a> BaseUnpacker<'a> {
    /// Fails with the reason when overlayfs cannot be mounted here (the
    /// overlay snapshotter would not run, so unpacking would be wasted).
    /// The process must be in a mount namespace of its own
    /// ([`crate::enter_private_mount_namespace`]).
    pub fn open(
        state: &StateDir,
        store: &'a BlobStore,
        index: &'a Index,
    ) -> Result<Self, BuildError> {
        let work = state.new_build()?;
        let empty = work.path().join("empty");
        std::fs::create_dir(&empty).at(&empty)?;
        super::probe::overlay_mountable(&Host, state, work.path(), &empty).map_err(|why| {
            BuildError::Invalid(format!("overlayfs cannot be mounted here: {why}"))
        })?;
        Ok(BaseUnpacker {
            store,
            index,
            unpacked: UnpackedLayers::open(state)?,
            work,
        })
    }

    /// Unpacks the layers of `image` (in the store, config and layers)
    /// that are not unpacked yet.
    pub fn unpack(&self, image: &ResolvedManifest) -> Result<BaseUnpacked, BuildError> {
        let start = Instant::now();
        let layers = image_layers(self.store, image)?;
        let unpacker = Unpacker {
            sys: &Host,
            store: self.store,
            work: self.work.path().to_path_buf(),
            arrivals: Arrivals::default(),
            index: self.index,
            tables_made: AtomicUsize::new(0),
        };
        let (_, unpacked) = unpacker.layer_dirs(&self.unpacked, &layers)?;
        Ok(BaseUnpacked {
            layers: layers.len(),
            unpacked,
            tables: unpacker.tables_made.into_inner(),
            duration: start.elapsed(),
        })
    }
}

/// The layers of `image` (its config in the store), each with its diff_id.
pub(super) fn image_layers(
    store: &BlobStore,
    image: &ResolvedManifest,
) -> Result<Vec<Layer>, BuildError> {
    let config = super::image_config(store, image, image.digest.as_ref())?;
    Ok(super::Builder::image_layers(image, &config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_cachestore::digest::sha256;

    #[test]
    fn an_unpack_waits_for_its_blob_only() {
        let arrivals = Arrivals::default();
        let (a, b) = (sha256(b"a"), sha256(b"b"));
        arrivals.expect([&a, &b]);
        // Not on its way: no wait.
        arrivals.wait(&sha256(b"c")).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| arrivals.wait(&a));
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished());
            arrivals.arrived(&a);
            waiter.join().unwrap().unwrap();
            let waiter = s.spawn(|| arrivals.wait(&b));
            arrivals.stopped();
            let err = waiter.join().unwrap().unwrap_err().to_string();
            assert!(err.contains(&b.to_string()), "{err}");
        });
        arrivals.clear();
        arrivals.wait(&b).unwrap();
    }
}
