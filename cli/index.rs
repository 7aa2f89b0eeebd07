//! `kiln index create`: an image index from single-platform images
//! already in registries, as after one build Job per architecture on
//! native nodes. Each image's platform comes from its config; its blobs
//! are mounted into the destination repository where the registry allows,
//! copied (through the store) otherwise; the index is pushed last.
use anyhow::{bail, Context, Result};

use kiln_cachestore::digest::Digest;
use kiln_cachestore::manifest::{self, Descriptor, ImageIndex, Parsed};
use kiln_cachestore::registry::parse_reference;
use kiln_cachestore::{BlobStore, Platform, Reference, RegistryClient, ResolvedManifest};

use crate::args::{IndexArgs, IndexCommand, IndexCreateArgs};
use crate::build::{open_state_dir, registry_options};
use crate::sink::{sink, Record};

pub fn run(a: IndexArgs) -> Result<()> {
    match a.command {
        IndexCommand::Create(a) => create(*a),
    }
}

/// One source image: where it is, its manifest's bytes, and its platform.
struct Source {
    reference: Reference,
    manifest: ResolvedManifest,
    bytes: Vec<u8>,
    platform: Platform,
}

/// Reads a source's manifest (an index is refused: name one image) and
/// its config's platform.
async fn read_source(spec: &str, registry: &RegistryClient, store: &BlobStore) -> Result<Source> {
    let reference = parse_reference(spec).with_context(|| format!("SRC {spec}"))?;
    let bytes = registry
        .pull_manifest_if_exists(&reference, manifest::ACCEPTED)
        .await
        .with_context(|| format!("SRC {spec}"))?
        .with_context(|| format!("SRC {spec}: no such image"))?;
    let digest = kiln_cachestore::digest::sha256(&bytes);
    let manifest = match manifest::parse(&bytes, &digest, &Platform::host())? {
        Parsed::Image(m) => *m,
        Parsed::Index { .. } => {
            bail!("SRC {spec}: is an index; name one platform's image (REF@sha256:...)")
        }
    };
    let config = &manifest.manifest.config.digest;
    registry
        .pull_blob(&reference, config, store)
        .await
        .with_context(|| format!("SRC {spec}: config"))?;
    let platform: Platform = serde_json::from_slice(&store.read(config)?)
        .with_context(|| format!("SRC {spec}: config {config} names no platform"))?;
    Ok(Source {
        reference,
        manifest,
        bytes,
        platform,
    })
}

fn create(a: IndexCreateArgs) -> Result<()> {
    let destinations = a
        .destinations
        .iter()
        .map(|d| parse_reference(d).with_context(|| format!("--destination {d}")))
        .collect::<Result<Vec<_>>>()?;
    let annotations = crate::platforms::annotations(
        &a.annotations
            .iter()
            .map(|s| match s.starts_with("index:") {
                true => s.clone(),
                false => format!("index:{s}"),
            })
            .collect::<Vec<_>>(),
        true,
    )?
    .index;
    let plain_http = match a.insecure {
        true => destinations
            .iter()
            .map(|d| d.resolve_registry().to_string())
            .collect(),
        false => Vec::new(),
    };
    let state = open_state_dir(a.cache_dir.as_deref())?;
    let store = BlobStore::open(&state)
        .with_context(|| format!("--cache-dir {}", state.path().display()))?;
    let registry = RegistryClient::new(registry_options(&a.registry, plain_http)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut sources: Vec<Source> = Vec::new();
        for spec in &a.sources {
            if let Ok(r) = parse_reference(spec) {
                registry.relax_for_pull(
                    r.resolve_registry(),
                    a.insecure_pull,
                    a.registry.skip_tls_verify_pull,
                );
            }
            let source = read_source(spec, &registry, &store).await?;
            if let Some(other) = sources.iter().find(|s| s.platform == source.platform) {
                bail!(
                    "SRC {spec} and {} are both {}: an index has one image per platform",
                    other.reference.whole(),
                    source.platform
                );
            }
            sources.push(source);
        }
        // A Docker manifest list when every image is Docker's, else OCI.
        let docker = sources
            .iter()
            .all(|s| s.manifest.media_type == manifest::docker(manifest::DOCKER_MANIFEST));
        if docker && !annotations.is_empty() {
            bail!("--annotation: the sources are Docker images, whose manifest list has no annotations");
        }
        let index = ImageIndex::of(
            sources
                .iter()
                .map(|s| Descriptor {
                    platform: Some(s.platform.clone()),
                    ..Descriptor::new(
                        s.manifest.media_type.clone(),
                        s.manifest.digest.clone(),
                        s.bytes.len() as u64,
                    )
                })
                .collect(),
            docker,
            annotations,
        );
        let media_type = index.media_type();
        let index_bytes = manifest::canonical_json(&index);
        let digest = kiln_cachestore::digest::sha256(&index_bytes);
        for destination in &destinations {
            for s in &sources {
                let m = &s.manifest.manifest;
                let blobs: Vec<&Digest> = std::iter::once(&m.config.digest)
                    .chain(m.layers.iter().map(|l| &l.digest))
                    .collect();
                for blob in blobs {
                    registry
                        .copy_blob(&s.reference, destination, blob, &store)
                        .await
                        .with_context(|| format!("--destination {}", destination.whole()))?;
                }
                let by_digest = destination.clone_with_digest(s.manifest.digest.to_string());
                registry
                    .push_manifest(&by_digest, s.bytes.clone(), &s.manifest.media_type)
                    .await?;
            }
            registry
                .push_manifest(destination, index_bytes.clone(), &media_type)
                .await?;
            sink().log(
                Record::info(format!("    pushed {}", destination.whole()))
                    .field("event", "image-output")
                    .field("kind", "destination")
                    .field("to", destination.whole()),
            );
        }
        if let Some(path) = &a.digest_file {
            std::fs::write(path, digest.as_ref())
                .with_context(|| format!("--digest-file {}", path.display()))?;
        }
        let (pulled, pushed) = registry.bytes_transferred();
        let platforms: Vec<String> = sources.iter().map(|s| s.platform.to_string()).collect();
        sink().log(
            Record::info(format!(
                "==> index {digest} of {} ({pulled} bytes pulled, {pushed} pushed, {} blobs mounted)",
                platforms.join(", "),
                registry.blobs_mounted()
            ))
            .field("event", "summary")
            .field("image_digest", digest.to_string())
            .field("platforms", platforms)
            .field("bytes_pulled", pulled)
            .field("bytes_pushed", pushed)
            .field("blobs_mounted", registry.blobs_mounted()),
        );
        anyhow::Ok(())
    })
}
