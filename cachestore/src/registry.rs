//! The registry client: a thin layer over `oci-client` that streams blobs
//! through the blob store, selects a platform from indexes, and decides per
//! registry whether plain HTTP is allowed.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::{StreamExt, TryStreamExt};
use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use std::io::Write;

use crate::auth;
use crate::blobs::{BlobStore, StoredBlob};
use crate::digest::{self, Digest};
use crate::error::{error_chain, CacheStoreError, IoContext, RegistryFailure, Result};
use crate::manifest::{self, MediaType, Platform, ResolvedManifest};
use crate::sessions::Sessions;
use crate::transfer::{Direction, OnTransfer, Reporter};

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) that may be spoken to over plain HTTP, in
    /// addition to loopback ones (which always may, as with Docker).
    pub plain_http: Vec<String>,
    /// Accept any TLS certificate.
    pub skip_tls_verify: bool,
    /// Accept any TLS certificate from these registries (`host[:port]`).
    pub skip_tls_verify_registries: Vec<String>,
    /// (registry, PEM file): extra CA roots per registry.
    pub ca_certificates: Vec<(String, PathBuf)>,
    /// (registry, certificate PEM, key PEM): the client certificate shown
    /// to that registry (mutual TLS).
    pub client_certificates: Vec<(String, PathBuf, PathBuf)>,
    /// Retries of registry pulls / pushes after transient failures
    /// (`--image-download-retry`, `--push-retry`).
    pub pull_retries: u32,
    pub push_retries: u32,
    /// (registry, mirror `host[/prefix]`), tried in order before the registry.
    pub mirrors: Vec<(String, String)>,
    /// Fall back to the registry itself when every mirror fails.
    pub mirror_fallback: bool,
    /// The Docker config to read credentials from; `None` looks where
    /// Docker and Kaniko do ([`auth::config_path`]).
    pub docker_config: Option<PathBuf>,
}

/// The longest `Retry-After` honoured: a registry asking for more gets
/// retried after this, rather than a CI job sleeping for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// One `oci-client` per registry host, because the protocol choice is per
/// host. Cheap to clone: clones share the clients, counters and blob
/// origins, so background uploads can own one.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Shared>,
}

/// What the clones of one [`RegistryClient`] share.
struct Shared {
    options: RegistryOptions,
    /// Registries allowed plain HTTP after start (`--insecure-pull` bases).
    plain_http: Mutex<Vec<String>>,
    clients: Mutex<HashMap<String, Arc<Client>>>,
    /// Held while a client is made: two requests made at once (a ping
    /// ahead and the build's first) use one client, and so one `/v2/`.
    making: tokio::sync::Mutex<()>,
    /// Registries whose certificates are not checked, added at run time
    /// (`--skip-tls-verify-pull` bases).
    invalid_certs_ok: Mutex<Vec<String>>,
    /// Registries where a request failed transiently after spending this
    /// many retries: a later request with no more retries to spend fails
    /// on its first failure instead of waiting as long again.
    exhausted: Mutex<HashMap<String, u32>>,
    /// Blob bytes moved, and blobs mounted, for the build summary.
    pulled: AtomicU64,
    pushed: AtomicU64,
    mounted: AtomicU64,
    /// Where each blob was pulled from: a push to another repository of
    /// the same registry mounts it from there instead of uploading it.
    origins: Mutex<HashMap<Digest, Reference>>,
    /// Told of every blob transfer's progress ([`RegistryClient::with_progress`]).
    on_transfer: OnceLock<Arc<OnTransfer>>,
    /// Upload sessions opened ahead of their blobs, and the cancelling of
    /// those left unused.
    sessions: Sessions,
}

/// A blob a build made, which [`RegistryClient::push_made_blob`] uploads.
#[derive(Clone, Copy)]
pub enum Made {
    /// A step's layer: likely new, so the registry is asked whether it has
    /// it beside the upload session, not before.
    Layer,
    /// An image's config when the image has new layers: surely new, so it
    /// is sent unasked (were it there, the registry takes it again, at the
    /// cost of its bytes).
    Config,
}

/// What a push knows of whether the registry has a blob, which decides
/// whether it asks and whether it takes a session opened ahead.
#[derive(Clone, Copy)]
enum Known {
    /// Nothing: a base's layer, a `--cache-repo` one.
    Unknown,
    /// Missing: a `HEAD` just said so.
    Missing,
    /// Made by this build: likely new.
    Made,
    /// Surely new: an image's config when the image has new layers.
    New,
}

/// `registry/repository`: what a blob is uploaded to, beside its digest.
pub fn repository_id(reference: &Reference) -> String {
    format!(
        "{}/{}",
        reference.resolve_registry(),
        reference.repository()
    )
}

/// Whether the server at `registry` (`host:port`) is a TLS server: Docker
/// tries HTTPS first on registries it may reach over HTTP. Go's servers
/// (Distribution, Harbor) answer a plain request with a 400 saying so;
/// others do not answer it with HTTP at all (no answer counts as TLS). A
/// server that cannot be reached counts as plain, for the request after to
/// report.
fn speaks_tls(registry: &str) -> bool {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(2);
    let Some(mut stream) = registry.to_socket_addrs().ok().and_then(|mut addrs| {
        addrs.find_map(|addr| std::net::TcpStream::connect_timeout(&addr, timeout).ok())
    }) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let _ = stream.take(1024).read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    !answer.starts_with("HTTP/") || answer.contains("HTTP request to an HTTPS server")
}

/// Whether a flag's `host` names `registry`, Docker Hub's aliases alike.
fn names(host: &str, registry: &str) -> bool {
    auth::normalize(host) == auth::normalize(registry)
}

/// Loopback registries may use plain HTTP, as Docker allows.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Parses an image reference as Docker does (`busybox` is
/// `docker.io/library/busybox:latest`). Plain references are split by
/// hand: oci-spec's parser compiles a large regex on first use, which was a
/// third of a no-change rebuild's CPU time. Anything unusual goes to it.
pub fn parse_reference(reference: &str) -> Result<Reference> {
    if let Some(r) = parse_plain(reference) {
        return Ok(r);
    }
    reference
        .parse::<Reference>()
        .map_err(|e| CacheStoreError::InvalidReference {
            reference: reference.to_string(),
            source: e.into(),
        })
}

/// `[host[:port]/]path[:tag][@sha256:hex]` with the usual characters, or
/// `None`.
fn parse_plain(s: &str) -> Option<Reference> {
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => {
            let hex = d.strip_prefix("sha256:")?;
            let ok = hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return None;
            }
            (n, Some(d))
        }
        None => (s, None),
    };
    let last_slash = name_tag.rfind('/');
    let (name, tag) = match name_tag.rfind(':') {
        Some(i) if last_slash.is_none_or(|j| i > j) => (&name_tag[..i], Some(&name_tag[i + 1..])),
        _ => (name_tag, None),
    };
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => ("docker.io", name),
    };
    let host_ok = registry
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
    let path_ok = !path.is_empty()
        && path.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
        });
    let tag_ok = tag.is_none_or(|t| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    });
    if !(host_ok && path_ok && tag_ok) || registry.is_empty() {
        return None;
    }
    let path = match (registry, path.contains('/')) {
        ("docker.io", false) => format!("library/{path}"),
        _ => path.to_string(),
    };
    let registry = registry.to_string();
    Some(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, path, t.into(), d.into()),
        (None, Some(d)) => Reference::with_digest(registry, path, d.into()),
        (t, None) => Reference::with_tag(registry, path, t.unwrap_or("latest").into()),
    })
}

/// Whether a failed request broke on TLS (a certificate refused, either
/// way): rustls reports those as `InvalidData`, and retrying cannot help.
fn tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = err.source();
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn registry_error<E: std::error::Error + Send + Sync + 'static>(
    reference: &Reference,
    operation: &'static str,
    err: E,
) -> CacheStoreError {
    use RegistryFailure::*;
    let any = &err as &dyn std::any::Any;
    let (failure, retry_after) = match any.downcast_ref::<OciDistributionError>() {
        Some(OciDistributionError::ServerError {
            code, retry_after, ..
        }) if *code == 429 || *code >= 500 => (Transient, *retry_after),
        // A token service that did not answer, or asked to come back.
        Some(OciDistributionError::TokenServiceError {
            code, retry_after, ..
        }) if code.is_none_or(|c| c == 429 || c >= 500) => (Transient, *retry_after),
        Some(e @ OciDistributionError::RequestError(_)) if tls_failure(e) => (Permanent, None),
        Some(OciDistributionError::RequestError(_) | OciDistributionError::IoError(_)) => {
            (Transient, None)
        }
        Some(_) => (Permanent, None),
        None if any.is::<std::io::Error>() => (Transient, None),
        None => (Permanent, None),
    };
    CacheStoreError::Registry {
        registry: reference.registry().to_string(),
        operation,
        reference: reference.whole(),
        source: Box::new(err),
        failure,
        retry_after,
    }
}

impl RegistryClient {
    pub fn new(options: RegistryOptions) -> Self {
        let shared = Shared {
            options,
            plain_http: Mutex::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            making: tokio::sync::Mutex::new(()),
            invalid_certs_ok: Mutex::new(Vec::new()),
            exhausted: Mutex::new(HashMap::new()),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            mounted: AtomicU64::new(0),
            origins: Mutex::new(HashMap::new()),
            on_transfer: OnceLock::new(),
            sessions: Sessions::default(),
        };
        Self {
            inner: Arc::new(shared),
        }
    }

    /// Reports every blob pull and push to `on` as its bytes move (made
    /// with the client: an observer already set stays).
    pub fn with_progress(self, on: Arc<OnTransfer>) -> Self {
        let _ = self.inner.on_transfer.set(on);
        self
    }

    /// Blobs pushed by cross-repository mount instead of upload.
    pub fn blobs_mounted(&self) -> u64 {
        self.inner.mounted.load(Ordering::Relaxed)
    }

    /// Blob bytes (pulled, pushed) so far; blobs skipped cost nothing.
    pub fn bytes_transferred(&self) -> (u64, u64) {
        (
            self.inner.pulled.load(Ordering::Relaxed),
            self.inner.pushed.load(Ordering::Relaxed),
        )
    }

    /// Accepts any certificate from `registry`; only affects clients made
    /// later.
    pub fn allow_invalid_certificates(&self, registry: &str) {
        self.inner
            .invalid_certs_ok
            .lock()
            .expect("certificate list poisoned")
            .push(registry.to_string());
    }

    /// `--insecure-pull` and `--skip-tls-verify-pull` for the registry an
    /// image is pulled from; only affects clients made later.
    pub fn relax_for_pull(&self, registry: &str, plain_http: bool, invalid_certificates: bool) {
        if plain_http {
            self.allow_plain_http(registry);
        }
        if invalid_certificates {
            self.allow_invalid_certificates(registry);
        }
    }

    /// Allows plain HTTP to `registry`; only affects clients made later.
    pub fn allow_plain_http(&self, registry: &str) {
        self.inner
            .plain_http
            .lock()
            .expect("plain-http list poisoned")
            .push(registry.to_string());
    }

    /// Makes the clients for these references now instead of on first use:
    /// with `--isolation none` the files their TLS roots and credentials
    /// come from are replaced by the image's during the build.
    pub async fn prepare(&self, references: &[Reference]) -> Result<()> {
        for reference in references {
            self.client(reference).await?;
        }
        Ok(())
    }

    /// The client for a reference's registry, made on first use with that
    /// registry's protocol, TLS settings and credentials.
    async fn client(&self, reference: &Reference) -> Result<Arc<Client>> {
        let registry = reference.resolve_registry().to_string();
        let existing = || {
            self.inner
                .clients
                .lock()
                .expect("registry client map poisoned")
                .get(&registry)
                .cloned()
        };
        if let Some(client) = existing() {
            return Ok(client);
        }
        let _making = self.inner.making.lock().await;
        if let Some(client) = existing() {
            return Ok(client);
        }
        // Loopback may use plain HTTP as with Docker, unless TLS was asked
        // for that registry (a CA or a skip-verify for it), or a skip-verify
        // flag covers it and it turns out to speak TLS.
        let skip_verify_here = self
            .inner
            .options
            .skip_tls_verify_registries
            .iter()
            .any(|h| names(h, &registry));
        let invalid_certs_ok = self.inner.options.skip_tls_verify
            || skip_verify_here
            || self
                .inner
                .invalid_certs_ok
                .lock()
                .expect("certificate list poisoned")
                .contains(&registry);
        let identity = self.client_identity(&registry)?;
        let tls_configured = self
            .inner
            .options
            .ca_certificates
            .iter()
            .any(|(h, _)| names(h, &registry))
            || identity.is_some()
            || skip_verify_here;
        let loopback_plain = is_loopback(&registry)
            && !tls_configured
            && !(invalid_certs_ok && {
                let probed = registry.clone();
                tokio::task::spawn_blocking(move || speaks_tls(&probed))
                    .await
                    .unwrap_or(false)
            });
        let plain = loopback_plain
            || self.inner.options.plain_http.contains(&registry)
            || self
                .inner
                .plain_http
                .lock()
                .expect("plain-http list poisoned")
                .contains(&registry);
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: invalid_certs_ok,
            extra_root_certificates: self.root_certificates(&registry)?,
            client_identity: identity,
            // Streamed monolithic PUTs: some registries mishandle chunks.
            use_monolithic_push: true,
            platform_resolver: None,
            ..Default::default()
        };
        // Not `Client::new`, which falls back to a default client when the
        // TLS settings (a client key, say) are unusable.
        let client = Client::try_from(config).map_err(|e| CacheStoreError::Malformed {
            what: format!("TLS settings for registry {registry}"),
            source: e.into(),
        })?;
        let client = Arc::new(client);
        let auth = match &self.inner.options.docker_config {
            Some(path) => auth::credentials_in(path, &registry)?,
            None => auth::credentials_for(&registry)?,
        };
        client.store_auth_if_needed(&registry, &auth).await;
        Ok(self
            .inner
            .clients
            .lock()
            .expect("registry client map poisoned")
            .entry(registry)
            .or_insert(client)
            .clone())
    }

    /// `--registry-certificate host=ca.pem`: extra roots for that host.
    fn root_certificates(&self, registry: &str) -> Result<Vec<Certificate>> {
        self.inner
            .options
            .ca_certificates
            .iter()
            .filter(|(host, _)| names(host, registry))
            .map(|(_, path)| {
                Ok(Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: std::fs::read(path).at(path)?,
                })
            })
            .collect()
    }

    /// `--registry-client-cert host=cert,key`: the certificate chain and key
    /// for that host, as one PEM bundle.
    fn client_identity(&self, registry: &str) -> Result<Option<Vec<u8>>> {
        let Some((_, cert, key)) = self
            .inner
            .options
            .client_certificates
            .iter()
            .find(|(host, _, _)| names(host, registry))
        else {
            return Ok(None);
        };
        let mut pem = std::fs::read(cert).at(cert)?;
        pem.push(b'\n');
        pem.extend(std::fs::read(key).at(key)?);
        Ok(Some(pem))
    }

    /// Runs `op` up to `retries` more times after a transient failure (5xx,
    /// 429, a dropped or refused connection), waiting as long as the
    /// registry asked (`Retry-After`, up to [`MAX_RETRY_AFTER`]) or else
    /// backing off exponentially from 250 ms. Anything else, a digest
    /// mismatch above all, fails at once; so does a transient failure on a
    /// registry where an earlier request spent as many retries in vain.
    async fn retrying<T, F, Fut>(&self, retries: u32, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        let mut resent = false;
        loop {
            let result = op().await;
            if let Err(CacheStoreError::Registry { source, .. }) = &result {
                if !resent && never_sent(source.as_ref()) {
                    resent = true;
                    continue;
                }
            }
            let Err(CacheStoreError::Registry {
                failure: RegistryFailure::Transient,
                registry,
                source,
                operation,
                retry_after,
                ..
            }) = &result
            else {
                return result;
            };
            {
                let mut exhausted = self.inner.exhausted.lock().expect("retry record poisoned");
                let spent = exhausted.get(registry).copied();
                if attempt == retries || (attempt == 0 && spent >= Some(retries)) {
                    exhausted.insert(registry.clone(), attempt.max(spent.unwrap_or(0)));
                    return result;
                }
            }
            let delay = retry_after.map_or(Duration::from_millis(250 << attempt.min(5)), |d| {
                d.min(MAX_RETRY_AFTER)
            });
            tracing::warn!(
                "{operation} failed ({}); retrying in {delay:?}",
                error_chain(source.as_ref())
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Fetches the manifest of `reference`; an index is resolved to the
    /// manifest for `platform`. The bytes are verified against their digest.
    pub async fn pull_manifest(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedManifest> {
        self.via_sources(reference, |r| async move {
            self.retrying(self.inner.options.pull_retries, || {
                self.pull_manifest_once(&r, platform)
            })
            .await
        })
        .await
    }

    /// Where to pull `reference` from, in order: the mirrors configured for
    /// its registry (`--registry-mirror` for Docker Hub, `--registry-map`),
    /// then the registry itself unless `--skip-default-registry-fallback`.
    pub fn pull_sources(&self, reference: &Reference) -> Vec<Reference> {
        let registry = crate::auth::normalize(reference.registry());
        let mut out: Vec<Reference> = self
            .inner
            .options
            .mirrors
            .iter()
            .filter(|(from, _)| *from == registry)
            .map(|(_, mirror)| {
                // A mirror may carry a path prefix: `host/prefix`.
                let (host, prefix) = mirror.split_once('/').unwrap_or((mirror, ""));
                let repository = match prefix.trim_matches('/') {
                    "" => reference.repository().to_string(),
                    p => format!("{p}/{}", reference.repository()),
                };
                match (reference.tag(), reference.digest()) {
                    (_, Some(digest)) => {
                        Reference::with_digest(host.into(), repository, digest.into())
                    }
                    (tag, None) => {
                        Reference::with_tag(host.into(), repository, tag.unwrap_or("latest").into())
                    }
                }
            })
            .collect();
        if out.is_empty() || self.inner.options.mirror_fallback {
            out.push(reference.clone());
        }
        out
    }

    /// Tries `op` on each of [`RegistryClient::pull_sources`] until one
    /// works; the last error otherwise.
    async fn via_sources<T, F, Fut>(&self, reference: &Reference, op: F) -> Result<T>
    where
        F: Fn(Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let sources = self.pull_sources(reference);
        let last = sources.len() - 1;
        for (i, source) in sources.into_iter().enumerate() {
            match op(source.clone()).await {
                Err(e) if i < last => {
                    tracing::warn!("{}: {e}; trying the next source", source.whole());
                }
                result => return result,
            }
        }
        unreachable!("pull_sources is never empty")
    }

    async fn pull_manifest_once(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedManifest> {
        let client = self.client(reference).await?;
        let (bytes, digest) = client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, manifest::ACCEPTED)
            .await
            .map_err(|e| registry_error(reference, "pull manifest", e))?;
        let digest = verified_manifest_digest(reference, &bytes, &digest)?;
        match manifest::parse(&bytes, &digest, platform)? {
            manifest::Parsed::Image(m) => Ok(*m),
            manifest::Parsed::Index { chosen } => {
                let by_digest = reference.clone_with_digest(chosen.to_string());
                let (bytes, digest) = client
                    .pull_manifest_raw(&by_digest, &RegistryAuth::Anonymous, manifest::ACCEPTED)
                    .await
                    .map_err(|e| registry_error(reference, "pull manifest", e))?;
                if digest != chosen.as_ref() {
                    return Err(CacheStoreError::DigestMismatch {
                        what: format!("manifest of {}", reference.whole()),
                        expected: chosen.to_string(),
                        actual: digest,
                    });
                }
                let digest = verified_manifest_digest(reference, &bytes, &digest)?;
                match manifest::parse(&bytes, &digest, platform)? {
                    manifest::Parsed::Image(m) => Ok(*m),
                    manifest::Parsed::Index { .. } => Err(CacheStoreError::Malformed {
                        what: reference.whole(),
                        source: "an index points at another index".into(),
                    }),
                }
            }
        }
    }

    /// Fetches exact manifest bytes, verified against their digest, or
    /// `None` when the registry has no such manifest; retried as pulls are.
    pub async fn pull_manifest_if_exists(
        &self,
        reference: &Reference,
        accepted: &[&str],
    ) -> Result<Option<Vec<u8>>> {
        self.retrying(self.inner.options.pull_retries, || {
            self.pull_manifest_if_exists_once(reference, accepted)
        })
        .await
    }

    async fn pull_manifest_if_exists_once(
        &self,
        reference: &Reference,
        accepted: &[&str],
    ) -> Result<Option<Vec<u8>>> {
        let client = self.client(reference).await?;
        match client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, accepted)
            .await
        {
            Ok((bytes, digest)) => {
                verified_manifest_digest(reference, &bytes, &digest)?;
                Ok(Some(bytes.to_vec()))
            }
            Err(OciDistributionError::RegistryError { envelope, .. })
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::NameUnknown
                    )
                }) =>
            {
                Ok(None)
            }
            Err(OciDistributionError::ServerError { code: 404, .. })
            | Err(OciDistributionError::ImageManifestNotFoundError(_)) => Ok(None),
            Err(e) => Err(registry_error(reference, "pull manifest", e)),
        }
    }

    /// The digest `reference` points at now, by a HEAD request.
    pub async fn manifest_digest(&self, reference: &Reference) -> Result<Digest> {
        self.via_sources(reference, |r| async move {
            self.retrying(self.inner.options.pull_retries, || async {
                let client = self.client(&r).await?;
                let digest = client
                    .fetch_manifest_digest(&r, &RegistryAuth::Anonymous)
                    .await
                    .map_err(|e| registry_error(&r, "check manifest", e))?;
                digest::parse(&digest)
            })
            .await
        })
        .await
    }

    /// Streams a blob into the store, unless it is there already.
    pub async fn pull_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<StoredBlob> {
        self.via_sources(reference, |r| async move {
            self.retrying(self.inner.options.pull_retries, || {
                self.pull_blob_once(&r, digest, store)
            })
            .await
        })
        .await
    }

    async fn pull_blob_once(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<StoredBlob> {
        self.inner
            .origins
            .lock()
            .expect("blob origins poisoned")
            .insert(digest.clone(), reference.clone());
        if store.contains(digest)? {
            return Ok(StoredBlob {
                digest: digest.clone(),
                size: store.size(digest)?,
            });
        }
        let client = self.client(reference).await?;
        let mut stream = client
            .pull_blob_stream(reference, digest.as_ref())
            .await
            .map_err(|e| registry_error(reference, "pull blob", e))?;
        let reporter = Reporter::start(
            self.inner.on_transfer.get().cloned(),
            Direction::Pull,
            digest,
            stream.content_length,
        );
        let mut writer = store.writer()?;
        while let Some(chunk) = stream.next().await {
            // A mismatch is permanent: the registry holds other bytes, so
            // it fails here, unretried, as Kiln's own check would.
            let chunk = chunk.map_err(|e| match verification_failure(&e) {
                Some((expected, actual)) => CacheStoreError::DigestMismatch {
                    what: format!("blob from {}", reference.whole()),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                },
                None => registry_error(reference, "pull blob", e),
            })?;
            writer.write_all(&chunk).at(store.path(digest)?)?;
            reporter.moved(chunk.len());
        }
        let stored = writer.commit(Some(digest))?;
        reporter.finish();
        self.inner.pulled.fetch_add(stored.size, Ordering::Relaxed);
        Ok(stored)
    }

    pub async fn blob_exists(&self, reference: &Reference, digest: &Digest) -> Result<bool> {
        let client = self.client(reference).await?;
        client
            .blob_exists(reference, digest.as_ref())
            .await
            .map_err(|e| registry_error(reference, "check blob", e))
    }

    /// The manifest `reference` points at now, by a HEAD request. Any
    /// failure reads as "none": the caller then pushes, which reports the
    /// real error.
    pub async fn manifest_at(&self, reference: &Reference) -> Option<Digest> {
        let client = self.client(reference).await.ok()?;
        let found = client
            .fetch_manifest_digest(reference, &RegistryAuth::Anonymous)
            .await
            .ok()?;
        digest::parse(&found).ok()
    }

    /// Uploads a stored blob as a stream, skipping it when the registry has
    /// it. For a blob that may well be there (a base's layer, a
    /// `--cache-repo` one): the registry is asked before any session opens,
    /// and none opened ahead is taken.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<()> {
        self.retrying(self.inner.options.push_retries, || {
            self.push_blob_once(reference, digest, store)
        })
        .await
    }

    /// Uploads a blob this build `made`, in a session opened ahead
    /// ([`Self::open_upload_ahead`]) when one is there.
    pub async fn push_made_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
        made: Made,
    ) -> Result<()> {
        let known = match made {
            Made::Layer => Known::Made,
            Made::Config => Known::New,
        };
        self.retrying(self.inner.options.push_retries, || {
            self.upload_blob(reference, digest, store, known)
        })
        .await
    }

    async fn push_blob_once(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<()> {
        let origin = self
            .inner
            .origins
            .lock()
            .expect("blob origins poisoned")
            .get(digest)
            .cloned();
        let Some(origin) = origin.filter(|o| {
            o.resolve_registry() == reference.resolve_registry()
                && o.repository() != reference.repository()
        }) else {
            return self
                .upload_blob(reference, digest, store, Known::Unknown)
                .await;
        };
        if self.blob_exists(reference, digest).await? {
            return Ok(());
        }
        let client = self.client(reference).await?;
        // A refused mount (oci-client reports a 202 as an error) just
        // means an upload, as the registry then expects anyway.
        if client
            .mount_blob(reference, &origin, digest.as_ref())
            .await
            .is_ok()
        {
            self.inner.mounted.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.upload_blob(reference, digest, store, Known::Missing)
            .await
    }

    /// Opens an upload session on `reference`'s repository now, for a blob
    /// to be pushed there later (a step's layer, an image's config): its
    /// push then skips the POST. Must be called on a Tokio runtime.
    pub fn open_upload_ahead(&self, reference: &Reference) {
        let (this, to) = (self.clone(), reference.clone());
        let opening = tokio::spawn(async move {
            let client = this.client(&to).await.ok()?;
            client.begin_blob_upload(&to).await.ok()
        });
        self.inner.sessions.add(reference, opening);
    }

    /// Cancels the upload sessions no blob used (best effort: a registry
    /// purges stale ones anyway), and waits for those cancelled before.
    pub async fn cancel_unused_uploads(&self) {
        for (reference, opening) in self.inner.sessions.take_all() {
            if let Ok(Some(location)) = opening.await {
                self.cancel_upload(&reference, location);
            }
        }
        self.inner.sessions.cancelled().await;
    }

    /// Cancels the upload session at `location` in the background.
    fn cancel_upload(&self, reference: &Reference, location: String) {
        let (this, reference) = (self.clone(), reference.clone());
        self.inner.sessions.cancelling(tokio::spawn(async move {
            if let Ok(client) = this.client(&reference).await {
                let _ = client.cancel_blob_upload(&location, &reference).await;
            }
        }));
    }

    /// Uploads a stored blob, asking first whether the registry has it
    /// unless that is `known`. A blob this build made takes a session
    /// opened ahead, used while the `HEAD` asks, so a new blob costs one
    /// round trip where it cost three; others never take one, which would
    /// leave it unused whenever the registry has them.
    async fn upload_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
        known: Known,
    ) -> Result<()> {
        let client = self.client(reference).await?;
        let ahead = match known {
            Known::Made | Known::New => self.inner.sessions.take(reference),
            Known::Unknown | Known::Missing => None,
        };
        let asks = matches!(known, Known::Unknown | Known::Made);
        // Without a session opened ahead the HEAD asks before any opens;
        // with one, beside it.
        let asks_beside = asks && ahead.is_some();
        if asks && ahead.is_none() && self.blob_exists(reference, digest).await? {
            return Ok(());
        }
        let session = async {
            if let Some(opening) = ahead {
                if let Ok(Some(location)) = opening.await {
                    return Ok((location, true));
                }
            }
            client
                .begin_blob_upload(reference)
                .await
                .map(|l| (l, false))
        };
        let exists = async {
            match asks_beside {
                true => self.blob_exists(reference, digest).await,
                false => Ok(false),
            }
        };
        let (exists, session) = futures_util::future::join(exists, session).await;
        let (location, opened_ahead) = match (exists, session) {
            (Ok(false), Ok(session)) => session,
            (Ok(false), Err(e)) => return Err(registry_error(reference, "push blob", e)),
            (exists, session) => {
                if let Ok((location, _)) = session {
                    self.cancel_upload(reference, location);
                }
                return exists.map(|_| ());
            }
        };
        if self
            .put_blob(&client, &location, opened_ahead, reference, digest, store)
            .await?
        {
            return Ok(());
        }
        // The session opened ahead had expired meanwhile: one of its own.
        let location = client
            .begin_blob_upload(reference)
            .await
            .map_err(|e| registry_error(reference, "push blob", e))?;
        self.put_blob(&client, &location, false, reference, digest, store)
            .await
            .map(|_| ())
    }

    /// Sends a stored blob, as a stream, into the upload session at
    /// `location`. False when that session, one opened `ahead`, is gone.
    async fn put_blob(
        &self,
        client: &Client,
        location: &str,
        ahead: bool,
        reference: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<bool> {
        let path = store.path(digest)?;
        let file = tokio::fs::File::open(&path).await.at(&path)?;
        let size = file.metadata().await.at(&path)?.len();
        let reporter = Arc::new(Reporter::start(
            self.inner.on_transfer.get().cloned(),
            Direction::Push,
            digest,
            Some(size),
        ));
        let counted = reporter.clone();
        // Counted as the client reads the file, one MiB behind the wire at most.
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
            .inspect_ok(move |chunk| counted.moved(chunk.len()))
            .map_err(OciDistributionError::from);
        match client
            .push_blob_stream_at(location, reference, stream, digest.as_ref(), size)
            .await
        {
            Ok(_) => {}
            Err(OciDistributionError::ServerError { code: 404, .. }) if ahead => return Ok(false),
            Err(e) => return Err(registry_error(reference, "push blob", e)),
        }
        reporter.finish();
        self.inner.pushed.fetch_add(size, Ordering::Relaxed);
        Ok(true)
    }

    /// Makes `digest` from `from` exist at `to`: nothing when it is there,
    /// a cross-repository mount when both are on one registry and it
    /// allows one, else a pull into the store and an upload.
    pub async fn copy_blob(
        &self,
        from: &Reference,
        to: &Reference,
        digest: &Digest,
        store: &BlobStore,
    ) -> Result<()> {
        // Recorded first: the push below then tries the mount itself.
        self.inner
            .origins
            .lock()
            .expect("blob origins poisoned")
            .insert(digest.clone(), from.clone());
        if from.resolve_registry() == to.resolve_registry() {
            if self.blob_exists(to, digest).await? {
                return Ok(());
            }
            let client = self.client(to).await?;
            if from.repository() != to.repository()
                && client.mount_blob(to, from, digest.as_ref()).await.is_ok()
            {
                self.inner.mounted.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        } else if self.blob_exists(to, digest).await? {
            return Ok(());
        }
        self.pull_blob(from, digest, store).await?;
        self.push_blob(to, digest, store).await
    }

    /// Pushes exact manifest bytes (so the digest is what we computed).
    pub async fn push_manifest(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &MediaType,
    ) -> Result<()> {
        self.retrying(self.inner.options.push_retries, || {
            self.push_manifest_once(reference, bytes.clone(), media_type)
        })
        .await
    }

    async fn push_manifest_once(
        &self,
        reference: &Reference,
        bytes: Vec<u8>,
        media_type: &MediaType,
    ) -> Result<()> {
        let client = self.client(reference).await?;
        let content_type = media_type
            .as_ref()
            .parse()
            .map_err(|e| registry_error(reference, "push manifest", e))?;
        client
            .push_manifest_raw(reference, bytes, content_type)
            .await
            .map_err(|e| registry_error(reference, "push manifest", e))?;
        Ok(())
    }
}

/// Whether hyper gave up on a request before sending it: the pooled
/// connection it picked was closed by the server just then. Sending it
/// again is safe whatever the retry budget, so it is sent once more.
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
    })
}

/// The digests of oci-client's end-of-stream check, when that is what failed.
fn verification_failure(e: &std::io::Error) -> Option<(&str, &str)> {
    match e
        .get_ref()?
        .downcast_ref::<oci_client::errors::DigestError>()?
    {
        oci_client::errors::DigestError::VerificationError { expected, actual } => {
            Some((expected, actual))
        }
        _ => None,
    }
}

/// The digest of manifest bytes, checked against the one the registry
/// claimed and the one the reference pins.
fn verified_manifest_digest(reference: &Reference, bytes: &[u8], claimed: &str) -> Result<Digest> {
    let actual = digest::sha256(bytes);
    for expected in std::iter::once(claimed).chain(reference.digest()) {
        if expected != actual.as_ref() {
            return Err(CacheStoreError::DigestMismatch {
                what: format!("manifest of {}", reference.whole()),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references_parse_as_oci_spec_parses_them() {
        for r in [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "docker.io/library/busybox:latest",
            "ghcr.io/acme/app",
            "ghcr.io/acme/team/app:v1.2.3",
            "127.0.0.1:5000/base/busybox:latest",
            "localhost/app",
            "localhost:5000/app:dev_1",
            "reg.example.com:443/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "reg.example.com/a:v1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "my-org/my.app_x",
        ] {
            let fast = parse_plain(r).unwrap_or_else(|| panic!("{r} is plain"));
            let slow: Reference = r.parse().unwrap();
            assert_eq!(
                (fast.registry(), fast.repository(), fast.tag(), fast.digest()),
                (slow.registry(), slow.repository(), slow.tag(), slow.digest()),
                "{r}"
            );
            assert_eq!(fast.whole(), slow.whole(), "{r}");
        }
        for odd in [
            "UPPER/case",
            "a//b",
            "app:",
            ":tag",
            "x@sha256:short",
            "-a/b",
        ] {
            assert!(parse_plain(odd).is_none(), "{odd}");
        }
    }

    #[test]
    fn retries_are_not_spent_twice_on_one_registry() {
        let client = RegistryClient::new(RegistryOptions::default());
        let calls = std::sync::atomic::AtomicU32::new(0);
        let failing = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(CacheStoreError::Registry {
                registry: "r.example".into(),
                operation: "pull manifest",
                reference: "r.example/a".into(),
                source: "503".into(),
                failure: RegistryFailure::Transient,
                retry_after: None,
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let attempts = |retries| {
            calls.store(0, Ordering::SeqCst);
            assert!(runtime.block_on(client.retrying(retries, failing)).is_err());
            calls.load(Ordering::SeqCst)
        };
        assert_eq!(attempts(1), 2);
        // One retry was spent in vain there: another request with one
        // fails at its first failure; one with more still retries.
        assert_eq!(attempts(1), 1);
        assert_eq!(attempts(0), 1);
        assert_eq!(attempts(2), 3);
        assert_eq!(attempts(2), 1);
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.3.4.5"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
