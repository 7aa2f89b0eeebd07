use std::path::PathBuf;

use kiln_cachestore::digest::Digest;

use crate::excerpt::excerpt;

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
    #[error("{file}:{line}: {instruction} failed: {failure}")]
    Step {
        file: String,
        line: usize,
        instruction: String,
        // Boxed: the executor's errors are large, and this one adds a line.
        #[source]
        failure: Box<StepFailure>,
    },
    #[error("base image {}: {source}", excerpt(.reference))]
    BaseImage {
        reference: String,
        // Boxed: a registry error is large, and this one adds a reference.
        #[source]
        source: Box<kiln_cachestore::CacheStoreError>,
    },
    #[error(transparent)]
    Store(#[from] kiln_cachestore::CacheStoreError),
    /// A background upload (`uploads.rs`): what it was, and why it failed.
    /// Shared: every waiter on the upload sees the one error.
    #[error("upload of {what} failed: {source}")]
    Upload {
        what: String,
        #[source]
        source: std::sync::Arc<kiln_cachestore::CacheStoreError>,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: {message}")]
    Layer { layer: Digest, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Why a step failed, with its cause: the error of the module that ran
/// it, or (where none is typed yet) a message.
#[derive(Debug, thiserror::Error)]
pub enum StepFailure {
    #[error(transparent)]
    Copy(#[from] crate::exec::copy::CopyError),
    #[error(transparent)]
    Add(#[from] crate::exec::add::AddError),
    #[error(transparent)]
    User(#[from] crate::exec::users::UserError),
    #[error(transparent)]
    Git(#[from] crate::source::git::GitError),
    #[error(transparent)]
    Download(#[from] crate::source::http::DownloadError),
    #[error(transparent)]
    Mount(#[from] crate::exec::mounts::MountError),
    #[error(transparent)]
    Emulation(#[from] crate::exec::emulation::EmulationError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A RUN whose command exited non-zero (or was killed: 128 + signal).
    #[error("{} returned a non-zero code: {code}", quote_argv(.argv))]
    Exited { argv: Vec<String>, code: i32 },
    /// A RUN that must run where no isolation can be set up.
    #[error("this RUN must run, and no RUN isolation is available here: {why}. To run it, give the user subordinate ids (/etc/subuid and /etc/subgid) and install newuidmap and newgidmap (the uidmap package), run the pod with a user namespace of its own (hostUsers: false), or run Kiln as root in the container. A build whose steps that run have no RUN needs none of these")]
    NoIsolation { why: String },
    #[error("{0}")]
    Message(String),
}

/// A command as `["/bin/sh", "-c", "..."]`, each word cut by
/// [`excerpt`]: a RUN line can be megabytes long.
fn quote_argv(argv: &[String]) -> String {
    let words: Vec<String> = argv.iter().map(|w| format!("{:?}", excerpt(w))).collect();
    format!("[{}]", words.join(", "))
}

impl From<String> for StepFailure {
    fn from(message: String) -> Self {
        StepFailure::Message(message)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_quotes_an_excerpt_of_its_command() {
        let script = format!("echo {}", "a".repeat(3 << 20));
        let failure = StepFailure::Exited {
            argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
            code: 127,
        };
        let e = BuildError::Step {
            file: "Dockerfile".into(),
            line: 2,
            instruction: "RUN".into(),
            failure: Box::new(failure),
        };
        assert_eq!(
            e.to_string(),
            format!(
                "Dockerfile:2: RUN failed: [\"/bin/sh\", \"-c\", \"{}\"…] returned a non-zero code: 127",
                &script[..200]
            )
        );
    }

    #[test]
    fn a_short_command_is_quoted_whole() {
        let failure = StepFailure::Exited {
            argv: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
            code: 3,
        };
        assert_eq!(
            failure.to_string(),
            r#"["/bin/sh", "-c", "exit 3"] returned a non-zero code: 3"#
        );
    }
}
