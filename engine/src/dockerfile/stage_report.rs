//! The stage report: the resolved stage graph (and the Dockerfile's
//! directives) described for people and tools, without building anything.
//! It is what `kiln plan` prints; not to be confused with `crate::plan`,
//! the resolved steps the builder runs.

use serde_json::{json, Value};

use super::parse::Dockerfile;
use super::raw::RawInstruction;
use super::stages::{BaseRef, StageGraph};

/// The stage report as JSON, what `kiln plan --format json` prints:
///
/// ```json
/// {"global": [<instructions before the first FROM>],
///  "stages": [{"index": 0, "name": "builder", "base": "<as written>",
///              "base_resolved": "<after ARG expansion>", "needed": true,
///              "instructions": [<the FROM, then the rest>]}],
///  "warnings": [{"line": 7, "message": "..."}]}
/// ```
///
/// Each instruction is a [`RawInstruction`]: `line`, `end_line`,
/// `keyword`, `flags`, `args` (unexpanded), `json_form` and `heredocs`
/// (`name`, `content`, `expand`). Everything in it comes from the graph.
pub fn stage_report_json(graph: &StageGraph) -> Value {
    let stages: Vec<Value> = graph
        .stages
        .iter()
        .map(|s| {
            json!({
                "index": s.index,
                "name": s.name,
                "base": s.base,
                "base_resolved": s.base_resolved,
                "needed": s.needed,
                "instructions": s.instructions,
            })
        })
        .collect();
    json!({
        "global": graph.global,
        "stages": stages,
        "warnings": graph.warnings,
    })
}

/// The stage report as readable text, with the Dockerfile's escape
/// character and directives, for `kiln plan --format text`.
pub fn stage_report_text(graph: &StageGraph, df: &Dockerfile) -> String {
    let mut out = String::new();
    let target = graph.target_stage();
    out.push_str(&format!(
        "{} stage(s), target: {}, escape: {}\n",
        graph.stages.len(),
        target.display_name(),
        df.escape
    ));
    for (k, v) in &df.directives {
        out.push_str(&format!("directive {k}={v}\n"));
    }
    if !graph.global.is_empty() {
        out.push_str("\nglobal:\n");
        for raw in &graph.global {
            out.push_str(&instruction_text(raw));
        }
    }
    for s in &graph.stages {
        let base = match &s.base_ref {
            BaseRef::Scratch => "scratch (empty)".to_string(),
            BaseRef::Image(i) => format!("image {i}"),
            BaseRef::Stage(i) => format!("stage {}", graph.stages[*i].display_name()),
        };
        let mut status = vec![if s.needed { "needed" } else { "not needed" }];
        if s.index == graph.target {
            status.push("target");
        }
        out.push_str(&format!(
            "\nstage {} {}: from {}{} [{}]\n",
            s.index,
            s.name
                .as_deref()
                .map_or("(unnamed)".to_string(), |n| format!("\"{n}\"")),
            base,
            s.platform
                .as_ref()
                .map(|p| format!(" for {}", p.format()))
                .unwrap_or_default(),
            status.join(", ")
        ));
        for r in s.refs.iter().skip(1) {
            let what = match &r.target {
                BaseRef::Scratch => "scratch".to_string(),
                BaseRef::Image(i) => format!("image {i}"),
                BaseRef::Stage(i) => format!("stage {}", graph.stages[*i].display_name()),
            };
            out.push_str(&format!("  uses {what} (line {})\n", r.line));
        }
        for raw in &s.instructions {
            out.push_str(&instruction_text(raw));
        }
    }
    if !graph.warnings.is_empty() {
        out.push_str("\nwarnings:\n");
        for w in &graph.warnings {
            out.push_str(&format!("  line {}: {}\n", w.line, w.message));
        }
    }
    out
}

fn instruction_text(raw: &RawInstruction) -> String {
    let lines = if raw.end_line > raw.line {
        format!("{}-{}", raw.line, raw.end_line)
    } else {
        raw.line.to_string()
    };
    let mut text = raw.keyword.clone();
    for f in &raw.flags {
        text.push(' ');
        text.push_str(f);
    }
    let args = if raw.json_form && raw.keyword == "HEALTHCHECK" {
        // The subcommand, then its JSON array.
        let (kind, rest) = raw
            .args
            .split_first()
            .map_or(("", &[][..]), |(k, r)| (k.as_str(), r));
        format!("{kind} {}", serde_json::to_string(rest).unwrap_or_default())
    } else if raw.json_form {
        serde_json::to_string(&raw.args).unwrap_or_default()
    } else if matches!(raw.keyword.as_str(), "ENV" | "LABEL") {
        raw.args
            .chunks(2)
            .map(|kv| kv.join("="))
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        raw.args.join(" ")
    };
    if !args.is_empty() {
        text.push(' ');
        text.push_str(&args);
    }
    let mut out = format!("  {lines:>7}  {text}\n");
    for doc in &raw.heredocs {
        out.push_str(&format!(
            "           heredoc {} ({} line(s), {})\n",
            doc.name,
            doc.content.lines().count(),
            if doc.expand { "expanded" } else { "literal" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse;
    use super::super::scope::Platform;
    use super::*;
    use std::collections::BTreeMap;

    fn resolve(src: &str, target: Option<&str>) -> (StageGraph, Dockerfile) {
        let df = parse(src).unwrap();
        let g =
            StageGraph::resolve(&df, &BTreeMap::new(), target, &Platform::linux_amd64()).unwrap();
        (g, df)
    }

    #[test]
    fn document_shape() {
        let (g, _) = resolve(
            "ARG V=1\nFROM alpine:$V AS builder\nRUN --mount=type=cache,target=/c <<EOF\necho $V\nEOF\nFROM scratch\nCOPY --from=builder /a /a\n",
            None,
        );
        let doc = stage_report_json(&g);
        let expected = json!({
            "global": [{"line": 1, "end_line": 1, "keyword": "ARG", "flags": [], "args": ["V=1"], "json_form": false, "heredocs": []}],
            "stages": [
                {"index": 0, "name": "builder", "base": "alpine:$V", "base_resolved": "alpine:1", "needed": true,
                 "instructions": [
                    {"line": 2, "end_line": 2, "keyword": "FROM", "flags": [], "args": ["alpine:$V", "AS", "builder"], "json_form": false, "heredocs": []},
                    {"line": 3, "end_line": 5, "keyword": "RUN", "flags": ["--mount=type=cache,target=/c"], "args": ["<<EOF"], "json_form": false,
                     "heredocs": [{"name": "EOF", "content": "echo $V\n", "expand": true}]}
                 ]},
                {"index": 1, "name": null, "base": "scratch", "base_resolved": "scratch", "needed": true,
                 "instructions": [
                    {"line": 6, "end_line": 6, "keyword": "FROM", "flags": [], "args": ["scratch"], "json_form": false, "heredocs": []},
                    {"line": 7, "end_line": 7, "keyword": "COPY", "flags": ["--from=builder"], "args": ["/a", "/a"], "json_form": false, "heredocs": []}
                 ]}
            ],
            "warnings": []
        });
        assert_eq!(doc, expected);
        // Keys keep the documented order.
        let text = serde_json::to_string(&doc).unwrap();
        assert!(text.starts_with(
            "{\"global\":[{\"line\":1,\"end_line\":1,\"keyword\":\"ARG\",\"flags\":[],\"args\""
        ));
    }

    #[test]
    fn target_marks_unneeded_stages() {
        let (g, _) = resolve("FROM a AS one\nFROM b AS two\nFROM c", Some("one"));
        let doc = stage_report_json(&g);
        let needed: Vec<_> = doc["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["needed"].clone())
            .collect();
        assert_eq!(needed, [json!(true), json!(false), json!(false)]);
    }

    #[test]
    fn text_summary() {
        let (g, df) = resolve(
            "# syntax=docker/dockerfile:1\nARG V=1\nFROM alpine:$V AS builder\nENV A=1 B=2\nCMD [\"sh\"]\nFROM scratch\nCOPY --from=builder <<EOF /a\nx\nEOF\n",
            None,
        );
        let text = stage_report_text(&g, &df);
        for needle in [
            "2 stage(s), target: stage-1",
            "directive syntax=docker/dockerfile:1",
            "global:",
            "ARG V=1",
            "stage 0 \"builder\": from image alpine:1 [needed]",
            "ENV A=1 B=2",
            "CMD [\"sh\"]",
            "stage 1 (unnamed): from scratch (empty) [needed, target]",
            "uses stage builder (line 7)",
            "7-9  COPY --from=builder <<EOF /a",
            "heredoc EOF (1 line(s), expanded)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
