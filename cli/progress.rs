//! Progress of large blob pulls and pushes: bars on a terminal, and
//! elsewhere (a CI log, `--log-format json`) a line through the sink every
//! few seconds, so a log shows that a 2 GB push is moving.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use kiln_cachestore::digest::Digest;
use kiln_cachestore::transfer::{Direction, OnTransfer, Transfer, TransferState};

use crate::sink::{sink, Level, Record};

/// Blobs smaller than this move too fast to need progress.
const LARGE: u64 = 16 << 20;
/// How often a moving transfer is logged when there are no bars.
const EVERY: Duration = Duration::from_secs(5);

/// The callback for [`kiln_cachestore::RegistryClient::with_progress`].
pub fn observer() -> Arc<OnTransfer> {
    match sink().bars() {
        Some(_) => {
            let bars = Bars::default();
            Arc::new(move |t: &Transfer<'_>| bars.update(t))
        }
        None => {
            let counts = ByteCounts::new(LARGE, EVERY);
            Arc::new(move |t: &Transfer<'_>| {
                if let Some(record) = counts.update(t, Instant::now()) {
                    sink().log(record);
                }
            })
        }
    }
}

fn verb(direction: Direction, done: bool) -> &'static str {
    match (direction, done) {
        (Direction::Pull, false) => "pulling",
        (Direction::Pull, true) => "pulled",
        (Direction::Push, false) => "pushing",
        (Direction::Push, true) => "pushed",
    }
}

/// One transfer being counted.
struct Counted {
    started: Instant,
    last_logged: Instant,
    /// Whether it has been logged, so its end is too.
    logged: bool,
}

/// Periodic byte counts, for logs that are not a terminal.
pub struct ByteCounts {
    large: u64,
    every: Duration,
    live: Mutex<HashMap<(Direction, Digest), Counted>>,
}

impl ByteCounts {
    pub fn new(large: u64, every: Duration) -> ByteCounts {
        ByteCounts {
            large,
            every,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The record to log for this report at `now`, if any: the start of a
    /// large blob, then at most one line every `every` while it moves, and
    /// its end. Blobs below `large` (or of unknown size until that much has
    /// moved) are not logged.
    pub fn update(&self, t: &Transfer<'_>, now: Instant) -> Option<Record> {
        let mut live = self.live.lock().expect("progress poisoned");
        let key = (t.direction, t.digest.clone());
        let large = t.total.unwrap_or(t.done) >= self.large;
        let (log, started) = match t.state {
            TransferState::Started => {
                let counted = Counted {
                    started: now,
                    last_logged: now,
                    logged: large,
                };
                live.insert(key, counted);
                (large, now)
            }
            TransferState::Moving => {
                let counted = live.get_mut(&key)?;
                let due = now.duration_since(counted.last_logged) >= self.every;
                if !(large && due) {
                    return None;
                }
                counted.last_logged = now;
                counted.logged = true;
                (true, counted.started)
            }
            TransferState::Done | TransferState::Failed => {
                let counted = live.remove(&key)?;
                (counted.logged, counted.started)
            }
        };
        log.then(|| record(t, Some(now.duration_since(started))))
    }
}

/// The line for one report: what moved, how much of how much, how fast.
fn record(t: &Transfer<'_>, elapsed: Option<Duration>) -> Record {
    let done = matches!(t.state, TransferState::Done);
    let amount = match t.total {
        Some(total) if t.state == TransferState::Started => HumanBytes(total).to_string(),
        Some(total) if !done => format!(
            "{} of {} ({}%)",
            HumanBytes(t.done),
            HumanBytes(total),
            (t.done * 100).checked_div(total).unwrap_or(100)
        ),
        _ => HumanBytes(t.done).to_string(),
    };
    let rate = elapsed
        .filter(|e| !e.is_zero() && t.done > 0)
        .map(|e| {
            format!(
                ", {}/s",
                HumanBytes((t.done as f64 / e.as_secs_f64()) as u64)
            )
        })
        .unwrap_or_default();
    let (level, text) = match t.state {
        TransferState::Failed => (
            Level::Warn,
            format!(
                "warning: {} {} stopped after {amount}",
                verb(t.direction, false),
                t.digest
            ),
        ),
        state => (
            Level::Info,
            format!(
                "    {} {} {amount}{rate}",
                verb(t.direction, state == TransferState::Done),
                t.digest
            ),
        ),
    };
    let state = match t.state {
        TransferState::Started => "started",
        TransferState::Moving => "moving",
        TransferState::Done => "done",
        TransferState::Failed => "failed",
    };
    let direction = match t.direction {
        Direction::Pull => "pull",
        Direction::Push => "push",
    };
    let mut r = Record::new(level, text)
        .field("event", "progress")
        .field("direction", direction)
        .field("digest", t.digest.to_string())
        .field("state", state)
        .field("bytes", t.done)
        .field("total", t.total);
    if let Some(e) = elapsed {
        r = r.field("elapsed_ms", e.as_millis() as u64);
    }
    if level == Level::Warn {
        r = r.message(format!("{} {} stopped", verb(t.direction, false), t.digest));
    }
    r
}

/// A bar for each large transfer, on the sink's terminal.
#[derive(Default)]
struct Bars {
    live: Mutex<HashMap<(Direction, Digest), ProgressBar>>,
}

impl Bars {
    fn update(&self, t: &Transfer<'_>) {
        let Some(multi) = sink().bars() else { return };
        let mut live = self.live.lock().expect("progress poisoned");
        let key = (t.direction, t.digest.clone());
        match t.state {
            TransferState::Started | TransferState::Moving => {
                if !live.contains_key(&key) && t.total.unwrap_or(t.done) >= LARGE {
                    let bar = match t.total {
                        Some(total) => ProgressBar::new(total).with_style(
                            ProgressStyle::with_template(
                                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                            )
                            .expect("a valid template")
                            .progress_chars("=> "),
                        ),
                        None => ProgressBar::no_length().with_style(
                            ProgressStyle::with_template("{prefix} {bytes} {bytes_per_sec}")
                                .expect("a valid template"),
                        ),
                    };
                    let short = t.digest.to_string();
                    let short = &short[..short.len().min(19)];
                    let bar =
                        multi.add(bar.with_prefix(format!("{} {short}", verb(t.direction, false))));
                    live.insert(key.clone(), bar);
                }
                if let Some(bar) = live.get(&key) {
                    bar.set_position(t.done);
                }
            }
            TransferState::Done | TransferState::Failed => {
                if let Some(bar) = live.remove(&key) {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        digest: &Digest,
        state: TransferState,
        done: u64,
        total: Option<u64>,
    ) -> Transfer<'_> {
        Transfer {
            direction: Direction::Push,
            digest,
            total,
            done,
            state,
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_large_push_is_logged_at_start_every_interval_and_at_the_end() {
        let counts = ByteCounts::new(16 * MIB, Duration::from_secs(5));
        let digest = kiln_cachestore::digest::sha256(b"big");
        let total = Some(2048 * MIB);
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut logged = Vec::new();
        for (secs, state, done) in [
            (0.0, TransferState::Started, 0),
            (1.0, TransferState::Moving, 100 * MIB),
            (4.9, TransferState::Moving, 490 * MIB),
            (5.0, TransferState::Moving, 500 * MIB),
            (6.0, TransferState::Moving, 600 * MIB),
            (10.5, TransferState::Moving, 1024 * MIB),
            (12.0, TransferState::Done, 2048 * MIB),
        ] {
            if let Some(r) = counts.update(&report(&digest, state, done, total), at(secs)) {
                logged.push((secs, r));
            }
        }
        let when: Vec<f64> = logged.iter().map(|(s, _)| *s).collect();
        assert_eq!(when, [0.0, 5.0, 10.5, 12.0]);
        let bytes: Vec<&serde_json::Value> =
            logged.iter().map(|(_, r)| &r.fields["bytes"]).collect();
        assert_eq!(bytes, [0, 500 * MIB, 1024 * MIB, 2048 * MIB]);
        let text = logged[2].1.text.as_deref().unwrap();
        assert!(text.contains("pushing sha256:"), "{text}");
        assert!(text.contains("1.00 GiB of 2.00 GiB (50%)"), "{text}");
        assert!(text.contains("/s"), "{text}");
        assert_eq!(logged[3].1.fields["state"], "done");
        assert!(logged[3]
            .1
            .text
            .as_deref()
            .unwrap()
            .contains("pushed sha256:"));
    }

    #[test]
    fn small_blobs_are_quiet_and_unknown_sizes_count_once_large() {
        let counts = ByteCounts::new(16 * MIB, Duration::from_secs(5));
        let small = kiln_cachestore::digest::sha256(b"small");
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        assert!(counts
            .update(&report(&small, TransferState::Started, 0, Some(MIB)), t0)
            .is_none());
        assert!(counts
            .update(
                &report(&small, TransferState::Moving, MIB / 2, Some(MIB)),
                later
            )
            .is_none());
        assert!(counts
            .update(&report(&small, TransferState::Done, MIB, Some(MIB)), later)
            .is_none());

        let unknown = kiln_cachestore::digest::sha256(b"unknown");
        let at = |secs| t0 + Duration::from_secs(secs);
        assert!(counts
            .update(&report(&unknown, TransferState::Started, 0, None), at(0))
            .is_none());
        assert!(counts
            .update(
                &report(&unknown, TransferState::Moving, 8 * MIB, None),
                at(6)
            )
            .is_none());
        let moving = counts
            .update(
                &report(&unknown, TransferState::Moving, 32 * MIB, None),
                at(7),
            )
            .expect("large now, and due");
        assert_eq!(moving.fields["total"], serde_json::Value::Null);
        let failed = counts
            .update(
                &report(&unknown, TransferState::Failed, 40 * MIB, None),
                at(8),
            )
            .expect("its end is logged");
        assert_eq!(failed.level, Level::Warn);
    }
}
