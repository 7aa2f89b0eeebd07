//! `RUN --mount=...` options, parsed as BuildKit parses them: a CSV record
//! of `key=value` fields (plus the bare `ro`, `rw` and `required`).
//!
//! The values may contain variables, expanded with the stage's scope when
//! the RUN executes; only `from` may not (BuildKit refuses it, because the
//! stage graph has to be known before anything runs).

use super::expand::ExpandError;
use crate::excerpt::excerpt;

/// Expands one mount option value with the stage's scope.
pub type MountExpander<'a> = &'a dyn Fn(&str) -> Result<String, ExpandError>;

/// What a mount provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

impl MountType {
    /// The name `type=` gives it.
    fn name(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }

    fn parse(s: &str) -> Option<MountType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "bind" => MountType::Bind,
            "cache" => MountType::Cache,
            "tmpfs" => MountType::Tmpfs,
            "secret" => MountType::Secret,
            "ssh" => MountType::Ssh,
            _ => return None,
        })
    }
}

/// One parsed `--mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountType,
    /// `from=`: a stage name or an image; `None` for the build context.
    pub from: Option<String>,
    pub source: Option<String>,
    pub target: Option<String>,
    pub readonly: bool,
    /// `id=`: the cache id, or the secret id.
    pub id: Option<String>,
    /// `sharing=` for caches: `shared`, `private` or `locked`.
    pub sharing: Option<String>,
    pub required: bool,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// `env=` for secrets: the variable the secret is exposed as.
    pub env: Option<String>,
    /// `size=` for tmpfs, in bytes.
    pub size: Option<u64>,
}

/// A `--mount` BuildKit would refuse; the texts are BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error("failed to parse csv mounts: {0}")]
    Csv(#[source] CsvError),
    #[error(transparent)]
    Expand(#[from] ExpandError),
    #[error("invalid field '{}' must be a key=value pair", excerpt(.0))]
    NotKeyValue(String),
    #[error("'from' doesn't support variable expansion, define alias stage instead")]
    VariableInFrom,
    #[error("unexpected key '{}' in '{}'", excerpt(.key), excerpt(.field))]
    UnexpectedKey { key: String, field: String },
    #[error("unsupported mount type {:?}", excerpt(.0))]
    UnsupportedType(String),
    #[error("invalid value for {}: {}", excerpt(.key), excerpt(.value))]
    NotBoolean { key: String, value: String },
    #[error("unsupported sharing value {:?}", excerpt(.0))]
    UnsupportedSharing(String),
    #[error("invalid value {} for {key}", excerpt(.value))]
    InvalidValue { key: &'static str, value: String },
    #[error("{key} not allowed for {:?} type mounts", .kind.name())]
    FileInfoNotAllowed { key: &'static str, kind: MountType },
    #[error("unexpected key '{key}' for mount type '{}'", .kind.name())]
    KeyNotForType { key: &'static str, kind: MountType },
    #[error("invalid cache sharing set for {} mount", .kind.name())]
    SharingNotForType { kind: MountType },
    #[error("secret mount should not have a from")]
    SecretFrom,
    #[error("both source and id can't be set")]
    SecretSourceAndId,
}

/// A `--mount` value that is not one CSV record, in the words of Go's
/// `encoding/csv`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsvError {
    #[error("EOF")]
    Empty,
    #[error("extraneous or missing \" in quoted-field")]
    Quote,
    #[error("bare \" in non-quoted-field")]
    BareQuote,
}

const KEYS: [&str; 19] = [
    "type",
    "from",
    "source",
    "target",
    "readonly",
    "id",
    "sharing",
    "required",
    "mode",
    "uid",
    "gid",
    "src",
    "dst",
    "destination",
    "ro",
    "rw",
    "readwrite",
    "env",
    "size",
];

impl RunMount {
    /// Parses one `--mount` value. With `expand`, every value is expanded
    /// first (what the executor does with the stage's scope). Without it,
    /// values holding a `$` are only checked for shape, since their meaning
    /// is not known yet; a variable in `from` is always an error.
    pub fn parse(spec: &str, expand: Option<MountExpander<'_>>) -> Result<RunMount, MountError> {
        let fields = parse_csv_record(spec).map_err(MountError::Csv)?;
        let mut m = RunMount {
            kind: MountType::Bind,
            from: None,
            source: None,
            target: None,
            readonly: false,
            id: None,
            sharing: None,
            required: false,
            mode: None,
            uid: None,
            gid: None,
            env: None,
            size: None,
        };
        let mut ro_auto = true;
        for field in &fields {
            let (key, value) = match field.split_once('=') {
                Some((k, v)) => (k.to_ascii_lowercase(), v),
                None => {
                    let key = field.to_ascii_lowercase();
                    match key.as_str() {
                        "readonly" | "ro" => {
                            m.readonly = true;
                            ro_auto = false;
                            continue;
                        }
                        "readwrite" | "rw" => {
                            m.readonly = false;
                            ro_auto = false;
                            continue;
                        }
                        "required" => {
                            m.required = true;
                            continue;
                        }
                        _ => return Err(MountError::NotKeyValue(field.clone())),
                    }
                }
            };
            let value = match expand {
                Some(expand) => expand(value)?,
                None if key == "from" && has_variable(value) => {
                    return Err(MountError::VariableInFrom);
                }
                None if value.contains('$') => {
                    if !KEYS.contains(&key.as_str()) {
                        return Err(unexpected_key(key, field));
                    }
                    continue;
                }
                None => value.to_string(),
            };
            match key.as_str() {
                "type" => {
                    m.kind = MountType::parse(&value)
                        .ok_or_else(|| MountError::UnsupportedType(value.clone()))?;
                }
                "from" => m.from = Some(value),
                "source" | "src" => m.source = Some(value),
                "target" | "dst" | "destination" => m.target = Some(value),
                "readonly" | "ro" => {
                    m.readonly = parse_bool(&key, &value)?;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = !parse_bool(&key, &value)?;
                    ro_auto = false;
                }
                "required" => m.required = parse_bool(&key, &value)?,
                "id" => m.id = Some(value),
                "sharing" => {
                    let v = value.to_ascii_lowercase();
                    if !matches!(v.as_str(), "shared" | "private" | "locked") {
                        return Err(MountError::UnsupportedSharing(value));
                    }
                    m.sharing = Some(v);
                }
                "mode" => {
                    m.mode = Some(valid("mode", &value, u32::from_str_radix(&value, 8).ok())?)
                }
                "uid" => m.uid = Some(valid("uid", &value, value.parse().ok())?),
                "gid" => m.gid = Some(valid("gid", &value, value.parse().ok())?),
                "env" => m.env = Some(value),
                "size" => m.size = Some(valid("size", &value, parse_size(&value))?),
                _ => return Err(unexpected_key(key, field)),
            }
        }
        m.validate()?;
        if ro_auto {
            m.readonly = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
        }
        Ok(m)
    }

    fn validate(&self) -> Result<(), MountError> {
        let kind = self.kind;
        let file_info_allowed =
            matches!(kind, MountType::Secret | MountType::Ssh | MountType::Cache);
        for (key, set) in [
            ("mode", self.mode.is_some()),
            ("uid", self.uid.is_some()),
            ("gid", self.gid.is_some()),
        ] {
            if set && !file_info_allowed {
                return Err(MountError::FileInfoNotAllowed { key, kind });
            }
        }
        let not_for = |key| Err(MountError::KeyNotForType { key, kind });
        if self.required && !matches!(kind, MountType::Secret | MountType::Ssh) {
            return not_for("required");
        }
        if self.sharing.is_some() && kind != MountType::Cache {
            return Err(MountError::SharingNotForType { kind });
        }
        if self.env.is_some() && kind != MountType::Secret {
            return not_for("env");
        }
        if self.size.is_some() && kind != MountType::Tmpfs {
            return not_for("size");
        }
        if kind == MountType::Secret {
            if self.from.is_some() {
                return Err(MountError::SecretFrom);
            }
            if self.source.is_some() && self.id.is_some() {
                return Err(MountError::SecretSourceAndId);
            }
        }
        Ok(())
    }
}

/// `\$.` as BuildKit checks it: a `$` followed by anything.
fn has_variable(value: &str) -> bool {
    value.find('$').is_some_and(|i| i + 1 < value.len())
}

/// A size as BuildKit reads `size=` (go-units' RAMInBytes): a number with
/// an optional binary unit, `k`, `m`, `g`, `t`, `p`, any case, `b`/`ib` optional.
pub fn parse_size(s: &str) -> Option<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    (number >= 0.0).then(|| (number * (1u64 << shift) as f64) as u64)
}

/// Go's `strconv.ParseBool`, for the value of `key`.
fn parse_bool(key: &str, value: &str) -> Result<bool, MountError> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(MountError::NotBoolean {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

/// A number read from the value of `key`, or why not.
fn valid<T>(key: &'static str, value: &str, parsed: Option<T>) -> Result<T, MountError> {
    parsed.ok_or_else(|| MountError::InvalidValue {
        key,
        value: value.to_string(),
    })
}

fn unexpected_key(key: String, field: &str) -> MountError {
    MountError::UnexpectedKey {
        key,
        field: field.to_string(),
    }
}

/// One record of Go's `encoding/csv` (comma-separated, `"`-quoted fields
/// with `""` for a quote, no bare quotes in unquoted fields).
fn parse_csv_record(s: &str) -> Result<Vec<String>, CsvError> {
    let line = s.split(['\n', '\r']).next().unwrap_or("");
    if line.is_empty() {
        return Err(CsvError::Empty);
    }
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(CsvError::Quote),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => return Err(CsvError::Quote),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => {
                        fields.push(field);
                        break;
                    }
                    Some('"') => return Err(CsvError::BareQuote),
                    Some(c) => field.push(c),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_mount() {
        let m =
            RunMount::parse("type=cache,target=/root/.cache,sharing=locked,id=pip", None).unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert_eq!(m.target.as_deref(), Some("/root/.cache"));
        assert_eq!(m.sharing.as_deref(), Some("locked"));
        assert_eq!(m.id.as_deref(), Some("pip"));
        assert!(!m.readonly);
    }

    #[test]
    fn bind_from_a_stage_is_read_only_by_default() {
        let m = RunMount::parse("from=builder,source=/out,target=/in", None).unwrap();
        assert_eq!(m.kind, MountType::Bind);
        assert_eq!(m.from.as_deref(), Some("builder"));
        assert!(m.readonly);
        let m = RunMount::parse("type=bind,rw,target=/x", None).unwrap();
        assert!(!m.readonly);
    }

    #[test]
    fn secrets_and_ssh() {
        let m = RunMount::parse("type=secret,id=npmrc,target=/root/.npmrc,required", None).unwrap();
        assert!(m.required);
        assert_eq!(m.kind, MountType::Secret);
        assert!(RunMount::parse("type=ssh,mode=0600", None).unwrap().mode == Some(0o600));
        assert!(RunMount::parse("type=secret,from=x,id=y", None).is_err());
        assert!(RunMount::parse("type=secret,id=a,source=b", None).is_err());
    }

    #[test]
    fn invalid_mounts() {
        for (spec, msg) in [
            ("type=nfs", "unsupported mount type \"nfs\""),
            ("target", "invalid field 'target' must be a key=value pair"),
            ("type=bind,foo=bar", "unexpected key 'foo' in 'foo=bar'"),
            (
                "type=bind,uid=1",
                "uid not allowed for \"bind\" type mounts",
            ),
            (
                "type=tmpfs,sharing=shared",
                "invalid cache sharing set for tmpfs mount",
            ),
            (
                "type=cache,sharing=weird",
                "unsupported sharing value \"weird\"",
            ),
            ("type=cache,mode=9", "invalid value 9 for mode"),
            (
                "type=bind,required",
                "unexpected key 'required' for mount type 'bind'",
            ),
            ("from=$STAGE", "'from' doesn't support variable expansion"),
            ("a=\"b", "failed to parse csv mounts"),
            ("", "failed to parse csv mounts: EOF"),
        ] {
            let err = RunMount::parse(spec, None).unwrap_err().to_string();
            assert!(err.contains(msg), "{spec}: {err}");
        }
    }

    #[test]
    fn variables_wait_for_expansion() {
        let m = RunMount::parse("type=cache,target=$HOME/.cache,uid=$UID", None).unwrap();
        assert_eq!(m.target, None);
        let expand = |v: &str| -> Result<String, ExpandError> {
            Ok(v.replace("$HOME", "/root").replace("$UID", "1000"))
        };
        let m = RunMount::parse("type=cache,target=$HOME/.cache,uid=$UID", Some(&expand)).unwrap();
        assert_eq!(m.target.as_deref(), Some("/root/.cache"));
        assert_eq!(m.uid, Some(1000));
    }

    #[test]
    fn secret_env_and_tmpfs_size() {
        let m = RunMount::parse("type=secret,id=tok,env=TOKEN", None).unwrap();
        assert_eq!(m.env.as_deref(), Some("TOKEN"));
        let m = RunMount::parse("type=tmpfs,target=/t,size=64m", None).unwrap();
        assert_eq!(m.size, Some(64 << 20));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1.5KiB"), Some(1536));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
        for (spec, msg) in [
            ("type=cache,target=/c,env=X", "unexpected key 'env'"),
            ("type=bind,target=/c,size=1", "unexpected key 'size'"),
            ("type=tmpfs,target=/c,size=x", "invalid value x for size"),
        ] {
            let err = RunMount::parse(spec, None).unwrap_err().to_string();
            assert!(err.contains(msg), "{spec}: {err}");
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(
            parse_csv_record("a,\"b,c\",\"d\"\"e\"").unwrap(),
            ["a", "b,c", "d\"e"]
        );
        assert_eq!(parse_csv_record("a,").unwrap(), ["a", ""]);
        assert!(parse_csv_record("a\"b").is_err());
        assert!(parse_csv_record("\"a\"b").is_err());
    }
}
