//! deploy/'s Kubernetes manifests validate against the Kubernetes schemas
//! (offline, `kubernetes-validate`), the Tekton Task and GitLab template
//! carry what their systems require (tests/deploy_manifests.py), and every
//! flag they pass is one Kiln knows.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// `kubernetes-validate` and a python with PyYAML: the venv `.ci/run`
/// makes, or `$KILN_VENV`.
fn venv() -> PathBuf {
    let dir = std::env::var_os("KILN_VENV").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kiln-venv"),
        PathBuf::from,
    );
    assert!(
        dir.join("bin/kubernetes-validate").exists(),
        "{}: no kubernetes-validate; python3 -m venv {0} && {0}/bin/pip install kubernetes-validate (as .ci/run does)",
        dir.display()
    );
    dir
}

fn deploy() -> PathBuf {
    Path::new(REPO).join("deploy")
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new(venv().join("bin/kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn kubernetes_manifests_pass_the_schemas() {
    let manifests: Vec<PathBuf> = std::fs::read_dir(deploy().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 2, "{manifests:?}");
    let out = validate(&manifests);
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );

    // The validator does refuse what the schema does not allow.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yaml");
    let job = std::fs::read_to_string(deploy().join("kubernetes/build-job.yaml")).unwrap();
    std::fs::write(
        &broken,
        job.replace(
            "restartPolicy: Never",
            "restartPolicy: Never\n      restartPolicyy: Never",
        ),
    )
    .unwrap();
    assert!(!validate(&[broken]).status.success());
}

#[test]
fn ci_templates_carry_what_their_systems_require_and_only_kiln_flags() {
    let out = run_ok(
        Command::new(venv().join("bin/python3"))
            .arg(Path::new(REPO).join("tests/deploy_manifests.py"))
            .arg(deploy()),
    );
    let flags = String::from_utf8_lossy(&out.stdout).into_owned();
    let help = |sub: &[&str]| {
        String::from_utf8_lossy(&run_ok(Command::new(KILN).args(sub).arg("--help")).stdout)
            .into_owned()
    };
    let helps = [
        help(&["build"]),
        help(&["warm"]),
        help(&["cache", "gc"]),
        help(&["index", "create"]),
    ];
    for flag in flags.lines() {
        assert!(
            helps.iter().any(|h| h.contains(&format!("{flag} "))),
            "{flag} is not a flag of kiln build, kiln warm, kiln cache gc or kiln index create"
        );
    }
    // The multi-arch examples: one emulated Job, native Jobs per arch.
    for flag in ["--digest-file", "--platform", "--custom-platform"] {
        assert!(flags.lines().any(|f| f == flag), "{flag}: {flags}");
    }
}
