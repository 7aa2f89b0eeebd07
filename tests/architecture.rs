//! The engine's shape, as issue 14 left it: data flows one way (the
//! frontend and the plan import nothing of the executor or the builder,
//! the executor nothing of the builder), no engine file grows past about
//! 800 lines of non-test code, `lib.rs` exposes only its two modules, and
//! every file the README's "Design" section names exists.
use std::path::{Path, PathBuf};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn engine() -> PathBuf {
    Path::new(REPO).join("engine/src")
}

/// The lines of `path` that import from one of `forbidden` (`crate::exec`…).
fn imports(path: &Path, forbidden: &[&str]) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| forbidden.iter().any(|f| l.contains(f)))
        .map(|l| format!("{}: {}", path.display(), l.trim()))
        .collect()
}

#[test]
fn data_flows_one_way() {
    let mut wrong = Vec::new();
    let mut frontend = rust_files(&engine().join("dockerfile"));
    frontend.push(engine().join("plan.rs"));
    for file in &frontend {
        wrong.extend(imports(
            file,
            &["crate::exec", "crate::build", "super::exec", "super::build"],
        ));
    }
    for file in rust_files(&engine().join("exec")) {
        wrong.extend(imports(&file, &["crate::build", "super::build"]));
    }
    assert!(
        wrong.is_empty(),
        "imports against the flow:\n{}",
        wrong.join("\n")
    );
}

/// Lines before `#[cfg(test)] mod tests {`: a test module inline is not
/// counted, one in its own file is skipped by name.
fn non_test_lines(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .position(|w| w[0].starts_with("#[cfg(test)]") && w[1].starts_with("mod tests {"))
        .unwrap_or(lines.len())
}

#[test]
fn no_engine_file_is_a_room_of_its_own() {
    let big: Vec<String> = rust_files(&engine())
        .into_iter()
        .filter(|p| !p.ends_with("tests.rs"))
        .filter_map(|p| {
            let n = non_test_lines(&std::fs::read_to_string(&p).unwrap());
            (n > 800).then(|| format!("{}: {n} lines", p.display()))
        })
        .collect();
    assert!(big.is_empty(), "split these:\n{}", big.join("\n"));
}

#[test]
fn the_engine_exposes_only_its_api() {
    let lib = std::fs::read_to_string(engine().join("lib.rs")).unwrap();
    let public: Vec<&str> = lib.lines().filter(|l| l.starts_with("pub mod ")).collect();
    assert_eq!(
        public,
        [
            "pub mod dockerfile;",
            "pub mod output;",
            "pub mod provenance;",
            "pub mod bench {"
        ]
    );
    assert!(
        lib.contains("#[doc(hidden)]\npub mod bench"),
        "bench is hidden"
    );
}

#[test]
fn the_design_section_names_files_that_exist() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let design = &readme[readme.find("## Design").expect("a Design section")..];
    let mut named = 0;
    let mut missing = Vec::new();
    for row in design
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| To change"))
    {
        let cells: Vec<&str> = row.split('|').collect();
        let Some(where_) = cells.get(2) else { continue };
        // `a.rs`, `dir/` relative to engine/src, or cachestore/src/…
        for path in where_.split('`').skip(1).step_by(2) {
            if !(path.ends_with(".rs") || path.ends_with('/')) || path.contains(' ') {
                continue;
            }
            named += 1;
            let candidates = [
                engine().join(path),
                Path::new(REPO).join(path),
                Path::new(REPO).join("cachestore/src").join(path),
                engine().join("dockerfile").join(path),
                engine().join("rootfs/extract").join(path),
                engine().join("source").join(path),
            ];
            if !candidates.iter().any(|c| c.exists()) {
                missing.push(path.to_string());
            }
        }
    }
    assert!(named > 30, "the table names {named} files");
    assert!(missing.is_empty(), "named but absent: {missing:?}");
}
