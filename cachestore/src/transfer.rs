//! Progress of blob pulls and pushes. The registry client reports bytes as
//! they move, to a callback its caller sets; it prints nothing itself.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::Digest;

/// Which way a blob moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Pull,
    Push,
}

/// Where a transfer is. A retried transfer starts again from `Started`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Started,
    Moving,
    Done,
    Failed,
}

/// One report about one blob transfer.
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    pub direction: Direction,
    pub digest: &'a Digest,
    /// The blob's size, when known before it has all moved.
    pub total: Option<u64>,
    /// Bytes moved so far in this attempt.
    pub done: u64,
    pub state: TransferState,
}

/// What the registry client calls with each report; called from whichever
/// thread moves the bytes, so it must be quick.
pub type OnTransfer = dyn Fn(&Transfer<'_>) + Send + Sync;

/// Reports one attempt at moving a blob: `Started` when made, `Moving` for
/// each chunk, `Done` from [`Reporter::finish`], and `Failed` if dropped
/// unfinished (an error, or the future was cancelled).
pub(crate) struct Reporter {
    on: Option<Arc<OnTransfer>>,
    direction: Direction,
    digest: Digest,
    total: Option<u64>,
    done: AtomicU64,
    finished: AtomicBool,
}

impl Reporter {
    pub(crate) fn start(
        on: Option<Arc<OnTransfer>>,
        direction: Direction,
        digest: &Digest,
        total: Option<u64>,
    ) -> Reporter {
        let reporter = Reporter {
            on,
            direction,
            digest: digest.clone(),
            total,
            done: AtomicU64::new(0),
            finished: AtomicBool::new(false),
        };
        reporter.report(0, TransferState::Started);
        reporter
    }

    /// `bytes` more have moved.
    pub(crate) fn moved(&self, bytes: usize) {
        let done = self.done.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        self.report(done, TransferState::Moving);
    }

    pub(crate) fn finish(&self) {
        if !self.finished.swap(true, Ordering::Relaxed) {
            self.report(self.done.load(Ordering::Relaxed), TransferState::Done);
        }
    }

    fn report(&self, done: u64, state: TransferState) {
        if let Some(on) = &self.on {
            on(&Transfer {
                direction: self.direction,
                digest: &self.digest,
                total: self.total,
                done,
                state,
            });
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if !self.finished.swap(true, Ordering::Relaxed) {
            self.report(self.done.load(Ordering::Relaxed), TransferState::Failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_reporter_counts_bytes_and_ends_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let on: Arc<OnTransfer> = Arc::new(move |t: &Transfer<'_>| {
            sink.lock().unwrap().push((t.state, t.done, t.total));
        });
        let digest = crate::digest::sha256(b"x");
        let ok = Reporter::start(Some(on.clone()), Direction::Push, &digest, Some(8));
        ok.moved(3);
        ok.moved(5);
        ok.finish();
        drop(ok);
        let failed = Reporter::start(Some(on), Direction::Pull, &digest, None);
        failed.moved(2);
        drop(failed);
        use TransferState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (Started, 0, Some(8)),
                (Moving, 3, Some(8)),
                (Moving, 8, Some(8)),
                (Done, 8, Some(8)),
                (Started, 0, None),
                (Moving, 2, None),
                (Failed, 2, None),
            ]
        );
    }
}
