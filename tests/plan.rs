//! `kiln plan` on the fixture Dockerfiles: every `fixtures/dockerfiles/NAME.Dockerfile`
//! must print exactly `NAME.plan.json` (no build args, no target), and errors
//! must name the Dockerfile and the line.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dockerfiles")
}

fn kiln_plan(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(dir)
        .arg("plan")
        .args(args)
        .output()
        .expect("run kiln")
}

fn stdout_json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: kiln plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn fixture_dockerfiles() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/dockerfiles")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "Dockerfile"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_fixture_plans_as_expected() {
    let files = fixture_dockerfiles();
    assert!(
        files.len() >= 8,
        "expected the fixture Dockerfiles, found {files:?}"
    );
    for dockerfile in files {
        let name = dockerfile
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let expected_path = dockerfile.with_extension("plan.json");
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(&expected_path)
                .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let out = kiln_plan(
            &fixtures_dir(),
            &[
                "--dockerfile",
                dockerfile.to_str().unwrap(),
                "--format",
                "json",
            ],
        );
        assert_eq!(
            stdout_json(&out, &name),
            expected,
            "{name}: the plan differs"
        );
    }
}

#[test]
fn an_unknown_instruction_fails_with_the_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("Bad.Dockerfile"),
        "FROM alpine:3.20\nRUN true\nFROOM scratch\n",
    )
    .unwrap();
    // The path as given, relative to the working directory.
    let out = kiln_plan(
        dir.path(),
        &["--dockerfile", "Bad.Dockerfile", "--format", "json"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln plan accepted a bad Dockerfile");
    assert!(stderr.contains("Bad.Dockerfile:3"), "stderr: {stderr}");
    assert!(stderr.contains("FROOM"), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing is printed on stdout on error"
    );
}

#[test]
fn target_marks_the_stages_it_does_not_need() {
    let out = kiln_plan(
        &fixtures_dir(),
        &[
            "--dockerfile",
            "node-app.Dockerfile",
            "--target",
            "build",
            "--format",
            "json",
        ],
    );
    let plan = stdout_json(&out, "node-app --target build");
    let needed: Vec<(String, bool)> = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["needed"].as_bool().unwrap(),
            )
        })
        .collect();
    let expect = |n: &str, b: bool| (n.to_string(), b);
    assert_eq!(
        needed,
        [
            expect("base", true),
            expect("deps", true),
            expect("build", true),
            expect("test", false),
            expect("final", false),
        ]
    );
}

#[test]
fn build_args_reach_from_lines() {
    let out = kiln_plan(
        &fixtures_dir(),
        &[
            "--dockerfile",
            "node-app.Dockerfile",
            "--build-arg",
            "NODE_VERSION=22",
            "--format",
            "json",
        ],
    );
    let plan = stdout_json(&out, "node-app --build-arg NODE_VERSION=22");
    assert_eq!(plan["stages"][0]["base"], "node:${NODE_VERSION}-alpine");
    assert_eq!(plan["stages"][0]["base_resolved"], "node:22-alpine");
}

#[test]
fn an_unknown_target_fails() {
    let out = kiln_plan(
        &fixtures_dir(),
        &[
            "--dockerfile",
            "go-multistage.Dockerfile",
            "--target",
            "nope",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope"), "stderr: {stderr}");
}

#[test]
fn the_text_format_summarises_the_plan() {
    let out = kiln_plan(
        &fixtures_dir(),
        &[
            "--dockerfile",
            "go-multistage.Dockerfile",
            "--format",
            "text",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "stage 0 \"build\"",
        "stage 1 \"test\"",
        "not needed",
        "COPY --from=build",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
