//! podman as the tests run images: its own storage, runc, cgroupfs.
use std::process::{Command, Output};

use super::run_ok;

/// podman with its own storage, runc and cgroupfs, as the brief's pods.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Default for Podman {
    fn default() -> Self {
        Podman::new()
    }
}

impl Podman {
    pub fn new() -> Podman {
        Podman {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager=cgroupfs",
            ]);
        cmd
    }

    /// Pulls an image (`oci:…`, `docker://…`) and returns its image id.
    pub fn pull(&self, source: &str) -> String {
        let out = run_ok(self.cmd().args(["pull", "-q", source]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman run` with default capabilities, no privilege, the host's
    /// network (the test registry is on 127.0.0.1) and `extra` options.
    pub fn run(&self, extra: &[&str], image: &str, args: &[&str]) -> Output {
        self.cmd()
            .args(["run", "--rm", "--network", "host"])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(extra)
            .arg(image)
            .args(args)
            .output()
            .unwrap()
    }
}
