//! `--snapshotter`: the overlay snapshotter's mounts never reach the host,
//! and where overlayfs cannot be mounted (here: a state dir on overlayfs,
//! which overlayfs refuses as an upper dir) `auto` falls back to the walk
//! snapshotter with a warning while an explicit `overlay` fails clearly.
//! A successful probe is recorded in the state dir, and a record that a
//! mount then proves wrong is forgotten.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const DOCKERFILE: &str = "FROM {BASE}
RUN mkdir -p /data && echo one > /data/a && echo two > /data/b
RUN rm /data/a && echo changed > /data/b
";

fn context() -> Context {
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    Context::new(&DOCKERFILE.replace("{BASE}", &base), &[])
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|target| Path::new(target).starts_with(dir))
        .map(String::from)
        .collect()
}

/// An overlay mounted by the test on the host, unmounted when dropped.
struct HostOverlay {
    merged: PathBuf,
}

impl HostOverlay {
    fn mount(dir: &Path) -> HostOverlay {
        let [lower, upper, work, merged] =
            ["lower", "upper", "work", "merged"].map(|d| dir.join(d));
        for d in [&lower, &upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &options])
                .arg(&merged),
        );
        HostOverlay { merged }
    }
}

impl Drop for HostOverlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
    }
}

#[test]
fn overlay_mounts_stay_in_kilns_namespace() {
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &context(),
        state.path(),
        &["--no-push", "--snapshotter", "overlay"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("walk snapshotter"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::fs::read_dir(state.path().join("unpacked"))
            .unwrap()
            .count()
            >= 2,
        "the base and the steps' layers are kept unpacked"
    );
    assert_eq!(mounts_under(state.path()), Vec::<String>::new());
}

#[test]
fn without_overlayfs_auto_walks_and_overlay_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let host = HostOverlay::mount(dir.path());
    let state = host.merged.join("state");
    let layout = dir.path().join("layout");
    let ctx = context();

    let out = kiln_build(
        &ctx,
        &state,
        &["--no-push", "--oci-layout-path", layout.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("overlayfs unavailable") && stderr(&out).contains("walk snapshotter"),
        "{}",
        stderr(&out)
    );
    let root = umoci_unpack(&layout, "latest", &dir.path().join("unpacked"));
    assert!(!root.join("data/a").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("data/b")).unwrap(),
        "changed\n"
    );

    let out = kiln_build(
        &ctx,
        &state,
        &["--no-push", "--cache=false", "--snapshotter", "overlay"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--snapshotter overlay: overlayfs cannot be mounted here"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn a_probe_is_recorded_and_a_record_that_proves_wrong_is_forgotten() {
    let ctx = context();
    let plain = tempfile::tempdir().unwrap();
    let out = kiln_build(&ctx, plain.path(), &["--no-push"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record = std::fs::read_to_string(plain.path().join("overlay-probed")).unwrap();
    assert!(record.starts_with("kiln overlay probe 1\n"), "{record}");

    // On overlayfs, which overlayfs refuses as an upper dir, a record of the
    // same conditions but that filesystem: trusted, so no probe runs and the
    // step's own mount fails, which forgets it.
    let dir = tempfile::tempdir().unwrap();
    let host = HostOverlay::mount(dir.path());
    let state = host.merged.join("state");
    std::fs::create_dir(&state).unwrap();
    let stat = |args: &[&str]| {
        let out = run_ok(Command::new("stat").args(args).arg(&state));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let fs = format!(
        "fs {} dev {}",
        stat(&["-f", "-c", "%t"]),
        stat(&["-c", "%d"])
    );
    let forged: String = record
        .lines()
        .map(|l| match l.starts_with("fs ") {
            true => format!("{fs}\n"),
            false => format!("{l}\n"),
        })
        .collect();
    assert_ne!(forged, record);
    std::fs::write(state.join("overlay-probed"), forged).unwrap();
    let out = kiln_build(&ctx, &state, &["--no-push"]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the next build checks overlayfs again"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert!(!state.join("overlay-probed").exists());

    let out = kiln_build(&ctx, &state, &["--no-push"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("walk snapshotter"),
        "{}",
        stderr(&out)
    );
    assert!(!state.join("overlay-probed").exists());
}
