//! Shared test helpers: the default model and the llama.cpp golden data.
#![allow(dead_code)]

pub mod hf_dir;

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;
use trellis_engine::tokenizer::Tokenizer;

/// One case of `data/golden-llamacpp.json`.
#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    pub prompt: String,
    pub prompt_token_ids: Vec<u32>,
    pub completion_text: String,
    pub completion_token_ids: Vec<u32>,
    pub completion_token_pieces: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Golden {
    cases: Vec<GoldenCase>,
}

/// The golden cases (llama.cpp on SmolLM2-135M-Instruct Q4_1).
pub fn golden() -> Vec<GoldenCase> {
    let text = include_str!("../data/golden-llamacpp.json");
    let g: Golden = serde_json::from_str(text).expect("tests/data/golden-llamacpp.json parses");
    g.cases
}

/// Path of the default model; panics with instructions when it has not been fetched.
pub fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "model file {} is missing: run scripts/fetch-model.sh from the repository root",
        p.display()
    );
    p
}

/// The SmolLM2 tokenizer from the GGUF, loaded once per test binary.
pub fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_gguf(model_path()).expect("SmolLM2 GGUF tokenizer loads"))
}
