//! The plan: every needed stage with every step fully resolved (expanded
//! arguments, the env and args it sees, user, workdir, shell) and the
//! config each stage ends with. Planning does no I/O: it needs the base
//! images' configs, which the builder fetches first.
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use kiln_cachestore::Platform;
use serde_json::Value;

use crate::dockerfile::{
    expand_heredoc, parse_onbuild_trigger, BaseRef, Command, CopyArgs, Dockerfile, FrontendError,
    HeredocRun, Instruction, MountType, RawInstruction, RefKind, RunMount, Scope, StageGraph,
    Warning,
};
use crate::excerpt::excerpt;
use crate::image::ImageConfig;
use crate::source::classify::{self, Checksum};

#[derive(Debug, Clone)]
pub struct Plan {
    pub stages: Vec<StagePlan>,
    pub target: usize,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone)]
pub enum Base {
    Scratch,
    /// A base image, by its (expanded) reference.
    Image(String),
    Stage(usize),
}

#[derive(Debug, Clone)]
pub struct StagePlan {
    pub index: usize,
    pub name: Option<String>,
    pub needed: bool,
    pub base: Base,
    /// The FROM argument after expansion, for messages.
    pub base_display: String,
    /// What the stage builds for: its `FROM --platform`, else its parent
    /// stage's, else the build's. Its base is resolved and its steps keyed
    /// and run for it.
    pub platform: Platform,
    pub steps: Vec<Step>,
    /// The config the stage ends with (rootfs and history are the builder's).
    pub config: ImageConfig,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub line: usize,
    pub keyword: String,
    /// The instruction as written, for history and logs.
    pub created_by: String,
    pub action: Action,
}

#[derive(Debug, Clone)]
pub enum CopyFrom {
    Context,
    Stage(usize),
    Image(String),
    /// `COPY <<EOF /dest`: (file name, content) of each heredoc, expanded
    /// unless its delimiter was quoted.
    Inline(Vec<(String, String)>),
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Only the config changes.
    Config,
    /// WORKDIR and VOLUME: directories created when missing, owned by
    /// `owner` (a USER value; WORKDIR uses the current USER, as BuildKit).
    Mkdir {
        paths: Vec<String>,
        owner: Option<String>,
    },
    Run {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        user: String,
        workdir: String,
        /// `RUN <<EOF` with a `#!` body: (name, content) of the script that
        /// runs as `/dev/pipes/<name>`, as BuildKit does.
        script: Option<(String, String)>,
        /// `RUN --mount`s, in order.
        mounts: Vec<PlannedMount>,
        network: Network,
    },
    Copy {
        from: CopyFrom,
        sources: Vec<String>,
        dest: String,
        chown: Option<String>,
        chmod: Option<u32>,
        /// `Some` for ADD: URLs are sources, local archives are extracted.
        add: Option<AddSpec>,
        /// `--exclude` patterns.
        excludes: Vec<String>,
        /// `--parents` (COPY only).
        parents: bool,
    },
}

/// What ADD does beyond COPY.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddSpec {
    /// `--checksum=<algorithm>:<hex>` of a URL source.
    pub checksum: Option<String>,
    /// `--unpack`: `None` extracts local archives and leaves downloads.
    pub unpack: Option<bool>,
    /// `--keep-git-dir`: a Git source keeps its `.git`.
    pub keep_git_dir: bool,
}

/// `RUN --network`: `None` gets its own network namespace; `Default` and
/// `Host` share the host's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    #[default]
    Default,
    None,
    Host,
}

/// A `RUN --mount`, expanded with the stage's scope, `from` resolved.
#[derive(Debug, Clone)]
pub struct PlannedMount {
    pub mount: RunMount,
    /// What a bind mounts (or a fresh cache starts from); a bind without
    /// `from` mounts the context.
    pub from: Option<CopyFrom>,
    /// The absolute target inside the root (a relative one is relative to
    /// WORKDIR, a secret's defaults to `/run/secrets/<id>`); `None` only
    /// for a secret exposed as `env=` alone.
    pub target: Option<String>,
}

impl Action {
    /// What a step reads besides its own root: COPY's source and the
    /// `from` of RUN mounts.
    pub fn reads(&self) -> Vec<&CopyFrom> {
        match self {
            Action::Copy { from, .. } => vec![from],
            Action::Run { mounts, .. } => mounts.iter().filter_map(|m| m.from.as_ref()).collect(),
            _ => Vec::new(),
        }
    }
}

impl Plan {
    /// For each stage, the index of the last needed stage that reads it
    /// (FROM, COPY --from or RUN --mount=from).
    pub fn last_uses(&self) -> HashMap<usize, usize> {
        let mut last = HashMap::new();
        for stage in self.stages.iter().filter(|s| s.needed) {
            if let Base::Stage(i) = stage.base {
                last.insert(i, stage.index);
            }
            for step in &stage.steps {
                for from in step.action.reads() {
                    if let CopyFrom::Stage(i) = from {
                        last.insert(*i, stage.index);
                    }
                }
            }
        }
        last
    }
}

impl StagePlan {
    /// Whether a step reads `stage` (COPY --from or RUN --mount=from), so
    /// its root must outlive this stage's start.
    pub fn copies_from(&self, stage: usize) -> bool {
        self.steps.iter().any(|s| {
            s.action
                .reads()
                .iter()
                .any(|from| matches!(from, CopyFrom::Stage(i) if *i == stage))
        })
    }
}

/// A base image as a stage uses it: its expanded reference, and the
/// platform its manifest is chosen for.
pub type BaseKey = (String, Platform);

/// Plans the needed stages of `graph` for the target `platform`.
/// `base_configs` holds the config of every base image a needed stage
/// starts from ([`StagePlan::platform`] says which of an index's images).
pub fn plan(
    df: &Dockerfile,
    graph: &StageGraph,
    base_configs: &HashMap<BaseKey, ImageConfig>,
    platform: &Platform,
    labels: &BTreeMap<String, String>,
) -> Result<Plan, FrontendError> {
    let mut stages: Vec<StagePlan> = Vec::new();
    // Each stage's final scope: `FROM <stage>` inherits its ARGs and ENV.
    let mut scopes: HashMap<usize, Scope> = HashMap::new();
    let mut warnings = graph.warnings.clone();
    for stage in &graph.stages {
        let stage_platform = stage_platform(graph, stage.index, platform);
        let (base, mut config) = match &stage.base_ref {
            BaseRef::Scratch => (
                Base::Scratch,
                ImageConfig {
                    architecture: stage_platform.architecture.clone(),
                    os: stage_platform.os.clone(),
                    variant: stage_platform.variant.clone(),
                    ..Default::default()
                },
            ),
            BaseRef::Image(r) => (
                Base::Image(r.clone()),
                base_configs
                    .get(&(r.clone(), stage_platform.clone()))
                    .cloned()
                    .unwrap_or_default(),
            ),
            BaseRef::Stage(i) => (
                Base::Stage(*i),
                stages
                    .iter()
                    .find(|s| s.index == *i)
                    .map(|s| s.config.clone())
                    .unwrap_or_default(),
            ),
        };
        // A base's history and rootfs belong to the builder's layer list.
        config.history.clear();
        config.rootfs = Default::default();
        config.created = None;
        let scope = match &stage.base_ref {
            BaseRef::Stage(i) => scopes.get(i).map(Scope::inherit),
            _ => None,
        }
        .unwrap_or_else(|| graph.stage_scope(stage.index, config.env()));
        let mut planner = StagePlanner {
            df,
            graph,
            scope,
            config,
            cmd_set: false,
            steps: Vec::new(),
        };
        if stage.needed {
            // A base's ONBUILD triggers run first, at the FROM line, and are
            // not inherited further (as Docker does).
            let from_line = stage.instructions.first().map_or(0, |i| i.line);
            for trigger in planner.config.config.on_build.take().unwrap_or_default() {
                planner.instruction(&parse_onbuild_trigger(&trigger, from_line)?)?;
            }
            for raw in stage.instructions.iter().skip(1) {
                planner.instruction(raw)?;
            }
            if graph.target == stage.index {
                for (k, v) in labels {
                    planner
                        .config
                        .config
                        .labels
                        .get_or_insert_with(BTreeMap::new)
                        .insert(k.clone(), v.clone());
                }
            }
            warnings.extend(planner.scope.warnings());
        }
        scopes.insert(stage.index, planner.scope);
        stages.push(StagePlan {
            index: stage.index,
            name: stage.name.clone(),
            needed: stage.needed,
            base,
            base_display: stage.base_resolved.clone(),
            platform: stage_platform,
            steps: planner.steps,
            config: planner.config,
        });
    }
    Ok(Plan {
        stages,
        target: graph.target,
        warnings,
    })
}

/// Every image a build of `graph` for `target` pulls, each once with the
/// platform it is pulled for, in the order met: a stage's `FROM` for the
/// stage's platform ([`stage_platform`]: `FROM --platform=$BUILDPLATFORM`
/// takes the host's), a `COPY --from` or `RUN --mount=from=` image for the
/// build's. Of the stages the target needs, or of all with `all_stages`
/// (what `kiln warm` fetches when no `--target` narrows it).
pub fn pulled_images(graph: &StageGraph, target: &Platform, all_stages: bool) -> Vec<BaseKey> {
    let mut out: Vec<BaseKey> = Vec::new();
    for stage in graph.stages.iter().filter(|s| all_stages || s.needed) {
        for r in &stage.refs {
            let BaseRef::Image(image) = &r.target else {
                continue;
            };
            let platform = match r.kind {
                RefKind::Base => stage_platform(graph, stage.index, target),
                RefKind::CopyFrom | RefKind::MountFrom => target.clone(),
            };
            let key = (image.clone(), platform);
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }
    out
}

/// [`StageGraph::stage_platform`] in the registry's terms.
pub fn stage_platform(graph: &StageGraph, index: usize, target: &Platform) -> Platform {
    let target = crate::dockerfile::Platform {
        os: target.os.clone(),
        architecture: target.architecture.clone(),
        variant: target.variant.clone(),
    };
    let p = graph.stage_platform(index, &target);
    Platform {
        os: p.os,
        architecture: p.architecture,
        variant: p.variant,
    }
}

struct StagePlanner<'a> {
    df: &'a Dockerfile,
    graph: &'a StageGraph,
    scope: Scope,
    config: ImageConfig,
    /// Whether this stage set CMD (a later ENTRYPOINT then keeps it).
    cmd_set: bool,
    steps: Vec<Step>,
}

impl StagePlanner<'_> {
    fn workdir(&self) -> String {
        self.config
            .config
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into())
    }

    fn command(&self, command: &Command) -> Vec<String> {
        match command {
            Command::Exec(argv) => argv.clone(),
            Command::Shell(script) => {
                let mut argv = self.config.shell();
                argv.push(script.clone());
                argv
            }
        }
    }

    fn push(&mut self, raw: &RawInstruction, action: Action) {
        let mut created_by = raw.keyword.clone();
        for part in raw.flags.iter().chain(&raw.args) {
            created_by.push(' ');
            created_by.push_str(part);
        }
        self.steps.push(Step {
            line: raw.line,
            keyword: raw.keyword.clone(),
            created_by,
            action,
        });
    }

    fn instruction(&mut self, raw: &RawInstruction) -> Result<(), FrontendError> {
        self.scope.set_line(raw.line);
        let scope = &self.scope;
        let instruction = Instruction::from_raw(raw, self.df.escape)?
            .expanded(self.df.escape, &|name| scope.lookup(name))
            .map_err(|e| e.at(raw.line))?;
        let config = &mut self.config.config;
        let action = match instruction {
            Instruction::From { .. } => {
                return Err(FrontendError::new(raw.line, "FROM inside a stage"))
            }
            Instruction::Arg(args) => {
                for (name, default) in args {
                    self.scope.declare_arg(&name, default);
                }
                Action::Config
            }
            Instruction::Env(pairs) => {
                for (key, value) in pairs {
                    self.scope.set_env(&key, &value);
                    self.config.set_env(&key, &value);
                }
                Action::Config
            }
            Instruction::Label(pairs) => {
                config
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .extend(pairs);
                Action::Config
            }
            Instruction::Expose(ports) => {
                let exposed = config.exposed_ports.get_or_insert_with(BTreeMap::new);
                for port in ports {
                    let port = match port.contains('/') {
                        true => port,
                        false => format!("{port}/tcp"),
                    };
                    exposed.insert(port, Value::Object(Default::default()));
                }
                Action::Config
            }
            Instruction::Volume(volumes) => {
                let all = config.volumes.get_or_insert_with(BTreeMap::new);
                for volume in &volumes {
                    all.insert(volume.clone(), Value::Object(Default::default()));
                }
                // Like buildah and Kaniko, the mount points exist in the image.
                Action::Mkdir {
                    paths: volumes
                        .iter()
                        .map(|v| clean_absolute(&Path::new(&self.workdir()).join(v)))
                        .collect(),
                    owner: None,
                }
            }
            Instruction::Workdir(dir) => {
                let dir = clean_absolute(&Path::new(&self.workdir()).join(dir));
                self.config.config.working_dir = Some(dir.clone());
                Action::Mkdir {
                    paths: vec![dir],
                    owner: self.config.config.user.clone(),
                }
            }
            Instruction::User(user) => {
                config.user = Some(user);
                Action::Config
            }
            Instruction::Stopsignal(signal) => {
                config.stop_signal = Some(signal);
                Action::Config
            }
            Instruction::Cmd(command) => {
                self.config.config.cmd = Some(self.command(&command));
                self.cmd_set = true;
                Action::Config
            }
            Instruction::Entrypoint(command) => {
                self.config.config.entrypoint = Some(self.command(&command));
                // Docker: a new ENTRYPOINT drops a CMD inherited from the base.
                if !self.cmd_set {
                    self.config.config.cmd = None;
                }
                Action::Config
            }
            Instruction::Shell(shell) => {
                config.shell = Some(shell);
                Action::Config
            }
            Instruction::Maintainer(author) => {
                self.config.author = Some(author);
                Action::Config
            }
            Instruction::Onbuild(trigger) => {
                config.on_build.get_or_insert_with(Vec::new).push(trigger);
                Action::Config
            }
            Instruction::Healthcheck(check) => {
                config.healthcheck = Some(check.to_config());
                Action::Config
            }
            Instruction::Run {
                command,
                heredocs,
                mounts,
                network,
                ..
            } => {
                let (argv, script) = match HeredocRun::plan(&command, &heredocs) {
                    None => (self.command(&command), None),
                    Some(HeredocRun::Shell(text)) => (self.command(&Command::Shell(text)), None),
                    Some(HeredocRun::Script { name, content }) => {
                        (vec![format!("/dev/pipes/{name}")], Some((name, content)))
                    }
                };
                let workdir = self.workdir();
                let mounts = mounts
                    .iter()
                    .map(|spec| self.run_mount(spec, &workdir, raw.line))
                    .collect::<Result<Vec<_>, _>>()?;
                Action::Run {
                    argv,
                    env: self.scope.run_env(),
                    user: self.config.config.user.clone().unwrap_or_default(),
                    workdir,
                    script,
                    mounts,
                    network: match network.as_deref() {
                        Some("none") => Network::None,
                        Some("host") => Network::Host,
                        _ => Network::Default,
                    },
                }
            }
            Instruction::Copy(args) => self.copy(raw, args, false)?,
            Instruction::Add(args) => self.copy(raw, args, true)?,
        };
        self.push(raw, action);
        Ok(())
    }

    /// Expands one `--mount` with the scope and resolves its `from` and
    /// target as BuildKit does.
    fn run_mount(
        &self,
        spec: &str,
        workdir: &str,
        line: usize,
    ) -> Result<PlannedMount, FrontendError> {
        let error = |message: &str| FrontendError::new(line, message);
        let expand = |v: &str| self.scope.expand_word(v, self.df.escape);
        let mut mount = RunMount::parse(spec, Some(&expand))
            .map_err(|m| FrontendError::new(line, m.to_string()))?;
        if mount.kind == MountType::Ssh {
            return Err(error("RUN --mount=type=ssh is not supported yet"));
        }
        if mount.kind == MountType::Secret && mount.id.is_none() {
            // BuildKit: a secret's id defaults to its target's file name.
            mount.id = mount.target.as_deref().and_then(|t| {
                Path::new(t)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            });
            if mount.id.is_none() {
                return Err(error("a secret mount needs an id or a target"));
            }
        }
        let target = match (&mount.target, mount.kind) {
            (Some(t), _) => Some(clean_absolute(&Path::new(workdir).join(t))),
            (None, MountType::Secret) if mount.env.is_some() => None,
            (None, MountType::Secret) => Some(format!(
                "/run/secrets/{}",
                mount.id.as_deref().unwrap_or_default()
            )),
            (None, _) => return Err(error("mount target is required")),
        };
        if target.as_deref() == Some("/") {
            return Err(error(
                "a mount cannot replace the root: choose another target",
            ));
        }
        let from = match (&mount.from, mount.kind) {
            (Some(from), MountType::Bind | MountType::Cache) => {
                Some(match self.graph.stage_index(from) {
                    Some(i) => CopyFrom::Stage(i),
                    None => CopyFrom::Image(from.clone()),
                })
            }
            (None, MountType::Bind) => Some(CopyFrom::Context),
            (None, _) => None,
            (Some(_), _) => return Err(error("from= is only valid for bind and cache mounts")),
        };
        Ok(PlannedMount {
            mount,
            from,
            target,
        })
    }

    /// COPY, or ADD when `add` is set.
    fn copy(
        &self,
        raw: &RawInstruction,
        args: CopyArgs,
        add: bool,
    ) -> Result<Action, FrontendError> {
        let keyword = if add { "ADD" } else { "COPY" };
        let error = |message: String| FrontendError::new(raw.line, message);
        // --link makes the layer independent of what is below it; Kiln's
        // layers hold the same files either way, so it is accepted as is.
        let unsupported = [
            (
                !args.heredocs.is_empty() && !args.sources.is_empty(),
                "both heredoc and file sources",
            ),
            (add && !args.heredocs.is_empty(), "a heredoc source"),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(used, _)| *used) {
            return Err(error(format!("{keyword} with {what} is not supported yet")));
        }
        let spec = if add {
            let git = args.sources.iter().any(|s| classify::is_git(s));
            if git && args.sources.len() > 1 {
                return Err(error(
                    "ADD of a Git repository takes no other source".into(),
                ));
            }
            // A Git source's checksum is (a prefix of) its commit id.
            if let Some(checksum) = args.checksum.as_ref().filter(|_| git) {
                if checksum.len() < 7 || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(error(format!(
                        "invalid --checksum {:?} for a Git source: expected a commit id",
                        excerpt(checksum)
                    )));
                }
            }
            if args.keep_git_dir && !git {
                return Err(error("--keep-git-dir is only for a Git source".into()));
            }
            if let Some(checksum) = args.checksum.as_ref().filter(|_| !git) {
                if let Some(local) = args.sources.iter().find(|s| !classify::is_url(s)) {
                    return Err(error(format!(
                        "checksum can't be specified for non-HTTP(S) sources: {}",
                        excerpt(local)
                    )));
                }
                Checksum::parse(checksum).map_err(|e| error(e.to_string()))?;
            }
            Some(AddSpec {
                checksum: args.checksum.clone(),
                unpack: args.unpack,
                keep_git_dir: args.keep_git_dir,
            })
        } else {
            if let Some(url) = args.sources.iter().find(|s| classify::is_url(s)) {
                return Err(error(format!(
                    "source can't be a URL for COPY: {} (use ADD)",
                    excerpt(url)
                )));
            }
            None
        };
        // A relative destination is relative to WORKDIR; keep a trailing slash.
        let mut dest = clean_absolute(&Path::new(&self.workdir()).join(&args.dest));
        if args.dest.ends_with('/') && !dest.ends_with('/') {
            dest.push('/');
        }
        let mut sources = args.sources;
        let from = match args.from {
            None if !args.heredocs.is_empty() => {
                let mut files = Vec::new();
                for h in &args.heredocs {
                    let content = match h.expand {
                        true => expand_heredoc(&h.content, &|name| self.scope.lookup(name))
                            .map_err(|e| error(e.to_string()))?,
                        false => h.content.clone(),
                    };
                    sources.push(h.name.clone());
                    files.push((h.name.clone(), content));
                }
                CopyFrom::Inline(files)
            }
            None => CopyFrom::Context,
            Some(from) => match self.graph.stage_index(&from) {
                Some(i) => CopyFrom::Stage(i),
                None => CopyFrom::Image(from),
            },
        };
        let chmod = match &args.chmod {
            None => None,
            Some(mode) => Some(u32::from_str_radix(mode, 8).map_err(|_| {
                FrontendError::new(
                    raw.line,
                    format!(
                        "invalid --chmod {:?}: expected an octal mode",
                        excerpt(mode)
                    ),
                )
            })?),
        };
        Ok(Action::Copy {
            from,
            sources,
            dest,
            chown: args.chown,
            chmod,
            add: spec,
            excludes: args.excludes,
            parents: args.parents,
        })
    }
}

/// An absolute, lexically cleaned path (`..` cannot go above `/`).
fn clean_absolute(path: &Path) -> String {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn linux(architecture: &str) -> Platform {
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    #[test]
    fn each_image_is_pulled_for_the_platform_its_stage_builds_for() {
        let df = crate::dockerfile::parse(
            "FROM --platform=$BUILDPLATFORM golang AS build\nCOPY --from=tools /x /x\nFROM busybox AS unused\nFROM alpine\nCOPY --from=build /app /app\nCOPY --from=golang /y /y\n",
        )
        .unwrap();
        let arm = linux("arm64");
        let graph = StageGraph::resolve(&df, &BTreeMap::new(), None, &(&arm).into()).unwrap();
        let key = |image: &str, platform: &Platform| (image.to_string(), platform.clone());
        // The build stage's FROM for the host; a COPY --from image, even
        // in that stage, for the target (as the build pulls them).
        // Each once (on an arm64 host, golang is pulled for one platform).
        let once = |keys: Vec<BaseKey>| {
            let mut out: Vec<BaseKey> = Vec::new();
            keys.into_iter().for_each(|k| {
                if !out.contains(&k) {
                    out.push(k)
                }
            });
            out
        };
        let (host, tools, alpine) = (
            key("golang", &Platform::host()),
            key("tools", &arm),
            key("alpine", &arm),
        );
        let needed = vec![
            host.clone(),
            tools.clone(),
            alpine.clone(),
            key("golang", &arm),
        ];
        assert_eq!(pulled_images(&graph, &arm, false), once(needed));
        let all = vec![
            host,
            tools,
            key("busybox", &arm),
            alpine,
            key("golang", &arm),
        ];
        assert_eq!(pulled_images(&graph, &arm, true), once(all));
    }
}
