//! Golden: SmolLM2-135M-Instruct Q4_1 through the paged path with CPU_REFERENCE reproduces
//! llama.cpp's greedy completions token for token (tests/data/golden-llamacpp.json).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use common::{PagedRunner, SeqState, argmax};
use trellis_models::load_model;

fn model_path() -> Result<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    anyhow::ensure!(
        p.is_file(),
        "{} is missing: run `bash scripts/fetch-model.sh` from the workspace root",
        p.display()
    );
    Ok(p)
}

#[test]
fn smollm2_q4_1_greedy_matches_llama_cpp() -> Result<()> {
    let golden: serde_json::Value = serde_json::from_str(include_str!("data/golden-llamacpp.json"))
        .context("golden-llamacpp.json")?;
    let t0 = Instant::now();
    let loaded = load_model(&model_path()?, &Device::Cpu)?;
    eprintln!("loaded {:?} in {:.2?}", loaded.config, t0.elapsed());
    assert_eq!(loaded.config.num_layers, 30);
    assert_eq!(loaded.config.vocab_size, 49152);
    let model = loaded.model.as_ref();
    let cases = golden["cases"].as_array().context("cases")?;
    assert_eq!(cases.len(), 3);
    let mut failures = vec![];
    for case in cases {
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        };
        let (prompt, want) = (ids("prompt_token_ids"), ids("completion_token_ids"));
        let mut runner = PagedRunner::new(model, 64, 16)?;
        let mut seq = SeqState::default();
        let t = Instant::now();
        let logits = runner.step(model, &mut [(&mut seq, &prompt[..])], false)?;
        let prefill = t.elapsed();
        let mut got = vec![argmax(&logits[0][0])];
        let t = Instant::now();
        while got.len() < want.len() {
            let last = [*got.last().context("empty")?];
            let logits = runner.step(model, &mut [(&mut seq, &last[..])], false)?;
            got.push(argmax(&logits[0][0]));
        }
        let decode = t.elapsed();
        eprintln!(
            "prompt {:?}: prefill {} tokens in {prefill:.2?}, decode {:.1} tok/s",
            case["prompt"].as_str().unwrap_or("?"),
            prompt.len(),
            (got.len() - 1) as f64 / decode.as_secs_f64()
        );
        if got != want {
            failures.push(format!(
                "{:?}\n  got  {got:?}\n  want {want:?}",
                case["prompt"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "greedy ids differ from llama.cpp:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Log-probabilities of `tokens` (teacher-forced after `prompt`) and the greedy choice and its
/// log-probability at each position, on a fresh runner over `backend`.
fn teacher_forced(
    model: &dyn trellis_plugin::Model,
    backend: std::sync::Arc<dyn trellis_plugin::AttentionBackend>,
    kv_dtype: candle_core::DType,
    prompt: &[u32],
    tokens: &[u32],
) -> Result<Vec<(f64, u32, f64)>> {
    let mut runner = PagedRunner::with_backend(model, 64, 16, kv_dtype, backend)?;
    let mut seq = SeqState::default();
    let mut input = prompt.to_vec();
    input.extend_from_slice(&tokens[..tokens.len() - 1]);
    let rows = runner.step(model, &mut [(&mut seq, &input[..])], true)?;
    Ok(tokens
        .iter()
        .enumerate()
        .map(|(i, &tok)| {
            let row = &rows[0][prompt.len() - 1 + i];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&l| ((l as f64) - max).exp())
                    .sum::<f64>()
                    .ln();
            let top = argmax(row);
            (
                row[tok as usize] as f64 - lse,
                top,
                row[top as usize] as f64 - lse,
            )
        })
        .collect())
}

/// The default CPU backend (`CPU_ATTN`: another summation order and a polynomial `exp`),
/// teacher-forced on llama.cpp's tokens: its log-probabilities stay within 0.3 nats of
/// `CPU_REFERENCE`'s at every position, and its greedy choice is llama.cpp's token unless the two
/// are a near-tie (within 0.25 nats), which happens at no more than one position in ten. Why not
/// tighter: each layer's input is quantized to int8 (Q8_1, as llama.cpp does), so a 1e-6
/// difference in attention (measured per layer against CPU_REFERENCE on these prompts: at most
/// 4e-6) can move a value across a rounding boundary, one quant step, and such steps add up over
/// 30 layers to about a tenth of a nat (measured below). Exact token parity is pinned on `CPU_REFERENCE` above; "31 vs
/// 32 million" at a 0.001-nat margin is not something two correct engines must agree on.
/// Checked with the f32 cache and with the f16 cache `--kv-cache-dtype auto` gives CPU_ATTN
/// (measured: at most 0.14 and 0.28 nats, the same on AVX-512 and AVX2; the scalar kernels give
/// CPU_REFERENCE's values exactly with f32, 0.28 with f16).
#[test]
fn smollm2_q4_1_on_cpu_attn_agrees_with_llama_cpp_up_to_near_ties() -> Result<()> {
    for kv_dtype in [candle_core::DType::F32, candle_core::DType::F16] {
        cpu_attn_agrees(kv_dtype)?;
    }
    Ok(())
}

fn cpu_attn_agrees(kv_dtype: candle_core::DType) -> Result<()> {
    let golden: serde_json::Value = serde_json::from_str(include_str!("data/golden-llamacpp.json"))
        .context("golden-llamacpp.json")?;
    let loaded = load_model(&model_path()?, &Device::Cpu)?;
    let model = loaded.model.as_ref();
    let (mut near_ties, mut worst, mut total) = (0, 0f64, 0);
    for case in golden["cases"].as_array().context("cases")? {
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        };
        let (prompt, want) = (ids("prompt_token_ids"), ids("completion_token_ids"));
        let attn = teacher_forced(
            model,
            trellis_cpu::cpu_attn_backend(),
            kv_dtype,
            &prompt,
            &want,
        )?;
        let reference = teacher_forced(
            model,
            trellis_cpu::cpu_reference_backend(),
            candle_core::DType::F32,
            &prompt,
            &want,
        )?;
        for (i, (&tok, (&(lp, top, top_lp), &(ref_lp, _, _)))) in
            want.iter().zip(attn.iter().zip(&reference)).enumerate()
        {
            anyhow::ensure!(
                (lp - ref_lp).abs() < 0.3,
                "{:?} token {i}: logprob {lp:.5} on CPU_ATTN, {ref_lp:.5} on CPU_REFERENCE",
                case["prompt"]
            );
            worst = worst.max((lp - ref_lp).abs());
            total += 1;
            if top != tok {
                anyhow::ensure!(
                    top_lp - lp < 0.25,
                    "{:?} token {i}: greedy {top} ({top_lp:.4}) but llama.cpp {tok} ({lp:.4})",
                    case["prompt"]
                );
                near_ties += 1;
            }
        }
    }
    anyhow::ensure!(
        near_ties * 10 <= total,
        "{kv_dtype:?} cache: {near_ties} of {total} greedy choices differ"
    );
    eprintln!(
        "CPU_ATTN ({kv_dtype:?} cache) vs CPU_REFERENCE: largest logprob difference {worst:.4}; \
         near-ties decided differently from llama.cpp: {near_ties}"
    );
    Ok(())
}
