//! `--log-format json` and `--log-timestamp` end to end: every stderr line
//! of a real multi-stage build (RUN output included) is one JSON object,
//! step records say how the cache served them, and the last one sums the
//! build up with the digest `--digest-file` got.
mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

const DOCKERFILE: &str = "FROM {BASE} AS build
RUN echo hello from run && echo to stderr >&2 && echo made > /made
COPY a.txt /a.txt
FROM {BASE}
COPY --from=build /made /made
COPY a.txt /b.txt
ENV X=1
";

/// Builds with JSON logs; returns every stderr line parsed, and the digest file.
fn json_build(ctx: &Context, state: &Path, extra: &[&str]) -> (Vec<Value>, String) {
    let out_dir = tempfile::tempdir().unwrap();
    let digest_file = out_dir.path().join("digest");
    let mut args = vec![
        "--log-format",
        "json",
        "--digest-file",
        digest_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = kiln_build(ctx, state, &args);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        out.stdout.is_empty(),
        "RUN output goes to stderr as JSON: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for line in &lines {
        for key in ["time", "level", "message"] {
            assert!(line[key].is_string(), "no {key} in {line}");
        }
    }
    (lines, std::fs::read_to_string(digest_file).unwrap())
}

fn events<'a>(lines: &'a [Value], event: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}

/// The step records: (stage, step, instruction keyword, cache result).
fn steps(lines: &[Value]) -> Vec<(u64, u64, String, Value)> {
    events(lines, "step")
        .into_iter()
        .map(|s| {
            for key in ["stage_name", "line", "layer_digest", "layer_size"] {
                assert!(s.get(key).is_some(), "no {key} in {s}");
            }
            assert!(s["duration_ms"].as_f64().unwrap() >= 0.0, "{s}");
            assert!(s["phases_ms"].is_object(), "{s}");
            let keyword = s["instruction"].as_str().unwrap();
            let keyword = keyword.split_whitespace().next().unwrap().to_string();
            (
                s["stage"].as_u64().unwrap(),
                s["step"].as_u64().unwrap(),
                keyword,
                s["cache"].clone(),
            )
        })
        .collect()
}

fn expected_steps(result: &str) -> Vec<(u64, u64, String, Value)> {
    let keyed = Value::from(result);
    vec![
        (0, 0, "RUN".into(), keyed.clone()),
        (0, 1, "COPY".into(), keyed.clone()),
        (1, 0, "COPY".into(), keyed.clone()),
        (1, 1, "COPY".into(), keyed),
        (1, 2, "ENV".into(), Value::Null),
    ]
}

/// The summary, which must be the last line, with the digest written.
fn summary<'a>(lines: &'a [Value], digest: &str) -> &'a Value {
    let last = lines.last().expect("some lines");
    assert_eq!(last["event"], "summary", "last line: {last}");
    assert_eq!(last["image_digest"], digest.trim());
    for key in [
        "cache_hits",
        "cache_misses",
        "remote_hits",
        "bytes_pulled",
        "bytes_pushed",
    ] {
        assert!(last[key].is_u64(), "no {key} in {last}");
    }
    for phase in ["resolve", "lookup", "outputs"] {
        assert!(last["phases_ms"][phase].is_f64(), "no {phase} in {last}");
    }
    last
}

#[test]
fn json_logs_parse_line_by_line_and_report_each_step_and_the_build() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&DOCKERFILE.replace("{BASE}", &base), &[("a.txt", "a\n")]);
    let state = tempfile::tempdir().unwrap();
    let destination = registry.reference("logs/app:v1");
    let cache_repo = registry.reference("logs/cache");
    let push = ["--destination", &destination, "--cache-repo", &cache_repo];

    let (cold, digest) = json_build(&ctx, state.path(), &push);
    assert_eq!(steps(&cold), expected_steps("miss"));
    let step = events(&cold, "step")[0];
    assert_eq!(step["stage_name"], "build");
    assert_eq!(step["level"], "info");
    assert!(
        step["layer_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{step}"
    );
    assert!(step["layer_size"].as_u64().unwrap() > 0, "{step}");
    assert!(step["phases_ms"]["run"].is_f64(), "{step}");
    // The RUN's own output, a record a line, tagged with its step.
    let output: Vec<(&Value, &Value, &Value)> = events(&cold, "run-output")
        .into_iter()
        .map(|o| (&o["stream"], &o["message"], &o["step"]))
        .collect();
    assert!(
        output.contains(&(&"stdout".into(), &"hello from run".into(), &0.into())),
        "{output:?}"
    );
    assert!(
        output.contains(&(&"stderr".into(), &"to stderr".into(), &0.into())),
        "{output:?}"
    );
    let last = summary(&cold, &digest);
    assert_eq!(
        (&last["cache_hits"], &last["cache_misses"]),
        (&0.into(), &4.into())
    );
    assert!(last["bytes_pushed"].as_u64().unwrap() > 0, "{last}");
    assert!(last["bytes_pulled"].as_u64().unwrap() > 0, "{last}");

    // The same build again: every keyed step is a local hit.
    let (warm, again) = json_build(&ctx, state.path(), &push);
    assert_eq!(again, digest);
    assert_eq!(steps(&warm), expected_steps("local-hit"));
    assert!(events(&warm, "run-output").is_empty(), "nothing ran");
    let last = summary(&warm, &digest);
    assert_eq!(
        (&last["cache_hits"], &last["cache_misses"]),
        (&4.into(), &0.into())
    );

    // A new cache dir: every keyed step comes from --cache-repo.
    let fresh = tempfile::tempdir().unwrap();
    let (remote, again) = json_build(&ctx, fresh.path(), &push);
    assert_eq!(again, digest);
    assert_eq!(steps(&remote), expected_steps("remote-hit"));
    assert_eq!(summary(&remote, &digest)["remote_hits"], 4);
}

#[test]
fn log_timestamp_prefixes_every_text_line() {
    let ctx = Context::new(
        &format!(
            "FROM oci-layout://{}:latest\nCOPY a.txt /a.txt\n",
            busybox_layout().display()
        ),
        &[("a.txt", "a\n")],
    );
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(&ctx, state.path(), &["--no-push", "--log-timestamp"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.lines().count() >= 4, "{err}");
    for line in err.lines() {
        // `2024-05-01T12:34:56.789Z ` then the line text mode always printed.
        let (stamp, rest) = line.split_at(25.min(line.len()));
        let parsed = humantime::parse_rfc3339(stamp.trim_end());
        assert!(
            parsed.is_ok() && stamp.ends_with("Z "),
            "no timestamp: {line:?}"
        );
        assert!(
            !rest.starts_with(' ') || rest.starts_with("    "),
            "{line:?}"
        );
    }
    assert!(err.contains("Z --> 2: COPY a.txt /a.txt"), "{err}");

    // Without the flag, the same lines bare.
    let out = kiln_build(&ctx, state.path(), &["--no-push"]);
    assert!(
        stderr(&out).lines().any(|l| l.starts_with("--> 2: COPY")),
        "{}",
        stderr(&out)
    );
}
