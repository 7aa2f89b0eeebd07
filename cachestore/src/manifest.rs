//! Manifests and indexes as the OCI image spec and Docker schema 2 write
//! them, reduced to what a builder needs, plus platform selection.
pub use oci_spec::image::MediaType;
use serde::{Deserialize, Serialize};

use crate::digest::{self, Digest};
use crate::error::{CacheStoreError, Cause, Result};

// Docker schema 2's names, which `oci_spec`'s `MediaType` holds as
// `Other`; the OCI ones are its own variants.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest media types Kiln asks registries for.
pub const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    DOCKER_MANIFEST,
    DOCKER_LIST,
];

/// A media type from a Docker name (`MediaType::Other`).
pub fn docker(name: &str) -> MediaType {
    MediaType::Other(name.to_string())
}

/// Whether a manifest's media type is an index (OCI or Docker list).
fn is_index(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(name) => name == DOCKER_LIST,
        _ => false,
    }
}

/// The one JSON writer for what Kiln stores, pushes or lays out (configs,
/// manifests, indexes, cache entries): serde's compact form with fields in
/// declaration order, which is the spec's, so one value has one digest.
pub fn canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("Kiln's documents have string keys and always serialize")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: MediaType,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl Descriptor {
    /// A descriptor with no platform and no annotations.
    pub fn new(media_type: MediaType, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type,
            digest,
            size,
            platform: None,
            annotations: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// `os/architecture[/variant]`, as `--custom-platform` takes it.
impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

impl Platform {
    /// The platform this binary was built for, in OCI's names.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Platform {
            architecture: architecture.into(),
            os: "linux".into(),
            variant: None,
        }
    }

    fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl ImageIndex {
    /// The index of `manifests`: a Docker manifest list when `docker` (the
    /// images are Docker's), else an OCI index, with `annotations` if any.
    pub fn of(
        manifests: Vec<Descriptor>,
        docker: bool,
        annotations: std::collections::BTreeMap<String, String>,
    ) -> ImageIndex {
        let media_type = match docker {
            true => self::docker(DOCKER_LIST),
            false => MediaType::ImageIndex,
        };
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_type),
            manifests,
            annotations: (!annotations.is_empty()).then_some(annotations),
        }
    }

    /// The media type it declares (an OCI index when it names none).
    pub fn media_type(&self) -> MediaType {
        self.media_type.clone().unwrap_or(MediaType::ImageIndex)
    }
}

/// A layer as a manifest lists it, with the diff_id its config lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub descriptor: Descriptor,
    pub diff_id: Digest,
}

/// An image manifest with its identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResolvedManifest {
    pub digest: Digest,
    pub media_type: MediaType,
    pub manifest: ImageManifest,
}

pub enum Parsed {
    Image(Box<ResolvedManifest>),
    /// An index; `chosen` is the digest of the manifest for the platform.
    Index {
        chosen: Digest,
    },
}

fn malformed(what: &str, cause: impl Into<Cause>) -> CacheStoreError {
    CacheStoreError::Malformed {
        what: what.to_string(),
        source: cause.into(),
    }
}

/// Parses manifest or index bytes, checking every digest they name.
pub fn parse(bytes: &[u8], digest: &Digest, platform: &Platform) -> Result<Parsed> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<MediaType>,
        manifests: Option<serde_json::Value>,
    }
    let what = format!("manifest {digest}");
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| malformed(&what, e))?;
    let is_index = match &probe.media_type {
        Some(media_type) => is_index(media_type),
        None => probe.manifests.is_some(),
    };
    if is_index {
        let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| malformed(&what, e))?;
        let chosen = index
            .manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| {
                malformed(
                    &what,
                    format!(
                        "no manifest for platform {}/{}{}",
                        platform.os,
                        platform.architecture,
                        platform
                            .variant
                            .as_ref()
                            .map(|v| format!("/{v}"))
                            .unwrap_or_default()
                    ),
                )
            })?;
        digest::hex(&chosen.digest)?;
        return Ok(Parsed::Index {
            chosen: chosen.digest.clone(),
        });
    }
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| malformed(&what, e))?;
    digest::hex(&manifest.config.digest)?;
    for layer in &manifest.layers {
        digest::hex(&layer.digest)?;
    }
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or(MediaType::ImageManifest);
    Ok(Parsed::Image(Box::new(ResolvedManifest {
        digest: digest.clone(),
        media_type,
        manifest,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> Digest {
        digest::parse(&format!("sha256:{}", n.to_string().repeat(64))).unwrap()
    }

    #[test]
    fn picks_the_platform_from_an_index() {
        let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": MediaType::ImageIndex,
        "manifests": [
            {"mediaType": MediaType::ImageManifest, "digest": d('a'), "size": 1,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": MediaType::ImageManifest, "digest": d('b'), "size": 1,
             "platform": {"architecture": "amd64", "os": "linux"}}
        ]});
        let bytes = serde_json::to_vec(&index).unwrap();
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        match parse(&bytes, &d('c'), &amd64).unwrap() {
            Parsed::Index { chosen } => assert_eq!(chosen, d('b')),
            Parsed::Image(_) => panic!("expected an index"),
        }
        let s390x = Platform {
            architecture: "s390x".into(),
            ..amd64
        };
        assert!(parse(&bytes, &d('c'), &s390x).is_err());
    }

    #[test]
    fn rejects_unsafe_layer_digests() {
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": MediaType::ImageManifest,
            "config": {"mediaType": MediaType::ImageConfig, "digest": d('a'), "size": 1},
            "layers": [{"mediaType": MediaType::ImageLayerGzip, "digest": "sha256:../../x", "size": 1}]});
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(parse(&bytes, &d('c'), &Platform::host()).is_err());
        // A well-formed digest of another algorithm cannot name a blob.
        let sha512 = format!("sha512:{}", "0".repeat(128));
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": MediaType::ImageManifest,
            "config": {"mediaType": MediaType::ImageConfig, "digest": d('a'), "size": 1},
            "layers": [{"mediaType": MediaType::ImageLayerGzip, "digest": sha512, "size": 1}]});
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(parse(&bytes, &d('c'), &Platform::host()).is_err());
    }
}
