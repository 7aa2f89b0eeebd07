//! ADD: COPY plus local tar archives extracted into the destination
//! (`source::archive`), HTTP(S) URLs downloaded into it (`source::http`)
//! and Git repositories checked out into it (`source::git`), as Docker
//! does. Every source reaches the root through a COPY of it
//! (`exec::copy`), which diverts to extraction here the archives ADD
//! unpacks.
use std::path::{Path, PathBuf};

use crate::excerpt::excerpt;
use crate::exec::copy::{self, CopyError, CopyRequest, Source};
use crate::rootfs::relative_to_root;
use crate::source::archive::{self, ArchiveError};
use crate::source::classify::{self, Checksum, ChecksumError};
use crate::source::git::{GitError, GitSource};
use crate::source::http::{download_to_new_dir, DownloadError};

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// A copy's failure, naming ADD (see the `From` below).
    #[error(transparent)]
    Copy(CopyError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    /// A Git source, as written, and why it could not be fetched.
    #[error("{}: {source}", excerpt(.spec))]
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

impl From<CopyError> for AddError {
    /// The copies an ADD makes are the ADD: a rule they break names it.
    fn from(e: CopyError) -> AddError {
        AddError::Copy(match e {
            CopyError::DestNotDir { dest, .. } => CopyError::DestNotDir {
                instruction: "ADD",
                dest,
            },
            e => e,
        })
    }
}

/// One ADD step: the COPY of its sources, and what ADD adds.
pub struct AddRequest<'a> {
    /// The sources (local paths, URLs, or one Git repository) from the
    /// context, with ADD's destination, owner, mode, `.dockerignore` and
    /// `--exclude` (for local sources). Its `parents` is unused.
    pub copy: CopyRequest<'a>,
    /// `--checksum`: of a download, or (verified while keying) a Git
    /// source's commit.
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
            ignore: None,
            excludes: &[],
            parents: false,
            ..self.copy
        }
    }

    /// Copies `request` into `root`; with `unpack`, a file that is an
    /// archive is extracted into the destination instead.
    fn copy_unpacking(
        &self,
        request: &CopyRequest,
        root: &Path,
        unpack: bool,
    ) -> Result<Vec<PathBuf>, AddError> {
        match unpack {
            true => copy::copy_diverting(request, root, |file| self.extract(file, root)),
            false => Ok(copy::copy(request, root)?),
        }
    }

    /// Extracts `file` into the destination, always a directory, when it
    /// is an archive: the top-level path it wrote.
    fn extract(&self, file: &Path, root: &Path) -> Result<Option<PathBuf>, AddError> {
        let Some(compression) = archive::detect(file).map_err(CopyError::io(file))? else {
            return Ok(None);
        };
        let chown = self.copy.chown;
        let (host_dir, created) =
            copy::create_dirs_owned(root, Path::new(self.copy.dest), chown.unwrap_or((0, 0)))?;
        archive::extract(file, compression, &host_dir, chown)?;
        Ok(Some(relative_to_root(
            root,
            created.first().unwrap_or(&host_dir),
        )))
    }

    /// Local sources: from the context (or a root), `.dockerignore` and
    /// `--exclude` applied, archives unpacked unless `--unpack=false`.
    fn copy_local(&self, root: &Path, sources: &[String]) -> Result<Vec<PathBuf>, AddError> {
        let request = CopyRequest {
            sources,
            ..self.copy
        };
        self.copy_unpacking(&request, root, self.unpack != Some(false))
    }
}

/// Runs an ADD into `root` and returns the top-level paths it wrote.
pub fn add(req: &AddRequest, root: &Path) -> Result<Vec<PathBuf>, AddError> {
    let sources = req.copy.sources;
    if let [source] = sources {
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
                excludes: req.copy.excludes,
                ..req.copy_of(Source::Context(&checkout), &all)
            };
            return Ok(copy::copy(&request, root)?);
        }
    }
    if !sources.iter().any(|s| classify::is_download(s)) {
        return req.copy_local(root, sources);
    }
    if sources.len() > 1 && !req.copy.dest.ends_with('/') {
        return Err(CopyError::DestNotDir {
            instruction: "ADD",
            dest: req.copy.dest.to_string(),
        }
        .into());
    }
    let mut touched = Vec::new();
    // In order, so a later source overwrites an earlier one as in Docker.
    for source in sources {
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
        let request = req.copy_of(Source::Context(dir), &name);
        touched.extend(req.copy_unpacking(&request, root, req.unpack == Some(true))?);
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

    /// ADD of `sources` from the context `ctx` (its scratch dir too) into
    /// `root`, with nothing resolved while keying.
    fn add_local(
        ctx: &Path,
        sources: &[String],
        dest: &str,
        chown: Option<(u32, u32)>,
        unpack: Option<bool>,
        root: &Path,
    ) -> Result<Vec<PathBuf>, AddError> {
        let copy = CopyRequest {
            source: Source::Context(ctx),
            sources,
            dest,
            chown,
            chmod: None,
            ignore: None,
            excludes: &[],
            parents: false,
        };
        let request = AddRequest {
            copy,
            keep_git_dir: false,
            checksum: None,
            unpack,
            scratch: ctx,
            resolved: &Resolved::default(),
        };
        add(&request, root)
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
        let run = |sources: &[&str], dest: &str, chown, unpack| {
            let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
            add_local(&ctx, &sources, dest, chown, unpack, &root)
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
        let run =
            |dest: &str, unpack| add_local(dir.path(), &url, dest, Some((5, 6)), unpack, &root);
        run("/dl/", None).unwrap();
        let kept = fs::metadata(root.join("dl/pkg.tar.gz")).unwrap();
        assert_eq!(
            (kept.mode() & 0o7777, kept.uid(), kept.gid()),
            (0o600, 5, 6)
        );
        run("/x", Some(true)).unwrap();
        assert_eq!(fs::read_to_string(root.join("x/d/f")).unwrap(), "hello");
    }

    #[test]
    fn the_copy_rules_an_add_breaks_name_add() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "a").unwrap();
        fs::write(dir.path().join("b"), "b").unwrap();
        let sources = ["a".to_string(), "b".to_string()];
        for unpack in [None, Some(false)] {
            let root = dir.path().join("root");
            let err = add_local(dir.path(), &sources, "/file", None, unpack, &root)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("when using ADD with more than one source file"),
                "{err}"
            );
        }
    }
}
