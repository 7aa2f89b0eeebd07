//! `--isolation`: the chroot and rootless modes give the same image as the
//! namespaces mode, leave nothing behind, and refuse what they cannot
//! isolate.
mod support;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use support::*;

const DOCKERFILE: &str = "FROM {BASE}
RUN echo quiet > /dev/null && head -c 4 /dev/urandom | wc -c > /random-bytes \\
 && mkdir -p /opt/x && echo x > /opt/x/file && chmod 4755 /opt/x/file && mkfifo /opt/x/fifo
RUN test -r /proc/self/status && echo proc > /proc-seen || echo no-proc > /proc-seen
RUN (sleep 4242 &) ; true
RUN sleep 0.2; ps -o args | grep -c '^sleep 4242' > /sleepers || true
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
    // What a step leaves running dies with it, in both modes.
    for root in [&ns_root, &ch_root] {
        assert_eq!(
            std::fs::read_to_string(root.join("sleepers")).unwrap(),
            "0\n"
        );
    }
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
    let out = kiln_build(&ctx, state.path(), &["--no-push", "--isolation", "none"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--isolation none"),
        "{}",
        stderr(&out)
    );
}

/// The unprivileged user rootless builds run as, with a subordinate id
/// range; made once on this (disposable) machine, as `.ci/run` would.
fn rootless_user() -> (u32, u32) {
    const USER: &str = "kiln-rootless";
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        if !Command::new("id")
            .arg(USER)
            .output()
            .unwrap()
            .status
            .success()
        {
            run_ok(Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ]));
        }
        let has_range = |file| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with(&format!("{USER}:")))
        };
        if !has_range("/etc/subuid") || !has_range("/etc/subgid") {
            run_ok(Command::new("usermod").args([
                "--add-subuids",
                "400000-465535",
                "--add-subgids",
                "400000-465535",
                USER,
            ]));
        }
        let id = |flag| {
            let out = run_ok(Command::new("id").args([flag, USER]));
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        (id("-u"), id("-g"))
    })
}

/// A dir the unprivileged user owns, holding a copy of kiln and of the
/// busybox layout (the originals sit under root's 0700 home).
fn user_workspace(uid: u32, gid: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(KILN, dir.path().join("kiln")).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(busybox_layout())
            .arg(dir.path().join("base")),
    );
    run_ok(
        Command::new("chown")
            .args(["-R", &format!("{uid}:{gid}")])
            .arg(dir.path()),
    );
    dir
}

/// `cmd` run as `uid:gid` with no supplementary groups.
fn as_user(uid: u32, gid: u32, home: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        "env",
    ])
    .arg(format!("HOME={}", home.display()));
    cmd
}

fn layout_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn rootless_mode_builds_what_root_builds() {
    let (uid, gid) = rootless_user();
    let ws = user_workspace(uid, gid);
    let canary = format!("/kiln-rootless-canary-{}", std::process::id());
    let dockerfile = format!(
        "FROM oci-layout://{}/base:latest
RUN mkdir -p /srv/a && echo hi > /srv/a/f && chown -R 1000:100 /srv && chmod 4755 /srv/a/f \\
 && ln /srv/a/f /srv/a/hard && ln -s f /srv/a/soft && mkfifo /srv/fifo && rm /bin/ls
RUN id -u > /uid-seen && echo $$ > /pid-seen && hostname > /hostname-seen && touch {canary} \\
 && test ! -e /proc/1/root/{ws} && ls /dev > /dev-seen && touch /dev/shm/x && test -c /dev/pts/ptmx \\
 && awk '$2==\"/sys\" {{ split($4, o, \",\"); print o[1] }}' /proc/mounts > /sys-seen
COPY --chown=1234:5678 file /srv/copied
USER 1000:100
RUN id > /tmp/id-seen
",
        ws.path().display(),
        ws = ws.path().display(),
    );
    let ctx = ws.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.join("file"), "copied\n").unwrap();
    let build = |mut cmd: Command, name: &str| {
        let out = cmd
            .arg("build")
            .arg("--context")
            .arg(&ctx)
            .arg("--cache-dir")
            .arg(ws.path().join(format!("state-{name}")))
            .args(["--no-push", "--reproducible", "--oci-layout-path"])
            .arg(ws.path().join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        (stderr(&out), ws.path().join(name))
    };
    let (root_log, root_layout) = build(Command::new(KILN), "as-root");
    assert!(root_log.contains("RUN isolation: namespaces"), "{root_log}");
    let mut cmd = as_user(uid, gid, ws.path());
    cmd.arg(ws.path().join("kiln"));
    let (user_log, user_layout) = build(cmd, "as-user");
    assert!(user_log.contains("RUN isolation: rootless"), "{user_log}");
    assert!(
        !Path::new(&canary).exists(),
        "a rootless RUN wrote to the host"
    );

    // Owners, modes, links and what the steps saw: all as root built them,
    // down to the image digest.
    let out = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&user_layout, "latest", out.path());
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("uid-seen"), "0\n");
    assert_eq!(read("pid-seen"), "1\n");
    assert_eq!(read("hostname-seen"), "kiln\n");
    assert_eq!(read("sys-seen"), "ro\n", "/sys is read-only");
    assert_eq!(read("tmp/id-seen"), "uid=1000(user) gid=100 groups=100\n");
    assert!(read("dev-seen").contains("null"));
    assert!(rootfs.join(canary.trim_start_matches('/')).exists());
    use std::os::unix::fs::MetadataExt;
    let copied = std::fs::metadata(rootfs.join("srv/copied")).unwrap();
    assert_eq!((copied.uid(), copied.gid()), (1234, 5678));
    let root_out = tempfile::tempdir().unwrap();
    assert_eq!(
        tree(&umoci_unpack(&root_layout, "latest", root_out.path())),
        tree(&rootfs)
    );
    assert_eq!(layout_digest(&root_layout), layout_digest(&user_layout));
    // Cached the second time, still as the user.
    let mut cmd = as_user(uid, gid, ws.path());
    cmd.arg(ws.path().join("kiln"));
    std::fs::remove_dir_all(&user_layout).unwrap();
    let (again, _) = build(cmd, "as-user");
    assert!(again.contains("0 run"), "{again}");
    assert_eq!(layout_digest(&root_layout), layout_digest(&user_layout));

    // A killed rootless build leaves files of subordinate ids: the user's
    // `kiln cache prune` removes them (as root of its user namespace).
    let dead = ws.path().join("state-as-user/builds/build-dead/root/srv");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(dead.join("f"), "x").unwrap();
    std::fs::write(ws.path().join("state-as-user/builds/build-dead/lock"), "").unwrap();
    run_ok(
        Command::new("chown")
            .args(["-R", "400001:400001"])
            .arg(ws.path().join("state-as-user/builds/build-dead")),
    );
    let mut prune = as_user(uid, gid, ws.path());
    prune
        .arg(ws.path().join("kiln"))
        .args(["cache", "prune", "--cache-dir"])
        .arg(ws.path().join("state-as-user"));
    let out = prune.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!ws.path().join("state-as-user/builds/build-dead").exists());
}

#[test]
fn rootless_mode_needs_subordinate_ids_and_others_need_root() {
    // nobody has no /etc/subuid range.
    let ws = user_workspace(65534, 65534);
    let ctx = ws.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
    for (isolation, expected) in [
        // By default such a user builds unprivileged (tested below).
        (
            Some("rootless"),
            "subordinate ids for user nobody (uid 65534) in /etc/subuid",
        ),
        (Some("namespaces"), "--isolation namespaces needs root"),
        (Some("chroot"), "--isolation chroot needs root"),
    ] {
        let mut cmd = as_user(65534, 65534, ws.path());
        cmd.arg(ws.path().join("kiln"))
            .args(["build", "--no-push", "--context"])
            .arg(&ctx)
            .args(isolation.map(|i| ["--isolation", i]).into_iter().flatten());
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{isolation:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(expected),
            "{isolation:?}: {}",
            stderr(&out)
        );
    }
}

/// A root for a throwaway "container": kiln and the libraries it links,
/// the busybox layout, and junk a `none` build must clear first.
fn container_root(root: &Path) {
    for dir in ["kiln", "proc", "dev", "sys", "ctx", "out", "etc", "junk"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy(KILN, root.join("kiln/kiln")).unwrap();
    let ldd = run_ok(Command::new("ldd").arg(KILN));
    for lib in String::from_utf8(ldd.stdout)
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        run_ok(Command::new("cp").arg("-L").arg(lib).arg(&to));
    }
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(busybox_layout())
            .arg(root.join("kiln/base")),
    );
    std::fs::write(root.join("junk/file"), "junk").unwrap();
    std::fs::write(root.join("etc/leftover"), "junk").unwrap();
}

/// `kiln build` run chrooted in `root`, in mount and PID namespaces of its
/// own, with the context and output dirs bind-mounted as a runtime would.
fn build_in_container(root: &Path, ctx: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let script = format!(
        "mount --bind {ctx} {root}/ctx && mount --bind {out} {root}/out && mount --rbind /dev {root}/dev \
         && exec chroot {root} /kiln/kiln build --context /ctx --cache-dir /kiln/state --no-push \
         --reproducible --build-arg BASE=oci-layout:///kiln/base:latest --oci-layout-path /out/layout \"$@\"",
        ctx = ctx.display(),
        out = out.display(),
        root = root.display(),
    );
    Command::new("unshare")
        .args(["--mount", "--pid", "--fork"])
        .arg(format!("--mount-proc={}/proc", root.display()))
        .args(["sh", "-c", &script, "sh"])
        .args(extra)
        .env_remove("container")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

#[test]
fn none_mode_builds_over_the_containers_own_root_what_namespaces_builds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    container_root(&root);
    // Stages in turn: tool2 goes on in tool's root, the last one clears it.
    let dockerfile = "ARG BASE
FROM ${BASE} AS tool
RUN echo tool > /tool-out && mkdir /only-in-tool
FROM tool AS tool2
RUN echo more >> /tool-out
FROM ${BASE}
COPY --from=tool2 /tool-out /srv/tool-out
RUN mkdir -p /srv/a && echo hi > /srv/a/f && chown -R 1000:100 /srv && chmod 4755 /srv/a/f \\
 && ln /srv/a/f /srv/a/hard && ln -s f /srv/a/soft && rm /bin/ls && (sleep 1000 &)
RUN sleep 0.2; ps -o args | grep -c '^sleep 1000' > /sleepers || true
COPY --chown=1234:5678 file /srv/copied
USER 1000:100
RUN id > /tmp/id-seen
";
    let ctx = Context::new(dockerfile, &[("file", "copied\n")]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();

    // Refused outside a container, and without --force inside one.
    let refused = build_in_container(&root, ctx.path(), &out, &["--isolation", "none", "--force"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("refused outside a container"),
        "{}",
        stderr(&refused)
    );
    std::fs::write(root.join(".dockerenv"), "").unwrap();
    let refused = build_in_container(&root, ctx.path(), &out, &["--isolation", "none"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("add --force"),
        "{}",
        stderr(&refused)
    );
    assert!(
        root.join("junk/file").exists(),
        "a refused build touched the root"
    );

    let built = build_in_container(&root, ctx.path(), &out, &["--isolation", "none", "--force"]);
    assert!(built.status.success(), "{}", stderr(&built));
    assert!(stderr(&built).contains("RUN isolation: none"));
    // The build ran over the container's root, cleared of what was there.
    assert!(!root.join("junk").exists() && !root.join("etc/leftover").exists());
    assert!(!root.join("only-in-tool").exists());
    assert!(root.join("srv/copied").exists() && root.join("kiln/kiln").exists());

    // The same image as namespaces isolation builds, down to the digest.
    let reference = dir.path().join("reference");
    // (The none build cleared /kiln/base: it keeps only kiln itself.)
    let base = format!("BASE=oci-layout://{}:latest", busybox_layout().display());
    let ns = kiln_build(
        &ctx,
        &dir.path().join("state"),
        &[
            "--no-push",
            "--reproducible",
            "--build-arg",
            &base,
            "--oci-layout-path",
            reference.to_str().unwrap(),
        ],
    );
    assert!(ns.status.success(), "{}", stderr(&ns));
    let unpacked = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(&out.join("layout"), "latest", unpacked.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("sleepers")).unwrap(),
        "0\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/tool-out")).unwrap(),
        "tool\nmore\n"
    );
    assert!(!rootfs.join("junk").exists() && !rootfs.join("kiln").exists());
    let reference_out = tempfile::tempdir().unwrap();
    assert_eq!(
        tree(&umoci_unpack(&reference, "latest", reference_out.path())),
        tree(&rootfs)
    );
    assert_eq!(
        layout_digest(&reference),
        layout_digest(&out.join("layout"))
    );
}

#[test]
fn a_user_without_subordinate_ids_builds_without_run_and_fails_clearly_at_a_run() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    // nobody has no /etc/subuid range.
    let ws = user_workspace(65534, 65534);
    let ctx = ws.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::write(ctx.join("f"), "f\n").unwrap();
    std::fs::write(ctx.join("g"), "g\n").unwrap();
    let build = |dockerfile: &str, dest: &str| {
        std::fs::write(ctx.join("Dockerfile"), dockerfile.replace("{BASE}", &base)).unwrap();
        let mut cmd = as_user(65534, 65534, ws.path());
        cmd.arg(ws.path().join("kiln"))
            .args(["build", "--context"])
            .arg(&ctx)
            .arg("--cache-dir")
            .arg(ws.path().join("state"))
            .args(["--insecure", "--insecure-pull", "--destination"])
            .arg(registry.reference(dest));
        cmd.output().unwrap()
    };
    let out = build(NO_RUN_DOCKERFILE, "app/nonroot:1");
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("==> RUN isolation: none available (not root, and no user namespace: rootless isolation needs subordinate ids for user nobody"),
        "{log}"
    );
    assert_no_run_layers(&registry.reference("app/nonroot:1"));
    let config = skopeo_config(&registry.reference("app/nonroot:1"));
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["cat", "/app/f"])
    );

    // The state dir serves a second build: all cached, the same image.
    let again = build(NO_RUN_DOCKERFILE, "app/nonroot:2");
    let log = stderr(&again);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("0 run"), "{log}");
    assert_eq!(skopeo_config(&registry.reference("app/nonroot:2")), config);

    // A RUN that must run fails at its line, saying what would make it work.
    let with_run = NO_RUN_DOCKERFILE.replace(
        "WORKDIR /app/w\n",
        "WORKDIR /app/w\nRUN echo hi > /app/hi\n",
    );
    let failed = build(&with_run, "app/nonroot:3");
    let log = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{log}");
    for said in [
        "Dockerfile:5: RUN failed: this RUN must run, and no RUN isolation is available here",
        "subordinate ids",
        "newuidmap",
        "hostUsers: false",
        "as root in the container",
    ] {
        assert!(log.contains(said), "{said:?} not in {log}");
    }
    // Nothing it could not remove is left behind in the state dir.
    let builds = ws.path().join("state/builds");
    let left: Vec<_> = std::fs::read_dir(&builds)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // The user's own `kiln cache prune` needs no user namespace either.
    let mut prune = as_user(65534, 65534, ws.path());
    prune
        .arg(ws.path().join("kiln"))
        .args(["cache", "prune", "--cache-dir"])
        .arg(ws.path().join("state"));
    let out = prune.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The processes under a build seen from the host: the zygotes (its
/// children named `kiln-zygote`, forked, or run as `__kiln-run-zygote`),
/// the runners they forked, and any runner the build started of its own
/// (`__kiln-run-step`).
#[derive(Debug, Default, Clone, PartialEq)]
struct Runners {
    zygotes: Vec<u32>,
    /// Those of the zygotes that are `kiln` started afresh, not forked.
    spawned: Vec<u32>,
    forked: Vec<u32>,
    own: Vec<u32>,
}

fn runners_under(build: u32) -> Runners {
    let processes: Vec<(u32, u32, String, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command name in parentheses: state, then the parent.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, ppid, cmdline, comm))
        })
        .collect();
    let mut found = Runners::default();
    for (pid, ppid, cmdline, comm) in &processes {
        let zygote = comm.trim_end() == "kiln-zygote" || cmdline.contains(kiln_engine::ZYGOTE_ARG);
        if *ppid == build && zygote {
            found.zygotes.push(*pid);
            if cmdline.contains(kiln_engine::ZYGOTE_ARG) {
                found.spawned.push(*pid);
            }
        }
        if *ppid == build && cmdline.contains(kiln_engine::STEP_RUNNER_ARG) {
            found.own.push(*pid);
        }
    }
    found.forked = processes
        .iter()
        .filter(|(_, ppid, _, _)| found.zygotes.contains(ppid))
        .map(|(pid, _, _, _)| *pid)
        .collect();
    found
}

/// RUN steps are run by runners forked from one zygote the build forked
/// as it started (`exec/zygote.rs`), not by `kiln` started afresh for each
/// step, nor for the zygote: while each of two RUNs waits at a gate, the
/// process tree above it is read from the host. The zygote is gone when
/// the build is.
#[test]
fn run_steps_are_forked_by_one_zygote_the_build_started() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    let build = Arc::new(AtomicU32::new(0));
    let seen: Arc<Mutex<Vec<Runners>>> = Arc::default();
    let gate = gate({
        let (build, seen) = (build.clone(), seen.clone());
        move || {
            seen.lock()
                .unwrap()
                .push(runners_under(build.load(Ordering::SeqCst)));
            true
        }
    });
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(
        &format!(
            "FROM {base}\nRUN wget -q -O /one http://{gate}/\nRUN wget -q -O /two http://{gate}/\n"
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let child = kiln_build_cmd(&ctx, state.path(), &["--no-push"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    build.store(child.id(), Ordering::SeqCst);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for runners in &seen {
        assert_eq!(runners.zygotes.len(), 1, "{seen:?}");
        assert!(runners.spawned.is_empty(), "{seen:?}");
        assert_eq!(runners.forked.len(), 1, "{seen:?}");
        assert!(runners.own.is_empty(), "{seen:?}");
    }
    assert_eq!(seen[0].zygotes, seen[1].zygotes);
    assert_ne!(seen[0].forked, seen[1].forked);
    assert!(gone(seen[0].zygotes[0]));
}

/// Whether a process is gone, or a zombie nobody reaped (what an orphan
/// becomes under an init that does not reap).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A build killed with SIGKILL while a RUN runs takes its zygote and the
/// step's runner with it: the zygote is forked by Kiln's main thread, which
/// lives as long as Kiln does, and both die by their parent-death signals.
#[test]
fn a_killed_build_takes_its_zygote_and_runner_with_it() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    let build = Arc::new(AtomicU32::new(0));
    let seen: Arc<Mutex<Option<Runners>>> = Arc::default();
    let gate = gate({
        let (build, seen) = (build.clone(), seen.clone());
        move || {
            let pid = build.load(Ordering::SeqCst);
            *seen.lock().unwrap() = Some(runners_under(pid));
            let killed = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            assert!(killed.unwrap().success());
            // The step must not go on: it waits for an answer it never gets.
            std::thread::sleep(std::time::Duration::from_secs(30));
            true
        }
    });
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(
        &format!("FROM {base}\nRUN wget -q -O /one http://{gate}/\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let mut child = kiln_build_cmd(&ctx, state.path(), &["--no-push"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    build.store(child.id(), Ordering::SeqCst);
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let runners = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the RUN reached the gate");
    assert_eq!(runners.zygotes.len(), 1, "{runners:?}");
    assert_eq!(runners.forked.len(), 1, "{runners:?}");
    let all: Vec<u32> = runners
        .zygotes
        .iter()
        .chain(&runners.forked)
        .copied()
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !all.iter().all(|p| gone(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(all.iter().all(|p| gone(*p)), "still running: {all:?}");
}
