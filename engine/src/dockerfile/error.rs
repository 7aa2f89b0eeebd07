//! Errors and warnings produced by the Dockerfile frontend.

/// A Dockerfile problem the build cannot go past, located by its 1-based
/// line (0 when it has none, e.g. an empty Dockerfile or an unknown
/// `--target`). The CLI prints it as `Dockerfile:LINE: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct FrontendError {
    pub line: usize,
    pub message: String,
}

impl FrontendError {
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        FrontendError {
            line,
            message: message.into(),
        }
    }
}

/// Locates a frontend module's error at a Dockerfile line, as the
/// frontend's outward [`FrontendError`].
pub(crate) trait AtLine<T> {
    fn at_line(self, line: usize) -> Result<T, FrontendError>;
}

impl<T, E: std::error::Error> AtLine<T> for Result<T, E> {
    fn at_line(self, line: usize) -> Result<T, FrontendError> {
        self.map_err(|e| FrontendError::new(line, e.to_string()))
    }
}

/// Something worth telling the user that does not stop the build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warning {
    pub line: usize,
    pub message: String,
    /// The BuildKit lint rule this warning comes from, if any: `# check=`
    /// can skip it or turn it into an error.
    #[serde(skip)]
    pub rule: Option<&'static str>,
}

impl Warning {
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        Warning {
            line,
            message: message.into(),
            rule: None,
        }
    }

    /// A warning from a BuildKit lint rule; the message is prefixed with the
    /// rule's name as BuildKit prints it.
    pub fn lint(line: usize, rule: &'static str, message: impl AsRef<str>) -> Self {
        Warning {
            line,
            message: format!("{rule}: {}", message.as_ref()),
            rule: Some(rule),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_the_line() {
        let e = FrontendError::new(3, "unknown instruction: FOO");
        assert_eq!(e.to_string(), "line 3: unknown instruction: FOO");
    }

    #[test]
    fn expand_error_is_located_by_the_caller() {
        let e = super::super::expand_word("${X:?}", '\\', &|_| None).unwrap_err();
        assert_eq!(
            e.at(7),
            FrontendError::new(
                7,
                "failed to process \"${X:?}\": X: is not allowed to be unset"
            )
        );
    }

    #[test]
    fn lint_warnings_name_their_rule() {
        let w = Warning::lint(2, "StageNameCasing", "Stage name 'A' should be lowercase");
        assert_eq!(
            w.message,
            "StageNameCasing: Stage name 'A' should be lowercase"
        );
        assert_eq!(w.rule, Some("StageNameCasing"));
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(json, serde_json::json!({"line": 2, "message": w.message}));
    }
}
