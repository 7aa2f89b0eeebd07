use std::path::PathBuf;

/// What a failure came from: the error of the library or the system call
/// that failed (oci-client's, I/O, serde's, RocksDB's), kept whole so its
/// own causes stay reachable, or Kiln's words where a rule of its own was
/// broken. Messages show it with its causes ([`error_chain`]), so they
/// read the same wherever they are printed; [`error_chain`] then finds
/// each cause said already and does not repeat it.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the cache store: the blob store, the index and the registry client.
#[derive(Debug, thiserror::Error)]
pub enum CacheStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("invalid image reference {reference:?}: {}", error_chain(.source.as_ref()))]
    InvalidReference {
        reference: String,
        #[source]
        source: Cause,
    },
    #[error("registry {registry}: {operation} {reference}: {}", error_chain(.source.as_ref()))]
    Registry {
        registry: String,
        operation: &'static str,
        reference: String,
        #[source]
        source: Cause,
        failure: RegistryFailure,
        /// How long the registry asked to wait first (`Retry-After`).
        retry_after: Option<std::time::Duration>,
    },
    #[error("{what}: {}", error_chain(.source.as_ref()))]
    Malformed {
        what: String,
        #[source]
        source: Cause,
    },
    #[error("cache index {path}: {}", error_chain(.source.as_ref()))]
    Index {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("OCI layout {path}: {}", error_chain(.source.as_ref()))]
    Layout {
        path: PathBuf,
        #[source]
        source: Cause,
    },
    #[error("{live_builds} build(s) are using {state_dir}: prune when they are done")]
    Busy {
        state_dir: PathBuf,
        live_builds: usize,
    },
}

/// What a registry failure says about the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryFailure {
    /// Refused, malformed, not found, a certificate rejected: trying
    /// again gives the same.
    Permanent,
    /// A 5xx, a 429, a dropped or refused connection: worth retrying.
    Transient,
}

/// An error and its causes, each said once: libraries often repeat their
/// source in their own message, and reqwest's alone hides whether a
/// connection was refused or a certificate rejected.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = cause.source();
    }
    text
}

pub type Result<T, E = CacheStoreError> = std::result::Result<T, E>;

/// Adds the path to an I/O error, so every message names the file.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| CacheStoreError::Io {
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cause the message shows is not said again by `error_chain`, nor
    /// is the cause under it, which its own message leaves out.
    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Request(#[source] std::io::Error);
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = CacheStoreError::Registry {
            registry: "r.example".into(),
            operation: "pull blob",
            reference: "r.example/a:1".into(),
            source: Box::new(Request(refused)),
            failure: RegistryFailure::Transient,
            retry_after: None,
        };
        let said = "registry r.example: pull blob r.example/a:1: error sending request: connection refused";
        assert_eq!(err.to_string(), said);
        assert_eq!(error_chain(&err), said);
    }
}
