//! Kiln's build engine: the Dockerfile frontend, the plan, the executor
//! (RUN isolation, COPY), snapshots, layers and image assembly.
pub mod build;
pub mod context;
pub mod dockerfile;
pub mod error;
pub mod exec;
mod host;
pub mod image;
pub mod key;
pub mod layer;
pub mod output;
pub mod plan;
pub mod rootfs;
pub mod source;

pub use error::BuildError;
