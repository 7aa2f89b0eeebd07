//! Git sources, `URL[#ref[:subdir]]`, as BuildKit and Kaniko take them for
//! a Git build context and for `ADD`: fetched with the `git` command, one
//! ref, shallow. `git://` URLs are fetched over https, as Kaniko does.
//! Credentials for private repositories come from `GIT_USERNAME` and
//! `GIT_PASSWORD` (Kaniko's) or git's own configuration; the password never
//! appears in an error.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::excerpt::excerpt;
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("running git (install git for Git sources): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("git {op} failed: {message}")]
    Failed { op: String, message: String },
    #[error("git ls-remote: no ref {} in the repository", excerpt(.0))]
    NoSuchRef(String),
    #[error("{} moved during the build: it was commit {expected}, now {found}", excerpt(.reference))]
    Moved {
        reference: String,
        expected: String,
        found: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSource {
    /// What git fetches from.
    url: String,
    /// The ref (branch, tag, commit) to fetch; the remote's HEAD if none.
    pub reference: Option<String>,
    /// The directory of the repository that is the source ("" for all).
    pub subdir: String,
}

impl GitSource {
    pub fn parse(spec: &str) -> GitSource {
        let (url, fragment) = spec.split_once('#').unwrap_or((spec, ""));
        let (reference, subdir) = fragment.split_once(':').unwrap_or((fragment, ""));
        let url = match url.strip_prefix("git://") {
            Some(rest) => format!("https://{rest}"),
            None if url.starts_with("github.com/") => format!("https://{url}"),
            None => url.to_string(),
        };
        GitSource {
            url,
            reference: Some(reference.to_string()).filter(|r| !r.is_empty()),
            subdir: subdir.to_string(),
        }
    }

    fn wanted(&self) -> &str {
        self.reference.as_deref().unwrap_or("HEAD")
    }

    /// The URL with the credentials from the environment, when set.
    fn fetch_url(&self) -> String {
        match (
            std::env::var("GIT_USERNAME"),
            std::env::var("GIT_PASSWORD"),
            self.url.strip_prefix("https://"),
        ) {
            (Ok(user), Ok(password), Some(rest)) => format!("https://{user}:{password}@{rest}"),
            _ => self.url.clone(),
        }
    }

    /// The commit the ref names now: the ref itself when it is a commit
    /// id, else what the remote says (`git ls-remote`).
    pub fn resolve(&self) -> Result<String, GitError> {
        let wanted = self.wanted();
        if wanted.len() == 40 && wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(wanted.to_ascii_lowercase());
        }
        let url = self.fetch_url();
        // A bare name can only be a tag or a branch: list those alone, not
        // every ref a forge keeps (pull requests, changes).
        let out = match wanted {
            "HEAD" => git(None, &["ls-remote", &url])?,
            w if w.starts_with("refs/") => git(None, &["ls-remote", &url])?,
            _ => git(None, &["ls-remote", "--heads", "--tags", &url])?,
        };
        let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
        // As git resolves a name: the ref itself, then a tag, then a
        // branch (never `refs/heads/feature/main` for `main`); an annotated
        // tag stands for its commit (`^{}`).
        let full = match wanted {
            "HEAD" => vec!["HEAD".to_string()],
            w if w.starts_with("refs/") => vec![w.to_string()],
            w => vec![format!("refs/tags/{w}"), format!("refs/heads/{w}")],
        };
        full.iter()
            .find_map(|name| {
                let peeled = format!("{name}^{{}}");
                let sha = |n: &str| {
                    refs.iter()
                        .find(|(_, r)| *r == n)
                        .map(|(s, _)| s.to_string())
                };
                sha(&peeled).or_else(|| sha(name))
            })
            .ok_or_else(|| GitError::NoSuchRef(wanted.to_string()))
    }

    /// A shallow checkout of the ref into `dir` (made here), without its
    /// `.git` unless `keep_git_dir`. Returns the source: `subdir` in it.
    /// With `commit` (what [`resolve`](Self::resolve) said), exactly that
    /// commit: fetched by id, or by ref when the server refuses ids, and
    /// then the ref must still name it.
    pub fn fetch(
        &self,
        dir: &Path,
        keep_git_dir: bool,
        recurse_submodules: bool,
        commit: Option<&str>,
    ) -> Result<PathBuf, GitError> {
        let dir_str = dir.to_string_lossy().into_owned();
        git(None, &["init", "--quiet", &dir_str])?;
        let in_repo = |args: &[&str]| git(Some(dir), args);
        in_repo(&["remote", "add", "origin", &self.fetch_url()])?;
        let fetch = |what: &str| in_repo(&["fetch", "--quiet", "--depth", "1", "origin", what]);
        match commit {
            // The ref is itself the id: no ref to fall back on.
            Some(id) if id.eq_ignore_ascii_case(self.wanted()) => {
                fetch(id)?;
            }
            Some(id) if fetch(id).is_ok() => {}
            Some(id) => {
                fetch(self.wanted())?;
                let found = in_repo(&["rev-parse", "FETCH_HEAD^{commit}"])?;
                if found.trim() != id {
                    return Err(GitError::Moved {
                        reference: self.wanted().to_string(),
                        expected: id.to_string(),
                        found: found.trim().to_string(),
                    });
                }
            }
            None => {
                fetch(self.wanted())?;
            }
        }
        in_repo(&["checkout", "--quiet", "FETCH_HEAD"])?;
        if recurse_submodules {
            in_repo(&[
                "submodule",
                "update",
                "--quiet",
                "--init",
                "--recursive",
                "--depth",
                "1",
            ])?;
        }
        if !keep_git_dir {
            let git_dir = dir.join(".git");
            std::fs::remove_dir_all(&git_dir).map_err(|source| GitError::Io {
                path: git_dir,
                source,
            })?;
        }
        Ok(dir.join(&self.subdir))
    }
}

/// Runs git (in `repo` when given) and returns its stdout.
fn git(repo: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
    let mut cmd = Command::new("git");
    if let Some(repo) = repo {
        cmd.arg("-C").arg(repo);
    }
    // Never a prompt: a missing credential is an error, not a hang.
    let out = cmd
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(GitError::Spawn)?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Ok(password) = std::env::var("GIT_PASSWORD") {
            if !password.is_empty() {
                message = message.replace(&password, "***");
            }
        }
        return Err(GitError::Failed {
            op: args.first().copied().unwrap_or_default().to_string(),
            message,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_ref_and_subdir() {
        let s = GitSource::parse("git://github.com/acme/app.git#v1.2:cmd/tool");
        assert_eq!(s.url, "https://github.com/acme/app.git");
        assert_eq!(s.reference.as_deref(), Some("v1.2"));
        assert_eq!(s.subdir, "cmd/tool");
        let s = GitSource::parse("https://example.com/r.git");
        assert_eq!((s.reference, s.subdir.as_str()), (None, ""));
        let s = GitSource::parse("git@github.com:acme/app.git#main");
        assert_eq!(s.url, "git@github.com:acme/app.git");
        assert_eq!(s.reference.as_deref(), Some("main"));
    }

    #[test]
    fn resolves_and_fetches_a_local_repository() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let sh = |script: &str| {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "{script}");
        };
        sh(
            "git init -q -b main repo && cd repo && mkdir sub && echo hi > sub/f \
            && git add -A && git -c user.email=t@e -c user.name=t commit -q -m one \
            && git tag -a -m v1 v1 && git checkout -q -b feature/main \
            && git -c user.email=t@e -c user.name=t commit -q --allow-empty -m other \
            && git checkout -q main",
        );
        let head = String::from_utf8(
            Command::new("git")
                .args(["-C", repo.to_str().unwrap(), "rev-parse", "HEAD"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let url = format!("file://{}", repo.display());
        for fragment in ["", "#main", "#v1", &format!("#{}", head.trim())] {
            let source = GitSource::parse(&format!("{url}{fragment}"));
            assert_eq!(source.resolve().unwrap(), head.trim(), "{fragment}");
        }
        assert!(matches!(
            GitSource::parse(&format!("{url}#nope")).resolve(),
            Err(GitError::NoSuchRef(_))
        ));
        let source = GitSource::parse(&format!("{url}#v1:sub"));
        let out = source
            .fetch(&dir.path().join("co"), false, false, None)
            .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "hi\n");
        assert!(!dir.path().join("co/.git").exists());

        // The branch moves on after keying: the build still gets the
        // commit it was keyed by; a commit the server cannot give is an
        // error naming both.
        sh("cd repo && echo two > sub/f && git -c user.email=t@e -c user.name=t commit -qam two");
        let main = GitSource::parse(&format!("{url}#main:sub"));
        let out = main
            .fetch(&dir.path().join("pinned"), false, false, Some(head.trim()))
            .unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "hi\n");
        let gone = "0".repeat(40);
        let err = main
            .fetch(&dir.path().join("moved"), false, false, Some(&gone))
            .unwrap_err();
        assert!(matches!(err, GitError::Moved { .. }), "{err}");
    }
}
