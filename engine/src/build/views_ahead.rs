//! Metadata views of later stages' bases, made on another thread while
//! the stage before them runs. A multi-stage build's final stage (`FROM
//! <base>` + `COPY --from=build …`) is built on the view of its base, and
//! decoding a distribution base's table and merging it into a view takes
//! milliseconds that a build stage's RUN, waiting on its process, leaves
//! a core free for.
//!
//! Only tables the index holds are used: a view that would read a layer
//! blob is made by the stage itself, in its turn, as without this.
use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::JoinHandle;

use kiln_cachestore::digest::Digest;
use kiln_cachestore::Index;

use super::tables::stored_table;
use crate::image::Layer;
use crate::rootfs::meta_view::MetaView;

/// Views under way or made, by the diff_ids of the layers they merge.
#[derive(Default)]
pub(super) struct ViewsAhead {
    made: Mutex<HashMap<Vec<Digest>, JoinHandle<Option<MetaView>>>>,
}

fn key(layers: &[Layer]) -> Vec<Digest> {
    layers.iter().map(|l| l.diff_id.clone()).collect()
}

impl ViewsAhead {
    /// Starts making the view of `layers`, unless it is under way.
    pub(super) fn start(&self, index: &Index, layers: Vec<Layer>) {
        let mut made = self.made.lock().expect("views ahead poisoned");
        let key = key(&layers);
        if layers.is_empty() || made.contains_key(&key) {
            return;
        }
        let index = index.clone();
        let making = std::thread::Builder::new()
            .name("kiln-view-ahead".into())
            .spawn(move || {
                let mut view = MetaView::default();
                for layer in &layers {
                    view.push(stored_table(&index, layer)?);
                }
                Some(view)
            });
        match making {
            Ok(handle) => {
                made.insert(key, handle);
            }
            // Only the head start is lost: the stage makes its own.
            Err(e) => tracing::debug!(error = %e, "no thread for a view made ahead"),
        }
    }

    /// The view of `layers` made ahead (waiting for it if under way);
    /// `None` when none was started or it could not be made from the
    /// index alone.
    pub(super) fn take(&self, layers: &[Layer]) -> Option<MetaView> {
        let handle = self
            .made
            .lock()
            .expect("views ahead poisoned")
            .remove(&key(layers))?;
        handle.join().ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use kiln_cachestore::digest::sha256;
    use kiln_cachestore::manifest::MediaType;
    use kiln_cachestore::{Descriptor, StateDir};

    use super::*;
    use crate::build::tables::put_table;
    use crate::rootfs::meta_view::LayerTable;

    /// A layer (named by `name`) whose tar holds `dirs`, and its table.
    fn layer(name: &str, dirs: &[&str]) -> (Layer, LayerTable) {
        let mut tar = tar::Builder::new(Vec::new());
        for dir in dirs {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            tar.append_data(&mut header, dir, std::io::empty()).unwrap();
        }
        let table = LayerTable::read(&tar.into_inner().unwrap()[..]).unwrap();
        let digest = sha256(name.as_bytes());
        let descriptor = Descriptor::new(MediaType::ImageLayerGzip, digest.clone(), 1);
        let layer = Layer {
            descriptor,
            diff_id: digest,
        };
        (layer, table)
    }

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&StateDir::open(dir.path()).unwrap()).unwrap();
        (dir, index)
    }

    #[test]
    fn a_view_made_ahead_is_the_view_of_the_tables_in_the_index() {
        let (_dir, index) = index();
        let (base, base_table) = layer("base", &["usr/", "usr/local/"]);
        let (top, top_table) = layer("top", &["usr/local/bin/", "app/"]);
        put_table(&index, &base, &base_table);
        put_table(&index, &top, &top_table);
        let layers = vec![base, top];
        let ahead = ViewsAhead::default();
        ahead.start(&index, layers.clone());
        let made = ahead.take(&layers).expect("made ahead");
        let mut expected = MetaView::default();
        expected.push(base_table);
        expected.push(top_table);
        assert_eq!(format!("{made:?}"), format!("{expected:?}"));
        // Taken once: the stage that takes it changes it.
        assert!(ahead.take(&layers).is_none());
    }

    #[test]
    fn no_view_is_made_ahead_of_a_table_the_index_lacks() {
        let (_dir, index) = index();
        let (base, base_table) = layer("base", &["usr/"]);
        let (top, _) = layer("top", &["app/"]);
        put_table(&index, &base, &base_table);
        let ahead = ViewsAhead::default();
        ahead.start(&index, vec![base.clone(), top.clone()]);
        assert!(ahead.take(&[base.clone(), top]).is_none());
        // Nor of layers it was not asked for.
        ahead.start(&index, vec![base.clone()]);
        let (other, _) = layer("other", &["x/"]);
        assert!(ahead.take(&[base, other]).is_none());
    }
}
