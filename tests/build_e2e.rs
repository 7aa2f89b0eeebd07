//! The first end-to-end path: build from the busybox fixture in a real
//! registry, push, and read the image back with skopeo and umoci.
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use support::*;

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

const APP_DOCKERFILE: &str = r#"FROM {BASE}
RUN mkdir -p /data && echo run > /data/run.txt && chmod 0640 /data/run.txt \
 && chown 1000:1000 /data/run.txt && rm /bin/vi && rmdir /var
COPY app.txt /srv/app.txt
COPY --chown=user:user --chmod=0600 secret.txt conf/ /srv/
ENV APP_MODE=prod GREETING="hello world"
WORKDIR /srv/work
RUN echo "$APP_MODE $GREETING" > mode.txt && pwd > /tmp/pwd.txt
USER user
RUN id -u > /tmp/uid.txt && id -g >> /tmp/uid.txt
CMD ["sh", "-c", "echo hi"]
"#;

fn app_context(base: &str) -> Context {
    Context::new(
        &APP_DOCKERFILE.replace("{BASE}", base),
        &[
            ("app.txt", "app\n"),
            ("secret.txt", "s3cret\n"),
            ("conf/a.conf", "a=1\n"),
        ],
    )
}

#[test]
fn builds_pushes_and_reads_back() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = app_context(&base);
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/hello:v1");
    let dest2 = registry.reference("app/hello:v2");
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--destination", &dest, "--destination", &dest2],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let config = skopeo_config(&dest);
    let c = &config["config"];
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"APP_MODE=prod"), "{env:?}");
    assert!(env.contains(&"GREETING=hello world"), "{env:?}");
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert_eq!(c["Cmd"], serde_json::json!(["sh", "-c", "echo hi"]));
    assert_eq!(c["WorkingDir"], "/srv/work");
    assert_eq!(c["User"], "user");
    // The base layer, then RUN, COPY, COPY, WORKDIR (creates /srv/work), RUN, RUN.
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().unwrap().len(),
        1 + 6
    );
    assert_eq!(skopeo_config(&dest2), config);

    let tmp = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&dest, tmp.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("data/run.txt")).unwrap(),
        "run\n"
    );
    assert_eq!(
        mode_owner(&rootfs.join("data/run.txt")),
        (0o640, 1000, 1000)
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/app.txt")).unwrap(),
        "app\n"
    );
    assert_eq!(mode_owner(&rootfs.join("srv/app.txt")), (0o644, 0, 0));
    assert_eq!(
        mode_owner(&rootfs.join("srv/secret.txt")),
        (0o600, 1000, 1000)
    );
    assert_eq!(mode_owner(&rootfs.join("srv/a.conf")), (0o600, 1000, 1000));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/work/mode.txt")).unwrap(),
        "prod hello world\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/pwd.txt")).unwrap(),
        "/srv/work\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/uid.txt")).unwrap(),
        "1000\n1000\n"
    );
    // Deleted by RUN: a file (symlink) and a directory.
    assert!(std::fs::symlink_metadata(rootfs.join("bin/vi")).is_err());
    assert!(std::fs::symlink_metadata(rootfs.join("var")).is_err());
    assert!(
        rootfs.join("bin/sh").exists() || std::fs::symlink_metadata(rootfs.join("bin/sh")).is_ok()
    );
    // Mount points and Kiln's /etc files never reach the image.
    assert!(!rootfs.join("etc/hosts").exists());
    assert!(!rootfs.join("etc/resolv.conf").exists());
    assert_eq!(std::fs::read_dir(rootfs.join("dev")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(rootfs.join("proc")).unwrap().count(), 0);
}

#[test]
fn writes_a_tarball_and_an_oci_layout() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = app_context(&base);
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let tar = out_dir.path().join("image.tar");
    let layout = out_dir.path().join("layout");
    let dest = registry.reference("app/saved:v3");
    let other = registry.reference("app/other:latest");
    let out = kiln_build(
        &ctx,
        state.path(),
        &[
            "--destination",
            &dest,
            "--destination",
            &other,
            "--no-push",
            "--tar-path",
            tar.to_str().unwrap(),
            "--oci-layout-path",
            layout.to_str().unwrap(),
            "--digest-file",
            out_dir.path().join("digest").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // --no-push: nothing in the registry.
    assert_eq!(registry.get("/v2/app/saved/tags/list").0, 404);

    // The docker-archive is read by skopeo and loaded by podman.
    let from_tar = out_dir.path().join("from-tar");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("docker-archive:{}", tar.display()),
        &format!("oci:{}:t", from_tar.display()),
    ]));
    let rootfs = umoci_unpack(&from_tar, "t", &out_dir.path().join("a"));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/app.txt")).unwrap(),
        "app\n"
    );
    let storage = out_dir.path().join("podman");
    let loaded = run_ok(
        Command::new("podman")
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs", "load", "-i"])
            .arg(&tar),
    );
    // Every destination is a tag of the archive.
    for tag in ["app/saved:v3", "app/other:latest"] {
        assert!(
            String::from_utf8_lossy(&loaded.stdout).contains(tag),
            "{tag}: {}",
            String::from_utf8_lossy(&loaded.stdout)
        );
    }

    // The OCI layout is read by skopeo and umoci under the destination's tag.
    let inspected =
        run_ok(Command::new("skopeo").args(["inspect", &format!("oci:{}:v3", layout.display())]));
    let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    let digest = std::fs::read_to_string(out_dir.path().join("digest")).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());
    let rootfs = umoci_unpack(&layout, "v3", &out_dir.path().join("b"));
    assert_eq!(
        mode_owner(&rootfs.join("srv/secret.txt")),
        (0o600, 1000, 1000)
    );
}

#[test]
fn dockerfile_errors_name_the_file_and_line() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/broken:v1");
    for (dockerfile, line) in [
        (format!("FROM {base}\nRUN true\nFROOB x\n"), 3),
        ("# only a comment\nRUN echo no from\n".to_string(), 2),
    ] {
        let ctx = Context::new(&dockerfile, &[]);
        let out = kiln_build(&ctx, state.path(), &["--destination", &dest]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(&format!("Dockerfile:{line}")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let missing = registry.reference("base/missing:nope");
    let ctx = Context::new(&format!("FROM {missing}\nRUN true\n"), &[]);
    let out = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("base/missing:nope"),
        "{}",
        stderr(&out)
    );
    // A failing RUN names its line and exit code.
    let ctx = Context::new(&format!("FROM {base}\nRUN exit 7\n"), &[]);
    let out = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Dockerfile:2") && err.contains('7'), "{err}");
    // No image was pushed by any of these.
    assert_eq!(registry.get("/v2/app/broken/tags/list").0, 404);
}

/// `--image-format docker` pushes a Docker schema 2 manifest that other
/// tools read; zstd layers, which Docker images cannot hold, are refused.
#[test]
fn pushes_docker_schema_2_on_request() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nRUN echo docker > /format\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/docker-format:1");
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--destination", &dest, "--image-format", "docker"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]));
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
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
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&dest, unpacked.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("format")).unwrap(),
        "docker\n"
    );

    let fresh = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        fresh.path(),
        &[
            "--no-push",
            "--image-format",
            "docker",
            "--compression",
            "zstd",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--image-format docker"),
        "{}",
        stderr(&out)
    );
}

/// `--compression zstd` layers, at the level asked for, read back by
/// skopeo (umoci 0.4 reads gzip only, so skopeo recompresses for it).
#[test]
fn zstd_layers_at_a_level_are_read_back() {
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(&format!("FROM {base}\nRUN seq 1 200000 > /numbers\n"), &[]);
    let out_dir = tempfile::tempdir().unwrap();
    let build = |level: &str| {
        let layout = out_dir.path().join(format!("zstd-{level}"));
        let state = out_dir.path().join(format!("state-{level}"));
        let out = kiln_build(
            &ctx,
            &state,
            &[
                "--no-push",
                "--compression",
                "zstd",
                "--compression-level",
                level,
                "--oci-layout-path",
                layout.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let (top, blob) = layout_top_layer(&layout);
        assert_eq!(
            top["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let bytes = std::fs::read(blob).unwrap();
        assert_eq!(bytes[..4], [0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        (layout, bytes.len())
    };
    let (fast, fast_size) = build("1");
    let (_, small_size) = build("19");
    assert!(
        small_size < fast_size,
        "level 19 ({small_size}) vs 1 ({fast_size})"
    );
    let gzipped = out_dir.path().join("gzipped");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        &format!("oci:{}:latest", fast.display()),
        &format!("oci:{}:latest", gzipped.display()),
    ]));
    let rootfs = umoci_unpack(&gzipped, "latest", out_dir.path());
    let numbers = std::fs::read_to_string(rootfs.join("numbers")).unwrap();
    assert!(numbers.ends_with("199999\n200000\n"));
}

/// Base layers are mounted from the base's repository, not uploaded again,
/// when the destination is in the same registry.
#[test]
fn base_layers_are_mounted_across_repositories() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nRUN echo mounted > /m\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/mounted:1");
    let out = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 blobs mounted"), "{err}");
    // The image is whole: the mounted layer reads back.
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&dest, unpacked.path());
    assert!(rootfs.join("bin/busybox").exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("m")).unwrap(),
        "mounted\n"
    );
}

/// A Kaniko job's flags are accepted as they are.
#[test]
fn kaniko_flags_are_accepted() {
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nRUN echo kaniko > /k\n",
            busybox_layout().display()
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        state.path(),
        &[
            "--no-push",
            "--cleanup",
            "--compressed-caching=false",
            "--ignore-var-run",
            "--skip-unused-stages",
            "--use-new-run",
            "--log-format",
            "text",
            "--log-timestamp=false",
            "--kaniko-dir",
            "/kaniko",
            "--force",
            "--push-ignore-immutable-tag-errors",
            "--skip-push-permission-check",
            "--image-fs-extract-retry",
            "2",
            "--no-push-cache",
            "--skip-tls-verify-pull",
            "--image-download-retry",
            "1",
            "--push-retry",
            "1",
            "--snapshot-mode",
            "redo",
            "--cache=true",
            "--cache-ttl",
            "24h",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--no-push", "--registry-client-cert", "r.example.com=c.pem"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("--registry-client-cert r.example.com=c.pem: expected HOST=CERT.pem,KEY.pem"),
        "{}",
        stderr(&out)
    );
}

/// Layers are compressed on every core in blocks of fixed size, so the
/// thread count must not change a byte: `--reproducible` gives one digest
/// with 1, 2 and 8 threads, for gzip and zstd, and Go's readers (skopeo,
/// umoci) read the blocks back.
#[test]
fn compression_threads_do_not_change_the_reproducible_digest() {
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    // About 11 MB: many gzip blocks and a few zstd frames.
    let ctx = Context::new(&format!("FROM {base}\nRUN seq 1 1500000 > /numbers\n"), &[]);
    let out_dir = tempfile::tempdir().unwrap();
    for compression in ["gzip", "zstd"] {
        let build = |threads: &str| {
            let name = format!("{compression}-{threads}");
            let layout = out_dir.path().join(format!("layout-{name}"));
            let digest_file = out_dir.path().join(format!("digest-{name}"));
            let out = kiln_build(
                &ctx,
                &out_dir.path().join(format!("state-{name}")),
                &[
                    "--no-push",
                    "--reproducible",
                    "--compression",
                    compression,
                    "--compression-threads",
                    threads,
                    "--oci-layout-path",
                    layout.to_str().unwrap(),
                    "--digest-file",
                    digest_file.to_str().unwrap(),
                ],
            );
            assert!(out.status.success(), "{}", stderr(&out));
            (std::fs::read_to_string(digest_file).unwrap(), layout)
        };
        let (one, layout) = build("1");
        for threads in ["2", "8"] {
            assert_eq!(build(threads).0, one, "{compression}, {threads} threads");
        }
        // zstd goes through skopeo's decoder into gzip, which umoci reads.
        let readable = match compression {
            "gzip" => layout,
            _ => {
                let gzipped = out_dir.path().join("gzipped");
                run_ok(Command::new("skopeo").args([
                    "copy",
                    "--quiet",
                    "--dest-compress",
                    "--dest-compress-format",
                    "gzip",
                    &format!("oci:{}:latest", layout.display()),
                    &format!("oci:{}:latest", gzipped.display()),
                ]));
                gzipped
            }
        };
        let rootfs = umoci_unpack(&readable, "latest", &out_dir.path().join(compression));
        let numbers = std::fs::read_to_string(rootfs.join("numbers")).unwrap();
        assert_eq!(numbers.len(), 10_888_896, "{compression}");
        assert!(numbers.ends_with("1499999\n1500000\n"), "{compression}");
    }
}
