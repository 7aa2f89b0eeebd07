//! Kiln's build engine: the Dockerfile frontend, the plan, the executor
//! (RUN isolation, COPY, ADD), snapshots, layers and image assembly.
//!
//! The public face is this page: the frontend (`dockerfile`, which does no
//! I/O), the builder and what it takes and reports, the outputs, and the
//! few process-level switches the binary needs before it starts a thread.
//! Everything else is the crate's own.

// The frontend: parsing, the stage graph, `kiln plan`'s stage report.
pub mod dockerfile;

// Building.
pub use build::{
    overlay_wanted, store_layer_tables, BaseUnpacked, BaseUnpacker, BuildOptions, Builder,
    CacheResult, Event, ImageFormat, SecretSource, Snapshotter, StepReport, Summary, TablesStored,
};
pub use context::Ignore;
pub use error::{BuildError, StepFailure};
pub use exec::isolation::{
    choose as choose_isolation, Chosen, Host as HostAbilities, IsolationError,
};
pub use exec::run::Isolation;
pub use layer::compress::set_threads as set_compression_threads;
pub use layer::Compression;
pub use plan::pulled_images;
pub use rootfs::clean_relative;
pub use rootfs::snapshot::SnapshotMode;

// Outputs: registry push, docker-archive, OCI layout, digest file; the
// uploads that push a build's new layers while it goes on.
pub use image::{Built, BuiltImage};
pub mod output;
pub use uploads::Uploads;
// `--provenance`: the in-toto SLSA statement attached to each image.
pub mod provenance;

// Remote build contexts (`tar://`, git), fetched by the CLI.
pub use source::archive;
pub use source::git::GitSource;

// The process: the RUN step runner (this binary re-executed), rootless
// builds in a user namespace, and the overlay snapshotter's own mount
// namespace.
pub use exec::run::{running_as_root, step_runner_main, STEP_RUNNER_ARG};
pub use exec::userns::{
    become_root, missing_prerequisite as user_namespace_missing, Forked, UsernsError,
};
pub use exec::zygote::{fork as fork_zygote, zygote_main, ZYGOTE_ARG};
pub use rootfs::overlay::enter_private_mount_namespace;

/// For `benches/micro.rs` only: the hot paths it measures. Not an API.
#[doc(hidden)]
pub mod bench {
    pub use crate::key::{hash_sources, hash_sources_cached, step_key, KeyHasher, KeyInputs};
    pub use crate::layer::{open_layer, LayerWriter};
    pub use crate::plan::plan;
    pub use crate::rootfs::meta_view::{LayerTable, MetaView};
    pub use crate::rootfs::snapshot::Snapshot;
    pub use crate::rootfs::Recorded;
}

mod build;
mod context;
mod error;
mod excerpt;
mod exec;
mod host;
mod image;
mod key;
mod layer;
mod plan;
mod rootfs;
mod source;
mod uploads;
