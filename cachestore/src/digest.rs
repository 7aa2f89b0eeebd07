//! sha256 digests as the OCI spec writes them (`sha256:<hex>`), typed as
//! `oci_spec`'s [`Digest`]. Kiln stores and names blobs by sha256 only, so
//! a digest from outside passes [`parse`] (or [`hex`]) before it is used.
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::str::FromStr;

pub use oci_spec::image::Digest;
use oci_spec::image::{DigestAlgorithm, Sha256Digest};

use crate::error::{CacheStoreError, Result};

/// Parses an untrusted digest, accepting only `sha256:` and 64 lowercase hex
/// digits, so it is safe to use as a file name and to compare.
pub fn parse(digest: &str) -> Result<Digest> {
    let invalid = || CacheStoreError::InvalidDigest(digest.to_string());
    let parsed = Digest::from_str(digest).map_err(|_| invalid())?;
    hex(&parsed).map_err(|_| invalid())?;
    Ok(parsed)
}

/// The hex part of a sha256 digest: the blob's file name. Other algorithms
/// parse as OCI digests but are refused here.
pub fn hex(digest: &Digest) -> Result<&str> {
    match digest.algorithm() {
        DigestAlgorithm::Sha256 => Ok(digest.digest()),
        _ => Err(CacheStoreError::InvalidDigest(digest.to_string())),
    }
}

/// The digest of bytes already in memory (configs, manifests).
pub fn sha256(bytes: &[u8]) -> Digest {
    finish(Sha256::digest(bytes).into())
}

fn finish(hash: [u8; 32]) -> Digest {
    Sha256Digest::from_str(&::hex::encode(hash))
        .expect("a sha256 hash is 64 hex digits")
        .into()
}

/// A writer that hashes what passes through it and counts bytes.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, finish(self.hasher.finalize().into()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what is read through it (diff_id of a layer while
/// it is extracted).
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: std::io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// Reads what is left (a tar reader stops at the end marker, before
    /// the padding) and returns the `sha256:` digest of everything.
    pub fn finish(mut self) -> std::io::Result<Digest> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        Ok(finish(self.hasher.finalize().into()))
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_safe_sha256_digests() {
        let good = sha256(b"x");
        assert_eq!(parse(good.as_ref()).unwrap(), good);
        assert_eq!(hex(&good).unwrap().len(), 64);
        assert!(parse("sha256:../../etc/passwd").is_err());
        assert!(parse(&good.to_string().to_uppercase()).is_err());
        assert!(parse("sha512:00").is_err());
        let sha512 = Digest::from_str(&format!("sha512:{}", "0".repeat(128))).unwrap();
        assert!(hex(&sha512).is_err());
    }

    #[test]
    fn hashing_writer_matches_one_shot_digest() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (inner, digest, len) = w.finish();
        assert_eq!(inner, b"hello world");
        assert_eq!(digest, sha256(b"hello world"));
        assert_eq!(len, 11);
    }
}
