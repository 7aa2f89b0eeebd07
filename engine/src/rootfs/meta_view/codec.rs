//! A table's stored form: a format byte, then the records as
//! length-prefixed fields, zstd-compressed. Written by hand rather than
//! with serde: decoding JSON cost more than applying the table.
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::{Kind, LayerTable, Meta, Record};

/// Changes with the layout below. Older builds stored JSON, whose
/// zstd frame starts with 0x28.
const FORMAT: u8 = 1;

const ENTRY: u8 = 0;
const LINK: u8 = 1;
const WHITEOUT: u8 = 2;
const OPAQUE: u8 = 3;

const KINDS: [Kind; 4] = [Kind::Dir, Kind::File, Kind::Symlink, Kind::Unsupported];

/// The layout, numbers as LEB128, byte strings as their length then
/// their bytes, optional ones as their length plus one (0: none):
/// the record count, then per record a tag and its paths; an entry's
/// path is followed by its kind (an index into [`KINDS`]), mode, uid,
/// gid, mtime (zigzag), link and content.
pub(super) fn encode(table: &LayerTable) -> Vec<u8> {
    // One call with the size known: a streaming encoder's first use in a
    // process set up tables for any size, 0.45 ms for a table of one file
    // (a step on the view writes one); the frame then also carries the
    // size, for `decode`.
    let compressed = zstd::bulk::compress(&records(table), 3).expect("compressing in memory");
    [&[FORMAT][..], &compressed].concat()
}

/// The records, uncompressed, in the layout above.
fn records(table: &LayerTable) -> Vec<u8> {
    let mut out = Vec::new();
    number(&mut out, table.records.len() as u64);
    for record in &table.records {
        match record {
            Record::Entry(path, meta) => {
                out.push(ENTRY);
                bytes(&mut out, path.as_os_str().as_bytes());
                let kind = KINDS.iter().position(|k| *k == meta.kind);
                out.push(kind.expect("every kind is listed") as u8);
                number(&mut out, meta.mode.into());
                number(&mut out, meta.uid.into());
                number(&mut out, meta.gid.into());
                number(&mut out, ((meta.mtime << 1) ^ (meta.mtime >> 63)) as u64);
                let link = meta.link.as_deref().map(|l| l.as_os_str().as_bytes());
                optional(&mut out, link);
                optional(&mut out, meta.content.as_deref());
            }
            Record::Link(path, target) => {
                out.push(LINK);
                bytes(&mut out, path.as_os_str().as_bytes());
                bytes(&mut out, target.as_os_str().as_bytes());
            }
            Record::Whiteout(path) => {
                out.push(WHITEOUT);
                bytes(&mut out, path.as_os_str().as_bytes());
            }
            Record::Opaque(path) => {
                out.push(OPAQUE);
                bytes(&mut out, path.as_os_str().as_bytes());
            }
        }
    }
    out
}

/// Tables larger than this are read by a streaming decoder, which needs no
/// buffer of the size a frame claims.
const ONE_CALL_MAX: u64 = 64 << 20;

pub(super) fn decode(stored: &[u8]) -> Option<LayerTable> {
    let (&FORMAT, compressed) = stored.split_first()? else {
        return None;
    };
    // A frame that carries its size (`encode`'s) is read in one call,
    // several times cheaper on a process's first table; older ones stream.
    let raw = match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(size)) if size <= ONE_CALL_MAX => {
            zstd::bulk::decompress(compressed, size as usize).ok()?
        }
        _ => zstd::decode_all(compressed).ok()?,
    };
    let mut input = Input(&raw);
    let count = usize::try_from(input.number()?).ok()?;
    // Each record takes at least two bytes: a corrupt count asks no
    // more memory than the input could fill.
    let mut records = Vec::with_capacity(count.min(raw.len() / 2));
    for _ in 0..count {
        let record = match input.byte()? {
            ENTRY => {
                let path = input.path()?;
                let kind = *KINDS.get(usize::from(input.byte()?))?;
                let meta = Meta {
                    kind,
                    mode: input.number()?.try_into().ok()?,
                    uid: input.number()?.try_into().ok()?,
                    gid: input.number()?.try_into().ok()?,
                    mtime: {
                        let n = input.number()?;
                        ((n >> 1) as i64) ^ -((n & 1) as i64)
                    },
                    link: input.optional()?.map(|l| path_of(l.to_vec())),
                    content: input.optional()?.map(<[u8]>::to_vec),
                };
                Record::Entry(path, meta)
            }
            LINK => Record::Link(input.path()?, input.path()?),
            WHITEOUT => Record::Whiteout(input.path()?),
            OPAQUE => Record::Opaque(input.path()?),
            _ => return None,
        };
        records.push(record);
    }
    input.0.is_empty().then_some(LayerTable { records })
}

fn number(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    number(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn optional(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => number(out, 0),
        Some(b) => {
            number(out, b.len() as u64 + 1);
            out.extend_from_slice(b);
        }
    }
}

fn path_of(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// What is left to decode; each read is `None` past its end.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn number(&mut self) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(n);
            }
        }
        None
    }

    fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let taken = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(taken)
    }

    fn path(&mut self) -> Option<PathBuf> {
        let len = self.number()?;
        Some(path_of(self.take(len)?.to_vec()))
    }

    fn optional(&mut self) -> Option<Option<&'a [u8]>> {
        match self.number()? {
            0 => Some(None),
            n => self.take(n - 1).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn any_path() -> impl Strategy<Value = PathBuf> {
        proptest::collection::vec(any::<u8>(), 0..24)
            .prop_map(|b| PathBuf::from(std::ffi::OsString::from_vec(b)))
    }

    fn any_record() -> impl Strategy<Value = Record> {
        let kind = prop_oneof![
            Just(Kind::Dir),
            Just(Kind::File),
            Just(Kind::Symlink),
            Just(Kind::Unsupported)
        ];
        let bytes = proptest::collection::vec(any::<u8>(), 0..24);
        let meta = (kind, any::<u32>(), any::<u32>(), any::<u32>(), any::<i64>())
            .prop_flat_map(move |m| {
                let link = proptest::option::of(any_path());
                (Just(m), link, proptest::option::of(bytes.clone()))
            })
            .prop_map(|((kind, mode, uid, gid, mtime), link, content)| Meta {
                kind,
                mode,
                uid,
                gid,
                mtime,
                link,
                content,
            });
        prop_oneof![
            (any_path(), meta).prop_map(|(p, m)| Record::Entry(p, m)),
            (any_path(), any_path()).prop_map(|(p, t)| Record::Link(p, t)),
            any_path().prop_map(Record::Whiteout),
            any_path().prop_map(Record::Opaque),
        ]
    }

    proptest! {
        #[test]
        fn a_stored_table_reads_back_as_it_was(
            records in proptest::collection::vec(any_record(), 0..16)
        ) {
            let table = LayerTable { records };
            let stored = table.to_bytes();
            prop_assert_eq!(LayerTable::from_bytes(&stored).map(|t| t.records), Some(table.records));
            // Cut short or run on, it is not a table.
            prop_assert!(LayerTable::from_bytes(&stored[..stored.len() - 1]).is_none());
            let mut longer = stored.clone();
            longer.push(0);
            prop_assert!(LayerTable::from_bytes(&longer).is_none());
        }
    }

    #[test]
    fn a_table_compressed_without_its_size_reads_back() {
        // As builds before the one-call encoder stored them.
        let table = LayerTable {
            records: vec![Record::Whiteout(PathBuf::from("etc/gone"))],
        };
        let streamed = zstd::encode_all(&records(&table)[..], 3).unwrap();
        let stored = [&[FORMAT][..], &streamed].concat();
        assert_eq!(
            LayerTable::from_bytes(&stored).map(|t| t.records),
            Some(table.records)
        );
    }

    #[test]
    fn a_table_stored_by_an_older_build_reads_as_none() {
        // What the JSON format stored for `etc/` (a directory).
        let json = br#"{"records":[{"Entry":["etc",{"kind":"Dir","mode":493,"uid":0,"gid":0,"mtime":1}]}]}"#;
        let old = zstd::encode_all(&json[..], 3).unwrap();
        assert!(LayerTable::from_bytes(&old).is_none());
        assert!(LayerTable::from_bytes(&[]).is_none());
    }
}
