//! Variable expansion with BuildKit's shell lexer rules.
//!
//! This mirrors `frontend/dockerfile/shell/lex.go`: `$VAR` and `${VAR}`
//! with the `:-` `-` `:+` `+` `:?` `?` `#` `##` `%` `%%` `/` `//`
//! modifiers, single quotes (literal), double quotes (only `$`, the escape
//! character and `"` are special inside), the escape character outside
//! quotes, and word splitting that happens *after* substitution (a value's
//! spaces split words, quoted spaces do not). Nothing here runs a command:
//! there is no `$(...)` or arithmetic, exactly like BuildKit.

use std::collections::BTreeSet;

use super::error::FrontendError;
use super::pattern::{self, PatternError};
use crate::excerpt::excerpt;

/// How deeply `${...}` may nest. BuildKit has no limit (Go stacks grow);
/// ours keeps a hostile Dockerfile from overflowing the stack.
const MAX_NESTING: usize = 200;

/// A failure of variable expansion (`${VAR:?}`, a bad substitution, an
/// unterminated quote) in one word. It carries no line: the caller knows
/// which instruction it was expanding and turns it into a
/// [`FrontendError`] with [`ExpandError::at`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to process {:?}: {source}", excerpt(.word))]
pub struct ExpandError {
    /// The word as written.
    pub(crate) word: String,
    #[source]
    pub(crate) source: LexError,
}

impl ExpandError {
    /// The same problem, located at `line`.
    pub fn at(self, line: usize) -> FrontendError {
        FrontendError::new(line, self.to_string())
    }
}

/// What the lexer found wrong; the texts are BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LexError {
    #[error("unexpected end of statement while looking for matching {0}")]
    Unmatched(char),
    #[error("unexpected end of statement while looking for matching single-quote")]
    UnterminatedSingleQuote,
    #[error("unexpected end of statement while looking for matching double-quote")]
    UnterminatedDoubleQuote,
    #[error("syntax error: substitutions nested too deeply")]
    TooDeep,
    #[error("syntax error: missing '}}'")]
    MissingBrace,
    #[error("syntax error: missing '/' in ${{}}")]
    MissingSlash,
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    #[error("unsupported modifier ({}) in substitution", excerpt(.0))]
    UnsupportedModifier(String),
    /// `${VAR?message}` / `${VAR:?message}` of an unset variable.
    #[error("{}: {}", excerpt(.name), excerpt(.message.as_deref().unwrap_or("is not allowed to be unset")))]
    Unset {
        name: String,
        message: Option<String>,
    },
    /// `${VAR:?message}` of an empty variable.
    #[error("{}: {}", excerpt(.name), excerpt(.message.as_deref().unwrap_or("is not allowed to be empty")))]
    Empty {
        name: String,
        message: Option<String>,
    },
    #[error(transparent)]
    Pattern(#[from] PatternError),
}

/// A variable lookup: `Some(value)` when the variable is set (possibly to
/// the empty string), `None` when it is unset.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Expands `word` as one word: substitutes variables and removes quotes and
/// escapes, but does not split (BuildKit's `ProcessWord`). Used for COPY/ADD
/// paths and flags, ENV and LABEL keys and values, USER, WORKDIR, VOLUME,
/// STOPSIGNAL, ARG defaults and FROM.
pub fn expand_word(word: &str, escape: char, lookup: Lookup<'_>) -> Result<String, ExpandError> {
    process(word, &LexOptions::new(escape), lookup).map(|p| p.result)
}

/// Expands `word` and splits the result into words (BuildKit's
/// `ProcessWords`), as EXPOSE does. Empty words are dropped, even quoted
/// ones (`""`), as in BuildKit.
pub fn expand_words(
    word: &str,
    escape: char,
    lookup: Lookup<'_>,
) -> Result<Vec<String>, ExpandError> {
    process(word, &LexOptions::new(escape), lookup).map(|p| p.words)
}

/// Expands the content of a COPY/ADD heredoc whose delimiter was not quoted:
/// variables and `\` escapes are processed, quotes are kept as written
/// (BuildKit's `SkipProcessQuotes` lexer, whose escape is always `\`).
pub fn expand_heredoc(content: &str, lookup: Lookup<'_>) -> Result<String, ExpandError> {
    let opts = LexOptions {
        skip_process_quotes: true,
        ..LexOptions::new('\\')
    };
    process(content, &opts, lookup).map(|p| p.result)
}

/// The lexer's switches, as in BuildKit's `shell.Lex`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LexOptions {
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
}

impl LexOptions {
    pub(crate) fn new(escape: char) -> Self {
        LexOptions {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }
}

/// What one run of the lexer produced.
#[derive(Debug, Clone, Default)]
pub(crate) struct Processed {
    /// The word with substitutions, quote and escape removal.
    pub result: String,
    /// The same, split into words.
    pub words: Vec<String>,
    /// Variables that were looked up and found unset.
    pub unmatched: BTreeSet<String>,
}

pub(crate) fn process(
    word: &str,
    opts: &LexOptions,
    lookup: Lookup<'_>,
) -> Result<Processed, ExpandError> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        opts: *opts,
        raw_escapes: opts.raw_escapes,
        lookup,
        unmatched: BTreeSet::new(),
        depth: 0,
    };
    match lexer.process_stop_on(None, opts.raw_escapes) {
        Ok((result, words)) => Ok(Processed {
            result,
            words,
            unmatched: lexer.unmatched,
        }),
        Err(source) => Err(ExpandError {
            word: word.to_string(),
            source,
        }),
    }
}

/// Accumulates words; a space only splits when it came from outside quotes.
#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, c: char) {
        if c.is_whitespace() {
            if self.in_word && !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(c);
        }
    }

    fn add_raw_char(&mut self, c: char) {
        self.word.push(c);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(self.word);
        }
        self.words
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    opts: LexOptions,
    /// The current raw-escapes mode: `${V#pat}`, `${V%pat}` and `${V/p/r}`
    /// switch it on while they read their pattern.
    raw_escapes: bool,
    lookup: Lookup<'a>,
    unmatched: BTreeSet<String>,
    depth: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let value = (self.lookup)(name);
        if value.is_none() {
            self.unmatched.insert(name.to_string());
        }
        value
    }

    /// Reads until `stop` (consumed) or the end; an unmet `stop` is an error.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), LexError> {
        let saved = std::mem::replace(&mut self.raw_escapes, raw_escapes);
        let out = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        out
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), LexError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(c) = self.peek() {
            if stop == Some(c) {
                self.next();
                return Ok((result, words.finish()));
            }
            if c == '$' {
                let value = self.process_dollar()?;
                result.push_str(&value);
                words.add_string(&value);
            } else if c == '\'' && !self.opts.skip_process_quotes {
                let value = self.process_single_quote()?;
                result.push_str(&value);
                words.add_raw_string(&value);
            } else if c == '"' && !self.opts.skip_process_quotes {
                let value = self.process_double_quote()?;
                result.push_str(&value);
                words.add_raw_string(&value);
            } else {
                let mut c = self.next().unwrap_or_default();
                if c == self.opts.escape {
                    if self.raw_escapes {
                        words.add_raw_char(c);
                        result.push(c);
                    }
                    // The escape character escapes anything, except at the
                    // end where it is dropped.
                    match self.next() {
                        Some(escaped) => c = escaped,
                        None => break,
                    }
                    words.add_raw_char(c);
                } else {
                    words.add_char(c);
                }
                result.push(c);
            }
        }
        match stop {
            Some(s) => Err(LexError::Unmatched(s)),
            None => Ok((result, words.finish())),
        }
    }

    fn process_single_quote(&mut self) -> Result<String, LexError> {
        let mut result = String::new();
        let open = self.next().unwrap_or('\'');
        if self.opts.raw_quotes {
            result.push(open);
        }
        loop {
            match self.next() {
                None => return Err(LexError::UnterminatedSingleQuote),
                Some('\'') => {
                    if self.opts.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, LexError> {
        let mut result = String::new();
        let open = self.next().unwrap_or('"');
        if self.opts.raw_quotes {
            result.push(open);
        }
        loop {
            match self.peek() {
                None => return Err(LexError::UnterminatedDoubleQuote),
                Some('"') => {
                    self.next();
                    if self.opts.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(_) => {
                    let mut c = self.next().unwrap_or_default();
                    if c == self.opts.escape {
                        if self.raw_escapes {
                            result.push(c);
                        }
                        match self.peek() {
                            // An escape at the very end is dropped; the
                            // missing quote is reported next time round.
                            None => continue,
                            // Inside double quotes only these are escaped;
                            // any other escape stays as written.
                            Some(n) if n == '"' || n == '$' || n == self.opts.escape => {
                                self.next();
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(c);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Result<String, LexError> {
        if self.depth >= MAX_NESTING {
            return Err(LexError::TooDeep);
        }
        self.depth += 1;
        let out = self.process_dollar_inner();
        self.depth -= 1;
        out
    }

    fn process_dollar_inner(&mut self) -> Result<String, LexError> {
        self.next(); // the `$`
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.opts.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next(); // the `{`
        match self.peek() {
            None => return Err(LexError::MissingBrace),
            Some('{') | Some('}') | Some(':') => return Err(LexError::BadSubstitution),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(c) = self.next() else {
            return Err(LexError::MissingBrace);
        };
        match c {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.opts.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' => {
                // `${VAR:x}`: the colon makes an empty value count as unset.
                let modifier = self.next();
                let mut chs = String::from(':');
                chs.extend(modifier);
                self.process_modifier(&name, modifier, &chs, true)
            }
            '+' | '-' | '?' | '#' | '%' => {
                self.process_modifier(&name, Some(c), &c.to_string(), false)
            }
            '/' => self.process_replace(&name),
            other => Err(LexError::UnsupportedModifier(other.to_string())),
        }
    }

    fn process_modifier(
        &mut self,
        name: &str,
        modifier: Option<char>,
        chs: &str,
        null_is_unset: bool,
    ) -> Result<String, LexError> {
        let raw = matches!(modifier, Some('#') | Some('%'));
        if raw && null_is_unset {
            return Err(LexError::UnsupportedModifier(chs.to_string()));
        }
        let mut word = match self.process_stop_on(Some('}'), raw) {
            Ok((w, _)) => w,
            Err(_) if self.peek().is_none() => return Err(LexError::MissingBrace),
            Err(e) => return Err(e),
        };
        let value = self.get_env(name);
        if value.is_none() && self.opts.skip_unset_env {
            return Ok(format!("${{{name}{chs}{word}}}"));
        }
        let set = value.is_some();
        let value = value.unwrap_or_default();
        let unset = !set || (null_is_unset && value.is_empty());
        match modifier {
            Some('-') => Ok(if unset { word } else { value }),
            Some('+') => Ok(if unset { String::new() } else { word }),
            Some('?') => {
                let name = name.to_string();
                let message = (!word.is_empty()).then_some(word);
                if !set {
                    Err(LexError::Unset { name, message })
                } else if null_is_unset && value.is_empty() {
                    Err(LexError::Empty { name, message })
                } else {
                    Ok(value)
                }
            }
            Some(m @ ('#' | '%')) => {
                // A doubled modifier (`##`, `%%`) asks for the longest match.
                let greedy = word.starts_with(m);
                if greedy {
                    word.remove(0);
                }
                Ok(if m == '%' {
                    pattern::trim_suffix(&word, &value, greedy)?
                } else {
                    pattern::trim_prefix(&word, &value, greedy)?
                })
            }
            _ => Err(LexError::UnsupportedModifier(chs.to_string())),
        }
    }

    fn process_replace(&mut self, name: &str) -> Result<String, LexError> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let pat = match self.process_stop_on(Some('/'), true) {
            Ok((p, _)) => p,
            Err(_) if self.peek().is_none() => return Err(LexError::MissingSlash),
            Err(e) => return Err(e),
        };
        let replacement = match self.process_stop_on(Some('}'), true) {
            Ok((r, _)) => r,
            Err(_) if self.peek().is_none() => return Err(LexError::MissingBrace),
            Err(e) => return Err(e),
        };
        match self.get_env(name) {
            None if self.opts.skip_unset_env => Ok(format!("${{{name}/{pat}/{replacement}}}")),
            value => Ok(pattern::replace(
                &pat,
                &value.unwrap_or_default(),
                &replacement,
                all,
            )?),
        }
    }

    /// A variable name: letters, digits and `_`; or a run of digits
    /// (positional); or one special parameter character.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && is_digit(c) {
                while let Some(d) = self.peek().filter(|&d| is_digit(d)) {
                    self.next();
                    name.push(d);
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !(c.is_alphabetic() || is_digit(c) || c == '_') {
                break;
            }
            self.next();
            name.push(c);
        }
        name
    }
}

/// Go's `unicode.IsDigit`, close enough: decimal digits of any script.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    const ENV: &[(&str, &str)] = &[
        ("A", "a"),
        ("EMPTY", ""),
        ("PATHV", "/usr/local/bin:/usr/bin"),
        ("FILE", "archive.tar.gz"),
        ("SPACED", "x  y"),
        ("UNI", "héllo wörld"),
        ("_U1", "under"),
    ];

    fn word(w: &str) -> Result<String, ExpandError> {
        expand_word(w, '\\', &env(ENV))
    }

    fn words(w: &str) -> Vec<String> {
        expand_words(w, '\\', &env(ENV)).unwrap()
    }

    #[test]
    fn plain_and_braced_variables() {
        assert_eq!(word("$A").unwrap(), "a");
        assert_eq!(word("${A}").unwrap(), "a");
        assert_eq!(word("x${A}y$A.z").unwrap(), "xaya.z");
        assert_eq!(word("$_U1").unwrap(), "under");
        assert_eq!(word("$UNSET").unwrap(), "");
        assert_eq!(word("${UNSET}").unwrap(), "");
        assert_eq!(word("$").unwrap(), "$");
        assert_eq!(word("a$ b").unwrap(), "a$ b");
        assert_eq!(word("$1x").unwrap(), "x");
        assert_eq!(word("$$").unwrap(), "");
    }

    #[test]
    fn default_and_alternative_values() {
        assert_eq!(word("${UNSET:-def}").unwrap(), "def");
        assert_eq!(word("${EMPTY:-def}").unwrap(), "def");
        assert_eq!(word("${EMPTY-def}").unwrap(), "");
        assert_eq!(word("${UNSET-def}").unwrap(), "def");
        assert_eq!(word("${A:-def}").unwrap(), "a");
        assert_eq!(word("${A:+alt}").unwrap(), "alt");
        assert_eq!(word("${EMPTY:+alt}").unwrap(), "");
        assert_eq!(word("${EMPTY+alt}").unwrap(), "alt");
        assert_eq!(word("${UNSET+alt}").unwrap(), "");
        assert_eq!(word("${UNSET:-$A-x}").unwrap(), "a-x");
        assert_eq!(word("${UNSET:-\"q u\"}").unwrap(), "q u");
        assert_eq!(word("${UNSET:-a\\}b}").unwrap(), "a}b");
    }

    #[test]
    fn required_values() {
        assert_eq!(word("${A:?msg}").unwrap(), "a");
        assert_eq!(word("${EMPTY?msg}").unwrap(), "");
        let e = word("${UNSET:?need it}").unwrap_err();
        assert!(e.to_string().ends_with("UNSET: need it"), "{e}");
        let e = word("${UNSET?}").unwrap_err();
        assert!(
            e.to_string().ends_with("UNSET: is not allowed to be unset"),
            "{e}"
        );
        let e = word("${EMPTY:?}").unwrap_err();
        assert!(
            e.to_string().ends_with("EMPTY: is not allowed to be empty"),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("failed to process \"${EMPTY:?}\""),
            "{e}"
        );
    }

    #[test]
    fn prefix_and_suffix_removal() {
        assert_eq!(word("${PATHV#*:}").unwrap(), "/usr/bin");
        assert_eq!(word("${PATHV##*/}").unwrap(), "bin");
        assert_eq!(word("${FILE%.*}").unwrap(), "archive.tar");
        assert_eq!(word("${FILE%%.*}").unwrap(), "archive");
        assert_eq!(word("${FILE#nomatch}").unwrap(), "archive.tar.gz");
        assert_eq!(word("${UNSET%%x}").unwrap(), "");
        assert_eq!(word("${FILE%.\\*}").unwrap(), "archive.tar.gz");
    }

    #[test]
    fn substitution() {
        assert_eq!(word("${PATHV/usr/opt}").unwrap(), "/opt/local/bin:/usr/bin");
        assert_eq!(
            word("${PATHV//usr/opt}").unwrap(),
            "/opt/local/bin:/opt/bin"
        );
        assert_eq!(word("${PATHV//\\//_}").unwrap(), "_usr_local_bin:_usr_bin");
        assert_eq!(word("${UNI//ö/o}").unwrap(), "héllo world");
        assert!(word("${A/x")
            .unwrap_err()
            .to_string()
            .contains("missing '/'"));
    }

    #[test]
    fn bad_substitutions() {
        for bad in [
            "${}", "${:x}", "${{A}}", "${A", "${", "${A:-x", "${A!}", "${A:x}", "${A:#x}",
            "${A:%x}",
        ] {
            assert!(word(bad).is_err(), "{bad} should fail");
        }
        assert!(word("${A!}")
            .unwrap_err()
            .to_string()
            .contains("unsupported modifier (!)"));
        assert!(word("${A:x}")
            .unwrap_err()
            .to_string()
            .contains("unsupported modifier (:x)"));
        assert!(word("${A").unwrap_err().to_string().contains("missing '}'"));
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(word("'$A'").unwrap(), "$A");
        assert_eq!(word("\"$A\"").unwrap(), "a");
        assert_eq!(word("\"a'b\"").unwrap(), "a'b");
        assert_eq!(word("'a\"b'").unwrap(), "a\"b");
        assert_eq!(word("\\$A").unwrap(), "$A");
        assert_eq!(word("a\\ b").unwrap(), "a b");
        assert_eq!(word("\"\\$A \\\" \\\\ \\n\"").unwrap(), "$A \" \\ \\n");
        assert_eq!(word("'\\n'").unwrap(), "\\n");
        assert_eq!(word("end\\").unwrap(), "end");
        assert!(word("'open").is_err());
        assert!(word("\"open").is_err());
        assert!(word("\"open\\").is_err());
    }

    #[test]
    fn backtick_escape() {
        let lookup = env(ENV);
        assert_eq!(expand_word("`$A", '`', &lookup).unwrap(), "$A");
        assert_eq!(
            expand_word("C:\\dir\\$A", '`', &lookup).unwrap(),
            "C:\\dir\\a"
        );
        assert_eq!(expand_word("\"`\"\"", '`', &lookup).unwrap(), "\"");
    }

    #[test]
    fn word_splitting() {
        assert_eq!(words("a b  c"), ["a", "b", "c"]);
        assert_eq!(words("$SPACED"), ["x", "y"]);
        assert_eq!(words("\"$SPACED\""), ["x  y"]);
        assert_eq!(words("'a b' c"), ["a b", "c"]);
        assert_eq!(words("a\\ b"), ["a b"]);
        assert_eq!(words("80/tcp $A"), ["80/tcp", "a"]);
        // BuildKit drops empty words, quoted or not.
        assert_eq!(words("\"\" x ''"), ["x"]);
        assert_eq!(words("$UNSET"), Vec::<String>::new());
        assert_eq!(words(""), Vec::<String>::new());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "${A:-".repeat(100_000) + &"}".repeat(100_000);
        assert!(word(&deep)
            .unwrap_err()
            .to_string()
            .contains("nested too deeply"));
        let ok = "${A:-".repeat(50) + &"}".repeat(50);
        assert_eq!(word(&ok).unwrap(), "a");
    }

    #[test]
    fn unicode_survives() {
        assert_eq!(word("$UNI").unwrap(), "héllo wörld");
        assert_eq!(word("ü${A}ü").unwrap(), "üaü");
        assert_eq!(words("日本 語"), ["日本", "語"]);
    }

    #[test]
    fn heredoc_content_keeps_quotes() {
        let lookup = env(ENV);
        let out = expand_heredoc("echo \"$A\" '$A' \\$A C:\\x\n", &lookup).unwrap();
        assert_eq!(out, "echo \"a\" 'a' $A C:x\n");
    }

    #[test]
    fn raw_modes_keep_quotes_and_escapes() {
        let opts = LexOptions {
            raw_quotes: true,
            raw_escapes: true,
            skip_unset_env: true,
            ..LexOptions::new('\\')
        };
        let p = process("RUN <<\"EOF\" a\\ b $X ${Y:-z}", &opts, &|_| None).unwrap();
        assert_eq!(p.words, ["RUN", "<<\"EOF\"", "a\\ b", "$X", "${Y:-z}"]);
    }

    #[test]
    fn unmatched_variables_are_reported() {
        let p = process("$A $NOPE ${ALSO:-x}", &LexOptions::new('\\'), &env(ENV)).unwrap();
        assert_eq!(
            p.unmatched.into_iter().collect::<Vec<_>>(),
            ["ALSO", "NOPE"]
        );
    }
}
