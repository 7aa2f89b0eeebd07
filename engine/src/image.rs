//! The image config (Docker/OCI), its history, and the manifest.
//!
//! Config structs mirror the spec's field names and keep every field they do
//! not know in `extra`, so nothing of a base image's config is lost.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use kiln_cachestore::digest::Digest;
pub use kiln_cachestore::manifest::Layer;
use kiln_cachestore::manifest::{self, Descriptor, ImageIndex, ImageManifest, MediaType};
use kiln_cachestore::BlobStore;
use kiln_cachestore::Platform;

use crate::error::BuildError;
use crate::provenance;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

impl ImageConfig {
    pub fn env(&self) -> &[String] {
        self.config.env.as_deref().unwrap_or_default()
    }

    /// Sets `key` in Env, keeping its position when it already exists.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let env = self.config.env.get_or_insert_with(Vec::new);
        let entry = format!("{key}={value}");
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }

    pub fn shell(&self) -> Vec<String> {
        self.config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }
}

/// The manifest format of the built image (`--image-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ImageFormat {
    #[default]
    Oci,
    /// Docker schema 2, for registries and tools that want it.
    Docker,
}

impl ImageFormat {
    /// Attestations need OCI manifests: a Docker manifest list cannot mark
    /// a manifest as one.
    pub fn check_attestable(self) -> Result<(), BuildError> {
        match self {
            ImageFormat::Oci => Ok(()),
            ImageFormat::Docker => Err(BuildError::Invalid(
                "--provenance: attestations need OCI manifests; --image-format docker has none (use --image-format oci)".into(),
            )),
        }
    }
}

/// A finished image: its blobs are in the store.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Layer>,
}

/// What a build made: one image, or an index of one image per platform
/// (`--platform P1,P2`).
#[derive(Debug, Clone)]
pub enum Built {
    Image(BuiltImage),
    Index(BuiltIndex),
}

/// An image index and the images it lists, all in the store.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub index: Descriptor,
    pub images: Vec<BuiltImage>,
    /// `--provenance`: an attestation manifest per image, listed after them.
    pub attestations: Vec<BuiltImage>,
}

impl Built {
    /// What a destination's tag points at: the manifest or the index.
    pub fn descriptor(&self) -> &Descriptor {
        match self {
            Built::Image(image) => &image.manifest,
            Built::Index(index) => &index.index,
        }
    }

    /// Every image, one per platform.
    pub fn images(&self) -> &[BuiltImage] {
        match self {
            Built::Image(image) => std::slice::from_ref(image),
            Built::Index(index) => &index.images,
        }
    }

    /// Every manifest the tag's manifest reaches: the images, then their
    /// attestations (`--provenance`).
    pub fn manifests(&self) -> impl Iterator<Item = &BuiltImage> {
        let attestations = match self {
            Built::Image(_) => &[][..],
            Built::Index(index) => &index.attestations,
        };
        self.images().iter().chain(attestations)
    }
}

/// Annotations for `--annotation`: on each image manifest, on the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations {
    pub manifest: BTreeMap<String, String>,
    pub index: BTreeMap<String, String>,
}

/// Adds `annotations` to the image's manifest: a new manifest (and digest)
/// in the store. Docker schema 2 has no annotations.
pub fn annotate(
    store: &BlobStore,
    image: BuiltImage,
    annotations: &BTreeMap<String, String>,
) -> Result<BuiltImage, BuildError> {
    if annotations.is_empty() {
        return Ok(image);
    }
    if image.manifest.media_type != MediaType::ImageManifest {
        return Err(BuildError::Invalid(
            "--annotation: Docker manifests have no annotations (use --image-format oci)".into(),
        ));
    }
    let mut manifest: ImageManifest = serde_json::from_slice(&store.read(&image.manifest.digest)?)
        .map_err(|e| BuildError::Invalid(format!("manifest {}: {e}", image.manifest.digest)))?;
    manifest
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(annotations.clone());
    Ok(BuiltImage {
        manifest: store.put_json(image.manifest.media_type.clone(), &manifest)?,
        ..image
    })
}

/// Writes the attestation manifest of `image` into the store, as BuildKit
/// attaches one: `statement` (an in-toto statement) its one layer, for
/// platform `unknown/unknown`, annotated with the image manifest it is
/// about, so that platform selection skips it and attestation readers
/// find it.
pub fn attestation<T: Serialize>(
    store: &BlobStore,
    image: &BuiltImage,
    statement: &T,
) -> Result<BuiltImage, BuildError> {
    match image.manifest.media_type {
        MediaType::ImageManifest => ImageFormat::Oci,
        _ => ImageFormat::Docker,
    }
    .check_attestable()?;
    let stored = store.put(&manifest::canonical_json(statement))?;
    let mut layer = Descriptor::new(
        MediaType::Other(provenance::MEDIA_TYPE.into()),
        stored.digest.clone(),
        stored.size,
    );
    layer.annotations = Some(
        [(
            provenance::PREDICATE_ANNOTATION.to_string(),
            provenance::PREDICATE_TYPE.to_string(),
        )]
        .into(),
    );
    let config = ImageConfig {
        architecture: "unknown".into(),
        os: "unknown".into(),
        rootfs: RootFs {
            diff_ids: vec![stored.digest.clone()],
            ..RootFs::default()
        },
        ..ImageConfig::default()
    };
    let config = store.put_json(MediaType::ImageConfig, &config)?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MediaType::ImageManifest),
        config: config.clone(),
        layers: vec![layer.clone()],
        annotations: None,
    };
    let mut descriptor = store.put_json(MediaType::ImageManifest, &manifest)?;
    descriptor.platform = Some(Platform {
        architecture: "unknown".into(),
        os: "unknown".into(),
        variant: None,
    });
    descriptor.annotations = Some(
        [
            (
                "vnd.docker.reference.digest".to_string(),
                image.manifest.digest.to_string(),
            ),
            (
                "vnd.docker.reference.type".to_string(),
                "attestation-manifest".to_string(),
            ),
        ]
        .into(),
    );
    Ok(BuiltImage {
        manifest: descriptor,
        config,
        layers: vec![Layer {
            descriptor: layer,
            diff_id: stored.digest,
        }],
    })
}

/// Writes the index of `images` (each with the platform its config names)
/// and their `attestations` into the store: an OCI index, or a Docker
/// manifest list for Docker manifests.
pub fn assemble_index(
    store: &BlobStore,
    images: Vec<BuiltImage>,
    attestations: Vec<BuiltImage>,
    annotations: &BTreeMap<String, String>,
) -> Result<BuiltIndex, BuildError> {
    let docker = images
        .iter()
        .any(|i| i.manifest.media_type != MediaType::ImageManifest);
    if docker && !annotations.is_empty() {
        return Err(BuildError::Invalid(
            "--annotation index:…: a Docker manifest list has no annotations (use --image-format oci)".into(),
        ));
    }
    let mut manifests = Vec::new();
    for image in &images {
        let config: ImageConfig = serde_json::from_slice(&store.read(&image.config.digest)?)
            .map_err(|e| BuildError::Invalid(format!("config {}: {e}", image.config.digest)))?;
        let mut entry = image.manifest.clone();
        entry.platform = Some(Platform {
            architecture: config.architecture,
            os: config.os,
            variant: config.variant,
        });
        manifests.push(entry);
    }
    manifests.extend(attestations.iter().map(|a| a.manifest.clone()));
    let index = ImageIndex::of(manifests, docker, annotations.clone());
    Ok(BuiltIndex {
        index: store.put_json(index.media_type(), &index)?,
        images,
        attestations,
    })
}

/// Writes an image's config and manifest into the store: `config` with
/// its rootfs set to `layers` and `created` as its time.
pub(crate) fn assemble(
    store: &BlobStore,
    format: ImageFormat,
    mut config: ImageConfig,
    mut layers: Vec<Layer>,
    created: String,
) -> Result<BuiltImage, BuildError> {
    let docker = format == ImageFormat::Docker;
    if docker {
        // Docker schema 2 names the same gzip or tar bytes differently;
        // it has no zstd layers.
        for layer in &mut layers {
            let d = &mut layer.descriptor;
            d.media_type = match &d.media_type {
                MediaType::ImageLayerGzip => manifest::docker(manifest::DOCKER_LAYER_GZIP),
                MediaType::ImageLayer => manifest::docker(manifest::DOCKER_LAYER_TAR),
                MediaType::Other(name)
                    if name == manifest::DOCKER_LAYER_GZIP || name == manifest::DOCKER_LAYER_TAR =>
                {
                    d.media_type.clone()
                }
                other => {
                    return Err(BuildError::Invalid(format!(
                        "--image-format docker: layer {} is {other}, which Docker images cannot hold (use --compression gzip)",
                        d.digest
                    )))
                }
            };
        }
    }
    config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
    config.created = Some(created);
    let (config_type, manifest_type) = match docker {
        true => (
            manifest::docker(manifest::DOCKER_CONFIG),
            manifest::docker(manifest::DOCKER_MANIFEST),
        ),
        false => (MediaType::ImageConfig, MediaType::ImageManifest),
    };
    let config = store.put_json(config_type, &config)?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(manifest_type.clone()),
        config: config.clone(),
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        annotations: None,
    };
    Ok(BuiltImage {
        manifest: store.put_json(manifest_type, &manifest)?,
        config,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["A=1"], "Healthcheck": {"Test": ["NONE"]}, "ArgsEscaped": true},
            "rootfs": {"type": "layers", "diff_ids": []},
            "moby.buildkit.cache.v0": "x"
        });
        let config: ImageConfig = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(&config).unwrap(), raw);
    }

    #[test]
    fn set_env_replaces_in_place() {
        let mut c = ImageConfig::default();
        c.set_env("PATH", "/bin");
        c.set_env("A", "1");
        c.set_env("PATH", "/usr/bin:/bin");
        assert_eq!(c.env(), ["PATH=/usr/bin:/bin", "A=1"]);
    }
}
