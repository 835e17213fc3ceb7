//! `trellis generate`: offline generation through the same engine the server uses.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use trellis_engine::{LLM, LoraRequest, Prompt, RequestOutput};

use crate::args::GenerateArgs;

#[derive(serde::Deserialize)]
struct InputLine {
    prompt: Option<String>,
    prompt_token_ids: Option<Vec<u32>>,
}

/// The `--prompt` flags, or the prompts of the JSONL file `--input`.
pub fn read_prompts(prompt: &[String], input: Option<&Path>) -> Result<Vec<Prompt>> {
    let Some(path) = input else {
        return Ok(prompt.iter().cloned().map(Prompt::Text).collect());
    };
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: InputLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a JSON object with \"prompt\" or \"prompt_token_ids\"",
                path.display(),
                i + 1
            )
        })?;
        match (parsed.prompt, parsed.prompt_token_ids) {
            (Some(p), None) => prompts.push(Prompt::Text(p)),
            (None, Some(ids)) => prompts.push(Prompt::Tokens(ids)),
            _ => bail!(
                "{} line {}: give exactly one of \"prompt\" and \"prompt_token_ids\"",
                path.display(),
                i + 1
            ),
        }
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

fn output_json(out: &RequestOutput) -> serde_json::Value {
    serde_json::json!({
        "prompt": out.prompt,
        "prompt_token_ids": out.prompt_token_ids,
        "prompt_logprobs": out.prompt_logprobs,
        "num_cached_tokens": out.num_cached_tokens,
        "error": out.error,
        "outputs": out.outputs,
    })
}

/// A progress bar of `n` requests on a terminal (none for one request or without a terminal).
pub fn progress_bar(n: usize) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || n <= 1 {
        return None;
    }
    let b = ProgressBar::new(n as u64);
    b.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    Some(b)
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let params = args.sampling.to_params()?;
    let prompts = read_prompts(&args.prompts.prompt, args.prompts.input.as_deref())?;
    let mut llm = LLM::with_registries(config, &crate::platforms::engine_registries()?)?;
    let bar = progress_bar(prompts.len());
    let all = vec![params; prompts.len()];
    let lora = args.engine.lora.lora.clone().map(|l| LoraRequest {
        lora_int_id: 1,
        ..l
    });
    let loras = vec![lora; prompts.len()];
    let outputs = llm.generate_lora(&prompts, &all, &loras, |done, _| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match &args.prompts.output {
        Some(path) => {
            let mut f = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            for o in &outputs {
                writeln!(f, "{}", output_json(o))?;
            }
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            for o in &outputs {
                for c in &o.outputs {
                    writeln!(stdout, "{}", c.text)?;
                }
            }
        }
    }
    Ok(())
}
