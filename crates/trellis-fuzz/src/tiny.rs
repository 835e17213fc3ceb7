//! Seeds: a tiny but complete Llama model, as a GGUF file and as a Hugging Face directory,
//! built from the default model's real tokenizer metadata (its first 512 tokens and the merges
//! among them), so that every loader runs to the end on an unmutated seed in microseconds.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Tokens kept from the real vocabulary.
pub const VOCAB: usize = 512;
const HIDDEN: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const FF: usize = 64;

/// The tiny model's tensors: (GGUF name, HF name, shape as `[out, in]`).
fn tensor_specs() -> Vec<(&'static str, &'static str, Vec<usize>)> {
    let kv = HIDDEN / HEADS * KV_HEADS;
    vec![
        (
            "token_embd.weight",
            "model.embed_tokens.weight",
            vec![VOCAB, HIDDEN],
        ),
        ("output_norm.weight", "model.norm.weight", vec![HIDDEN]),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            vec![HIDDEN],
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            vec![HIDDEN],
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            vec![kv, HIDDEN],
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            vec![kv, HIDDEN],
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            vec![HIDDEN, HIDDEN],
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            vec![FF, HIDDEN],
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            vec![FF, HIDDEN],
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            vec![HIDDEN, FF],
        ),
    ]
}

fn values(shape: &[usize], salt: usize) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) / 20_000.0)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The tokenizer metadata of the real GGUF at `real`, cut to [`VOCAB`] tokens.
fn tokenizer_metadata(real: &Path) -> Result<Vec<(String, Value)>> {
    let mut f = std::fs::File::open(real).with_context(|| format!("{}", real.display()))?;
    let content = Content::read(&mut f)?;
    let md = &content.metadata;
    let get = |k: &str| md.get(k).with_context(|| format!("{k} missing"));
    let tokens: Vec<Value> = get("tokenizer.ggml.tokens")?.to_vec()?[..VOCAB].to_vec();
    let kept: HashSet<String> = tokens
        .iter()
        .filter_map(|t| t.to_string().ok().cloned())
        .collect();
    let merges: Vec<Value> = get("tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .filter(|m| {
            m.to_string()
                .ok()
                .and_then(|m| m.split_once(' '))
                .is_some_and(|(a, b)| {
                    kept.contains(a) && kept.contains(b) && kept.contains(&format!("{a}{b}"))
                })
        })
        .cloned()
        .collect();
    let mut out = vec![
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    if let Ok(Value::Array(types)) = get("tokenizer.ggml.token_type") {
        out.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(types[..VOCAB].to_vec()),
        ));
    }
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
    ] {
        if let Some(v) = md.get(k) {
            out.push((k.to_string(), v.clone()));
        }
    }
    out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
    out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
    Ok(out)
}

/// A tiny Llama GGUF file (F32 norms, Q8_0 and F32 matrices) with the real tokenizer's head.
pub fn gguf(real: &Path) -> Result<Vec<u8>> {
    let mut md = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        ("llama.block_count".into(), Value::U32(1)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV_HEADS as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.context_length".into(), Value::U32(64)),
    ];
    md.extend(tokenizer_metadata(real)?);
    let mut tensors = Vec::new();
    for (i, (name, _, shape)) in tensor_specs().into_iter().enumerate() {
        let t = values(&shape, i)?;
        let dtype = match (shape.len(), i % 2) {
            (2, 0) => GgmlDType::Q8_0,
            _ => GgmlDType::F32,
        };
        tensors.push((name, QTensor::quantize(&t, dtype)?));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md_refs, &t_refs)?;
    Ok(out.into_inner())
}

/// The tiny model's `config.json`.
pub fn hf_config() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FF,
        "num_hidden_layers": 1,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": true,
        "torch_dtype": "float32"
    })
    .to_string()
}

/// The tiny model's `model.safetensors` bytes.
pub fn safetensors() -> Result<Vec<u8>> {
    let mut map = HashMap::new();
    for (i, (_, name, shape)) in tensor_specs().into_iter().enumerate() {
        map.insert(name.to_string(), values(&shape, i)?);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&map, &path)?;
    Ok(std::fs::read(path)?)
}

/// The tiny model's `tokenizer.json`, converted from its GGUF tokenizer.
pub fn tokenizer_json(tiny_gguf: &[u8]) -> Result<Vec<u8>> {
    let content = Content::read(&mut Cursor::new(tiny_gguf))?;
    let tok = trellis_engine::tokenizer::Tokenizer::from_gguf_content(&content)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tokenizer.json");
    tok.save_hf_json(&path)?;
    Ok(std::fs::read(path)?)
}
