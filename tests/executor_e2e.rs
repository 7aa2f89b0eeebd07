//! The executor end to end: reproducible digests, single snapshots, ignored
//! paths, digest files, ADD, COPY and base symlinks that lead nowhere.
mod support;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::layers::*;
use support::*;

fn digest_of(out: &std::process::Output, digest_file: &Path) -> String {
    assert!(out.status.success(), "{}", stderr(out));
    std::fs::read_to_string(digest_file).unwrap()
}

#[test]
fn reproducible_builds_give_the_same_digest() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY a /a\nRUN mkdir /made && echo x > /made/x && ln -s /a /made/link\nENV K=v\n"),
        &[("a", "a\n")],
    );
    let tmp = tempfile::tempdir().unwrap();
    // Each build runs on another day of a clock faked by libfaketime.
    let build = |n: usize, reproducible: bool| {
        let file = tmp.path().join(format!("digest-{n}"));
        let mut args = vec!["--no-push", "--oci-layout-path"];
        let layout = tmp.path().join(format!("layout-{n}"));
        args.push(layout.to_str().unwrap());
        args.extend(["--digest-file", file.to_str().unwrap()]);
        if reproducible {
            args.push("--reproducible");
        }
        let state = tmp.path().join(format!("state-{n}"));
        let out = std::process::Command::new("faketime")
            .arg(format!("2026-0{n}-1{n} 1{n}:00:00"))
            .arg(KILN)
            .env(
                "SOURCE_DATE_EPOCH",
                if reproducible { "1700000000" } else { "" },
            )
            .arg("build")
            .arg("--context")
            .arg(ctx.path())
            .arg("--cache-dir")
            .arg(&state)
            .args(&args)
            .output()
            .unwrap();
        (digest_of(&out, &file), layout)
    };
    let (first, layout) = build(1, true);
    // A build a month later, with a fresh state dir, must not change a byte.
    let (second, _) = build(2, true);
    assert_eq!(first, second);
    let config = skopeo_oci_config(&layout);
    assert_eq!(config["created"], "2023-11-14T22:13:20Z");
    // Without it the (faked) clock shows, so the test above can fail.
    let (third, layout) = build(3, false);
    let (fourth, _) = build(4, false);
    assert_ne!(third, fourth);
    let config = skopeo_oci_config(&layout);
    assert!(
        config["created"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-13T13:00"),
        "{config}"
    );
}

fn skopeo_oci_config(layout: &Path) -> serde_json::Value {
    let out = run_ok(std::process::Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{}:latest", layout.display()),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn single_snapshot_ignore_path_and_digest_files() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!(
            "FROM {base}\nRUN echo 1 > /one\nRUN echo 2 > /two && mkdir -p /scratch && echo s > /scratch/s\nRUN rm /one\n"
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let dest = registry.reference("app/single:v1");
    let names = out_dir.path().join("names");
    let tagged = out_dir.path().join("tagged");
    let out = kiln_build(
        &ctx,
        state.path(),
        &[
            "--destination",
            &dest,
            "--single-snapshot",
            "--ignore-path",
            "/scratch",
            "--image-name-with-digest-file",
            names.to_str().unwrap(),
            "--image-name-tag-with-digest-file",
            tagged.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config = skopeo_config(&dest);
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    let rootfs = pull_and_unpack(&dest, out_dir.path());
    assert!(rootfs.join("two").is_file());
    assert!(!rootfs.join("one").exists());
    assert!(!rootfs.join("scratch").exists());

    let inspect = run_ok(std::process::Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{dest}"),
    ]));
    let digest = serde_json::from_slice::<serde_json::Value>(&inspect.stdout).unwrap()["Digest"]
        .as_str()
        .unwrap()
        .to_string();
    let repo = registry.reference("app/single");
    assert_eq!(
        std::fs::read_to_string(names).unwrap(),
        format!("{repo}@{digest}\n")
    );
    assert_eq!(
        std::fs::read_to_string(tagged).unwrap(),
        format!("{repo}:v1@{digest}\n")
    );
}

/// What [`serve`] answers with, changeable while it runs.
type Body = std::sync::Arc<std::sync::Mutex<&'static [u8]>>;

/// A tiny HTTP server on 127.0.0.1 serving one body at any path; returns
/// its address, the number of requests it has answered, and the body.
fn serve(body: &'static [u8]) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>, Body) {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served = count.clone();
    let shared: Body = std::sync::Arc::new(std::sync::Mutex::new(body));
    let current = shared.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            // Read the request head, whatever its size.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            served.fetch_add(1, Ordering::SeqCst);
            let body: &[u8] = *current.lock().unwrap();
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Tue, 14 Nov 2023 22:13:20 GMT\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = stream.write_all(body);
        }
    });
    (addr, count, shared)
}

#[test]
fn add_downloads_urls_and_checks_their_checksum() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::Ordering;
    const BODY: &[u8] = b"downloaded over http\n";
    let registry = Registry::start();
    let base = registry.push_busybox();
    let (addr, requests, body) = serve(BODY);
    let good = sha256(BODY);
    let bad = format!("sha256:{}", "0".repeat(64));
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let build = |dockerfile: String, n: usize| {
        let ctx = Context::new(&dockerfile, &[]);
        let layout = tmp.path().join(format!("layout-{n}"));
        let out = kiln_build(
            &ctx,
            &state,
            &["--no-push", "--oci-layout-path", layout.to_str().unwrap()],
        );
        (out, layout)
    };
    let with_checksum = format!(
        "FROM {base}\nADD --checksum={good} http://{addr}/files/hello.txt /downloads/\nADD http://{addr}/files/other.txt /named\n"
    );
    let (out, layout) = build(with_checksum.clone(), 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let rootfs = umoci_unpack(&layout, "latest", &tmp.path().join("unpacked"));
    for path in ["downloads/hello.txt", "named"] {
        let file = rootfs.join(path);
        assert_eq!(std::fs::read(&file).unwrap(), BODY, "{path}");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "{path}: Docker's mode");
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path}");
        assert_eq!(meta.mtime(), 1700000000, "{path}: Last-Modified");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 2);

    // Again: the checksummed ADD is a cache hit; the other downloads anew
    // to be keyed, and hits too while the server gives the same file.
    let (out, _) = build(with_checksum.clone(), 2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(requests.load(Ordering::SeqCst), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("2 steps from the cache, 0 run"),
        "{}",
        stderr(&out)
    );
    // New content at the same URL: that step runs, and copies what its key
    // was made from (no second request).
    *body.lock().unwrap() = b"changed on the server\n";
    let (out, layout) = build(with_checksum, 5);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(requests.load(Ordering::SeqCst), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 steps from the cache, 1 run"),
        "{}",
        stderr(&out)
    );
    let rootfs = umoci_unpack(&layout, "latest", &tmp.path().join("unpacked-5"));
    assert_eq!(
        std::fs::read(rootfs.join("named")).unwrap(),
        b"changed on the server\n"
    );

    // A wrong checksum fails the build, naming the line.
    let (out, _) = build(
        format!("FROM {base}\nRUN true\nADD --checksum={bad} http://{addr}/files/hello.txt /downloads/\n"),
        3,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Dockerfile:3: ADD failed"), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");

    // A Git source's --checksum is a commit id: anything else is refused
    // while planning, naming the line.
    let (out, _) = build(
        format!("FROM {base}\nADD --checksum={good} https://example.com/repo.git#main /src\n"),
        4,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:2: invalid --checksum") && err.contains("expected a commit id"),
        "{err}"
    );
}

/// `ADD <git URL>#ref:subdir`: the checkout's files, without `.git` unless
/// `--keep-git-dir`; the step is a cache hit until the ref moves.
#[test]
fn add_git_repository() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let git = |args: &str| {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("git -c user.email=t@e -c user.name=t {args}"))
            .current_dir(w)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args}");
    };
    git("init -q -b main repo");
    std::fs::create_dir_all(w.join("repo/app")).unwrap();
    std::fs::write(w.join("repo/app/main.sh"), "echo one\n").unwrap();
    std::fs::write(w.join("repo/README"), "readme\n").unwrap();
    git("-C repo add -A");
    git("-C repo commit -q -m one");
    git("-C repo tag v1");
    let url = format!("file://{}/repo/.git", w.display());
    let dockerfile = format!(
        "FROM oci-layout://{}:latest\nADD --keep-git-dir {url}#v1 /whole\nADD {url}#main:app /app/\nRUN cat /app/main.sh > /ran\n",
        busybox_layout().display()
    );
    let ctx = Context::new(&dockerfile, &[]);
    let state = w.join("state");
    let build = |n: usize| {
        let layout = w.join(format!("out{n}"));
        let out = kiln_build(
            &ctx,
            &state,
            &["--no-push", "--oci-layout-path", layout.to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        (
            out,
            umoci_unpack(&layout, "latest", &w.join(format!("u{n}"))),
        )
    };
    let (_, root) = build(1);
    assert_eq!(
        std::fs::read_to_string(root.join("app/main.sh")).unwrap(),
        "echo one\n"
    );
    assert!(!root.join("app/README").exists() && !root.join("app/.git").exists());
    assert!(root.join("whole/README").is_file() && root.join("whole/.git/HEAD").is_file());
    assert_eq!(
        std::fs::read_to_string(root.join("ran")).unwrap(),
        "echo one\n"
    );

    let (out, _) = build(2);
    assert!(
        stderr(&out).contains("3 steps from the cache, 0 run"),
        "{}",
        stderr(&out)
    );

    // A new commit on main: its ADD and what follows run again; v1 still hits.
    std::fs::write(w.join("repo/app/main.sh"), "echo two\n").unwrap();
    git("-C repo commit -q -am two");
    let (out, root) = build(3);
    assert!(
        stderr(&out).contains("1 steps from the cache, 2 run"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("ran")).unwrap(),
        "echo two\n"
    );

    // --checksum pins the commit: a prefix of it builds, another fails.
    let head = std::process::Command::new("git")
        .args(["-C", w.join("repo").to_str().unwrap(), "rev-parse", "HEAD"])
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap().trim().to_string();
    for (checksum, builds) in [(&head[..12], true), ("0123456789ab", false)] {
        let ctx = Context::new(
            &format!(
                "FROM oci-layout://{}:latest\nADD --checksum={checksum} {url}#main /pinned/\n",
                busybox_layout().display()
            ),
            &[],
        );
        let out = kiln_build(&ctx, &state, &["--no-push"]);
        assert_eq!(out.status.success(), builds, "{}", stderr(&out));
        if !builds {
            assert!(
                stderr(&out).contains("checksum mismatch"),
                "{}",
                stderr(&out)
            );
        }
    }
}

/// `COPY <<EOF` (buildah 1.28 has no heredocs, so the files are checked
/// directly) and `COPY --link`, which Kiln accepts as a plain COPY.
#[test]
fn copy_heredocs_and_link() {
    let dockerfile = format!(
        "FROM oci-layout://{}:latest
ARG WHO=kiln
COPY <<EOF /etc/greeting
hello $WHO
EOF
COPY --chown=1000:1000 <<'RAW' <<NOTE /notes/
not $WHO
RAW
note for $WHO
NOTE
COPY --link a.txt /linked/a.txt
",
        busybox_layout().display()
    );
    let ctx = Context::new(&dockerfile, &[("a.txt", "a\n")]);
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let layout = out_dir.path().join("layout");
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--no-push", "--oci-layout-path", layout.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let root = umoci_unpack(&layout, "latest", out_dir.path());
    let files = tree(&root);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/greeting")).unwrap(),
        "hello kiln\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("notes/RAW")).unwrap(),
        "not $WHO\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("notes/NOTE")).unwrap(),
        "note for kiln\n"
    );
    let raw = &files["notes/RAW"];
    assert_eq!((raw.mode & 0o7777, raw.uid, raw.gid), (0o644, 1000, 1000));
    assert_eq!(files["etc/greeting"].uid, 0);
    assert_eq!(
        std::fs::read_to_string(root.join("linked/a.txt")).unwrap(),
        "a\n"
    );

    // A heredoc's content is part of its key: the same hits, a change misses.
    let out = kiln_build(&ctx, state.path(), &["--no-push"]);
    assert!(
        stderr(&out).contains("3 steps from the cache, 0 run"),
        "{}",
        stderr(&out)
    );
    let changed = Context::new(
        &dockerfile.replace("hello $WHO", "hi $WHO"),
        &[("a.txt", "a\n")],
    );
    let out = kiln_build(&changed, state.path(), &["--no-push"]);
    assert!(
        stderr(&out).contains("0 steps from the cache, 3 run"),
        "{}",
        stderr(&out)
    );
}

/// `COPY --exclude` and `COPY --parents` (buildah 1.28 has neither, so the
/// files are checked directly), with `--from` a stage and a `/./` pivot.
#[test]
fn copy_exclude_and_parents() {
    let dockerfile = format!(
        "FROM oci-layout://{}:latest AS src
COPY --exclude=*.md --exclude=**/*.tmp app/ /app/
COPY --parents pkgs/*/package.json /deps/
COPY --parents ./pkgs/./b/src/ /pivot/
FROM oci-layout://{}:latest
COPY --from=src --parents /app/./lib/ /copied/
ADD --exclude=skip.txt keep.txt skip.txt /added/
",
        busybox_layout().display(),
        busybox_layout().display()
    );
    let files = [
        ("app/main.c", "int main;\n"),
        ("app/README.md", "docs\n"),
        ("app/lib/util.c", "util\n"),
        ("app/lib/cache.tmp", "tmp\n"),
        ("app/lib/notes.md", "nested docs stay\n"),
        ("pkgs/a/package.json", "{\"name\":\"a\"}\n"),
        ("pkgs/a/index.js", "a\n"),
        ("pkgs/b/package.json", "{\"name\":\"b\"}\n"),
        ("pkgs/b/src/b.js", "b\n"),
        ("keep.txt", "keep\n"),
        ("skip.txt", "skip\n"),
    ];
    let ctx = Context::new(&dockerfile, &files);
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let build = |target: Option<&str>, layout: &Path| {
        let mut args = vec!["--no-push", "--oci-layout-path", layout.to_str().unwrap()];
        if let Some(t) = target {
            args.extend(["--target", t]);
        }
        let out = kiln_build(&ctx, state.path(), &args);
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    let layout = out_dir.path().join("src");
    build(Some("src"), &layout);
    let root = umoci_unpack(&layout, "latest", &out_dir.path().join("u1"));
    let files_in = tree(&root);
    let has = |p: &str| files_in.contains_key(p);
    assert!(has("app/main.c") && has("app/lib/util.c") && has("app/lib/notes.md"));
    assert!(!has("app/README.md") && !has("app/lib/cache.tmp"));
    assert!(has("deps/pkgs/a/package.json") && has("deps/pkgs/b/package.json"));
    assert!(!has("deps/pkgs/a/index.js"));
    assert!(has("pivot/b/src/b.js") && !has("pivot/pkgs"));

    let layout = out_dir.path().join("final");
    build(None, &layout);
    let root = umoci_unpack(&layout, "latest", &out_dir.path().join("u2"));
    let files_in = tree(&root);
    let has = |p: &str| files_in.contains_key(p);
    assert!(has("copied/lib/util.c"), "{:?}", files_in.keys());
    assert!(!has("copied/app"));
    assert!(has("added/keep.txt") && !has("added/skip.txt"));

    // The patterns are part of the key: another --exclude misses.
    let changed = Context::new(&dockerfile.replace("--exclude=*.md ", ""), &files);
    let out = kiln_build(&changed, state.path(), &["--no-push", "--target", "src"]);
    assert!(
        stderr(&out).contains("0 steps from the cache, 3 run"),
        "{}",
        stderr(&out)
    );
}

/// A base whose symlinks lead nowhere (or round in a loop) fails the step
/// that needs the path, and the message names the link and its target,
/// not just "No such file or directory".
#[test]
fn dangling_and_looping_symlinks_in_the_base_are_named() {
    let link = Entry::symlink;
    let missing = "which does not exist in the image";
    let cases: Vec<(&str, Entry, &str, String)> = vec![
        (
            "COPY dest",
            link("app", "/srv/missing"),
            "COPY f /app/\n",
            format!("Dockerfile:2: COPY failed: /app is a symlink to /srv/missing, {missing}"),
        ),
        (
            "WORKDIR",
            link("app", "/srv/missing"),
            "WORKDIR /app/sub\n",
            format!("Dockerfile:2: WORKDIR failed: /app is a symlink to /srv/missing, {missing}"),
        ),
        (
            // The link is made by a step, after WORKDIR made the directory.
            "RUN workdir",
            link("unused", "/srv/missing"),
            "WORKDIR /w\nRUN cd / && rmdir /w && ln -s /srv/missing /w\nRUN true\n",
            format!("Dockerfile:4: RUN failed: /w is a symlink to /srv/missing, {missing}"),
        ),
        (
            "RUN /proc",
            link("proc", "/srv/missing"),
            "RUN true\n",
            format!("Dockerfile:2: RUN failed: /proc is a symlink to /srv/missing, {missing}"),
        ),
        (
            "RUN /dev",
            link("dev", "/dev"),
            "RUN true\n",
            "Dockerfile:2: RUN failed: /dev is a symlink to /dev: too many levels of symbolic links"
                .to_string(),
        ),
    ];
    for (name, entry, steps, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let layout = layout_with_layer(dir.path(), &[entry]);
        let ctx = Context::new(
            &format!("FROM oci-layout://{}:latest\n{steps}", layout.display()),
            &[("f", "f\n")],
        );
        let out = kiln_build(&ctx, &dir.path().join("state"), &["--no-push"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.lines()
                .any(|l| l.starts_with("error: ") && l.ends_with(&format!("/{expected}"))),
            "{name}: expected {expected:?} in:\n{err}"
        );
    }
}

/// Errors quote at most an excerpt of what they are about: a 3 MB RUN line
/// the kernel refuses to run, a 10,000-deep substitution, a NUL byte.
#[test]
fn errors_about_huge_or_binary_input_stay_short() {
    let base = format!("FROM oci-layout://{}:latest\n", busybox_layout().display());
    let build = |dockerfile: &str| {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new(dockerfile, &[]);
        let out = kiln_build(&ctx, &dir.path().join("state"), &["--no-push"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        stderr(&out)
    };

    // One word longer than the kernel takes (MAX_ARG_STRLEN is 128 KiB).
    let script = format!("echo {}", "a".repeat(3 << 20));
    let err = build(&format!("{base}RUN {script}\n"));
    assert!(err.len() < 4096, "{} bytes of stderr", err.len());
    assert!(err.contains("Argument list too long"), "{err}");
    let cut = &script[..200];
    assert!(
        err.contains(&format!("--> 2: RUN {}…\n", &script[..196])),
        "the progress line: {err}"
    );
    assert!(
        err.contains(&format!(
            "/Dockerfile:2: RUN failed: [\"/bin/sh\", \"-c\", \"{cut}\"…] returned a non-zero code: 127"
        )),
        "{err}"
    );

    let deep = "${a:-".repeat(10_000) + "x" + &"}".repeat(10_000);
    let err = build(&format!("{base}ENV A=1\nENV B={deep}\n"));
    assert!(err.len() < 4096, "{} bytes of stderr", err.len());
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(
        line.contains("/Dockerfile:3: failed to process \"${a:-${a:-")
            && line.ends_with("\"…: syntax error: substitutions nested too deeply"),
        "{err}"
    );

    let err = build(&format!("{base}RUN echo a\0b\n"));
    assert!(
        err.contains(r#"/Dockerfile:2: NUL byte at column 11: "RUN echo a\0b""#),
        "{err}"
    );
    assert!(!err.contains('\0'), "a raw NUL: {err:?}");
}

/// `--snapshot-mode`: redo and full see every change; time, as Kaniko's,
/// sees only what moves an mtime, so a chmod alone is missed.
#[test]
fn snapshot_modes_and_copy_from_an_image() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!(
            "FROM {base}
COPY --from={base} /bin/busybox /copied-busybox
RUN --mount=type=bind,from={base},source=/etc,target=/base-etc cp /base-etc/passwd /passwd-from-image
RUN echo a > /a && mkdir /d && echo b > /d/b
RUN echo c >> /a && rm /d/b
RUN chmod 600 /a
"
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for mode in ["redo", "full", "time"] {
        let layout = dir.path().join(format!("layout-{mode}"));
        let out = kiln_build(
            &ctx,
            &dir.path().join(format!("state-{mode}")),
            &[
                "--no-push",
                "--snapshotter",
                "walk",
                "--snapshot-mode",
                mode,
                "--oci-layout-path",
                layout.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
        let rootfs = umoci_unpack(&layout, "latest", &dir.path().join(mode));
        let busybox = std::fs::read(rootfs.join("bin/busybox")).unwrap();
        assert_eq!(
            std::fs::read(rootfs.join("copied-busybox")).unwrap(),
            busybox
        );
        assert!(std::fs::read_to_string(rootfs.join("passwd-from-image"))
            .unwrap()
            .starts_with("root:"));
        assert_eq!(std::fs::read_to_string(rootfs.join("a")).unwrap(), "a\nc\n");
        assert!(!rootfs.join("d/b").exists());
        let mode_of_a = std::fs::metadata(rootfs.join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(
            mode_of_a,
            if mode == "time" { 0o644 } else { 0o600 },
            "{mode}"
        );
        trees.push(tree(&rootfs));
    }
    assert_eq!(trees[0], trees[1], "redo and full differ");
}

/// xattrs a RUN sets, `security.capability` among them, reach the layer as
/// PAX records, with both snapshotters.
#[test]
fn xattrs_set_by_a_step_reach_the_layer() {
    const CAP: [u8; 20] = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let base = format!("oci-layout://{}:latest", busybox_layout().display());
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY setxattrs /usr/local/bin/\nRUN echo x > /capped && setxattrs /capped\n"),
        &[(
            "setxattrs.c",
            "#include <sys/xattr.h>\n\
             int main(int c, char **v) {\n\
               unsigned char cap[20] = {1, 0, 0, 2, 0, 0x20};\n\
               if (setxattr(v[1], \"security.capability\", cap, sizeof cap, 0)) return 1;\n\
               return setxattr(v[1], \"user.kiln\", \"hello\", 5, 0) ? 2 : 0;\n\
             }\n",
        )],
    );
    // Static: busybox has neither setcap nor setfattr, nor a libc.
    run_ok(
        std::process::Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(ctx.path().join("setxattrs"))
            .arg(ctx.path().join("setxattrs.c")),
    );
    let dir = tempfile::tempdir().unwrap();
    for snapshotter in ["walk", "overlay"] {
        let layout = dir.path().join(snapshotter);
        let out = kiln_build(
            &ctx,
            &dir.path().join(format!("state-{snapshotter}")),
            &[
                "--no-push",
                "--snapshotter",
                snapshotter,
                "--oci-layout-path",
                layout.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{snapshotter}: {}", stderr(&out));
        let (_, top) = layout_top_layer(&layout);
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(top).unwrap(),
        ));
        let mut xattrs = std::collections::BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path().unwrap() != Path::new("capped") {
                continue;
            }
            for ext in entry.pax_extensions().unwrap().into_iter().flatten() {
                let ext = ext.unwrap();
                xattrs.insert(ext.key().unwrap().to_string(), ext.value_bytes().to_vec());
            }
        }
        assert_eq!(
            xattrs
                .get("SCHILY.xattr.security.capability")
                .map(Vec::as_slice),
            Some(&CAP[..]),
            "{snapshotter}: {xattrs:?}"
        );
        assert_eq!(
            xattrs.get("SCHILY.xattr.user.kiln").map(Vec::as_slice),
            Some(&b"hello"[..]),
            "{snapshotter}"
        );
    }
}
