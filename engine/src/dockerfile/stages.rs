//! The stage graph: which stage is built on what, which stages a target
//! needs, and the global ARG scope FROM lines are expanded with.

use std::collections::BTreeMap;

use super::directives::CheckConfig;
use super::error::{FrontendError, Warning};
use super::expand::{process, LexOptions};
use super::instruction::Instruction;
use super::mount::RunMount;
use super::parse::Dockerfile;
use super::raw::RawInstruction;
use super::scope::{unused_build_arg_warnings, GlobalArgs, Platform};
use crate::excerpt::excerpt;

/// What a stage (or a `--from`) starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRef {
    /// The empty filesystem.
    Scratch,
    /// An image reference, as written after expansion.
    Image(String),
    /// An earlier stage, by index.
    Stage(usize),
}

/// Why a stage depends on something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `FROM <base>`.
    Base,
    /// `COPY --from=<ref>`.
    CopyFrom,
    /// `RUN --mount=...,from=<ref>`.
    MountFrom,
}

/// One reference from a stage to a stage or an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRef {
    /// The line of the instruction that makes it.
    pub line: usize,
    pub kind: RefKind,
    /// The reference as written (for FROM: after ARG expansion).
    pub written: String,
    pub target: BaseRef,
}

/// One build stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    /// `AS name`, lower-cased as BuildKit does.
    pub name: Option<String>,
    /// The base as written.
    pub base: String,
    /// The base after global ARG expansion.
    pub base_resolved: String,
    pub base_ref: BaseRef,
    /// `FROM --platform=...` after global ARG expansion.
    pub platform: Option<Platform>,
    /// Whether the target needs this stage.
    pub needed: bool,
    /// The FROM and every `COPY --from` / `RUN --mount=from=`, in order.
    pub refs: Vec<StageRef>,
    /// The FROM first, then the stage's instructions.
    pub instructions: Vec<RawInstruction>,
}

impl Stage {
    /// The name BuildKit shows for the stage: its own or `stage-N`.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }

    /// The stages this one needs, in order of first reference.
    pub fn dependencies(&self) -> Vec<usize> {
        let mut deps = Vec::new();
        for r in &self.refs {
            if let BaseRef::Stage(i) = r.target {
                if !deps.contains(&i) {
                    deps.push(i);
                }
            }
        }
        deps
    }
}

/// The resolved build: stages, the target and what it needs.
#[derive(Debug, Clone)]
pub struct StageGraph {
    /// The instructions before the first FROM (all ARGs).
    pub global: Vec<RawInstruction>,
    /// The global ARG scope, build args applied: what each stage's
    /// [`super::Scope`] starts from.
    pub global_args: GlobalArgs,
    pub stages: Vec<Stage>,
    /// The index of the stage to build.
    pub target: usize,
    /// The parser's warnings and the graph's.
    pub warnings: Vec<Warning>,
    /// The Dockerfile's `# check=` settings.
    pub check: CheckConfig,
}

impl StageGraph {
    /// The platform stage `index` builds for: its `FROM --platform`, else
    /// its parent stage's, else `target`, the build's.
    pub fn stage_platform(&self, index: usize, target: &Platform) -> Platform {
        let stage = &self.stages[index];
        match (&stage.platform, &stage.base_ref) {
            (Some(p), _) => p.clone(),
            (None, BaseRef::Stage(parent)) => self.stage_platform(*parent, target),
            (None, _) => target.clone(),
        }
    }

    /// Splits `df` into stages, expands every FROM with the global ARGs,
    /// resolves `FROM <stage>`, `COPY --from` and `RUN --mount=from=`, and
    /// marks the stages `target` (default: the last stage) needs.
    ///
    /// As in BuildKit, a name that is no stage is an image (`scratch` is
    /// the empty image), a FROM only sees stages defined above it, and a
    /// `COPY --from` that reaches the stage itself is a cycle. Unlike
    /// BuildKit, which accepts a `COPY --from` of a *later* stage when that
    /// makes no cycle, Kiln refuses it with an error saying so, so that
    /// every stage only depends on stages before it.
    pub fn resolve(
        df: &Dockerfile,
        build_args: &BTreeMap<String, String>,
        target: Option<&str>,
        platform: &Platform,
    ) -> Result<StageGraph, FrontendError> {
        let check = df.check_config();
        let mut lint = Vec::new();
        // The builder runs natively: BUILDPLATFORM is the host's.
        let mut global_args = GlobalArgs::new(platform, &Platform::host(), build_args);

        // Split into the global part and stages.
        let first_from = df.instructions.iter().position(|i| i.keyword == "FROM");
        let Some(first_from) = first_from else {
            return Err(FrontendError::new(
                0,
                "Dockerfile contains no stages to build: it has no FROM instruction",
            ));
        };
        let global = df.instructions[..first_from].to_vec();
        for raw in &global {
            if let Instruction::Arg(pairs) = Instruction::from_raw(raw, df.escape)? {
                for (name, default) in pairs {
                    global_args
                        .declare(&name, default.as_deref(), df.escape)
                        .map_err(|e| e.at(raw.line))?;
                }
            }
        }
        let mut groups: Vec<Vec<RawInstruction>> = Vec::new();
        for raw in &df.instructions[first_from..] {
            if raw.keyword == "FROM" {
                groups.push(Vec::new());
            }
            groups
                .last_mut()
                .expect("starts with FROM")
                .push(raw.clone());
        }

        // Bases, in order: a FROM only sees the stages above it.
        let mut stages: Vec<Stage> = Vec::new();
        for (index, instructions) in groups.into_iter().enumerate() {
            let from = &instructions[0];
            let Instruction::From {
                image,
                name,
                platform,
            } = Instruction::from_raw(from, df.escape)?
            else {
                unreachable!("groups start with FROM");
            };
            let base_resolved =
                expand_global(&global_args, &image, df.escape, from.line, &mut lint)?;
            if base_resolved.is_empty() {
                return Err(FrontendError::new(
                    from.line,
                    format!("base name ({}) should not be blank", excerpt(&image)),
                ));
            }
            let platform = match platform {
                Some(p) => {
                    let spec = expand_global(&global_args, &p, df.escape, from.line, &mut lint)?;
                    Some(Platform::parse(&spec).ok_or_else(|| {
                        FrontendError::new(
                            from.line,
                            format!(
                                "FROM --platform={}: expected os/arch[/variant]",
                                excerpt(&spec)
                            ),
                        )
                    })?)
                }
                None => None,
            };
            let base_ref = match find_stage(&stages, &base_resolved) {
                Some(i) => BaseRef::Stage(i),
                None => image_or_scratch(&base_resolved),
            };
            if let Some(n) = &name {
                if n == "scratch" || n == "context" {
                    lint.push(Warning::lint(
                        from.line,
                        "ReservedStageName",
                        format!(
                            "'{}' is reserved and should not be used as a stage name",
                            excerpt(n)
                        ),
                    ));
                }
                if let Some(prev) = stages.iter().find(|s| s.name.as_ref() == Some(n)) {
                    lint.push(Warning::lint(
                        from.line,
                        "DuplicateStageName",
                        format!("Duplicate stage name '{}', stage names should be unique (first defined on line {})", excerpt(n), prev.instructions[0].line),
                    ));
                }
            }
            stages.push(Stage {
                index,
                name,
                base: image,
                base_resolved: base_resolved.clone(),
                refs: vec![StageRef {
                    line: from.line,
                    kind: RefKind::Base,
                    written: base_resolved,
                    target: base_ref.clone(),
                }],
                base_ref,
                platform,
                needed: false,
                instructions,
            });
        }

        // A FROM naming a stage defined further down gets the image.
        let mut notes = Vec::new();
        for s in &stages {
            if let BaseRef::Image(img) = &s.base_ref {
                let lower = img.to_lowercase();
                if let Some(later) = stages[s.index + 1..]
                    .iter()
                    .find(|t| t.name.as_deref() == Some(lower.as_str()))
                {
                    notes.push(Warning::new(
                        s.instructions[0].line,
                        format!(
                            "FROM {} uses the image {:?}, not the stage of that name defined later on line {}: \
                             a FROM only sees stages above it",
                            excerpt(img),
                            excerpt(img),
                            later.instructions[0].line
                        ),
                    ));
                }
            }
        }

        // COPY --from and RUN --mount=from=: any stage by name, by index.
        for index in 0..stages.len() {
            let mut refs = Vec::new();
            for raw in &stages[index].instructions[1..] {
                match Instruction::from_raw(raw, df.escape)? {
                    Instruction::Copy(c) => {
                        if let Some(from) = &c.from {
                            let target = resolve_copy_from(&stages, index, from, raw)?;
                            refs.push(StageRef {
                                line: raw.line,
                                kind: RefKind::CopyFrom,
                                written: from.clone(),
                                target,
                            });
                        }
                    }
                    Instruction::Run { mounts, .. } => {
                        for spec in &mounts {
                            let mount = RunMount::parse(spec, None)
                                .map_err(|m| FrontendError::new(raw.line, m.to_string()))?;
                            let Some(from) = mount.from else { continue };
                            let target = match find_stage(&stages, &from) {
                                Some(i) => {
                                    check_order(&stages, index, i, "RUN --mount=from", &from, raw)?
                                }
                                None => image_or_scratch(&from),
                            };
                            refs.push(StageRef {
                                line: raw.line,
                                kind: RefKind::MountFrom,
                                written: from,
                                target,
                            });
                        }
                    }
                    _ => {}
                }
            }
            stages[index].refs.extend(refs);
        }

        let target = match target {
            None => stages.len() - 1,
            // Stage names cannot start with a digit, so a number can only
            // be an index (a Kiln extension: BuildKit takes names only).
            Some(t) if t.parse::<usize>().is_ok_and(|i| i < stages.len()) => {
                t.parse().unwrap_or_default()
            }
            Some(t) => find_stage(&stages, t).ok_or_else(|| {
                let names: Vec<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
                let known = if names.is_empty() {
                    "the Dockerfile names no stages".to_string()
                } else {
                    format!("stages: {}", names.join(", "))
                };
                FrontendError::new(
                    0,
                    format!("target stage {:?} could not be found ({known})", excerpt(t)),
                )
            })?,
        };
        mark_needed(&mut stages, target);

        // Build args the needed stages (or the global part) declare.
        let mut consumed: Vec<String> = global_args.consumed_build_args().iter().cloned().collect();
        for s in stages.iter().filter(|s| s.needed) {
            for raw in s.instructions.iter().filter(|r| r.keyword == "ARG") {
                if let Instruction::Arg(pairs) = Instruction::from_raw(raw, df.escape)? {
                    consumed.extend(pairs.into_iter().map(|(k, _)| k));
                }
            }
        }

        lint.retain(|w| w.rule.is_none_or(|r| check.enabled(r)));
        let mut warnings = df.warnings.clone();
        warnings.extend(lint);
        warnings.extend(notes);
        if check.error {
            let violations: Vec<&Warning> = warnings.iter().filter(|w| w.rule.is_some()).collect();
            if let Some(first) = violations.first() {
                let mut rules: Vec<&str> = violations.iter().filter_map(|w| w.rule).collect();
                rules.dedup();
                return Err(FrontendError::new(
                    first.line,
                    format!(
                        "lint violation found for rules: {} (# check=error=true): {}",
                        rules.join(", "),
                        first.message
                    ),
                ));
            }
        }
        warnings.extend(unused_build_arg_warnings(build_args, &consumed));

        Ok(StageGraph {
            global,
            global_args,
            stages,
            target,
            warnings,
            check,
        })
    }

    /// The stage called `name` (case-insensitively); the last one if
    /// several share it, as in BuildKit.
    pub fn stage_by_name(&self, name: &str) -> Option<&Stage> {
        find_stage(&self.stages, name).map(|i| &self.stages[i])
    }

    pub fn target_stage(&self) -> &Stage {
        &self.stages[self.target]
    }

    /// The stage a `COPY --from` names: an index, or a name
    /// (case-insensitively). `None` means an image.
    pub fn stage_index(&self, name_or_index: &str) -> Option<usize> {
        match name_or_index.parse::<usize>() {
            Ok(i) => (i < self.stages.len()).then_some(i),
            Err(_) => find_stage(&self.stages, name_or_index),
        }
    }

    /// A fresh scope for stage `index` built on an image (or scratch) whose
    /// config has `base_env`. For a stage built on another stage
    /// (`BaseRef::Stage(i)`), BuildKit carries the parent's ARGs over: use
    /// [`super::Scope::inherit`] on stage `i`'s final scope instead.
    pub fn stage_scope(&self, index: usize, base_env: &[String]) -> super::Scope {
        let _ = index; // every stage starts from the same global scope
        let mut scope = super::Scope::new(&self.global_args, base_env);
        scope.set_check(self.check.clone());
        scope
    }

    /// The needed stages in an order that builds every dependency first
    /// (index order: a stage only depends on stages above it).
    pub fn build_order(&self) -> Vec<usize> {
        self.stages
            .iter()
            .filter(|s| s.needed)
            .map(|s| s.index)
            .collect()
    }
}

/// Expands a FROM word with the global ARGs, warning about variables no
/// global ARG declares.
fn expand_global(
    global: &GlobalArgs,
    word: &str,
    escape: char,
    line: usize,
    lint: &mut Vec<Warning>,
) -> Result<String, FrontendError> {
    let processed =
        process(word, &LexOptions::new(escape), &|n| global.lookup(n)).map_err(|e| e.at(line))?;
    for name in processed.unmatched {
        if !global.is_declared(&name) {
            lint.push(Warning::lint(
                line,
                "UndefinedArgInFrom",
                format!("FROM argument '{}' is not declared", excerpt(&name)),
            ));
        }
    }
    Ok(processed.result)
}

/// The last stage named `name`, case-insensitively.
fn find_stage(stages: &[Stage], name: &str) -> Option<usize> {
    let lower = name.to_lowercase();
    stages
        .iter()
        .rev()
        .find(|s| s.name.as_deref() == Some(lower.as_str()))
        .map(|s| s.index)
}

fn image_or_scratch(name: &str) -> BaseRef {
    if name == "scratch" {
        BaseRef::Scratch
    } else {
        BaseRef::Image(name.to_string())
    }
}

/// `COPY --from=`: a stage index, a stage name, or else an image.
fn resolve_copy_from(
    stages: &[Stage],
    current: usize,
    from: &str,
    raw: &RawInstruction,
) -> Result<BaseRef, FrontendError> {
    if let Ok(index) = from.parse::<i64>() {
        return match usize::try_from(index).ok().filter(|&i| i < stages.len()) {
            Some(i) => check_order(stages, current, i, "COPY --from", from, raw),
            None => Err(FrontendError::new(
                raw.line,
                format!("invalid stage index {index}"),
            )),
        };
    }
    match find_stage(stages, from) {
        Some(i) => check_order(stages, current, i, "COPY --from", from, raw),
        None => Ok(image_or_scratch(from)),
    }
}

/// Refuses a reference to the stage itself (a cycle) or to a later stage.
fn check_order(
    stages: &[Stage],
    current: usize,
    referenced: usize,
    what: &str,
    written: &str,
    raw: &RawInstruction,
) -> Result<BaseRef, FrontendError> {
    let name = stages[referenced].display_name();
    let (name, written) = (excerpt(&name), excerpt(written));
    if referenced == current {
        return Err(FrontendError::new(
            raw.line,
            format!("circular dependency detected on stage: {name} ({what}={written} refers to the stage itself)"),
        ));
    }
    if referenced > current {
        return Err(FrontendError::new(
            raw.line,
            format!(
                "{what}={written} refers to stage {name} (line {}), which is defined after this stage: Kiln builds \
                 stages in order and needs it defined above (BuildKit allows this when it makes no cycle)",
                stages[referenced].instructions[0].line
            ),
        ));
    }
    Ok(BaseRef::Stage(referenced))
}

fn mark_needed(stages: &mut [Stage], target: usize) {
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if stages[i].needed {
            continue;
        }
        stages[i].needed = true;
        todo.extend(stages[i].dependencies());
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse;
    use super::*;

    fn graph(
        src: &str,
        build_args: &[(&str, &str)],
        target: Option<&str>,
    ) -> Result<StageGraph, FrontendError> {
        let df = parse(src).unwrap_or_else(|e| panic!("{e}"));
        let args = build_args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StageGraph::resolve(&df, &args, target, &Platform::linux_amd64())
    }

    fn ok(src: &str) -> StageGraph {
        graph(src, &[], None).unwrap_or_else(|e| panic!("{e}"))
    }

    const MULTI: &str = "\
ARG GO=1.22
FROM golang:${GO} AS build
RUN go build
FROM build AS test
RUN go test
FROM alpine AS docs
FROM scratch
COPY --from=build /app /app
COPY --from=0 /etc/passwd /etc/passwd
COPY --from=nginx:alpine /etc/nginx /etc/nginx
";

    #[test]
    fn stages_by_index_and_name() {
        let g = ok(MULTI);
        assert_eq!(g.global.len(), 1);
        assert_eq!(g.stages.len(), 4);
        let s0 = &g.stages[0];
        assert_eq!(
            (
                s0.name.as_deref(),
                s0.base.as_str(),
                s0.base_resolved.as_str()
            ),
            (Some("build"), "golang:${GO}", "golang:1.22")
        );
        assert_eq!(s0.base_ref, BaseRef::Image("golang:1.22".into()));
        assert_eq!(g.stages[1].base_ref, BaseRef::Stage(0));
        assert_eq!(g.stages[3].base_ref, BaseRef::Scratch);
        assert_eq!(g.stages[3].name, None);
        assert_eq!(g.stages[3].instructions.len(), 4);
        let targets: Vec<_> = g.stages[3].refs.iter().map(|r| r.target.clone()).collect();
        assert_eq!(
            targets,
            [
                BaseRef::Scratch,
                BaseRef::Stage(0),
                BaseRef::Stage(0),
                BaseRef::Image("nginx:alpine".into())
            ]
        );
        assert_eq!(g.stage_by_name("BUILD").map(|s| s.index), Some(0));
        assert_eq!(g.stage_index("Build"), Some(0));
        assert_eq!(g.stage_index("3"), Some(3));
        assert_eq!(g.stage_index("4"), None);
        assert_eq!(g.stage_index("nginx:alpine"), None);
        assert_eq!(g.target, 3);
    }

    #[test]
    fn only_needed_stages_are_built() {
        let g = ok(MULTI);
        let needed: Vec<bool> = g.stages.iter().map(|s| s.needed).collect();
        assert_eq!(needed, [true, false, false, true]);
        assert_eq!(g.build_order(), [0, 3]);
        let g = graph(MULTI, &[], Some("Test")).unwrap();
        assert_eq!(g.target, 1);
        assert_eq!(graph(MULTI, &[], Some("2")).unwrap().target, 2);
        assert!(graph(MULTI, &[], Some("4")).is_err());
        let needed: Vec<bool> = g.stages.iter().map(|s| s.needed).collect();
        assert_eq!(needed, [true, true, false, false]);
    }

    #[test]
    fn unknown_target() {
        let e = graph(MULTI, &[], Some("nope")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(e
            .message
            .contains("target stage \"nope\" could not be found"));
        assert!(e.message.contains("build, test, docs"));
    }

    #[test]
    fn from_expands_global_args_and_build_args() {
        let g = graph(MULTI, &[("GO", "1.23")], None).unwrap();
        assert_eq!(g.stages[0].base_resolved, "golang:1.23");
        assert!(g.warnings.is_empty(), "{:?}", g.warnings);
        let g = ok("ARG BASE=alpine\nARG TAG\nFROM ${BASE}:${TAG:-3.19}\nFROM --platform=$BUILDPLATFORM $BASE");
        assert_eq!(g.stages[0].base_resolved, "alpine:3.19");
        let host = Platform::host();
        assert_eq!(g.stages[1].platform.as_ref(), Some(&host));
        let arm = Platform::new("linux", "arm64", None);
        assert_eq!(g.stage_platform(1, &arm), host);
        assert_eq!(g.stage_platform(0, &arm), arm);
        let g = ok("FROM --platform=linux/s390x alpine AS a\nFROM a\nFROM alpine");
        let s390x = Platform::new("linux", "s390x", None);
        assert_eq!(
            g.stage_platform(1, &arm),
            s390x,
            "inherited from its parent"
        );
        assert_eq!(g.stage_platform(2, &arm), arm);
        let e = graph("FROM --platform=arm64 alpine", &[], None).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("expected os/arch"), "{}", e.message);
    }

    #[test]
    fn stage_args_are_not_visible_in_from() {
        let g = ok("FROM alpine\nARG V=1\nFROM busybox:${V:-latest}");
        assert_eq!(g.stages[1].base_resolved, "busybox:latest");
        assert!(g.warnings.iter().any(|w| w
            .message
            .contains("UndefinedArgInFrom: FROM argument 'V' is not declared")));
    }

    #[test]
    fn blank_base_is_an_error() {
        let e = graph("ARG IMAGE\nFROM $IMAGE", &[], None).unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(e.message, "base name ($IMAGE) should not be blank");
        let e = graph("FROM ${X:?need_an_image}", &[], None).unwrap_err();
        assert!(e.message.contains("X: need_an_image"));
    }

    #[test]
    fn from_sees_only_earlier_stages() {
        let g = ok("FROM node AS node\nFROM builder AS app\nFROM alpine AS builder");
        assert_eq!(g.stages[0].base_ref, BaseRef::Image("node".into()));
        assert_eq!(g.stages[1].base_ref, BaseRef::Image("builder".into()));
        assert!(g
            .warnings
            .iter()
            .any(|w| w.line == 2 && w.message.contains("defined later on line 3")));
        assert!(!g.warnings.iter().any(|w| w.line == 1));
    }

    #[test]
    fn copy_from_self_or_later_is_an_error() {
        let e = graph("FROM a AS one\nCOPY --from=one /x /y", &[], None).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e
            .message
            .contains("circular dependency detected on stage: one"));
        let e = graph("FROM a\nCOPY --from=0 /x /y", &[], None).unwrap_err();
        assert!(e
            .message
            .contains("circular dependency detected on stage: stage-0"));
        let e = graph(
            "FROM a AS one\nCOPY --from=two /x /y\nFROM b AS two",
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("defined after this stage"));
        let e = graph("FROM a\nFROM b\nCOPY --from=5 /x /y", &[], None).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (3, "invalid stage index 5"));
        let e = graph("FROM a\nFROM b\nCOPY --from=-1 /x /y", &[], None).unwrap_err();
        assert_eq!(e.message, "invalid stage index -1");
    }

    #[test]
    fn unknown_copy_from_is_an_image() {
        let g = ok("FROM a AS one\nFROM b\nCOPY --from=Ones /x /y\nCOPY --from=scratch /x /y");
        assert_eq!(g.stages[1].refs[1].target, BaseRef::Image("Ones".into()));
        assert_eq!(g.stages[1].refs[2].target, BaseRef::Scratch);
        assert!(!g.stages[0].needed);
    }

    #[test]
    fn run_mount_from() {
        let g = ok("FROM a AS deps\nFROM b\nRUN --mount=type=bind,from=DEPS,target=/d --mount=from=python:3,target=/p \
                    --mount=type=cache,target=/c ls");
        let targets: Vec<_> = g.stages[1]
            .refs
            .iter()
            .skip(1)
            .map(|r| (r.kind, r.target.clone()))
            .collect();
        assert_eq!(
            targets,
            [
                (RefKind::MountFrom, BaseRef::Stage(0)),
                (RefKind::MountFrom, BaseRef::Image("python:3".into()))
            ]
        );
        assert!(g.stages[0].needed);
        let e = graph("FROM a AS x\nRUN --mount=from=x,target=/t ls", &[], None).unwrap_err();
        assert!(e.message.contains("circular dependency"));
    }

    #[test]
    fn duplicate_and_reserved_names() {
        let g = ok("FROM a AS x\nFROM b AS x\nFROM c AS scratch\nFROM d\nCOPY --from=x /a /b");
        assert_eq!(g.stages[3].refs[1].target, BaseRef::Stage(1));
        assert!(g
            .warnings
            .iter()
            .any(|w| w.rule == Some("DuplicateStageName") && w.line == 2));
        assert!(g
            .warnings
            .iter()
            .any(|w| w.rule == Some("ReservedStageName") && w.line == 3));
        // A stage named scratch hides the empty image.
        let g = ok("FROM alpine AS scratch\nFROM scratch");
        assert_eq!(g.stages[1].base_ref, BaseRef::Stage(0));
    }

    #[test]
    fn stage_scopes_start_from_the_global_args() {
        let g = graph("ARG V=1\nFROM a\nARG V\nRUN x", &[("V", "2")], None).unwrap();
        let mut scope = g.stage_scope(0, &["PATH=/bin".to_string()]);
        assert_eq!(scope.lookup("V"), None);
        scope.declare_arg("V", None);
        assert_eq!(scope.lookup("V").as_deref(), Some("2"));
        assert_eq!(scope.image_env(), ["PATH=/bin"]);
    }

    #[test]
    fn unused_build_args_warn() {
        let src = "ARG G\nFROM a AS one\nARG ONE\nFROM b\nARG TWO\nRUN env";
        let g = graph(
            src,
            &[
                ("G", "1"),
                ("ONE", "1"),
                ("TWO", "2"),
                ("NOPE", "x"),
                ("http_proxy", "p"),
            ],
            None,
        )
        .unwrap();
        let msgs: Vec<_> = g.warnings.iter().map(|w| w.message.as_str()).collect();
        // ONE is declared only in a stage the target does not need.
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].contains("\"NOPE\""));
        assert!(msgs[1].contains("\"ONE\""));
    }

    #[test]
    fn check_directive_can_skip_or_fail() {
        let src = "FROM a AS Build\nFROM b";
        assert!(ok(src)
            .warnings
            .iter()
            .any(|w| w.rule == Some("StageNameCasing")));
        let g = ok(&format!("# check=skip=StageNameCasing\n{src}"));
        assert!(g.warnings.is_empty());
        let e = graph(&format!("# check=error=true\n{src}"), &[], None).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e
            .message
            .contains("lint violation found for rules: StageNameCasing"));
    }
}
