//! Layers written byte by byte, as an attacker would (raw tar headers, PAX
//! and GNU long-name members, streams cut short), and busybox-based OCI
//! layouts with them on top. The `tar` crate refuses names like `../x`, so
//! headers are written by hand.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_cachestore::digest::HashingWriter;

use super::{busybox_layout, run_ok};

/// One tar member: its header fields and data, written as given.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub kind: u8,
    pub link: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn new(name: &str, kind: u8, link: &str, data: &[u8]) -> Entry {
        let mode = if kind == b'5' { 0o755 } else { 0o644 };
        Entry {
            name: name.into(),
            kind,
            link: link.into(),
            mode,
            data: data.to_vec(),
        }
    }

    pub fn file(name: &str, data: &[u8]) -> Entry {
        Entry::new(name, b'0', "", data)
    }

    pub fn dir(name: &str) -> Entry {
        Entry::new(name, b'5', "", b"")
    }

    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry::new(name, b'2', target, b"")
    }

    pub fn hardlink(name: &str, target: &str) -> Entry {
        Entry::new(name, b'1', target, b"")
    }

    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }

    /// A PAX extended header: its records apply to the next member.
    pub fn pax(records: &[(&str, &str)]) -> Entry {
        let mut data = Vec::new();
        for (key, value) in records {
            // The length counts itself: "LEN key=value\n".
            let body = format!(" {key}={value}\n");
            let mut len = body.len() + 1;
            while format!("{len}").len() + body.len() > len {
                len += 1;
            }
            data.extend_from_slice(format!("{len}{body}").as_bytes());
        }
        Entry::new("PaxHeaders/x", b'x', "", &data)
    }

    /// A GNU long-name member: the next member's name is `name`.
    pub fn gnu_long_name(name: &str) -> Entry {
        Entry::new(
            "././@LongLink",
            b'L',
            "",
            &[name.as_bytes(), b"\0"].concat(),
        )
    }

    /// A GNU long-link member: the next member's link target is `target`.
    pub fn gnu_long_link(target: &str) -> Entry {
        Entry::new(
            "././@LongLink",
            b'K',
            "",
            &[target.as_bytes(), b"\0"].concat(),
        )
    }

    /// The 512-byte ustar header (names cut at their field's size) and
    /// the data, padded to a block.
    pub fn write_to(&self, out: &mut impl Write) {
        out.write_all(&self.header(self.data.len() as u64)).unwrap();
        out.write_all(&self.data).unwrap();
        let pad = self.data.len().div_ceil(512) * 512 - self.data.len();
        out.write_all(&vec![0u8; pad]).unwrap();
    }

    /// The ustar header, saying the data is `size` bytes.
    pub fn header(&self, size: u64) -> [u8; 512] {
        let mut header = [0u8; 512];
        let name = &self.name.as_bytes()[..self.name.len().min(100)];
        header[..name.len()].copy_from_slice(name);
        header[100..107].copy_from_slice(format!("{:07o}", self.mode).as_bytes());
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        header[136..147].copy_from_slice(b"13000000000");
        header[156] = self.kind;
        let link = &self.link.as_bytes()[..self.link.len().min(100)];
        header[157..157 + link.len()].copy_from_slice(link);
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|b| *b as u32).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        header
    }
}

/// A tar of `entries` with its end-of-archive blocks.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut tar = Vec::new();
    for entry in entries {
        entry.write_to(&mut tar);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

/// A gzip layer blob and the diff_id its config gives.
#[derive(Clone, Debug)]
pub struct RawLayer {
    pub gz: Vec<u8>,
    pub diff_id: String,
}

impl RawLayer {
    pub fn of(entries: &[Entry]) -> RawLayer {
        RawLayer::from_tar(&tar_of(entries))
    }

    pub fn from_tar(tar: &[u8]) -> RawLayer {
        RawLayer::streamed(|w| w.write_all(tar).unwrap())
    }

    /// A layer whose tar `write` streams out: compressed and hashed as it
    /// goes, so a huge tar is never held whole.
    pub fn streamed(write: impl FnOnce(&mut dyn Write)) -> RawLayer {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut hashing = HashingWriter::new(gz);
        write(&mut hashing);
        let (gz, diff_id, _) = hashing.finish();
        RawLayer {
            gz: gz.finish().unwrap(),
            diff_id: diff_id.to_string(),
        }
    }
}

/// The `sha256:<hex>` digest of `bytes`, as these tests splice it into JSON.
pub fn sha256(bytes: &[u8]) -> String {
    kiln_cachestore::digest::sha256(bytes).to_string()
}

/// Copies the busybox layout to `dir/evil-layout` and adds `layers` on top
/// (bottom first); returns the layout, tagged `latest`.
pub fn layout_with_layers(dir: &Path, layers: &[RawLayer]) -> PathBuf {
    let layout = dir.join("evil-layout");
    std::fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(busybox_layout())
            .arg(&layout),
    );
    let blobs = layout.join("blobs/sha256");
    let read_json = |digest: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(blobs.join(digest.trim_start_matches("sha256:"))).unwrap(),
        )
        .unwrap()
    };
    let write_blob = |bytes: &[u8]| -> String {
        let d = sha256(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut manifest = read_json(index["manifests"][0]["digest"].as_str().unwrap());
    let mut config = read_json(manifest["config"]["digest"].as_str().unwrap());
    for layer in layers {
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .unwrap()
            .push(layer.diff_id.clone().into());
        manifest["layers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": write_blob(&layer.gz),
                "size": layer.gz.len(),
            }));
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = write_blob(&config_bytes).into();
    manifest["config"]["size"] = config_bytes.len().into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let mut index = index;
    index["manifests"][0]["digest"] = write_blob(&manifest_bytes).into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    layout
}

/// [`layout_with_layers`] with one layer of `entries`.
pub fn layout_with_layer(dir: &Path, entries: &[Entry]) -> PathBuf {
    layout_with_layers(dir, &[RawLayer::of(entries)])
}
