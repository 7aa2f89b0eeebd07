//! Property-based fuzzing of the extractor: random and mutated tar streams
//! (hostile names and link targets, every entry type, lying sizes, PAX and
//! GNU long-name records, flipped bytes, cut streams) are unpacked, two
//! layers deep, in every format. Whatever happens (an error is fine), no
//! panic, and nothing outside the root changes: the root sits in a temp dir
//! beside marker files the names aim at, which are compared after, and the
//! host's `/etc/passwd` gains no link.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// Stands for the absolute path of the markers' directory, known only once
/// the temp dir exists.
const OUTSIDE: &str = "@OUTSIDE";

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
        8 => "[a-c]{1,2}",
        3 => Just("evil".to_string()),
        2 => Just("outside".to_string()),
        2 => Just("marker".to_string()),
        3 => Just(OUTSIDE.to_string()),
        1 => Just("etc/passwd".to_string()),
        1 => Just(".wh.marker".to_string()),
        1 => Just(".wh.a".to_string()),
        1 => Just(".wh..wh..opq".to_string()),
        1 => Just(".wh..".to_string()),
        1 => Just(".wh.".to_string()),
        1 => Just("x".repeat(120)),
        1 => "\\PC{1,8}",
    ]
}

/// A path as a hostile tool would write it: maybe absolute, maybe ending
/// in `/`, made of the components above.
fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), vec(component(), 1..4), any::<bool>()).prop_map(|(absolute, parts, slash)| {
        let mut path = parts.join("/");
        if absolute {
            path.insert(0, '/');
        }
        if slash {
            path.push('/');
        }
        path
    })
}

fn pax_record() -> impl Strategy<Value = (String, Vec<u8>)> {
    prop_oneof![
        path().prop_map(|p| ("path".to_string(), p.into_bytes())),
        path().prop_map(|p| ("linkpath".to_string(), p.into_bytes())),
        "[0-9]{0,12}".prop_map(|n| ("size".to_string(), n.into_bytes())),
        "[0-9.]{0,12}".prop_map(|n| ("mtime".to_string(), n.into_bytes())),
        "[0-9]{0,10}".prop_map(|n| ("uid".to_string(), n.into_bytes())),
        vec(any::<u8>(), 0..8).prop_map(|v| ("SCHILY.xattr.user.k".to_string(), v)),
        vec(any::<u8>(), 0..4).prop_map(|v| ("SCHILY.xattr.trusted.overlay.opaque".to_string(), v)),
        vec(any::<u8>(), 0..24).prop_map(|v| ("SCHILY.xattr.security.capability".to_string(), v)),
        ("\\PC{0,6}", vec(any::<u8>(), 0..8)),
    ]
}

/// One tar member before serialization.
#[derive(Debug, Clone)]
struct Member {
    kind: u8,
    name: String,
    link: String,
    mode: u32,
    owner: (u32, u32),
    data: Vec<u8>,
    /// A size in the header other than the data's (a lie), if any.
    size: Option<u64>,
    pax: Vec<(String, Vec<u8>)>,
}

fn member() -> impl Strategy<Value = Member> {
    let kind = prop_oneof![
        6 => Just(b'0'),
        3 => Just(b'5'),
        3 => Just(b'2'),
        3 => Just(b'1'),
        1 => Just(b'3'),
        1 => Just(b'4'),
        1 => Just(b'6'),
        1 => Just(b'7'),
        1 => Just(b'L'),
        1 => Just(b'K'),
        1 => Just(b'x'),
        1 => Just(b'g'),
        1 => any::<u8>(),
    ];
    (
        kind,
        path(),
        path(),
        prop_oneof![3 => 0u32..0o10000, 1 => any::<u32>()],
        (0u32..3, 0u32..3),
        vec(any::<u8>(), 0..48),
        prop_oneof![4 => Just(None), 1 => (0u64..4096).prop_map(Some)],
        prop_oneof![3 => Just(Vec::new()), 1 => vec(pax_record(), 1..4)],
    )
        .prop_map(|(kind, name, link, mode, owner, data, size, pax)| Member {
            kind,
            name,
            link,
            mode,
            owner,
            data,
            size,
            pax,
        })
}

/// How a stream is damaged after it is written.
#[derive(Debug, Clone)]
struct Damage {
    flips: Vec<(usize, u8)>,
    cut: Option<usize>,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => Just(Damage { flips: Vec::new(), cut: None }),
        1 => (vec((any::<usize>(), any::<u8>()), 1..6), proptest::option::of(any::<usize>()))
            .prop_map(|(flips, cut)| Damage { flips, cut }),
    ]
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let text = &text.as_bytes()[text.len().saturating_sub(digits)..];
    field[..text.len()].copy_from_slice(text);
}

fn header(
    kind: u8,
    name: &[u8],
    link: &[u8],
    mode: u32,
    owner: (u32, u32),
    size: u64,
) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = &name[..name.len().min(100)];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], u64::from(owner.0));
    octal(&mut h[116..124], u64::from(owner.1));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_600_000_000);
    h[156] = kind;
    let link = &link[..link.len().min(100)];
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // Devices: /dev/null's numbers, whatever the kind.
    octal(&mut h[329..337], 1);
    octal(&mut h[337..345], 3);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

fn push(out: &mut Vec<u8>, h: [u8; 512], data: &[u8]) {
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The stream of `members`, with [`OUTSIDE`] replaced by `outside`, then
/// damaged.
fn stream(members: &[Member], damage: &Damage, outside: &str) -> Vec<u8> {
    let real = |s: &str| s.replace(OUTSIDE, outside).into_bytes();
    let mut out = Vec::new();
    for m in members {
        if !m.pax.is_empty() {
            let mut records = Vec::new();
            for (key, value) in &m.pax {
                let value = String::from_utf8_lossy(value).replace(OUTSIDE, outside);
                let body = [b" ", key.as_bytes(), b"=", value.as_bytes(), b"\n"].concat();
                let mut len = body.len() + 1;
                while len.to_string().len() + body.len() > len {
                    len += 1;
                }
                records.extend_from_slice(len.to_string().as_bytes());
                records.extend_from_slice(&body);
            }
            let h = header(
                b'x',
                b"PaxHeaders/x",
                b"",
                0o644,
                (0, 0),
                records.len() as u64,
            );
            push(&mut out, h, &records);
        }
        let name = real(&m.name);
        let link = real(&m.link);
        let data = match m.kind {
            b'L' => [name.as_slice(), b"\0"].concat(),
            b'K' => [link.as_slice(), b"\0"].concat(),
            _ => m.data.clone(),
        };
        let size = m.size.unwrap_or(data.len() as u64);
        push(
            &mut out,
            header(m.kind, &name, &link, m.mode, m.owner, size),
            &data,
        );
    }
    out.extend_from_slice(&[0u8; 1024]);
    if !out.is_empty() {
        for (at, byte) in &damage.flips {
            let len = out.len();
            out[at % len] ^= byte;
        }
    }
    if let Some(cut) = damage.cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// What a tree looks like, links not followed: per path, its type, mode,
/// owner, size, inode, link count, times and (for files and symlinks) its
/// content or target.
fn snapshot(dir: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let content = if meta.file_type().is_symlink() {
            fs::read_link(&path).unwrap().display().to_string()
        } else if meta.is_file() {
            format!("{:?}", fs::read(&path).unwrap())
        } else {
            String::new()
        };
        out.insert(
            path.clone(),
            format!(
                "{:o} {}:{} {} ino {} nlink {} m {}.{} c {}.{} {content}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.size(),
                meta.ino(),
                meta.nlink(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec()
            ),
        );
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                let child = entry.unwrap().path();
                if !skip.contains(&child.as_path()) {
                    stack.push(child);
                }
            }
        }
    }
    out
}

/// Which extraction the two layers go through.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Apply,
    /// Each layer alone in its own directory, the second over the first.
    Overlay,
    /// The first layer alone, before the layers below are known.
    OverlayUnknown,
    Archive(Option<(u32, u32)>),
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Apply),
        Just(Mode::Overlay),
        Just(Mode::OverlayUnknown),
        Just(Mode::Archive(None)),
        Just(Mode::Archive(Some((1, 2)))),
    ]
}

fn unpack(mode: Mode, roots: [&Path; 2], layers: [&[u8]; 2]) {
    for (i, layer) in layers.into_iter().enumerate() {
        let lowers: Vec<PathBuf> = roots[..i].iter().map(|r| r.to_path_buf()).collect();
        // Errors are fine: only panics and writes outside matter here.
        let _ = match mode {
            Mode::Apply => extract_layer(roots[0], layer),
            Mode::Overlay => extract_layer_dir(roots[i], layer, Lowers::Dirs(&lowers)),
            Mode::OverlayUnknown => extract_layer_dir(roots[i], layer, Lowers::Unknown),
            Mode::Archive(owner) => extract_archive(roots[0], layer, owner),
        };
    }
}

proptest! {
    // Bounded for CI; PROPTEST_CASES raises it for a longer run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(192),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_streams_never_panic_nor_touch_anything_outside_the_root(
        first in vec(member(), 0..12),
        second in vec(member(), 0..12),
        damages in (damage(), damage()),
        mode in mode(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("marker"), "marker").unwrap();
        fs::write(outside.join(".wh.marker"), "whiteout-named").unwrap();
        fs::write(tmp.path().join("marker"), "sibling").unwrap();
        std::os::unix::fs::symlink(&outside, tmp.path().join("evil")).unwrap();
        let roots = [tmp.path().join("root"), tmp.path().join("root2")];
        for root in &roots {
            fs::create_dir(root).unwrap();
        }
        let passwd = fs::metadata("/etc/passwd").map(|m| m.nlink()).ok();
        let skip = [roots[0].as_path(), roots[1].as_path()];
        let before = snapshot(tmp.path(), &skip);

        let outside_str = outside.display().to_string();
        let layers = [
            stream(&first, &damages.0, &outside_str),
            stream(&second, &damages.1, &outside_str),
        ];
        unpack(mode, [&roots[0], &roots[1]], [&layers[0], &layers[1]]);

        let after = snapshot(tmp.path(), &skip);
        prop_assert_eq!(before, after);
        prop_assert_eq!(passwd, fs::metadata("/etc/passwd").map(|m| m.nlink()).ok());
    }
}

/// The property's detector sees what an escape would do: a new link to a
/// marker, a changed byte, a new sibling.
#[test]
fn the_snapshot_sees_writes_outside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::write(tmp.path().join("marker"), "sibling").unwrap();
    let skip = [root.as_path()];
    let before = snapshot(tmp.path(), &skip);
    fs::write(root.join("inside"), "x").unwrap();
    assert_eq!(before, snapshot(tmp.path(), &skip));
    fs::hard_link(tmp.path().join("marker"), root.join("link")).unwrap();
    assert_ne!(before, snapshot(tmp.path(), &skip));
    fs::remove_file(root.join("link")).unwrap();
    fs::write(tmp.path().join("new"), "").unwrap();
    assert_ne!(before, snapshot(tmp.path(), &skip));
}
