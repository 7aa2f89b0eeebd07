//! Micro-benchmarks of Kiln's hot paths (issue 7), on the public APIs of
//! kiln-engine and kiln-cachestore:
//!
//! - context hashing (`key::hash_sources*`) of 10k and 100k files, cold
//!   and with the stat cache;
//! - a snapshot rescan after a one-file change in a 100k-file root (the
//!   walk snapshotter, `rootfs::snapshot::Snapshot`);
//! - layer writing (`layer::LayerWriter`), tar + gzip and tar + zstd, MB/s;
//!   and of 256 MiB with one compression thread against one per core;
//! - layer reading (`layer::open_layer`) of those 256 MiB, gzip and zstd,
//!   decompression alone and with the diff_id's sha256;
//! - the metadata view of a Debian-sized base layer (12k entries): its
//!   stored table decoded, and applied to an empty view;
//! - cache keys for a 50-step Dockerfile (parse, resolve, plan, keys);
//! - index lookups (`Index::get_steps`) of 50 keys.
//!
//! `cargo bench --workspace --bench micro` runs them all; CI runs
//! `cargo bench --workspace --bench micro -- --quick` as a smoke run.
//! Fixtures are built once per process in a temp dir (the 100k-file root
//! takes a few seconds).
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use kiln_cachestore::digest::HashingReader;
use kiln_cachestore::{BlobStore, Index, Layer, Platform, StateDir, StepEntry};
use kiln_engine::bench::{
    self as key, KeyInputs, LayerTable, LayerWriter, MetaView, Recorded, Snapshot,
};
use kiln_engine::dockerfile::{self, StageGraph};
use kiln_engine::{Compression, SnapshotMode};

/// `files` small files spread over directories of 1000, under `root`.
fn make_tree(root: &Path, files: usize) {
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 1000));
        if i % 1000 == 0 {
            fs::create_dir_all(&dir).unwrap();
        }
        fs::write(dir.join(format!("f{i:06}")), format!("file {i}\n")).unwrap();
    }
}

/// One 100k-file tree for the whole run (made once: file creation is the
/// slow part on some disks), in directories of 1000 files.
fn tree_100k() -> &'static Path {
    static TREE: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &TREE
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            make_tree(&root, 100_000);
            // Files younger than two seconds are never stat-cached (racy).
            std::thread::sleep(Duration::from_millis(2100));
            (tmp, root)
        })
        .1
}

fn context_hashing(c: &mut Criterion) {
    let tree = tree_100k();
    let state = tempfile::tempdir().unwrap();
    let index = Index::open(&StateDir::open(state.path()).unwrap()).unwrap();
    // 10k files: the tree's first ten directories.
    let ten: Vec<PathBuf> = (0..10).map(|d| tree.join(format!("d{d:03}"))).collect();
    for (name, sources, files) in [
        ("context_hash_10k_files", ten, 10_000u64),
        ("context_hash_100k_files", vec![tree.to_path_buf()], 100_000),
    ] {
        key::hash_sources_cached(&sources, false, None, Some(&index)).unwrap();
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        g.throughput(Throughput::Elements(files));
        g.bench_function("cold", |b| {
            b.iter(|| black_box(key::hash_sources(&sources, false).unwrap()))
        });
        g.bench_function("stat_cache", |b| {
            b.iter(|| {
                black_box(key::hash_sources_cached(&sources, false, None, Some(&index)).unwrap())
            })
        });
        g.finish();
    }
}

fn snapshot_rescan(c: &mut Criterion) {
    let root = tree_100k().to_path_buf();
    let mut snapshot = Snapshot::scan(
        &root,
        SnapshotMode::Redo,
        Recorded::new(&["proc", "sys", "dev"], &[]),
    )
    .unwrap();
    assert!(snapshot.len() >= 100_000);
    let target = root.join("d050/f050000");
    let mut n = 0u64;

    let mut g = c.benchmark_group("snapshot_100k_files");
    g.sample_size(10);
    g.bench_function("rescan_after_one_file_change", |b| {
        b.iter_batched(
            || {
                n += 1;
                fs::write(&target, format!("changed {n}\n")).unwrap();
            },
            |()| {
                let changes = snapshot.rescan(&root, &[PathBuf::new()]).unwrap();
                assert!(!changes.is_empty());
                changes
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn layer_writing(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    // 16 MiB of text-like data in 16 files: compressible, not trivially.
    let mut rels = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let words = [
        "alpha", "beta", "gamma", "delta", "kiln", "layer", "cache", "0x1f", "\n",
    ];
    for f in 0..16 {
        let rel = PathBuf::from(format!("file{f:02}"));
        let mut out = fs::File::create(root.join(&rel)).unwrap();
        let mut buf = Vec::with_capacity(1 << 20);
        while buf.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
            buf.extend_from_slice(format!(" {} ", x % 10_000).as_bytes());
        }
        buf.truncate(1 << 20);
        out.write_all(&buf).unwrap();
        rels.push(rel);
    }
    let store_dir = tmp.path().join("state");
    let store = BlobStore::open(&StateDir::open(store_dir).unwrap()).unwrap();

    let mut g = c.benchmark_group("layer_write_16MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(16 << 20));
    for (name, compression) in [
        ("gzip_6", Compression::Gzip { level: 6 }),
        ("gzip_1", Compression::Gzip { level: 1 }),
        ("zstd_3", Compression::Zstd { level: 3 }),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut w = LayerWriter::new(&store, compression, Some(0)).unwrap();
                for rel in &rels {
                    w.add(&root, rel).unwrap();
                }
                black_box(w.finish().unwrap())
            })
        });
    }
    g.finish();
}

/// 256 MiB of mixed data (three parts words and numbers, one part noise
/// that does not compress) in 64 files of 4 MiB under `root`, by their
/// relative paths.
fn mixed_256mib(root: &Path) -> Vec<PathBuf> {
    fs::create_dir_all(root).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = ["alpha", "beta", "gamma", "delta", "kiln", "layer", "\n"];
    (0..64)
        .map(|f| {
            let rel = PathBuf::from(format!("file{f:02}"));
            let mut buf = Vec::with_capacity(4 << 20);
            while buf.len() < 4 << 20 {
                let r = next();
                match f % 4 {
                    3 => buf.extend_from_slice(&r.to_le_bytes()),
                    _ => {
                        buf.extend_from_slice(words[(r % 7) as usize].as_bytes());
                        buf.extend_from_slice(format!(" {} ", r % 10_000).as_bytes());
                    }
                }
            }
            buf.truncate(4 << 20);
            fs::write(root.join(&rel), buf).unwrap();
            rel
        })
        .collect()
}

/// `rels` under `root` written as one layer, with fixed mtimes.
fn write_layer(
    store: &BlobStore,
    root: &Path,
    rels: &[PathBuf],
    compression: Compression,
) -> Layer {
    let mut w = LayerWriter::new(store, compression, Some(0)).unwrap();
    for rel in rels {
        w.add(root, rel).unwrap();
    }
    w.finish().unwrap()
}

/// [`mixed_256mib`] written as one layer with one compression thread and
/// with one per core. The layer's digest must be the same with both
/// (checked before measuring).
fn parallel_layer_writing(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rels = mixed_256mib(&root);
    let store = BlobStore::open(&StateDir::open(tmp.path().join("state")).unwrap()).unwrap();
    let write = |compression| write_layer(&store, &root, &rels, compression);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut g = c.benchmark_group("layer_write_256MiB_threads");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(256 << 20));
    for (name, compression) in [
        ("gzip_6", Compression::Gzip { level: 6 }),
        ("zstd_3", Compression::Zstd { level: 3 }),
    ] {
        let mut digests = Vec::new();
        for threads in [1, cores] {
            kiln_engine::set_compression_threads(threads);
            digests.push(write(compression).descriptor.digest);
            g.bench_function(format!("{name}/{threads}"), |b| {
                b.iter(|| black_box(write(compression)))
            });
        }
        assert!(
            digests.windows(2).all(|d| d[0] == d[1]),
            "{name}: the thread count changed the bytes: {digests:?}"
        );
    }
    kiln_engine::set_compression_threads(0);
    g.finish();
}

/// A base layer's tar shaped like debootstrap's bookworm minbase: 12k
/// entries (600 directories of 19 files, one of them a symlink), with
/// /etc/passwd.
fn debian_like_tar() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        tar.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, 0o755, b"", None);
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/bash\n",
        None,
    );
    for d in 0..600 {
        let dir = format!("usr/share/doc/package-{d:04}");
        add(
            &format!("{dir}/"),
            tar::EntryType::Directory,
            0o755,
            b"",
            None,
        );
        for f in 0..19 {
            match f % 10 {
                9 => add(
                    &format!("{dir}/link-{f}"),
                    tar::EntryType::Symlink,
                    0o777,
                    b"",
                    Some("copyright"),
                ),
                _ => add(
                    &format!("{dir}/file-{f:02}.gz"),
                    tar::EntryType::Regular,
                    0o644,
                    b"x",
                    None,
                ),
            }
        }
    }
    tar.into_inner().unwrap()
}

/// What a COPY-only step on a Debian base pays for its view: the base
/// layer's stored table decoded, and applied to an empty view.
fn metadata_view(c: &mut Criterion) {
    let table = LayerTable::read(&debian_like_tar()[..]).unwrap();
    let stored = table.to_bytes();
    let mut g = c.benchmark_group("metadata_view_12k");
    g.bench_function("decode", |b| {
        b.iter(|| black_box(LayerTable::from_bytes(&stored)))
    });
    g.bench_function("apply", |b| {
        b.iter_batched(
            || table.clone(),
            |table| {
                let mut view = MetaView::default();
                view.push(table);
                black_box(view)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// Reading [`mixed_256mib`] back as a base layer is read when it is
/// unpacked: decompressed, and the tar hashed for its diff_id; once
/// decompression alone, once with the hash, to tell their costs apart.
fn layer_reading(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rels = mixed_256mib(&root);
    let store = BlobStore::open(&StateDir::open(tmp.path().join("state")).unwrap()).unwrap();
    let mut g = c.benchmark_group("layer_read_256MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(256 << 20));
    for (name, compression) in [
        ("gzip_6", Compression::Gzip { level: 6 }),
        ("zstd_3", Compression::Zstd { level: 3 }),
    ] {
        let layer = write_layer(&store, &root, &rels, compression);
        let digest = &layer.descriptor.digest;
        g.bench_function(format!("{name}/decompress"), |b| {
            b.iter(|| {
                let mut r = key::open_layer(&store, digest).unwrap();
                black_box(std::io::copy(&mut r, &mut std::io::sink()).unwrap())
            })
        });
        g.bench_function(format!("{name}/decompress+sha256"), |b| {
            b.iter(|| {
                let r = HashingReader::new(key::open_layer(&store, digest).unwrap());
                let diff_id = r.finish().unwrap();
                assert_eq!(diff_id, layer.diff_id);
            })
        });
    }
    g.finish();
}

fn cache_keys(c: &mut Criterion) {
    // 50 steps: RUNs with args and env, COPYs and metadata, as a real file.
    let mut text = String::from("ARG BASE=busybox\nFROM ${BASE} AS build\nARG V=1\n");
    for i in 0..50 {
        text.push_str(&match i % 5 {
            0 => format!("RUN echo step {i} $V > /s{i}\n"),
            1 => format!("ENV K{i}=value{i}\n"),
            2 => format!("WORKDIR /w{i}\n"),
            3 => format!("RUN [\"sh\", \"-c\", \"echo {i} > /e{i}\"]\n"),
            _ => format!("LABEL l{i}=v{i}\n"),
        });
    }
    let host = Platform::host();
    let platform: dockerfile::Platform = (&host).into();
    let build_args = BTreeMap::new();
    let configs = HashMap::new();
    let labels = BTreeMap::new();
    let platform_name = format!("{}/{}", host.os, host.architecture);

    let mut g = c.benchmark_group("cache_keys_50_steps");
    g.sample_size(20);
    g.bench_function("parse_plan_and_key", |b| {
        b.iter(|| {
            let df = dockerfile::parse(&text).unwrap();
            let graph = StageGraph::resolve(&df, &build_args, None, &platform).unwrap();
            let plan = key::plan(&df, &graph, &configs, &host, &labels).unwrap();
            let mut parent = String::from("sha256:base");
            let mut keys = 0;
            for stage in &plan.stages {
                for step in &stage.steps {
                    let inputs = KeyInputs {
                        parent: &parent,
                        platform: &platform_name,
                        source_identity: "",
                        sources_digest: "",
                    };
                    if let Some(k) = key::step_key(step, &inputs) {
                        parent = k;
                        keys += 1;
                    }
                }
            }
            assert!(keys >= 20);
            black_box(parent)
        })
    });
    g.finish();
}

fn index_lookups(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let index = Index::open(&StateDir::open(tmp.path()).unwrap()).unwrap();
    let entries: Vec<(String, StepEntry)> = (0..2000)
        .map(|i| {
            let k = key::KeyHasher::new("bench")
                .field("i", &(i as u64).to_le_bytes())
                .finish();
            (k, StepEntry::new(None))
        })
        .collect();
    index.put_steps(&entries).unwrap();
    let hits: Vec<String> = entries
        .iter()
        .step_by(40)
        .take(50)
        .map(|(k, _)| k.clone())
        .collect();
    let misses: Vec<String> = (0..50).map(|i| format!("missing-{i}")).collect();

    let mut g = c.benchmark_group("index_get_steps_50_keys");
    g.sample_size(20);
    g.bench_function("hits", |b| {
        b.iter(|| {
            let got = index.get_steps(&hits).unwrap();
            assert!(got.iter().all(Option::is_some));
            black_box(got)
        })
    });
    g.bench_function("misses", |b| {
        b.iter(|| black_box(index.get_steps(&misses).unwrap()))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = context_hashing, snapshot_rescan, layer_writing, parallel_layer_writing, layer_reading,
        metadata_view, cache_keys, index_lookups
}
criterion_main!(benches);
