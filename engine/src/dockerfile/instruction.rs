//! Typed instructions, checked as BuildKit's `instructions` package checks
//! them: argument counts, the flags each instruction accepts, stage names,
//! HEALTHCHECK intervals, RUN mounts.
//!
//! Strings here are still *unexpanded* words (quotes as written): what a
//! variable means depends on the scope at that point of the stage, which
//! only the executor knows. [`Instruction::expanded`] expands exactly the
//! fields BuildKit expands, given that scope.

use std::time::Duration;

use super::duration::{parse_interval, DurationError};
use super::error::{AtLine, FrontendError};
use super::expand::{
    expand_heredoc, expand_word, expand_words, process, ExpandError, LexOptions, Lookup,
};
use super::flags::{FlagKind, Flags};
use super::heredoc::{parse_heredoc_word, Heredoc};
use super::mount::{MountError, RunMount};
use super::raw::RawInstruction;
use super::suggest::suggest;
use super::words::split_command;
use crate::excerpt::excerpt;

/// Every instruction keyword BuildKit knows.
pub const KEYWORDS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// An instruction BuildKit would refuse; the texts are BuildKit's (or say
/// as precisely why not). [`Instruction::from_raw`] locates it at its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InstructionError {
    #[error("unknown instruction: {}{}", excerpt(.keyword), did_you_mean(*.suggestion))]
    UnknownInstruction {
        keyword: String,
        suggestion: Option<&'static str>,
    },
    #[error("unknown flag: --{} ({keyword} takes no flags)", excerpt(.name))]
    NoFlags { keyword: String, name: String },
    #[error("unknown flag: --{} (did you mean --{suggestion}?)", excerpt(.name))]
    MisspelledFlag {
        name: String,
        suggestion: &'static str,
    },
    #[error("unknown flag: --{} ({keyword} accepts {})", excerpt(.name), flag_list(.accepted))]
    UnknownFlag {
        keyword: String,
        name: String,
        accepted: Vec<&'static str>,
    },
    #[error("Duplicate flag specified: {}", excerpt(.0))]
    DuplicateFlag(String),
    #[error("Missing a value on flag: {}", excerpt(.0))]
    MissingFlagValue(String),
    #[error("Expecting boolean value for flag {name}, not: {}", excerpt(.value))]
    NotBoolean { name: String, value: String },
    #[error("{0} requires exactly one argument")]
    NotExactlyOne(String),
    #[error("{0} requires at least one argument")]
    NoArguments(String),
    #[error("{0} names can not be blank")]
    BlankName(String),
    #[error("Bad input to {0}, too many arguments")]
    TooManyArguments(String),
    #[error("{0} requires at least two arguments, but only one was provided. Destination could not be determined")]
    NoDestination(String),
    #[error("{0} cannot accept a heredoc as a destination")]
    HeredocDestination(String),
    #[error("variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround")]
    VariableInFrom,
    #[error("FROM requires either one or three arguments")]
    FromArguments,
    #[error(
        "invalid name for build stage: {:?}, name can't start with a number or contain symbols",
        excerpt(.0)
    )]
    StageName(String),
    #[error("unsupported network mode {:?}", excerpt(.0))]
    NetworkMode(String),
    #[error("unsupported security mode {:?}", excerpt(.0))]
    SecurityMode(String),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("RUN requires at least one argument: RUN [] has no command to run")]
    EmptyRun,
    #[error("SHELL requires the arguments to be in JSON form")]
    ShellNotJson,
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    #[error("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")]
    OnbuildChain,
    #[error("{0} isn't allowed as an ONBUILD trigger")]
    OnbuildTrigger(String),
    #[error("HEALTHCHECK NONE takes no arguments")]
    HealthcheckNoneArguments,
    #[error("Unknown type {:?} in HEALTHCHECK (try CMD)", excerpt(.0))]
    HealthcheckType(String),
    #[error("Missing command after HEALTHCHECK CMD")]
    HealthcheckNoCommand,
    #[error(transparent)]
    Interval(#[from] DurationError),
    #[error("strconv.ParseInt: parsing {:?}: invalid syntax", excerpt(.0))]
    Retries(String),
    #[error("--retries cannot be negative ({0})")]
    NegativeRetries(i64),
}

/// ` (did you mean X?)` when there is a suggestion.
fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion
        .map(|s| format!(" (did you mean {s}?)"))
        .unwrap_or_default()
}

/// `--a, --b`.
fn flag_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("--{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command line: the shell form (run through the stage's SHELL) or the
/// exec (JSON) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// The arguments of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyArgs {
    /// Source paths or URLs, heredoc sources excluded (they are in
    /// `heredocs`). Expanded one word each, never split.
    pub sources: Vec<String>,
    pub dest: String,
    /// `--from`: a stage name, a stage index or an image (COPY only).
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    /// `--parents` (COPY only).
    pub parents: bool,
    /// `--exclude` patterns, in order (not expanded, as in BuildKit).
    pub excludes: Vec<String>,
    /// `--checksum` (ADD only).
    pub checksum: Option<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--unpack` (ADD only): `None` when not given.
    pub unpack: Option<bool>,
    /// Inline sources (`COPY <<EOF /dst`), each a file named after its
    /// delimiter.
    pub heredocs: Vec<Heredoc>,
}

/// HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable any check inherited from the base image.
    None,
    /// `HEALTHCHECK [flags] CMD ...`. Unset or zero intervals are `None`
    /// (the runtime default).
    Cmd {
        command: Command,
        interval: Option<Duration>,
        timeout: Option<Duration>,
        start_period: Option<Duration>,
        start_interval: Option<Duration>,
        retries: Option<u32>,
    },
}

impl Healthcheck {
    /// The image config's `Healthcheck` object, as Docker writes it: `Test`
    /// is `["NONE"]`, `["CMD-SHELL", script]` or `["CMD", argv...]`;
    /// durations are nanoseconds; unset fields are left out.
    pub fn to_config(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        match self {
            Healthcheck::None => {
                out.insert("Test".into(), serde_json::json!(["NONE"]));
            }
            Healthcheck::Cmd {
                command,
                interval,
                timeout,
                start_period,
                start_interval,
                retries,
            } => {
                let test: Vec<String> = match command {
                    Command::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
                    Command::Exec(argv) => std::iter::once("CMD".to_string())
                        .chain(argv.iter().cloned())
                        .collect(),
                };
                out.insert("Test".into(), serde_json::json!(test));
                for (key, d) in [
                    ("Interval", interval),
                    ("Timeout", timeout),
                    ("StartPeriod", start_period),
                    ("StartInterval", start_interval),
                ] {
                    if let Some(d) = d {
                        out.insert(key.into(), serde_json::json!(d.as_nanos() as u64));
                    }
                }
                if let Some(r) = retries.filter(|r| *r > 0) {
                    out.insert("Retries".into(), serde_json::json!(r));
                }
            }
        }
        serde_json::Value::Object(out)
    }
}

/// How a shell-form RUN with heredocs runs, decided as BuildKit decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeredocRun {
    /// Pass this text to the stage's shell (`SHELL ... text`).
    Shell(String),
    /// `RUN <<EOF` whose body starts with `#!`: write the body to an
    /// executable file called `name` (BuildKit mounts it under
    /// `/dev/pipes/`) and run that file directly.
    Script { name: String, content: String },
}

impl HeredocRun {
    /// `None` when the RUN has no heredocs or uses the exec form, which
    /// runs as written. When the whole command is one heredoc (`RUN <<EOF`)
    /// its body is the script; otherwise the heredocs are put back after
    /// the command line for the shell to read (`cmd <<EOF\nbody\nEOF`).
    pub fn plan(command: &Command, heredocs: &[Heredoc]) -> Option<HeredocRun> {
        let (Command::Shell(line), Some(first)) = (command, heredocs.first()) else {
            return None;
        };
        if matches!(parse_heredoc_word(line.trim()), Ok(Some(_))) {
            if first.content.starts_with("#!") {
                return Some(HeredocRun::Script {
                    name: first.name.clone(),
                    content: first.content.clone(),
                });
            }
            return Some(HeredocRun::Shell(first.content.clone()));
        }
        let mut full = line.clone();
        for doc in heredocs {
            full.push('\n');
            full.push_str(&doc.content);
            full.push_str(&doc.name);
        }
        Some(HeredocRun::Shell(full))
    }
}

/// One instruction with its meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    From {
        /// The base as written (variables unexpanded).
        image: String,
        /// The stage name, lower-cased as BuildKit does.
        name: Option<String>,
        platform: Option<String>,
    },
    Run {
        command: Command,
        /// The raw `--mount` values, in order; see [`RunMount::parse`].
        mounts: Vec<String>,
        /// `none`, `default` or `host`; `None` when not given.
        network: Option<String>,
        /// `sandbox` or `insecure`; `None` when not given.
        security: Option<String>,
        heredocs: Vec<Heredoc>,
    },
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    Copy(CopyArgs),
    Add(CopyArgs),
    Env(Vec<(String, String)>),
    Arg(Vec<(String, Option<String>)>),
    Label(Vec<(String, String)>),
    Expose(Vec<String>),
    Volume(Vec<String>),
    Workdir(String),
    User(String),
    Stopsignal(String),
    Healthcheck(Healthcheck),
    /// The trigger as it goes into the image config, heredoc bodies
    /// appended as BuildKit stores them.
    Onbuild(String),
    Maintainer(String),
}

impl Instruction {
    /// Types and checks a parsed instruction. Errors carry its line.
    pub fn from_raw(raw: &RawInstruction, escape: char) -> Result<Instruction, FrontendError> {
        typed(raw, escape).at_line(raw.line)
    }

    /// Expands the fields BuildKit expands, with `lookup` as the scope at
    /// this point of the stage: COPY/ADD sources, destination, `--chown`,
    /// `--chmod`, ADD's `--checksum` and the bodies of heredocs with an
    /// unquoted delimiter; ENV and LABEL keys and values (all against the
    /// same scope: `ENV A=1 B=$A` sees the old `A`); EXPOSE (word split);
    /// VOLUME, WORKDIR, USER and STOPSIGNAL. Everything else is returned
    /// unchanged: RUN, CMD, ENTRYPOINT and HEALTHCHECK see their variables
    /// through the shell at run time, ONBUILD is stored as written, ARG
    /// defaults are expanded by [`super::Scope::declare_arg_unexpanded`] and FROM by
    /// the stage graph.
    pub fn expanded(&self, escape: char, lookup: Lookup<'_>) -> Result<Instruction, ExpandError> {
        let word = |w: &str| expand_word(w, escape, lookup);
        let opt = |w: &Option<String>| w.as_deref().map(word).transpose();
        let pairs = |kv: &[(String, String)]| -> Result<Vec<(String, String)>, ExpandError> {
            kv.iter().map(|(k, v)| Ok((word(k)?, word(v)?))).collect()
        };
        let copy = |c: &CopyArgs| -> Result<CopyArgs, ExpandError> {
            let mut heredocs = c.heredocs.clone();
            for doc in heredocs.iter_mut().filter(|d| d.expand) {
                doc.content = expand_heredoc(&doc.content, lookup)?;
            }
            Ok(CopyArgs {
                sources: c
                    .sources
                    .iter()
                    .map(|s| word(s))
                    .collect::<Result<_, _>>()?,
                dest: word(&c.dest)?,
                chown: opt(&c.chown)?,
                chmod: opt(&c.chmod)?,
                checksum: opt(&c.checksum)?,
                heredocs,
                ..c.clone()
            })
        };
        Ok(match self {
            Instruction::Copy(c) => Instruction::Copy(copy(c)?),
            Instruction::Add(c) => Instruction::Add(copy(c)?),
            Instruction::Env(kv) => Instruction::Env(pairs(kv)?),
            Instruction::Label(kv) => Instruction::Label(pairs(kv)?),
            Instruction::Expose(ports) => {
                let mut out = Vec::new();
                for p in ports {
                    out.extend(expand_words(p, escape, lookup)?);
                }
                Instruction::Expose(out)
            }
            Instruction::Volume(v) => {
                Instruction::Volume(v.iter().map(|s| word(s)).collect::<Result<_, _>>()?)
            }
            Instruction::Workdir(w) => Instruction::Workdir(word(w)?),
            Instruction::User(u) => Instruction::User(word(u)?),
            Instruction::Stopsignal(s) => Instruction::Stopsignal(word(s)?),
            other => other.clone(),
        })
    }
}

fn no_flags(raw: &RawInstruction) -> Result<(), InstructionError> {
    Flags::parse(&raw.keyword, &raw.flags, &[]).map(|_| ())
}

fn command(raw: &RawInstruction, args: &[String]) -> Command {
    if raw.json_form {
        Command::Exec(args.to_vec())
    } else {
        Command::Shell(args.join(" "))
    }
}

fn exactly_one(raw: &RawInstruction) -> Result<String, InstructionError> {
    match raw.args.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(InstructionError::NotExactlyOne(raw.keyword.clone())),
    }
}

fn at_least_one(raw: &RawInstruction) -> Result<(), InstructionError> {
    if raw.args.is_empty() {
        return Err(InstructionError::NoArguments(raw.keyword.clone()));
    }
    Ok(())
}

fn key_values(raw: &RawInstruction) -> Result<Vec<(String, String)>, InstructionError> {
    no_flags(raw)?;
    at_least_one(raw)?;
    raw.args
        .chunks(2)
        .map(|kv| match kv {
            [k, _] if k.is_empty() => Err(InstructionError::BlankName(raw.keyword.clone())),
            [k, v] => Ok((k.clone(), v.clone())),
            _ => Err(InstructionError::TooManyArguments(raw.keyword.clone())),
        })
        .collect()
}

fn is_valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

type SourcesAndDest = (Vec<String>, String, Vec<Heredoc>);

fn sources_and_dest(raw: &RawInstruction) -> Result<SourcesAndDest, InstructionError> {
    let (dest, srcs) = raw.args.split_last().expect("checked by the caller");
    if matches!(parse_heredoc_word(dest), Ok(Some(_))) {
        return Err(InstructionError::HeredocDestination(raw.keyword.clone()));
    }
    let mut sources = Vec::new();
    let mut heredocs = Vec::new();
    for src in srcs {
        match parse_heredoc_word(src) {
            Ok(Some(word)) => {
                // A heredoc source is a file named after its delimiter; its
                // body is the heredoc with that name read after the line.
                let body = raw.heredocs.iter().rev().find(|d| d.name == word.name);
                heredocs.push(Heredoc {
                    content: body.map(|d| d.content.clone()).unwrap_or_default(),
                    ..word
                });
            }
            _ => sources.push(src.clone()),
        }
    }
    Ok((sources, dest.clone(), heredocs))
}

fn copy_args(raw: &RawInstruction, add: bool) -> Result<CopyArgs, InstructionError> {
    if raw.args.len() < 2 {
        return Err(InstructionError::NoDestination(raw.keyword.clone()));
    }
    let specs: &[(&'static str, FlagKind)] = if add {
        &[
            ("chown", FlagKind::Str),
            ("chmod", FlagKind::Str),
            ("link", FlagKind::Bool),
            ("keep-git-dir", FlagKind::Bool),
            ("checksum", FlagKind::Str),
            ("exclude", FlagKind::Strs),
            ("unpack", FlagKind::Bool),
        ]
    } else {
        &[
            ("from", FlagKind::Str),
            ("chown", FlagKind::Str),
            ("chmod", FlagKind::Str),
            ("link", FlagKind::Bool),
            ("parents", FlagKind::Bool),
            ("exclude", FlagKind::Strs),
        ]
    };
    let flags = Flags::parse(&raw.keyword, &raw.flags, specs)?;
    let from = flags.string("from");
    if let Some(from) = &from {
        // BuildKit refuses variables here: the stage graph must be known
        // before any stage runs.
        let literal = process(from, &LexOptions::new('\\'), &|_| None).map(|p| p.result);
        if literal.as_deref() != Ok(from.as_str()) {
            return Err(InstructionError::VariableInFrom);
        }
    }
    let (sources, dest, heredocs) = sources_and_dest(raw)?;
    Ok(CopyArgs {
        sources,
        dest,
        from,
        chown: flags.string("chown"),
        chmod: flags.string("chmod"),
        link: flags.bool("link"),
        parents: flags.bool("parents"),
        excludes: flags.strings("exclude"),
        checksum: flags.string("checksum"),
        keep_git_dir: flags.bool("keep-git-dir"),
        unpack: flags.opt_bool("unpack"),
        heredocs,
    })
}

fn typed(raw: &RawInstruction, escape: char) -> Result<Instruction, InstructionError> {
    let _ = escape; // the raw form already honours it; kept for API symmetry
    let args = &raw.args;
    Ok(match raw.keyword.as_str() {
        "FROM" => {
            let name = match args.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    let lower = name.to_lowercase();
                    if !is_valid_stage_name(&lower) {
                        return Err(InstructionError::StageName(name.clone()));
                    }
                    Some(lower)
                }
                [_] => None,
                _ => return Err(InstructionError::FromArguments),
            };
            let flags = Flags::parse("FROM", &raw.flags, &[("platform", FlagKind::Str)])?;
            Instruction::From {
                image: args[0].clone(),
                name,
                platform: flags.string("platform"),
            }
        }
        "RUN" => {
            let flags = Flags::parse(
                "RUN",
                &raw.flags,
                &[
                    ("mount", FlagKind::Strs),
                    ("network", FlagKind::Str),
                    ("security", FlagKind::Str),
                ],
            )?;
            let network = flags
                .get("network")
                .map(|_| flags.string("network").unwrap_or_default());
            if let Some(n) = &network {
                if !matches!(n.as_str(), "none" | "default" | "host") {
                    return Err(InstructionError::NetworkMode(n.clone()));
                }
            }
            let security = flags
                .get("security")
                .map(|_| flags.string("security").unwrap_or_default());
            if let Some(s) = &security {
                if !matches!(s.as_str(), "sandbox" | "insecure") {
                    return Err(InstructionError::SecurityMode(s.clone()));
                }
            }
            let mounts = flags.strings("mount");
            for m in &mounts {
                RunMount::parse(m, None)?;
            }
            if raw.json_form && args.is_empty() {
                return Err(InstructionError::EmptyRun);
            }
            Instruction::Run {
                command: command(raw, args),
                mounts,
                network,
                security,
                heredocs: raw.heredocs.clone(),
            }
        }
        "CMD" => {
            no_flags(raw)?;
            Instruction::Cmd(command(raw, args))
        }
        "ENTRYPOINT" => {
            no_flags(raw)?;
            Instruction::Entrypoint(command(raw, args))
        }
        "SHELL" => {
            no_flags(raw)?;
            if !raw.json_form {
                return Err(InstructionError::ShellNotJson);
            }
            at_least_one(raw)?;
            Instruction::Shell(args.clone())
        }
        "COPY" => Instruction::Copy(copy_args(raw, false)?),
        "ADD" => Instruction::Add(copy_args(raw, true)?),
        "ENV" => Instruction::Env(key_values(raw)?),
        "LABEL" => Instruction::Label(key_values(raw)?),
        "ARG" => {
            // BuildKit ignores flags on ARG; the parser warns about them.
            at_least_one(raw)?;
            let pairs = args
                .iter()
                .map(|a| match a.split_once('=') {
                    Some(("", _)) => Err(InstructionError::BlankName("ARG".into())),
                    Some((k, v)) => Ok((k.to_string(), Some(v.to_string()))),
                    None => Ok((a.clone(), None)),
                })
                .collect::<Result<_, _>>()?;
            Instruction::Arg(pairs)
        }
        "EXPOSE" => {
            at_least_one(raw)?;
            no_flags(raw)?;
            Instruction::Expose(args.clone())
        }
        "VOLUME" => {
            at_least_one(raw)?;
            no_flags(raw)?;
            let mut volumes = Vec::new();
            for v in args {
                let v = v.trim();
                if v.is_empty() {
                    return Err(InstructionError::EmptyVolume);
                }
                volumes.push(v.to_string());
            }
            Instruction::Volume(volumes)
        }
        "WORKDIR" => {
            let path = exactly_one(raw)?;
            no_flags(raw)?;
            Instruction::Workdir(path)
        }
        "USER" => {
            let user = exactly_one(raw)?;
            no_flags(raw)?;
            Instruction::User(user)
        }
        "MAINTAINER" => {
            let who = exactly_one(raw)?;
            no_flags(raw)?;
            Instruction::Maintainer(who)
        }
        // BuildKit ignores flags on STOPSIGNAL; the parser warns about them.
        "STOPSIGNAL" => Instruction::Stopsignal(exactly_one(raw)?),
        "HEALTHCHECK" => Instruction::Healthcheck(healthcheck(raw)?),
        "ONBUILD" => {
            at_least_one(raw)?;
            no_flags(raw)?;
            let trigger = split_command(&args[0]).keyword.to_uppercase();
            match trigger.as_str() {
                "ONBUILD" => return Err(InstructionError::OnbuildChain),
                "MAINTAINER" | "FROM" => return Err(InstructionError::OnbuildTrigger(trigger)),
                _ => {}
            }
            let mut expression = args[0].clone();
            for doc in &raw.heredocs {
                expression.push('\n');
                expression.push_str(&doc.content);
                expression.push_str(&doc.name);
            }
            Instruction::Onbuild(expression)
        }
        other => {
            return Err(InstructionError::UnknownInstruction {
                keyword: other.to_string(),
                suggestion: suggest(other, &KEYWORDS),
            })
        }
    })
}

fn healthcheck(raw: &RawInstruction) -> Result<Healthcheck, InstructionError> {
    at_least_one(raw)?;
    let kind = raw.args[0].to_uppercase();
    let rest = &raw.args[1..];
    if kind == "NONE" {
        // BuildKit does not look at flags for NONE; the parser warns.
        if !rest.is_empty() {
            return Err(InstructionError::HealthcheckNoneArguments);
        }
        return Ok(Healthcheck::None);
    }
    let flags = Flags::parse(
        "HEALTHCHECK",
        &raw.flags,
        &[
            ("interval", FlagKind::Str),
            ("timeout", FlagKind::Str),
            ("start-period", FlagKind::Str),
            ("start-interval", FlagKind::Str),
            ("retries", FlagKind::Str),
        ],
    )?;
    if kind != "CMD" {
        return Err(InstructionError::HealthcheckType(kind));
    }
    if raw.json_form && rest.is_empty() {
        return Err(InstructionError::HealthcheckNoCommand);
    }
    let interval = |name: &str| parse_interval(name, &flags.string(name).unwrap_or_default());
    let retries = match flags.string("retries") {
        None => None,
        Some(r) => {
            let n: i64 = r
                .parse()
                .ok()
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or_else(|| InstructionError::Retries(r.clone()))?;
            if n < 0 {
                return Err(InstructionError::NegativeRetries(n));
            }
            Some(n as u32)
        }
    };
    Ok(Healthcheck::Cmd {
        command: command(raw, rest),
        interval: interval("interval")?,
        timeout: interval("timeout")?,
        start_period: interval("start-period")?,
        start_interval: interval("start-interval")?,
        retries,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse_syntax;
    use super::*;

    /// Types the last instruction of `src` (a FROM is added in front).
    fn typed_last(src: &str) -> Result<Instruction, FrontendError> {
        let df = parse_syntax(&format!("FROM scratch\n{src}")).unwrap();
        Instruction::from_raw(df.instructions.last().unwrap(), df.escape)
    }

    fn ok(src: &str) -> Instruction {
        typed_last(src).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    fn err(src: &str) -> String {
        match typed_last(src) {
            Ok(i) => panic!("{src} should fail, got {i:?}"),
            Err(e) => {
                assert_eq!(e.line, 2, "{src}");
                e.message
            }
        }
    }

    #[test]
    fn from_variants() {
        assert_eq!(
            ok("FROM --platform=$BUILDPLATFORM golang:1.22 AS Builder"),
            Instruction::From {
                image: "golang:1.22".into(),
                name: Some("builder".into()),
                platform: Some("$BUILDPLATFORM".into()),
            }
        );
        assert_eq!(
            ok("from alpine as a.b-c_1"),
            Instruction::From {
                image: "alpine".into(),
                name: Some("a.b-c_1".into()),
                platform: None
            }
        );
        assert!(err("FROM").contains("either one or three arguments"));
        assert!(err("FROM a b").contains("either one or three arguments"));
        assert!(err("FROM a TO b").contains("either one or three arguments"));
        assert!(err("FROM a AS 1x").contains("invalid name for build stage: \"1x\""));
        assert!(err("FROM a AS b!").contains("can't start with a number or contain symbols"));
        assert!(err("FROM --plaform=x a").contains("did you mean --platform?"));
    }

    #[test]
    fn run_flags_and_forms() {
        match ok("RUN --mount=type=cache,target=/c --mount=type=secret,id=s --network=none --security=insecure make") {
            Instruction::Run {
                command,
                mounts,
                network,
                security,
                ..
            } => {
                assert_eq!(command, Command::Shell("make".into()));
                assert_eq!(mounts, ["type=cache,target=/c", "type=secret,id=s"]);
                assert_eq!(network.as_deref(), Some("none"));
                assert_eq!(security.as_deref(), Some("insecure"));
            }
            other => panic!("{other:?}"),
        }
        match ok(r#"RUN ["echo", "a b"]"#) {
            Instruction::Run { command, .. } => {
                assert_eq!(command, Command::Exec(vec!["echo".into(), "a b".into()]))
            }
            other => panic!("{other:?}"),
        }
        assert!(err("RUN --network=bridge x").contains("unsupported network mode \"bridge\""));
        assert!(err("RUN --security=x y").contains("unsupported security mode"));
        assert!(err("RUN --mount=type=nope x").contains("unsupported mount type"));
        assert!(err("RUN --network x").contains("Missing a value on flag: network"));
        assert!(err("RUN --network=none --network=host x")
            .contains("Duplicate flag specified: network"));
        assert!(err("RUN --chown=1 x").contains("unknown flag: --chown"));
        assert!(err("RUN []").contains("RUN requires at least one argument"));
    }

    #[test]
    fn cmd_entrypoint_shell() {
        assert_eq!(
            ok("CMD echo $HOME"),
            Instruction::Cmd(Command::Shell("echo $HOME".into()))
        );
        assert_eq!(
            ok("ENTRYPOINT []"),
            Instruction::Entrypoint(Command::Exec(vec![]))
        );
        assert_eq!(
            ok("CMD [\"a\"]"),
            Instruction::Cmd(Command::Exec(vec!["a".into()]))
        );
        assert_eq!(
            ok(r#"SHELL ["powershell", "-command"]"#),
            Instruction::Shell(vec!["powershell".into(), "-command".into()])
        );
        assert!(err("SHELL /bin/bash -c").contains("JSON form"));
        assert!(err("SHELL [\"/bin/bash\"").contains("JSON form"));
        assert!(err("SHELL []").contains("SHELL requires at least one argument"));
        assert!(err("CMD --x=1 a").contains("CMD takes no flags"));
    }

    #[test]
    fn copy_and_add() {
        let Instruction::Copy(c) = ok(
            "COPY --from=build --chown=app:app --chmod=0755 --link --parents \
             --exclude=*.md --exclude=tmp a b /dst/",
        ) else {
            panic!()
        };
        assert_eq!(c.sources, ["a", "b"]);
        assert_eq!(c.dest, "/dst/");
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("app:app"));
        assert_eq!(c.chmod.as_deref(), Some("0755"));
        assert!(c.link && c.parents);
        assert_eq!(c.excludes, ["*.md", "tmp"]);

        let Instruction::Add(a) = ok(
            "ADD --checksum=sha256:abc --keep-git-dir=true --unpack=false --link=false \
             https://x/y.tgz /opt/",
        ) else {
            panic!()
        };
        assert_eq!(a.checksum.as_deref(), Some("sha256:abc"));
        assert!(a.keep_git_dir && !a.link);
        assert_eq!(a.unpack, Some(false));

        let Instruction::Copy(j) = ok(r#"COPY ["a b", "/c d/"]"#) else {
            panic!()
        };
        assert_eq!(
            (j.sources, j.dest),
            (vec!["a b".to_string()], "/c d/".to_string())
        );

        assert!(err("COPY a").contains("requires at least two arguments"));
        assert!(err("COPY").contains("requires at least two arguments"));
        assert!(err("ADD --from=x a b").contains("unknown flag: --from"));
        assert!(err("COPY --parents=maybe a b")
            .contains("Expecting boolean value for flag parents, not: maybe"));
        assert!(err("COPY --link= a b").contains("Missing a value on flag: link"));
        assert!(err("COPY --from=$STAGE a b")
            .contains("variable expansion is not supported for --from"));
        assert!(
            err("COPY --from=${S} a b").contains("variable expansion is not supported for --from")
        );
    }

    #[test]
    fn copy_heredocs() {
        let Instruction::Copy(c) =
            ok("COPY <<a.txt <<-'b.sh' plain /dst/\nhello $X\na.txt\n\techo\n\tb.sh")
        else {
            panic!()
        };
        assert_eq!(c.sources, ["plain"]);
        assert_eq!(c.heredocs.len(), 2);
        assert_eq!(
            (c.heredocs[0].name.as_str(), c.heredocs[0].content.as_str()),
            ("a.txt", "hello $X\n")
        );
        assert!(c.heredocs[0].expand);
        assert_eq!(
            (c.heredocs[1].name.as_str(), c.heredocs[1].content.as_str()),
            ("b.sh", "echo\n")
        );
        assert!(!c.heredocs[1].expand);
        assert!(err("COPY a <<EOF\nx\nEOF").contains("cannot accept a heredoc as a destination"));
    }

    #[test]
    fn env_label_arg() {
        assert_eq!(
            ok("ENV A=1 B=\"two words\""),
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"two words\"".into())
            ])
        );
        assert_eq!(
            ok("ENV A 1 2"),
            Instruction::Env(vec![("A".into(), "1 2".into())])
        );
        assert_eq!(
            ok("LABEL \"com.example\"=\"x y\""),
            Instruction::Label(vec![("\"com.example\"".into(), "\"x y\"".into())])
        );
        assert_eq!(
            ok("ARG A B=2 C="),
            Instruction::Arg(vec![
                ("A".into(), None),
                ("B".into(), Some("2".into())),
                ("C".into(), Some("".into()))
            ])
        );
        assert!(err("ARG").contains("ARG requires at least one argument"));
        assert!(err("ARG =x").contains("ARG names can not be blank"));
        assert!(err("ENV =x").contains("ENV names can not be blank"));
        assert!(err("LABEL --x=1 a=b").contains("LABEL takes no flags"));
    }

    #[test]
    fn single_argument_instructions() {
        assert_eq!(ok("WORKDIR /a b"), Instruction::Workdir("/a b".into()));
        assert_eq!(ok("USER app:app"), Instruction::User("app:app".into()));
        assert_eq!(
            ok("STOPSIGNAL SIGTERM"),
            Instruction::Stopsignal("SIGTERM".into())
        );
        assert_eq!(
            ok("MAINTAINER Jane <j@x.org>"),
            Instruction::Maintainer("Jane <j@x.org>".into())
        );
        assert!(err("WORKDIR").contains("WORKDIR requires exactly one argument"));
        assert!(err("USER").contains("USER requires exactly one argument"));
        assert!(err("STOPSIGNAL").contains("STOPSIGNAL requires exactly one argument"));
    }

    #[test]
    fn expose_and_volume() {
        assert_eq!(
            ok("EXPOSE 80/tcp 443"),
            Instruction::Expose(vec!["80/tcp".into(), "443".into()])
        );
        assert_eq!(
            ok("VOLUME [\"/a\", \" /b \"]"),
            Instruction::Volume(vec!["/a".into(), "/b".into()])
        );
        assert_eq!(
            ok("VOLUME /a /b"),
            Instruction::Volume(vec!["/a".into(), "/b".into()])
        );
        assert!(err("VOLUME []").contains("VOLUME requires at least one argument"));
        assert!(err("VOLUME [\"\"]").contains("can not be an empty string"));
        assert!(err("EXPOSE").contains("EXPOSE requires at least one argument"));
    }

    #[test]
    fn healthchecks() {
        assert_eq!(
            ok("HEALTHCHECK NONE"),
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert_eq!(
            ok("HEALTHCHECK --interval=30s --timeout=3s --start-period=1m --start-interval=500ms --retries=3 \
                CMD curl -f http://localhost/ || exit 1"),
            Instruction::Healthcheck(Healthcheck::Cmd {
                command: Command::Shell("curl -f http://localhost/ || exit 1".into()),
                interval: Some(Duration::from_secs(30)),
                timeout: Some(Duration::from_secs(3)),
                start_period: Some(Duration::from_secs(60)),
                start_interval: Some(Duration::from_millis(500)),
                retries: Some(3),
            })
        );
        assert_eq!(
            ok("healthcheck cmd [\"/bin/check\"]"),
            Instruction::Healthcheck(Healthcheck::Cmd {
                command: Command::Exec(vec!["/bin/check".into()]),
                interval: None,
                timeout: None,
                start_period: None,
                start_interval: None,
                retries: None,
            })
        );
        assert!(err("HEALTHCHECK").contains("at least one argument"));
        assert!(err("HEALTHCHECK NONE x").contains("takes no arguments"));
        assert!(err("HEALTHCHECK CMD []").contains("Missing command after HEALTHCHECK CMD"));
        assert!(err("HEALTHCHECK PING x").contains("Unknown type \"PING\""));
        assert!(err("HEALTHCHECK --interval=5 CMD x").contains("missing unit"));
        assert!(err("HEALTHCHECK --interval=1us CMD x").contains("cannot be less than 1ms"));
        assert!(err("HEALTHCHECK --retries=-1 CMD x").contains("--retries cannot be negative (-1)"));
        assert!(err("HEALTHCHECK --retries=x CMD x").contains("invalid syntax"));
        assert!(err("HEALTHCHECK --port=1 CMD x").contains("unknown flag: --port"));
    }

    #[test]
    fn healthcheck_image_config() {
        let Instruction::Healthcheck(h) =
            ok("HEALTHCHECK --interval=30s --retries=3 CMD curl -f http://x/")
        else {
            panic!()
        };
        assert_eq!(
            h.to_config(),
            serde_json::json!({"Test": ["CMD-SHELL", "curl -f http://x/"], "Interval": 30_000_000_000u64, "Retries": 3})
        );
        let Instruction::Healthcheck(h) = ok("HEALTHCHECK --timeout=1s CMD [\"/check\", \"-q\"]")
        else {
            panic!()
        };
        assert_eq!(
            h.to_config(),
            serde_json::json!({"Test": ["CMD", "/check", "-q"], "Timeout": 1_000_000_000u64})
        );
        assert_eq!(
            Healthcheck::None.to_config(),
            serde_json::json!({"Test": ["NONE"]})
        );
    }

    #[test]
    fn heredoc_runs() {
        let run = |src: &str| match ok(src) {
            Instruction::Run {
                command, heredocs, ..
            } => HeredocRun::plan(&command, &heredocs),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            run("RUN <<EOF\napt-get update\nEOF"),
            Some(HeredocRun::Shell("apt-get update\n".into()))
        );
        assert_eq!(
            run("RUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF"),
            Some(HeredocRun::Script {
                name: "EOF".into(),
                content: "#!/usr/bin/env python3\nprint(1)\n".into()
            })
        );
        assert_eq!(
            run("RUN python3 <<PY > out && <<-SH sh\nprint(1)\nPY\n\techo\n\tSH"),
            Some(HeredocRun::Shell(
                "python3 <<PY > out && <<-SH sh\nprint(1)\nPY\necho\nSH".into()
            ))
        );
        assert_eq!(run("RUN echo hi"), None);
    }

    #[test]
    fn onbuild_triggers() {
        assert_eq!(
            ok("ONBUILD RUN make"),
            Instruction::Onbuild("RUN make".into())
        );
        assert_eq!(
            ok("ONBUILD RUN <<EOF\necho hi\nEOF"),
            Instruction::Onbuild("RUN <<EOF\necho hi\nEOF".into())
        );
        assert!(err("ONBUILD ONBUILD RUN x").contains("Chaining ONBUILD"));
        assert!(err("ONBUILD FROM x").contains("FROM isn't allowed as an ONBUILD trigger"));
        assert!(err("ONBUILD maintainer x").contains("MAINTAINER isn't allowed"));
        assert!(err("ONBUILD").contains("ONBUILD requires at least one argument"));
    }

    #[test]
    fn unknown_instructions_suggest() {
        assert_eq!(
            err("RUNN x"),
            "unknown instruction: RUNN (did you mean RUN?)"
        );
        assert_eq!(err("FOOBAR x"), "unknown instruction: FOOBAR");
    }

    #[test]
    fn expansion_of_typed_instructions() {
        let lookup = |k: &str| match k {
            "V" => Some("1.2".to_string()),
            "P" => Some("80 443".to_string()),
            "U" => Some("app".to_string()),
            _ => None,
        };
        let e = |src: &str| ok(src).expanded('\\', &lookup).unwrap();
        assert_eq!(
            e("ENV A=$V B=\"x $V\" C='$V'"),
            Instruction::Env(vec![
                ("A".into(), "1.2".into()),
                ("B".into(), "x 1.2".into()),
                ("C".into(), "$V".into())
            ])
        );
        assert_eq!(
            e("EXPOSE $P 8080"),
            Instruction::Expose(vec!["80".into(), "443".into(), "8080".into()])
        );
        assert_eq!(e("USER $U"), Instruction::User("app".into()));
        assert_eq!(
            e("WORKDIR /opt/$U"),
            Instruction::Workdir("/opt/app".into())
        );
        assert_eq!(e("RUN echo $V"), ok("RUN echo $V"));
        // Shell-form COPY splits on whitespace only, quotes or not, as BuildKit
        // does: a path with spaces needs the JSON form.
        let Instruction::Copy(c) = e("COPY --chown=$U:$U [\"src-$V.tgz\", \"/d s/\"]") else {
            panic!()
        };
        assert_eq!(c.chown.as_deref(), Some("app:app"));
        assert_eq!(c.sources, ["src-1.2.tgz"]);
        assert_eq!(c.dest, "/d s/");
        let Instruction::Copy(h) = e("COPY <<A <<'B' /d/\nv=$V \"q\"\nA\nv=$V\nB") else {
            panic!()
        };
        assert_eq!(h.heredocs[0].content, "v=1.2 \"q\"\n");
        assert_eq!(h.heredocs[1].content, "v=$V\n");
    }
}
