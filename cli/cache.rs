//! `kiln cache`: look at and look after the state dir.
use std::time::Duration;

use anyhow::{bail, Context, Result};

use kiln_cachestore::unpacked::UnpackedLayers;
use kiln_cachestore::{gc, BlobStore, Index};

use crate::args::{CacheArgs, CacheCommand};
use crate::build::open_state_dir;

/// `10GiB`, `500M`, `1024`: binary units, as BuildKit reads sizes.
fn parse_size(flag: &str, s: &str) -> Result<u64> {
    kiln_engine::dockerfile::parse_size(s)
        .with_context(|| format!("{flag} {s:?}: expected a size such as 10GiB"))
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}

pub fn run(a: CacheArgs) -> Result<()> {
    // What a killed rootless build left is owned by the caller's
    // subordinate ids: only its user namespace's root may remove it.
    if matches!(a.command, CacheCommand::Gc { .. } | CacheCommand::Prune)
        && !kiln_engine::running_as_root()
    {
        // No subordinate ids or no newuidmap: no rootless build can have
        // left anything, and an unprivileged one left only the caller's.
        if kiln_engine::user_namespace_missing().is_none() {
            crate::build::enter_user_namespace(kiln_engine::become_root())?;
        }
    }
    let state = open_state_dir(a.cache_dir.as_deref())?;
    let at = || format!("--cache-dir {}", state.path().display());
    let store = BlobStore::open(&state).with_context(at)?;
    let index = Index::open(&state).with_context(at)?;
    match a.command {
        CacheCommand::Stats => {
            let s = gc::stats(&store, &index)?;
            println!("entries: {}", s.entries);
            println!("blobs:   {} ({})", s.blobs, human(s.blob_bytes));
            let unpacked = UnpackedLayers::open(&state).with_context(at)?.count()?;
            println!("unpacked layers: {unpacked}");
        }
        CacheCommand::Ls => {
            let now = kiln_cachestore::index::now_secs();
            for (key, entry) in index.all_steps()? {
                let age = Duration::from_secs(now.saturating_sub(entry.created));
                let layer = match (&entry.layer, &entry.lazy) {
                    // No blob yet: the tar's digest and size.
                    (Some(l), Some(_)) => {
                        format!("{} {} (lazy)", l.diff_id, human(l.descriptor.size))
                    }
                    (Some(l), None) => {
                        format!("{} {}", l.descriptor.digest, human(l.descriptor.size))
                    }
                    (None, _) => "(no layer)".into(),
                };
                println!("{key} {layer} {} old", humantime::format_duration(age));
            }
        }
        CacheCommand::Gc {
            max_size,
            older_than,
        } => {
            let max = max_size
                .as_deref()
                .map(|s| parse_size("--max-size", s))
                .transpose()?;
            let r = gc::gc(&state, &store, &index, older_than.into(), max)?;
            println!(
                "removed {} entries, {} blobs ({}), {} unpacked layers, {} abandoned build dirs",
                r.entries_removed,
                r.blobs_removed,
                human(r.bytes_freed),
                r.unpacked_removed,
                r.build_dirs_removed
            );
            if r.live_builds > 0 {
                println!(
                    "{} build(s) running: unreferenced blobs and unpacked layers kept until they finish",
                    r.live_builds
                );
            }
        }
        CacheCommand::Verify => {
            let r = gc::verify(&state, &store, &index)?;
            println!(
                "checked {} blobs: {} corrupt removed, {} entries without a blob dropped, {} stale temp files removed",
                r.blobs_checked, r.bad_blobs_removed, r.entries_without_blobs, r.temp_files_removed
            );
            if !r.clean() {
                bail!("the cache had damage (repaired): the next build rebuilds what was lost");
            }
        }
        CacheCommand::Prune => {
            let r = gc::prune(&state, &store, &index)?;
            println!(
                "removed {} entries, {} blobs ({}), {} unpacked layers",
                r.entries_removed,
                r.blobs_removed,
                human(r.bytes_freed),
                r.unpacked_removed
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("f", "10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("f", "512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("f", "1024").unwrap(), 1024);
        assert!(parse_size("f", "lots").is_err());
        assert!(parse_size("f", "3X").is_err());
        assert_eq!(human(1536), "1.5 KiB");
    }
}
