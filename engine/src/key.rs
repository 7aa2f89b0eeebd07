//! Cache keys: one per step that changes files, chained through the parent
//! key, over a framed and versioned encoding of everything the step's
//! result depends on, and nothing else.
//!
//! A key covers: the parent key (the base image's manifest digest for the
//! first step, the parent stage's last key for `FROM <stage>`), the
//! platform, and the step as it will run: for RUN the command, the env and
//! args it sees (sorted, so reordering ENV lines changes nothing), USER,
//! WORKDIR and a heredoc script; for COPY the expanded sources,
//! destination, `--chown`, `--chmod`, where the sources come from (the
//! context; a stage's key; an image's digest) and the content of every
//! source file (path, type, mode, content or link target; not mtimes); for
//! WORKDIR/VOLUME the directories and owner. Metadata-only steps are not in
//! the chain: the config comes from the plan, so a LABEL never busts a RUN.
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::plan::{Action, CopyFrom, Step};

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
        Action::Copy { .. } => KeyHasher::new("copy"),
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
        }
        Action::Copy {
            from,
            sources,
            dest,
            chown,
            chmod,
        } => {
            let from_kind = match from {
                CopyFrom::Context => "context",
                CopyFrom::Stage(_) => "stage",
                CopyFrom::Image(_) => "image",
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
        }
        Action::Mkdir { paths, owner } => {
            h.strings("paths", paths)
                .field("owner", owner.as_deref().unwrap_or("").as_bytes());
        }
    }
    Some(h.finish())
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
    let mut entries = Vec::new();
    for (i, top) in sources.iter().enumerate() {
        collect(top, &format!("{i}"), &mut entries)?;
    }
    let hashed: Vec<SourceEntry> = entries
        .into_par_iter()
        .map(|(host, rel)| describe(&host, rel, with_owner))
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
    Ok(h.finish())
}

/// Every path below `host` (itself included), sorted, with its key path.
fn collect(host: &Path, rel: &str, out: &mut Vec<(PathBuf, String)>) -> io::Result<()> {
    out.push((host.to_path_buf(), rel.to_string()));
    let meta = fs::symlink_metadata(host)?;
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(host)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            collect(
                &host.join(&name),
                &format!("{rel}/{}", name.to_string_lossy()),
                out,
            )?;
        }
    }
    Ok(())
}

fn describe(host: &Path, rel: String, with_owner: bool) -> io::Result<SourceEntry> {
    let meta = fs::symlink_metadata(host)?;
    let ft = meta.file_type();
    let (kind, content) = if ft.is_file() {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(fs::File::open(host)?)?;
        ("file", hasher.finalize().to_hex().to_string())
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
