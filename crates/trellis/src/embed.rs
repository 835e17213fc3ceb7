//! `trellis embed`: offline embeddings through the same engine the server uses (vLLM's
//! `LLM.embed`), one JSON line per prompt.

use std::io::Write;

use anyhow::{Context, Result};
use trellis_engine::{LLM, PoolingParams, PoolingRequestOutput};

use crate::args::EmbedArgs;
use crate::generate::{progress_bar, read_prompts};

fn output_json(out: &PoolingRequestOutput) -> serde_json::Value {
    serde_json::json!({
        "prompt_token_ids": out.prompt_token_ids,
        "embedding": out.outputs.data,
    })
}

pub fn run(args: EmbedArgs) -> Result<()> {
    let config = args.engine.to_config()?;
    let prompts = read_prompts(&args.prompts.prompt, args.prompts.input.as_deref())?;
    let mut llm = LLM::with_registries(config, &crate::platforms::engine_registries()?)?;
    let params = PoolingParams {
        normalize: args.normalize,
        ..PoolingParams::embed()
    };
    let bar = progress_bar(prompts.len());
    let outputs = llm.encode_each(&prompts, &params, |done, _| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut sink: Box<dyn Write> = match &args.prompts.output {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    for o in &outputs {
        writeln!(sink, "{}", output_json(o))?;
    }
    Ok(())
}
