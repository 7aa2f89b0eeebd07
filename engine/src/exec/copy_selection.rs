//! What a COPY reads: its sources as written, globs expanded and links at
//! the top followed inside the source root, without what the context's
//! `.dockerignore` hides. The copy and the step's key see one selection.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_cachestore::Index;

use super::copy::CopyError;
use crate::context::{Filter, Ignore};
use crate::key;
use crate::rootfs::{clean_relative, resolve_in_root};

/// One source after glob expansion.
pub(super) struct Selected {
    /// Index of the source as written.
    pub(super) index: usize,
    /// Its path relative to the source root, as matched (links not followed).
    pub(super) rel: PathBuf,
    pub(super) host: PathBuf,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// What a COPY reads, as its key sees it: the selection the copy itself
/// makes.
pub struct Selection<'a> {
    /// The host paths, globs expanded and top-level links followed.
    hosts: Vec<PathBuf>,
    /// What each glob matched, relative to the source root: those names
    /// are what the copy writes, where a source as written names the rest.
    matched: Vec<PathBuf>,
    /// The context's `.dockerignore`, applied below a directory source.
    filter: Option<Filter<'a>>,
    /// Whether owners count: a copy from another stage keeps them, while
    /// the context's files are copied as root.
    with_owner: bool,
}

impl<'a> Selection<'a> {
    fn of(sources: &[String], selected: Vec<Selected>, filter: Option<Filter<'a>>) -> Self {
        let matched = selected
            .iter()
            .filter(|s| has_glob(&sources[s.index]))
            .map(|s| s.rel.clone())
            .collect();
        let hosts = selected.into_iter().map(|s| s.host).collect();
        Selection {
            hosts,
            matched,
            filter,
            with_owner: filter.is_none(),
        }
    }

    /// The digest of the selected files and the names globs matched, for a
    /// step's key ([`key::hash_sources_cached`], with `stats` as its cache).
    pub fn digest(&self, stats: Option<&Index>) -> io::Result<String> {
        let digest = key::hash_sources_cached(&self.hosts, self.with_owner, self.filter, stats)?;
        Ok(key::with_matched(digest, &self.matched))
    }
}

/// What a COPY from the context reads, without what `ignore` excludes.
pub fn selected_context_sources<'a>(
    context: &'a Path,
    ignore: &'a Ignore,
    sources: &[String],
) -> Result<Selection<'a>, CopyError> {
    let filter = Filter {
        root: context,
        ignore,
    };
    let selected = expand_sources(context, sources, Some(filter))?;
    Ok(Selection::of(sources, selected, Some(filter)))
}

/// What a `COPY --from` reads in another stage's `root`.
pub fn selected_root_sources(
    root: &Path,
    sources: &[String],
) -> Result<Selection<'static>, CopyError> {
    let selected = expand_sources(root, sources, None)?;
    Ok(Selection::of(sources, selected, None))
}

/// Expands sources (globs included) to host paths, failing on a source that
/// matches nothing (or only what the filter hides).
pub(super) fn expand_sources(
    src_root: &Path,
    sources: &[String],
    filter: Option<Filter>,
) -> Result<Vec<Selected>, CopyError> {
    let shows = |host: &Path| filter.is_none_or(|f| f.shows(host));
    let mut out = Vec::new();
    for (index, s) in sources.iter().enumerate() {
        let rel = clean_relative(Path::new(s));
        if has_glob(s) {
            let pattern = format!(
                "{}/{}",
                glob::Pattern::escape(&src_root.to_string_lossy()),
                rel.to_string_lossy()
            );
            let mut matched: Vec<PathBuf> = glob::glob(&pattern)
                .map_err(|source| CopyError::Pattern {
                    pattern: s.clone(),
                    source,
                })?
                .filter_map(Result::ok)
                .filter(|p| shows(p))
                .collect();
            if matched.is_empty() {
                return Err(CopyError::NoMatch(s.clone()));
            }
            matched.sort();
            out.extend(matched.into_iter().map(|host| Selected {
                index,
                rel: host.strip_prefix(src_root).unwrap_or(&host).to_path_buf(),
                host,
            }));
        } else {
            // A top-level link is followed, but only inside the source root.
            let host = resolve_in_root(src_root, &rel, true).map_err(CopyError::io(s))?;
            if fs::symlink_metadata(&host).is_err() {
                return Err(CopyError::Missing(s.clone()));
            }
            // Both the path as written and where its links lead must be
            // visible, as in a context BuildKit sent without them.
            if !shows(&src_root.join(&rel)) || !shows(&host) {
                return Err(CopyError::Ignored(s.clone()));
            }
            out.push(Selected { index, rel, host });
        }
    }
    Ok(out)
}
