//! `RUN --mount`s: each planned mount resolved to a host path and a mount
//! point in the root (binds, caches, tmpfs, secrets).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_cachestore::state::{CacheMount, StateDir};

use crate::context::Ignore;
use crate::dockerfile::MountType;
use crate::excerpt::excerpt;
use crate::exec::copy::{self, CopyError, CopyRequest, Source};
use crate::exec::run::{MountPoints, StepMount};
use crate::plan::{CopyFrom, PlannedMount};
use crate::rootfs::{clean_relative, copy_tree, resolve_in_root};

/// Where a `--secret` comes from; read only when a step mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// Why a RUN's mounts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount source {}: {source}", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the cache mount for {}", excerpt(.id))]
    CacheCreate { id: String },
    #[error("secret {}: {}: {source}", excerpt(.id), path.display())]
    SecretFile {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {}: ${} is not set", excerpt(.id), excerpt(.var))]
    SecretEnvUnset { id: String, var: String },
    #[error("secret {0} is required: pass --secret id={0},src=FILE", excerpt(.id))]
    SecretRequired { id: String },
    #[error("RUN --mount=type=ssh is not supported")]
    Ssh,
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where the trees steps read are on disk: the stages and images that
/// `COPY --from` and `RUN --mount=from=` name.
#[derive(Default)]
pub(crate) struct SourceRoots {
    pub(crate) stages: HashMap<usize, PathBuf>,
    pub(crate) images: HashMap<String, PathBuf>,
}

impl SourceRoots {
    /// The tree `from` names (`context` for the build context).
    pub(crate) fn get(&self, from: &CopyFrom, context: &Path) -> PathBuf {
        match from {
            CopyFrom::Context => context.to_path_buf(),
            CopyFrom::Stage(i) => self.stages[i].clone(),
            CopyFrom::Image(r) => self.images[r].clone(),
            CopyFrom::Inline(_) => unreachable!("heredocs are no tree"),
        }
    }
}

/// What mounts are made from, besides the planned mounts themselves.
pub(crate) struct MountInputs<'a> {
    pub(crate) context: &'a Path,
    pub(crate) dockerignore: &'a Ignore,
    /// Where `type=cache` directories live across builds.
    pub(crate) state: &'a StateDir,
    pub(crate) secrets: &'a BTreeMap<String, SecretSource>,
    pub(crate) roots: &'a SourceRoots,
}

/// Resolves a RUN's `--mount`s to host paths and mount points in the
/// root; `scratch` holds what the step gets a copy of. Returns the locks
/// of `sharing=locked` caches, held until the step ends.
pub(crate) fn prepare(
    planned: &[PlannedMount],
    root: &Path,
    mounts: &mut MountPoints,
    env: &mut Vec<String>,
    scratch: &Path,
    inputs: &MountInputs,
) -> Result<Vec<std::fs::File>, MountError> {
    let mut locks = Vec::new();
    for (n, pm) in planned.iter().enumerate() {
        let m = &pm.mount;
        let source_path = |from: &CopyFrom| -> Result<PathBuf, MountError> {
            let src = Path::new(m.source.as_deref().unwrap_or("/"));
            let base = inputs.roots.get(from, inputs.context);
            let path = resolve_in_root(&base, &clean_relative(src), true)?;
            std::fs::symlink_metadata(&path).map_err(|source| MountError::Source {
                path: src.to_path_buf(),
                source,
            })?;
            Ok(path)
        };
        let target = pm.target.as_deref();
        match m.kind {
            MountType::Bind => {
                let from = pm.from.as_ref().unwrap_or(&CopyFrom::Context);
                let mut source = source_path(from)?;
                let file = !source.is_dir();
                if matches!(from, CopyFrom::Context) && !inputs.dockerignore.is_empty() {
                    // The step sees the context as COPY does: without
                    // what .dockerignore hides (and the key hashes).
                    let filtered = scratch.join(format!("context-{n}"));
                    std::fs::create_dir(&filtered)?;
                    let wanted = [m.source.clone().unwrap_or_else(|| ".".into())];
                    copy::copy(
                        &CopyRequest {
                            source: Source::Context(inputs.context),
                            sources: &wanted,
                            dest: "/",
                            chown: None,
                            chmod: None,
                            ignore: Some(inputs.dockerignore),
                            excludes: &[],
                            parents: false,
                        },
                        &filtered,
                    )?;
                    source = match file {
                        true => filtered.join(source.file_name().unwrap_or_default()),
                        false => filtered,
                    };
                } else if !m.readonly {
                    // Writes to a rw bind are thrown away, as in BuildKit:
                    // the step gets a copy.
                    let copy = scratch.join(format!("bind-{n}"));
                    if file {
                        std::fs::copy(&source, &copy)?;
                    } else {
                        copy_tree(&source, &copy)?;
                    }
                    source = copy;
                }
                let target = mounts.mount_point(root, target.expect("binds have targets"), file)?;
                mounts.extra.push(StepMount::Bind {
                    source,
                    target,
                    readonly: m.readonly,
                });
            }
            MountType::Cache => {
                let target_str = target.expect("caches have targets");
                let id = m.id.clone().unwrap_or_else(|| target_str.to_string());
                let CacheMount {
                    dir,
                    lock: lock_path,
                } = inputs.state.cache_mount(&id);
                std::fs::create_dir_all(inputs.state.mounts())?;
                let lock = std::fs::File::create(&lock_path)?;
                let source = match m.sharing.as_deref() {
                    Some("locked") => {
                        lock.lock()?;
                        locks.push(lock);
                        dir.clone()
                    }
                    // Busy private caches give the step a fresh dir.
                    Some("private") if lock.try_lock().is_err() => {
                        scratch.join(format!("cache-{n}"))
                    }
                    Some("private") => {
                        locks.push(lock);
                        dir.clone()
                    }
                    _ => dir.clone(),
                };
                if !source.exists() {
                    let fresh = scratch.join(format!("fresh-{n}"));
                    match &pm.from {
                        Some(from) => copy_tree(&source_path(from)?, &fresh)?,
                        None => std::fs::create_dir(&fresh)?,
                    }
                    std::os::unix::fs::chown(
                        &fresh,
                        Some(m.uid.unwrap_or(0)),
                        Some(m.gid.unwrap_or(0)),
                    )?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        &fresh,
                        std::fs::Permissions::from_mode(m.mode.unwrap_or(0o755)),
                    )?;
                    // Renamed into place whole, so a racing build sees
                    // either no cache or a complete one.
                    if std::fs::rename(&fresh, &source).is_err() && !source.is_dir() {
                        return Err(MountError::CacheCreate { id });
                    }
                }
                let target = mounts.mount_point(root, target_str, false)?;
                mounts.extra.push(StepMount::Bind {
                    source,
                    target,
                    readonly: m.readonly,
                });
            }
            MountType::Tmpfs => {
                let target =
                    mounts.mount_point(root, target.expect("tmpfs mounts have targets"), false)?;
                mounts.extra.push(StepMount::Tmpfs {
                    target,
                    size: m.size,
                });
            }
            MountType::Secret => {
                let id = m.id.as_deref().unwrap_or_default();
                let content = match inputs.secrets.get(id) {
                    Some(SecretSource::File(path)) => {
                        std::fs::read(path).map_err(|source| MountError::SecretFile {
                            id: id.to_string(),
                            path: path.clone(),
                            source,
                        })?
                    }
                    Some(SecretSource::Env(var)) => std::env::var_os(var)
                        .map(|v| v.into_encoded_bytes())
                        .ok_or_else(|| MountError::SecretEnvUnset {
                            id: id.to_string(),
                            var: var.clone(),
                        })?,
                    None if m.required => {
                        return Err(MountError::SecretRequired { id: id.to_string() })
                    }
                    None => continue,
                };
                if let Some(var) = &m.env {
                    env.push(format!("{var}={}", String::from_utf8_lossy(&content)));
                }
                if let Some(target) = target {
                    mounts.secret_stage = Some(scratch.join("secrets"));
                    std::fs::create_dir_all(scratch.join("secrets"))?;
                    let target = mounts.mount_point(root, target, true)?;
                    mounts.extra.push(StepMount::Secret {
                        target,
                        content,
                        mode: m.mode.unwrap_or(0o400),
                        uid: m.uid.unwrap_or(0),
                        gid: m.gid.unwrap_or(0),
                    });
                }
            }
            MountType::Ssh => return Err(MountError::Ssh),
        }
    }
    Ok(locks)
}
