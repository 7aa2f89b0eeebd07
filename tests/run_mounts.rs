//! `RUN --mount` and `RUN --network` end to end: what the step sees, and
//! that nothing mounted (least of all a secret) reaches the image, the
//! cache or the log.
mod support;

use std::path::Path;
use std::process::Output;

use support::*;

fn base() -> String {
    format!("oci-layout://{}:latest", busybox_layout().display())
}

/// Builds into an OCI layout under `out` and unpacks it.
fn build_and_unpack(
    ctx: &Context,
    state: &Path,
    out: &Path,
    extra: &[&str],
) -> (Output, std::path::PathBuf) {
    build_and_unpack_with_env(ctx, state, out, extra, &[])
}

/// [`build_and_unpack`] with these environment variables set for Kiln.
fn build_and_unpack_with_env(
    ctx: &Context,
    state: &Path,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Output, std::path::PathBuf) {
    let layout = out.join("layout");
    let mut args = vec!["--no-push", "--oci-layout-path", layout.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = kiln_build_cmd(ctx, state, &args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let rootfs = umoci_unpack(&layout, "latest", out);
    (output, rootfs)
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn bind_tmpfs_and_cache_mounts_are_seen_by_the_step_and_never_committed() {
    let dockerfile = format!(
        "FROM {base} AS builder
RUN mkdir /built && echo from-stage > /built/x
FROM {base}
RUN --mount=type=bind,source=data.txt,target=/data cat /data > /copied
RUN --mount=type=bind,target=/ctx sh -c 'ls /ctx > /listing; touch /ctx/new 2>/dev/null || echo read-only > /ro'
RUN --mount=type=bind,target=/ctx,rw sh -c 'echo scribble > /ctx/scribble && cat /ctx/scribble > /rw'
RUN --mount=type=bind,from=builder,source=/built,target=/b cp /b/x /from-stage
RUN --mount=type=tmpfs,target=/scratch,size=1m sh -c 'echo x > /scratch/f && grep \" /scratch \" /proc/mounts | cut -d\" \" -f3 > /tmpfs-type'
RUN --mount=type=cache,target=/c2,id=opts,uid=1000,gid=100,mode=0700,sharing=locked stat -c '%u:%g %a' /c2 > /cache-perms
RUN --mount=type=cache,target=/c3,sharing=private sh -c 'touch /c3/p && ls /c3 > /private-listing'
RUN --mount=type=cache,target=/c4,id=seeded,from=builder,source=/built cat /c4/x > /cache-seeded
ARG RUN_ID
RUN --mount=type=cache,target=/var/cache/kiln-test,id=t sh -c 'echo $RUN_ID >> /var/cache/kiln-test/log && cp /var/cache/kiln-test/log /cache-log'
",
        base = base()
    );
    let ctx = Context::new(&dockerfile, &[("data.txt", "hello\n")]);
    let state = tempfile::tempdir().unwrap();

    let out1 = tempfile::tempdir().unwrap();
    let (_, root) = build_and_unpack(
        &ctx,
        state.path(),
        out1.path(),
        &["--build-arg", "RUN_ID=one"],
    );
    assert_eq!(read(&root, "copied"), "hello\n");
    assert!(read(&root, "listing").contains("data.txt"));
    assert_eq!(read(&root, "ro"), "read-only\n");
    assert_eq!(read(&root, "rw"), "scribble\n");
    assert_eq!(read(&root, "from-stage"), "from-stage\n");
    assert_eq!(read(&root, "tmpfs-type"), "tmpfs\n");
    assert_eq!(read(&root, "cache-log"), "one\n");
    assert_eq!(read(&root, "cache-perms"), "1000:100 700\n");
    assert_eq!(read(&root, "private-listing"), "p\n");
    assert_eq!(read(&root, "cache-seeded"), "from-stage\n");
    // Mount points Kiln made are gone; nothing written through a mount stayed.
    for gone in [
        "data",
        "ctx",
        "b",
        "scratch",
        "var/cache/kiln-test",
        "c2",
        "c3",
        "c4",
    ] {
        assert!(!root.join(gone).exists(), "/{gone} reached the image");
    }
    // A rw bind writes to a copy, never to the context.
    assert!(!ctx.path().join("scribble").exists());
    assert!(!ctx.path().join("new").exists());

    // The cache mount outlives the build; a step that misses sees it.
    let out2 = tempfile::tempdir().unwrap();
    let (_, root) = build_and_unpack(
        &ctx,
        state.path(),
        out2.path(),
        &["--build-arg", "RUN_ID=two"],
    );
    assert_eq!(read(&root, "cache-log"), "one\ntwo\n");
}

#[test]
fn secrets_reach_the_step_and_nothing_else() {
    const SECRET: &str = "s3cr3t-kiln-value";
    // The Dockerfile never spells the secret: only its value is searched for.
    let dockerfile = format!(
        "FROM {}
RUN --mount=type=secret,id=tok sh -c 'tr a-z A-Z < /run/secrets/tok > /upper && stat -c %a /run/secrets/tok > /secret-mode'
RUN --mount=type=secret,id=tok,env=TOKEN,target=/etc/tok,mode=0440 sh -c 'printf %s \"$TOKEN\" | tr a-z A-Z > /env-upper && test -f /etc/tok'
RUN --mount=type=secret,id=absent echo optional secrets may be missing > /optional
",
        base()
    );
    let ctx = Context::new(&dockerfile, &[]);
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("tok.txt");
    std::fs::write(&secret_file, SECRET).unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let spec = format!("id=tok,src={}", secret_file.display());
    let (output, root) = build_and_unpack(&ctx, state.path(), out.path(), &["--secret", &spec]);
    // The steps saw the secret (transformed, so the image can be searched for it).
    assert_eq!(read(&root, "upper"), SECRET.to_uppercase());
    assert_eq!(read(&root, "env-upper"), SECRET.to_uppercase());
    assert_eq!(read(&root, "secret-mode"), "400\n");
    assert!(root.join("optional").exists());
    assert!(!root.join("run/secrets").exists());
    assert!(!root.join("etc/tok").exists());
    let log = format!(
        "{}{}",
        stderr(&output),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(!log.contains(SECRET), "the secret is in the log:\n{log}");
    // Not in any file of the image, the layout's blobs (layers are
    // compressed: check them decompressed too), nor the state dir.
    for dir in [out.path(), state.path()] {
        let grep = std::process::Command::new("grep")
            .args(["-r", "-a", "-l", SECRET])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            grep.stdout.is_empty(),
            "secret found in {}",
            String::from_utf8_lossy(&grep.stdout)
        );
    }
    let zgrep = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for b in {}/layout/blobs/sha256/*; do gzip -dc \"$b\" 2>/dev/null; done | grep -a -c {SECRET}",
            out.path().display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&zgrep.stdout).trim(), "0");

    // From an environment variable (`env=`), as buildx takes it.
    let out_env = tempfile::tempdir().unwrap();
    let (_, root) = build_and_unpack_with_env(
        &ctx,
        state.path(),
        out_env.path(),
        &["--cache=false", "--secret", "id=tok,env=KILN_TEST_TOKEN"],
        &[("KILN_TEST_TOKEN", "from-the-env")],
    );
    assert_eq!(read(&root, "upper"), "FROM-THE-ENV");

    // A required secret that was not given fails clearly, naming the line.
    let ctx = Context::new(
        &format!(
            "FROM {}\nRUN --mount=type=secret,id=needed,required=true true\n",
            base()
        ),
        &[],
    );
    let out = kiln_build(&ctx, state.path(), &["--no-push"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("line 2") || err.contains(":2"), "{err}");
    assert!(err.contains("secret needed is required"), "{err}");
}

#[test]
fn network_none_has_only_loopback() {
    let dockerfile = format!(
        "FROM {}
RUN --network=none sh -c 'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d \" \" > /none'
RUN --network=host sh -c 'tail -n +3 /proc/net/dev | wc -l > /host'
",
        base()
    );
    let ctx = Context::new(&dockerfile, &[]);
    let state = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (_, root) = build_and_unpack(&ctx, state.path(), out.path(), &[]);
    assert_eq!(read(&root, "none"), "lo\n");
    let host: usize = read(&root, "host").trim().parse().unwrap();
    assert!(host >= 2, "the host network has more than loopback here");
}
