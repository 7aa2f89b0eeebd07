//! Pulls through a fault-injecting proxy in front of the real registry: a
//! blob cut off mid-stream, a 429 whose `Retry-After` (seconds or an
//! HTTP-date) the proxy checks was waited out, and a token service that
//! fails (issue 16); a no-change rebuild's push, which must cost one
//! HEAD, and pushes through it: a layer uploaded while later steps run,
//! and an upload that fails (issue 17); base layers that unpack while a
//! later layer still downloads (issue 17); and upload sessions opened
//! while steps run, replaced when gone, cancelled when unused (beside the
//! manifest's push), kept for the blobs a build made (not a base's layer),
//! and not opened for an image left as it was. The proxy serves one
//! request per connection and logs each one with the time it came in, and
//! each answer it passed on once passed.
mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::layers::{layout_with_layers, Entry, RawLayer};
use support::*;

/// What the proxy does with one request.
enum Action {
    /// Forwards it to the registry.
    Pass,
    /// Forwards it, but passes on only this many bytes of the answer's
    /// body, then closes.
    Cut(usize),
    /// Answers this (status line and headers, then the body) itself.
    Answer(String),
    /// Forwards it once this says so (asked every 20 ms, for [`HOLD_MAX`]
    /// at most; then it is forwarded anyway).
    Hold(Arc<dyn Fn() -> bool + Send + Sync>),
}

/// How long [`Action::Hold`] waits at most.
const HOLD_MAX: Duration = Duration::from_secs(30);

type Rule = Arc<dyn Fn(&str) -> Action + Send + Sync>;

/// Requests seen, with when they came in: `(time, request head)`.
type Log = Arc<Mutex<Vec<(Instant, String)>>>;

struct Proxy {
    addr: String,
    log: Log,
    /// Forwarded requests whose answer was passed on whole:
    /// `(time, "request line -> status line")`.
    answered: Log,
}

impl Proxy {
    /// A proxy to `upstream` that asks `rule` what to do with each request.
    fn start(upstream: String, rule: Rule) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (log, answered): (Log, Log) = (Arc::default(), Arc::default());
        let logs = (log.clone(), answered.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (upstream, rule, logs) = (upstream.clone(), rule.clone(), logs.clone());
                std::thread::spawn(move || serve(client, &upstream, rule.as_ref(), &logs));
            }
        });
        Proxy {
            addr,
            log,
            answered,
        }
    }

    /// When the requests whose head holds `needle` came in.
    fn times(&self, needle: &str) -> Vec<Instant> {
        self.requests(needle).into_iter().map(|(t, _)| t).collect()
    }

    fn requests(&self, needle: &str) -> Vec<(Instant, String)> {
        matching(&self.log, needle)
    }
}

/// The entries of `log` that hold `needle`.
fn matching(log: &Log, needle: &str) -> Vec<(Instant, String)> {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|(_, h)| h.contains(needle))
        .cloned()
        .collect()
}

impl Proxy {
    /// The forwarded exchanges (`request line -> status line`) holding
    /// `needle` whose answer was passed on whole.
    fn answered(&self, needle: &str) -> Vec<String> {
        matching(&self.answered, needle)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }
}

/// The head of an HTTP message (up to the blank line); pulls carry no body.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

/// The head with `Connection: close`, so that each exchange has its own
/// connection and the proxy sees every request.
fn closing(head: &str) -> String {
    let mut lines: Vec<&str> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

/// Whether a request head announces a body (an upload).
fn has_body(head: &str) -> bool {
    head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:")
            || l.strip_prefix("content-length:")
                .is_some_and(|n| n.trim() != "0")
    })
}

fn serve(
    mut client: TcpStream,
    upstream: &str,
    rule: &(dyn Fn(&str) -> Action + Send + Sync),
    (log, answered): &(Log, Log),
) {
    let Some(head) = read_head(&mut client) else {
        return;
    };
    log.lock().unwrap().push((Instant::now(), head.clone()));
    let limit = match rule(&head) {
        Action::Answer(answer) => {
            // An upload's body is read first, so the client reads the answer.
            let length = head.lines().find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("content-length:")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            });
            let _ = std::io::copy(
                &mut (&client).take(length.unwrap_or(0)),
                &mut std::io::sink(),
            );
            let _ = client.write_all(answer.as_bytes());
            return;
        }
        Action::Pass => usize::MAX,
        Action::Cut(n) => n,
        Action::Hold(release) => {
            let start = Instant::now();
            while !release() && start.elapsed() < HOLD_MAX {
                std::thread::sleep(Duration::from_millis(20));
            }
            usize::MAX
        }
    };
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    if server.write_all(closing(&head).as_bytes()).is_err() {
        return;
    }
    // An upload's body goes on to the registry while its answer is awaited.
    if has_body(&head) {
        let (Ok(mut from), Ok(mut to)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        std::thread::spawn(move || std::io::copy(&mut from, &mut to));
    }
    let Some(answer) = read_head(&mut server) else {
        return;
    };
    if client.write_all(closing(&answer).as_bytes()).is_err() {
        return;
    }
    let copied = std::io::copy(&mut server.take(limit as u64), &mut client);
    if copied.is_ok() {
        let first = |text: &str| text.lines().next().unwrap_or_default().to_string();
        let exchange = format!("{} -> {}", first(&head), first(&answer));
        answered.lock().unwrap().push((Instant::now(), exchange));
    }
    // Closed for the body copy's clone too.
    let _ = client.shutdown(std::net::Shutdown::Both);
}

fn answer(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `kiln build` of `FROM <proxy>/base/busybox` with these flags.
fn pull_through(proxy: &Proxy, extra: &[&str]) -> std::process::Output {
    let ctx = Context::new(
        &format!("FROM {}/base/busybox:latest\nRUN true\n", proxy.addr),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let mut args = vec!["--no-push"];
    args.extend_from_slice(extra);
    kiln_build(&ctx, state.path(), &args)
}

/// The first request whose head holds `needle` gets `action`; the rest pass.
fn first(needle: String, action: impl Fn() -> Action + Send + Sync + 'static) -> Rule {
    let seen = AtomicUsize::new(0);
    Arc::new(move |head: &str| {
        if head.contains(&needle) && seen.fetch_add(1, Ordering::SeqCst) == 0 {
            action()
        } else {
            Action::Pass
        }
    })
}

#[test]
fn a_blob_cut_off_mid_stream_is_pulled_again() {
    let registry = Registry::start();
    registry.push_busybox();
    let (_, manifest) = registry.get("/v2/base/busybox/manifests/latest");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layer = format!(
        "GET /v2/base/busybox/blobs/{} ",
        manifest["layers"][0]["digest"].as_str().unwrap()
    );
    let cut = || first(layer.clone(), || Action::Cut(4096));

    let proxy = Proxy::start(registry.addr.clone(), cut());
    let out = pull_through(&proxy, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pull blob"), "{err}");

    let proxy = Proxy::start(registry.addr.clone(), cut());
    let out = pull_through(&proxy, &["--image-download-retry", "2"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("pull blob failed") && err.contains("retrying"),
        "{err}"
    );
    // Once cut, once whole.
    assert_eq!(proxy.requests(&layer).len(), 2, "{err}");
}

/// A 429 on the manifest with `Retry-After` as seconds, then as an
/// HTTP-date: the proxy sees the next try no sooner than asked.
#[test]
fn retry_after_in_both_forms_is_waited_out() {
    let registry = Registry::start();
    registry.push_busybox();
    // Made when the 429 is sent: at the header's one-second resolution,
    // 3 s ahead is 2 s at least.
    let date = || httpdate(std::time::SystemTime::now() + Duration::from_secs(3));
    type Value = fn() -> String;
    for (form, value, at_least) in [
        ("seconds", (|| "2".to_string()) as Value, 2),
        ("HTTP-date", date as Value, 2),
    ] {
        let rule = first("GET /v2/base/busybox/manifests/".into(), move || {
            let header = format!("Retry-After: {}\r\n", value());
            Action::Answer(answer("429 Too Many Requests", &header, ""))
        });
        let proxy = Proxy::start(registry.addr.clone(), rule);
        let out = pull_through(&proxy, &["--image-download-retry", "1"]);
        let err = stderr(&out);
        assert!(out.status.success(), "{form}: {err}");
        assert!(
            err.contains("429") && !err.contains("retrying in 250ms"),
            "{form}: {err}"
        );
        let times = proxy.times("GET /v2/base/busybox/manifests/");
        assert!(times.len() >= 2, "{form}: {err}");
        let waited = times[1] - times[0];
        assert!(
            waited >= Duration::from_secs(at_least),
            "{form}: the retry came after {waited:?}: {err}"
        );
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for `at`.
fn httpdate(at: std::time::SystemTime) -> String {
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = run_ok(std::process::Command::new("date").env("LC_ALL", "C").args([
        "-u",
        "-d",
        &format!("@{secs}"),
        "+%a, %d %b %Y %H:%M:%S GMT",
    ]));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A registry that sends clients to a token service (as Docker Hub does):
/// the proxy answers the `/v2/` ping with a Bearer challenge whose realm is
/// its own `/token`, answered by `token`; the registry behind it needs no
/// token, so what is checked is how Kiln deals with the token service.
fn token_proxy(
    registry: &Registry,
    token: impl Fn(usize) -> String + Send + Sync + 'static,
) -> (Proxy, String) {
    let addr = Arc::new(Mutex::new(String::new()));
    let realm = addr.clone();
    let asked = AtomicUsize::new(0);
    let rule: Rule = Arc::new(move |head: &str| {
        if head.starts_with("GET /v2/ ") {
            let realm = realm.lock().unwrap();
            Action::Answer(answer(
                "401 Unauthorized",
                &format!("WWW-Authenticate: Bearer realm=\"http://{realm}/token\",service=\"kiln-test\"\r\n"),
                "{}",
            ))
        } else if head.starts_with("GET /token") {
            Action::Answer(token(asked.fetch_add(1, Ordering::SeqCst)))
        } else {
            Action::Pass
        }
    });
    let proxy = Proxy::start(registry.addr.clone(), rule);
    *addr.lock().unwrap() = proxy.addr.clone();
    let service = format!("token service http://{}/token", proxy.addr);
    (proxy, service)
}

const TOKEN: &str = "{\"token\": \"kiln-test-token\"}";

#[test]
fn a_token_service_that_fails_is_an_error_naming_it() {
    let registry = Registry::start();
    registry.push_busybox();

    // Down for good: the build fails, naming the service and its answer,
    // not with the 401 an anonymous request would get.
    let (proxy, service) =
        token_proxy(&registry, |_| answer("503 Service Unavailable", "", "down"));
    let out = pull_through(&proxy, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{service}: answered 503 Service Unavailable: down"
        )),
        "{err}"
    );
    assert!(!err.contains("Not authorized"), "{err}");
    assert!(
        proxy.requests("/manifests/").is_empty(),
        "no anonymous request: {err}"
    );

    // Refusing (401) is permanent, whatever the retries.
    let (proxy, service) = token_proxy(&registry, |_| answer("401 Unauthorized", "", "no"));
    let out = pull_through(&proxy, &["--image-download-retry", "3"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{service}: answered 401 Unauthorized")),
        "{err}"
    );
    // Never retried: asked once by the tag check, once by the pull that
    // follows a failed check.
    assert!(!err.contains("retrying"), "{err}");
    assert_eq!(proxy.requests("GET /token").len(), 2, "{err}");

    // A 429 is retried after its Retry-After; the token is then used.
    let (proxy, service) = token_proxy(&registry, |n| match n {
        0 => answer("429 Too Many Requests", "Retry-After: 1\r\n", "slow down"),
        _ => answer("200 OK", "Content-Type: application/json\r\n", TOKEN),
    });
    let out = pull_through(&proxy, &["--image-download-retry", "2"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&service) && err.contains("retrying in 1s"),
        "{err}"
    );
    let tokens = proxy.times("GET /token");
    assert!(
        tokens.len() >= 2 && tokens[1] - tokens[0] >= Duration::from_secs(1),
        "{err}"
    );
    let manifests = proxy.requests("/manifests/");
    assert!(!manifests.is_empty(), "{err}");
    for (_, head) in manifests {
        assert!(head.contains("Bearer kiln-test-token"), "{head}");
    }
}

#[test]
fn a_no_change_push_is_one_manifest_head() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nRUN echo hi >/hi\nENV A=1\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let direct = registry.reference("kiln/app:1");
    let first = kiln_build(&ctx, state.path(), &["--destination", &direct]);
    assert!(first.status.success(), "{}", stderr(&first));
    // The same image, to the same repository and tag, through the proxy.
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let via_proxy = format!("{}/kiln/app:1", proxy.addr);
    let again = kiln_build(&ctx, state.path(), &["--destination", &via_proxy]);
    assert!(again.status.success(), "{}", stderr(&again));
    let seen: Vec<String> = proxy.requests("").into_iter().map(|(_, h)| h).collect();
    let heads: Vec<&String> = seen
        .iter()
        .filter(|h| h.starts_with("HEAD /v2/kiln/app/manifests/1 "))
        .collect();
    assert_eq!(heads.len(), 1, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|h| h.starts_with("HEAD /v2/kiln/app/manifests/1 ") || h.starts_with("GET /v2/ ")),
        "more than the manifest HEAD: {seen:#?}"
    );
    // The check is not blind: a tag the registry lacks is pushed in full.
    let elsewhere = registry.reference("kiln/app:2");
    let third = kiln_build(&ctx, state.path(), &["--destination", &elsewhere]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(skopeo_config(&elsewhere)["config"]["Env"][1], "A=1");
}

/// A RUN and a `COPY --from` of what it made, in the same second, make
/// alike `--cache-repo` entries: one layer, and one config (the entry),
/// which the copy's entry under its content key names too.
/// Each blob is asked for and uploaded once. Two uploads of the config at
/// once made the registry fail the manifest of one entry now and then
/// (`DIGEST_INVALID` with `MANIFEST_BLOB_UNKNOWN`).
#[test]
fn alike_cache_entries_upload_each_blob_once() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let ctx = Context::new(
        &format!("FROM {base} AS build\nRUN echo made > /made\nFROM {base}\nCOPY --from=build /made /made\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let cache = format!("{}/kiln/cache", proxy.addr);
    let out = kiln_build(&ctx, state.path(), &["--no-push", "--cache-repo", &cache]);
    assert!(out.status.success(), "{}", stderr(&out));
    let seen: Vec<String> = proxy
        .requests("/v2/kiln/cache/")
        .into_iter()
        .map(|(_, h)| h.lines().next().unwrap_or_default().replace("%3A", ":"))
        .collect();
    let entries = seen
        .iter()
        .filter(|l| l.starts_with("PUT /v2/kiln/cache/manifests/"));
    // The RUN's, and the copy's under its key and under its content key.
    assert_eq!(entries.count(), 3, "{seen:#?}");
    // What each HEAD asks for, and what each upload's last PUT names.
    let blob = |line: &String| -> Option<String> {
        let at = match line.strip_prefix("HEAD ") {
            Some(path) => path.strip_prefix("/v2/kiln/cache/blobs/")?,
            None => line.split("digest=").nth(1)?,
        };
        Some(at.split([' ', '&']).next()?.to_string())
    };
    let mut counted: HashMap<(bool, String), usize> = HashMap::new();
    for line in &seen {
        if let Some(digest) = blob(line) {
            *counted
                .entry((line.starts_with("HEAD "), digest))
                .or_default() += 1;
        }
    }
    assert!(!counted.is_empty(), "{seen:#?}");
    assert!(counted.values().all(|n| *n == 1), "{counted:#?}");
}

/// A no-change build that pulls its base from a registry and pushes to
/// another repository of it asks an open registry's `/v2/` once: the
/// answer (200, no challenge) holds for every repository.
#[test]
fn a_no_change_build_pings_an_open_registry_once() {
    let registry = Registry::start_logged();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nRUN echo hi >/hi\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("kiln/pinged:1");
    let first = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = registry.requests().len();
    let again = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(again.status.success(), "{}", stderr(&again));
    let mut seen = registry.requests()[before..].to_vec();
    seen.sort();
    assert_eq!(
        seen,
        [
            "GET /v2/ HTTP/1.1",
            "HEAD /v2/base/busybox/manifests/latest HTTP/1.1",
            "HEAD /v2/kiln/pinged/manifests/1 HTTP/1.1",
        ],
        "{}",
        stderr(&again)
    );
}

/// A registry that sends clients to a token service is asked its `/v2/`
/// once per build, however many tokens the build gets there: the
/// challenge holds for every repository and operation. The destination's
/// is asked while the build starts, and the base's resolve waits for that
/// answer rather than asking again.
#[test]
fn a_registry_with_a_token_service_is_pinged_once_per_build() {
    let registry = Registry::start();
    registry.push_busybox();
    let (proxy, _) = token_proxy(&registry, |_| {
        answer("200 OK", "Content-Type: application/json\r\n", TOKEN)
    });
    let ctx = Context::new(
        &format!(
            "FROM {}/base/busybox:latest\nRUN echo hi >/hi\n",
            proxy.addr
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let dest = format!("{}/kiln/tokened:1", proxy.addr);
    let out = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // A pull token for the base, a push token for the destination.
    assert!(proxy.requests("GET /token").len() >= 2, "{err}");
    assert_eq!(proxy.requests("GET /v2/ ").len(), 1, "{err}");
}

/// A rebuild with one new layer asks the destination nothing about the
/// layers the manifest there already names (a registry keeps a manifest
/// only with its blobs): one HEAD for the manifest, asked as the build
/// starts (not after it, before the PUT), one for the new layer, its and
/// the config's upload, the manifest PUT.
#[test]
fn a_one_layer_change_checks_no_blob_the_tag_already_names() {
    let registry = Registry::start_logged();
    let base = registry.push_busybox();
    let dockerfile = format!("FROM {base}\nRUN echo hi >/hi\nCOPY f /f\n");
    let ctx = Context::new(&dockerfile, &[("f", "one\n")]);
    let state = tempfile::tempdir().unwrap();
    let dest = registry.reference("kiln/onelayer:1");
    let first = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(first.status.success(), "{}", stderr(&first));
    std::fs::write(ctx.path().join("f"), "two\n").unwrap();
    let before = registry.requests().len();
    let again = kiln_build(&ctx, state.path(), &["--destination", &dest]);
    assert!(again.status.success(), "{}", stderr(&again));
    let to_dest: Vec<String> = registry.requests()[before..]
        .iter()
        .filter(|r| r.contains("/v2/kiln/onelayer/"))
        .cloned()
        .collect();
    let blob_checks = to_dest
        .iter()
        .filter(|r| r.starts_with("HEAD /v2/kiln/onelayer/blobs/"))
        .count();
    // The COPY's layer, not the base's or the RUN's; the config, new with
    // it, goes unasked.
    assert_eq!(blob_checks, 1, "{to_dest:#?}");
    let manifest_checks: Vec<usize> = (0..to_dest.len())
        .filter(|i| to_dest[*i].starts_with("HEAD /v2/kiln/onelayer/manifests/1"))
        .collect();
    let first_post = to_dest.iter().position(|r| r.starts_with("POST "));
    assert_eq!(manifest_checks.len(), 1, "{to_dest:#?}");
    assert!(Some(manifest_checks[0]) < first_post, "{to_dest:#?}");
    assert_eq!(
        to_dest.iter().filter(|r| r.starts_with("PUT ")).count(),
        3,
        "{to_dest:#?}"
    );
    // Their sessions were opened as the COPY started; none is left.
    assert_eq!(
        to_dest.iter().filter(|r| r.starts_with("POST ")).count(),
        2,
        "{to_dest:#?}"
    );
    assert_eq!(registry.upload_sessions("kiln/onelayer"), 0);
    let config = skopeo_config(&dest);
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 3);
    let pulled = tempfile::tempdir().unwrap();
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{dest}"),
        &format!("oci:{}:x", pulled.path().display()),
    ]));
}

/// A step's 20 MB layer is in the destination before the build's last
/// step ends: that step waits (up to a minute) at a gate that opens only
/// once the proxy has passed on the registry's answer to a blob upload.
/// Uploading only after the last step, the build would fail there.
#[test]
fn a_layer_is_uploaded_while_later_steps_run() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let uploads = "PUT /v2/kiln/app/blobs/uploads/";
    let answered = proxy.answered.clone();
    let gate = gate(move || {
        matching(&answered, uploads)
            .iter()
            .any(|(_, e)| e.contains(" -> HTTP/1.1 201"))
    });
    let ctx = Context::new(
        &format!(
            "FROM {base}\n\
             RUN head -c 20000000 /dev/urandom >/big\n\
             RUN for i in $(seq 300); do wget -q -O /dev/null http://{gate}/ && exit 0; sleep 0.2; done; exit 1\n"
        ),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/app:1", proxy.addr);
    let out = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // The upload the gate saw was the big layer's, and the image is whole.
    let (_, manifest) = registry.get("/v2/kiln/app/manifests/1");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let big = layers
        .iter()
        .find(|l| l["size"].as_u64().unwrap() > 19_000_000)
        .unwrap_or_else(|| panic!("no big layer: {manifest}"));
    let hex = big["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    let done = proxy.answered(uploads);
    assert!(
        done.iter()
            .any(|e| e.contains(hex) && e.contains(" -> HTTP/1.1 201")),
        "{done:#?}"
    );
    // Not uploaded twice: the push at the end knew it was there.
    let big_puts = proxy.requests(uploads);
    assert_eq!(
        big_puts.iter().filter(|(_, h)| h.contains(hex)).count(),
        1,
        "{big_puts:#?}"
    );
    let diff_ids = &skopeo_config(&registry.reference("kiln/app:1"))["rootfs"]["diff_ids"];
    assert_eq!(diff_ids.as_array().unwrap().len(), layers.len());
}

/// Every blob upload to the destination fails (500, beyond the retries):
/// the build fails naming the layer and where it went, and no manifest
/// or tag is pushed.
#[test]
fn a_failed_background_upload_fails_the_build_and_pushes_no_manifest() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let rule: Rule = Arc::new(|head: &str| {
        if head.starts_with("PUT /v2/kiln/app/blobs/uploads/") {
            Action::Answer(answer("500 Internal Server Error", "", "broken"))
        } else {
            Action::Pass
        }
    });
    let proxy = Proxy::start(registry.addr.clone(), rule);
    let ctx = Context::new(
        &format!("FROM {base}\nRUN head -c 100000 /dev/urandom >/big\nRUN sleep 1\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/app:1", proxy.addr);
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--destination", &destination, "--push-retry", "1"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let repo = format!("{}/kiln/app", proxy.addr);
    assert!(
        err.contains("upload of layer sha256:") && err.contains(&format!(" to {repo} failed")),
        "{err}"
    );
    assert!(err.contains("500"), "{err}");
    assert!(
        proxy
            .requests("/manifests/")
            .iter()
            .all(|(_, h)| !h.starts_with("PUT")),
        "{err}"
    );
    assert_eq!(registry.get("/v2/kiln/app/manifests/1").0, 404, "{err}");
}

/// Whether a file named `name` is anywhere under `dir`.
fn holds_file(dir: &Path, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let kind = e.file_type();
        e.file_name() == name || (kind.is_ok_and(|k| k.is_dir()) && holds_file(&e.path(), name))
    })
}

/// Base layers stream: a layer unpacks as soon as its own blob is in,
/// while a later layer's blob still downloads, with both snapshotters.
/// The proxy holds the top layer's blob back until the file of the layer
/// below it shows up unpacked under the build's state dir. A build that
/// unpacks only once every blob is in never shows it: the proxy gives up
/// waiting after 30 s, and the test fails.
#[test]
fn a_layer_unpacks_while_a_later_one_still_downloads() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let below = RawLayer::of(&[Entry::file("streamed-below", b"below\n")]);
    let held = RawLayer::of(&[Entry::file("streamed-held", b"held\n")]);
    let layout = layout_with_layers(dir.path(), &[below, held.clone()]);
    run_ok(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{}", registry.reference("base/two:latest")),
    ]));
    let needle = format!(
        "GET /v2/base/two/blobs/{} ",
        kiln_cachestore::digest::sha256(&held.gz)
    );
    for snapshotter in ["overlay", "walk"] {
        let state = tempfile::tempdir().unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let (root, seen) = (state.path().to_path_buf(), released.clone());
        let release: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
            let there = holds_file(&root, "streamed-below");
            seen.fetch_or(there, Ordering::SeqCst);
            there
        });
        let wanted = needle.clone();
        let rule: Rule = Arc::new(move |head: &str| match head.contains(&wanted) {
            true => Action::Hold(release.clone()),
            false => Action::Pass,
        });
        let proxy = Proxy::start(registry.addr.clone(), rule);
        let ctx = Context::new(
            &format!(
                "FROM {}/base/two:latest\nRUN test -f /streamed-below && test -f /streamed-held\n",
                proxy.addr
            ),
            &[],
        );
        let out = kiln_build(
            &ctx,
            state.path(),
            &["--no-push", "--snapshotter", snapshotter],
        );
        let err = stderr(&out);
        assert!(out.status.success(), "{snapshotter}: {err}");
        assert_eq!(proxy.requests(&needle).len(), 1, "{snapshotter}: {err}");
        assert!(
            released.load(Ordering::SeqCst),
            "{snapshotter}: the layer below was not unpacked while the top one downloaded"
        );
    }
}

/// `FROM` the busybox base through the proxy (so a push through it mounts
/// the base's layer, with no upload session) and one RUN.
fn run_on_proxied_base(proxy: &Proxy, run: &str) -> Context {
    let dockerfile = format!("FROM {}/base/busybox:latest\nRUN {run}\n", proxy.addr);
    Context::new(&dockerfile, &[])
}

/// The request lines the proxy saw that hold `needle`, in order.
fn request_lines(proxy: &Proxy, needle: &str) -> Vec<String> {
    proxy
        .requests(needle)
        .into_iter()
        .map(|(_, h)| h.lines().next().unwrap_or_default().to_string())
        .collect()
}

/// A new image's blobs go into upload sessions opened while the step that
/// made its layer ran: every POST to the destination comes in before that
/// step (a second's sleep) ends, which the layer's HEAD marks, and each
/// blob is then one PUT. One layer, one config: two sessions, none left.
#[test]
fn a_new_image_uploads_into_sessions_opened_while_its_step_ran() {
    let registry = Registry::start();
    registry.push_busybox();
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let ctx = run_on_proxied_base(&proxy, "sleep 1 && echo made >/made");
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/ahead:1", proxy.addr);
    let out = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Sessions, not mounts (`?mount=`) of the base's layer.
    let posts = proxy.times("POST /v2/kiln/ahead/blobs/uploads/ ");
    let heads = proxy.times("HEAD /v2/kiln/ahead/blobs/");
    let all = request_lines(&proxy, "/v2/kiln/ahead/");
    assert_eq!(posts.len(), 2, "{all:#?}");
    let (last_post, first_head) = (posts.iter().max().unwrap(), heads.iter().min().unwrap());
    assert!(
        *first_head > *last_post + Duration::from_millis(500),
        "the sessions were not opened while the RUN slept: {all:#?}"
    );
    let puts = proxy.times("PUT /v2/kiln/ahead/blobs/uploads/");
    assert_eq!(puts.len(), 2, "{all:#?}");
    assert_eq!(registry.upload_sessions("kiln/ahead"), 0);
    assert_eq!(
        skopeo_config(&registry.reference("kiln/ahead:1"))["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// A session opened ahead that the registry no longer knows by push time
/// (expired, purged: the proxy answers its PUT 404) is replaced by one of
/// the blob's own, and the image is pushed whole.
#[test]
fn an_upload_session_gone_by_push_time_is_replaced() {
    let registry = Registry::start();
    registry.push_busybox();
    let gone = answer(
        "404 Not Found",
        "Content-Type: application/json\r\n",
        r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN","message":"blob upload unknown to registry"}]}"#,
    );
    let rule = first("PUT /v2/kiln/gone/blobs/uploads/".into(), move || {
        Action::Answer(gone.clone())
    });
    let proxy = Proxy::start(registry.addr.clone(), rule);
    let ctx = run_on_proxied_base(&proxy, "echo made >/made");
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/gone:1", proxy.addr);
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--destination", &destination, "--push-retry", "0"],
    );
    let all = request_lines(&proxy, "/v2/kiln/gone/");
    assert!(out.status.success(), "{}\n{all:#?}", stderr(&out));
    assert_eq!(
        proxy.times("POST /v2/kiln/gone/blobs/uploads/ ").len(),
        3,
        "{all:#?}"
    );
    let pulled = tempfile::tempdir().unwrap();
    pull_to_layout(&registry.reference("kiln/gone:1"), pulled.path());
}

/// A layer the destination already has (the same COPY, built again on a
/// fresh state dir, to another tag) leaves the session opened for it
/// unused: it is cancelled, and the registry holds no session after.
#[test]
fn an_upload_session_no_blob_used_is_cancelled() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nCOPY f /f\n"), &[("f", "same\n")]);
    let first_state = tempfile::tempdir().unwrap();
    let out = kiln_build(
        &ctx,
        first_state.path(),
        &["--destination", &registry.reference("kiln/again:1")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/again:2", proxy.addr);
    let out = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    let all = request_lines(&proxy, "/v2/kiln/again/");
    assert!(out.status.success(), "{}\n{all:#?}", stderr(&out));
    assert_eq!(
        proxy.times("DELETE /v2/kiln/again/blobs/uploads/").len(),
        1,
        "{all:#?}"
    );
    assert_eq!(registry.upload_sessions("kiln/again"), 0, "{all:#?}");
    let diff_ids =
        |tag: &str| skopeo_config(&registry.reference(tag))["rootfs"]["diff_ids"].clone();
    assert_eq!(diff_ids("kiln/again:1"), diff_ids("kiln/again:2"));
}

/// A session left unused at the end (opened for a WORKDIR that made no
/// layer) is cancelled beside the manifest's PUT, not after it: the proxy
/// holds the manifest until the DELETE has come in (after [`HOLD_MAX`] it
/// lets it through, and the build is then too slow).
#[test]
fn an_unused_session_is_cancelled_beside_the_manifest_push() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!("FROM {base}\nCOPY f /app/f\nWORKDIR /app\n"),
        &[("f", "one\n")],
    );
    let deleted = Arc::new(AtomicBool::new(false));
    let rule: Rule = Arc::new(move |head: &str| {
        if head.starts_with("DELETE /v2/kiln/beside/blobs/uploads/") {
            deleted.store(true, Ordering::SeqCst);
        }
        match head.starts_with("PUT /v2/kiln/beside/manifests/") {
            true => {
                let deleted = deleted.clone();
                Action::Hold(Arc::new(move || deleted.load(Ordering::SeqCst)))
            }
            false => Action::Pass,
        }
    });
    let proxy = Proxy::start(registry.addr.clone(), rule);
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/beside:1", proxy.addr);
    let started = Instant::now();
    let out = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    let took = started.elapsed();
    let all = request_lines(&proxy, "/v2/kiln/beside/");
    assert!(out.status.success(), "{}\n{all:#?}", stderr(&out));
    assert_eq!(
        proxy.times("DELETE /v2/kiln/beside/blobs/uploads/").len(),
        1,
        "{all:#?}"
    );
    assert_eq!(registry.upload_sessions("kiln/beside"), 0, "{all:#?}");
    assert!(
        took < HOLD_MAX,
        "the manifest waited for the DELETE ({took:?}): {all:#?}"
    );
}

/// A session opened ahead is kept for the blobs this build made: a blob
/// the registry may have (a base's layer, pushed at the end beside the
/// config) asks first and takes none, so it cannot leave one unused and
/// send the config to open another. Driven through the library, in this
/// order, so the race a build leaves to its tasks is decided.
#[test]
fn a_base_layer_takes_no_session_opened_ahead() {
    use kiln_cachestore::registry::Made;
    use kiln_cachestore::{BlobStore, RegistryClient, RegistryOptions, StateDir};
    let registry = Registry::start();
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let state = tempfile::tempdir().unwrap();
    let store = BlobStore::open(&StateDir::open(state.path()).unwrap()).unwrap();
    let base = store.put(b"a base's layer\n").unwrap().digest;
    let config = store.put(b"{\"an\":\"image config\"}").unwrap().digest;
    let to: kiln_cachestore::Reference = format!("{}/kiln/ahead:1", proxy.addr).parse().unwrap();
    let client = RegistryClient::new(RegistryOptions::default());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        client.push_blob(&to, &base, &store).await.unwrap();
        let opened_before = proxy.times("POST /v2/kiln/ahead/blobs/uploads/").len();
        client.open_upload_ahead(&to);
        client.push_blob(&to, &base, &store).await.unwrap();
        client
            .push_made_blob(&to, &config, &store, Made::Config)
            .await
            .unwrap();
        client.cancel_unused_uploads().await;
        let all = request_lines(&proxy, "/v2/kiln/ahead/");
        let opened = proxy.times("POST /v2/kiln/ahead/blobs/uploads/").len();
        assert_eq!(opened - opened_before, 1, "{all:#?}");
        assert!(proxy.times("DELETE /v2/kiln/ahead/").is_empty(), "{all:#?}");
    });
    assert_eq!(registry.upload_sessions("kiln/ahead"), 0);
}

/// A build stage built again that made the same file leaves the image as
/// it was (its `COPY --from` is found by content): the rebuild opens no
/// upload session, so none is cancelled at its end either.
#[test]
fn an_image_left_as_it_was_opens_no_upload_session() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(
        &format!(
            "FROM {base} AS build\nCOPY src.txt /src.txt\nRUN cut -c1-4 /src.txt > /app\n\
             FROM {base}\nCOPY --from=build /app /app\n"
        ),
        &[("src.txt", "abcd 1\n")],
    );
    let proxy = Proxy::start(registry.addr.clone(), Arc::new(|_: &str| Action::Pass));
    let state = tempfile::tempdir().unwrap();
    let destination = format!("{}/kiln/same:1", proxy.addr);
    let first = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(!proxy.times("POST /v2/kiln/same/blobs/uploads/").is_empty());
    std::fs::write(ctx.path().join("src.txt"), "abcd 2\n").unwrap();
    let before = request_lines(&proxy, "/v2/kiln/same/").len();
    let again = kiln_build(&ctx, state.path(), &["--destination", &destination]);
    assert!(again.status.success(), "{}", stderr(&again));
    let seen = request_lines(&proxy, "/v2/kiln/same/")[before..].to_vec();
    assert!(
        seen.iter()
            .all(|l| !l.starts_with("POST ") && !l.starts_with("DELETE ")),
        "{seen:#?}"
    );
    assert!(!seen.is_empty());
}
