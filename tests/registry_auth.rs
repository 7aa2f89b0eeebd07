//! Private registries as CI has them: TLS with a CA of the test's own and
//! htpasswd basic auth, credentials from a Docker `config.json` or a
//! credential helper. Failures are clear and never show the secret.
mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::pki::*;
use support::*;

const USER: &str = "kiln";
const PASSWORD: &str = "pa55-kiln-word";

/// skopeo reads the pushed image back, trusting (and showing) what
/// `cert_dir` holds: `ca.crt`, and `client.cert`/`client.key` for mTLS.
fn assert_pushed(registry: &Registry, cert_dir: &Path) {
    let inspected = run_ok(Command::new("skopeo").args([
        "inspect",
        "--cert-dir",
        cert_dir.to_str().unwrap(),
        "--creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("docker://{}", registry.reference("app/private:1")),
    ]));
    assert!(String::from_utf8_lossy(&inspected.stdout).contains("Digest"));
}

/// The private app: the private base plus a RUN, pushed as app/private:1.
fn build(config: &Path, extra: &[&str], path_prefix: Option<&Path>, registry: &Registry) -> Output {
    let dockerfile = format!(
        "FROM {}\nRUN echo private > /private\n",
        registry.reference("base/busybox:latest")
    );
    let destination = registry.reference("app/private:1");
    build_and_push(&dockerfile, &destination, config, extra, path_prefix)
}

/// Builds `dockerfile` and pushes it to `destination`, with the Docker
/// config in `config` and, first on PATH, the credential helpers in
/// `path_prefix`.
fn build_and_push(
    dockerfile: &str,
    destination: &str,
    config: &Path,
    extra: &[&str],
    path_prefix: Option<&Path>,
) -> Output {
    let ctx = Context::new(dockerfile, &[]);
    let state = tempfile::tempdir().unwrap();
    let mut args = vec!["--destination", destination];
    args.extend_from_slice(extra);
    let mut cmd = kiln_build_cmd(&ctx, state.path(), &args);
    cmd.env("DOCKER_CONFIG", config);
    if let Some(bin) = path_prefix {
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        cmd.env("PATH", path);
    }
    cmd.output().unwrap()
}

#[test]
fn tls_and_basic_auth_with_config_json_and_credential_helpers() {
    let pki = Pki::new(USER, PASSWORD);
    let registry = pki.start_registry(false);
    let host = registry.addr.clone();
    let cert_dir = pki.path("certs");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-cert-dir",
        cert_dir.to_str().unwrap(),
        "--dest-creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("oci:{}:latest", busybox_layout().display()),
        &format!("docker://{}", registry.reference("base/busybox:latest")),
    ]));
    let ca = format!("{host}={}", pki.path("ca.pem").display());
    let good = docker_config(&format!(
        r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
        base64(&format!("{USER}:{PASSWORD}"))
    ));

    // Credentials from config.json, TLS verified against the test's CA.
    let out = build(
        good.path(),
        &["--registry-certificate", &ca],
        None,
        &registry,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains(PASSWORD));
    assert_pushed(&registry, &cert_dir);

    // Without the CA, verification fails, clearly.
    let out = build(good.path(), &[], None, &registry);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&host), "{err}");
    // ... unless told to skip it for that registry.
    let out = build(
        good.path(),
        &["--skip-tls-verify-registry", &host],
        None,
        &registry,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // ... or for every registry.
    let out = build(good.path(), &["--skip-tls-verify"], None, &registry);
    assert!(out.status.success(), "{}", stderr(&out));

    // Wrong credentials: a clear failure naming the registry, no secret shown.
    let wrong = docker_config(&format!(
        r#"{{"auths": {{"{host}": {{"username": "{USER}", "password": "wrong-s3cret"}}}}}}"#
    ));
    let out = build(
        wrong.path(),
        &["--registry-certificate", &ca],
        None,
        &registry,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&host), "{err}");
    assert!(
        !err.contains("wrong-s3cret") && !err.contains(PASSWORD),
        "{err}"
    );

    // A credential helper on PATH, speaking Docker's protocol.
    let bin = tempfile::tempdir().unwrap();
    let helper = bin.path().join("docker-credential-kilntest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{host}\" ] || {{ echo 'credentials not found'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}'\n"
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("755").arg(&helper));
    let helped = docker_config(&format!(r#"{{"credHelpers": {{"{host}": "kilntest"}}}}"#));
    let out = build(
        helped.path(),
        &["--registry-certificate", &ca],
        Some(bin.path()),
        &registry,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // credsStore: the same helper for every registry.
    let stored = docker_config(r#"{"credsStore": "kilntest"}"#);
    let out = build(
        stored.path(),
        &["--registry-certificate", &ca],
        Some(bin.path()),
        &registry,
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // `kiln warm` pulls with the same TLS flags as a build.
    let warm = |extra: &[&str]| {
        let state = tempfile::tempdir().unwrap();
        Command::new(KILN)
            .args(["warm", "--cache-dir"])
            .arg(state.path())
            .args(["--image", &registry.reference("base/busybox:latest")])
            .args(extra)
            .env("DOCKER_CONFIG", good.path())
            .output()
            .unwrap()
    };
    let out = warm(&[]);
    assert!(
        !out.status.success() && stderr(&out).contains(&host),
        "{}",
        stderr(&out)
    );
    let out = warm(&["--skip-tls-verify-pull"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // No credentials at all: refused by the registry, named in the error.
    let none = docker_config("{}");
    let out = build(
        none.path(),
        &["--registry-certificate", &ca],
        None,
        &registry,
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&host), "{}", stderr(&out));
}

/// A registry that requires a client certificate (Distribution's
/// `clientcas`): refused without `--registry-client-cert`, pushed to and
/// pulled from with it.
#[test]
fn mutual_tls_with_a_client_certificate() {
    let pki = Pki::new(USER, PASSWORD);
    let registry = pki.start_registry(true);
    let host = registry.addr.clone();
    let good = docker_config(&format!(
        r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
        base64(&format!("{USER}:{PASSWORD}"))
    ));
    let ca = format!("{host}={}", pki.path("ca.pem").display());
    let client_cert = format!(
        "{host}={},{}",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    // The base goes in with Kiln itself: FROM a layout, pushed over mTLS.
    let push_base = |extra: &[&str]| {
        let from_layout = format!("FROM oci-layout://{}:latest\n", busybox_layout().display());
        let destination = registry.reference("base/busybox:latest");
        let args = [&["--registry-certificate", ca.as_str()], extra].concat();
        build_and_push(&from_layout, &destination, good.path(), &args, None)
    };

    let out = push_base(&[]);
    assert!(!out.status.success(), "no client certificate, no push");
    let err = stderr(&out);
    assert!(err.contains(&format!("registry {host}")), "{err}");
    // The cause, not just "error sending request".
    assert!(err.contains("BadCertificate"), "{err}");

    let out = push_base(&["--registry-client-cert", &client_cert]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A pull of that base and a push of the result, both over mTLS.
    let out = build(
        good.path(),
        &[
            "--registry-certificate",
            &ca,
            "--registry-client-cert",
            &client_cert,
        ],
        None,
        &registry,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Read back by skopeo, which finds client.cert/client.key in its cert dir.
    let cert_dir = pki.path("certs");
    std::fs::copy(pki.path("client.pem"), cert_dir.join("client.cert")).unwrap();
    std::fs::copy(pki.path("client.key"), cert_dir.join("client.key")).unwrap();
    assert_pushed(&registry, &cert_dir);

    // A key that is not a key: an error naming the registry, not a
    // silent fallback to a client without the certificate.
    let out = push_base(&[
        "--registry-client-cert",
        &format!(
            "{host}={},{}",
            pki.path("client.pem").display(),
            pki.path("san.ext").display()
        ),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("TLS settings for registry {host}")) && err.contains("private key"),
        "{err}"
    );
}

#[test]
fn bad_registry_flags_name_the_flag() {
    let ctx = Context::new("FROM scratch\n", &[]);
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--no-push", "--registry-certificate", "nonsense"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--registry-certificate nonsense"),
        "{}",
        stderr(&out)
    );
}
