//! Parallel layer compression. The uncompressed stream is cut into blocks of
//! a fixed size; each block is compressed on its own on a shared pool and
//! written in order. The bytes depend only on the input, the format and the
//! level, never on the thread count or the machine, so `--reproducible`
//! digests hold on a laptop and on a 64-core runner alike.
//!
//! - gzip: one gzip member, as pigz writes it. Each block is a raw deflate
//!   stream ended by a sync flush (the last one by a final block), so the
//!   streams concatenate into one; the CRC32s are combined. Each block's
//!   compressor is primed with the 32 KiB before it (deflate's window),
//!   which the reader has just written out, so a block boundary costs no
//!   matches and the blocks can be small: a layer of a few MiB is spread
//!   over every core too.
//! - zstd: one frame per block. Concatenated frames are one valid stream
//!   (RFC 8878 §3.1); `zstd -d`, Go's klauspost/compress (containerd) and
//!   [`super::open_layer`] read them. zstd's own multithreaded mode would
//!   need the `zstdmt` feature of zstd-sys, which RocksDB links too, so
//!   turning it on rebuilds RocksDB's C++.
//!
//! Memory is bounded: at most `2 × threads` blocks are in flight.
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use flate2::{Compress, Crc, FlushCompress, Status};

use super::Compression;

/// Uncompressed bytes per gzip block, as pigz's: with the window primed, a
/// boundary costs a flush marker and a new block header (tens of bytes),
/// while smaller blocks split smaller layers over the cores.
pub const GZIP_BLOCK: usize = 128 << 10;
/// Deflate's window: how far back a match reaches.
const WINDOW: usize = 32 << 10;
/// Uncompressed bytes per zstd frame. zstd's window at the default level 3
/// is larger than deflate's, so its frames are larger too.
pub const ZSTD_BLOCK: usize = 4 << 20;

/// 0: not set, use every core.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets how many threads compress layers in this process (`--compression-threads`):
/// one compresses on the thread that writes the layer, more on a pool.
/// The output does not change with it.
pub fn set_threads(threads: usize) {
    THREADS.store(threads, Ordering::Relaxed);
}

/// The compression threads: as set, else one per core.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// One pool per thread count, shared by every layer being written, so
/// layers compressed at once share the cores instead of multiplying threads.
/// Its workers only compress and never wait, so a writer blocking on its
/// results cannot starve it.
fn shared_pool(threads: usize) -> io::Result<Arc<rayon::ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(pool.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-compress-{i}"))
        .build()
        .map_err(io::Error::other)?;
    let pool = Arc::new(pool);
    pools.insert(threads, pool.clone());
    Ok(pool)
}

/// One compressed block, and for gzip the CRC32 of its input.
struct Block {
    bytes: Vec<u8>,
    crc: Crc,
}

/// A `Write` that compresses what it is given in parallel blocks into
/// `inner`. [`ParallelEncoder::finish`] writes the last block and the trailer.
pub struct ParallelEncoder<W: Write> {
    inner: W,
    compression: Compression,
    threads: usize,
    block_size: usize,
    /// The block being filled.
    block: Vec<u8>,
    /// Blocks handed to the pool, oldest first.
    pending: VecDeque<mpsc::Receiver<io::Result<Block>>>,
    pool: Option<Arc<rayon::ThreadPool>>,
    /// gzip: the CRC32 and length of everything written out so far.
    crc: Crc,
    /// gzip: the last [`WINDOW`] bytes handed over, which prime the next
    /// block's compressor.
    window: Arc<[u8]>,
    started: bool,
}

impl<W: Write> ParallelEncoder<W> {
    pub fn new(inner: W, compression: Compression, threads: usize) -> Self {
        let block_size = match compression {
            Compression::Gzip { .. } => GZIP_BLOCK,
            Compression::Zstd { .. } => ZSTD_BLOCK,
        };
        Self {
            inner,
            compression,
            threads: threads.max(1),
            block_size,
            block: Vec::new(),
            pending: VecDeque::new(),
            pool: None,
            crc: Crc::new(),
            window: Arc::from([]),
            started: false,
        }
    }

    /// Hands the full block to the pool, then writes out whatever is done,
    /// waiting while too many blocks are in flight.
    fn submit(&mut self) -> io::Result<()> {
        let mut data = std::mem::take(&mut self.block);
        let window = self.next_window(&data);
        // One thread is this one: a pool thread would make it two, the
        // writer's work (tar, hashing) beside the compression.
        if self.threads == 1 {
            let block = compress_block(self.compression, &window, &data, false)?;
            data.clear();
            self.block = data;
            return self.emit(block);
        }
        let pool = match self.pool.take() {
            Some(pool) => pool,
            None => shared_pool(self.threads)?,
        };
        let (tx, rx) = mpsc::channel();
        let compression = self.compression;
        pool.spawn(move || {
            let _ = tx.send(compress_block(compression, &window, &data, false));
        });
        self.pool = Some(pool);
        self.pending.push_back(rx);
        while let Some(front) = self.pending.front() {
            let block = match self.pending.len() >= 2 * self.threads {
                true => front.recv().map_err(lost)?,
                false => match front.try_recv() {
                    Ok(block) => block,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Err(lost(mpsc::RecvError)),
                },
            };
            self.pending.pop_front();
            self.emit(block?)?;
        }
        Ok(())
    }

    /// The window this block's compressor starts from; `data`'s tail
    /// becomes the next one's.
    fn next_window(&mut self, data: &[u8]) -> Arc<[u8]> {
        let next = match self.compression {
            Compression::Gzip { .. } => Arc::from(&data[data.len().saturating_sub(WINDOW)..]),
            Compression::Zstd { .. } => Arc::from([]),
        };
        std::mem::replace(&mut self.window, next)
    }

    fn emit(&mut self, block: Block) -> io::Result<()> {
        if !self.started {
            self.started = true;
            if let Compression::Gzip { level } = self.compression {
                self.inner.write_all(&gzip_header(level))?;
            }
        }
        self.crc.combine(&block.crc);
        self.inner.write_all(&block.bytes)
    }

    /// Writes the rest and the trailer, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        while let Some(rx) = self.pending.pop_front() {
            self.emit(rx.recv().map_err(lost)??)?;
        }
        // The last block is compressed here: a small layer (one block)
        // never waits on the pool.
        let last = std::mem::take(&mut self.block);
        // No block follows, so no tail is kept for one.
        let window = std::mem::replace(&mut self.window, Arc::from([]));
        let block = compress_block(self.compression, &window, &last, true)?;
        self.emit(block)?;
        if let Compression::Gzip { .. } = self.compression {
            let mut trailer = self.crc.sum().to_le_bytes().to_vec();
            trailer.extend_from_slice(&self.crc.amount().to_le_bytes());
            self.inner.write_all(&trailer)?;
        }
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ParallelEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A full block is handed over only once more input comes, so the
        // last block is never empty unless the whole stream is.
        if self.block.len() == self.block_size {
            self.submit()?;
        }
        if self.block.capacity() == 0 {
            self.block.reserve_exact(self.block_size);
        }
        let n = buf.len().min(self.block_size - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Blocks are cut by size only (so the bytes do not depend on where
    /// callers flush): nothing to do.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lost(e: mpsc::RecvError) -> io::Error {
    io::Error::other(format!("a compression worker stopped: {e}"))
}

/// gzip's 10-byte header with no name and no time, as flate2's `GzEncoder`
/// writes it: XFL by level, OS 255 (unknown) so no machine shows.
fn gzip_header(level: u32) -> [u8; 10] {
    let xfl = match level {
        9.. => 2,
        ..=1 => 4,
        _ => 0,
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]
}

fn compress_block(
    compression: Compression,
    window: &[u8],
    data: &[u8],
    last: bool,
) -> io::Result<Block> {
    let mut crc = Crc::new();
    let bytes = match compression {
        Compression::Gzip { level } => {
            crc.update(data);
            match level > 0 && incompressible(data) {
                true => stored(data, last),
                false => deflate(level, window, data, last)?,
            }
        }
        Compression::Zstd { level } => zstd::bulk::compress(data, level)?,
    };
    Ok(Block { bytes, crc })
}

/// Order-0 entropy, in bits per byte, above which deflate cannot shrink a
/// block by more than about half a percent: already compressed data
/// (archives, images, packed binaries) or random bytes.
const INCOMPRESSIBLE_BITS: f64 = 7.95;
/// How much of a block's start is searched for repeats.
const REPEAT_PROBE: usize = WINDOW;

/// Whether deflating `data` would be wasted work: its bytes are near
/// uniform, and its start repeats no 4-byte sequence often (bytes can be
/// uniform and still repeat within the window, which deflate would find).
/// It depends on `data` alone, so the output still does not depend on the
/// thread count.
fn incompressible(data: &[u8]) -> bool {
    if data.len() < 4096 {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[usize::from(b)] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if bits < INCOMPRESSIBLE_BITS {
        return false;
    }
    // A 4-byte sequence seen before, at its last position by hash: random
    // bytes meet one by chance about once in 2^20 positions here. A few
    // KiB of runs in noise (a tar header's zero padding before a packed
    // file) still leave it stored: deflate would save those KiB only by
    // searching the whole block, 3-4 ms for 128 KiB of noise here.
    let probe = &data[..data.len().min(REPEAT_PROBE)];
    let mut last = vec![u32::MAX; 1 << 12];
    let mut repeats = 0;
    for (i, quad) in probe.windows(4).enumerate() {
        let word = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]);
        let slot = (word.wrapping_mul(0x9E37_79B1) >> 20) as usize;
        let seen = last[slot];
        if seen != u32::MAX && probe[seen as usize..seen as usize + 4] == *quad {
            repeats += 1;
        }
        last[slot] = i as u32;
    }
    repeats < probe.len() / 16
}

/// `data` as raw deflate stored blocks (at most 65,535 bytes each),
/// byte-aligned as [`deflate`]'s output ends, the last one final if
/// `last`.
fn stored(data: &[u8], last: bool) -> Vec<u8> {
    let chunks = data.chunks(usize::from(u16::MAX));
    let count = chunks.len();
    let mut out = Vec::with_capacity(data.len() + 5 * count);
    for (i, chunk) in chunks.enumerate() {
        let len = chunk.len() as u16;
        out.push(u8::from(last && i + 1 == count));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// `data` as a raw deflate stream that may refer back into `window` (the
/// bytes just before it): ended by a sync flush (byte-aligned, not final)
/// so the next block's stream can follow it, or if `last` by a final block.
fn deflate(level: u32, window: &[u8], data: &[u8], last: bool) -> io::Result<Vec<u8>> {
    let mut z = Compress::new(flate2::Compression::new(level), false);
    if !window.is_empty() {
        z.set_dictionary(window).map_err(io::Error::other)?;
    }
    let flush = match last {
        true => FlushCompress::Finish,
        false => FlushCompress::Sync,
    };
    // deflateBound's margin, so one call usually does it all.
    let mut out = Vec::with_capacity(data.len() + data.len() / 1000 + 64);
    loop {
        let consumed = z.total_in() as usize;
        let status = z.compress_vec(&data[consumed..], &mut out, flush)?;
        let all_in = z.total_in() as usize == data.len();
        // A flush is complete when output space is left over.
        let done = match last {
            true => status == Status::StreamEnd,
            false => all_in && out.len() < out.capacity(),
        };
        if done {
            return Ok(out);
        }
        out.reserve(64 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// `len` bytes that compress like a layer: runs of text, of zeros, and
    /// of noise that does not compress.
    fn mixed(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut i = 0u64;
        while out.len() < len {
            i += 1;
            match i % 3 {
                0 => out.extend(format!("line {i}: the quick brown fox {}\n", i % 97).bytes()),
                1 => out.extend(std::iter::repeat_n(0u8, (i % 300) as usize)),
                _ => {
                    for _ in 0..(i % 200) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        out.push(x as u8);
                    }
                }
            }
        }
        out.truncate(len);
        out
    }

    /// Writes `data` in uneven pieces, as tar writes.
    fn encode(data: &[u8], compression: Compression, threads: usize) -> Vec<u8> {
        let mut enc = ParallelEncoder::new(Vec::new(), compression, threads);
        for piece in data.chunks(7919) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap()
    }

    fn system(cmd: &str, input: &[u8]) -> Option<Vec<u8>> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(cmd)
            .arg("-dc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "{cmd} -dc failed");
        Some(out.stdout)
    }

    #[test]
    fn bytes_do_not_depend_on_thread_count_and_decode_back() {
        // Not a multiple of either block size, so the last block is short.
        let data = mixed(3 * ZSTD_BLOCK + 12_345);
        for compression in [
            Compression::Gzip { level: 6 },
            Compression::Zstd { level: 3 },
        ] {
            let one = encode(&data, compression, 1);
            for threads in [2, 8] {
                assert!(
                    one == encode(&data, compression, threads),
                    "{compression:?}: {threads} threads wrote other bytes than 1"
                );
            }
            let mut back = Vec::new();
            match compression {
                Compression::Gzip { .. } => {
                    // One member: even a single-member reader reads it all.
                    flate2::read::GzDecoder::new(one.as_slice())
                        .read_to_end(&mut back)
                        .unwrap();
                    assert!(system("gzip", &one).expect("gzip is installed") == data);
                }
                Compression::Zstd { .. } => {
                    zstd::Decoder::new(one.as_slice())
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                    if let Some(out) = system("zstd", &one) {
                        assert!(out == data, "zstd -dc read other bytes");
                    }
                }
            }
            assert!(back == data, "{compression:?} does not decode back");
        }
    }

    /// `len` bytes of noise (xorshift), as compressed files hold.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn noise_is_stored_not_searched_and_decodes_back() {
        let noise_len = 3 * GZIP_BLOCK;
        let mut data = noise(noise_len);
        // Then text: blocks after stored ones still compress.
        data.extend(mixed(2 * GZIP_BLOCK + 777));
        let gz = encode(&data, Compression::Gzip { level: 6 }, 1);
        // Per block, two stored blocks of 5-byte headers.
        let stored_len = noise_len + 3 * 2 * 5;
        let text_len = encode(&data[noise_len..], Compression::Gzip { level: 6 }, 1).len();
        // The text's first block starts from the noise as its window: a
        // few bytes apart from the text's alone.
        let expected = stored_len + text_len;
        assert!(
            gz.len().abs_diff(expected) < 64,
            "{} against {expected}",
            gz.len()
        );
        assert!(encode(&data, Compression::Gzip { level: 6 }, 8) == gz);
        assert!(system("gzip", &gz).expect("gzip is installed") == data);
        // All noise, so the last block is stored and final.
        let all = noise(GZIP_BLOCK + 5);
        let gz = encode(&all, Compression::Gzip { level: 6 }, 2);
        assert!(system("gzip", &gz).unwrap() == all);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == all);
    }

    #[test]
    fn noise_after_a_tar_header_is_stored() {
        // A file's tar header (mostly zeros) and a PAX record, then a
        // compressed file's bytes: as the first block of such a layer.
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(GZIP_BLOCK as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        tar.append_pax_extensions([("mtime", b"1700000000.123456789".as_slice())])
            .unwrap();
        tar.append_data(&mut header, "app/blob.gz", noise(GZIP_BLOCK).as_slice())
            .unwrap();
        let data = tar.into_inner().unwrap();
        assert!(incompressible(&data[..GZIP_BLOCK]));
        let gz = encode(&data, Compression::Gzip { level: 6 }, 2);
        assert!(
            gz.len() > data.len() - 4096,
            "{} of {}",
            gz.len(),
            data.len()
        );
        assert!(system("gzip", &gz).unwrap() == data);
    }

    #[test]
    fn noise_that_repeats_within_the_window_is_still_compressed() {
        let chunk = noise(8 << 10);
        let data: Vec<u8> = chunk.iter().copied().cycle().take(GZIP_BLOCK * 2).collect();
        assert!(!incompressible(&data[..GZIP_BLOCK]));
        let gz = encode(&data, Compression::Gzip { level: 6 }, 2);
        assert!(gz.len() < data.len() / 4, "{} bytes", gz.len());
        assert!(system("gzip", &gz).unwrap() == data);
    }

    #[test]
    fn empty_and_exact_block_inputs_are_valid() {
        for len in [0, 1, GZIP_BLOCK, 2 * GZIP_BLOCK, ZSTD_BLOCK] {
            let data = mixed(len);
            let gz = encode(&data, Compression::Gzip { level: 6 }, 2);
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(gz.as_slice())
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back.len(), len);
            assert!(
                system("gzip", &gz).unwrap() == data,
                "gzip -dc, {len} bytes"
            );
            let zst = encode(&data, Compression::Zstd { level: 3 }, 2);
            assert!(zstd::decode_all(zst.as_slice()).unwrap() == data);
        }
    }

    #[test]
    fn blocks_cost_little_ratio() {
        let data = mixed(8 << 20);
        let parallel = encode(&data, Compression::Gzip { level: 6 }, 2).len();
        let mut serial = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        serial.write_all(&data).unwrap();
        let serial = serial.finish().unwrap().len();
        eprintln!("gzip: {parallel} bytes in blocks, {serial} in one stream");
        assert!(
            parallel as f64 <= serial as f64 * 1.001,
            "blocks: {parallel} bytes against {serial} in one stream"
        );
        let parallel = encode(&data, Compression::Zstd { level: 3 }, 2).len();
        let serial = zstd::encode_all(data.as_slice(), 3).unwrap().len();
        assert!(
            parallel as f64 <= serial as f64 * 1.01,
            "frames: {parallel} bytes against {serial} in one frame"
        );
    }
}
