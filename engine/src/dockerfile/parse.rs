//! The Dockerfile parser: physical lines → instructions, with BuildKit's
//! rules for directives, comments, line continuations, flags, the JSON
//! form and heredocs.

use super::directives::{CheckConfig, DirectiveParser};
use super::error::{AtLine, FrontendError, Warning};
use super::heredoc::{chomp, heredocs_from_line, is_terminator, Heredoc};
use super::instruction::{Instruction, InstructionError};
use super::json_form::{looks_like_broken_json, maybe_json, maybe_json_to_list, NotStringArray};
use super::raw::RawInstruction;
use super::words::{
    is_space, parse_words, split_command, split_first_whitespace, split_whitespace_delimited,
};
use crate::excerpt::excerpt;

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Dockerfile {
    /// Parser directives, names lower case, in order.
    pub directives: Vec<(String, String)>,
    /// The escape character (`\` unless `# escape=` changed it).
    pub escape: char,
    pub instructions: Vec<RawInstruction>,
    pub warnings: Vec<Warning>,
}

impl Dockerfile {
    /// The value of a parser directive (`syntax`, `escape`, `check`).
    pub fn directive(&self, name: &str) -> Option<&str> {
        self.directives
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// What `# check=` asks for.
    pub fn check_config(&self) -> CheckConfig {
        self.directive("check")
            .map(CheckConfig::parse)
            .unwrap_or_default()
    }
}

/// Parses a Dockerfile and checks every instruction as BuildKit does before
/// building anything: unknown instructions, bad flags, wrong argument
/// counts, instructions before the first FROM.
pub fn parse(src: &str) -> Result<Dockerfile, FrontendError> {
    let mut df = parse_syntax(src)?;
    let mut seen_from = false;
    for raw in &df.instructions {
        let instruction = Instruction::from_raw(raw, df.escape)?;
        match instruction {
            Instruction::From { .. } => seen_from = true,
            Instruction::Arg(_) => {}
            _ if !seen_from => {
                return Err(FrontendError::new(
                    raw.line,
                    format!(
                        "no build stage in current context: {} comes before the first FROM",
                        raw.keyword
                    ),
                ))
            }
            _ => {}
        }
    }
    if !seen_from {
        return Err(FrontendError::new(
            0,
            "Dockerfile contains no stages to build: it has no FROM instruction",
        ));
    }
    let check = df.check_config();
    df.warnings
        .retain(|w| w.rule.is_none_or(|r| check.enabled(r)));
    Ok(df)
}

/// Parses one ONBUILD trigger from a base image's config (`RUN make`,
/// heredoc bodies included) into the instruction it runs as the first step
/// of a stage built on that image, as BuildKit does. `line` is the line of
/// the FROM that pulled the image, so errors point at it.
pub fn parse_onbuild_trigger(trigger: &str, line: usize) -> Result<RawInstruction, FrontendError> {
    let fail = |m: String| {
        FrontendError::new(line, format!("ONBUILD trigger {:?}: {m}", excerpt(trigger)))
    };
    let df = parse_syntax(trigger).map_err(|e| fail(e.message))?;
    let [raw] = df.instructions.as_slice() else {
        return Err(fail("onbuild trigger should be a single expression".into()));
    };
    if matches!(raw.keyword.as_str(), "FROM" | "ONBUILD" | "MAINTAINER") {
        let refused = InstructionError::OnbuildTrigger(raw.keyword.clone());
        return Err(fail(refused.to_string()));
    }
    Instruction::from_raw(raw, df.escape).map_err(|e| fail(e.message))?;
    Ok(RawInstruction {
        line,
        end_line: line,
        ..raw.clone()
    })
}

/// Physical lines, each with its line ending.
struct Lines<'a> {
    lines: Vec<&'a str>,
    next: usize,
}

impl<'a> Lines<'a> {
    fn new(src: &'a str) -> Self {
        Lines {
            lines: src.split_inclusive('\n').collect(),
            next: 0,
        }
    }

    /// The next line and its 1-based number.
    fn next(&mut self) -> Option<(usize, &'a str)> {
        let line = self.lines.get(self.next)?;
        self.next += 1;
        Some((self.next, line))
    }

    /// The number of the last line read.
    fn last(&self) -> usize {
        self.next
    }
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start_matches(is_space).starts_with('#')
}

/// Removes a trailing escape character (and the spaces or tabs after it)
/// that continues the line, unless it is itself escaped. Returns the line
/// and whether it ends the instruction.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(before) if !before.ends_with(escape) => (before, false),
        _ => (line, true),
    }
}

/// A line the parser cannot split into an instruction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SyntaxError {
    #[error(transparent)]
    Json(#[from] NotStringArray),
    #[error("{0} must have two arguments")]
    NoValue(String),
    #[error("Syntax error - can't find = in {:?}. Must be of the form: name=value", excerpt(.0))]
    NoEquals(String),
}

/// One logical line split and given its arguments by the keyword's line
/// parser.
struct Node {
    keyword_as_written: String,
    keyword: String,
    flags: Vec<String>,
    args: Vec<String>,
    json: bool,
    /// `ENV key value` rather than `ENV key=value`.
    legacy_key_value: bool,
    /// Shell-form arguments that start with `[`: a JSON form that did not
    /// parse.
    broken_json: bool,
    /// The trigger of an ONBUILD.
    child: Option<Box<Node>>,
}

impl Node {
    fn can_contain_heredoc(&self) -> bool {
        let node = match (&self.child, self.keyword.as_str()) {
            (Some(child), "ONBUILD") => child,
            _ => self,
        };
        matches!(node.keyword.as_str(), "RUN" | "COPY" | "ADD") && !node.json
    }
}

fn parse_node(line: &str, escape: char) -> Result<Node, SyntaxError> {
    let split = split_command(line);
    let keyword = split.keyword.to_uppercase();
    let rest = split.rest.as_str();
    let mut node = Node {
        keyword_as_written: split.keyword.clone(),
        keyword: keyword.clone(),
        flags: split.flags,
        args: Vec::new(),
        json: false,
        legacy_key_value: false,
        broken_json: false,
        child: None,
    };
    match keyword.as_str() {
        "ADD" | "COPY" | "VOLUME" => (node.args, node.json) = maybe_json_to_list(rest)?,
        "ARG" => node.args = parse_words(rest, escape),
        "CMD" | "ENTRYPOINT" | "RUN" | "SHELL" => {
            (node.args, node.json) = maybe_json(rest)?;
            node.broken_json = !node.json && looks_like_broken_json(rest);
        }
        "ENV" | "LABEL" => {
            (node.args, node.legacy_key_value) = parse_name_value(rest, &keyword, escape)?
        }
        "EXPOSE" | "FROM" => node.args = split_whitespace_delimited(rest),
        "HEALTHCHECK" => {
            // The subcommand, then its arguments parsed as RUN's would be.
            let (kind, cmd) = match rest.find(is_space) {
                Some(i) => (&rest[..i], rest[i..].trim_start_matches(is_space)),
                None => (rest, ""),
            };
            if !kind.is_empty() {
                let (cmd_args, json) = maybe_json(cmd)?;
                node.args = std::iter::once(kind.to_string()).chain(cmd_args).collect();
                node.json = json;
                node.broken_json = !json && looks_like_broken_json(cmd);
            }
        }
        "MAINTAINER" | "STOPSIGNAL" | "USER" | "WORKDIR" if !rest.is_empty() => {
            node.args = vec![rest.to_string()];
        }
        "ONBUILD" if !rest.is_empty() => {
            node.child = Some(Box::new(parse_node(rest, escape)?));
            node.args = vec![onbuild_expression(line).to_string()];
        }
        // Empty arguments are reported when the instruction is typed, and
        // so are unknown instructions, after the whole file parsed, as
        // BuildKit does.
        _ => {}
    }
    Ok(node)
}

/// The trigger text: the line without `ONBUILD` (BuildKit's
/// `(?i)^\s*ONBUILD\s*`).
fn onbuild_expression(line: &str) -> &str {
    let re_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0C' | '\r');
    let rest = line.trim_start_matches(re_space);
    match rest.get(..7) {
        Some(kw) if kw.eq_ignore_ascii_case("ONBUILD") => rest[7..].trim_start_matches(re_space),
        _ => line,
    }
}

/// ENV and LABEL: `KEY=VALUE ...`, or the legacy `KEY VALUE` form where
/// the value is the rest of the line. Quotes stay as written.
fn parse_name_value(
    rest: &str,
    keyword: &str,
    escape: char,
) -> Result<(Vec<String>, bool), SyntaxError> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok((Vec::new(), false));
    };
    if !first.contains('=') {
        return match split_first_whitespace(rest) {
            (key, Some(value)) if !value.is_empty() => {
                Ok((vec![key.to_string(), value.to_string()], true))
            }
            _ => Err(SyntaxError::NoValue(keyword.to_string())),
        };
    }
    let mut args = Vec::with_capacity(words.len() * 2);
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(SyntaxError::NoEquals(word));
        };
        args.push(key.to_string());
        args.push(value.to_string());
    }
    Ok((args, false))
}

/// Parses the syntax only: every instruction is split into keyword, flags
/// and arguments, but not checked.
pub(crate) fn parse_syntax(src: &str) -> Result<Dockerfile, FrontendError> {
    reject_nul(src)?;
    let mut directives = DirectiveParser::new();
    let mut instructions = Vec::new();
    let mut warnings = Vec::new();
    let mut lines = Lines::new(src);

    while let Some((number, raw)) = lines.next() {
        let raw = if number == 1 {
            raw.strip_prefix('\u{feff}').unwrap_or(raw)
        } else {
            raw
        };
        let text = trim_newline(raw).trim_start_matches(is_space);
        directives.feed(text).at_line(number)?;
        let escape = directives.escape;
        let text = if is_comment(text) { "" } else { text };
        let (first, mut ends) = trim_continuation(text, escape);
        if ends && first.is_empty() {
            continue;
        }

        let start = number;
        let mut line = first.to_string();
        let mut empty_continuation = None;
        while !ends {
            let Some((n, raw)) = lines.next() else {
                break; // a continuation at the end of the file ends it
            };
            let text = trim_newline(raw);
            if is_comment(text) {
                continue; // comment lines inside a continuation are dropped
            }
            if text.trim_start_matches(is_space).is_empty() {
                empty_continuation.get_or_insert(n);
                continue;
            }
            let (part, e) = trim_continuation(text, escape);
            line.push_str(part);
            ends = e;
        }
        if let Some(n) = empty_continuation {
            warnings.push(Warning::lint(
                n,
                "NoEmptyContinuation",
                format!("Empty continuation line found in: {}", excerpt(line.trim())),
            ));
        }

        let node = parse_node(&line, escape).at_line(start)?;
        let mut heredocs = Vec::new();
        if node.can_contain_heredoc() && line.contains("<<") {
            let opened = heredocs_from_line(&line).at_line(start)?;
            for mut doc in opened {
                let mut terminated = false;
                while let Some((_, body)) = lines.next() {
                    if is_terminator(&doc, body) {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(body);
                }
                if !terminated {
                    return Err(FrontendError::new(
                        start,
                        format!(
                            "unterminated heredoc <<{}: no line \"{}\" ends it before the end of the file",
                            excerpt(&doc.name),
                            excerpt(&doc.name)
                        ),
                    ));
                }
                if doc.chomp {
                    doc.content = chomp(&doc.content);
                }
                heredocs.push(doc);
            }
        }
        warnings.extend(node_warnings(&node, start, escape, &heredocs));
        instructions.push(RawInstruction {
            line: start,
            end_line: lines.last(),
            keyword: node.keyword,
            flags: node.flags,
            args: node.args,
            json_form: node.json,
            heredocs,
        });
    }

    if instructions.is_empty() {
        return Err(FrontendError::new(0, "file with no instructions"));
    }
    Ok(Dockerfile {
        escape: directives.escape,
        directives: directives.directives,
        instructions,
        warnings,
    })
}

/// Refuses a NUL byte anywhere: no instruction can use one (a command
/// line cannot hold it), and printed raw it garbles the terminal. The
/// message quotes its line escaped.
fn reject_nul(src: &str) -> Result<(), FrontendError> {
    let Some(at) = src.find('\0') else {
        return Ok(());
    };
    let start = src[..at].rfind('\n').map_or(0, |n| n + 1);
    let end = src[at..].find('\n').map_or(src.len(), |n| at + n);
    let line = src[..at].matches('\n').count() + 1;
    let column = src[start..at].chars().count() + 1;
    let text = src[start..end].trim_end_matches('\r');
    Err(FrontendError::new(
        line,
        format!("NUL byte at column {column}: {:?}", excerpt(text)),
    ))
}

/// The warnings BuildKit gives about one instruction as it is parsed.
fn node_warnings(node: &Node, line: usize, escape: char, heredocs: &[Heredoc]) -> Vec<Warning> {
    let mut out = Vec::new();
    let kw = node.keyword.as_str();
    if node.broken_json {
        out.push(Warning::new(
            line,
            format!("{kw} arguments start with '[' but are not a JSON array of strings: they run through the shell, as BuildKit does"),
        ));
    }
    if node.legacy_key_value {
        out.push(Warning::lint(
            line,
            "LegacyKeyValueFormat",
            format!(
                "\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"
            ),
        ));
    }
    match kw {
        "MAINTAINER" => out.push(Warning::lint(
            line,
            "MaintainerDeprecated",
            "Maintainer instruction is deprecated in favor of using label",
        )),
        "FROM" if node.args.len() == 3 => {
            let written = node.keyword_as_written.as_str();
            let as_kw = node.args[1].as_str();
            let from_lower = written == written.to_lowercase();
            let from_upper = written == written.to_uppercase();
            let mismatch = (from_lower && as_kw != as_kw.to_lowercase())
                || (from_upper && as_kw != as_kw.to_uppercase());
            if mismatch && (from_lower || from_upper) {
                out.push(Warning::lint(
                    line,
                    "FromAsCasing",
                    format!(
                        "'{as_kw}' and '{}' keywords' casing do not match",
                        excerpt(written)
                    ),
                ));
            }
            let name = node.args[2].as_str();
            if name != name.to_lowercase() {
                out.push(Warning::lint(
                    line,
                    "StageNameCasing",
                    format!("Stage name '{}' should be lowercase", excerpt(name)),
                ));
            }
        }
        "ARG" | "STOPSIGNAL" if !node.flags.is_empty() => {
            out.push(ignored_flags(line, kw, &node.flags))
        }
        "HEALTHCHECK"
            if !node.flags.is_empty()
                && node
                    .args
                    .first()
                    .is_some_and(|a| a.eq_ignore_ascii_case("NONE")) =>
        {
            out.push(ignored_flags(line, "HEALTHCHECK NONE", &node.flags))
        }
        "ONBUILD" => {
            // BuildKit stores any trigger and only fails when an image is
            // built FROM this one; say so now.
            if let Some(child) = &node.child {
                let trigger = RawInstruction {
                    line,
                    end_line: line,
                    keyword: child.keyword.clone(),
                    flags: child.flags.clone(),
                    args: child.args.clone(),
                    json_form: child.json,
                    heredocs: heredocs.to_vec(),
                };
                let fatal_elsewhere =
                    matches!(child.keyword.as_str(), "ONBUILD" | "FROM" | "MAINTAINER");
                if let (false, Err(e)) = (fatal_elsewhere, Instruction::from_raw(&trigger, escape))
                {
                    out.push(Warning::new(
                        line,
                        format!(
                            "ONBUILD trigger will fail in images built from this one: {}",
                            e.message
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    out
}

fn ignored_flags(line: usize, what: &str, flags: &[String]) -> Warning {
    Warning::new(
        line,
        format!(
            "{what} ignores flags ({}), as BuildKit does",
            excerpt(&flags.join(" "))
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(src: &str) -> RawInstruction {
        let df = parse_syntax(src).unwrap_or_else(|e| panic!("{src:?}: {e}"));
        assert_eq!(df.instructions.len(), 1, "{src:?}: {:?}", df.instructions);
        df.instructions.into_iter().next().unwrap()
    }

    fn args(src: &str) -> Vec<String> {
        one(src).args
    }

    fn syntax_err(src: &str) -> FrontendError {
        parse_syntax(src).expect_err(src)
    }

    #[test]
    fn keywords_are_case_insensitive_and_upper_cased() {
        let i = one("from Alpine");
        assert_eq!(i.keyword, "FROM");
        assert_eq!(i.args, ["Alpine"]);
        assert_eq!(one("rUn echo").keyword, "RUN");
    }

    #[test]
    fn lines_are_numbered_and_spans_kept() {
        let df = parse_syntax("\n# c\nFROM a\n\nRUN x \\\n  y \\\n  z\nCMD [\"q\"]").unwrap();
        let spans: Vec<_> = df
            .instructions
            .iter()
            .map(|i| (i.line, i.end_line))
            .collect();
        assert_eq!(spans, [(3, 3), (5, 7), (8, 8)]);
    }

    #[test]
    fn continuation_joins_without_trimming() {
        assert_eq!(
            args("RUN apt-get update && \\\n    apt-get install -y curl"),
            ["apt-get update &&     apt-get install -y curl"]
        );
        // Whitespace after the escape is allowed.
        assert_eq!(args("RUN a \\  \t\n b"), ["a  b"]);
        // An escaped escape does not continue.
        let df = parse_syntax("RUN a \\\\\nRUN b").unwrap();
        assert_eq!(df.instructions.len(), 2);
        assert_eq!(df.instructions[0].args, ["a \\\\"]);
    }

    #[test]
    fn comments_and_empty_lines_inside_continuations() {
        let df = parse_syntax("RUN a \\\n# comment \\\n  # indented comment\n\n   \n  b").unwrap();
        let i = &df.instructions[0];
        assert_eq!(i.args, ["a   b"]);
        assert_eq!((i.line, i.end_line), (1, 6));
        assert_eq!(df.warnings.len(), 1);
        assert_eq!(df.warnings[0].line, 4);
        assert_eq!(df.warnings[0].rule, Some("NoEmptyContinuation"));
    }

    #[test]
    fn continuation_at_end_of_file() {
        let i = one("RUN echo hi \\");
        assert_eq!(i.args, ["echo hi"]);
        assert_eq!((i.line, i.end_line), (1, 1));
        let i = one("RUN echo \\\n");
        assert_eq!(i.args, ["echo"]);
        let i = one("RUN echo \\\n# only a comment");
        assert_eq!(i.end_line, 2);
    }

    #[test]
    fn lone_escape_line_starts_an_instruction() {
        let i = one("\\\nRUN x");
        assert_eq!(i.keyword, "RUN");
        assert_eq!(i.line, 1);
    }

    #[test]
    fn crlf_line_endings() {
        let df =
            parse_syntax("FROM a\r\nRUN x \\\r\n  y\r\nCOPY <<EOF /f\r\nhi\r\nEOF\r\n").unwrap();
        assert_eq!(df.instructions[1].args, ["x   y"]);
        assert_eq!(df.instructions[2].heredocs[0].content, "hi\r\n");
        assert_eq!(df.instructions[2].end_line, 6);
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let df = parse_syntax("\u{feff}# escape=`\nFROM a\nRUN x `\n y").unwrap();
        assert_eq!(df.escape, '`');
        assert_eq!(df.instructions[1].args, ["x  y"]);
    }

    #[test]
    fn escape_directive() {
        let df = parse_syntax("# escape=`\nFROM mcr.microsoft.com/windows\nRUN dir C:\\ `\n  && echo done\nCOPY a\\b c\\").unwrap();
        assert_eq!(df.escape, '`');
        assert_eq!(df.directives, [("escape".to_string(), "`".to_string())]);
        assert_eq!(df.instructions[1].args, ["dir C:\\   && echo done"]);
        assert_eq!(df.instructions[2].args, ["a\\b", "c\\"]);
        // After a comment the directive is an ordinary comment.
        let df = parse_syntax("# hello\n# escape=`\nFROM a\nRUN x `").unwrap();
        assert_eq!(df.escape, '\\');
        assert_eq!(df.instructions[1].args, ["x `"]);
        assert!(syntax_err("# escape=x\nFROM a")
            .message
            .contains("invalid escape token"));
        assert_eq!(syntax_err("# escape=`\n# escape=\\\nFROM a").line, 2);
    }

    #[test]
    fn syntax_and_check_directives() {
        let df = parse_syntax("# syntax=docker/dockerfile:1\n# check=skip=all\nFROM a").unwrap();
        assert_eq!(df.directive("syntax"), Some("docker/dockerfile:1"));
        assert!(df.check_config().skip_all);
    }

    #[test]
    fn empty_and_comment_only_files() {
        assert_eq!(syntax_err("").line, 0);
        assert_eq!(syntax_err("\n\n  \n").message, "file with no instructions");
        assert_eq!(
            syntax_err("# just\n# comments\n").message,
            "file with no instructions"
        );
        assert_eq!(syntax_err("# c \\\n").message, "file with no instructions");
    }

    #[test]
    fn flags_and_double_dash() {
        let i = one("COPY --from=build --chown=\"1:1\" -- --weird-name /dst");
        assert_eq!(i.flags, ["--from=build", "--chown=1:1"]);
        assert_eq!(i.args, ["--weird-name", "/dst"]);
    }

    #[test]
    fn shell_and_json_forms() {
        let i = one("CMD [\"nginx\", \"-g\", \"daemon off;\"]");
        assert!(i.json_form);
        assert_eq!(i.args, ["nginx", "-g", "daemon off;"]);
        let i = one("ENTRYPOINT [\"a\" \"b\"]");
        assert!(!i.json_form);
        assert_eq!(i.args, ["[\"a\" \"b\"]"]);
        let i = one("CMD []");
        assert!(i.json_form);
        assert!(i.args.is_empty());
        let i = one("RUN");
        assert!(i.args.is_empty() && !i.json_form);
        assert!(syntax_err("FROM a\nRUN [1, 2]")
            .message
            .contains("strings only"));
        assert_eq!(syntax_err("FROM a\nRUN [1, 2]").line, 2);
    }

    #[test]
    fn broken_json_warns() {
        let df = parse_syntax("FROM a\nCMD [\"a\", \"b\"").unwrap();
        assert_eq!(df.instructions[1].args, ["[\"a\", \"b\""]);
        assert!(df.warnings[0].message.contains("not a JSON array"));
    }

    #[test]
    fn copy_add_volume_lists() {
        assert_eq!(args("COPY a  b\t/c/"), ["a", "b", "/c/"]);
        assert_eq!(args("VOLUME /a /b"), ["/a", "/b"]);
        assert_eq!(args("ADD [\"x y\", \"/z\"]"), ["x y", "/z"]);
    }

    #[test]
    fn env_and_label_forms() {
        assert_eq!(
            args("ENV A=1 B=\"x y\" C=z\\ w"),
            ["A", "1", "B", "\"x y\"", "C", "z\\ w"]
        );
        assert_eq!(args("ENV PATH /usr/bin:$PATH"), ["PATH", "/usr/bin:$PATH"]);
        assert_eq!(
            args("ENV GREETING   hello   world "),
            ["GREETING", "hello   world"]
        );
        assert_eq!(args("LABEL a=b \"c d\"=e"), ["a", "b", "\"c d\"", "e"]);
        assert_eq!(args("ENV A="), ["A", ""]);
        assert!(syntax_err("ENV A")
            .message
            .contains("ENV must have two arguments"));
        assert!(syntax_err("LABEL onlykey")
            .message
            .contains("LABEL must have two arguments"));
        assert!(syntax_err("ENV A=1 B")
            .message
            .contains("can't find = in \"B\""));
        assert!(one("ENV").args.is_empty());
        let df = parse_syntax("FROM a\nENV A 1").unwrap();
        assert_eq!(df.warnings[0].rule, Some("LegacyKeyValueFormat"));
    }

    #[test]
    fn arg_words() {
        assert_eq!(
            args("ARG A B=2 C=\"x y\" D="),
            ["A", "B=2", "C=\"x y\"", "D="]
        );
    }

    #[test]
    fn from_expose_words() {
        assert_eq!(
            args("FROM --platform=linux/arm64 golang:1.22 AS build"),
            ["golang:1.22", "AS", "build"]
        );
        assert_eq!(args("EXPOSE 80   443/tcp"), ["80", "443/tcp"]);
    }

    #[test]
    fn single_string_instructions() {
        assert_eq!(args("WORKDIR   /app dir  "), ["/app dir"]);
        assert_eq!(args("USER root"), ["root"]);
        assert_eq!(args("MAINTAINER a b <c@d>"), ["a b <c@d>"]);
        assert!(args("USER").is_empty());
    }

    #[test]
    fn healthcheck_args() {
        let i = one("HEALTHCHECK --interval=5s CMD curl -f http://x/ || exit 1");
        assert_eq!(i.flags, ["--interval=5s"]);
        assert_eq!(i.args, ["CMD", "curl -f http://x/ || exit 1"]);
        let i = one("HEALTHCHECK CMD [\"/check\", \"-v\"]");
        assert!(i.json_form);
        assert_eq!(i.args, ["CMD", "/check", "-v"]);
        assert_eq!(args("HEALTHCHECK NONE"), ["NONE"]);
        assert!(args("HEALTHCHECK").is_empty());
    }

    #[test]
    fn onbuild_keeps_trigger_text() {
        assert_eq!(args("ONBUILD RUN echo \"hi\""), ["RUN echo \"hi\""]);
        assert_eq!(
            args("onbuild   copy --chown=1 . /app"),
            ["copy --chown=1 . /app"]
        );
        let i = one("ONBUILD RUN <<EOF\necho hi\nEOF");
        assert_eq!(i.heredocs[0].content, "echo hi\n");
        assert_eq!(i.end_line, 3);
        let df = parse_syntax("FROM a\nONBUILD COPY --bogus=1 a b").unwrap();
        assert!(df.warnings[0].message.contains("ONBUILD trigger will fail"));
        assert!(syntax_err("ONBUILD RUN [1]")
            .message
            .contains("strings only"));
    }

    #[test]
    fn onbuild_triggers_of_base_images() {
        let raw = parse_onbuild_trigger("COPY --chown=1 . /app/src", 4).unwrap();
        assert_eq!((raw.line, raw.keyword.as_str()), (4, "COPY"));
        assert_eq!(raw.args, [".", "/app/src"]);
        let raw = parse_onbuild_trigger("RUN <<EOF\necho hi\nEOF", 1).unwrap();
        assert_eq!(raw.heredocs[0].content, "echo hi\n");
        for (bad, msg) in [
            ("FROM x", "FROM isn't allowed"),
            ("RUN a\nRUN b", "single expression"),
            ("BOGUS x", "unknown instruction: BOGUS"),
            ("", "file with no instructions"),
        ] {
            let e = parse_onbuild_trigger(bad, 9).unwrap_err();
            assert_eq!(e.line, 9);
            assert!(e.message.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn heredocs() {
        let i = one("RUN <<EOF\napt-get update\napt-get install -y curl\nEOF");
        assert_eq!(i.args, ["<<EOF"]);
        assert_eq!(i.heredocs.len(), 1);
        assert_eq!(i.heredocs[0].name, "EOF");
        assert_eq!(
            i.heredocs[0].content,
            "apt-get update\napt-get install -y curl\n"
        );
        assert!(i.heredocs[0].expand);
        assert_eq!((i.line, i.end_line), (1, 4));
    }

    #[test]
    fn heredoc_chomp_and_quotes() {
        let i = one("RUN <<-\"EOT\" bash\n\techo $HOME\n\t\tEOT");
        let d = &i.heredocs[0];
        assert_eq!(d.content, "echo $HOME\n");
        assert!(!d.expand && d.chomp);
        assert_eq!(i.end_line, 3);
        let i = one("RUN python3 <<'PY'\nprint('x')\nPY");
        assert!(!i.heredocs[0].expand);
    }

    #[test]
    fn several_heredocs_in_order() {
        let i = one("RUN <<A cat && <<B cat\none\nA\ntwo\nB");
        let names: Vec<_> = i
            .heredocs
            .iter()
            .map(|d| (d.name.as_str(), d.content.as_str()))
            .collect();
        assert_eq!(names, [("A", "one\n"), ("B", "two\n")]);
        let i = one("COPY <<f1 <<f2 /dst/\n1\nf1\n2\nf2");
        assert_eq!(i.args, ["<<f1", "<<f2", "/dst/"]);
        assert_eq!(i.heredocs.len(), 2);
    }

    #[test]
    fn heredoc_bodies_are_raw() {
        let i = one("RUN <<EOF\n# not a comment \\\n\n  indented\nEOF");
        assert_eq!(i.heredocs[0].content, "# not a comment \\\n\n  indented\n");
    }

    #[test]
    fn heredocs_only_where_allowed() {
        let df = parse_syntax("FROM a\nCMD <<EOF\nEOF").unwrap();
        assert_eq!(df.instructions.len(), 3);
        let i = one("RUN [\"cat\", \"<<EOF\"]");
        assert!(i.heredocs.is_empty());
    }

    #[test]
    fn unterminated_heredoc() {
        let e = syntax_err("FROM a\nRUN <<EOF\necho hi\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unterminated heredoc <<EOF"));
    }

    #[test]
    fn unicode_everywhere() {
        let i = one("RUN echo \"héllo wörld\" \\\n  日本語");
        assert_eq!(i.args, ["echo \"héllo wörld\"   日本語"]);
        let i = one("LABEL description=\"Ünïcødé ✓\"");
        assert_eq!(i.args, ["description", "\"Ünïcødé ✓\""]);
    }

    #[test]
    fn validation_errors_carry_lines() {
        let e = parse("FROM a\nRUN x\nFOO bar\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (3, "unknown instruction: FOO")
        );
        let e = parse("RUN x\nFROM a").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("no build stage in current context"));
        let e = parse("ARG A=1\n").unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e.message.contains("no stages to build"));
        let e = parse("FROM a\nENV\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "ENV requires at least one argument")
        );
        let e = parse("FROM a\nCOPY --fromm=x a b").unwrap_err();
        assert!(e.message.contains("did you mean --from?"));
    }

    #[test]
    fn lint_warnings_and_check_skip() {
        let src = "FROM a As Build\nMAINTAINER me\nARG --x=1 A\n";
        let df = parse(src).unwrap();
        let rules: Vec<_> = df.warnings.iter().map(|w| w.rule).collect();
        assert_eq!(
            rules,
            [
                Some("FromAsCasing"),
                Some("StageNameCasing"),
                Some("MaintainerDeprecated"),
                None
            ]
        );
        assert!(df.warnings[3].message.contains("ARG ignores flags (--x=1)"));
        let df = parse(&format!(
            "# check=skip=FromAsCasing,MaintainerDeprecated\n{src}"
        ))
        .unwrap();
        let rules: Vec<_> = df.warnings.iter().map(|w| w.rule).collect();
        assert_eq!(rules, [Some("StageNameCasing"), None]);
        assert!(parse("from a as b").unwrap().warnings.is_empty());
    }
}
