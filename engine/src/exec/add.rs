//! ADD: COPY plus local tar archives extracted into the destination
//! (`source::archive`), HTTP(S) URLs downloaded into it (`source::http`)
//! and Git repositories checked out into it (`source::git`), as Docker
//! does.
use std::path::{Path, PathBuf};

use crate::context::Ignore;
use crate::exec::copy::{self, CopyError, CopyRequest, Source};
use crate::source::classify::{self, Checksum, ChecksumError};
use crate::source::git::{GitError, GitSource};
use crate::source::http::{download_to_new_dir, DownloadError};

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    /// A Git source, as written, and why it could not be fetched.
    #[error("{spec}: {source}")]
    Git {
        spec: String,
        #[source]
        source: GitError,
    },
    /// The scratch directory a Git checkout goes to.
    #[error("{}: {source}", path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    fn copy_local(&self, root: &Path, sources: &[String]) -> Result<Vec<PathBuf>, CopyError> {
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
pub fn add(req: &AddRequest, root: &Path) -> Result<Vec<PathBuf>, AddError> {
    if let [source] = req.sources {
        if classify::is_git(source) {
            // The repository's files (its subdir) go into dest, owned by
            // root or --chown, as a directory source's would.
            let dir = tempfile::Builder::new()
                .prefix("git-")
                .tempdir_in(req.scratch)
                .map_err(|source| AddError::Scratch {
                    path: req.scratch.to_path_buf(),
                    source,
                })?;
            let checkout = GitSource::parse(source)
                .fetch(
                    &dir.path().join("repo"),
                    req.keep_git_dir,
                    false,
                    req.resolved.commits.get(source).map(String::as_str),
                )
                .map_err(|e| AddError::Git {
                    spec: source.clone(),
                    source: e,
                })?;
            let all = [".".to_string()];
            let request = CopyRequest {
                excludes: req.excludes,
                ..req.copy_of(Source::Context(&checkout), &all)
            };
            return Ok(copy::copy(&request, root)?);
        }
    }
    if !req.sources.iter().any(|s| classify::is_download(s)) {
        return Ok(req.copy_local(root, req.sources)?);
    }
    if req.sources.len() > 1 && !req.dest.ends_with('/') {
        return Err(CopyError::DestNotDir {
            instruction: "ADD",
            dest: req.dest.to_string(),
        }
        .into());
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
                let checksum = req.checksum.map(Checksum::parse).transpose()?;
                let (dir, file) = download_to_new_dir(source, checksum.as_ref(), req.scratch)?;
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
    use crate::source::archive::tests::{compressed, tar_bytes, XZ_TREE};
    use crate::source::archive::Compression;
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

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
