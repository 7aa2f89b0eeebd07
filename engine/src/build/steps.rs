//! Running a stage's steps: hits contribute their cached layers, misses
//! run (on a walked root, or on an overlay with the overlay snapshotter)
//! and their changes are written as layers.
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_cachestore::digest::Digest;
use kiln_cachestore::unpacked::UnpackedLayers;
use kiln_cachestore::StepEntry;

use super::blobs::{layer_names, BlobSource, LayerForm, Written};
use super::cache::Hit;
use super::events::{phase_delta, CacheResult, Event, StepReport};
use super::roots::OnDisk;
use super::{Builder, StageResult, HOSTNAME};
use crate::error::{BuildError, IoContext, StepFailure};
use crate::excerpt::excerpt;
use crate::exec::copy::{self, CopyRequest, Source};
use crate::exec::mounts::{self, MountInputs, SourceRoots};
use crate::exec::run::{self, MountPoints, RunSpec};
use crate::exec::users;
use crate::image::{History, ImageConfig, Layer};
use crate::plan::{Action, CopyFrom, Network, StagePlan, Step};
use crate::rootfs::meta_view::{LayerTable, MetaView};
use crate::rootfs::snapshot::{Changes, Snapshot};
use crate::rootfs::{create_dir_all_in_root, relative_to_root};
use crate::rootfs::{overlay, owners};

/// Whether the metadata view may serve `step` (it falls back to the root
/// when what the step reaches is beyond it).
pub(super) fn view_serves(step: &Step) -> bool {
    view_dests(step).is_some()
}

/// Where a step the metadata view can serve writes (absolute paths in the
/// image); `None` for a step that needs the whole root.
fn view_dests(step: &Step) -> Option<Vec<PathBuf>> {
    match &step.action {
        Action::Mkdir { paths, .. } => Some(paths.iter().map(PathBuf::from).collect()),
        Action::Copy {
            dest, add: None, ..
        } => Some(vec![PathBuf::from(dest)]),
        _ => None,
    }
}

impl Builder<'_> {
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
    /// when the root is on disk), misses run and are recorded. With `lazy`,
    /// the layers the overlay snapshotter writes are lazy (`blobs.rs`).
    ///
    /// A stage not on disk builds its COPY and WORKDIR misses on the
    /// metadata view of its layers ([`MetaView`]); the first miss the view
    /// cannot serve puts the stage on disk with `make_root` (given the
    /// layers so far) and the steps from there run on it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_steps(
        &self,
        stage: &StagePlan,
        result: &mut StageResult,
        keys: &[Option<String>],
        hits: &[Option<Hit>],
        reads: &SourceRoots,
        lazy: bool,
        make_root: &mut dyn FnMut(&[Layer]) -> Result<OnDisk, BuildError>,
    ) -> Result<Vec<(String, StepEntry)>, BuildError> {
        let opts = self.options;
        let mut root = result.on_disk.as_ref().map(|d| d.dir.clone());
        // With the overlay snapshotter, the layers the next step runs on
        // (bottom first); no snapshot of the root is ever taken.
        let (mut unpacked, mut lowers) = match root {
            Some(_) => self.overlay_lowers(&result.layers)?,
            None => (None, None),
        };
        // The metadata view of the layers so far, made at the first miss
        // of a stage not on disk; `Some(None)`: it cannot serve this stage.
        let mut view: Option<Option<MetaView>> = None;
        // Taken lazily, right before the first step that runs.
        let mut snapshot: Option<Snapshot> = None;
        // A layer a step writes on disk gets its metadata table as it is
        // written when a later step of the stage may be built on the view:
        // the next build that hits up to that step reads no blob back.
        let table_wanted =
            |index: usize| self.view_allowed() && stage.steps[index + 1..].iter().any(view_serves);
        // --single-snapshot: one layer for the whole stage, against its base.
        let mut base_state: Option<Snapshot> = None;
        let mut entries = Vec::new();
        let reuse_keys = crate::key::reuse_keys(
            &stage.steps,
            keys,
            &result.last_key,
            &stage.platform.to_string(),
        );
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
        // A RUN to run in this stage: its runner's zygote starts now, while
        // the steps before it run (`exec/zygote.rs`).
        let runs = stage
            .steps
            .iter()
            .zip(keys)
            .zip(hits)
            .any(|((step, key), hit)| {
                matches!(step.action, Action::Run { .. }) && key.is_some() && hit.is_none()
            });
        if runs && opts.isolation != run::Isolation::None && opts.run_unavailable.is_none() {
            self.roots.sys().runs_ahead();
        }
        for (index, ((step, key), hit)) in stage.steps.iter().zip(keys).zip(hits).enumerate() {
            (self.on_event)(Event::Step {
                stage: stage.index,
                index,
                line: step.line,
                text: excerpt(&step.created_by).to_string(),
            });
            let (started, phases_before) = (Instant::now(), self.counters.phases());
            self.new_layers.step(self.cacheable(step));
            if let (Some(_), None) = (key, hit) {
                self.expect_layer();
            }
            // A miss with no root: built on the view, or the root is made.
            let mut served = None;
            if let (Some(_), None, None) = (key, hit, &root) {
                if view.is_none() && self.view_allowed() && view_serves(step) {
                    view = Some(self.meta_view(&result.layers)?);
                }
                let on_view = view.as_mut().and_then(Option::as_mut);
                served = match on_view {
                    Some(view) => self.run_on_view(step, view, reads)?,
                    None => None,
                };
                if served.is_none() {
                    let on_disk = make_root(&result.layers)?;
                    root = Some(on_disk.dir.clone());
                    result.on_disk = Some(on_disk);
                    (unpacked, lowers) = self.overlay_lowers(&result.layers)?;
                    view = Some(None);
                }
            }
            let cache = match (key, hit) {
                (None, _) => None,
                (Some(_), Some(hit)) if hit.remote => Some(CacheResult::RemoteHit),
                (Some(_), Some(_)) => Some(CacheResult::LocalHit),
                (Some(_), None) => Some(CacheResult::Miss),
            };
            let (layer, empty_layer) = match (key, hit, &root) {
                (None, _, _) => (None, true),
                (Some(key), None, _) if served.is_some() => {
                    self.counters.miss();
                    time = Some(now);
                    let layer = served.flatten();
                    if self.cacheable(step) {
                        entries.push((
                            key.clone(),
                            StepEntry {
                                layer: layer.clone(),
                                created: now,
                                lazy: None,
                            },
                        ));
                    }
                    let empty = layer.is_none();
                    (layer, empty)
                }
                (Some(_), Some(hit), _) => {
                    self.counters.hit();
                    time = Some(hit.created);
                    let cached = &hit.layer;
                    // A view in use takes the hit's layer too.
                    if let (Some(inner @ Some(_)), Some(layer)) = (&mut view, cached) {
                        match self.layer_table(layer) {
                            Some(table) => inner.as_mut().expect("in use").push(table),
                            None => *inner = None,
                        }
                    }
                    match (&root, cached, &mut lowers, unpacked) {
                        (Some(_), Some(layer), Some(lowers), Some(unpacked)) => {
                            lowers.push(self.roots.layer_dir(unpacked, layer)?);
                        }
                        (Some(root), Some(layer), _, _) => {
                            self.roots.unpack_onto(layer, root)?;
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
                    let (layer, recipe) = match (&mut lowers, unpacked) {
                        (Some(lowers), Some(unpacked)) => {
                            let reuse_key = reuse_keys[index].as_deref();
                            let table = table_wanted(index);
                            self.run_stacked(
                                step, root, lowers, unpacked, reads, lazy, reuse_key, table,
                            )?
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
                                .run_step(step, root, snapshot.as_mut(), reads, None)
                                .map_err(|message| self.step_error(step, message))?;
                            self.counters.timed("run", start);
                            match changes.is_empty() || opts.single_snapshot {
                                true => (None, None),
                                false => {
                                    let table = table_wanted(index);
                                    (Some(self.write_layer(root, &changes, table)?), None)
                                }
                            }
                        }
                    };
                    let cacheable = self.cacheable(step);
                    if let (Some(layer), Some(recipe)) = (&layer, &recipe) {
                        let keys = cacheable.then(|| key.clone()).into_iter().collect();
                        let recipe = recipe.clone();
                        self.pending
                            .add(&layer.descriptor.digest, BlobSource::Lazy { recipe, keys });
                    }
                    // (Never with --single-snapshot: no per-step layer.)
                    if cacheable {
                        entries.push((
                            key.clone(),
                            StepEntry {
                                layer: layer.clone(),
                                created: now,
                                lazy: recipe,
                            },
                        ));
                    }
                    let empty = layer.is_none();
                    (layer, empty)
                }
                (Some(_), None, None) => unreachable!("a stage with a miss is on disk"),
            };
            (self.on_event)(Event::StepDone(StepReport {
                stage: stage.index,
                index,
                line: step.line,
                text: step.created_by.clone(),
                cache,
                layer: layer
                    .as_ref()
                    .map(|l| (l.descriptor.digest.clone(), l.descriptor.size)),
                duration: started.elapsed(),
                phases: phase_delta(&phases_before, &self.counters.phases()),
            }));
            result.layers.extend(layer);
            result
                .config
                .history
                .push(self.history(&step.created_by, empty_layer, time));
        }
        result.built = time.or(result.built);
        if let (Some(lowers), Some(root)) = (&lowers, &root) {
            // Later stages read this one's files there.
            result.on_disk.as_mut().expect("on disk").view = self.roots.view(lowers, root)?;
        }
        if let (Some(base), Some(root)) = (&mut base_state, &root) {
            let changes = base.rescan(root, &[PathBuf::new()]).at(root)?;
            if !changes.is_empty() {
                result.layers.push(self.write_layer(root, &changes, false)?);
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
        self.index.defer_steps(&entries)?;
        // The plan computed the stage's final config; keep the layers' history.
        let history = std::mem::take(&mut result.config.history);
        result.config = ImageConfig {
            history,
            ..stage.config.clone()
        };
        Ok(entries)
    }

    /// Runs a step with the overlay snapshotter: on a fresh upper dir over
    /// `lowers`, mounted at `root`. The upper dir becomes the step's layer
    /// and, pushed onto `lowers`, what the next step runs on. With `lazy`
    /// the layer is only measured, and its recipe returned (`blobs.rs`).
    /// A COPY with a `reuse_key` links the files it would write unchanged
    /// from the layer the previous run under that key made, if still here
    /// (`copy::Reuse`), and records its own layer for the next run. With
    /// `table`, the layer's metadata table is kept (`write_layer_as`).
    #[allow(clippy::too_many_arguments)]
    fn run_stacked(
        &self,
        step: &Step,
        root: &Path,
        lowers: &mut Vec<PathBuf>,
        unpacked: &UnpackedLayers,
        reads: &SourceRoots,
        lazy: bool,
        reuse_key: Option<&str>,
        table: bool,
    ) -> Result<(Option<Layer>, Option<Digest>), BuildError> {
        let start = Instant::now();
        let scratch = self.roots.scratch("step-").at(self.roots.work())?;
        let (upper, work) = (scratch.path().join("upper"), scratch.path().join("work"));
        for dir in [&upper, &work] {
            std::fs::create_dir(dir).at(dir)?;
        }
        // A record that cannot be read only costs the reuse.
        let previous = reuse_key.and_then(|key| {
            unpacked
                .made_by(key)
                .inspect_err(|e| tracing::warn!(error = %e, "the layer a COPY made before"))
                .ok()
                .flatten()
        });
        let reuse = previous.map(|dir| copy::Reuse::new(dir, root.to_path_buf()));
        let since = std::time::SystemTime::now();
        let mounted = self.roots.mount_step(lowers, (&upper, &work), root)?;
        let ran = self.run_step(step, root, None, reads, reuse.as_ref());
        drop(mounted);
        ran.map_err(|message| self.step_error(step, message))?;
        if let Some(reuse) = &reuse {
            let linked = reuse
                .link_into(&upper)
                .map_err(|e| self.step_error(step, e))?;
            self.counters.reused(linked);
        }
        let changes = overlay::settle_upper(&upper, lowers, &self.recorded, since).at(&upper)?;
        self.counters.timed("run", start);
        if changes.is_empty() {
            return Ok((None, None));
        }
        let form = match lazy {
            true => LayerForm::Lazy,
            false => LayerForm::Blob,
        };
        let Written { layer, recipe, .. } = self.write_layer_as(&upper, &changes, form, table)?;
        lowers.push(unpacked.insert(&layer.diff_id, &upper)?);
        if let Some(key) = reuse_key {
            // Only the next run's speed depends on it.
            if let Err(e) = unpacked.record_made_by(key, &layer.diff_id) {
                tracing::warn!(error = %e, "recording the layer a COPY made");
            }
        }
        Ok((Some(layer), recipe))
    }

    /// Runs one step and returns what it changed in the root (nothing
    /// without a snapshot: the overlay snapshotter reads its upper dir).
    fn run_step(
        &self,
        step: &Step,
        root: &Path,
        snapshot: Option<&mut Snapshot>,
        reads: &SourceRoots,
        reuse: Option<&copy::Reuse>,
    ) -> Result<Changes, StepFailure> {
        let rescan = |root: &Path, touched: &[PathBuf]| match snapshot {
            Some(snapshot) => snapshot.rescan(root, touched).map_err(StepFailure::from),
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
                let recorded = owners::recorded();
                for path in paths {
                    let (_, created) = create_dir_all_in_root(root, Path::new(path))?;
                    for dir in &created {
                        owners::chown(dir, (uid, gid), recorded)?;
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
                if let Some(why) = &self.options.run_unavailable {
                    return Err(StepFailure::NoIsolation { why: why.clone() });
                }
                let isolation = self.options.isolation;
                if matches!(isolation, run::Isolation::Chroot | run::Isolation::None)
                    && (!planned.is_empty() || *network == Network::None)
                {
                    return Err(format!(
                        "RUN --mount and --network=none need namespaces: not available with --isolation {isolation}"
                    )
                    .into());
                }
                let identity = users::resolve_user(root, user)?;
                create_dir_all_in_root(root, Path::new(workdir))?;
                let mut mounts = match isolation {
                    // The machine's own /proc, /dev and /etc files.
                    run::Isolation::None => MountPoints::host(root),
                    _ => MountPoints::prepare(root, &self.etc)?,
                };
                let mut env = run::run_env(env, &identity, HOSTNAME);
                let scratch = self.roots.scratch("mounts-")?;
                let inputs = MountInputs {
                    context: &self.options.context,
                    dockerignore: &self.options.dockerignore,
                    state: &self.state,
                    secrets: &self.options.secrets,
                    roots: reads,
                };
                let prepared = mounts::prepare(
                    planned,
                    root,
                    &mut mounts,
                    &mut env,
                    scratch.path(),
                    &inputs,
                );
                let _locks = match prepared {
                    Ok(locks) => locks,
                    Err(e) => {
                        mounts.cleanup()?;
                        return Err(e.into());
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
                let code = self.roots.sys().run(&spec);
                spec.mounts.cleanup()?;
                match code? {
                    0 => rescan(root, &[PathBuf::new()]),
                    code => Err(StepFailure::Exited {
                        argv: argv.clone(),
                        code,
                    }),
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
                let (inline_dir, from_root);
                let source = match from {
                    CopyFrom::Context => Source::Context(&self.options.context),
                    CopyFrom::Inline(files) => {
                        inline_dir = self.roots.scratch("heredoc-")?;
                        for (name, content) in files {
                            let path = inline_dir.path().join(name);
                            std::fs::write(&path, content)?;
                            std::fs::set_permissions(
                                &path,
                                std::os::unix::fs::PermissionsExt::from_mode(0o644),
                            )?;
                        }
                        Source::Context(inline_dir.path())
                    }
                    CopyFrom::Stage(_) | CopyFrom::Image(_) => {
                        from_root = reads.get(from, &self.options.context);
                        Source::Root(&from_root)
                    }
                };
                let chown = chown
                    .as_deref()
                    .map(|spec| users::resolve_chown(root, spec))
                    .transpose()?;
                let ignore = match from {
                    CopyFrom::Context => Some(&self.options.dockerignore),
                    _ => None,
                };
                let request = CopyRequest {
                    source,
                    sources,
                    dest,
                    chown,
                    chmod: *chmod,
                    ignore,
                    excludes,
                    parents: *parents,
                };
                let touched = match (add, reuse) {
                    (None, Some(reuse)) => copy::copy_reusing(&request, root, reuse)?,
                    (None, None) => copy::copy(&request, root)?,
                    (Some(spec), _) => crate::exec::add::add(
                        &crate::exec::add::AddRequest {
                            copy: request,
                            keep_git_dir: spec.keep_git_dir,
                            checksum: spec.checksum.as_deref(),
                            unpack: spec.unpack,
                            scratch: self.roots.work(),
                            resolved: &self.resolved(),
                        },
                        root,
                    )?,
                };
                rescan(root, &touched)
            }
        }
    }

    /// With the overlay snapshotter, its unpacked layers and the dirs of
    /// `layers` in it (bottom first), which the next step runs on.
    fn overlay_lowers(
        &self,
        layers: &[Layer],
    ) -> Result<(Option<&UnpackedLayers>, Option<Vec<PathBuf>>), BuildError> {
        let unpacked = self.roots.unpacked()?;
        let lowers = match unpacked {
            Some(unpacked) => Some(self.roots.layer_dirs(unpacked, layers)?),
            None => None,
        };
        Ok((unpacked, lowers))
    }

    /// The metadata view of `layers` (`None`: one of them cannot be read
    /// for it, and the stage is built on disk).
    fn meta_view(&self, layers: &[Layer]) -> Result<Option<MetaView>, BuildError> {
        let start = Instant::now();
        if let Some(view) = self.views_ahead.take(layers) {
            self.counters.timed("view", start);
            return Ok(Some(view));
        }
        let mut view = MetaView::default();
        for layer in layers {
            match self.layer_table(layer) {
                Some(table) => view.push(table),
                None => return Ok(None),
            }
        }
        self.counters.timed("view", start);
        Ok(Some(view))
    }

    /// The metadata table of a layer below the step (base or cache hit;
    /// see [`super::tables::layer_table`]), counted when it had to be
    /// read from the blob. `None` when the blob
    /// cannot be read for it.
    fn layer_table(&self, layer: &Layer) -> Option<LayerTable> {
        match super::tables::layer_table(self.store, self.index, layer) {
            Ok(found) => {
                if found.read {
                    self.counters.table_read();
                }
                Some(found.table)
            }
            Err(why) => {
                tracing::debug!(layer = %layer.diff_id, %why, "no metadata view");
                None
            }
        }
    }

    /// Builds a COPY or WORKDIR miss on a sparse root that `view` puts on
    /// disk, snapshotted as a full root would be: its layer (`None` for no
    /// change), which the view then takes. `Ok(None)`: the view cannot
    /// serve the step, and nothing was written.
    fn run_on_view(
        &self,
        step: &Step,
        view: &mut MetaView,
        reads: &SourceRoots,
    ) -> Result<Option<Option<Layer>>, BuildError> {
        let Some(dests) = view_dests(step) else {
            return Ok(None);
        };
        let work = self.roots.work();
        let scratch = self.roots.scratch("view-").at(work)?;
        let root = scratch.path();
        let start = Instant::now();
        if let Err(why) = view.materialize(root, &dests) {
            tracing::debug!(step = %step.created_by, %why, "built on an unpacked root");
            return Ok(None);
        }
        let mut snapshot =
            Snapshot::scan(root, self.options.snapshot_mode, self.recorded.clone()).at(root)?;
        self.counters.timed("view", start);
        let start = Instant::now();
        let changes = self
            .run_step(step, root, Some(&mut snapshot), reads, None)
            .map_err(|message| self.step_error(step, message))?;
        self.counters.timed("run", start);
        if changes.is_empty() {
            return Ok(Some(None));
        }
        let written = self.write_layer_as(root, &changes, LayerForm::Blob, true)?;
        let Some(table) = written.table else {
            return Err(BuildError::Invalid(format!(
                "the metadata view cannot take the layer just written ({})",
                written.layer.diff_id
            )));
        };
        view.push(table);
        Ok(Some(Some(written.layer)))
    }

    /// Writes the changes as a compressed layer.
    fn write_layer(
        &self,
        root: &Path,
        changes: &Changes,
        table: bool,
    ) -> Result<Layer, BuildError> {
        self.write_layer_as(root, changes, LayerForm::Blob, table)
            .map(|written| written.layer)
    }

    /// Writes the changes as a layer (see [`layer_names`]) in `form`. With
    /// `table`, its metadata table, made from the tar as it is written
    /// rather than read back from the blob, goes to the index too.
    fn write_layer_as(
        &self,
        root: &Path,
        changes: &Changes,
        form: LayerForm,
        table: bool,
    ) -> Result<Written, BuildError> {
        let start = Instant::now();
        let written = self.write_names_layer(root, layer_names(changes), form, table)?;
        if let Some(table) = &written.table {
            super::tables::put_table(self.index, &written.layer, table);
        }
        self.counters.timed("layers", start);
        (self.on_event)(Event::Layer {
            digest: written.layer.descriptor.digest.clone(),
            size: written.layer.descriptor.size,
        });
        Ok(written)
    }
}
