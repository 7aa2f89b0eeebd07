//! Heredocs: `RUN <<EOF`, `COPY <<EOF /dst`, several per instruction.
//!
//! As in BuildKit, the instruction line is split into words with the shell
//! lexer (quotes and escapes kept, unset variables left alone), and every
//! word of the form `[n]<<[-]NAME` opens a heredoc. Their bodies follow the
//! instruction, in order, each ending at a line equal to `NAME` (after
//! leading tabs are stripped, for `<<-`). A delimiter with any quoting
//! (`<<"EOF"`, `<<'EOF'`, `<<E"O"F`) turns expansion off.

use super::expand::{process, ExpandError, LexOptions};
use crate::excerpt::excerpt;

/// A heredoc opener that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeredocError {
    #[error(transparent)]
    Lex(#[from] ExpandError),
    #[error("internal lexing of heredoc produced inconsistent results: {}", excerpt(.0))]
    Inconsistent(String),
}

/// One heredoc attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Heredoc {
    /// The delimiter, quotes removed (`EOF`).
    pub name: String,
    /// The body. For `<<-` the leading tabs are already stripped, as
    /// BuildKit strips them before use; lines keep their own endings.
    pub content: String,
    /// Whether variables in the body are expanded (unquoted delimiter).
    pub expand: bool,
    /// Whether the delimiter was `<<-`.
    #[serde(skip)]
    pub chomp: bool,
    /// The file descriptor before `<<` (`3<<EOF`), 0 when none was given.
    #[serde(skip)]
    pub fd: u32,
}

/// Parses one word as a heredoc opener (BuildKit's `ParseHeredoc`):
/// `^(\d*)<<(-?)([^<]*)$`. Returns `None` for words that are not one.
pub(crate) fn parse_heredoc_word(word: &str) -> Result<Option<Heredoc>, HeredocError> {
    let digits = word.chars().take_while(char::is_ascii_digit).count();
    let Some(after) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let fd = word[..digits].parse().unwrap_or(0);
    let lookup = |_: &str| None;
    let mut opts = LexOptions {
        skip_unset_env: true,
        ..LexOptions::new('\\')
    };
    let words = process(rest, &opts, &lookup)?.words;
    if words.len() != 1 {
        return Ok(None);
    }
    opts.raw_quotes = true;
    let raw = process(rest, &opts, &lookup)?.words;
    if raw.len() != words.len() {
        return Err(HeredocError::Inconsistent(rest.to_string()));
    }
    // Quotes that disappeared when quotes are processed were quoting.
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    let expand = quotes(&words[0]) == quotes(&raw[0]);
    Ok(Some(Heredoc {
        name: words[0].clone(),
        content: String::new(),
        expand,
        chomp,
        fd,
    }))
}

/// The heredocs an instruction line opens, in order.
pub(crate) fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, HeredocError> {
    let opts = LexOptions {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset_env: true,
        ..LexOptions::new('\\')
    };
    // A line the lexer cannot split (an unterminated quote) opens none, as
    // in BuildKit.
    let words = process(line, &opts, &|_| None)
        .map(|p| p.words)
        .unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc_word(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Strips the leading tabs of every line (`<<-`).
pub(crate) fn chomp(content: &str) -> String {
    content
        .split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

/// Whether `line` (one physical line with its ending) ends the heredoc.
pub(crate) fn is_terminator(doc: &Heredoc, line: &str) -> bool {
    let line = line.trim_end_matches(['\r', '\n']);
    let line = if doc.chomp {
        line.trim_start_matches('\t')
    } else {
        line
    };
    line == doc.name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(line: &str) -> Vec<(String, bool, bool, u32)> {
        heredocs_from_line(line)
            .unwrap()
            .into_iter()
            .map(|d| (d.name, d.expand, d.chomp, d.fd))
            .collect()
    }

    #[test]
    fn openers_and_their_flags() {
        assert_eq!(names("RUN <<EOF"), [("EOF".into(), true, false, 0)]);
        assert_eq!(names("RUN <<-EOT bash"), [("EOT".into(), true, true, 0)]);
        assert_eq!(names("RUN <<\"EOF\""), [("EOF".into(), false, false, 0)]);
        assert_eq!(names("RUN <<'EOF'"), [("EOF".into(), false, false, 0)]);
        assert_eq!(names("RUN <<E\"O\"F"), [("EOF".into(), false, false, 0)]);
        assert_eq!(
            names("RUN 3<<X cat /dev/fd/3"),
            [("X".into(), true, false, 3)]
        );
        assert_eq!(
            names("COPY <<A <<-'B' /dst/"),
            [("A".into(), true, false, 0), ("B".into(), false, true, 0)]
        );
    }

    #[test]
    fn non_openers() {
        assert!(names("RUN echo '<<EOF'").is_empty());
        assert!(names("RUN echo \"<<EOF\"").is_empty());
        assert!(names("RUN echo a<<EOF").is_empty());
        assert!(names("RUN cat << EOF").is_empty());
        assert!(names("RUN x <<").is_empty());
        assert!(names("RUN x <<<here").is_empty());
        assert!(names("RUN echo 'unterminated <<EOF").is_empty());
    }

    #[test]
    fn chomping_and_terminators() {
        assert_eq!(chomp("\t\ta\n\tb\r\n c\n"), "a\nb\r\n c\n");
        let doc = parse_heredoc_word("<<-EOF").unwrap().unwrap();
        assert!(is_terminator(&doc, "\t\tEOF\r\n"));
        assert!(!is_terminator(&doc, " EOF\n"));
        let doc = parse_heredoc_word("<<EOF").unwrap().unwrap();
        assert!(!is_terminator(&doc, "\tEOF\n"));
        assert!(is_terminator(&doc, "EOF"));
    }
}
