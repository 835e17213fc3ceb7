//! `trellis bench throughput` and `trellis bench latency` (vLLM's `vllm bench`).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use trellis_engine::sampler::Generator;
use trellis_engine::{LLM, LLMEngine, PoolingParams, Prompt, RunnerType, SamplingParams};

use crate::args::{LatencyArgs, ThroughputArgs};
use crate::machine::{self, Machine, ModelCost};

/// The machine's figures (measured now, before the model loads) and the model's cost per
/// token; `None` for the cost when the weights cannot be read for it (the bench still runs).
fn probe(model: &Path) -> (Machine, Option<ModelCost>) {
    let m = Machine::probe();
    println!(
        "Machine: {} threads ({}), {:.1} GB/s streaming read over {} MiB, int8 peak {:.0} Gop/s",
        m.threads,
        trellis_kernels::cpu::feature_summary(),
        m.read_bytes_per_s / 1e9,
        m.buffer_bytes >> 20,
        m.int8_ops_per_s / 1e9,
    );
    let cost = match machine::model_cost(model) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("note: no bandwidth/ops figures: {e:#}");
            None
        }
    };
    (m, cost)
}

/// Random prompts of `len` token ids (vLLM's random dataset), reproducible from `seed`.
pub(crate) fn random_prompts(n: usize, len: usize, vocab: usize, seed: u64) -> Vec<Prompt> {
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

pub(crate) fn fixed_length(output_len: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        max_tokens: Some(output_len),
        ..Default::default()
    }
}

pub(crate) fn write_json(path: Option<&Path>, value: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(value)?)?;
    }
    Ok(())
}

pub fn throughput(args: ThroughputArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let (machine, cost) = probe(&config.model);
    let mut llm = LLM::with_registries(config, &crate::platforms::engine_registries()?)?;
    let engine = llm.engine();
    let vocab = engine.config().model.vocab_size;
    let prompts = random_prompts(args.num_prompts, args.input_len, vocab, 0);
    if engine.config().runner == RunnerType::Pooling {
        return pooling_throughput(engine, &prompts, &args);
    }
    if let Some(constraint) = args.constraint.to_params()? {
        return crate::bench_structured::compare(engine, &args, constraint);
    }
    let params = fixed_length(args.output_len);
    // With --enable-lora --lora-modules, the requests take the adapters in turn, and the same
    // engine also runs the base model on other prompts of the same shape, alternately, so the
    // ratio comes from one run.
    let loras = crate::lora_args::numbered(&args.engine.lora.lora_modules);
    if !loras.is_empty() {
        return lora_throughput(engine, &args, &params, &loras);
    }
    let Pass {
        elapsed,
        steps,
        requests: outputs_len,
        prompt_tokens,
        output_tokens,
    } = run_pass(engine, &prompts, &params, &[], "tp")?;
    let mut result = serde_json::json!({
        "elapsed_time": elapsed,
        "num_steps": steps,
        "num_requests": outputs_len,
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": outputs_len as f64 / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) as f64 / elapsed,
        "prompt_tokens_per_second": prompt_tokens as f64 / elapsed,
        "output_tokens_per_second": output_tokens as f64 / elapsed,
    });
    println!(
        "Throughput: {:.2} requests/s, {:.2} total tokens/s, {:.2} output tokens/s ({} prompts x {} in / {} out, {:.2} s)",
        outputs_len as f64 / elapsed,
        (prompt_tokens + output_tokens) as f64 / elapsed,
        output_tokens as f64 / elapsed,
        args.num_prompts,
        args.input_len,
        args.output_len,
        elapsed
    );
    result["machine"] = machine.to_json();
    if let Some(cost) = cost {
        let steps_per_s = steps as f64 / elapsed;
        let ops = Machine::ops(&cost, (prompt_tokens + output_tokens) as f64 / elapsed);
        println!(
            "{}",
            machine.bandwidth_line(&cost, steps_per_s, &format!("over {steps} steps"))
        );
        println!("{}", machine::ops_line(&machine, &[("all tokens", ops)]));
        result["achieved"] = achieved_json(&machine, &cost, steps_per_s, &[("all_tokens", ops)]);
    }
    write_json(args.output_json.as_deref(), &result)
}

/// What one pass of `bench throughput` did.
struct Pass {
    elapsed: f64,
    steps: usize,
    requests: usize,
    prompt_tokens: usize,
    output_tokens: usize,
}

/// What `LLM::generate` does, counting the engine steps (each reads the weights once); the
/// requests take `loras` in turn (none when empty).
fn run_pass(
    engine: &mut LLMEngine,
    prompts: &[Prompt],
    params: &SamplingParams,
    loras: &[trellis_engine::LoraRequest],
    tag: &str,
) -> Result<Pass> {
    for (i, p) in prompts.iter().enumerate() {
        let lora = (!loras.is_empty()).then(|| loras[i % loras.len()].clone());
        engine.add_request_lora(
            &format!("{tag}-{i}"),
            p.clone(),
            params.clone(),
            (0, 0.0),
            lora,
        )?;
    }
    let start = Instant::now();
    let mut outputs = Vec::with_capacity(prompts.len());
    let mut steps = 0usize;
    while engine.has_unfinished_requests() {
        steps += 1;
        outputs.extend(engine.step()?.into_iter().filter_map(|u| u.finished));
    }
    Ok(Pass {
        elapsed: start.elapsed().as_secs_f64(),
        steps,
        requests: outputs.len(),
        prompt_tokens: outputs.iter().map(|o| o.prompt_token_ids.len()).sum(),
        output_tokens: outputs
            .iter()
            .flat_map(|o| &o.outputs)
            .map(|c| c.token_ids.len())
            .sum(),
    })
}

/// `bench throughput --enable-lora --lora-modules ...`: the base model and the adapters (in
/// turn over the requests) on the same engine, alternately for `ROUNDS` rounds, each pass on
/// fresh prompts (so the prefix cache skips nothing); prints both rates and their ratio.
fn lora_throughput(
    engine: &mut LLMEngine,
    args: &ThroughputArgs,
    params: &SamplingParams,
    loras: &[trellis_engine::LoraRequest],
) -> Result<()> {
    const ROUNDS: usize = 3;
    let vocab = engine.config().model.vocab_size;
    // Warm-up: loads every adapter into its slot and touches every buffer once.
    let warm = random_prompts(loras.len(), args.input_len.min(16), vocab, 9000);
    run_pass(engine, &warm, &fixed_length(2), loras, "warm")?;
    let (mut base, mut with) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (side, out) in [("base", &mut base), ("lora", &mut with)] {
            let seed = 100 + (2 * round + usize::from(side == "lora")) as u64;
            let prompts = random_prompts(args.num_prompts, args.input_len, vocab, seed);
            let adapters = if side == "lora" { loras } else { &[] };
            let p = run_pass(
                engine,
                &prompts,
                params,
                adapters,
                &format!("{side}{round}"),
            )?;
            let rate = p.output_tokens as f64 / p.elapsed;
            println!(
                "Round {round}, {side}: {:.2} output tokens/s, {:.2} total tokens/s ({} requests, {:.2} s)",
                rate,
                (p.prompt_tokens + p.output_tokens) as f64 / p.elapsed,
                p.requests,
                p.elapsed
            );
            out.push(rate);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (b, l) = (mean(&base), mean(&with));
    let names: Vec<&str> = loras.iter().map(|r| r.lora_name.as_str()).collect();
    println!(
        "LoRA throughput: {l:.2} output tokens/s with {} adapters ({}) against {b:.2} for the base model in the same run: ratio {:.3} ({} prompts x {} in / {} out, {ROUNDS} rounds)",
        loras.len(),
        names.join(", "),
        l / b,
        args.num_prompts,
        args.input_len,
        args.output_len,
    );
    let result = serde_json::json!({
        "base_output_tokens_per_second": base,
        "lora_output_tokens_per_second": with,
        "ratio": l / b,
        "adapters": names,
    });
    write_json(args.output_json.as_deref(), &result)
}

/// `bench throughput` on a pooling model (`--runner pooling`, `--convert embed`, or an
/// encoder): every prompt embedded, all submitted at once; embeddings per second.
fn pooling_throughput(
    engine: &mut LLMEngine,
    prompts: &[Prompt],
    args: &ThroughputArgs,
) -> Result<()> {
    for (i, p) in prompts.iter().enumerate() {
        engine.add_pooling_request(
            &format!("tp-{i}"),
            p.clone(),
            PoolingParams::embed(),
            0,
            0.0,
        )?;
    }
    let start = Instant::now();
    let (mut done, mut steps, mut tokens) = (0usize, 0usize, 0usize);
    while engine.has_unfinished_requests() {
        steps += 1;
        for out in engine.step()?.into_iter().filter_map(|u| u.pooling) {
            done += 1;
            tokens += out.prompt_token_ids.len();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "Throughput: {:.2} embeddings/s, {:.2} prompt tokens/s ({} prompts x {} tokens, {steps} steps, {:.2} s)",
        done as f64 / elapsed,
        tokens as f64 / elapsed,
        args.num_prompts,
        args.input_len,
        elapsed
    );
    let result = serde_json::json!({
        "runner": "pooling",
        "elapsed_time": elapsed,
        "num_steps": steps,
        "num_requests": done,
        "requests_per_second": done as f64 / elapsed,
        "prompt_tokens_per_second": tokens as f64 / elapsed,
    });
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

fn achieved_json(
    machine: &Machine,
    cost: &ModelCost,
    steps_per_s: f64,
    ops: &[(&str, f64)],
) -> serde_json::Value {
    let bw = cost.weight_bytes as f64 * steps_per_s;
    let mut v = serde_json::json!({
        "weight_bytes": cost.weight_bytes,
        "params": cost.params,
        "memory_bandwidth_gb_per_s": bw / 1e9,
        "memory_bandwidth_fraction": bw / machine.read_bytes_per_s.max(1.0),
    });
    for (label, o) in ops {
        v[format!("int8_gops_per_s_{label}")] = serde_json::json!(o / 1e9);
    }
    v
}

pub fn latency(args: LatencyArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let (machine, cost) = probe(&config.model);
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
    let prefill_mean = mean(&prefill);
    let mut result = serde_json::json!({
        "avg_latency": avg,
        "latencies": totals,
        "percentiles": { "10": percentile(&sorted, 10.0), "50": percentile(&sorted, 50.0), "90": percentile(&sorted, 90.0), "99": percentile(&sorted, 99.0) },
        "prefill_step_seconds_mean": mean(&prefill),
        "decode_step_ms": { "mean": step_mean * 1e3, "p50": percentile(&decode_steps, 50.0) * 1e3, "p99": percentile(&decode_steps, 99.0) * 1e3 },
        "output_tokens_per_second": out_tokens / avg,
        "prompt_tokens_per_second": (args.batch_size * args.input_len) as f64 / prefill_mean.max(1e-9),
        "decode_tokens_per_second": if step_mean > 0.0 { args.batch_size as f64 / step_mean } else { 0.0 },
        "machine": machine.to_json(),
    });
    if let Some(cost) = cost {
        // Decode steps read the weights once each; the prefill step pushes the whole prompt
        // through them.
        let decode_ops = if step_mean > 0.0 {
            Machine::ops(&cost, args.batch_size as f64 / step_mean)
        } else {
            0.0
        };
        let prefill_ops = Machine::ops(
            &cost,
            (args.batch_size * args.input_len) as f64 / prefill_mean.max(1e-9),
        );
        let steps_per_s = if step_mean > 0.0 {
            1.0 / step_mean
        } else {
            0.0
        };
        println!(
            "{}",
            machine.bandwidth_line(&cost, steps_per_s, "in decode")
        );
        let parts = [("decode", decode_ops), ("prefill", prefill_ops)];
        println!("{}", machine::ops_line(&machine, &parts));
        result["achieved"] = achieved_json(&machine, &cost, steps_per_s, &parts);
    }
    write_json(args.output_json.as_deref(), &result)
}
