//! `--context` kinds: a directory, a tarball, a tarball on stdin and a git
//! repository (with a ref and a subdir) give the same image.
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

fn kiln(cwd: &Path, state: &Path, context: &str, extra: &[&str], stdin: Option<&[u8]>) -> String {
    let digest = cwd.join(format!(
        "digest-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = Command::new(KILN)
        .current_dir(cwd)
        .args([
            "build",
            "--no-push",
            "--reproducible",
            "--dockerfile",
            "Dockerfile",
            "--context",
            context,
        ])
        .arg("--cache-dir")
        .arg(state)
        .arg("--digest-file")
        .arg(&digest)
        .args(extra)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "--context {context}: {}",
        stderr(&out)
    );
    std::fs::read_to_string(digest).unwrap()
}

fn sh(cwd: &Path, script: &str) {
    run_ok(Command::new("sh").arg("-c").arg(script).current_dir(cwd));
}

#[test]
fn every_kind_of_context_gives_the_same_image() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let app = w.join("project/app");
    std::fs::create_dir_all(app.join("src")).unwrap();
    std::fs::write(
        app.join("Dockerfile"),
        format!(
            "FROM oci-layout://{}:latest\nCOPY . /app\nRUN /app/run.sh > /out\n",
            busybox_layout().display()
        ),
    )
    .unwrap();
    std::fs::write(app.join("src/main.txt"), "main\n").unwrap();
    std::fs::write(app.join("run.sh"), "#!/bin/sh\ncat /app/src/main.txt\n").unwrap();
    sh(
        &app,
        "chmod 0644 Dockerfile src/main.txt && chmod 0755 run.sh src . && umask 022",
    );

    let state = tempfile::tempdir().unwrap();
    let state = state.path();
    let from_dir = kiln(w, state, app.to_str().unwrap(), &[], None);
    let from_dir_url = kiln(w, state, &format!("dir://{}", app.display()), &[], None);
    assert_eq!(from_dir_url, from_dir);
    // --context-sub-path picks a directory inside the context.
    let from_sub = kiln(
        w,
        state,
        w.join("project").to_str().unwrap(),
        &["--context-sub-path", "app"],
        None,
    );
    assert_eq!(from_sub, from_dir);

    sh(
        &app,
        "tar --numeric-owner --owner=0 --group=0 -czf ../../app.tar.gz .",
    );
    let tarball = w.join("app.tar.gz");
    assert_eq!(
        kiln(w, state, &format!("tar://{}", tarball.display()), &[], None),
        from_dir
    );
    let bytes = std::fs::read(&tarball).unwrap();
    assert_eq!(kiln(w, state, "tar://stdin", &[], Some(&bytes)), from_dir);
    assert_eq!(kiln(w, state, "-", &[], Some(&bytes)), from_dir);

    // A bare repository with the app under app/ on a branch; the default
    // branch holds something else.
    sh(
        w,
        "set -e; git init -q -b main src-repo && cd src-repo \
         && git -c user.email=t@e -c user.name=t commit -q --allow-empty -m root \
         && git checkout -q -b release && mkdir app && cp -a ../project/app/. app/ \
         && git add -A && git -c user.email=t@e -c user.name=t commit -q -m app \
         && cd .. && git clone -q --bare src-repo repo.git",
    );
    let url = format!("file://{}/repo.git#release:app", w.display());
    assert_eq!(kiln(w, state, &url, &[], None), from_dir);
    // Kaniko's --git branch= picks the branch when the URL names none.
    let url = format!("file://{}/repo.git", w.display());
    let args = [
        "--git",
        "branch=release",
        "--git",
        "single-branch=true",
        "--context-sub-path",
        "app",
    ];
    assert_eq!(kiln(w, state, &url, &args, None), from_dir);
}

#[test]
fn unsupported_and_missing_contexts_fail_clearly() {
    let work = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    for (context, expected) in [
        ("s3://bucket/context.tar.gz", "tar://"),
        ("/no/such/dir", "not a directory"),
        ("tar:///no/such.tar", "tar:///no/such.tar"),
        ("file:///no/such/repo.git#main", "git fetch failed"),
    ] {
        let out = Command::new(KILN)
            .current_dir(work.path())
            .args(["build", "--no-push", "--context", context])
            .arg("--cache-dir")
            .arg(state.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{context}");
        assert!(
            stderr(&out).contains(expected),
            "{context}: {}",
            stderr(&out)
        );
    }
}
