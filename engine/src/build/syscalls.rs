//! What the builder asks of the kernel: overlay mounts, unpacking a layer
//! onto a root, running a step. One trait, as youki puts its syscalls
//! behind `Syscall`, so the stage loop, the cache decisions and the root
//! choice are tested in-process, without root (see `tests.rs`).
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::exec::run::{self, RunSpec};
use crate::exec::zygote;
use crate::rootfs::extract::{self, ExtractError, ExtractStats, Lowers};
use crate::rootfs::overlay;

/// A mount that lasts as long as this value: dropping it unmounts.
pub(crate) type Mount = Box<dyn Send + Sync>;

/// Where [`Syscalls::extract`] puts a layer.
#[derive(Clone, Copy)]
pub(crate) enum UnpackInto<'a> {
    /// Over a root, leaving its `keep` paths alone.
    Root { keep: &'a [PathBuf] },
    /// Alone into an empty directory, in overlayfs's format, over the
    /// layers below (where its hard links may point).
    Dir { lowers: Lowers<'a> },
}

pub(crate) trait Syscalls: Sync {
    /// Mounts an overlay of `lowers` (bottom first) at `target`: read-only,
    /// or writable into `upper` (with overlayfs's work dir) when given.
    fn mount_overlay(
        &self,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> io::Result<Mount>;

    /// Extracts an (uncompressed) layer stream at `dir`.
    fn extract(
        &self,
        layer: &mut dyn Read,
        dir: &Path,
        into: UnpackInto,
    ) -> Result<ExtractStats, ExtractError>;

    /// Runs a RUN step, isolated as `spec` says; its exit code.
    fn run(&self, spec: &RunSpec) -> io::Result<i32>;

    /// RUN steps are to come: what runs them may start now.
    fn runs_ahead(&self) {}

    /// No RUN step is to come.
    fn runs_done(&self) {}
}

/// The machine's own kernel.
pub(crate) struct Host;

impl Syscalls for Host {
    fn mount_overlay(
        &self,
        lowers: &[PathBuf],
        upper: Option<(&Path, &Path)>,
        target: &Path,
    ) -> io::Result<Mount> {
        Ok(Box::new(overlay::mount(lowers, upper, target)?))
    }

    fn extract(
        &self,
        layer: &mut dyn Read,
        dir: &Path,
        into: UnpackInto,
    ) -> Result<ExtractStats, ExtractError> {
        match into {
            UnpackInto::Dir { lowers } => extract::extract_layer_dir(dir, layer, lowers),
            UnpackInto::Root { keep } => extract::extract_layer_keeping(dir, layer, keep),
        }
    }

    fn run(&self, spec: &RunSpec) -> io::Result<i32> {
        run::run(spec)
    }

    fn runs_ahead(&self) {
        zygote::prepare();
    }

    fn runs_done(&self) {
        zygote::stop();
    }
}
