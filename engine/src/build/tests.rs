//! The stage loop and the cache decisions, in-process and without root:
//! RUN goes to a fake that writes a file, unpacking to the real extractor
//! (counted), and overlays are unavailable (the walk snapshotter).
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_cachestore::state::StateDir;
use kiln_cachestore::{BlobStore, Index, Platform, RegistryClient, RegistryOptions};

use super::syscalls::{Host, Mount, Syscalls, UnpackInto};
use super::{BuildOptions, Builder, CacheResult, Event, Snapshotter, StepReport, Summary};
use crate::exec::run::{Isolation, RunSpec};
use crate::image::{BuiltImage, ImageFormat};
use crate::layer::Compression;
use crate::rootfs::extract::{ExtractError, ExtractStats};

/// Runs a RUN by writing its last argument to `/ran` in the root.
#[derive(Default)]
struct FakeKernel {
    runs: AtomicUsize,
    extracts: AtomicUsize,
}

impl Syscalls for FakeKernel {
    fn mount_overlay(
        &self,
        _: &[PathBuf],
        _: Option<(&Path, &Path)>,
        _: &Path,
    ) -> io::Result<Mount> {
        Err(io::Error::other("no overlays in unit tests"))
    }

    fn extract(
        &self,
        layer: &mut dyn Read,
        dir: &Path,
        into: UnpackInto,
    ) -> Result<ExtractStats, ExtractError> {
        self.extracts.fetch_add(1, Ordering::Relaxed);
        Host.extract(layer, dir, into)
    }

    fn run(&self, spec: &RunSpec) -> io::Result<i32> {
        self.runs.fetch_add(1, Ordering::Relaxed);
        let script = spec.argv.last().cloned().unwrap_or_default();
        std::fs::write(spec.root.join("ran"), script)?;
        Ok(0)
    }
}

struct Fixture {
    state: tempfile::TempDir,
    context: tempfile::TempDir,
    options: BuildOptions,
}

impl Fixture {
    /// A context with a root fs (`/etc/passwd` for RUN's user) and a file.
    fn new(dockerfile: &str) -> Fixture {
        let context = tempfile::tempdir().unwrap();
        let etc = context.path().join("rootfs/etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(etc.join("group"), "root:x:0:\n").unwrap();
        std::fs::write(context.path().join("a.txt"), "a").unwrap();
        // Owned by whoever runs the tests, so no step needs root.
        let owner = format!(
            "{}:{}",
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw()
        );
        let options = BuildOptions {
            dockerfile_name: "Dockerfile".into(),
            dockerfile: dockerfile.replace("OWNER", &owner),
            context: context.path().to_path_buf(),
            dockerignore: Default::default(),
            build_args: Default::default(),
            target: None,
            platform: Platform {
                architecture: "amd64".into(),
                os: "linux".into(),
                variant: None,
            },
            compression: Compression::Gzip { level: 1 },
            fixed_time: None,
            labels: Default::default(),
            insecure_pull: false,
            snapshot_mode: Default::default(),
            ignore_paths: Vec::new(),
            host_files: Vec::new(),
            single_snapshot: false,
            copy_view: true,
            cache: true,
            cache_ttl: std::time::Duration::from_secs(3600),
            cache_run_layers: true,
            cache_copy_layers: true,
            image_format: ImageFormat::Oci,
            snapshotter: Snapshotter::Walk,
            own_mount_namespace: false,
            isolation: Isolation::Namespaces,
            run_unavailable: None,
            cache_repo: None,
            cache_repo_push: false,
            skip_tls_verify_pull: false,
            secrets: Default::default(),
        };
        Fixture {
            state: tempfile::tempdir().unwrap(),
            context,
            options,
        }
    }

    fn state_dir(&self) -> StateDir {
        StateDir::open(self.state.path()).unwrap()
    }

    /// One build with `kernel`: its image and summary.
    async fn build(&self, kernel: &FakeKernel) -> (BuiltImage, Summary) {
        let (image, summary, _) = self.build_reporting(kernel).await;
        (image, summary)
    }

    /// One build with `kernel`: its image, summary and step reports.
    async fn build_reporting(&self, kernel: &FakeKernel) -> (BuiltImage, Summary, Vec<StepReport>) {
        let store = BlobStore::open(&self.state_dir()).unwrap();
        let index = Index::open(&self.state_dir()).unwrap();
        let registry = RegistryClient::new(RegistryOptions::default());
        let summary = Mutex::new(None);
        let reports = Mutex::new(Vec::new());
        let on_event = |e: Event| match e {
            Event::Summary(s) => *summary.lock().unwrap() = Some(s),
            Event::StepDone(r) => reports.lock().unwrap().push(r),
            _ => {}
        };
        let builder = Builder::with_syscalls(
            &self.options,
            &self.state_dir(),
            &store,
            &index,
            &registry,
            &on_event,
            kernel,
        )
        .unwrap();
        let image = builder.build().await.unwrap();
        drop(builder);
        let summary = summary.into_inner().unwrap().expect("a summary event");
        (image, summary, reports.into_inner().unwrap())
    }
}

const TWO_STAGES: &str = "\
FROM scratch AS build
COPY --chown=OWNER rootfs/ /
COPY --chown=OWNER a.txt /a.txt
RUN make b
FROM scratch
COPY --from=build /ran /b
ENV X=1
";

#[tokio::test]
async fn a_rebuild_hits_every_step_and_unpacks_nothing() {
    let f = Fixture::new(TWO_STAGES);
    let first = FakeKernel::default();
    let (image, summary) = f.build(&first).await;
    assert_eq!(first.runs.load(Ordering::Relaxed), 1);
    assert_eq!((summary.cache_hits, summary.cache_misses), (0, 4));
    assert_eq!(image.layers.len(), 1, "the final stage has one COPY");

    let second = FakeKernel::default();
    let (again, summary) = f.build(&second).await;
    assert_eq!(second.runs.load(Ordering::Relaxed), 0);
    assert_eq!(second.extracts.load(Ordering::Relaxed), 0);
    assert_eq!((summary.cache_hits, summary.cache_misses), (4, 0));
    assert_eq!(summary.layers_unpacked, 0);
    assert_eq!(again.manifest.digest, image.manifest.digest);
}

#[tokio::test]
async fn each_step_reports_its_cache_result_layer_and_time() {
    let f = Fixture::new(TWO_STAGES);
    let (image, _, cold) = f.build_reporting(&FakeKernel::default()).await;
    let (_, _, warm) = f.build_reporting(&FakeKernel::default()).await;
    for (reports, keyed) in [(&cold, CacheResult::Miss), (&warm, CacheResult::LocalHit)] {
        let seen: Vec<(usize, usize, usize, Option<CacheResult>)> = reports
            .iter()
            .map(|r| (r.stage, r.index, r.line, r.cache))
            .collect();
        // Every step of both stages, in order; ENV has no key.
        let expected = vec![
            (0, 0, 2, Some(keyed)),
            (0, 1, 3, Some(keyed)),
            (0, 2, 4, Some(keyed)),
            (1, 0, 6, Some(keyed)),
            (1, 1, 7, None),
        ];
        assert_eq!(seen, expected);
        assert!(reports[2].text.contains("make b"), "{}", reports[2].text);
        // The final stage's COPY --from has the image's one layer, made or cached.
        let layer = &image.layers[0].descriptor;
        assert_eq!(reports[3].layer, Some((layer.digest.clone(), layer.size)));
        assert_eq!(reports[4].layer, None);
    }
    // The RUN that ran spent time running and writing its layer.
    let phases: Vec<&str> = cold[2].phases.iter().map(|(p, _)| *p).collect();
    assert_eq!(phases, ["run", "layers"]);
    assert!(cold[2].duration >= cold[2].phases.iter().map(|(_, d)| *d).sum());
    assert!(
        warm[2].phases.is_empty(),
        "a hit on a stage not on disk does nothing"
    );
}

#[tokio::test]
async fn a_changed_source_reruns_its_step_and_everything_after_it() {
    let f = Fixture::new(TWO_STAGES);
    f.build(&FakeKernel::default()).await;
    std::fs::write(f.context.path().join("a.txt"), "changed").unwrap();
    let kernel = FakeKernel::default();
    let (_, summary) = f.build(&kernel).await;
    // The rootfs COPY hits and is unpacked under the steps that run; the
    // RUN chains on the changed COPY and runs again. It makes the same
    // file, so the final stage's COPY --from of it, keyed on the RUN,
    // misses and is then found by its content.
    assert_eq!(kernel.runs.load(Ordering::Relaxed), 1);
    assert_eq!(kernel.extracts.load(Ordering::Relaxed), 1);
    assert_eq!((summary.cache_hits, summary.cache_misses), (2, 2));
}

#[tokio::test]
async fn expired_entries_and_missing_blobs_are_misses() {
    let mut f = Fixture::new(TWO_STAGES);
    let (image, _) = f.build(&FakeKernel::default()).await;

    // The final stage's layer blob is gone: only its step runs again.
    let store = BlobStore::open(&f.state_dir()).unwrap();
    std::fs::remove_file(store.path(&image.layers[0].descriptor.digest).unwrap()).unwrap();
    drop(store);
    let kernel = FakeKernel::default();
    let (again, summary) = f.build(&kernel).await;
    assert_eq!((summary.cache_hits, summary.cache_misses), (3, 1));
    assert_eq!(kernel.runs.load(Ordering::Relaxed), 0, "the RUN hit");
    // The build stage is unpacked for the COPY --from, and the layer is
    // written (and stored) anew.
    assert_eq!(kernel.extracts.load(Ordering::Relaxed), 3);
    let store = BlobStore::open(&f.state_dir()).unwrap();
    assert!(store.contains(&again.layers[0].descriptor.digest).unwrap());
    drop(store);

    // Past the TTL nothing hits (entries count whole seconds).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    f.options.cache_ttl = std::time::Duration::ZERO;
    let kernel = FakeKernel::default();
    let (_, summary) = f.build(&kernel).await;
    assert_eq!((summary.cache_hits, summary.cache_misses), (0, 4));
    assert_eq!(kernel.runs.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn uncacheable_steps_always_run_and_the_rest_still_hit() {
    let mut f = Fixture::new(TWO_STAGES);
    f.build(&FakeKernel::default()).await;
    f.options.cache_run_layers = false;
    let kernel = FakeKernel::default();
    let (_, summary) = f.build(&kernel).await;
    // The RUN is not looked up; the COPYs before it hit (and are unpacked
    // to run it on), and the final stage's COPY --from hits after it.
    assert_eq!(kernel.runs.load(Ordering::Relaxed), 1);
    assert_eq!((summary.cache_hits, summary.cache_misses), (3, 1));
    assert_eq!(summary.layers_unpacked, 2);

    f.options.cache = false;
    let kernel = FakeKernel::default();
    let (_, summary) = f.build(&kernel).await;
    assert_eq!((summary.cache_hits, summary.cache_misses), (0, 4));
}
