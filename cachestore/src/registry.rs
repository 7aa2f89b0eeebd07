//! The registry client: a thin layer over `oci-client` that streams blobs
//! through the blob store, selects a platform from indexes, and decides per
//! registry whether plain HTTP is allowed.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::io::Write;

use crate::blobs::{BlobStore, StoredBlob};
use crate::digest;
use crate::error::{CacheStoreError, IoContext, Result};
use crate::manifest::{self, Platform, ResolvedManifest};

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) that may be spoken to over plain HTTP, in
    /// addition to loopback ones (which always may, as with Docker).
    pub plain_http: Vec<String>,
    /// Accept any TLS certificate.
    pub skip_tls_verify: bool,
}

/// One `oci-client` per registry host, because the protocol choice is per host.
pub struct RegistryClient {
    options: RegistryOptions,
    /// Registries allowed plain HTTP after start (`--insecure-pull` bases).
    plain_http: Mutex<Vec<String>>,
    clients: Mutex<HashMap<String, Arc<Client>>>,
}

/// Loopback registries may use plain HTTP, as Docker allows.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn parse_reference(reference: &str) -> Result<Reference> {
    reference
        .parse::<Reference>()
        .map_err(|e| CacheStoreError::InvalidReference {
            reference: reference.to_string(),
            message: e.to_string(),
        })
}

fn registry_error(
    reference: &Reference,
    operation: &'static str,
    err: impl std::fmt::Display,
) -> CacheStoreError {
    CacheStoreError::Registry {
        registry: reference.registry().to_string(),
        operation,
        reference: reference.whole(),
        message: err.to_string(),
    }
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Self {
        Self {
            options,
            plain_http: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Allows plain HTTP to `registry`; only affects clients made later.
    pub fn allow_plain_http(&self, registry: &str) {
        self.plain_http
            .lock()
            .expect("plain-http list poisoned")
            .push(registry.to_string());
    }

    async fn client(&self, reference: &Reference) -> Arc<Client> {
        let registry = reference.resolve_registry().to_string();
        let existing = self
            .clients
            .lock()
            .expect("registry client map poisoned")
            .get(&registry)
            .cloned();
        if let Some(client) = existing {
            return client;
        }
        let plain = is_loopback(&registry)
            || self.options.plain_http.contains(&registry)
            || self
                .plain_http
                .lock()
                .expect("plain-http list poisoned")
                .contains(&registry);
        let client = Arc::new(Client::new(ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: self.options.skip_tls_verify,
            // Streamed monolithic PUTs: some registries mishandle chunks.
            use_monolithic_push: true,
            platform_resolver: None,
            ..Default::default()
        }));
        client
            .store_auth_if_needed(&registry, &RegistryAuth::Anonymous)
            .await;
        self.clients
            .lock()
            .expect("registry client map poisoned")
            .entry(registry)
            .or_insert(client)
            .clone()
    }

    /// Fetches the manifest of `reference`; an index is resolved to the
    /// manifest for `platform`. The bytes are verified against their digest.
    pub async fn pull_manifest(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedManifest> {
        let client = self.client(reference).await;
        let (bytes, digest) = client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, manifest::ACCEPTED)
            .await
            .map_err(|e| registry_error(reference, "pull manifest", e))?;
        check_manifest_digest(reference, &bytes, &digest)?;
        match manifest::parse(&bytes, &digest, platform)? {
            manifest::Parsed::Image(m) => Ok(*m),
            manifest::Parsed::Index { chosen } => {
                let by_digest = reference.clone_with_digest(chosen.clone());
                let (bytes, digest) = client
                    .pull_manifest_raw(&by_digest, &RegistryAuth::Anonymous, manifest::ACCEPTED)
                    .await
                    .map_err(|e| registry_error(reference, "pull manifest", e))?;
                if digest != chosen {
                    return Err(CacheStoreError::DigestMismatch {
                        what: format!("manifest of {}", reference.whole()),
                        expected: chosen,
                        actual: digest,
                    });
                }
                check_manifest_digest(reference, &bytes, &digest)?;
                match manifest::parse(&bytes, &digest, platform)? {
                    manifest::Parsed::Image(m) => Ok(*m),
                    manifest::Parsed::Index { .. } => Err(CacheStoreError::Malformed {
                        what: reference.whole(),
                        message: "an index points at another index".into(),
                    }),
                }
            }
        }
    }

    /// Streams a blob into the store, unless it is there already.
    pub async fn pull_blob(
        &self,
        reference: &Reference,
        digest: &str,
        store: &BlobStore,
    ) -> Result<StoredBlob> {
        digest::validate(digest)?;
        if store.contains(digest)? {
            return Ok(StoredBlob {
                digest: digest.to_string(),
                size: store.size(digest)?,
            });
        }
        let client = self.client(reference).await;
        let mut stream = client
            .pull_blob_stream(reference, digest)
            .await
            .map_err(|e| registry_error(reference, "pull blob", e))?;
        let mut writer = store.writer()?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| registry_error(reference, "pull blob", e))?;
            writer.write_all(&chunk).at(store.path(digest)?)?;
        }
        writer.commit(Some(digest))
    }

    pub async fn blob_exists(&self, reference: &Reference, digest: &str) -> Result<bool> {
        let client = self.client(reference).await;
        client
            .blob_exists(reference, digest)
            .await
            .map_err(|e| registry_error(reference, "check blob", e))
    }

    /// Uploads a stored blob as a stream, skipping it when the registry has it.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &str,
        store: &BlobStore,
    ) -> Result<()> {
        if self.blob_exists(reference, digest).await? {
            return Ok(());
        }
        let path = store.path(digest)?;
        let file = tokio::fs::File::open(&path).await.at(&path)?;
        let size = file.metadata().await.at(&path)?.len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
            .map_err(OciDistributionError::from);
        let client = self.client(reference).await;
        client
            .push_blob_stream(reference, stream, digest, Some(size))
            .await
            .map_err(|e| registry_error(reference, "push blob", e))?;
        Ok(())
    }

    /// Pushes exact manifest bytes (so the digest is what we computed).
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<()> {
        let client = self.client(reference).await;
        let content_type = media_type
            .parse()
            .map_err(|e| registry_error(reference, "push manifest", e))?;
        client
            .push_manifest_raw(reference, bytes, content_type)
            .await
            .map_err(|e| registry_error(reference, "push manifest", e))?;
        Ok(())
    }
}

fn check_manifest_digest(reference: &Reference, bytes: &[u8], digest: &str) -> Result<()> {
    let actual = digest::sha256_digest(bytes);
    if actual != digest {
        return Err(CacheStoreError::DigestMismatch {
            what: format!("manifest of {}", reference.whole()),
            expected: digest.to_string(),
            actual,
        });
    }
    if let Some(pinned) = reference.digest() {
        if pinned != actual {
            return Err(CacheStoreError::DigestMismatch {
                what: format!("manifest of {}", reference.whole()),
                expected: pinned.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.3.4.5"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
