//! Shell patterns for `${VAR#pat}`, `${VAR%pat}` and `${VAR/pat/repl}`.
//!
//! BuildKit turns the pattern into a Go regular expression (`*` → `.*` or
//! `.*?`, `?` → `.`, no bracket expressions) and lets Go's leftmost-first
//! matcher pick the match. We match the same token language with a memoised
//! backtracking matcher that tries alternatives in the same preference
//! order, so the chosen match is the one Go would choose. Like Go's `.`,
//! `*` and `?` never match a newline.

use std::collections::HashMap;

use crate::excerpt::excerpt;

/// The most (pattern token, value position) pairs one match may explore:
/// far beyond any real `${VAR%pattern}`, low enough to bound memory.
const MAX_STATES: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`: any one character but a newline.
    Any,
    /// `*`: any run of characters without a newline.
    Star,
}

/// A pattern that cannot be applied to a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("invalid pattern ({}) in substitution: {source}", excerpt(.pattern))]
    Invalid {
        pattern: String,
        #[source]
        source: PatternSyntaxError,
    },
    #[error("pattern too complex for this value")]
    TooComplex,
}

/// Why a pattern does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternSyntaxError {
    #[error("invalid escape '\\{0}'")]
    InvalidEscape(char),
    #[error("invalid escape '\\' at end of pattern")]
    TrailingEscape,
}

/// A compiled pattern. `greedy` decides whether `*` prefers the longest
/// (`##`, `%%`, `/`) or the shortest (`#`, `%`) run.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    tokens: Vec<Token>,
    greedy: bool,
}

impl Pattern {
    /// Compiles a pattern as BuildKit's `convertShellPatternToRegex` does:
    /// `\` escapes only `*`, `?` and `\`; before `}` or `/` it is dropped.
    pub(crate) fn compile(pattern: &str, greedy: bool) -> Result<Pattern, PatternError> {
        let invalid = |source| PatternError::Invalid {
            pattern: pattern.to_string(),
            source,
        };
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::with_capacity(chars.len());
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::Any),
                '\\' => match chars.get(i) {
                    // `}` and `/` had to be escaped inside `${}`; the escape
                    // is not part of the pattern.
                    Some('}') | Some('/') => {}
                    Some(&e @ ('*' | '?' | '\\')) => {
                        tokens.push(Token::Literal(e));
                        i += 1;
                    }
                    Some(&e) => return Err(invalid(PatternSyntaxError::InvalidEscape(e))),
                    None => return Err(invalid(PatternSyntaxError::TrailingEscape)),
                },
                other => tokens.push(Token::Literal(other)),
            }
        }
        Ok(Pattern { tokens, greedy })
    }

    /// Refuses pattern and value pairs too large to match safely.
    fn check_size(&self, value: &[char]) -> Result<(), PatternError> {
        let stars = self.tokens.contains(&Token::Star);
        if self.tokens.len() > 10_000
            || (stars && self.tokens.len().saturating_mul(value.len() + 1) > MAX_STATES)
        {
            return Err(PatternError::TooComplex);
        }
        Ok(())
    }

    /// The end of the preferred match that starts at `start`, if any.
    fn match_at(&self, value: &[char], start: usize) -> Option<usize> {
        let mut memo = HashMap::new();
        self.match_from(value, 0, start, &mut memo)
    }

    fn match_from(
        &self,
        value: &[char],
        ti: usize,
        vi: usize,
        memo: &mut HashMap<(usize, usize), Option<usize>>,
    ) -> Option<usize> {
        if let Some(&known) = memo.get(&(ti, vi)) {
            return known;
        }
        let result = match self.tokens.get(ti) {
            None => Some(vi),
            Some(Token::Literal(c)) => {
                if value.get(vi) == Some(c) {
                    self.match_from(value, ti + 1, vi + 1, memo)
                } else {
                    None
                }
            }
            Some(Token::Any) => match value.get(vi) {
                Some(&c) if c != '\n' => self.match_from(value, ti + 1, vi + 1, memo),
                _ => None,
            },
            Some(Token::Star) => {
                let run = value[vi..].iter().take_while(|&&c| c != '\n').count();
                let mut found = None;
                if self.greedy {
                    for k in (0..=run).rev() {
                        found = self.match_from(value, ti + 1, vi + k, memo);
                        if found.is_some() {
                            break;
                        }
                    }
                } else {
                    for k in 0..=run {
                        found = self.match_from(value, ti + 1, vi + k, memo);
                        if found.is_some() {
                            break;
                        }
                    }
                }
                found
            }
        };
        memo.insert((ti, vi), result);
        result
    }

    /// The leftmost match: its start and end.
    fn find(&self, value: &[char], from: usize) -> Option<(usize, usize)> {
        (from..=value.len()).find_map(|s| self.match_at(value, s).map(|e| (s, e)))
    }
}

/// `${VAR#pat}` (`greedy` false) and `${VAR##pat}` (`greedy` true).
pub(crate) fn trim_prefix(
    pattern: &str,
    value: &str,
    greedy: bool,
) -> Result<String, PatternError> {
    let pat = Pattern::compile(pattern, greedy)?;
    let chars: Vec<char> = value.chars().collect();
    pat.check_size(&chars)?;
    Ok(match pat.match_at(&chars, 0) {
        Some(end) => chars[end..].iter().collect(),
        None => value.to_string(),
    })
}

/// `${VAR%pat}` and `${VAR%%pat}`: BuildKit reverses pattern and value so
/// that the rightmost match becomes a leftmost one.
pub(crate) fn trim_suffix(
    pattern: &str,
    value: &str,
    greedy: bool,
) -> Result<String, PatternError> {
    let reversed_value: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed_value, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

/// Reverses a pattern but keeps each `\x` escape pair in order (`a\*c` →
/// `c\*a`).
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; chars.len()];
    let last = chars.len().saturating_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let out_idx = last - i;
        if chars[i] == '\\' && i != last {
            out[out_idx - 1] = '\\';
            out[out_idx] = chars[i + 1];
            i += 2;
        } else {
            out[out_idx] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// `${VAR/pat/repl}` (`all` false: first match) and `${VAR//pat/repl}`.
/// `*` is greedy in both. Empty matches follow Go's `ReplaceAllString`: an
/// empty match right after a previous match is not replaced.
pub(crate) fn replace(
    pattern: &str,
    value: &str,
    replacement: &str,
    all: bool,
) -> Result<String, PatternError> {
    let pat = Pattern::compile(pattern, true)?;
    let chars: Vec<char> = value.chars().collect();
    pat.check_size(&chars)?;
    let mut out = String::new();
    if !all {
        return Ok(match pat.find(&chars, 0) {
            Some((s, e)) => {
                out.extend(&chars[..s]);
                out.push_str(replacement);
                out.extend(&chars[e..]);
                out
            }
            None => value.to_string(),
        });
    }
    let mut search = 0;
    let mut last_end = 0;
    while search <= chars.len() {
        let Some((s, e)) = pat.find(&chars, search) else {
            break;
        };
        out.extend(&chars[last_end..s]);
        if e > last_end || s == 0 {
            out.push_str(replacement);
        }
        last_end = e;
        // Always advance at least one character.
        search = if search + 1 > e { search + 1 } else { e };
    }
    if last_end <= chars.len() {
        out.extend(&chars[last_end..]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_shortest_and_longest() {
        assert_eq!(trim_prefix("*/", "a/b/c", false).unwrap(), "b/c");
        assert_eq!(trim_prefix("*/", "a/b/c", true).unwrap(), "c");
        assert_eq!(trim_prefix("x*", "a/b/c", true).unwrap(), "a/b/c");
        assert_eq!(trim_prefix("a?", "abc", false).unwrap(), "c");
        assert_eq!(trim_prefix("", "abc", false).unwrap(), "abc");
    }

    #[test]
    fn suffix_shortest_and_longest() {
        assert_eq!(trim_suffix(".*", "file.tar.gz", false).unwrap(), "file.tar");
        assert_eq!(trim_suffix(".*", "file.tar.gz", true).unwrap(), "file");
        assert_eq!(trim_suffix("\\*c", "ab*c", false).unwrap(), "ab");
    }

    #[test]
    fn escapes_in_patterns() {
        assert_eq!(trim_prefix("\\*", "*a", false).unwrap(), "a");
        assert_eq!(trim_prefix("\\?", "?a", false).unwrap(), "a");
        assert_eq!(trim_prefix("\\}", "}a", false).unwrap(), "a");
        assert!(trim_prefix("\\a", "a", false)
            .unwrap_err()
            .to_string()
            .contains("invalid escape '\\a'"));
        assert!(trim_prefix("a\\", "a", false).is_err());
    }

    #[test]
    fn regex_metacharacters_are_literal() {
        assert_eq!(trim_prefix("a.c", "abcd", false).unwrap(), "abcd");
        assert_eq!(trim_prefix("a.c", "a.cd", false).unwrap(), "d");
        assert_eq!(trim_prefix("(x)", "(x)y", false).unwrap(), "y");
    }

    #[test]
    fn wildcards_stop_at_newlines() {
        assert_eq!(trim_prefix("*", "ab\ncd", true).unwrap(), "\ncd");
        assert_eq!(trim_prefix("?", "\nx", true).unwrap(), "\nx");
    }

    #[test]
    fn replace_first_and_all() {
        assert_eq!(replace("o", "foo boo", "0", false).unwrap(), "f0o boo");
        assert_eq!(replace("o", "foo boo", "0", true).unwrap(), "f00 b00");
        // `*` is a glob, not a regex repetition: `o*` is "o, then anything".
        assert_eq!(replace("o*", "foo boo", "X", false).unwrap(), "fX");
        assert_eq!(replace("b?o", "foo boo", "X", true).unwrap(), "foo X");
        assert_eq!(replace("x", "abc", "y", true).unwrap(), "abc");
        assert_eq!(replace("é", "café é", "e", true).unwrap(), "cafe e");
    }

    #[test]
    fn replace_with_empty_matches_follows_go() {
        // Go: regexp.MustCompile("").ReplaceAllString("ab", "-") == "-a-b-"
        assert_eq!(replace("", "ab", "-", true).unwrap(), "-a-b-");
        // Go: regexp.MustCompile(".*").ReplaceAllString("ab", "-") == "-"
        assert_eq!(replace("*", "ab", "-", true).unwrap(), "-");
        assert_eq!(replace("?", "ab", "-", true).unwrap(), "--");
        assert_eq!(replace("", "ab", "-", false).unwrap(), "-ab");
    }

    #[test]
    fn huge_patterns_are_refused() {
        let value = "a".repeat(5_000);
        let pattern = "*a".repeat(1_000);
        assert!(trim_prefix(&pattern, &value, true)
            .unwrap_err()
            .to_string()
            .contains("too complex"));
        assert!(replace(&"x".repeat(20_000), "x", "y", true).is_err());
        // Long literal patterns are fine.
        assert_eq!(
            trim_prefix(&"a".repeat(3_000), &value, false)
                .unwrap()
                .len(),
            2_000
        );
    }

    #[test]
    fn reverse_keeps_escape_pairs() {
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern(""), "");
        assert_eq!(reverse_pattern("\\"), "\\");
    }
}
