//! ADD: COPY plus local tar archives extracted into the destination and
//! HTTP(S) URLs downloaded into it (`source::http`), as Docker does.
//!
//! An archive is recognised by content, never by name (as moby's
//! `DecompressStream` + `tar.Reader.Next`): plain tar, gzip, bzip2, xz or
//! zstd whose decompressed stream starts with a valid tar header. It is
//! extracted with the layer extractor, with the destination directory as
//! its root, so nothing in it (`..`, absolute links) can reach outside the
//! destination; ownership comes from the archive unless `--chown`.
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::context::Ignore;
use crate::exec::copy::{self, CopyRequest, Source};
use crate::rootfs::extract;
use crate::source::classify::{self, Checksum};
use crate::source::http::download_to_new_dir;

/// How an archive's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    /// By magic bytes, as moby's `DetectCompression`.
    fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b, 0x08]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// The decompressed stream of `file`.
fn decompress(file: fs::File, compression: Compression) -> io::Result<Box<dyn Read>> {
    let file = io::BufReader::new(file);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(file)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(file, true)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

/// The compression of `path` when it is a tar archive, `None` when it is
/// any other file (which ADD then copies as is).
pub fn detect_archive(path: &Path) -> io::Result<Option<Compression>> {
    let mut file = fs::File::open(path)?;
    let mut head = [0u8; 6];
    let n = read_full(&mut file, &mut head)?;
    let compression = Compression::sniff(&head[..n]);
    let Ok(stream) = decompress(fs::File::open(path)?, compression) else {
        return Ok(None);
    };
    // A valid first header makes an archive; an empty or corrupt one does
    // not (an error reading it is just "not an archive").
    let mut archive = tar::Archive::new(stream);
    let first = archive.entries().ok().and_then(|mut e| e.next());
    Ok(matches!(first, Some(Ok(_))).then_some(compression))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

/// Extracts the archive at `path` into the directory `host_dir` (already
/// inside the build root), which acts as the extraction's root. With
/// `chown`, every extracted entry gets that owner.
pub fn extract_archive(
    path: &Path,
    compression: Compression,
    host_dir: &Path,
    chown: Option<(u32, u32)>,
) -> Result<(), String> {
    let archive = fs::File::open(path)
        .and_then(|f| decompress(f, compression))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    extract::extract_archive(host_dir, archive, chown)
        .map_err(|e| format!("extracting {}: {e}", path.display()))?;
    Ok(())
}

/// One ADD step.
pub struct AddRequest<'a> {
    /// The context, or another stage's root (never, as ADD has no --from,
    /// but COPY's machinery allows it).
    pub source: Source<'a>,
    pub sources: &'a [String],
    pub dest: &'a str,
    pub chown: Option<(u32, u32)>,
    pub chmod: Option<u32>,
    pub ignore: Option<&'a Ignore>,
    /// `--exclude` patterns, for local sources.
    pub excludes: &'a [String],
    pub checksum: Option<&'a str>,
    /// `--unpack`: `None` extracts local archives and leaves downloads.
    pub unpack: Option<bool>,
    /// `--keep-git-dir`, for a Git source.
    pub keep_git_dir: bool,
    /// Where downloads wait before they are copied in (outside the root).
    pub scratch: &'a Path,
    /// What keying the step learned of its remote sources.
    pub resolved: &'a Resolved,
}

/// What keying an ADD learned of its remote sources, for running it on
/// exactly that.
#[derive(Debug, Default)]
pub struct Resolved {
    /// URLs without `--checksum`, downloaded: their files.
    pub downloads: std::collections::HashMap<String, PathBuf>,
    /// Git sources: the commit each ref named.
    pub commits: std::collections::HashMap<String, String>,
}

impl AddRequest<'_> {
    /// A plain copy of `sources` from `source` to the step's destination,
    /// with its owner and mode; callers add what else applies.
    fn copy_of<'b>(&'b self, source: Source<'b>, sources: &'b [String]) -> CopyRequest<'b> {
        CopyRequest {
            source,
            sources,
            dest: self.dest,
            chown: self.chown,
            chmod: self.chmod,
            ignore: None,
            unpack: false,
            excludes: &[],
            parents: false,
        }
    }

    /// Local sources: from the context (or a root), `.dockerignore` and
    /// `--exclude` applied, archives unpacked unless `--unpack=false`.
    fn copy_local(&self, root: &Path, sources: &[String]) -> Result<Vec<PathBuf>, String> {
        let request = CopyRequest {
            ignore: self.ignore,
            unpack: self.unpack != Some(false),
            excludes: self.excludes,
            ..self.copy_of(self.source, sources)
        };
        copy::copy(&request, root)
    }
}

/// Runs an ADD into `root` and returns the top-level paths it wrote.
pub fn add(req: &AddRequest, root: &Path) -> Result<Vec<PathBuf>, String> {
    if let [source] = req.sources {
        if classify::is_git(source) {
            // The repository's files (its subdir) go into dest, owned by
            // root or --chown, as a directory source's would.
            let dir = tempfile::Builder::new()
                .prefix("git-")
                .tempdir_in(req.scratch)
                .map_err(|e| format!("{}: {e}", req.scratch.display()))?;
            let checkout = crate::source::git::GitSource::parse(source)
                .fetch(
                    &dir.path().join("repo"),
                    req.keep_git_dir,
                    false,
                    req.resolved.commits.get(source).map(String::as_str),
                )
                .map_err(|e| format!("{source}: {e}"))?;
            let all = [".".to_string()];
            let request = CopyRequest {
                excludes: req.excludes,
                ..req.copy_of(Source::Context(&checkout), &all)
            };
            return copy::copy(&request, root);
        }
    }
    if !req.sources.iter().any(|s| classify::is_download(s)) {
        return req.copy_local(root, req.sources);
    }
    if req.sources.len() > 1 && !req.dest.ends_with('/') {
        return Err(format!(
            "when using ADD with more than one source file, the destination must be a directory and end with a /: {}",
            req.dest
        ));
    }
    let mut touched = Vec::new();
    // In order, so a later source overwrites an earlier one as in Docker.
    for source in req.sources {
        if !classify::is_download(source) {
            touched.extend(req.copy_local(root, std::slice::from_ref(source))?);
            continue;
        }
        // Downloaded while keying, or now (with --checksum).
        let (_fetched, file) = match req.resolved.downloads.get(source) {
            Some(file) => (None, file.clone()),
            None => {
                let checksum = req
                    .checksum
                    .map(Checksum::parse)
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let (dir, file) = download_to_new_dir(source, checksum.as_ref(), req.scratch)
                    .map_err(|e| e.to_string())?;
                (Some(dir), file)
            }
        };
        let dir = file.parent().unwrap_or(req.scratch);
        let name = [file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()];
        let request = CopyRequest {
            unpack: req.unpack == Some(true),
            ..req.copy_of(Source::Context(dir), &name)
        };
        touched.extend(copy::copy(&request, root)?);
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A tar with a directory, a file (owned by 1000:1000) and symlinks
    /// that point out of any root.
    fn tar_bytes() -> Vec<u8> {
        let header = |kind: tar::EntryType, mode: u32, owner: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(owner);
            h.set_gid(owner);
            h.set_mtime(0);
            h.set_size(0);
            h
        };
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = header(tar::EntryType::Directory, 0o750, 0);
        b.append_data(&mut dir, "d/", io::empty()).unwrap();
        let mut file = header(tar::EntryType::Regular, 0o640, 1000);
        file.set_size(5);
        b.append_data(&mut file, "d/f", &b"hello"[..]).unwrap();
        // An archive is no layer: this is a file, not a whiteout of d/f.
        let mut wh = header(tar::EntryType::Regular, 0o644, 0);
        b.append_data(&mut wh, "d/.wh.f", io::empty()).unwrap();
        let mut aufs = header(tar::EntryType::Regular, 0o644, 0);
        b.append_data(&mut aufs, ".wh..wh.aufs", io::empty())
            .unwrap();
        let mut suid = header(tar::EntryType::Regular, 0o4755, 1000);
        b.append_data(&mut suid, "d/suid", io::empty()).unwrap();
        let mut link = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut link, "up", "../../../..").unwrap();
        // Written through a link to `/`: must land inside the destination.
        let mut slash = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut slash, "esc", "/").unwrap();
        let mut evil = header(tar::EntryType::Regular, 0o644, 0);
        evil.set_size(4);
        b.append_data(&mut evil, "esc/evil", &b"evil"[..]).unwrap();
        b.into_inner().unwrap()
    }

    const XZ_TREE: &[u8] =
        include_bytes!("../../../fixtures/differential/add-archives/tree.tar.xz");

    fn compressed(kind: Compression, data: &[u8]) -> Vec<u8> {
        match kind {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            // No xz encoder in the build: the fixture's archive stands in.
            Compression::Xz => XZ_TREE.to_vec(),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }

    #[test]
    fn archives_are_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [
            Compression::None,
            Compression::Gzip,
            Compression::Bzip2,
            Compression::Xz,
            Compression::Zstd,
        ] {
            let path = dir.path().join(format!("{kind:?}.bin"));
            fs::write(&path, compressed(kind, &tar_bytes())).unwrap();
            assert_eq!(detect_archive(&path).unwrap(), Some(kind), "{kind:?}");
            if kind == Compression::Xz {
                continue;
            }
            // Compressed text is not an archive: it is copied as is.
            let text = dir.path().join(format!("{kind:?}.tar.gz"));
            fs::write(&text, compressed(kind, b"just some text, not a tar")).unwrap();
            assert_eq!(detect_archive(&text).unwrap(), None, "{kind:?} text");
        }
        let empty = dir.path().join("empty.tar");
        fs::write(&empty, []).unwrap();
        assert_eq!(detect_archive(&empty).unwrap(), None);
        let zeros = dir.path().join("zeros.tar");
        fs::write(&zeros, [0u8; 1024]).unwrap();
        assert_eq!(detect_archive(&zeros).unwrap(), None);
    }

    #[test]
    fn archives_extract_into_dest_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(&ctx).unwrap();
        fs::create_dir_all(root.join("opt")).unwrap();
        fs::write(root.join("opt/old"), "old").unwrap();
        fs::write(
            ctx.join("a.tgz"),
            compressed(Compression::Gzip, &tar_bytes()),
        )
        .unwrap();
        fs::write(ctx.join("b.xz"), XZ_TREE).unwrap();
        let scratch = dir.path().join("scratch");
        fs::create_dir_all(&scratch).unwrap();
        let run = |sources: &[&str], dest: &str, chown, unpack| {
            let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
            add(
                &AddRequest {
                    source: Source::Context(&ctx),
                    sources: &sources,
                    dest,
                    chown,
                    chmod: None,
                    ignore: None,
                    excludes: &[],
                    keep_git_dir: false,
                    checksum: None,
                    unpack,
                    scratch: &scratch,
                    resolved: &Resolved::default(),
                },
                &root,
            )
        };
        run(&["a.tgz"], "/opt", None, None).unwrap();
        let f = fs::metadata(root.join("opt/d/f")).unwrap();
        assert_eq!(fs::read_to_string(root.join("opt/d/f")).unwrap(), "hello");
        assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1000, 0o640));
        assert!(root.join("opt/old").is_file(), "existing files stay");
        assert!(root.join("opt/d/.wh.f").is_file(), ".wh. names are files");
        assert!(
            !root.join("opt/.wh..wh.aufs").exists(),
            "AUFS metadata is skipped"
        );
        // --chown replaces owners and keeps setuid bits.
        run(&["a.tgz"], "/chowned", Some((7, 8)), None).unwrap();
        let suid = fs::metadata(root.join("chowned/d/suid")).unwrap();
        assert_eq!(
            (suid.uid(), suid.gid(), suid.mode() & 0o7777),
            (7, 8, 0o4755)
        );
        assert_eq!(
            fs::read_link(root.join("opt/up")).unwrap(),
            PathBuf::from("../../../..")
        );
        // A fresh dest is created with --chown, which owns every entry.
        run(&["b.xz"], "/new/dir", Some((7, 8)), None).unwrap();
        let f = fs::metadata(root.join("new/dir/pkg/etc/conf")).unwrap();
        assert_eq!((f.uid(), f.gid()), (7, 8));
        assert_eq!(
            fs::symlink_metadata(root.join("new/dir/pkg/link"))
                .unwrap()
                .uid(),
            7
        );
        assert_eq!(fs::metadata(root.join("new")).unwrap().uid(), 7);
        assert_eq!(fs::read_to_string(root.join("opt/evil")).unwrap(), "evil");
        assert!(!root.join("evil").exists() && !dir.path().join("evil").exists());
        // --unpack=false copies the archive itself.
        run(&["a.tgz"], "/kept/", None, Some(false)).unwrap();
        assert!(root.join("kept/a.tgz").is_file());
    }

    /// Serves `body` to `n` requests on 127.0.0.1; returns the base URL.
    fn serve(body: Vec<u8>, n: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(n) {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn downloaded_archives_are_extracted_only_with_unpack() {
        let base = serve(compressed(Compression::Gzip, &tar_bytes()), 2);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(&root).unwrap();
        let url = vec![format!("{base}/pkg.tar.gz")];
        let run = |dest: &str, unpack| {
            add(
                &AddRequest {
                    source: Source::Context(dir.path()),
                    sources: &url,
                    dest,
                    chown: Some((5, 6)),
                    chmod: None,
                    ignore: None,
                    excludes: &[],
                    keep_git_dir: false,
                    checksum: None,
                    unpack,
                    scratch: dir.path(),
                    resolved: &Resolved::default(),
                },
                &root,
            )
        };
        run("/dl/", None).unwrap();
        let kept = fs::metadata(root.join("dl/pkg.tar.gz")).unwrap();
        assert_eq!(
            (kept.mode() & 0o7777, kept.uid(), kept.gid()),
            (0o600, 5, 6)
        );
        run("/x", Some(true)).unwrap();
        assert_eq!(fs::read_to_string(root.join("x/d/f")).unwrap(), "hello");
    }
}
