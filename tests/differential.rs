//! Differential tests: each case in `fixtures/differential/` is built by
//! Kiln and by buildah (the reference) from the same busybox base; both
//! images are unpacked with umoci and must have the same files (type, mode,
//! owner, content, link targets, hardlinks) and the same config.
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::*;

struct Built {
    tree: BTreeMap<String, TreeEntry>,
    config: Value,
}

fn case_dir(name: &str) -> PathBuf {
    Path::new(REPO).join("fixtures/differential").join(name)
}

/// Extra flags, one per line in a case's file: `flags` for both builders,
/// `flags.buildah` for buildah alone (what Kiln does unasked).
fn case_flags(dir: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

fn oci_config(layout: &Path, tag: &str) -> Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:{tag}", layout.display()),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn build_with_kiln(dir: &Path, base: &str, work: &Path, snapshotter: &str) -> Built {
    let work = &work.join(snapshotter);
    let layout = work.join("kiln-layout");
    let out = Command::new(KILN)
        .arg("build")
        .arg("--context")
        .arg(dir)
        .arg("--dockerfile")
        .arg(dir.join("Dockerfile"))
        .arg("--cache-dir")
        .arg(work.join("kiln-state"))
        .arg("--build-arg")
        .arg(format!("BASE={base}"))
        .args(case_flags(dir, "flags"))
        .args(["--snapshotter", snapshotter])
        .arg("--oci-layout-path")
        .arg(&layout)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln ({snapshotter}) failed:\n{}",
        stderr(&out)
    );
    assert_layers_in_order(&layout);
    Built {
        tree: tree(&umoci_unpack(&layout, "latest", &work.join("kiln"))),
        config: oci_config(&layout, "latest"),
    }
}

/// Every layer Kiln wrote is a tar sorted by name, whiteouts among the
/// rest, with long names and large ids in PAX records (no GNU members).
fn assert_layers_in_order(layout: &Path) {
    for layer in layout_manifest(layout)["layers"].as_array().unwrap() {
        let file = std::fs::File::open(layout_blob(layout, &layer["digest"])).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let kind = entry.header().entry_type();
            assert!(
                !kind.is_gnu_longname() && !kind.is_gnu_longlink(),
                "a GNU long-name member"
            );
            names.push(PathBuf::from(
                entry
                    .path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/'),
            ));
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            names, sorted,
            "layer {} is not in name order",
            layer["digest"]
        );
    }
}

fn build_with_buildah(dir: &Path, base: &str, work: &Path) -> Built {
    let storage = |cmd: &mut Command| {
        cmd.arg("--root")
            .arg(work.join("buildah/root"))
            .arg("--runroot")
            .arg(work.join("buildah/run"))
            .args(["--storage-driver", "vfs"]);
    };
    let mut bud = Command::new("buildah");
    storage(&mut bud);
    bud.args([
        "bud",
        "--isolation",
        "chroot",
        "--format",
        "docker",
        "--tls-verify=false",
        "-q",
    ])
    .args(["-t", "localhost/case:latest", "-f"])
    .arg(dir.join("Dockerfile"))
    .arg("--build-arg")
    .arg(format!("BASE={base}"))
    .args(case_flags(dir, "flags"))
    .args(case_flags(dir, "flags.buildah"))
    .arg(dir);
    // buildah 1.28's chroot isolation now and then fails to seal the memfd
    // copy of itself it runs steps from (EBUSY): a flake of the reference,
    // not a difference. Only that error earns a second try.
    let first = bud.output().unwrap();
    if !first.status.success() {
        assert!(
            stderr(&first).contains("sealing memfd"),
            "{bud:?} failed:\n{}",
            stderr(&first)
        );
        run_ok(&mut bud);
    }
    let layout = work.join("buildah-layout");
    let mut push = Command::new("buildah");
    storage(&mut push);
    push.args(["push", "-q", "localhost/case:latest"])
        .arg(format!("oci:{}:latest", layout.display()));
    run_ok(&mut push);
    Built {
        tree: tree(&umoci_unpack(&layout, "latest", &work.join("buildah"))),
        config: oci_config(&layout, "latest"),
    }
}

/// The parts of a config both builders must agree on.
fn comparable_config(config: &Value) -> Value {
    let c = &config["config"];
    let mut labels = c["Labels"].as_object().cloned().unwrap_or_default();
    labels.remove("io.buildah.version");
    let mut out = serde_json::Map::new();
    for key in [
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Volumes",
        "StopSignal",
        "Healthcheck",
        "OnBuild",
        "Shell",
    ] {
        let v = c.get(key).cloned().unwrap_or(Value::Null);
        // Empty and absent mean the same to a runtime.
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            out.insert(key.into(), v);
        }
    }
    if !labels.is_empty() {
        out.insert("Labels".into(), Value::Object(labels));
    }
    out.insert(
        "author".into(),
        config.get("author").cloned().unwrap_or(Value::Null),
    );
    Value::Object(out)
}

/// buildah's chroot isolation leaves its mount points in the image (empty
/// /etc/hosts, /etc/hostname, /etc/resolv.conf, and /run); Docker's
/// builders do not, and neither does Kiln.
fn drop_buildah_mount_points(
    tree: &mut BTreeMap<String, TreeEntry>,
    kiln: &BTreeMap<String, TreeEntry>,
) {
    for path in ["etc/hosts", "etc/hostname", "etc/resolv.conf", "run"] {
        let empty = tree
            .get(path)
            .is_some_and(|e| (e.kind == 'f' && e.content.ends_with("-0")) || e.kind == 'd');
        let run_is_empty = path != "run" || !tree.keys().any(|k| k.starts_with("run/"));
        if empty && run_is_empty && !kiln.contains_key(path) {
            tree.remove(path);
        }
    }
}

fn differential(name: &str) {
    differential_on(name, Registry::push_busybox);
}

/// A case built on the base `push` puts in the registry.
fn differential_on(name: &str, push: impl FnOnce(&Registry) -> String) {
    let registry = Registry::start();
    let base = push(&registry);
    let dir = case_dir(name);
    let work = tempfile::tempdir().unwrap();
    let mut reference = build_with_buildah(&dir, &base, work.path());
    // Both snapshotters must give buildah's image.
    for snapshotter in ["walk", "overlay"] {
        let kiln = build_with_kiln(&dir, &base, work.path(), snapshotter);
        compare(&format!("{name} ({snapshotter})"), &kiln, &mut reference);
    }
}

fn compare(name: &str, kiln: &Built, reference: &mut Built) {
    drop_buildah_mount_points(&mut reference.tree, &kiln.tree);

    let mut diffs = Vec::new();
    for (path, entry) in &reference.tree {
        match kiln.tree.get(path) {
            None => diffs.push(format!("missing in kiln: {path} {entry:?}")),
            Some(k) if k != entry => diffs.push(format!("{path}: kiln {k:?} != buildah {entry:?}")),
            _ => {}
        }
    }
    for path in kiln
        .tree
        .keys()
        .filter(|p| !reference.tree.contains_key(*p))
    {
        diffs.push(format!("only in kiln: {path} {:?}", kiln.tree[path]));
    }
    assert!(
        diffs.is_empty(),
        "{name}: file trees differ:\n{}",
        diffs.join("\n")
    );
    assert_eq!(
        comparable_config(&kiln.config),
        comparable_config(&reference.config),
        "{name}: configs differ"
    );
}

/// busybox with one more layer holding only `etc/passwd2`, a hard link to
/// the `etc/passwd` of the layer below, as some tools write a RUN's link to
/// an earlier layer's file. The overlay snapshotter unpacks each layer
/// alone, so the link's target is in another layer's directory.
fn push_busybox_with_a_link_into_the_layer_below(registry: &Registry) -> String {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(busybox_layout())
            .arg(&layout),
    );
    let layer = work.path().join("layer.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&layer).unwrap());
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Link);
    header.set_path("etc/passwd2").unwrap();
    header.set_link_name("etc/passwd").unwrap();
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header.set_mtime(1_600_000_000);
    header.set_cksum();
    tar.append(&header, std::io::empty()).unwrap();
    tar.into_inner().unwrap();
    run_ok(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&layer),
    );
    let reference = registry.reference("base/hardlinked:latest");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{reference}"),
    ]));
    reference
}

#[test]
fn hardlink_into_lower_layer() {
    differential_on(
        "hardlink-into-lower-layer",
        push_busybox_with_a_link_into_the_layer_below,
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                differential(&stringify!($name).replace('_', "-"));
            }
        )*
    };
}

cases!(
    run_files_and_modes,
    whiteouts,
    replace_dir_and_file,
    hardlinks_and_symlinks,
    copy_forms,
    copy_chown_chmod,
    users,
    multi_stage,
    target_stage,
    metadata,
    entrypoint_resets_cmd,
    arg_scoping,
    workdir,
    unicode_and_long_paths,
    large_file,
    onbuild,
    add_archives,
    dockerignore,
    env_expansion,
    symlink_replacements,
    opaque_rebuild,
    many_files,
    exec_forms,
    arg_env_interplay,
    copy_context_symlinks,
    devices_and_large_ids,
    copy_dest_merge,
);

/// A base for the metadata-view cases: a symlinked directory
/// (`/usr/local/bin` → `/usr/bin`), a link to a directory elsewhere,
/// directories with odd modes and owners, a user and group of its own,
/// and an upper layer of whiteouts and a directory made again (opaque).
const VIEW_BASE: &str = r#"FROM {BUSYBOX}
RUN mkdir -p /usr/bin /usr/local /opt/odd /opt/sticky /srv/app/sub /srv/gonedir \
 && ln -s /usr/bin /usr/local/bin && ln -s ../srv/app /opt/applink \
 && chmod 0705 /opt/odd && chown 123:456 /opt/odd && chmod 1777 /opt/sticky \
 && echo old > /srv/app/sub/old && echo gone > /srv/gone && echo x > /srv/gonedir/x \
 && echo 'app:x:1234:2345::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:2345:' >> /etc/group
RUN rm -rf /srv/gone /srv/gonedir /srv/app/sub && mkdir /srv/app/sub && echo new > /srv/app/sub/new
"#;

/// COPY-only stages built on the metadata view and on the unpacked root:
/// `(name, Dockerfile after FROM, the layers the view's build unpacks when
/// it serves every step: none, or the image a COPY --from reads)`.
const VIEW_CASES: &[(&str, &str, Option<u64>)] = &[
    (
        "symlinked-dests",
        "COPY f /usr/local/bin/tool\nCOPY f /usr/local/bin/\nCOPY dir/ /opt/applink/sub/\nCOPY dir /usr/local/bin/d/\n",
        Some(0),
    ),
    (
        "over-whiteouts",
        "COPY f /srv/gone\nCOPY dir /srv/gonedir/\nCOPY f /srv/app/sub/\nCOPY dir /srv/app/sub/\n",
        Some(0),
    ),
    (
        "chown-chmod",
        "COPY --chown=app:app f /opt/odd/\nCOPY --chown=1:2 --chmod=0600 dir /new/deep/\nCOPY --chown=app dir /opt/sticky/\nCOPY --chmod=4755 f /usr/local/bin/suid\n",
        Some(0),
    ),
    (
        "parents-exclude",
        "COPY --parents dir/a/*.txt /opt/odd/\nCOPY --exclude=*.log dir /srv/app/\nCOPY --parents ./dir/./a /usr/local/bin/\n",
        Some(0),
    ),
    (
        "existing-odd-dirs",
        "COPY dir /opt/odd\nCOPY f /opt/sticky/f\nCOPY dir /opt\nCOPY f /\nCOPY dir /\n",
        Some(0),
    ),
    (
        "workdir",
        "WORKDIR /opt/odd/w\nCOPY f .\nWORKDIR /usr/local/bin/x\nCOPY f ./y/\nUSER app\nWORKDIR /home/app/z\n",
        Some(0),
    ),
    (
        "copy-from-image",
        "COPY --from={BUSYBOX} /bin/busybox /usr/local/bin/bb\nCOPY --from={BUSYBOX} /etc /srv/app/etc/\n",
        Some(1),
    ),
    // The final stage on a slim base unpacks nothing: only the build
    // stage's three layers are.
    (
        "copy-from-stage-into-slim",
        "RUN echo built > /built\nFROM {BUSYBOX}\nCOPY --from=0 /built /usr/local/bin/built\n",
        Some(3),
    ),
    // Built on the root: a stage with ADD and a RUN to run.
    (
        "then-run",
        "COPY f /usr/local/bin/f\nADD f /srv/added\nRUN echo ran > /usr/local/bin/ran\nCOPY f /opt/odd/after\n",
        None,
    ),
];

/// Builds `ctx` with `--copy-view view`, reproducibly, into a fresh
/// state; the manifest and the build's summary record.
fn build_view_case(ctx: &Context, work: &Path, view: &str, snapshotter: &str) -> (Value, Value) {
    let layout = work.join(format!("layout-{view}-{snapshotter}"));
    let state = work.join(format!("state-{view}-{snapshotter}"));
    let out = kiln_build(
        ctx,
        &state,
        &[
            "--reproducible",
            "--snapshotter",
            snapshotter,
            "--copy-view",
            view,
            "--log-format",
            "json",
            "--oci-layout-path",
            layout.to_str().unwrap(),
        ],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "--copy-view {view}:\n{err}");
    let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    (layout_manifest(&layout), summary)
}

/// Every COPY-only case gives the same layers (and image) whether its
/// steps are built on the metadata view or on the unpacked root; those
/// the view serves unpack nothing.
#[test]
fn copy_view_gives_the_unpacked_roots_layers() {
    let registry = Registry::start();
    let busybox = registry.push_busybox();
    let base = registry.reference("base/view:1");
    let ctx = Context::new(&VIEW_BASE.replace("{BUSYBOX}", &busybox), &[]);
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(&ctx, state.path(), &["--destination", &base]);
    assert!(out.status.success(), "{}", stderr(&out));
    let files = [
        ("f", "file\n"),
        ("dir/a/one.txt", "1\n"),
        ("dir/a/two.log", "2\n"),
        ("dir/b/three.txt", "3\n"),
    ];
    for (name, steps, unpacks) in VIEW_CASES {
        let dockerfile = format!("FROM {base}\n{}", steps.replace("{BUSYBOX}", &busybox));
        let ctx = Context::new(&dockerfile, &files);
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o750);
        std::fs::set_permissions(ctx.path().join("dir/a"), mode).unwrap();
        let work = tempfile::tempdir().unwrap();
        let (meta, meta_summary) = build_view_case(&ctx, work.path(), "meta", "auto");
        for snapshotter in ["walk", "overlay"] {
            let (root, summary) = build_view_case(&ctx, work.path(), "root", snapshotter);
            assert_eq!(
                meta, root,
                "{name}: the view's image differs ({snapshotter})"
            );
            let unpacked = summary["layers_unpacked"].as_u64().unwrap();
            assert!(unpacked > 0, "{name}: {summary}");
        }
        if let Some(unpacks) = unpacks {
            assert_eq!(
                meta_summary["layers_unpacked"], *unpacks,
                "{name}: {meta_summary}"
            );
        }
    }
}
