//! The Dockerfile frontend: reads Dockerfiles written for `docker build`
//! (BuildKit) the way BuildKit reads them, or says precisely why not.
//!
//! The pipeline, with no I/O anywhere:
//!
//! 1. [`parse`] — directives, comments, continuations, flags, the JSON
//!    form and heredocs, then every instruction typed and checked
//!    ([`Instruction::from_raw`]).
//! 2. [`StageGraph::resolve`] — stages by index and name, FROM lines
//!    expanded with the global ARGs, `COPY --from` and `RUN --mount=from=`
//!    resolved, the stages the target needs marked.
//! 3. Per stage, at build time: a [`Scope`] ([`StageGraph::stage_scope`]
//!    for a stage on an image, [`Scope::inherit`] of the parent's final
//!    scope for `FROM <stage>`) fed the ARG and ENV instructions in order,
//!    and [`Instruction::expanded`] (or [`expand_word`] / [`expand_words`]
//!    with [`Scope::lookup`]) for the instructions BuildKit expands. A base
//!    image's ONBUILD triggers go through [`parse_onbuild_trigger`].
//!
//! [`stage_report_json`] and [`stage_report_text`] describe the resolved
//! stage graph; they are what `kiln plan` prints.

mod directives;
mod duration;
mod error;
mod expand;
mod flags;
mod heredoc;
mod instruction;
mod json_form;
mod mount;
mod parse;
mod pattern;
mod raw;
mod scope;
mod stage_report;
mod stages;
mod suggest;
mod words;

#[cfg(test)]
mod tests;

pub use directives::{CheckConfig, DEFAULT_ESCAPE};
pub use error::{FrontendError, Warning};
pub use expand::{expand_heredoc, expand_word, expand_words, ExpandError, Lookup};
pub use heredoc::Heredoc;
pub use instruction::{Command, CopyArgs, Healthcheck, HeredocRun, Instruction, KEYWORDS};
pub use mount::{parse_size, MountError, MountExpander, MountType, RunMount};
pub use parse::{parse, parse_onbuild_trigger, Dockerfile};
pub use raw::RawInstruction;
pub use scope::{
    unused_build_arg_warnings, GlobalArgs, Platform, Scope, PLATFORM_ARGS, PROXY_ARGS,
};
pub use stage_report::{stage_report_json, stage_report_text};
pub use stages::{BaseRef, RefKind, Stage, StageGraph, StageRef};
