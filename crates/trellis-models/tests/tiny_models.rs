//! Tiny random Llama/Qwen2 models through the paged path (CPU_REFERENCE, chunked prefill,
//! decode steps, several sequences per batch) against a plain unpaged reference forward.

mod common;

use anyhow::Result;
use candle_core::Device;
use common::{PagedRunner, Rng, SeqState, Tiny};
use trellis_models::{WeightFormat, load_model};

fn tiny(arch: &'static str) -> Tiny {
    Tiny::small(arch)
}

/// Runs three sequences through a schedule of mixed prefill chunks and decode steps and checks
/// every new token's logits against the reference.
#[allow(clippy::needless_range_loop)] // `step` indexes every sequence's schedule
fn check_paged(spec: &Tiny, path: &std::path::Path, format: WeightFormat, seed: u64) -> Result<()> {
    let w = spec.weights(seed);
    let loaded = load_model(path, &Device::Cpu)?;
    assert_eq!(loaded.format, format);
    assert_eq!(loaded.config.architecture, spec.arch);
    assert_eq!(loaded.config.vocab_size, spec.vocab);
    let model = loaded.model.as_ref();
    let mut rng = Rng(seed ^ 0xABCDEF);
    // Chunk sizes per step for each sequence (0 = idle): two prefill chunks, then decodes.
    let schedules: [&[usize]; 3] = [
        &[6, 5, 1, 1, 1, 1],
        &[7, 0, 3, 1, 1, 1],
        &[0, 4, 5, 1, 0, 1],
    ];
    let tokens: Vec<Vec<u32>> = schedules
        .iter()
        .map(|s| {
            (0..s.iter().sum::<usize>())
                .map(|_| rng.below(spec.vocab) as u32)
                .collect()
        })
        .collect();
    let expected: Vec<Vec<Vec<f32>>> = tokens
        .iter()
        .map(|t| spec.reference_logits(&w, t))
        .collect::<Result<_>>()?;
    let mut runner = PagedRunner::new(model, 64, 4)?;
    let mut seqs = vec![SeqState::default(); 3];
    let mut max_err = 0f32;
    for step in 0..schedules[0].len() {
        let mut work = vec![];
        let mut which = vec![];
        for (i, seq) in seqs.iter_mut().enumerate() {
            let n = schedules[i][step];
            if n > 0 {
                let start = seq.len;
                which.push((i, start));
                work.push((seq, &tokens[i][start..start + n]));
            }
        }
        let out = runner.step(model, &mut work, true)?;
        for ((i, start), rows) in which.into_iter().zip(out) {
            for (j, row) in rows.iter().enumerate() {
                let want = &expected[i][start + j];
                for (a, b) in row.iter().zip(want) {
                    max_err = max_err.max((a - b).abs());
                }
            }
        }
    }
    eprintln!(
        "{} {format:?}: max |paged - reference| = {max_err:.2e}",
        spec.arch
    );
    assert!(max_err < 1e-4, "max error {max_err}");
    Ok(())
}

#[test]
fn llama_safetensors_llama3_rope_matches_reference() -> Result<()> {
    let spec = Tiny {
        llama3: Some((8.0, 1.0, 4.0, 16)),
        theta: 500_000.0,
        ..tiny("LlamaForCausalLM")
    };
    let dir = tempfile::tempdir()?;
    spec.write_hf(dir.path(), &spec.weights(1), 1)?;
    check_paged(&spec, dir.path(), WeightFormat::Safetensors, 1)
}

#[test]
fn llama_gguf_tied_matches_reference() -> Result<()> {
    let spec = Tiny {
        tie: true,
        ..tiny("LlamaForCausalLM")
    };
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny.gguf");
    spec.write_gguf(&path, &spec.weights(2))?;
    check_paged(&spec, &path, WeightFormat::Gguf, 2)
}

#[test]
fn mistral_safetensors_matches_reference() -> Result<()> {
    let spec = Tiny {
        kv_heads: 1,
        ..tiny("MistralForCausalLM")
    };
    let dir = tempfile::tempdir()?;
    spec.write_hf(dir.path(), &spec.weights(3), 1)?;
    check_paged(&spec, dir.path(), WeightFormat::Safetensors, 3)
}

#[test]
fn qwen2_sharded_tied_with_bias_matches_reference() -> Result<()> {
    let spec = Tiny {
        tie: true,
        qkv_bias: true,
        theta: 1_000_000.0,
        ..tiny("Qwen2ForCausalLM")
    };
    let dir = tempfile::tempdir()?;
    spec.write_hf(dir.path(), &spec.weights(4), 3)?;
    check_paged(&spec, dir.path(), WeightFormat::Safetensors, 4)
}
