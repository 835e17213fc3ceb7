//! `trellis bench throughput` and `trellis bench latency` (vLLM's `vllm bench`).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use trellis_engine::sampler::Generator;
use trellis_engine::{LLM, LLMEngine, Prompt, SamplingParams};

use crate::args::{LatencyArgs, ThroughputArgs};

/// Random prompts of `len` token ids (vLLM's random dataset), reproducible from `seed`.
fn random_prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Prompt> {
    let mut g = Generator::new(seed);
    // Stay clear of the low ids, where small vocabularies keep their special tokens.
    let lo = 100.min(vocab / 2) as u64;
    let span = (vocab as u64 - lo).max(1);
    (0..n)
        .map(|_| {
            Prompt::Tokens(
                (0..len)
                    .map(|_| (lo + g.next_u64() % span) as u32)
                    .collect(),
            )
        })
        .collect()
}

fn fixed_length(output_len: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(output_len),
        ..Default::default()
    }
}

fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(value)?)?;
    }
    Ok(())
}

pub fn throughput(args: ThroughputArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let mut llm = LLM::with_registries(config, &crate::platforms::engine_registries()?)?;
    let vocab = llm.engine().config().model.vocab_size;
    let prompts = random_prompts(args.num_prompts, args.input_len, vocab, 0);
    let params = fixed_length(args.output_len);
    let start = Instant::now();
    let outputs = llm.generate(&prompts, &params)?;
    let elapsed = start.elapsed().as_secs_f64();
    let prompt_tokens: usize = outputs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let output_tokens: usize = outputs
        .iter()
        .flat_map(|o| &o.outputs)
        .map(|c| c.token_ids.len())
        .sum();
    let result = serde_json::json!({
        "elapsed_time": elapsed,
        "num_requests": outputs.len(),
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": outputs.len() as f64 / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) as f64 / elapsed,
        "prompt_tokens_per_second": prompt_tokens as f64 / elapsed,
        "output_tokens_per_second": output_tokens as f64 / elapsed,
    });
    println!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s ({} prompts x {} in / {} out, {:.2} s)",
        outputs.len() as f64 / elapsed,
        (prompt_tokens + output_tokens) as f64 / elapsed,
        output_tokens as f64 / elapsed,
        args.num_prompts,
        args.input_len,
        args.output_len,
        elapsed
    );
    write_json(args.output_json.as_deref(), &result)
}

/// Runs one batch to completion, timing each engine step; returns (total seconds, first
/// step seconds, decode step seconds).
fn run_batch(
    engine: &mut LLMEngine,
    prompts: &[Prompt],
    params: &SamplingParams,
    tag: &str,
) -> Result<(f64, f64, Vec<f64>)> {
    for (i, p) in prompts.iter().enumerate() {
        engine.add_request(&format!("{tag}-{i}"), p.clone(), params.clone())?;
    }
    let start = Instant::now();
    let mut steps = Vec::new();
    while engine.has_unfinished_requests() {
        let t = Instant::now();
        engine.step()?;
        steps.push(t.elapsed().as_secs_f64());
    }
    let total = start.elapsed().as_secs_f64();
    let first = steps.first().copied().unwrap_or(0.0);
    Ok((total, first, steps.into_iter().skip(1).collect()))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn latency(args: LatencyArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let mut llm = LLM::with_registries(config, &crate::platforms::engine_registries()?)?;
    let engine = llm.engine();
    let vocab = engine.config().model.vocab_size;
    let params = fixed_length(args.output_len);
    for w in 0..args.num_iters_warmup {
        let prompts = random_prompts(args.batch_size, args.input_len, vocab, 1000 + w as u64);
        run_batch(engine, &prompts, &params, &format!("warmup{w}"))?;
    }
    let mut totals = Vec::new();
    let mut prefill = Vec::new();
    let mut decode_steps = Vec::new();
    for it in 0..args.num_iters {
        // Fresh prompts each iteration so the prefix cache does not skip the prefill.
        let prompts = random_prompts(args.batch_size, args.input_len, vocab, it as u64);
        let (total, first, steps) = run_batch(engine, &prompts, &params, &format!("iter{it}"))?;
        totals.push(total);
        prefill.push(first);
        decode_steps.extend(steps);
    }
    let mut sorted = totals.clone();
    sorted.sort_by(f64::total_cmp);
    decode_steps.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let avg = mean(&totals);
    let step_mean = mean(&decode_steps);
    let out_tokens = (args.batch_size * args.output_len) as f64;
    println!(
        "Avg latency: {avg:.4} s ({} x {} in / {} out); prefill step {:.4} s; decode step mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms; {:.2} output tokens/s, {:.2} prompt tokens/s in the prefill step",
        args.batch_size,
        args.input_len,
        args.output_len,
        mean(&prefill),
        step_mean * 1e3,
        percentile(&decode_steps, 50.0) * 1e3,
        percentile(&decode_steps, 99.0) * 1e3,
        out_tokens / avg,
        (args.batch_size * args.input_len) as f64 / mean(&prefill).max(1e-9),
    );
    let result = serde_json::json!({
        "avg_latency": avg,
        "latencies": totals,
        "percentiles": { "10": percentile(&sorted, 10.0), "50": percentile(&sorted, 50.0), "90": percentile(&sorted, 90.0), "99": percentile(&sorted, 99.0) },
        "prefill_step_seconds_mean": mean(&prefill),
        "decode_step_ms": { "mean": step_mean * 1e3, "p50": percentile(&decode_steps, 50.0) * 1e3, "p99": percentile(&decode_steps, 99.0) * 1e3 },
        "output_tokens_per_second": out_tokens / avg,
    });
    write_json(args.output_json.as_deref(), &result)
}
