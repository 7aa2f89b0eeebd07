//! What a stage's steps read, identified for their keys: context digests
//! (with the stat cache), downloads and Git commits (each once per build,
//! kept so the step copies exactly what it was keyed by), and the keys and
//! digests of the stages and images they read.
use std::collections::HashMap;
use std::path::PathBuf;

use super::{Builder, FetchedImage, StageResult};
use crate::error::{BuildError, IoContext};
use crate::excerpt::excerpt;
use crate::exec::copy_selection;
use crate::key::{self, StepSources};
use crate::plan::Step;
use crate::source::git::GitSource;
use crate::source::http::{self, DownloadError};

/// The builder's view of a stage's inputs, for [`key::step_keys`].
pub(super) struct StageSources<'b, 'a> {
    pub(super) builder: &'b Builder<'a>,
    pub(super) stages: &'b HashMap<usize, StageResult>,
    pub(super) images: &'b HashMap<String, FetchedImage>,
}

impl Builder<'_> {
    /// `url` downloaded into this build's work dir, once per build.
    fn download(&self, url: &str) -> Result<PathBuf, DownloadError> {
        if let Some(file) = self.resolved().downloads.get(url) {
            return Ok(file.clone());
        }
        // Kept for the step that copies it; the work dir goes with the build.
        let (dir, file) = http::download_to_new_dir(url, None, self.roots.work())?;
        let _ = dir.keep();
        self.resolved()
            .downloads
            .insert(url.to_string(), file.clone());
        Ok(file)
    }

    pub(super) fn resolved(&self) -> std::sync::MutexGuard<'_, crate::exec::add::Resolved> {
        self.resolved.lock().expect("resolved sources poisoned")
    }
}

impl StepSources for StageSources<'_, '_> {
    fn context_digest(&self, step: &Step, sources: &[String]) -> Result<String, BuildError> {
        let b = self.builder;
        let context = &b.options.context;
        copy_selection::selected_context_sources(context, &b.options.dockerignore, sources)
            .map_err(|message| b.step_error(step, message))?
            .digest(Some(b.index))
            .at(context)
    }

    fn download_digest(&self, step: &Step, url: &str) -> Result<String, BuildError> {
        let b = self.builder;
        let file = b.download(url).map_err(|e| b.step_error(step, e))?;
        key::file_digest(&file).at(&file)
    }

    fn git_commit(
        &self,
        step: &Step,
        source: &str,
        checksum: Option<&str>,
    ) -> Result<String, BuildError> {
        let b = self.builder;
        // Once per build: two steps naming one ref get one commit.
        let known = b.resolved().commits.get(source).cloned();
        let commit = match known {
            Some(commit) => commit,
            None => GitSource::parse(source)
                .resolve()
                .map_err(|e| b.step_error(step, e))?,
        };
        b.resolved()
            .commits
            .insert(source.to_string(), commit.clone());
        match checksum {
            Some(checksum) if !commit.starts_with(&checksum.to_ascii_lowercase()) => Err(b
                .step_error(
                    step,
                    format!(
                        "checksum mismatch: the ref is commit {commit}, not {}",
                        excerpt(checksum)
                    ),
                )),
            _ => Ok(commit),
        }
    }

    fn stage_key(&self, stage: usize) -> &str {
        &self.stages[&stage].last_key
    }

    fn image_digest(&self, reference: &str) -> &str {
        self.images[reference].m.digest.as_ref()
    }
}
