//! A metadata view of a stack of layers: what each path is (type, mode,
//! owner, mtime, link target), read from the layers' tar headers without
//! unpacking them, whiteouts and opaque markers applied as the extractor
//! applies them. A COPY-only step is built on a sparse root that the view
//! puts on disk: only the paths the step can reach (its destinations with
//! their parents, what symlinks there lead to, and the image's
//! /etc/passwd and /etc/group), with the image's metadata, regular files
//! empty. The step then runs and is snapshotted there as on a full root,
//! so its layer is the one the unpacked path writes.
//!
//! Each layer's table is read once and cached in the index by diff_id.
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::{clean_relative, owners};

mod codec;

/// Files whose content the view keeps: USER, WORKDIR and `--chown` names
/// are resolved against them.
const KEPT_CONTENT: &[&str] = &["etc/passwd", "etc/group"];
/// Larger kept files are left out: the step then falls back.
const KEPT_MAX: u64 = 1 << 20;

/// What the view cannot put on disk faithfully; the step is built on an
/// unpacked root instead.
#[derive(Debug, thiserror::Error)]
pub enum Unservable {
    #[error("reading the layer's headers: {0}")]
    Tar(#[from] io::Error),
    #[error("{0}: a {1} the metadata view does not reproduce")]
    Entry(PathBuf, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    /// Devices, fifos, and files with xattrs or content the view lacks.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    /// A symlink's target.
    link: Option<PathBuf>,
    /// [`KEPT_CONTENT`] files' content.
    content: Option<Vec<u8>>,
}

/// One record of a layer's tar, in the layer's order.
#[derive(Debug, Clone, PartialEq)]
enum Record {
    Entry(PathBuf, Meta),
    /// A hard link to an earlier path.
    Link(PathBuf, PathBuf),
    Whiteout(PathBuf),
    Opaque(PathBuf),
}

/// A layer's records, as cached in the index.
#[derive(Debug, Clone, Default)]
pub struct LayerTable {
    records: Vec<Record>,
}

impl LayerTable {
    /// Reads the headers of an uncompressed layer tar (content is skipped,
    /// except [`KEPT_CONTENT`]'s).
    pub fn read(layer: impl Read) -> Result<LayerTable, Unservable> {
        let mut archive = tar::Archive::new(layer);
        let mut records = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let Some(path) = clean(&entry.path_bytes()) else {
                return Err(Unservable::Entry(
                    PathBuf::from(OsStr::from_bytes(&entry.path_bytes())),
                    "path",
                ));
            };
            if path.as_os_str().is_empty() {
                continue; // the root's own entry
            }
            let name = path.file_name().unwrap_or_default().as_bytes().to_vec();
            let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
            if name == b".wh..wh..opq" {
                records.push(Record::Opaque(parent));
                continue;
            }
            if name.starts_with(b".wh..wh.") {
                continue; // AUFS metadata, skipped by the extractor too
            }
            if let Some(hidden) = name.strip_prefix(b".wh.") {
                records.push(Record::Whiteout(parent.join(OsStr::from_bytes(hidden))));
                continue;
            }
            let header = entry.header().clone();
            let (mut uid, mut gid) = (header.uid()? as u32, header.gid()? as u32);
            let mut mtime = header.mtime()? as i64;
            let mut xattrs = false;
            if let Some(pax) = entry.pax_extensions()? {
                for ext in pax.flatten() {
                    let value = ext.value().unwrap_or_default();
                    match ext.key_bytes() {
                        b"uid" => uid = value.parse().unwrap_or(uid),
                        b"gid" => gid = value.parse().unwrap_or(gid),
                        b"mtime" => {
                            let secs = value.split('.').next().unwrap_or_default();
                            mtime = secs.parse().unwrap_or(mtime);
                        }
                        k if k.starts_with(b"SCHILY.xattr.") => xattrs = true,
                        _ => {}
                    }
                }
            }
            let link = entry.link_name()?.map(|l| l.into_owned());
            let kind = match header.entry_type() {
                _ if xattrs => Kind::Unsupported,
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Symlink => Kind::Symlink,
                tar::EntryType::Link => {
                    let target = link
                        .as_deref()
                        .and_then(|l| clean(l.as_os_str().as_bytes()));
                    match target {
                        Some(target) => records.push(Record::Link(path, target)),
                        None => return Err(Unservable::Entry(path, "hard link")),
                    }
                    continue;
                }
                t if t.is_pax_global_extensions() || t.is_gnu_longname() => continue,
                _ => Kind::Unsupported,
            };
            let mut content = None;
            if kind == Kind::File && KEPT_CONTENT.iter().any(|k| path == Path::new(k)) {
                if entry.size() > KEPT_MAX {
                    return Err(Unservable::Entry(path, "large user database"));
                }
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes)?;
                content = Some(bytes);
            }
            let meta = Meta {
                kind,
                mode: header.mode()? & 0o7777,
                uid,
                gid,
                mtime,
                link: (kind == Kind::Symlink).then_some(link).flatten(),
                content,
            };
            records.push(Record::Entry(path, meta));
        }
        Ok(LayerTable { records })
    }

    /// The table as stored in the index (see `codec`).
    pub fn to_bytes(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// `None` for bytes [`Self::to_bytes`] did not make, or made in
    /// another format (an older build's): the caller reads the table
    /// from the layer again.
    pub fn from_bytes(bytes: &[u8]) -> Option<LayerTable> {
        codec::decode(bytes)
    }
}

/// A tar name as the extractor takes it: relative, `.` and leading `/`
/// dropped; `None` when `..` climbs above the root.
fn clean(name: &[u8]) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(name)).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir if !out.pop() => return None,
            _ => {}
        }
    }
    Some(out)
}

/// The view's paths, keyed by their bytes: comparing bytes is far cheaper
/// than comparing `Path`s component by component, and a base's table puts
/// tens of thousands of them in the map, each looked up several times.
#[derive(Debug, Default, Clone)]
struct Paths(BTreeMap<Vec<u8>, Meta>);

impl Paths {
    fn get(&self, path: &Path) -> Option<&Meta> {
        self.0.get(path.as_os_str().as_bytes())
    }

    fn insert(&mut self, path: &Path, meta: Meta) {
        self.0.insert(path.as_os_str().as_bytes().to_vec(), meta);
    }

    fn remove(&mut self, path: &Path) {
        self.0.remove(path.as_os_str().as_bytes());
    }

    /// Every path under `dir` (not `dir` itself): in byte order, the keys
    /// from `dir/` up to `dir0` (`0` follows `/`), or all below the root.
    fn children<'a>(&'a self, dir: &Path) -> impl Iterator<Item = (&'a Path, &'a Meta)> {
        use std::ops::Bound;
        let dir = dir.as_os_str().as_bytes();
        let range = match dir.is_empty() {
            true => (Bound::Unbounded, Bound::Unbounded),
            false => {
                let (mut from, mut to) = (dir.to_vec(), dir.to_vec());
                from.push(b'/');
                to.push(b'0');
                (Bound::Included(from), Bound::Excluded(to))
            }
        };
        self.0
            .range(range)
            .map(|(k, m)| (Path::new(OsStr::from_bytes(k)), m))
    }
}

#[cfg(test)]
impl std::ops::Index<&Path> for Paths {
    type Output = Meta;
    fn index(&self, path: &Path) -> &Meta {
        self.get(path).expect("a path in the view")
    }
}

/// The merged view of a stack of layers.
#[derive(Debug, Default, Clone)]
pub struct MetaView {
    paths: Paths,
    /// A path whose symlinks loop, met applying a layer.
    looped: Option<PathBuf>,
}

impl MetaView {
    /// Applies one more layer over the view, as the extractor applies it:
    /// whiteouts and opaque markers remove only what lower layers had.
    pub fn push(&mut self, table: LayerTable) {
        for record in &table.records {
            match record {
                Record::Whiteout(path) => {
                    let at = self.resolve_parent(path);
                    self.paths.remove(&at);
                    self.remove_children(&at);
                }
                Record::Opaque(dir) => {
                    let at = self.resolve(dir, true);
                    if self.paths.get(&at).is_some_and(|m| m.kind == Kind::Dir) {
                        self.remove_children(&at);
                    }
                }
                _ => {}
            }
        }
        for record in table.records {
            let (path, meta) = match record {
                Record::Entry(path, meta) => (path, meta),
                Record::Link(path, target) => {
                    let target = self.resolve_parent(&target);
                    match self.paths.get(&target) {
                        Some(meta) => (path, meta.clone()),
                        // The extractor refuses it; so does the view.
                        None => (path, unsupported()),
                    }
                }
                _ => continue,
            };
            let at = self.resolve_parent(&path);
            self.make_parents(&at);
            // Only a directory (or what stood where one was needed) has
            // children to go; a directory over a directory merges.
            match self.paths.get(&at).map(|m| m.kind) {
                Some(Kind::Dir) if meta.kind == Kind::Dir => {}
                Some(Kind::Dir | Kind::Unsupported) => self.remove_children(&at),
                _ => {}
            }
            self.paths.insert(&at, meta);
        }
    }

    /// Whether resolving `path` in the view is `path` itself: it is
    /// relative, with no `.`, `..` or empty component, and no symlink on
    /// it (nor at its end, with `follow_final`). True for most of a
    /// table's paths, and far cheaper than [`Self::walk`].
    fn resolves_to_itself(&self, path: &Path, follow_final: bool) -> bool {
        let bytes = path.as_os_str().as_bytes();
        // An absolute or empty path starts with an empty name.
        let mut end = 0;
        for (i, name) in bytes.split(|b| *b == b'/').enumerate() {
            if name.is_empty() || name == b"." || name == b".." {
                return false;
            }
            end += usize::from(i > 0) + name.len();
            let prefix = Path::new(OsStr::from_bytes(&bytes[..end]));
            let last = end == bytes.len();
            if (!last || follow_final)
                && self
                    .paths
                    .get(prefix)
                    .is_some_and(|m| m.kind == Kind::Symlink)
            {
                return false;
            }
        }
        true
    }

    /// Missing parents are made as the extractor makes them: 0755, 0:0.
    fn make_parents(&mut self, path: &Path) {
        for parent in path.ancestors().skip(1) {
            if parent.as_os_str().is_empty() {
                break;
            }
            match self.paths.get(parent) {
                // Whatever holds a directory holds its parents too.
                Some(m) if m.kind == Kind::Dir => break,
                // A non-directory parent: the extractor fails; so does the view.
                Some(_) => {
                    self.paths.insert(parent, unsupported());
                }
                None => {
                    let dir = Meta {
                        kind: Kind::Dir,
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        link: None,
                        content: None,
                    };
                    self.paths.insert(parent, dir);
                }
            }
        }
    }

    fn remove_children(&mut self, dir: &Path) {
        let children: Vec<PathBuf> = self
            .paths
            .children(dir)
            .map(|(p, _)| p.to_path_buf())
            .collect();
        for child in children {
            self.paths.remove(&child);
        }
    }

    /// `path` with the links of its parents followed inside the image.
    fn resolve_parent(&mut self, path: &Path) -> PathBuf {
        self.resolve(path, false)
    }

    /// `path` resolved as [`super::resolve_in_root`] resolves it on an
    /// unpacked root. A symlink loop, which the extractor refuses, leaves
    /// the view unable to serve (see [`Self::materialize`]).
    fn resolve(&mut self, path: &Path, follow_final: bool) -> PathBuf {
        if self.resolves_to_itself(path, follow_final) {
            return path.to_path_buf();
        }
        match self.walk(path, follow_final, &mut |_| {}) {
            Ok(resolved) => resolved,
            Err(_) => {
                self.looped.get_or_insert_with(|| path.to_path_buf());
                clean_relative(path)
            }
        }
    }

    /// Resolves `path` in the view, calling `seen` with each path of the
    /// image it looks at on the way.
    fn walk(
        &self,
        path: &Path,
        follow_final: bool,
        seen: &mut dyn FnMut(&Path),
    ) -> io::Result<PathBuf> {
        let resolved = super::resolve_links(path, follow_final, |candidate| {
            seen(candidate);
            Ok(self
                .paths
                .get(candidate)
                .filter(|m| m.kind == Kind::Symlink)
                .map(|m| m.link.clone().unwrap_or_default()))
        })?;
        if !follow_final && !resolved.as_os_str().is_empty() {
            seen(&resolved); // the last component, not asked of `link`
        }
        Ok(resolved)
    }

    /// Puts on `root` (an empty directory) what a step writing at `dests`
    /// (absolute paths in the image) can reach: each destination's path
    /// with the links on it, the whole tree under it when it is a
    /// directory, what links in there lead to, and the user databases.
    /// Fails, before the step runs, on what it cannot reproduce.
    pub fn materialize(&self, root: &Path, dests: &[PathBuf]) -> Result<(), Unservable> {
        if let Some(path) = &self.looped {
            return Err(Unservable::Entry(path.clone(), "symlink loop"));
        }
        let mut wanted: Vec<PathBuf> = Vec::new();
        let mut queue: Vec<PathBuf> = dests.to_vec();
        queue.extend(KEPT_CONTENT.iter().map(PathBuf::from));
        let mut done = HashSet::new();
        while let Some(dest) = queue.pop() {
            if !done.insert(dest.clone()) {
                continue;
            }
            let end = self
                .walk(&dest, true, &mut |p| wanted.push(p.to_path_buf()))
                .map_err(|_| Unservable::Entry(dest.clone(), "symlink loop"))?;
            let is_dir = self.paths.get(&end).is_some_and(|m| m.kind == Kind::Dir);
            if !is_dir && !end.as_os_str().is_empty() {
                continue;
            }
            for (path, meta) in self.paths.children(&end) {
                wanted.push(path.to_path_buf());
                if meta.kind == Kind::Symlink {
                    // Where a link in the tree leads, relative to its directory.
                    let parent = path.parent().unwrap_or(Path::new(""));
                    let target = meta.link.clone().unwrap_or_default();
                    queue.push(Path::new("/").join(parent).join(target));
                }
            }
        }
        // Every wanted path with its parents, parents first.
        let mut all: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
        for path in wanted {
            for p in path.ancestors() {
                if p.as_os_str().is_empty() || !all.insert(p.to_path_buf()) {
                    break;
                }
            }
        }
        let recorded = owners::recorded();
        let mut made = Vec::new();
        for path in &all {
            let Some(meta) = self.paths.get(path) else {
                continue; // not in the image
            };
            make(root, path, meta, recorded)?;
            made.push((path, meta));
        }
        // Times last, children first: writing into a directory changes it.
        for (path, meta) in made.iter().rev() {
            set_mtime(&root.join(path), meta.mtime).map_err(|e| io_at(root, path, e))?;
        }
        Ok(())
    }
}

fn unsupported() -> Meta {
    Meta {
        kind: Kind::Unsupported,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
        link: None,
        content: None,
    }
}

fn io_at(root: &Path, path: &Path, e: io::Error) -> Unservable {
    Unservable::Tar(io::Error::new(
        e.kind(),
        format!("{}: {e}", root.join(path).display()),
    ))
}

/// Makes one entry of the sparse root with the image's metadata.
fn make(root: &Path, path: &Path, meta: &Meta, recorded: bool) -> Result<(), Unservable> {
    let host = root.join(path);
    let io = |e| io_at(root, path, e);
    match meta.kind {
        Kind::Dir => std::fs::create_dir(&host).map_err(io)?,
        Kind::File => {
            std::fs::write(&host, meta.content.as_deref().unwrap_or_default()).map_err(io)?
        }
        Kind::Symlink => {
            let target = meta.link.as_deref().unwrap_or(Path::new(""));
            std::os::unix::fs::symlink(target, &host).map_err(io)?;
            if !recorded {
                std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid)).map_err(io)?;
            }
            return Ok(());
        }
        Kind::Unsupported => return Err(Unservable::Entry(path.to_path_buf(), "special file")),
    }
    let is_dir = meta.kind == Kind::Dir;
    match recorded {
        true => {
            let stat = owners::Stat {
                uid: meta.uid,
                gid: meta.gid,
                mode: meta.mode,
            };
            owners::set(host.as_path(), stat, is_dir).map_err(io)?
        }
        false => {
            std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid)).map_err(io)?;
            let perms = std::os::unix::fs::PermissionsExt::from_mode(meta.mode);
            std::fs::set_permissions(&host, perms).map_err(io)?;
        }
    }
    Ok(())
}

fn set_mtime(host: &Path, secs: i64) -> io::Result<()> {
    let at = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        host,
        &rustix::fs::Timestamps {
            last_access: at,
            last_modification: at,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(entries: &[(&str, tar::EntryType, u32, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, mode, link) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_size(0);
            h.set_mtime(1000);
            h.set_uid(0);
            h.set_gid(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            b.append_data(&mut h, name, io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn view(layers: &[Vec<u8>]) -> MetaView {
        let mut v = MetaView::default();
        for l in layers {
            v.push(LayerTable::read(&l[..]).unwrap());
        }
        v
    }

    #[test]
    fn whiteouts_opaque_dirs_and_links_merge_as_the_extractor_applies_them() {
        use tar::EntryType::*;
        let mut v = view(&[
            tar(&[
                ("usr/bin/", Directory, 0o755, ""),
                ("usr/bin/a", Regular, 0o755, ""),
                ("usr/local/", Directory, 0o700, ""),
                ("usr/local/bin", Symlink, 0o777, "/usr/bin"),
                ("opt/x/", Directory, 0o755, ""),
                ("opt/x/old", Regular, 0o644, ""),
                ("gone", Regular, 0o644, ""),
            ]),
            tar(&[
                ("usr/local/bin/b", Regular, 0o750, ""),
                (".wh.gone", Regular, 0, ""),
                ("opt/x/new", Regular, 0o600, ""),
                ("opt/x/.wh..wh..opq", Regular, 0, ""),
            ]),
        ]);
        // Written through the link, into /usr/bin.
        assert_eq!(v.paths[Path::new("usr/bin/b")].mode, 0o750);
        assert!(v.paths.get(Path::new("gone")).is_none());
        assert!(v.paths.get(Path::new("opt/x/old")).is_none());
        assert!(v.paths.get(Path::new("opt/x/new")).is_some());
        assert_eq!(
            v.resolve(Path::new("/usr/local/bin/c"), true),
            Path::new("usr/bin/c")
        );
    }

    #[test]
    fn an_entry_replaces_what_stood_there_as_the_extractor_replaces_it() {
        use tar::EntryType::*;
        let v = view(&[
            tar(&[
                ("data/", Directory, 0o755, ""),
                ("data/deep/", Directory, 0o755, ""),
                ("data/deep/f", Regular, 0o644, ""),
                ("keep/", Directory, 0o700, ""),
                ("keep/old", Regular, 0o644, ""),
                ("file", Regular, 0o644, ""),
                ("lnk", Symlink, 0o777, "keep"),
            ]),
            tar(&[
                // A file over a directory: its tree goes.
                ("data", Regular, 0o600, ""),
                // A directory over a directory: merged, the new mode.
                ("keep/", Directory, 0o750, ""),
                ("keep/new", Regular, 0o644, ""),
                // A directory over a file, and a link over a link.
                ("file/", Directory, 0o711, ""),
                ("lnk", Symlink, 0o777, "file"),
                // Through the new link: into the new directory.
                ("lnk/inner", Regular, 0o640, ""),
            ]),
        ]);
        assert_eq!(v.paths[Path::new("data")].kind, Kind::File);
        assert!(v.paths.get(Path::new("data/deep")).is_none());
        assert!(v.paths.get(Path::new("data/deep/f")).is_none());
        assert_eq!(v.paths[Path::new("keep")].mode, 0o750);
        assert!(v.paths.get(Path::new("keep/old")).is_some());
        assert!(v.paths.get(Path::new("keep/new")).is_some());
        assert_eq!(v.paths[Path::new("file")].kind, Kind::Dir);
        assert_eq!(v.paths[Path::new("lnk")].link, Some(PathBuf::from("file")));
        assert_eq!(v.paths[Path::new("file/inner")].mode, 0o640);
        assert!(v.paths.get(Path::new("lnk/inner")).is_none());
    }

    #[test]
    fn materializing_puts_the_reachable_paths_on_disk_with_their_metadata() {
        use std::os::unix::fs::MetadataExt;
        use tar::EntryType::*;
        let v = view(&[tar(&[
            ("usr/bin/", Directory, 0o751, ""),
            ("usr/bin/a", Regular, 0o755, ""),
            ("usr/local/bin", Symlink, 0o777, "../bin"),
            ("srv/", Directory, 0o700, ""),
            ("srv/unrelated", Regular, 0o644, ""),
        ])]);
        let dir = tempfile::tempdir().unwrap();
        v.materialize(dir.path(), &[PathBuf::from("/usr/local/bin/")])
            .unwrap();
        let root = dir.path();
        assert_eq!(
            std::fs::read_link(root.join("usr/local/bin")).unwrap(),
            Path::new("../bin")
        );
        let bin = std::fs::metadata(root.join("usr/bin")).unwrap();
        assert_eq!(bin.mode() & 0o7777, 0o751);
        assert_eq!(bin.mtime(), 1000);
        assert!(root.join("usr/bin/a").exists());
        assert!(!root.join("srv").exists());
    }

    #[test]
    fn a_symlink_loop_leaves_the_view_unable_to_serve_as_the_extractor_refuses_it() {
        use tar::EntryType::*;
        let links = tar(&[("a", Symlink, 0o777, "b"), ("b", Symlink, 0o777, "a")]);
        let dir = tempfile::tempdir().unwrap();
        // Reaching the loop while materializing.
        let v = view(std::slice::from_ref(&links));
        let e = v.materialize(dir.path(), &[PathBuf::from("/a/x")]);
        assert!(matches!(e, Err(Unservable::Entry(p, "symlink loop")) if p == Path::new("/a/x")));
        // Writing through it in a later layer.
        let v = view(&[links, tar(&[("a/x", Regular, 0o644, "")])]);
        let e = v.materialize(dir.path(), &[PathBuf::from("/srv/")]);
        assert!(matches!(e, Err(Unservable::Entry(_, "symlink loop"))));
    }
}
