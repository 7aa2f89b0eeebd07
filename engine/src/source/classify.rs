//! What a COPY or ADD source string names (a file to download, a Git
//! repository, or a local path), and ADD's `--checksum` as a type. Pure:
//! planning and keying ask here without fetching anything.
use std::fmt;
use std::str::FromStr;

use crate::excerpt::excerpt;

/// The kinds of source an ADD takes (COPY takes only local ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// An HTTP(S) URL of a file, downloaded.
    Download,
    /// A Git repository (see [`is_git`]), fetched with `git`.
    Git,
    /// A path in the context or in another stage's root.
    Local,
}

impl SourceKind {
    pub fn of(source: &str) -> SourceKind {
        if is_git(source) {
            SourceKind::Git
        } else if is_url(source) {
            SourceKind::Download
        } else {
            SourceKind::Local
        }
    }
}

/// Whether a source is an HTTP(S) URL (a download, or a Git repository:
/// see [`is_git`]).
pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// Whether an ADD source is a file to download.
pub fn is_download(source: &str) -> bool {
    SourceKind::of(source) == SourceKind::Download
}

/// BuildKit's test for a Git source (`gitutil.ParseGitRef`): a Git
/// scheme or shorthand, or an HTTP(S) (or, for local tests and mirrors,
/// `file://`) URL whose path ends with `.git`.
pub fn is_git(source: &str) -> bool {
    if ["git://", "git@", "github.com/", "ssh://"]
        .iter()
        .any(|p| source.starts_with(p))
    {
        return true;
    }
    if !is_url(source) && !source.starts_with("file://") {
        return false;
    }
    let without_fragment = source.split('#').next().unwrap_or_default();
    let path = without_fragment
        .split('?')
        .next()
        .unwrap_or_default()
        .splitn(4, '/')
        .nth(3)
        .unwrap_or_default();
    path.trim_end_matches('/').ends_with(".git")
}

/// A digest algorithm `--checksum` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The length of its digest in hex.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha384 => 96,
            Algorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--checksum` of a download: `<algorithm>:<hex>`, the hex lowercased.
/// (A Git source's `--checksum` is a commit id instead, never this.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    pub algorithm: Algorithm,
    /// The expected digest, lowercase hex.
    pub hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --checksum {:?}: expected sha256:<hex> (or sha384:, sha512:)", excerpt(.0))]
pub struct ChecksumError(pub String);

impl Checksum {
    pub fn parse(checksum: &str) -> Result<Checksum, ChecksumError> {
        let invalid = || ChecksumError(checksum.to_string());
        let (algorithm, hex) = checksum.split_once(':').ok_or_else(invalid)?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            _ => return Err(invalid()),
        };
        if hex.len() != algorithm.hex_len() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        Ok(Checksum {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

impl FromStr for Checksum {
    type Err = ChecksumError;

    fn from_str(s: &str) -> Result<Checksum, ChecksumError> {
        Checksum::parse(s)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_classified() {
        for (source, kind) in [
            ("https://h/f.tar.gz", SourceKind::Download),
            ("http://h/f?x=1", SourceKind::Download),
            ("https://h/repo.git#main:sub", SourceKind::Git),
            ("https://h/repo.git/", SourceKind::Git),
            ("file:///srv/repo.git", SourceKind::Git),
            ("git://h/r", SourceKind::Git),
            ("git@github.com:a/b", SourceKind::Git),
            ("github.com/a/b", SourceKind::Git),
            ("ssh://h/r", SourceKind::Git),
            ("file:///srv/f", SourceKind::Local),
            ("src/app.git", SourceKind::Local),
            ("a.txt", SourceKind::Local),
        ] {
            assert_eq!(SourceKind::of(source), kind, "{source}");
        }
        assert!(is_download("https://h/f") && !is_download("https://h/r.git"));
        assert!(is_url("https://h/r.git") && !is_url("file:///r.git"));
    }

    #[test]
    fn checksums_are_parsed() {
        let zero = format!("sha256:{}", "0".repeat(64));
        assert!(Checksum::parse(&zero).is_ok());
        assert!(Checksum::parse("sha256:abc").is_err());
        assert!(Checksum::parse(&format!("md5:{}", "0".repeat(32))).is_err());
        let upper = format!("sha512:{}", "AB".repeat(64));
        let parsed: Checksum = upper.parse().unwrap();
        assert_eq!(parsed.algorithm, Algorithm::Sha512);
        assert_eq!(parsed.to_string(), upper.to_ascii_lowercase());
        let err = Checksum::parse("sha1:00").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --checksum \"sha1:00\": expected sha256:<hex> (or sha384:, sha512:)"
        );
    }
}
