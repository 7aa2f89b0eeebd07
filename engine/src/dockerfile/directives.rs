//! Parser directives (`# syntax=`, `# escape=`, `# check=`) at the top of
//! a Dockerfile.
//!
//! As in BuildKit, a directive is a `#` comment of the form `key=value`
//! with a known key (case-insensitive). Directives are only looked for
//! before anything else: the first line that is not one (an instruction,
//! an empty line, any other comment) ends the search for good. Repeating a
//! directive is an error.

use crate::excerpt::excerpt;

/// The escape character BuildKit uses unless `# escape=` says otherwise.
pub const DEFAULT_ESCAPE: char = '\\';

const KNOWN: [&str; 3] = ["syntax", "escape", "check"];

/// A directive BuildKit refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DirectiveError {
    #[error("only one {0} parser directive can be used")]
    Repeated(String),
    #[error("invalid escape token '{}' does not match ` or \\", excerpt(.0))]
    InvalidEscape(String),
}

/// The state of directive parsing while lines are read.
#[derive(Debug, Clone)]
pub(crate) struct DirectiveParser {
    done: bool,
    pub directives: Vec<(String, String)>,
    pub escape: char,
}

impl DirectiveParser {
    pub(crate) fn new() -> Self {
        DirectiveParser {
            done: false,
            directives: Vec::new(),
            escape: DEFAULT_ESCAPE,
        }
    }

    /// Looks at one line (newline and leading whitespace already trimmed).
    /// Returns whether it was a directive.
    pub(crate) fn feed(&mut self, line: &str) -> Result<bool, DirectiveError> {
        if self.done {
            return Ok(false);
        }
        let Some((key, value)) = line.strip_prefix('#').and_then(match_directive) else {
            self.done = true;
            return Ok(false);
        };
        let key = key.to_ascii_lowercase();
        if !KNOWN.contains(&key.as_str()) {
            self.done = true;
            return Ok(false);
        }
        if self.directives.iter().any(|(k, _)| *k == key) {
            return Err(DirectiveError::Repeated(key));
        }
        if key == "escape" {
            self.escape = match value {
                "\\" => '\\',
                "`" => '`',
                other => return Err(DirectiveError::InvalidEscape(other.to_string())),
            };
        }
        self.directives.push((key, value.to_string()));
        Ok(true)
    }
}

/// Go's `\s`: the ASCII whitespace its regexp package knows.
fn is_re_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0C' | '\r')
}

/// `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` on the comment text after
/// leading whitespace.
fn match_directive(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start_matches(char::is_whitespace);
    let key_len = text
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
        .map_or(text.len(), |(i, _)| i);
    if key_len == 0 {
        return None;
    }
    let (key, rest) = text.split_at(key_len);
    let rest = rest.trim_start_matches(is_re_space).strip_prefix('=')?;
    let value = rest
        .trim_start_matches(is_re_space)
        .trim_end_matches(is_re_space);
    if value.is_empty() || value.contains('\n') {
        return None;
    }
    Some((key, value))
}

/// What `# check=` asks for: lint rules to skip, and whether a lint
/// warning should fail the build (`error=true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    pub skip_all: bool,
    pub skip: Vec<String>,
    pub error: bool,
}

impl CheckConfig {
    /// Parses `skip=Rule1,Rule2;error=true` (unknown keys are ignored, as
    /// BuildKit does with a warning we do not repeat).
    pub fn parse(value: &str) -> Self {
        let mut cfg = CheckConfig::default();
        for part in value.split(';') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "skip" => {
                    for rule in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                        if rule.eq_ignore_ascii_case("all") {
                            cfg.skip_all = true;
                        } else {
                            cfg.skip.push(rule.to_string());
                        }
                    }
                }
                "error" => cfg.error = v.trim().eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        cfg
    }

    /// Whether warnings from `rule` are wanted.
    pub fn enabled(&self, rule: &str) -> bool {
        !self.skip_all && !self.skip.iter().any(|r| r.eq_ignore_ascii_case(rule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_case_insensitive_and_trimmed() {
        let mut p = DirectiveParser::new();
        assert!(p.feed("# SYNTAX = docker/dockerfile:1.7  ").unwrap());
        assert!(p.feed("#escape=`").unwrap());
        assert!(p.feed("# Check=skip=all").unwrap());
        assert_eq!(
            p.directives,
            [
                ("syntax".to_string(), "docker/dockerfile:1.7".to_string()),
                ("escape".to_string(), "`".to_string()),
                ("check".to_string(), "skip=all".to_string()),
            ]
        );
        assert_eq!(p.escape, '`');
    }

    #[test]
    fn the_first_other_line_ends_directives() {
        let mut p = DirectiveParser::new();
        assert!(!p.feed("# a comment").unwrap());
        assert!(!p.feed("# escape=`").unwrap());
        assert_eq!(p.escape, '\\');

        let mut p = DirectiveParser::new();
        assert!(!p.feed("").unwrap());
        assert!(!p.feed("# syntax=x").unwrap());

        let mut p = DirectiveParser::new();
        assert!(!p.feed("# unknown=directive").unwrap());
        assert!(!p.feed("# escape=`").unwrap());

        let mut p = DirectiveParser::new();
        assert!(!p.feed("FROM scratch").unwrap());
        assert!(!p.feed("# escape=`").unwrap());
    }

    #[test]
    fn repeated_and_invalid_directives_fail() {
        let mut p = DirectiveParser::new();
        p.feed("# escape=\\").unwrap();
        assert_eq!(
            p.feed("# escape=`").unwrap_err().to_string(),
            "only one escape parser directive can be used"
        );
        let mut p = DirectiveParser::new();
        assert!(p
            .feed("# escape=x")
            .unwrap_err()
            .to_string()
            .contains("invalid escape token 'x'"));
    }

    #[test]
    fn malformed_directives_are_comments() {
        for line in [
            "#",
            "# =x",
            "# 1x=y",
            "# syntax",
            "# syntax=",
            "# sy-ntax=x",
        ] {
            let mut p = DirectiveParser::new();
            assert!(!p.feed(line).unwrap(), "{line}");
        }
    }

    #[test]
    fn check_config() {
        let c = CheckConfig::parse("skip=JSONArgsRecommended, StageNameCasing;error=true");
        assert!(c.error);
        assert!(!c.enabled("stagenamecasing"));
        assert!(c.enabled("FromAsCasing"));
        assert!(!CheckConfig::parse("skip=all").enabled("FromAsCasing"));
        assert_eq!(CheckConfig::parse("garbage"), CheckConfig::default());
    }
}
