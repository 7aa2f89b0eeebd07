//! Layer blobs: a streaming tar writer over gzip or zstd (compressed in
//! parallel blocks, `compress.rs`), computing the diff_id (uncompressed) and
//! the digest (compressed) in the same pass, and the matching reader that
//! decompresses any layer.
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_cachestore::blobs::{BlobStore, BlobWriter};
use kiln_cachestore::digest::{Digest, HashingWriter};
use kiln_cachestore::manifest::{Descriptor, MediaType};

use crate::error::{BuildError, IoContext};
use crate::image::Layer;
use crate::rootfs::meta_view::LayerTable;
use crate::rootfs::owners;
use crate::rootfs::table_tee::TableTee;

pub mod compress;
use compress::ParallelEncoder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip { level: u32 },
    Zstd { level: i32 },
}

impl Compression {
    pub fn media_type(self) -> MediaType {
        match self {
            Compression::Gzip { .. } => MediaType::ImageLayerGzip,
            Compression::Zstd { .. } => MediaType::ImageLayerZstd,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

/// Where the tar goes: compressed into a blob, or (`None`) only measured
/// (a lazy layer, whose blob is made later from the same files); and, when
/// asked, to the layer's metadata table too.
struct Out {
    blob: Option<Box<ParallelEncoder<BlobWriter>>>,
    table: Option<TableTee>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.blob {
            Some(e) => e.write(buf)?,
            None => buf.len(),
        };
        if let Some(table) = &mut self.table {
            table.feed(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.blob {
            Some(e) => e.flush(),
            None => Ok(()),
        }
    }
}

/// Writes one layer from files of a root, in the order they are added
/// (callers add parents before children, sorted).
pub struct LayerWriter {
    tar: tar::Builder<HashingWriter<Out>>,
    compression: Compression,
    /// First path written for each (dev, inode), so later names become links.
    hardlinks: HashMap<(u64, u64), PathBuf>,
    /// With `--reproducible`, every mtime is this.
    fixed_mtime: Option<u64>,
    /// Not root: the owner and mode the build meant are recorded, not
    /// applied (`rootfs/owners.rs`). Taken once, not per entry.
    recorded: bool,
}

impl LayerWriter {
    pub fn new(
        store: &BlobStore,
        compression: Compression,
        fixed_mtime: Option<u64>,
    ) -> Result<Self, BuildError> {
        let encoder = ParallelEncoder::new(store.writer()?, compression, compress::threads());
        Ok(Self::with(
            Some(Box::new(encoder)),
            compression,
            fixed_mtime,
        ))
    }

    /// Makes the layer's metadata table from the tar as it is written
    /// (see [`Self::finish_with_table`]), on a thread of its own.
    pub fn with_table(mut self) -> Result<Self, BuildError> {
        let tee = TableTee::start().map_err(|e| BuildError::io("layer table", e))?;
        self.tar.get_mut().get_mut().table = Some(tee);
        Ok(self)
    }

    /// A writer that stores nothing: [`LayerWriter::finish`] gives the
    /// layer as its uncompressed tar would be (digest and diff_id alike),
    /// at the cost of tar and sha256 alone.
    pub fn measure(fixed_mtime: Option<u64>) -> Self {
        Self::with(None, Compression::default(), fixed_mtime)
    }

    fn with(
        blob: Option<Box<ParallelEncoder<BlobWriter>>>,
        compression: Compression,
        fixed_mtime: Option<u64>,
    ) -> Self {
        let out = Out { blob, table: None };
        let mut tar = tar::Builder::new(HashingWriter::new(out));
        tar.mode(tar::HeaderMode::Complete);
        Self {
            tar,
            compression,
            hardlinks: HashMap::new(),
            fixed_mtime,
            recorded: owners::recorded(),
        }
    }

    /// Adds the entry at `rel` (relative to `root`) as it is on disk now,
    /// never following a symlink.
    pub fn add(&mut self, root: &Path, rel: &Path) -> Result<(), BuildError> {
        let host = root.join(rel);
        let meta = std::fs::symlink_metadata(&host).at(&host)?;
        let ft = meta.file_type();
        let mut header = tar::Header::new_ustar();
        let recorded = self.recorded;
        let (uid, gid, mode) = match recorded {
            false => (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            true => {
                let stat = owners::get(&host, &meta);
                (stat.uid, stat.gid, stat.mode)
            }
        };
        header.set_mode(mode);
        header.set_mtime(self.fixed_mtime.unwrap_or(meta.mtime().max(0) as u64));
        header.set_size(0);
        let entry = Entry {
            name: tar_name(rel, ft.is_dir()),
            link: None,
            ids: (uid as u64, gid as u64),
            records: xattr_records(&host, &ft, recorded),
        };

        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.hardlinks.get(&key) {
                header.set_entry_type(tar::EntryType::Link);
                let link = Some(first.clone());
                return self.append(header, Entry { link, ..entry }, io::empty(), &host);
            }
            self.hardlinks.insert(key, rel.to_path_buf());
        }
        if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(&host).at(&host)?;
            // Take exactly the size in the header, even if the file changes.
            return self.append(header, entry, file.take(meta.len()), &host);
        }
        if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let link = Some(std::fs::read_link(&host).at(&host)?);
            return self.append(header, Entry { link, ..entry }, io::empty(), &host);
        }
        let entry_type = if ft.is_dir() {
            tar::EntryType::Directory
        } else if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else if ft.is_fifo() {
            tar::EntryType::Fifo
        } else {
            // Sockets cannot be archived; Docker skips them too.
            return Ok(());
        };
        header.set_entry_type(entry_type);
        if ft.is_char_device() || ft.is_block_device() {
            let rdev = meta.rdev();
            header.set_device_major(rustix::fs::major(rdev)).at(&host)?;
            header.set_device_minor(rustix::fs::minor(rdev)).at(&host)?;
        }
        self.append(header, entry, io::empty(), &host)
    }

    /// Adds a whiteout that deletes `rel` from lower layers.
    pub fn whiteout(&mut self, rel: &Path) -> Result<(), BuildError> {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_mtime(self.fixed_mtime.unwrap_or(0));
        let entry = Entry {
            name: whiteout_name(rel),
            link: None,
            ids: (0, 0),
            records: Vec::new(),
        };
        self.append(header, entry, io::empty(), rel)
    }

    /// Writes `header` for `entry`: names, link targets and ids in the
    /// ustar fields where they fit, else in a PAX header before it (as Go's
    /// archive/tar does), with the entry's other records (xattrs).
    fn append(
        &mut self,
        mut header: tar::Header,
        entry: Entry,
        data: impl Read,
        at: &Path,
    ) -> Result<(), BuildError> {
        let mut records = entry.records;
        let ustar = header.as_ustar_mut().expect("a ustar header");
        for (key, value, field) in [
            ("path", Some(entry.name.as_os_str()), &mut ustar.name),
            (
                "linkpath",
                entry.link.as_ref().map(|l| l.as_os_str()),
                &mut ustar.linkname,
            ),
        ] {
            let Some(bytes) = value.map(|v| v.as_bytes()) else {
                continue;
            };
            if bytes.len() > field.len() {
                records.extend(pax_record(key.as_bytes(), bytes));
            }
            let n = bytes.len().min(field.len());
            field[..n].copy_from_slice(&bytes[..n]);
        }
        // The largest id an octal ustar field holds.
        const MAX_ID: u64 = 0o7777777;
        // A larger one goes in a PAX record, the ustar field left 0.
        let mut fit = |key: &str, id: u64| match id > MAX_ID {
            true => {
                records.extend(pax_record(key.as_bytes(), id.to_string().as_bytes()));
                0
            }
            false => id,
        };
        let (uid, gid) = entry.ids;
        header.set_uid(fit("uid", uid));
        header.set_gid(fit("gid", gid));
        if !records.is_empty() {
            let mut pax = tar::Header::new_ustar();
            pax.set_entry_type(tar::EntryType::XHeader);
            pax.set_size(records.len() as u64);
            pax.set_mode(0o644);
            pax.set_path("PaxHeader").at(at)?;
            pax.set_cksum();
            self.tar.append(&pax, records.as_slice()).at(at)?;
        }
        header.set_cksum();
        self.tar.append(&header, data).at(at)
    }

    pub fn finish(self) -> Result<Layer, BuildError> {
        self.finish_with_table().map(|(layer, _)| layer)
    }

    /// [`Self::finish`], with the layer's table when [`Self::with_table`]
    /// asked for it (`None` also when the view cannot serve the layer).
    pub fn finish_with_table(self) -> Result<(Layer, Option<LayerTable>), BuildError> {
        let hashing = self
            .tar
            .into_inner()
            .map_err(|e| BuildError::io("layer", e))?;
        let (out, diff_id, size) = hashing.finish();
        let table = out.table.and_then(TableTee::finish);
        let descriptor = match out.blob {
            None => Descriptor::new(MediaType::ImageLayer, diff_id.clone(), size),
            Some(encoder) => {
                let blob = encoder.finish().map_err(|e| BuildError::io("layer", e))?;
                let stored = blob.commit(None)?;
                Descriptor::new(self.compression.media_type(), stored.digest, stored.size)
            }
        };
        let layer = Layer {
            descriptor,
            diff_id,
        };
        Ok((layer, table))
    }
}

/// One entry's name, link target, ids and PAX records, for [`LayerWriter::append`].
struct Entry {
    name: PathBuf,
    link: Option<PathBuf>,
    ids: (u64, u64),
    records: Vec<u8>,
}

/// PAX records for a path's extended attributes, e.g. `security.capability`.
/// `recorded`: owners are recorded in an xattr, which is not content.
fn xattr_records(host: &Path, ft: &std::fs::FileType, recorded: bool) -> Vec<u8> {
    let mut records = Vec::new();
    if ft.is_symlink() {
        return records;
    }
    for (name, value) in crate::rootfs::content_xattrs(host) {
        if recorded && owners::is_override(&name) {
            continue;
        }
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(&name);
        records.extend(pax_record(&key, &value));
    }
    records
}

/// `dir/.wh.name`: the whiteout of `dir/name`.
pub(crate) fn whiteout_name(rel: &Path) -> PathBuf {
    let mut wh = std::ffi::OsString::from(".wh.");
    wh.push(rel.file_name().unwrap_or_default());
    rel.with_file_name(wh)
}

/// Directories carry a trailing slash, as Docker and Go's archive/tar write.
fn tar_name(rel: &Path, is_dir: bool) -> PathBuf {
    if is_dir {
        let mut s = rel.as_os_str().to_os_string();
        s.push("/");
        PathBuf::from(s)
    } else {
        rel.to_path_buf()
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, where len counts itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Opens a stored layer for reading, decompressing by its magic bytes (media
/// types in the wild do not always say the truth).
pub fn open_layer(store: &BlobStore, digest: &Digest) -> Result<Box<dyn Read + Send>, BuildError> {
    let file = store.open_blob(digest)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let magic = {
        use io::BufRead;
        reader
            .fill_buf()
            .map_err(|e| BuildError::io(digest.to_string(), e))?
            .to_vec()
    };
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::Decoder::with_buffer(reader)
                .map_err(|e| BuildError::io(digest.to_string(), e))?,
        )
    } else {
        Box::new(reader)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_cachestore::StateDir;

    /// A written layer's tar, uncompressed.
    fn uncompressed(store: &BlobStore, layer: &Layer) -> Vec<u8> {
        let mut raw = Vec::new();
        open_layer(store, &layer.descriptor.digest)
            .unwrap()
            .read_to_end(&mut raw)
            .unwrap();
        raw
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record(b"SCHILY.xattr.user.a", b"b");
        let s = String::from_utf8(r.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
        let long = pax_record(&[b'k'; 95], b"");
        let s = String::from_utf8(long.clone()).unwrap();
        assert_eq!(
            s.split_once(' ').unwrap().0.parse::<usize>().unwrap(),
            long.len()
        );
    }

    /// The table made while the layer is written is the one a read of its
    /// blob gives, across the table thread's chunks (a large file).
    #[test]
    fn a_table_made_while_writing_is_the_one_the_blob_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/big"), vec![7u8; 600 << 10]).unwrap();
        std::fs::write(root.join("d/f"), b"hello").unwrap();
        std::fs::hard_link(root.join("d/f"), root.join("d/g")).unwrap();
        std::os::unix::fs::symlink("f", root.join("d/l")).unwrap();
        let mut w = LayerWriter::new(&store, Compression::default(), Some(0))
            .unwrap()
            .with_table()
            .unwrap();
        for p in ["d", "d/big", "d/f", "d/g", "d/l"] {
            w.add(&root, Path::new(p)).unwrap();
        }
        w.whiteout(Path::new("d/gone")).unwrap();
        let (layer, table) = w.finish_with_table().unwrap();
        let read = LayerTable::read(uncompressed(&store, &layer).as_slice()).unwrap();
        assert!(table.expect("a table").to_bytes() == read.to_bytes());
        // Without asking, none.
        let w = LayerWriter::new(&store, Compression::default(), Some(0)).unwrap();
        assert!(w.finish_with_table().unwrap().1.is_none());
    }

    #[test]
    fn writes_files_links_and_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"hello").unwrap();
        std::fs::hard_link(root.join("d/f"), root.join("d/g")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("d/l")).unwrap();
        for compression in [
            Compression::Gzip { level: 1 },
            Compression::Zstd { level: 1 },
        ] {
            let mut w = LayerWriter::new(&store, compression, Some(0)).unwrap();
            for p in ["d", "d/f", "d/g", "d/l"] {
                w.add(&root, Path::new(p)).unwrap();
            }
            w.whiteout(Path::new("d/gone")).unwrap();
            let layer = w.finish().unwrap();
            assert_eq!(layer.descriptor.media_type, compression.media_type());

            let raw = uncompressed(&store, &layer);
            assert_eq!(kiln_cachestore::digest::sha256(&raw), layer.diff_id);
            let mut archive = tar::Archive::new(raw.as_slice());
            let entries: Vec<(String, tar::EntryType)> = archive
                .entries()
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.path().unwrap().display().to_string(),
                        e.header().entry_type(),
                    )
                })
                .collect();
            assert_eq!(
                entries,
                [
                    ("d/".to_string(), tar::EntryType::Directory),
                    ("d/f".into(), tar::EntryType::Regular),
                    ("d/g".into(), tar::EntryType::Link),
                    ("d/l".into(), tar::EntryType::Symlink),
                    ("d/.wh.gone".into(), tar::EntryType::Regular),
                ]
            );
        }
    }

    #[test]
    fn a_measured_layer_is_the_uncompressed_tar_of_the_written_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), vec![7u8; 100_000]).unwrap();
        let write = |mut w: LayerWriter| {
            w.add(&root, Path::new("d")).unwrap();
            w.add(&root, Path::new("d/f")).unwrap();
            w.whiteout(Path::new("d/gone")).unwrap();
            w.finish().unwrap()
        };
        let measured = write(LayerWriter::measure(None));
        assert!(!store.contains(&measured.descriptor.digest).unwrap());
        let written = write(LayerWriter::new(&store, Compression::default(), None).unwrap());
        let raw = uncompressed(&store, &written);
        assert_eq!(measured.diff_id, written.diff_id);
        assert_eq!(measured.descriptor.digest, written.diff_id);
        assert_eq!(measured.descriptor.size, raw.len() as u64);
        assert_eq!(measured.descriptor.media_type, MediaType::ImageLayer);
    }

    #[test]
    fn long_names_links_and_large_ids_go_into_pax_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let root = dir.path().join("root");
        let long_dir = format!("{}/{}", "a".repeat(120), "b".repeat(120));
        std::fs::create_dir_all(root.join(&long_dir)).unwrap();
        let long_file = format!("{long_dir}/file");
        std::fs::write(root.join(&long_file), b"x").unwrap();
        std::os::unix::fs::chown(root.join(&long_file), Some(3_000_000), Some(4_000_000)).unwrap();
        let long_target = format!("/{}", "t".repeat(150));
        std::os::unix::fs::symlink(&long_target, root.join("link")).unwrap();
        let mut w = LayerWriter::new(&store, Compression::Gzip { level: 1 }, Some(0)).unwrap();
        for p in [&long_file, "link"] {
            w.add(&root, Path::new(p)).unwrap();
        }
        let layer = w.finish().unwrap();
        let raw = uncompressed(&store, &layer);
        // Raw: PAX headers and ustar entries, no GNU long-name members.
        let kinds: Vec<tar::EntryType> = tar::Archive::new(raw.as_slice())
            .entries()
            .unwrap()
            .raw(true)
            .map(|e| e.unwrap().header().entry_type())
            .collect();
        use tar::EntryType::{Regular, Symlink, XHeader};
        assert_eq!(kinds, [XHeader, Regular, XHeader, Symlink]);
        let mut archive = tar::Archive::new(raw.as_slice());
        let read: Vec<(String, Option<String>, u64, u64)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let (mut uid, mut gid) = (e.header().uid().unwrap(), e.header().gid().unwrap());
                for ext in e.pax_extensions().unwrap().into_iter().flatten() {
                    let ext = ext.unwrap();
                    match ext.key().unwrap() {
                        "uid" => uid = ext.value().unwrap().parse().unwrap(),
                        "gid" => gid = ext.value().unwrap().parse().unwrap(),
                        _ => {}
                    }
                }
                let link = e.link_name().unwrap().map(|l| l.display().to_string());
                (e.path().unwrap().display().to_string(), link, uid, gid)
            })
            .collect();
        assert_eq!(
            read,
            [
                (long_file.clone(), None, 3_000_000, 4_000_000),
                ("link".into(), Some(long_target), 0, 0),
            ]
        );
    }

    /// A tar entry: type, name, link, mode, owner.
    fn entry(
        tar: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        mode: u32,
        (uid, gid): (u64, u64),
    ) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_path(name).unwrap();
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(0);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        tar.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn not_root_owners_and_modes_go_from_the_layer_through_disk_into_the_next_layer() {
        use std::os::unix::fs::PermissionsExt;
        use tar::EntryType::{Char, Directory, Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StateDir::open(dir.path().join("state")).unwrap()).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut base = tar::Builder::new(Vec::new());
        entry(&mut base, Directory, "ro", "", 0o555, (0, 0));
        entry(&mut base, Regular, "ro/f", "", 0o4750, (1234, 2345));
        entry(&mut base, Char, "null", "", 0o666, (0, 0));
        entry(&mut base, Symlink, "l", "ro/f", 0o777, (7, 7));
        let base = base.into_inner().unwrap();
        owners::tests::as_unprivileged(|| {
            crate::rootfs::extract::extract_layer(&root, base.as_slice()).unwrap();
            // The process keeps what it needs on disk; the rest is recorded.
            let mode = |p: &str| {
                std::fs::symlink_metadata(root.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!((mode("ro"), mode("ro/f")), (0o755, 0o750));
            // A device node needs root: skipped, as base layers are never
            // written again.
            assert!(!root.join("null").exists());
            // Written into the read-only (in the image) directory later.
            std::fs::write(root.join("ro/new"), "x").unwrap();
            std::fs::set_permissions(root.join("ro/new"), std::fs::Permissions::from_mode(0o644))
                .unwrap();

            let mut w = LayerWriter::new(&store, Compression::Gzip { level: 1 }, Some(0)).unwrap();
            for p in ["ro", "ro/f", "ro/new", "l"] {
                w.add(&root, Path::new(p)).unwrap();
            }
            let layer = w.finish().unwrap();
            let raw = uncompressed(&store, &layer);
            let read: Vec<(String, u64, u64, u32, bool)> = tar::Archive::new(raw.as_slice())
                .entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let h = e.header().clone();
                    let xattr = e
                        .pax_extensions()
                        .unwrap()
                        .into_iter()
                        .flatten()
                        .any(|x| x.unwrap().key().unwrap().contains("override_stat"));
                    (
                        e.path().unwrap().display().to_string(),
                        h.uid().unwrap(),
                        h.gid().unwrap(),
                        h.mode().unwrap(),
                        xattr,
                    )
                })
                .collect();
            assert_eq!(
                read,
                [
                    ("ro/".to_string(), 0, 0, 0o555, false),
                    ("ro/f".into(), 1234, 2345, 0o4750, false),
                    // Nothing recorded: 0:0 with the mode on disk.
                    ("ro/new".into(), 0, 0, 0o644, false),
                    // A symlink cannot carry the record: 0:0.
                    ("l".into(), 0, 0, 0o777, false),
                ]
            );
        });
    }
}
