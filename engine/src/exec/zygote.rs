//! The step runners' zygote: `kiln` started once per build, before its
//! first RUN, as the parent of every RUN's step runner. Starting `kiln`
//! (exec, loading, the C++ static initializers RocksDB brings) takes about
//! 4 ms, which every RUN paid when its runner was `kiln` started afresh;
//! the zygote pays it once, while the steps before the first RUN run, and
//! forks each step's runner: a fork of a small single-threaded process,
//! which then unshares its namespaces and goes on as the runner did.
//!
//! It is started without new namespaces, so it shares Kiln's mount
//! namespace and a runner forked from it sees the step's root that Kiln
//! mounted just before; it inherits Kiln's stdout and stderr, which the
//! steps write to. Kiln talks to it over a socket on its stdin: a spec
//! (its length, then its JSON) in, the runner's exit code out. It exits
//! when Kiln closes its end, and dies with Kiln, as a runner dies with it.
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};

use rustix::process::Signal;

use super::run::{self, RunSpec};

/// The hidden first argument that makes `kiln` act as the zygote.
pub const ZYGOTE_ARG: &str = "__kiln-run-zygote";

/// The zygote this process started, if it did and it is still wanted.
static ZYGOTE: Mutex<Option<Zygote>> = Mutex::new(None);

struct Zygote {
    /// Whether it was spawned, told once by its keeper; `None` until then.
    spawned: Option<bool>,
    told: mpsc::Receiver<bool>,
    socket: UnixStream,
}

impl Zygote {
    /// Starts the zygote on a thread of its own, its keeper, so that the
    /// build goes on meanwhile: spawning a process took 0.2-5 ms here.
    /// The keeper then waits for it to exit, so it reaps it, and being
    /// the thread that spawned it, it lives as long as the zygote's death
    /// signal must stand (a parent-death signal follows the thread).
    fn start() -> io::Result<Zygote> {
        let (ours, theirs) = UnixStream::pair()?;
        let exe = std::env::current_exe()?;
        let (tell, told) = mpsc::channel();
        std::thread::Builder::new()
            .name("kiln-zygote".into())
            .spawn(move || {
                // Nothing runs between fork and exec, so the standard
                // library spawns it with posix_spawn (vfork): no copy of
                // the page tables of a process whose other threads are
                // busy. The zygote takes its death signal itself.
                let spawned = Command::new(exe)
                    .arg(ZYGOTE_ARG)
                    .arg(std::process::id().to_string())
                    .stdin(Stdio::from(OwnedFd::from(theirs)))
                    .stdout(Stdio::inherit())
                    .stderr(Stdio::inherit())
                    .spawn();
                let _ = tell.send(spawned.is_ok());
                if let Ok(mut child) = spawned {
                    let _ = child.wait();
                }
            })?;
        Ok(Zygote {
            spawned: None,
            told,
            socket: ours,
        })
    }

    /// Whether the zygote was spawned (waiting for its keeper to tell).
    fn spawned(&mut self) -> bool {
        *self
            .spawned
            .get_or_insert_with(|| self.told.recv().unwrap_or(false))
    }

    /// Runs a step; `None` when the zygote took no spec (it is gone).
    fn run(&mut self, spec: &RunSpec) -> io::Result<Option<i32>> {
        if !self.spawned() {
            return Ok(None);
        }
        let json = serde_json::to_vec(spec)?;
        let mut message = (json.len() as u32).to_le_bytes().to_vec();
        message.extend(json);
        if self.socket.write_all(&message).is_err() {
            return Ok(None);
        }
        let mut code = [0; 4];
        self.socket.read_exact(&mut code).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the RUN step runner's zygote stopped: {e}"),
            )
        })?;
        Ok(Some(i32::from_le_bytes(code)))
    }
}

impl Drop for Zygote {
    /// Closes the socket, which ends the zygote; its keeper reaps it. Its
    /// exit (2-3 ms, for a process that mapped all of `kiln`) need not
    /// hold up the push, and by the time the JSON log waits for its pipes
    /// to close, the zygote's copies of them are gone.
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// The zygote, started now unless it runs already. Only a speed-up: one
/// that cannot start leaves each step a runner of its own.
fn started() -> std::sync::MutexGuard<'static, Option<Zygote>> {
    let mut zygote = ZYGOTE.lock().unwrap_or_else(|e| e.into_inner());
    if zygote.is_none() {
        *zygote = Zygote::start().ok();
    }
    zygote
}

/// Starts the zygote now, for RUN steps to come.
pub fn prepare() {
    drop(started());
}

/// Runs a step through the zygote (started now if need be); `None` when
/// it cannot, and the caller starts a runner of the step's own.
pub fn run(spec: &RunSpec) -> io::Result<Option<i32>> {
    let mut zygote = started();
    let Some(running) = zygote.as_mut() else {
        return Ok(None);
    };
    let code = running.run(spec);
    if !matches!(code, Ok(Some(_))) {
        *zygote = None;
    }
    code
}

/// Stops the zygote: the build's steps are done, and its hold on Kiln's
/// stdout and stderr (pipes, with JSON logs) must end with them. It exits
/// on its own; nothing waits for that here.
pub fn stop() {
    ZYGOTE.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// The zygote's main: forks a runner for each spec read on stdin (a
/// socket), waits for it and writes its exit code back, until Kiln closes
/// the socket.
pub fn zygote_main() -> i32 {
    // SAFETY: fd 0 is the socket Kiln handed over, and only this owns it.
    let mut socket = unsafe { UnixStream::from_raw_fd(0) };
    // A killed build takes its steps with it; if Kiln died before the
    // signal was set, the zygote goes now.
    let kiln = std::env::args().nth(2).and_then(|p| p.parse::<i32>().ok());
    if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err()
        || rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != kiln
    {
        return 0;
    }
    loop {
        let mut length = [0; 4];
        if socket.read_exact(&mut length).is_err() {
            return 0;
        }
        let mut json = vec![0; u32::from_le_bytes(length) as usize];
        if socket.read_exact(&mut json).is_err() {
            return 0;
        }
        let code = run::exit_code_of(fork_runner(&json));
        if socket.write_all(&code.to_le_bytes()).is_err() {
            return 0;
        }
    }
}

/// Forks the runner of one step and waits for it: its exit code.
fn fork_runner(json: &[u8]) -> io::Result<i32> {
    let spec: RunSpec = serde_json::from_slice(json)?;
    let zygote = rustix::process::getpid();
    // SAFETY: the zygote is single-threaded, so the child may go on as any
    // program would; it leaves by `_exit` only.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            let code = run::exit_code_of((|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
                // The zygote died before the line above: so does this.
                if rustix::process::getppid() != Some(zygote) {
                    return Ok(125);
                }
                run::enter_namespaces(&spec)?;
                run::runner(&spec)
            })());
            // SAFETY: ends the child without the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for the child just forked.
            if unsafe { libc::waitpid(pid, &mut status, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(run::exit_code(
                std::os::unix::process::ExitStatusExt::from_raw(status),
            ))
        }
    }
}
