//! Blob uploads in the background, while the build goes on: each new layer
//! to every destination as soon as its blob is in the store, and to
//! `--cache-repo`, whose entries are written once their layer is there.
//!
//! The build waits only where it must: [`Uploads::finish`] before a
//! destination's manifest is pushed (a registry takes a manifest only once
//! it has its blobs, and a failed upload must leave no tag), and at the end.
//! At most [`CONCURRENT`] uploads move at once; one (repository, blob) is
//! uploaded once, however often it is asked for.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use kiln_cachestore::digest::Digest;
use kiln_cachestore::registry::{repository_id, Made};
use kiln_cachestore::remote::RemoteCache;
use kiln_cachestore::{BlobStore, CacheStoreError, Reference, RegistryClient, StepEntry};
use tokio::sync::Semaphore;

use crate::error::BuildError;

/// Uploads moving at once: enough to overlap round trips and keep a link
/// busy, few enough that one large layer is not starved of bandwidth.
pub const CONCURRENT: usize = 4;

/// Why an upload failed: what it was, and the registry's error (none when
/// the task itself died).
#[derive(Debug, Clone)]
struct Failed {
    what: String,
    cause: Option<Arc<CacheStoreError>>,
}

impl From<Failed> for BuildError {
    fn from(f: Failed) -> Self {
        match f.cause {
            Some(source) => BuildError::Upload {
                what: f.what,
                source,
            },
            None => BuildError::Invalid(format!("upload of {} stopped unfinished", f.what)),
        }
    }
}

/// What a blob upload sends.
#[derive(Clone, Copy)]
enum Blob {
    /// A layer this build made, asked about beside its upload session: a
    /// registry may have it (made alike before).
    Layer,
    /// An image's config, sent unasked: the image is new (see
    /// [`Uploads::config`]).
    Config,
    /// A `--cache-repo` entry's config (the entry), asked about first.
    Entry,
}

impl Blob {
    fn name(self) -> &'static str {
        match self {
            Blob::Layer => "layer",
            Blob::Config => "config",
            Blob::Entry => "cache entry",
        }
    }
}

/// One upload under way (or done), awaitable by any number of waiters.
type Upload = Shared<BoxFuture<'static, Result<(), Failed>>>;

/// The background uploads of one `kiln build` (all its platforms).
/// Cheap to clone: clones share the uploads.
#[derive(Clone)]
pub struct Uploads {
    inner: Arc<Inner>,
}

struct Inner {
    registry: RegistryClient,
    store: BlobStore,
    /// Where new layers go: the destinations, when the build pushes.
    destinations: Vec<Reference>,
    limit: Arc<Semaphore>,
    state: Mutex<State>,
    /// Failures as they happen, seen by [`Uploads::failed`] while the
    /// build goes on.
    failures: Arc<Mutex<Vec<Failed>>>,
}

#[derive(Default)]
struct State {
    /// Blob uploads by (repository, digest).
    blobs: HashMap<(String, Digest), Upload>,
    /// Every upload and entry write, in the order they were asked for.
    all: Vec<Upload>,
}

impl Uploads {
    /// Uploads that send new layers to `destinations` (none: `--no-push`,
    /// or a build that only fills `--cache-repo`).
    pub fn new(registry: &RegistryClient, store: &BlobStore, destinations: Vec<Reference>) -> Self {
        Uploads {
            inner: Arc::new(Inner {
                registry: registry.clone(),
                store: store.clone(),
                destinations,
                limit: Arc::new(Semaphore::new(CONCURRENT)),
                state: Mutex::default(),
                failures: Arc::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("uploads poisoned")
    }

    /// Starts uploading a new layer's blob to every destination.
    pub(crate) fn layer(&self, digest: &Digest) {
        for to in &self.inner.destinations {
            self.blob(to, digest);
        }
    }

    /// Starts uploading `image`'s config, unasked, to every destination
    /// that a layer of it is uploading to: an image with a new layer is
    /// new, and so is its config. It starts once the image is assembled,
    /// so it moves while the build cleans up.
    pub fn config(&self, image: &crate::image::BuiltImage) {
        for to in &self.inner.destinations {
            let fresh = image
                .layers
                .iter()
                .any(|l| self.started(to, &l.descriptor.digest));
            if fresh {
                let _started = self.upload(to, &image.config.digest, Blob::Config);
            }
        }
    }

    /// Opens an upload session on every destination for a blob to come
    /// (`RegistryClient::open_upload_ahead`).
    pub(crate) fn open_ahead(&self) {
        for to in &self.inner.destinations {
            self.inner.registry.open_upload_ahead(to);
        }
    }

    /// Starts uploading `digest` from the store to `to`'s repository,
    /// unless that was asked already. Must be called on a Tokio runtime.
    pub(crate) fn blob(&self, to: &Reference, digest: &Digest) {
        let _started = self.upload(to, digest, Blob::Layer);
    }

    /// The upload of `digest` to `to`'s repository, started now unless it
    /// already was.
    fn upload(&self, to: &Reference, digest: &Digest, blob: Blob) -> Upload {
        let id = (repository_id(to), digest.clone());
        let mut state = self.state();
        if let Some(upload) = state.blobs.get(&id) {
            return upload.clone();
        }
        let what = format!("{} {digest} to {}", blob.name(), id.0);
        let (registry, store) = (self.inner.registry.clone(), self.inner.store.clone());
        let (limit, to, digest) = (self.inner.limit.clone(), to.clone(), digest.clone());
        let task = async move {
            // Never closed; without a permit it would merely not wait.
            let _permit = limit.acquire_owned().await.ok();
            match blob {
                Blob::Layer => {
                    registry
                        .push_made_blob(&to, &digest, &store, Made::Layer)
                        .await
                }
                Blob::Entry => registry.push_blob(&to, &digest, &store).await,
                Blob::Config => {
                    registry
                        .push_made_blob(&to, &digest, &store, Made::Config)
                        .await
                }
            }
        };
        let upload = self.spawned(what, task);
        state.blobs.insert(id, upload.clone());
        state.all.push(upload.clone());
        upload
    }

    /// Writes a `--cache-repo` entry once its blobs are there: the layer
    /// and the entry as config are uploaded (or join their uploads under
    /// way), then the manifest. Entries alike (a RUN and a `COPY --from`
    /// of what it made, in the same second) share their config: two
    /// uploads of it at once made the registry fail a manifest naming it.
    pub(crate) fn entry(&self, remote: &RemoteCache, key: &str, entry: &StepEntry) {
        let what = format!("cache entry {key} in {}", repository_id(remote.repo()));
        let config = match remote.entry_config(entry, &self.inner.store) {
            Ok(config) => config,
            Err(e) => {
                let failed = self.spawned(what, async move { Err(e) });
                self.state().all.push(failed);
                return;
            }
        };
        let blobs: Vec<Upload> = entry
            .layer
            .iter()
            .map(|l| self.upload(remote.repo(), &l.descriptor.digest, Blob::Layer))
            .chain([self.upload(remote.repo(), &config.digest, Blob::Entry)])
            .collect();
        let (remote, key, entry) = (remote.clone(), key.to_string(), entry.clone());
        let limit = self.inner.limit.clone();
        let task = async move {
            // Their own failures are reported by the blobs' uploads.
            for blob in blobs {
                if blob.await.is_err() {
                    return Ok(());
                }
            }
            // Taken after the blobs are there: an entry holding a permit
            // while it waits could leave none for the blobs it waits on.
            let _permit = limit.acquire_owned().await.ok();
            remote.put_entry(&key, &entry, config).await
        };
        let upload = self.spawned(what, task);
        self.state().all.push(upload);
    }

    /// Whether these uploads started uploading `digest` to `to`'s
    /// repository: a push awaits them ([`Self::finish`]) instead of asking
    /// the registry.
    pub fn started(&self, to: &Reference, digest: &Digest) -> bool {
        let id = (repository_id(to), digest.clone());
        self.state().blobs.contains_key(&id)
    }

    /// The first upload to have failed so far, if one has: the build stops
    /// there rather than at the end.
    pub(crate) fn failed(&self) -> Result<(), BuildError> {
        let failures = self.inner.failures.lock().expect("uploads poisoned");
        match failures.first() {
            Some(failed) => Err(failed.clone().into()),
            None => Ok(()),
        }
    }

    /// Waits for every upload asked for so far (and any they start), then
    /// returns the first failure, in the order they were asked for.
    pub async fn finish(&self) -> Result<(), BuildError> {
        let mut waited = 0;
        let mut first = None;
        loop {
            let pending: Vec<Upload> = self.state().all[waited..].to_vec();
            if pending.is_empty() {
                break;
            }
            waited += pending.len();
            let done = futures_util::future::join_all(pending).await;
            first = first.or(done.into_iter().find_map(Result::err));
        }
        match first {
            Some(failed) => Err(failed.into()),
            None => Ok(()),
        }
    }

    /// Runs `task` on the runtime at once (it goes on while the caller
    /// blocks in a step), as an upload any number of waiters can await.
    fn spawned(
        &self,
        what: String,
        task: impl std::future::Future<Output = Result<(), CacheStoreError>> + Send + 'static,
    ) -> Upload {
        let failures = self.inner.failures.clone();
        let handle = tokio::spawn(async move {
            let result = task.await.map_err(|e| Failed {
                what,
                cause: Some(Arc::new(e)),
            });
            if let Err(failed) = &result {
                let mut failures = failures.lock().expect("uploads poisoned");
                failures.push(failed.clone());
            }
            result
        });
        async move {
            handle.await.unwrap_or_else(|e| {
                Err(Failed {
                    what: format!("a background upload ({e})"),
                    cause: None,
                })
            })
        }
        .boxed()
        .shared()
    }
}
