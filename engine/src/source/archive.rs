//! Archives, as ADD and a `tar://` context take them: recognised by
//! content, never by name (as moby's `DecompressStream` +
//! `tar.Reader.Next`): plain tar, gzip, bzip2, xz or zstd whose
//! decompressed stream starts with a valid tar header. An archive is
//! extracted with the layer extractor, with the destination directory as
//! its root, so nothing in it (`..`, absolute links) can reach outside the
//! destination; ownership comes from the archive unless `--chown`.
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::rootfs::extract::{self, ExtractError};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("extracting {}: {source}", path.display())]
    Extract {
        path: PathBuf,
        #[source]
        source: ExtractError,
    },
}

/// How an archive's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    /// By magic bytes, as moby's `DetectCompression`.
    fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b, 0x08]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// The decompressed stream of `file`.
fn decompress(file: fs::File, compression: Compression) -> io::Result<Box<dyn Read>> {
    let file = io::BufReader::new(file);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(file)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(file, true)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

/// The compression of `path` when it is a tar archive, `None` when it is
/// any other file (which ADD then copies as is).
pub fn detect(path: &Path) -> io::Result<Option<Compression>> {
    let mut file = fs::File::open(path)?;
    let mut head = [0u8; 6];
    let n = read_full(&mut file, &mut head)?;
    let compression = Compression::sniff(&head[..n]);
    let Ok(stream) = decompress(fs::File::open(path)?, compression) else {
        return Ok(None);
    };
    // A valid first header makes an archive; an empty or corrupt one does
    // not (an error reading it is just "not an archive").
    let mut archive = tar::Archive::new(stream);
    let first = archive.entries().ok().and_then(|mut e| e.next());
    Ok(matches!(first, Some(Ok(_))).then_some(compression))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

/// Extracts the archive at `path` into the directory `host_dir` (already
/// inside the build root), which acts as the extraction's root. With
/// `chown`, every extracted entry gets that owner.
pub fn extract(
    path: &Path,
    compression: Compression,
    host_dir: &Path,
    chown: Option<(u32, u32)>,
) -> Result<(), ArchiveError> {
    let archive = fs::File::open(path)
        .and_then(|f| decompress(f, compression))
        .map_err(|source| ArchiveError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    extract::extract_archive(host_dir, archive, chown).map_err(|source| ArchiveError::Extract {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A tar with a directory, a file (owned by 1000:1000) and symlinks
    /// that point out of any root.
    pub(crate) fn tar_bytes() -> Vec<u8> {
        let header = |kind: tar::EntryType, mode: u32, owner: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(owner);
            h.set_gid(owner);
            h.set_mtime(0);
            h.set_size(0);
            h
        };
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = header(tar::EntryType::Directory, 0o750, 0);
        b.append_data(&mut dir, "d/", io::empty()).unwrap();
        let mut file = header(tar::EntryType::Regular, 0o640, 1000);
        file.set_size(5);
        b.append_data(&mut file, "d/f", &b"hello"[..]).unwrap();
        // An archive is no layer: this is a file, not a whiteout of d/f.
        let mut wh = header(tar::EntryType::Regular, 0o644, 0);
        b.append_data(&mut wh, "d/.wh.f", io::empty()).unwrap();
        let mut aufs = header(tar::EntryType::Regular, 0o644, 0);
        b.append_data(&mut aufs, ".wh..wh.aufs", io::empty())
            .unwrap();
        let mut suid = header(tar::EntryType::Regular, 0o4755, 1000);
        b.append_data(&mut suid, "d/suid", io::empty()).unwrap();
        let mut link = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut link, "up", "../../../..").unwrap();
        // Written through a link to `/`: must land inside the destination.
        let mut slash = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut slash, "esc", "/").unwrap();
        let mut evil = header(tar::EntryType::Regular, 0o644, 0);
        evil.set_size(4);
        b.append_data(&mut evil, "esc/evil", &b"evil"[..]).unwrap();
        b.into_inner().unwrap()
    }

    pub(crate) const XZ_TREE: &[u8] =
        include_bytes!("../../../fixtures/differential/add-archives/tree.tar.xz");

    pub(crate) fn compressed(kind: Compression, data: &[u8]) -> Vec<u8> {
        match kind {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            // No xz encoder in the build: the fixture's archive stands in.
            Compression::Xz => XZ_TREE.to_vec(),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }
    #[test]
    fn archives_are_detected_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [
            Compression::None,
            Compression::Gzip,
            Compression::Bzip2,
            Compression::Xz,
            Compression::Zstd,
        ] {
            let path = dir.path().join(format!("{kind:?}.bin"));
            fs::write(&path, compressed(kind, &tar_bytes())).unwrap();
            assert_eq!(detect(&path).unwrap(), Some(kind), "{kind:?}");
            if kind == Compression::Xz {
                continue;
            }
            // Compressed text is not an archive: it is copied as is.
            let text = dir.path().join(format!("{kind:?}.tar.gz"));
            fs::write(&text, compressed(kind, b"just some text, not a tar")).unwrap();
            assert_eq!(detect(&text).unwrap(), None, "{kind:?} text");
        }
        let empty = dir.path().join("empty.tar");
        fs::write(&empty, []).unwrap();
        assert_eq!(detect(&empty).unwrap(), None);
        let zeros = dir.path().join("zeros.tar");
        fs::write(&zeros, [0u8; 1024]).unwrap();
        assert_eq!(detect(&zeros).unwrap(), None);
    }
}
