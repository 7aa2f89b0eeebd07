//! How an error (or a progress line) quotes what the user wrote: a
//! Dockerfile word, a RUN command, a path. Input can be megabytes long and
//! hold control characters, so every quote goes through [`excerpt`], which
//! keeps the first [`LIMIT`] characters, marks a cut with `…` and never
//! prints a control character raw.
use std::fmt;

/// The most characters of an input an error quotes.
pub(crate) const LIMIT: usize = 200;

/// A quote of user input, cut to [`LIMIT`] characters. `{}` prints it
/// bare, control characters escaped (`\0`, `\n`, `\u{1b}`); `{:?}` prints it
/// as a Rust string literal. Either way a cut is followed by `…`.
#[derive(Clone, Copy)]
pub(crate) struct Excerpt<'a> {
    kept: &'a str,
    cut: bool,
}

/// Quotes `text` for a message.
pub(crate) fn excerpt(text: &str) -> Excerpt<'_> {
    let (kept, cut) = match text.char_indices().nth(LIMIT) {
        Some((end, _)) => (&text[..end], true),
        None => (text, false),
    };
    Excerpt { kept, cut }
}

impl Excerpt<'_> {
    fn ellipsis(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cut {
            true => f.write_str("…"),
            false => Ok(()),
        }
    }
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.kept.chars() {
            match c.is_control() {
                true => write!(f, "{}", c.escape_debug())?,
                false => fmt::Write::write_char(f, c)?,
            }
        }
        self.ellipsis(f)
    }
}

impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kept)?;
        self.ellipsis(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(excerpt("RUN make").to_string(), "RUN make");
        assert_eq!(format!("{:?}", excerpt("a \"b\"")), r#""a \"b\"""#);
    }

    #[test]
    fn long_input_is_cut_at_the_limit_with_an_ellipsis() {
        let long = "x".repeat(10_000_000);
        let shown = excerpt(&long).to_string();
        assert_eq!(shown, format!("{}…", "x".repeat(LIMIT)));
        assert_eq!(
            format!("{:?}", excerpt(&long)),
            format!("\"{}\"…", "x".repeat(LIMIT))
        );
        // Exactly at the limit nothing is cut.
        let exact = "y".repeat(LIMIT);
        assert_eq!(excerpt(&exact).to_string(), exact);
    }

    #[test]
    fn cuts_count_characters_not_bytes() {
        let long = "é".repeat(LIMIT + 1);
        assert_eq!(
            excerpt(&long).to_string(),
            format!("{}…", "é".repeat(LIMIT))
        );
    }

    #[test]
    fn control_characters_are_escaped_never_raw() {
        assert_eq!(excerpt("a\0b\n\u{1b}[31m").to_string(), r"a\0b\n\u{1b}[31m");
        assert_eq!(format!("{:?}", excerpt("a\0b")), r#""a\0b""#);
    }
}
