//! The base-image cache: `kiln warm` pulls images (manifest, config and
//! every layer) into the store ahead of builds, so CI nodes start warm, and
//! builds resolve a base's tag with one HEAD request, reusing the stored
//! manifest while the tag still points where it did. Warming again
//! re-resolves each tag, so a tag that moved is fetched anew, and marks
//! the entry warm, which `kiln cache gc` honours.
use std::path::Path;
use std::time::Duration;

use oci_client::Reference;

use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::error::Result;
use crate::index::{now_secs, BaseEntry, Index};
use crate::layout;
use crate::manifest::{Platform, ResolvedManifest};
use crate::registry::{parse_reference, RegistryClient};

/// What warming one image did.
#[derive(Debug, Clone)]
pub struct Warmed {
    pub manifest: ResolvedManifest,
    /// Layers fetched now (the rest were in the store already).
    pub fetched: usize,
    pub fetched_bytes: u64,
}

fn base_key(reference: &Reference, platform: &Platform) -> String {
    format!("{}#{platform}", reference.whole())
}

/// Resolves a base image through the base-image cache: a HEAD request
/// tells whether the reference still points at the stored manifest (then
/// no manifest or config is fetched again); if the registry cannot be
/// reached, a manifest checked less than `ttl` ago is used. Otherwise the
/// manifest is pulled (through mirrors) and recorded.
pub async fn resolve_base(
    registry: &RegistryClient,
    store: &BlobStore,
    index: &Index,
    reference: &Reference,
    platform: &Platform,
    ttl: Duration,
) -> Result<ResolvedManifest> {
    resolve(registry, store, index, reference, platform, ttl, false).await
}

/// [`resolve_base`]; `warming` records the entry as warmed now, which a
/// build's resolving keeps as it was.
async fn resolve(
    registry: &RegistryClient,
    store: &BlobStore,
    index: &Index,
    reference: &Reference,
    platform: &Platform,
    ttl: Duration,
    warming: bool,
) -> Result<ResolvedManifest> {
    // The HEAD goes out while the index is read: opening the index takes
    // about as long as the round trip.
    let head = tokio::spawn({
        let (registry, reference) = (registry.clone(), reference.clone());
        async move { registry.manifest_digest(&reference).await }
    });
    let key = base_key(reference, platform);
    let previous = index.get_base(&key)?;
    let warmed = match warming {
        true => Some(now_secs()),
        false => previous.as_ref().and_then(|e| e.warmed),
    };
    let cached = previous.filter(|e| {
        store
            .contains(&e.manifest.manifest.config.digest)
            .unwrap_or(false)
    });
    // Never aborted: an error here is the task's panic.
    let head = head
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    match (cached, &head) {
        (Some(entry), Ok(digest)) if *digest == entry.top_digest => {
            if warming {
                let manifest = entry.manifest.clone();
                let checked = now_secs();
                index.put_base(
                    &key,
                    &BaseEntry {
                        checked,
                        warmed,
                        ..entry
                    },
                )?;
                return Ok(manifest);
            }
            return Ok(entry.manifest);
        }
        (Some(entry), Err(e)) if entry.checked.saturating_add(ttl.as_secs()) >= now_secs() => {
            tracing::warn!(
                "{}: {e}; using the base image checked before",
                reference.whole()
            );
            return Ok(entry.manifest);
        }
        _ => {}
    }
    let manifest = registry.pull_manifest(reference, platform).await?;
    registry
        .pull_blob(reference, &manifest.manifest.config.digest, store)
        .await?;
    let top_digest = match head {
        Ok(digest) => digest,
        // Reached through a mirror only: the platform manifest's digest
        // stands for the reference until the registry answers again.
        Err(_) => manifest.digest.clone(),
    };
    index.put_base(
        &key,
        &BaseEntry {
            top_digest,
            manifest: manifest.clone(),
            checked: now_secs(),
            warmed,
        },
    )?;
    Ok(manifest)
}

/// Pulls `reference` (a registry reference or `oci-layout://PATH[:tag]`)
/// for `platform` into the store, layers concurrently, and records it in
/// the base-image cache. With `force`, stored blobs are verified and
/// refetched when they do not match.
pub async fn warm(
    registry: &RegistryClient,
    store: &BlobStore,
    index: &Index,
    reference: &str,
    platform: &Platform,
    force: bool,
) -> Result<Warmed> {
    if let Some(spec) = reference.strip_prefix("oci-layout://") {
        let (path, tag) = layout::split_layout_reference(spec);
        let manifest = layout::import(Path::new(path), tag, platform, store)?;
        return Ok(Warmed {
            manifest,
            fetched: 0,
            fetched_bytes: 0,
        });
    }
    let r = parse_reference(reference)?;
    let manifest = resolve(registry, store, index, &r, platform, Duration::ZERO, true).await?;
    let digests: Vec<&Digest> = manifest.manifest.layers.iter().map(|l| &l.digest).collect();
    let mut missing = Vec::new();
    for digest in digests {
        // A blob that fails verification is removed by `verify`.
        let present = store.contains(digest)? && (!force || store.verify(digest)?);
        if !present {
            missing.push(digest);
        }
    }
    let pulled = futures_util::future::try_join_all(
        missing.iter().map(|d| registry.pull_blob(&r, d, store)),
    )
    .await?;
    Ok(Warmed {
        fetched: pulled.len(),
        fetched_bytes: pulled.iter().map(|b| b.size).sum(),
        manifest,
    })
}
