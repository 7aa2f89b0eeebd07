//! What a build is asked to do: the options the CLI fills in.
use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_cachestore::Platform;

use crate::exec::mounts::SecretSource;
use crate::exec::run::Isolation;
use crate::image::ImageFormat;
use crate::layer::Compression;
use crate::rootfs::snapshot::SnapshotMode;

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
    /// `--isolation none`: files outside the build that the caller uses
    /// (Dockerfile, certificates, outputs). The engine spares them, and
    /// all it knows of itself, when it replaces `/` (`host.rs`).
    pub host_files: Vec<PathBuf>,
    /// One layer per stage instead of one per step.
    pub single_snapshot: bool,
    /// COPY and WORKDIR steps may be built on the metadata view of the
    /// layers below, without unpacking them (`--copy-view meta`, the
    /// default); `false` always builds them on an unpacked root.
    pub copy_view: bool,
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
    pub isolation: Isolation,
    /// Why no RUN can be isolated, when none can: the process is not root
    /// and cannot set up a user namespace. The build goes on, owners
    /// recorded rather than applied (`rootfs/owners.rs`), and a RUN that
    /// must run fails with this.
    pub run_unavailable: Option<String>,
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

/// Whether the overlay snapshotter may run at all: not turned off, with
/// the namespaces isolation it mounts in, and a layer per step.
pub fn overlay_wanted(
    snapshotter: Snapshotter,
    isolation: Isolation,
    single_snapshot: bool,
) -> bool {
    snapshotter != Snapshotter::Walk && isolation == Isolation::Namespaces && !single_snapshot
}
