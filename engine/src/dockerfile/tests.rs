//! Cross-module tests: the fixture Dockerfiles and property tests.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_str!(concat!(
                "../../../fixtures/dockerfiles/",
                $name,
                ".Dockerfile"
            )),
            include_str!(concat!(
                "../../../fixtures/dockerfiles/",
                $name,
                ".plan.json"
            )),
        )
    };
}

/// `(name, Dockerfile, expected plan)`, from `fixtures/dockerfiles/`: the
/// plan for no build args and no target, as `kiln plan --format json`
/// prints it.
const FIXTURES: &[(&str, &str, &str)] = &[
    fixture!("args-heavy"),
    fixture!("continuations"),
    fixture!("crlf-unicode"),
    fixture!("every-instruction"),
    fixture!("go-multistage"),
    fixture!("heredocs"),
    fixture!("node-app"),
    fixture!("python-venv"),
    fixture!("rust-cargo-chef"),
    fixture!("windows-escape"),
];

fn plan_json(src: &str) -> Result<String, FrontendError> {
    let df = parse(src)?;
    let graph = StageGraph::resolve(&df, &BTreeMap::new(), None, &Platform::linux_amd64())?;
    Ok(serde_json::to_string_pretty(&stage_report_json(&graph)).unwrap() + "\n")
}

#[test]
fn fixtures_match_their_plans() {
    assert_eq!(FIXTURES.len(), 10);
    for (name, dockerfile, expected) in FIXTURES {
        let actual = plan_json(dockerfile).unwrap_or_else(|e| panic!("{name}: {e}"));
        let parsed: serde_json::Value = serde_json::from_str(expected).unwrap();
        let actual_value: serde_json::Value = serde_json::from_str(&actual).unwrap();
        assert_eq!(actual_value, parsed, "{name}: plan differs");
        assert_eq!(&actual, expected, "{name}: formatting differs");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parser_never_panics_on_strings(src in "\\PC*") {
        if let Ok(df) = parse(&src) {
            let _ = StageGraph::resolve(&df, &BTreeMap::new(), None, &Platform::linux_amd64());
        }
    }

    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let src = String::from_utf8_lossy(&bytes);
        if let Ok(df) = parse(&src) {
            let _ = StageGraph::resolve(&df, &BTreeMap::new(), Some("x"), &Platform::linux_amd64());
        }
    }

    #[test]
    fn parser_never_panics_on_dockerfile_like_text(
        lines in proptest::collection::vec(
            prop_oneof![
                Just("FROM alpine AS a".to_string()),
                Just("FROM a".to_string()),
                Just("ARG X=1".to_string()),
                Just("# escape=`".to_string()),
                Just("RUN <<EOF".to_string()),
                Just("EOF".to_string()),
                Just("COPY --from=a <<-X /d".to_string()),
                Just("\\".to_string()),
                Just("`".to_string()),
                Just("".to_string()),
                "(RUN|ENV|LABEL|COPY|ADD|ONBUILD|HEALTHCHECK|ARG|FROM|SHELL|EXPOSE) [ -~]{0,30}",
                "[\\[\\]\"'$\\\\`{}=:# a-z-]{0,20}",
            ],
            0..24,
        )
    ) {
        let src = lines.join("\n");
        if let Ok(df) = parse(&src) {
            if let Ok(graph) = StageGraph::resolve(&df, &BTreeMap::new(), None, &Platform::linux_amd64()) {
                let _ = stage_report_json(&graph);
                let _ = stage_report_text(&graph, &df);
                for raw in graph.stages.iter().flat_map(|s| &s.instructions) {
                    if let Ok(i) = Instruction::from_raw(raw, df.escape) {
                        let _ = i.expanded(df.escape, &|_| Some("v a l".into()));
                    }
                }
            }
        }
    }

    #[test]
    fn expander_never_panics(word in "\\PC*", escape in prop_oneof![Just('\\'), Just('`')]) {
        let lookup = |name: &str| name.len().is_multiple_of(2).then(|| format!("{name} *?/#%"));
        let _ = expand_word(&word, escape, &lookup);
        let _ = expand_words(&word, escape, &lookup);
        let _ = expand_heredoc(&word, &lookup);
    }

    #[test]
    fn expander_never_panics_on_shell_like_text(word in "[${}:#%/?*+\\-\"'\\\\` a-zA-Z0-9_.\n]{0,40}") {
        let lookup = |name: &str| (!name.starts_with('Z')).then(|| format!("v{name}/x.y.z"));
        let _ = expand_word(&word, '\\', &lookup);
        let _ = expand_words(&word, '`', &lookup);
    }

    #[test]
    fn mount_parser_never_panics(spec in "[a-z=,\"$/ ]{0,40}") {
        let _ = RunMount::parse(&spec, None);
    }

    #[test]
    fn words_without_specials_expand_to_themselves(word in "[a-zA-Z0-9_./:-]{0,30}") {
        prop_assert_eq!(expand_word(&word, '\\', &|_| None).unwrap(), word);
    }
}

/// The message a Dockerfile fails with, through parsing and stage
/// resolution (where FROM is expanded).
fn frontend_error(src: &str) -> FrontendError {
    let df = match parse(src) {
        Ok(df) => df,
        Err(e) => return e,
    };
    StageGraph::resolve(&df, &BTreeMap::new(), None, &Platform::linux_amd64())
        .expect_err("the Dockerfile should fail")
}

#[test]
fn errors_quote_an_excerpt_of_huge_input_and_keep_their_line() {
    let deep = "${a:-".repeat(10_000) + "x" + &"}".repeat(10_000);
    let e = frontend_error(&format!("FROM {deep}\n"));
    assert_eq!(e.line, 1);
    let expected = format!(
        "failed to process \"{}\"…: syntax error: substitutions nested too deeply",
        &deep[..200]
    );
    assert_eq!(e.message, expected);

    let long = "X".repeat(1_000_000);
    let cases = [
        (format!("FROM a\n{long} b\n"), 2, "unknown instruction: XXX"),
        (
            format!("FROM a\nRUN --network={long} true\n"),
            2,
            "unsupported network mode \"XXX",
        ),
        (
            format!("FROM a\nRUN --{long} true\n"),
            2,
            "unknown flag: --XXX",
        ),
        (
            format!("FROM a\nHEALTHCHECK --interval={long} CMD true\n"),
            2,
            "time: invalid duration \"XXX",
        ),
        (
            format!("FROM a\nENV a=b {long}\n"),
            2,
            "can't find = in \"XXX",
        ),
        (
            format!("FROM a AS 1{long}\n"),
            1,
            "invalid name for build stage",
        ),
        (format!("ARG A\nFROM ${{A:?{long}}}\n"), 2, "\"…: A: XXX"),
        (
            format!("FROM a\nRUN --mount=type={long} true\n"),
            2,
            "unsupported mount type \"XXX",
        ),
    ];
    for (src, line, start) in cases {
        let e = frontend_error(&src);
        assert_eq!(e.line, line, "{}", e.message);
        assert!(e.message.contains(start), "{}", e.message);
        assert!(
            e.message.chars().count() < 500 && e.message.contains('…'),
            "not cut: {}…",
            e.message.chars().take(600).collect::<String>()
        );
    }
}

#[test]
fn a_nul_byte_is_refused_with_its_line_and_escaped() {
    let e = parse("FROM alpine\nRUN echo a\0b\n").unwrap_err();
    assert_eq!(
        e,
        FrontendError::new(2, r#"NUL byte at column 11: "RUN echo a\0b""#)
    );
    let e = parse("\0\0\0\nFROM alpine\n").unwrap_err();
    assert_eq!(
        e,
        FrontendError::new(1, r#"NUL byte at column 1: "\0\0\0""#)
    );
    // In a heredoc body or a comment as much as in an instruction.
    let e = parse("FROM a\nRUN <<EOF\nx\0\nEOF\n").unwrap_err();
    assert_eq!(e.line, 3);
    let e = parse("FROM a\r\n# \0\r\n").unwrap_err();
    assert_eq!(
        e,
        FrontendError::new(2, r##"NUL byte at column 3: "# \0""##)
    );
    // A base image's ONBUILD trigger is refused the same way.
    let e = parse_onbuild_trigger("RUN a\0", 4).unwrap_err();
    assert_eq!(e.line, 4);
    assert!(
        e.message.contains(r#"NUL byte at column 6: "RUN a\0""#),
        "{}",
        e.message
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_nul_is_refused_at_its_line_and_never_printed_raw(
        before in "[ -~\n]{0,60}",
        after in "[ -~\n\0]{0,60}",
    ) {
        let src = format!("{before}\0{after}");
        let e = parse(&src).unwrap_err();
        prop_assert_eq!(e.line, before.matches('\n').count() + 1);
        prop_assert!(e.message.starts_with("NUL byte at column "), "{}", e.message);
        prop_assert!(!e.message.contains('\0'));
    }
}

/// A line an attacker writes: an instruction, then one unit (NUL bytes
/// among its characters, or the start of a substitution) repeated up to
/// tens of thousands of times.
fn oversized_line() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("RUN "),
            Just("ENV A="),
            Just("COPY "),
            Just("LABEL a="),
            Just("ARG A="),
            Just("WORKDIR "),
            Just(""),
        ],
        prop_oneof![
            3 => "[ -~\0]{1,8}",
            1 => Just("${a:-".to_string()),
            1 => Just("$a".to_string()),
            1 => Just("\\\n".to_string()),
        ],
        1usize..40_000,
        "[ -~\0}]{0,16}",
    )
        .prop_map(|(head, unit, n, tail)| format!("{head}{}{tail}", unit.repeat(n)))
}

/// What an error says about such input: short, and no raw NUL.
fn assert_short(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(message.len() < 2048, "{} bytes", message.len());
    prop_assert!(!message.contains('\0'), "a raw NUL: {message:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nul_and_oversized_dockerfiles_fail_briefly(lines in proptest::collection::vec(oversized_line(), 1..4)) {
        let src = format!("FROM scratch\n{}\n", lines.join("\n"));
        match parse(&src) {
            Err(e) => assert_short(&e.message)?,
            Ok(df) => {
                prop_assert!(!src.contains('\0'), "a NUL byte was accepted");
                let args = BTreeMap::new();
                match StageGraph::resolve(&df, &args, None, &Platform::linux_amd64()) {
                    Err(e) => assert_short(&e.message)?,
                    Ok(graph) => {
                        for raw in graph.stages.iter().flat_map(|s| &s.instructions) {
                            match Instruction::from_raw(raw, df.escape) {
                                Err(e) => assert_short(&e.message)?,
                                Ok(i) => {
                                    if let Err(e) = i.expanded(df.escape, &|_| Some("v".into())) {
                                        assert_short(&e.to_string())?;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nul_and_oversized_words_expand_or_fail_briefly(
        unit in prop_oneof![
            3 => "[ -~\0]{1,6}",
            1 => Just("${a:-".to_string()),
            1 => Just("${unset:?".to_string()),
            1 => Just("$a".to_string()),
        ],
        n in 1usize..20_000,
        tail in "[ -~\0}]{0,8}",
        escape in prop_oneof![Just('\\'), Just('`')],
    ) {
        let word = format!("{}{tail}", unit.repeat(n));
        let lookup = |name: &str| (name != "unset").then(|| "v\0v".to_string());
        let results = [
            expand_word(&word, escape, &lookup).err(),
            expand_words(&word, escape, &lookup).err(),
            expand_heredoc(&word, &lookup).err(),
        ];
        for e in results.into_iter().flatten() {
            assert_short(&e.to_string())?;
        }
    }
}
