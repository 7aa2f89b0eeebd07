//! What a build reports as it goes, and the counts behind its summary.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_cachestore::digest::Digest;

/// What the builder reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Warning {
        line: usize,
        message: String,
    },
    Stage {
        index: usize,
        name: Option<String>,
        base: String,
        /// What it builds for (`os/arch[/variant]`), and whether that is
        /// not this machine's: its RUNs then run under QEMU.
        platform: String,
        emulated: bool,
    },
    Pulled {
        reference: String,
        digest: Digest,
    },
    /// A step starts: `index` counts the stage's steps from 0.
    Step {
        stage: usize,
        index: usize,
        line: usize,
        /// The step as written, cut for a progress line.
        text: String,
    },
    Layer {
        digest: Digest,
        size: u64,
    },
    /// A step is done: how the cache served it, the layer it has (made or
    /// cached), and where its time went.
    StepDone(StepReport),
    Summary(Summary),
}

/// How the cache served a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Found in the local index.
    LocalHit,
    /// Found in `--cache-repo` (and now recorded locally).
    RemoteHit,
    /// Not found, or not looked up (`--cache=false`, uncached kinds): it ran.
    Miss,
}

/// One step's outcome, for [`Event::StepDone`].
#[derive(Debug, Clone)]
pub struct StepReport {
    pub stage: usize,
    pub index: usize,
    pub line: usize,
    /// The instruction as the image history records it.
    pub text: String,
    /// `None` for steps that change no files (ENV, LABEL…): they have no key.
    pub cache: Option<CacheResult>,
    /// The step's layer (digest, compressed size), made or from the cache.
    pub layer: Option<(Digest, u64)>,
    /// Wall time of the whole step.
    pub duration: Duration,
    /// The part of it spent in each phase (unpack, run, layers), when any.
    pub phases: Vec<(&'static str, Duration)>,
}

/// What a build did, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Steps whose result came from the cache.
    pub cache_hits: usize,
    /// Steps that ran.
    pub cache_misses: usize,
    /// Layers unpacked onto a root (0 for a fully cached build).
    pub layers_unpacked: usize,
    /// Metadata tables of the layers a view was built on (bases, cache
    /// hits) read from their blobs: 0 when the index had them all, as
    /// `kiln warm` leaves it. Layers the build writes are not counted.
    pub view_tables_read: usize,
    /// Of the hits, those found in the remote tier (`--cache-repo`).
    pub remote_hits: usize,
    /// Files COPY steps linked from the layer the previous run of the same
    /// COPY made, rather than copied (`exec::copy::Reuse`).
    pub files_reused: usize,
    /// Wall time per phase: resolve (Dockerfile, base manifests), lookup
    /// (keys, local and remote), pull (layer blobs fetched), unpack, run
    /// (steps and their snapshots), layers (tar + compress), in the order
    /// they first ran. Base layers unpack while the later ones are pulled,
    /// so those two phases overlap.
    pub phases: Vec<(&'static str, Duration)>,
}

impl Summary {
    /// Adds `next` (the next platform's build of the same invocation):
    /// counts and each phase's time summed, phases in the order they
    /// first ran.
    pub fn add(&mut self, next: &Summary) {
        self.cache_hits += next.cache_hits;
        self.cache_misses += next.cache_misses;
        self.layers_unpacked += next.layers_unpacked;
        self.view_tables_read += next.view_tables_read;
        self.remote_hits += next.remote_hits;
        self.files_reused += next.files_reused;
        for (phase, d) in &next.phases {
            match self.phases.iter_mut().find(|(p, _)| p == phase) {
                Some((_, total)) => *total += *d,
                None => self.phases.push((phase, *d)),
            }
        }
    }
}

/// Counts for the build summary, shared by the builder's parts.
#[derive(Default)]
pub(crate) struct Counters {
    hits: AtomicUsize,
    remote_hits: AtomicUsize,
    misses: AtomicUsize,
    unpacked: AtomicUsize,
    reused: AtomicUsize,
    tables_read: AtomicUsize,
    /// Wall time per phase, in the order phases first ran.
    phases: std::sync::Mutex<Vec<(&'static str, Duration)>>,
}

impl Counters {
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remote_hit(&self) {
        self.remote_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn extracted(&self, layers: usize) {
        self.unpacked.fetch_add(layers, Ordering::Relaxed);
    }

    pub(crate) fn reused(&self, files: usize) {
        self.reused.fetch_add(files, Ordering::Relaxed);
    }

    pub(crate) fn table_read(&self) {
        self.tables_read.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the time since `start` to `phase`.
    pub(crate) fn timed(&self, phase: &'static str, start: Instant) {
        let elapsed = start.elapsed();
        let mut phases = self.phases.lock().expect("phase timer poisoned");
        match phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += elapsed,
            None => phases.push((phase, elapsed)),
        }
    }

    /// The time spent in each phase so far, to diff around one step.
    pub(crate) fn phases(&self) -> Vec<(&'static str, Duration)> {
        self.phases.lock().expect("phase timer poisoned").clone()
    }

    pub(crate) fn summary(&self) -> Summary {
        Summary {
            phases: self.phases(),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            remote_hits: self.remote_hits.load(Ordering::Relaxed),
            layers_unpacked: self.unpacked.load(Ordering::Relaxed),
            files_reused: self.reused.load(Ordering::Relaxed),
            view_tables_read: self.tables_read.load(Ordering::Relaxed),
        }
    }
}

/// What each phase gained between two [`Counters::phases`] readings.
pub(crate) fn phase_delta(
    before: &[(&'static str, Duration)],
    after: &[(&'static str, Duration)],
) -> Vec<(&'static str, Duration)> {
    after
        .iter()
        .filter_map(|(phase, total)| {
            let earlier = before
                .iter()
                .find(|(p, _)| p == phase)
                .map_or(Duration::ZERO, |(_, d)| *d);
            let gained = total.saturating_sub(earlier);
            (!gained.is_zero()).then_some((*phase, gained))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_summaries_add_counts_and_phases_in_first_run_order() {
        let ms = Duration::from_millis;
        let mut total = Summary {
            cache_hits: 1,
            layers_unpacked: 2,
            phases: vec![("resolve", ms(3)), ("run", ms(5))],
            ..Summary::default()
        };
        total.add(&Summary {
            cache_hits: 2,
            cache_misses: 1,
            view_tables_read: 1,
            phases: vec![("view", ms(1)), ("run", ms(2))],
            ..Summary::default()
        });
        let expected = Summary {
            cache_hits: 3,
            cache_misses: 1,
            layers_unpacked: 2,
            view_tables_read: 1,
            phases: vec![("resolve", ms(3)), ("run", ms(7)), ("view", ms(1))],
            ..Summary::default()
        };
        assert_eq!(total, expected);
    }
}
