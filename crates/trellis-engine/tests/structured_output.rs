//! Structured outputs (issue 15) on the real default model, offline: JSON schema, regex,
//! choice and Lark grammar constraints; EOS only where the grammar accepts; `length` when
//! `max_tokens` comes first; batch invariance; invalid constraints refused at add time.

mod common;

use common::model_path;
use serde_json::{Value, json};
use trellis_engine::{
    ChatMessage, ChatTemplate, ChatTemplateOptions, EngineConfig, EngineError, FinishReason, LLM,
    SamplingParams, StructuredOutputsParams,
};

fn llm() -> LLM {
    let mut c = EngineConfig::new(model_path());
    c.max_model_len = Some(1024);
    c.num_kv_blocks = Some(256);
    LLM::new(c).expect("engine loads the default model")
}

/// A user message in the model's chat template, ready for the assistant's answer.
fn chat(llm: &mut LLM, user: &str) -> String {
    let tok = llm.engine().tokenizer().clone();
    let t = ChatTemplate::for_tokenizer(&tok, None).expect("the model has a template");
    t.render(
        &[ChatMessage::new("user", user)],
        &ChatTemplateOptions {
            add_generation_prompt: true,
            ..Default::default()
        },
    )
    .expect("renders")
}

fn constrained(so: StructuredOutputsParams, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        structured_outputs: Some(so.into()),
        ..SamplingParams::greedy(max_tokens)
    }
}

#[test]
fn json_schema_regex_choice_and_grammar_constrain_greedy_output() {
    let mut llm = llm();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    });
    let cases: Vec<(&str, SamplingParams)> = vec![
        (
            "Describe a person as JSON with name, age and city.",
            constrained(StructuredOutputsParams::json_schema(schema.clone()), 80),
        ),
        (
            "Give me a US phone number.",
            constrained(
                StructuredOutputsParams::regex(r"[0-9]{3}-[0-9]{3}-[0-9]{4}"),
                20,
            ),
        ),
        (
            "Is the sky blue? Answer yes or no.",
            constrained(
                StructuredOutputsParams::choice(vec!["yes".into(), "no".into()]),
                10,
            ),
        ),
        (
            "What is 2 + 3?",
            constrained(
                StructuredOutputsParams::grammar(
                    "start: \"The answer is \" NUMBER \".\"\nNUMBER: /[0-9]+/",
                ),
                20,
            ),
        ),
        (
            "Return a JSON object with the key \"color\" and the value \"red\".",
            constrained(
                StructuredOutputsParams {
                    json_object: Some(true),
                    ..Default::default()
                },
                120,
            ),
        ),
    ];
    let prompts: Vec<String> = cases.iter().map(|(p, _)| chat(&mut llm, p)).collect();
    let params: Vec<SamplingParams> = cases.iter().map(|(_, s)| s.clone()).collect();
    let outs = llm
        .generate_each(&prompts, &params, |_, _| {})
        .expect("generates");
    let texts: Vec<&str> = outs.iter().map(|o| o.outputs[0].text.as_str()).collect();
    eprintln!("{texts:#?}");
    for o in &outs {
        assert_eq!(
            o.outputs[0].finish_reason,
            Some(FinishReason::Stop),
            "{o:?}"
        );
    }
    let person: Value = serde_json::from_str(texts[0]).expect("JSON output parses");
    assert!(
        person["name"].is_string() && person["age"].is_u64(),
        "{person}"
    );
    assert!(["Paris", "London", "Tokyo"].contains(&person["city"].as_str().unwrap_or("")));
    let phone = regex::Regex::new(r"^[0-9]{3}-[0-9]{3}-[0-9]{4}$").unwrap();
    assert!(phone.is_match(texts[1]), "{:?}", texts[1]);
    assert!(["yes", "no"].contains(&texts[2]), "{:?}", texts[2]);
    let answer = regex::Regex::new(r"^The answer is [0-9]+\.$").unwrap();
    assert!(answer.is_match(texts[3]), "{:?}", texts[3]);
    let cat: Value = serde_json::from_str(texts[4]).expect("json_object output parses");
    assert!(cat.is_object(), "{cat}");
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "skills": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}
        },
        "required": ["name", "skills"]
    })
}

#[test]
fn max_tokens_before_the_grammar_completes_finishes_with_length() {
    let mut llm = llm();
    let prompt = chat(&mut llm, "Describe a programmer as JSON.");
    let out = llm
        .generate(
            &[prompt],
            &constrained(StructuredOutputsParams::json_schema(person_schema()), 5),
        )
        .expect("generates")
        .remove(0);
    let c = &out.outputs[0];
    assert_eq!(c.finish_reason, Some(FinishReason::Length));
    assert_eq!(c.token_ids.len(), 5);
    assert!(c.text.starts_with('{'), "{:?}", c.text);
    assert!(serde_json::from_str::<Value>(&c.text).is_err());
}

/// The same constrained requests alone and in a busy batch (unconstrained prompts of many
/// lengths, chunked prefill, preemption) give the same greedy tokens.
#[test]
fn constrained_greedy_output_does_not_depend_on_the_batch() {
    let mut alone = llm();
    let requests: Vec<(String, SamplingParams)> = vec![
        (
            chat(&mut alone, "Describe a programmer as JSON."),
            constrained(StructuredOutputsParams::json_schema(person_schema()), 60),
        ),
        (
            chat(&mut alone, "Pick a colour."),
            constrained(
                StructuredOutputsParams::choice(vec!["red".into(), "green".into(), "blue".into()]),
                8,
            ),
        ),
        (
            chat(&mut alone, "Write a date."),
            constrained(
                StructuredOutputsParams::regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"),
                16,
            ),
        ),
    ];
    let expected: Vec<Vec<u32>> = requests
        .iter()
        .map(|(p, s)| {
            alone.generate(&[p.as_str()], s).expect("generates")[0].outputs[0]
                .token_ids
                .clone()
        })
        .collect();
    let mut c = EngineConfig::new(model_path());
    c.max_model_len = Some(1024);
    c.num_kv_blocks = Some(16);
    c.max_num_batched_tokens = Some(48);
    let mut busy = LLM::new(c).expect("loads");
    let filler = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let mut prompts = Vec::new();
    let mut params = Vec::new();
    for i in 0..6 {
        prompts.push(format!(
            "Once upon a time {}",
            "there was a story ".repeat(i * 3)
        ));
        params.push(filler.clone());
        if let Some((p, s)) = requests.get(i) {
            prompts.push(p.clone());
            params.push(s.clone());
        }
    }
    let outs = busy
        .generate_each(&prompts, &params, |_, _| {})
        .expect("generates");
    let got: Vec<&Vec<u32>> = outs
        .iter()
        .zip(&params)
        .filter(|(_, s)| s.structured_outputs.is_some())
        .map(|(o, _)| &o.outputs[0].token_ids)
        .collect();
    for (i, (g, want)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(*g, want, "constrained request {i} differs in the batch");
    }
    assert!(busy.engine().core().stats().num_preemptions > 0);
    assert_eq!(busy.engine().core().runner().num_requests(), 0);
}

/// `n > 1` with seeded sampling, logprobs and a stop string: every sample obeys the grammar,
/// logprobs are of the constrained distribution (forbidden tokens at vLLM's -9999 floor).
#[test]
fn sampling_n_logprobs_and_stop_strings_respect_the_grammar() {
    let mut llm = llm();
    let prompt = chat(&mut llm, "Name a fruit.");
    let choices = vec!["apple".to_string(), "banana".into(), "cherry pie".into()];
    let p = SamplingParams {
        n: 4,
        temperature: 1.5,
        seed: Some(7),
        logprobs: Some(5),
        max_tokens: Some(10),
        structured_outputs: Some(StructuredOutputsParams::choice(choices.clone()).into()),
        ..Default::default()
    };
    let out = llm
        .generate(&[prompt.as_str()], &p)
        .expect("generates")
        .remove(0);
    assert_eq!(out.outputs.len(), 4);
    for c in &out.outputs {
        assert!(choices.contains(&c.text), "{:?}", c.text);
        assert_eq!(c.finish_reason, Some(FinishReason::Stop));
        let lps = c.logprobs.as_ref().expect("logprobs");
        assert!(
            lps.iter()
                .all(|l| l.logprob.is_finite() && l.logprob <= 0.0)
        );
    }
    let again = llm
        .generate(&[prompt.as_str()], &p)
        .expect("generates")
        .remove(0);
    let texts = |o: &trellis_engine::RequestOutput| -> Vec<String> {
        o.outputs.iter().map(|c| c.text.clone()).collect()
    };
    assert_eq!(texts(&out), texts(&again), "same seed, same samples");

    // One character of two: the top 5 holds the two allowed tokens, summing to 1, and three
    // forbidden ones at the floor.
    let ab = SamplingParams {
        logprobs: Some(5),
        ..constrained(StructuredOutputsParams::regex("[ab]"), 4)
    };
    let out = llm
        .generate(&[prompt.as_str()], &ab)
        .expect("generates")
        .remove(0);
    let first = &out.outputs[0].logprobs.as_ref().expect("logprobs")[0];
    let allowed: Vec<f32> = first
        .top
        .iter()
        .map(|t| t.1)
        .filter(|&l| l > -9999.0)
        .collect();
    assert_eq!(allowed.len(), 2, "{first:?}");
    assert!(
        (allowed.iter().map(|l| l.exp()).sum::<f32>() - 1.0).abs() < 1e-4,
        "{first:?}"
    );
    assert_eq!(first.top.iter().filter(|t| t.1 == -9999.0).count(), 3);

    let stopped = SamplingParams {
        stop: vec![" pie".into()],
        ..SamplingParams::greedy(10)
    };
    let so = StructuredOutputsParams::choice(vec!["cherry pie".into()]);
    let out = llm
        .generate(&[prompt.as_str()], &constrained(so, 10))
        .expect("generates")
        .remove(0);
    assert_eq!(out.outputs[0].text, "cherry pie");
    let out = llm
        .generate(
            &[prompt.as_str()],
            &SamplingParams {
                structured_outputs: Some(
                    StructuredOutputsParams::choice(vec!["cherry pie".into()]).into(),
                ),
                ..stopped
            },
        )
        .expect("generates")
        .remove(0);
    assert_eq!(out.outputs[0].text, "cherry");
}

#[test]
fn invalid_constraints_are_refused_when_added_and_the_engine_keeps_serving() {
    let mut llm = llm();
    let bad = [
        (
            StructuredOutputsParams::json_schema(
                json!({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            ),
            "json",
        ),
        (
            StructuredOutputsParams::json_schema(
                json!({"type": "string", "format": "nonsense-format", "not": {"type": "null"}}),
            ),
            "json",
        ),
        (StructuredOutputsParams::regex("[a-"), "regex"),
        (StructuredOutputsParams::grammar("start: foo("), "grammar"),
        (
            StructuredOutputsParams {
                regex: Some("a".into()),
                grammar: Some("start: \"a\"".into()),
                ..Default::default()
            },
            "multiple",
        ),
    ];
    for (so, what) in bad {
        let err = llm
            .generate(&["Hello"], &constrained(so.clone(), 4))
            .expect_err("refused");
        match err {
            EngineError::InvalidParams(e) => {
                assert_eq!(e.param, "structured_outputs");
                eprintln!("{}", e.message);
                assert!(e.message.contains(what), "{what}: {}", e.message);
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(llm.engine().core().runner().num_requests(), 0);
    assert!(!llm.engine().has_unfinished_requests());
    let ok = llm
        .generate(
            &["Hello"],
            &constrained(StructuredOutputsParams::choice(vec!["hi".into()]), 4),
        )
        .expect("still serves");
    assert_eq!(ok[0].outputs[0].text, "hi");
}
