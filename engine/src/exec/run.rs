//! RUN isolation (`namespaces` mode): the command runs chrooted into the
//! step's root, in new mount, PID, UTS and IPC namespaces, with /proc, a
//! minimal /dev, a read-only /sys and Kiln's own /etc/hosts, resolv.conf and
//! hostname mounted. The mounts die with the namespaces, so none of them can
//! leak into the layer or onto the host.
//!
//! Namespaces are set up in a single-threaded `kiln` (the step runner),
//! forked by the zygote (`zygote.rs`) or else re-executed: the builder is
//! multi-threaded, and a single-threaded process is the only safe place
//! for unshare, mount and chroot.
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, MountPropagationFlags};
use serde::{Deserialize, Serialize};

use crate::excerpt::excerpt;
use crate::exec::users::Identity;
use crate::rootfs::{create_dir_all_in_root, explain_not_found, resolve_in_root};

/// The hidden first argument that makes `kiln` act as the step runner.
pub const STEP_RUNNER_ARG: &str = "__kiln-run-step";

/// Everything the step runner needs, with every path already resolved
/// inside the root by the builder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub root: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub hostname: String,
    pub mounts: MountPoints,
    /// A heredoc script (name, content) made executable at /dev/pipes/<name>.
    pub script: Option<(String, String)>,
    /// `--network=none`: a network namespace of its own (loopback only).
    pub no_network: bool,
    pub isolation: Isolation,
}

/// How a RUN is isolated (`--isolation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Isolation {
    /// chroot inside new mount, PID, UTS and IPC namespaces, with /proc,
    /// /dev, /sys and Kiln's /etc files mounted.
    #[default]
    Namespaces,
    /// The same, run by an unprivileged user as root of a user namespace
    /// (see [`crate::exec::userns`]).
    Rootless,
    /// Kaniko's way, for disposable containers only: every stage is built
    /// in the machine's own `/`, and RUN runs there with no isolation; like
    /// `Chroot`, no `RUN --mount` or `--network=none`.
    None,
    /// chroot alone, for containers that forbid unshare and mount: device
    /// nodes are made with mknod, /proc is mounted only if allowed, the
    /// image's own /etc files are used; `RUN --mount` and
    /// `--network=none` are refused.
    Chroot,
}

/// As `--isolation` spells it.
impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Rootless => "rootless",
            Isolation::Chroot => "chroot",
            Isolation::None => "none",
        })
    }
}

/// A `RUN --mount`, with host paths resolved by the builder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StepMount {
    /// A host file or directory (a bind, or a cache dir) over `target`.
    Bind {
        source: PathBuf,
        target: PathBuf,
        readonly: bool,
    },
    Tmpfs {
        target: PathBuf,
        size: Option<u64>,
    },
    /// A secret: written into a tmpfs that only the runner's mount
    /// namespace sees, so its content never touches the disk.
    Secret {
        target: PathBuf,
        content: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
    },
}

/// Host paths (inside the root) where the runner mounts things, and the
/// files it bind-mounts over /etc entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MountPoints {
    pub proc: PathBuf,
    pub dev: PathBuf,
    pub sys: PathBuf,
    /// (source on the host, target inside the root)
    pub files: Vec<(PathBuf, PathBuf)>,
    /// The step's own `--mount`s, in order.
    pub extra: Vec<StepMount>,
    /// Where secrets are staged (an empty dir outside the root).
    pub secret_stage: Option<PathBuf>,
    /// Mount points the builder had to create; removed after the step so
    /// they never reach a layer.
    #[serde(skip)]
    created: Vec<PathBuf>,
}

/// The files a RUN sees at /etc/hosts, /etc/resolv.conf and /etc/hostname.
pub struct EtcFiles {
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub hostname_file: PathBuf,
}

impl EtcFiles {
    /// Writes Kiln's copies into `dir` (part of the build's state).
    pub fn create(dir: &Path, hostname: &str) -> io::Result<EtcFiles> {
        std::fs::create_dir_all(dir)?;
        let files = EtcFiles {
            hosts: dir.join("hosts"),
            resolv_conf: dir.join("resolv.conf"),
            hostname_file: dir.join("hostname"),
        };
        std::fs::write(
            &files.hosts,
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
        )?;
        let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
        std::fs::write(&files.resolv_conf, resolv)?;
        std::fs::write(&files.hostname_file, format!("{hostname}\n"))?;
        Ok(files)
    }
}

impl MountPoints {
    /// Finds (or creates) every mount point inside the root.
    pub fn prepare(root: &Path, etc: &EtcFiles) -> io::Result<MountPoints> {
        let mut mp = MountPoints::default();
        let explain = |dir: &'static str| move |e| explain_not_found(root, Path::new(dir), e);
        for (dir, slot) in [("/proc", 0), ("/dev", 1), ("/sys", 2)] {
            let path = resolve_in_root(root, Path::new(dir), true)?;
            if !path.exists() {
                std::fs::create_dir(&path).map_err(explain(dir))?;
                mp.created.push(path.clone());
            }
            match slot {
                0 => mp.proc = path,
                1 => mp.dev = path,
                _ => mp.sys = path,
            }
        }
        let etc_dir = resolve_in_root(root, Path::new("/etc"), true)?;
        if !etc_dir.exists() {
            std::fs::create_dir(&etc_dir).map_err(explain("/etc"))?;
            mp.created.push(etc_dir);
        }
        for (name, source) in [
            ("/etc/hosts", &etc.hosts),
            ("/etc/resolv.conf", &etc.resolv_conf),
            ("/etc/hostname", &etc.hostname_file),
        ] {
            let target = resolve_in_root(root, Path::new(name), true)?;
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_file() => {}
                Ok(_) => continue, // a directory or device there: leave it alone
                Err(_) => {
                    std::fs::write(&target, b"").map_err(explain(name))?;
                    mp.created.push(target.clone());
                }
            }
            mp.files.push((source.clone(), target));
        }
        Ok(mp)
    }

    /// `--isolation none`: the root's own /proc and /dev, nothing mounted.
    pub fn host(root: &Path) -> MountPoints {
        MountPoints {
            proc: root.join("proc"),
            dev: root.join("dev"),
            sys: root.join("sys"),
            ..MountPoints::default()
        }
    }

    /// Finds (or creates, recording what it made) a mount point inside the
    /// root for a `--mount`: a directory, or an empty file when a file is
    /// mounted there.
    pub fn mount_point(&mut self, root: &Path, target: &str, file: bool) -> io::Result<PathBuf> {
        let target = Path::new(target);
        if let Some(parent) = target.parent() {
            let (_, created) = create_dir_all_in_root(root, parent)?;
            self.created.extend(created);
        }
        let path = resolve_in_root(root, target, true)?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() != file => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "cannot mount a {} over {}",
                    if file { "file" } else { "directory" },
                    target.display()
                )))
            }
            Err(_) if file => {
                std::fs::write(&path, b"").map_err(|e| explain_not_found(root, target, e))?;
                self.created.push(path.clone());
            }
            Err(_) => {
                std::fs::create_dir(&path).map_err(|e| explain_not_found(root, target, e))?;
                self.created.push(path.clone());
            }
        }
        Ok(path)
    }

    /// Removes the mount points this step created, newest first.
    pub fn cleanup(&self) -> io::Result<()> {
        for path in self.created.iter().rev() {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => {
                    let _ = std::fs::remove_dir(path); // kept if the step filled it
                }
                Ok(m) if m.len() == 0 => std::fs::remove_file(path)?,
                _ => {}
            }
        }
        Ok(())
    }
}

pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs the step and returns its exit code (128 + signal when killed).
pub fn run(spec: &RunSpec) -> io::Result<i32> {
    if spec.isolation == Isolation::None {
        // In this process: Kiln's own libraries may be gone from a `/` a
        // base image was unpacked over, so it cannot re-execute itself.
        return chroot_runner(spec);
    }
    // Forked by the zygote, started before the step (`zygote.rs`); else
    // a runner of its own.
    if let Some(code) = super::zygote::run(spec)? {
        return Ok(code);
    }
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(STEP_RUNNER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let flags = unshare_flags(spec);
    // SAFETY: unshare is async-signal-safe and the child is single-threaded
    // after fork; the PID namespace applies to the runner's children.
    unsafe {
        cmd.pre_exec(move || {
            // A killed build takes its step with it.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if !flags.is_empty() {
                rustix::thread::unshare_unsafe(flags)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        serde_json::to_writer(&mut stdin, spec)?;
        stdin.flush()?;
    }
    let status = child.wait()?;
    Ok(exit_code(status))
}

/// The namespaces a step's runner enters: none for `chroot`; for
/// `namespaces` and `rootless` new mount, PID (for its children), UTS and
/// IPC ones, and a network one for `--network=none`.
fn unshare_flags(spec: &RunSpec) -> rustix::thread::UnshareFlags {
    use rustix::thread::UnshareFlags as F;
    let mut flags = match spec.isolation {
        Isolation::Namespaces | Isolation::Rootless => F::NEWNS | F::NEWPID | F::NEWUTS | F::NEWIPC,
        Isolation::Chroot | Isolation::None => F::empty(),
    };
    if spec.no_network {
        flags |= F::NEWNET;
    }
    flags
}

/// Enters the step's namespaces ([`unshare_flags`]): for a runner forked
/// by the zygote, which must be single-threaded.
pub(crate) fn enter_namespaces(spec: &RunSpec) -> io::Result<()> {
    let flags = unshare_flags(spec);
    if !flags.is_empty() {
        // SAFETY: the caller is single-threaded (a fork of the zygote).
        unsafe { rustix::thread::unshare_unsafe(flags)? };
    }
    Ok(())
}

pub(crate) fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The step runner's main: reads a [`RunSpec`] on stdin, mounts, runs the
/// command as PID 1 of the new PID namespace and returns its exit code.
pub fn step_runner_main() -> i32 {
    exit_code_of(step_runner())
}

/// A step runner's exit code: the command's, or 125 (as `docker run`
/// exits when it cannot start the container) with the reason on stderr.
pub(crate) fn exit_code_of(ran: io::Result<i32>) -> i32 {
    ran.unwrap_or_else(|e| {
        eprintln!("kiln: setting up the RUN environment failed: {e}");
        125
    })
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn step_runner() -> io::Result<i32> {
    let spec: RunSpec = serde_json::from_reader(io::stdin().lock())?;
    runner(&spec)
}

/// What the step runner does, in the namespaces it was started in: mounts,
/// runs the command as PID 1 of the new PID namespace, and returns its
/// exit code.
pub(crate) fn runner(spec: &RunSpec) -> io::Result<i32> {
    if spec.isolation == Isolation::Chroot {
        return chroot_runner(spec);
    }
    // Nothing mounted from here on may propagate back to the host.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    let m = &spec.mounts;
    rustix::system::sethostname(spec.hostname.as_bytes())?;

    let nosuid = MountFlags::NOSUID;
    rustix::mount::mount(
        "tmpfs",
        &m.dev,
        "tmpfs",
        nosuid,
        Some(c"mode=755,size=65536k"),
    )?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = m.dev.join(node);
        std::fs::write(&target, b"")?;
        rustix::mount::mount_bind(Path::new("/dev").join(node), &target)?;
    }
    let pts = m.dev.join("pts");
    std::fs::create_dir(&pts)?;
    rustix::mount::mount(
        "devpts",
        &pts,
        "devpts",
        nosuid | MountFlags::NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = m.dev.join("shm");
    std::fs::create_dir(&shm)?;
    rustix::mount::mount(
        "shm",
        &shm,
        "tmpfs",
        nosuid | MountFlags::NODEV,
        Some(c"mode=1777"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, m.dev.join(link))?;
    }
    if let Some((name, content)) = &spec.script {
        use std::os::unix::fs::PermissionsExt;
        let pipes = m.dev.join("pipes");
        std::fs::create_dir(&pipes)?;
        let path = pipes.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    rustix::mount::mount_bind_recursive("/sys", &m.sys)?;
    remount_readonly(&m.sys)?;
    for (source, target) in &m.files {
        rustix::mount::mount_bind(source, target)?;
    }
    mount_extra(m)?;

    // Mounted by the command itself: it is PID 1 of the new PID
    // namespace, so its /proc shows only its own processes.
    wait_command(command(spec, Some(cstring(&m.proc)?))?, spec)
}

/// `--isolation chroot` (and `none`, whose root is `/`): no namespaces and,
/// where it can be helped, no mounts; everything made in the root is
/// removed again before the snapshot.
fn chroot_runner(spec: &RunSpec) -> io::Result<i32> {
    use rustix::fs::{FileType, Mode};
    let m = &spec.mounts;
    let mut made = Vec::new();
    for (node, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = m.dev.join(node);
        if std::fs::symlink_metadata(&path).is_err()
            && rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o666),
                rustix::fs::makedev(major, minor),
            )
            .is_ok()
        {
            made.push(path);
        }
    }
    if let Some((name, content)) = &spec.script {
        use std::os::unix::fs::PermissionsExt;
        let pipes = m.dev.join("pipes");
        std::fs::create_dir_all(&pipes)?;
        let path = pipes.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        made.push(path);
        made.push(pipes);
    }
    // Best effort: a container that forbids unshare usually forbids mount.
    let proc_mounted = spec.isolation == Isolation::Chroot
        && rustix::mount::mount(
            "proc",
            &m.proc,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None,
        )
        .is_ok();
    let code = command(spec, None).and_then(|cmd| wait_command(cmd, spec));
    if proc_mounted {
        rustix::mount::unmount(&m.proc, rustix::mount::UnmountFlags::DETACH)?;
    }
    for path in made {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&path)?,
            Ok(_) => std::fs::remove_file(&path)?,
            Err(_) => {}
        }
    }
    code
}

/// The step's command: chrooted, in its WORKDIR, as its user, with its
/// env; `proc_dir` (a host path) gets /proc mounted right before chroot.
fn command(spec: &RunSpec, proc_dir: Option<CString>) -> io::Result<Command> {
    let root = cstring(&spec.root)?;
    let cwd = CString::new(spec.cwd.as_bytes()).map_err(io::Error::other)?;
    let (uid, gid) = (spec.uid, spec.gid);
    let groups: Vec<rustix::process::Gid> = spec
        .groups
        .iter()
        .map(|g| rustix::process::Gid::from_raw(*g))
        .collect();
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|e| e.split_once('=')))
        .stdin(Stdio::null());
    // SAFETY: runs in the forked child, between fork and exec, and makes
    // raw system calls only (the builder is multi-threaded in `none` mode).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(proc_dir) = &proc_dir {
                rustix::mount::mount(
                    c"proc",
                    proc_dir.as_c_str(),
                    c"proc",
                    MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                    None,
                )?;
            }
            // A group of its own, killed when it exits (see wait_command).
            rustix::process::setpgid(None, None)?;
            rustix::process::chroot(root.as_c_str())?;
            rustix::process::chdir(cwd.as_c_str())?;
            rustix::thread::set_thread_groups(&groups)?;
            rustix::thread::set_thread_res_gid(
                rustix::process::Gid::from_raw(gid),
                rustix::process::Gid::from_raw(gid),
                rustix::process::Gid::from_raw(gid),
            )?;
            rustix::thread::set_thread_res_uid(
                rustix::process::Uid::from_raw(uid),
                rustix::process::Uid::from_raw(uid),
                rustix::process::Uid::from_raw(uid),
            )?;
            // After setuid, which clears it. The command is PID 1 of its
            // namespace: when it dies, so does everything it left running.
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs the command and then kills what it left running in its process
/// group: without a PID namespace (chroot, none) nothing else would.
fn wait_command(mut cmd: Command, spec: &RunSpec) -> io::Result<i32> {
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("kiln: cannot run {:?}: {e}", excerpt(&spec.argv[0]));
            return Ok(127);
        }
    };
    let status = child.wait()?;
    if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    Ok(exit_code(status))
}

/// Makes a bind mount read-only, keeping the nosuid, nodev and noexec it
/// has: in a user namespace those are locked, and dropping them is EPERM.
fn remount_readonly(target: &Path) -> io::Result<()> {
    use rustix::fs::StatVfsMountFlags as V;
    let have = rustix::fs::statvfs(target)?.f_flag;
    let mut flags = MountFlags::BIND | MountFlags::RDONLY;
    for (vfs, mount) in [
        (V::NOSUID, MountFlags::NOSUID),
        (V::NODEV, MountFlags::NODEV),
        (V::NOEXEC, MountFlags::NOEXEC),
    ] {
        if have.contains(vfs) {
            flags |= mount;
        }
    }
    rustix::mount::mount_remount(target, flags, c"")?;
    Ok(())
}

/// Mounts the step's `--mount`s.
fn mount_extra(m: &MountPoints) -> io::Result<()> {
    let staged = match (
        &m.secret_stage,
        m.extra
            .iter()
            .any(|e| matches!(e, StepMount::Secret { .. })),
    ) {
        (Some(stage), true) => {
            rustix::mount::mount(
                "tmpfs",
                stage,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                Some(c"mode=700,size=4m"),
            )?;
            Some(stage)
        }
        _ => None,
    };
    for (n, mount) in m.extra.iter().enumerate() {
        match mount {
            StepMount::Bind {
                source,
                target,
                readonly,
            } => {
                rustix::mount::mount_bind_recursive(source, target)?;
                if *readonly {
                    remount_readonly(target)?;
                }
            }
            StepMount::Tmpfs { target, size } => {
                let options = size.map(|s| format!("size={s}")).unwrap_or_default();
                rustix::mount::mount(
                    "tmpfs",
                    target,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    Some(CString::new(options).map_err(io::Error::other)?.as_c_str()),
                )?;
            }
            StepMount::Secret {
                target,
                content,
                mode,
                uid,
                gid,
            } => {
                use std::os::unix::fs::PermissionsExt;
                let stage = staged.ok_or_else(|| io::Error::other("no secret staging dir"))?;
                let file = stage.join(n.to_string());
                std::fs::write(&file, content)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
                std::os::unix::fs::chown(&file, Some(*uid), Some(*gid))?;
                rustix::mount::mount_bind(&file, target)?;
                remount_readonly(target)?;
            }
        }
    }
    Ok(())
}

/// The environment a RUN gets: the image's env and the ARGs in scope, plus
/// the defaults a container runtime adds (PATH, HOME, HOSTNAME).
pub fn run_env(env: &[(String, String)], identity: &Identity, hostname: &str) -> Vec<String> {
    let mut out: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let has = |key: &str| env.iter().any(|(k, _)| k == key);
    if !has("PATH") {
        out.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !has("HOME") {
        out.push(format!("HOME={}", identity.home));
    }
    if !has("HOSTNAME") {
        out.push(format!("HOSTNAME={hostname}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn prepare_error(links: &[(&str, &str)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let etc = EtcFiles::create(&dir.path().join("etc"), "kiln").unwrap();
        for (link, target) in links {
            symlink(target, root.join(link)).unwrap();
        }
        MountPoints::prepare(&root, &etc).unwrap_err().to_string()
    }

    #[test]
    fn mount_points_through_dangling_or_looping_links_are_named() {
        assert_eq!(
            prepare_error(&[("proc", "/srv/missing")]),
            "/proc is a symlink to /srv/missing, which does not exist in the image"
        );
        assert_eq!(
            prepare_error(&[("dev", "/dev")]),
            "/dev is a symlink to /dev: too many levels of symbolic links"
        );
        assert_eq!(
            prepare_error(&[("etc", "/srv/etc")]),
            "/etc is a symlink to /srv/etc, which does not exist in the image"
        );
    }

    #[test]
    fn a_file_mount_point_through_a_dangling_link_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        symlink("/srv/missing", dir.path().join("run/secret")).unwrap();
        let e = MountPoints::default()
            .mount_point(dir.path(), "/run/secret", true)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/run/secret is a symlink to /srv/missing, which does not exist in the image"
        );
    }
}
