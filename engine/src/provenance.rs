//! `--provenance=min|max`: what went into an image, as an in-toto
//! statement (v0.1) with a SLSA provenance v0.2 predicate, the shape
//! BuildKit attaches, so the tools that read BuildKit's read Kiln's.
//!
//! What it records comes from the build's events (base images, steps) and
//! from the invocation (build args, Dockerfile, git context). Nothing
//! secret is ever handed to it: secrets' values and registry credentials
//! never reach these types, and a git URL loses its user and password.
use std::collections::BTreeMap;

use serde::Serialize;

use kiln_cachestore::digest::{self, Digest};

use crate::build::{CacheResult, Event};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";
/// The media type of a statement blob, and the annotation naming its
/// predicate on the layer that holds it.
pub const MEDIA_TYPE: &str = "application/vnd.in-toto+json";
pub const PREDICATE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// What Kiln's builds are: a Dockerfile built by Kiln (a URN: Kiln has no
/// home page to name).
const BUILD_TYPE: &str = "urn:kiln:dockerfile:v1";

/// How much the statement says (`--provenance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Builder, build args, Dockerfile digest, git context, base images.
    Min,
    /// And every step: its instruction and how the cache served it.
    Max,
}

/// A build's inputs that no event reports.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The Dockerfile's path in the context, or as `--dockerfile` gave it.
    pub dockerfile_name: String,
    pub dockerfile_digest: Digest,
    pub build_args: BTreeMap<String, String>,
    pub target: Option<String>,
    /// A git context: its URL and the commit built.
    pub git: Option<GitContext>,
}

#[derive(Debug, Clone)]
pub struct GitContext {
    pub url: String,
    pub commit: String,
}

/// What one platform's build reported: the images it read and its steps.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    materials: Vec<(String, Digest)>,
    steps: Vec<Step>,
}

impl Recorder {
    /// Takes in one build event.
    pub fn event(&mut self, event: &Event) {
        match event {
            Event::Pulled { reference, digest } => {
                let material = (reference.clone(), digest.clone());
                if !self.materials.contains(&material) {
                    self.materials.push(material);
                }
            }
            Event::StepDone(step) => self.steps.push(Step {
                stage: step.stage,
                line: step.line,
                instruction: step.text.clone(),
                cache: step.cache.map(|c| match c {
                    CacheResult::LocalHit => "local-hit",
                    CacheResult::RemoteHit => "remote-hit",
                    CacheResult::Miss => "ran",
                }),
            }),
            _ => {}
        }
    }
}

/// The statement about one image manifest (`subject`, named after the
/// image's first destination `name`, if any), built for `platform`.
pub fn statement(
    mode: Mode,
    name: Option<&str>,
    subject: &Digest,
    platform: &str,
    invocation: &Invocation,
    recorded: &Recorder,
) -> Result<Statement, kiln_cachestore::CacheStoreError> {
    let digest_set = |d: &Digest| -> Result<DigestSet, kiln_cachestore::CacheStoreError> {
        Ok([("sha256".to_string(), digest::hex(d)?.to_string())].into())
    };
    let git = invocation.git.as_ref().map(|g| {
        (
            without_credentials(&g.url),
            DigestSet::from([("sha1".to_string(), g.commit.clone())]),
        )
    });
    let mut materials = recorded
        .materials
        .iter()
        .map(|(reference, d)| {
            Ok(Material {
                uri: purl(reference),
                digest: digest_set(d)?,
            })
        })
        .collect::<Result<Vec<_>, kiln_cachestore::CacheStoreError>>()?;
    if let Some((uri, digest)) = &git {
        materials.push(Material {
            uri: uri.clone(),
            digest: digest.clone(),
        });
    }
    Ok(Statement {
        kind: STATEMENT_TYPE,
        predicate_type: PREDICATE_TYPE,
        subject: vec![Subject {
            // An image with no name is `_`, as in-toto tools name one.
            name: name.map_or("_".to_string(), |name| {
                format!("{}?platform={}", purl(name), platform.replace('/', "%2F"))
            }),
            digest: digest_set(subject)?,
        }],
        predicate: Predicate {
            builder: Builder {
                id: format!("urn:kiln:{}", env!("CARGO_PKG_VERSION")),
            },
            build_type: BUILD_TYPE,
            invocation: InvocationRecord {
                config_source: ConfigSource {
                    uri: git.as_ref().map(|(uri, _)| uri.clone()),
                    digest: git.map(|(_, d)| d).unwrap_or_default(),
                    entry_point: invocation.dockerfile_name.clone(),
                },
                parameters: Parameters {
                    frontend: "dockerfile",
                    args: invocation
                        .build_args
                        .iter()
                        .map(|(k, v)| (format!("build-arg:{k}"), v.clone()))
                        .collect(),
                    target: invocation.target.clone(),
                },
                environment: Environment {
                    platform: platform.to_string(),
                },
            },
            build_config: (mode == Mode::Max).then(|| BuildConfig {
                steps: recorded.steps.clone(),
            }),
            metadata: Metadata {
                completeness: Completeness {
                    parameters: true,
                    environment: true,
                    materials: false,
                },
                reproducible: false,
                kiln: KilnMetadata {
                    builder: Versioned {
                        name: "kiln",
                        version: env!("CARGO_PKG_VERSION"),
                    },
                    dockerfile: digest_set(&invocation.dockerfile_digest)?,
                },
            },
            materials,
        },
    })
}

/// A package URL for an image reference (`pkg:docker/host/repo@tag`), as
/// BuildKit names images; a reference that is not a registry's (an OCI
/// layout) stays as it is.
fn purl(reference: &str) -> String {
    if reference.contains("://") {
        return reference.to_string();
    }
    let (name, version) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => match reference.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
            _ => (reference, None),
        },
    };
    match version {
        Some(v) => format!("pkg:docker/{name}@{v}"),
        None => format!("pkg:docker/{name}"),
    }
}

/// `scheme://user:password@host/…` without `user:password@`.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // `git@host:repo.git`: a user name, no password.
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

type DigestSet = BTreeMap<String, String>;

/// An in-toto statement; fields in the order BuildKit writes them.
#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    kind: &'static str,
    #[serde(rename = "predicateType")]
    predicate_type: &'static str,
    subject: Vec<Subject>,
    predicate: Predicate,
}

#[derive(Debug, Clone, Serialize)]
struct Subject {
    name: String,
    digest: DigestSet,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Predicate {
    builder: Builder,
    build_type: &'static str,
    invocation: InvocationRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    build_config: Option<BuildConfig>,
    metadata: Metadata,
    materials: Vec<Material>,
}

#[derive(Debug, Clone, Serialize)]
struct Builder {
    id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct InvocationRecord {
    config_source: ConfigSource,
    parameters: Parameters,
    environment: Environment,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigSource {
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    digest: DigestSet,
    entry_point: String,
}

#[derive(Debug, Clone, Serialize)]
struct Parameters {
    frontend: &'static str,
    /// `build-arg:NAME`, as BuildKit keys them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    args: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Environment {
    platform: String,
}

#[derive(Debug, Clone, Serialize)]
struct BuildConfig {
    steps: Vec<Step>,
}

/// One step of `max`: where it is, what it says, how the cache served it
/// (none for steps that change no files).
#[derive(Debug, Clone, Serialize)]
struct Step {
    stage: usize,
    line: usize,
    instruction: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
}

/// No build times: the same inputs make the same statement (and `min`
/// the same index digest on a no-change rebuild).
#[derive(Debug, Clone, Serialize)]
struct Metadata {
    completeness: Completeness,
    reproducible: bool,
    /// Kiln's own fields, under a name of its own as BuildKit keeps its.
    #[serde(rename = "urn:kiln:metadata")]
    kiln: KilnMetadata,
}

#[derive(Debug, Clone, Serialize)]
struct Completeness {
    parameters: bool,
    environment: bool,
    materials: bool,
}

#[derive(Debug, Clone, Serialize)]
struct KilnMetadata {
    builder: Versioned,
    /// The Dockerfile's sha256.
    dockerfile: DigestSet,
}

#[derive(Debug, Clone, Serialize)]
struct Versioned {
    name: &'static str,
    version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Material {
    uri: String,
    digest: DigestSet,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::StepReport;

    fn d(c: char) -> Digest {
        digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn names_images_as_package_urls_and_drops_git_credentials() {
        assert_eq!(
            purl("reg:5000/base/img:1.2"),
            "pkg:docker/reg:5000/base/img@1.2"
        );
        assert_eq!(purl("reg:5000/base/img"), "pkg:docker/reg:5000/base/img");
        assert_eq!(purl("oci-layout:///l:t"), "oci-layout:///l:t");
        assert_eq!(
            without_credentials("https://u:tok@example.com/a@b.git"),
            "https://example.com/a@b.git"
        );
        assert_eq!(
            without_credentials("git@example.com:a.git"),
            "git@example.com:a.git"
        );
    }

    #[test]
    fn min_leaves_out_the_steps_max_lists_them() {
        let mut recorded = Recorder::default();
        for e in [
            Event::Pulled {
                reference: "reg/base:1".into(),
                digest: d('b'),
            },
            Event::Pulled {
                reference: "reg/base:1".into(),
                digest: d('b'),
            },
            Event::StepDone(StepReport {
                stage: 0,
                index: 0,
                line: 2,
                text: "RUN make".into(),
                cache: Some(CacheResult::RemoteHit),
                layer: None,
                duration: Default::default(),
                phases: Vec::new(),
            }),
        ] {
            recorded.event(&e);
        }
        let invocation = Invocation {
            dockerfile_name: "Dockerfile".into(),
            dockerfile_digest: d('f'),
            build_args: [("V".to_string(), "1".to_string())].into(),
            target: None,
            git: Some(GitContext {
                url: "https://u:p@h/r.git".into(),
                commit: "c".repeat(40),
            }),
        };
        let json = |mode| {
            let s = statement(
                mode,
                Some("reg/app:v1"),
                &d('a'),
                "linux/arm64",
                &invocation,
                &recorded,
            )
            .unwrap();
            serde_json::to_value(&s).unwrap()
        };
        let min = json(Mode::Min);
        assert_eq!(min["subject"][0]["digest"]["sha256"], "a".repeat(64));
        assert_eq!(
            min["subject"][0]["name"],
            "pkg:docker/reg/app@v1?platform=linux%2Farm64"
        );
        let p = &min["predicate"];
        assert_eq!(p["invocation"]["parameters"]["args"]["build-arg:V"], "1");
        assert_eq!(p["invocation"]["configSource"]["uri"], "https://h/r.git");
        assert_eq!(p["materials"].as_array().unwrap().len(), 2);
        assert_eq!(p["materials"][0]["uri"], "pkg:docker/reg/base@1");
        assert!(p.get("buildConfig").is_none());
        assert!(!min.to_string().contains("u:p"));
        let max = json(Mode::Max);
        assert_eq!(
            max["predicate"]["buildConfig"]["steps"][0]["cache"],
            "remote-hit"
        );
    }
}
