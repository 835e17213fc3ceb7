//! Embeddings of all-MiniLM-L6-v2 through `LLM::embed` against sentence-transformers
//! (`data/minilm-embeddings.json`, a copy of the shared reference), batching, and bad input.

mod common;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use trellis_engine::{EngineConfig, EngineError, LLM, PoolingParams, Prompt, builtin_registries};

#[derive(Debug, Deserialize)]
struct Sentence {
    name: String,
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct Reference {
    sentences: Vec<Sentence>,
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("data/minilm-embeddings.json"))
        .expect("tests/data/minilm-embeddings.json parses")
}

/// The embedding model directory; panics with instructions when it has not been fetched.
fn minilm_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2");
    assert!(
        p.join("model.safetensors").is_file(),
        "embedding model {} is missing: run scripts/fetch-embedding-model.sh from the repository root",
        p.display()
    );
    p
}

/// One MiniLM engine per test binary (loading it takes a moment).
fn minilm() -> std::sync::MutexGuard<'static, LLM> {
    static LLM_: OnceLock<Mutex<LLM>> = OnceLock::new();
    LLM_.get_or_init(|| {
        let llm = LLM::with_registries(EngineConfig::new(minilm_path()), &builtin_registries())
            .expect("all-MiniLM-L6-v2 loads");
        Mutex::new(llm)
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let reference = reference();
    let mut llm = minilm();
    let texts: Vec<&str> = reference
        .sentences
        .iter()
        .map(|s| s.text.as_str())
        .collect();
    let outputs = llm.embed(&texts).expect("embed");
    assert_eq!(outputs.len(), reference.sentences.len());
    let mut min = f64::MAX;
    for (s, out) in reference.sentences.iter().zip(&outputs) {
        assert_eq!(out.prompt_token_ids, s.token_ids, "token ids of {}", s.name);
        let got = &out.outputs.data;
        assert_eq!(got.len(), 384, "{}", s.name);
        let c = cosine(got, &s.embedding);
        let norm: f64 = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{}: norm {norm}", s.name);
        assert!(c > 0.99999, "{}: cosine {c}", s.name);
        min = min.min(c);
    }
    eprintln!(
        "min cosine over {} sentences: {min:.12} (1 - min = {:.3e})",
        outputs.len(),
        1.0 - min
    );
}

#[test]
fn batch_of_64_equals_one_by_one() {
    let reference = reference();
    let mut llm = minilm();
    // Mixed lengths: whole sentences, prefixes of words, and token ids.
    let mut prompts: Vec<Prompt> = Vec::new();
    for i in 0..64 {
        let s = &reference.sentences[i % reference.sentences.len()];
        let words: Vec<&str> = s.text.split_whitespace().collect();
        let prompt = match i % 4 {
            0 => Prompt::Text(s.text.clone()),
            1 => Prompt::Text(words[..(1 + i % words.len().max(1)).min(words.len())].join(" ")),
            2 => Prompt::Tokens(s.token_ids[..s.token_ids.len().min(3 + 7 * i)].to_vec()),
            _ => Prompt::Text(format!("{} #{i}", words.first().copied().unwrap_or("x"))),
        };
        prompts.push(prompt);
    }
    let batched = llm.embed(&prompts).expect("batch");
    for (i, (p, b)) in prompts.iter().zip(&batched).enumerate() {
        let alone = llm.embed(std::slice::from_ref(p)).expect("alone");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone[0].outputs.data),
            bits(&b.outputs.data),
            "input {i} differs batched vs alone"
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    let mut llm = minilm();
    let err = |r: Result<Vec<trellis_engine::PoolingRequestOutput>, EngineError>| {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    };
    let e = err(llm.embed::<Prompt>(&[Prompt::Tokens(vec![])]));
    assert!(e.contains("empty"), "{e}");
    let e = err(llm.embed(&[Prompt::Tokens(vec![101, 30522, 102])]));
    assert!(e.contains("out of vocabulary"), "{e}");
    let e = err(llm.embed(&[Prompt::Tokens(vec![101; 257])]));
    assert!(e.contains("maximum context length is 256 tokens"), "{e}");
    let params = PoolingParams {
        dimensions: Some(8),
        ..PoolingParams::embed()
    };
    let e = err(llm.encode(&[Prompt::from("hi")], &params));
    assert!(
        e.contains("does not support matryoshka representation"),
        "{e}"
    );
    // The engine still serves after refusals.
    assert_eq!(llm.embed(&["ok"]).expect("embed").len(), 1);
    assert_eq!(llm.engine().core().runner().num_requests(), 0);
}

#[test]
fn generative_model_refuses_embeddings_unless_converted() {
    let mut llm = LLM::with_registries(
        EngineConfig::new(common::model_path()),
        &builtin_registries(),
    )
    .expect("SmolLM2 loads");
    let e = llm
        .embed(&["hello"])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("does not support"), "{e}");

    // `--convert embed`: last-token pooling, normalised.
    let mut cfg = EngineConfig::new(common::model_path());
    cfg.convert = trellis_engine::ConvertOption::Embed;
    let mut llm = LLM::with_registries(cfg, &builtin_registries()).expect("converted");
    let out = llm.embed(&["hello", "hello world"]).expect("embed");
    assert_eq!(out[0].outputs.data.len(), 576);
    let norm: f32 = out[0]
        .outputs
        .data
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    assert_ne!(out[0].outputs.data, out[1].outputs.data);
}

/// A plugin-style IO processor (the shape of examples/plugins/semantic-search): the query
/// first, then the documents; post_process returns the documents' cosines with the query.
struct Cosines;

impl trellis_engine::IoProcessor for Cosines {
    fn parse_data(&self, data: &serde_json::Value) -> trellis_engine::IoResult<serde_json::Value> {
        match data["texts"].as_array() {
            Some(t) if t.iter().all(|v| v.is_string()) => Ok(data.clone()),
            _ => Err("data must be {\"texts\": [string, ...]}".into()),
        }
    }

    fn pre_process(
        &self,
        input: &serde_json::Value,
        _request_id: Option<&str>,
    ) -> trellis_engine::IoResult<Vec<trellis_engine::IoPrompt>> {
        let texts = input["texts"].as_array().cloned().unwrap_or_default();
        Ok(texts
            .iter()
            .filter_map(|t| t.as_str())
            .map(|t| trellis_engine::IoPrompt::Text(t.to_string()))
            .collect())
    }

    fn post_process(
        &self,
        outputs: &[trellis_engine::IoPoolingOutput],
        _request_id: Option<&str>,
    ) -> trellis_engine::IoResult<serde_json::Value> {
        let q = &outputs[0].data;
        let scores: Vec<f64> = outputs[1..].iter().map(|o| cosine(q, &o.data)).collect();
        Ok(serde_json::json!(scores))
    }
}

#[test]
fn encode_plugin_runs_the_io_processor_flow_offline() {
    let mut llm = minilm();
    let e = llm
        .encode_plugin(&serde_json::json!({"texts": ["a"]}))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("No IOProcessor plugin installed"), "{e}");
    llm.set_io_processor(Some(std::sync::Arc::new(Cosines)));
    let texts = ["Hello world", "hello", "Pizza is my favourite food."];
    let out = llm
        .encode_plugin(&serde_json::json!({ "texts": texts }))
        .expect("encode_plugin");
    let embedded = llm.embed(&texts).expect("embed");
    let want: Vec<f64> = embedded[1..]
        .iter()
        .map(|o| cosine(&embedded[0].outputs.data, &o.outputs.data))
        .collect();
    assert_eq!(out, serde_json::json!(want));
    let e = llm
        .encode_plugin(&serde_json::json!({"texts": [1]}))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("data must be"), "{e}");
    let e = llm
        .encode_plugin(&serde_json::json!({"texts": []}))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(e, "You must pass at least one prompt");
    llm.set_io_processor(None);
}
