//! OCI image layouts on disk: read one as a base image (`oci-layout://`),
//! write one as a build output (`--oci-layout-path`).
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::blobs::BlobStore;
use crate::digest;
use crate::error::{CacheStoreError, Cause, IoContext, Result};
use crate::manifest::{self, Descriptor, ImageIndex, Parsed, Platform, ResolvedManifest};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn layout_error(path: &Path, cause: impl Into<Cause>) -> CacheStoreError {
    CacheStoreError::Layout {
        path: path.to_path_buf(),
        source: cause.into(),
    }
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    Ok(layout.join("blobs/sha256").join(digest::validate(digest)?))
}

fn read_index(layout: &Path) -> Result<ImageIndex> {
    let path = layout.join("index.json");
    let bytes = fs::read(&path).at(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| layout_error(&path, e))
}

/// Copies one blob of the layout into the store, verifying its digest.
fn import_blob(layout: &Path, digest: &str, store: &BlobStore) -> Result<()> {
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
    blobs: &[String],
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
    fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#).at(&marker)?;

    let mut index = if layout.join("index.json").exists() {
        read_index(layout)?
    } else {
        ImageIndex {
            schema_version: 2,
            media_type: Some(manifest::OCI_INDEX.into()),
            manifests: Vec::new(),
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
    serde_json::to_writer(&mut file, &index).map_err(|e| layout_error(layout, e))?;
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
            media_type: Some(manifest::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: manifest::OCI_CONFIG.into(),
                digest: config.digest.clone(),
                size: config.size,
                platform: None,
                annotations: None,
            },
            layers: vec![Descriptor {
                media_type: manifest::OCI_LAYER_GZIP.into(),
                digest: layer.digest.clone(),
                size: layer.size,
                platform: None,
                annotations: None,
            }],
            annotations: None,
        };
        let bytes = serde_json::to_vec(&m).unwrap();
        let stored = store.put(&bytes).unwrap();
        let desc = Descriptor {
            media_type: manifest::OCI_MANIFEST.into(),
            digest: stored.digest.clone(),
            size: stored.size,
            platform: None,
            annotations: None,
        };
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
        assert_eq!(got.digest, stored.digest);
        assert!(other.contains(&layer.digest).unwrap());
        assert!(import(&out, Some("v2"), &Platform::host(), &other).is_err());
    }
}
