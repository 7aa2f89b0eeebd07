//! `--isolation rootless`: a build started by an unprivileged user runs as
//! root of a user namespace of its own. The caller's uid becomes 0 and its
//! subordinate ids (`/etc/subuid`, `/etc/subgid`) become 1..n, so layers can
//! hold files of several owners; inside, RUN steps are isolated exactly as
//! in `namespaces` mode.
//!
//! Only a process outside the namespace may write its id maps, and the
//! setuid `newuidmap`/`newgidmap` are the only way an unprivileged user may
//! map more than its own id. So Kiln forks while it still has one thread:
//! the child unshares and waits, the parent maps it, then just waits for it.
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use crate::exec::users;

/// Why Kiln could not become root of a user namespace.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error(
        "rootless isolation needs subordinate ids for user {user} (uid {uid}) in {file}, \
         e.g. `{user}:100000:65536` (usermod --add-subuids/--add-subgids)"
    )]
    NoSubordinateIds {
        user: String,
        uid: u32,
        file: String,
    },
    #[error("{tool} is not on PATH (the uidmap package)")]
    NoMapTool { tool: &'static str },
    #[error("{tool} failed ({detail}); is the uidmap package installed?")]
    MapTool { tool: &'static str, detail: String },
    #[error("entering a user namespace: {0}")]
    Io(#[from] io::Error),
}

/// Which side of the fork [`become_root`] returned on.
pub enum Forked {
    /// The namespace's root: go on with the build.
    Child,
    /// The caller outside: exit with the child's exit code.
    Parent(i32),
}

/// A subordinate id range: `count` ids from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The first range `/etc/subuid`-style `content` grants to `user` (by
/// name or by numeric id, as shadow's tools accept).
pub fn subordinate_range(content: &str, user: &str, id: u32) -> Option<IdRange> {
    let id = id.to_string();
    content.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let owner = fields.next()?;
        let start = fields.next()?.parse().ok()?;
        let count = fields.next()?.parse().ok()?;
        (owner == user || owner == id)
            .then_some(IdRange { start, count })
            .filter(|r| r.count > 0)
    })
}

/// Makes this process root of a new user namespace with the caller's
/// subordinate ids mapped. Must be called while the process has a single
/// thread. Returns [`Forked::Child`] in the namespace and
/// [`Forked::Parent`] with its exit code once it is done.
pub fn become_root() -> Result<Forked, UsernsError> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let (uids, gids) = subordinate_ranges(uid)?;

    let (mut parent_end, mut child_end) = UnixStream::pair()?;
    // SAFETY: the process is single-threaded (documented precondition), so
    // the child may go on running ordinary Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error().into());
    }
    if pid == 0 {
        drop(parent_end);
        // The build dies with the process that started it.
        let _ =
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
        let ready = (|| -> io::Result<bool> {
            // SAFETY: single-threaded, see above.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER)? };
            child_end.write_all(&[1])?;
            let mut mapped = [0u8];
            child_end.read_exact(&mut mapped)?;
            Ok(mapped[0] == 1)
        })();
        match ready {
            Ok(true) => return Ok(Forked::Child),
            // The parent reports why.
            Ok(false) => std::process::exit(125),
            Err(e) => {
                eprintln!("error: entering a user namespace: {e}");
                std::process::exit(125)
            }
        }
    }
    drop(child_end);
    let mut unshared = [0u8];
    if parent_end.read_exact(&mut unshared).is_err() {
        return Ok(Forked::Parent(wait(pid)?));
    }
    let mapped =
        map_ids("newuidmap", pid, uid, uids).and_then(|()| map_ids("newgidmap", pid, gid, gids));
    parent_end.write_all(&[u8::from(mapped.is_ok())])?;
    let code = wait(pid)?;
    mapped.map(|()| Forked::Parent(code))
}

/// What a user namespace needs that this machine lacks, checked without
/// setting one up: subordinate ids for the caller, and `newuidmap` and
/// `newgidmap` on `PATH`. A namespace may still fail for other reasons
/// (the kernel or a seccomp profile refusing it), which are not missing
/// parts of a machine but a refusal, and fail the build.
pub fn missing_prerequisite() -> Option<UsernsError> {
    let uid = rustix::process::getuid().as_raw();
    if let Err(e) = subordinate_ranges(uid) {
        return Some(e);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["newuidmap", "newgidmap"]
        .into_iter()
        .find(|tool| !on_path(&path, tool))
        .map(|tool| UsernsError::NoMapTool { tool })
}

/// Whether an executable `name` is in one of `path`'s directories.
fn on_path(path: &std::ffi::OsStr, name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The caller's subordinate uids and gids.
fn subordinate_ranges(uid: u32) -> Result<(IdRange, IdRange), UsernsError> {
    // By name, as newuidmap looks the caller up.
    let user = users::name_of(Path::new("/"), uid).unwrap_or_else(|| uid.to_string());
    let range = |file: &str| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|content| subordinate_range(&content, &user, uid))
            .ok_or_else(|| UsernsError::NoSubordinateIds {
                user: user.clone(),
                uid,
                file: file.to_string(),
            })
    };
    Ok((range("/etc/subuid")?, range("/etc/subgid")?))
}

/// `newuidmap PID 0 OWN 1 1 START COUNT` (or newgidmap).
fn map_ids(tool: &'static str, pid: i32, own: u32, range: IdRange) -> Result<(), UsernsError> {
    let out = Command::new(tool)
        .args([pid, 0, own as i32, 1, 1].map(|n| n.to_string()))
        .args([range.start, range.count].map(|n| n.to_string()))
        .output()
        .map_err(|e| UsernsError::MapTool {
            tool,
            detail: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(UsernsError::MapTool {
        tool,
        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn wait(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(crate::exec::run::exit_code(
        std::process::ExitStatus::from_raw(status),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_id() {
        let file = "# comment\nalice:100000:65536\n1001:200000:1000\nbob:300000:0\n";
        assert_eq!(
            subordinate_range(file, "alice", 1000),
            Some(IdRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            subordinate_range(file, "carol", 1001),
            Some(IdRange {
                start: 200000,
                count: 1000
            })
        );
        assert_eq!(subordinate_range(file, "bob", 1002), None);
        assert_eq!(subordinate_range(file, "dave", 1003), None);
    }
}
