//! `trellis generate --json-schema FILE | --regex R | --choice A,B | --grammar FILE` on the
//! default model (issue 15), and bad constraints as one error line.

mod common;

use common::{SMALL, default_model, one_error_line, run, trellis};

fn generate(constraint: &[&str], prompt: &str, max_tokens: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.jsonl");
    let (code, _, err) = run(trellis(&[])
        .args(["generate", "--model"])
        .arg(default_model())
        .args(SMALL)
        .args(["--max-tokens", max_tokens, "--prompt", prompt, "--output"])
        .arg(&out)
        .args(constraint));
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&out).expect("output written");
    serde_json::from_str(text.lines().next().expect("one line")).expect("JSON line")
}

fn text_and_finish(v: &serde_json::Value) -> (String, String) {
    let o = &v["outputs"][0];
    (
        o["text"].as_str().unwrap_or_default().to_string(),
        o["finish_reason"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn generate_follows_json_schema_regex_choice_and_grammar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = dir.path().join("city.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0, "maximum": 100000000}},
            "required": ["city", "population"], "additionalProperties": false}"#,
    )
    .expect("write schema");
    let schema = schema.display().to_string();
    let v = generate(
        &["--json-schema", &schema],
        "The largest city in France, as JSON:",
        "80",
    );
    let (text, finish) = text_and_finish(&v);
    assert_eq!(finish, "stop", "{text}");
    let city: serde_json::Value = serde_json::from_str(&text).expect("the output is JSON");
    assert!(
        city["city"].is_string() && city["population"].is_u64(),
        "{city}"
    );

    let (text, finish) = text_and_finish(&generate(
        &["--regex", " 20[0-9]{2}-[01][0-9]-[0-3][0-9]"],
        "Today's date:",
        "20",
    ));
    assert_eq!(finish, "stop");
    let re = regex::Regex::new(r"^ 20[0-9]{2}-[01][0-9]-[0-3][0-9]$").expect("regex");
    assert!(re.is_match(&text), "{text:?}");

    let (text, _) = text_and_finish(&generate(
        &["--choice", " yes, no"],
        "Is water wet? Answer:",
        "5",
    ));
    assert!([" yes", " no"].contains(&text.as_str()), "{text:?}");

    let grammar = dir.path().join("g.lark");
    std::fs::write(&grammar, "start: \" \" WORD \"!\"\nWORD: /[A-Z][a-z]+/\n").expect("write");
    let (text, _) = text_and_finish(&generate(
        &["--grammar", &grammar.display().to_string()],
        "Shout a greeting:",
        "10",
    ));
    let re = regex::Regex::new(r"^ [A-Z][a-z]+!$").expect("regex");
    assert!(re.is_match(&text), "{text:?}");
}

#[test]
fn bad_constraints_are_one_error_line() {
    let base = |extra: &[&str]| {
        let mut c = trellis(&[]);
        c.args(["generate", "--model"])
            .arg(default_model())
            .args(SMALL)
            .args(["--prompt", "hi"])
            .args(extra);
        run(&mut c)
    };
    let (code, _, err) = base(&["--regex", "[a-"]);
    one_error_line(
        code,
        &err,
        &["structured_outputs.regex", "unclosed character class"],
    );
    let (code, _, err) = base(&["--json-schema", "/nonexistent/schema.json"]);
    one_error_line(code, &err, &["/nonexistent/schema.json"]);
    let (code, _, err) = base(&["--regex", "a", "--choice", "b"]);
    assert!(code != 0 && err.contains("cannot be used with"), "{err}");
}
