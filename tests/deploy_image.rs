//! Kiln's own image (`deploy/image.sh`, built by Kiln) where Kaniko ran: a
//! container with the runtime's default capabilities and no privilege.
//! podman with runc stands in for the pod runtime.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use support::podman::Podman;
use support::*;

/// The OCI layout `deploy/image.sh` writes (tags `latest` and `debug`),
/// built once per test binary with the kiln under test.
fn image_layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        // podman names an `oci:` image after its path, which must then be
        // a valid reference: no `.cache`-like components.
        let dir = std::env::temp_dir().join(format!("kiln-image-{}", std::process::id()));
        remove_layouts_of_earlier_runs();
        let _ = std::fs::remove_dir_all(&dir);
        let out = run_ok(
            Command::new(Path::new(REPO).join("deploy/image.sh"))
                .args(["--kiln", KILN, "--oci-layout"])
                .arg(&dir)
                .arg("--cache-dir")
                .arg(dir.with_extension("cache")),
        );
        let said = String::from_utf8_lossy(&out.stdout);
        // The shipped binary is stripped: Kaniko-sized, not 500 MB.
        let stripped: u64 = said
            .lines()
            .find_map(|l| l.strip_prefix("stripped kiln: "))
            .and_then(|l| l.strip_suffix(" bytes"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no binary size in: {said}"));
        assert!(stripped < 30 << 20, "{said}");
        readme_sizes_hold(&said);
        dir
    })
}

/// Removes the layouts (and their cache dirs) that test binaries no longer
/// running left in the temp dir: a static is never dropped, so each run
/// leaves its own, 12 MB, for the next to remove.
fn remove_layouts_of_earlier_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("kiln-image-") else {
            continue;
        };
        let pid = pid.trim_end_matches(".cache");
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The bytes `deploy/image.sh` reported after `prefix` (`N bytes`).
fn reported(said: &str, prefix: &str) -> f64 {
    said.lines()
        .find_map(|l| l.strip_prefix(prefix)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in: {said}"))
}

/// The number of MB written just before `unit` in `text`.
fn mb_before(text: &str, unit: &str) -> f64 {
    let at = text
        .find(unit)
        .unwrap_or_else(|| panic!("no {unit:?} in: {text}"));
    text[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

/// The README's image table says what `deploy/image.sh` measures now
/// (within 10%: the binary grows a little with every change).
fn readme_sizes_hold(said: &str) {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let row = |tag: &str| {
        readme
            .lines()
            .find(|l| l.starts_with(&format!("| `REPO:{tag}`")))
            .unwrap_or_else(|| panic!("no README row for {tag}"))
            .to_string()
    };
    let latest = row("latest");
    let checks = [
        (
            mb_before(&latest, " MB instead of"),
            reported(said, "stripped kiln: "),
        ),
        (
            mb_before(&latest, " MB compressed"),
            reported(said, "image latest: "),
        ),
        (
            mb_before(&row("debug"), " MB compressed"),
            reported(said, "image debug: "),
        ),
    ];
    for (stated, measured) in checks {
        let measured = measured / 1e6;
        assert!(
            (stated - measured).abs() <= measured * 0.1,
            "README says {stated} MB, deploy/image.sh measures {measured:.1} MB: update the README"
        );
    }
}

/// Loads a tag of Kiln's image layout into `podman`; its image id.
fn load_kiln(podman: &Podman, tag: &str) -> String {
    podman.pull(&format!("oci:{}:{tag}", image_layout().display()))
}

fn volume(host: &Path, at: &str) -> String {
    format!("{}:{at}", host.display())
}

#[test]
fn kaniko_args_build_and_push_in_an_unprivileged_container() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!(
            "FROM {base} AS build\nRUN echo compiled > /out\n\
             FROM {base}\nCOPY --from=build /out /app/out\nCOPY greeting /app/greeting\n\
             RUN cat /app/out /app/greeting > /app/both\nCMD [\"cat\", \"/app/both\"]\n"
        ),
        &[("greeting", "hello from a pod\n")],
    );
    let podman = Podman::new();
    let kiln = load_kiln(&podman, "latest");
    let dest = registry.reference("app/pod:1");
    let digest_dir = tempfile::tempdir().unwrap();
    // A Kaniko container spec's args, unchanged: no `build` subcommand.
    let built = podman.run(
        &[
            "-v",
            &volume(ctx.path(), "/workspace"),
            "-v",
            &volume(digest_dir.path(), "/out"),
        ],
        &kiln,
        &[
            "--context=dir:///workspace",
            "--dockerfile=/workspace/Dockerfile",
            &format!("--destination={dest}"),
            "--digest-file=/out/digest",
            "--insecure",
            "--insecure-pull",
        ],
    );
    let log = stderr(&built);
    assert!(built.status.success(), "{log}");
    // Said once, with why: a pod has no CAP_SYS_ADMIN but CAP_SYS_CHROOT.
    assert!(
        log.contains("RUN isolation: chroot (mount and PID namespaces are refused"),
        "{log}"
    );

    // skopeo reads it back under the digest Kiln wrote.
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]));
    let inspected: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    let digest = std::fs::read_to_string(digest_dir.path().join("digest")).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());

    // podman runs what was built.
    run_ok(
        podman
            .cmd()
            .args(["pull", "-q", "--tls-verify=false", &dest]),
    );
    let ran = podman.run(&[], &dest, &[]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "compiled\nhello from a pod\n"
    );
}

#[test]
fn a_container_builds_from_a_cache_another_one_warmed() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let podman = Podman::new();
    let kiln = load_kiln(&podman, "latest");
    let cache = tempfile::tempdir().unwrap();
    let cache_volume = volume(cache.path(), "/cache");
    let warmed = podman.run(
        &["-v", &cache_volume],
        &kiln,
        &[
            "warm",
            "--image",
            &base,
            "--cache-dir",
            "/cache",
            "--insecure-pull",
        ],
    );
    assert!(warmed.status.success(), "{}", stderr(&warmed));

    let ctx = Context::new(&format!("FROM {base}\nRUN echo warm > /w\n"), &[]);
    let built = podman.run(
        &["-v", &cache_volume, "-v", &volume(ctx.path(), "/workspace")],
        &kiln,
        &[
            "--context=dir:///workspace",
            "--cache-dir=/cache",
            &format!("--destination={}", registry.reference("app/warm:1")),
            "--insecure",
            "--insecure-pull",
        ],
    );
    let log = stderr(&built);
    assert!(built.status.success(), "{log}");
    assert!(log.contains("; 0 bytes pulled,"), "{log}");
}

#[test]
fn the_debug_image_has_a_shell_for_ci_scripts() {
    let podman = Podman::new();
    let debug = load_kiln(&podman, "debug");
    // As GitLab CI runs a `script:` in Kaniko's debug image.
    let ran = podman.run(
        &["--entrypoint", "/busybox/sh"],
        &debug,
        &[
            "-c",
            "kiln --version && test -f /etc/ssl/certs/ca-certificates.crt && echo ok",
        ],
    );
    assert!(ran.status.success(), "{}", stderr(&ran));
    let out = String::from_utf8_lossy(&ran.stdout);
    assert!(out.starts_with("kiln ") && out.ends_with("ok\n"), "{out}");
}

#[test]
fn uid_1000_without_capabilities_builds_without_run_and_fails_clearly_at_a_run() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &NO_RUN_DOCKERFILE.replace("{BASE}", &base),
        &[("f", "f\n"), ("g", "g\n")],
    );
    // The context as a volume uid 1000 can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ctx.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let podman = Podman::new();
    let kiln = load_kiln(&podman, "latest");
    let workspace = volume(ctx.path(), "/workspace");
    // A pod with runAsUser: 1000, all capabilities dropped and
    // allowPrivilegeEscalation: false; HOME comes from the image's passwd.
    let restricted = [
        "--user",
        "1000",
        "--cap-drop=all",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &workspace,
    ];
    let build = |dest: &str| {
        podman.run(
            &restricted,
            &kiln,
            &[
                "--context=dir:///workspace",
                &format!("--destination={}", registry.reference(dest)),
                "--insecure",
                "--insecure-pull",
            ],
        )
    };
    let built = build("app/restricted:1");
    let log = stderr(&built);
    assert!(built.status.success(), "{log}");
    assert!(
        log.contains("==> RUN isolation: none available (not root, and no user namespace: rootless isolation needs subordinate ids for user kiln (uid 1000)"),
        "{log}"
    );
    assert_no_run_layers(&registry.reference("app/restricted:1"));

    std::fs::write(
        ctx.path().join("Dockerfile"),
        NO_RUN_DOCKERFILE.replace("{BASE}", &base).replace(
            "WORKDIR /app/w\n",
            "WORKDIR /app/w\nRUN echo hi > /app/hi\n",
        ),
    )
    .unwrap();
    let failed = build("app/restricted:2");
    let log = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{log}");
    for said in [
        "Dockerfile:5: RUN failed: this RUN must run, and no RUN isolation is available here",
        "newuidmap",
        "hostUsers: false",
        "as root in the container",
    ] {
        assert!(log.contains(said), "{said:?} not in {log}");
    }
}
