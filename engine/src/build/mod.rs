//! The builder: walks the plan's stages, materializes each root, runs the
//! steps that change files, turns each change into a layer, and assembles
//! the target stage's image. It emits events and prints nothing.
//!
//! One concern a file:
//! - `mod.rs`: resolving the Dockerfile and bases, and the stage loop;
//! - `roots.rs`: how a stage's root is made (plain tree, overlay mount
//!   point, or the host's `/`) and the trees `COPY --from` reads;
//! - `cache.rs`: which steps use the cache, local and remote lookups, publish;
//! - `blobs.rs`: layer blobs pulled, fetched or made only when needed,
//!   and new ones uploaded as soon as written (`crate::uploads`);
//! - `sources.rs`: what the steps read, identified for their keys
//!   (the keys themselves are `crate::key`);
//! - `steps.rs`: running a stage's steps and writing their layers;
//! - `syscalls.rs`: mounting, unpacking and running, behind a trait;
//! - `unpack.rs`: layers unpacked for the overlay snapshotter, by a build
//!   or ahead of builds (`kiln warm`);
//! - `scratch.rs`: the steps' scratch dirs, removed in the background;
//! - `tables.rs`, `views_ahead.rs`: layers' metadata tables, and later
//!   stages' metadata views made while earlier stages run;
//! - `options.rs`, `events.rs`: what the caller asks and is told.
mod blobs;
mod cache;
mod events;
mod options;
mod probe;
mod roots;
mod scratch;
mod sources;
mod steps;
mod syscalls;
mod tables;
#[cfg(test)]
mod tests;
mod unpack;
mod views_ahead;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, UNIX_EPOCH};

use kiln_cachestore::digest::Digest;
use kiln_cachestore::manifest::ResolvedManifest;
use kiln_cachestore::remote::RemoteCache;
use kiln_cachestore::state::{BuildDir, StateDir};
use kiln_cachestore::{layout, registry, BlobStore, Index, Platform, RegistryClient};

use crate::dockerfile::{self, Dockerfile, StageGraph};
use crate::error::{BuildError, IoContext, StepFailure};
use crate::exec::add::Resolved;
use crate::exec::emulation;
use crate::exec::mounts::SourceRoots;
use crate::exec::run::{EtcFiles, Isolation};
use crate::image::{self, BuiltImage, ImageConfig, Layer};
use crate::key;
use crate::plan::{self, Action, Base, BaseKey, CopyFrom, Plan, Step};
use crate::rootfs::{clean_relative, Recorded};
use crate::uploads::Uploads;
use events::Counters;
use roots::{OnDisk, Roots};
use syscalls::{Host, Syscalls};

pub use crate::exec::mounts::SecretSource;
pub use crate::image::ImageFormat;
pub use events::{CacheResult, Event, StepReport, Summary};
pub use options::{overlay_wanted, BuildOptions, Snapshotter};
pub use tables::{store_layer_tables, TablesStored};
pub use unpack::{BaseUnpacked, BaseUnpacker};

/// Contents of these directories are never committed: they are mounted
/// during RUN.
const SKIP_CONTENTS: &[&str] = &["proc", "sys", "dev"];
const HOSTNAME: &str = "kiln";

/// The result of one stage: its image, and its root when on disk.
struct StageResult {
    on_disk: Option<OnDisk>,
    config: ImageConfig,
    layers: Vec<Layer>,
    /// The key of the stage's last file-changing step (its base's identity
    /// when it has none): what `FROM <stage>` and `COPY --from` chain on.
    last_key: String,
    /// When its newest step was built (seconds since the epoch).
    built: Option<u64>,
}

impl StageResult {
    fn clone_without_root(&self) -> StageResult {
        StageResult {
            on_disk: None,
            config: self.config.clone(),
            layers: self.layers.clone(),
            last_key: self.last_key.clone(),
            built: self.built,
        }
    }
}

/// The stages' base images as resolved, each by reference and platform:
/// manifest and config, read from the store once.
pub struct Bases {
    manifests: HashMap<BaseKey, ResolvedManifest>,
    configs: HashMap<BaseKey, ImageConfig>,
}

/// An image a `COPY --from` reads, put on disk only when a step runs.
struct FetchedImage {
    m: ResolvedManifest,
    config: ImageConfig,
    on_disk: Option<OnDisk>,
}

pub struct Builder<'a> {
    options: &'a BuildOptions,
    store: &'a BlobStore,
    index: &'a Index,
    registry: &'a RegistryClient,
    on_event: &'a (dyn Fn(Event) + Sync),
    counters: Arc<Counters>,
    roots: Roots<'a>,
    /// The remote tier, when `--cache-repo` is given and caching is on.
    remote: Option<RemoteCache>,
    etc: EtcFiles,
    state: StateDir,
    /// ADD's remote sources as keying found them (downloads, commits), so
    /// the step copies exactly what it was keyed by.
    resolved: Mutex<Resolved>,
    /// The paths a layer may hold, for both snapshotters.
    recorded: Recorded,
    /// Where the layer blobs the store lacks come from.
    pending: blobs::Pending,
    /// Where the layer blobs this build writes are uploaded, at once.
    new_layers: blobs::NewLayers,
    /// Later stages' metadata views, made while earlier stages run.
    views_ahead: views_ahead::ViewsAhead,
    /// The uploads under way: the caller's ([`Builder::with_uploads`]),
    /// which it waits for, or the builder's own, which it waits for at the
    /// end (`--cache-repo` entries only: it knows no destination).
    uploads: Uploads,
    own_uploads: bool,
    /// This build's scratch space under the state dir, locked while the
    /// build runs (`kiln cache gc` spares it) and removed on drop, after
    /// everything above that points into it.
    work: BuildDir,
}

impl<'a> Builder<'a> {
    pub fn new(
        options: &'a BuildOptions,
        state: &StateDir,
        store: &'a BlobStore,
        index: &'a Index,
        registry: &'a RegistryClient,
        on_event: &'a (dyn Fn(Event) + Sync),
    ) -> Result<Self, BuildError> {
        static HOST: Host = Host;
        Self::with_syscalls(options, state, store, index, registry, on_event, &HOST)
    }

    /// A builder whose mounts, unpacking and steps go through `sys`.
    pub(crate) fn with_syscalls(
        options: &'a BuildOptions,
        state: &StateDir,
        store: &'a BlobStore,
        index: &'a Index,
        registry: &'a RegistryClient,
        on_event: &'a (dyn Fn(Event) + Sync),
        sys: &'a dyn Syscalls,
    ) -> Result<Self, BuildError> {
        let work = state.new_build()?;
        let etc = EtcFiles::create(&work.path().join("etc"), HOSTNAME).at(work.path())?;
        let remote = match &options.cache_repo {
            Some(repo) if options.cache => Some(RemoteCache::new(registry, repo)?),
            _ => None,
        };
        // `--isolation none`: what clearing and unpacking over `/` spare,
        // which no snapshot records either, plus this build's work dir.
        let (ignored, host_keep) = match options.isolation {
            Isolation::None => {
                let kept = crate::host::kept_paths(
                    state.path(),
                    &options.context,
                    &options.host_files,
                    &options.ignore_paths,
                )
                .map_err(|e| BuildError::Invalid(e.to_string()))?;
                let mut keep = kept.clone();
                keep.extend(SKIP_CONTENTS.iter().map(PathBuf::from));
                keep.push(clean_relative(work.path()));
                (kept, keep)
            }
            _ => (options.ignore_paths.clone(), Vec::new()),
        };
        let counters = Arc::new(Counters::default());
        let roots = Roots::new(
            sys,
            store,
            index,
            options,
            on_event,
            counters.clone(),
            state.clone(),
            work.path(),
            host_keep,
        )?;
        Ok(Self {
            options,
            store,
            index,
            registry,
            on_event,
            counters,
            roots,
            remote,
            etc,
            state: state.clone(),
            resolved: Default::default(),
            recorded: Recorded::new(SKIP_CONTENTS, &ignored),
            pending: Default::default(),
            new_layers: Default::default(),
            views_ahead: Default::default(),
            uploads: Uploads::new(registry, store, Vec::new()),
            own_uploads: true,
            work,
        })
    }

    /// Uploads new layers and `--cache-repo` entries through `uploads`,
    /// which the caller waits for ([`Uploads::finish`]) before it pushes a
    /// manifest, instead of at the end of [`Builder::build`].
    pub fn with_uploads(mut self, uploads: &Uploads) -> Self {
        self.uploads = uploads.clone();
        self.own_uploads = false;
        self
    }

    fn dockerfile_error(&self, e: dockerfile::FrontendError) -> BuildError {
        BuildError::Dockerfile {
            file: self.options.dockerfile_name.clone(),
            line: e.line,
            message: e.message,
        }
    }

    fn step_error(&self, step: &Step, failure: impl Into<StepFailure>) -> BuildError {
        BuildError::Step {
            file: self.options.dockerfile_name.clone(),
            line: step.line,
            instruction: step.keyword.clone(),
            failure: Box::new(failure.into()),
        }
    }

    /// Parses and resolves the Dockerfile, fetches the base images' configs
    /// and plans every step.
    pub async fn resolve(&self) -> Result<(Dockerfile, Plan, Bases), BuildError> {
        let opts = self.options;
        let df = dockerfile::parse(&opts.dockerfile).map_err(|e| self.dockerfile_error(e))?;
        let graph = StageGraph::resolve(
            &df,
            &opts.build_args,
            opts.target.as_deref(),
            &(&opts.platform).into(),
        )
        .map_err(|e| self.dockerfile_error(e))?;
        let mut manifests = HashMap::new();
        let mut configs = HashMap::new();
        for stage in graph.stages.iter().filter(|s| s.needed) {
            if let dockerfile::BaseRef::Image(reference) = &stage.base_ref {
                // Each stage's base for the stage's platform: a build for
                // arm64 takes the arm64 image of an index, and a
                // `FROM --platform=$BUILDPLATFORM` stage the host's.
                let platform = plan::stage_platform(&graph, stage.index, &opts.platform);
                let key = (reference.clone(), platform);
                if manifests.contains_key(&key) {
                    continue;
                }
                let (m, config) = self.fetch_image(reference, &key.1).await?;
                configs.insert(key.clone(), config);
                manifests.insert(key, m);
            }
        }
        let plan = plan::plan(&df, &graph, &configs, &opts.platform, &opts.labels)
            .map_err(|e| self.dockerfile_error(e))?;
        for w in &plan.warnings {
            (self.on_event)(Event::Warning {
                line: w.line,
                message: w.message.clone(),
            });
        }
        Ok((df, plan, Bases { manifests, configs }))
    }

    /// Resolves an image reference (registry or `oci-layout://`) to its
    /// manifest and config; the blobs land in the store.
    async fn fetch_image(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<(ResolvedManifest, ImageConfig), BuildError> {
        let base_error = |source| BuildError::BaseImage {
            reference: reference.to_string(),
            source: Box::new(source),
        };
        let m = if let Some(spec) = reference.strip_prefix("oci-layout://") {
            let (path, tag) = layout::split_layout_reference(spec);
            layout::import(Path::new(path), tag, platform, self.store).map_err(base_error)?
        } else {
            let r = registry::parse_reference(reference).map_err(base_error)?;
            self.registry.relax_for_pull(
                r.resolve_registry(),
                self.options.insecure_pull,
                self.options.skip_tls_verify_pull,
            );
            kiln_cachestore::warm::resolve_base(
                self.registry,
                self.store,
                self.index,
                &r,
                platform,
                self.options.cache_ttl,
            )
            .await
            .map_err(base_error)?
        };
        let config = image_config(self.store, &m, reference)?;
        (self.on_event)(Event::Pulled {
            reference: reference.to_string(),
            digest: m.digest.clone(),
        });
        Ok((m, config))
    }

    /// The layers of a fetched image, with their diff_ids.
    fn image_layers(m: &ResolvedManifest, config: &ImageConfig) -> Vec<Layer> {
        m.manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(d, diff_id)| Layer {
                descriptor: d.clone(),
                diff_id: diff_id.clone(),
            })
            .collect()
    }

    /// An image's layer blobs, to fetch from its registry (blobs already
    /// stored cost nothing; an `oci-layout://` image has them all).
    fn image_fetches(reference: &str, m: &ResolvedManifest) -> Vec<(Digest, blobs::BlobSource)> {
        if reference.starts_with("oci-layout://") {
            return Vec::new(); // imported with the manifest
        }
        let source = blobs::BlobSource::Base(reference.to_string());
        m.manifest
            .layers
            .iter()
            .map(|l| (l.digest.clone(), source.clone()))
            .collect()
    }

    /// Builds every needed stage and assembles the target's image.
    ///
    /// Each stage first computes the cache keys of all its steps and looks
    /// them all up. A stage whose steps all hit is never put on disk: its
    /// image is the base's layers plus the cached ones. Otherwise its root
    /// is made (see `roots.rs`) and the steps from there run, a later hit
    /// unpacking its layer instead. Blobs are pulled, fetched or made only
    /// for what is unpacked and for the target's image (`blobs.rs`).
    ///
    /// Unpacking and running steps block; on a multi-thread runtime the
    /// worker hands its other tasks off first ([`blocking`]).
    ///
    /// The stages' index entries are written at the end, in one batch,
    /// failed or not.
    pub async fn build(&self) -> Result<BuiltImage, BuildError> {
        let built = self.build_stages().await;
        // The steps are done, and what runs them goes with them.
        self.roots.sys().runs_done();
        let flushed = self.index.flush();
        let built = built?;
        flushed?;
        Ok(built)
    }

    async fn build_stages(&self) -> Result<BuiltImage, BuildError> {
        let start = Instant::now();
        let (_df, plan, bases) = self.resolve().await?;
        self.counters.timed("resolve", start);
        let mut results: HashMap<usize, StageResult> = HashMap::new();
        let mut images: HashMap<String, FetchedImage> = HashMap::new();
        let last_use = plan.last_uses();
        let in_image = in_target_image(&plan);
        // Filling `--cache-repo` needs every new layer's blob.
        let remote_push = self.remote.is_some() && self.options.cache_repo_push;
        // Keys that hit, recorded once at the end as used, for `kiln cache gc`.
        let mut used: Vec<String> = Vec::new();
        // Every image a step reads, up front: with `--isolation none` the
        // files a registry client starts from (TLS roots, credential
        // helpers) are replaced once the first stage is unpacked.
        let reads = plan
            .stages
            .iter()
            .filter(|s| s.needed)
            .flat_map(|s| s.steps.iter().flat_map(|step| step.action.reads()));
        for from in reads {
            if let CopyFrom::Image(reference) = from {
                if !images.contains_key(reference) {
                    let (m, config) = self.fetch_image(reference, &self.options.platform).await?;
                    let on_disk = None;
                    images.insert(reference.clone(), FetchedImage { m, config, on_disk });
                }
            }
        }
        // Roots no later stage reads, freed as the next stage starts, or
        // once the image is assembled and its config on its way.
        let mut unread: Vec<OnDisk> = Vec::new();
        for stage in plan.stages.iter().filter(|s| s.needed) {
            unread
                .drain(..)
                .for_each(|tree| self.roots.remove_later(tree));
            // A failed upload stops the build here, not at the end.
            self.uploads.failed()?;
            let emulated = !emulation::native(&stage.platform);
            (self.on_event)(Event::Stage {
                index: stage.index,
                name: stage.name.clone(),
                base: stage.base_display.clone(),
                platform: stage.platform.to_string(),
                emulated,
            });
            let mut result = match &stage.base {
                Base::Scratch => StageResult {
                    on_disk: None,
                    config: ImageConfig::default(),
                    layers: Vec::new(),
                    last_key: "scratch".into(),
                    built: None,
                },
                Base::Image(reference) => {
                    let key = (reference.clone(), stage.platform.clone());
                    let (m, config) = (&bases.manifests[&key], bases.configs[&key].clone());
                    if !reference.starts_with("oci-layout://") {
                        for layer in &m.manifest.layers {
                            let source = blobs::BlobSource::Base(reference.clone());
                            self.pending.add(&layer.digest, source);
                        }
                    }
                    StageResult {
                        on_disk: None,
                        layers: Self::image_layers(m, &config),
                        config,
                        last_key: m.digest.to_string(),
                        built: None,
                    }
                }
                Base::Stage(parent) => results[parent].clone_without_root(),
            };
            let start = Instant::now();
            let sources = sources::StageSources {
                builder: self,
                stages: &results,
                images: &images,
            };
            // The stage's platform is in every key: two platforms share an
            // entry only where a stage builds for the same one.
            let platform = stage.platform.to_string();
            let keys =
                blocking(|| key::step_keys(&stage.steps, &result.last_key, &platform, &sources))?;
            let hits = self.lookup(stage, &keys)?;
            let mut hits = self.lookup_remote(stage, &keys, hits).await?;
            used.extend(
                keys.iter()
                    .zip(&hits)
                    .filter_map(|(k, h)| k.clone().filter(|_| h.is_some())),
            );
            self.counters.timed("lookup", start);
            let fully_cached = keys
                .iter()
                .zip(&hits)
                .all(|(k, h)| k.is_none() || h.is_some());
            if !fully_cached {
                self.views_ahead_of(&plan, stage.index, &bases);
                // A RUN that will run for another architecture needs QEMU
                // registered so that it works inside the root.
                let runs =
                    stage.steps.iter().zip(&hits).find(|(step, hit)| {
                        hit.is_none() && matches!(step.action, Action::Run { .. })
                    });
                if let (true, Some((step, _))) = (emulated, runs) {
                    emulation::check(&stage.platform, Path::new(emulation::BINFMT_MISC))
                        .map_err(|e| self.step_error(step, e))?;
                }
                // Put on disk what this stage reads: its base, its hits and
                // its COPY sources, their blobs first (the base's while its
                // root is made, below).
                let base_fetches = self.missing_blobs(&mut result.layers, true)?;
                let mut hit_layers: Vec<Layer> = hits
                    .iter()
                    .flatten()
                    .filter_map(|h| h.layer.clone())
                    .collect();
                self.ensure_blobs(&mut hit_layers, true).await?;
                let hit_slots = hits.iter_mut().flatten().filter_map(|h| h.layer.as_mut());
                for (slot, layer) in hit_slots.zip(hit_layers) {
                    *slot = layer;
                }
                // A stage whose misses the metadata view may all serve is
                // put on disk only if one turns out to need it (`run_steps`);
                // one with a RUN to run is unpacked now, as its COPY layers
                // would otherwise be written, then unpacked.
                let deferred = self.view_allowed()
                    && stage
                        .steps
                        .iter()
                        .zip(&keys)
                        .zip(&hits)
                        .all(|((step, k), h)| {
                            k.is_none() || h.is_some() || steps::view_serves(step)
                        });
                if deferred {
                    // The metadata view reads the base's blobs.
                    self.fetch_blobs(&base_fetches, None).await?;
                } else {
                    // Each base layer unpacks as soon as its blob is in:
                    // onto the root, or with the overlay snapshotter into
                    // its own directory, which the steps then stack.
                    let layers = &result.layers;
                    let root = self
                        .fetch_while(base_fetches, || {
                            let root =
                                self.roots
                                    .stage_root(stage, layers, &mut results, &last_use)?;
                            if let Some(unpacked) = self.roots.unpacked()? {
                                self.roots.layer_dirs(unpacked, layers)?;
                            }
                            Ok(root)
                        })
                        .await?;
                    result.on_disk = Some(root);
                }
                for from in stage.steps.iter().flat_map(|s| s.action.reads()) {
                    match from {
                        CopyFrom::Stage(i) => {
                            let source = results.get_mut(i).expect("source stage built");
                            if source.on_disk.is_none() {
                                self.ensure_blobs(&mut source.layers, true).await?;
                                let dir = self.work.path().join(format!("stage-{i}"));
                                let tree =
                                    blocking(|| self.roots.materialize(&source.layers, dir))?;
                                source.on_disk = Some(tree);
                            }
                        }
                        CopyFrom::Image(reference) => {
                            let image = images.get_mut(reference).expect("fetched above");
                            if image.on_disk.is_none() {
                                let dir = self
                                    .work
                                    .path()
                                    .join(format!("image-{}", image.m.digest.digest()));
                                let fetches = Self::image_fetches(reference, &image.m);
                                let layers = Self::image_layers(&image.m, &image.config);
                                let tree = self
                                    .fetch_while(fetches, || self.roots.materialize(&layers, dir))
                                    .await?;
                                image.on_disk = Some(tree);
                            }
                        }
                        CopyFrom::Context | CopyFrom::Inline(_) => {}
                    }
                }
            }
            let reads = SourceRoots {
                stages: results
                    .iter()
                    .filter_map(|(i, r)| r.on_disk.as_ref().map(|d| (*i, d.dir.clone())))
                    .collect(),
                images: images
                    .iter()
                    .filter_map(|(r, i)| i.on_disk.as_ref().map(|d| (r.clone(), d.dir.clone())))
                    .collect(),
            };
            // A copy from a stage built again may find what it copied
            // before by its content.
            let by_content = match fully_cached {
                true => Vec::new(),
                false => {
                    let first = &result.last_key;
                    self.hits_by_content(stage, &keys, first, &mut hits, &reads)
                        .await?
                }
            };
            used.extend(
                by_content
                    .iter()
                    .flatten()
                    .filter(|c| c.hit())
                    .map(|c| c.key.clone()),
            );
            let lazy = !remote_push && !in_image.contains(&stage.index);
            // The stage's root, made late: its base as `stage_root` makes
            // it, then the layers the steps before added.
            let at_start = result.layers.len();
            let mut make_root = |layers: &[Layer]| {
                let root =
                    self.roots
                        .stage_root(stage, &layers[..at_start], &mut results, &last_use)?;
                if self.roots.unpacked()?.is_none() {
                    for layer in &layers[at_start..] {
                        self.roots.unpack_onto(layer, &root.dir)?;
                    }
                }
                Ok(root)
            };
            self.new_layers.stage(in_image.contains(&stage.index));
            let entries = blocking(|| {
                self.run_steps(
                    stage,
                    &mut result,
                    &keys,
                    &hits,
                    &reads,
                    lazy,
                    &mut make_root,
                )
            })?;
            self.publish(&entries);
            let by_content = cache::content_entries(&keys, &by_content, &entries);
            self.index.defer_steps(&by_content)?;
            self.publish(&by_content);
            // The roots nobody reads any more.
            let done: Vec<usize> = results
                .keys()
                .copied()
                .filter(|i| last_use.get(i).is_none_or(|last| *last <= stage.index))
                .collect();
            unread.extend(done.iter().filter_map(|i| results.remove(i)?.on_disk));
            results.insert(stage.index, result);
        }
        self.index.touch_steps(&used)?;
        let mut target = results
            .remove(&plan.target)
            .ok_or_else(|| BuildError::Invalid("the target stage was not built".into()))?;
        self.ensure_blobs(&mut target.layers, false).await?;
        if self.own_uploads {
            self.uploads.finish().await?;
        }
        (self.on_event)(Event::Summary(self.counters.summary()));
        let created = self.created(target.built);
        let image = image::assemble(
            self.store,
            self.options.image_format,
            target.config,
            target.layers,
            created,
        )?;
        self.uploads.config(&image);
        unread
            .into_iter()
            .for_each(|tree| self.roots.remove_later(tree));
        Ok(image)
    }

    /// Starts making, on another thread, the metadata views that the
    /// stages after `current` would be built on: those from an image whose
    /// steps the view may all serve. A miss here makes theirs likely, as
    /// they most often copy from this one.
    fn views_ahead_of(&self, plan: &Plan, current: usize, bases: &Bases) {
        if !self.view_allowed() {
            return;
        }
        for stage in plan.stages.iter().filter(|s| s.needed && s.index > current) {
            let Base::Image(reference) = &stage.base else {
                continue;
            };
            let served = stage
                .steps
                .iter()
                .all(|s| matches!(s.action, Action::Config) || steps::view_serves(s));
            let key = (reference.clone(), stage.platform.clone());
            let base = bases.manifests.get(&key).zip(bases.configs.get(&key));
            if let (true, Some((m, config))) = (served, base) {
                self.views_ahead
                    .start(self.index, Self::image_layers(m, config));
            }
        }
    }

    /// Whether COPY and WORKDIR misses may be built on the metadata view:
    /// asked for, with a layer per step, on a root of Kiln's own.
    fn view_allowed(&self) -> bool {
        let o = self.options;
        o.copy_view && !o.single_snapshot && o.isolation != Isolation::None
    }

    /// A timestamp for the image: `--reproducible`'s fixed time, else
    /// `secs` (when a cached step was built), else now.
    fn created(&self, secs: Option<u64>) -> String {
        let secs = self
            .options
            .fixed_time
            .or(secs)
            .unwrap_or_else(kiln_cachestore::index::now_secs);
        humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .to_string()
    }
}

/// The config of a resolved image, from the store, checked to list a
/// diff_id per layer; `what` names the image in errors.
fn image_config(
    store: &BlobStore,
    m: &ResolvedManifest,
    what: &str,
) -> Result<ImageConfig, BuildError> {
    let bytes = store.read(&m.manifest.config.digest)?;
    let config: ImageConfig = serde_json::from_slice(&bytes).map_err(|e| BuildError::Layer {
        layer: m.manifest.config.digest.clone(),
        message: format!("invalid image config of {what}: {e}"),
    })?;
    if config.rootfs.diff_ids.len() != m.manifest.layers.len() {
        return Err(BuildError::Invalid(format!(
            "{what}: the config lists {} diff_ids for {} layers",
            config.rootfs.diff_ids.len(),
            m.manifest.layers.len()
        )));
    }
    Ok(config)
}

/// The target stage and the stages it is built `FROM`: their layers are
/// the image's.
fn in_target_image(plan: &Plan) -> std::collections::HashSet<usize> {
    let mut chain = std::collections::HashSet::new();
    let mut at = Some(plan.target);
    while let Some(i) = at.filter(|i| chain.insert(*i)) {
        at = plan
            .stages
            .iter()
            .find(|s| s.index == i)
            .and_then(|s| match s.base {
                Base::Stage(parent) => Some(parent),
                _ => None,
            });
    }
    chain
}

/// Runs blocking work (keying, unpacking, running steps) from the async
/// stage loop. On a multi-thread runtime the worker first hands its other
/// tasks off (`block_in_place`, which panics on a current-thread runtime);
/// on a current-thread runtime nothing else is waiting, so it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl From<&Platform> for dockerfile::Platform {
    fn from(p: &Platform) -> Self {
        dockerfile::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        }
    }
}
