//! Real parts for the end-to-end tests: a Distribution registry each test
//! starts itself, the busybox fixture, and the independent clients that
//! read back what Kiln produced.
#![allow(dead_code)]

pub mod layers;
pub mod pki;
pub mod podman;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A `docker-registry serve` on 127.0.0.1, stopped when dropped.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
    /// Where the access log goes ([`Registry::start_logged`]).
    access_log: Option<PathBuf>,
}

/// TLS and basic auth for [`Registry::start_secure`].
pub struct Security<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub htpasswd: &'a Path,
    /// Require a client certificate signed by this CA (mutual TLS).
    pub client_ca: Option<&'a Path>,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(None, false)
    }

    /// A registry that logs every request it serves, for
    /// [`Registry::requests`].
    pub fn start_logged() -> Registry {
        Registry::start_with(None, true)
    }

    /// A registry serving HTTPS with `cert`/`key` and requiring the users
    /// in `htpasswd`.
    pub fn start_secure(security: &Security) -> Registry {
        Registry::start_with(Some(security), false)
    }

    fn start_with(security: Option<&Security>, logged: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Ask the kernel for a free port, then hand it to the registry.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{}",
                !logged,
                dir.path().join("data").display(),
                security.map_or(String::new(), |s| format!(
                    "  tls:\n    certificate: {}\n    key: {}\n{}auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    s.cert.display(),
                    s.key.display(),
                    s.client_ca.map_or(String::new(), |ca| format!(
                        "    clientcas:\n      - {}\n",
                        ca.display()
                    )),
                    s.htpasswd.display()
                ))
            ),
        )
        .unwrap();
        // The access log goes to stdout, one combined-format line per request.
        let access_log = logged.then(|| dir.path().join("access.log"));
        let stdout = match &access_log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (apt-get install docker-registry)");
        let registry = Registry {
            child,
            addr,
            _dir: dir,
            access_log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Over TLS, a plain request gets a 400 answer: up is up.
        let up = if security.is_some() { 400 } else { 200 };
        while registry.get("/v2/").0 != up {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        registry
    }

    /// A plain HTTP GET: (status, body). Status 0 when nothing answers.
    pub fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut stream) = TcpStream::connect(&self.addr) else {
            return (0, String::new());
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n",
            self.addr
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return (0, String::new());
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// The request lines (`HEAD /v2/app/manifests/v1 HTTP/1.1`) served so
    /// far, of a registry from [`Registry::start_logged`].
    pub fn requests(&self) -> Vec<String> {
        let path = self.access_log.as_ref().expect("Registry::start_logged");
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| Some(l.split('"').nth(1)?.to_string()))
            .collect()
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Where the registry keeps a blob's bytes (Distribution's filesystem
    /// layout), for tests that tamper with what it serves.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir_of(&format!("blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    /// The blob upload sessions open on `repository`: Distribution's
    /// `_uploads` entries that hold a `startedat` (a cancelled one leaves
    /// its hash state behind, but not that).
    pub fn upload_sessions(&self, repository: &str) -> usize {
        let dir = self.dir_of(&format!("repositories/{repository}/_uploads"));
        std::fs::read_dir(dir).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().join("startedat").exists())
            })
            .count()
        })
    }

    fn dir_of(&self, under_v2: &str) -> PathBuf {
        self._dir
            .path()
            .join("data/docker/registry/v2")
            .join(under_v2)
    }

    /// Pushes the busybox fixture and returns its reference.
    pub fn push_busybox(&self) -> String {
        self.push_busybox_as("base/busybox:latest")
    }

    /// Pushes the busybox fixture as `repo_tag` and returns its reference.
    pub fn push_busybox_as(&self, repo_tag: &str) -> String {
        let reference = self.reference(repo_tag);
        run_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", busybox_layout().display()),
            &format!("docker://{reference}"),
        ]));
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The busybox fixture as an OCI layout, built once per test process.
pub fn busybox_layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        run_ok(Command::new(Path::new(REPO).join("fixtures/busybox.sh")).arg(&dir));
        dir
    })
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A build context in a temp dir: a Dockerfile plus files.
pub struct Context {
    pub dir: tempfile::TempDir,
}

impl Context {
    pub fn new(dockerfile: &str, files: &[(&str, &str)]) -> Context {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        Context { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `kiln build` on a context with a fresh state dir under `state`.
/// `kiln build` of `ctx` with `state` as its cache dir, to run as the
/// caller needs (environment, spawned...).
pub fn kiln_build_cmd(ctx: &Context, state: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(KILN);
    cmd.arg("build")
        .arg("--context")
        .arg(ctx.path())
        .arg("--dockerfile")
        .arg(ctx.path().join("Dockerfile"))
        .arg("--cache-dir")
        .arg(state)
        .args(extra);
    cmd
}

pub fn kiln_build(ctx: &Context, state: &Path, extra: &[&str]) -> Output {
    kiln_build_cmd(ctx, state, extra).output().unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `skopeo inspect --config` of an image in the registry.
pub fn skopeo_config(reference: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Unpacks an image with umoci (from an OCI layout) and returns the rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str, into: &Path) -> PathBuf {
    let bundle = into.join("bundle");
    run_ok(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:{tag}", layout.display()),
        bundle.to_str().unwrap(),
    ]));
    bundle.join("rootfs")
}

/// A blob of an OCI layout, by its digest (a `sha256:` JSON string).
pub fn layout_blob(layout: &Path, digest: &serde_json::Value) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.as_str().unwrap().trim_start_matches("sha256:"))
}

/// The manifest an OCI layout's index names first.
pub fn layout_manifest(layout: &Path) -> serde_json::Value {
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index = json(layout.join("index.json"));
    json(layout_blob(layout, &index["manifests"][0]["digest"]))
}

/// The top layer of that manifest: its descriptor and its blob.
pub fn layout_top_layer(layout: &Path) -> (serde_json::Value, PathBuf) {
    let manifest = layout_manifest(layout);
    let top = manifest["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let blob = layout_blob(layout, &top["digest"]);
    (top, blob)
}

/// Copies an image from the registry into an OCI layout and unpacks it.
pub fn pull_and_unpack(reference: &str, into: &Path) -> PathBuf {
    let layout = into.join("layout");
    pull_to_layout(reference, &layout);
    umoci_unpack(&layout, "img", into)
}

/// Copies an image from the registry into an OCI layout, tagged `img`.
pub fn pull_to_layout(reference: &str, layout: &Path) {
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:img", layout.display()),
    ]));
}

/// One entry of an unpacked root, without times: what two builders must
/// agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// blake3 of a file's content, or a symlink's target.
    pub content: String,
    /// For files with several links: the first path of the group.
    pub link_group: Option<String>,
}

/// Walks an unpacked rootfs into a sorted map of relative paths.
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, TreeEntry> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    let mut inodes: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path.clone());
            }
            all.push((path, meta));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, meta) in all {
        let rel = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let ft = meta.file_type();
        let (kind, content) = if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_symlink() {
            (
                'l',
                std::fs::read_link(&path)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if ft.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            ('f', content_digest(&bytes))
        } else if ft.is_char_device() || ft.is_block_device() {
            ('c', format!("{}", meta.rdev()))
        } else if ft.is_fifo() {
            ('p', String::new())
        } else {
            ('s', String::new())
        };
        let link_group = (kind == 'f' && meta.nlink() > 1).then(|| {
            inodes
                .entry(meta.ino())
                .or_insert_with(|| rel.clone())
                .clone()
        });
        out.insert(
            rel,
            TreeEntry {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                content,
                link_group,
            },
        );
    }
    out
}

fn content_digest(bytes: &[u8]) -> String {
    // SipHash with fixed keys plus the length: enough to compare two trees.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}-{}", h.finish(), bytes.len())
}

/// The entries of an image's layers added above its base, as pulled from
/// the registry: `(path, uid, gid, mode)` from the tar headers (PAX
/// records included), layer after layer.
pub fn pushed_layer_headers(reference: &str, base_layers: usize) -> Vec<(String, u64, u64, u32)> {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    pull_to_layout(reference, &layout);
    let manifest = layout_manifest(&layout);
    let mut out = Vec::new();
    for layer in manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .skip(base_layers)
    {
        let file = std::fs::File::open(layout_blob(&layout, &layer["digest"])).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            out.push((
                entry.path().unwrap().display().to_string(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mode().unwrap(),
            ));
        }
    }
    out
}

/// A Dockerfile a user that is not root builds with no privilege at all
/// (`{BASE}` to replace): owners and modes go into tar headers.
pub const NO_RUN_DOCKERFILE: &str = "FROM {BASE}
COPY --chown=1234:2345 f /app/f
COPY --chmod=0750 g /app/g
WORKDIR /app/w
CMD [\"cat\", \"/app/f\"]
";

/// What a build of [`NO_RUN_DOCKERFILE`] must have put in its layers, as a `tar -tv`
/// would show them: the directory COPY --chown made is the owner's.
pub fn assert_no_run_layers(reference: &str) {
    let headers = pushed_layer_headers(reference, 1);
    assert_eq!(
        headers,
        [
            ("app/".to_string(), 1234, 2345, 0o755),
            ("app/f".into(), 1234, 2345, 0o644),
            ("app/".into(), 1234, 2345, 0o755),
            ("app/g".into(), 0, 0, 0o750),
            ("app/".into(), 1234, 2345, 0o755),
            ("app/w/".into(), 0, 0, 0o755),
        ],
        "{headers:?}"
    );
}

/// The two-platform busybox base (linux/amd64 + linux/arm64) as an OCI
/// layout whose `latest` is an image index, built once per test process.
pub fn busybox_index_layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("busybox-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        run_ok(Command::new(Path::new(REPO).join("fixtures/busybox-index.sh")).arg(&dir));
        dir
    })
}

impl Registry {
    /// Pushes the two-platform busybox index as `repo_tag`; its reference.
    pub fn push_busybox_index_as(&self, repo_tag: &str) -> String {
        let reference = self.reference(repo_tag);
        run_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", busybox_index_layout().display()),
            &format!("docker://{reference}"),
        ]));
        reference
    }
}

/// `skopeo inspect --raw` of a transport reference (`docker://…`,
/// `oci:…`, `oci-archive:…`), parsed.
pub fn skopeo_raw(transport_ref: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        transport_ref,
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `sha256:` digest of bytes, by sha256sum.
pub fn sha256_of(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// Panics, saying what to do, unless QEMU can run arm64 binaries in a
/// root (binfmt_misc with the F flag): the emulated tests fail rather than
/// pass without it.
pub fn require_arm64_emulation() {
    let path = Path::new("/proc/sys/fs/binfmt_misc/qemu-aarch64");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.starts_with("enabled")
            && text
                .lines()
                .any(|l| l.starts_with("flags:") && l.contains('F')),
        "{} is not enabled with the F flag: install qemu-user-static and binfmt-support, mount binfmt_misc, then update-binfmts --enable qemu-aarch64 (.ci/run does)",
        path.display()
    );
}

/// A gate for a RUN to wait at: a plain HTTP server on 127.0.0.1 that
/// answers 200 once `open` says so, 404 before. RUN shares the host's
/// network, so `wget` reaches it. Its address.
pub fn gate(open: impl Fn() -> bool + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            // The request's head, up to the blank line; no body follows.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match client.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let status = match open() {
                true => "200 OK",
                false => "404 Not Found",
            };
            let answer =
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = client.write_all(answer.as_bytes());
        }
    });
    addr
}
