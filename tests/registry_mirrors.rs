//! Pulling through mirrors (`--registry-mirror`, `--registry-map`) and
//! picking a platform from a multi-platform base (`--custom-platform`).
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use support::*;

const FIXTURE_DIGEST: &str = "sha256:46d2db65";

fn build(dockerfile: &str, extra: &[&str]) -> std::process::Output {
    let ctx = Context::new(dockerfile, &[("a.txt", "a\n")]);
    let state = tempfile::tempdir().unwrap();
    let mut args = vec!["--no-push"];
    args.extend_from_slice(extra);
    kiln_build(&ctx, state.path(), &args)
}

#[test]
fn mirrors_serve_base_images() {
    let mirror = Registry::start();
    mirror.push_busybox_as("library/busybox:latest");
    mirror.push_busybox_as("prefixed/library/busybox:latest");
    mirror.push_busybox();

    // `FROM busybox` is docker.io/library/busybox, unreachable here: only
    // the mirror can serve it.
    let out = build(
        "FROM busybox\nCOPY a.txt /\n",
        &["--registry-mirror", &mirror.addr],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("base busybox @ {FIXTURE_DIGEST}")),
        "{}",
        stderr(&out)
    );
    // A mirror with a path prefix; a dead mirror first is skipped.
    let prefixed = format!("{}/prefixed", mirror.addr);
    let out = build(
        "FROM busybox\nCOPY a.txt /\n",
        &[
            "--registry-mirror",
            "127.0.0.1:1",
            "--registry-mirror",
            &prefixed,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // --registry-map: a registry that does not answer, mapped to the mirror.
    let map = format!("127.0.0.1:1={}", mirror.addr);
    let out = build(
        "FROM 127.0.0.1:1/base/busybox:latest\nCOPY a.txt /\n",
        &["--registry-map", &map],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Without a fallback, a failing mirror is the end; the error names it.
    let out = build(
        "FROM busybox\nCOPY a.txt /\n",
        &[
            "--registry-mirror",
            "127.0.0.1:1",
            "--skip-default-registry-fallback",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("127.0.0.1:1"), "{}", stderr(&out));
}

/// Adds an arm64 image (same layer, arm64 config) to a copy of the busybox
/// layout and makes its index a two-platform one.
fn multi_platform_layout(dir: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(busybox_layout()).arg(dir));
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let write_blob = |bytes: &[u8]| {
        let digest = sha256(bytes);
        std::fs::write(blob(&digest), bytes).unwrap();
        digest
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let amd64 = index["manifests"][0].clone();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(amd64["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    config["architecture"] = json!("arm64");
    config["variant"] = json!("v8");
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut arm_manifest = manifest.clone();
    arm_manifest["config"]["digest"] = json!(write_blob(&config_bytes));
    arm_manifest["config"]["size"] = json!(config_bytes.len());
    let arm_bytes = serde_json::to_vec(&arm_manifest).unwrap();
    let arm_digest = write_blob(&arm_bytes);
    let entry = |digest: &Value, size: Value, arch: &str, variant: Option<&str>| {
        let mut platform = json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size, "platform": platform})
    };
    let image_index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            entry(&amd64["digest"], amd64["size"].clone(), "amd64", None),
            entry(&json!(arm_digest), json!(arm_bytes.len()), "arm64", Some("v8")),
        ]
    });
    let index_bytes = serde_json::to_vec(&image_index).unwrap();
    let index_digest = write_blob(&index_bytes);
    let top = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": index_digest, "size": index_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

#[test]
fn custom_platform_picks_from_a_multi_platform_base() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("multi");
    multi_platform_layout(&layout);
    let base = registry.reference("base/multi:latest");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &format!("docker://{base}"),
    ]));
    for (platform, arch) in [(None, "amd64"), (Some("linux/arm64/v8"), "arm64")] {
        let dest = registry.reference(&format!("app/multi:{arch}"));
        let ctx = Context::new(
            &format!("FROM {base}\nCOPY a.txt /a.txt\n"),
            &[("a.txt", "a\n")],
        );
        let state = tempfile::tempdir().unwrap();
        let mut args = vec!["--destination", dest.as_str()];
        if let Some(p) = platform {
            args.extend(["--custom-platform", p]);
        }
        let out = kiln_build(&ctx, state.path(), &args);
        assert!(out.status.success(), "{}", stderr(&out));
        let config = skopeo_config(&dest);
        assert_eq!(config["architecture"], arch, "{config}");
        assert_eq!(config["os"], "linux");
    }
}

/// The `sha256:<hex>` digest of `bytes`, as these tests splice it into JSON.
fn sha256(bytes: &[u8]) -> String {
    kiln_cachestore::digest::sha256(bytes).to_string()
}
