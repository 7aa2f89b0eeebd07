//! The JSON ("exec") form of arguments, decided exactly as BuildKit does:
//! arguments that start with `[` and parse as a JSON array of strings are
//! the JSON form; a JSON array holding anything but strings is an error;
//! anything else (including a malformed or unterminated array) silently
//! falls back to the shell form.

use super::words::{is_space, split_whitespace_delimited};

/// A JSON array holding something other than strings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("when using JSON array syntax, arrays must be comprised of strings only")]
pub(crate) struct NotStringArray;

enum Json {
    Array(Vec<String>),
    Invalid,
    NonStrings,
}

fn parse_json_array(rest: &str) -> Json {
    let text = rest.trim_start_matches(is_space);
    if !text.starts_with('[') {
        return Json::Invalid;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(text) {
        Ok(values) => values
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map_or(Json::NonStrings, Json::Array),
        Err(_) => Json::Invalid,
    }
}

/// Arguments of RUN, CMD, ENTRYPOINT, SHELL and HEALTHCHECK CMD: a JSON
/// array, or the whole text as one shell-form string. Returns the
/// arguments and whether they were JSON.
pub(crate) fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), NotStringArray> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json_array(rest) {
        Json::Array(v) => Ok((v, true)),
        Json::NonStrings => Err(NotStringArray),
        Json::Invalid => Ok((vec![rest.to_string()], false)),
    }
}

/// Arguments of COPY, ADD and VOLUME: a JSON array, or whitespace-split
/// words.
pub(crate) fn maybe_json_to_list(rest: &str) -> Result<(Vec<String>, bool), NotStringArray> {
    match parse_json_array(rest) {
        Json::Array(v) => Ok((v, true)),
        Json::NonStrings => Err(NotStringArray),
        Json::Invalid => Ok((split_whitespace_delimited(rest), false)),
    }
}

/// Whether shell-form arguments look like a failed attempt at the JSON
/// form, which BuildKit silently runs through the shell.
pub(crate) fn looks_like_broken_json(rest: &str) -> bool {
    rest.trim_start_matches(is_space).starts_with('[')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_arrays_of_strings() {
        let (args, json) = maybe_json(r#"["/bin/sh", "-c", "echo \"hi\" \u00e9"]"#).unwrap();
        assert!(json);
        assert_eq!(args, ["/bin/sh", "-c", "echo \"hi\" é"]);
        let (args, json) = maybe_json("  [ ]  ").unwrap();
        assert!(json);
        assert!(args.is_empty());
    }

    #[test]
    fn invalid_json_falls_back_to_shell_form() {
        for text in [
            r#"["a", "b""#,
            "[a, b]",
            r#"["a"] trailing"#,
            "[",
            "['single']",
        ] {
            let (args, json) = maybe_json(text).unwrap();
            assert!(!json, "{text}");
            assert_eq!(args, [text]);
        }
        let (args, json) = maybe_json_to_list(r#"["a" "b"]"#).unwrap();
        assert!(!json);
        assert_eq!(args, [r#"["a""#, r#""b"]"#]);
    }

    #[test]
    fn non_string_elements_are_an_error() {
        for text in [
            "[1]",
            r#"["a", null]"#,
            r#"[["a"]]"#,
            r#"[{"a":1}]"#,
            "[true]",
        ] {
            assert_eq!(
                maybe_json(text).unwrap_err().to_string(),
                "when using JSON array syntax, arrays must be comprised of strings only",
                "{text}"
            );
            assert!(maybe_json_to_list(text).is_err(), "{text}");
        }
    }

    #[test]
    fn empty_and_plain_text() {
        assert_eq!(maybe_json("").unwrap(), (vec![], false));
        assert_eq!(maybe_json_to_list("").unwrap(), (vec![], false));
        assert_eq!(
            maybe_json("echo hi").unwrap(),
            (vec!["echo hi".to_string()], false)
        );
        assert_eq!(
            maybe_json_to_list("a  b").unwrap(),
            (vec!["a".to_string(), "b".to_string()], false)
        );
    }

    #[test]
    fn broken_json_is_noticed() {
        assert!(looks_like_broken_json(" [\"a\""));
        assert!(!looks_like_broken_json("echo ["));
    }
}
