//! Cache keys: one per step that changes files, chained through the parent
//! key, over a framed and versioned encoding of everything the step's
//! result depends on, and nothing else.
//!
//! A key covers: the parent key (the base image's manifest digest for the
//! first step, the parent stage's last key for `FROM <stage>`), the
//! platform, and the step as it will run: for RUN the command, the env and
//! args it sees (sorted, so reordering ENV lines changes nothing), USER,
//! WORKDIR and a heredoc script; for COPY (and ADD, a kind of its own with
//! `--checksum` and `--unpack`; an ADD of a URL without a checksum always
//! runs, under a key no build shares) the expanded sources,
//! destination, `--chown`, `--chmod`, where the sources come from (the
//! context; a stage's key; an image's digest) and the content of every
//! source file (path, type, mode, content or link target; not mtimes; not
//! what `.dockerignore` hides from the copy either); for
//! WORKDIR/VOLUME the directories and owner. Metadata-only steps are not in
//! the chain: the config comes from the plan, so a LABEL never busts a RUN.
//! A `COPY --from=<stage>` that misses is looked up once more by the
//! content it copies ([`content_key`]).
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use kiln_cachestore::Index;

use crate::context::Filter;
use crate::error::BuildError;
use crate::plan::{Action, CopyFrom, Network, PlannedMount, Step};
use crate::source::classify;

/// Bumped whenever the encoding or the meaning of an input changes.
const VERSION: &str = "kiln-step-key/1";

/// blake3 over length-prefixed fields, so no two inputs can collide by
/// shifting bytes from one field into the next.
pub struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    pub fn new(kind: &str) -> Self {
        let mut h = KeyHasher(blake3::Hasher::new());
        h.field("version", VERSION.as_bytes());
        h.field("kind", kind.as_bytes());
        h
    }

    pub fn field(&mut self, name: &str, value: &[u8]) -> &mut Self {
        for part in [name.as_bytes(), value] {
            self.0.update(&(part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn strings<'a>(
        &mut self,
        name: &str,
        values: impl IntoIterator<Item = &'a String>,
    ) -> &mut Self {
        let values: Vec<&String> = values.into_iter().collect();
        self.field(name, &(values.len() as u64).to_le_bytes());
        for v in values {
            self.field(name, v.as_bytes());
        }
        self
    }

    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// What a step's key depends on besides the step itself.
pub struct KeyInputs<'a> {
    pub parent: &'a str,
    pub platform: &'a str,
    /// COPY: where the sources come from (a stage's last key, an image's
    /// manifest digest; empty for the context).
    pub source_identity: &'a str,
    /// COPY: the digest of the selected source files ([`hash_sources`]).
    pub sources_digest: &'a str,
}

/// The key of a step that changes files; `None` for metadata-only steps.
pub fn step_key(step: &Step, inputs: &KeyInputs) -> Option<String> {
    let mut h = match &step.action {
        Action::Config => return None,
        Action::Run { .. } => KeyHasher::new("run"),
        // ADD is its own kind: the same sources can give another result.
        Action::Copy { add: None, .. } => KeyHasher::new("copy"),
        Action::Copy { add: Some(_), .. } => KeyHasher::new("add"),
        Action::Mkdir { .. } => KeyHasher::new("mkdir"),
    };
    h.field("parent", inputs.parent.as_bytes())
        .field("platform", inputs.platform.as_bytes());
    match &step.action {
        Action::Config => unreachable!("handled above"),
        Action::Run {
            argv,
            env,
            user,
            workdir,
            script,
            mounts,
            network,
        } => {
            let mut env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            env.sort();
            h.strings("argv", argv)
                .strings("env", &env)
                .field("user", user.as_bytes())
                .field("workdir", workdir.as_bytes());
            if let Some((name, content)) = script {
                h.field("script-name", name.as_bytes())
                    .field("script", content.as_bytes());
            }
            // Only when used, so the keys of plain RUNs do not change. A
            // secret counts by id and target, never by content; what binds
            // mount counts through the inputs.
            if !mounts.is_empty() {
                let described: Vec<String> = mounts.iter().map(describe_mount).collect();
                h.strings("mounts", &described)
                    .field("mount-identity", inputs.source_identity.as_bytes())
                    .field("mount-content", inputs.sources_digest.as_bytes());
            }
            if *network != Network::Default {
                h.field("network", format!("{network:?}").as_bytes());
            }
        }
        Action::Copy {
            from,
            sources,
            dest,
            chown,
            chmod,
            add,
            excludes,
            parents,
        } => {
            let from_kind = match from {
                CopyFrom::Context => "context",
                CopyFrom::Stage(_) => "stage",
                CopyFrom::Image(_) => "image",
                CopyFrom::Inline(_) => "inline",
            };
            h.field("from", from_kind.as_bytes())
                .field("from-identity", inputs.source_identity.as_bytes())
                .strings("sources", sources)
                .field("dest", dest.as_bytes())
                .field("chown", chown.as_deref().unwrap_or("").as_bytes())
                .field(
                    "chmod",
                    chmod
                        .map(|m| format!("{m:o}"))
                        .unwrap_or_default()
                        .as_bytes(),
                )
                .field("content", inputs.sources_digest.as_bytes());
            // Only when used, so the keys of plain copies do not change.
            if !excludes.is_empty() {
                h.strings("excludes", excludes);
            }
            if *parents {
                h.field("parents", b"true");
            }
            // Only for ADD, so COPY keys do not change. A URL's content
            // counts through its checksum (the URL itself is a source).
            if let Some(add) = add {
                h.field("checksum", add.checksum.as_deref().unwrap_or("").as_bytes())
                    .field("unpack", format!("{:?}", add.unpack).as_bytes());
                if add.keep_git_dir {
                    h.field("keep-git-dir", b"true");
                }
            }
        }
        Action::Mkdir { paths, owner } => {
            h.strings("paths", paths)
                .field("owner", owner.as_deref().unwrap_or("").as_bytes());
        }
    }
    Some(h.finish())
}

/// The key of "the same COPY on the same parent": a COPY from the context
/// keyed as [`step_key`] does, without the content of its sources. The
/// previous run of a COPY under this key made the layer whose unchanged
/// files the next run may link instead of copying (`exec/copy.rs`). `None`
/// for every other step: only a context's files are hashed one by one.
pub fn reuse_key(step: &Step, parent: &str, platform: &str) -> Option<String> {
    if !matches!(
        step.action,
        Action::Copy {
            from: CopyFrom::Context,
            add: None,
            ..
        }
    ) {
        return None;
    }
    let without_content = KeyInputs {
        parent,
        platform,
        source_identity: "",
        sources_digest: "",
    };
    let mut h = KeyHasher::new("copy-reuse");
    h.field("step", step_key(step, &without_content)?.as_bytes());
    Some(h.finish())
}

/// [`reuse_key`] of every step, chained as `keys` were from `parent`.
pub(crate) fn reuse_keys(
    steps: &[Step],
    keys: &[Option<String>],
    parent: &str,
    platform: &str,
) -> Vec<Option<String>> {
    steps
        .iter()
        .zip(parents(keys, parent))
        .map(|(step, parent)| reuse_key(step, parent, platform))
        .collect()
}

/// The parent each step's key was chained on: the key of the keyed step
/// before it, or `first`.
pub(crate) fn parents<'a>(keys: &'a [Option<String>], first: &'a str) -> Vec<&'a str> {
    let mut parent = first;
    keys.iter()
        .map(|key| {
            let this = parent;
            if let Some(key) = key {
                parent = key;
            }
            this
        })
        .collect()
}

/// The key of a `COPY --from=<stage>` by what it copies: [`step_key`] with
/// the digest of the files it selects in the stage's root in place of the
/// stage's key. A stage built again that made the same files (a comment
/// changed in a source it compiles) gives the copy the content key it had,
/// so the copy, and an image it ends, are what they were, as BuildKit's
/// content-based keys give. The step's own key stays the stage's: a build
/// whose source stage hits needs none of its files to key the copy.
/// `None` for every other step.
pub fn content_key(
    step: &Step,
    parent: &str,
    platform: &str,
    sources_digest: &str,
) -> Option<String> {
    if !matches!(
        step.action,
        Action::Copy {
            from: CopyFrom::Stage(_),
            add: None,
            ..
        }
    ) {
        return None;
    }
    let by_content = KeyInputs {
        parent,
        platform,
        source_identity: "",
        sources_digest,
    };
    let mut h = KeyHasher::new("copy-content");
    h.field("step", step_key(step, &by_content)?.as_bytes());
    Some(h.finish())
}

/// What keying a stage's steps asks of the build: the identity of what
/// they read.
pub(crate) trait StepSources {
    /// The digest of the context files `sources` select, as COPY would
    /// copy them (through `.dockerignore`).
    fn context_digest(&self, step: &Step, sources: &[String]) -> Result<String, BuildError>;
    /// What `url` gives now ([`file_digest`] of its download).
    fn download_digest(&self, step: &Step, url: &str) -> Result<String, BuildError>;
    /// The commit a Git source's ref names now, which `checksum`, when
    /// given, must start with.
    fn git_commit(
        &self,
        step: &Step,
        source: &str,
        checksum: Option<&str>,
    ) -> Result<String, BuildError>;
    /// The key `FROM <stage>` and `COPY --from=<stage>` chain on.
    fn stage_key(&self, stage: usize) -> &str;
    /// An image's manifest digest.
    fn image_digest(&self, reference: &str) -> &str;
}

/// The key of every step (`None` for metadata-only steps), chained from
/// `parent`.
pub(crate) fn step_keys(
    steps: &[Step],
    parent: &str,
    platform: &str,
    sources: &dyn StepSources,
) -> Result<Vec<Option<String>>, BuildError> {
    let mut parent = parent.to_string();
    let mut keys = Vec::new();
    for step in steps {
        let local = |all: &[String]| -> Vec<String> {
            all.iter()
                .filter(|s| !classify::is_download(s))
                .cloned()
                .collect()
        };
        let (identity, digest) = match &step.action {
            // ADD <url> without --checksum: keyed by what the URL gives
            // now (name, Last-Modified and content), as BuildKit does.
            Action::Copy { sources: all, .. } if downloads_unchecked(&step.action) => {
                let mut digests = all
                    .iter()
                    .filter(|s| classify::is_download(s))
                    .map(|url| sources.download_digest(step, url))
                    .collect::<Result<Vec<_>, _>>()?;
                digests.push(sources.context_digest(step, &local(all))?);
                (String::new(), digests.join("\n"))
            }
            // A Git source counts by the commit its ref names now.
            Action::Copy {
                add: Some(spec),
                sources: all,
                ..
            } if all.iter().any(|s| classify::is_git(s)) => {
                let commits = all
                    .iter()
                    .map(|s| sources.git_commit(step, s, spec.checksum.as_deref()))
                    .collect::<Result<Vec<_>, _>>()?;
                (commits.join("\n"), String::new())
            }
            // What .dockerignore hides is not hashed, as not copied; ADD's
            // URLs count through their checksum.
            Action::Copy {
                from: CopyFrom::Context,
                sources: all,
                ..
            } => (String::new(), sources.context_digest(step, &local(all))?),
            Action::Copy {
                from: CopyFrom::Inline(files),
                ..
            } => (String::new(), hash_inline(files)),
            Action::Copy {
                from: CopyFrom::Stage(i),
                ..
            } => (sources.stage_key(*i).to_string(), String::new()),
            Action::Copy {
                from: CopyFrom::Image(r),
                ..
            } => (sources.image_digest(r).to_string(), String::new()),
            Action::Run { mounts, .. } => {
                // What each bind (or cache seed) shows: a stage by its
                // key, an image by its digest, the context by content.
                let mut identity = Vec::new();
                let mut digests = Vec::new();
                for pm in mounts {
                    match &pm.from {
                        None | Some(CopyFrom::Inline(_)) => {}
                        Some(CopyFrom::Context) => {
                            let source = pm.mount.source.clone().unwrap_or_else(|| ".".into());
                            digests.push(sources.context_digest(step, &[source])?);
                        }
                        Some(CopyFrom::Stage(i)) => {
                            identity.push(sources.stage_key(*i).to_string())
                        }
                        Some(CopyFrom::Image(r)) => {
                            identity.push(sources.image_digest(r).to_string())
                        }
                    }
                }
                (identity.join("\n"), digests.join("\n"))
            }
            _ => (String::new(), String::new()),
        };
        let key = step_key(
            step,
            &KeyInputs {
                parent: &parent,
                platform,
                source_identity: &identity,
                sources_digest: &digest,
            },
        );
        if let Some(k) = &key {
            parent = k.clone();
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Whether a step is an ADD of a URL without `--checksum`: its content is
/// unknown until downloaded, so the builder downloads it to key the step.
pub fn downloads_unchecked(action: &Action) -> bool {
    match action {
        Action::Copy {
            add: Some(add),
            sources,
            ..
        } => add.checksum.is_none() && sources.iter().any(|s| classify::is_download(s)),
        _ => false,
    }
}

/// A downloaded file's name, mtime, mode and content, for a step's key.
pub fn file_digest(path: &std::path::Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let content = crate::rootfs::hash_file(path)?;
    let mut h = KeyHasher::new("download");
    h.field(
        "name",
        path.file_name().unwrap_or_default().as_encoded_bytes(),
    )
    .field("mtime", &meta.mtime().to_le_bytes())
    .field("mode", &meta.mode().to_le_bytes())
    .field("content", &content);
    Ok(h.finish())
}

/// A mount's options as one line (secret contents are not options).
fn describe_mount(m: &PlannedMount) -> String {
    let from = match &m.from {
        None => String::new(),
        Some(CopyFrom::Context) => "context".into(),
        Some(CopyFrom::Stage(i)) => format!("stage:{i}"),
        Some(CopyFrom::Image(r)) => format!("image:{r}"),
        Some(CopyFrom::Inline(_)) => "inline".into(),
    };
    let o = &m.mount;
    format!(
        "{:?} from={from} source={:?} target={:?} ro={} id={:?} sharing={:?} mode={:?} uid={:?} gid={:?} env={:?} size={:?} required={}",
        o.kind, o.source, m.target, o.readonly, o.id, o.sharing, o.mode, o.uid, o.gid, o.env, o.size, o.required
    )
}

/// The digest of `COPY <<EOF` sources: each heredoc's name and content.
pub fn hash_inline(files: &[(String, String)]) -> String {
    let mut h = KeyHasher::new("inline");
    for (name, content) in files {
        h.field("name", name.as_bytes())
            .field("content", content.as_bytes());
    }
    h.finish()
}

/// A sources digest with the names its globs matched, which the digest
/// leaves out (it labels each selected source by its place): a file a
/// glob matches renamed is copied under its new name. Unchanged without
/// globs, so the keys of other copies stay as they were.
pub(crate) fn with_matched(digest: String, matched: &[PathBuf]) -> String {
    if matched.is_empty() {
        return digest;
    }
    let mut h = KeyHasher::new("matched");
    h.field("content", digest.as_bytes())
        .field("names", &(matched.len() as u64).to_le_bytes());
    for name in matched {
        h.field("name", name.as_os_str().as_encoded_bytes());
    }
    h.finish()
}

/// One file of a COPY's sources, as the key sees it.
struct SourceEntry {
    rel: String,
    kind: &'static str,
    mode: u32,
    owner: Option<(u32, u32)>,
    content: String,
}

/// Hashes the files a COPY reads: each top-level source and, for a
/// directory, everything below it, in parallel. Paths are relative to each
/// source; mtimes are left out, so touching a file changes nothing.
/// `with_owner` is for sources whose ownership the copy keeps (other
/// stages); the context's files are always copied as root.
pub fn hash_sources(sources: &[PathBuf], with_owner: bool) -> io::Result<String> {
    hash_sources_cached(sources, with_owner, None, None)
}

/// [`hash_sources`] seeing only what `filter` shows (the context through
/// `.dockerignore`, as the copy does), with a stat cache: a file whose identity
/// (path, device, inode, size, mtime, ctime) is in `stats` is not read
/// again, so an unchanged context costs a walk and one batched lookup.
/// Files changed within the last [`RACY`] are never cached, since a write
/// in the same timestamp tick would not change their identity.
pub fn hash_sources_cached(
    sources: &[PathBuf],
    with_owner: bool,
    filter: Option<Filter>,
    stats: Option<&Index>,
) -> io::Result<String> {
    let started = std::time::SystemTime::now();
    let mut entries = Vec::new();
    for (i, top) in sources.iter().enumerate() {
        let is_dir = fs::symlink_metadata(top)?.is_dir();
        collect(top, is_dir, &format!("{i}"), filter, &mut entries)?;
    }
    let metas: Vec<fs::Metadata> = entries
        .par_iter()
        .map(|(host, _)| fs::symlink_metadata(host))
        .collect::<io::Result<_>>()?;
    // An unchanged walk is answered by one lookup, not one per file.
    let tree = stats.map(|_| tree_identity(&entries, &metas, with_owner));
    if let (Some(index), Some(tree)) = (stats, &tree) {
        let known = index
            .get_stats(std::slice::from_ref(tree))
            .map_err(io::Error::other)?
            .remove(0)
            .and_then(|v| String::from_utf8(v).ok());
        if let Some(hash) = known {
            return Ok(hash);
        }
    }
    let identities: Vec<Option<Vec<u8>>> = entries
        .iter()
        .zip(&metas)
        .map(|((host, _), m)| m.is_file().then(|| stat_identity(host, m)))
        .collect();
    let wanted: Vec<Vec<u8>> = identities.iter().flatten().cloned().collect();
    let mut known = match stats {
        Some(index) if !wanted.is_empty() => index
            .get_stats(&wanted)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|v| v.and_then(|v| String::from_utf8(v).ok()))
            .collect(),
        _ => vec![None; wanted.len()],
    }
    .into_iter();
    let cached: Vec<Option<String>> = identities
        .iter()
        .map(|id| id.as_ref().and_then(|_| known.next().flatten()))
        .collect();
    let was_cached: Vec<bool> = cached.iter().map(Option::is_some).collect();
    let hashed: Vec<SourceEntry> = entries
        .into_par_iter()
        .zip(metas.par_iter())
        .zip(cached.into_par_iter())
        .map(|(((host, rel), meta), cached)| describe(&host, rel, meta, cached, with_owner))
        .collect::<io::Result<_>>()?;
    let mut h = KeyHasher::new("sources");
    for e in &hashed {
        h.field("path", e.rel.as_bytes())
            .field("kind", e.kind.as_bytes())
            .field("mode", &e.mode.to_le_bytes())
            .field("content", e.content.as_bytes());
        if let Some((uid, gid)) = e.owner {
            h.field("owner", format!("{uid}:{gid}").as_bytes());
        }
    }
    let hash = h.finish();
    if let (Some(index), Some(tree)) = (stats, tree) {
        let cutoff = started
            .checked_sub(RACY)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let at = |secs: i64, nanos: i64| {
            std::time::Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
        };
        let settled: Vec<bool> = metas
            .iter()
            .map(|m| at(m.mtime(), m.mtime_nsec()).max(at(m.ctime(), m.ctime_nsec())) < cutoff)
            .collect();
        let mut fresh: Vec<(Vec<u8>, Vec<u8>)> = identities
            .into_iter()
            .zip(&settled)
            .zip(&hashed)
            .zip(was_cached)
            .filter_map(|(((id, settled), e), was_cached)| {
                let id = id.filter(|_| *settled && !was_cached)?;
                Some((id, e.content.clone().into_bytes()))
            })
            .collect();
        if settled.iter().all(|s| *s) {
            fresh.push((tree, hash.clone().into_bytes()));
        }
        index.put_stats(fresh);
    }
    Ok(hash)
}

/// The stat-cache key of a whole walk: every entry's key path and identity,
/// owner and mode included, since they enter the hash. `tree-v1` names the
/// scheme, as the value is the hash itself, not a file's content.
fn tree_identity(
    entries: &[(PathBuf, String)],
    metas: &[fs::Metadata],
    with_owner: bool,
) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&[u8::from(with_owner)]);
    for ((host, rel), m) in entries.iter().zip(metas) {
        for part in [host.as_os_str().as_encoded_bytes(), rel.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let (mode, uid, gid) = (m.mode().into(), m.uid().into(), m.gid().into());
        for n in [m.dev(), m.ino(), m.size(), mode, uid, gid] {
            h.update(&n.to_le_bytes());
        }
        for n in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
            h.update(&n.to_le_bytes());
        }
    }
    let mut key = b"tree-v1\0".to_vec();
    key.extend_from_slice(h.finalize().as_bytes());
    key
}

/// Every path below `host` (itself included), sorted, with its key path.
/// Directories are told by their entries' types, so the walk stats nothing:
/// the caller stats every entry at once, in parallel.
fn collect(
    host: &Path,
    is_dir: bool,
    rel: &str,
    filter: Option<Filter>,
    out: &mut Vec<(PathBuf, String)>,
) -> io::Result<()> {
    out.push((host.to_path_buf(), rel.to_string()));
    if is_dir {
        let mut children: Vec<_> = fs::read_dir(host)?
            .map(|e| e.and_then(|e| Ok((e.file_name(), e.file_type()?.is_dir()))))
            .collect::<io::Result<_>>()?;
        children.sort();
        for (name, is_dir) in children {
            let child = host.join(&name);
            if filter.is_some_and(|f| !f.shows(&child)) {
                continue;
            }
            collect(
                &child,
                is_dir,
                &format!("{rel}/{}", name.to_string_lossy()),
                filter,
                out,
            )?;
        }
    }
    Ok(())
}

/// How recently changed a file may be and still enter the stat cache.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// The stat-cache key of a file: its path and everything that changes when
/// its content can have (a rename or replacement changes the inode).
fn stat_identity(host: &Path, m: &fs::Metadata) -> Vec<u8> {
    let mut id = host.as_os_str().as_encoded_bytes().to_vec();
    id.push(0);
    for n in [m.dev(), m.ino(), m.size()] {
        id.extend_from_slice(&n.to_le_bytes());
    }
    for (secs, nanos) in [(m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec())] {
        id.extend_from_slice(&secs.to_le_bytes());
        id.extend_from_slice(&nanos.to_le_bytes());
    }
    id
}

fn describe(
    host: &Path,
    rel: String,
    meta: &fs::Metadata,
    cached: Option<String>,
    with_owner: bool,
) -> io::Result<SourceEntry> {
    let ft = meta.file_type();
    let (kind, content) = if ft.is_file() {
        let content = match cached {
            Some(hash) => hash,
            None => hex::encode(crate::rootfs::hash_file(host)?),
        };
        ("file", content)
    } else if ft.is_symlink() {
        ("link", fs::read_link(host)?.to_string_lossy().into_owned())
    } else if ft.is_dir() {
        ("dir", String::new())
    } else {
        ("other", String::new())
    };
    Ok(SourceEntry {
        rel,
        kind,
        mode: meta.mode() & 0o7777,
        owner: with_owner.then(|| (meta.uid(), meta.gid())),
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::AddSpec;
    use kiln_cachestore::StateDir;

    #[test]
    fn the_stat_cache_skips_reading_settled_files_and_never_racy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let index = Index::open(&StateDir::open(state.path()).unwrap()).unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        let (old, fresh) = (src.join("old"), src.join("fresh"));
        fs::write(&old, "old content").unwrap();
        fs::write(&fresh, "fresh content").unwrap();
        // ctime cannot be set: let the whole tree age past RACY instead,
        // except `fresh`, rewritten just before hashing.
        std::thread::sleep(RACY + std::time::Duration::from_millis(100));
        fs::write(&fresh, "fresh content").unwrap();
        let sources = std::slice::from_ref(&src);
        let plain = hash_sources(sources, false).unwrap();
        assert_eq!(
            hash_sources_cached(sources, false, None, Some(&index)).unwrap(),
            plain
        );
        let id = |p: &Path| stat_identity(p, &fs::symlink_metadata(p).unwrap());
        let stored = index.get_stats(&[id(&old), id(&fresh)]).unwrap();
        assert!(stored[0].is_some(), "a settled file is remembered");
        assert!(stored[1].is_none(), "a racy file is not");
        // A remembered hash is used instead of reading the file ...
        index.put_stats(vec![(id(&old), b"remembered".to_vec())]);
        assert_ne!(
            hash_sources_cached(sources, false, None, Some(&index)).unwrap(),
            plain
        );
        // ... until the file changes: a new identity, read again.
        fs::write(&old, "new content").unwrap();
        fs::write(&old, "old content").unwrap();
        assert_eq!(
            hash_sources_cached(sources, false, None, Some(&index)).unwrap(),
            plain
        );
    }

    #[test]
    fn a_settled_unchanged_walk_is_one_lookup_and_any_change_is_seen() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let index = Index::open(&StateDir::open(state.path()).unwrap()).unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/a"), "a").unwrap();
        std::os::unix::fs::symlink("sub/a", src.join("link")).unwrap();
        std::thread::sleep(RACY + std::time::Duration::from_millis(100));
        let sources = std::slice::from_ref(&src);
        let cached = || hash_sources_cached(sources, false, None, Some(&index)).unwrap();
        let plain = hash_sources(sources, false).unwrap();
        assert_eq!(cached(), plain);
        // The walk's entry answers before any file's: a wrong file entry
        // goes unread while nothing changed.
        let a = src.join("sub/a");
        let id = stat_identity(&a, &fs::symlink_metadata(&a).unwrap());
        let right = index
            .get_stats(std::slice::from_ref(&id))
            .unwrap()
            .remove(0);
        index.put_stats(vec![(id.clone(), b"wrong".to_vec())]);
        assert_eq!(cached(), plain);
        index.put_stats(vec![(id, right.unwrap())]);
        // Any change to the walk misses it: a directory's mode, a new file,
        // a link replaced.
        let mut seen = vec![plain];
        let check = |seen: &mut Vec<String>| {
            let now = hash_sources(sources, false).unwrap();
            assert_eq!(cached(), now);
            assert!(!seen.contains(&now));
            seen.push(now);
        };
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        check(&mut seen);
        fs::write(src.join("b"), "b").unwrap();
        check(&mut seen);
        fs::remove_file(src.join("link")).unwrap();
        std::os::unix::fs::symlink("b", src.join("link")).unwrap();
        check(&mut seen);
    }

    fn run(env: &[(&str, &str)]) -> Step {
        Step {
            line: 1,
            keyword: "RUN".into(),
            created_by: "RUN make".into(),
            action: Action::Run {
                argv: vec!["/bin/sh".into(), "-c".into(), "make".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                user: String::new(),
                workdir: "/".into(),
                script: None,
                mounts: Vec::new(),
                network: Network::Default,
            },
        }
    }

    fn inputs<'a>(parent: &'a str) -> KeyInputs<'a> {
        KeyInputs {
            parent,
            platform: "linux/amd64",
            source_identity: "",
            sources_digest: "",
        }
    }

    #[test]
    fn every_input_changes_the_key_and_env_order_does_not() {
        let base = step_key(&run(&[("A", "1"), ("B", "2")]), &inputs("p")).unwrap();
        assert_eq!(
            base,
            step_key(&run(&[("B", "2"), ("A", "1")]), &inputs("p")).unwrap()
        );
        assert_ne!(
            base,
            step_key(&run(&[("A", "1"), ("B", "3")]), &inputs("p")).unwrap()
        );
        assert_ne!(
            base,
            step_key(&run(&[("A", "1"), ("B", "2")]), &inputs("q")).unwrap()
        );
        let mut other_platform = inputs("p");
        other_platform.platform = "linux/arm64";
        assert_ne!(
            base,
            step_key(&run(&[("A", "1"), ("B", "2")]), &other_platform).unwrap()
        );
        let mut as_user = run(&[("A", "1"), ("B", "2")]);
        if let Action::Run { user, .. } = &mut as_user.action {
            *user = "nobody".into();
        }
        assert_ne!(base, step_key(&as_user, &inputs("p")).unwrap());
        let config = Step {
            action: Action::Config,
            ..run(&[])
        };
        assert!(step_key(&config, &inputs("p")).is_none());

        // Every other RUN input, one at a time.
        let run_changes: [fn(&mut Action); 4] = [
            |a| {
                if let Action::Run { workdir, .. } = a {
                    *workdir = "/src".into();
                }
            },
            |a| {
                if let Action::Run { argv, .. } = a {
                    argv.push("-j2".into());
                }
            },
            |a| {
                if let Action::Run { network, .. } = a {
                    *network = Network::None;
                }
            },
            |a| {
                if let Action::Run { mounts, .. } = a {
                    mounts.push(PlannedMount {
                        mount: crate::dockerfile::RunMount::parse("type=secret,id=tok", None)
                            .unwrap(),
                        from: None,
                        target: Some("/run/secrets/tok".into()),
                    });
                }
            },
        ];
        for change in run_changes {
            let mut step = run(&[("A", "1"), ("B", "2")]);
            change(&mut step.action);
            assert_ne!(base, step_key(&step, &inputs("p")).unwrap());
        }

        // And every COPY input.
        let copy_base = step_key(&copy_step(&["a"], None), &inputs("p")).unwrap();
        let copy_changes: [fn(&mut Action); 4] = [
            |a| {
                if let Action::Copy { dest, .. } = a {
                    *dest = "/e/".into();
                }
            },
            |a| {
                if let Action::Copy { chown, .. } = a {
                    *chown = Some("1000".into());
                }
            },
            |a| {
                if let Action::Copy { chmod, .. } = a {
                    *chmod = Some(0o600);
                }
            },
            |a| {
                if let Action::Copy { sources, .. } = a {
                    sources.push("b".into());
                }
            },
        ];
        for change in copy_changes {
            let mut step = copy_step(&["a"], None);
            change(&mut step.action);
            assert_ne!(copy_base, step_key(&step, &inputs("p")).unwrap());
        }
        let mut other_content = inputs("p");
        other_content.sources_digest = "other";
        assert_ne!(
            copy_base,
            step_key(&copy_step(&["a"], None), &other_content).unwrap()
        );
    }

    fn copy_step(sources: &[&str], add: Option<AddSpec>) -> Step {
        Step {
            line: 1,
            keyword: "COPY".into(),
            created_by: "COPY".into(),
            action: Action::Copy {
                from: CopyFrom::Context,
                sources: sources.iter().map(|s| s.to_string()).collect(),
                dest: "/d/".into(),
                chown: None,
                chmod: None,
                add,
                excludes: Vec::new(),
                parents: false,
            },
        }
    }

    #[test]
    fn excludes_and_parents_change_the_key() {
        let plain = step_key(&copy_step(&["a"], None), &inputs("p")).unwrap();
        let mut excluding = copy_step(&["a"], None);
        if let Action::Copy { excludes, .. } = &mut excluding.action {
            excludes.push("*.md".into());
        }
        let mut parents = copy_step(&["a"], None);
        if let Action::Copy { parents, .. } = &mut parents.action {
            *parents = true;
        }
        let keys = [
            plain,
            step_key(&excluding, &inputs("p")).unwrap(),
            step_key(&parents, &inputs("p")).unwrap(),
        ];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_ne!(keys[1], keys[2]);
    }

    #[test]
    fn add_is_its_own_kind_and_unchecked_urls_are_told_apart() {
        let copy = step_key(&copy_step(&["a"], None), &inputs("p")).unwrap();
        let add = step_key(&copy_step(&["a"], Some(AddSpec::default())), &inputs("p")).unwrap();
        assert_ne!(copy, add);
        let url = |checksum: Option<&str>| {
            copy_step(
                &["https://example.com/f"],
                Some(AddSpec {
                    checksum: checksum.map(String::from),
                    ..AddSpec::default()
                }),
            )
        };
        let sum = format!("sha256:{}", "a".repeat(64));
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(downloads_unchecked(&url(None).action));
        assert!(!downloads_unchecked(&url(Some(&sum)).action));
        assert!(!downloads_unchecked(
            &copy_step(&["a"], Some(AddSpec::default())).action
        ));
        assert_ne!(
            step_key(&url(Some(&sum)), &inputs("p")),
            step_key(&url(Some(&other)), &inputs("p"))
        );
    }

    #[test]
    fn a_reuse_key_leaves_out_the_content_and_nothing_else() {
        fn with<'a>(digest: &'a str, parent: &'a str) -> KeyInputs<'a> {
            KeyInputs {
                sources_digest: digest,
                ..inputs(parent)
            }
        }
        let step = copy_step(&["a"], None);
        // Another content: another key, the same reuse key.
        assert_ne!(
            step_key(&step, &with("1", "p")),
            step_key(&step, &with("2", "p"))
        );
        let reuse = reuse_key(&step, "p", "linux/amd64").unwrap();
        assert_ne!(Some(&reuse), step_key(&step, &with("", "p")).as_ref());
        // The parent, the platform and the instruction count.
        assert_ne!(Some(&reuse), reuse_key(&step, "q", "linux/amd64").as_ref());
        assert_ne!(Some(&reuse), reuse_key(&step, "p", "linux/arm64").as_ref());
        let mut elsewhere = copy_step(&["a"], None);
        if let Action::Copy { dest, .. } = &mut elsewhere.action {
            *dest = "/e/".into();
        }
        assert_ne!(
            Some(&reuse),
            reuse_key(&elsewhere, "p", "linux/amd64").as_ref()
        );
        // Only a plain COPY from the context has one.
        assert!(reuse_key(&copy_step(&["a"], Some(AddSpec::default())), "p", "x").is_none());
        assert!(reuse_key(&run(&[]), "p", "x").is_none());
        let mut from_stage = copy_step(&["a"], None);
        if let Action::Copy { from, .. } = &mut from_stage.action {
            *from = CopyFrom::Stage(0);
        }
        assert!(reuse_key(&from_stage, "p", "x").is_none());
        // Chained through the keys, as the keys are.
        let steps = [run(&[]), copy_step(&["a"], None)];
        let keys = [Some("k0".to_string()), Some("k1".to_string())];
        let chained = reuse_keys(&steps, &keys, "p", "linux/amd64");
        assert_eq!(chained[0], None);
        assert_eq!(chained[1], reuse_key(&steps[1], "k0", "linux/amd64"));
    }

    #[test]
    fn a_content_key_is_the_copy_from_a_stage_by_what_it_copies() {
        let mut step = copy_step(&["/out/app"], None);
        if let Action::Copy { from, .. } = &mut step.action {
            *from = CopyFrom::Stage(0);
        }
        let key = content_key(&step, "p", "linux/amd64", "d").unwrap();
        // The stage's key is not in it; the content, parent, platform and
        // instruction are.
        let stage_key = |identity| {
            step_key(
                &step,
                &KeyInputs {
                    source_identity: identity,
                    ..inputs("p")
                },
            )
        };
        assert_ne!(stage_key("stage-a"), stage_key("stage-b"));
        assert_ne!(Some(&key), stage_key("stage-a").as_ref());
        assert_ne!(
            Some(&key),
            content_key(&step, "p", "linux/amd64", "e").as_ref()
        );
        assert_ne!(
            Some(&key),
            content_key(&step, "q", "linux/amd64", "d").as_ref()
        );
        assert_ne!(
            Some(&key),
            content_key(&step, "p", "linux/arm64", "d").as_ref()
        );
        let mut elsewhere = step.clone();
        if let Action::Copy { dest, .. } = &mut elsewhere.action {
            *dest = "/e/".into();
        }
        assert_ne!(
            Some(&key),
            content_key(&elsewhere, "p", "linux/amd64", "d").as_ref()
        );
        // Only a plain COPY from a stage has one.
        assert!(content_key(&copy_step(&["a"], None), "p", "x", "d").is_none());
        assert!(content_key(&run(&[]), "p", "x", "d").is_none());
        // Parents chain through the keyed steps.
        let keys = [Some("k0".to_string()), None, Some("k2".to_string())];
        assert_eq!(parents(&keys, "p"), ["p", "k0", "k0"]);
    }

    #[test]
    fn fields_are_framed() {
        let mut a = KeyHasher::new("t");
        a.field("x", b"ab").field("y", b"c");
        let mut b = KeyHasher::new("t");
        b.field("x", b"a").field("y", b"bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn source_content_counts_and_mtime_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/f"), "1").unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("link")).unwrap();
        let first = hash_sources(std::slice::from_ref(&src), false).unwrap();
        // Touch without change: same key.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(src.join("sub/f"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(
            first,
            hash_sources(std::slice::from_ref(&src), false).unwrap()
        );
        fs::write(src.join("sub/f"), "2").unwrap();
        assert_ne!(
            first,
            hash_sources(std::slice::from_ref(&src), false).unwrap()
        );
        fs::write(src.join("sub/f"), "1").unwrap();
        assert_eq!(
            first,
            hash_sources(std::slice::from_ref(&src), false).unwrap()
        );
        fs::remove_file(src.join("link")).unwrap();
        std::os::unix::fs::symlink("elsewhere", src.join("link")).unwrap();
        assert_ne!(
            first,
            hash_sources(std::slice::from_ref(&src), false).unwrap()
        );
    }
}
