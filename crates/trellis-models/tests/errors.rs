//! Bad input gives a one-line error naming the file and the problem, never a panic.

mod common;

use std::path::Path;

use anyhow::Result;
use candle_core::Device;
use common::Tiny;
use trellis_models::{ModelError, load_model};

fn tiny() -> Tiny {
    Tiny {
        arch: "LlamaForCausalLM",
        vocab: 64,
        hidden: 16,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        inter: 32,
        theta: 10_000.0,
        tie: true,
        qkv_bias: false,
        llama3: None,
    }
}

/// Loads `path`, expecting an error whose message is one line and mentions every `needle`.
fn load_err(path: &Path, needles: &[&str]) -> ModelError {
    let err = match load_model(path, &Device::Cpu) {
        Ok(m) => panic!("expected an error, loaded {m:?}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
    }
    err
}

fn write_hf(dir: &Path) -> Result<()> {
    let t = tiny();
    t.write_hf(dir, &t.weights(7), 1)
}

#[test]
fn missing_path() {
    let e = load_err(
        Path::new("/nonexistent/model.gguf"),
        &["/nonexistent/model.gguf", "no such file"],
    );
    assert!(matches!(e, ModelError::NotFound { .. }));
}

#[test]
fn unknown_format() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("weights.bin");
    std::fs::write(&p, b"not a model")?;
    load_err(&p, &["weights.bin", "not a GGUF file"]);
    load_err(dir.path(), &["config.json"]);
    Ok(())
}

#[test]
fn truncated_gguf() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("tiny.gguf");
    tiny().write_gguf(&p, &tiny().weights(7))?;
    let bytes = std::fs::read(&p)?;
    for cut in [3, 20, 200, bytes.len() / 2, bytes.len() - 10] {
        std::fs::write(&p, &bytes[..cut])?;
        let e = load_err(&p, &["tiny.gguf"]);
        assert!(
            matches!(e, ModelError::InvalidGguf { .. }),
            "cut {cut}: {e:?}"
        );
    }
    Ok(())
}

#[test]
fn truncated_safetensors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_hf(dir.path())?;
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p)?;
    for cut in [4, 100, bytes.len() - 4] {
        std::fs::write(&p, &bytes[..cut])?;
        let e = load_err(dir.path(), &["model.safetensors", "invalid safetensors"]);
        assert!(
            matches!(e, ModelError::InvalidSafetensors { .. }),
            "cut {cut}: {e:?}"
        );
    }
    Ok(())
}

#[test]
fn unsupported_architecture_lists_supported_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_hf(dir.path())?;
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))?
        .replace("LlamaForCausalLM", "FooForCausalLM");
    std::fs::write(dir.path().join("config.json"), cfg)?;
    let e = load_err(
        dir.path(),
        &[
            "FooForCausalLM",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "MistralForCausalLM",
            "plugin",
        ],
    );
    assert!(matches!(e, ModelError::UnsupportedArchitecture { .. }));
    Ok(())
}

/// A hand-written GGUF v3 with one tensor of GGML type `ggml_type` and the given architecture.
fn write_raw_gguf(path: &Path, arch: &str, ggml_type: u32) -> Result<()> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    s(&mut b, arch);
    s(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(ggml_type.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend([0u8; 128]);
    std::fs::write(path, b)?;
    Ok(())
}

#[test]
fn unsupported_gguf_architecture() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("falcon.gguf");
    write_raw_gguf(&p, "falcon", 0)?;
    let e = load_err(
        &p,
        &["falcon.gguf", "falcon", "LlamaForCausalLM", "GGUF: llama"],
    );
    assert!(matches!(e, ModelError::UnsupportedArchitecture { .. }));
    Ok(())
}

#[test]
fn unsupported_quantization_type() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("iq.gguf");
    write_raw_gguf(&p, "llama", 99)?;
    let e = load_err(&p, &["iq.gguf", "unsupported type", "99"]);
    assert!(matches!(e, ModelError::UnsupportedDType { .. }));
    Ok(())
}

#[test]
fn config_json_missing_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_hf(dir.path())?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json"))?)?;
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), cfg.to_string())?;
    let e = load_err(dir.path(), &["config.json", "hidden_size"]);
    assert!(matches!(e, ModelError::Config { .. }));
    Ok(())
}

#[test]
fn gguf_missing_metadata_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("bare.gguf");
    write_raw_gguf(&p, "llama", 0)?;
    let e = load_err(&p, &["bare.gguf", "llama.embedding_length"]);
    assert!(matches!(e, ModelError::Config { .. }));
    Ok(())
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tiny();
    let mut w = t.weights(7);
    w.remove("model.layers.0.mlp.up_proj.weight");
    t.write_hf(dir.path(), &w, 1)?;
    let e = load_err(
        dir.path(),
        &["model.layers.0.mlp.up_proj.weight", "missing tensor"],
    );
    assert!(matches!(e, ModelError::MissingTensor { .. }));
    Ok(())
}

#[test]
fn wrong_shape_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let t = tiny();
    t.write_hf(dir.path(), &t.weights(7), 1)?;
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))?
        .replace("\"intermediate_size\": 32", "\"intermediate_size\": 40");
    std::fs::write(dir.path().join("config.json"), cfg)?;
    let e = load_err(dir.path(), &["gate_proj.weight", "[32, 16]", "[40, 16]"]);
    assert!(matches!(e, ModelError::Shape { .. }));
    Ok(())
}
