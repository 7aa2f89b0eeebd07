use std::path::PathBuf;

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
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidReference { reference: String, message: String },
    #[error("registry {registry}: {operation} {reference}: {message}")]
    Registry {
        registry: String,
        operation: &'static str,
        reference: String,
        message: String,
        failure: RegistryFailure,
        /// How long the registry asked to wait first (`Retry-After`).
        retry_after: Option<std::time::Duration>,
    },
    #[error("{what}: {message}")]
    Malformed { what: String, message: String },
    #[error("cache index {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("OCI layout {path}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("{0}")]
    Busy(String),
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
