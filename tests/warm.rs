//! `kiln warm` end to end, with the real registry and binary: a warmed
//! node's first build pulls and unpacks nothing, every `FROM` (those a
//! `--build-arg` selects too) is warmed for every `--platform`, warming
//! again follows a tag that moved, and `kiln cache gc` keeps what a warm
//! entry names.
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::*;

/// `kiln warm` on `state`; its stdout, after checking it succeeded.
fn warm(state: &Path, args: &[&str]) -> String {
    let out = Command::new(KILN)
        .arg("warm")
        .arg("--cache-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number before `what` on the warm line of `image` (`layers
/// fetched`, `layers unpacked`).
fn count(stdout: &str, image: &str, what: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{image} @ ")))
        .unwrap_or_else(|| panic!("no line for {image} in:\n{stdout}"));
    let (_, parts) = line.split_once(": ").unwrap();
    let part = parts
        .split(", ")
        .find(|p| p.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} in {line}"));
    part.split(' ').next().unwrap().parse().unwrap()
}

/// Builds `ctx` on `state` with JSON logs and `args`; the summary record.
fn build_summary_with(ctx: &Context, state: &Path, args: &[&str]) -> Value {
    let out = kiln_build(ctx, state, &[&["--log-format", "json"], args].concat());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let last = err.lines().last().expect("a summary");
    let summary: Value = serde_json::from_str(last).unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    summary
}

/// Builds `ctx` on `state` and pushes it to `destination`; the summary.
fn build_summary(ctx: &Context, state: &Path, destination: &str) -> Value {
    build_summary_with(ctx, state, &["--destination", destination])
}

fn unpacked_dirs(state: &Path) -> usize {
    std::fs::read_dir(state.join("unpacked")).unwrap().count()
}

/// The first build after `kiln warm` pulls 0 bytes and unpacks no layer;
/// with `--unpack=false` it has to unpack the base itself.
#[test]
fn a_warmed_node_builds_without_pulling_or_unpacking() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nCOPY f /f\n"), &[("f", "one\n")]);
    let dockerfile = ctx.path().join("Dockerfile");
    let dockerfile = dockerfile.to_str().unwrap();

    let state = tempfile::tempdir().unwrap();
    let first = warm(state.path(), &["--dockerfile", dockerfile]);
    assert_eq!(count(&first, &base, "layers fetched"), 1, "{first}");
    assert_eq!(count(&first, &base, "layers unpacked"), 1, "{first}");
    assert_eq!(count(&first, &base, "layer tables made"), 1, "{first}");
    assert_eq!(unpacked_dirs(state.path()), 1);
    // Once: warming again neither fetches nor unpacks.
    let again = warm(state.path(), &["--dockerfile", dockerfile]);
    assert_eq!(count(&again, &base, "layers fetched"), 0, "{again}");
    assert_eq!(count(&again, &base, "layers unpacked"), 0, "{again}");
    assert_eq!(count(&again, &base, "layer tables made"), 0, "{again}");

    let summary = build_summary(&ctx, state.path(), &registry.reference("app/warm:1"));
    assert_eq!(summary["layers_unpacked"], 0, "{summary}");
    assert_eq!(summary["bytes_pulled"], 0, "{summary}");
    assert_eq!(summary["cache_misses"], 1, "{summary}");
    assert!(summary["phases_ms"].get("unpack").is_none(), "{summary}");
    // Warm stored the base's metadata table: the build read no blob for it.
    assert_eq!(summary["view_tables_read"], 0, "{summary}");

    // Fetched only: the COPY is built on the metadata view of the base,
    // whose table warm stored too, so nothing is unpacked or read either.
    let cold = tempfile::tempdir().unwrap();
    let fetched = warm(cold.path(), &["--dockerfile", dockerfile, "--unpack=false"]);
    assert_eq!(count(&fetched, &base, "layers fetched"), 1, "{fetched}");
    assert_eq!(count(&fetched, &base, "layer tables made"), 1, "{fetched}");
    assert!(!fetched.contains("unpacked"), "{fetched}");
    assert_eq!(unpacked_dirs(cold.path()), 0);
    let summary = build_summary(&ctx, cold.path(), &registry.reference("app/warm:2"));
    assert_eq!(summary["layers_unpacked"], 0, "{summary}");
    assert_eq!(summary["bytes_pulled"], 0, "{summary}");
    assert_eq!(summary["cache_misses"], 1, "{summary}");
    assert!(summary["phases_ms"].get("unpack").is_none(), "{summary}");
    assert!(summary["phases_ms"]["view"].is_f64(), "{summary}");
    assert_eq!(summary["view_tables_read"], 0, "{summary}");
    assert_eq!(unpacked_dirs(cold.path()), 0);

    // A stage with a RUN to run needs its root: the build unpacks the base.
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY g /g\nRUN cat /g\n"),
        &[("g", "two\n")],
    );
    let summary = build_summary(&ctx, cold.path(), &registry.reference("app/warm:3"));
    assert_eq!(summary["bytes_pulled"], 0, "{summary}");
    assert!(
        summary["layers_unpacked"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert!(summary["phases_ms"]["unpack"].is_f64(), "{summary}");
}

/// Unpacking a base for a RUN leaves its metadata table too (made from
/// the tar as it is extracted): a later COPY-only stage on that base reads
/// no blob for it, where a node that never unpacked it reads one.
#[test]
fn a_base_unpacked_by_a_build_leaves_its_table_for_the_view() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let run = Context::new(&format!("FROM {base}\nRUN echo hi >/hi\n"), &[]);
    let copy = Context::new(&format!("FROM {base}\nCOPY f /f\n"), &[("f", "one\n")]);

    let state = tempfile::tempdir().unwrap();
    let summary = build_summary(&run, state.path(), &registry.reference("app/run:1"));
    assert_eq!(summary["layers_unpacked"], 1, "{summary}");
    let summary = build_summary(&copy, state.path(), &registry.reference("app/copy:1"));
    assert!(summary["phases_ms"]["view"].is_f64(), "{summary}");
    assert_eq!(summary["view_tables_read"], 0, "{summary}");

    let fresh = tempfile::tempdir().unwrap();
    let summary = build_summary(&copy, fresh.path(), &registry.reference("app/copy:2"));
    assert_eq!(summary["view_tables_read"], 1, "{summary}");
}

/// A RUN's layer under a later COPY gets its metadata table as it is
/// written: a rebuild that changes only what the COPY reads builds it on
/// the view and reads no layer blob back (reading its three RUN layers
/// back gave anchor6's first one-file rebuild 23 ms of view, not 5).
#[test]
fn a_layer_under_a_later_copy_leaves_its_table_for_the_view() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let dockerfile = format!("FROM {base}\nRUN mkdir /d && echo hi >/d/hi\nCOPY f /d/f\n");
    let ctx = Context::new(&dockerfile, &[("f", "one\n")]);
    let state = tempfile::tempdir().unwrap();
    let summary = build_summary(&ctx, state.path(), &registry.reference("app/run-copy:1"));
    assert_eq!(summary["cache_misses"], 2, "{summary}");

    std::fs::write(ctx.path().join("f"), "two\n").unwrap();
    let summary = build_summary(&ctx, state.path(), &registry.reference("app/run-copy:2"));
    assert_eq!(
        (&summary["cache_hits"], &summary["cache_misses"]),
        (&Value::from(1), &Value::from(1)),
        "{summary}"
    );
    assert!(summary["phases_ms"]["view"].is_f64(), "{summary}");
    assert_eq!(summary["view_tables_read"], 0, "{summary}");
}

/// Every stage's `FROM` is warmed, as the `--build-arg`s given select it.
#[test]
fn warm_follows_build_args_to_every_stage() {
    let registry = Registry::start();
    let tools = registry.push_busybox_as("base/tools-special:1");
    let runtime = registry.push_busybox_as("base/runtime:1");
    let dockerfile = format!(
        "ARG FLAVOUR=plain\nFROM {}/base/tools-${{FLAVOUR}}:1 AS tools\nFROM {runtime}\nCOPY --from=tools /bin/busybox /bb\n",
        registry.addr
    );
    let ctx = Context::new(&dockerfile, &[]);
    let dockerfile = ctx.path().join("Dockerfile");
    let dockerfile = dockerfile.to_str().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = warm(
        state.path(),
        &["--dockerfile", dockerfile, "--build-arg", "FLAVOUR=special"],
    );
    for image in [&tools, &runtime] {
        assert!(out.contains(&format!("{image} @ sha256:")), "{out}");
    }
    // Without the argument, the default names an image that is not there.
    let failed = Command::new(KILN)
        .arg("warm")
        .arg("--cache-dir")
        .arg(state.path())
        .args(["--dockerfile", dockerfile])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("base/tools-plain:1"),
        "{}",
        stderr(&failed)
    );
}

/// `kiln warm --platform` warms what a build for those platforms pulls:
/// each image for each platform, and a `FROM --platform=$BUILDPLATFORM`
/// stage's for the host's whatever the target. The first build of each
/// pulls and unpacks no base, and a two-platform build's JSON summary
/// counts both platforms.
#[test]
fn warm_fetches_each_platform_as_the_build_pulls_it() {
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:1");
    let ctx = Context::new(
        &format!(
            "FROM --platform=$BUILDPLATFORM {base} AS build\nCOPY f /f\nFROM {base}\nCOPY --from=build /f /g\n"
        ),
        &[("f", "one\n")],
    );
    let dockerfile = ctx.path().join("Dockerfile");
    let dockerfile = dockerfile.to_str().unwrap();
    let warmed_for = |out: &str| -> Vec<String> {
        let mut platforms: Vec<String> = out
            .lines()
            .filter(|l| l.starts_with(&format!("{base} @ sha256:")))
            .map(|l| {
                l.split(" for ")
                    .nth(1)
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        platforms.sort();
        platforms
    };
    // No base is pulled or unpacked: the one layer unpacked is the build
    // stage's own, which the final stage's COPY --from reads on disk.
    let no_base_fetched = |summary: &Value| {
        assert_eq!(summary["bytes_pulled"], 0, "{summary}");
        assert_eq!(summary["layers_unpacked"], 1, "{summary}");
    };

    // Both platforms of a two-platform build.
    let both = tempfile::tempdir().unwrap();
    let out = warm(
        both.path(),
        &[
            "--dockerfile",
            dockerfile,
            "--platform",
            "linux/amd64,linux/arm64",
        ],
    );
    assert_eq!(warmed_for(&out), ["linux/amd64", "linux/arm64"], "{out}");
    assert_eq!(unpacked_dirs(both.path()), 2, "{out}");
    let summary = build_summary_with(
        &ctx,
        both.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--destination",
            &registry.reference("app/multi:1"),
        ],
    );
    no_base_fetched(&summary);
    // One summary for the build, both platforms' steps in it: the build
    // stage runs once, for the host, and the final stage once each.
    assert_eq!(
        (&summary["cache_hits"], &summary["cache_misses"]),
        (&Value::from(1), &Value::from(3)),
        "{summary}"
    );

    // For arm64 alone, the build stage is still the host's.
    let arm = tempfile::tempdir().unwrap();
    let out = warm(
        arm.path(),
        &["--dockerfile", dockerfile, "--platform", "linux/arm64"],
    );
    assert_eq!(warmed_for(&out), ["linux/amd64", "linux/arm64"], "{out}");
    let summary = build_summary_with(
        &ctx,
        arm.path(),
        &[
            "--platform",
            "linux/arm64",
            "--destination",
            &registry.reference("app/multi:2"),
        ],
    );
    no_base_fetched(&summary);
}

/// `kiln warm` is safe beside builds on the same state dir: warms and
/// builds (whose RUN unpacks the base that warm unpacks too) all succeed
/// at once, and after them every blob verifies, warming again does
/// nothing and each rebuild is all hits with nothing pulled or unpacked.
#[test]
fn warm_runs_beside_builds_on_one_state_dir() {
    let registry = Registry::start();
    let base = registry.push_busybox_as("base/shared:1");
    // A second image keeps each warm going while the builds run.
    let other = registry.push_busybox_index_as("base/other:1");
    let contexts: Vec<Context> = (0..2)
        .map(|i| {
            Context::new(
                &format!("FROM {base}\nCOPY f /f\nRUN cat /f > /g\n"),
                &[("f", &format!("build {i}\n"))],
            )
        })
        .collect();
    let state = tempfile::tempdir().unwrap();
    let state = state.path();
    let tags: Vec<String> = (0..2)
        .map(|i| registry.reference(&format!("app/beside:{i}")))
        .collect();
    std::thread::scope(|s| {
        for (ctx, tag) in contexts.iter().zip(&tags) {
            s.spawn(move || build_summary(ctx, state, tag));
        }
        for _ in 0..2 {
            s.spawn(|| warm(state, &["--image", &base, "--image", &other]));
        }
    });
    // Exits non-zero on a blob that does not verify.
    run_ok(
        Command::new(KILN)
            .args(["cache", "verify", "--cache-dir"])
            .arg(state),
    );
    let again = warm(state, &["--image", &base, "--image", &other]);
    for image in [&base, &other] {
        assert_eq!(count(&again, image, "layers fetched"), 0, "{again}");
        assert_eq!(count(&again, image, "layers unpacked"), 0, "{again}");
    }
    for (ctx, tag) in contexts.iter().zip(&tags) {
        let summary = build_summary(ctx, state, tag);
        assert_eq!(
            (&summary["cache_hits"], &summary["cache_misses"]),
            (&Value::from(2), &Value::from(0)),
            "{summary}"
        );
        assert_eq!(summary["bytes_pulled"], 0, "{summary}");
        assert_eq!(summary["layers_unpacked"], 0, "{summary}");
    }
}

/// Sets the mtime of everything directly in `dir` to `ago` in the past.
fn age_entries(dir: &Path, ago: Duration) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::File::open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - ago)
            .unwrap();
    }
}

fn gc(state: &Path, older_than: &str) -> String {
    let out = run_ok(
        Command::new(KILN)
            .args(["cache", "gc", "--older-than", older_than, "--cache-dir"])
            .arg(state),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Warming again after the tag moved fetches and unpacks the new layers,
/// and the next build pulls and unpacks nothing. GC keeps the blobs and
/// unpacked layers the warm entry names, however old, and lets go of
/// what the tag no longer names, and of all of it once the entry was not
/// warmed within `--older-than`.
#[test]
fn warming_follows_a_moved_tag_and_gc_keeps_what_is_warm() {
    let registry = Registry::start();
    let base = registry.push_busybox_as("base/moving:1");
    let state = tempfile::tempdir().unwrap();
    let first = warm(state.path(), &["--image", &base]);
    assert_eq!(count(&first, &base, "layers unpacked"), 1, "{first}");

    // Elsewhere, an image built on the base is pushed as the base's tag.
    let elsewhere = tempfile::tempdir().unwrap();
    let moved = Context::new(&format!("FROM {base}\nCOPY g /g\n"), &[("g", "moved\n")]);
    build_summary(&moved, elsewhere.path(), &base);

    let again = warm(state.path(), &["--image", &base]);
    assert_eq!(count(&again, &base, "layers fetched"), 1, "{again}");
    assert_eq!(count(&again, &base, "layers unpacked"), 1, "{again}");
    assert!(again.contains("(of 2 layers)"), "{again}");
    assert_eq!(unpacked_dirs(state.path()), 2);
    let ctx = Context::new(&format!("FROM {base}\nCOPY f /f\n"), &[("f", "app\n")]);
    let summary = build_summary(&ctx, state.path(), &registry.reference("app/moved:1"));
    assert_eq!(summary["layers_unpacked"], 0, "{summary}");
    assert_eq!(summary["bytes_pulled"], 0, "{summary}");

    // Everything old, but the build's entries (younger than --older-than):
    // the base's blobs and unpacked layers are kept, as the warm entry
    // names them; the old base's config, which nothing names, goes.
    let named = |reference: &str| -> Vec<String> {
        let out = run_ok(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]));
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        let layers = m["layers"].as_array().unwrap().iter();
        std::iter::once(&m["config"])
            .chain(layers)
            .map(|d| d["digest"].as_str().unwrap()["sha256:".len()..].to_string())
            .collect()
    };
    let warm_blobs = named(&base);
    let old_config = layout_manifest(busybox_layout())["config"]["digest"]
        .as_str()
        .unwrap()["sha256:".len()..]
        .to_string();
    let blobs = state.path().join("blobs/sha256");
    assert!(blobs.join(&old_config).exists());
    let unpacked_before = unpacked_dirs(state.path());
    let long_ago = Duration::from_secs(3 * 3600);
    age_entries(&blobs, long_ago);
    age_entries(&state.path().join("unpacked"), long_ago);
    let collected = gc(state.path(), "1h");
    assert!(!blobs.join(&old_config).exists(), "{collected}");
    for blob in &warm_blobs {
        assert!(blobs.join(blob).exists(), "{blob}: {collected}");
    }
    // The two base layers' (the build's own COPY layer, if the overlay
    // snapshotter kept it unpacked, is not warm).
    assert_eq!(unpacked_dirs(state.path()), 2, "{collected}");
    let removed = format!(", {} unpacked layers", unpacked_before - 2);
    assert!(collected.contains(&removed), "{collected}");

    // Not warmed within --older-than: the base's blobs and layers go too.
    std::thread::sleep(Duration::from_millis(2100));
    let expired = gc(state.path(), "1s");
    assert_eq!(unpacked_dirs(state.path()), 0, "{expired}");
    for blob in &warm_blobs {
        assert!(!blobs.join(blob).exists(), "{blob}: {expired}");
    }
}
