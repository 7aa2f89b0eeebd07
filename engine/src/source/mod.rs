//! What a COPY or ADD source is and how to get it.
//!
//! - [`classify`]: what a source string names (a download, a Git
//!   repository, a local path) and `--checksum` as a type;
//! - [`git`]: a Git repository, `URL[#ref[:subdir]]`, fetched with `git`.
pub mod classify;
pub mod git;

pub use classify::{Checksum, SourceKind};
