//! What a COPY or ADD source is and how to get it.
//!
//! - [`git`]: a Git repository, `URL[#ref[:subdir]]`, fetched with `git`.
pub mod git;
