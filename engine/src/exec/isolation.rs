//! Which RUN isolation a build uses: the one asked for, checked before the
//! build starts, or by default the strongest this process may set up. In
//! a standard Kubernetes pod (root, default capabilities, no
//! `CAP_SYS_ADMIN`) namespaces are refused but chroot works, so the default
//! there is chroot rather than a failure at the first RUN.
use std::io;

use super::run::Isolation;

/// What the process may do, behind a trait so the choice is tested without
/// root or a container.
pub trait Abilities {
    fn is_root(&self) -> bool;
    /// Whether a child can unshare mount and PID namespaces and mount in
    /// them, as namespaces isolation does for every RUN.
    fn unshare_mount_pid(&self) -> io::Result<()>;
    /// Whether the process has `CAP_SYS_CHROOT`.
    fn can_chroot(&self) -> bool;
    /// What a user namespace (rootless isolation) needs and this machine
    /// lacks, if anything: subordinate ids, `newuidmap`.
    fn user_namespace_missing(&self) -> Option<String>;
}

/// The isolation chosen, and why, said once at the start of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub isolation: Isolation,
    pub why: String,
    /// No RUN can be isolated, and why: not root, and no user namespace
    /// by default. The build goes on unprivileged (a RUN that must run
    /// fails); `isolation` is then the one asking for would have given.
    pub run_unavailable: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error(
        "--isolation {0} needs root: as another user use --isolation rootless (the default then)"
    )]
    NeedsRoot(Isolation),
    #[error("--isolation namespaces: this process cannot unshare mount and PID namespaces ({source}); the container lacks CAP_SYS_ADMIN: use --isolation chroot, or give the container CAP_SYS_ADMIN")]
    NoNamespaces {
        #[source]
        source: io::Error,
    },
    #[error("--isolation chroot: this process lacks CAP_SYS_CHROOT; add it to the container (it is among the default capabilities of Docker, podman and Kubernetes)")]
    NoChroot,
    #[error("no RUN isolation is possible here: mount and PID namespaces are refused ({namespaces}) and the process lacks CAP_SYS_CHROOT. Give the container CAP_SYS_CHROOT (for --isolation chroot) or CAP_SYS_ADMIN (for namespaces), or use --isolation none --force in a container made for this build alone")]
    Nothing { namespaces: io::Error },
}

/// The isolation for `asked` (`None`: the default) on a host with `host`'s
/// abilities.
pub fn choose(asked: Option<Isolation>, host: &dyn Abilities) -> Result<Chosen, IsolationError> {
    let chosen = |isolation, why: &str| {
        Ok(Chosen {
            isolation,
            why: why.to_string(),
            run_unavailable: None,
        })
    };
    if !host.is_root() {
        return match asked {
            // Nothing the build does without RUN needs a privilege: it goes
            // on unprivileged, and fails only at a RUN that must run.
            None => match host.user_namespace_missing() {
                Some(missing) => Ok(Chosen {
                    isolation: Isolation::Rootless,
                    why: format!(
                        "not root, and no user namespace: {missing}; a RUN that must run will fail"
                    ),
                    run_unavailable: Some(format!("not root, and no user namespace ({missing})")),
                }),
                None => chosen(
                    Isolation::Rootless,
                    "not root: a user namespace (the default)",
                ),
            },
            Some(Isolation::Rootless) => chosen(Isolation::Rootless, "asked for"),
            Some(other) => Err(IsolationError::NeedsRoot(other)),
        };
    }
    match asked {
        Some(Isolation::Rootless) => chosen(
            Isolation::Namespaces,
            "already root: rootless isolation is namespaces isolation",
        ),
        Some(Isolation::Namespaces) => match host.unshare_mount_pid() {
            Ok(()) => chosen(Isolation::Namespaces, "asked for"),
            Err(source) => Err(IsolationError::NoNamespaces { source }),
        },
        Some(Isolation::Chroot) if !host.can_chroot() => Err(IsolationError::NoChroot),
        Some(other) => chosen(other, "asked for"),
        None => match host.unshare_mount_pid() {
            Ok(()) => chosen(
                Isolation::Namespaces,
                "mount and PID namespaces are allowed",
            ),
            Err(_) if host.can_chroot() => chosen(
                Isolation::Chroot,
                "mount and PID namespaces are refused here (no CAP_SYS_ADMIN), CAP_SYS_CHROOT is held",
            ),
            Err(namespaces) => Err(IsolationError::Nothing { namespaces }),
        },
    }
}

/// This process.
pub struct Host;

impl Abilities for Host {
    fn is_root(&self) -> bool {
        super::run::running_as_root()
    }

    fn unshare_mount_pid(&self) -> io::Result<()> {
        // A forked child tries, so this process is left as it was; it only
        // makes raw syscalls, which is safe after fork even with threads.
        // SAFETY: see above; the child never returns from this block.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe {
                let ok = libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) == 0
                    && libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0;
                let errno = match ok {
                    true => 0,
                    false => *libc::__errno_location(),
                };
                libc::_exit(errno.clamp(0, 255))
            },
            pid => {
                let mut status = 0;
                // SAFETY: waits for the child forked above.
                if unsafe { libc::waitpid(pid, &mut status, 0) } == -1 {
                    return Err(io::Error::last_os_error());
                }
                match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
                    Some(0) => Ok(()),
                    Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                    None => Err(io::Error::other("the namespace probe was killed")),
                }
            }
        }
    }

    fn can_chroot(&self) -> bool {
        rustix::thread::capabilities(None).is_ok_and(|caps| {
            caps.effective
                .contains(rustix::thread::CapabilitySet::SYS_CHROOT)
        })
    }

    fn user_namespace_missing(&self) -> Option<String> {
        super::userns::missing_prerequisite().map(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        root: bool,
        namespaces: bool,
        chroot: bool,
        subids: bool,
    }

    impl Abilities for Fake {
        fn is_root(&self) -> bool {
            self.root
        }
        fn unshare_mount_pid(&self) -> io::Result<()> {
            match self.namespaces {
                true => Ok(()),
                false => Err(io::Error::from_raw_os_error(libc::EPERM)),
            }
        }
        fn can_chroot(&self) -> bool {
            self.chroot
        }
        fn user_namespace_missing(&self) -> Option<String> {
            (!self.subids).then(|| "no subordinate ids".to_string())
        }
    }

    const MACHINE: Fake = Fake {
        root: true,
        namespaces: true,
        chroot: true,
        subids: true,
    };
    const POD: Fake = Fake {
        root: true,
        namespaces: false,
        chroot: true,
        subids: true,
    };
    const NO_CAPS: Fake = Fake {
        root: true,
        namespaces: false,
        chroot: false,
        subids: true,
    };
    const USER: Fake = Fake {
        root: false,
        namespaces: false,
        chroot: false,
        subids: true,
    };

    const POD_USER: Fake = Fake {
        root: false,
        namespaces: false,
        chroot: false,
        subids: false,
    };

    fn default_on(host: &Fake) -> Result<Isolation, IsolationError> {
        choose(None, host).map(|c| c.isolation)
    }

    #[test]
    fn the_default_is_the_strongest_the_process_may_use() {
        assert_eq!(default_on(&MACHINE).unwrap(), Isolation::Namespaces);
        assert_eq!(default_on(&POD).unwrap(), Isolation::Chroot);
        assert_eq!(default_on(&USER).unwrap(), Isolation::Rootless);
        let e = default_on(&NO_CAPS).unwrap_err().to_string();
        assert!(
            e.contains("CAP_SYS_CHROOT") && e.contains("--isolation none --force"),
            "{e}"
        );
    }

    #[test]
    fn a_user_without_subordinate_ids_builds_unprivileged_unless_rootless_is_asked_for() {
        let chosen = choose(None, &POD_USER).unwrap();
        assert_eq!(
            chosen.run_unavailable.as_deref(),
            Some("not root, and no user namespace (no subordinate ids)")
        );
        assert!(choose(None, &USER).unwrap().run_unavailable.is_none());
        let asked = choose(Some(Isolation::Rootless), &POD_USER).unwrap();
        assert_eq!(asked.run_unavailable, None);
        for root in [MACHINE, POD] {
            let host = Fake {
                subids: false,
                ..root
            };
            assert_eq!(choose(None, &host).unwrap().run_unavailable, None);
        }
    }

    #[test]
    fn an_explicit_isolation_is_obeyed_or_fails_before_the_build() {
        let asked = |i, host| choose(Some(i), host).map(|c| c.isolation);
        assert_eq!(
            asked(Isolation::Chroot, &MACHINE).unwrap(),
            Isolation::Chroot
        );
        assert_eq!(asked(Isolation::None, &POD).unwrap(), Isolation::None);
        assert_eq!(
            asked(Isolation::Rootless, &MACHINE).unwrap(),
            Isolation::Namespaces
        );
        assert!(matches!(
            asked(Isolation::Namespaces, &POD),
            Err(IsolationError::NoNamespaces { .. })
        ));
        assert!(matches!(
            asked(Isolation::Chroot, &NO_CAPS),
            Err(IsolationError::NoChroot)
        ));
        assert!(matches!(
            asked(Isolation::Chroot, &USER),
            Err(IsolationError::NeedsRoot(Isolation::Chroot))
        ));
    }

    #[test]
    fn this_machine_is_probed_without_changing_this_process() {
        let before = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let probed = Host.unshare_mount_pid();
        assert_eq!(std::fs::read_link("/proc/self/ns/mnt").unwrap(), before);
        if Host.is_root() {
            // The test VM is root with every capability.
            probed.unwrap();
            assert!(Host.can_chroot());
        }
    }
}
