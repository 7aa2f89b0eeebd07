//! The bench scripts, end to end, as smoke runs (no time is asserted).
//! The README's comparison with buildah is the report `benches/compare.sh`
//! wrote, unedited: the script puts it there itself (one run of one
//! scenario here, into a copy of the README), and every median and ratio in
//! it follows from the raw times it lists. `benches/profile.sh` profiles a
//! rebuild down to Kiln's own functions.
mod support;

use std::path::Path;
use std::process::Command;

use support::*;

const BEGIN: &str = "<!-- compare.sh: begin -->";
const END: &str = "<!-- compare.sh: end -->";

/// What lies between the markers, and what lies around them.
fn split(readme: &str) -> (&str, &str, &str) {
    let start = readme.find(BEGIN).expect("README has the begin marker") + BEGIN.len();
    let end = readme.find(END).expect("README has the end marker");
    (&readme[..start], readme[start..end].trim(), &readme[end..])
}

/// The median as the script computes it: the middle run, or the mean of
/// the two middle ones.
fn median(runs: &mut [f64]) -> f64 {
    runs.sort_by(f64::total_cmp);
    let n = runs.len();
    match n % 2 {
        1 => runs[n / 2],
        _ => (runs[n / 2 - 1] + runs[n / 2]) / 2.0,
    }
}

/// The times listed after `label:` in a row's last cell.
fn runs(cell: &str, label: &str) -> Vec<f64> {
    let after = cell
        .split(';')
        .find_map(|part| part.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label} runs in {cell:?}"));
    after
        .split_whitespace()
        .take_while(|w| *w != "none")
        .map(|w| w.parse().unwrap_or_else(|_| panic!("{w:?} in {cell:?}")))
        .collect()
}

/// Checks every result row (workload, scenario, Kiln, buildah, ratio, runs)
/// against its raw runs; returns how many rows there were.
fn check_rows(report: &str) -> usize {
    let mut rows = 0;
    for line in report.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 6 || cells[0] == "workload" {
            continue;
        }
        let kiln = median(&mut runs(cells[5], "kiln:"));
        assert_eq!(format!("{kiln:.3}"), cells[2], "{line}");
        let mut buildah_runs = runs(cells[5], "buildah:");
        if buildah_runs.is_empty() {
            assert_eq!((cells[3], cells[4]), ("n/a", "n/a"), "{line}");
        } else {
            let buildah = median(&mut buildah_runs);
            assert_eq!(format!("{buildah:.3}"), cells[3], "{line}");
            let (k, b): (f64, f64) = (cells[2].parse().unwrap(), cells[3].parse().unwrap());
            assert_eq!(format!("{:.2}×", k / b), cells[4], "{line}");
        }
        rows += 1;
    }
    rows
}

#[test]
fn the_readme_shows_the_last_report_unedited() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let latest =
        std::fs::read_to_string(Path::new(REPO).join("benches/results/latest.md")).unwrap();
    let (_, block, _) = split(&readme);
    assert_eq!(block, latest.trim(), "README differs from latest.md");
    // Every workload and scenario the issue asks for.
    assert!(check_rows(block) >= 16, "{block}");
    for target in ["no-change", "one-file-change", "remote-cache", "cold build"] {
        assert!(block.contains(target), "no {target} target in {block}");
    }
}

#[test]
fn compare_sh_writes_its_report_into_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let readme = dir.path().join("README.md");
    let original = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    std::fs::write(&readme, &original).unwrap();
    let out = run_ok(
        Command::new(Path::new(REPO).join("benches/compare.sh"))
            .args([
                "--runs",
                "1",
                "--only",
                "anchor5",
                "--scenarios",
                "nochange",
            ])
            .arg("--out")
            .arg(dir.path().join("latest.md"))
            .arg("--readme")
            .arg(&readme)
            .env("KILN", KILN),
    );
    let report = std::fs::read_to_string(dir.path().join("latest.md")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), report.trim());
    let written = std::fs::read_to_string(&readme).unwrap();
    let (before, block, after) = split(&written);
    assert_eq!(block, report.trim());
    // Only the block changed.
    let (old_before, _, old_after) = split(&original);
    assert_eq!((before, after), (old_before, old_after));
    assert_eq!(check_rows(block), 1, "{block}");
    assert!(block.contains("| anchor5 | nochange |"), "{block}");
    assert!(
        block.contains("| no-change rebuild ≤ 0.25× | met: anchor5 ")
            || block.contains("| no-change rebuild ≤ 0.25× | **missed**: anchor5 "),
        "{block}"
    );
}

#[test]
fn profile_sh_profiles_a_rebuild_down_to_kilns_functions() {
    let out = run_ok(
        Command::new(Path::new(REPO).join("benches/profile.sh")).args(["--quick", "--kiln", KILN]),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let (stat, calls) = report
        .split_once("-- with children")
        .unwrap_or_else(|| panic!("no call-graph section in {report}"));
    assert!(stat.contains("task-clock"), "{report}");
    // Call graphs reach into the engine (release builds keep debug info).
    assert!(
        calls.contains("kiln_engine::build::Builder::build"),
        "{report}"
    );
}
