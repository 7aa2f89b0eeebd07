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
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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

    fn insert(&mut self, path: PathBuf, meta: Meta) {
        self.0.insert(path.into_os_string().into_vec(), meta);
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

/// The paths of an empty view with a table (a base layer's) applied,
/// built in one go (a bulk build of the map from sorted keys) rather than
/// record by record; `Err` gives the table back when that would not give
/// what [`MetaView::apply`] gives.
impl TryFrom<LayerTable> for Paths {
    type Error = LayerTable;

    fn try_from(table: LayerTable) -> Result<Paths, LayerTable> {
        let Some(Bulk {
            order,
            implied,
            targets,
        }) = Bulk::of(&table.records)
        else {
            return Err(table);
        };
        let mut entries: Vec<Option<(Vec<u8>, Meta)>> = table
            .records
            .into_iter()
            .map(|record| match record {
                Record::Entry(path, meta) => Some((path.into_os_string().into_vec(), meta)),
                // Its target's meta is filled in below.
                Record::Link(path, _) => Some((path.into_os_string().into_vec(), implied_dir())),
                _ => None, // none, as `Bulk::of` checked
            })
            .collect();
        for (link, target) in targets {
            let meta = entries[target].as_ref().expect("an entry").1.clone();
            entries[link].as_mut().expect("a link").1 = meta;
        }
        let mut implied = implied.into_iter().peekable();
        let mut sorted = Vec::with_capacity(entries.len() + implied.len());
        for at in order {
            let (path, meta) = entries[at].take().expect("each entry is taken once");
            while let Some(dir) = implied.next_if(|dir| *dir < path) {
                sorted.push((dir, implied_dir()));
            }
            sorted.push((path, meta));
        }
        sorted.extend(implied.map(|dir| (dir, implied_dir())));
        // `from_iter` sorts what it is given (one pass over sorted input).
        Ok(Paths(sorted.into_iter().collect()))
    }
}

/// What an empty view is after a table is applied to it, when that is
/// just the table's entries and the directories they lie in that the
/// table does not list ([`implied_dir`]s).
struct Bulk {
    /// The entries' indices, in their paths' byte order.
    order: Vec<usize>,
    /// The implied directories, in byte order.
    implied: Vec<Vec<u8>>,
    /// Each hard link's index, and its target's.
    targets: Vec<(usize, usize)>,
}

impl Bulk {
    /// `None` when applying `records` to an empty view may make anything
    /// else: for a whiteout or opaque marker, a hard link to anything but
    /// a file (or other non-directory) listed before it, a path listed
    /// twice, one that does not resolve to itself by its form (an empty,
    /// `.` or `..` name), or one beneath a listed non-directory (which a
    /// symlink would redirect, and any other entry replace or refuse).
    fn of(records: &[Record]) -> Option<Bulk> {
        let mut paths = Vec::with_capacity(records.len());
        let mut links = Vec::new();
        for (at, record) in records.iter().enumerate() {
            let (path, is_dir) = match record {
                Record::Entry(path, meta) => (path, meta.kind == Kind::Dir),
                Record::Link(path, target) => {
                    links.push((at, target.as_os_str().as_bytes()));
                    (path, false)
                }
                _ => return None,
            };
            paths.push((path.as_os_str().as_bytes(), is_dir, at));
        }
        // In byte order a path comes before what lies under it, though
        // not always just before: `a-b` and what lies under it come
        // between `a` and `a/b`.
        paths.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut implied = Vec::new();
        // The listed or implied paths that the next ones may lie under,
        // and whether each is a directory: each a prefix of the one above
        // it, followed there by a byte no greater than '/'.
        let mut open: Vec<(&[u8], bool)> = Vec::new();
        for (i, &(path, is_dir, _)) in paths.iter().enumerate() {
            if i > 0 && paths[i - 1].0 == path {
                return None;
            }
            // What the next paths, greater than this one, cannot lie under.
            while let Some((top, _)) = open.last() {
                match path.get(top.len()) {
                    Some(b) if *b <= b'/' && path.starts_with(top) => break,
                    _ => open.pop(),
                };
            }
            // Its names past its nearest listed or implied parent (whose
            // own were checked with it) are checked here, and the
            // directories they name are implied.
            let from = match open.iter().rposition(|(p, _)| path[p.len()] == b'/') {
                Some(at) if !open[at].1 => return None,
                Some(at) => open[at].0.len() + 1,
                None => 0,
            };
            let mut end = from;
            for name in path[from..].split(|b| *b == b'/') {
                if matches!(name, b"" | b"." | b"..") {
                    return None;
                }
                if end > from {
                    let dir = &path[..end - 1];
                    implied.push(dir);
                    let at = open.partition_point(|(p, _)| p.len() < dir.len());
                    open.insert(at, (dir, true));
                }
                end += name.len() + 1;
            }
            open.push((path, is_dir));
        }
        // A hard link takes what its target is when it comes: an entry
        // (not a directory, not another link) listed before it, which
        // then resolves to itself as every listed path does.
        let mut targets = Vec::with_capacity(links.len());
        for (at, target) in links {
            let found = paths.binary_search_by(|p| p.0.cmp(target)).ok()?;
            let listed = paths[found].2;
            match &records[listed] {
                Record::Entry(_, meta) if listed < at && meta.kind != Kind::Dir => {
                    targets.push((at, listed))
                }
                _ => return None,
            }
        }
        implied.sort_unstable();
        Some(Bulk {
            order: paths.into_iter().map(|(_, _, at)| at).collect(),
            implied: implied.into_iter().map(<[u8]>::to_vec).collect(),
            targets,
        })
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
        // A base layer's table most often goes in in one go, several
        // times cheaper than record by record.
        let table = match self.paths.0.is_empty() {
            true => match Paths::try_from(table) {
                Ok(paths) => {
                    self.paths = paths;
                    return;
                }
                Err(table) => table,
            },
            false => table,
        };
        self.apply(table);
    }

    /// [`Self::push`], record by record.
    fn apply(&mut self, table: LayerTable) {
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
            let at = match self.resolves_to_itself(&path, false) {
                true => path, // kept, not copied
                false => self.walked(&path, false),
            };
            self.make_parents(&at);
            // Only a directory (or what stood where one was needed) has
            // children to go; a directory over a directory merges.
            match self.paths.get(&at).map(|m| m.kind) {
                Some(Kind::Dir) if meta.kind == Kind::Dir => {}
                Some(Kind::Dir | Kind::Unsupported) => self.remove_children(&at),
                _ => {}
            }
            self.paths.insert(at, meta);
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

    /// Missing parents are made as the extractor makes them (see
    /// [`implied_dir`]).
    fn make_parents(&mut self, path: &Path) {
        for parent in path.ancestors().skip(1) {
            if parent.as_os_str().is_empty() {
                break;
            }
            match self.paths.get(parent) {
                // Whatever holds a directory holds its parents too.
                Some(m) if m.kind == Kind::Dir => break,
                // A non-directory parent: the extractor fails; so does the view.
                Some(_) => self.paths.insert(parent.to_path_buf(), unsupported()),
                None => self.paths.insert(parent.to_path_buf(), implied_dir()),
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
        self.walked(path, follow_final)
    }

    /// [`Self::resolve`] of a path known not to resolve to itself.
    fn walked(&mut self, path: &Path, follow_final: bool) -> PathBuf {
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

/// A missing parent, as the extractor makes it: 0755, 0:0.
fn implied_dir() -> Meta {
    Meta {
        kind: Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        link: None,
        content: None,
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
    use proptest::prelude::*;

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

    fn entry(path: &str, kind: Kind, link: Option<&str>) -> Record {
        let meta = Meta {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            link: link.map(PathBuf::from),
            content: None,
        };
        Record::Entry(PathBuf::from(path), meta)
    }

    /// A table as the per-record path applies it.
    fn applied(records: Vec<Record>) -> MetaView {
        let mut v = MetaView::default();
        v.apply(LayerTable { records });
        v
    }

    #[test]
    fn a_base_table_is_built_in_one_go_only_when_that_is_what_applying_it_gives() {
        let dir = |p| entry(p, Kind::Dir, None);
        let file = |p| entry(p, Kind::File, None);
        let link = |p: &str, t: &str| Record::Link(p.into(), t.into());
        let not_in_one_go = [
            vec![file("a"), file("a")],
            vec![link("b", "a"), file("a")],
            vec![dir("a"), link("b", "a")],
            vec![file("a"), link("b", "a"), link("c", "b")],
            vec![file("a"), link("b", "c")],
            vec![file("a"), link("b", "./a")],
            vec![file("a"), link("b", "a"), file("b/c")],
            vec![file("a"), Record::Whiteout("b".into())],
            vec![dir("a"), Record::Opaque("a".into())],
            vec![entry("a", Kind::Symlink, Some("b")), file("a/c")],
            vec![file("a/c"), file("a")],
            vec![entry("a", Kind::Unsupported, None), file("a/c")],
            vec![file("a//c")],
            vec![file("a/./c")],
            vec![file("/a")],
            vec![file("")],
        ];
        for records in not_in_one_go {
            assert!(Bulk::of(&records).is_none(), "{records:?}");
        }
        // `a-b` between `a` and `a/c`, in byte order; `x` and `a` implied.
        let records = vec![
            file("a/c"),
            dir("a-b"),
            file("a-b/d"),
            file("x/y/z"),
            dir("x/y"),
            link("x/l", "a-b/d"),
        ];
        let per_record = applied(records.clone()).paths.0;
        let Ok(bulk) = Paths::try_from(LayerTable { records }) else {
            panic!("built in one go");
        };
        assert_eq!(bulk.0, per_record);
        assert_eq!(bulk[Path::new("x")], implied_dir());
        assert_eq!(bulk[Path::new("a")], implied_dir());
        assert_eq!(bulk[Path::new("x/y")].mode, 0o644);
        assert_eq!(bulk[Path::new("x/l")], bulk[Path::new("a-b/d")]);
    }

    /// Tables of paths that meet often: names that are prefixes of
    /// others, followed there by bytes on either side of '/', and now
    /// and then a name the view does not take as it stands.
    fn base_table() -> impl Strategy<Value = Vec<Record>> {
        let name = prop_oneof![
            8 => Just("a"),
            4 => Just("a-"),
            4 => Just("a0"),
            4 => Just("b"),
            1 => Just("."),
            1 => Just(""),
        ];
        let path = proptest::collection::vec(name, 1..4).prop_map(|names| names.join("/"));
        let kind = prop_oneof![
            6 => Just(Kind::Dir),
            3 => Just(Kind::File),
            1 => Just(Kind::Symlink),
            1 => Just(Kind::Unsupported),
        ];
        let target = prop_oneof![Just("a"), Just("/b"), Just("../a-"), Just("a/a")];
        // Records come in groups: mostly one, and now and then a file and
        // a hard link to it, so that links to what is there are met often.
        let group = prop_oneof![
            40 => (path.clone(), kind, target, 0..4u32).prop_map(|(p, kind, target, mode)| {
                let link = (kind == Kind::Symlink).then_some(target);
                let mut e = entry(&p, kind, link);
                if let Record::Entry(_, m) = &mut e {
                    m.mode = mode;
                }
                vec![e]
            }),
            2 => (path.clone(), path.clone())
                .prop_map(|(p, t)| vec![Record::Link(p.into(), t.into())]),
            4 => path.clone().prop_map(|p| {
                let link = Record::Link(format!("{p}0").into(), p.clone().into());
                vec![entry(&p, Kind::File, None), link]
            }),
            1 => path.clone().prop_map(|p| vec![Record::Whiteout(p.into())]),
            1 => path.prop_map(|p| vec![Record::Opaque(p.into())]),
        ];
        proptest::collection::vec(group, 1..10).prop_map(|groups| groups.concat())
    }

    #[test]
    fn a_base_table_built_in_one_go_is_the_table_applied_record_by_record() {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(4000));
        let (in_one_go, with_links) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        runner
            .run(&base_table(), |records| {
                let per_record = applied(records.clone());
                let links = records.iter().any(|r| matches!(r, Record::Link(..)));
                if let Ok(bulk) = Paths::try_from(LayerTable { records }) {
                    prop_assert_eq!(bulk.0, per_record.paths.0);
                    prop_assert!(per_record.looped.is_none());
                    in_one_go.set(in_one_go.get() + 1);
                    with_links.set(with_links.get() + usize::from(links));
                }
                Ok(())
            })
            .unwrap();
        // Enough of them were compared, hard links among them.
        assert!(in_one_go.get() > 400, "{} built in one go", in_one_go.get());
        assert!(with_links.get() > 60, "{} with links", with_links.get());
    }
}
