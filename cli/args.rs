//! Command-line arguments. Flag names and meanings follow Kaniko's, so a
//! Kaniko job moves to Kiln by changing the image: its `args:` start with
//! a flag, and Kiln then runs `build`.
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Daemonless, cache-first container image builder"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    pub verbosity: String,
    /// How stderr lines look: text, color (text with ANSI colours) or json
    /// (one object a line, RUN output included). Kaniko's flag.
    #[arg(long, global = true, value_enum, default_value_t = crate::sink::LogFormat::Text)]
    pub log_format: crate::sink::LogFormat,
    /// Prefix text lines with the time (JSON lines always have it). Kaniko's flag.
    #[arg(long, global = true, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub log_timestamp: bool,
    #[command(subcommand)]
    pub command: Commands,
}

/// `args` with `build` put first when they start with a flag (Kaniko's
/// executor has no subcommands), except for `--help` and `--version`.
pub fn with_default_command(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut args: Vec<OsString> = args.into_iter().collect();
    let starts_with_a_flag = args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| a.starts_with('-') && !matches!(a, "-h" | "--help" | "-V" | "--version"));
    if starts_with_a_flag {
        args.insert(1, "build".into());
    }
    args
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Build an image from a Dockerfile and a context, then push or save it.
    Build(Box<BuildArgs>),
    /// Print the parsed and resolved build without building.
    Plan(PlanArgs),
    /// Inspect and clean the local cache.
    Cache(CacheArgs),
    /// Pull base images into the cache ahead of builds.
    Warm(Box<WarmArgs>),
    /// Make image indexes (multi-platform images) from images in registries.
    Index(IndexArgs),
}

#[derive(Debug, Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Push an index of single-platform images already in registries (one
    /// per architecture, built by separate jobs): the daemonless
    /// `docker manifest create` + `push`.
    Create(Box<IndexCreateArgs>),
}

#[derive(Debug, Args)]
pub struct IndexCreateArgs {
    /// Where to push the index. Repeatable.
    #[arg(short = 'd', long = "destination", value_name = "REF", required = true)]
    pub destinations: Vec<String>,
    /// The images, one per platform (each one's platform is read from its
    /// config): `REF[:tag]` or `REF@sha256:...`.
    #[arg(value_name = "SRC", required = true)]
    pub sources: Vec<String>,
    /// An OCI annotation on the index, `KEY=VALUE` (or `index:KEY=VALUE`). Repeatable.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    pub annotations: Vec<String>,
    /// Write the index's digest to this file.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,
    /// Kiln's state directory (as for `kiln build`): blobs that must be
    /// copied between registries pass through its store.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Push to destination registries over plain HTTP.
    #[arg(long)]
    pub insecure: bool,
    /// Read the sources over plain HTTP.
    #[arg(long)]
    pub insecure_pull: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct WarmArgs {
    /// An image to pull (registry reference or `oci-layout://PATH[:tag]`). Repeatable.
    #[arg(long = "image", value_name = "REF")]
    pub images: Vec<String>,
    /// Also pull every image this Dockerfile's stages start or copy from.
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// Kiln's state directory (as for `kiln build`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The platform to pick from image indexes, `os/arch[/variant]`
    /// (default: the host's).
    #[arg(long, value_name = "PLATFORM", conflicts_with = "platforms")]
    pub custom_platform: Option<String>,
    /// Platforms to warm for, comma-separated or repeated, as `kiln build
    /// --platform` takes them: each image is fetched (and unpacked) for
    /// each, and a Dockerfile's stages for the platform each one's build
    /// pulls them for (`FROM --platform=$BUILDPLATFORM`: the host's).
    #[arg(long = "platform", value_name = "PLATFORM,...", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// Re-verify stored blobs and fetch again those that do not match.
    #[arg(long)]
    pub force: bool,
    /// Also unpack each image's layers for the overlay snapshotter, where
    /// builds here use it, so the first build unpacks nothing (on by
    /// default; `--unpack=false` only fetches).
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub unpack: bool,
    /// Pull over plain HTTP.
    #[arg(long)]
    pub insecure_pull: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Kaniko flags that Kiln accepts so a Kaniko job runs unchanged, but that
/// change nothing here: Kiln always cleans up its work dir, never holds
/// layers in memory, keeps every mount when it unpacks over `/` (only with
/// `--isolation none`; so `/var/run` needs no ignoring), only builds the
/// stages the target needs, and always runs RUN the new way.
#[derive(Debug, Args)]
pub struct KanikoCompat {
    #[arg(long, hide = true)]
    pub cleanup: bool,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub compressed_caching: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub ignore_var_run: Option<bool>,
    #[arg(long, hide = true, value_name = "N")]
    pub image_fs_extract_retry: Option<u32>,
    #[arg(long, hide = true, value_name = "DIR")]
    pub kaniko_dir: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub push_ignore_immutable_tag_errors: bool,
    #[arg(long, hide = true)]
    pub skip_push_permission_check: bool,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub skip_unused_stages: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub use_new_run: Option<bool>,
}

/// How to reach registries. Credentials come from the Docker config
/// (`$DOCKER_CONFIG/config.json`, `~/.docker/config.json`, `/kaniko/.docker`).
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// A registry (`host[:port]`) to use over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// Do not verify registries' TLS certificates.
    #[arg(long)]
    pub skip_tls_verify: bool,
    /// Do not verify this registry's TLS certificate. Repeatable.
    #[arg(long = "skip-tls-verify-registry", value_name = "HOST")]
    pub skip_tls_verify_registries: Vec<String>,
    /// Do not verify TLS certificates of the registries base images come from.
    #[arg(long)]
    pub skip_tls_verify_pull: bool,
    /// Show this client certificate to a registry (mutual TLS),
    /// `host[:port]=cert.pem,key.pem`. Repeatable.
    #[arg(long = "registry-client-cert", value_name = "HOST=CERT,KEY")]
    pub registry_client_certs: Vec<String>,
    /// Trust this CA (PEM) for a registry, `host[:port]=ca.pem`. Repeatable.
    #[arg(long = "registry-certificate", value_name = "HOST=FILE")]
    pub registry_certificates: Vec<String>,
    /// A mirror (`host[/prefix]`) to pull Docker Hub images from, tried
    /// before docker.io. Repeatable, tried in order.
    #[arg(long = "registry-mirror", value_name = "HOST")]
    pub registry_mirrors: Vec<String>,
    /// Pull a registry's images from a mirror instead, `orig=mirror[/prefix]`.
    /// Repeatable.
    #[arg(long = "registry-map", value_name = "ORIG=MIRROR")]
    pub registry_maps: Vec<String>,
    /// Do not fall back to the original registry when every mirror fails.
    #[arg(long)]
    pub skip_default_registry_fallback: bool,
    /// Retry a push this many times after a 5xx, 429 or dropped connection.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub push_retry: u32,
    /// Retry a pull this many times after a 5xx, 429 or dropped connection.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub image_download_retry: u32,
}

impl WarmArgs {
    /// `--dockerfile` defaults to `Dockerfile`: only read when it was given
    /// or when no `--image` was.
    pub fn dockerfile_given(&self) -> bool {
        self.images.is_empty() || self.frontend.dockerfile != std::path::Path::new("Dockerfile")
    }
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Kiln's state directory (as for `kiln build`).
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Count entries and blobs.
    Stats,
    /// List every cache entry: key, layer, age.
    Ls,
    /// Remove expired entries, then blobs no entry refers to.
    Gc {
        /// Collect until the store (blobs, then unpacked layers) is this small (e.g. 10GiB).
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Entries older than this are expired (e.g. 7d).
        #[arg(long, value_name = "AGE", default_value = "2weeks")]
        older_than: humantime::Duration,
    },
    /// Re-hash every blob, drop what does not verify, report damage (exit 1).
    Verify,
    /// Remove everything: entries, blobs, cache mounts.
    Prune,
}

#[derive(Debug, Args)]
pub struct FrontendArgs {
    /// Path to the Dockerfile (relative to the working directory, or else to the context).
    #[arg(short = 'f', long, default_value = "Dockerfile")]
    pub dockerfile: PathBuf,
    /// A build argument, `KEY=VALUE` (or `KEY` to take it from the environment). Repeatable.
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// The stage to build (by name or index); the default is the last one.
    #[arg(long)]
    pub target: Option<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// The build context: a directory (`DIR`, `dir://DIR`), a tarball
    /// (`tar://PATH`, `tar://stdin` or `-`), or a git repository
    /// (`git://host/repo.git#ref:subdir`, or an https/file URL ending in `.git`).
    #[arg(short = 'c', long, default_value = ".")]
    pub context: String,
    /// A directory inside the context to use as the context.
    #[arg(long, value_name = "PATH")]
    pub context_sub_path: Option<PathBuf>,
    /// Where to push the image. Repeatable.
    #[arg(short = 'd', long = "destination", value_name = "REF")]
    pub destinations: Vec<String>,
    /// Build without pushing.
    #[arg(long)]
    pub no_push: bool,
    /// Also write the image as a docker-archive tarball (loadable by `podman load`).
    #[arg(long, value_name = "FILE")]
    pub tar_path: Option<PathBuf>,
    /// Also write the image into an OCI layout directory.
    #[arg(long, value_name = "DIR")]
    pub oci_layout_path: Option<PathBuf>,
    /// Write the image's manifest digest to this file.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,
    /// Use the layer cache (on by default; `--cache=false` turns it off).
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub cache: bool,
    /// A repository (`registry/repo`, no tag) that holds the shared remote
    /// cache: looked up after the local cache, filled with every new step.
    #[arg(long, value_name = "REPO")]
    pub cache_repo: Option<String>,
    /// Cache entries older than this are not used (e.g. `336h`, `2weeks`).
    #[arg(long, default_value = "2weeks")]
    pub cache_ttl: humantime::Duration,
    /// Cache the layers of RUN steps.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub cache_run_layers: bool,
    /// Cache the layers of COPY steps.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub cache_copy_layers: bool,
    /// Kiln's state directory: blob store, cache index and build roots.
    /// Default: $XDG_CACHE_HOME/kiln, else ~/.cache/kiln.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Push to destination registries over plain HTTP.
    #[arg(long)]
    pub insecure: bool,
    /// Pull base images over plain HTTP.
    #[arg(long)]
    pub insecure_pull: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Fix every timestamp so the same inputs give the same image digest
    /// (SOURCE_DATE_EPOCH if set, else the epoch).
    #[arg(long)]
    pub reproducible: bool,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    pub compression: CompressionArg,
    /// Compression level (gzip 1-9, zstd 1-22).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Threads that compress layers (default: one per core; 1: the thread
    /// that writes the layer). The layer bytes do not depend on it.
    #[arg(long, env = "KILN_COMPRESSION_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub compression_threads: Option<u16>,
    /// A label to add to the image, `KEY=VALUE`. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// How snapshots detect changes: redo (metadata, hashing racy files),
    /// full (also hash every file), time (mtime only, as Kaniko's).
    #[arg(long, value_enum, default_value_t = SnapshotModeArg::Redo)]
    pub snapshot_mode: SnapshotModeArg,
    /// A path inside the image that snapshots ignore. Repeatable.
    #[arg(long = "ignore-path", value_name = "PATH")]
    pub ignore_paths: Vec<PathBuf>,
    /// One layer per stage instead of one per step.
    #[arg(long)]
    pub single_snapshot: bool,
    /// How COPY and WORKDIR steps before a stage's first RUN are built:
    /// `meta` from the metadata of the layers below (nothing unpacked),
    /// `root` on the unpacked root. The layers are the same; for tests.
    #[arg(long, value_enum, default_value_t = CopyViewArg::Meta, hide = true)]
    pub copy_view: CopyViewArg,
    /// Write `<destination>@<digest>` for each destination to this file.
    #[arg(long, value_name = "FILE")]
    pub image_name_with_digest_file: Option<PathBuf>,
    /// Write `<destination>:<tag>@<digest>` for each destination to this file.
    #[arg(long, value_name = "FILE")]
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// Look up `--cache-repo` but do not push new entries to it.
    #[arg(long)]
    pub no_push_cache: bool,
    /// Git context options: `branch=NAME`, `single-branch=BOOL`,
    /// `recurse-submodules=BOOL`. Repeatable.
    #[arg(long = "git", value_name = "KEY=VALUE")]
    pub git: Vec<String>,
    #[command(flatten)]
    pub kaniko: KanikoCompat,
    /// The platform to build for, `os/arch[/variant]` (default: the host's).
    #[arg(long, value_name = "PLATFORM", conflicts_with = "platforms")]
    pub custom_platform: Option<String>,
    /// Platforms to build for, `os/arch[/variant]`, comma-separated or
    /// repeated: one build makes an image per platform and outputs an image
    /// index of them (with one platform, a plain image, as
    /// --custom-platform). RUN for another architecture runs under QEMU.
    #[arg(long = "platform", value_name = "PLATFORM,...", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// An OCI annotation, `KEY=VALUE`, on the image manifest(s)
    /// (`manifest:KEY=VALUE`, the default) or the index (`index:KEY=VALUE`).
    /// Repeatable.
    #[arg(long = "annotation", value_name = "[manifest:|index:]KEY=VALUE")]
    pub annotations: Vec<String>,
    /// Write the build's result as JSON to this file: buildx's keys
    /// (`containerimage.digest`, `containerimage.descriptor`, `image.name`)
    /// and Kiln's summary (`kiln.build`).
    #[arg(long, value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// Attach SLSA provenance (an in-toto statement) to each image, as
    /// BuildKit does: min (builder, build args, Dockerfile digest, git
    /// commit, base image digests) or max (and every step). The output is
    /// then an index, even for one platform. Build args appear in it.
    #[arg(long, value_enum, value_name = "min|max")]
    pub provenance: Option<ProvenanceArg>,
    /// How RUN changes are found: walk (compare the whole root), overlay
    /// (run on an overlay and take its upper dir), or auto (overlay where
    /// overlayfs can be mounted, else walk).
    #[arg(long, value_enum, default_value_t = SnapshotterArg::Auto)]
    pub snapshotter: SnapshotterArg,
    /// The pushed manifest's format: oci, or docker (schema 2).
    #[arg(long, value_enum, default_value_t = ImageFormatArg::Oci)]
    pub image_format: ImageFormatArg,
    /// How RUN steps are isolated: namespaces (chroot in new mount, PID,
    /// UTS and IPC namespaces; the default as root), rootless (the same in
    /// a user namespace mapping the caller to root and its /etc/subuid
    /// range; the default otherwise), chroot (for containers that forbid
    /// unshare) or none (Kaniko's way: the build runs over this machine's
    /// own `/`; only with --force, in a container Kiln can recognize).
    #[arg(long, value_enum)]
    pub isolation: Option<IsolationArg>,
    /// Allow `--isolation none`, which replaces this machine's files with
    /// the image's: only in a disposable container.
    #[arg(long)]
    pub force: bool,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or
    /// `id=ID,env=VAR` (a bare `id=ID` reads $ID). Repeatable.
    #[arg(long = "secret", value_name = "id=ID,src=FILE")]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CopyViewArg {
    Meta,
    Root,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SnapshotModeArg {
    Redo,
    Full,
    Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotterArg {
    Auto,
    Walk,
    Overlay,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProvenanceArg {
    Min,
    Max,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImageFormatArg {
    Oci,
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    Namespaces,
    Rootless,
    Chroot,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Gzip,
    Zstd,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
    pub format: PlanFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlanFormat {
    Json,
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = std::iter::once("kiln")
            .chain(args.iter().copied())
            .map(OsString::from);
        Cli::try_parse_from(with_default_command(args)).unwrap()
    }

    #[test]
    fn kaniko_args_without_a_subcommand_build() {
        let cli = parse(&[
            "--verbosity=debug",
            "--context=dir:///workspace",
            "--destination=registry.example/app:1",
            "--cache=true",
        ]);
        assert_eq!(cli.verbosity, "debug");
        let Commands::Build(b) = cli.command else {
            panic!("expected build");
        };
        assert_eq!(b.context, "dir:///workspace");
        assert_eq!(b.destinations, ["registry.example/app:1"]);
        assert!(matches!(
            parse(&["plan", "--dockerfile", "D"]).command,
            Commands::Plan(_)
        ));
        let help = with_default_command(["kiln", "--help"].map(OsString::from));
        assert_eq!(help.len(), 2);
    }
}
