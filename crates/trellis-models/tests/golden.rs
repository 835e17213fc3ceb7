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
