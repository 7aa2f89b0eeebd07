//! The builder: walks the plan's stages, materializes each root, runs the
//! steps that change files, turns each change into a layer, and assembles
//! the target stage's image. It emits events and prints nothing.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use kiln_cachestore::manifest::{self, Descriptor, ResolvedManifest};
use kiln_cachestore::remote::RemoteCache;
use kiln_cachestore::state::{BuildDir, CacheMount, StateDir};
use kiln_cachestore::unpacked::UnpackedLayers;
use kiln_cachestore::{layout, registry, BlobStore, Index, Platform, RegistryClient, StepEntry};

use crate::dockerfile::MountType;
use crate::dockerfile::{self, Dockerfile, StageGraph};
use crate::error::{BuildError, IoContext};
use crate::exec::copy::{self, CopyRequest, Source};
use crate::exec::run::{self, EtcFiles, MountPoints, RunSpec, StepMount};
use crate::exec::users;
use crate::image::{self, History, ImageConfig, Layer};
use crate::key;
use crate::layer::{Compression, LayerWriter};
use crate::output::BuiltImage;
use crate::plan::{self, Action, Base, CopyFrom, Network, Plan, PlannedMount, StagePlan, Step};
use crate::rootfs::overlay::{self, Mounted};
use crate::rootfs::snapshot::{Changes, Snapshot, SnapshotMode};
use crate::rootfs::{
    clean_relative, create_dir_all_in_root, extract, relative_to_root, resolve_in_root, Recorded,
};

/// Contents of these directories are never committed: they are mounted
/// during RUN.
const SKIP_CONTENTS: &[&str] = &["proc", "sys", "dev"];
const HOSTNAME: &str = "kiln";
/// The root every stage is built in with `--isolation none`.
const HOST_ROOT: &str = "/";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The Dockerfile's name as the user gave it, for messages.
    pub dockerfile_name: String,
    pub dockerfile: String,
    pub context: PathBuf,
    /// `.dockerignore` rules for the context (empty: nothing excluded).
    pub dockerignore: crate::context::Ignore,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    pub platform: Platform,
    pub compression: Compression,
    /// Fixed timestamps (`--reproducible`): this many seconds since the epoch.
    pub fixed_time: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// Base images may be pulled over plain HTTP.
    pub insecure_pull: bool,
    pub snapshot_mode: SnapshotMode,
    /// Relative paths (inside the root) no snapshot records.
    pub ignore_paths: Vec<PathBuf>,
    /// One layer per stage instead of one per step.
    pub single_snapshot: bool,
    /// Use and fill the local cache (`--cache`).
    pub cache: bool,
    /// Entries older than this are misses (`--cache-ttl`).
    pub cache_ttl: std::time::Duration,
    pub cache_run_layers: bool,
    pub cache_copy_layers: bool,
    pub image_format: ImageFormat,
    /// How a RUN's changes are found (`--snapshotter`).
    pub snapshotter: Snapshotter,
    /// The process is in a mount namespace of its own
    /// (`rootfs::overlay::enter_private_mount_namespace`): the overlay
    /// snapshotter mounts only then, so a crash leaves no mount on the host.
    pub own_mount_namespace: bool,
    /// How RUN steps are isolated (`--isolation`).
    pub isolation: run::Isolation,
    /// The remote cache tier (`--cache-repo`), `registry/repository`.
    pub cache_repo: Option<String>,
    /// Push new entries to the remote tier (not with `--no-push-cache`).
    pub cache_repo_push: bool,
    /// Base images' registries may present any certificate.
    pub skip_tls_verify_pull: bool,
    /// `--secret`s by id, for `RUN --mount=type=secret`.
    pub secrets: BTreeMap<String, SecretSource>,
}

/// How a RUN's changes are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Snapshotter {
    /// Walk the root and compare it with the state before the step.
    #[default]
    Walk,
    /// Run the step on an overlay and take its upper dir: the cost grows
    /// with what changed, not with the root.
    Overlay,
    /// Overlay where overlayfs can be mounted, else walk.
    Auto,
}

/// The manifest format of the built image (`--image-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    #[default]
    Oci,
    /// Docker schema 2, for registries and tools that want it.
    Docker,
}

/// Where a `--secret` comes from; read only when a step mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// What the builder reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Warning {
        line: usize,
        message: String,
    },
    Stage {
        index: usize,
        name: Option<String>,
        base: String,
    },
    Pulled {
        reference: String,
        digest: String,
    },
    Step {
        line: usize,
        text: String,
    },
    Layer {
        digest: String,
        size: u64,
    },
    CacheHit {
        line: usize,
    },
    Summary(Summary),
}

/// A step found in the cache: its layer (none when it changed no file)
/// and when it was first built, which its history keeps, so a rebuild that
/// only hits gives the same image.
#[derive(Debug, Clone)]
struct Hit {
    layer: Option<Layer>,
    created: u64,
}

/// The result of one stage: its image, and its root when on disk.
struct StageResult {
    root: Option<PathBuf>,
    /// With the overlay snapshotter, the read-only overlay at `root`.
    view: Option<Mounted>,
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
            root: None,
            view: None,
            config: self.config.clone(),
            layers: self.layers.clone(),
            last_key: self.last_key.clone(),
            built: self.built,
        }
    }
}

/// An image a `COPY --from` reads, unpacked only when a step runs.
struct FetchedImage {
    m: ResolvedManifest,
    config: ImageConfig,
    root: Option<PathBuf>,
    view: Option<Mounted>,
}

/// Counts for the build summary.
#[derive(Default)]
struct Counters {
    hits: AtomicUsize,
    remote_hits: AtomicUsize,
    misses: AtomicUsize,
    unpacked: AtomicUsize,
    /// Wall time per phase, in the order phases first ran.
    phases: std::sync::Mutex<Vec<(&'static str, Duration)>>,
}

impl Counters {
    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    fn extracted(&self, layers: usize) {
        self.unpacked.fetch_add(layers, Ordering::Relaxed);
    }

    /// Adds the time since `start` to `phase`.
    fn timed(&self, phase: &'static str, start: Instant) {
        let elapsed = start.elapsed();
        let mut phases = self.phases.lock().expect("phase timer poisoned");
        match phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += elapsed,
            None => phases.push((phase, elapsed)),
        }
    }

    fn summary(&self) -> Summary {
        Summary {
            phases: self.phases.lock().expect("phase timer poisoned").clone(),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            remote_hits: self.remote_hits.load(Ordering::Relaxed),
            layers_unpacked: self.unpacked.load(Ordering::Relaxed),
        }
    }
}

/// What a build did, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Steps whose result came from the cache.
    pub cache_hits: usize,
    /// Steps that ran.
    pub cache_misses: usize,
    /// Layers unpacked onto a root (0 for a fully cached build).
    pub layers_unpacked: usize,
    /// Of the hits, those found in the remote tier (`--cache-repo`).
    pub remote_hits: usize,
    /// Wall time per phase: resolve (Dockerfile, base manifests), lookup
    /// (keys, local and remote), unpack, run (steps and their snapshots),
    /// layers (tar + compress), in the order they first ran.
    pub phases: Vec<(&'static str, Duration)>,
}

pub struct Builder<'a> {
    options: &'a BuildOptions,
    store: &'a BlobStore,
    index: &'a Index,
    registry: &'a RegistryClient,
    on_event: &'a (dyn Fn(Event) + Sync),
    counters: Counters,
    /// This build's scratch space under the state dir, locked while the
    /// build runs (`kiln cache gc` spares it) and removed on drop.
    work: BuildDir,
    /// The overlay snapshotter's unpacked layers (`None`: the walk
    /// snapshotter), decided when a step first has to run: a fully cached
    /// build never mounts the probe (its unmount alone syncs for ms).
    unpacked: std::sync::OnceLock<Option<UnpackedLayers>>,
    state: StateDir,
    /// An empty dir: the lowest layer of a stack that has none.
    empty: PathBuf,
    /// The remote tier, when `--cache-repo` is given and caching is on.
    remote: Option<RemoteCache<'a>>,
    etc: EtcFiles,
    /// ADD's remote sources as keying found them (downloads, commits), so
    /// the step copies exactly what it was keyed by.
    resolved: std::sync::Mutex<crate::exec::add::Resolved>,
    /// `--isolation none`: what clearing and unpacking over `/` spare, the
    /// caller's list (Kiln, its state, the context, the outputs, every
    /// mount) plus this build's work dir and /proc, /sys and /dev.
    host_keep: Vec<PathBuf>,
    /// What a layer records of a root, for both snapshotters.
    recorded: Recorded,
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
        let work = state.new_build()?;
        let etc = EtcFiles::create(&work.path().join("etc"), HOSTNAME).at(work.path())?;
        let remote = match &options.cache_repo {
            Some(repo) if options.cache => Some(RemoteCache::new(registry, repo)?),
            _ => None,
        };
        let empty = work.path().join("empty");
        std::fs::create_dir(&empty).at(&empty)?;
        Ok(Self {
            options,
            store,
            index,
            registry,
            on_event,
            counters: Counters::default(),
            unpacked: std::sync::OnceLock::new(),
            state: state.clone(),
            empty,
            remote,
            etc,
            resolved: Default::default(),
            recorded: Recorded::new(SKIP_CONTENTS, &options.ignore_paths),
            host_keep: match options.isolation {
                run::Isolation::None => {
                    let mut keep = options.ignore_paths.clone();
                    keep.extend(SKIP_CONTENTS.iter().map(PathBuf::from));
                    keep.push(clean_relative(work.path()));
                    keep
                }
                _ => Vec::new(),
            },
            work,
        })
    }

    /// The overlay snapshotter's unpacked layers, or `None` for the walk
    /// snapshotter: decided once, by [`Self::overlay_usable`].
    fn unpacked(&self) -> Result<Option<&UnpackedLayers>, BuildError> {
        if let Some(decided) = self.unpacked.get() {
            return Ok(decided.as_ref());
        }
        let decided = match Self::overlay_usable(self.options, self.work.path(), &self.empty) {
            Ok(true) => Some(UnpackedLayers::open(&self.state)?),
            Ok(false) => None,
            Err(why) if self.options.snapshotter == Snapshotter::Overlay => {
                return Err(BuildError::Invalid(format!(
                    "--snapshotter overlay: overlayfs cannot be mounted here: {why}"
                )))
            }
            Err(why) => {
                (self.on_event)(Event::Warning {
                    line: 0,
                    message: format!("overlayfs unavailable ({why}); using the walk snapshotter"),
                });
                None
            }
        };
        Ok(self.unpacked.get_or_init(|| decided).as_ref())
    }

    /// Whether the overlay snapshotter is to be used: asked for (or left to
    /// `auto`), with the isolation it needs, and an overlay can be mounted
    /// in Kiln's own mount namespace (tried once, on scratch dirs).
    fn overlay_usable(options: &BuildOptions, work: &Path, empty: &Path) -> Result<bool, String> {
        if !overlay_wanted(
            options.snapshotter,
            options.isolation,
            options.single_snapshot,
        ) {
            return Ok(false);
        }
        if !options.own_mount_namespace {
            return Err("Kiln has no mount namespace of its own (not root?)".into());
        }
        let probe = work.join("probe");
        let dirs = ["upper", "work", "merged"].map(|d| probe.join(d));
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        overlay::mount(&[empty.to_path_buf()], Some((&dirs[0], &dirs[1])), &dirs[2])
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&probe);
        Ok(true)
    }

    fn dockerfile_error(&self, e: dockerfile::FrontendError) -> BuildError {
        BuildError::Dockerfile {
            file: self.options.dockerfile_name.clone(),
            line: e.line,
            message: e.message,
        }
    }

    /// Parses and resolves the Dockerfile, fetches the base images' configs
    /// and plans every step.
    pub async fn plan(
        &self,
    ) -> Result<(Dockerfile, Plan, HashMap<String, ResolvedManifest>), BuildError> {
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
                if manifests.contains_key(reference) {
                    continue;
                }
                let (m, config) = self.fetch_image(reference).await?;
                configs.insert(reference.clone(), config);
                manifests.insert(reference.clone(), m);
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
        Ok((df, plan, manifests))
    }

    /// Resolves an image reference (registry or `oci-layout://`) to its
    /// manifest and config; the blobs land in the store.
    async fn fetch_image(
        &self,
        reference: &str,
    ) -> Result<(ResolvedManifest, ImageConfig), BuildError> {
        let base_error = |source| BuildError::BaseImage {
            reference: reference.to_string(),
            source: Box::new(source),
        };
        let platform = &self.options.platform;
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
        let bytes = self.store.read(&m.manifest.config.digest)?;
        let config: ImageConfig =
            serde_json::from_slice(&bytes).map_err(|e| BuildError::Layer {
                layer: m.manifest.config.digest.clone(),
                message: format!("invalid image config of {reference}: {e}"),
            })?;
        if config.rootfs.diff_ids.len() != m.manifest.layers.len() {
            return Err(BuildError::Invalid(format!(
                "{reference}: the config lists {} diff_ids for {} layers",
                config.rootfs.diff_ids.len(),
                m.manifest.layers.len()
            )));
        }
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

    /// Makes sure an image's layer blobs are in the store (concurrently;
    /// blobs already there cost nothing).
    async fn pull_layers(&self, reference: &str, m: &ResolvedManifest) -> Result<(), BuildError> {
        if reference.starts_with("oci-layout://") {
            return Ok(()); // imported with the manifest
        }
        let r = registry::parse_reference(reference)?;
        let pulls = m
            .manifest
            .layers
            .iter()
            .map(|l| self.registry.pull_blob(&r, &l.digest, self.store));
        futures_util::future::try_join_all(pulls)
            .await
            .map_err(|source| BuildError::BaseImage {
                reference: reference.to_string(),
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// What unpacking over `root` must leave alone: on the machine's own
    /// `/` (`--isolation none`), [`Self::host_keep`].
    fn kept(&self, root: &Path) -> UnpackInto<'_> {
        let keep = match root == Path::new(HOST_ROOT) {
            true => &self.host_keep[..],
            false => &[],
        };
        UnpackInto::Root { keep }
    }

    /// Unpacks stored layers, in order, into a new root.
    fn unpack_all(&self, layers: &[Layer], root: &Path) -> Result<(), BuildError> {
        let start = Instant::now();
        std::fs::create_dir_all(root).at(root)?;
        for layer in layers {
            unpack_layer(self.store, layer, root, self.kept(root))?;
        }
        self.counters.extracted(layers.len());
        self.counters.timed("unpack", start);
        Ok(())
    }

    /// The overlay snapshotter's directory of a layer, unpacked the first
    /// time any build needs it.
    fn layer_dir(&self, unpacked: &UnpackedLayers, layer: &Layer) -> Result<PathBuf, BuildError> {
        self.layer_dirs(unpacked, std::slice::from_ref(layer))
            .map(|mut dirs| dirs.remove(0))
    }

    /// The unpacked directories of `layers` (bottom first); the missing
    /// ones are unpacked in parallel.
    fn layer_dirs(
        &self,
        unpacked: &UnpackedLayers,
        layers: &[Layer],
    ) -> Result<Vec<PathBuf>, BuildError> {
        use rayon::prelude::*;
        let start = Instant::now();
        let extracted = AtomicUsize::new(0);
        let dirs = layers
            .par_iter()
            .map(|layer| {
                if let Some(dir) = unpacked.get(&layer.diff_id)? {
                    return Ok(dir);
                }
                let made = tempfile::Builder::new()
                    .prefix("unpack-")
                    .tempdir_in(self.work.path())
                    .at(self.work.path())?;
                unpack_layer(self.store, layer, made.path(), UnpackInto::Dir)?;
                extracted.fetch_add(1, Ordering::Relaxed);
                Ok(unpacked.insert(&layer.diff_id, &made.keep())?)
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let extracted = extracted.into_inner();
        if extracted > 0 {
            self.counters.extracted(extracted);
            self.counters.timed("unpack", start);
        }
        Ok(dirs)
    }

    /// Puts `layers` on disk at `dir` to be read: unpacked there, or with the
    /// overlay snapshotter a read-only overlay of their directories.
    fn materialize(&self, layers: &[Layer], dir: &Path) -> Result<Option<Mounted>, BuildError> {
        let Some(unpacked) = self.unpacked()? else {
            self.unpack_all(layers, dir)?;
            return Ok(None);
        };
        std::fs::create_dir_all(dir).at(dir)?;
        self.view(&self.layer_dirs(unpacked, layers)?, dir)
    }

    /// A read-only overlay of `lowers` at `dir` (nothing for no layers).
    fn view(&self, lowers: &[PathBuf], dir: &Path) -> Result<Option<Mounted>, BuildError> {
        if lowers.is_empty() {
            return Ok(None);
        }
        let mut all = vec![self.empty.clone()];
        all.extend_from_slice(lowers);
        Ok(Some(overlay::mount(&all, None, dir).at(dir)?))
    }

    /// Builds every needed stage and assembles the target's image.
    ///
    /// Each stage first computes the cache keys of all its steps and looks
    /// them all up. A stage whose steps all hit is never put on disk: its
    /// image is the base's layers plus the cached ones. Otherwise its root
    /// is unpacked (base plus cached layers up to the first miss) and the
    /// steps from there run, a later hit unpacking its layer instead.
    pub async fn build(&self) -> Result<BuiltImage, BuildError> {
        let start = Instant::now();
        let (_df, plan, manifests) = self.plan().await?;
        self.counters.timed("resolve", start);
        let mut results: HashMap<usize, StageResult> = HashMap::new();
        let mut images: HashMap<String, FetchedImage> = HashMap::new();
        let last_use = plan.last_uses();
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
                    let (m, config) = self.fetch_image(reference).await?;
                    let image = FetchedImage {
                        m,
                        config,
                        root: None,
                        view: None,
                    };
                    images.insert(reference.clone(), image);
                }
            }
        }
        for stage in plan.stages.iter().filter(|s| s.needed) {
            (self.on_event)(Event::Stage {
                index: stage.index,
                name: stage.name.clone(),
                base: stage.base_display.clone(),
            });
            let mut result = match &stage.base {
                Base::Scratch => StageResult {
                    root: None,
                    view: None,
                    config: ImageConfig::default(),
                    layers: Vec::new(),
                    last_key: "scratch".into(),
                    built: None,
                },
                Base::Image(reference) => {
                    let m = &manifests[reference];
                    let config = self.base_config(m)?;
                    // Blobs are needed for the outputs, even when nothing unpacks them.
                    self.pull_layers(reference, m).await?;
                    StageResult {
                        root: None,
                        view: None,
                        layers: Self::image_layers(m, &config),
                        config,
                        last_key: m.digest.clone(),
                        built: None,
                    }
                }
                Base::Stage(parent) => results[parent].clone_without_root(),
            };
            let start = Instant::now();
            let keys = tokio::task::block_in_place(|| {
                self.step_keys(stage, &result.last_key, &results, &images)
            })?;
            let hits = self.lookup(stage, &keys)?;
            let hits = self.lookup_remote(stage, &keys, hits).await?;
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
                // Put on disk what this stage reads: its base and its COPY sources.
                let root = match self.options.isolation {
                    run::Isolation::None => PathBuf::from(HOST_ROOT),
                    _ => self.work.path().join(format!("stage-{}", stage.index)),
                };
                // The last reader of a parent stage that copies nothing from
                // it takes its root instead of copying it.
                let takes_parent_root =
                    |p: usize| last_use.get(&p) == Some(&stage.index) && !stage.copies_from(p);
                match &stage.base {
                    // Each step mounts its own overlay of the layers at the root.
                    _ if self.unpacked()?.is_some() => std::fs::create_dir_all(&root).at(&root)?,
                    // The machine's own root: cleared of the stage before,
                    // which later readers find unpacked elsewhere instead.
                    _ if self.options.isolation == run::Isolation::None => {
                        // Built on the stage just before, its last reader:
                        // that stage's root is already there.
                        let on_parent = matches!(&stage.base, Base::Stage(p)
                            if results[p].root.as_deref() == Some(&root) && takes_parent_root(*p));
                        for earlier in results.values_mut() {
                            if earlier.root.as_deref() == Some(&root) {
                                earlier.root = None;
                            }
                        }
                        if !on_parent {
                            crate::rootfs::clear_root(&root, &self.host_keep).at(&root)?;
                            tokio::task::block_in_place(|| self.unpack_all(&result.layers, &root))?;
                        }
                    }
                    Base::Stage(parent) => {
                        let parent_result = results.get_mut(parent).expect("parent built");
                        match parent_result.root.take() {
                            Some(parent_root) if takes_parent_root(*parent) => {
                                std::fs::rename(&parent_root, &root).at(&root)?;
                            }
                            Some(parent_root) => {
                                copy_tree(&parent_root, &root)?;
                                parent_result.root = Some(parent_root);
                            }
                            None => tokio::task::block_in_place(|| {
                                self.unpack_all(&result.layers, &root)
                            })?,
                        }
                    }
                    _ => tokio::task::block_in_place(|| self.unpack_all(&result.layers, &root))?,
                }
                result.root = Some(root);
                for from in stage.steps.iter().flat_map(|s| s.action.reads()) {
                    match from {
                        CopyFrom::Stage(i) => {
                            let source = results.get_mut(i).expect("source stage built");
                            if source.root.is_none() {
                                let dir = self.work.path().join(format!("stage-{i}"));
                                source.view = tokio::task::block_in_place(|| {
                                    self.materialize(&source.layers, &dir)
                                })?;
                                source.root = Some(dir);
                            }
                        }
                        CopyFrom::Image(reference) => {
                            let image = images.get_mut(reference).expect("fetched above");
                            if image.root.is_none() {
                                let dir = self.work.path().join(format!(
                                    "image-{}",
                                    image.m.digest.trim_start_matches("sha256:")
                                ));
                                self.pull_layers(reference, &image.m).await?;
                                let layers = Self::image_layers(&image.m, &image.config);
                                image.view = tokio::task::block_in_place(|| {
                                    self.materialize(&layers, &dir)
                                })?;
                                image.root = Some(dir);
                            }
                        }
                        CopyFrom::Context | CopyFrom::Inline(_) => {}
                    }
                }
            }
            let image_roots: HashMap<String, PathBuf> = images
                .iter()
                .filter_map(|(r, i)| i.root.clone().map(|root| (r.clone(), root)))
                .collect();
            let recorded = tokio::task::block_in_place(|| {
                self.run_steps(stage, &mut result, &keys, &hits, &results, &image_roots)
            })?;
            self.publish(&recorded).await?;
            // Free the roots nobody reads any more.
            let done: Vec<usize> = results
                .keys()
                .copied()
                .filter(|i| last_use.get(i).is_none_or(|last| *last <= stage.index))
                .collect();
            for i in done {
                if let Some(root) = results.remove(&i).and_then(|r| r.root) {
                    if root != Path::new(HOST_ROOT) {
                        let _ = std::fs::remove_dir_all(root);
                    }
                }
            }
            results.insert(stage.index, result);
        }
        self.index.touch_steps(&used)?;
        (self.on_event)(Event::Summary(self.counters.summary()));
        let target = results
            .remove(&plan.target)
            .ok_or_else(|| BuildError::Invalid("the target stage was not built".into()))?;
        self.assemble(target)
    }

    /// `url` downloaded into this build's work dir, once per build.
    fn download(&self, url: &str) -> Result<PathBuf, String> {
        if let Some(file) = self.resolved().downloads.get(url) {
            return Ok(file.clone());
        }
        // Kept for the step that copies it; the work dir goes with the build.
        let (dir, file) = crate::exec::add::download_to_new_dir(url, None, self.work.path())?;
        let _ = dir.keep();
        self.resolved()
            .downloads
            .insert(url.to_string(), file.clone());
        Ok(file)
    }

    fn resolved(&self) -> std::sync::MutexGuard<'_, crate::exec::add::Resolved> {
        self.resolved.lock().expect("resolved sources poisoned")
    }

    /// The cache key of every step (`None` for metadata-only steps),
    /// chained from `parent`.
    fn step_keys(
        &self,
        stage: &StagePlan,
        parent: &str,
        stages: &HashMap<usize, StageResult>,
        images: &HashMap<String, FetchedImage>,
    ) -> Result<Vec<Option<String>>, BuildError> {
        let platform = self.options.platform.to_string();
        let mut parent = parent.to_string();
        let mut keys = Vec::new();
        for step in &stage.steps {
            let (identity, digest) = match &step.action {
                // ADD <url> without --checksum: keyed by what the URL gives
                // now (name, Last-Modified and content), as BuildKit does.
                Action::Copy { sources, .. } if key::downloads_unchecked(&step.action) => {
                    let mut digests = Vec::new();
                    let (urls, local): (Vec<String>, Vec<String>) = sources
                        .iter()
                        .cloned()
                        .partition(|s| plan::AddSpec::is_download(s));
                    for url in urls {
                        let file = self.download(&url).map_err(|e| self.step_error(step, e))?;
                        digests.push(key::file_digest(&file).at(&file)?);
                    }
                    digests.push(self.context_digest(step, &local)?);
                    (String::new(), digests.join("\n"))
                }
                // A Git source counts by the commit its ref names now,
                // which --checksum, when given, must start with.
                Action::Copy {
                    add: Some(spec),
                    sources,
                    ..
                } if sources.iter().any(|s| plan::is_git_source(s)) => {
                    // Once per build: two steps naming one ref get one commit.
                    let known = |s: &String| self.resolved().commits.get(s).cloned();
                    let commits: Vec<String> = sources
                        .iter()
                        .map(|s| {
                            known(s).map_or_else(|| crate::git::GitSource::parse(s).resolve(), Ok)
                        })
                        .collect::<Result<_, _>>()
                        .map_err(|e| self.step_error(step, e.to_string()))?;
                    self.resolved()
                        .commits
                        .extend(sources.iter().cloned().zip(commits.iter().cloned()));
                    if let Some(checksum) = &spec.checksum {
                        if let Some(other) = commits
                            .iter()
                            .find(|c| !c.starts_with(&checksum.to_ascii_lowercase()))
                        {
                            return Err(self.step_error(
                                step,
                                format!(
                                    "checksum mismatch: the ref is commit {other}, not {checksum}"
                                ),
                            ));
                        }
                    }
                    (commits.join("\n"), String::new())
                }
                Action::Copy {
                    from: CopyFrom::Context,
                    sources,
                    ..
                } => {
                    // What .dockerignore hides is not hashed, as not copied;
                    // ADD's URLs count through their checksum.
                    let local: Vec<String> = sources
                        .iter()
                        .filter(|s| !plan::AddSpec::is_download(s))
                        .cloned()
                        .collect();
                    (String::new(), self.context_digest(step, &local)?)
                }
                Action::Copy {
                    from: CopyFrom::Inline(files),
                    ..
                } => (String::new(), key::hash_inline(files)),
                Action::Copy {
                    from: CopyFrom::Stage(i),
                    ..
                } => (stages[i].last_key.clone(), String::new()),
                Action::Copy {
                    from: CopyFrom::Image(r),
                    ..
                } => (images[r].m.digest.clone(), String::new()),
                Action::Run { mounts, .. } => {
                    // What each bind (or cache seed) shows: a stage by its
                    // key, an image by its digest, the context by content.
                    let mut identity = Vec::new();
                    let mut digests = Vec::new();
                    for pm in mounts {
                        match &pm.from {
                            None => {}
                            Some(CopyFrom::Context) => {
                                let source = pm.mount.source.clone().unwrap_or_else(|| ".".into());
                                digests.push(self.context_digest(step, &[source])?);
                            }
                            Some(CopyFrom::Stage(i)) => identity.push(stages[i].last_key.clone()),
                            Some(CopyFrom::Image(r)) => identity.push(images[r].m.digest.clone()),
                            Some(CopyFrom::Inline(_)) => {}
                        }
                    }
                    (identity.join("\n"), digests.join("\n"))
                }
                _ => (String::new(), String::new()),
            };
            let key = key::step_key(
                step,
                &key::KeyInputs {
                    parent: &parent,
                    platform: &platform,
                    source_identity: &identity,
                    sources_digest: &digest,
                },
            );
            if let Some(k) = &key {
                parent = k.clone();
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// The digest of the context files `sources` select, as COPY would
    /// copy them (through `.dockerignore`), with the stat cache.
    fn context_digest(&self, step: &Step, sources: &[String]) -> Result<String, BuildError> {
        let context = &self.options.context;
        let (selected, filter) =
            copy::selected_context_sources(context, &self.options.dockerignore, sources)
                .map_err(|message| self.step_error(step, message))?;
        key::hash_sources_cached(&selected, false, Some(filter), Some(self.index)).at(context)
    }

    /// Looks every key up at once. A hit is an entry within the TTL whose
    /// layer blob is in the store; `Some(None)` is a hit that made no layer.
    fn lookup(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
    ) -> Result<Vec<Option<Hit>>, BuildError> {
        let opts = self.options;
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
                if entry.expired(opts.cache_ttl) {
                    return Ok(None);
                }
                match &entry.layer {
                    Some(l) if !self.store_has(&l.descriptor)? => Ok(None),
                    layer => Ok(Some(Hit {
                        layer: layer.clone(),
                        created: entry.created,
                    })),
                }
            })
            .collect()
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
    fn cacheable(&self, step: &Step) -> bool {
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
    /// missed. A remote hit's layer is fetched into the store and the entry
    /// recorded locally, so the next build finds it here.
    async fn lookup_remote(
        &self,
        stage: &StagePlan,
        keys: &[Option<String>],
        mut hits: Vec<Option<Hit>>,
    ) -> Result<Vec<Option<Hit>>, BuildError> {
        let Some(remote) = &self.remote else {
            return Ok(hits);
        };
        let missing: Vec<(usize, &String)> = keys
            .iter()
            .zip(&stage.steps)
            .enumerate()
            .filter(|(i, (k, step))| k.is_some() && hits[*i].is_none() && self.cacheable(step))
            .map(|(i, (k, _))| (i, k.as_ref().expect("filtered")))
            .collect();
        let store = self.store;
        let found = futures_util::future::try_join_all(missing.iter().map(|(i, key)| async move {
            let entry = match remote.get(key, store).await? {
                Some(e) if !e.expired(self.options.cache_ttl) => e,
                _ => return Ok::<_, BuildError>(None),
            };
            remote.fetch_layer(key, &entry, store).await?;
            Ok(Some((*i, (*key).clone(), entry)))
        }))
        .await?;
        let mut recorded = Vec::new();
        for (i, key, entry) in found.into_iter().flatten() {
            hits[i] = Some(Hit {
                layer: entry.layer.clone(),
                created: entry.created,
            });
            self.counters.remote_hits.fetch_add(1, Ordering::Relaxed);
            recorded.push((key, entry));
        }
        self.index.put_steps(&recorded)?;
        Ok(hits)
    }

    /// Uploads new entries to the remote tier.
    async fn publish(&self, recorded: &[(String, StepEntry)]) -> Result<(), BuildError> {
        let Some(remote) = self
            .remote
            .as_ref()
            .filter(|_| self.options.cache_repo_push)
        else {
            return Ok(());
        };
        futures_util::future::try_join_all(
            recorded
                .iter()
                .map(|(key, entry)| async move { remote.put(key, entry, self.store).await }),
        )
        .await?;
        Ok(())
    }

    fn step_error(&self, step: &Step, message: String) -> BuildError {
        BuildError::Step {
            file: self.options.dockerfile_name.clone(),
            line: step.line,
            instruction: step.keyword.clone(),
            message,
        }
    }

    fn base_config(&self, m: &ResolvedManifest) -> Result<ImageConfig, BuildError> {
        let bytes = self.store.read(&m.manifest.config.digest)?;
        serde_json::from_slice(&bytes).map_err(|e| BuildError::Layer {
            layer: m.manifest.config.digest.clone(),
            message: e.to_string(),
        })
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

    fn history(&self, created_by: &str, empty_layer: bool, secs: Option<u64>) -> History {
        History {
            created: Some(self.created(secs)),
            created_by: Some(created_by.to_string()),
            comment: Some("kiln".into()),
            empty_layer,
            ..Default::default()
        }
    }

    /// Walks the stage's steps: hits contribute their cached layer (unpacked
    /// when the root is on disk), misses run and are recorded.
    fn run_steps(
        &self,
        stage: &StagePlan,
        result: &mut StageResult,
        keys: &[Option<String>],
        hits: &[Option<Hit>],
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<Vec<(String, StepEntry)>, BuildError> {
        let opts = self.options;
        let root = result.root.clone();
        // With the overlay snapshotter, the layers the next step runs on
        // (bottom first); no snapshot of the root is ever taken.
        let unpacked = match root {
            Some(_) => self.unpacked()?,
            None => None,
        };
        let mut lowers = match unpacked {
            Some(unpacked) => Some(self.layer_dirs(unpacked, &result.layers)?),
            None => None,
        };
        // Taken lazily, right before the first step that runs.
        let mut snapshot: Option<Snapshot> = None;
        // --single-snapshot: one layer for the whole stage, against its base.
        let mut base_state: Option<Snapshot> = None;
        let mut recorded = Vec::new();
        // Metadata steps take the time of the keyed step before them (the
        // first keyed step's, at the start), so a fully cached stage gets
        // the history, and the image, it had.
        let now = kiln_cachestore::index::now_secs();
        let mut time = keys
            .iter()
            .zip(hits)
            .find(|(k, _)| k.is_some())
            .map(|(_, h)| h.as_ref().map_or(now, |h| h.created))
            .or(result.built);
        for ((step, key), hit) in stage.steps.iter().zip(keys).zip(hits) {
            (self.on_event)(Event::Step {
                line: step.line,
                text: step.created_by.clone(),
            });
            let (layer, empty_layer) = match (key, hit, &root) {
                (None, _, _) => (None, true),
                (Some(_), Some(hit), _) => {
                    self.counters.hit();
                    (self.on_event)(Event::CacheHit { line: step.line });
                    time = Some(hit.created);
                    let cached = &hit.layer;
                    match (&root, cached, &mut lowers, unpacked) {
                        (Some(_), Some(layer), Some(lowers), Some(unpacked)) => {
                            lowers.push(self.layer_dir(unpacked, layer)?);
                        }
                        (Some(root), Some(layer), _, _) => {
                            let start = Instant::now();
                            unpack_layer(self.store, layer, root, self.kept(root))?;
                            self.counters.extracted(1);
                            self.counters.timed("unpack", start);
                            if let Some(snapshot) = &mut snapshot {
                                snapshot.rescan(root, &[PathBuf::new()]).at(root)?;
                            }
                        }
                        _ => {}
                    }
                    (cached.clone(), cached.is_none())
                }
                (Some(key), _, Some(root)) => {
                    self.counters.miss();
                    time = Some(now);
                    let layer = match (&mut lowers, unpacked) {
                        (Some(lowers), Some(unpacked)) => {
                            self.run_stacked(step, root, lowers, unpacked, stages, image_roots)?
                        }
                        _ => {
                            let start = Instant::now();
                            if snapshot.is_none() {
                                let scanned =
                                    Snapshot::scan(root, opts.snapshot_mode, self.recorded.clone())
                                        .at(root)?;
                                if opts.single_snapshot {
                                    base_state = Some(scanned.clone());
                                }
                                snapshot = Some(scanned);
                            }
                            let changes = self
                                .run_step(step, root, snapshot.as_mut(), stages, image_roots)
                                .map_err(|message| self.step_error(step, message))?;
                            self.counters.timed("run", start);
                            match changes.is_empty() || opts.single_snapshot {
                                true => None,
                                false => Some(self.write_layer(root, &changes)?),
                            }
                        }
                    };
                    // (Never with --single-snapshot: no per-step layer.)
                    if self.cacheable(step) {
                        recorded.push((
                            key.clone(),
                            StepEntry {
                                layer: layer.clone(),
                                created: now,
                            },
                        ));
                    }
                    let empty = layer.is_none();
                    (layer, empty)
                }
                (Some(_), None, None) => unreachable!("a stage with a miss is on disk"),
            };
            result.layers.extend(layer);
            result
                .config
                .history
                .push(self.history(&step.created_by, empty_layer, time));
        }
        result.built = time.or(result.built);
        if let (Some(lowers), Some(root)) = (&lowers, &root) {
            // Later stages read this one's files there.
            result.view = self.view(lowers, root)?;
        }
        if let (Some(base), Some(root)) = (&mut base_state, &root) {
            let changes = base.rescan(root, &[PathBuf::new()]).at(root)?;
            if !changes.is_empty() {
                result.layers.push(self.write_layer(root, &changes)?);
                result.config.history.push(self.history(
                    "kiln --single-snapshot",
                    false,
                    Some(now),
                ));
            }
        }
        if let Some(last) = keys.iter().flatten().last() {
            result.last_key = last.clone();
        }
        self.index.put_steps(&recorded)?;
        // The plan computed the stage's final config; keep the layers' history.
        let history = std::mem::take(&mut result.config.history);
        result.config = ImageConfig {
            history,
            ..stage.config.clone()
        };
        Ok(recorded)
    }

    /// Runs a step with the overlay snapshotter: on a fresh upper dir over
    /// `lowers`, mounted at `root`. The upper dir becomes the step's layer
    /// and, pushed onto `lowers`, what the next step runs on.
    fn run_stacked(
        &self,
        step: &Step,
        root: &Path,
        lowers: &mut Vec<PathBuf>,
        unpacked: &UnpackedLayers,
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<Option<Layer>, BuildError> {
        let start = Instant::now();
        let scratch = tempfile::Builder::new()
            .prefix("step-")
            .tempdir_in(self.work.path())
            .at(self.work.path())?;
        let (upper, work) = (scratch.path().join("upper"), scratch.path().join("work"));
        for dir in [&upper, &work] {
            std::fs::create_dir(dir).at(dir)?;
        }
        let stack = match lowers.is_empty() {
            true => std::slice::from_ref(&self.empty),
            false => &lowers[..],
        };
        let since = std::time::SystemTime::now();
        let mounted = overlay::mount(stack, Some((&upper, &work)), root).at(root)?;
        let ran = self.run_step(step, root, None, stages, image_roots);
        drop(mounted);
        ran.map_err(|message| self.step_error(step, message))?;
        let changes = overlay::settle_upper(&upper, lowers, &self.recorded, since).at(&upper)?;
        self.counters.timed("run", start);
        if changes.is_empty() {
            return Ok(None);
        }
        let layer = self.write_layer(&upper, &changes)?;
        lowers.push(unpacked.insert(&layer.diff_id, &upper)?);
        Ok(Some(layer))
    }

    /// Runs one step and returns what it changed in the root (nothing
    /// without a snapshot: the overlay snapshotter reads its upper dir).
    fn run_step(
        &self,
        step: &Step,
        root: &Path,
        snapshot: Option<&mut Snapshot>,
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<Changes, String> {
        let io = |e: std::io::Error| e.to_string();
        let rescan = |root: &Path, touched: &[PathBuf]| match snapshot {
            Some(snapshot) => snapshot.rescan(root, touched).map_err(io),
            None => Ok(Changes::default()),
        };
        match &step.action {
            Action::Config => Ok(Changes::default()),
            Action::Mkdir { paths, owner } => {
                let (uid, gid) = match owner.as_deref().filter(|o| !o.is_empty()) {
                    Some(user) => {
                        let id = users::resolve_user(root, user)?;
                        (id.uid, id.gid)
                    }
                    None => (0, 0),
                };
                let mut touched = Vec::new();
                for path in paths {
                    let (_, created) = create_dir_all_in_root(root, Path::new(path)).map_err(io)?;
                    for dir in &created {
                        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(io)?;
                    }
                    touched.extend(created.first().map(|d| relative_to_root(root, d)));
                }
                rescan(root, &touched)
            }
            Action::Run {
                argv,
                env,
                user,
                workdir,
                script,
                mounts: planned,
                network,
            } => {
                let isolation = self.options.isolation;
                if matches!(isolation, run::Isolation::Chroot | run::Isolation::None)
                    && (!planned.is_empty() || *network == Network::None)
                {
                    return Err(format!(
                        "RUN --mount and --network=none need namespaces: not available with --isolation {isolation}"
                    ));
                }
                let identity = users::resolve_user(root, user)?;
                create_dir_all_in_root(root, Path::new(workdir)).map_err(io)?;
                let mut mounts = match isolation {
                    // The machine's own /proc, /dev and /etc files.
                    run::Isolation::None => MountPoints::host(root),
                    _ => MountPoints::prepare(root, &self.etc).map_err(io)?,
                };
                let mut env = run::run_env(env, &identity, HOSTNAME);
                let scratch = tempfile::Builder::new()
                    .prefix("mounts-")
                    .tempdir_in(self.work.path())
                    .map_err(io)?;
                let prepared = self.prepare_mounts(
                    planned,
                    root,
                    &mut mounts,
                    &mut env,
                    scratch.path(),
                    stages,
                    image_roots,
                );
                let _locks = match prepared {
                    Ok(locks) => locks,
                    Err(e) => {
                        mounts.cleanup().map_err(io)?;
                        return Err(e);
                    }
                };
                let spec = RunSpec {
                    root: root.to_path_buf(),
                    argv: argv.clone(),
                    env,
                    cwd: workdir.clone(),
                    uid: identity.uid,
                    gid: identity.gid,
                    groups: identity.groups.clone(),
                    hostname: HOSTNAME.into(),
                    mounts,
                    script: script.clone(),
                    no_network: *network == Network::None,
                    isolation: self.options.isolation,
                };
                let code = run::run(&spec);
                spec.mounts.cleanup().map_err(io)?;
                match code.map_err(io)? {
                    0 => rescan(root, &[PathBuf::new()]),
                    code => Err(format!("{argv:?} returned a non-zero code: {code}")),
                }
            }
            Action::Copy {
                from,
                sources,
                dest,
                chown,
                chmod,
                add,
                excludes,
                parents,
            } => {
                // Heredoc sources are written to a scratch dir, as files of
                // mode 0644 the copy then treats like context files.
                let inline_dir;
                let source = match from {
                    CopyFrom::Context => Source::Context(&self.options.context),
                    CopyFrom::Inline(files) => {
                        inline_dir = tempfile::Builder::new()
                            .prefix("heredoc-")
                            .tempdir_in(self.work.path())
                            .map_err(io)?;
                        for (name, content) in files {
                            let path = inline_dir.path().join(name);
                            std::fs::write(&path, content).map_err(io)?;
                            std::fs::set_permissions(
                                &path,
                                std::os::unix::fs::PermissionsExt::from_mode(0o644),
                            )
                            .map_err(io)?;
                        }
                        Source::Context(inline_dir.path())
                    }
                    CopyFrom::Stage(i) => Source::Root(
                        stages[i]
                            .root
                            .as_deref()
                            .expect("COPY --from stages are unpacked first"),
                    ),
                    CopyFrom::Image(r) => Source::Root(&image_roots[r]),
                };
                let chown = chown
                    .as_deref()
                    .map(|spec| users::resolve_chown(root, spec))
                    .transpose()?;
                let ignore = match from {
                    CopyFrom::Context => Some(&self.options.dockerignore),
                    _ => None,
                };
                let touched = match add {
                    None => copy::copy(
                        &CopyRequest {
                            source,
                            sources,
                            dest,
                            chown,
                            chmod: *chmod,
                            ignore,
                            unpack: false,
                            excludes,
                            parents: *parents,
                        },
                        root,
                    )?,
                    Some(spec) => crate::exec::add::add(
                        &crate::exec::add::AddRequest {
                            source,
                            sources,
                            dest,
                            chown,
                            chmod: *chmod,
                            ignore,
                            excludes,
                            keep_git_dir: spec.keep_git_dir,
                            checksum: spec.checksum.as_deref(),
                            unpack: spec.unpack,
                            scratch: self.work.path(),
                            resolved: &self.resolved(),
                        },
                        root,
                    )?,
                };
                rescan(root, &touched)
            }
        }
    }

    /// Resolves a RUN's `--mount`s to host paths and mount points in the
    /// root. Returns the locks of `sharing=locked` caches, held until the
    /// step ends.
    #[allow(clippy::too_many_arguments)]
    fn prepare_mounts(
        &self,
        planned: &[PlannedMount],
        root: &Path,
        mounts: &mut MountPoints,
        env: &mut Vec<String>,
        scratch: &Path,
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<Vec<std::fs::File>, String> {
        let io = |e: std::io::Error| e.to_string();
        let mut locks = Vec::new();
        for (n, pm) in planned.iter().enumerate() {
            let m = &pm.mount;
            let source_root = |from: &CopyFrom| -> Result<PathBuf, String> {
                Ok(match from {
                    CopyFrom::Context => self.options.context.clone(),
                    CopyFrom::Stage(i) => stages[i]
                        .root
                        .clone()
                        .expect("stages a step mounts are unpacked first"),
                    CopyFrom::Image(r) => image_roots[r].clone(),
                    CopyFrom::Inline(_) => unreachable!("mounts never read heredocs"),
                })
            };
            let source_path = |from: &CopyFrom| -> Result<PathBuf, String> {
                let src = Path::new(m.source.as_deref().unwrap_or("/"));
                let base = source_root(from)?;
                let path = resolve_in_root(&base, &clean_relative(src), true).map_err(io)?;
                std::fs::symlink_metadata(&path)
                    .map_err(|e| format!("mount source {}: {e}", src.display()))?;
                Ok(path)
            };
            let target = pm.target.as_deref();
            match m.kind {
                MountType::Bind => {
                    let from = pm.from.as_ref().unwrap_or(&CopyFrom::Context);
                    let mut source = source_path(from)?;
                    let file = !source.is_dir();
                    if matches!(from, CopyFrom::Context) && !self.options.dockerignore.is_empty() {
                        // The step sees the context as COPY does: without
                        // what .dockerignore hides (and the key hashes).
                        let filtered = scratch.join(format!("context-{n}"));
                        std::fs::create_dir(&filtered).map_err(io)?;
                        let wanted = [m.source.clone().unwrap_or_else(|| ".".into())];
                        copy::copy(
                            &CopyRequest {
                                source: Source::Context(&self.options.context),
                                sources: &wanted,
                                dest: "/",
                                chown: None,
                                chmod: None,
                                ignore: Some(&self.options.dockerignore),
                                unpack: false,
                                excludes: &[],
                                parents: false,
                            },
                            &filtered,
                        )?;
                        source = match file {
                            true => filtered.join(source.file_name().unwrap_or_default()),
                            false => filtered,
                        };
                    } else if !m.readonly {
                        // Writes to a rw bind are thrown away, as in BuildKit:
                        // the step gets a copy.
                        let copy = scratch.join(format!("bind-{n}"));
                        if file {
                            std::fs::copy(&source, &copy).map_err(io)?;
                        } else {
                            copy_tree(&source, &copy).map_err(|e| e.to_string())?;
                        }
                        source = copy;
                    }
                    let target = mounts
                        .mount_point(root, target.expect("binds have targets"), file)
                        .map_err(io)?;
                    mounts.extra.push(StepMount::Bind {
                        source,
                        target,
                        readonly: m.readonly,
                    });
                }
                MountType::Cache => {
                    let target_str = target.expect("caches have targets");
                    let id = m.id.clone().unwrap_or_else(|| target_str.to_string());
                    let CacheMount {
                        dir,
                        lock: lock_path,
                    } = self.state.cache_mount(&id);
                    std::fs::create_dir_all(self.state.mounts()).map_err(io)?;
                    let lock = std::fs::File::create(&lock_path).map_err(io)?;
                    let source = match m.sharing.as_deref() {
                        Some("locked") => {
                            lock.lock().map_err(io)?;
                            locks.push(lock);
                            dir.clone()
                        }
                        // Busy private caches give the step a fresh dir.
                        Some("private") if lock.try_lock().is_err() => {
                            scratch.join(format!("cache-{n}"))
                        }
                        Some("private") => {
                            locks.push(lock);
                            dir.clone()
                        }
                        _ => dir.clone(),
                    };
                    if !source.exists() {
                        let fresh = scratch.join(format!("fresh-{n}"));
                        match &pm.from {
                            Some(from) => {
                                copy_tree(&source_path(from)?, &fresh).map_err(|e| e.to_string())?
                            }
                            None => std::fs::create_dir(&fresh).map_err(io)?,
                        }
                        std::os::unix::fs::chown(
                            &fresh,
                            Some(m.uid.unwrap_or(0)),
                            Some(m.gid.unwrap_or(0)),
                        )
                        .map_err(io)?;
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(
                            &fresh,
                            std::fs::Permissions::from_mode(m.mode.unwrap_or(0o755)),
                        )
                        .map_err(io)?;
                        // Renamed into place whole, so a racing build sees
                        // either no cache or a complete one.
                        if std::fs::rename(&fresh, &source).is_err() && !source.is_dir() {
                            return Err(format!("cannot create the cache mount for {id}"));
                        }
                    }
                    let target = mounts.mount_point(root, target_str, false).map_err(io)?;
                    mounts.extra.push(StepMount::Bind {
                        source,
                        target,
                        readonly: m.readonly,
                    });
                }
                MountType::Tmpfs => {
                    let target = mounts
                        .mount_point(root, target.expect("tmpfs mounts have targets"), false)
                        .map_err(io)?;
                    mounts.extra.push(StepMount::Tmpfs {
                        target,
                        size: m.size,
                    });
                }
                MountType::Secret => {
                    let id = m.id.as_deref().unwrap_or_default();
                    let content = match self.options.secrets.get(id) {
                        Some(SecretSource::File(path)) => std::fs::read(path)
                            .map_err(|e| format!("secret {id}: {}: {e}", path.display()))?,
                        Some(SecretSource::Env(var)) => std::env::var_os(var)
                            .map(|v| v.into_encoded_bytes())
                            .ok_or_else(|| format!("secret {id}: ${var} is not set"))?,
                        None if m.required => {
                            return Err(format!(
                                "secret {id} is required: pass --secret id={id},src=FILE"
                            ))
                        }
                        None => continue,
                    };
                    if let Some(var) = &m.env {
                        env.push(format!("{var}={}", String::from_utf8_lossy(&content)));
                    }
                    if let Some(target) = target {
                        mounts.secret_stage = Some(scratch.join("secrets"));
                        std::fs::create_dir_all(scratch.join("secrets")).map_err(io)?;
                        let target = mounts.mount_point(root, target, true).map_err(io)?;
                        mounts.extra.push(StepMount::Secret {
                            target,
                            content,
                            mode: m.mode.unwrap_or(0o400),
                            uid: m.uid.unwrap_or(0),
                            gid: m.gid.unwrap_or(0),
                        });
                    }
                }
                MountType::Ssh => return Err("RUN --mount=type=ssh is not supported".into()),
            }
        }
        Ok(locks)
    }

    /// Writes the changes as a layer: changed paths with their parent
    /// directories (so a layer alone restores their metadata), then
    /// whiteouts for what was deleted.
    fn write_layer(&self, root: &Path, changes: &Changes) -> Result<Layer, BuildError> {
        let start = Instant::now();
        // One stream sorted by name, parents first: entries, and whiteouts
        // (`None`: an entry; `Some(path)`: the whiteout of path).
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
        let mut writer = LayerWriter::new(
            self.store,
            self.options.compression,
            self.options.fixed_time,
        )?;
        for (name, whiteout) in &names {
            match whiteout {
                None => writer.add(root, name)?,
                Some(deleted) => writer.whiteout(deleted)?,
            }
        }
        let layer = writer.finish()?;
        self.counters.timed("layers", start);
        (self.on_event)(Event::Layer {
            digest: layer.descriptor.digest.clone(),
            size: layer.descriptor.size,
        });
        Ok(layer)
    }

    /// Writes the config and manifest of the target stage into the store.
    fn assemble(&self, target: StageResult) -> Result<BuiltImage, BuildError> {
        let docker = self.options.image_format == ImageFormat::Docker;
        let mut layers = target.layers;
        if docker {
            // Docker schema 2 names the same gzip or tar bytes differently;
            // it has no zstd layers.
            for layer in &mut layers {
                let d = &mut layer.descriptor;
                d.media_type = match d.media_type.as_str() {
                    manifest::OCI_LAYER_GZIP | manifest::DOCKER_LAYER_GZIP => {
                        manifest::DOCKER_LAYER_GZIP.into()
                    }
                    manifest::OCI_LAYER_TAR => manifest::DOCKER_LAYER_TAR.into(),
                    other => {
                        return Err(BuildError::Invalid(format!(
                            "--image-format docker: layer {} is {other}, which Docker images cannot hold (use --compression gzip)",
                            d.digest
                        )))
                    }
                };
            }
        }
        let mut config = target.config;
        config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
        config.created = Some(self.created(target.built));
        let bytes = serde_json::to_vec(&config).expect("a config always serializes");
        let stored = self.store.put(&bytes)?;
        let config_desc = Descriptor {
            media_type: match docker {
                true => manifest::DOCKER_CONFIG.into(),
                false => manifest::OCI_CONFIG.into(),
            },
            digest: stored.digest,
            size: stored.size,
            platform: None,
            annotations: None,
        };
        let manifest_type = match docker {
            true => manifest::DOCKER_MANIFEST,
            false => manifest::OCI_MANIFEST,
        };
        let manifest_bytes = image::manifest_bytes(manifest_type, &config_desc, &layers);
        let stored = self.store.put(&manifest_bytes)?;
        Ok(BuiltImage {
            manifest: Descriptor {
                media_type: manifest_type.into(),
                digest: stored.digest,
                size: stored.size,
                platform: None,
                annotations: None,
            },
            config: config_desc,
            layers,
        })
    }
}

/// Where [`unpack_layer`] puts a layer.
enum UnpackInto<'a> {
    /// Over a root, leaving its `keep` paths alone.
    Root { keep: &'a [PathBuf] },
    /// Alone into an empty directory, in overlayfs's format.
    Dir,
}

/// Unpacks one stored layer, checking its diff_id.
fn unpack_layer(
    store: &BlobStore,
    layer: &Layer,
    root: &Path,
    into: UnpackInto,
) -> Result<(), BuildError> {
    let reader = crate::layer::open_layer(store, &layer.descriptor.digest)?;
    let mut hashing = kiln_cachestore::digest::HashingReader::new(reader);
    let extracted = match into {
        UnpackInto::Dir => extract::extract_layer_dir(root, &mut hashing),
        UnpackInto::Root { keep } => extract::extract_layer_keeping(root, &mut hashing, keep),
    };
    extracted.map_err(|e| BuildError::Layer {
        layer: layer.descriptor.digest.clone(),
        message: e.to_string(),
    })?;
    let diff_id = hashing
        .finish()
        .map_err(|e| BuildError::io(&layer.descriptor.digest, e))?;
    if diff_id != layer.diff_id {
        return Err(BuildError::Layer {
            layer: layer.descriptor.digest.clone(),
            message: format!(
                "diff_id mismatch: config says {}, content is {diff_id}",
                layer.diff_id
            ),
        });
    }
    Ok(())
}

/// Copies a whole root, keeping owners, modes, links, devices and xattrs.
fn copy_tree(src: &Path, dest: &Path) -> Result<(), BuildError> {
    std::fs::create_dir_all(dest).at(dest)?;
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dest)
        .status()
        .at(dest)?;
    if !status.success() {
        return Err(BuildError::Invalid(format!(
            "copying {} to {} failed",
            src.display(),
            dest.display()
        )));
    }
    Ok(())
}

/// Whether the overlay snapshotter may run at all: not turned off, with
/// the namespaces isolation it mounts in, and a layer per step.
pub fn overlay_wanted(
    snapshotter: Snapshotter,
    isolation: run::Isolation,
    single_snapshot: bool,
) -> bool {
    snapshotter != Snapshotter::Walk && isolation == run::Isolation::Namespaces && !single_snapshot
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
