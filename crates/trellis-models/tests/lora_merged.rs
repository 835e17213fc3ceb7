//! Exactness of the LoRA forward on tiny f32 models (issue 12): a model run with an adapter in
//! a slot equals the same model with merged weights `W + s·B·A`, for every target module, with
//! `lora_alpha / r` and rsLoRA scaling, a `rank_pattern`/`alpha_pattern`, on the HF layout and
//! on a GGUF (q/k `lora_B` rows permuted as llama.cpp's converter permutes `attn_q`/`attn_k`).

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{PagedRunner, Rng, SeqState, Tiny};
use trellis_models::{LoraAdapter, load_model};
use trellis_plugin::{LoraSlotPool, LoraTarget, Model};

fn tiny() -> Tiny {
    Tiny::small("LlamaForCausalLM")
}

/// A random PEFT adapter on every target of `spec` (rank 4, q_proj rank 2 by pattern), its
/// files written to `dir`; returns the merged weights.
fn adapter(
    spec: &Tiny,
    base: &HashMap<String, Tensor>,
    dir: &Path,
    rslora: bool,
) -> Result<HashMap<String, Tensor>> {
    let (r, alpha) = (4usize, 8.0f64);
    let cfg = serde_json::json!({
        "peft_type": "LORA", "base_model_name_or_path": "tiny", "r": r, "lora_alpha": alpha,
        "use_rslora": rslora, "target_modules": "model\\.layers\\.\\d+\\.(self_attn|mlp)\\..*_proj",
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0},
        "some_future_key": {"ignored": true}, "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string())?;
    let mut rng = Rng(7);
    let mut tensors = HashMap::new();
    let mut merged = base.clone();
    for i in 0..spec.layers {
        for t in LoraTarget::ALL {
            let key = format!("model.layers.{i}.{}.{}", t.parent(), t.name());
            let w = &base[&format!("{key}.weight")];
            let (out, inp) = w.dims2()?;
            // rank_pattern: q_proj has rank 2; alpha_pattern: down_proj has alpha 3.
            let rank = if t == LoraTarget::QProj { 2 } else { r };
            let a_scale = if t == LoraTarget::DownProj {
                3.0
            } else {
                alpha
            };
            let s = match rslora {
                true => a_scale / (rank as f64).sqrt(),
                false => a_scale / rank as f64,
            };
            let a = rng.tensor(&[rank, inp], 0.3);
            let b = rng.tensor(&[out, rank], 0.3);
            merged.insert(format!("{key}.weight"), (w + (b.matmul(&a)? * s)?)?);
            tensors.insert(format!("base_model.model.{key}.lora_A.weight"), a);
            tensors.insert(format!("base_model.model.{key}.lora_B.weight"), b);
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(merged)
}

/// Logits of a prefill and two decode steps of one sequence.
fn logits(model: &dyn Model, runner: &mut PagedRunner) -> Result<Vec<f32>> {
    let mut seq = SeqState::default();
    let mut all = Vec::new();
    for toks in [&[3u32, 14, 15, 9, 2, 6][..], &[5], &[35]] {
        let out = runner.step(model, &mut [(&mut seq, toks)], true)?;
        all.extend(out.into_iter().flatten().flatten());
    }
    Ok(all)
}

fn check(gguf: bool, rslora: bool) -> Result<()> {
    let spec = tiny();
    let w = spec.weights(11);
    let tmp = tempfile::tempdir()?;
    let (base_dir, merged_dir, lora_dir) = (
        tmp.path().join("base"),
        tmp.path().join("merged"),
        tmp.path().join("lora"),
    );
    for d in [&base_dir, &merged_dir, &lora_dir] {
        std::fs::create_dir_all(d)?;
    }
    let merged = adapter(&spec, &w, &lora_dir, rslora)?;
    let (base_path, merged_path) = match gguf {
        true => {
            let (b, m) = (base_dir.join("m.gguf"), merged_dir.join("m.gguf"));
            spec.write_gguf(&b, &w)?;
            spec.write_gguf(&m, &merged)?;
            (b, m)
        }
        false => {
            spec.write_hf(&base_dir, &w, 1)?;
            spec.write_hf(&merged_dir, &merged, 1)?;
            (base_dir.clone(), merged_dir.clone())
        }
    };
    let base = load_model(&base_path, &Device::Cpu)?.model;
    let merged = load_model(&merged_path, &Device::Cpu)?.model;
    let specs = base.lora_modules();
    assert_eq!(specs.len(), spec.layers * 7);
    let loaded = LoraAdapter::load(&lora_dir, &specs, 16)?;
    assert_eq!(loaded.rank(), 4);
    let mut pool = LoraSlotPool::new(&specs, 2, 16);
    loaded.write_to(&mut pool, 1)?;
    let mut with_lora = PagedRunner::new(base.as_ref(), 16, 4)?;
    with_lora.lora = Some((pool, 1));
    let got = logits(base.as_ref(), &mut with_lora)?;
    let want = logits(
        merged.as_ref(),
        &mut PagedRunner::new(merged.as_ref(), 16, 4)?,
    )?;
    let plain = logits(base.as_ref(), &mut PagedRunner::new(base.as_ref(), 16, 4)?)?;
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (err, moved) = (diff(&got, &want), diff(&plain, &want));
    assert!(
        moved > 0.1,
        "the adapter hardly changes the logits ({moved})"
    );
    assert!(
        err <= 1e-4,
        "gguf={gguf} rslora={rslora}: LoRA vs merged differ by {err}"
    );
    Ok(())
}

#[test]
fn lora_forward_equals_merged_weights_hf() -> Result<()> {
    check(false, false)?;
    check(false, true)
}

#[test]
fn lora_forward_equals_merged_weights_gguf_with_permuted_qk() -> Result<()> {
    check(true, false)?;
    check(true, true)
}
