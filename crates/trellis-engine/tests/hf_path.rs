//! Real weights through the Hugging Face path: the default GGUF turned into an HF directory
//! (weights dequantized to f32, q/k rows in HF order, config.json, tokenizer.json saved from the
//! GGUF-built tokenizer) and loaded through `config.json` + `model.safetensors`. Its greedy ids
//! must equal transformers' on the same dequantized weights.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use common::model_path;
use serde::Deserialize;
use trellis_engine::tokenizer::Tokenizer;
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

/// HF name of a GGUF tensor name.
fn hf_name(gguf: &str) -> String {
    let base = gguf.trim_end_matches(".weight");
    let name = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = base.strip_prefix("blk.").expect("a layer tensor");
            let (i, part) = rest.split_once('.').expect("blk.N.name");
            let hf = match part {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => panic!("unexpected tensor {other}"),
            };
            format!("model.layers.{i}.{hf}")
        }
    };
    format!("{name}.weight")
}

/// Inverse of llama.cpp's q/k row permutation: `gguf = permute(hf, n)` with
/// `permute(w, n) = w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn unpermute(w: &Tensor, n: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n, rows / n / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn write_hf_dir(gguf: &Path, dir: &Path, config: &serde_json::Value) {
    let mut file = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let n_head = config["num_attention_heads"].as_u64().unwrap() as usize;
    let n_kv = config["num_key_value_heads"].as_u64().unwrap() as usize;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let mut t = q.dequantize(&Device::Cpu).unwrap();
        if name.ends_with("attn_q.weight") {
            t = unpermute(&t, n_head);
        } else if name.ends_with("attn_k.weight") {
            t = unpermute(&t, n_kv);
        }
        tensors.insert(hf_name(name), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    Tokenizer::from_gguf(gguf)
        .unwrap()
        .save_hf_json(dir.join("tokenizer.json"))
        .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 2}"#).unwrap();
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
