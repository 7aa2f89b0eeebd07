//! `--isolation`: the chroot mode gives the same image as the namespaces
//! mode, leaves nothing mounted behind, and refuses what it cannot isolate.
mod support;

use std::path::Path;

use support::*;

const DOCKERFILE: &str = "FROM {BASE}
RUN echo quiet > /dev/null && head -c 4 /dev/urandom | wc -c > /random-bytes \\
 && mkdir -p /opt/x && echo x > /opt/x/file && chmod 4755 /opt/x/file && mkfifo /opt/x/fifo
RUN test -r /proc/self/status && echo proc > /proc-seen || echo no-proc > /proc-seen
RUN <<EOF
#!/bin/sh
echo from-a-script > /script-out
EOF
USER 1000
RUN id -u > /tmp/uid
";

fn build(isolation: &str, state: &Path, out: &Path) -> (std::process::Output, std::path::PathBuf) {
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(&DOCKERFILE.replace("{BASE}", &base), &[]);
    let layout = out.join("layout");
    let output = kiln_build(
        &ctx,
        state,
        &[
            "--no-push",
            "--isolation",
            isolation,
            "--oci-layout-path",
            layout.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{isolation}: {}", stderr(&output));
    let rootfs = umoci_unpack(&layout, "latest", out);
    (output, rootfs)
}

#[test]
fn chroot_mode_builds_the_same_files_and_cleans_up() {
    let (ns_state, ns_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ns_out, ns_root) = build("namespaces", ns_state.path(), ns_dir.path());
    assert!(stderr(&ns_out).contains("RUN isolation: namespaces"));
    let (ch_state, ch_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ch_out, ch_root) = build("chroot", ch_state.path(), ch_dir.path());
    assert!(stderr(&ch_out).contains("RUN isolation: chroot"));
    assert_eq!(
        std::fs::read_to_string(ch_root.join("random-bytes")).unwrap(),
        "4\n"
    );
    assert_eq!(
        std::fs::read_to_string(ch_root.join("script-out")).unwrap(),
        "from-a-script\n"
    );
    assert_eq!(
        std::fs::read_to_string(ch_root.join("tmp/uid")).unwrap(),
        "1000\n"
    );
    assert_eq!(
        tree(&ns_root),
        tree(&ch_root),
        "the two modes built different files"
    );
    // Nothing the chroot mode mounted or made is left behind.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(ch_state.path().to_str().unwrap()),
        "{mounts}"
    );
}

#[test]
fn modes_refuse_what_they_cannot_do() {
    let state = tempfile::tempdir().unwrap();
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(
        &format!("FROM {base}\nRUN --mount=type=tmpfs,target=/t true\n"),
        &[],
    );
    let out = kiln_build(&ctx, state.path(), &["--no-push", "--isolation", "chroot"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("need namespaces"), "{}", stderr(&out));
    for mode in ["rootless", "none"] {
        let out = kiln_build(&ctx, state.path(), &["--no-push", "--isolation", mode]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(&format!("--isolation {mode}")),
            "{}",
            stderr(&out)
        );
    }
}
