//! Real weights through the Hugging Face path: the default GGUF turned into an HF directory
//! (weights dequantized to f32, q/k rows in HF order, config.json, tokenizer.json saved from the
//! GGUF-built tokenizer) and loaded through `config.json` + `model.safetensors`. Its greedy ids
//! must equal transformers' on the same dequantized weights.

mod common;

use common::hf_dir::write_hf_dir;
use common::model_path;
use serde::Deserialize;
use trellis_engine::{EngineConfig, LLM, Prompt, SamplingParams};

#[derive(Deserialize)]
struct Top {
    id: u32,
    logprob: f32,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    top5_first_position: Vec<Top>,
}

#[derive(Deserialize)]
struct Reference {
    config: serde_json::Value,
    base: Vec<Case>,
}

#[test]
fn dequantized_hf_directory_matches_transformers() {
    let reference: Reference =
        serde_json::from_str(include_str!("data/smollm2-transformers-base.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(&model_path(), dir.path(), &reference.config);
    let mut config = EngineConfig::new(dir.path());
    config.max_model_len = Some(512);
    config.num_kv_blocks = Some(64);
    // An f32 cache: this compares the model's arithmetic with transformers' f32 to 1e-3 nats,
    // which a 16-bit cache (auto's choice on CPU_ATTN) would blur by ~2e-3; the f16 cache is
    // bounded by trellis-models' golden test.
    config.kv_cache_dtype = Some(candle_core::DType::F32);
    let mut llm = LLM::new(config).unwrap();
    let params = SamplingParams {
        ignore_eos: true,
        logprobs: Some(5),
        ..SamplingParams::greedy(24)
    };
    let prompts: Vec<Prompt> = reference
        .base
        .iter()
        .map(|c| Prompt::Text(c.prompt.clone()))
        .collect();
    let outs = llm.generate(&prompts, &params).unwrap();
    for (case, out) in reference.base.iter().zip(&outs) {
        assert_eq!(
            out.prompt_token_ids, case.prompt_ids,
            "prompt ids of {:?}",
            case.prompt
        );
        assert_eq!(
            out.outputs[0].token_ids, case.generated_ids,
            "greedy ids of {:?}",
            case.prompt
        );
        let first = &out.outputs[0].logprobs.as_ref().unwrap()[0];
        for (want, got) in case.top5_first_position.iter().zip(&first.top) {
            assert_eq!(
                want.id, got.0,
                "top-5 ids at the first position of {:?}",
                case.prompt
            );
            assert!(
                (want.logprob - got.1).abs() < 1e-3,
                "logprob {} vs {} for {:?}",
                got.1,
                want.logprob,
                case.prompt
            );
        }
    }
}
