//! The remote cache tier (`--cache-repo`): one OCI manifest per step,
//! tagged with the step's cache key, in one repository of any registry.
//! Its config blob is the [`StepEntry`] and its one layer (if any) the
//! step's layer, so a registry stores, mounts and collects entries like
//! any image, and a new machine sharing the repo starts warm.
use oci_client::Reference;

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::error::{CacheStoreError, Cause, Result};
use crate::index::StepEntry;
use crate::manifest::{canonical_json, Descriptor, ImageManifest, MediaType};
use crate::registry::{parse_reference, RegistryClient};

/// The config media type of a cache entry's manifest.
pub const STEP_ENTRY: &str = "application/vnd.kiln.cache.step.v1+json";

/// Owns a clone of the registry client, so an entry can be written by a
/// background task.
#[derive(Clone)]
pub struct RemoteCache {
    registry: RegistryClient,
    repo: Reference,
}

impl RemoteCache {
    /// `repo` is `registry/repository`, without a tag, as Kaniko's
    /// `--cache-repo`.
    pub fn new(registry: &RegistryClient, repo: &str) -> Result<Self> {
        let invalid = |rule: &'static str| CacheStoreError::InvalidReference {
            reference: repo.to_string(),
            source: rule.into(),
        };
        if repo.contains('@')
            || repo
                .rsplit('/')
                .next()
                .is_some_and(|last| last.contains(':'))
        {
            return Err(invalid(
                "a cache repo has no tag or digest: keys are the tags",
            ));
        }
        let repo = parse_reference(repo)?;
        Ok(RemoteCache {
            registry: registry.clone(),
            repo,
        })
    }

    /// The repository entries go to: where their layer blobs are uploaded.
    pub fn repo(&self) -> &Reference {
        &self.repo
    }

    fn tagged(&self, key: &str) -> Reference {
        Reference::with_tag(
            self.repo.registry().to_string(),
            self.repo.repository().to_string(),
            key.to_string(),
        )
    }

    /// The entry for `key`, or `None`. Its config lands in the store; the
    /// layer is fetched only by [`RemoteCache::fetch_layer`].
    pub async fn get(&self, key: &str, store: &BlobStore) -> Result<Option<StepEntry>> {
        let r = self.tagged(key);
        let Some(bytes) = self
            .registry
            .pull_manifest_if_exists(&r, &[MediaType::ImageManifest.as_ref()])
            .await?
        else {
            return Ok(None);
        };
        let malformed = |cause: Cause| CacheStoreError::Malformed {
            what: format!("cache entry {}", r.whole()),
            source: cause,
        };
        let m: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| malformed(e.into()))?;
        if m.config.media_type.as_ref() != STEP_ENTRY {
            return Err(malformed(
                format!(
                    "config media type {} is not a Kiln cache entry",
                    m.config.media_type
                )
                .into(),
            ));
        }
        self.registry.pull_blob(&r, &m.config.digest, store).await?;
        let entry: StepEntry = serde_json::from_slice(&store.read(&m.config.digest)?)
            .map_err(|e| malformed(e.into()))?;
        let listed: Vec<&Digest> = m.layers.iter().map(|l| &l.digest).collect();
        let recorded: Vec<&Digest> = entry.layer.iter().map(|l| &l.descriptor.digest).collect();
        if listed != recorded {
            return Err(malformed(
                "the manifest and the entry name different layers".into(),
            ));
        }
        Ok(Some(entry))
    }

    /// Streams an entry's layer into the store (verified by digest).
    pub async fn fetch_layer(&self, key: &str, entry: &StepEntry, store: &BlobStore) -> Result<()> {
        if let Some(layer) = &entry.layer {
            self.registry
                .pull_blob(&self.tagged(key), &layer.descriptor.digest, store)
                .await?;
        }
        Ok(())
    }

    /// Stores `entry` as the config blob of its manifest, to be uploaded
    /// before [`RemoteCache::put_entry`] writes that.
    pub fn entry_config(&self, entry: &StepEntry, store: &BlobStore) -> Result<Descriptor> {
        store.put_json(MediaType::Other(STEP_ENTRY.into()), entry)
    }

    /// Writes an entry's manifest once [`RemoteCache::repo`] has its
    /// blobs, the layer and the `config` ([`RemoteCache::entry_config`]),
    /// uploaded by the caller (a build does it while it goes on, once per
    /// blob however many entries name it).
    pub async fn put_entry(&self, key: &str, entry: &StepEntry, config: Descriptor) -> Result<()> {
        let layers = entry.layer.iter().map(|l| l.descriptor.clone()).collect();
        let m = ImageManifest {
            schema_version: 2,
            media_type: Some(MediaType::ImageManifest),
            config,
            layers,
            annotations: None,
        };
        self.registry
            .push_manifest(
                &self.tagged(key),
                canonical_json(&m),
                &MediaType::ImageManifest,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryOptions;

    #[test]
    fn a_cache_repo_has_no_tag() {
        let client = RegistryClient::new(RegistryOptions::default());
        assert!(RemoteCache::new(&client, "127.0.0.1:5000/cache").is_ok());
        assert!(RemoteCache::new(&client, "127.0.0.1:5000/cache:v1").is_err());
        assert!(RemoteCache::new(&client, "reg/cache@sha256:00").is_err());
    }
}
