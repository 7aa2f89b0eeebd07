//! `--context` as Kaniko and BuildKit take it: a directory (`DIR`,
//! `dir://DIR`), a tarball (`tar://PATH`, plain or compressed;
//! `tar://stdin` or `-` for one on stdin), or a git repository
//! (`git://host/repo.git[#ref[:subdir]]`, cloned over https as Kaniko does,
//! or any `https://`, `http://`, `file://` URL ending in `.git`), then
//! `--context-sub-path`. Whatever is fetched lands in `scratch`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use kiln_engine::{archive, GitSource};

/// Kaniko's `--git` options for git contexts.
#[derive(Debug, Default)]
pub struct GitOptions {
    /// Fetched when the URL names no ref.
    pub branch: Option<String>,
    pub recurse_submodules: bool,
}

impl GitOptions {
    pub fn parse(specs: &[String]) -> Result<GitOptions> {
        let mut o = GitOptions::default();
        for spec in specs {
            let flag = || format!("--git {spec}");
            let bool_of = |v: &str| -> Result<bool> {
                v.parse()
                    .with_context(|| format!("{}: expected true or false", flag()))
            };
            match spec.split_once('=') {
                Some(("branch", v)) => o.branch = Some(v.to_string()),
                // A shallow fetch of one ref is always single-branch.
                Some(("single-branch", v)) => {
                    bool_of(v)?;
                }
                Some(("recurse-submodules", v)) => o.recurse_submodules = bool_of(v)?,
                _ => bail!(
                    "{}: expected branch=, single-branch= or recurse-submodules=",
                    flag()
                ),
            }
        }
        Ok(o)
    }
}

/// Resolves `spec` to a local directory, fetching into `scratch` when
/// needed. With `pin`, a git context is fetched at the commit its ref
/// names now, which is returned (for `--provenance`).
pub fn resolve(
    spec: &str,
    sub_path: Option<&Path>,
    git: &GitOptions,
    scratch: &Path,
    pin: bool,
) -> Result<(PathBuf, Option<String>)> {
    let mut commit = None;
    let dir = if let Some(path) = spec.strip_prefix("tar://") {
        untar(path, scratch)?
    } else if spec == "-" {
        untar("stdin", scratch)?
    } else if is_git(spec) {
        let (dir, pinned) = clone(spec, git, scratch, pin)?;
        commit = pinned;
        dir
    } else if let Some(scheme) = ["s3://", "gs://", "azblob://", "https://", "http://"]
        .iter()
        .find(|s| spec.starts_with(**s))
    {
        bail!(
            "--context {spec}: {scheme} contexts are not supported; download the archive and use tar://PATH (or tar://stdin)"
        )
    } else {
        PathBuf::from(spec.strip_prefix("dir://").unwrap_or(spec))
    };
    let dir = match sub_path {
        Some(sub) => {
            let clean = kiln_engine::clean_relative(sub);
            if clean.as_os_str().is_empty() && sub != Path::new(".") && sub != Path::new("") {
                bail!(
                    "--context-sub-path {}: must stay inside the context",
                    sub.display()
                );
            }
            dir.join(clean)
        }
        None => dir,
    };
    if !dir.is_dir() {
        bail!("--context {spec}: {} is not a directory", dir.display());
    }
    Ok((dir, commit))
}

fn is_git(spec: &str) -> bool {
    let url = spec.split('#').next().unwrap_or(spec);
    spec.starts_with("git://")
        || spec.starts_with("git@")
        || (["https://", "http://", "file://", "ssh://"]
            .iter()
            .any(|s| url.starts_with(s))
            && url.ends_with(".git"))
}

/// Extracts a (possibly compressed) tarball with the untrusted-layer
/// extractor: nothing in it can write outside the context dir.
fn untar(path: &str, scratch: &Path) -> Result<PathBuf> {
    let dir = scratch.join("context");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = if path == "stdin" {
        // The extractor sniffs compression from a file, so stdin is saved first.
        let saved = scratch.join("context.tar");
        let mut out = std::fs::File::create(&saved)
            .with_context(|| format!("creating {}", saved.display()))?;
        std::io::copy(&mut std::io::stdin().lock(), &mut out).context("--context tar://stdin")?;
        saved
    } else {
        PathBuf::from(path)
    };
    let compression = archive::detect(&file)
        .with_context(|| format!("--context tar://{path}"))?
        .with_context(|| format!("--context tar://{path}: not a tar archive"))?;
    archive::extract(&file, compression, &dir, None)
        .with_context(|| format!("--context tar://{path}"))?;
    Ok(dir)
}

/// `URL[#ref[:subdir]]`: a shallow clone of `ref` (or `--git branch=`),
/// then `subdir`; as BuildKit, the `.git` dir is not part of the context.
/// With `pin`, of the commit the ref names now (`git ls-remote`), returned.
fn clone(
    spec: &str,
    options: &GitOptions,
    scratch: &Path,
    pin: bool,
) -> Result<(PathBuf, Option<String>)> {
    let mut source = GitSource::parse(spec);
    if source.reference.is_none() {
        source.reference = options.branch.clone();
    }
    let at = || format!("--context {spec}");
    let commit = match pin {
        true => Some(source.resolve().with_context(at)?),
        false => None,
    };
    let dir = source
        .fetch(
            &scratch.join("git"),
            false,
            options.recurse_submodules,
            commit.as_deref(),
        )
        .with_context(at)?;
    Ok((dir, commit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_context() {
        assert!(is_git("git://github.com/acme/app.git#main:sub"));
        assert!(is_git("https://example.com/app.git"));
        assert!(is_git("file:///srv/app.git#v1"));
        assert!(!is_git("https://example.com/context.tar.gz"));
        assert!(!is_git("./app.git-not-a-url"));
        let scratch = tempfile::tempdir().unwrap();
        let err = resolve(
            "s3://bucket/ctx.tar.gz",
            None,
            &GitOptions::default(),
            scratch.path(),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tar://"), "{err}");
        let err = resolve(
            "/nonexistent/ctx",
            None,
            &GitOptions::default(),
            scratch.path(),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = resolve(
            ".",
            Some(Path::new("../..")),
            &GitOptions::default(),
            scratch.path(),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--context-sub-path"), "{err}");
    }
}
