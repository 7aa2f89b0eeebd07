//! How a stage's root is made, in one place: a plain tree the layers are
//! unpacked into (the walk snapshotter), a mount point each step stacks
//! its overlay on (the overlay snapshotter), or the machine's own `/`
//! (`--isolation none`), and the read-only trees `COPY --from` reads.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kiln_cachestore::state::StateDir;
use kiln_cachestore::unpacked::UnpackedLayers;
use kiln_cachestore::{BlobStore, Index};

use super::events::{Counters, Event};
use super::options::{overlay_wanted, BuildOptions, Snapshotter};
use super::probe;
use super::scratch::{Scratch, ScratchDir};
use super::syscalls::{Mount, Syscalls, UnpackInto};
use super::unpack::{Arrivals, Unpacker};
use super::StageResult;
use crate::error::{BuildError, IoContext};
use crate::exec::run::Isolation;
use crate::image::Layer;
use crate::plan::{Base, StagePlan};

/// The root every stage is built in with `--isolation none`.
pub(crate) const HOST_ROOT: &str = "/";

/// A tree on disk that steps read or run in: a stage's root, or an image
/// that `COPY --from` reads. With the overlay snapshotter, `view` is the
/// read-only overlay of its layers mounted at `dir`.
pub(crate) struct OnDisk {
    pub(crate) dir: PathBuf,
    pub(crate) view: Option<Mount>,
}

impl OnDisk {
    fn plain(dir: PathBuf) -> OnDisk {
        OnDisk { dir, view: None }
    }

    /// Unmounts and deletes the tree (never the machine's own `/`).
    pub(crate) fn remove(self) {
        drop(self.view);
        if self.dir != Path::new(HOST_ROOT) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a stage that runs steps gets its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootChoice {
    /// The overlay snapshotter: an empty mount point, on which each step
    /// mounts its own overlay of the layers so far.
    MountPoint,
    /// The parent stage's root, taken whole: this stage is its last reader
    /// and copies nothing from it (with `--isolation none`, it is already
    /// in place at `/`).
    TakeParent,
    /// A copy of the parent stage's root, which a later stage still reads.
    CopyParent,
    /// The stage's layers unpacked onto a fresh root (the machine's `/`
    /// cleared first).
    Unpack,
}

impl RootChoice {
    /// `parent`: the parent stage's root on disk, if any, and whether this
    /// stage is its last reader that copies nothing from it.
    pub(crate) fn decide(
        overlay: bool,
        root: &Path,
        host: bool,
        parent: Option<(Option<&Path>, bool)>,
    ) -> RootChoice {
        match parent {
            _ if overlay => RootChoice::MountPoint,
            // On the host, a parent's root is usable only if it is `/` itself.
            Some((Some(at), true)) if !host || at == root => RootChoice::TakeParent,
            Some((Some(_), false)) if !host => RootChoice::CopyParent,
            _ => RootChoice::Unpack,
        }
    }
}

pub(crate) struct Roots<'a> {
    sys: &'a dyn Syscalls,
    unpacker: Unpacker<'a>,
    options: &'a BuildOptions,
    on_event: &'a (dyn Fn(Event) + Sync),
    counters: Arc<Counters>,
    state: StateDir,
    /// This build's scratch space.
    work: PathBuf,
    /// An empty dir: the lowest layer of a stack that has none.
    empty: PathBuf,
    /// `--isolation none`: what clearing and unpacking over `/` spare.
    host_keep: Vec<PathBuf>,
    /// The overlay snapshotter's unpacked layers (`None`: the walk
    /// snapshotter), decided when a step first has to run: a fully cached
    /// build never mounts the probe (its unmount alone syncs for ms).
    unpacked: OnceLock<Option<UnpackedLayers>>,
    scratch: Scratch,
}

impl<'a> Roots<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sys: &'a dyn Syscalls,
        store: &'a BlobStore,
        index: &'a Index,
        options: &'a BuildOptions,
        on_event: &'a (dyn Fn(Event) + Sync),
        counters: Arc<Counters>,
        state: StateDir,
        work: &Path,
        host_keep: Vec<PathBuf>,
    ) -> Result<Self, BuildError> {
        let empty = work.join("empty");
        std::fs::create_dir(&empty).at(&empty)?;
        Ok(Roots {
            sys,
            unpacker: Unpacker {
                sys,
                store,
                work: work.to_path_buf(),
                arrivals: Arrivals::default(),
                index,
                tables_made: Default::default(),
            },
            options,
            on_event,
            counters,
            state,
            work: work.to_path_buf(),
            empty,
            host_keep,
            unpacked: OnceLock::new(),
            scratch: Scratch::new(work),
        })
    }

    pub(crate) fn sys(&self) -> &dyn Syscalls {
        self.sys
    }

    pub(crate) fn work(&self) -> &Path {
        &self.work
    }

    /// A step's scratch dir in the build's dir (see [`Scratch`]).
    pub(crate) fn scratch(&self, prefix: &str) -> std::io::Result<ScratchDir<'_>> {
        self.scratch.dir(prefix)
    }

    /// Removes a stage's tree on another thread (see [`Scratch`]).
    pub(crate) fn remove_later(&self, tree: OnDisk) {
        self.scratch.later(move || tree.remove());
    }

    /// The blobs being fetched while layers unpack.
    pub(crate) fn arrivals(&self) -> &Arrivals {
        &self.unpacker.arrivals
    }

    /// Where a stage that runs steps is built.
    fn stage_dir(&self, stage: usize) -> PathBuf {
        match self.options.isolation {
            Isolation::None => PathBuf::from(HOST_ROOT),
            _ => self.work.join(format!("stage-{stage}")),
        }
    }

    /// The overlay snapshotter's unpacked layers, or `None` for the walk
    /// snapshotter: decided once, by [`Self::overlay_usable`].
    pub(crate) fn unpacked(&self) -> Result<Option<&UnpackedLayers>, BuildError> {
        if let Some(decided) = self.unpacked.get() {
            return Ok(decided.as_ref());
        }
        let decided = match self.overlay_usable() {
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
    /// in Kiln's own mount namespace (see `probe.rs`).
    fn overlay_usable(&self) -> Result<bool, String> {
        let options = self.options;
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
        probe::overlay_mountable(self.sys, &self.state, &self.work, &self.empty)?;
        Ok(true)
    }

    /// Puts on disk the root of a stage that runs steps, as [`RootChoice`]
    /// decides. `results` are the stages built so far: a parent's root may
    /// be taken or copied, and on the host every root at `/` is gone.
    pub(crate) fn stage_root(
        &self,
        stage: &StagePlan,
        layers: &[Layer],
        results: &mut HashMap<usize, StageResult>,
        last_use: &HashMap<usize, usize>,
    ) -> Result<OnDisk, BuildError> {
        let root = self.stage_dir(stage.index);
        let host = self.options.isolation == Isolation::None;
        let overlay = self.unpacked()?.is_some();
        let parent = match &stage.base {
            Base::Stage(p) => Some(*p),
            _ => None,
        };
        let choice = RootChoice::decide(
            overlay,
            &root,
            host,
            parent.map(|p| {
                let at = results[&p].on_disk.as_ref().map(|d| d.dir.as_path());
                // The last reader of a parent stage that copies nothing
                // from it takes its root instead of copying it.
                let takes = last_use.get(&p) == Some(&stage.index) && !stage.copies_from(p);
                (at, takes)
            }),
        );
        let parent_root = |results: &mut HashMap<usize, StageResult>| {
            let p = parent.expect("a stage base");
            results.get_mut(&p).expect("parent built").on_disk.take()
        };
        match choice {
            RootChoice::MountPoint => std::fs::create_dir_all(&root).at(&root)?,
            RootChoice::TakeParent if host => {}
            RootChoice::TakeParent => {
                let taken = parent_root(results).expect("decided on disk");
                // Its view (if any) goes: the stage's steps run on the tree.
                std::fs::rename(&taken.dir, &root).at(&root)?;
            }
            RootChoice::CopyParent => {
                let p = parent.expect("a stage base");
                let from = &results[&p].on_disk.as_ref().expect("decided on disk").dir;
                copy_tree(from, &root)?;
            }
            RootChoice::Unpack => {
                if host {
                    crate::rootfs::clear_root(&root, &self.host_keep).at(&root)?;
                }
                self.unpack_all(layers, &root)?;
            }
        }
        // The machine's `/` now holds this stage: earlier stages built there
        // are found unpacked elsewhere by later readers.
        if host {
            for earlier in results.values_mut() {
                if earlier.on_disk.as_ref().is_some_and(|d| d.dir == root) {
                    earlier.on_disk = None;
                }
            }
        }
        Ok(OnDisk::plain(root))
    }

    /// A read-only tree of `layers` at `dir`, for `COPY --from` and mounts:
    /// unpacked there, or with the overlay snapshotter an overlay of their
    /// unpacked directories.
    pub(crate) fn materialize(&self, layers: &[Layer], dir: PathBuf) -> Result<OnDisk, BuildError> {
        let Some(unpacked) = self.unpacked()? else {
            self.unpack_all(layers, &dir)?;
            return Ok(OnDisk::plain(dir));
        };
        std::fs::create_dir_all(&dir).at(&dir)?;
        let view = self.view(&self.layer_dirs(unpacked, layers)?, &dir)?;
        Ok(OnDisk { dir, view })
    }

    /// A read-only overlay of `lowers` at `dir` (nothing for no layers).
    pub(crate) fn view(&self, lowers: &[PathBuf], dir: &Path) -> Result<Option<Mount>, BuildError> {
        if lowers.is_empty() {
            return Ok(None);
        }
        let mut all = vec![self.empty.clone()];
        all.extend_from_slice(lowers);
        let mounted = self.sys.mount_overlay(&all, None, dir);
        Ok(Some(self.probed(mounted).at(dir)?))
    }

    /// A writable overlay of `lowers` (or of nothing) at `root`, writing
    /// into `upper`: where the overlay snapshotter runs a step.
    pub(crate) fn mount_step(
        &self,
        lowers: &[PathBuf],
        upper: (&Path, &Path),
        root: &Path,
    ) -> Result<Mount, BuildError> {
        let stack = match lowers.is_empty() {
            true => std::slice::from_ref(&self.empty),
            false => lowers,
        };
        let mounted = self.sys.mount_overlay(stack, Some(upper), root);
        self.probed(mounted).at(root)
    }

    /// A real mount's result: when it failed, the probe's record may be
    /// wrong, and the next build probes again.
    fn probed(&self, mounted: std::io::Result<Mount>) -> std::io::Result<Mount> {
        mounted.map_err(|e| {
            probe::forget(&self.state);
            std::io::Error::new(
                e.kind(),
                format!("mounting an overlay: {e} (the next build checks overlayfs again)"),
            )
        })
    }

    /// What unpacking over `root` must leave alone: on the machine's own
    /// `/` (`--isolation none`), the host keep list.
    fn kept(&self, root: &Path) -> UnpackInto<'_> {
        let keep = match root == Path::new(HOST_ROOT) {
            true => &self.host_keep[..],
            false => &[],
        };
        UnpackInto::Root { keep }
    }

    /// Unpacks stored layers, in order, into `root` (made if missing).
    pub(crate) fn unpack_all(&self, layers: &[Layer], root: &Path) -> Result<(), BuildError> {
        let start = Instant::now();
        std::fs::create_dir_all(root).at(root)?;
        for layer in layers {
            self.unpacker.unpack_layer(layer, root, self.kept(root))?;
        }
        self.counters.extracted(layers.len());
        self.counters.timed("unpack", start);
        Ok(())
    }

    /// Unpacks one more layer over a root already on disk (a cache hit
    /// after a miss, with the walk snapshotter).
    pub(crate) fn unpack_onto(&self, layer: &Layer, root: &Path) -> Result<(), BuildError> {
        let start = Instant::now();
        self.unpacker.unpack_layer(layer, root, self.kept(root))?;
        self.counters.extracted(1);
        self.counters.timed("unpack", start);
        Ok(())
    }

    /// The overlay snapshotter's directory of a layer, unpacked the first
    /// time any build needs it.
    pub(crate) fn layer_dir(
        &self,
        unpacked: &UnpackedLayers,
        layer: &Layer,
    ) -> Result<PathBuf, BuildError> {
        self.layer_dirs(unpacked, std::slice::from_ref(layer))
            .map(|mut dirs| dirs.remove(0))
    }

    /// The unpacked directories of `layers` (bottom first), unpacking the
    /// missing ones (see [`Unpacker::layer_dirs`]).
    pub(crate) fn layer_dirs(
        &self,
        unpacked: &UnpackedLayers,
        layers: &[Layer],
    ) -> Result<Vec<PathBuf>, BuildError> {
        let start = Instant::now();
        let (dirs, extracted) = self.unpacker.layer_dirs(unpacked, layers)?;
        if extracted > 0 {
            self.counters.extracted(extracted);
            self.counters.timed("unpack", start);
        }
        Ok(dirs)
    }
}

/// Copies a whole root, keeping owners, modes, links, devices and xattrs.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> Result<(), BuildError> {
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

#[cfg(test)]
mod tests {
    use super::RootChoice::{self, *};
    use std::path::Path;

    fn decide(overlay: bool, host: bool, parent: Option<(Option<&str>, bool)>) -> RootChoice {
        let root = if host { "/" } else { "/w/stage-1" };
        RootChoice::decide(
            overlay,
            Path::new(root),
            host,
            parent.map(|(at, takes)| (at.map(Path::new), takes)),
        )
    }

    #[test]
    fn the_overlay_snapshotter_always_gets_a_mount_point() {
        assert_eq!(decide(true, false, None), MountPoint);
        assert_eq!(
            decide(true, false, Some((Some("/w/stage-0"), true))),
            MountPoint
        );
    }

    #[test]
    fn a_parent_root_is_taken_by_its_last_reader_and_copied_for_others() {
        assert_eq!(
            decide(false, false, Some((Some("/w/stage-0"), true))),
            TakeParent
        );
        assert_eq!(
            decide(false, false, Some((Some("/w/stage-0"), false))),
            CopyParent
        );
        assert_eq!(decide(false, false, Some((None, true))), Unpack);
        assert_eq!(decide(false, false, None), Unpack);
    }

    #[test]
    fn on_the_host_only_a_parent_still_at_slash_is_built_on() {
        assert_eq!(decide(false, true, Some((Some("/"), true))), TakeParent);
        // Another reader comes later: `/` is cleared and unpacked again.
        assert_eq!(decide(false, true, Some((Some("/"), false))), Unpack);
        // Materialized elsewhere for a COPY --from: never copied onto `/`.
        assert_eq!(
            decide(false, true, Some((Some("/w/stage-0"), true))),
            Unpack
        );
        assert_eq!(decide(false, true, None), Unpack);
    }
}
