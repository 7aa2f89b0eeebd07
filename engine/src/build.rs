//! The builder: walks the plan's stages, materializes each root, runs the
//! steps that change files, turns each change into a layer, and assembles
//! the target stage's image. It emits events and prints nothing.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_cachestore::manifest::{self, Descriptor, ResolvedManifest};
use kiln_cachestore::{layout, registry, BlobStore, Platform, RegistryClient};

use crate::dockerfile::{self, Dockerfile, StageGraph};
use crate::error::{BuildError, IoContext};
use crate::exec::copy::{self, CopyRequest, Source};
use crate::exec::run::{self, EtcFiles, MountPoints, RunSpec};
use crate::exec::users;
use crate::image::{self, History, ImageConfig, Layer};
use crate::layer::{Compression, LayerWriter};
use crate::output::BuiltImage;
use crate::plan::{self, Action, Base, CopyFrom, Plan, StagePlan, Step};
use crate::rootfs::snapshot::{Changes, Snapshot, SnapshotMode};
use crate::rootfs::{create_dir_all_in_root, extract, relative_to_root};

/// Contents of these directories are never committed: they are mounted
/// during RUN.
const SKIP_CONTENTS: &[&str] = &["proc", "sys", "dev"];
const HOSTNAME: &str = "kiln";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The Dockerfile's name as the user gave it, for messages.
    pub dockerfile_name: String,
    pub dockerfile: String,
    pub context: PathBuf,
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
}

/// The result of one stage: its root on disk and its image so far.
struct StageResult {
    root: PathBuf,
    config: ImageConfig,
    layers: Vec<Layer>,
}

pub struct Builder<'a> {
    options: &'a BuildOptions,
    store: &'a BlobStore,
    registry: &'a RegistryClient,
    on_event: &'a (dyn Fn(Event) + Sync),
    /// This build's scratch space under the state dir, removed on drop.
    work: tempfile::TempDir,
    etc: EtcFiles,
}

impl<'a> Builder<'a> {
    pub fn new(
        options: &'a BuildOptions,
        state_dir: &Path,
        store: &'a BlobStore,
        registry: &'a RegistryClient,
        on_event: &'a (dyn Fn(Event) + Sync),
    ) -> Result<Self, BuildError> {
        let builds = state_dir.join("builds");
        std::fs::create_dir_all(&builds).at(&builds)?;
        let work = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&builds)
            .at(&builds)?;
        let etc = EtcFiles::create(&work.path().join("etc"), HOSTNAME).at(work.path())?;
        Ok(Self {
            options,
            store,
            registry,
            on_event,
            work,
            etc,
        })
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
            &frontend_platform(&opts.platform),
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
            source,
        };
        let platform = &self.options.platform;
        let m = if let Some(spec) = reference.strip_prefix("oci-layout://") {
            let (path, tag) = layout::split_layout_reference(spec);
            layout::import(Path::new(path), tag, platform, self.store).map_err(base_error)?
        } else {
            let r = registry::parse_reference(reference).map_err(base_error)?;
            if self.options.insecure_pull {
                self.registry.allow_plain_http(r.resolve_registry());
            }
            let m = self
                .registry
                .pull_manifest(&r, platform)
                .await
                .map_err(base_error)?;
            self.registry
                .pull_blob(&r, &m.manifest.config.digest, self.store)
                .await
                .map_err(base_error)?;
            m
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

    /// Pulls an image's layers (concurrently) and unpacks them into `root`,
    /// checking each diff_id.
    async fn materialize(
        &self,
        reference: &str,
        m: &ResolvedManifest,
        config: &ImageConfig,
        root: &Path,
    ) -> Result<Vec<Layer>, BuildError> {
        if !reference.starts_with("oci-layout://") {
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
                    source,
                })?;
        }
        std::fs::create_dir_all(root).at(root)?;
        let layers: Vec<Layer> = m
            .manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(d, diff_id)| Layer {
                descriptor: d.clone(),
                diff_id: diff_id.clone(),
            })
            .collect();
        let store = self.store;
        tokio::task::block_in_place(|| {
            for layer in &layers {
                unpack_layer(store, layer, root)?;
            }
            Ok::<_, BuildError>(())
        })?;
        Ok(layers)
    }

    /// Builds every needed stage and assembles the target's image.
    pub async fn build(&self) -> Result<BuiltImage, BuildError> {
        let (_df, plan, manifests) = self.plan().await?;
        let mut results: HashMap<usize, StageResult> = HashMap::new();
        let mut image_roots: HashMap<String, PathBuf> = HashMap::new();
        let last_use = plan.last_uses();
        for stage in plan.stages.iter().filter(|s| s.needed) {
            (self.on_event)(Event::Stage {
                index: stage.index,
                name: stage.name.clone(),
                base: stage.base_display.clone(),
            });
            let root = self.work.path().join(format!("stage-{}", stage.index));
            let (config, layers) = match &stage.base {
                Base::Scratch => {
                    std::fs::create_dir_all(&root).at(&root)?;
                    (ImageConfig::default(), Vec::new())
                }
                Base::Image(reference) => {
                    let m = &manifests[reference];
                    let config = self.base_config(m)?;
                    let layers = self.materialize(reference, m, &config, &root).await?;
                    (config, layers)
                }
                Base::Stage(parent) => {
                    let parent_result = &results[parent];
                    // The last reader of a stage takes its root instead of copying it.
                    if last_use.get(parent) == Some(&stage.index) && !stage.copies_from(*parent) {
                        std::fs::rename(&parent_result.root, &root).at(&root)?;
                    } else {
                        copy_tree(&parent_result.root, &root)?;
                    }
                    (parent_result.config.clone(), parent_result.layers.clone())
                }
            };
            let mut result = StageResult {
                root,
                config,
                layers,
            };
            for step in &stage.steps {
                if let Action::Copy {
                    from: CopyFrom::Image(reference),
                    ..
                } = &step.action
                {
                    if !image_roots.contains_key(reference) {
                        let (m, config) = self.fetch_image(reference).await?;
                        let dir = self
                            .work
                            .path()
                            .join(format!("image-{}", image_roots.len()));
                        self.materialize(reference, &m, &config, &dir).await?;
                        image_roots.insert(reference.clone(), dir);
                    }
                }
            }
            tokio::task::block_in_place(|| {
                self.run_steps(stage, &mut result, &results, &image_roots)
            })?;
            // Free the roots nobody reads any more.
            let done: Vec<usize> = results
                .keys()
                .copied()
                .filter(|i| last_use.get(i).is_none_or(|last| *last <= stage.index))
                .collect();
            for i in done {
                if let Some(r) = results.remove(&i) {
                    let _ = std::fs::remove_dir_all(&r.root);
                }
            }
            results.insert(stage.index, result);
        }
        let target = results
            .remove(&plan.target)
            .ok_or_else(|| BuildError::Invalid("the target stage was not built".into()))?;
        self.assemble(target)
    }

    fn base_config(&self, m: &ResolvedManifest) -> Result<ImageConfig, BuildError> {
        let bytes = self.store.read(&m.manifest.config.digest)?;
        serde_json::from_slice(&bytes).map_err(|e| BuildError::Layer {
            layer: m.manifest.config.digest.clone(),
            message: e.to_string(),
        })
    }

    fn created(&self) -> String {
        let secs = self.options.fixed_time.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .to_string()
    }

    fn history(&self, created_by: &str, empty_layer: bool) -> History {
        History {
            created: Some(self.created()),
            created_by: Some(created_by.to_string()),
            comment: Some("kiln".into()),
            empty_layer,
            ..Default::default()
        }
    }

    fn run_steps(
        &self,
        stage: &StagePlan,
        result: &mut StageResult,
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<(), BuildError> {
        let root = result.root.clone();
        let opts = self.options;
        let mut snapshot =
            Snapshot::scan(&root, opts.snapshot_mode, SKIP_CONTENTS, &opts.ignore_paths)
                .at(&root)?;
        // --single-snapshot: one layer for the whole stage, against its base.
        let mut base_state = opts.single_snapshot.then(|| snapshot.clone());
        for step in &stage.steps {
            (self.on_event)(Event::Step {
                line: step.line,
                text: step.created_by.clone(),
            });
            let changes = self
                .run_step(step, &root, &mut snapshot, stages, image_roots)
                .map_err(|message| BuildError::Step {
                    file: self.options.dockerfile_name.clone(),
                    line: step.line,
                    instruction: step.keyword.clone(),
                    message,
                })?;
            let empty_layer = changes.is_empty() || base_state.is_some();
            if !empty_layer {
                result.layers.push(self.write_layer(&root, &changes)?);
            }
            result
                .config
                .history
                .push(self.history(&step.created_by, empty_layer));
        }
        if let Some(base) = &mut base_state {
            let changes = base.rescan(&root, &[PathBuf::new()]).at(&root)?;
            if !changes.is_empty() {
                result.layers.push(self.write_layer(&root, &changes)?);
                result
                    .config
                    .history
                    .push(self.history("kiln --single-snapshot", false));
            }
        }
        // The plan computed the stage's final config; keep the layers' history.
        let history = std::mem::take(&mut result.config.history);
        result.config = ImageConfig {
            history,
            ..stage.config.clone()
        };
        Ok(())
    }

    /// Runs one step and returns what it changed in the root.
    fn run_step(
        &self,
        step: &Step,
        root: &Path,
        snapshot: &mut Snapshot,
        stages: &HashMap<usize, StageResult>,
        image_roots: &HashMap<String, PathBuf>,
    ) -> Result<Changes, String> {
        let io = |e: std::io::Error| e.to_string();
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
                snapshot.rescan(root, &touched).map_err(io)
            }
            Action::Run {
                argv,
                env,
                user,
                workdir,
                script,
            } => {
                let identity = users::resolve_user(root, user)?;
                create_dir_all_in_root(root, Path::new(workdir)).map_err(io)?;
                let mounts = MountPoints::prepare(root, &self.etc).map_err(io)?;
                let spec = RunSpec {
                    root: root.to_path_buf(),
                    argv: argv.clone(),
                    env: run::run_env(env, &identity, HOSTNAME),
                    cwd: workdir.clone(),
                    uid: identity.uid,
                    gid: identity.gid,
                    groups: identity.groups.clone(),
                    hostname: HOSTNAME.into(),
                    mounts,
                    script: script.clone(),
                };
                let code = run::run(&spec);
                spec.mounts.cleanup().map_err(io)?;
                match code.map_err(io)? {
                    0 => snapshot.rescan(root, &[PathBuf::new()]).map_err(io),
                    code => Err(format!("{argv:?} returned a non-zero code: {code}")),
                }
            }
            Action::Copy {
                from,
                sources,
                dest,
                chown,
                chmod,
            } => {
                let source = match from {
                    CopyFrom::Context => Source::Context(&self.options.context),
                    CopyFrom::Stage(i) => Source::Root(&stages[i].root),
                    CopyFrom::Image(r) => Source::Root(&image_roots[r]),
                };
                let chown = chown
                    .as_deref()
                    .map(|spec| users::resolve_chown(root, spec))
                    .transpose()?;
                let touched = copy::copy(
                    &CopyRequest {
                        source,
                        sources,
                        dest,
                        chown,
                        chmod: *chmod,
                    },
                    root,
                )?;
                snapshot.rescan(root, &touched).map_err(io)
            }
        }
    }

    /// Writes the changes as a layer: changed paths with their parent
    /// directories (so a layer alone restores their metadata), then
    /// whiteouts for what was deleted.
    fn write_layer(&self, root: &Path, changes: &Changes) -> Result<Layer, BuildError> {
        let mut paths = std::collections::BTreeSet::new();
        for p in changes.upserts.iter().chain(&changes.deletes) {
            paths.extend(p.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()));
        }
        paths.extend(changes.upserts.iter().map(PathBuf::as_path));
        let mut writer = LayerWriter::new(
            self.store,
            self.options.compression,
            self.options.fixed_time,
        )?;
        for p in paths {
            writer.add(root, p)?;
        }
        for p in &changes.deletes {
            writer.whiteout(p)?;
        }
        let layer = writer.finish()?;
        (self.on_event)(Event::Layer {
            digest: layer.descriptor.digest.clone(),
            size: layer.descriptor.size,
        });
        Ok(layer)
    }

    /// Writes the config and manifest of the target stage into the store.
    fn assemble(&self, target: StageResult) -> Result<BuiltImage, BuildError> {
        let mut config = target.config;
        config.rootfs.diff_ids = target.layers.iter().map(|l| l.diff_id.clone()).collect();
        config.created = Some(self.created());
        let bytes = serde_json::to_vec(&config).expect("a config always serializes");
        let stored = self.store.put(&bytes)?;
        let config_desc = Descriptor {
            media_type: manifest::OCI_CONFIG.into(),
            digest: stored.digest,
            size: stored.size,
            platform: None,
            annotations: None,
        };
        let manifest_bytes = image::manifest_bytes(&config_desc, &target.layers);
        let stored = self.store.put(&manifest_bytes)?;
        Ok(BuiltImage {
            manifest: Descriptor {
                media_type: manifest::OCI_MANIFEST.into(),
                digest: stored.digest,
                size: stored.size,
                platform: None,
                annotations: None,
            },
            config: config_desc,
            layers: target.layers,
        })
    }
}

/// Unpacks one stored layer into `root`, checking its diff_id.
fn unpack_layer(store: &BlobStore, layer: &Layer, root: &Path) -> Result<(), BuildError> {
    let reader = crate::layer::open_layer(store, &layer.descriptor.digest)?;
    let mut hashing = kiln_cachestore::digest::HashingReader::new(reader);
    extract::extract_layer(root, &mut hashing).map_err(|e| BuildError::Layer {
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

fn frontend_platform(p: &Platform) -> dockerfile::Platform {
    dockerfile::Platform {
        os: p.os.clone(),
        architecture: p.architecture.clone(),
        variant: p.variant.clone(),
    }
}
