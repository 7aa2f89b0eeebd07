//! `kiln warm`: pull base images into the store before any build needs
//! them, so CI nodes start warm.

use anyhow::{bail, Context, Result};

use kiln_cachestore::{warm, BlobStore, Index, RegistryClient};
use kiln_engine::dockerfile::BaseRef;

use crate::args::{FrontendArgs, WarmArgs};
use crate::build::{open_state_dir, parse_platform, registry_options, resolve_graph};

/// Every image a Dockerfile's stages start from or copy from (only those
/// the `--target` needs when one is given).
fn dockerfile_images(
    frontend: &FrontendArgs,
    platform: &kiln_cachestore::Platform,
) -> Result<Vec<String>> {
    let (_, graph) = resolve_graph(frontend, platform)?;
    let mut images = Vec::new();
    for stage in &graph.stages {
        if frontend.target.is_some() && !stage.needed {
            continue;
        }
        for r in &stage.refs {
            if let BaseRef::Image(image) = &r.target {
                if !images.contains(image) {
                    images.push(image.clone());
                }
            }
        }
    }
    Ok(images)
}

pub fn run(a: WarmArgs) -> Result<()> {
    let platform = parse_platform(a.custom_platform.as_deref())?;
    let mut images = a.images.clone();
    if a.dockerfile_given() {
        images.extend(dockerfile_images(&a.frontend, &platform)?);
    }
    if images.is_empty() {
        bail!("nothing to warm: give --image REF or --dockerfile FILE");
    }
    let state = open_state_dir(a.cache_dir.as_deref())?;
    let at = || format!("--cache-dir {}", state.path().display());
    let store = BlobStore::open(&state).with_context(at)?;
    let index = Index::open(&state).with_context(at)?;
    let registry = RegistryClient::new(registry_options(&a.registry, Vec::new())?)
        .with_progress(crate::progress::observer());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for image in &images {
            if let Ok(r) = kiln_cachestore::registry::parse_reference(image) {
                registry.relax_for_pull(
                    r.resolve_registry(),
                    a.insecure_pull,
                    a.registry.skip_tls_verify_pull,
                );
            }
            let w = warm::warm(&registry, &store, &index, image, &platform, a.force)
                .await
                .with_context(|| format!("warming {image}"))?;
            println!(
                "{image} @ {}: {} layers fetched ({} bytes), {} layers",
                w.manifest.digest,
                w.fetched,
                w.fetched_bytes,
                w.manifest.manifest.layers.len()
            );
        }
        anyhow::Ok(())
    })
}
