//! The bench scripts, end to end, as smoke runs (no time is asserted).
//! The README's comparison with buildah and BuildKit is the report `benches/compare.sh`
//! wrote, unedited: the script puts it there itself (one run of one
//! scenario here, into a copy of the README), and every median and ratio in
//! it follows from the raw times it lists. `benches/profile.sh` profiles a
//! rebuild down to Kiln's own functions: the build code is on the sampled
//! call chains, whatever its functions are called.
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

/// The median of a peer's runs and the ratio cell against it, checked; the
/// median, or None when the row has no runs of that peer.
fn check_peer(line: &str, kiln: f64, cells: (&str, &str), runs_of: Vec<f64>) -> Option<f64> {
    let (median_cell, ratio_cell) = cells;
    if runs_of.is_empty() {
        assert_eq!((median_cell, ratio_cell), ("n/a", "n/a"), "{line}");
        return None;
    }
    let peer = median(&mut runs_of.clone());
    assert_eq!(format!("{peer:.3}"), median_cell, "{line}");
    let k: f64 = format!("{kiln:.3}").parse().unwrap();
    let p: f64 = median_cell.parse().unwrap();
    assert_eq!(format!("{:.2}×", k / p), ratio_cell, "{line}");
    Some(p)
}

/// One result row: workload, scenario, and the medians Kiln, buildah and
/// BuildKit (None where a peer did not run).
struct Row<'a> {
    workload: &'a str,
    scenario: &'a str,
    kiln: f64,
    buildah: Option<f64>,
    buildkit: Option<f64>,
}

/// Every result row (workload, scenario, Kiln, buildah, BuildKit, the two
/// ratios, runs), each checked against its raw runs.
fn rows(report: &str) -> Vec<Row<'_>> {
    let mut rows = Vec::new();
    for line in report.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() != 8 || cells[0] == "workload" {
            continue;
        }
        let kiln = median(&mut runs(cells[7], "kiln:"));
        assert_eq!(format!("{kiln:.3}"), cells[2], "{line}");
        let buildah = check_peer(line, kiln, (cells[3], cells[5]), runs(cells[7], "buildah:"));
        let buildkit = check_peer(
            line,
            kiln,
            (cells[4], cells[6]),
            runs(cells[7], "buildkit:"),
        );
        rows.push(Row {
            workload: cells[0],
            scenario: cells[1],
            kiln: cells[2].parse().unwrap(),
            buildah,
            buildkit,
        });
    }
    rows
}

/// The verdict the script should give: "met" when `ok`.
fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// The peer median a ratio target compares with: buildah, BuildKit or the
/// faster of the two.
fn peer_of(row: &Row, peer: &str) -> Option<f64> {
    match peer {
        "buildah" => row.buildah,
        "BuildKit" => row.buildkit,
        "the faster peer" => [row.buildah, row.buildkit]
            .into_iter()
            .flatten()
            .reduce(f64::min),
        other => panic!("unknown peer {other:?}"),
    }
}

/// Recomputes every target row ("| target | met: ... |") from the measured
/// times in the same report and checks the verdict and the list the report
/// gives; returns how many target rows there were. A ratio target
/// ("SCENARIO-TEXT ≤ LIMIT× PEER") is met when the worst Kiln/peer ratio of
/// its scenario (the medians' quotient, to 6 decimals, as the script
/// compares it) is within its limit.
fn check_targets(report: &str) -> usize {
    let scenarios = [
        ("no-change rebuild ≤ ", "nochange"),
        ("one-file-change rebuild ≤ ", "onefile"),
        ("remote-cache rebuild ≤ ", "remote"),
        ("cold build ≤ ", "cold"),
    ];
    let all = rows(report);
    let mut targets = 0;
    for line in report.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [target, result] = cells[..] else {
            continue;
        };
        let Some((said, detail)) = result
            .split_once(": ")
            .filter(|(v, _)| ["met", "**missed**"].contains(v))
        else {
            continue; // the phases table
        };
        let expected = if let Some((rest, scenario)) = scenarios
            .iter()
            .find_map(|(prefix, sc)| Some((target.strip_prefix(prefix)?, *sc)))
        {
            let (limit, peer) = rest.split_once("× ").unwrap();
            let limit: f64 = limit.parse().unwrap();
            let measured: Vec<(&str, f64)> = all
                .iter()
                .filter(|r| r.scenario == scenario)
                .filter_map(|r| {
                    let p = peer_of(r, peer)?;
                    Some((
                        r.workload,
                        format!("{:.6}", r.kiln / p).parse::<f64>().unwrap(),
                    ))
                })
                .collect();
            assert!(!measured.is_empty(), "no {scenario} rows for {line}");
            let worst = measured.iter().map(|(_, q)| *q).fold(0.0, f64::max);
            let mut listed: Vec<String> = measured
                .iter()
                .map(|(w, q)| format!("{w} {q:.2}×"))
                .collect();
            listed.sort();
            assert_eq!(detail, listed.join(", "), "{line}");
            verdict(worst <= limit)
        } else if target.starts_with("a RUN touching one file in a 100k-file root") {
            // The run phase's median is not in the table; the verdict
            // must at least follow from the time the row gives.
            let s: f64 = detail.split(" s ").next().unwrap().parse().unwrap();
            verdict(s <= 0.3)
        } else if let Some((workload, limit)) = [
            ("Debian no-change rebuild < 0.2 s", ("debian", 0.2 - 1e-9)),
            ("anchor6 no-change rebuild ≤ 0.020 s", ("anchor6", 0.020)),
        ]
        .iter()
        .find_map(|(prefix, v)| target.starts_with(prefix).then_some(*v))
        {
            let row = all
                .iter()
                .find(|r| r.workload == workload && r.scenario == "nochange")
                .unwrap_or_else(|| panic!("no {workload} nochange row for {line}"));
            assert_eq!(detail, format!("{:.3} s", row.kiln), "{line}");
            verdict(row.kiln <= limit)
        } else if target
            .starts_with("apt remote-cache rebuild pulls no layer but the final image's")
        {
            // "other layers held O bytes; P bytes pulled in all, the final
            // image's layers F bytes": met when no other layer was pulled.
            let numbers: Vec<u64> = detail
                .split_whitespace()
                .filter_map(|w| w.trim_end_matches([',', ';']).parse().ok())
                .collect();
            let [other, _pulled, _layers] = numbers[..] else {
                panic!("three byte counts in {line}");
            };
            verdict(other == 0)
        } else {
            panic!("a target this test cannot check: {line}");
        };
        assert_eq!(said, expected, "{line}");
        targets += 1;
    }
    targets
}

#[test]
fn the_readme_shows_the_last_report_unedited() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let latest =
        std::fs::read_to_string(Path::new(REPO).join("benches/results/latest.md")).unwrap();
    let (_, block, _) = split(&readme);
    assert_eq!(block, latest.trim(), "README differs from latest.md");
    // The last run covered anchor5 and anchor6 (7 rows, 7 targets); a
    // full run with --debian gives 24 rows and 9 targets.
    assert!(rows(block).len() >= 7, "{block}");
    assert!(check_targets(block) >= 7, "{block}");
    for target in [
        "no-change",
        "one-file-change",
        "remote-cache",
        "cold build",
        "BuildKit",
    ] {
        assert!(block.contains(target), "no {target} target in {block}");
    }
}

#[test]
fn a_verdict_the_ratios_do_not_give_is_caught() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let (_, block, _) = split(&readme);
    assert_a_flipped_verdict_is_caught(block, |b| {
        check_targets(b);
    });
}

/// Flips the first verdict in `block` (met <-> missed) and asserts that
/// `check` rejects the result.
fn assert_a_flipped_verdict_is_caught(
    block: &str,
    check: impl Fn(&str) + std::panic::RefUnwindSafe,
) {
    let line = block
        .lines()
        .find(|l| l.contains("| met: ") || l.contains("| **missed**: "))
        .expect("a target row");
    let flipped = match line.contains("| met: ") {
        true => line.replace("| met: ", "| **missed**: "),
        false => line.replace("| **missed**: ", "| met: "),
    };
    let forged = block.replace(line, &flipped);
    let caught = std::panic::catch_unwind(|| check(&forged));
    assert!(caught.is_err(), "{flipped} passed the check");
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
    let measured = rows(block);
    assert_eq!(measured.len(), 1, "{block}");
    // Both peers ran beside Kiln.
    let row = &measured[0];
    assert_eq!(
        (row.workload, row.scenario),
        ("anchor5", "nochange"),
        "{block}"
    );
    assert!(row.buildah.is_some() && row.buildkit.is_some(), "{block}");
    // The two targets this run measures, their verdicts recomputed.
    assert_eq!(check_targets(block), 2, "{block}");
    assert!(
        block.contains("| no-change rebuild ≤ 0.1× buildah | "),
        "{block}"
    );
    assert!(
        block.contains("| no-change rebuild ≤ 0.25× BuildKit | "),
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
    let (_, engine) = calls
        .split_once("-- with children (the engine's frames)")
        .unwrap_or_else(|| panic!("no section of the engine's frames in {report}"));
    // Some frame of the engine's build module (any function, in any file
    // of it) has samples below it that are not its own: the symbols are
    // there (release builds keep debug info) and so are the call graphs,
    // which alone make a frame's children outweigh its self time.
    let reached = engine
        .lines()
        .filter_map(children_and_self)
        .any(|(symbol, children, own)| {
            symbol.starts_with("kiln_engine::build::") && children > own
        });
    assert!(
        reached,
        "no kiln_engine::build frame with callees sampled in\n{report}"
    );
}

/// `(symbol, children %, self %)` of a `perf report --children` line:
/// `  36.79%     0.00%  [.] kiln_engine::build::Builder::build::{{closure}}`.
fn children_and_self(line: &str) -> Option<(&str, f64, f64)> {
    let mut words = line.split_whitespace();
    let mut percent = || words.next()?.strip_suffix('%')?.parse::<f64>().ok();
    let (children, own) = (percent()?, percent()?);
    let (_, symbol) = line.split_once("] ")?;
    Some((symbol.trim(), children, own))
}

/// `benches/platforms.sh`, one run: a row per `--platform` it compares,
/// each with a median that is one of its runs.
#[test]
fn platforms_sh_compares_a_two_platform_rebuild_with_each_alone() {
    require_arm64_emulation();
    let out = run_ok(
        Command::new(Path::new(REPO).join("benches/platforms.sh"))
            .args(["--runs", "1", "--kiln", KILN]),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    for platform in ["linux/amd64,linux/arm64", "linux/amd64", "linux/arm64"] {
        let row = report
            .lines()
            .find(|l| l.starts_with(&format!("| {platform} |")))
            .unwrap_or_else(|| panic!("no {platform} row in {report}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[3], cells[4], "{row}");
    }
}

/// The cells of every table row of `report` with `n` cells, but the
/// header's (whose first cell is `header`).
fn table(report: &str, n: usize, header: &str) -> Vec<Vec<String>> {
    report
        .lines()
        .filter(|l| l.starts_with("| "))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|cells| cells.len() == n && cells[0] != header)
        .collect()
}

/// Checks a `benches/warm.sh` report: each scenario's median is its runs'
/// and every verdict follows from the numbers in the table. Returns the
/// (scenario, median) rows.
fn check_warm(report: &str) -> Vec<(String, f64)> {
    let rows = table(report, 6, "scenario");
    let names = [
        "no-change rebuild",
        "first build after kiln warm",
        "cold build, no warm",
        "app: ",
    ];
    assert_eq!(rows.len(), names.len(), "{report}");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r[0].starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {report}"))
    };
    let mut medians = Vec::new();
    for name in names {
        let r = row(name);
        let mut runs: Vec<f64> = r[2]
            .split_whitespace()
            .map(|w| w.parse().unwrap_or_else(|_| panic!("{w:?} in {r:?}")))
            .collect();
        assert!(!runs.is_empty(), "{r:?}");
        assert_eq!(format!("{:.3}", median(&mut runs)), r[1], "{r:?}");
        for count in &r[3..] {
            count.parse::<u64>().unwrap_or_else(|_| panic!("{r:?}"));
        }
        medians.push((name.to_string(), r[1].parse().unwrap()));
    }
    let targets = table(report, 2, "target");
    assert_eq!(targets.len(), 3, "{report}");
    for t in &targets {
        let (said, detail) = t[1].split_once(": ").unwrap();
        let expected = if t[0].starts_with("first build after kiln warm ≤ 1.5×") {
            let (n, w) = (medians[0].1, medians[1].1);
            let (ratio, floor) = detail
                .split_once(" (the registry's two PUTs alone: ")
                .unwrap_or_else(|| panic!("no floor in {t:?}"));
            assert_eq!(ratio, format!("{:.2}×", w / n), "{t:?}");
            // The floor: the rebuild and the registry's PUTs, as the
            // prose above the targets gives them.
            let puts: f64 = report
                .split("a manifest PUT take ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no registry PUTs in {report}"));
            assert_eq!(floor, format!("{:.2}×)", (n + puts) / n), "{t:?}");
            verdict(w <= 1.5 * n)
        } else if t[0].starts_with("cold build without warm: unpack 0") {
            let cold = row("cold build, no warm");
            assert_eq!(
                detail,
                format!("{} layers, {} ms", cold[3], cold[4]),
                "{t:?}"
            );
            verdict(cold[3] == "0" && cold[4] == "0")
        } else if t[0].starts_with("app final stage unpacks nothing") {
            // "F layers, B bytes (the whole build W layers, --target build S)"
            let n: Vec<u64> = detail
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            let [final_stage, _, whole, stage] = n[..] else {
                panic!("four numbers in {t:?}");
            };
            assert_eq!(final_stage, whole - stage, "{t:?}");
            let app = row("app: ");
            assert!(whole <= app[3].parse().unwrap(), "{t:?} {app:?}");
            verdict(final_stage == 0)
        } else {
            panic!("a target this test cannot check: {t:?}");
        };
        assert_eq!(said, expected, "{t:?}");
    }
    medians
}

/// `benches/warm.sh`, one quick run on the busybox base: four scenario
/// rows and three targets whose verdicts follow from the numbers.
#[test]
fn warm_sh_measures_the_warmed_first_build_against_a_rebuild() {
    let out = run_ok(
        Command::new(Path::new(REPO).join("benches/warm.sh"))
            .args(["--runs", "1", "--base", "busybox", "--kiln", KILN]),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let medians = check_warm(&report);
    assert!(medians.iter().all(|(_, m)| *m > 0.0), "{report}");
}

/// The warm table in the README is a warm.sh report: its verdicts follow
/// from its numbers, and a flipped one is caught.
#[test]
fn the_readme_warm_table_follows_from_its_runs() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let start = readme
        .find("<!-- warm.sh: begin -->")
        .expect("begin marker");
    let end = readme.find("<!-- warm.sh: end -->").expect("end marker");
    let block = &readme[start..end];
    check_warm(block);
    assert_a_flipped_verdict_is_caught(block, |b| {
        check_warm(b);
    });
}
