//! `--platform linux/amd64,linux/arm64` end to end: one build makes an
//! image per platform from a two-platform base (the arm64 RUN under QEMU)
//! and pushes, lays out and tars one image index; the cross-compiling
//! pattern (`FROM --platform=$BUILDPLATFORM`) runs natively.
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64";

/// The `(architecture, digest)` of each manifest an index lists.
fn index_platforms(index: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["platform"]["os"], "linux", "{m}");
            (
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Copies the `arch` image of a multi-platform source into a layout and
/// unpacks it with umoci; its rootfs.
fn unpack_arch(source: &str, arch: &str, into: &Path) -> std::path::PathBuf {
    let layout = into.join(format!("layout-{arch}"));
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--override-arch",
        arch,
        source,
        &format!("oci:{}:img", layout.display()),
    ]));
    umoci_unpack(&layout, "img", &into.join(arch))
}

/// Every stderr line of a `--log-format json` build, parsed.
fn json_lines(out: &std::process::Output) -> Vec<Value> {
    stderr(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `(platform, stage, instruction keyword, cache)` of each step record, the
/// platform from the `platform` record before it.
fn steps_by_platform(lines: &[Value]) -> Vec<(String, u64, String, String)> {
    let mut platform = String::new();
    let mut out = Vec::new();
    for l in lines {
        match l["event"].as_str() {
            Some("platform") => platform = l["platform"].as_str().unwrap().to_string(),
            Some("step") if !l["cache"].is_null() => out.push((
                platform.clone(),
                l["stage"].as_u64().unwrap(),
                l["instruction"]
                    .as_str()
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_string(),
                l["cache"].as_str().unwrap().to_string(),
            )),
            _ => {}
        }
    }
    out
}

#[test]
fn two_platforms_build_into_one_index_pushed_laid_out_and_tarred() {
    require_arm64_emulation();
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY hello /hello\nRUN uname -m > /arch\n"),
        &[("hello", "hi\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let digest_file = out_dir.path().join("digest");
    let metadata_file = out_dir.path().join("metadata.json");
    let tar = out_dir.path().join("image.tar");
    let layout = out_dir.path().join("layout");
    let dest = registry.reference("app/multi:v1");
    let args = [
        "--platform",
        PLATFORMS,
        "--destination",
        &dest,
        "--digest-file",
        digest_file.to_str().unwrap(),
        "--metadata-file",
        metadata_file.to_str().unwrap(),
        "--tar-path",
        tar.to_str().unwrap(),
        "--oci-layout-path",
        layout.to_str().unwrap(),
        "--log-format",
        "json",
    ];
    let out = kiln_build(&ctx, state.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    // The arm64 stage ran emulated, the amd64 one natively.
    let stages: Vec<(&str, bool)> = lines
        .iter()
        .filter(|l| l["event"] == "stage")
        .map(|l| {
            (
                l["platform"].as_str().unwrap(),
                l["emulated"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(stages, [("linux/amd64", false), ("linux/arm64", true)]);
    // No entry is shared: the arm64 COPY is not the amd64 one's.
    let steps = steps_by_platform(&lines);
    assert_eq!(steps.len(), 4, "{steps:?}");
    assert!(steps.iter().all(|s| s.3 == "miss"), "{steps:?}");

    // The registry holds an index of both, under the digest the file has.
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]))
    .stdout;
    let index: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms = index_platforms(&index);
    let archs: Vec<&str> = platforms.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    let digest = std::fs::read_to_string(&digest_file).unwrap();
    assert_eq!(digest, sha256_of(&raw));

    // Each image ran its RUN on its own architecture.
    let unpacked = tempfile::tempdir().unwrap();
    for (arch, uname) in [("amd64", "x86_64\n"), ("arm64", "aarch64\n")] {
        let root = unpack_arch(&format!("docker://{dest}"), arch, unpacked.path());
        assert_eq!(std::fs::read_to_string(root.join("arch")).unwrap(), uname);
        assert_eq!(std::fs::read_to_string(root.join("hello")).unwrap(), "hi\n");
        let config = skopeo_config(&registry.reference(&format!(
            "app/multi@{}",
            platforms.iter().find(|(a, _)| a == arch).unwrap().1
        )));
        assert_eq!(config["architecture"], arch);
    }

    // The OCI layout and the tarball hold the same index.
    let in_layout = skopeo_raw(&format!("oci:{}:v1", layout.display()));
    assert_eq!(index_platforms(&in_layout), platforms);
    let root = unpack_arch(
        &format!("oci:{}:v1", layout.display()),
        "arm64",
        out_dir.path(),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("arch")).unwrap(),
        "aarch64\n"
    );
    let in_tar = skopeo_raw(&format!("oci-archive:{}", tar.display()));
    assert_eq!(index_platforms(&in_tar), platforms);
    // docker-archive readers see each image too (`:@N`, in platform order).
    for (n, arch) in ["amd64", "arm64"].iter().enumerate() {
        let out = run_ok(Command::new("skopeo").args([
            "inspect",
            "--config",
            &format!("docker-archive:{}:@{n}", tar.display()),
        ]));
        let config: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(config["architecture"], *arch);
    }

    // The metadata names the index.
    let meta: Value = serde_json::from_slice(&std::fs::read(&metadata_file).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], digest.as_str());
    assert_eq!(meta["containerimage.descriptor"]["digest"], digest.as_str());
    assert_eq!(
        meta["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(meta["image.name"], dest.as_str());
    assert_eq!(meta["kiln.build"]["steps"]["run"], 4);
    assert_eq!(meta["kiln.build"]["images"][1]["platform"], "linux/arm64");

    // A no-change rebuild of both platforms runs nothing, same index.
    let again = kiln_build(&ctx, state.path(), &args);
    assert!(again.status.success(), "{}", stderr(&again));
    let steps = steps_by_platform(&json_lines(&again));
    assert!(steps.iter().all(|s| s.3 == "local-hit"), "{steps:?}");
    assert_eq!(std::fs::read_to_string(&digest_file).unwrap(), digest);
}

#[test]
fn a_base_without_a_requested_platform_is_an_error_naming_both() {
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY hello /hello\n"),
        &[("hello", "hi\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        state.path(),
        &[
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/s390x",
            "--no-push",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("base/multi") && err.contains("linux/s390x"),
        "{err}"
    );
    let bad = kiln_build(&ctx, state.path(), &["--platform", "linux", "--no-push"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--platform"), "{}", stderr(&bad));
}

/// The cross-compiling pattern: the build stage runs on the build
/// platform, natively, once per target arch (it reads TARGETARCH); a
/// stage that reads no TARGET* arg is built once and found in the cache
/// by the second platform; a scratch stage is keyed per platform.
#[test]
fn build_platform_stages_run_natively_and_are_shared_when_they_can_be() {
    require_arm64_emulation();
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let dockerfile = format!(
        "FROM --platform=$BUILDPLATFORM {base} AS build
ARG TARGETARCH
ARG BUILDPLATFORM
RUN echo $TARGETARCH > /out && uname -m > /built-on && echo $BUILDPLATFORM > /build-platform
FROM --platform=$BUILDPLATFORM {base} AS shared
RUN uname -m > /shared
FROM scratch AS files
COPY hello /hello
FROM {base}
ARG TARGETPLATFORM
COPY --from=build /out /built-on /build-platform /
COPY --from=shared /shared /
COPY --from=files /hello /
RUN echo $TARGETPLATFORM > /target && uname -m > /arch
"
    );
    let ctx = Context::new(&dockerfile, &[("hello", "hi\n")]);
    let state = tempfile::tempdir().unwrap();
    let layout = tempfile::tempdir().unwrap();
    let layout = layout.path().join("out");
    let out = kiln_build(
        &ctx,
        state.path(),
        &[
            "--platform",
            PLATFORMS,
            "--no-push",
            "--oci-layout-path",
            layout.to_str().unwrap(),
            "--log-format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = json_lines(&out);
    // Stages 0 and 1 are the build platform's, never emulated.
    let mut platform = String::new();
    let mut stages = Vec::new();
    for l in &lines {
        match l["event"].as_str() {
            Some("platform") => platform = l["platform"].as_str().unwrap().to_string(),
            Some("stage") => stages.push((
                platform.clone(),
                l["stage"].as_u64().unwrap(),
                l["platform"].as_str().unwrap().to_string(),
                l["emulated"].as_bool().unwrap(),
            )),
            _ => {}
        }
    }
    for (target, stage, built_for, emulated) in &stages {
        match stage {
            0 | 1 => assert_eq!(
                (built_for.as_str(), *emulated),
                ("linux/amd64", false),
                "{stages:?}"
            ),
            _ => assert_eq!(built_for, target, "{stages:?}"),
        }
    }
    let steps = steps_by_platform(&lines);
    let cache = |platform: &str, stage: u64| -> Vec<&str> {
        steps
            .iter()
            .filter(|s| s.0 == platform && s.1 == stage)
            .map(|s| s.3.as_str())
            .collect()
    };
    // The TARGETARCH stage runs for each target; the shared one once.
    assert_eq!(cache("linux/amd64", 0), ["miss"]);
    assert_eq!(cache("linux/arm64", 0), ["miss"]);
    assert_eq!(cache("linux/amd64", 1), ["miss"]);
    assert_eq!(cache("linux/arm64", 1), ["local-hit"]);
    // `FROM scratch` + COPY is the same input on both, but not the same image.
    assert_eq!(cache("linux/arm64", 2), ["miss"]);

    let unpacked = tempfile::tempdir().unwrap();
    for (arch, uname) in [("amd64", "x86_64\n"), ("arm64", "aarch64\n")] {
        let root = unpack_arch(
            &format!("oci:{}:latest", layout.display()),
            arch,
            unpacked.path(),
        );
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
        assert_eq!(read("out"), format!("{arch}\n"));
        assert_eq!(read("built-on"), "x86_64\n", "built natively");
        assert_eq!(read("build-platform"), "linux/amd64\n");
        assert_eq!(read("shared"), "x86_64\n");
        assert_eq!(read("target"), format!("linux/{arch}\n"));
        assert_eq!(read("arch"), uname);
        assert_eq!(read("hello"), "hi\n");
    }
}

/// Two single-platform builds (as two native Jobs would push them) to two
/// repositories, then `kiln index create` into a third: the index lists
/// both manifests, unchanged, and the blobs were mounted, not uploaded.
#[test]
fn index_create_assembles_separately_pushed_images() {
    require_arm64_emulation();
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(&format!("FROM {base}\nRUN uname -m > /arch\n"), &[]);
    let mut digests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let state = tempfile::tempdir().unwrap();
        let digest_file = state.path().join("digest");
        let dest = registry.reference(&format!("app/{arch}:v1"));
        let out = kiln_build(
            &ctx,
            &state.path().join("state"),
            &[
                "--custom-platform",
                &format!("linux/{arch}"),
                "--destination",
                &dest,
                "--digest-file",
                digest_file.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        digests.push((
            arch.to_string(),
            std::fs::read_to_string(digest_file).unwrap(),
        ));
    }
    let state = tempfile::tempdir().unwrap();
    let digest_file = state.path().join("digest");
    let dest = registry.reference("app/multi:v1");
    let out = Command::new(KILN)
        .args(["index", "create", "--cache-dir"])
        .arg(state.path().join("state"))
        .args(["--destination", &dest, "--digest-file"])
        .arg(&digest_file)
        .args(["--annotation", "org.opencontainers.image.version=1"])
        .arg(registry.reference("app/amd64:v1"))
        .arg(registry.reference(&format!("app/arm64@{}", digests[1].1)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains(" pulled, 0 pushed"),
        "blobs are mounted: {log}"
    );
    assert!(!log.contains(" 0 blobs mounted"), "{log}");

    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]))
    .stdout;
    let index: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(index_platforms(&index), digests);
    assert_eq!(
        index["annotations"]["org.opencontainers.image.version"],
        "1"
    );
    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap(),
        sha256_of(&raw)
    );
    let unpacked = tempfile::tempdir().unwrap();
    for (arch, uname) in [("amd64", "x86_64\n"), ("arm64", "aarch64\n")] {
        let root = unpack_arch(&format!("docker://{dest}"), arch, unpacked.path());
        assert_eq!(std::fs::read_to_string(root.join("arch")).unwrap(), uname);
    }

    // Two images of one platform make no index.
    let out = Command::new(KILN)
        .args(["index", "create", "--cache-dir"])
        .arg(state.path().join("state"))
        .args(["--destination", &registry.reference("app/bad:v1")])
        .arg(registry.reference("app/amd64:v1"))
        .arg(registry.reference(&format!("app/amd64@{}", digests[0].1)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("both linux/amd64"),
        "{}",
        stderr(&out)
    );
}

/// podman pulls each platform's image of a two-platform build from the
/// index and runs it, the arm64 one under QEMU.
#[test]
fn podman_runs_both_platform_images_the_arm64_one_emulated() {
    require_arm64_emulation();
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(
        &format!("FROM {base}\nRUN uname -m > /arch\nCMD [\"cat\", \"/arch\"]\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/run:v1");
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--platform", PLATFORMS, "--destination", &dest],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let podman = support::podman::Podman::new();
    for (platform, uname) in [("linux/amd64", "x86_64\n"), ("linux/arm64", "aarch64\n")] {
        // `uname -m` at run time: the image's own architecture, emulated
        // or not; /arch was written by the build's RUN.
        let ran = podman.run(
            &[
                "--platform",
                platform,
                "--pull=always",
                "--tls-verify=false",
            ],
            &dest,
            &["sh", "-c", "uname -m && cat /arch"],
        );
        assert!(ran.status.success(), "{platform}: {}", stderr(&ran));
        assert_eq!(
            String::from_utf8_lossy(&ran.stdout),
            format!("{uname}{uname}"),
            "{platform}"
        );
    }
}

/// `--image-format docker` with two platforms: a Docker manifest list of
/// Docker schema 2 manifests, as skopeo reads them back.
#[test]
fn two_platforms_in_docker_format_make_a_manifest_list() {
    let registry = Registry::start();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY hello /hello\n"),
        &[("hello", "hi\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let digest_file = state.path().join("digest");
    let dest = registry.reference("app/docker:v1");
    let out = kiln_build(
        &ctx,
        &state.path().join("state"),
        &[
            "--platform",
            PLATFORMS,
            "--image-format",
            "docker",
            "--destination",
            &dest,
            "--digest-file",
            digest_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]))
    .stdout;
    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap(),
        sha256_of(&raw)
    );
    let list: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        list["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let platforms = index_platforms(&list);
    let archs: Vec<&str> = platforms.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for entry in list["manifests"].as_array().unwrap() {
        assert_eq!(
            entry["mediaType"],
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        let reference =
            registry.reference(&format!("app/docker@{}", entry["digest"].as_str().unwrap()));
        let manifest = skopeo_raw(&format!("docker://{reference}"));
        assert_eq!(
            manifest["mediaType"],
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.docker.container.image.v1+json"
        );
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(
                layer["mediaType"],
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            );
        }
        assert_eq!(
            skopeo_config(&reference)["architecture"],
            entry["platform"]["architecture"]
        );
    }
}

/// A no-change rebuild of two platforms asks the destination one thing:
/// the tag is already this index (one HEAD), so neither image manifest
/// nor any blob is checked or pushed again. No RUN: no QEMU needed.
#[test]
fn a_no_change_two_platform_rebuild_makes_one_manifest_request() {
    let registry = Registry::start_logged();
    let base = registry.push_busybox_index_as("base/multi:latest");
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY hello /hello\n"),
        &[("hello", "hi\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/rebuilt:v1");
    let args = ["--platform", PLATFORMS, "--destination", &dest];
    let first = kiln_build(&ctx, state.path(), &args);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = registry.requests().len();
    let again = kiln_build(&ctx, state.path(), &args);
    assert!(again.status.success(), "{}", stderr(&again));
    let to_app: Vec<String> = registry.requests()[before..]
        .iter()
        .filter(|r| r.contains("/v2/app/rebuilt/"))
        .cloned()
        .collect();
    assert_eq!(
        to_app,
        ["HEAD /v2/app/rebuilt/manifests/v1 HTTP/1.1"],
        "{}",
        stderr(&again)
    );
    // The index is what the tag names, both platforms in it.
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]));
    let index: Value = serde_json::from_slice(&raw.stdout).unwrap();
    let arches: Vec<String> = index_platforms(&index)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(arches, ["amd64", "arm64"]);
}
