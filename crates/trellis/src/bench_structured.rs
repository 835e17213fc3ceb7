//! `trellis bench throughput --json-schema FILE` (or `--regex`, `--choice`, `--grammar`):
//! decode throughput with the constraint against without it, in one run, at batch 1 and 8.
//!
//! Only decode steps in which every request of the batch produced a token are counted, so a
//! constrained request that ends early (its grammar complete) does not make the batch look
//! cheaper; the prompts are the same random ones for both sides.

use std::time::Instant;

use anyhow::Result;
use trellis_engine::{LLMEngine, SamplingParams, StructuredOutputsParams};

use crate::args::ThroughputArgs;
use crate::bench::{fixed_length, random_prompts, write_json};

/// Decode tokens per second over the full-batch decode steps, and how many steps counted.
fn decode_rate(
    engine: &mut LLMEngine,
    batch: usize,
    args: &ThroughputArgs,
    params: &SamplingParams,
    tag: &str,
) -> Result<(f64, usize)> {
    let vocab = engine.config().model.vocab_size;
    let prompts = random_prompts(batch, args.input_len, vocab, 7);
    for (i, p) in prompts.iter().enumerate() {
        engine.add_request(&format!("{tag}-{i}"), p.clone(), params.clone())?;
    }
    let (mut tokens, mut seconds, mut steps) = (0usize, 0f64, 0usize);
    let mut first = true;
    while engine.has_unfinished_requests() {
        let t = Instant::now();
        let updates = engine.step()?;
        let dt = t.elapsed().as_secs_f64();
        let produced: usize = updates
            .iter()
            .flat_map(|u| &u.deltas)
            .map(|d| d.token_ids.len())
            .sum();
        // The first step computes the prompts; later full-batch steps are decode.
        if !first && produced == batch {
            tokens += produced;
            seconds += dt;
            steps += 1;
        }
        first = false;
    }
    Ok((tokens as f64 / seconds.max(1e-9), steps))
}

/// Runs both sides at batch 1 and 8 and prints the ratios.
pub fn compare(
    engine: &mut LLMEngine,
    args: &ThroughputArgs,
    constraint: StructuredOutputsParams,
) -> Result<()> {
    let plain = fixed_length(args.output_len);
    let constrained = SamplingParams {
        ignore_eos: false,
        structured_outputs: Some(Box::new(constraint)),
        ..plain.clone()
    };
    // Warm-up: compiles the grammar (cached afterwards) and touches every buffer once.
    decode_rate(engine, 1, args, &constrained, "warmup-c")?;
    decode_rate(engine, 1, args, &plain, "warmup-u")?;
    let mut rows = Vec::new();
    for batch in [1usize, 8] {
        let (u, u_steps) = decode_rate(engine, batch, args, &plain, &format!("u{batch}"))?;
        let (c, c_steps) = decode_rate(engine, batch, args, &constrained, &format!("c{batch}"))?;
        println!(
            "Batch {batch}: unconstrained {u:.1} tok/s ({u_steps} steps), constrained {c:.1} tok/s \
             ({c_steps} steps), ratio {:.3}",
            c / u
        );
        rows.push(serde_json::json!({
            "batch_size": batch,
            "unconstrained_decode_tokens_per_second": u,
            "constrained_decode_tokens_per_second": c,
            "unconstrained_steps": u_steps,
            "constrained_steps": c_steps,
            "ratio": c / u,
        }));
    }
    write_json(
        args.output_json.as_deref(),
        &serde_json::json!({"structured_outputs": rows}),
    )
}
