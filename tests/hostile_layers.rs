//! A standing corpus of hostile base images (issue 16). Each case is a
//! busybox layout with malicious layers on top, built with both
//! snapshotters, and checked two ways: the build fails naming why, or it
//! neutralizes the entry (a check run inside the image says where it
//! landed); and the host paths the case aims at, a victim dir planted with
//! marker files and the host's `/etc/passwd`, are exactly as they were.
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;

use support::layers::*;
use support::*;

const SNAPSHOTTERS: [&str; 2] = ["overlay", "walk"];

/// Enough `../` to climb out of any root the build may use, short enough
/// for a ustar name field with the victim's path after it.
fn ups() -> String {
    "../".repeat(12)
}

/// A directory of marker files on the host that the cases aim at, shaped
/// like what an attacker would want (`etc/passwd`, `app`, `tmp`...).
struct Victim {
    dir: tempfile::TempDir,
}

/// What a host path looked like: the tree's entries plus their times and
/// inodes, and the victim dir's own mode.
type Snapshot = BTreeMap<String, (TreeEntry, i64, i64, u64, u64)>;

impl Victim {
    fn plant() -> Victim {
        // Not under /tmp, which the cases make a symlink into the victim,
        // and short enough for a ustar name field.
        let dir = tempfile::Builder::new()
            .prefix("kiln-victim-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for (path, content) in [
            ("marker", "marker\n"),
            ("etc/passwd", "root:x:0:0:host:/root:/bin/sh\n"),
            ("etc/hosts", "127.0.0.1 host-only\n"),
            ("app/keep", "app\n"),
            ("tmp/keep", "tmp\n"),
            ("dev/keep", "dev\n"),
            ("proc/keep", "proc\n"),
        ] {
            let file = dir.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, content).unwrap();
        }
        Victim { dir }
    }

    /// Its absolute path, as entries name it.
    fn path(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn snapshot(&self) -> Snapshot {
        let mut out = Snapshot::new();
        let paths = [
            (String::new(), self.dir.path().to_path_buf()),
            ("host:/etc/passwd".into(), "/etc/passwd".into()),
        ];
        let entries = tree(self.dir.path())
            .into_iter()
            .map(|(rel, e)| (rel.clone(), self.dir.path().join(rel), Some(e)));
        let extra = paths.into_iter().map(|(rel, path)| (rel, path, None));
        for (rel, path, entry) in entries.chain(extra) {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let entry = entry.unwrap_or(TreeEntry {
                kind: 'd',
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                content: format!("{}", meta.size()),
                link_group: None,
            });
            out.insert(
                rel,
                (entry, meta.mtime(), meta.ctime(), meta.ino(), meta.nlink()),
            );
        }
        out
    }
}

/// What a case must come to.
enum Outcome {
    /// The build fails, its error saying this.
    Refused(String),
    /// The build succeeds, and this shell check passes inside the image
    /// (`$SNAPSHOTTER` says which snapshotter built it).
    Neutralized(String),
}
use Outcome::*;

/// Builds `steps` on `layout` with a fresh state dir, once per snapshotter,
/// and checks that it fails for `refusal` (or builds, for `None`) and that
/// the victim did not change.
fn check(name: &str, victim: &Victim, layout: &Path, steps: &str, refusal: Option<&str>) {
    for snapshotter in SNAPSHOTTERS {
        let before = victim.snapshot();
        let work = tempfile::tempdir().unwrap();
        let dockerfile = format!(
            "FROM oci-layout://{}:latest\nARG SNAPSHOTTER\n{steps}",
            layout.display()
        );
        let ctx = Context::new(&dockerfile, &[("f", "f\n")]);
        let secret = work.path().join("secret");
        std::fs::write(&secret, "s3cr3t").unwrap();
        let out = kiln_build(
            &ctx,
            &work.path().join("state"),
            &[
                "--no-push",
                "--snapshotter",
                snapshotter,
                "--secret",
                &format!("id=s,src={}", secret.display()),
                "--build-arg",
                &format!("SNAPSHOTTER={snapshotter}"),
            ],
        );
        let err = stderr(&out);
        let case = format!("{name} ({snapshotter})");
        assert!(!err.contains("panicked"), "{case}: {err}");
        match refusal {
            Some(reason) => {
                assert_eq!(out.status.code(), Some(1), "{case} must fail: {err}");
                let line = err.lines().find(|l| l.starts_with("error: "));
                assert!(
                    line.is_some_and(|l| l.contains(reason)),
                    "{case}: expected {reason:?} in:\n{err}"
                );
                eprintln!("{case}: refused: {}", line.unwrap());
            }
            None => {
                assert!(out.status.success(), "{case} must build: {err}");
                eprintln!("{case}: neutralized");
            }
        }
        assert_eq!(
            before,
            victim.snapshot(),
            "{case}: a host path the case aims at changed"
        );
    }
}

/// A case: `layers` over busybox, with a `RUN` of the neutralization check
/// (or `RUN true`).
fn case(name: &str, victim: &Victim, layers: &[Vec<Entry>], outcome: Outcome) {
    let layers: Vec<RawLayer> = layers.iter().map(|l| RawLayer::of(l)).collect();
    layer_case(name, victim, &layers, outcome);
}

fn layer_case(name: &str, victim: &Victim, layers: &[RawLayer], outcome: Outcome) {
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_layers(dir.path(), layers);
    match &outcome {
        Refused(reason) => check(name, victim, &layout, "RUN true\n", Some(reason)),
        Neutralized(inside) => check(name, victim, &layout, &format!("RUN {inside}\n"), None),
    }
}

/// A check that differs by snapshotter: the overlay snapshotter unpacks
/// each layer alone, so a name under a lower layer's symlink makes a
/// directory that hides the link (as Docker's overlay2 does), where the
/// walk snapshotter follows the link inside the image.
fn per_snapshotter(overlay: &str, walk: &str) -> String {
    format!("if [ \"$SNAPSHOTTER\" = overlay ]; then {overlay}; else {walk}; fi")
}

fn refused(reason: &str) -> Outcome {
    Refused(reason.into())
}

fn neutralized(check: &str) -> Outcome {
    Neutralized(check.into())
}

const ESCAPES: &str = "path escapes the root";
const LINK_ESCAPES: &str = "escapes the root";
const LINK_MISSING: &str = "does not exist in the root";

#[test]
fn names_that_climb_or_are_absolute() {
    let v = Victim::plant();
    let vp = v.path();
    let up = ups();
    case(
        "../ file",
        &v,
        &[vec![Entry::file(&format!("{up}{vp}/pwned"), b"x")]],
        refused(ESCAPES),
    );
    case(
        "../ dir",
        &v,
        &[vec![Entry::dir(&format!("{up}{vp}/newdir/"))]],
        refused(ESCAPES),
    );
    case(
        "../ inside a name",
        &v,
        &[vec![Entry::file(&format!("a/b/{up}{vp}/pwned"), b"x")]],
        refused(ESCAPES),
    );
    case(
        "absolute file",
        &v,
        &[vec![Entry::file(&format!("{vp}/pwned"), b"x")]],
        neutralized(&format!("test -f {vp}/pwned")),
    );
}

#[test]
fn symlinks_to_host_paths_then_files_through_them() {
    let v = Victim::plant();
    let vp = v.path();
    let up = ups();
    let through = format!("test -L /evil && test -f {vp}/pwned");
    case(
        "symlink then file, one layer",
        &v,
        &[vec![
            Entry::symlink("evil", &vp),
            Entry::file("evil/pwned", b"x"),
        ]],
        neutralized(&through),
    );
    case(
        "symlink then file, two layers",
        &v,
        &[
            vec![Entry::symlink("evil", &vp)],
            vec![Entry::file("evil/pwned", b"x")],
        ],
        neutralized(&per_snapshotter(
            &format!(
                "test -d /evil && ! test -L /evil && test -f /evil/pwned && ! test -e {vp}/pwned"
            ),
            &through,
        )),
    );
    case(
        "relative symlink climbing, then file",
        &v,
        &[vec![
            Entry::symlink("a/evil", &format!("{up}{vp}")),
            Entry::file("a/evil/pwned", b"x"),
        ]],
        neutralized(&format!("test -f {vp}/pwned")),
    );
    case(
        "symlink chain, then file",
        &v,
        &[
            vec![Entry::symlink("a", "b"), Entry::symlink("b", &vp)],
            vec![Entry::file("a/pwned", b"x")],
        ],
        neutralized(&per_snapshotter(
            "test -d /a && test -f /a/pwned",
            &format!("test -f {vp}/pwned"),
        )),
    );
    case(
        "symlink to host etc, then its passwd",
        &v,
        &[
            vec![Entry::symlink("etc-evil", &format!("{vp}/etc"))],
            vec![Entry::file("etc-evil/passwd", b"pwned\n")],
        ],
        neutralized(&per_snapshotter(
            "grep -qx pwned /etc-evil/passwd",
            &format!("grep -qx pwned {vp}/etc/passwd"),
        )),
    );
    case(
        "file over a symlink to a host file",
        &v,
        &[
            vec![Entry::symlink("evil", &format!("{vp}/etc/passwd"))],
            vec![Entry::file("evil", b"pwned\n")],
        ],
        neutralized("test -f /evil && ! test -L /evil && grep -qx pwned /evil"),
    );
    case(
        "directory over a symlink to a host dir",
        &v,
        &[
            vec![Entry::symlink("evil", &vp)],
            vec![Entry::dir("evil/").mode(0o777)],
        ],
        neutralized("test -d /evil && ! test -L /evil"),
    );
}

#[test]
fn hardlinks_to_host_files() {
    let v = Victim::plant();
    let vp = v.path();
    let up = ups();
    case(
        "hardlink to /etc/passwd",
        &v,
        &[vec![Entry::hardlink("pw", "/etc/passwd")]],
        // The image's own /etc/passwd (busybox has one).
        neutralized("cmp /pw /etc/passwd"),
    );
    case(
        "hardlink to a host-only file",
        &v,
        &[vec![Entry::hardlink("pw", &format!("{vp}/etc/passwd"))]],
        refused(LINK_MISSING),
    );
    case(
        "hardlink climbing to /etc/passwd",
        &v,
        &[vec![Entry::hardlink("pw", &format!("{up}etc/passwd"))]],
        refused(LINK_ESCAPES),
    );
    case(
        "hardlink through a symlink to a host dir",
        &v,
        &[
            vec![Entry::symlink("evil", &format!("{vp}/etc"))],
            vec![Entry::hardlink("pw", "evil/passwd")],
        ],
        refused(LINK_MISSING),
    );
}

#[test]
fn whiteouts_that_climb_or_go_through_symlinks() {
    let v = Victim::plant();
    let vp = v.path();
    let up = ups();
    case(
        "../ whiteout",
        &v,
        &[vec![Entry::file(&format!("{up}{vp}/.wh.marker"), b"")]],
        refused(ESCAPES),
    );
    case(
        "whiteout of ..",
        &v,
        &[vec![Entry::file("a/.wh..", b"")]],
        refused("invalid entry"),
    );
    let in_image = Entry::file(&format!("{vp}/marker"), b"in image\n");
    case(
        "absolute whiteout",
        &v,
        &[
            vec![in_image.clone()],
            vec![Entry::file(&format!("{vp}/.wh.marker"), b"")],
        ],
        neutralized(&format!("! test -e {vp}/marker")),
    );
    case(
        "whiteout through a symlink to a host dir",
        &v,
        &[
            vec![in_image.clone(), Entry::symlink("evil", &vp)],
            vec![Entry::file("evil/.wh.marker", b"")],
        ],
        neutralized(&per_snapshotter(
            &format!("test -d /evil && test -f {vp}/marker"),
            &format!("! test -e {vp}/marker"),
        )),
    );
    case(
        "opaque marker through a symlink to a host dir",
        &v,
        &[
            vec![in_image.clone(), Entry::symlink("evil", &vp)],
            vec![Entry::file("evil/.wh..wh..opq", b"")],
        ],
        neutralized(&per_snapshotter(
            &format!("test -d /evil && test -f {vp}/marker"),
            &format!("! test -e {vp}/marker"),
        )),
    );
}

#[test]
fn pax_and_gnu_names_override_the_header() {
    let v = Victim::plant();
    let vp = v.path();
    let up = ups();
    case(
        "PAX path climbing",
        &v,
        &[vec![
            Entry::pax(&[("path", &format!("{up}{vp}/pwned"))]),
            Entry::file("harmless", b"x"),
        ]],
        refused(ESCAPES),
    );
    case(
        "PAX path absolute",
        &v,
        &[vec![
            Entry::pax(&[("path", &format!("{vp}/pwned"))]),
            Entry::file("harmless", b"x"),
        ]],
        neutralized(&format!("test -f {vp}/pwned && ! test -e /harmless")),
    );
    case(
        "PAX linkpath of a symlink, then a file through it",
        &v,
        &[vec![
            Entry::pax(&[("linkpath", &vp)]),
            Entry::symlink("evil", "harmless"),
            Entry::file("evil/pwned", b"x"),
        ]],
        neutralized(&format!("test -f {vp}/pwned")),
    );
    case(
        "PAX linkpath of a hardlink climbing",
        &v,
        &[vec![
            Entry::pax(&[("linkpath", &format!("{up}etc/passwd"))]),
            Entry::hardlink("pw", "etc/group"),
        ]],
        refused(LINK_ESCAPES),
    );
    let long = "x".repeat(120);
    case(
        "GNU long name climbing",
        &v,
        &[vec![
            Entry::gnu_long_name(&format!("{up}{vp}/{long}")),
            Entry::file("harmless", b"x"),
        ]],
        refused(ESCAPES),
    );
    case(
        "GNU long link of a hardlink climbing",
        &v,
        &[vec![
            Entry::gnu_long_link(&format!("{up}{up}etc/passwd")),
            Entry::hardlink("pw", "etc/group"),
        ]],
        refused(LINK_ESCAPES),
    );
    case(
        "GNU long link of a symlink, then a file through it",
        &v,
        &[vec![
            Entry::gnu_long_link(&format!("{up}{up}{vp}")),
            Entry::symlink("evil", "harmless"),
            Entry::file("evil/pwned", b"x"),
        ]],
        neutralized(&format!("test -f {vp}/pwned")),
    );
}

#[test]
fn broken_streams_and_wrong_diff_ids() {
    let v = Victim::plant();
    let vp = v.path();
    // A file whose header promises 4 KiB, cut after 100 bytes: the gzip
    // stream itself is whole.
    let mut tar = tar_of(&[
        Entry::file(&format!("{vp}/first"), b"x"),
        Entry::file("big", &[b'x'; 4096]),
    ]);
    tar.truncate(3 * 512 + 100);
    layer_case(
        "truncated tar",
        &v,
        &[RawLayer::from_tar(&tar)],
        refused("reading layer tar stream"),
    );
    let mut cut = RawLayer::of(&[Entry::file("big", &[b'x'; 64 * 1024])]);
    cut.gz.truncate(cut.gz.len() / 2);
    layer_case(
        "truncated gzip",
        &v,
        &[cut],
        refused("incomplete deflate stream"),
    );

    let mut wrong = RawLayer::of(&[Entry::file(&format!("{vp}/pwned"), b"x")]);
    wrong.diff_id = sha256(b"another layer");
    layer_case(
        "wrong diff_id",
        &v,
        &[wrong],
        refused("diff_id mismatch: config says"),
    );
}

/// A base layer whose bytes are not what its digest says fails the build,
/// clearly, and is never stored: with the right bytes back, the same state
/// dir builds.
#[test]
fn a_tampered_blob_fails_the_build_and_stays_out_of_the_store() {
    let v = Victim::plant();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_layer(dir.path(), &[Entry::file("hello", b"hi\n")]);
    let (_, layer) = layout_top_layer(&layout);
    let good = std::fs::read(&layer).unwrap();
    let evil = RawLayer::of(&[Entry::file(&format!("{}/pwned", v.path()), b"x")]);
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nRUN cat /hello > /copy\n",
            layout.display()
        ),
        &[],
    );
    for snapshotter in SNAPSHOTTERS {
        let before = v.snapshot();
        let state = dir.path().join(format!("state-{snapshotter}"));
        let out_dir = dir.path().join(format!("out-{snapshotter}"));
        let args = [
            "--no-push",
            "--snapshotter",
            snapshotter,
            "--oci-layout-path",
            out_dir.to_str().unwrap(),
        ];
        std::fs::write(&layer, &evil.gz).unwrap();
        let out = kiln_build(&ctx, &state, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{snapshotter}: {err}");
        let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
        assert!(line.contains("digest mismatch"), "{snapshotter}: {err}");
        eprintln!("tampered blob ({snapshotter}): refused: {line}");
        assert_eq!(before, v.snapshot(), "{snapshotter}");

        std::fs::write(&layer, &good).unwrap();
        let out = kiln_build(&ctx, &state, &args);
        assert!(out.status.success(), "{snapshotter}: {}", stderr(&out));
        let rootfs = umoci_unpack(&out_dir, "latest", &dir.path().join(snapshotter));
        assert_eq!(
            std::fs::read_to_string(rootfs.join("copy")).unwrap(),
            "hi\n"
        );
    }
}

/// A base whose `/app`, `/tmp` and `/etc/hosts` are symlinks to host paths
/// that the image holds too: COPY, WORKDIR, RUN and every mount type go
/// through them to the image's own paths, and the host's stay as they were.
#[test]
fn symlinked_base_paths_lead_into_the_image() {
    let v = Victim::plant();
    let vp = v.path();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_layer(
        dir.path(),
        &[
            Entry::dir(&format!("{vp}/app/")),
            Entry::dir(&format!("{vp}/tmp/")).mode(0o1777),
            Entry::dir(&format!("{vp}/dev/")),
            Entry::dir(&format!("{vp}/proc/")),
            Entry::file(&format!("{vp}/etc/hosts"), b"127.0.0.1 image\n"),
            Entry::symlink("app", &format!("{vp}/app")),
            Entry::symlink("tmp", &format!("{vp}/tmp")),
            Entry::symlink("etc/hosts", &format!("{vp}/etc/hosts")),
        ],
    );
    let steps = format!(
        "COPY f /app/f
WORKDIR /app/w
RUN echo run > /app/run && echo t > /tmp/t && cat /etc/hosts > /app/hosts-seen
RUN --mount=type=bind,target=/app/b cp /app/b/f /app/bind-seen
RUN --mount=type=cache,target=/app/c sh -c 'echo c > /app/c/x'
RUN --mount=type=tmpfs,target=/tmp/tt sh -c 'echo t > /tmp/tt/x'
RUN --mount=type=secret,id=s,target=/app/s test -s /app/s
RUN cd {vp}/app && test -f f && test -d w && test -f run && test -f bind-seen && test -f {vp}/tmp/t
"
    );
    check(
        "symlinked /app, /tmp and /etc/hosts, in the image",
        &v,
        &layout,
        &steps,
        None,
    );
}

/// The same links to paths only the host has: each step that needs one
/// fails, naming the link, and writes nothing on the host. (`/etc/hosts`
/// has a base of its own: every RUN needs it.)
#[test]
fn symlinked_base_paths_to_host_only_paths_are_refused() {
    let v = Victim::plant();
    let vp = v.path();
    let dir = tempfile::tempdir().unwrap();
    let app_tmp = layout_with_layer(
        &dir.path().join("app-tmp"),
        &[
            Entry::symlink("app", &format!("{vp}/app")),
            Entry::symlink("tmp", &format!("{vp}/tmp")),
        ],
    );
    let hosts = layout_with_layer(
        &dir.path().join("hosts"),
        &[Entry::symlink("etc/hosts", &format!("{vp}/etc/hosts"))],
    );
    let missing = |path: &str| {
        format!("{path} is a symlink to {vp}{path}, which does not exist in the image")
    };
    let nonzero = "returned a non-zero code".to_string();
    let ssh = "RUN --mount=type=ssh is not supported yet".to_string();
    for (layout, step, reason) in [
        (
            &app_tmp,
            "COPY f /app/f",
            format!("COPY failed: {}", missing("/app")),
        ),
        (
            &app_tmp,
            "WORKDIR /app/w",
            format!("WORKDIR failed: {}", missing("/app")),
        ),
        (&app_tmp, "RUN echo x > /app/x", nonzero.clone()),
        (&app_tmp, "RUN echo x > /tmp/x", nonzero),
        (
            &hosts,
            "RUN true",
            format!("RUN failed: {}", missing("/etc/hosts")),
        ),
        (
            &app_tmp,
            "RUN --mount=type=bind,target=/app/b true",
            missing("/app"),
        ),
        (
            &app_tmp,
            "RUN --mount=type=cache,target=/app/c true",
            missing("/app"),
        ),
        (
            &app_tmp,
            "RUN --mount=type=tmpfs,target=/tmp/t true",
            missing("/tmp"),
        ),
        (
            &app_tmp,
            "RUN --mount=type=secret,id=s,target=/app/s true",
            missing("/app"),
        ),
        (&app_tmp, "RUN --mount=type=ssh,target=/app/ssh true", ssh),
    ] {
        check(step, &v, layout, &format!("{step}\n"), Some(&reason));
    }
}

/// A base whose `/dev` and `/proc` are symlinks to host paths, which the
/// image holds too (RUN runs, its mounts inside the image) or not (RUN is
/// refused, naming the link).
#[test]
fn symlinked_dev_and_proc() {
    let v = Victim::plant();
    let vp = v.path();
    for (name, inside) in [("in the image", true), ("host only", false)] {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = vec![
            Entry::symlink("dev", &format!("{vp}/dev")),
            Entry::symlink("proc", &format!("{vp}/proc")),
        ];
        if inside {
            entries.insert(0, Entry::dir(&format!("{vp}/dev/")));
            entries.insert(1, Entry::dir(&format!("{vp}/proc/")));
        }
        let layout = layout_with_layer(dir.path(), &entries);
        let refusal = (!inside)
            .then(|| format!("/proc is a symlink to {vp}/proc, which does not exist in the image"));
        check(
            &format!("symlinked /dev and /proc, {name}"),
            &v,
            &layout,
            "RUN test -c /dev/null && test -e /proc/self/status\n",
            refusal.as_deref(),
        );
    }
}

/// A layer of 2 GiB of zeros (about 9 MB of gzip): unpacking streams it,
/// so Kiln's peak RSS stays small. The tar is generated as it is
/// compressed, never held whole.
#[test]
fn a_gzip_bomb_unpacks_in_bounded_memory() {
    const SIZE: u64 = 2 << 30;
    let bomb = RawLayer::streamed(|w| {
        w.write_all(&Entry::file("zeros", b"").header(SIZE))
            .unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..SIZE / chunk.len() as u64 {
            w.write_all(&chunk).unwrap();
        }
        w.write_all(&[0u8; 1024]).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_layers(dir.path(), &[bomb]);
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nRUN test \"$(stat -c %s /zeros)\" = {SIZE}\n",
            layout.display()
        ),
        &[],
    );
    for snapshotter in SNAPSHOTTERS {
        let state = dir.path().join(format!("state-{snapshotter}"));
        let log = dir.path().join(format!("log-{snapshotter}"));
        let mut cmd = kiln_build_cmd(&ctx, &state, &["--no-push", "--snapshotter", snapshotter]);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let (status, max_rss_kb) = wait_with_rusage(child);
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{snapshotter}: {err}");
        eprintln!(
            "gzip bomb ({snapshotter}): peak RSS {} MB",
            max_rss_kb / 1024
        );
        assert!(
            max_rss_kb < 200 * 1024,
            "{snapshotter}: peak RSS {max_rss_kb} kB"
        );
        std::fs::remove_dir_all(&state).unwrap();
    }
}

/// Waits for `child` with wait4, for the peak RSS of it and the children
/// it waited for, in kB.
fn wait_with_rusage(child: std::process::Child) -> (std::process::ExitStatus, i64) {
    let mut status = 0;
    // SAFETY: a plain wait4 on our own child; the Child is not waited again.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    (std::process::ExitStatus::from_raw(status), usage.ru_maxrss)
}
