//! ARG and ENV scoping, as BuildKit's dispatcher implements it.
//!
//! * ARGs before the first FROM ([`GlobalArgs`]) are only usable in FROM
//!   lines (image and `--platform`). A stage sees one only after
//!   redeclaring it (`ARG NAME`), and then gets its global value.
//! * A `--build-arg` overrides the default of a declared ARG, global or in
//!   a stage. A build arg that no ARG declares is not visible to RUN (the
//!   proxy args excepted) and is reported as unused.
//! * ENV and ARG write the same environment, in order: the later one of
//!   the same name wins (so an ENV after an ARG beats it, and an ARG
//!   redeclared after an inherited ENV wins, as in BuildKit). Only ENV goes
//!   into the image config.
//! * A stage based on another stage (`FROM builder`) inherits its ARGs and
//!   ENV: start it from the parent's final scope with [`Scope::inherit`].
//! * The platform args (`TARGETPLATFORM`, `BUILDARCH`, ...) are global
//!   args every FROM line can use; stages declare them to see them.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use super::directives::CheckConfig;
use super::error::Warning;
use super::expand::{expand_word, expand_words, ExpandError};
use super::suggest::suggest;
use crate::excerpt::excerpt;

/// An OS/architecture pair, as `docker build --platform` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    pub fn linux_amd64() -> Self {
        Platform::new("linux", "amd64", None)
    }

    /// The platform Kiln runs on: Linux, with Rust's architecture name
    /// mapped to the OCI one.
    pub fn host() -> Self {
        match std::env::consts::ARCH {
            "x86_64" => Platform::new("linux", "amd64", None),
            "aarch64" => Platform::new("linux", "arm64", None),
            "x86" => Platform::new("linux", "386", None),
            "arm" => Platform::new("linux", "arm", Some("v7")),
            "powerpc64" => Platform::new("linux", "ppc64le", None),
            "riscv64" => Platform::new("linux", "riscv64", None),
            "s390x" => Platform::new("linux", "s390x", None),
            other => Platform::new("linux", other, None),
        }
    }

    /// Parses `os/arch[/variant]`, as `--platform` takes it.
    pub fn parse(spec: &str) -> Option<Self> {
        let parts: Vec<&str> = spec.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        match parts.as_slice() {
            [os, arch] => Some(Platform::new(os, arch, None)),
            [os, arch, variant] => Some(Platform::new(os, arch, Some(variant))),
            _ => None,
        }
    }

    /// `os/arch[/variant]`.
    pub fn format(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{}", self.os, self.architecture, v),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// The build args BuildKit gives a meaning without an ARG instruction.
pub const PROXY_ARGS: [&str; 5] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "FTP_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// The platform args every FROM line can use.
pub const PLATFORM_ARGS: [&str; 8] = [
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
];

/// Whether a build arg has a meaning of its own, so never counts as unused.
fn is_builtin_arg(name: &str) -> bool {
    PROXY_ARGS.iter().any(|p| p.eq_ignore_ascii_case(name))
        || PLATFORM_ARGS.contains(&name)
        || name.starts_with("BUILDKIT_")
        || name == "SOURCE_DATE_EPOCH"
}

/// Adds or replaces `key` in an ordered environment.
fn add_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

fn get_env(env: &[(String, String)], key: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// The ARGs before the first FROM, and the build args.
#[derive(Debug, Clone)]
pub struct GlobalArgs {
    /// Every arg with a value a FROM line can see, in order.
    values: Vec<(String, String)>,
    /// Names declared by global ARG instructions, with or without a value.
    declared: Vec<String>,
    build_args: BTreeMap<String, String>,
    consumed: BTreeSet<String>,
}

impl GlobalArgs {
    /// The platform args (overridable with `--build-arg`), before any ARG:
    /// `TARGET*` name `target`, the platform being built for, and `BUILD*`
    /// name `build`, the one Kiln runs on.
    pub fn new(target: &Platform, build: &Platform, build_args: &BTreeMap<String, String>) -> Self {
        let variant = |p: &Platform| p.variant.clone().unwrap_or_default();
        let defaults = [
            ("BUILDPLATFORM", build.format()),
            ("BUILDOS", build.os.clone()),
            ("BUILDARCH", build.architecture.clone()),
            ("BUILDVARIANT", variant(build)),
            ("TARGETPLATFORM", target.format()),
            ("TARGETOS", target.os.clone()),
            ("TARGETARCH", target.architecture.clone()),
            ("TARGETVARIANT", variant(target)),
        ];
        let mut values = Vec::new();
        for (k, v) in defaults {
            add_env(&mut values, k, build_args.get(k).unwrap_or(&v));
        }
        GlobalArgs {
            values,
            declared: Vec::new(),
            build_args: build_args.clone(),
            consumed: BTreeSet::new(),
        }
    }

    /// A global `ARG name[=default]`. The default is given as written and
    /// expanded here with the global args declared so far; a build arg of
    /// the same name replaces it.
    pub fn declare(
        &mut self,
        name: &str,
        default: Option<&str>,
        escape: char,
    ) -> Result<(), ExpandError> {
        self.declared.push(name.to_string());
        let value = match (self.build_args.get(name), default) {
            (Some(v), _) => {
                self.consumed.insert(name.to_string());
                Some(v.clone())
            }
            (None, Some(d)) => Some(expand_word(d, escape, &|n| self.lookup(n))?),
            (None, None) => None,
        };
        if let Some(v) = value {
            add_env(&mut self.values, name, &v);
        }
        Ok(())
    }

    /// The value a FROM line sees for `name`.
    pub fn lookup(&self, name: &str) -> Option<String> {
        get_env(&self.values, name)
    }

    /// Whether a global ARG declares `name` (with or without a value).
    pub fn is_declared(&self, name: &str) -> bool {
        self.declared.iter().any(|d| d == name)
    }

    pub fn build_args(&self) -> &BTreeMap<String, String> {
        &self.build_args
    }

    /// Build args a global ARG used.
    pub fn consumed_build_args(&self) -> &BTreeSet<String> {
        &self.consumed
    }
}

/// The variables of one stage while its instructions run, in order.
#[derive(Debug, Clone)]
pub struct Scope {
    /// What expansion and RUN see: ENV and ARG values, later wins.
    env: Vec<(String, String)>,
    /// The ENV that goes into the image config.
    image_env: Vec<(String, String)>,
    /// ARG names declared in this stage (or its parent stages).
    args: Vec<String>,
    global: Vec<(String, String)>,
    build_args: BTreeMap<String, String>,
    consumed: BTreeSet<String>,
    /// The line of the instruction being processed (see [`Scope::set_line`]).
    line: usize,
    /// Variables looked up while unset, with the line: BuildKit's
    /// `UndefinedVar` lint.
    undefined: RefCell<BTreeSet<(usize, String)>>,
    /// `# check=`: whether `UndefinedVar` is wanted.
    check: CheckConfig,
}

impl Scope {
    /// The scope at the start of a stage built on an image (or scratch):
    /// the image's `Env` (`KEY=VALUE` strings) and nothing declared yet.
    pub fn new(global: &GlobalArgs, base_env: &[String]) -> Self {
        let mut env = Vec::new();
        for entry in base_env {
            let (k, v) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
            add_env(&mut env, k, v);
        }
        Scope {
            image_env: env.clone(),
            env,
            args: Vec::new(),
            global: global.values.clone(),
            build_args: global.build_args.clone(),
            consumed: global.consumed.clone(),
            line: 0,
            undefined: RefCell::new(BTreeSet::new()),
            check: CheckConfig::default(),
        }
    }

    /// The scope at the start of a stage built on another stage: the
    /// parent's final scope, ARGs included (BuildKit carries them over).
    pub fn inherit(parent: &Scope) -> Self {
        let child = parent.clone();
        child.undefined.borrow_mut().clear();
        child
    }

    /// Applies the Dockerfile's `# check=` to [`Scope::warnings`].
    pub fn set_check(&mut self, check: CheckConfig) {
        self.check = check;
    }

    /// Tells the scope which instruction is being processed, so that the
    /// [`Scope::warnings`] about undefined variables carry its line.
    pub fn set_line(&mut self, line: usize) {
        self.line = line;
    }

    /// `ARG name[=default]` in a stage, the default already expanded by the
    /// caller (with this scope). The value is, in order of preference: the
    /// build arg, the default, the global ARG's value. An ARG with none of
    /// them is declared but unset.
    pub fn declare_arg(&mut self, name: &str, default: Option<String>) {
        let value = match (self.build_args.get(name), default) {
            (Some(v), _) => {
                self.consumed.insert(name.to_string());
                Some(v.clone())
            }
            (None, Some(d)) => Some(d),
            (None, None) => get_env(&self.global, name),
        };
        // ENV always beats an ARG of the same name, whichever came first.
        if let Some(v) = value.filter(|_| get_env(&self.image_env, name).is_none()) {
            add_env(&mut self.env, name, &v);
        }
        if !self.args.iter().any(|a| a == name) {
            self.args.push(name.to_string());
        }
    }

    /// [`Scope::declare_arg`] with the default as written: it is expanded
    /// here, and only when no build arg replaces it, exactly as BuildKit
    /// does (so `ARG A=${X:?}` does not fail when `--build-arg A=1` is
    /// given).
    pub fn declare_arg_unexpanded(
        &mut self,
        name: &str,
        default: Option<&str>,
        escape: char,
    ) -> Result<(), ExpandError> {
        let default = match (self.build_args.contains_key(name), default) {
            (false, Some(d)) => Some(self.expand_word(d, escape)?),
            _ => None,
        };
        self.declare_arg(name, default);
        Ok(())
    }

    /// `ENV k=v ...` given as written: every key and value is expanded with
    /// the scope as it was before the instruction, then all are set.
    pub fn apply_env(
        &mut self,
        pairs: &[(String, String)],
        escape: char,
    ) -> Result<(), ExpandError> {
        let expanded = pairs
            .iter()
            .map(|(k, v)| Ok((self.expand_word(k, escape)?, self.expand_word(v, escape)?)))
            .collect::<Result<Vec<_>, ExpandError>>()?;
        for (k, v) in expanded {
            self.set_env(&k, &v);
        }
        Ok(())
    }

    /// Sets one already expanded environment variable.
    pub fn set_env(&mut self, key: &str, value: &str) {
        add_env(&mut self.env, key, value);
        add_env(&mut self.image_env, key, value);
    }

    /// What `$name` means at this point of the stage. An unset variable
    /// that no ARG declares is remembered for [`Scope::warnings`].
    pub fn lookup(&self, name: &str) -> Option<String> {
        let value = get_env(&self.env, name);
        if value.is_none() && !self.args.iter().any(|a| a == name) {
            self.undefined
                .borrow_mut()
                .insert((self.line, name.to_string()));
        }
        value
    }

    /// BuildKit's `UndefinedVar` lint for this stage: every variable an
    /// expansion used while neither ENV nor a declared ARG defined it, at
    /// the line given to [`Scope::set_line`].
    pub fn warnings(&self) -> Vec<Warning> {
        if !self.check.enabled("UndefinedVar") {
            return Vec::new();
        }
        let known: Vec<&str> = self
            .env
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect();
        self.undefined
            .borrow()
            .iter()
            .map(|(line, name)| {
                let hint = suggest(name, &known)
                    .map(|s| format!(" (did you mean ${s}?)"))
                    .unwrap_or_default();
                Warning::lint(
                    *line,
                    "UndefinedVar",
                    format!("Usage of undefined variable '${}'{hint}", excerpt(name)),
                )
            })
            .collect()
    }

    pub fn expand_word(&self, word: &str, escape: char) -> Result<String, ExpandError> {
        expand_word(word, escape, &|n| self.lookup(n))
    }

    pub fn expand_words(&self, word: &str, escape: char) -> Result<Vec<String>, ExpandError> {
        expand_words(word, escape, &|n| self.lookup(n))
    }

    /// The environment of a RUN: the ENV and the declared ARGs with a
    /// value, plus the proxy build args (both cases, as BuildKit passes
    /// them) unless the stage set them itself.
    pub fn run_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        for proxy in PROXY_ARGS {
            let lower = proxy.to_ascii_lowercase();
            // Like BuildKit, the lower-case spelling wins when both are given.
            let value = self
                .build_args
                .get(&lower)
                .or_else(|| self.build_args.get(proxy))
                .or_else(|| {
                    self.build_args
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(proxy))
                        .map(|(_, v)| v)
                });
            if let Some(v) = value {
                for key in [proxy.to_string(), lower] {
                    if get_env(&env, &key).is_none() {
                        env.push((key, v.clone()));
                    }
                }
            }
        }
        env
    }

    /// The image config's `Env`: ENV only, `KEY=VALUE`.
    pub fn image_env(&self) -> Vec<String> {
        self.image_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    /// ARG names in scope, in declaration order.
    pub fn declared_args(&self) -> &[String] {
        &self.args
    }

    /// Build args used so far (globally or by this stage and its parents).
    pub fn consumed_build_args(&self) -> &BTreeSet<String> {
        &self.consumed
    }
}

/// One warning per build arg that no ARG consumed (proxy, platform and
/// `BUILDKIT_*` args excepted).
pub fn unused_build_arg_warnings<'a>(
    build_args: &BTreeMap<String, String>,
    consumed: impl IntoIterator<Item = &'a String>,
) -> Vec<Warning> {
    let consumed: BTreeSet<&String> = consumed.into_iter().collect();
    build_args
        .keys()
        .filter(|k| !consumed.contains(k) && !is_builtin_arg(k))
        .map(|k| {
            Warning::new(
                0,
                format!(
                    "build-arg {:?} was not consumed: no ARG instruction declares it in the stages being built, \
                     so RUN does not see it",
                    excerpt(k)
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn global(build: &[(&str, &str)]) -> GlobalArgs {
        GlobalArgs::new(
            &Platform::linux_amd64(),
            &Platform::linux_amd64(),
            &args(build),
        )
    }

    #[test]
    fn platform_args_are_global() {
        let g = global(&[]);
        assert_eq!(g.lookup("TARGETPLATFORM").as_deref(), Some("linux/amd64"));
        assert_eq!(g.lookup("BUILDARCH").as_deref(), Some("amd64"));
        assert_eq!(g.lookup("TARGETVARIANT").as_deref(), Some(""));
        let g = GlobalArgs::new(
            &Platform::new("linux", "arm", Some("v7")),
            &Platform::linux_amd64(),
            &args(&[("TARGETOS", "freebsd")]),
        );
        assert_eq!(g.lookup("TARGETPLATFORM").as_deref(), Some("linux/arm/v7"));
        assert_eq!(g.lookup("TARGETVARIANT").as_deref(), Some("v7"));
        assert_eq!(g.lookup("TARGETOS").as_deref(), Some("freebsd"));
        // BUILD* stay the builder's own platform.
        assert_eq!(g.lookup("BUILDPLATFORM").as_deref(), Some("linux/amd64"));
        assert_eq!(g.lookup("BUILDVARIANT").as_deref(), Some(""));
    }

    #[test]
    fn global_args_defaults_and_overrides() {
        let mut g = global(&[("VERSION", "2.0")]);
        g.declare("VERSION", Some("1.0"), '\\').unwrap();
        g.declare("IMAGE", Some("app:${VERSION}-$TARGETARCH"), '\\')
            .unwrap();
        g.declare("NOVALUE", None, '\\').unwrap();
        assert_eq!(g.lookup("IMAGE").as_deref(), Some("app:2.0-amd64"));
        assert_eq!(g.lookup("NOVALUE"), None);
        assert!(g.is_declared("NOVALUE"));
        assert!(g.consumed_build_args().contains("VERSION"));
        assert!(g.declare("BAD", Some("${X:?must be set}"), '\\').is_err());
    }

    #[test]
    fn globals_need_redeclaring_in_a_stage() {
        let mut g = global(&[]);
        g.declare("VERSION", Some("1.0"), '\\').unwrap();
        let mut s = Scope::new(&g, &[]);
        assert_eq!(s.lookup("VERSION"), None);
        assert_eq!(s.lookup("TARGETARCH"), None);
        s.declare_arg_unexpanded("VERSION", None, '\\').unwrap();
        s.declare_arg_unexpanded("TARGETARCH", None, '\\').unwrap();
        assert_eq!(s.lookup("VERSION").as_deref(), Some("1.0"));
        assert_eq!(s.lookup("TARGETARCH").as_deref(), Some("amd64"));
        // A stage default beats the global value.
        s.declare_arg_unexpanded("VERSION", Some("3.0"), '\\')
            .unwrap();
        assert_eq!(s.lookup("VERSION").as_deref(), Some("3.0"));
    }

    #[test]
    fn build_args_beat_defaults() {
        let g = global(&[("MODE", "release")]);
        let mut s = Scope::new(&g, &[]);
        s.declare_arg_unexpanded("MODE", Some("debug"), '\\')
            .unwrap();
        assert_eq!(s.lookup("MODE").as_deref(), Some("release"));
        assert!(s.consumed_build_args().contains("MODE"));
    }

    #[test]
    fn arg_defaults_expand_with_the_scope_so_far() {
        let g = global(&[]);
        let mut s = Scope::new(&g, &["HOME=/root".to_string()]);
        s.declare_arg_unexpanded("CACHE", Some("$HOME/.cache"), '\\')
            .unwrap();
        s.declare_arg_unexpanded("LATER", Some("${CACHE}/x"), '\\')
            .unwrap();
        assert_eq!(s.lookup("LATER").as_deref(), Some("/root/.cache/x"));
        assert!(s
            .declare_arg_unexpanded("E", Some("${NOPE:?}"), '\\')
            .is_err());
    }

    #[test]
    fn env_beats_arg_even_from_the_base_image() {
        let g = global(&[]);
        let mut s = Scope::new(&g, &["V=from-image".to_string()]);
        s.declare_arg_unexpanded("V", Some("arg"), '\\').unwrap();
        assert_eq!(s.lookup("V").as_deref(), Some("from-image"));
        assert_eq!(s.image_env(), ["V=from-image"]);
        s.apply_env(&[("V".into(), "env".into())], '\\').unwrap();
        assert_eq!(s.lookup("V").as_deref(), Some("env"));
        s.declare_arg_unexpanded("V", None, '\\').unwrap();
        assert_eq!(s.lookup("V").as_deref(), Some("env"));
        assert_eq!(s.image_env(), ["V=env"]);
    }

    #[test]
    fn env_values_see_the_previous_scope() {
        let g = global(&[]);
        let mut s = Scope::new(&g, &["A=old".to_string(), "PATH=/bin".to_string()]);
        s.apply_env(
            &[
                ("A".into(), "new".into()),
                ("B".into(), "$A".into()),
                ("PATH".into(), "/opt/bin:$PATH".into()),
            ],
            '\\',
        )
        .unwrap();
        assert_eq!(s.lookup("B").as_deref(), Some("old"));
        assert_eq!(s.image_env(), ["A=new", "PATH=/opt/bin:/bin", "B=old"]);
    }

    #[test]
    fn run_env_has_declared_args_only() {
        let g = global(&[
            ("SECRETISH", "x"),
            ("DECLARED", "y"),
            ("http_proxy", "http://p:3128"),
        ]);
        let mut s = Scope::new(&g, &["PATH=/bin".to_string()]);
        s.declare_arg_unexpanded("DECLARED", None, '\\').unwrap();
        s.declare_arg_unexpanded("UNSET", None, '\\').unwrap();
        let env = s.run_env();
        assert!(env.contains(&("DECLARED".into(), "y".into())));
        assert!(!env.iter().any(|(k, _)| k == "SECRETISH" || k == "UNSET"));
        assert!(env.contains(&("HTTP_PROXY".into(), "http://p:3128".into())));
        assert!(env.contains(&("http_proxy".into(), "http://p:3128".into())));
        assert_eq!(s.image_env(), ["PATH=/bin"]);
        assert_eq!(s.declared_args(), ["DECLARED", "UNSET"]);
    }

    #[test]
    fn pre_expanded_defaults() {
        let g = global(&[("B", "from-build-arg")]);
        let mut s = Scope::new(&g, &[]);
        s.declare_arg("A", Some("expanded".into()));
        s.declare_arg("B", Some("ignored".into()));
        assert_eq!(s.lookup("A").as_deref(), Some("expanded"));
        assert_eq!(s.lookup("B").as_deref(), Some("from-build-arg"));
        // The exact variant does not even expand a default it will not use.
        s.declare_arg_unexpanded("B", Some("${NOPE:?would fail}"), '\\')
            .unwrap();
        assert_eq!(s.lookup("B").as_deref(), Some("from-build-arg"));
    }

    #[test]
    fn undefined_variables_are_reported_with_their_line() {
        let g = global(&[]);
        let mut s = Scope::new(&g, &["HOME=/root".to_string()]);
        s.set_line(3);
        s.declare_arg_unexpanded("DECLARED", None, '\\').unwrap();
        s.expand_word("$HOME $DECLARED", '\\').unwrap();
        assert!(s.warnings().is_empty());
        s.set_line(5);
        s.expand_word("$HOEM/x ${MISSING:-d}", '\\').unwrap();
        let w = s.warnings();
        let msgs: Vec<_> = w.iter().map(|w| (w.line, w.message.as_str())).collect();
        assert_eq!(
            msgs,
            [
                (
                    5,
                    "UndefinedVar: Usage of undefined variable '$HOEM' (did you mean $HOME?)"
                ),
                (5, "UndefinedVar: Usage of undefined variable '$MISSING'"),
            ]
        );
        assert!(Scope::inherit(&s).warnings().is_empty());
        s.set_check(CheckConfig::parse("skip=UndefinedVar"));
        assert!(s.warnings().is_empty());
    }

    #[test]
    fn child_stages_inherit_args() {
        let g = global(&[]);
        let mut parent = Scope::new(&g, &[]);
        parent
            .declare_arg_unexpanded("NAME", Some("joe"), '\\')
            .unwrap();
        let child = Scope::inherit(&parent);
        assert_eq!(child.lookup("NAME").as_deref(), Some("joe"));
        assert_eq!(child.run_env(), [("NAME".to_string(), "joe".to_string())]);
    }

    #[test]
    fn unused_build_args() {
        let build = args(&[
            ("USED", "1"),
            ("UNUSED", "2"),
            ("HTTPS_PROXY", "p"),
            ("TARGETARCH", "arm64"),
            ("BUILDKIT_INLINE_CACHE", "1"),
        ]);
        let used = ["USED".to_string()];
        let w = unused_build_arg_warnings(&build, &used);
        assert_eq!(w.len(), 1);
        assert!(w[0].message.contains("\"UNUSED\" was not consumed"));
        assert_eq!(w[0].line, 0);
    }

    #[test]
    fn platforms_parse_as_flags_write_them() {
        assert_eq!(
            Platform::parse("linux/arm/v7"),
            Some(Platform::new("linux", "arm", Some("v7")))
        );
        assert_eq!(
            Platform::parse("linux/arm64").unwrap().format(),
            "linux/arm64"
        );
        for bad in ["arm64", "linux/", "/arm64", "a/b/c/d", ""] {
            assert_eq!(Platform::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_platform_is_linux() {
        assert_eq!(Platform::host().os, "linux");
        assert_eq!(Platform::linux_amd64().format(), "linux/amd64");
    }
}
