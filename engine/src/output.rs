//! Build outputs: registry pushes, a docker-archive tarball, an OCI layout,
//! and digest files. Each takes what the build made ([`Built`]): one image,
//! or an index of one image per platform.
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use futures_util::{StreamExt, TryStreamExt};
use kiln_cachestore::digest::{self, Digest};
use kiln_cachestore::manifest::{canonical_json, ImageIndex, ImageManifest, MediaType};
use kiln_cachestore::{layout, BlobStore, Reference, RegistryClient};

use crate::error::{BuildError, IoContext};
pub use crate::image::{
    annotate, assemble_index, attestation, Annotations, Built, BuiltImage, BuiltIndex,
};
use crate::uploads::Uploads;

impl BuiltImage {
    fn blob_digests(&self) -> Vec<Digest> {
        self.layers
            .iter()
            .map(|l| l.descriptor.digest.clone())
            .chain(std::iter::once(self.config.digest.clone()))
            .collect()
    }
}

impl Built {
    /// Every blob the tag's manifest reaches, but that manifest itself:
    /// layers and configs, and for an index each image's (and
    /// attestation's) manifest.
    fn blob_digests(&self) -> Vec<Digest> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for image in self.manifests() {
            let manifest = matches!(self, Built::Index(_)).then(|| image.manifest.digest.clone());
            for d in image.blob_digests().into_iter().chain(manifest) {
                if seen.insert(d.clone()) {
                    out.push(d);
                }
            }
        }
        out
    }
}

/// Pushes one image to `to` (a tag, or in an index its digest), where the
/// manifest `current` is: blobs first (those `uploads` sent during the
/// build awaited, those the registry has skipped), the manifest last.
async fn push_image(
    image: &BuiltImage,
    to: &Reference,
    current: Option<Digest>,
    registry: &RegistryClient,
    store: &BlobStore,
    uploads: &Uploads,
) -> Result<(), BuildError> {
    // An image with a layer this build uploaded is new, so its config goes
    // on unasked (the build started it as it assembled the image; this
    // starts it for a caller that did not).
    uploads.config(image);
    // A registry stores a manifest only once it has every blob it names, so
    // a destination already at this manifest (a no-change rebuild) needs
    // nothing more than the HEAD that found it, not a HEAD per blob and a
    // PUT.
    if current.as_ref() == Some(&image.manifest.digest) {
        return Ok(());
    }
    // For the same reason the blobs of the manifest there now (a previous
    // build's, when the store has it) need no HEAD; those the build's
    // uploads took are theirs.
    let held = current
        .and_then(|d| blobs_named(store, &d))
        .unwrap_or_default();
    let rest = image
        .blob_digests()
        .into_iter()
        .filter(|d| !held.contains(d) && !uploads.started(to, d));
    // Every background upload, this image's or not, goes on beside them:
    // a failed one leaves no tag, and is the failure told, being the first.
    let (finished, pushed) =
        futures_util::future::join(uploads.finish(), push_blobs(rest, to, registry, store)).await;
    finished?;
    pushed?;
    // Every blob the build made is uploaded by now (those of later images
    // of an index too: their uploads started as they were built), so a
    // session opened ahead and still unused never will be: its DELETE goes
    // out beside the manifest's PUT rather than after it.
    let bytes = store.read(&image.manifest.digest)?;
    let (pushed, ()) = futures_util::future::join(
        registry.push_manifest(to, bytes, &image.manifest.media_type),
        registry.cancel_unused_uploads(),
    )
    .await;
    pushed?;
    Ok(())
}

/// Makes `blobs` exist at `destination`, [`UPLOADS_AT_ONCE`] at a time,
/// skipping those it has.
async fn push_blobs(
    blobs: impl Iterator<Item = Digest>,
    destination: &Reference,
    registry: &RegistryClient,
    store: &BlobStore,
) -> Result<(), BuildError> {
    let pushes = blobs.map(|d| async move { registry.push_blob(destination, &d, store).await });
    futures_util::stream::iter(pushes)
        .buffer_unordered(UPLOADS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Blobs pushed at once, as Docker's `max-concurrent-uploads` default.
const UPLOADS_AT_ONCE: usize = 5;

/// The config and layers an image manifest in the store names; `None`
/// when the store lacks it or it is no image manifest.
fn blobs_named(store: &BlobStore, manifest: &Digest) -> Option<HashSet<Digest>> {
    let bytes = store.read(manifest).ok()?;
    let m: ImageManifest = serde_json::from_slice(&bytes).ok()?;
    Some(
        std::iter::once(m.config.digest)
            .chain(m.layers.into_iter().map(|l| l.digest))
            .collect(),
    )
}

/// Pushes what was built to one destination, the tag last, so a failed
/// push leaves no image (or index) under it. The build's background
/// uploads are waited for before any manifest: a failed one fails the
/// push.
///
/// `at_start` is what the tag named as the build started (a HEAD the
/// build did not wait for; `None`: nothing, or the asking failed). A push
/// that finds its image there is done, as it was then: another build may
/// have moved the tag since, as it may after a HEAD at the end. One that
/// finds another image, or none, pushes.
pub async fn push(
    built: &Built,
    destination: &Reference,
    at_start: Option<Digest>,
    registry: &RegistryClient,
    store: &BlobStore,
    uploads: &Uploads,
) -> Result<(), BuildError> {
    match built {
        Built::Image(image) => {
            push_image(image, destination, at_start, registry, store, uploads).await
        }
        Built::Index(index) => {
            // A tag already at this index has every manifest it lists: a
            // no-change rebuild asks nothing per image and PUTs nothing.
            if at_start.as_ref() == Some(&index.index.digest) {
                return Ok(());
            }
            for image in built.manifests() {
                let to = destination.clone_with_digest(image.manifest.digest.to_string());
                let current = registry.manifest_at(&to).await;
                push_image(image, &to, current, registry, store, uploads).await?;
            }
            uploads.finish().await?;
            let bytes = store.read(&index.index.digest)?;
            registry
                .push_manifest(destination, bytes, &index.index.media_type)
                .await?;
            Ok(())
        }
    }
}

/// Writes a docker-archive tarball (`docker save` format) that `podman
/// load` and `skopeo copy docker-archive:` read. Layers are stored
/// compressed, as go-containerregistry's tarballs do.
///
/// An index is written as `docker save` (Docker 25) writes one: an OCI
/// layout (`oci-layout`, `index.json`, `blobs/`) that `skopeo copy
/// oci-archive:` reads, plus a `manifest.json` with an entry per image for
/// docker-archive readers, its tags on the first.
pub fn write_docker_archive(
    built: &Built,
    tags: &[String],
    path: &Path,
    store: &BlobStore,
) -> Result<(), BuildError> {
    let file = File::create(path).at(path)?;
    let mut tar = Tar {
        tar: tar::Builder::new(BufWriter::new(file)),
        path,
    };
    let manifest = match built {
        Built::Image(image) => {
            let config_name = format!("{}.json", digest::hex(&image.config.digest)?);
            let layer_names = image
                .layers
                .iter()
                .map(|l| Ok(format!("{}.tar.gz", digest::hex(&l.descriptor.digest)?)))
                .collect::<Result<Vec<String>, BuildError>>()?;
            tar.bytes(&config_name, &store.read(&image.config.digest)?)?;
            for (layer, name) in image.layers.iter().zip(&layer_names) {
                tar.blob(name, &layer.descriptor.digest, store)?;
            }
            serde_json::json!([{
                "Config": config_name,
                "RepoTags": tags,
                "Layers": layer_names,
            }])
        }
        Built::Index(index) => {
            let blob_name = |d: &Digest| Ok(format!("blobs/sha256/{}", digest::hex(d)?));
            for d in built
                .blob_digests()
                .iter()
                .chain(std::iter::once(&index.index.digest))
            {
                tar.blob(&blob_name(d)?, d, store)?;
            }
            tar.bytes("oci-layout", layout::LAYOUT_MARKER)?;
            let mut entry = index.index.clone();
            if let Some(tag) = tags.first() {
                entry.annotations = Some(
                    [
                        ("io.containerd.image.name".to_string(), tag.clone()),
                        (layout::REF_NAME.to_string(), tag_of(tag).to_string()),
                    ]
                    .into(),
                );
            }
            let oci_index = ImageIndex {
                schema_version: 2,
                media_type: Some(MediaType::ImageIndex),
                manifests: vec![entry],
                annotations: None,
            };
            tar.bytes("index.json", &canonical_json(&oci_index))?;
            let entries = index
                .images
                .iter()
                .enumerate()
                .map(|(i, image)| {
                    let layers = image
                        .layers
                        .iter()
                        .map(|l| blob_name(&l.descriptor.digest))
                        .collect::<Result<Vec<_>, BuildError>>()?;
                    Ok(serde_json::json!({
                        "Config": blob_name(&image.config.digest)?,
                        "RepoTags": if i == 0 { tags.to_vec() } else { Vec::new() },
                        "Layers": layers,
                    }))
                })
                .collect::<Result<Vec<_>, BuildError>>()?;
            serde_json::Value::Array(entries)
        }
    };
    tar.bytes("manifest.json", &canonical_json(&manifest))?;
    let mut out = tar.tar.into_inner().at(path)?;
    out.flush().at(path)
}

/// A tarball being written, whose errors name its path.
struct Tar<'a> {
    tar: tar::Builder<BufWriter<File>>,
    path: &'a Path,
}

impl Tar<'_> {
    fn entry(
        &mut self,
        name: &str,
        size: u64,
        data: &mut dyn std::io::Read,
    ) -> Result<(), BuildError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut header, name, data).at(self.path)
    }

    fn bytes(&mut self, name: &str, bytes: &[u8]) -> Result<(), BuildError> {
        self.entry(name, bytes.len() as u64, &mut &bytes[..])
    }

    fn blob(&mut self, name: &str, digest: &Digest, store: &BlobStore) -> Result<(), BuildError> {
        let size = store.size(digest)?;
        self.entry(name, size, &mut store.open_blob(digest)?)
    }
}

/// The tag of `registry/repo:tag`, `latest` without one.
fn tag_of(reference: &str) -> &str {
    match reference.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => "latest",
    }
}

/// Adds what was built to an OCI layout under each tag: the manifest, or
/// the index with every image's manifest.
pub fn write_oci_layout(
    built: &Built,
    tags: &[String],
    path: &Path,
    store: &BlobStore,
) -> Result<(), BuildError> {
    Ok(layout::write(
        path,
        store,
        built.descriptor(),
        &built.blob_digests(),
        tags,
    )?)
}

/// The digest a destination's tag points at: the manifest's, or the index's.
pub fn write_digest_file(built: &Built, path: &Path) -> Result<(), BuildError> {
    std::fs::write(path, built.descriptor().digest.as_ref()).at(path)
}
