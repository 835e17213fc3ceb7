//! `EngineConfig`: raw settings validated once into what each component needs.

use std::path::PathBuf;

use candle_core::DType;

use trellis_sched::SchedulingPolicy;

/// Who drives the engine: it picks vLLM's CPU defaults for the step budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageContext {
    /// The offline `LLM` class / `trellis generate`: 4096 tokens and 256 sequences a step.
    #[default]
    Offline,
    /// The OpenAI server: 2048 tokens and 128 sequences a step.
    Server,
}

/// Default KV-cache size on CPU: vLLM's `VLLM_CPU_KVCACHE_SPACE` default of 4 GiB.
pub const DEFAULT_KV_CACHE_BYTES: usize = 4 << 30;

/// Everything needed to build an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// A GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// Longest sequence; defaults to the model's context length.
    pub max_model_len: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Whether the user chose [`EngineConfig::block_size`] (`--block-size`): only then does
    /// the attention selector check backends against it (vLLM, spec §3.3).
    pub block_size_from_user: bool,
    /// Element type of the KV cache (`--kv-cache-dtype`); `None` is vLLM's `auto`: f16 when
    /// the attention backend supports it (CPU_ATTN; vLLM's CPU backend keeps the model's bf16,
    /// llama.cpp f16), else f32. Memory accounting uses its size, so f16/bf16 fit twice the
    /// blocks of f32 in the same budget.
    pub kv_cache_dtype: Option<DType>,
    /// KV-cache budget in bytes (`--kv-cache-memory`); defaults to `VLLM_CPU_KVCACHE_SPACE`
    /// GiB, else 4 GiB.
    pub kv_cache_memory: Option<usize>,
    /// Exact number of KV blocks, overriding the memory budget (vLLM's
    /// `num_gpu_blocks_override`; tests use it to force preemption).
    pub num_kv_blocks: Option<usize>,
    /// Most sequences a step (`--max-num-seqs`).
    pub max_num_seqs: Option<usize>,
    /// Token budget a step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: Option<usize>,
    /// Automatic prefix caching.
    pub enable_prefix_caching: bool,
    /// Admission order.
    pub scheduling_policy: SchedulingPolicy,
    /// Seed for requests without their own seed.
    pub seed: u64,
    /// Offline or server defaults.
    pub usage: UsageContext,
    /// Attention backend by registry name (`--attention-backend`, case-insensitive); `None` or
    /// `auto` chooses automatically from the platform's priority list.
    pub attention_backend: Option<String>,
    /// The name clients use (`--served-model-name`): the `model_name` label of the Prometheus
    /// metrics. Defaults to the model path.
    pub served_model_name: Option<String>,
    /// No built-in stat loggers (`--disable-log-stats`): no periodic stats line and no
    /// `vllm:` metrics, unless a stat-logger plugin is present (then only the line is off).
    /// Only the serving engine ([`crate::AsyncLLM`]) logs stats.
    pub disable_log_stats: bool,
    /// Most completions one request may ask for (`n`; `--max-n`, default
    /// [`DEFAULT_MAX_N`], OpenAI's own limit): more is refused as an invalid `n`.
    pub max_n: usize,
    /// Most requests (counting each of a request's `n` completions) that may wait for the
    /// running batch (`--max-waiting-requests`); a request that would exceed it is refused as
    /// [`crate::EngineError::QueueFull`] (503 in `trellis serve`). `None`: unbounded (offline).
    pub max_waiting_requests: Option<usize>,
    /// Which runner (`--runner`): generation or pooling; `auto` follows the model.
    pub runner: RunnerOption,
    /// Turn the model into another kind (`--convert`): `embed` makes a generative model an
    /// embedding model (last-token pooling, normalised), as vLLM does.
    pub convert: ConvertOption,
    /// The IO processor plugin `LLM::encode_plugin` hands `data` to (vLLM's
    /// `LLM(io_processor_plugin=...)`); wins over the `io_processor_plugin` key of the model's
    /// config.json. `trellis serve` takes `--io-processor-plugin`.
    pub io_processor_plugin: Option<String>,
    /// LoRA (`--enable-lora` and its knobs); `None`: off, and a request with an adapter is
    /// refused.
    pub lora: Option<crate::lora::LoraConfig>,
}

/// `--runner` (vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunnerOption {
    /// Generation for a model with a language-model head, pooling otherwise.
    #[default]
    Auto,
    /// Generation.
    Generate,
    /// Pooling (embeddings).
    Pooling,
}

/// `--convert` (vLLM's names; Trellis converts to `embed` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvertOption {
    /// As the runner needs: a generative model under `--runner pooling` becomes `embed`.
    #[default]
    Auto,
    /// No conversion.
    None,
    /// An embedding model: last-token pooling, normalised.
    Embed,
}

/// The runner an engine runs (vLLM's `runner_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerType {
    /// Generation: logits and sampling.
    Generate,
    /// Pooling: one pooled vector per request, prefill only.
    Pooling,
}

impl RunnerOption {
    /// Parses `auto`, `generate` or `pooling`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "generate" => Ok(Self::Generate),
            "pooling" => Ok(Self::Pooling),
            other => Err(format!(
                "unsupported runner '{other}', expected one of: auto, generate, pooling"
            )),
        }
    }
}

impl ConvertOption {
    /// Parses `auto`, `none` or `embed`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            "embed" => Ok(Self::Embed),
            other => Err(format!(
                "unsupported convert '{other}', expected one of: auto, none, embed"
            )),
        }
    }
}

/// The default of [`EngineConfig::max_n`].
pub const DEFAULT_MAX_N: usize = 128;

/// The default of `--max-waiting-requests` for `trellis serve`: a burst of a few thousand
/// requests is held, not an unbounded queue.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 4096;

/// The values `--kv-cache-dtype` accepts (vLLM's names).
pub const KV_CACHE_DTYPES: &[&str] = &["auto", "float16", "bfloat16"];

/// Parses a `--kv-cache-dtype` value: `auto` (the model's dtype) is `None`; `float16` (or
/// `half`, `fp16`) and `bfloat16` (or `bf16`) are the 16-bit caches; `float32` is accepted too.
pub fn parse_kv_cache_dtype(value: &str) -> Result<Option<DType>, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "float16" | "half" | "fp16" => Ok(Some(DType::F16)),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        "float32" | "float" | "fp32" => Ok(Some(DType::F32)),
        _ => Err(format!(
            "unsupported KV cache dtype '{value}', expected one of: {}",
            KV_CACHE_DTYPES.join(", ")
        )),
    }
}

impl EngineConfig {
    /// Defaults for a model path.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineConfig {
            model: model.into(),
            max_model_len: None,
            block_size: 16,
            block_size_from_user: false,
            kv_cache_dtype: None,
            kv_cache_memory: None,
            num_kv_blocks: None,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            enable_prefix_caching: true,
            scheduling_policy: SchedulingPolicy::Fcfs,
            seed: 0,
            usage: UsageContext::Offline,
            attention_backend: None,
            served_model_name: None,
            disable_log_stats: false,
            max_n: DEFAULT_MAX_N,
            max_waiting_requests: None,
            runner: RunnerOption::Auto,
            convert: ConvertOption::Auto,
            io_processor_plugin: None,
            lora: None,
        }
    }

    /// The KV-cache budget: the flag, else `VLLM_CPU_KVCACHE_SPACE` (GiB), else 4 GiB.
    pub fn kv_cache_bytes(&self) -> Result<usize, String> {
        if let Some(b) = self.kv_cache_memory {
            return Ok(b);
        }
        match std::env::var("VLLM_CPU_KVCACHE_SPACE") {
            Ok(v) if !v.trim().is_empty() => {
                let gib: f64 = v.trim().parse().map_err(|_| {
                    format!("VLLM_CPU_KVCACHE_SPACE must be a number of GiB, got {v:?}")
                })?;
                if gib <= 0.0 {
                    return Ok(DEFAULT_KV_CACHE_BYTES);
                }
                Ok((gib * (1u64 << 30) as f64) as usize)
            }
            _ => Ok(DEFAULT_KV_CACHE_BYTES),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_dtype_values() {
        assert_eq!(parse_kv_cache_dtype("auto"), Ok(None));
        assert_eq!(parse_kv_cache_dtype("float16"), Ok(Some(DType::F16)));
        assert_eq!(parse_kv_cache_dtype("BFloat16"), Ok(Some(DType::BF16)));
        let e = parse_kv_cache_dtype("fp8").err().unwrap_or_default();
        assert_eq!(
            e,
            "unsupported KV cache dtype 'fp8', expected one of: auto, float16, bfloat16"
        );
    }
}
