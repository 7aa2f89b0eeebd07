//! Layer blobs: a streaming tar writer over gzip or zstd, computing the
//! diff_id (uncompressed) and the digest (compressed) in the same pass, and
//! the matching reader that decompresses any layer.
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_cachestore::blobs::{BlobStore, BlobWriter};
use kiln_cachestore::digest::HashingWriter;
use kiln_cachestore::manifest::{self, Descriptor};

use crate::error::{BuildError, IoContext};
use crate::image::Layer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip { level: u32 },
    Zstd { level: i32 },
}

impl Compression {
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip { .. } => manifest::OCI_LAYER_GZIP,
            Compression::Zstd { .. } => manifest::OCI_LAYER_ZSTD,
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<BlobWriter>),
    Zstd(zstd::Encoder<'static, BlobWriter>),
}

impl Encoder {
    fn finish(self) -> io::Result<BlobWriter> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl Write for Encoder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

/// Writes one layer from files of a root, in the order they are added
/// (callers add parents before children, sorted).
pub struct LayerWriter {
    tar: tar::Builder<HashingWriter<Encoder>>,
    compression: Compression,
    /// First path written for each (dev, inode), so later names become links.
    hardlinks: HashMap<(u64, u64), PathBuf>,
    /// With `--reproducible`, every mtime is this.
    fixed_mtime: Option<u64>,
}

impl LayerWriter {
    pub fn new(
        store: &BlobStore,
        compression: Compression,
        fixed_mtime: Option<u64>,
    ) -> Result<Self, BuildError> {
        let blob = store.writer()?;
        let encoder = match compression {
            Compression::Gzip { level } => Encoder::Gzip(flate2::write::GzEncoder::new(
                blob,
                flate2::Compression::new(level),
            )),
            Compression::Zstd { level } => Encoder::Zstd(
                zstd::Encoder::new(blob, level).map_err(|e| BuildError::io("zstd", e))?,
            ),
        };
        let mut tar = tar::Builder::new(HashingWriter::new(encoder));
        tar.mode(tar::HeaderMode::Complete);
        Ok(Self {
            tar,
            compression,
            hardlinks: HashMap::new(),
            fixed_mtime,
        })
    }

    /// Adds the entry at `rel` (relative to `root`) as it is on disk now,
    /// never following a symlink.
    pub fn add(&mut self, root: &Path, rel: &Path) -> Result<(), BuildError> {
        let host = root.join(rel);
        let meta = std::fs::symlink_metadata(&host).at(&host)?;
        let ft = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid() as u64);
        header.set_gid(meta.gid() as u64);
        header.set_mtime(self.fixed_mtime.unwrap_or(meta.mtime().max(0) as u64));
        header.set_size(0);
        let name = tar_name(rel, ft.is_dir());

        self.append_xattrs(&host, &ft)?;
        if !ft.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.hardlinks.get(&key) {
                header.set_entry_type(tar::EntryType::Link);
                let first = first.clone();
                return self.tar.append_link(&mut header, &name, &first).at(&host);
            }
            self.hardlinks.insert(key, rel.to_path_buf());
        }
        if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(&host).at(&host)?;
            // Take exactly the size in the header, even if the file changes.
            return self
                .tar
                .append_data(&mut header, &name, file.take(meta.len()))
                .at(&host);
        }
        if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = std::fs::read_link(&host).at(&host)?;
            return self.tar.append_link(&mut header, &name, target).at(&host);
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
        self.tar
            .append_data(&mut header, &name, io::empty())
            .at(&host)
    }

    /// Adds a whiteout that deletes `rel` from lower layers.
    pub fn whiteout(&mut self, rel: &Path) -> Result<(), BuildError> {
        let name = rel
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let mut wh = std::ffi::OsString::from(".wh.");
        wh.push(name);
        let path = rel.with_file_name(wh);
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        header.set_mtime(self.fixed_mtime.unwrap_or(0));
        self.tar
            .append_data(&mut header, &path, io::empty())
            .at(&path)
    }

    /// PAX records for extended attributes, e.g. `security.capability`.
    fn append_xattrs(&mut self, host: &Path, ft: &std::fs::FileType) -> Result<(), BuildError> {
        if ft.is_symlink() {
            return Ok(());
        }
        let mut records = Vec::new();
        for (name, value) in crate::rootfs::content_xattrs(host) {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(&name);
            records.extend(pax_record(&key, &value));
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_size(records.len() as u64);
        header.set_mode(0o644);
        header.set_path("PaxHeader").at(host)?;
        header.set_cksum();
        self.tar.append(&header, records.as_slice()).at(host)
    }

    pub fn finish(self) -> Result<Layer, BuildError> {
        let hashing = self
            .tar
            .into_inner()
            .map_err(|e| BuildError::io("layer", e))?;
        let (encoder, diff_id, _) = hashing.finish();
        let blob = encoder.finish().map_err(|e| BuildError::io("layer", e))?;
        let stored = blob.commit(None)?;
        Ok(Layer {
            descriptor: Descriptor {
                media_type: self.compression.media_type().into(),
                digest: stored.digest,
                size: stored.size,
                platform: None,
                annotations: None,
            },
            diff_id,
        })
    }
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
pub fn open_layer(store: &BlobStore, digest: &str) -> Result<Box<dyn Read + Send>, BuildError> {
    let file = store.open_blob(digest)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let magic = {
        use io::BufRead;
        reader
            .fill_buf()
            .map_err(|e| BuildError::io(digest, e))?
            .to_vec()
    };
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(reader).map_err(|e| BuildError::io(digest, e))?)
    } else {
        Box::new(reader)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn writes_files_links_and_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("state")).unwrap();
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

            let mut raw = Vec::new();
            open_layer(&store, &layer.descriptor.digest)
                .unwrap()
                .read_to_end(&mut raw)
                .unwrap();
            assert_eq!(kiln_cachestore::digest::sha256_digest(&raw), layer.diff_id);
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
}
