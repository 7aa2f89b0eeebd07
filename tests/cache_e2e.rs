//! The local cache tier end to end: full hits without unpacking, exact
//! misses after a context or build-arg change, TTL expiry, `--cache=false`,
//! and builds sharing one cache dir at once.
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

    // Changing b.txt re-runs its COPY and what follows, nothing before.
    std::fs::write(ctx.path().join("b.txt"), "changed\n").unwrap();
    let (changed, _) = build(&ctx, state.path(), out.path(), &[]);
    assert_eq!(summary(&changed), (2, 2, 3));
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
    assert_eq!(summary(&flavoured), (3, 1, 4));
    let rootfs = umoci_unpack(out.path(), "latest", &out.path().join("u2"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("derived")).unwrap(),
        "spicy changed\n"
    );

    // --cache=false runs everything.
    assert_eq!(
        summary(&build(&ctx, state.path(), out.path(), &["--cache=false"]).0),
        (0, 4, 1)
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
        (0, 4, 1)
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
