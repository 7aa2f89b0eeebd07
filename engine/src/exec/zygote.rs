//! The step runners' zygote: a process started once per build, before its
//! first RUN, as the parent of every RUN's step runner. Starting `kiln`
//! (exec, loading, the C++ static initializers RocksDB brings) takes about
//! 4 ms, which every RUN paid when its runner was `kiln` started afresh;
//! the zygote pays it once, while the steps before the first RUN run, and
//! forks each step's runner: a fork of a small single-threaded process,
//! which then unshares its namespaces and goes on as the runner did.
//!
//! A `kiln build` forks it while it still has one thread ([`fork`]): a
//! fork of a process that has done little yet costs a fraction of a
//! millisecond, where `kiln` started afresh costs 3-4 ms of CPU beside the
//! build's first steps. Elsewhere (the engine used as a library, or a fork
//! that failed) it is spawned as `kiln __kiln-run-zygote` when first needed.
//!
//! It is started without new namespaces, so it shares Kiln's mount
//! namespace and a runner forked from it sees the step's root that Kiln
//! mounted just before; it inherits Kiln's stdout and stderr, which the
//! steps write to. Kiln talks to it over a socket on its stdin: a spec
//! (its length, then its JSON) in, the runner's exit code out. It exits
//! when Kiln closes its end, and dies with Kiln, as a runner dies with it.
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    started: Started,
    socket: UnixStream,
}

/// Whether the zygote runs: known at once for a forked one, told once by
/// the keeper of a spawned one.
enum Started {
    Told(mpsc::Receiver<bool>),
    Known(bool),
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
            started: Started::Told(told),
            socket: ours,
        })
    }

    /// Whether the zygote runs (waiting for its keeper to tell).
    fn started(&mut self) -> bool {
        if let Started::Told(told) = &self.started {
            self.started = Started::Known(told.recv().unwrap_or(false));
        }
        matches!(self.started, Started::Known(true))
    }

    /// Runs a step; `None` when the zygote took no spec (it is gone).
    fn run(&mut self, spec: &RunSpec) -> io::Result<Option<i32>> {
        if !self.started() {
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
    /// Closes the socket, which ends the zygote; a spawned one's keeper
    /// reaps it (a forked one is left to whoever reaps Kiln's orphans). Its
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

/// Forks the zygote from this process, for RUN steps to come. The caller
/// must have one thread: the child goes on as the zygote, running Rust
/// code, which a fork of a threaded process could deadlock in. If the fork
/// fails, the zygote is spawned when first needed.
pub fn fork() {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let kiln = rustix::process::getpid().as_raw_nonzero().get();
    // SAFETY: the caller has one thread (see above), so the child may go
    // on as any program would; it leaves by `_exit` only.
    match unsafe { libc::fork() } {
        -1 => {}
        0 => {
            drop(ours);
            let code = match only_the_socket(theirs) {
                Ok(socket) => serve(socket, Some(kiln)),
                Err(_) => 0,
            };
            // SAFETY: ends the child without the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        _ => {
            drop(theirs);
            *ZYGOTE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Zygote {
                started: Started::Known(true),
                socket: ours,
            });
        }
    }
}

/// Leaves a forked zygote what a spawned one has: the socket as fd 0, and
/// Kiln's stdout and stderr. No other descriptor of Kiln's (its state
/// dir's, its logs') reaches a step; named, it shows as itself in `ps`.
fn only_the_socket(socket: UnixStream) -> io::Result<UnixStream> {
    // SAFETY: dup2 onto fd 0, which the socket then is; close_range closes
    // descriptors only this child holds now; PR_SET_NAME names the thread.
    unsafe {
        if libc::dup2(socket.as_raw_fd(), 0) == -1
            || libc::close_range(3, libc::c_uint::MAX, 0) == -1
        {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(socket);
        libc::prctl(libc::PR_SET_NAME, c"kiln-zygote".as_ptr());
        Ok(UnixStream::from_raw_fd(0))
    }
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
    let socket = unsafe { UnixStream::from_raw_fd(0) };
    let kiln = std::env::args().nth(2).and_then(|p| p.parse::<i32>().ok());
    serve(socket, kiln)
}

/// The zygote's loop, for Kiln (`kiln`, its pid) on `socket`.
fn serve(mut socket: UnixStream, kiln: Option<i32>) -> i32 {
    // A killed build takes its steps with it; if Kiln died before the
    // signal was set, the zygote goes now.
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
