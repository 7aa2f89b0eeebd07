//! Splitting an instruction line into keyword, flags and arguments, and the
//! word-level helpers BuildKit's line parsers use.

/// Go's `unicode.IsSpace` (the same set as Rust's `char::is_whitespace`).
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// BuildKit's `[\t\v\f\r ]` whitespace class, used to split keywords and
/// whitespace-delimited arguments.
pub(crate) fn is_token_space(c: char) -> bool {
    matches!(c, '\t' | '\x0B' | '\x0C' | '\r' | ' ')
}

/// Splits on runs of [`is_token_space`], dropping empty pieces.
pub(crate) fn split_whitespace_delimited(s: &str) -> Vec<String> {
    s.split(is_token_space)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

/// Splits at the first run of [`is_token_space`] (Go's
/// `reWhitespace.Split(s, 2)`).
pub(crate) fn split_first_whitespace(s: &str) -> (&str, Option<&str>) {
    match s.find(is_token_space) {
        Some(i) => (&s[..i], Some(s[i..].trim_start_matches(is_token_space))),
        None => (s, None),
    }
}

/// One instruction line split as BuildKit's `splitCommand` does: the
/// keyword as written, the leading `--flags` and the rest, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SplitLine {
    pub keyword: String,
    pub flags: Vec<String>,
    pub rest: String,
}

pub(crate) fn split_command(line: &str) -> SplitLine {
    let trimmed = line.trim_matches(is_space);
    let (keyword, rest) = split_first_whitespace(trimmed);
    let (rest, flags) = match rest {
        Some(rest) => extract_builder_flags(rest),
        None => (String::new(), Vec::new()),
    };
    SplitLine {
        keyword: keyword.to_string(),
        flags,
        rest: rest.trim_matches(is_space).to_string(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Spaces,
    Word,
    Quote(char),
}

/// Takes the leading words that start with `--` off `line`. Quotes are
/// removed from flags and `\` escapes the next character (always `\`, not
/// the Dockerfile's escape character, as in BuildKit). A lone `--` ends
/// the flags and is dropped.
pub(crate) fn extract_builder_flags(line: &str) -> (String, Vec<String>) {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let n = chars.len();
    let mut flags = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut i = 0;
    while i <= n {
        let at_end = i == n;
        let mut c = if at_end { '\0' } else { chars[i].1 };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(c) {
                i += 1;
                continue;
            }
            if c != '-' || i + 1 == n || chars[i + 1].1 != '-' {
                return (line[chars[i].0..].to_string(), flags);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                flags.push(word);
            }
            break;
        }
        match phase {
            Phase::Word => {
                if is_space(c) {
                    if word == "--" {
                        return (line[chars[i].0..].to_string(), flags);
                    }
                    if blank_ok || !word.is_empty() {
                        flags.push(std::mem::take(&mut word));
                    }
                    word.clear();
                    blank_ok = false;
                    phase = Phase::Spaces;
                } else if c == '\'' || c == '"' {
                    blank_ok = true;
                    phase = Phase::Quote(c);
                } else {
                    if c == '\\' {
                        if i + 1 == n {
                            i += 1;
                            continue;
                        }
                        i += 1;
                        c = chars[i].1;
                    }
                    word.push(c);
                }
            }
            Phase::Quote(q) => {
                if c == q {
                    phase = Phase::Word;
                } else {
                    if c == '\\' {
                        if i + 1 == n {
                            phase = Phase::Word;
                            i += 1;
                            continue;
                        }
                        i += 1;
                        c = chars[i].1;
                    }
                    word.push(c);
                }
            }
            Phase::Spaces => unreachable!("handled above"),
        }
        i += 1;
    }
    (String::new(), flags)
}

/// Splits on whitespace but keeps quoted runs and escapes *as written*
/// (BuildKit's `parseWords`): quotes are removed later, by expansion. Used
/// by ARG and by the `key=value` form of ENV and LABEL.
pub(crate) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let n = chars.len();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut blank_ok = false;
    let mut phase = Phase::Spaces;
    let mut i = 0;
    while i <= n {
        let at_end = i == n;
        let mut c = if at_end { '\0' } else { chars[i] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(c) {
                i += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        match phase {
            Phase::Word => {
                if is_space(c) {
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    blank_ok = false;
                    phase = Phase::Spaces;
                    i += 1;
                    continue;
                }
                if c == '\'' || c == '"' {
                    blank_ok = true;
                    phase = Phase::Quote(c);
                }
                if c == escape {
                    if i + 1 == n {
                        // An escape at the very end is dropped.
                        i += 1;
                        continue;
                    }
                    // Outside quotes the escape and the character it escapes
                    // are both kept, even when that character is a quote.
                    word.push(c);
                    i += 1;
                    c = chars[i];
                }
                word.push(c);
            }
            Phase::Quote(q) => {
                if c == q {
                    phase = Phase::Word;
                }
                // Nothing escapes inside single quotes.
                if c == escape && q != '\'' {
                    if i + 1 == n {
                        phase = Phase::Word;
                        i += 1;
                        continue;
                    }
                    word.push(c);
                    i += 1;
                    c = chars[i];
                }
                word.push(c);
            }
            Phase::Spaces => unreachable!("handled above"),
        }
        i += 1;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn split_command_takes_keyword_flags_and_rest() {
        let l = split_command("  COPY --from=build --chown=1:1 src dst  ");
        assert_eq!(l.keyword, "COPY");
        assert_eq!(l.flags, s(&["--from=build", "--chown=1:1"]));
        assert_eq!(l.rest, "src dst");
        let l = split_command("run");
        assert_eq!((l.keyword.as_str(), l.rest.as_str()), ("run", ""));
        assert!(l.flags.is_empty());
        let l = split_command("RUN\t\techo  hi");
        assert_eq!(l.rest, "echo  hi");
    }

    #[test]
    fn flags_lose_quotes_and_escapes() {
        let (rest, flags) = extract_builder_flags("--chown=\"a b\":'c' --x=a\\ b rest of line");
        assert_eq!(flags, s(&["--chown=a b:c", "--x=a b"]));
        assert_eq!(rest, "rest of line");
    }

    #[test]
    fn double_dash_ends_flags() {
        let (rest, flags) = extract_builder_flags("--link -- --not-a-flag x");
        assert_eq!(flags, s(&["--link"]));
        assert_eq!(rest, " --not-a-flag x");
        let (rest, flags) = extract_builder_flags("--link --");
        assert_eq!(flags, s(&["--link"]));
        assert_eq!(rest, "");
    }

    #[test]
    fn single_dash_is_an_argument() {
        let (rest, flags) = extract_builder_flags("-x --y");
        assert!(flags.is_empty());
        assert_eq!(rest, "-x --y");
        let (rest, flags) = extract_builder_flags("-");
        assert!(flags.is_empty());
        assert_eq!(rest, "-");
    }

    #[test]
    fn flags_only() {
        let (rest, flags) = extract_builder_flags("--mount=type=cache,target=/x");
        assert_eq!(flags, s(&["--mount=type=cache,target=/x"]));
        assert_eq!(rest, "");
        let (_, flags) = extract_builder_flags("--a=\"\" --b=\"open");
        assert_eq!(flags, s(&["--a=", "--b=open"]));
    }

    #[test]
    fn words_keep_quotes_and_escapes() {
        assert_eq!(
            parse_words("A=\"b c\" D='e f' G", '\\'),
            s(&["A=\"b c\"", "D='e f'", "G"])
        );
        assert_eq!(parse_words("A=b\\ c D", '\\'), s(&["A=b\\ c", "D"]));
        assert_eq!(parse_words("A=\\\"b", '\\'), s(&["A=\\\"b"]));
        assert_eq!(parse_words("A='x\\' B", '\\'), s(&["A='x\\'", "B"]));
        assert_eq!(
            parse_words("A=\"x\\\" y\" B", '\\'),
            s(&["A=\"x\\\" y\"", "B"])
        );
        assert_eq!(parse_words("a\\", '\\'), s(&["a"]));
        assert_eq!(parse_words("\"\"", '\\'), s(&["\"\""]));
        assert_eq!(parse_words("  ", '\\'), Vec::<String>::new());
        assert_eq!(parse_words("A=`\"b c", '`'), s(&["A=`\"b", "c"]));
        assert_eq!(parse_words("ü=日本 x", '\\'), s(&["ü=日本", "x"]));
    }

    #[test]
    fn whitespace_splitting() {
        assert_eq!(split_whitespace_delimited("a  b\tc"), s(&["a", "b", "c"]));
        assert_eq!(split_first_whitespace("A  b c"), ("A", Some("b c")));
        assert_eq!(split_first_whitespace("A"), ("A", None));
    }
}
