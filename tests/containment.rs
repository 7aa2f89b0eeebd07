//! Containment: a build writes nothing outside its state dir and the temp
//! dir, and a RUN cannot touch the host's files. This is its own test
//! binary so that no other test (skopeo, podman) writes to `/` meanwhile.
mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// Every path modified since `marker`: new entries directly in `/`, and
/// anything below the system and home trees, skipping the given paths.
/// Logs (/var/log) and whatever runs this suite (its checkout, its output)
/// are left out, since they change on their own while the test runs.
fn modified_since(marker: &Path, skip: &[&Path]) -> Vec<String> {
    let mut cmd = Command::new("find");
    cmd.args(["/", "-maxdepth", "1", "-newer"])
        .arg(marker)
        .arg("-print");
    let top = cmd.output().unwrap();
    let mut cmd = Command::new("find");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    cmd.args([
        "/etc", "/usr", "/opt", "/srv", "/home", "/var", "/bin", "/sbin", "/lib",
    ])
    .arg(&home)
    .args(["-xdev", "(", "-path", "/var/log"]);
    for p in skip {
        cmd.arg("-o").arg("-path").arg(p);
    }
    cmd.args([")", "-prune", "-o", "-newer"])
        .arg(marker)
        .arg("-print");
    let below = cmd.output().unwrap();
    [top.stdout, below.stdout]
        .iter()
        .flat_map(|out| {
            String::from_utf8_lossy(out)
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|p| p != "/" && !skip.iter().any(|s| Path::new(p).starts_with(s)))
        .collect()
}

#[test]
fn writes_nothing_outside_the_state_dir_and_keeps_runs_off_the_host() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let canary = format!("/kiln-host-canary-{}", std::process::id());
    let ctx = Context::new(
        &format!("FROM {base}\nRUN echo inside > {canary} && ls / > /tmp/ls.txt\nCOPY f /f\n"),
        &[("f", "f\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("marker");
    std::fs::write(&marker, "").unwrap();
    // Let the marker's mtime fall strictly before anything the build writes.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let dest = registry.reference("app/contained:v1");
    let mut cmd = Command::new(KILN);
    cmd.env("TMPDIR", tmp.path())
        .arg("build")
        .arg("--context")
        .arg(ctx.path())
        .arg("--cache-dir")
        .arg(state.path())
        .args(["--destination", &dest]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let tmp_root = std::env::temp_dir();
    let skip = [
        Path::new("/proc"),
        Path::new("/sys"),
        Path::new("/dev"),
        Path::new("/run"),
        tmp_root.as_path(),
        target,
    ];
    let changed = modified_since(&marker, &skip);
    assert!(
        changed.is_empty(),
        "the build wrote outside its state dir: {changed:?}"
    );
    assert!(!Path::new(&canary).exists(), "a RUN wrote to the host's /");
    // The detector itself sees a write in the places it watches.
    let probe = Path::new(&std::env::var("HOME").unwrap())
        .join(format!(".kiln-probe-{}", std::process::id()));
    std::fs::write(&probe, "").unwrap();
    let seen = modified_since(&marker, &skip);
    std::fs::remove_file(&probe).unwrap();
    assert!(seen.iter().any(|p| Path::new(p) == probe), "{seen:?}");

    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&dest, unpacked.path());
    let name = canary.trim_start_matches('/');
    assert_eq!(
        std::fs::read_to_string(rootfs.join(name)).unwrap(),
        "inside\n"
    );
    // The RUN saw the image's root, not the host's.
    let ls = std::fs::read_to_string(rootfs.join("tmp/ls.txt")).unwrap();
    assert!(ls.contains("bin") && !ls.contains("work"), "{ls}");
}
