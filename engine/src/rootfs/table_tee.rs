//! A layer's metadata table made from its uncompressed tar as the tar
//! streams past for another reason (being unpacked, or written by a
//! step built on the view), on a thread of its own: the table then costs
//! no second read of the layer's blob, and the stream's owner waits for
//! nothing but the final join.
//! The table is [`LayerTable::read`] of exactly the bytes fed, so it is
//! the table a later read of the blob would give.
use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::meta_view::LayerTable;

/// Bytes gathered before they cross to the table's thread: the tar
/// stream is read in pieces as small as a 512-byte header.
const CHUNK: usize = 256 << 10;
/// Chunks in flight: bounds the memory a slow table thread holds.
const IN_FLIGHT: usize = 8;

pub struct TableTee {
    /// `None` once the table's thread has stopped reading (it has seen
    /// the end of the archive, or a record the view cannot serve).
    chunks: Option<SyncSender<Vec<u8>>>,
    gathered: Vec<u8>,
    reader: JoinHandle<Option<LayerTable>>,
}

impl TableTee {
    pub fn start() -> io::Result<TableTee> {
        let (chunks, received) = sync_channel(IN_FLIGHT);
        let reader = std::thread::Builder::new()
            .name("layer-table".into())
            .spawn(move || {
                let stream = Chunks {
                    received,
                    chunk: Vec::new(),
                    at: 0,
                };
                LayerTable::read(stream).ok()
            })?;
        Ok(TableTee {
            chunks: Some(chunks),
            gathered: Vec::with_capacity(CHUNK),
            reader,
        })
    }

    /// The next bytes of the tar.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.chunks.is_none() {
            return;
        }
        self.gathered.extend_from_slice(bytes);
        if self.gathered.len() >= CHUNK {
            self.send();
        }
    }

    fn send(&mut self) {
        let chunk = std::mem::replace(&mut self.gathered, Vec::with_capacity(CHUNK));
        if let Some(chunks) = &self.chunks {
            if chunks.send(chunk).is_err() {
                self.chunks = None;
            }
        }
    }

    /// The table of the bytes fed, once they were the whole tar; `None`
    /// when the view cannot serve the layer (or the tar was cut short).
    pub fn finish(mut self) -> Option<LayerTable> {
        if !self.gathered.is_empty() {
            self.send();
        }
        drop(self.chunks.take());
        self.reader.join().ok().flatten()
    }
}

/// The table thread's side: the chunks as one stream, ended when the
/// feeding side finishes.
struct Chunks {
    received: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.received.recv() {
                Ok(chunk) => (self.chunk, self.at) = (chunk, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A reader that feeds what it reads to a [`TableTee`].
pub struct TeeReader<R> {
    pub inner: R,
    pub tee: Option<TableTee>,
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(tee) = &mut self.tee {
            tee.feed(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn the_teed_table_is_the_table_of_the_stream_read_in_any_pieces() {
        let big = vec![7u8; 3 * CHUNK + 5];
        let bytes = tar(&[
            ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
            ("big", &big),
            ("usr/.wh.gone", b""),
        ]);
        let direct = LayerTable::read(&bytes[..]).unwrap().to_bytes();
        for piece in [1, 512, 4096, CHUNK + 1] {
            let mut reader = TeeReader {
                inner: &bytes[..],
                tee: Some(TableTee::start().unwrap()),
            };
            let mut buf = vec![0; piece];
            while reader.read(&mut buf).unwrap() > 0 {}
            let teed = reader.tee.take().unwrap().finish().unwrap();
            assert_eq!(teed.to_bytes(), direct, "read {piece} bytes at a time");
        }
    }

    #[test]
    fn a_cut_tar_gives_no_table() {
        let bytes = tar(&[("a", &[1u8; 2000])]);
        assert!(LayerTable::read(&bytes[..]).is_ok());
        let mut tee = TableTee::start().unwrap();
        tee.feed(&bytes[..700]);
        assert!(tee.finish().is_none());
    }
}
