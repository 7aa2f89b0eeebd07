//! RUN for another architecture: the kernel runs its binaries through a
//! QEMU user-mode interpreter registered with `binfmt_misc`. Kiln only
//! checks that one is registered, and registered so that it works inside
//! the build's root: with the `F` (fix binary) flag the kernel opens the
//! interpreter when it is registered, so the root need not contain it.
use std::path::{Path, PathBuf};

use kiln_cachestore::Platform;

/// Where the kernel's `binfmt_misc` registrations are.
pub const BINFMT_MISC: &str = "/proc/sys/fs/binfmt_misc";

#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    #[error("a RUN for {platform} needs QEMU user emulation, and {path} is not registered{why}. Install it (Debian: apt-get install qemu-user-static binfmt-support; with binfmt_misc mounted: mount -t binfmt_misc binfmt_misc {BINFMT_MISC}), then update-binfmts --enable {name}; or, from a privileged container, docker run --privileged --rm tonistiigi/binfmt --install {arch}")]
    NotRegistered {
        platform: String,
        path: PathBuf,
        name: String,
        arch: String,
        why: String,
    },
    #[error("a RUN for {platform} needs QEMU user emulation, and {} is registered without the F (fix binary) flag, so its interpreter cannot be found inside the build's root. Register it with F: update-binfmts --disable {name}, then re-enable it from a binfmt-support or qemu-user-static that sets F (Debian's does), or docker run --privileged --rm tonistiigi/binfmt --install {arch}", .path.display())]
    NoFixBinary {
        platform: String,
        path: PathBuf,
        name: String,
        arch: String,
    },
    #[error("a RUN for {platform}: Kiln knows no QEMU interpreter for the architecture {arch}")]
    Unknown { platform: String, arch: String },
}

/// Whether this machine runs `platform`'s binaries itself.
pub fn native(platform: &Platform) -> bool {
    let host = Platform::host();
    platform.os == host.os && platform.architecture == host.architecture
}

/// QEMU's name for an OCI architecture (`qemu-<name>` in binfmt_misc).
fn qemu_name(architecture: &str) -> Option<&'static str> {
    Some(match architecture {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "arm" => "arm",
        "386" => "i386",
        "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips64le" => "mips64el",
        "loong64" => "loongarch64",
        _ => return None,
    })
}

/// Checks that `binfmt_dir` (normally [`BINFMT_MISC`]) has an enabled
/// QEMU interpreter for `platform` with the `F` flag.
pub fn check(platform: &Platform, binfmt_dir: &Path) -> Result<(), EmulationError> {
    let arch = platform.architecture.clone();
    let Some(qemu) = qemu_name(&arch) else {
        return Err(EmulationError::Unknown {
            platform: platform.to_string(),
            arch,
        });
    };
    let name = format!("qemu-{qemu}");
    let path = binfmt_dir.join(&name);
    let not_registered = |why: &str| EmulationError::NotRegistered {
        platform: platform.to_string(),
        path: path.clone(),
        name: name.clone(),
        arch: arch.clone(),
        why: why.to_string(),
    };
    if !binfmt_dir.join("register").exists() {
        return Err(not_registered(" (binfmt_misc is not mounted)"));
    }
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_registered("")),
        Err(e) => return Err(not_registered(&format!(" (cannot read it: {e})"))),
    };
    let mut lines = text.lines();
    if lines.next() != Some("enabled") {
        return Err(not_registered(" (it is disabled)"));
    }
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap_or("");
    if !flags.trim().contains('F') {
        return Err(EmulationError::NoFixBinary {
            platform: platform.to_string(),
            path,
            name,
            arch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "arm64".into(),
            variant: None,
        }
    }

    fn registration(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join("register"), "").unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn an_enabled_interpreter_with_f_passes() {
        let dir = tempfile::tempdir().unwrap();
        registration(
            dir.path(),
            "qemu-aarch64",
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n",
        );
        check(&arm64(), dir.path()).unwrap();
    }

    #[test]
    fn a_missing_disabled_or_unfixed_interpreter_fails_with_how_to_register() {
        let dir = tempfile::tempdir().unwrap();
        let e = check(&arm64(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("binfmt_misc is not mounted"), "{e}");
        registration(dir.path(), "qemu-arm", "enabled\nflags: F\n");
        let e = check(&arm64(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("qemu-aarch64 is not registered"), "{e}");
        assert!(e.contains("update-binfmts --enable qemu-aarch64"), "{e}");
        assert!(e.contains("linux/arm64"), "{e}");
        registration(dir.path(), "qemu-aarch64", "disabled\nflags: F\n");
        let e = check(&arm64(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("it is disabled"), "{e}");
        registration(dir.path(), "qemu-aarch64", "enabled\nflags: P\n");
        let e = check(&arm64(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("without the F (fix binary) flag"), "{e}");
        let odd = Platform {
            architecture: "vax".into(),
            ..arm64()
        };
        assert!(check(&odd, dir.path()).is_err());
    }

    #[test]
    fn the_host_is_native() {
        assert!(native(&Platform::host()));
        let other = match Platform::host().architecture.as_str() {
            "arm64" => "amd64",
            _ => "arm64",
        };
        assert!(!native(&Platform {
            architecture: other.into(),
            ..Platform::host()
        }));
    }
}
