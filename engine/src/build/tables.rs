//! Layers' metadata tables (what a COPY-only stage is built on, see
//! [`crate::rootfs::meta_view`]), kept per layer in the index by diff_id:
//! looked up for a build, or made ahead by `kiln warm` so a warmed node's
//! first build reads no layer blob for them.

use std::time::{Duration, Instant};

use kiln_cachestore::manifest::ResolvedManifest;
use kiln_cachestore::{BlobStore, Index};

use crate::error::BuildError;
use crate::image::Layer;
use crate::rootfs::meta_view::LayerTable;

/// A layer's table and whether it had to be read from the layer's blob
/// (it was not in the index, and is now).
pub(crate) struct Found {
    pub table: LayerTable,
    pub read: bool,
}

/// `layer`'s metadata table: from the index, or read from its blob once
/// and kept there. `Err` (why) when the blob cannot be read for it.
pub(crate) fn layer_table(
    store: &BlobStore,
    index: &Index,
    layer: &Layer,
) -> Result<Found, String> {
    if let Some(table) = stored_table(index, layer) {
        return Ok(Found { table, read: false });
    }
    let table = crate::layer::open_layer(store, &layer.descriptor.digest)
        .map_err(|e| e.to_string())
        .and_then(|r| LayerTable::read(r).map_err(|e| e.to_string()))?;
    put_table(index, layer, &table);
    Ok(Found { table, read: true })
}

/// `layer`'s table as the index holds it, if it does (in this format).
pub(crate) fn stored_table(index: &Index, layer: &Layer) -> Option<LayerTable> {
    let bytes = index.get_view(&key(layer)).ok().flatten()?;
    LayerTable::from_bytes(&bytes)
}

/// Tables are kept by the layer's diff_id.
fn key(layer: &Layer) -> String {
    layer.diff_id.to_string()
}

/// Whether the index holds `layer`'s table.
pub(crate) fn has_table(index: &Index, layer: &Layer) -> bool {
    matches!(index.get_view(&key(layer)), Ok(Some(_)))
}

/// Keeps `layer`'s table, made elsewhere (teed while the layer was
/// unpacked or written), with the index's next write.
pub(crate) fn put_table(index: &Index, layer: &Layer, table: &LayerTable) {
    index.put_view(&key(layer), &table.to_bytes());
}

/// What [`store_layer_tables`] did for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablesStored {
    /// The image's layers.
    pub layers: usize,
    /// Of those, the ones whose table was read from the blob now (the
    /// rest were in the index already).
    pub made: usize,
    pub duration: Duration,
}

/// `kiln warm`'s part of the metadata view: the table of each layer of
/// `image` (config and layers in the store) put in the index, unless it
/// is there already. A layer whose blob cannot be read for a table (the
/// build will not use the view on it either) is not an error.
pub fn store_layer_tables(
    store: &BlobStore,
    index: &Index,
    image: &ResolvedManifest,
) -> Result<TablesStored, BuildError> {
    let start = Instant::now();
    let layers = super::unpack::image_layers(store, image)?;
    let mut made = 0;
    for layer in &layers {
        match layer_table(store, index, layer) {
            Ok(found) => made += usize::from(found.read),
            Err(why) => tracing::debug!(layer = %layer.diff_id, %why, "no metadata table"),
        }
    }
    index.flush()?;
    Ok(TablesStored {
        layers: layers.len(),
        made,
        duration: start.elapsed(),
    })
}
