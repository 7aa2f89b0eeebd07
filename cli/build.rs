//! `kiln build`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

use kiln_cachestore::registry::parse_reference;
use kiln_cachestore::{BlobStore, Index, Platform, RegistryClient, RegistryOptions, StateDir};
use kiln_engine::dockerfile::{self, Dockerfile, StageGraph};
use kiln_engine::{
    output, overlay_wanted, provenance, BuildOptions, Builder, Compression, Event, Forked,
    ImageFormat, Isolation, SecretSource, SnapshotMode, Snapshotter, Uploads, UsernsError,
};

use crate::args::{
    BuildArgs, CompressionArg, FrontendArgs, ImageFormatArg, IsolationArg, ProvenanceArg,
    RegistryArgs, SnapshotModeArg, SnapshotterArg,
};
use crate::report::{BuildLog, Finished};
use crate::sink::{sink, LogFormat, Record};

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

/// Reads, parses and resolves the Dockerfile `frontend` names, for
/// `platform`; errors name the file and line.
pub fn resolve_graph(
    frontend: &FrontendArgs,
    platform: &Platform,
) -> Result<(Dockerfile, StageGraph)> {
    let (name, text) = read_dockerfile(frontend, None)?;
    let located = |e: dockerfile::FrontendError| anyhow!("{name}:{}: {}", e.line, e.message);
    let df = dockerfile::parse(&text).map_err(located)?;
    let graph = StageGraph::resolve(
        &df,
        &parse_pairs("--build-arg", &frontend.build_args)?,
        frontend.target.as_deref(),
        &platform.into(),
    )
    .map_err(located)?;
    Ok((df, graph))
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

pub fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("kiln")
}

/// The state dir `--cache-dir` names (the default one without it), made if
/// it is not there.
pub fn open_state_dir(cache_dir: Option<&Path>) -> Result<StateDir> {
    let path = cache_dir.map_or_else(default_state_dir, Path::to_path_buf);
    // The error names the path.
    StateDir::open(path).context("--cache-dir")
}

/// `--custom-platform`'s (or one `--platform`'s) `os/arch[/variant]`,
/// the host's without one.
pub fn parse_platform(spec: Option<&str>) -> Result<Platform> {
    let Some(spec) = spec else {
        return Ok(Platform::host());
    };
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("platform {spec:?}: expected os/arch[/variant]");
    }
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
        _ => bail!("platform {spec:?}: expected os/arch[/variant]"),
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

/// `--registry-mirror` (for Docker Hub) then `--registry-map`, in order.
fn mirrors(a: &RegistryArgs) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = a
        .registry_mirrors
        .iter()
        .map(|m| ("docker.io".to_string(), m.trim_end_matches('/').to_string()))
        .collect();
    for map in &a.registry_maps {
        match map.split_once('=') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => {
                let from = kiln_cachestore::auth::normalize(from);
                for mirror in to.split(';') {
                    out.push((from.clone(), mirror.trim_end_matches('/').to_string()));
                }
            }
            _ => bail!("--registry-map {map}: expected ORIGINAL=MIRROR"),
        }
    }
    Ok(out)
}

/// Registry options from the flags; `plain_http` adds registries that may
/// use plain HTTP (`--insecure` destinations).
pub fn registry_options(a: &RegistryArgs, mut plain_http: Vec<String>) -> Result<RegistryOptions> {
    plain_http.extend(a.insecure_registries.iter().cloned());
    let ca_certificates = a
        .registry_certificates
        .iter()
        .map(|spec| {
            let (host, [ca]) = host_files("--registry-certificate", spec, "HOST=CA.pem")?;
            Ok((host, ca))
        })
        .collect::<Result<_>>()?;
    let client_certificates = a
        .registry_client_certs
        .iter()
        .map(|spec| {
            let (host, [cert, key]) =
                host_files("--registry-client-cert", spec, "HOST=CERT.pem,KEY.pem")?;
            Ok((host, cert, key))
        })
        .collect::<Result<_>>()?;
    Ok(RegistryOptions {
        plain_http,
        skip_tls_verify: a.skip_tls_verify,
        skip_tls_verify_registries: a.skip_tls_verify_registries.clone(),
        ca_certificates,
        client_certificates,
        mirrors: mirrors(a)?,
        mirror_fallback: !a.skip_default_registry_fallback,
        pull_retries: a.image_download_retry,
        push_retries: a.push_retry,
        docker_config: None,
    })
}

/// `HOST=FILE[,FILE...]` with exactly `N` files that exist.
fn host_files<const N: usize>(
    flag: &str,
    spec: &str,
    expected: &str,
) -> Result<(String, [PathBuf; N])> {
    let parsed = spec.split_once('=').and_then(|(host, files)| {
        // The last file keeps any comma its path has.
        let files: Vec<&str> = files.splitn(N, ',').collect();
        let files: [&str; N] = files.try_into().ok()?;
        (!host.is_empty() && files.iter().all(|f| !f.is_empty())).then_some((host, files))
    });
    let Some((host, files)) = parsed else {
        bail!("{flag} {spec}: expected {expected}");
    };
    if let Some(missing) = files.iter().find(|f| !Path::new(f).is_file()) {
        bail!("{flag} {spec}: {missing} is not a readable file");
    }
    Ok((host.to_string(), files.map(PathBuf::from)))
}

/// The isolation asked for, checked, or the strongest this process may use
/// (`kiln_engine::choose_isolation`), said once with the reason; with why
/// no RUN can be isolated, when none can.
fn isolation(arg: Option<IsolationArg>, force: bool) -> Result<(Isolation, Option<String>)> {
    let asked = arg.map(|a| match a {
        IsolationArg::Namespaces => Isolation::Namespaces,
        IsolationArg::Rootless => Isolation::Rootless,
        IsolationArg::Chroot => Isolation::Chroot,
        IsolationArg::None => Isolation::None,
    });
    let chosen = kiln_engine::choose_isolation(asked, &kiln_engine::HostAbilities)?;
    if chosen.isolation == Isolation::None {
        let Some(marker) = disposable_container() else {
            bail!("--isolation none replaces this machine's files with the image's: refused outside a container (no /.dockerenv, /run/.containerenv, $container or $KUBERNETES_SERVICE_HOST)");
        };
        if !force {
            bail!("--isolation none replaces this machine's files with the image's: add --force to allow it in this container ({marker})");
        }
    }
    let name = match chosen.run_unavailable {
        Some(_) => "none available".to_string(),
        None => chosen.isolation.to_string(),
    };
    sink().log(
        Record::info(format!("==> RUN isolation: {name} ({})", chosen.why))
            .field("event", "isolation")
            .field("isolation", name)
            .field("reason", chosen.why.clone()),
    );
    Ok((chosen.isolation, chosen.run_unavailable))
}

/// Goes on as root of the user namespace `forked` made, or, in the parent
/// left outside, exits with the child's code. Must run while the process
/// has one thread.
pub fn enter_user_namespace(forked: Result<Forked, UsernsError>) -> Result<()> {
    match forked? {
        Forked::Child => Ok(()),
        Forked::Parent(code) => crate::leave(code),
    }
}

/// What tells Kiln it runs in a container made for this build alone.
fn disposable_container() -> Option<String> {
    ["/.dockerenv", "/run/.containerenv"]
        .into_iter()
        .find(|marker| Path::new(marker).exists())
        .map(str::to_string)
        .or_else(|| {
            ["container", "KUBERNETES_SERVICE_HOST"]
                .into_iter()
                .find(|var| std::env::var_os(var).is_some())
                .map(|var| format!("${var}"))
        })
}

/// `--isolation none`: the files outside the build that Kiln's flags name
/// (Dockerfile, certificates, outputs), which the engine spares along with
/// everything it knows of itself (`kiln_engine` `host.rs`).
fn files_outside_the_build(a: &BuildArgs) -> Vec<PathBuf> {
    std::iter::once(a.frontend.dockerfile.clone())
        .chain(
            a.registry
                .registry_certificates
                .iter()
                .filter_map(|s| s.split_once('=').map(|(_, p)| p.into())),
        )
        .chain(
            [
                &a.tar_path,
                &a.oci_layout_path,
                &a.digest_file,
                &a.image_name_with_digest_file,
                &a.image_name_tag_with_digest_file,
            ]
            .into_iter()
            .flatten()
            .cloned(),
        )
        .collect()
}

/// `--secret` as buildah and `docker buildx` take it: `id=`, then `src=`
/// (or `source=`) for a file, `env=` for a variable, `type=file|env`.
fn parse_secrets(specs: &[String]) -> Result<BTreeMap<String, SecretSource>> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
        for field in spec.split(',') {
            match field.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", v @ ("file" | "env"))) => kind = Some(v.to_string()),
                _ => bail!("--secret {spec:?}: unknown field {field:?}"),
            }
        }
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            bail!("--secret {spec:?}: id= is required");
        };
        let source = match (src, env, kind.as_deref()) {
            (Some(_), Some(_), _) => bail!("--secret {spec:?}: give src= or env=, not both"),
            (Some(src), None, Some("env")) => SecretSource::Env(src),
            (Some(src), None, _) => SecretSource::File(PathBuf::from(src)),
            (None, Some(env), _) => SecretSource::Env(env),
            (None, None, Some("file")) => SecretSource::File(PathBuf::from(&id)),
            (None, None, _) => SecretSource::Env(id.clone()),
        };
        out.insert(id, source);
    }
    Ok(out)
}

pub fn run(a: BuildArgs) -> Result<()> {
    let started = Instant::now();
    let (isolation, run_unavailable) = isolation(a.isolation, a.force)?;
    // While the process has one thread: the build goes on in the child,
    // as root of its own user namespace (unless none can be had: it goes
    // on unprivileged then).
    if isolation == Isolation::Rootless && run_unavailable.is_none() {
        enter_user_namespace(kiln_engine::become_root())?;
    }
    // While the process has one thread, and only where the overlay
    // snapshotter may run: its mounts then live and die with this process.
    let snapshotter = match a.snapshotter {
        SnapshotterArg::Walk => Snapshotter::Walk,
        SnapshotterArg::Overlay => Snapshotter::Overlay,
        SnapshotterArg::Auto => Snapshotter::Auto,
    };
    let own_mount_namespace = overlay_wanted(snapshotter, isolation, a.single_snapshot)
        && kiln_engine::enter_private_mount_namespace()
            .inspect_err(|e| tracing::debug!(error = %e, "no mount namespace of our own"))
            .is_ok();
    let redirected = match sink().format() {
        LogFormat::Json => Some(crate::capture::redirect_output().context("capturing RUN output")?),
        LogFormat::Text | LogFormat::Color => None,
    };
    // The RUN steps' zygote, forked while the process has one thread and
    // after the pipes above are in place, which its steps write to.
    if isolation != Isolation::None && run_unavailable.is_none() {
        kiln_engine::fork_zygote();
    }
    // After the last fork: capturing starts a thread. Dropped (the real
    // stdout and stderr back) before the summary, which is the last line.
    let captured = redirected
        .map(|r| r.capture())
        .transpose()
        .context("capturing RUN output")?;
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
    let state = open_state_dir(a.cache_dir.as_deref())?;
    // A fetched context (tar, git) lives as long as the build.
    let scratch = state.new_context_dir().context("--cache-dir")?;
    let git = crate::context::GitOptions::parse(&a.git)?;
    let provenance = a.provenance.map(|p| match p {
        ProvenanceArg::Min => provenance::Mode::Min,
        ProvenanceArg::Max => provenance::Mode::Max,
    });
    let image_format = match a.image_format {
        ImageFormatArg::Oci => ImageFormat::Oci,
        ImageFormatArg::Docker => ImageFormat::Docker,
    };
    if provenance.is_some() {
        image_format.check_attestable()?; // before anything is built
    }
    let (context, commit) = crate::context::resolve(
        &a.context,
        a.context_sub_path.as_deref(),
        &git,
        scratch.path(),
        provenance.is_some(),
    )?;
    let (dockerfile_name, dockerfile) = read_dockerfile(&a.frontend, Some(&context))?;
    let platforms = crate::platforms::parse(&a.platforms, a.custom_platform.as_deref())?;
    let annotations =
        crate::platforms::annotations(&a.annotations, platforms.len() > 1 || provenance.is_some())?;
    // Found as read_dockerfile finds it: `<Dockerfile>.dockerignore` beside
    // it wins over the context's `.dockerignore`, as in BuildKit.
    let dockerfile_path = match &a.frontend.dockerfile {
        given if !given.exists() && given.is_relative() => context.join(given),
        given => given.clone(),
    };
    let dockerignore = kiln_engine::Ignore::load(&context, Some(&dockerfile_path))?;
    let ignore_paths = a
        .ignore_paths
        .iter()
        .map(|p| kiln_engine::clean_relative(p))
        .collect();
    if let Some(threads) = a.compression_threads {
        kiln_engine::set_compression_threads(threads.into());
    }
    let options = BuildOptions {
        dockerfile_name,
        dockerfile,
        context,
        dockerignore,
        build_args: parse_pairs("--build-arg", &a.frontend.build_args)?,
        target: a.frontend.target.clone(),
        platform: platforms[0].clone(),
        compression: compression(&a)?,
        fixed_time: fixed_time(a.reproducible)?,
        labels: parse_pairs("--label", &a.labels)?,
        insecure_pull: a.insecure_pull,
        snapshot_mode: match a.snapshot_mode {
            SnapshotModeArg::Redo => SnapshotMode::Redo,
            SnapshotModeArg::Full => SnapshotMode::Full,
            SnapshotModeArg::Time => SnapshotMode::Time,
        },
        ignore_paths,
        host_files: match isolation {
            Isolation::None => files_outside_the_build(&a),
            _ => Vec::new(),
        },
        single_snapshot: a.single_snapshot,
        copy_view: a.copy_view == crate::args::CopyViewArg::Meta,
        cache: a.cache,
        cache_ttl: a.cache_ttl.into(),
        cache_repo: a.cache_repo.clone(),
        cache_repo_push: !a.no_push_cache,
        skip_tls_verify_pull: a.registry.skip_tls_verify_pull,
        isolation,
        run_unavailable,
        snapshotter,
        own_mount_namespace,
        image_format,
        cache_run_layers: a.cache_run_layers,
        cache_copy_layers: a.cache_copy_layers,
        secrets: parse_secrets(&a.secrets)?,
    };
    let mut plain_http = Vec::new();
    if a.insecure {
        plain_http.extend(
            destinations
                .iter()
                .map(|d| d.resolve_registry().to_string()),
        );
        if let Some(repo) = &a.cache_repo {
            let r = parse_reference(repo).with_context(|| format!("--cache-repo {repo}"))?;
            plain_http.push(r.resolve_registry().to_string());
        }
    }
    let invocation = provenance::Invocation {
        // Inside the context, its path there (as in BuildKit), not this
        // machine's.
        dockerfile_name: dockerfile_path
            .strip_prefix(&options.context)
            .map_or(options.dockerfile_name.clone(), |p| p.display().to_string()),
        dockerfile_digest: kiln_cachestore::digest::sha256(options.dockerfile.as_bytes()),
        build_args: options.build_args.clone(),
        target: options.target.clone(),
        git: commit.map(|commit| provenance::GitContext {
            url: a.context.clone(),
            commit,
        }),
    };
    // The subject's name: the first destination's, as BuildKit names it.
    let subject_name = destinations.first().map(|d| d.whole());
    let registry = RegistryClient::new(registry_options(&a.registry, plain_http)?)
        .with_progress(crate::progress::observer());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Each destination's tag is asked what it names while the build runs
    // (`output::push` then needs no HEAD at the end). Asking opens the
    // registry (its `/v2/`), so a base there resolves without that wait.
    let tags_at_start: Vec<_> = match a.no_push {
        true => Vec::new(),
        false => destinations
            .iter()
            .map(|d| {
                let (registry, d) = (registry.clone(), d.clone());
                runtime.spawn(async move { registry.manifest_at(&d).await })
            })
            .collect(),
    };
    let at = || format!("--cache-dir {}", state.path().display());
    let store = BlobStore::open(&state).with_context(at)?;
    let index = Index::open(&state).with_context(at)?;
    runtime.block_on(async {
        if isolation == Isolation::None {
            let mut pushed_to = destinations.clone();
            if let Some(repo) = &a.cache_repo {
                pushed_to.push(parse_reference(repo)?);
            }
            registry.prepare(&pushed_to).await?;
        }
        let log = BuildLog::default();
        let summaries = std::sync::Mutex::new(Vec::new());
        let recorder = std::sync::Mutex::new(provenance::Recorder::default());
        let on_event = |e: Event| {
            if provenance.is_some() {
                recorder.lock().expect("recorder poisoned").event(&e);
            }
            if let Event::Summary(s) = &e {
                summaries
                    .lock()
                    .expect("summaries poisoned")
                    .push(s.clone());
            }
            log.event(e)
        };
        // New layers go to the destinations, and entries to --cache-repo,
        // while the build goes on; pushing waits for them before any
        // manifest.
        let pushed_to = match a.no_push {
            true => Vec::new(),
            false => destinations.clone(),
        };
        let uploads = Uploads::new(&registry, &store, pushed_to);
        // One platform after the other: a stage every platform shares
        // (`FROM --platform=$BUILDPLATFORM` with no TARGET* args) is built
        // by the first and found in the cache by the rest.
        let mut images = Vec::new();
        let mut attestations = Vec::new();
        let per_platform: Vec<BuildOptions> = platforms
            .iter()
            .map(|platform| BuildOptions {
                platform: platform.clone(),
                ..options.clone()
            })
            .collect();
        // Dropped after the outputs: removing a builder's dir (its scratch
        // dirs' removals joined first) then goes on while the push waits
        // on the registry.
        let mut builders = Vec::new();
        for options in &per_platform {
            let platform = &options.platform;
            if platforms.len() > 1 {
                crate::platforms::log_platform(platform);
            }
            let builder = Builder::new(options, &state, &store, &index, &registry, &on_event)?
                .with_uploads(&uploads);
            let image = match builder.build().await {
                Ok(image) => image,
                Err(e) => {
                    // The --cache-repo entries of the steps that were built
                    // are still written, as they were stage by stage.
                    let _ = uploads.finish().await;
                    registry.cancel_unused_uploads().await;
                    return Err(e.into());
                }
            };
            let image = output::annotate(&store, image, &annotations.manifest)?;
            if let Some(mode) = provenance {
                let recorded = std::mem::take(&mut *recorder.lock().expect("recorder poisoned"));
                let statement = provenance::statement(
                    mode,
                    subject_name.as_deref(),
                    &image.manifest.digest,
                    &platform.to_string(),
                    &invocation,
                    &recorded,
                )?;
                attestations.push(output::attestation(&store, &image, &statement)?);
            }
            images.push(image);
            builders.push(builder);
        }
        let built = crate::platforms::combine(&store, images, attestations, &annotations)?;
        let outputs_started = Instant::now();
        let tags: Vec<String> = destinations.iter().map(|d| d.whole()).collect();
        if let Some(path) = &a.tar_path {
            output::write_docker_archive(&built, &tags, path, &store)?;
            log_output("wrote", "tar", &path.display().to_string());
        }
        if let Some(path) = &a.oci_layout_path {
            let layout_tags: Vec<String> = match destinations.is_empty() {
                true => vec!["latest".into()],
                false => destinations
                    .iter()
                    .map(|d| d.tag().unwrap_or("latest").to_string())
                    .collect(),
            };
            output::write_oci_layout(&built, &layout_tags, path, &store)?;
            log_output("wrote", "oci-layout", &path.display().to_string());
        }
        for (destination, at_start) in destinations.iter().zip(tags_at_start) {
            let at_start = at_start.await.ok().flatten();
            output::push(&built, destination, at_start, &registry, &store, &uploads).await?;
            log_output("pushed", "destination", &destination.whole());
        }
        // The end: --cache-repo entries are all written (with --no-push too).
        uploads.finish().await?;
        registry.cancel_unused_uploads().await;
        drop(builders);
        if let Some(path) = &a.digest_file {
            output::write_digest_file(&built, path)?;
        }
        // Kaniko's formats: `repo@digest` and `repo:tag@digest`, a line each.
        let digest = &built.descriptor().digest;
        let named = |with_tag: bool| -> String {
            destinations
                .iter()
                .map(|d| {
                    let name = format!("{}/{}", d.registry(), d.repository());
                    match (with_tag, d.tag()) {
                        (true, Some(tag)) => format!("{name}:{tag}@{digest}\n"),
                        _ => format!("{name}@{digest}\n"),
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
        let (pulled, pushed) = registry.bytes_transferred();
        let finished = Finished {
            digest: digest.to_string(),
            elapsed: started.elapsed(),
            outputs: outputs_started.elapsed(),
            pulled,
            pushed,
            mounted: registry.blobs_mounted(),
        };
        if let Some(path) = &a.metadata_file {
            let summaries = summaries.lock().expect("summaries poisoned");
            crate::metadata::write(path, &built, &tags, &platforms, &summaries, &finished)?;
        }
        drop(captured);
        log.finish(&finished);
        anyhow::Ok(())
    })
}

/// `    wrote PATH` / `    pushed REF`: an output made.
fn log_output(verb: &str, kind: &str, to: &str) {
    sink().log(
        Record::info(format!("    {verb} {to}"))
            .field("event", "image-output")
            .field("kind", kind)
            .field("to", to),
    );
}
