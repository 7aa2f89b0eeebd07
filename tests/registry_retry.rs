//! `--push-retry` and `--image-download-retry`: a proxy in front of the real
//! registry fails the first connections (a 503, then a reset), and a build
//! with retries succeeds where one without fails clearly.
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;

const UNAVAILABLE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A TCP proxy to `upstream` whose first `failures` connections fail: even
/// ones with `answer`, odd ones closed without an answer. The proxy answers
/// the `/v2/` ping that starts a session itself, and closes, so that the
/// failures land on the requests themselves. Returns its address.
fn flaky_proxy(upstream: String, failures: usize, answer: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let mut first = vec![0u8; 64 * 1024];
            let Ok(len) = client.read(&mut first) else {
                continue;
            };
            first.truncate(len);
            if first.starts_with(b"GET /v2/ ") {
                let _ = client.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
                continue;
            }
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if n < failures {
                if n.is_multiple_of(2) {
                    let _ = client.write_all(answer);
                }
                // Otherwise the connection just closes without an answer.
                continue;
            }
            let Ok(mut server) = TcpStream::connect(&upstream) else {
                continue;
            };
            if server.write_all(&first).is_err() {
                continue;
            }
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn build(proxy: &str, extra: &[&str], from_registry: bool) -> std::process::Output {
    let base = match from_registry {
        true => format!("{proxy}/base/busybox:latest"),
        false => format!("oci-layout://{}:latest", busybox_layout().display()),
    };
    let ctx = Context::new(&format!("FROM {base}\nRUN echo retried > /r\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{proxy}/app/retried:1");
    let mut args = vec!["--destination", destination.as_str()];
    args.extend_from_slice(extra);
    kiln_build(&ctx, state.path(), &args)
}

#[test]
fn pushes_and_pulls_survive_transient_failures_only_with_retries() {
    let registry = Registry::start();
    registry.push_busybox();

    // Five failures: the destination's tag check as the build starts (a
    // HEAD, then oci-client's GET; failing only means "push it"), the two
    // upload sessions opened while the RUN runs (opened again when needed),
    // then the blob's HEAD, fatal without a retry.
    let out = build(
        &flaky_proxy(registry.addr.clone(), 5, UNAVAILABLE),
        &[],
        false,
    );
    assert!(
        !out.status.success(),
        "a push without retries must fail here"
    );
    let err = stderr(&out);
    assert!(
        err.contains("registry 127.0.0.1:") && err.contains("blob"),
        "{err}"
    );

    let proxy = flaky_proxy(registry.addr.clone(), 5, UNAVAILABLE);
    let out = build(&proxy, &["--push-retry", "3"], false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("retrying"), "{}", stderr(&out));
    skopeo_config(&format!("{proxy}/app/retried:1"));

    // Pulling the base through the same kind of proxy; more failures, as
    // the tag check (a HEAD, with oci-client's own GET fallback) takes some.
    let out = build(
        &flaky_proxy(registry.addr.clone(), 6, UNAVAILABLE),
        &["--push-retry", "3"],
        true,
    );
    assert!(
        !out.status.success(),
        "a pull without retries must fail here"
    );
    assert!(
        stderr(&out).contains("base image") && stderr(&out).contains("manifest"),
        "{}",
        stderr(&out)
    );
    let out = build(
        &flaky_proxy(registry.addr.clone(), 6, UNAVAILABLE),
        &["--push-retry", "3", "--image-download-retry", "3"],
        true,
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A registry that cannot be reached fails the build after the retries of
/// one request (the tag check), not of every request that would follow.
#[test]
fn an_unreachable_registry_fails_after_one_round_of_retries() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ctx = Context::new(&format!("FROM 127.0.0.1:{port}/base/busybox:latest\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--no-push", "--image-download-retry", "2"],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("registry 127.0.0.1:{port}")), "{err}");
    assert!(
        err.contains("Connection refused"),
        "the cause is said: {err}"
    );
    assert_eq!(err.matches("retrying in").count(), 2, "{err}");
}

/// A pass-through proxy to `upstream` that counts the requests whose line
/// holds `needle` (on every connection, kept alive or not).
fn counting_proxy(upstream: String, needle: String) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(mut client), Ok(mut server)) = (client, TcpStream::connect(&upstream)) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (needle, counted) = (needle.clone().into_bytes(), counted.clone());
            std::thread::spawn(move || {
                // Requests are small: a needle split across reads is kept
                // whole by carrying the tail of the previous read.
                let mut carry = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c2.read(&mut buf) {
                    if n == 0 || s2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    carry.extend_from_slice(&buf[..n]);
                    let hits = carry.windows(needle.len()).filter(|w| *w == needle).count();
                    counted.fetch_add(hits, Ordering::SeqCst);
                    let keep = carry.len().min(needle.len() - 1);
                    carry.drain(..carry.len() - keep);
                }
                let _ = s2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, count)
}

/// A blob whose bytes do not match its digest is a permanent failure: with
/// retries allowed it is fetched once, nothing is cached or unpacked, and
/// once the registry serves the right bytes the same state dir builds.
#[test]
fn a_wrong_blob_is_fetched_once_and_never_cached() {
    let registry = Registry::start();
    registry.push_busybox();
    let (_, manifest) = registry.get("/v2/base/busybox/manifests/latest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = registry.blob_file(&layer);
    let good = std::fs::read(&stored).unwrap();
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0xff;
    std::fs::write(&stored, &tampered).unwrap();

    let (proxy, fetched) = counting_proxy(registry.addr.clone(), format!("/blobs/{layer} "));
    let ctx = Context::new(
        &format!("FROM {proxy}/base/busybox:latest\nRUN true\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let args = ["--no-push", "--image-download-retry", "3"];
    let out = kiln_build(&ctx, state.path(), &args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("digest mismatch") && err.contains(&layer),
        "{err}"
    );
    assert!(!err.contains("retrying"), "{err}");
    assert_eq!(fetched.load(Ordering::SeqCst), 1, "{err}");
    let hex = layer.strip_prefix("sha256:").unwrap();
    assert!(!state.path().join("blobs/sha256").join(hex).exists());
    // Layers unpack as their blobs arrive, and this one never did.
    if let Ok(mut unpacked) = std::fs::read_dir(state.path().join("unpacked")) {
        assert!(unpacked.next().is_none(), "{err}");
    }

    std::fs::write(&stored, &good).unwrap();
    let out = kiln_build(&ctx, state.path(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
}
