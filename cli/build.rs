//! `kiln build`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use kiln_cachestore::registry::parse_reference;
use kiln_cachestore::{BlobStore, Index, Platform, RegistryClient, RegistryOptions};
use kiln_engine::build::{BuildOptions, Builder, Event};
use kiln_engine::layer::Compression;
use kiln_engine::output;
use kiln_engine::rootfs::snapshot::SnapshotMode;

use crate::args::{BuildArgs, CompressionArg, FrontendArgs, SnapshotModeArg};

/// `KEY=VALUE` pairs; a bare `KEY` takes its value from the environment, as
/// `docker build --build-arg` does.
pub fn parse_pairs(flag: &str, pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in pairs {
        let (k, v) = match pair.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match std::env::var(pair) {
                Ok(v) => (pair.clone(), v),
                Err(_) => continue,
            },
        };
        if k.is_empty() {
            bail!("{flag} {pair:?}: expected KEY=VALUE");
        }
        out.insert(k, v);
    }
    Ok(out)
}

/// Reads the Dockerfile: the path as given, or else inside the context, as
/// Kaniko looks it up.
pub fn read_dockerfile(
    frontend: &FrontendArgs,
    context: Option<&Path>,
) -> Result<(String, String)> {
    let given = &frontend.dockerfile;
    let path = match context {
        Some(ctx) if !given.exists() && given.is_relative() => ctx.join(given),
        _ => given.clone(),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--dockerfile {}: cannot read", path.display()))?;
    Ok((given.display().to_string(), text))
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("kiln")
}

fn parse_platform(spec: Option<&str>) -> Result<Platform> {
    let Some(spec) = spec else {
        return Ok(Platform::host());
    };
    let parts: Vec<&str> = spec.split('/').collect();
    match parts.as_slice() {
        [os, arch] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: None,
        }),
        [os, arch, variant] => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: Some(variant.to_string()),
        }),
        _ => bail!("--custom-platform {spec:?}: expected os/arch[/variant]"),
    }
}

fn compression(a: &BuildArgs) -> Result<Compression> {
    Ok(match (a.compression, a.compression_level) {
        (CompressionArg::Gzip, None) => Compression::default(),
        (CompressionArg::Gzip, Some(l @ 0..=9)) => Compression::Gzip { level: l as u32 },
        (CompressionArg::Zstd, None) => Compression::Zstd { level: 3 },
        (CompressionArg::Zstd, Some(l @ 1..=22)) => Compression::Zstd { level: l },
        (_, Some(l)) => bail!(
            "--compression-level {l}: out of range for {:?}",
            a.compression
        ),
    })
}

/// SOURCE_DATE_EPOCH, else the epoch: what `--reproducible` fixes times to.
fn fixed_time(reproducible: bool) -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.parse().with_context(|| {
                format!("SOURCE_DATE_EPOCH={v:?}: expected seconds")
            })?))
        }
        _ => Ok(reproducible.then_some(0)),
    }
}

fn render(event: Event) {
    match event {
        Event::Warning { line, message } if line > 0 => {
            eprintln!("warning: line {line}: {message}")
        }
        Event::Warning { message, .. } => eprintln!("warning: {message}"),
        Event::Stage { index, name, base } => match name {
            Some(name) => eprintln!("==> stage {index} ({name}) from {base}"),
            None => eprintln!("==> stage {index} from {base}"),
        },
        Event::Pulled { reference, digest } => eprintln!("    base {reference} @ {digest}"),
        Event::Step { line, text } => eprintln!("--> {line}: {text}"),
        Event::Layer { digest, size } => eprintln!("    layer {digest} ({size} bytes)"),
        Event::CacheHit { .. } => eprintln!("    cache hit"),
        Event::Summary(s) => eprintln!(
            "==> {} steps from the cache, {} run, {} layers unpacked",
            s.cache_hits, s.cache_misses, s.layers_unpacked
        ),
    }
}

pub fn run(a: BuildArgs) -> Result<()> {
    let started = Instant::now();
    if a.destinations.is_empty()
        && !a.no_push
        && a.tar_path.is_none()
        && a.oci_layout_path.is_none()
    {
        bail!(
            "--destination is required unless --no-push, --tar-path or --oci-layout-path is given"
        );
    }
    let destinations = a
        .destinations
        .iter()
        .map(|d| parse_reference(d).with_context(|| format!("--destination {d}")))
        .collect::<Result<Vec<_>>>()?;
    let context = PathBuf::from(a.context.strip_prefix("dir://").unwrap_or(&a.context));
    if !context.is_dir() {
        bail!("--context {}: not a directory", a.context);
    }
    let (dockerfile_name, dockerfile) = read_dockerfile(&a.frontend, Some(&context))?;
    let state_dir = a.cache_dir.clone().unwrap_or_else(default_state_dir);
    let options = BuildOptions {
        dockerfile_name,
        dockerfile,
        context,
        build_args: parse_pairs("--build-arg", &a.frontend.build_args)?,
        target: a.frontend.target.clone(),
        platform: parse_platform(a.custom_platform.as_deref())?,
        compression: compression(&a)?,
        fixed_time: fixed_time(a.reproducible)?,
        labels: parse_pairs("--label", &a.labels)?,
        insecure_pull: a.insecure_pull,
        snapshot_mode: match a.snapshot_mode {
            SnapshotModeArg::Redo => SnapshotMode::Redo,
            SnapshotModeArg::Full => SnapshotMode::Full,
            SnapshotModeArg::Time => SnapshotMode::Time,
        },
        ignore_paths: a
            .ignore_paths
            .iter()
            .map(|p| kiln_engine::rootfs::clean_relative(p))
            .collect(),
        single_snapshot: a.single_snapshot,
        cache: a.cache,
        cache_ttl: a.cache_ttl.into(),
        cache_run_layers: a.cache_run_layers,
        cache_copy_layers: a.cache_copy_layers,
    };
    let mut plain_http = a.insecure_registries.clone();
    if a.insecure {
        plain_http.extend(
            destinations
                .iter()
                .map(|d| d.resolve_registry().to_string()),
        );
    }
    let registry = RegistryClient::new(RegistryOptions {
        plain_http,
        skip_tls_verify: a.skip_tls_verify,
    });
    let store = BlobStore::open(&state_dir)
        .with_context(|| format!("--cache-dir {}", state_dir.display()))?;
    let index =
        Index::open(&state_dir).with_context(|| format!("--cache-dir {}", state_dir.display()))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let builder = Builder::new(&options, &state_dir, &store, &index, &registry, &render)?;
        let image = builder.build().await?;
        let tags: Vec<String> = destinations.iter().map(|d| d.whole()).collect();
        if let Some(path) = &a.tar_path {
            output::write_docker_archive(&image, &tags, path, &store)?;
            eprintln!("    wrote {}", path.display());
        }
        if let Some(path) = &a.oci_layout_path {
            let layout_tags: Vec<String> = match destinations.is_empty() {
                true => vec!["latest".into()],
                false => destinations
                    .iter()
                    .map(|d| d.tag().unwrap_or("latest").to_string())
                    .collect(),
            };
            output::write_oci_layout(&image, &layout_tags, path, &store)?;
            eprintln!("    wrote {}", path.display());
        }
        if !a.no_push {
            for destination in &destinations {
                output::push(&image, destination, &registry, &store).await?;
                eprintln!("    pushed {}", destination.whole());
            }
        }
        if let Some(path) = &a.digest_file {
            output::write_digest_file(&image, path)?;
        }
        // Kaniko's formats: `repo@digest` and `repo:tag@digest`, a line each.
        let named = |with_tag: bool| -> String {
            destinations
                .iter()
                .map(|d| {
                    let name = format!("{}/{}", d.registry(), d.repository());
                    match (with_tag, d.tag()) {
                        (true, Some(tag)) => format!("{name}:{tag}@{}\n", image.manifest.digest),
                        _ => format!("{name}@{}\n", image.manifest.digest),
                    }
                })
                .collect()
        };
        for (path, with_tag) in [
            (&a.image_name_with_digest_file, false),
            (&a.image_name_tag_with_digest_file, true),
        ] {
            if let Some(path) = path {
                std::fs::write(path, named(with_tag))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        eprintln!(
            "==> {} built in {:.2}s",
            image.manifest.digest,
            started.elapsed().as_secs_f64()
        );
        anyhow::Ok(())
    })
}
