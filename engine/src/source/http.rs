//! HTTP(S) downloads for ADD: a URL's file lands as a file of mode 0600
//! (Docker's) named after the URL's last path segment, with the mtime of
//! `Last-Modified` when the server sends one. A `--checksum` is verified
//! while the body streams to disk, before anything reaches a root.
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::excerpt::excerpt;
use crate::source::classify::{Algorithm, Checksum};

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("downloading {}: {source}", excerpt(.url))]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("downloading {}: the server answered {status}", excerpt(.url))]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("checksum mismatch for {}: expected {expected}, got {}:{actual}", excerpt(.url), expected.algorithm)]
    Mismatch {
        url: String,
        expected: Checksum,
        actual: String,
    },
    #[error("downloading {}: the download thread panicked", excerpt(.url))]
    Panicked { url: String },
    /// The download's own runtime could not start.
    #[error(transparent)]
    Runtime(io::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DownloadError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> DownloadError + '_ {
        move |source| DownloadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn http(url: &str) -> impl FnOnce(reqwest::Error) -> DownloadError + '_ {
        move |source| DownloadError::Http {
            url: url.to_string(),
            source,
        }
    }
}

/// A digest computed while streaming a download.
enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Default::default()),
            Algorithm::Sha384 => Hasher::Sha384(Default::default()),
            Algorithm::Sha512 => Hasher::Sha512(Default::default()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha384(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha384(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// Fails unless `actual` (hex) is what `--checksum` says.
fn verify(url: &str, expected: &Checksum, actual: &str) -> Result<(), DownloadError> {
    if expected.hex != actual {
        return Err(DownloadError::Mismatch {
            url: url.to_string(),
            expected: expected.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// The name a download gets in a destination directory: the URL path's
/// last segment (percent-decoded), as BuildKit without Content-Disposition.
fn file_name_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .split_once('/')
        .map_or("", |(_, p)| p);
    let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    let decoded = percent_decode(last);
    if decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains('/') {
        "download".into()
    } else {
        decoded
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110's preferred
/// form) as seconds since the epoch.
fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: i64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as i64
        + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + m * 60 + sec)
}

/// Downloads `url` into a new directory under `scratch`: the directory
/// (removed when dropped) and the file's path.
pub fn download_to_new_dir(
    url: &str,
    checksum: Option<&Checksum>,
    scratch: &Path,
) -> Result<(tempfile::TempDir, PathBuf), DownloadError> {
    let dir = tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(scratch)
        .map_err(DownloadError::io(scratch))?;
    let file = dir.path().join(download(url, checksum, dir.path())?);
    Ok((dir, file))
}

/// Downloads `url` into the directory `into` and returns the file's name.
/// The body streams to disk; with a checksum it is verified first.
pub fn download(
    url: &str,
    checksum: Option<&Checksum>,
    into: &Path,
) -> Result<String, DownloadError> {
    let name = file_name_of(url);
    let path = into.join(&name);
    // Its own thread and runtime: the builder calls steps from a runtime
    // thread (inside `block_in_place`), tests from none.
    let (file, modified) = std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(DownloadError::Runtime)?
                .block_on(fetch(url, checksum, &path))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(DownloadError::Panicked {
                url: url.to_string(),
            })
        })
    })?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(DownloadError::io(&path))?;
    if let Some(secs) = modified {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
        file.set_modified(time).map_err(DownloadError::io(&path))?;
    }
    Ok(name)
}

/// GETs `url` into `path`: the open file and the Last-Modified time.
async fn fetch(
    url: &str,
    checksum: Option<&Checksum>,
    path: &Path,
) -> Result<(fs::File, Option<i64>), DownloadError> {
    let client = reqwest::Client::builder()
        .build()
        .map_err(DownloadError::http(url))?;
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(DownloadError::http(url))?;
    if !response.status().is_success() {
        return Err(DownloadError::Status {
            url: url.to_string(),
            status: response.status(),
        });
    }
    let modified = response
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    let mut file = fs::File::create(path).map_err(DownloadError::io(path))?;
    let mut hasher = checksum.map(|c| Hasher::new(c.algorithm));
    while let Some(chunk) = response.chunk().await.map_err(DownloadError::http(url))? {
        if let Some(h) = &mut hasher {
            h.update(&chunk);
        }
        file.write_all(&chunk).map_err(DownloadError::io(path))?;
    }
    if let (Some(checksum), Some(h)) = (checksum, hasher) {
        verify(url, checksum, &h.finish())?;
    }
    Ok((file, modified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn checksums_are_verified() {
        let zero = Checksum::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
        let hello = hex::encode(sha2::Sha256::digest(b"hello"));
        let good = Checksum::parse(&format!("sha256:{}", hello.to_uppercase())).unwrap();
        assert!(verify("u", &good, &hello).is_ok());
        let err = verify("http://x/f", &zero, &hello).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("checksum mismatch for http://x/f"), "{err}");
    }

    #[test]
    fn urls_name_files_and_dates_parse() {
        assert_eq!(
            file_name_of("https://h/a/b/file.tar.gz?x=1#y"),
            "file.tar.gz"
        );
        assert_eq!(file_name_of("http://h/dir/"), "dir");
        assert_eq!(file_name_of("http://h"), "download");
        assert_eq!(file_name_of("http://h/a%20b"), "a b");
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784111777)
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn downloads_verify_their_checksum() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\nhello",
                );
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/files/greeting.txt");
        let good = format!("sha256:{}", hex::encode(sha2::Sha256::digest(b"hello")));
        let good = Checksum::parse(&good).unwrap();
        let name = download(&url, Some(&good), dir.path()).unwrap();
        assert_eq!(name, "greeting.txt");
        let meta = fs::metadata(dir.path().join(&name)).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(meta.mtime(), 784111777);
        let bad = Checksum::parse(&format!("sha256:{}", "1".repeat(64))).unwrap();
        let err = download(&url, Some(&bad), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
}
