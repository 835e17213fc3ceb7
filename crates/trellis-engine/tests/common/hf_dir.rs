//! The default GGUF written as a Hugging Face directory: weights dequantized to f32, q/k rows
//! in HF order, config.json, tokenizer.json saved from the GGUF-built tokenizer.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use trellis_engine::tokenizer::Tokenizer;

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

pub fn write_hf_dir(gguf: &Path, dir: &Path, config: &serde_json::Value) {
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
