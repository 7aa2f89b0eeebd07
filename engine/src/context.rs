//! The build context as COPY and ADD see it: a directory minus what
//! `.dockerignore` excludes.
//!
//! Patterns follow Docker (moby's `ignorefile` and `patternmatcher`): one
//! per line, `#` starts a comment line, surrounding spaces are trimmed,
//! each pattern is cleaned to a relative path (a leading `/` is dropped),
//! `*` and `?` never cross a `/`, `[...]` is a character class, `**`
//! matches any number of directories, `\` escapes the next character and
//! `!` re-includes what an earlier line excluded (the last matching line
//! wins). A pattern that matches a directory also excludes everything
//! below it.
use std::path::{Component, Path, PathBuf};

use crate::excerpt::excerpt;

/// The parsed `.dockerignore` rules; empty excludes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// The cleaned pattern as written, for messages.
    text: String,
    /// `!pattern`: re-includes.
    exception: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`: any run of characters but `/`.
    Star,
    /// `?`: one character but `/`.
    Any,
    /// `[...]`: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/` (or `**` inside a pattern): any number of whole directories,
    /// zero included.
    Dirs,
    /// A trailing `**`: anything, `/` included.
    Rest,
}

/// A `.dockerignore` pattern Docker refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("illegal exclusion pattern: \"!\"")]
    IllegalExclusion,
    #[error("invalid pattern {:?}", excerpt(.0))]
    Invalid(String),
}

/// A `.dockerignore` file that cannot be used, named by its path.
#[derive(Debug, thiserror::Error)]
pub enum IgnoreFileError {
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Pattern {
        path: PathBuf,
        #[source]
        source: PatternError,
    },
}

/// Whether a context entry can be seen through the ignore rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Visible,
    Hidden,
    /// An excluded directory below which an exception (`!`) may re-include
    /// something: it is visible only if something below it is.
    HiddenUnlessChildren,
}

impl Ignore {
    /// Reads the rules for a build: `<dockerfile>.dockerignore` beside the
    /// Dockerfile when it exists (BuildKit gives it precedence), else
    /// `.dockerignore` in the context root, else none.
    pub fn load(context: &Path, dockerfile: Option<&Path>) -> Result<Ignore, IgnoreFileError> {
        let mut candidates = Vec::new();
        if let Some(df) = dockerfile {
            let mut name = df.as_os_str().to_os_string();
            name.push(".dockerignore");
            candidates.push(PathBuf::from(name));
        }
        candidates.push(context.join(".dockerignore"));
        for path in candidates {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    return Ignore::parse(&String::from_utf8_lossy(&bytes))
                        .map_err(|source| IgnoreFileError::Pattern { path, source })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(IgnoreFileError::Read { path, source }),
            }
        }
        Ok(Ignore::default())
    }

    /// Parses the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> Result<Ignore, PatternError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for line in text.lines() {
            // Docker drops comment lines before trimming.
            if line.starts_with('#') {
                continue;
            }
            let mut line = line.trim();
            if line.is_empty() {
                continue;
            }
            let exception = line.starts_with('!');
            if exception {
                line = line[1..].trim();
            }
            let cleaned = clean(line);
            if exception && cleaned.is_empty() {
                return Err(PatternError::IllegalExclusion);
            }
            patterns.push(Pattern {
                tokens: compile(&cleaned)?,
                text: cleaned,
                exception,
            });
        }
        Ok(Ignore { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exception)
    }

    /// Whether `rel` (relative to the context root) is excluded: the last
    /// pattern that matches it or one of its parent directories decides,
    /// as moby's `MatchesOrParentMatches`.
    pub fn excludes(&self, rel: &Path) -> bool {
        let file = to_slash(rel);
        if file.is_empty() || self.patterns.is_empty() {
            return false;
        }
        let parents: Vec<&str> = match file.rfind('/') {
            Some(i) => file[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            // Only a pattern that can change the outcome is evaluated.
            if p.exception != matched {
                continue;
            }
            let mut hit = matches(&p.tokens, &file);
            if !hit {
                hit = (1..=parents.len()).any(|n| matches(&p.tokens, &parents[..n].join("/")));
            }
            if hit {
                matched = !p.exception;
            }
        }
        matched
    }

    /// How a context entry at `rel` is seen; `is_dir` says whether an
    /// excluded entry may still hold re-included children.
    pub fn visibility(&self, rel: &Path, is_dir: bool) -> Visibility {
        if !self.excludes(rel) {
            Visibility::Visible
        } else if is_dir && self.has_exceptions() {
            Visibility::HiddenUnlessChildren
        } else {
            Visibility::Hidden
        }
    }

    /// Whether anything below the directory `host` (at `rel` in the
    /// context) is visible, for a [`Visibility::HiddenUnlessChildren`]
    /// directory.
    pub fn any_visible_below(&self, host: &Path, rel: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(host) else {
            return false;
        };
        entries.flatten().any(|e| {
            let child = rel.join(e.file_name());
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            match self.visibility(&child, is_dir) {
                Visibility::Visible => true,
                Visibility::Hidden => false,
                Visibility::HiddenUnlessChildren => self.any_visible_below(&e.path(), &child),
            }
        })
    }

    /// The patterns as cleaned, `!` included, for messages and tests.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| match p.exception {
                true => format!("!{}", p.text),
                false => p.text.clone(),
            })
            .collect()
    }
}

/// A context filter: the context root and its rules.
#[derive(Debug, Clone, Copy)]
pub struct Filter<'a> {
    pub root: &'a Path,
    pub ignore: &'a Ignore,
}

impl Filter<'_> {
    /// Whether the host path `host` (inside the context) is seen by a copy:
    /// an excluded directory is kept only when something below it is
    /// re-included.
    pub fn shows(&self, host: &Path) -> bool {
        if self.ignore.is_empty() {
            return true;
        }
        let Ok(rel) = host.strip_prefix(self.root) else {
            return true;
        };
        let is_dir = std::fs::symlink_metadata(host).is_ok_and(|m| m.is_dir());
        match self.ignore.visibility(rel, is_dir) {
            Visibility::Visible => true,
            Visibility::Hidden => false,
            Visibility::HiddenUnlessChildren => self.ignore.any_visible_below(host, rel),
        }
    }
}

fn to_slash(rel: &Path) -> String {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Go's `filepath.Clean`, then a leading `/` dropped; `.` is the empty
/// pattern (which matches nothing, as the context root is never excluded).
fn clean(pattern: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|l| *l != "..") {
                    out.pop();
                } else if !pattern.starts_with('/') {
                    out.push("..");
                }
            }
            p => out.push(p),
        }
    }
    out.join("/")
}

fn compile(pattern: &str) -> Result<Vec<Token>, PatternError> {
    let bad = || PatternError::Invalid(pattern.to_string());
    let mut tokens = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                tokens.push(match chars.peek() {
                    None => Token::Rest,
                    Some(_) => Token::Dirs,
                });
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Any),
            '\\' => tokens.push(Token::Char(chars.next().unwrap_or('\\'))),
            '[' => {
                // Docker hands classes to Go's regexp: only `^` negates.
                let negated = chars.peek() == Some(&'^');
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    let lo = match c {
                        ']' if !ranges.is_empty() => {
                            closed = true;
                            break;
                        }
                        '\\' => chars.next().ok_or_else(bad)?,
                        c => c,
                    };
                    let hi = if chars.peek() == Some(&'-') {
                        chars.next();
                        match chars.next() {
                            Some(']') | None => return Err(bad()),
                            Some('\\') => chars.next().ok_or_else(bad)?,
                            Some(h) => h,
                        }
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(bad());
                    }
                    ranges.push((lo, hi));
                }
                if !closed {
                    return Err(bad());
                }
                tokens.push(Token::Class { negated, ranges });
            }
            c => tokens.push(Token::Char(c)),
        }
    }
    Ok(tokens)
}

/// Whether the whole of `s` matches the tokens (backtracking; patterns and
/// paths are short).
fn matches(tokens: &[Token], s: &str) -> bool {
    let chars: Vec<char> = s.chars().collect();
    match_at(tokens, &chars)
}

fn match_at(tokens: &[Token], s: &[char]) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return s.is_empty();
    };
    match first {
        Token::Char(c) => s.first() == Some(c) && match_at(rest, &s[1..]),
        Token::Any => s.first().is_some_and(|c| *c != '/') && match_at(rest, &s[1..]),
        Token::Class { negated, ranges } => s.first().is_some_and(|c| {
            let inside = ranges.iter().any(|(lo, hi)| lo <= c && c <= hi);
            *c != '/' && inside != *negated && match_at(rest, &s[1..])
        }),
        Token::Star => {
            let run = s.iter().take_while(|c| **c != '/').count();
            (0..=run).any(|n| match_at(rest, &s[n..]))
        }
        // `(.*/)?`: nothing, or anything that ends with a `/`.
        Token::Dirs => {
            match_at(rest, s) || (0..s.len()).any(|i| s[i] == '/' && match_at(rest, &s[i + 1..]))
        }
        Token::Rest => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> Ignore {
        Ignore::parse(text).unwrap()
    }

    fn excluded(ig: &Ignore, path: &str) -> bool {
        ig.excludes(Path::new(path))
    }

    #[test]
    fn comments_blank_lines_and_cleaning() {
        let ig = ignore("# a comment\n\n  /abs/  \n./rel//x/../y\n #not a comment\n");
        assert_eq!(ig.patterns(), ["abs", "rel/y", "#not a comment"]);
        assert!(excluded(&ig, "abs"));
        assert!(excluded(&ig, "abs/deep/file"));
        assert!(excluded(&ig, "rel/y"));
        assert!(!excluded(&ig, "rel/x"));
        assert!(excluded(&ig, "#not a comment"));
        assert!(!excluded(&ig, "# a comment"));
    }

    #[test]
    fn stars_and_classes_stay_in_one_directory() {
        let ig = ignore("*.md\nsrc/?.c\nlib/[a-c]*.o\nlib/[^x]y\n");
        assert!(excluded(&ig, "README.md"));
        // `*.md` is anchored at the root: it does not match in subdirs.
        assert!(!excluded(&ig, "docs/README.md"));
        assert!(excluded(&ig, "src/a.c"));
        assert!(!excluded(&ig, "src/ab.c"));
        assert!(!excluded(&ig, "src/sub/a.c"));
        assert!(excluded(&ig, "lib/b1.o"));
        assert!(!excluded(&ig, "lib/d1.o"));
        assert!(excluded(&ig, "lib/ay"));
        assert!(!excluded(&ig, "lib/xy"));
    }

    #[test]
    fn double_star_matches_any_number_of_directories() {
        let ig = ignore("**/*.log\nbuild/**\na/**/z\n");
        assert!(excluded(&ig, "x.log"));
        assert!(excluded(&ig, "deep/er/x.log"));
        assert!(!excluded(&ig, "x.log.txt"));
        assert!(excluded(&ig, "build/anything/at/all"));
        assert!(excluded(&ig, "a/z"));
        assert!(excluded(&ig, "a/b/c/z"));
        assert!(!excluded(&ig, "ab/z"));
    }

    #[test]
    fn exceptions_re_include_and_the_last_line_wins() {
        let ig = ignore("**/*.log\n!keep.log\n!logs/keep.log\n");
        assert!(excluded(&ig, "debug.log"));
        assert!(!excluded(&ig, "keep.log"));
        assert!(excluded(&ig, "sub/keep.log"));
        assert!(!excluded(&ig, "logs/keep.log"));
        let ig = ignore("!keep.log\n*.log\n");
        assert!(excluded(&ig, "keep.log"), "a later exclusion wins");
        let ig = ignore("docs\n!docs/api\n");
        assert!(excluded(&ig, "docs/guide.md"));
        assert!(!excluded(&ig, "docs/api"));
        assert!(!excluded(&ig, "docs/api/index.html"));
        assert_eq!(Ignore::parse("!\n"), Err(PatternError::IllegalExclusion));
        assert_eq!(
            Ignore::parse("[a-\n").unwrap_err().to_string(),
            "invalid pattern \"[a-\""
        );
    }

    #[test]
    fn directories_hide_their_contents_unless_an_exception_reaches_in() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("docs/api")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::write(root.join("docs/api/index.html"), "").unwrap();
        std::fs::write(root.join("docs/guide.md"), "").unwrap();
        std::fs::write(root.join("tmp/x"), "").unwrap();
        let ig = ignore("docs\ntmp\n!docs/api/*.html\n");
        let f = Filter { root, ignore: &ig };
        assert!(f.shows(&root.join("docs")));
        assert!(!f.shows(&root.join("docs/guide.md")));
        assert!(f.shows(&root.join("docs/api/index.html")));
        // No exception can reach below tmp/ with something that exists.
        assert!(!f.shows(&root.join("tmp")));
        assert!(f.shows(root));
    }

    #[test]
    fn the_dockerfile_specific_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join(".dockerignore"), "a\n").unwrap();
        let df = dir.path().join("app.Dockerfile");
        assert_eq!(Ignore::load(&ctx, Some(&df)).unwrap().patterns(), ["a"]);
        std::fs::write(dir.path().join("app.Dockerfile.dockerignore"), "b\n").unwrap();
        assert_eq!(Ignore::load(&ctx, Some(&df)).unwrap().patterns(), ["b"]);
        assert!(Ignore::load(&dir.path().join("none"), None)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_bad_ignore_file_is_named_with_its_cause() {
        use std::error::Error;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".dockerignore");
        std::fs::write(&file, "ok\n[z-a]\n").unwrap();
        let e = Ignore::load(dir.path(), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: invalid pattern \"[z-a]\"", file.display())
        );
        assert!(matches!(
            e.source().unwrap().downcast_ref(),
            Some(PatternError::Invalid(_))
        ));
        // A directory where the file should be: the read fails, and the
        // I/O error is kept as the cause.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let e = Ignore::load(dir.path(), None).unwrap_err();
        assert!(matches!(e, IgnoreFileError::Read { ref path, .. } if *path == file));
        let io = e
            .source()
            .unwrap()
            .downcast_ref::<std::io::Error>()
            .unwrap();
        assert_eq!(e.to_string(), format!("{}: {io}", file.display()));
    }
}
