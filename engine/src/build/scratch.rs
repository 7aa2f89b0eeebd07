//! The scratch dirs of a build's steps (an overlay step's upper and work
//! dirs, a RUN's mount sources, a view's sparse root), removed on another
//! thread once the step is done with them: removing an overlay's work dir
//! or a sparse root took 0.5-1.3 ms of the build's own time each. Stage
//! roots no later stage reads go the same way (1-2 ms each, before the
//! push). All are gone before the build's dir is removed ([`Scratch`] is
//! dropped first).
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

/// Where a build's scratch dirs are made, and their removals under way.
pub(crate) struct Scratch {
    work: PathBuf,
    removing: Mutex<Vec<JoinHandle<()>>>,
}

/// A scratch dir, removed in the background once dropped.
pub(crate) struct ScratchDir<'a> {
    dir: Option<tempfile::TempDir>,
    scratch: &'a Scratch,
}

impl Scratch {
    pub(crate) fn new(work: &Path) -> Scratch {
        Scratch {
            work: work.to_path_buf(),
            removing: Mutex::default(),
        }
    }

    /// A new empty dir named `<prefix><random>` in the build's dir.
    pub(crate) fn dir(&self, prefix: &str) -> std::io::Result<ScratchDir<'_>> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.work)?;
        Ok(ScratchDir {
            dir: Some(dir),
            scratch: self,
        })
    }

    /// Runs `removal` on another thread, joined when the scratch is
    /// dropped. Without a thread it is dropped unrun, with what it owns: a
    /// scratch dir is then removed at once, a stage root with the build's
    /// dir.
    pub(crate) fn later(&self, removal: impl FnOnce() + Send + 'static) {
        let spawned = std::thread::Builder::new()
            .name("kiln-scratch-rm".into())
            .spawn(removal);
        if let Ok(handle) = spawned {
            self.removing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(handle);
        }
    }
}

impl ScratchDir<'_> {
    pub(crate) fn path(&self) -> &Path {
        self.dir.as_ref().expect("until dropped").path()
    }
}

impl Drop for ScratchDir<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            self.scratch.later(move || drop(dir));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let removing = self
            .removing
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for handle in removing.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_are_gone_once_the_scratch_is() {
        let work = tempfile::tempdir().unwrap();
        let scratch = Scratch::new(work.path());
        let made: Vec<PathBuf> = (0..3)
            .map(|_| {
                let dir = scratch.dir("step-").unwrap();
                std::fs::create_dir_all(dir.path().join("work/work")).unwrap();
                std::fs::write(dir.path().join("work/work/f"), b"x").unwrap();
                dir.path().to_path_buf()
            })
            .collect();
        drop(scratch);
        for dir in made {
            assert!(!dir.exists(), "{}", dir.display());
        }
        assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
    }
}
