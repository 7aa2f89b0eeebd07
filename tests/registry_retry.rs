//! `--push-retry` and `--image-download-retry`: a proxy in front of the real
//! registry fails the first connections (a 503, then a reset), and a build
//! with retries succeeds where one without fails clearly.
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;

/// A TCP proxy to `upstream` whose first `failures` connections fail:
/// even ones with a 503, odd ones closed without an answer. Returns its address.
fn flaky_proxy(upstream: String, failures: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if n < failures {
                let mut buf = [0u8; 4096];
                let _ = client.read(&mut buf);
                if n.is_multiple_of(2) {
                    let _ = client.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                // Otherwise the connection just closes without an answer.
                continue;
            }
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut client, mut server) = (client, server);
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

    let out = build(&flaky_proxy(registry.addr.clone(), 2), &[], false);
    assert!(
        !out.status.success(),
        "a push without retries must fail here"
    );
    let err = stderr(&out);
    assert!(
        err.contains("registry 127.0.0.1:") && err.contains("blob"),
        "{err}"
    );

    let proxy = flaky_proxy(registry.addr.clone(), 2);
    let out = build(&proxy, &["--push-retry", "3"], false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("retrying"), "{}", stderr(&out));
    skopeo_config(&format!("{proxy}/app/retried:1"));

    // Pulling the base through the same kind of proxy; more failures, as
    // the tag check (a HEAD, with oci-client's own GET fallback) takes some.
    let out = build(
        &flaky_proxy(registry.addr.clone(), 6),
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
        &flaky_proxy(registry.addr.clone(), 6),
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
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert_eq!(err.matches("retrying in").count(), 2, "{err}");
}
