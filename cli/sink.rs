//! The one writer of stderr. Everything Kiln tells the user goes through
//! the sink: the CLI's own lines, the engine's events, `tracing` records
//! from the engine and the cache store, transfer progress, and, with
//! `--log-format json`, RUN output. It renders each record as text (the
//! lines Kiln always printed), coloured text, or one JSON object a line.
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde_json::{Map, Value};

/// `--log-format`, as Kaniko names its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines.
    Text,
    /// Plain lines with ANSI colours on levels and markers.
    Color,
    /// One JSON object a line: time, level, message, and the record's fields.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// One thing to log.
#[derive(Debug, Clone)]
pub struct Record {
    pub level: Level,
    /// The line text mode prints; `None` for records only JSON shows.
    pub text: Option<String>,
    /// The message JSON shows: the text without its markers by default.
    pub message: String,
    pub fields: Map<String, Value>,
}

impl Record {
    /// A record whose JSON message is `text` without its leading markers
    /// (`==>`, `-->`, indentation).
    pub fn new(level: Level, text: impl Into<String>) -> Record {
        let text = text.into();
        let message = text
            .trim_start()
            .trim_start_matches("==> ")
            .trim_start_matches("--> ")
            .to_string();
        Record {
            level,
            text: Some(text),
            message,
            fields: Map::new(),
        }
    }

    pub fn info(text: impl Into<String>) -> Record {
        Record::new(Level::Info, text)
    }

    /// A record that text mode does not print.
    pub fn json_only(level: Level, message: impl Into<String>) -> Record {
        Record {
            level,
            text: None,
            message: message.into(),
            fields: Map::new(),
        }
    }

    pub fn message(mut self, message: impl Into<String>) -> Record {
        self.message = message.into();
        self
    }

    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Record {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// The record as `--log-format json` prints it (without the newline).
    pub fn to_json(&self, time: SystemTime) -> String {
        let mut object = Map::new();
        object.insert(
            "time".into(),
            humantime::format_rfc3339_millis(time).to_string().into(),
        );
        object.insert("level".into(), self.level.name().into());
        object.insert("message".into(), self.message.clone().into());
        for (k, v) in &self.fields {
            // The three above are every line's; a field never hides them.
            if !object.contains_key(k) {
                object.insert(k.clone(), v.clone());
            }
        }
        Value::Object(object).to_string()
    }

    /// The record as text mode prints it, `None` if it prints nothing.
    pub fn to_text(&self, time: Option<SystemTime>, color: bool) -> Option<String> {
        let text = self.text.as_deref()?;
        let mut line = String::new();
        if let Some(time) = time {
            let stamp = humantime::format_rfc3339_millis(time).to_string();
            match color {
                true => line.push_str(&format!("\x1b[2m{stamp}\x1b[0m ")),
                false => line.push_str(&format!("{stamp} ")),
            }
        }
        match color {
            true => line.push_str(&colorize(self.level, text)),
            false => line.push_str(text),
        }
        Some(line)
    }
}

/// ANSI colours for `--log-format color`: the level word of warnings and
/// errors, the `==>`/`-->` markers, and cache hits.
fn colorize(level: Level, text: &str) -> String {
    const RESET: &str = "\x1b[0m";
    let marked = |marker: &str, code: &str| {
        text.strip_prefix(marker)
            .map(|rest| format!("{code}{marker}{RESET}{rest}"))
    };
    let colored = match level {
        Level::Error => marked("error:", "\x1b[1;31m"),
        Level::Warn => marked("warning:", "\x1b[1;33m"),
        _ => None,
    };
    colored
        .or_else(|| marked("==>", "\x1b[1;34m"))
        .or_else(|| marked("-->", "\x1b[1;36m"))
        .or_else(|| marked("    cache hit", "\x1b[32m"))
        .or_else(|| match level {
            Level::Error => Some(format!("\x1b[31m{text}{RESET}")),
            Level::Warn => Some(format!("\x1b[33m{text}{RESET}")),
            Level::Debug | Level::Trace => Some(format!("\x1b[2m{text}{RESET}")),
            Level::Info => None,
        })
        .unwrap_or_else(|| text.to_string())
}

/// Where the sink's lines go: stderr, or, while RUN output is captured
/// (`capture::Captured`), the real stderr saved before fd 2 became a pipe.
enum Out {
    Stderr,
    Saved(std::fs::File),
}

pub struct Sink {
    format: LogFormat,
    timestamp: bool,
    out: Mutex<Out>,
    /// Progress bars, on a terminal and not with JSON: lines are printed
    /// above them.
    bars: Option<indicatif::MultiProgress>,
    /// Fields of the step now running, for the RUN output lines logged
    /// while it runs.
    step: Mutex<Map<String, Value>>,
    /// RUN output being captured (`--log-format json`).
    pub(crate) capture: Mutex<Option<crate::capture::Pipes>>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sets the process's sink up; before this, [`sink`] is a plain text one.
pub fn init(format: LogFormat, timestamp: bool, verbosity: &str) {
    let bars = (format != LogFormat::Json && std::io::stderr().is_terminal()).then(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
    });
    let _ = SINK.set(Sink::new(format, timestamp, bars));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_new(verbosity)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(TracingToSink)
        .init();
}

pub fn sink() -> &'static Sink {
    SINK.get_or_init(|| Sink::new(LogFormat::Text, false, None))
}

impl Sink {
    fn new(format: LogFormat, timestamp: bool, bars: Option<indicatif::MultiProgress>) -> Sink {
        Sink {
            format,
            timestamp,
            out: Mutex::new(Out::Stderr),
            bars,
            step: Mutex::new(Map::new()),
            capture: Mutex::new(None),
        }
    }

    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// The progress bars, when they are shown.
    pub fn bars(&self) -> Option<&indicatif::MultiProgress> {
        self.bars.as_ref()
    }

    pub fn log(&self, record: Record) {
        // RUN output written before this record is logged before it.
        crate::capture::drain(self, false);
        self.emit(&record);
    }

    pub fn info(&self, text: impl Into<String>) {
        self.log(Record::info(text));
    }

    pub fn error(&self, message: &str) {
        self.log(
            Record::new(Level::Error, format!("error: {message}"))
                .message(message)
                .field("event", "error"),
        );
    }

    /// The step whose RUN output is being logged (empty: none).
    pub fn set_step(&self, fields: Map<String, Value>) {
        *self.step.lock().expect("sink poisoned") = fields;
    }

    /// A line of RUN output (captured from `stream`), tagged with the step.
    pub(crate) fn emit_output(&self, stream: &str, line: &str) {
        let mut record = Record::info(line.to_string()).message(line);
        record.fields = self.step.lock().expect("sink poisoned").clone();
        record.fields.insert("event".into(), "run-output".into());
        record.fields.insert("stream".into(), stream.into());
        self.emit(&record);
    }

    pub(crate) fn emit(&self, record: &Record) {
        let now = SystemTime::now();
        let line = match self.format {
            LogFormat::Json => Some(record.to_json(now)),
            LogFormat::Text | LogFormat::Color => record.to_text(
                self.timestamp.then_some(now),
                self.format == LogFormat::Color,
            ),
        };
        let Some(mut line) = line else { return };
        line.push('\n');
        let mut out = self.out.lock().expect("sink poisoned");
        let mut write = || {
            // Nowhere to report a failed write to stderr.
            let _ = match &mut *out {
                Out::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
                Out::Saved(file) => file.write_all(line.as_bytes()),
            };
        };
        match &self.bars {
            Some(bars) => bars.suspend(write),
            None => write(),
        }
    }

    /// Sends lines to `saved` (the real stderr) instead of fd 2, or back to
    /// fd 2 with `None`.
    pub(crate) fn redirect(&self, saved: Option<std::fs::File>) {
        *self.out.lock().expect("sink poisoned") = match saved {
            Some(file) => Out::Saved(file),
            None => Out::Stderr,
        };
    }
}

/// Sends `tracing` records (the engine's and the cache store's warnings,
/// and debug output with `--verbosity debug`) to the sink.
struct TracingToSink;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for TracingToSink {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        };
        let mut text = match level {
            Level::Error => format!("error: {}", fields.message),
            Level::Warn => format!("warning: {}", fields.message),
            Level::Info => fields.message.clone(),
            Level::Debug | Level::Trace => {
                format!("{}: {}: {}", level.name(), meta.target(), fields.message)
            }
        };
        for (k, v) in &fields.rest {
            match v {
                Value::String(s) => text.push_str(&format!(" {k}={s}")),
                v => text.push_str(&format!(" {k}={v}")),
            }
        }
        let mut record = Record::new(level, text)
            .message(fields.message)
            .field("target", meta.target());
        record.fields.extend(fields.rest);
        sink().log(record);
    }
}

/// A `tracing` record's fields: its message, and the others as JSON.
#[derive(Default)]
struct Fields {
    message: String,
    rest: Map<String, Value>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.record_value(field, format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.record_value(field, value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.record_value(field, value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.record_value(field, value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.record_value(field, value.into());
    }
}

impl Fields {
    fn record_value(&mut self, field: &tracing::field::Field, value: Value) {
        match (field.name(), value) {
            ("message", Value::String(s)) => self.message = s,
            (name, value) => {
                self.rest.insert(name.to_string(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
    }

    #[test]
    fn text_is_the_line_and_a_timestamp_prefixes_it_when_asked() {
        let r = Record::info("==> stage 0 from busybox").field("stage", 0);
        assert_eq!(
            r.to_text(None, false).as_deref(),
            Some("==> stage 0 from busybox")
        );
        assert_eq!(
            r.to_text(Some(at()), false).as_deref(),
            Some("2023-11-14T22:13:20.123Z ==> stage 0 from busybox")
        );
        assert_eq!(
            Record::json_only(Level::Info, "x").to_text(None, false),
            None
        );
    }

    #[test]
    fn color_marks_levels_and_markers_only() {
        let warn = Record::new(Level::Warn, "warning: line 3: x");
        assert_eq!(
            warn.to_text(None, true).unwrap(),
            "\x1b[1;33mwarning:\x1b[0m line 3: x"
        );
        let step = Record::info("--> 2: RUN true");
        assert_eq!(
            step.to_text(None, true).unwrap(),
            "\x1b[1;36m-->\x1b[0m 2: RUN true"
        );
        assert_eq!(Record::info("plain").to_text(None, true).unwrap(), "plain");
    }

    #[test]
    fn json_has_time_level_message_then_fields() {
        let r = Record::info("    layer sha256:ab (3 bytes)")
            .field("event", "layer")
            .field("size", 3)
            .field("level", "not this");
        let v: Value = serde_json::from_str(&r.to_json(at())).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["level"], "info");
        assert_eq!(v["message"], "layer sha256:ab (3 bytes)");
        assert_eq!(v["event"], "layer");
        assert_eq!(v["size"], 3);
    }
}
