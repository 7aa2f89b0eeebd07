//! Kiln's storage: the content-addressed blob store, OCI layouts, and the
//! registry client.
pub mod blobs;
pub mod digest;
pub mod error;
pub mod layout;
pub mod manifest;
pub mod registry;

pub use blobs::{BlobStore, StoredBlob};
pub use error::{CacheStoreError, Result};
pub use manifest::{Descriptor, ImageManifest, Platform, ResolvedManifest};
pub use oci_client::Reference;
pub use registry::{RegistryClient, RegistryOptions};
