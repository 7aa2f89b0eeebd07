//! What the parser produces and the typed instructions are made from. It
//! has a module of its own so that the dependency runs one way: the parser
//! uses the typed instructions (to check them), and they need nothing from
//! the parser.

use super::heredoc::Heredoc;

/// One instruction as BuildKit's parser yields it, before any meaning is
/// given to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RawInstruction {
    /// The line the instruction starts on (1-based).
    pub line: usize,
    /// The last line it covers: continuation lines and heredoc bodies
    /// included.
    pub end_line: usize,
    /// The keyword, upper case.
    pub keyword: String,
    /// The `--name=value` words before the arguments, in order, quotes
    /// removed as BuildKit removes them.
    pub flags: Vec<String>,
    /// The arguments, unexpanded: one string for the shell form
    /// (continuations joined, comment lines dropped), the elements of the
    /// JSON form, alternating key and value for ENV and LABEL, each
    /// `NAME[=value]` word for ARG, the words of FROM, EXPOSE and (shell
    /// form) COPY/ADD/VOLUME, the subcommand and then its arguments for
    /// HEALTHCHECK, the trigger's text for ONBUILD.
    pub args: Vec<String>,
    /// Whether the arguments were a JSON array.
    pub json_form: bool,
    /// Heredocs opened on the instruction's line, in order.
    pub heredocs: Vec<Heredoc>,
}
