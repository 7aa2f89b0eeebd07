//! `--provenance=min|max` end to end: the SLSA statement BuildKit-style
//! tools look for, attached to each platform's manifest in the pushed,
//! laid-out and tarred index, and never a secret or a credential in it.
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::pki::*;
use support::*;

const USER: &str = "kiln";
const PASSWORD: &str = "prov-Registry-pa55-9c1e";
const PREDICATE: &str = "https://slsa.dev/provenance/v0.2";

/// A secure registry's manifests and blobs, read with the password.
struct Reader<'a> {
    pki: &'a Pki,
    registry: &'a Registry,
}

impl Reader<'_> {
    /// `skopeo inspect --raw` of `repo@digest` or `repo:tag`: the bytes.
    fn manifest(&self, reference: &str) -> Vec<u8> {
        run_ok(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--cert-dir",
            self.pki.path("certs").to_str().unwrap(),
            "--creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("docker://{}", self.registry.reference(reference)),
        ]))
        .stdout
    }

    /// A blob of `repo` as the registry serves it (curl: skopeo has no
    /// command for one blob).
    fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        run_ok(Command::new("curl").args([
            "-sSf",
            "--cacert",
            self.pki.path("ca.pem").to_str().unwrap(),
            "-u",
            &format!("{USER}:{PASSWORD}"),
            &format!("https://{}/v2/{repo}/blobs/{digest}", self.registry.addr),
        ]))
        .stdout
    }
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The index's image manifests (`(os/arch, digest)`) and attestation
/// manifests (their descriptors).
fn split_index(index: &Value) -> (Vec<(String, String)>, Vec<Value>) {
    let (mut images, mut attestations) = (Vec::new(), Vec::new());
    for m in index["manifests"].as_array().unwrap() {
        let platform =
            format!("{}/{}", m["platform"]["os"], m["platform"]["architecture"]).replace('"', "");
        match platform.as_str() {
            "unknown/unknown" => attestations.push(m.clone()),
            _ => images.push((platform, m["digest"].as_str().unwrap().to_string())),
        }
    }
    (images, attestations)
}

/// The attestation of `image` among `attestations`, checked as BuildKit
/// writes one; its manifest digest.
fn attestation_of(attestations: &[Value], image: &str) -> String {
    let found: Vec<&Value> = attestations
        .iter()
        .filter(|a| a["annotations"]["vnd.docker.reference.digest"] == image)
        .collect();
    assert_eq!(found.len(), 1, "{attestations:?}");
    let a = found[0];
    assert_eq!(
        a["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    assert_eq!(a["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    a["digest"].as_str().unwrap().to_string()
}

/// The statement layer of an attestation manifest: its digest.
fn statement_layer(manifest: &Value) -> String {
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.in-toto+json");
    assert_eq!(
        layers[0]["annotations"]["in-toto.io/predicate-type"],
        PREDICATE
    );
    layers[0]["digest"].as_str().unwrap().to_string()
}

fn assert_absent(haystack: &[u8], needle: &str, what: &str) {
    assert!(
        !haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes()),
        "{what} holds {needle:?}"
    );
}

#[test]
fn max_provenance_per_platform_pushed_with_no_secret_in_it() {
    require_arm64_emulation();
    let pki = Pki::new(USER, PASSWORD);
    let registry = pki.start_registry(false);
    let read = Reader {
        pki: &pki,
        registry: &registry,
    };
    let base = registry.reference("base/multi:latest");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--all",
        "--dest-cert-dir",
        pki.path("certs").to_str().unwrap(),
        "--dest-creds",
        &format!("{USER}:{PASSWORD}"),
        &format!("oci:{}:latest", busybox_index_layout().display()),
        &format!("docker://{base}"),
    ]));
    let auth = docker_config(&format!(
        r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
        registry.addr,
        base64(&format!("{USER}:{PASSWORD}"))
    ));
    // A value no build could print by chance.
    let secret = format!(
        "s3cret-{}",
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .unwrap()
            .trim()
    );
    let secret_file = auth.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let run_with_secret = "RUN --mount=type=secret,id=s test -s /run/secrets/s && wc -c < /run/secrets/s > /secret-len && echo $GREETING > /greeting";
    let ctx = Context::new(
        &format!("FROM {base}\nARG GREETING\n{run_with_secret}\nRUN uname -m > /arch\n"),
        &[],
    );
    let state = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let digest_file = out_dir.path().join("digest");
    let layout = out_dir.path().join("layout");
    let tar = out_dir.path().join("image.tar");
    let dest = registry.reference("app/prov:v1");
    let out = kiln_build_cmd(
        &ctx,
        state.path(),
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--provenance=max",
            "--secret",
            &format!("id=s,src={}", secret_file.display()),
            "--build-arg",
            "GREETING=hello-provenance",
            "--destination",
            &dest,
            "--registry-certificate",
            &format!("{}={}", registry.addr, pki.path("ca.pem").display()),
            "--digest-file",
            digest_file.to_str().unwrap(),
            "--oci-layout-path",
            layout.to_str().unwrap(),
            "--tar-path",
            tar.to_str().unwrap(),
        ],
    )
    .env("DOCKER_CONFIG", auth.path())
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert_absent(log.as_bytes(), &secret, "the log");

    let index_bytes = read.manifest("app/prov:v1");
    assert_eq!(
        std::fs::read_to_string(&digest_file).unwrap(),
        sha256_of(&index_bytes),
        "--digest-file names the index"
    );
    let index = json(&index_bytes);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let (images, attestations) = split_index(&index);
    let platforms: Vec<&str> = images.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    assert_eq!(attestations.len(), 2);
    let base_index = json(&read.manifest("base/multi:latest"));
    let (base_images, _) = split_index(&base_index);

    // Everything the registry holds for the image, to search for secrets.
    let mut everything = index_bytes.clone();
    for (platform, image) in &images {
        let image_manifest = read.manifest(&format!("app/prov@{image}"));
        let config_digest = json(&image_manifest)["config"]["digest"].clone();
        everything.extend(&image_manifest);
        everything.extend(read.blob("app/prov", config_digest.as_str().unwrap()));
        let att_digest = attestation_of(&attestations, image);
        let att_bytes = read.manifest(&format!("app/prov@{att_digest}"));
        everything.extend(&att_bytes);
        let att = json(&att_bytes);
        let att_config = read.blob("app/prov", att["config"]["digest"].as_str().unwrap());
        assert_eq!(json(&att_config)["architecture"], "unknown");
        everything.extend(&att_config);
        let statement_bytes = read.blob("app/prov", &statement_layer(&att));
        everything.extend(&statement_bytes);

        let statement = json(&statement_bytes);
        assert_eq!(statement["_type"], "https://in-toto.io/Statement/v0.1");
        assert_eq!(statement["predicateType"], PREDICATE);
        assert_eq!(
            statement["subject"][0]["digest"]["sha256"],
            image.trim_start_matches("sha256:")
        );
        assert_eq!(
            statement["subject"][0]["name"],
            format!(
                "pkg:docker/{}/app/prov@v1?platform={}",
                registry.addr,
                platform.replace('/', "%2F")
            )
        );
        let p = &statement["predicate"];
        assert_eq!(
            p["invocation"]["environment"]["platform"],
            platform.as_str()
        );
        assert_eq!(
            p["invocation"]["parameters"]["args"]["build-arg:GREETING"],
            "hello-provenance"
        );
        assert_eq!(p["invocation"]["configSource"]["entryPoint"], "Dockerfile");
        assert!(p["builder"]["id"].as_str().unwrap().contains("kiln"));
        // The base is the platform's manifest of the base index.
        let base_digest = &base_images.iter().find(|(p, _)| p == platform).unwrap().1;
        let materials = p["materials"].as_array().unwrap();
        assert!(
            materials.iter().any(|m| {
                m["uri"] == "pkg:docker/".to_string() + &base.replace(":latest", "@latest")
                    && m["digest"]["sha256"] == base_digest.trim_start_matches("sha256:")
            }),
            "{materials:?}"
        );
        // max: each step as planned, and what the cache did (all ran).
        let steps: Vec<(&str, &str)> = p["buildConfig"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["cache"].is_string())
            .map(|s| {
                (
                    s["instruction"].as_str().unwrap(),
                    s["cache"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [(run_with_secret, "ran"), ("RUN uname -m > /arch", "ran")]
        );
    }
    assert_absent(&everything, &secret, "the pushed image");
    assert_absent(&everything, PASSWORD, "the pushed image");
    assert_absent(
        &everything,
        &base64(&format!("{USER}:{PASSWORD}")),
        "the pushed image",
    );

    // The layout and the tarball hold the same index, attestations too.
    let in_layout = skopeo_raw(&format!("oci:{}:v1", layout.display()));
    assert_eq!(in_layout, index);
    let in_tar = skopeo_raw(&format!("oci-archive:{}", tar.display()));
    assert_eq!(in_tar, index);
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert_absent(&bytes, &secret, "the layout");
        assert_absent(&bytes, PASSWORD, "the layout");
    }
    assert_absent(&std::fs::read(&tar).unwrap(), &secret, "the tarball");
}

/// A git repository as a `file://…/repo.git` context; its commit.
fn git_context(dockerfile: &str, into: &Path) -> (String, String) {
    let repo = into.join("repo.git");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("Dockerfile"), dockerfile).unwrap();
    let git = |args: &[&str]| {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(["-c", "user.email=t@e", "-c", "user.name=t"])
                .args(args),
        )
    };
    git(&["init", "-q"]);
    git(&["add", "Dockerfile"]);
    git(&["commit", "-qm", "one"]);
    let commit = String::from_utf8(git(&["rev-parse", "HEAD"]).stdout).unwrap();
    (
        format!("file://{}", repo.display()),
        commit.trim().to_string(),
    )
}

/// Without `--provenance` one platform is one manifest, as before; with
/// `min`, an index of the manifest and its attestation, which names the
/// git commit built and lists no steps, and which a no-change rebuild
/// makes again byte for byte.
#[test]
fn min_provenance_makes_an_index_of_one_and_none_changes_nothing() {
    let registry = Registry::start();
    let base = registry.push_busybox();
    let ctx = Context::new(&format!("FROM {base}\nRUN echo hi > /hi\n"), &[]);
    let state = tempfile::tempdir().unwrap();
    let plain = registry.reference("app/plain:v1");
    let out = kiln_build(&ctx, state.path(), &["--destination", &plain]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest = skopeo_raw(&format!("docker://{plain}"));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );

    let work = tempfile::tempdir().unwrap();
    let (url, commit) = git_context(&format!("FROM {base}\nRUN echo hi > /hi\n"), work.path());
    let dest = registry.reference("app/min:v1");
    let digest_file = work.path().join("digest");
    let build = || {
        let out = Command::new(KILN)
            .current_dir(work.path())
            .args(["build", "--context", &url, "--dockerfile", "Dockerfile"])
            .arg("--cache-dir")
            .arg(state.path())
            .args(["--provenance", "min", "--destination", &dest])
            .arg("--digest-file")
            .arg(&digest_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::read_to_string(&digest_file).unwrap()
    };
    let digest = build();
    let index = skopeo_raw(&format!("docker://{dest}"));
    let (images, attestations) = split_index(&index);
    assert_eq!(images.len(), 1);
    // The same image as without --provenance: only the attestation is new.
    assert_eq!(
        images[0].1,
        sha256_of(
            &run_ok(Command::new("skopeo").args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{plain}"),
            ]))
            .stdout
        )
    );
    let att_digest = attestation_of(&attestations, &images[0].1);
    let att = skopeo_raw(&format!(
        "docker://{}",
        registry.reference(&format!("app/min@{att_digest}"))
    ));
    let layer = statement_layer(&att);
    let (status, body) = registry.get(&format!("/v2/app/min/blobs/{layer}"));
    assert_eq!(status, 200);
    let statement: Value = serde_json::from_str(&body).unwrap();
    let p = &statement["predicate"];
    assert_eq!(p["invocation"]["configSource"]["uri"], url.as_str());
    assert_eq!(
        p["invocation"]["configSource"]["digest"]["sha1"],
        commit.as_str()
    );
    assert!(p.get("buildConfig").is_none(), "min lists no steps: {p}");
    let dockerfile_digest = sha256_of(format!("FROM {base}\nRUN echo hi > /hi\n").as_bytes());
    assert_eq!(
        p["metadata"]["urn:kiln:metadata"]["dockerfile"]["sha256"],
        dockerfile_digest.trim_start_matches("sha256:")
    );

    // A no-change rebuild: the same statement, the same index.
    assert_eq!(build(), digest);

    // Docker manifests cannot carry attestations: refused, naming both flags.
    let out = kiln_build(
        &ctx,
        state.path(),
        &["--provenance=min", "--image-format", "docker", "--no-push"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--provenance") && err.contains("--image-format"),
        "{err}"
    );
}
