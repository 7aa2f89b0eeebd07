//! `kiln warm`: pull base images into the store before any build needs
//! them, and unpack their layers for the overlay snapshotter, so the first
//! build on a CI node costs what a rebuild costs.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use kiln_cachestore::{warm, BlobStore, Index, Platform, RegistryClient};
use kiln_engine::{BaseUnpacker, HostAbilities, Isolation};

use crate::args::{FrontendArgs, WarmArgs};
use crate::build::{open_state_dir, registry_options, resolve_graph};

/// Every image a build of the Dockerfile for `platform` pulls, with the
/// platform it pulls it for (only what the `--target` needs when one is
/// given), with `--build-arg`s applied.
fn dockerfile_images(
    frontend: &FrontendArgs,
    platform: &Platform,
) -> Result<Vec<(String, Platform)>> {
    let (_, graph) = resolve_graph(frontend, platform)?;
    Ok(kiln_engine::pulled_images(
        &graph,
        platform,
        frontend.target.is_none(),
    ))
}

/// Why builds here would not use the overlay snapshotter (so unpacking
/// ahead would be wasted), or `None` when they would. Builds default to
/// `--snapshotter auto`, which takes overlay only with namespaces
/// isolation (root) in a mount namespace of Kiln's own. Enters that
/// namespace, so it must run while the process has one thread.
fn overlay_unavailable() -> Option<String> {
    match kiln_engine::choose_isolation(None, &HostAbilities) {
        Ok(c) if c.isolation == Isolation::Namespaces && c.run_unavailable.is_none() => {}
        Ok(c) => return Some(format!("builds here use {} isolation", c.isolation)),
        Err(e) => return Some(e.to_string()),
    }
    kiln_engine::enter_private_mount_namespace()
        .err()
        .map(|e| format!("no mount namespace of Kiln's own: {e}"))
}

pub fn run(a: WarmArgs) -> Result<()> {
    // Each image for every platform a build here makes, as it pulls them.
    let platforms = crate::platforms::parse(&a.platforms, a.custom_platform.as_deref())?;
    let mut images: Vec<(String, Platform)> = Vec::new();
    for platform in &platforms {
        let given = a.images.iter().map(|i| (i.clone(), platform.clone()));
        let from_dockerfile = match a.dockerfile_given() {
            true => dockerfile_images(&a.frontend, platform)?,
            false => Vec::new(),
        };
        for pull in given.chain(from_dockerfile) {
            if !images.contains(&pull) {
                images.push(pull);
            }
        }
    }
    if images.is_empty() {
        bail!("nothing to warm: give --image REF or --dockerfile FILE");
    }
    // Before anything starts a thread.
    let unavailable = a.unpack.then(overlay_unavailable);
    let state = open_state_dir(a.cache_dir.as_deref())?;
    let at = || format!("--cache-dir {}", state.path().display());
    let store = BlobStore::open(&state).with_context(at)?;
    let index = Index::open(&state).with_context(at)?;
    let unpacker = match unavailable {
        None => None,
        Some(None) => match BaseUnpacker::open(&state, &store, &index) {
            Ok(unpacker) => Some(unpacker),
            Err(e) => {
                println!("not unpacking: the overlay snapshotter cannot run here ({e})");
                None
            }
        },
        Some(Some(why)) => {
            println!("not unpacking: the overlay snapshotter does not run here ({why})");
            None
        }
    };
    let registry = RegistryClient::new(registry_options(&a.registry, Vec::new())?)
        .with_progress(crate::progress::observer());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for (image, platform) in &images {
        if let Ok(r) = kiln_cachestore::registry::parse_reference(image) {
            registry.relax_for_pull(
                r.resolve_registry(),
                a.insecure_pull,
                a.registry.skip_tls_verify_pull,
            );
        }
        let start = Instant::now();
        let w = runtime
            .block_on(warm::warm(
                &registry, &store, &index, image, platform, a.force,
            ))
            .with_context(|| format!("warming {image}"))?;
        let mut line = format!(
            "{image} @ {} for {platform}: {} layers fetched ({} bytes) in {:.2}s",
            w.manifest.digest,
            w.fetched,
            w.fetched_bytes,
            start.elapsed().as_secs_f64()
        );
        // Unpacking makes the tables of the layers it unpacks on the way;
        // the rest (not unpacking, or unpacked already) are made here: the
        // view serves COPY-only stages whether or not the base is unpacked.
        let mut tables_made = 0;
        if let Some(unpacker) = &unpacker {
            let u = unpacker
                .unpack(&w.manifest)
                .with_context(|| format!("unpacking {image}"))?;
            line += &format!(
                ", {} layers unpacked in {:.2}s",
                u.unpacked,
                u.duration.as_secs_f64()
            );
            tables_made += u.tables;
        }
        let tables = kiln_engine::store_layer_tables(&store, &index, &w.manifest)
            .with_context(|| format!("making the layer tables of {image}"))?;
        line += &format!(
            ", {} layer tables made in {:.2}s",
            tables_made + tables.made,
            tables.duration.as_secs_f64()
        );
        println!("{line} (of {} layers)", w.manifest.manifest.layers.len());
    }
    Ok(())
}
