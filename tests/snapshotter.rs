//! `--snapshotter`: the overlay snapshotter's mounts never reach the host,
//! and where overlayfs cannot be mounted (here: a state dir on overlayfs,
//! which overlayfs refuses as an upper dir) `auto` falls back to the walk
//! snapshotter with a warning while an explicit `overlay` fails clearly.
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
