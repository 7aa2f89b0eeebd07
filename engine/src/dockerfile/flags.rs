//! The `--name[=value]` flags of one instruction, checked against what it
//! accepts.

use super::instruction::InstructionError;
use super::suggest::suggest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlagKind {
    Bool,
    Str,
    Strs,
}

#[derive(Debug, Clone)]
pub(super) enum Value {
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
}

/// The flags given to one instruction, checked against what it accepts
/// (BuildKit's `BFlags`).
pub(super) struct Flags(Vec<(&'static str, Value)>);

impl Flags {
    pub(super) fn parse(
        keyword: &str,
        raw: &[String],
        specs: &[(&'static str, FlagKind)],
    ) -> Result<Flags, InstructionError> {
        let mut out: Vec<(&'static str, Value)> = Vec::new();
        for arg in raw {
            let body = arg.strip_prefix("--").unwrap_or(arg);
            if body.is_empty() {
                break;
            }
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(spec, kind)) = specs.iter().find(|(n, _)| *n == name) else {
                return Err(unknown_flag(keyword, name, specs));
            };
            let seen = out.iter().position(|(n, _)| *n == spec);
            if seen.is_some() && kind != FlagKind::Strs {
                return Err(InstructionError::DuplicateFlag(name.to_string()));
            }
            let missing = || InstructionError::MissingFlagValue(name.to_string());
            match kind {
                FlagKind::Bool => {
                    let b = match value {
                        None => true,
                        Some("") => return Err(missing()),
                        Some(v) => match v.to_ascii_lowercase().as_str() {
                            "true" => true,
                            "false" => false,
                            _ => {
                                return Err(InstructionError::NotBoolean {
                                    name: name.to_string(),
                                    value: v.to_string(),
                                })
                            }
                        },
                    };
                    out.push((spec, Value::Bool(b)));
                }
                FlagKind::Str => {
                    out.push((spec, Value::Str(value.ok_or_else(missing)?.to_string())))
                }
                FlagKind::Strs => {
                    let v = value.ok_or_else(missing)?.to_string();
                    match seen {
                        Some(i) => {
                            if let Value::Strs(list) = &mut out[i].1 {
                                list.push(v);
                            }
                        }
                        None => out.push((spec, Value::Strs(vec![v]))),
                    }
                }
            }
        }
        Ok(Flags(out))
    }

    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub(super) fn bool(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }

    pub(super) fn opt_bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// A string flag; an empty value counts as not given, as in BuildKit.
    pub(super) fn string(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(Value::Str(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        }
    }

    pub(super) fn strings(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(Value::Strs(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}

fn unknown_flag(keyword: &str, name: &str, specs: &[(&'static str, FlagKind)]) -> InstructionError {
    let (keyword, name) = (keyword.to_string(), name.to_string());
    if specs.is_empty() {
        return InstructionError::NoFlags { keyword, name };
    }
    let accepted: Vec<&'static str> = specs.iter().map(|(n, _)| *n).collect();
    match suggest(&name, &accepted) {
        Some(suggestion) => InstructionError::MisspelledFlag { name, suggestion },
        None => InstructionError::UnknownFlag {
            keyword,
            name,
            accepted,
        },
    }
}
