//! A COPY from the context whose sources changed links, rather than
//! copies, the files it writes unchanged from the layer the previous run
//! of the same COPY made (the overlay snapshotter; `exec::copy::Reuse`).
//! Whatever changed (content, a file gone, one more, a mode, an mtime), the
//! image is the one a fresh build makes: byte for byte with
//! `--reproducible`, file for file and header for header without it. A
//! record of the previous layer that is gone or torn only costs the reuse.
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::*;

/// The COPY, then a RUN, so the stage is built on its root (a COPY-only
/// stage is built on the metadata view instead). The RUN's output depends
/// only on the names and one file's content, so a fresh build's is the same.
const DOCKERFILE: &str =
    "FROM {BASE}\nCOPY . /src\nRUN find /src | sort > /listing && cat /src/p0/f0 > /seen\n";

/// 4 directories of 25 files, one executable, one symlink, one empty file.
fn context(base: &str) -> Context {
    let names: Vec<(String, String)> = (0..4)
        .flat_map(|d| (0..25).map(move |f| (format!("p{d}/f{f}"), format!("file {d}/{f}\n"))))
        .collect();
    let files: Vec<(&str, &str)> = names
        .iter()
        .map(|(n, c)| (n.as_str(), c.as_str()))
        .chain([("empty", "")])
        .collect();
    let ctx = Context::new(&DOCKERFILE.replace("{BASE}", base), &files);
    let tool = ctx.path().join("p1/f1");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("p0/f0", ctx.path().join("link")).unwrap();
    ctx
}

/// The regular files of the context (what a COPY of it writes as files).
fn regular_files(ctx: &Context) -> u64 {
    let mut count = 0;
    let mut dirs = vec![ctx.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                count += 1;
            }
        }
    }
    count
}

struct Build {
    manifest: Value,
    config: Value,
    layout: PathBuf,
    summary: Value,
}

fn build(ctx: &Context, state: &Path, layout: &Path, extra: &[&str]) -> Build {
    let mut args = vec![
        "--log-format",
        "json",
        "--oci-layout-path",
        layout.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kiln_build(ctx, state, &args);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(summary["event"], "summary", "{summary}");
    let manifest = layout_manifest(layout);
    let config: Value = serde_json::from_slice(
        &std::fs::read(layout_blob(layout, &manifest["config"]["digest"])).unwrap(),
    )
    .unwrap();
    Build {
        manifest,
        config,
        layout: layout.to_path_buf(),
        summary,
    }
}

fn reused(build: &Build) -> u64 {
    build.summary["files_reused"].as_u64().unwrap()
}

/// The unpacked directory of the image's COPY layer in `state`.
fn copy_layer_dir(state: &Path, build: &Build) -> PathBuf {
    let diff_id = build.config["rootfs"]["diff_ids"][1].as_str().unwrap();
    state
        .join("unpacked")
        .join(diff_id.trim_start_matches("sha256:"))
}

fn append(ctx: &Context, name: &str, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(ctx.path().join(name))
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// One change to the context, named.
type Mutation = (&'static str, fn(&Context));

const MUTATIONS: &[Mutation] = &[
    ("one file changed", |ctx| append(ctx, "p0/f0", "more\n")),
    ("one file deleted", |ctx| {
        std::fs::remove_file(ctx.path().join("p2/f3")).unwrap()
    }),
    ("one file added", |ctx| {
        std::fs::write(ctx.path().join("p3/new"), "new\n").unwrap()
    }),
    ("one file's mode changed", |ctx| {
        let mode = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(ctx.path().join("p1/f2"), mode).unwrap()
    }),
    ("the executable changed", |ctx| append(ctx, "p1/f1", "x\n")),
];

/// After each change, the reused build's image is the fresh build's, byte
/// for byte; with the overlay snapshotter every unchanged file was linked
/// from the previous layer (sharing its inode), with the walk snapshotter
/// none is.
#[test]
fn a_reused_copy_makes_the_image_a_fresh_build_makes() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    for snapshotter in ["overlay", "walk"] {
        let ctx = context(&base);
        let work = tempfile::tempdir().unwrap();
        let state = work.path().join("state");
        let flags = ["--reproducible", "--snapshotter", snapshotter];
        let mut previous = build(&ctx, &state, &work.path().join("first"), &flags);
        assert_eq!(reused(&previous), 0);
        for (i, (what, mutate)) in MUTATIONS.iter().enumerate() {
            mutate(&ctx);
            let layout = work.path().join(format!("reused-{i}"));
            let again = build(&ctx, &state, &layout, &flags);
            let fresh_state = work.path().join(format!("fresh-state-{i}"));
            let fresh_layout = work.path().join(format!("fresh-{i}"));
            let fresh = build(&ctx, &fresh_state, &fresh_layout, &flags);
            assert_eq!(
                again.manifest, fresh.manifest,
                "{what} ({snapshotter}): the reused build's image differs"
            );
            assert_ne!(
                again.manifest["layers"][1], previous.manifest["layers"][1],
                "{what} ({snapshotter}): the COPY layer did not change"
            );
            assert_eq!(reused(&fresh), 0);
            if snapshotter == "walk" {
                assert_eq!(reused(&again), 0, "{what}");
                continue;
            }
            // Every file but the one changed (none for a deletion).
            let changed = u64::from(*what != "one file deleted");
            assert_eq!(
                reused(&again),
                regular_files(&ctx) - changed,
                "{what}: {}",
                again.summary
            );
            // An unchanged file is the previous layer's inode.
            let ino = |build: &Build| {
                let file = copy_layer_dir(&state, build).join("src/p3/f9");
                std::fs::metadata(file).unwrap().ino()
            };
            assert_eq!(ino(&again), ino(&previous), "{what}");
            std::fs::remove_dir_all(&fresh_state).unwrap();
            previous = again;
        }
    }
}

/// (path: mode, uid, gid, mtime, size) of the regular files of an image's
/// COPY layer: a directory's or a symlink's mtime is when the copy made
/// it, in any build.
fn copy_layer_headers(build: &Build) -> BTreeMap<String, (u32, u64, u64, u64, u64)> {
    let layer = &build.manifest["layers"][1];
    let file = std::fs::File::open(layout_blob(&build.layout, &layer["digest"])).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        if !h.entry_type().is_file() {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let fields = (
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            h.size().unwrap(),
        );
        out.insert(path, fields);
    }
    out
}

/// Without `--reproducible` the layer keeps the sources' mtimes: a file
/// whose content is the same but whose mtime changed is copied again,
/// not linked with its old mtime. Files and headers are a fresh build's.
#[test]
fn a_file_with_a_new_mtime_is_not_reused() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = context(&base);
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let flags = ["--snapshotter", "overlay"];
    build(&ctx, &state, &work.path().join("first"), &flags);
    append(&ctx, "p0/f0", "more\n");
    let touched = std::fs::File::options()
        .write(true)
        .open(ctx.path().join("p2/f2"))
        .unwrap();
    touched
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
        .unwrap();
    let again = build(&ctx, &state, &work.path().join("again"), &flags);
    let fresh = build(
        &ctx,
        &work.path().join("fresh"),
        &work.path().join("f"),
        &flags,
    );
    assert_eq!(reused(&again), regular_files(&ctx) - 2, "{}", again.summary);
    let headers = copy_layer_headers(&again);
    assert_eq!(headers["src/p2/f2"].3, 1_000_000);
    assert_eq!(headers, copy_layer_headers(&fresh));
    let unpack =
        |b: &Build, name: &str| tree(&umoci_unpack(&b.layout, "latest", &work.path().join(name)));
    assert_eq!(unpack(&again, "u-again"), unpack(&fresh, "u-fresh"));
}

/// The previous layer's directory gone (as `kiln cache gc` removes it),
/// or its record torn: the COPY copies every file, and the image is right.
#[test]
fn a_missing_layer_or_a_torn_record_only_costs_the_reuse() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = context(&base);
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let flags = ["--reproducible", "--snapshotter", "overlay"];
    let first = build(&ctx, &state, &work.path().join("first"), &flags);
    let records = || -> Vec<PathBuf> {
        std::fs::read_dir(state.join("made-by"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    assert_eq!(records().len(), 1, "one COPY, one record");
    std::fs::remove_dir_all(copy_layer_dir(&state, &first)).unwrap();

    append(&ctx, "p0/f0", "more\n");
    let gone = build(&ctx, &state, &work.path().join("gone"), &flags);
    assert_eq!(reused(&gone), 0, "{}", gone.summary);
    let fresh = build(
        &ctx,
        &work.path().join("fresh-1"),
        &work.path().join("f1"),
        &flags,
    );
    assert_eq!(gone.manifest, fresh.manifest);

    for record in records() {
        std::fs::write(record, "sha256:torn").unwrap();
    }
    append(&ctx, "p0/f0", "more\n");
    let torn = build(&ctx, &state, &work.path().join("torn"), &flags);
    assert_eq!(reused(&torn), 0, "{}", torn.summary);
    let fresh = build(
        &ctx,
        &work.path().join("fresh-2"),
        &work.path().join("f2"),
        &flags,
    );
    assert_eq!(torn.manifest, fresh.manifest);

    // The record is whole again: the next change reuses.
    append(&ctx, "p0/f0", "more\n");
    let next = build(&ctx, &state, &work.path().join("next"), &flags);
    assert_eq!(reused(&next), regular_files(&ctx) - 1, "{}", next.summary);
}
