//! Blobs only when something needs them: a stage outside the pushed image
//! writes no compressed blob (its layer is kept unpacked, identified by its
//! diff_id), a later build that pushes it makes the blob, the same one a
//! build that pushed it first makes; and a remote-cache hit pulls only the
//! layers of the image it pushes.
mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

/// A build stage with a deterministic multi-MB layer (over a layer it
/// deletes from: whiteouts, and a directory replaced whole), and a slim
/// final stage that copies one small file out of it.
const TWO_STAGES: &str = "FROM {BASE} AS build
RUN mkdir -p /d/e && echo x > /d/f && echo z > /d/e/z
RUN rm /d/f && rm -rf /d/e && mkdir /d/e && echo y > /d/e/g && seq 1 400000 > /big && echo small > /small
FROM {BASE}
COPY --from=build /small /small
";

fn build(ctx: &Context, state: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--reproducible",
        "--snapshotter",
        "overlay",
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = kiln_build(ctx, state, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

/// The build's `summary` record.
fn summary(out: &Output) -> serde_json::Value {
    stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary in:\n{}", stderr(out)))
}

fn kiln_cache(state: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new(KILN)
            .args(["cache", "--cache-dir"])
            .arg(state)
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_blob(state: &Path, digest: &str) -> bool {
    let hex = digest.strip_prefix("sha256:").unwrap();
    state.join("blobs/sha256").join(hex).exists()
}

/// The raw manifest of an image in the registry.
fn manifest(reference: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// sha256 of a gzip blob's content.
fn gunzipped_sha256(blob: &Path) -> String {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -dc '{}' | sha256sum", blob.display())),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

#[test]
fn a_stage_no_output_needs_is_never_compressed_until_one_does() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&TWO_STAGES.replace("{BASE}", &base), &[]);
    let state = tempfile::tempdir().unwrap();
    let state = state.path();

    // The slim image is pushed; the build stage's layers are lazy.
    build(
        &ctx,
        state,
        &["--destination", &registry.reference("app:slim")],
    );
    let ls = kiln_cache(state, &["ls"]);
    assert_eq!(ls.matches("(lazy)").count(), 2, "{ls}");

    // What a build that pushes the stage from the start makes (eagerly).
    let eager_state = tempfile::tempdir().unwrap();
    let eager_ref = registry.reference("build:eager");
    build(
        &ctx,
        eager_state.path(),
        &["--target", "build", "--destination", &eager_ref],
    );
    let eager = manifest(&eager_ref);
    let layers = eager["layers"].as_array().unwrap();
    let top = layers.last().unwrap()["digest"].as_str().unwrap();
    assert!(layers.last().unwrap()["size"].as_u64().unwrap() > 100_000);
    // The lazy state holds no such blob, nor any compressed form of it.
    assert!(!has_blob(state, top));
    assert!(!kiln_cache(eager_state.path(), &["ls"]).contains("(lazy)"));

    // The cache maintenance commands keep the lazy entry whole: verify is
    // clean, and a GC down to nothing spares the unpacked directory that
    // is its only copy.
    kiln_cache(state, &["verify"]);
    kiln_cache(state, &["gc", "--max-size", "0"]);
    assert_eq!(kiln_cache(state, &["ls"]).matches("(lazy)").count(), 2);

    // Pushing the stage: every step hits, and the blob is made then, the
    // very one the eager build made.
    let lazy_ref = registry.reference("build:lazy");
    let digest_file = ctx.path().join("digest");
    let pushed = build(
        &ctx,
        state,
        &[
            "--target",
            "build",
            "--destination",
            &lazy_ref,
            "--digest-file",
            digest_file.to_str().unwrap(),
        ],
    );
    assert_eq!(summary(&pushed)["cache_misses"], 0, "{}", stderr(&pushed));
    assert_eq!(manifest(&lazy_ref), eager);
    assert!(has_blob(state, top));
    let ls = kiln_cache(state, &["ls"]);
    assert!(!ls.contains("(lazy)") && ls.contains(top), "{ls}");

    // Another client reads it back whole; each layer decompresses to the
    // diff_id its config names.
    let layout = tempfile::tempdir().unwrap();
    let layout = layout.path().join("oci");
    pull_to_layout(&lazy_ref, &layout);
    let config = skopeo_config(&lazy_ref);
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let manifest = layout_manifest(&layout);
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let blob = layout_blob(&layout, &layer["digest"]);
        assert_eq!(&gunzipped_sha256(&blob), diff_id.as_str().unwrap());
    }
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&layout, "img", unpacked.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("d/e/g")).unwrap(),
        "y\n"
    );
    assert!(!rootfs.join("d/f").exists() && !rootfs.join("d/e/z").exists());
    assert_eq!(std::fs::read(rootfs.join("big")).unwrap().len(), 2_688_895);

    // The entry now names the blob: the next push of the stage is a plain
    // hit with the same digest, and verify stays clean.
    let again = build(
        &ctx,
        state,
        &["--target", "build", "--destination", &lazy_ref],
    );
    assert_eq!(summary(&again)["cache_misses"], 0);
    assert!(kiln_cache(state, &["verify"]).contains("0 entries without a blob"));
}

/// A stage whose steps all hit in `--cache-repo`, read only by a
/// `COPY --from` that hits too, is never pulled: a new machine pulls the
/// final image's layers alone.
#[test]
fn a_remote_hit_pulls_only_the_layers_of_the_pushed_image() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let dockerfile = "FROM {BASE} AS build
RUN head -c 4000000 /dev/urandom > /big && echo small > /small
FROM {BASE}
COPY --from=build /small /small
";
    let ctx = Context::new(&dockerfile.replace("{BASE}", &base), &[]);
    let repo = registry.reference("kiln/cache");
    let machine = |dest: &str| {
        let state = tempfile::tempdir().unwrap();
        let dest = registry.reference(dest);
        build(
            &ctx,
            state.path(),
            &["--cache-repo", &repo, "--destination", &dest],
        )
    };
    let first = machine("app:first");
    assert_eq!(summary(&first)["cache_misses"], 2);

    let second = machine("app:second");
    let s = summary(&second);
    assert_eq!(
        (&s["cache_misses"], &s["remote_hits"]),
        (&0.into(), &2.into())
    );
    assert_eq!(s["layers_unpacked"], 0);
    let pulled = s["bytes_pulled"].as_u64().unwrap();
    // The final image: busybox and one small layer, nowhere near the
    // build stage's 4 MB of random bytes.
    let image = manifest(&registry.reference("app:second"));
    let image_bytes: u64 = image["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert!(pulled >= image_bytes, "{pulled} < {image_bytes}");
    assert!(pulled < image_bytes + 100_000, "{pulled} bytes pulled");
    assert_eq!(image, manifest(&registry.reference("app:first")));
    // The image pushed is complete.
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&registry.reference("app:second"), unpacked.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("small")).unwrap(),
        "small\n"
    );
}
