use std::path::PathBuf;

/// Everything that can stop a build, each naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A Dockerfile problem: `file:line: message`.
    #[error("{file}:{line}: {message}")]
    Dockerfile {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{file}:{line}: {instruction} failed: {message}")]
    Step {
        file: String,
        line: usize,
        instruction: String,
        message: String,
    },
    #[error("base image {reference}: {source}")]
    BaseImage {
        reference: String,
        // Boxed: a registry error is large, and this one adds a reference.
        #[source]
        source: Box<kiln_cachestore::CacheStoreError>,
    },
    #[error(transparent)]
    Store(#[from] kiln_cachestore::CacheStoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: {message}")]
    Layer { layer: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl BuildError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BuildError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds the path to an I/O error, so every message names the file.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, BuildError>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for Result<T, E> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, BuildError> {
        self.map_err(|e| BuildError::io(path, e.into()))
    }
}
