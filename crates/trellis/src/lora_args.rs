//! The LoRA flags (vLLM's, spec §5.5): `--enable-lora`, `--lora-modules`, `--max-loras`,
//! `--max-lora-rank`, `--max-cpu-loras`, `--lora-dtype`, and `trellis generate --lora`.

use anyhow::Result;
use clap::Args;
use trellis_engine::{LoraConfig, LoraRequest};

/// LoRA flags, shared by every command that builds an engine.
#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    /// Serve LoRA adapters (a request's `model` names one).
    #[arg(long, overrides_with = "no_enable_lora")]
    pub enable_lora: bool,
    /// LoRA off (the default).
    #[arg(long)]
    pub no_enable_lora: bool,
    /// Adapters loaded at startup: `name=path`, or JSON `{"name": .., "path": ..,
    /// "base_model_name": ..}`; any failure stops startup.
    #[arg(long, num_args = 1.., value_parser = parse_lora_module)]
    pub lora_modules: Vec<LoraRequest>,
    /// Distinct adapters in one step (the slots of the adapter pool).
    #[arg(long, default_value_t = 1)]
    pub max_loras: usize,
    /// Largest adapter rank (1, 8, 16, 32, 64, 128, 256, 320, 512).
    #[arg(long, default_value_t = 16, value_parser = parse_max_lora_rank)]
    pub max_lora_rank: usize,
    /// Loaded adapters kept on the CPU (LRU; default: --max-loras; must be >= it).
    #[arg(long)]
    pub max_cpu_loras: Option<i64>,
    /// Adapter weights dtype: auto, float16 or bfloat16 (kept in float32 on CPU).
    #[arg(long, default_value = "auto", value_parser = ["auto", "float16", "bfloat16"])]
    pub lora_dtype: String,
    /// `trellis generate`: run every prompt with this adapter, `name=path` (implies
    /// --enable-lora).
    #[arg(long, value_name = "NAME=PATH", value_parser = parse_lora_module)]
    pub lora: Option<LoraRequest>,
}

impl LoraArgs {
    /// The engine's LoRA configuration (`None` without `--enable-lora`).
    pub fn to_config(&self) -> Result<Option<LoraConfig>> {
        if (!self.enable_lora && self.lora.is_none()) || self.no_enable_lora {
            return Ok(None);
        }
        let config = LoraConfig {
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            max_cpu_loras: self
                .max_cpu_loras
                .filter(|&n| n > 0)
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            lora_dtype: self.lora_dtype.clone(),
        };
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(config))
    }
}

/// `--max-lora-rank`: one of vLLM's choices.
fn parse_max_lora_rank(value: &str) -> Result<usize, String> {
    let choices = trellis_engine::lora::MAX_LORA_RANK_CHOICES;
    value
        .parse::<usize>()
        .ok()
        .filter(|r| choices.contains(r))
        .ok_or_else(|| format!("invalid choice: {value} (choose from {choices:?})"))
}

/// The `--lora-modules` adapters with ids 1, 2, ... (the offline commands' own numbering).
pub fn numbered(modules: &[LoraRequest]) -> Vec<LoraRequest> {
    modules
        .iter()
        .zip(1u32..)
        .map(|(m, id)| LoraRequest {
            lora_int_id: id,
            ..m.clone()
        })
        .collect()
}

/// One `--lora-modules` item (vLLM's `LoRAParserAction`).
pub fn parse_lora_module(value: &str) -> Result<LoraRequest, String> {
    let v = value.trim();
    if v.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(v)
            .map_err(|e| format!("Invalid JSON format for --lora-modules: {e}"))?;
        let obj = json
            .as_object()
            .ok_or_else(|| format!("Invalid fields for --lora-modules: {v}"))?;
        let allowed = ["name", "path", "base_model_name", "is_3d_lora_weight"];
        let field = |k: &str| obj.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(name), Some(path)) = (field("name"), field("path")) else {
            return Err(format!("Invalid fields for --lora-modules: {v}"));
        };
        if let Some(bad) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "Invalid fields for --lora-modules: unknown field {bad} in {v}"
            ));
        }
        return Ok(LoraRequest {
            lora_name: name,
            lora_path: path,
            base_model_name: field("base_model_name"),
            ..Default::default()
        });
    }
    match v.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(LoraRequest {
            lora_name: name.to_string(),
            lora_path: path.to_string(),
            ..Default::default()
        }),
        _ => Err(format!(
            "Invalid format for --lora-modules: {v} (expected name=path or a JSON object)"
        )),
    }
}

/// Whether `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is `1` or `true` (case-insensitive, trimmed).
pub fn runtime_lora_updating() -> bool {
    std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
}

/// The LoRA resolvers of `trellis serve`: the built-in filesystem resolver first
/// (`VLLM_LORA_RESOLVER_CACHE_DIR`, when `VLLM_PLUGINS` allows `lora_filesystem_resolver`),
/// then those plugins registered.
pub fn resolvers(
    from_plugins: &trellis_engine::LoraResolverRegistry,
) -> Result<trellis_engine::LoraResolverRegistry> {
    let mut out = trellis_engine::LoraResolverRegistry::default();
    let allowed = std::env::var("VLLM_PLUGINS").map_or(true, |v| {
        v.split(',').any(|p| p.trim() == "lora_filesystem_resolver")
    });
    let dir = std::env::var("VLLM_LORA_RESOLVER_CACHE_DIR").unwrap_or_default();
    if allowed && !dir.is_empty() {
        let fs = trellis_plugin::lora_fs_resolver::FilesystemResolver::new(&dir)
            .map_err(anyhow::Error::msg)?;
        out.register_resolver("Filesystem Resolver", std::sync::Arc::new(fs));
    }
    for (name, r) in from_plugins.resolvers() {
        out.register_resolver(&name, r);
    }
    Ok(out)
}
