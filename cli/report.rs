//! How a build's events are logged: as text, the lines Kiln always
//! printed; as JSON, those lines' messages with every field a log
//! pipeline needs, and a last object that sums the build up.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kiln_engine::{CacheResult, Event, StepReport, Summary};
use serde_json::{Map, Value};

use crate::sink::{sink, Level, LogFormat, Record};

/// Milliseconds, fractional: a cache hit takes well under one.
pub fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn phases_ms(phases: &[(&str, Duration)]) -> Value {
    Value::Object(
        phases
            .iter()
            .map(|(p, d)| (p.to_string(), ms(*d).into()))
            .collect(),
    )
}

/// What the build did after the engine's summary: the outputs.
pub struct Finished {
    pub digest: String,
    pub elapsed: Duration,
    pub outputs: Duration,
    pub pulled: u64,
    pub pushed: u64,
    pub mounted: u64,
}

/// Logs one build's events; remembers stage names (for step records) and,
/// with JSON, the engine's summary until the build's end.
#[derive(Default)]
pub struct BuildLog {
    stages: Mutex<HashMap<usize, Option<String>>>,
    summary: Mutex<Option<Summary>>,
}

impl BuildLog {
    fn step_fields(
        &self,
        stage: usize,
        index: usize,
        line: usize,
        text: &str,
    ) -> Map<String, Value> {
        let name = self
            .stages
            .lock()
            .expect("build log poisoned")
            .get(&stage)
            .cloned()
            .flatten();
        let mut fields = Map::new();
        fields.insert("stage".into(), stage.into());
        fields.insert("stage_name".into(), name.into());
        fields.insert("step".into(), index.into());
        fields.insert("line".into(), line.into());
        fields.insert("instruction".into(), text.into());
        fields
    }

    pub fn event(&self, event: Event) {
        let sink = sink();
        let record = match event {
            Event::Warning { line, message } => {
                let text = match line {
                    0 => format!("warning: {message}"),
                    line => format!("warning: line {line}: {message}"),
                };
                let r = Record::new(Level::Warn, text).message(message);
                match line {
                    0 => r,
                    line => r.field("line", line),
                }
            }
            Event::Stage {
                index,
                name,
                base,
                platform,
                emulated,
            } => {
                let how = match emulated {
                    true => "emulated",
                    false => "native",
                };
                let text = match &name {
                    Some(name) => {
                        format!("==> stage {index} ({name}) from {base} for {platform} ({how})")
                    }
                    None => format!("==> stage {index} from {base} for {platform} ({how})"),
                };
                self.stages
                    .lock()
                    .expect("build log poisoned")
                    .insert(index, name.clone());
                Record::info(text)
                    .field("event", "stage")
                    .field("stage", index)
                    .field("stage_name", name)
                    .field("base", base)
                    .field("platform", platform)
                    .field("emulated", emulated)
            }
            Event::Pulled { reference, digest } => {
                Record::info(format!("    base {reference} @ {digest}"))
                    .field("event", "base")
                    .field("reference", reference)
                    .field("digest", digest.to_string())
            }
            Event::Step {
                stage,
                index,
                line,
                text,
            } => {
                let fields = self.step_fields(stage, index, line, &text);
                let mut r = Record::info(format!("--> {line}: {text}"));
                r.fields = fields.clone();
                r.fields.insert("event".into(), "step-start".into());
                sink.log(r);
                // RUN output from here on belongs to this step.
                sink.set_step(fields);
                return;
            }
            Event::Layer { digest, size } => {
                Record::info(format!("    layer {digest} ({size} bytes)"))
                    .field("event", "layer")
                    .field("digest", digest.to_string())
                    .field("size", size)
            }
            Event::StepDone(report) => {
                sink.log(self.step_done(&report));
                sink.set_step(Map::new());
                return;
            }
            Event::Summary(summary) => {
                if sink.format() == LogFormat::Json {
                    // Logged with the outputs' numbers, last: one record
                    // for the build, every platform's counts in it.
                    let mut held = self.summary.lock().expect("build log poisoned");
                    held.get_or_insert_with(Default::default).add(&summary);
                    return;
                }
                let reused = match summary.files_reused {
                    0 => String::new(),
                    n => format!(", {n} files reused by COPY"),
                };
                sink.info(format!(
                    "==> {} steps from the cache, {} run, {} layers unpacked, {} hits from --cache-repo{reused}",
                    summary.cache_hits, summary.cache_misses, summary.layers_unpacked, summary.remote_hits
                ));
                let phases: Vec<String> = summary
                    .phases
                    .iter()
                    .map(|(phase, d)| format!("{phase} {:.3}s", d.as_secs_f64()))
                    .collect();
                Record::info(format!("    time: {}", phases.join(", ")))
            }
        };
        sink.log(record);
    }

    fn step_done(&self, r: &StepReport) -> Record {
        let cache = r.cache.map(|c| match c {
            CacheResult::LocalHit => "local-hit",
            CacheResult::RemoteHit => "remote-hit",
            CacheResult::Miss => "miss",
        });
        let (level, text) = match r.cache {
            Some(CacheResult::LocalHit | CacheResult::RemoteHit) => {
                (Level::Info, Some("    cache hit".to_string()))
            }
            _ => (Level::Info, None),
        };
        let layer = match &r.layer {
            Some((digest, size)) => format!(", layer {digest} ({size} bytes)"),
            None => String::new(),
        };
        let mut record = Record::json_only(
            level,
            format!(
                "step {} of stage {} (line {}): {}{layer} in {:.3}s",
                r.index,
                r.stage,
                r.line,
                cache.unwrap_or("no cache key"),
                r.duration.as_secs_f64()
            ),
        );
        record.text = text;
        record.fields = self.step_fields(r.stage, r.index, r.line, &r.text);
        record
            .field("event", "step")
            .field("cache", cache)
            .field("layer_digest", r.layer.as_ref().map(|(d, _)| d.to_string()))
            .field("layer_size", r.layer.as_ref().map(|(_, s)| *s))
            .field("duration_ms", ms(r.duration))
            .field("phases_ms", phases_ms(&r.phases))
    }

    /// The build's last line: as text, the digest and the outputs' numbers;
    /// as JSON, the whole summary.
    pub fn finish(&self, f: &Finished) {
        let text = format!(
            "==> {} built in {:.2}s (outputs {:.3}s; {} bytes pulled, {} pushed, {} blobs mounted)",
            f.digest,
            f.elapsed.as_secs_f64(),
            f.outputs.as_secs_f64(),
            f.pulled,
            f.pushed,
            f.mounted
        );
        let mut record = Record::info(text)
            .field("event", "summary")
            .field("image_digest", f.digest.clone())
            .field("bytes_pulled", f.pulled)
            .field("bytes_pushed", f.pushed)
            .field("blobs_mounted", f.mounted)
            .field("duration_ms", ms(f.elapsed));
        if let Some(s) = self.summary.lock().expect("build log poisoned").take() {
            let mut phases = s.phases.clone();
            phases.push(("outputs", f.outputs));
            record = record
                .field("cache_hits", s.cache_hits)
                .field("cache_misses", s.cache_misses)
                .field("remote_hits", s.remote_hits)
                .field("layers_unpacked", s.layers_unpacked)
                .field("files_reused", s.files_reused)
                .field("view_tables_read", s.view_tables_read)
                .field("phases_ms", phases_ms(&phases));
        }
        sink().log(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_step_record_carries_stage_step_cache_layer_and_times() {
        let log = BuildLog::default();
        log.stages.lock().unwrap().insert(1, Some("build".into()));
        let digest = kiln_cachestore::digest::sha256(b"layer");
        let record = log.step_done(&StepReport {
            stage: 1,
            index: 2,
            line: 7,
            text: "RUN make".into(),
            cache: Some(CacheResult::RemoteHit),
            layer: Some((digest.clone(), 42)),
            duration: Duration::from_micros(1500),
            phases: vec![("unpack", Duration::from_millis(1))],
        });
        let v: Value = serde_json::from_str(&record.to_json(std::time::SystemTime::now())).unwrap();
        let expected = json!({
            "stage": 1, "stage_name": "build", "step": 2, "line": 7,
            "instruction": "RUN make", "event": "step", "cache": "remote-hit",
            "layer_digest": digest.to_string(), "layer_size": 42,
            "duration_ms": 1.5, "phases_ms": {"unpack": 1.0},
        });
        for (k, want) in expected.as_object().unwrap() {
            assert_eq!(&v[k], want, "{k} in {v}");
        }
        assert_eq!(record.text.as_deref(), Some("    cache hit"));
    }
}
