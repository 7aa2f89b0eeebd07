//! OCI image layouts on disk: read one as a base image (`oci-layout://`),
//! write one as a build output (`--oci-layout-path`).
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::blobs::BlobStore;
use crate::digest::{self, Digest};
use crate::error::{CacheStoreError, Cause, IoContext, Result};
use crate::manifest::{
    self, canonical_json, Descriptor, ImageIndex, MediaType, Parsed, Platform, ResolvedManifest,
};

/// The annotation that names (tags) an entry of a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The `oci-layout` file's content.
pub const LAYOUT_MARKER: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

fn layout_error(path: &Path, cause: impl Into<Cause>) -> CacheStoreError {
    CacheStoreError::Layout {
        path: path.to_path_buf(),
        source: cause.into(),
    }
}

fn blob_path(layout: &Path, digest: &Digest) -> Result<PathBuf> {
    Ok(layout.join("blobs/sha256").join(digest::hex(digest)?))
}

fn read_index(layout: &Path) -> Result<ImageIndex> {
    let path = layout.join("index.json");
    let bytes = fs::read(&path).at(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| layout_error(&path, e))
}

/// Copies one blob of the layout into the store, verifying its digest.
fn import_blob(layout: &Path, digest: &Digest, store: &BlobStore) -> Result<()> {
    if store.contains(digest)? {
        return Ok(());
    }
    let path = blob_path(layout, digest)?;
    let mut src = fs::File::open(&path).at(&path)?;
    let mut writer = store.writer()?;
    std::io::copy(&mut src, &mut writer).at(&path)?;
    writer.commit(Some(digest))?;
    Ok(())
}

/// Splits `PATH[:tag]`; a colon belongs to the tag only when what follows has
/// no slash, so paths with colons in directory names still work.
pub fn split_layout_reference(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !tag.is_empty() && !path.is_empty() => {
            (path, Some(tag))
        }
        _ => (spec, None),
    }
}

/// Imports the image `tag` (or the layout's only image) into the store and
/// returns its manifest.
pub fn import(
    layout: &Path,
    tag: Option<&str>,
    platform: &Platform,
    store: &BlobStore,
) -> Result<ResolvedManifest> {
    let index = read_index(layout)?;
    fn named(d: &Descriptor) -> Option<&str> {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .map(String::as_str)
    }
    let entry = match tag {
        Some(tag) => index.manifests.iter().find(|d| named(d) == Some(tag)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => index.manifests.iter().find(|d| named(d) == Some("latest")),
    }
    .ok_or_else(|| {
        layout_error(
            layout,
            format!(
                "no image tagged {:?} in index.json",
                tag.unwrap_or("latest")
            ),
        )
    })?;
    let mut digest = entry.digest.clone();
    // An index inside the layout is resolved to the platform's manifest.
    for _ in 0..2 {
        import_blob(layout, &digest, store)?;
        let bytes = store.read(&digest)?;
        match manifest::parse(&bytes, &digest, platform)? {
            Parsed::Image(m) => {
                import_blob(layout, &m.manifest.config.digest, store)?;
                for layer in &m.manifest.layers {
                    import_blob(layout, &layer.digest, store)?;
                }
                return Ok(*m);
            }
            Parsed::Index { chosen } => digest = chosen,
        }
    }
    Err(layout_error(layout, "nested indexes are not supported"))
}

/// Writes (or adds to) an OCI layout: the blobs, then `index.json` entries
/// for the manifest under each tag.
pub fn write(
    layout: &Path,
    store: &BlobStore,
    manifest: &Descriptor,
    blobs: &[Digest],
    tags: &[String],
) -> Result<()> {
    let blob_dir = layout.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).at(&blob_dir)?;
    for digest in blobs.iter().chain(std::iter::once(&manifest.digest)) {
        let dest = blob_path(layout, digest)?;
        if dest.exists() {
            continue;
        }
        let src = store.path(digest)?;
        // A hard link is free when both sides share a filesystem.
        if fs::hard_link(&src, &dest).is_err() {
            fs::copy(&src, &dest).at(&dest)?;
        }
    }
    let marker = layout.join("oci-layout");
    fs::write(&marker, LAYOUT_MARKER).at(&marker)?;

    let mut index = if layout.join("index.json").exists() {
        read_index(layout)?
    } else {
        ImageIndex {
            schema_version: 2,
            media_type: Some(MediaType::ImageIndex),
            manifests: Vec::new(),
            annotations: None,
        }
    };
    for tag in tags {
        index
            .manifests
            .retain(|d| d.annotations.as_ref().and_then(|a| a.get(REF_NAME)) != Some(tag));
        let mut entry = manifest.clone();
        entry.annotations = Some([(REF_NAME.to_string(), tag.clone())].into());
        index.manifests.push(entry);
    }
    let path = layout.join("index.json");
    let tmp = layout.join(".index.json.tmp");
    let mut file = fs::File::create(&tmp).at(&tmp)?;
    file.write_all(&canonical_json(&index)).at(&tmp)?;
    file.flush().at(&tmp)?;
    fs::rename(&tmp, &path).at(&path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StateDir;

    #[test]
    fn splits_tags_from_paths() {
        assert_eq!(split_layout_reference("/a/b:v1"), ("/a/b", Some("v1")));
        assert_eq!(split_layout_reference("/a/b"), ("/a/b", None));
        assert_eq!(split_layout_reference("/a:b/c"), ("/a:b/c", None));
    }

    #[test]
    fn writes_then_imports_a_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let config = store.put(b"{}").unwrap();
        let layer = store.put(b"layer").unwrap();
        let m = manifest::ImageManifest {
            schema_version: 2,
            media_type: Some(MediaType::ImageManifest),
            config: Descriptor::new(MediaType::ImageConfig, config.digest.clone(), config.size),
            layers: vec![Descriptor::new(
                MediaType::ImageLayerGzip,
                layer.digest.clone(),
                layer.size,
            )],
            annotations: None,
        };
        let desc = store.put_json(MediaType::ImageManifest, &m).unwrap();
        let out = dir.path().join("out");
        write(
            &out,
            &store,
            &desc,
            &[config.digest.clone(), layer.digest.clone()],
            &["v1".into()],
        )
        .unwrap();

        let other = BlobStore::open(&StateDir::open(dir.path().join("other")).unwrap()).unwrap();
        let got = import(&out, Some("v1"), &Platform::host(), &other).unwrap();
        assert_eq!(got.digest, desc.digest);
        assert!(other.contains(&layer.digest).unwrap());
        assert!(import(&out, Some("v2"), &Platform::host(), &other).is_err());
    }
}
