//! What a COPY or ADD source is and how to get it.
//!
//! - [`classify`]: what a source string names (a download, a Git
//!   repository, a local path) and `--checksum` as a type;
//! - [`archive`]: tar archives, plain or compressed, detected and
//!   extracted (ADD, `tar://` contexts);
//! - [`http`]: downloads, checksums verified as they stream;
//! - [`git`]: a Git repository, `URL[#ref[:subdir]]`, fetched with `git`.
pub mod archive;
pub mod classify;
pub mod git;
pub mod http;
