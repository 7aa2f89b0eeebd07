//! Kiln's storage: the content-addressed blob store, the cache index, OCI
//! layouts, and the registry client.
pub mod auth;
pub mod blobs;
pub mod digest;
pub mod error;
pub mod gc;
pub mod index;
pub mod journal;
pub mod layout;
pub mod manifest;
pub mod registry;
pub mod remote;
mod sessions;
pub mod state;
pub mod transfer;
pub mod unpacked;
pub mod warm;

pub use blobs::{BlobStore, StoredBlob};
pub use error::{CacheStoreError, Result};
pub use index::{Index, StepEntry};
pub use manifest::{Descriptor, ImageManifest, Layer, Platform, ResolvedManifest};
pub use oci_client::Reference;
pub use registry::{RegistryClient, RegistryOptions};
pub use state::StateDir;
