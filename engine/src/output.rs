//! Build outputs: registry pushes, a docker-archive tarball, an OCI layout,
//! and digest files.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use kiln_cachestore::digest::{self, Digest};
use kiln_cachestore::manifest::canonical_json;
use kiln_cachestore::{layout, BlobStore, Reference, RegistryClient};

use crate::error::{BuildError, IoContext};
pub use crate::image::BuiltImage;

impl BuiltImage {
    fn blob_digests(&self) -> Vec<Digest> {
        self.layers
            .iter()
            .map(|l| l.descriptor.digest.clone())
            .chain(std::iter::once(self.config.digest.clone()))
            .collect()
    }
}

/// Pushes the image to one destination: blobs first (skipping those the
/// registry has), the manifest last, so a failed push leaves no image.
pub async fn push(
    image: &BuiltImage,
    destination: &Reference,
    registry: &RegistryClient,
    store: &BlobStore,
) -> Result<(), BuildError> {
    // A registry stores a manifest only once it has every blob it names, so
    // a destination already at this manifest (a no-change rebuild) needs
    // one HEAD instead of a HEAD per blob and a PUT.
    if registry
        .has_manifest(destination, &image.manifest.digest)
        .await
    {
        return Ok(());
    }
    for digest in image.blob_digests() {
        registry.push_blob(destination, &digest, store).await?;
    }
    let bytes = store.read(&image.manifest.digest)?;
    registry
        .push_manifest(destination, bytes, &image.manifest.media_type)
        .await?;
    Ok(())
}

/// Writes a docker-archive tarball (`docker save` format) that `podman
/// load` and `skopeo copy docker-archive:` read. Layers are stored
/// compressed, as go-containerregistry's tarballs do.
pub fn write_docker_archive(
    image: &BuiltImage,
    tags: &[String],
    path: &Path,
    store: &BlobStore,
) -> Result<(), BuildError> {
    let config_name = format!("{}.json", digest::hex(&image.config.digest)?);
    let layer_names = image
        .layers
        .iter()
        .map(|l| Ok(format!("{}.tar.gz", digest::hex(&l.descriptor.digest)?)))
        .collect::<Result<Vec<String>, BuildError>>()?;
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": layer_names,
    }]);
    let file = File::create(path).at(path)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut add = |name: &str, size: u64, data: &mut dyn std::io::Read| {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data).at(path)
    };
    let config = store.read(&image.config.digest)?;
    add(&config_name, config.len() as u64, &mut config.as_slice())?;
    for (layer, name) in image.layers.iter().zip(&layer_names) {
        let mut blob = store.open_blob(&layer.descriptor.digest)?;
        add(name, layer.descriptor.size, &mut blob)?;
    }
    let manifest = canonical_json(&manifest);
    add(
        "manifest.json",
        manifest.len() as u64,
        &mut manifest.as_slice(),
    )?;
    let mut out = tar.into_inner().at(path)?;
    out.flush().at(path)
}

/// Adds the image to an OCI layout under each tag.
pub fn write_oci_layout(
    image: &BuiltImage,
    tags: &[String],
    path: &Path,
    store: &BlobStore,
) -> Result<(), BuildError> {
    Ok(layout::write(
        path,
        store,
        &image.manifest,
        &image.blob_digests(),
        tags,
    )?)
}

pub fn write_digest_file(image: &BuiltImage, path: &Path) -> Result<(), BuildError> {
    std::fs::write(path, image.manifest.digest.as_ref()).at(path)
}
