//! The local cache tier end to end: full hits without unpacking, exact
//! misses after a context or build-arg change (a renamed file a glob
//! matches too), a `COPY --from` found by the content it copies (locally
//! and in `--cache-repo`), TTL expiry, `--cache=false`, and builds sharing
//! one cache dir at once.
mod support;

use std::path::Path;
use std::process::Output;

use support::*;

/// (steps from the cache, steps run, layers unpacked) from the summary line.
fn summary(out: &Output) -> (usize, usize, usize) {
    let err = stderr(out);
    assert!(out.status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("steps from the cache"))
        .unwrap_or_else(|| panic!("no summary in:\n{err}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

fn build(ctx: &Context, state: &Path, out: &Path, extra: &[&str]) -> (Output, String) {
    let digest_file = out.join("digest");
    let mut args = vec![
        "--no-push",
        "--reproducible",
        "--oci-layout-path",
        out.to_str().unwrap(),
        "--digest-file",
        digest_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = kiln_build(ctx, state, &args);
    let digest = std::fs::read_to_string(&digest_file).unwrap_or_default();
    (output, digest)
}

const DOCKERFILE: &str = "FROM {BASE}
RUN echo first > /first
COPY a.txt /a.txt
COPY b.txt /b.txt
ARG FLAVOUR=plain
LABEL version=1
RUN echo \"$FLAVOUR $(cat /b.txt)\" > /derived
";

fn context(base: &str, b: &str) -> Context {
    Context::new(
        &DOCKERFILE.replace("{BASE}", base),
        &[("a.txt", "a\n"), ("b.txt", b)],
    )
}

#[test]
fn rebuilds_do_only_the_work_whose_inputs_changed() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&base, "b\n");

    let (cold, cold_digest) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&cold), (0, 4, 1), "{}", stderr(&cold));

    // Nothing changed: every step hits, nothing is unpacked, same image.
    let (warm, warm_digest) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&warm), (4, 0, 0));
    assert_eq!(warm_digest, cold_digest);

    // Touching a file without changing it is not a change.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(120);
    std::fs::File::options()
        .write(true)
        .open(ctx.path().join("a.txt"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &[]).0),
        (4, 0, 0)
    );

    // A LABEL is config only: no step runs again.
    let relabelled = Context::new(
        &DOCKERFILE
            .replace("{BASE}", &base)
            .replace("version=1", "version=2"),
        &[("a.txt", "a\n"), ("b.txt", "b\n")],
    );
    assert_eq!(
        summary(&build(&relabelled, state.path(), out.path(), &[]).0),
        (4, 0, 0)
    );

    // Changing b.txt re-runs its COPY and what follows, nothing before;
    // the layers under them were unpacked by the first build and are
    // stacked again, not unpacked again.
    std::fs::write(ctx.path().join("b.txt"), "changed\n").unwrap();
    let (changed, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&changed), (2, 2, 0));
    let rootfs = umoci_unpack(out.path(), "latest", &out.path().join("u1"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("derived")).unwrap(),
        "plain changed\n"
    );

    // A build arg misses from its first use on.
    let (flavoured, _) = build(
        &ctx,
        state.path(),
        out.path(),
        &["--build-arg", "FLAVOUR=spicy"],
    );
    assert_eq!(summary(&flavoured), (3, 1, 0));
    let rootfs = umoci_unpack(out.path(), "latest", &out.path().join("u2"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("derived")).unwrap(),
        "spicy changed\n"
    );

    // --cache=false runs everything.
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &["--cache=false"]).0),
        (0, 4, 0)
    );
}

#[test]
fn entries_expire_after_the_ttl() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let ctx = context(&base, "b\n");
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &[]).0),
        (0, 4, 1)
    );
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &["--cache-ttl", "1h"]).0),
        (4, 0, 0)
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &["--cache-ttl=1s"]).0),
        (0, 4, 0)
    );
}

#[test]
fn concurrent_builds_share_one_cache_dir() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let state = tempfile::tempdir().unwrap();
    let contexts: Vec<Context> = (0..4)
        .map(|i| context(&base, &format!("content {i}\n")))
        .collect();
    let outs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    for round in 0..2 {
        std::thread::scope(|s| {
            for (i, (ctx, out)) in contexts.iter().zip(&outs).enumerate() {
                let state = state.path();
                s.spawn(move || {
                    let (output, _) = build(ctx, state, out.path(), &[]);
                    let (hits, runs, _) = summary(&output);
                    // The shared first RUN may be cached by whichever build wrote first.
                    assert_eq!(hits + runs, 4, "build {i}: {}", stderr(&output));
                    if round == 1 {
                        assert_eq!(
                            (hits, runs),
                            (4, 0),
                            "build {i} round 2: {}",
                            stderr(&output)
                        );
                    }
                    let rootfs =
                        umoci_unpack(out.path(), "latest", &out.path().join(format!("u{round}")));
                    assert_eq!(
                        std::fs::read_to_string(rootfs.join("b.txt")).unwrap(),
                        format!("content {i}\n")
                    );
                    assert_eq!(
                        std::fs::read_to_string(rootfs.join("derived")).unwrap(),
                        format!("plain content {i}\n")
                    );
                });
            }
        });
    }
}

fn kiln_cache(state: &Path, args: &[&str]) -> Output {
    std::process::Command::new(KILN)
        .arg("cache")
        .arg("--cache-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

/// A build SIGKILLed at any point leaves a cache the next build uses
/// without error, and `kiln cache verify` finds it clean.
#[test]
fn builds_killed_at_any_point_leave_a_usable_cache() {
    let dockerfile = format!(
        "FROM oci-layout://{}:latest
RUN mkdir /many && cd /many && for i in $(seq 1 1500); do echo $i > f$i; done
COPY big.bin /big.bin
RUN sleep 0.3 && echo done > /done
",
        busybox_layout().display()
    );
    // Incompressible enough that writing the layer takes a moment.
    let big: String = (0..400_000u32)
        .map(|i| format!("{:x}", i.wrapping_mul(2_654_435_761)))
        .collect();
    let ctx = Context::new(&dockerfile, &[("big.bin", &big)]);
    let state = tempfile::tempdir().unwrap();
    for delay_ms in [30, 120, 250, 450, 700, 1000] {
        let mut child = kiln_build_cmd(&ctx, state.path(), &["--no-push"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Each kill leaves a different partial state; the next build copes.
        let out = tempfile::tempdir().unwrap();
        let (rebuilt, _) = build(&ctx, state.path(), out.path(), &[]);
        assert!(
            rebuilt.status.success(),
            "after a kill at {delay_ms} ms:\n{}",
            stderr(&rebuilt)
        );
    }
    let verify = kiln_cache(state.path(), &["verify"]);
    assert!(
        verify.status.success(),
        "{}{}",
        stderr(&verify),
        String::from_utf8_lossy(&verify.stdout)
    );
    // The dead builds' work dirs are collected; the next build is all hits.
    let gc = kiln_cache(state.path(), &["gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    let leftovers = std::fs::read_dir(state.path().join("builds"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "abandoned build dirs remain");
    let out = tempfile::tempdir().unwrap();
    let (warm, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&warm), (3, 0, 0));
}

/// `kiln cache`: stats and ls show the entries, verify removes a corrupt
/// blob (and its entry, so the step runs again), gc and prune empty it.
#[test]
fn cache_subcommands_inspect_repair_and_empty_the_cache() {
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nRUN echo one > /one\nRUN echo two > /two\n",
            busybox_layout().display()
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (cold, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&cold), (0, 2, 1));

    let stats = kiln_cache(state.path(), &["stats"]);
    let said = String::from_utf8_lossy(&stats.stdout);
    assert!(said.contains("entries: 2"), "{said}");
    assert!(
        said.contains("unpacked layers: ") && !said.contains("unpacked layers: 0"),
        "{said}"
    );
    let ls = String::from_utf8_lossy(&kiln_cache(state.path(), &["ls"]).stdout).into_owned();
    assert_eq!(ls.lines().count(), 2, "{ls}");
    let layer = ls
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .nth(1)
                .filter(|d| d.starts_with("sha256:"))
        })
        .unwrap()
        .to_string();

    // Corrupt one cached layer: verify finds and removes it, exit 1.
    let blob = state
        .path()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    std::fs::write(&blob, b"bit rot").unwrap();
    let verify = kiln_cache(state.path(), &["verify"]);
    assert!(!verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains("1 corrupt removed"));
    assert!(kiln_cache(state.path(), &["verify"]).status.success());
    let (rebuilt, _) = build(&ctx, state.path(), out.path(), &[]);
    let (hits, misses, _) = summary(&rebuilt);
    assert_eq!(hits + misses, 2);
    assert!(misses >= 1, "the step whose layer was corrupt ran again");

    // A cached layer of the wrong size is never served: the step runs again.
    let ls = String::from_utf8_lossy(&kiln_cache(state.path(), &["ls"]).stdout).into_owned();
    for digest in ls.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        let blob = state
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(&blob, b"truncated").unwrap();
    }
    let (rebuilt, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&rebuilt), (0, 2, 0));
    assert!(kiln_cache(state.path(), &["verify"]).status.success());

    // gc keeps what is fresh; prune empties everything.
    let gc = kiln_cache(
        state.path(),
        &["gc", "--older-than", "7d", "--max-size", "10GiB"],
    );
    assert!(String::from_utf8_lossy(&gc.stdout).contains("removed 0 entries"));
    let unpacked = || {
        std::fs::read_dir(state.path().join("unpacked"))
            .unwrap()
            .count()
    };
    assert!(
        unpacked() > 0,
        "the overlay snapshotter keeps unpacked layers"
    );
    // A tiny --max-size takes the unpacked layers, not the entries' blobs.
    let gc = kiln_cache(state.path(), &["gc", "--max-size", "1"]);
    let said = String::from_utf8_lossy(&gc.stdout);
    assert!(said.contains("removed 0 entries, 0 blobs"), "{said}");
    assert_eq!(unpacked(), 0, "{said}");
    let (rebuilt, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(
        summary(&rebuilt),
        (2, 0, 0),
        "a full hit needs no unpacked layer"
    );
    let prune = kiln_cache(state.path(), &["prune"]);
    assert!(prune.status.success(), "{}", stderr(&prune));
    assert_eq!(unpacked(), 0, "{}", String::from_utf8_lossy(&prune.stdout));
    let stats = String::from_utf8_lossy(&kiln_cache(state.path(), &["stats"]).stdout).into_owned();
    assert!(
        stats.contains("entries: 0")
            && stats.contains("blobs:   0")
            && stats.contains("unpacked layers: 0"),
        "{stats}"
    );

    let bad = kiln_cache(state.path(), &["gc", "--max-size", "lots"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--max-size"));
}

fn remote_hits(out: &Output) -> usize {
    let err = stderr(out);
    let line = err
        .lines()
        .find(|l| l.contains("hits from --cache-repo"))
        .unwrap();
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .nth(3)
        .unwrap()
}

/// The remote tier alone: a second "machine" (a fresh --cache-dir) with
/// the same --cache-repo gets every step from it, unpacks nothing and
/// pushes the same image.
#[test]
fn a_new_machine_starts_warm_from_the_cache_repo() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let repo = registry.reference("kiln/cache");
    let ctx = context(&base, "b\n");
    let machine = |dest: &str, extra: &[&str]| {
        let state = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let destination = registry.reference(dest);
        let mut args = vec!["--cache-repo", &repo, "--destination", &destination];
        args.extend_from_slice(extra);
        let digest_file = out.path().join("digest");
        args.extend([
            "--digest-file",
            digest_file.to_str().unwrap(),
            "--reproducible",
        ]);
        let output = kiln_build(&ctx, state.path(), &args);
        let digest = std::fs::read_to_string(&digest_file).unwrap_or_default();
        (output, digest)
    };

    let (first, first_digest) = machine("app:first", &[]);
    assert_eq!(summary(&first), (0, 4, 1));
    assert_eq!(remote_hits(&first), 0);

    let (second, second_digest) = machine("app:second", &[]);
    assert_eq!(summary(&second), (4, 0, 0), "{}", stderr(&second));
    assert_eq!(remote_hits(&second), 4);
    // The summary gives time per phase and the bytes moved: the second
    // machine pulled its layers from the cache repo.
    let err = stderr(&second);
    assert!(
        err.contains("time: resolve") && err.contains("lookup"),
        "{err}"
    );
    let pulled: u64 = err
        .lines()
        .find_map(|l| {
            l.split(" bytes pulled")
                .next()
                .filter(|_| l.contains(" bytes pulled"))
        })
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes-pulled figure in:\n{err}"));
    assert!(pulled > 0, "{err}");
    assert_eq!(second_digest, first_digest);
    // The image pushed from remote hits alone is complete and readable.
    let config = skopeo_config(&registry.reference("app:second"));
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 5);
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&registry.reference("app:second"), unpacked.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("derived")).unwrap(),
        "plain b\n"
    );

    // A change misses from the step that reads it; the rest still hits remotely.
    std::fs::write(ctx.path().join("b.txt"), "changed\n").unwrap();
    let (changed, _) = machine("app:changed", &[]);
    assert_eq!(summary(&changed), (2, 2, 3));
    assert_eq!(remote_hits(&changed), 2);

    // Remote entries expire with --cache-ttl too.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (expired, _) = machine("app:expired", &["--cache-ttl=1s"]);
    assert_eq!(summary(&expired), (0, 4, 1));
}

/// `kiln warm` fills the store with a Dockerfile's base images; warming
/// again fetches nothing; `--force` replaces a corrupt blob; a build then
/// uses what is stored.
#[test]
fn warm_pulls_base_images_ahead_of_builds() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let state = tempfile::tempdir().unwrap();
    let ctx = context(&base, "b\n");
    let warm = |extra: &[&str]| {
        let out = std::process::Command::new(KILN)
            .arg("warm")
            .arg("--cache-dir")
            .arg(state.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dockerfile = ctx.path().join("Dockerfile");
    let first = warm(&["--dockerfile", dockerfile.to_str().unwrap()]);
    assert!(
        first.contains(&base) && first.contains("1 layers fetched"),
        "{first}"
    );
    let again = warm(&["--image", &base]);
    assert!(again.contains("0 layers fetched"), "{again}");

    // Corrupt the layer: --force notices and fetches it again.
    let blobs = state.path().join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    std::fs::write(&biggest, b"corrupt").unwrap();
    let forced = warm(&["--image", &base, "--force"]);
    assert!(forced.contains("1 layers fetched"), "{forced}");

    let out = tempfile::tempdir().unwrap();
    let (built, _) = build(&ctx, state.path(), out.path(), &[]);
    // Warm unpacked the base too (issue 19): the build unpacks nothing.
    assert_eq!(summary(&built), (0, 4, 0));

    // With the registry gone, a base checked within --cache-ttl still
    // resolves from the base-image cache, and the build is all hits.
    drop(registry);
    let (offline, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&offline), (4, 0, 0));
    assert!(stderr(&offline).contains("using the base image checked before"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (expired, _) = build(&ctx, state.path(), out.path(), &["--cache-ttl=1ms"]);
    assert!(
        !expired.status.success(),
        "an expired base needs the registry"
    );

    let missing = std::process::Command::new(KILN)
        .args(["warm", "--cache-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

/// A rebuild that only hits gives the image it gave before, even without
/// `--reproducible`: the history keeps when each step was first built.
#[test]
fn a_fully_cached_rebuild_gives_the_same_image() {
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nLABEL a=b\nRUN echo one > /one\nENV X=1\nCOPY a.txt /\nCMD [\"sh\"]\n",
            busybox_layout().display()
        ),
        &[("a.txt", "a\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let digest = |n: u32| {
        let file = out.path().join(format!("digest-{n}"));
        let output = kiln_build(
            &ctx,
            state.path(),
            &["--no-push", "--digest-file", file.to_str().unwrap()],
        );
        assert!(output.status.success(), "{}", stderr(&output));
        (std::fs::read_to_string(file).unwrap(), output)
    };
    let (first, _) = digest(1);
    // Past the second the first build ran in, so "now" would differ.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (second, output) = digest(2);
    assert_eq!(summary(&output), (2, 0, 0));
    assert_eq!(second, first);
    // A miss is a new image, with the time it was built.
    std::fs::write(ctx.path().join("a.txt"), "b\n").unwrap();
    let (third, _) = digest(3);
    assert_ne!(third, first);
}

/// A file a COPY's glob matches, renamed, is a miss: the copy writes it
/// under its new name. The names a glob matched are in the key, where the
/// content alone left a hit that still held the old name.
#[test]
fn a_renamed_file_a_glob_matches_is_copied_again() {
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nCOPY *.txt /d/\nRUN ls /d > /listing\n",
            busybox_layout().display()
        ),
        &[("a.txt", "same\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (first, before) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&first).0, 0);
    std::fs::rename(ctx.path().join("a.txt"), ctx.path().join("b.txt")).unwrap();
    let (renamed, after) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&renamed).0, 0, "{}", stderr(&renamed));
    assert_ne!(after, before);
    let (again, same) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&again).1, 0, "{}", stderr(&again));
    assert_eq!(same, after);
}

/// A build stage that makes `/out/app` from the context's `src.txt` (its
/// first four bytes, so another `src.txt` can make the same file), then
/// `rest`: the stages that copy it.
fn copy_from_build(base: &str, rest: &str) -> Context {
    Context::new(
        &format!(
            "FROM {base} AS build\nCOPY src.txt /src.txt\n\
             RUN mkdir /out && cut -c1-4 /src.txt > /out/app\n{rest}"
        ),
        &[("src.txt", "abcd 1\n")],
    )
}

/// A stage built again that made the same file gives a `COPY --from` of
/// it the layer it gave before: the copy is found by its content, and the
/// image is the one the first build made. A file made anew is copied anew.
#[test]
fn a_copy_from_a_stage_that_made_the_same_files_is_a_hit() {
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = copy_from_build(
        &base,
        &format!("FROM {base}\nCOPY --from=build /out/app /app\n"),
    );
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let build = |n: u32, src: &str| {
        std::fs::write(ctx.path().join("src.txt"), src).unwrap();
        let file = out.path().join(format!("digest-{n}"));
        let args = ["--no-push", "--digest-file", file.to_str().unwrap()];
        let output = kiln_build(&ctx, state.path(), &args);
        let (hits, runs, _) = summary(&output);
        (std::fs::read_to_string(file).unwrap(), hits, runs)
    };
    let (first, ..) = build(1, "abcd 1\n");
    // Past the second the first build ran in, so "now" would differ.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(build(2, "abcd 2\n"), (first.clone(), 1, 2));
    // Both keys are recorded: the stage as it is now hits whole.
    assert_eq!(build(3, "abcd 2\n"), (first.clone(), 3, 0));
    let (other, hits, runs) = build(4, "wxyz\n");
    assert_ne!(other, first);
    assert_eq!((hits, runs), (0, 3));
}

/// The lookup by content reaches `--cache-repo` too: a new machine whose
/// build stage runs again, and makes the same files, finds the copy of them
/// that another machine published, and publishes the copy under its own
/// key, so the next machine hits every step.
#[test]
fn a_new_machine_finds_a_copy_by_its_content_in_the_cache_repo() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let repo = registry.reference("kiln/cache");
    let ctx = copy_from_build(
        &base,
        &format!("FROM {base}\nCOPY --from=build /out/app /app\n"),
    );
    let out = tempfile::tempdir().unwrap();
    let machine = |n: u32, src: &str| {
        std::fs::write(ctx.path().join("src.txt"), src).unwrap();
        let state = tempfile::tempdir().unwrap();
        let file = out.path().join(format!("digest-{n}"));
        let args = [
            "--no-push",
            "--cache-repo",
            &repo,
            "--digest-file",
            file.to_str().unwrap(),
        ];
        let output = kiln_build(&ctx, state.path(), &args);
        let (hits, runs, _) = summary(&output);
        let digest = std::fs::read_to_string(file).unwrap();
        (digest, hits, runs, remote_hits(&output))
    };
    let (first, ..) = machine(1, "abcd 1\n");
    // Past the second the first build ran in, so "now" would differ.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(machine(2, "abcd 2\n"), (first.clone(), 1, 2, 1));
    assert_eq!(machine(3, "abcd 2\n"), (first, 3, 0, 3));
}

/// A copy found by its content in the local tier, whose entry was made
/// lazily (no blob: its stage, unpacked for a RUN, was in no output), is
/// not published to `--cache-repo`, which takes only entries with their
/// blobs; the build that finds it succeeds.
#[test]
fn a_lazy_copy_found_by_content_stays_local() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let repo = registry.reference("kiln/cache");
    let ctx = copy_from_build(
        &base,
        &format!(
            "FROM {base} AS mid\nCOPY --from=build /out/app /app\nRUN cp /app /app2\n\
             FROM {base}\nCOPY --from=mid /app2 /app2\n"
        ),
    );
    let state = tempfile::tempdir().unwrap();
    let build = |src: &str, extra: &[&str]| {
        std::fs::write(ctx.path().join("src.txt"), src).unwrap();
        let mut args = vec!["--no-push"];
        args.extend_from_slice(extra);
        let output = kiln_build(&ctx, state.path(), &args);
        summary(&output);
        output
    };
    build("abcd 1\n", &[]);
    let out = build("abcd 2\n", &["--cache-repo", &repo]);
    // The build stage and mid's RUN ran again; both copies hit.
    let (hits, runs, _) = summary(&out);
    assert_eq!((hits, runs), (2, 3), "{}", stderr(&out));
}

/// The cache dir holds base images' files and cache mounts: a new one is
/// made 0700 (its sub-dirs too), and an old 0755 one is tightened with a
/// warning.
#[test]
fn the_state_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = context(&base, "b\n");
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    let (out, _) = build(&ctx, &state, &tmp.path().join("out1"), &[]);
    summary(&out);
    assert_eq!(mode(&state), 0o700);
    for sub in ["blobs", "unpacked", "mounts", "builds"] {
        assert_eq!(mode(&state.join(sub)), 0o700, "{sub}");
    }
    assert!(!stderr(&out).contains("readable by other users"));

    // A state dir an older Kiln made 0755.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (out, _) = build(&ctx, &state, &tmp.path().join("out2"), &[]);
    summary(&out);
    assert_eq!(mode(&state), 0o700);
    let err = stderr(&out);
    assert!(
        err.contains("was mode 0755, readable by other users; made it 0700"),
        "{err}"
    );
}
