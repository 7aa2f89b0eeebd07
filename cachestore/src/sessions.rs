//! Blob upload sessions opened ahead of their blobs. Opening one (a POST)
//! is a round trip, and on some registries a slow one: a build opens the
//! sessions for the layers and config it will push while their steps
//! still run, so pushing a new blob is its PUT alone. A session left
//! unused (a blob the registry had, a step that made no layer) is
//! cancelled, rather than left to the registry's purge: at once when a
//! blob turns out to be there, and at the end of the build otherwise.
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use oci_client::Reference;
use tokio::task::JoinHandle;

use crate::registry::repository_id;

/// A session being opened: its location, or `None` when opening failed
/// (the push then opens its own and reports that failure).
pub(crate) type Opening = JoinHandle<Option<String>>;

#[derive(Default)]
pub(crate) struct Sessions {
    /// Sessions opened ahead, by repository (`registry/repository`).
    ahead: Mutex<HashMap<String, VecDeque<(Reference, Opening)>>>,
    /// Cancellations under way.
    cancelling: Mutex<Vec<JoinHandle<()>>>,
}

impl Sessions {
    pub(crate) fn add(&self, reference: &Reference, opening: Opening) {
        self.ahead
            .lock()
            .expect("upload sessions poisoned")
            .entry(repository_id(reference))
            .or_default()
            .push_back((reference.clone(), opening));
    }

    /// The oldest session opened ahead on `reference`'s repository.
    pub(crate) fn take(&self, reference: &Reference) -> Option<Opening> {
        let mut ahead = self.ahead.lock().expect("upload sessions poisoned");
        Some(ahead.get_mut(&repository_id(reference))?.pop_front()?.1)
    }

    /// Every session opened ahead and not taken.
    pub(crate) fn take_all(&self) -> Vec<(Reference, Opening)> {
        let mut ahead = self.ahead.lock().expect("upload sessions poisoned");
        ahead.drain().flat_map(|(_, openings)| openings).collect()
    }

    pub(crate) fn cancelling(&self, cancel: JoinHandle<()>) {
        self.cancelling
            .lock()
            .expect("upload sessions poisoned")
            .push(cancel);
    }

    /// Waits for the cancellations under way.
    pub(crate) async fn cancelled(&self) {
        let cancelling =
            std::mem::take(&mut *self.cancelling.lock().expect("upload sessions poisoned"));
        futures_util::future::join_all(cancelling).await;
    }
}
