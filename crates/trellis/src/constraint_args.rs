//! The structured-output flags of `trellis generate` and `trellis bench throughput`:
//! `--json-schema FILE | --regex R | --choice A,B | --grammar FILE` (one at most).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use trellis_engine::StructuredOutputsParams;

/// Constrain every output (vLLM's `structured_outputs`).
#[derive(Debug, Clone, Default, Args)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// Outputs are JSON matching the JSON schema in this file.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Outputs fully match this regular expression (Rust regex syntax).
    #[arg(long, value_name = "REGEX")]
    pub regex: Option<String>,
    /// Each output is one of these comma-separated strings.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
    pub choice: Option<Vec<String>>,
    /// Outputs follow the Lark grammar in this file (llguidance's syntax).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    /// The constraint, or `None` when no flag is given.
    pub fn to_params(&self) -> Result<Option<StructuredOutputsParams>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(if let Some(path) = &self.json_schema {
            let schema: serde_json::Value = serde_json::from_str(&read(path)?)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            Some(StructuredOutputsParams::json_schema(schema))
        } else if let Some(r) = &self.regex {
            Some(StructuredOutputsParams::regex(r.clone()))
        } else if let Some(c) = &self.choice {
            Some(StructuredOutputsParams::choice(c.clone()))
        } else if let Some(path) = &self.grammar {
            Some(StructuredOutputsParams::grammar(read(path)?))
        } else {
            None
        })
    }
}
