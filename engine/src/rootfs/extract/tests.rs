use super::*;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use tar::{Builder, Header};

const MTIME: u64 = 1_600_000_000;

/// Builds a layer tar in memory. Names and link names are written raw
/// into the header, so tests can produce what a hostile tool would.
struct Layer(Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(Builder::new(Vec::new()))
    }

    fn entry(
        &mut self,
        kind: EntryType,
        name: &str,
        link: &str,
        mode: u32,
        data: &[u8],
        tweak: impl FnOnce(&mut Header),
    ) -> &mut Self {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        tweak(&mut h);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(EntryType::Directory, name, "", 0o755, b"", |_| {})
    }

    fn file(&mut self, name: &str, data: &str) -> &mut Self {
        self.entry(EntryType::Regular, name, "", 0o644, data.as_bytes(), |_| {})
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Symlink, name, target, 0o777, b"", |_| {})
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(EntryType::Link, name, target, 0o644, b"", |_| {})
    }

    fn bytes(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

fn owner(uid: u64, gid: u64) -> impl FnOnce(&mut Header) {
    move |h| {
        h.set_uid(uid);
        h.set_gid(gid);
    }
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path).unwrap()
}

fn lmeta(path: impl AsRef<Path>) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap()
}

fn exists(path: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(path).is_ok()
}

#[test]
fn unpacks_every_entry_type_with_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // security.capability v2 granting cap_net_raw (bit 13), as ping has.
    let mut cap = [0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
    let long = format!(
        "long/{}/{}/{}",
        "a".repeat(100),
        "b".repeat(100),
        "c".repeat(80)
    );
    let pax_long = format!("pax/{}/{}", "d".repeat(150), "e".repeat(150));
    let unicode = "dir/ünïcødé-文件.txt";

    let mut layer = Layer::new();
    layer
        .entry(EntryType::Directory, "./", "", 0o700, b"", |_| {})
        .entry(EntryType::Directory, "dir/", "", 0o750, b"", |h| {
            h.set_uid(1000);
            h.set_gid(1000);
            h.set_mtime(1_500_000_000);
        })
        .entry(
            EntryType::Regular,
            "dir/file",
            "",
            0o644,
            b"hello",
            owner(1000, 1000),
        )
        .entry(
            EntryType::Regular,
            "dir/suid",
            "",
            0o4755,
            b"#!",
            owner(1000, 1000),
        )
        .entry(
            EntryType::Regular,
            "dir/sgid",
            "",
            0o2755,
            b"",
            owner(0, 1000),
        )
        .entry(EntryType::Regular, "dir/secret", "", 0o000, b"s", |_| {})
        .entry(EntryType::Directory, "tmp/", "", 0o1777, b"", |_| {})
        .entry(
            EntryType::Symlink,
            "dir/link",
            "file",
            0o777,
            b"",
            owner(1000, 1000),
        )
        .symlink("dir/abs", "/etc/shadow")
        .hardlink("dir/hard", "dir/file")
        .hardlink("./dir/hard2", "/dir/file")
        .entry(EntryType::Fifo, "dir/fifo", "", 0o640, b"", |_| {})
        .entry(EntryType::Char, "dev/null", "", 0o666, b"", |h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        })
        .entry(EntryType::Block, "dev/loop0", "", 0o660, b"", |h| {
            h.set_device_major(7).unwrap();
            h.set_device_minor(0).unwrap();
        });
    layer
        .0
        .append_pax_extensions([
            ("SCHILY.xattr.user.kiln", &b"yes"[..]),
            ("SCHILY.xattr.security.capability", &cap[..]),
            ("mtime", &b"1600000000.25"[..]),
        ])
        .unwrap();
    layer.entry(EntryType::Regular, "dir/ping", "", 0o755, b"ELF", |_| {});
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(4);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    layer.0.append_data(&mut h, &long, &b"long"[..]).unwrap();
    layer
        .0
        .append_pax_extensions([("path", pax_long.as_bytes())])
        .unwrap();
    layer
        .file("pax-placeholder", "pax")
        .file(unicode, "unicode");
    let bytes = layer.bytes();

    fs::set_permissions(root, fs::Permissions::from_mode(0o751)).unwrap();
    let stats = extract_layer(root, &bytes[..]).unwrap();
    assert_eq!(
        stats,
        ExtractStats {
            entries: 17,
            bytes: 5 + 2 + 1 + 3 + 4 + 3 + 7,
            whiteouts: 0,
            copied: 0
        }
    );

    let dir = lmeta(root.join("dir"));
    assert!(dir.is_dir());
    assert_eq!(
        (dir.mode() & 0o7777, dir.uid(), dir.gid()),
        (0o750, 1000, 1000)
    );
    // Set after its children were written.
    assert_eq!(dir.mtime(), 1_500_000_000);

    let file = lmeta(root.join("dir/file"));
    assert_eq!(read(root.join("dir/file")), "hello");
    assert_eq!(
        (file.mode() & 0o7777, file.uid(), file.gid()),
        (0o644, 1000, 1000)
    );
    assert_eq!(file.mtime(), MTIME as i64);
    assert_eq!(file.nlink(), 3);

    let suid = lmeta(root.join("dir/suid"));
    assert_eq!(
        (suid.mode() & 0o7777, suid.uid(), suid.gid()),
        (0o4755, 1000, 1000)
    );
    let sgid = lmeta(root.join("dir/sgid"));
    assert_eq!((sgid.mode() & 0o7777, sgid.gid()), (0o2755, 1000));
    assert_eq!(lmeta(root.join("dir/secret")).mode() & 0o7777, 0);
    assert_eq!(lmeta(root.join("tmp")).mode() & 0o7777, 0o1777);

    let link = lmeta(root.join("dir/link"));
    assert!(link.file_type().is_symlink());
    assert_eq!((link.uid(), link.gid()), (1000, 1000));
    assert_eq!(link.mtime(), MTIME as i64);
    assert_eq!(
        fs::read_link(root.join("dir/link")).unwrap(),
        Path::new("file")
    );
    assert_eq!(
        fs::read_link(root.join("dir/abs")).unwrap(),
        Path::new("/etc/shadow")
    );

    for hard in ["dir/hard", "dir/hard2"] {
        assert_eq!(lmeta(root.join(hard)).ino(), file.ino());
    }

    let fifo = lmeta(root.join("dir/fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o640);

    let null = lmeta(root.join("dev/null"));
    assert!(null.file_type().is_char_device());
    assert_eq!(null.mode() & 0o7777, 0o666);
    assert_eq!(
        (
            rustix::fs::major(null.rdev()),
            rustix::fs::minor(null.rdev())
        ),
        (1, 3)
    );
    let lp = lmeta(root.join("dev/loop0"));
    assert!(lp.file_type().is_block_device());
    assert_eq!(
        (rustix::fs::major(lp.rdev()), rustix::fs::minor(lp.rdev())),
        (7, 0)
    );
    // Created as a missing parent.
    let dev = lmeta(root.join("dev"));
    assert_eq!((dev.mode() & 0o7777, dev.uid(), dev.gid()), (0o755, 0, 0));

    let ping = root.join("dir/ping");
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&ping, "user.kiln", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"yes");
    let n = rustix::fs::getxattr(&ping, "security.capability", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], &cap[..]);
    let ping = lmeta(&ping);
    assert_eq!(
        (ping.mtime(), ping.mtime_nsec()),
        (MTIME as i64, 250_000_000)
    );

    assert_eq!(read(root.join(&long)), "long");
    assert_eq!(read(root.join(&pax_long)), "pax");
    assert!(!exists(root.join("pax-placeholder")));
    assert_eq!(read(root.join(unicode)), "unicode");
    // The root entry (mode 0700) is skipped: the root keeps its own.
    assert_eq!(lmeta(root).mode() & 0o7777, 0o751);
}

#[test]
fn applies_whiteouts_and_replacements_over_a_lower_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let lower = Layer::new()
        .file("gone.txt", "x")
        .dir("gonedir/")
        .dir("gonedir/sub/")
        .file("gonedir/sub/x", "x")
        .symlink("gonedir/out", "/")
        .file("opq1/old1", "old")
        .file("opq1/keepname", "old")
        .file("opq1/olddir/y", "old")
        .file("opq2/old2", "old")
        .file("opq2/sub/deep", "old")
        .file("opq3/sub/lower", "old")
        .file("opq3/lowerfile", "old")
        .file("d2f/child", "x")
        .file("f2d", "file")
        .file("kept.txt", "kept")
        .bytes();
    extract_layer(root, &lower[..]).unwrap();

    let upper = Layer::new()
        .file(".wh.gone.txt", "")
        .file(".wh.gonedir", "")
        .file(".wh.nothing", "")
        .file("nodir/.wh.nothing", "")
        // Same-layer entries before the opaque marker are kept...
        .file("opq1/keepname", "new")
        .dir("opq3/sub/")
        .file("opq1/.wh..wh..opq", "")
        .file("opq3/.wh..wh..opq", "")
        // ...and so are those after it.
        .file("opq1/olddir/new", "new")
        .file("opq2/.wh..wh..opq", "")
        .file("opq2/new_after", "new")
        // A whiteout only hides lower layers, not its own layer.
        .file("both", "mine")
        .file(".wh.both", "")
        .file("d2f", "now a file")
        .dir("f2d/")
        .file("f2d/inner", "inner")
        .bytes();
    let stats = extract_layer(root, &upper[..]).unwrap();
    assert_eq!(stats.whiteouts, 8);
    assert_eq!(stats.entries, 8);

    let names = |dir: &str| {
        let mut names: Vec<String> = fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert!(!exists(root.join("gone.txt")));
    assert!(!exists(root.join("gonedir")));
    assert!(!exists(root.join("nodir")));
    assert!(!exists(root.join("nothing")));
    assert_eq!(names("opq1"), ["keepname", "olddir"]);
    assert_eq!(read(root.join("opq1/keepname")), "new");
    assert_eq!(names("opq1/olddir"), ["new"]);
    assert_eq!(names("opq2"), ["new_after"]);
    assert_eq!(names("opq3"), ["sub"]);
    assert!(names("opq3/sub").is_empty());
    assert_eq!(read(root.join("both")), "mine");
    assert!(lmeta(root.join("d2f")).is_file());
    assert_eq!(read(root.join("d2f")), "now a file");
    assert!(lmeta(root.join("f2d")).is_dir());
    assert_eq!(read(root.join("f2d/inner")), "inner");
    assert_eq!(read(root.join("kept.txt")), "kept");
    assert!(!root.join(".wh.gone.txt").exists());
    assert!(!root.join("opq1/.wh..wh..opq").exists());
}

/// A root inside a temp dir with sentinels beside it, to prove that
/// nothing outside the root is touched.
struct Sandbox {
    tmp: tempfile::TempDir,
    root: PathBuf,
    /// Unique per test, for names that could land on the host.
    tag: String,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(tmp.path().join("sentinel"), "sentinel").unwrap();
        fs::create_dir(tmp.path().join("sentineldir")).unwrap();
        fs::write(tmp.path().join("sentineldir/keep"), "keep").unwrap();
        let tag = tmp
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Sandbox { tmp, root, tag }
    }

    /// Everything beside the root, with contents and link counts.
    fn outside(&self) -> Vec<String> {
        fn walk(dir: &Path, skip: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path == skip {
                    continue;
                }
                let m = lmeta(&path);
                let what = if m.is_dir() {
                    walk(&path, skip, out);
                    "dir".to_owned()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", fs::read_link(&path).unwrap().display())
                } else {
                    read(&path)
                };
                out.push(format!(
                    "{} {:o} {} {what}",
                    path.display(),
                    m.mode(),
                    m.nlink()
                ));
            }
        }
        let mut out = Vec::new();
        walk(self.tmp.path(), &self.root, &mut out);
        out.sort();
        out
    }

    /// Extracts the layers in order, checking after each that nothing
    /// beside the root or at host paths named `*{tag}` changed.
    fn extract(&self, layers: &[Vec<u8>]) -> Vec<Result<ExtractStats, ExtractError>> {
        let before = self.outside();
        let passwd = lmeta("/etc/passwd");
        layers
            .iter()
            .map(|layer| {
                let result = extract_layer(&self.root, &layer[..]);
                assert_eq!(self.outside(), before);
                for dir in ["/", "/tmp", "/etc"] {
                    for e in fs::read_dir(dir).unwrap() {
                        let path = e.unwrap().path();
                        let name = path.file_name().unwrap().to_string_lossy();
                        assert!(
                            path == self.tmp.path() || !name.contains(&self.tag),
                            "{}",
                            path.display()
                        );
                    }
                }
                let now = lmeta("/etc/passwd");
                assert_eq!((now.ino(), now.nlink()), (passwd.ino(), passwd.nlink()));
                result
            })
            .collect()
    }
}

#[test]
fn a_layer_alone_keeps_whiteouts_in_overlayfs_format() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut layer = Layer::new();
    layer
        .dir("etc/")
        .file("etc/.wh.gone", "")
        .file("mine", "mine")
        .file(".wh.mine", "")
        .file("opq/.wh..wh..opq", "")
        .file("opq/kept", "kept");
    // An xattr that would steer overlayfs is never applied.
    layer
        .0
        .append_pax_extensions([("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..])])
        .unwrap();
    layer.file("steered", "x");
    let stats = extract_layer_dir(dir, &layer.bytes()[..], Lowers::Dirs(&[])).unwrap();
    assert_eq!(stats.whiteouts, 3);
    let gone = lmeta(dir.join("etc/gone"));
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert_eq!(read(dir.join("mine")), "mine", "a layer's own entry wins");
    let mut opaque = [0u8; 4];
    assert_eq!(
        rustix::fs::lgetxattr(dir.join("opq"), OVERLAY_OPAQUE, &mut opaque).unwrap(),
        1
    );
    assert_eq!(read(dir.join("opq/kept")), "kept");
    let mut value = [0u8; 16];
    assert!(
        rustix::fs::lgetxattr(dir.join("steered"), "trusted.overlay.redirect", &mut value).is_err()
    );
}

#[test]
fn refuses_dot_dot_escapes() {
    let sb = Sandbox::new();
    let t = &sb.tag;
    let results = sb.extract(&[
        Layer::new().file(&format!("../escape-{t}"), "x").bytes(),
        Layer::new()
            .file(&format!("../../../../../../../tmp/escape-{t}"), "x")
            .bytes(),
        Layer::new().file(&format!("a/../../b-{t}"), "x").bytes(),
        Layer::new().file("../.wh.sentinel", "").bytes(),
        Layer::new().file("../sentineldir/.wh..wh..opq", "").bytes(),
        Layer::new().dir("../sentineldir/").bytes(),
    ]);
    for r in results {
        assert!(
            matches!(r, Err(ExtractError::PathOutsideRoot { .. })),
            "{r:?}"
        );
    }
    assert_eq!(fs::read_dir(&sb.root).unwrap().count(), 0);
}

#[test]
fn kept_paths_survive_entries_and_whiteouts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fs::create_dir_all(root.join("kiln/state")).unwrap();
    fs::write(root.join("kiln/state/db"), "db").unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/hosts"), "mounted").unwrap();
    fs::write(root.join("etc/old"), "old").unwrap();
    let keep = ["kiln/state", "etc/hosts"].map(PathBuf::from);
    let layer = Layer::new()
        .file("kiln/state/db", "overwritten")
        .file("etc/hosts", "image's")
        .file("etc/passwd", "root:x:0:0::/:/bin/sh")
        // A file where a directory leads to a kept path.
        .file("kiln", "not a dir")
        .bytes();
    extract_layer_keeping(root, &layer[..], &keep).unwrap();
    let whiteouts = Layer::new()
        .file("etc/.wh..wh..opq", "")
        .file("kiln/.wh.state", "")
        .bytes();
    extract_layer_keeping(root, &whiteouts[..], &keep).unwrap();
    assert_eq!(read(root.join("kiln/state/db")), "db");
    assert_eq!(read(root.join("etc/hosts")), "mounted");
    assert!(!exists(root.join("etc/old")));
    assert!(!exists(root.join("etc/passwd")));
}

#[test]
fn absolute_and_harmless_dot_dot_paths_land_inside() {
    let sb = Sandbox::new();
    let t = &sb.tag;
    let results = sb.extract(&[Layer::new()
        .file(&format!("/abs-{t}"), "abs")
        .file(&format!("/x/../rel-{t}"), "rel")
        .bytes()]);
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
    assert_eq!(read(sb.root.join(format!("abs-{t}"))), "abs");
    assert_eq!(read(sb.root.join(format!("rel-{t}"))), "rel");
}

#[test]
fn symlinked_parents_stay_inside_the_root() {
    let sb = Sandbox::new();
    let t = &sb.tag;
    let host_dir = sb.tmp.path().join("sentineldir");
    let results = sb.extract(&[
        Layer::new()
            .symlink("evil", "/")
            .symlink("up", "../../..")
            .symlink("hostdir", host_dir.to_str().unwrap())
            .symlink("dangling", &format!("/nonexistent-{t}/sub"))
            .bytes(),
        Layer::new()
            .file(&format!("evil/pwned-{t}"), "1")
            .file(&format!("up/pwned2-{t}"), "2")
            .file(&format!("evil/tmp/pwned3-{t}"), "3")
            .file("hostdir/keep", "pwned")
            .file("dangling/file", "made inside")
            .bytes(),
        Layer::new()
            .file("up/.wh.sentinel", "")
            .file("evil/.wh.sentinel", "")
            .file("hostdir/.wh.keep", "")
            .file("up/sentineldir/.wh..wh..opq", "")
            .bytes(),
    ]);
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
    let root = &sb.root;
    assert_eq!(read(root.join(format!("pwned-{t}"))), "1");
    assert_eq!(read(root.join(format!("pwned2-{t}"))), "2");
    assert_eq!(read(root.join(format!("tmp/pwned3-{t}"))), "3");
    // The whiteout removed the in-root copy of the host path.
    assert!(lmeta(root.join(host_dir.strip_prefix("/").unwrap())).is_dir());
    assert!(!exists(
        root.join(host_dir.strip_prefix("/").unwrap()).join("keep")
    ));
    assert_eq!(
        read(root.join(format!("nonexistent-{t}/sub/file"))),
        "made inside"
    );
    assert!(fs::symlink_metadata(root.join("evil"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn final_symlinks_are_replaced_not_followed() {
    let sb = Sandbox::new();
    let sentinel = sb.tmp.path().join("sentinel");
    let host_dir = sb.tmp.path().join("sentineldir");
    let results = sb.extract(&[
        Layer::new()
            .symlink("file", sentinel.to_str().unwrap())
            .symlink("rel", "../sentinel")
            .symlink("dir", host_dir.to_str().unwrap())
            .symlink("fifo", sentinel.to_str().unwrap())
            .symlink("link", "../sentinel")
            .file("target", "t")
            .dir("tree/")
            .symlink("tree/out", host_dir.to_str().unwrap())
            .symlink("tree/up", "../../..")
            .dir("tree/sub/")
            .symlink("tree/sub/outfile", sentinel.to_str().unwrap())
            .dir("opq/")
            .symlink("opq/out", host_dir.to_str().unwrap())
            .symlink("opq/up", "../..")
            .dir("wh/")
            .symlink("wh/out", host_dir.to_str().unwrap())
            .bytes(),
        Layer::new()
            .file("file", "replaced")
            .file("rel", "replaced")
            .dir("dir/")
            .entry(EntryType::Fifo, "fifo", "", 0o644, b"", |_| {})
            .hardlink("link", "target")
            // Removing directories never follows the links in them.
            .file("tree", "now a file")
            .file("opq/.wh..wh..opq", "")
            .file(".wh.wh", "")
            .bytes(),
    ]);
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
    let root = &sb.root;
    assert_eq!(read(root.join("file")), "replaced");
    assert_eq!(read(root.join("rel")), "replaced");
    assert!(lmeta(root.join("dir")).is_dir());
    assert!(lmeta(root.join("fifo")).file_type().is_fifo());
    assert_eq!(
        lmeta(root.join("link")).ino(),
        lmeta(root.join("target")).ino()
    );
    assert_eq!(read(root.join("tree")), "now a file");
    assert_eq!(fs::read_dir(root.join("opq")).unwrap().count(), 0);
    assert!(!exists(root.join("wh")));
}

#[test]
fn hardlinks_never_reach_host_files() {
    let sb = Sandbox::new();
    let sentinel = sb.tmp.path().join("sentinel");
    let results = sb.extract(&[
        Layer::new()
            .symlink("evil", "/")
            .symlink("up", "../../..")
            .bytes(),
        Layer::new().hardlink("passwd", "/etc/passwd").bytes(),
        Layer::new().hardlink("passwd2", "evil/etc/passwd").bytes(),
        Layer::new().hardlink("passwd3", "up/etc/passwd").bytes(),
        Layer::new()
            .hardlink("s", sentinel.to_str().unwrap())
            .bytes(),
        Layer::new().hardlink("s2", "up/sentinel").bytes(),
        Layer::new().hardlink("s3", "../sentinel").bytes(),
        Layer::new().hardlink("s4", "evil/../../sentinel").bytes(),
    ]);
    let mut results = results.into_iter();
    results.next().unwrap().unwrap();
    for r in results.by_ref().take(5) {
        assert!(
            matches!(r, Err(ExtractError::HardlinkTargetMissing { .. })),
            "{r:?}"
        );
    }
    for r in results {
        let err = r.unwrap_err();
        assert!(
            matches!(err, ExtractError::HardlinkOutsideRoot { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("escapes the root"), "{err}");
    }
    for name in ["passwd", "passwd2", "passwd3", "s", "s2", "s3", "s4"] {
        assert!(!exists(sb.root.join(name)), "{name}");
    }
}

#[test]
fn invalid_whiteouts_and_loops_are_errors() {
    let sb = Sandbox::new();
    let results = sb.extract(&[
        Layer::new().file("dir/.wh..", "").bytes(),
        Layer::new().file(".wh...", "").bytes(),
        Layer::new()
            .symlink("a", "b")
            .symlink("b", "a")
            .file("a/x", "x")
            .bytes(),
        Layer::new().file("f", "").file("f/g", "").bytes(),
    ]);
    let mut results = results.into_iter();
    for _ in 0..2 {
        let r = results.next().unwrap();
        assert!(matches!(r, Err(ExtractError::InvalidEntry { .. })), "{r:?}");
    }
    let err = results.next().unwrap().unwrap_err();
    assert!(
        matches!(&err, ExtractError::Io { path, source }
            if path == Path::new("a/x") && source.raw_os_error() == Some(Errno::LOOP.raw_os_error())),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("a/x: "), "{err}");
    let err = results.next().unwrap().unwrap_err();
    assert!(
        matches!(&err, ExtractError::Io { source, .. }
            if source.raw_os_error() == Some(Errno::NOTDIR.raw_os_error())),
        "{err:?}"
    );
}

#[test]
fn truncated_stream_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = Layer::new().file("f", &"x".repeat(2000)).bytes();
    assert!(extract_layer(tmp.path(), &bytes[..1024]).is_err());
    assert!(matches!(
        extract_layer(&tmp.path().join("missing"), &bytes[..]),
        Err(ExtractError::Io { .. })
    ));
}

#[test]
fn debian_style_absolute_symlinks_resolve_inside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = Layer::new()
        .dir("run/")
        .dir("run/lock/")
        .dir("var/")
        .symlink("var/run", "/run")
        .symlink("var/lock", "../run/lock")
        .symlink("lib", "usr/lib")
        .bytes();
    extract_layer(root, &base[..]).unwrap();
    let layer = Layer::new()
        .file("var/run/lock/x", "x")
        .file("var/lock/y", "y")
        .file("var/run/newdir/z", "z")
        .file("lib/pkg/libfoo.so", "so")
        .bytes();
    extract_layer(root, &layer[..]).unwrap();
    assert_eq!(read(root.join("run/lock/x")), "x");
    assert_eq!(read(root.join("run/lock/y")), "y");
    assert_eq!(read(root.join("run/newdir/z")), "z");
    assert_eq!(lmeta(root.join("run/newdir")).mode() & 0o7777, 0o755);
    assert_eq!(read(root.join("usr/lib/pkg/libfoo.so")), "so");
    for link in ["var/run", "var/lock", "lib"] {
        assert!(lmeta(root.join(link)).file_type().is_symlink(), "{link}");
    }
}

#[test]
fn parses_pax_times() {
    let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
    assert_eq!(t("12"), Some((12, 0)));
    assert_eq!(t("12.5"), Some((12, 500_000_000)));
    assert_eq!(t("12.1234567891"), Some((12, 123_456_789)));
    assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
    assert_eq!(t("-3"), Some((-3, 0)));
    assert_eq!(t(""), None);
    assert_eq!(t("1.x"), None);
    assert_eq!(t("+1"), None);
}

/// Layer directories unpacked alone, each over the ones before it, as the
/// overlay snapshotter makes them.
struct Stack {
    tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
}

impl Stack {
    fn new() -> Stack {
        Stack {
            tmp: tempfile::tempdir().unwrap(),
            dirs: Vec::new(),
        }
    }

    /// Unpacks the next layer over the stack; on success it joins it.
    fn push(&mut self, layer: Vec<u8>) -> Result<ExtractStats, ExtractError> {
        let dir = self.tmp.path().join(format!("layer{}", self.dirs.len()));
        fs::create_dir(&dir).unwrap();
        let result = extract_layer_dir(&dir, &layer[..], Lowers::Dirs(&self.dirs));
        match result {
            Ok(_) => self.dirs.push(dir),
            Err(_) => fs::remove_dir_all(&dir).unwrap(),
        }
        result
    }

    fn top(&self) -> &Path {
        self.dirs.last().unwrap()
    }
}

fn passwd_layer() -> Vec<u8> {
    Layer::new()
        .dir("etc/")
        .entry(
            EntryType::Regular,
            "etc/passwd",
            "",
            0o640,
            b"root:x:0:0",
            owner(0, 42),
        )
        .bytes()
}

#[test]
fn a_hard_link_into_a_lower_layer_is_a_copy_of_its_target() {
    let mut stack = Stack::new();
    stack.push(passwd_layer()).unwrap();
    let link = Layer::new().hardlink("etc/passwd2", "etc/passwd").bytes();

    // Alone, the layer says it needs the layers below, and leaves nothing.
    let alone = stack.tmp.path().join("alone");
    fs::create_dir(&alone).unwrap();
    let r = extract_layer_dir(&alone, &link[..], Lowers::Unknown);
    assert!(
        matches!(r, Err(ExtractError::NeedsLowerLayers { .. })),
        "{r:?}"
    );

    let stats = stack.push(link.clone()).unwrap();
    assert_eq!((stats.entries, stats.copied, stats.bytes), (1, 1, 10));
    let (lower, copy) = (
        lmeta(stack.dirs[0].join("etc/passwd")),
        lmeta(stack.top().join("etc/passwd2")),
    );
    assert_eq!(read(stack.top().join("etc/passwd2")), "root:x:0:0");
    assert!(copy.is_file());
    assert_eq!(
        (copy.mode() & 0o7777, copy.uid(), copy.gid(), copy.mtime()),
        (
            lower.mode() & 0o7777,
            lower.uid(),
            lower.gid(),
            lower.mtime()
        )
    );
    // A copy: the shared lower directory is left as it was.
    assert_ne!(copy.ino(), lower.ino());
    assert_eq!(lower.nlink(), 1);
    assert!(!exists(stack.top().join("etc/passwd")));

    // The walk snapshotter's root gets the same file, as a link.
    let root = stack.tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    extract_layer(&root, &passwd_layer()[..]).unwrap();
    extract_layer(&root, &link[..]).unwrap();
    let walked = lmeta(root.join("etc/passwd2"));
    assert_eq!(read(root.join("etc/passwd2")), "root:x:0:0");
    assert_eq!(
        (walked.mode() & 0o7777, walked.uid(), walked.gid()),
        (copy.mode() & 0o7777, copy.uid(), copy.gid())
    );
}

#[test]
fn a_hard_link_within_its_layer_stays_a_link_and_wins_over_lower_layers() {
    let mut stack = Stack::new();
    stack.push(Layer::new().file("f", "lower").bytes()).unwrap();
    let stats = stack
        .push(Layer::new().file("f", "upper").hardlink("g", "f").bytes())
        .unwrap();
    assert_eq!(stats.copied, 0);
    let top = stack.top();
    assert_eq!(read(top.join("g")), "upper");
    assert_eq!(lmeta(top.join("g")).ino(), lmeta(top.join("f")).ino());
}

#[test]
fn the_top_most_lower_layer_with_the_target_is_copied() {
    let mut stack = Stack::new();
    stack.push(Layer::new().file("f", "old").bytes()).unwrap();
    stack.push(Layer::new().file("f", "new").bytes()).unwrap();
    stack.push(Layer::new().file("other", "x").bytes()).unwrap();
    stack.push(Layer::new().hardlink("g", "f").bytes()).unwrap();
    assert_eq!(read(stack.top().join("g")), "new");
}

#[test]
fn whiteouts_and_opaque_dirs_above_hide_a_lower_target() {
    let hidden = |layers: Vec<Vec<u8>>, link: Vec<u8>| {
        let mut stack = Stack::new();
        for layer in layers {
            stack.push(layer).unwrap();
        }
        let r = stack.push(link);
        assert!(
            matches!(r, Err(ExtractError::HardlinkTargetMissing { .. })),
            "{r:?}"
        );
    };
    let link = || Layer::new().hardlink("etc/passwd2", "etc/passwd").bytes();
    // Whited out by a layer in between.
    hidden(
        vec![
            passwd_layer(),
            Layer::new().file("etc/.wh.passwd", "").bytes(),
        ],
        link(),
    );
    // Its directory whited out.
    hidden(
        vec![passwd_layer(), Layer::new().file(".wh.etc", "").bytes()],
        link(),
    );
    // Its directory made opaque.
    hidden(
        vec![
            passwd_layer(),
            Layer::new()
                .file("etc/.wh..wh..opq", "")
                .file("etc/group", "g")
                .bytes(),
        ],
        link(),
    );
    // Its directory replaced by a file.
    hidden(
        vec![passwd_layer(), Layer::new().file("etc", "a file").bytes()],
        link(),
    );
    // Whited out by the linking layer itself, before the link.
    hidden(
        vec![passwd_layer()],
        Layer::new()
            .file("etc/.wh.passwd", "")
            .hardlink("etc/passwd2", "etc/passwd")
            .bytes(),
    );
}

#[test]
fn lower_targets_are_found_through_symlinks_of_other_layers_inside_the_stack() {
    let mut stack = Stack::new();
    stack
        .push(Layer::new().file("usr/lib/f", "lib").bytes())
        .unwrap();
    stack
        .push(
            Layer::new()
                .symlink("lib", "/usr/lib")
                .symlink("rel", "usr/../usr/lib")
                .bytes(),
        )
        .unwrap();
    stack
        .push(
            Layer::new()
                .hardlink("a", "lib/f")
                .hardlink("b", "rel/f")
                .bytes(),
        )
        .unwrap();
    assert_eq!(read(stack.top().join("a")), "lib");
    assert_eq!(read(stack.top().join("b")), "lib");
    // A link to a symlink copies the symlink, not what it points to.
    stack
        .push(Layer::new().hardlink("c", "lib").bytes())
        .unwrap();
    assert_eq!(
        fs::read_link(stack.top().join("c")).unwrap(),
        Path::new("/usr/lib")
    );
}

#[test]
fn lower_targets_never_resolve_outside_the_stack() {
    let mut stack = Stack::new();
    // A file next to the stack's directories, and one on the host.
    fs::write(stack.tmp.path().join("secret"), "host").unwrap();
    stack
        .push(
            Layer::new()
                .symlink("up", "../../../..")
                .symlink("abs", stack.tmp.path().to_str().unwrap())
                .symlink("loop", "loop/x")
                .bytes(),
        )
        .unwrap();
    for target in ["up/secret", "abs/secret", "up/etc/passwd"] {
        let r = stack.push(Layer::new().hardlink("x", target).bytes());
        assert!(
            matches!(r, Err(ExtractError::HardlinkTargetMissing { .. })),
            "{target}: {r:?}"
        );
    }
    let r = stack.push(Layer::new().hardlink("x", "loop/y").bytes());
    assert!(matches!(r, Err(ExtractError::Io { .. })), "{r:?}");
}
