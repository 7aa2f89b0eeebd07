//! RUN isolation (`namespaces` mode): the command runs chrooted into the
//! step's root, in new mount, PID, UTS and IPC namespaces, with /proc, a
//! minimal /dev, a read-only /sys and Kiln's own /etc/hosts, resolv.conf and
//! hostname mounted. The mounts die with the namespaces, so none of them can
//! leak into the layer or onto the host.
//!
//! Namespaces are set up in a re-executed `kiln` (the step runner): the
//! builder is multi-threaded, and a fresh single-threaded process is the
//! only safe place for unshare, mount and chroot.
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{MountFlags, MountPropagationFlags};
use serde::{Deserialize, Serialize};

use crate::exec::users::Identity;
use crate::rootfs::resolve_in_root;

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
    /// Mount points the builder had to create; removed after the step so
    /// they never reach a layer.
    #[serde(skip)]
    created: Vec<PathBuf>,
}

/// The files a RUN sees at /etc/hosts, /etc/resolv.conf and /etc/hostname.
pub struct EtcFiles {
    pub hostname: String,
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub hostname_file: PathBuf,
}

impl EtcFiles {
    /// Writes Kiln's copies into `dir` (part of the build's state).
    pub fn create(dir: &Path, hostname: &str) -> io::Result<EtcFiles> {
        std::fs::create_dir_all(dir)?;
        let files = EtcFiles {
            hostname: hostname.to_string(),
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
        for (dir, slot) in [("/proc", 0), ("/dev", 1), ("/sys", 2)] {
            let path = resolve_in_root(root, Path::new(dir), true)?;
            if !path.exists() {
                std::fs::create_dir(&path)?;
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
            std::fs::create_dir(&etc_dir)?;
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
                    std::fs::write(&target, b"")?;
                    mp.created.push(target.clone());
                }
            }
            mp.files.push((source.clone(), target));
        }
        Ok(mp)
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

/// Runs the step and returns its exit code (128 + signal when killed).
pub fn run(spec: &RunSpec) -> io::Result<i32> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(STEP_RUNNER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // SAFETY: unshare is async-signal-safe and the child is single-threaded
    // after fork; the PID namespace applies to the runner's children.
    unsafe {
        cmd.pre_exec(|| {
            use rustix::thread::UnshareFlags as F;
            rustix::thread::unshare_unsafe(F::NEWNS | F::NEWPID | F::NEWUTS | F::NEWIPC)?;
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

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// The step runner's main: reads a [`RunSpec`] on stdin, mounts, runs the
/// command as PID 1 of the new PID namespace and returns its exit code.
pub fn step_runner_main() -> i32 {
    match step_runner() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: setting up the RUN environment failed: {e}");
            125
        }
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn step_runner() -> io::Result<i32> {
    let spec: RunSpec = serde_json::from_reader(io::stdin().lock())?;
    let m = &spec.mounts;
    // Nothing mounted from here on may propagate back to the host.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
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
    rustix::mount::mount_remount(&m.sys, MountFlags::BIND | MountFlags::RDONLY, c"")?;
    for (source, target) in &m.files {
        rustix::mount::mount_bind(source, target)?;
    }

    let root = cstring(&spec.root)?;
    let proc_dir = cstring(&m.proc)?;
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
    // SAFETY: runs in the forked child of this single-threaded runner; the
    // child is PID 1 of the new PID namespace, so its /proc shows only it.
    unsafe {
        cmd.pre_exec(move || {
            rustix::mount::mount(
                c"proc",
                proc_dir.as_c_str(),
                c"proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                None,
            )?;
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
            Ok(())
        });
    }
    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("kiln: cannot run {:?}: {e}", spec.argv[0]);
            return Ok(127);
        }
    };
    Ok(exit_code(status))
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
