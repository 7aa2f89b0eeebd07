//! Whether an overlay can be mounted in the state dir: found out by
//! mounting one on scratch dirs (the probe), once, and remembered.
//!
//! The probe's dirs, mount and unmount cost a build 4–6 ms, and its answer
//! depends on no build: on the kernel, the filesystem under the state dir,
//! and what the process may do (capabilities, seccomp, its user namespace,
//! its LSM label). After a probe succeeds those conditions are written to
//! the state dir; a build that finds the same ones mounts no probe. Should
//! a real mount fail anyway, the record is forgotten, and the next build
//! probes again.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_cachestore::state::StateDir;

use super::syscalls::Syscalls;

/// What the record starts with (its format's version is in it).
const MAGIC: &str = "kiln overlay probe 1\n";

/// `Ok` when an overlay can be mounted in `state`: known from the record of
/// an earlier probe under the same conditions, or probed now on scratch
/// dirs in `work` (over `empty`) and recorded. `Err`: why not.
pub(crate) fn overlay_mountable(
    sys: &dyn Syscalls,
    state: &StateDir,
    work: &Path,
    empty: &Path,
) -> Result<(), String> {
    let record = state.overlay_probed();
    let now = conditions(state.path());
    if let Some(now) = &now {
        if std::fs::read_to_string(&record).is_ok_and(|was| was == *now) {
            return Ok(());
        }
    }
    probe_overlay(sys, work, empty)?;
    if let Some(now) = now {
        // Written whole or not at all (a scratch file renamed over it);
        // without it the next build only probes again.
        let scratch = work.join("overlay-probed");
        if let Err(e) =
            std::fs::write(&scratch, now).and_then(|()| std::fs::rename(&scratch, &record))
        {
            tracing::debug!(record = %record.display(), error = %e, "overlay probe not recorded");
        }
    }
    Ok(())
}

/// A real overlay mount failed: the next build probes again.
pub(crate) fn forget(state: &StateDir) {
    let _ = std::fs::remove_file(state.overlay_probed());
}

/// Whether an overlay can be mounted here: tried on scratch dirs in
/// `work`, over `empty`.
fn probe_overlay(sys: &dyn Syscalls, work: &Path, empty: &Path) -> Result<(), String> {
    let probe = work.join("probe");
    let dirs = ["upper", "work", "merged"].map(|d| probe.join(d));
    for dir in &dirs {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    // Unmounted as soon as it is made.
    sys.mount_overlay(&[empty.to_path_buf()], Some((&dirs[0], &dirs[1])), &dirs[2])
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&probe);
    Ok(())
}

/// What decides whether the probe succeeds, as text; `None` when it cannot
/// all be read (and then the probe always runs).
fn conditions(state: &Path) -> Option<String> {
    let uname = rustix::system::uname();
    let fs = rustix::fs::statfs(state).ok()?;
    let dev = std::fs::metadata(state).ok()?.dev();
    let userns = std::fs::metadata("/proc/self/ns/user").ok()?.ino();
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let may: Vec<&str> = status
        .lines()
        .filter(|l| {
            ["CapEff:", "Seccomp:", "NoNewPrivs:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    // No LSM, or one that does not label processes: nothing to add.
    let label = std::fs::read_to_string("/proc/self/attr/current").unwrap_or_default();
    Some(format!(
        "{MAGIC}kernel {} {}\nfs {:x} dev {dev}\nuserns {userns}\n{}\nlabel {}\n",
        uname.release().to_string_lossy(),
        uname.version().to_string_lossy(),
        fs.f_type,
        may.join("\n"),
        label.trim_end_matches(['\0', '\n']),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Read};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::build::syscalls::{Mount, UnpackInto};
    use crate::exec::run::RunSpec;
    use crate::rootfs::extract::{ExtractError, ExtractStats};

    /// Counts overlay mounts; each succeeds unless `fail`.
    #[derive(Default)]
    struct Mounts {
        made: AtomicUsize,
        fail: bool,
    }

    impl Syscalls for Mounts {
        fn mount_overlay(
            &self,
            _: &[PathBuf],
            _: Option<(&Path, &Path)>,
            _: &Path,
        ) -> io::Result<Mount> {
            self.made.fetch_add(1, Ordering::Relaxed);
            match self.fail {
                true => Err(io::Error::other("no overlay here")),
                false => Ok(Box::new(())),
            }
        }

        fn extract(
            &self,
            _: &mut dyn Read,
            _: &Path,
            _: UnpackInto,
        ) -> Result<ExtractStats, ExtractError> {
            unreachable!("the probe extracts nothing")
        }

        fn run(&self, _: &RunSpec) -> io::Result<i32> {
            unreachable!("the probe runs nothing")
        }
    }

    fn state() -> (tempfile::TempDir, StateDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("empty")).unwrap();
        (dir, state, work)
    }

    #[test]
    fn a_probe_that_succeeded_is_not_mounted_again_under_the_same_conditions() {
        let (_dir, state, work) = state();
        let sys = Mounts::default();
        for _ in 0..3 {
            overlay_mountable(&sys, &state, &work, &work.join("empty")).unwrap();
        }
        assert_eq!(sys.made.load(Ordering::Relaxed), 1);
        let record = std::fs::read_to_string(state.overlay_probed()).unwrap();
        assert!(record.starts_with(MAGIC), "{record}");
        assert!(!work.join("probe").exists(), "scratch dirs left");
    }

    #[test]
    fn other_conditions_or_a_forgotten_record_probe_again() {
        let (_dir, state, work) = state();
        let sys = Mounts::default();
        let empty = work.join("empty");
        overlay_mountable(&sys, &state, &work, &empty).unwrap();
        // Another kernel, another filesystem: the record no longer matches.
        let record = std::fs::read_to_string(state.overlay_probed()).unwrap();
        std::fs::write(
            state.overlay_probed(),
            record.replace("kernel ", "kernel 0.0 "),
        )
        .unwrap();
        overlay_mountable(&sys, &state, &work, &empty).unwrap();
        assert_eq!(sys.made.load(Ordering::Relaxed), 2);
        assert_eq!(
            std::fs::read_to_string(state.overlay_probed()).unwrap(),
            record
        );
        forget(&state);
        overlay_mountable(&sys, &state, &work, &empty).unwrap();
        assert_eq!(sys.made.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_failed_probe_is_not_recorded() {
        let (_dir, state, work) = state();
        let sys = Mounts {
            fail: true,
            ..Default::default()
        };
        let empty = work.join("empty");
        for _ in 0..2 {
            let why = overlay_mountable(&sys, &state, &work, &empty).unwrap_err();
            assert!(why.contains("no overlay here"), "{why}");
        }
        assert_eq!(sys.made.load(Ordering::Relaxed), 2);
        assert!(!state.overlay_probed().exists());
    }
}
