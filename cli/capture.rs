//! `--log-format json` and RUN output. A RUN step's command writes to the
//! stdout and stderr it inherits from Kiln (through the step runner), so
//! while a JSON build runs, fds 1 and 2 are pipes that Kiln reads: each
//! line becomes a JSON record (`"event": "run-output"`, the stream, and the
//! step it came from) on the real stderr, and every stderr line parses.
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::sink::{sink, Sink};

/// The read ends of the two pipes, with what was read of an unfinished line.
pub(crate) struct Pipes {
    streams: Vec<Stream>,
}

struct Stream {
    name: &'static str,
    read: std::fs::File,
    partial: Vec<u8>,
    eof: bool,
}

/// While alive, fds 1 and 2 are the pipes; dropping it puts the real ones
/// back and logs what is left.
pub struct Captured {
    saved_out: OwnedFd,
    saved_err: OwnedFd,
    reader: Option<JoinHandle<()>>,
    /// Says when the reader is done (its sender is dropped as it ends).
    finished: mpsc::Receiver<()>,
    give_up: Arc<AtomicBool>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    match ret {
        -1 => Err(io::Error::last_os_error()),
        ok => Ok(ok),
    }
}

/// A close-on-exec duplicate of `fd`, so RUN steps do not inherit it.
fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on an fd this process has open; the new fd is ours.
    let new = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn dup2(from: &impl AsRawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: both fds are open; dup2 replaces `to` (a standard stream).
    check(unsafe { libc::dup2(from.as_raw_fd(), to) }).map(drop)
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl flag calls on an fd this process owns.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Fds 1 and 2 as pipes, not read yet: the zygote forked meanwhile
/// writes its steps' output there too.
pub struct Redirected {
    saved_out: OwnedFd,
    saved_err: OwnedFd,
}

/// Puts pipes in place of fds 1 and 2; [`Redirected::capture`] then starts
/// logging what they carry.
pub fn redirect_output() -> io::Result<Redirected> {
    let sink = sink();
    io::stdout().flush()?;
    let saved_out = dup(1)?;
    let saved_err = dup(2)?;
    let (out_read, out_write) = io::pipe()?;
    let (err_read, err_write) = io::pipe()?;
    set_nonblocking(&out_read)?;
    set_nonblocking(&err_read)?;
    let stream = |name, read: io::PipeReader| Stream {
        name,
        read: std::fs::File::from(OwnedFd::from(read)),
        partial: Vec::new(),
        eof: false,
    };
    *sink.capture.lock().expect("sink poisoned") = Some(Pipes {
        streams: vec![stream("stdout", out_read), stream("stderr", err_read)],
    });
    sink.redirect(Some(std::fs::File::from(saved_err.try_clone()?)));
    dup2(&out_write, 1)?;
    dup2(&err_write, 2)?;
    // Only fds 1 and 2 (and the steps that inherit them) now hold the
    // write ends, so putting the real ones back ends the pipes.
    drop((out_write, err_write));
    Ok(Redirected {
        saved_out,
        saved_err,
    })
}

impl Redirected {
    /// Starts logging what the pipes carry. Must run after the last fork
    /// of a single-threaded process (rootless builds and the zygote fork
    /// first): it starts a thread.
    pub fn capture(self) -> io::Result<Captured> {
        let sink = sink();
        let give_up = Arc::new(AtomicBool::new(false));
        let stop = give_up.clone();
        let (done, finished) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("run-output".into())
            .spawn(move || {
                let _done = done;
                read_until_closed(sink, &stop)
            })?;
        Ok(Captured {
            saved_out: self.saved_out,
            saved_err: self.saved_err,
            reader: Some(reader),
            finished,
            give_up,
        })
    }
}

/// Logs output as it comes (a RUN that prints for minutes shows it as it
/// goes), until every writer is gone.
fn read_until_closed(sink: &Sink, give_up: &AtomicBool) {
    let mut open = drain(sink, false);
    while !open.is_empty() && !give_up.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|fd| libc::pollfd {
                fd: *fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds. A timeout
        // so that giving up is noticed.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        open = drain(sink, false);
    }
}

/// Logs every complete line the pipes hold now (and, with `flush`, the
/// unfinished ones); returns the fds still open. Called by the reader
/// thread and before every other record, so output a step wrote before an
/// event is logged before it.
pub(crate) fn drain(sink: &Sink, flush: bool) -> Vec<RawFd> {
    let mut guard = sink.capture.lock().expect("sink poisoned");
    let Some(pipes) = guard.as_mut() else {
        return Vec::new();
    };
    let mut buf = [0u8; 16 << 10];
    for s in &mut pipes.streams {
        // Bounded, so a step that never stops printing cannot hold the lock.
        for _ in 0..64 {
            match s.read.read(&mut buf) {
                Ok(0) => s.eof = true,
                Ok(n) => {
                    s.partial.extend_from_slice(&buf[..n]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => s.eof = true,
            }
            break;
        }
        while let Some(end) = s.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = s.partial.drain(..=end).collect();
            sink.emit_output(s.name, &line_text(&line[..end]));
        }
        if (flush || s.eof) && !s.partial.is_empty() {
            let line = std::mem::take(&mut s.partial);
            sink.emit_output(s.name, &line_text(&line));
        }
    }
    pipes
        .streams
        .iter()
        .filter(|s| !s.eof)
        .map(|s| s.read.as_raw_fd())
        .collect()
}

fn line_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches('\r')
        .to_string()
}

impl Drop for Captured {
    fn drop(&mut self) {
        let sink = sink();
        let _ = io::stdout().flush();
        let _ = dup2(&self.saved_out, 1);
        let _ = dup2(&self.saved_err, 2);
        // The steps are done, so the pipes end at once; a process a step
        // left behind may hold them open, and is not waited for long. (Not
        // a sleep in steps: every JSON build would pay the first one.)
        let reader = self.reader.take().expect("reader started");
        let _ = self.finished.recv_timeout(Duration::from_secs(2));
        self.give_up.store(true, Ordering::Relaxed);
        drain(sink, true);
        sink.capture.lock().expect("sink poisoned").take();
        sink.redirect(None);
        if reader.is_finished() {
            let _ = reader.join();
        }
    }
}
