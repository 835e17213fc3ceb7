//! Command-line flags, by vLLM's names, and their conversion into engine and sampling configs.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use trellis_engine::{ConvertOption, EngineConfig, RunnerOption, SamplingParams};

/// Trellis: an LLM inference and serving engine with vLLM's design and extension system.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the OpenAI-compatible HTTP server (vLLM's `vllm serve`).
    Serve(Box<ServeArgs>),
    /// Generate completions offline for prompts given on the command line or in a JSONL file.
    Generate(GenerateArgs),
    /// Embed texts offline (a pooling model, or `--convert embed`): JSONL out, one line per
    /// prompt with its token ids and embedding.
    Embed(EmbedArgs),
    /// Benchmarks (vLLM's `vllm bench`).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Plugins: list what is discovered, build and install a plugin crate.
    #[command(subcommand)]
    Plugins(PluginsCommand),
}

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// Every discovered plugin: name, group, compiled in or from which folder, and its status
    /// (a header row, then tab-separated rows).
    List {
        /// One JSON array instead, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Build a plugin crate (cdylib) against this trellis and install it into the plugin
    /// directory (first entry of TRELLIS_PLUGIN_PATH, else $XDG_DATA_HOME/trellis/plugins,
    /// else ~/.local/share/trellis/plugins). Nothing is written into the crate's folder.
    Build {
        /// The plugin crate's directory.
        path: PathBuf,
        /// Where cargo compiles (default: CARGO_TARGET_DIR, else ~/.cache/trellis/plugin-target,
        /// shared by every plugin so that the dependencies are compiled once).
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// Build with the dev profile (`cargo build`, no `--release`): faster to compile, and
        /// with CARGO_TARGET_DIR pointing at an existing target directory already-built
        /// dependencies are reused. The fingerprint does not depend on the profile.
        #[arg(long)]
        debug: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Offline throughput: N random prompts of a given length, all submitted at once.
    Throughput(ThroughputArgs),
    /// Latency of one batch generating a fixed number of tokens, over several iterations.
    Latency(LatencyArgs),
    /// Load a running server (`trellis serve`) with streaming completions: throughput, TTFT, ITL.
    Serve(ServeBenchArgs),
}

/// Flags that build the engine (vLLM's engine arguments).
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file or a Hugging Face model directory. Default: SmolLM2-135M-Instruct Q4_1 in
    /// models/ (fetch it with scripts/fetch-model.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Longest sequence (prompt plus output) the engine accepts; default: the model's context.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences in one step.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens in one step.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Tokens per KV-cache block (default 16). Only a block size given here is checked against
    /// the attention backend's kernel block sizes, as in vLLM.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// KV-cache element type: auto (float16 where the attention backend keeps a 16-bit cache,
    /// as CPU_ATTN does; float32 for CPU_REFERENCE), float16 or bfloat16. A 16-bit cache holds
    /// twice the blocks in the same memory and halves what each decode step reads.
    #[arg(long, value_name = "auto|float16|bfloat16", default_value = "auto",
          value_parser = parse_kv_cache_dtype_flag)]
    pub kv_cache_dtype: String,
    /// KV-cache size in bytes (suffixes K, M, G accepted, e.g. 2G). Default:
    /// VLLM_CPU_KVCACHE_SPACE GiB, else 4 GiB.
    #[arg(long, value_parser = parse_bytes)]
    pub kv_cache_memory: Option<usize>,
    /// Reuse KV blocks of shared prompt prefixes (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Switch automatic prefix caching off.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Seed for requests that do not set their own.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Attention backend by name (case-insensitive, e.g. CPU_REFERENCE, or one a plugin
    /// registered), or `auto` to let the platform choose. The deprecated
    /// VLLM_ATTENTION_BACKEND is read when this flag is absent.
    #[arg(long, value_name = "NAME|auto")]
    pub attention_backend: Option<String>,
    /// Most completions one request may ask for (`n`); more is refused (400 on the server).
    #[arg(long, default_value_t = trellis_engine::DEFAULT_MAX_N)]
    pub max_n: usize,
    /// The runner: auto (generation for a model with a language-model head, pooling for an
    /// encoder such as BERT), generate, or pooling (embeddings).
    #[arg(long, default_value = "auto", value_parser = ["auto", "generate", "pooling"])]
    pub runner: String,
    /// Convert the model: auto, none, or embed (a generative model as an embedding model:
    /// last-token pooling, normalised).
    #[arg(long, default_value = "auto", value_parser = ["auto", "none", "embed"])]
    pub convert: String,
    #[command(flatten)]
    pub lora: crate::lora_args::LoraArgs,
}

/// Sampling flags (vLLM's `SamplingParams`).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Structured outputs.
    #[command(flatten)]
    pub constraint: crate::constraint_args::ConstraintArgs,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Most tokens to generate per completion.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Fewest tokens before EOS or a stop token may end a completion.
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 or -1: all).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub top_k: i32,
    /// Drop tokens less likely than min_p times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Per-request seed: the same seed gives the same tokens.
    #[arg(long)]
    pub sampling_seed: Option<u64>,
    /// Presence penalty (-2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Frequency penalty (-2..2).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Repetition penalty (> 0; 1 is off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// A stop string (repeat the flag for several).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Token ids that stop generation (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Return the top-N logprobs of each generated token.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Return the top-N logprobs of each prompt token.
    #[arg(long)]
    pub prompt_logprobs: Option<usize>,
    /// Keep special tokens in the output text.
    #[arg(long)]
    pub no_skip_special_tokens: bool,
    /// Keep a matched stop string at the end of the text.
    #[arg(long)]
    pub include_stop_str_in_output: bool,
    /// Logit bias as JSON, e.g. '{"42": -100}'.
    #[arg(long)]
    pub logit_bias: Option<String>,
}

/// `trellis serve [MODEL]`: vLLM's server flags.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A GGUF file or a Hugging Face model directory (same as --model).
    #[arg(value_name = "MODEL")]
    pub model_tag: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients put in `model` (default: the model path as given; the first of
    /// several is used).
    #[arg(long)]
    pub served_model_name: Vec<String>,
    /// Weights dtype: only float32 compute on CPU (auto, float32, float).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A Jinja chat template replacing the model's own: a file, or the template itself.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 routes.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Do not log one line per request.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Turn off the built-in stat loggers: the periodic stats line and the `vllm:` metrics of
    /// /metrics (stat-logger plugins still run).
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Most requests waiting for the running batch (each of a request's n completions
    /// counts); a request beyond it gets 503 with Retry-After instead of an unbounded queue.
    #[arg(long, default_value_t = trellis_engine::DEFAULT_MAX_WAITING_REQUESTS)]
    pub max_waiting_requests: usize,
    /// Most client connections open at once; one more is answered 503 with Retry-After and
    /// closed. Kept below the process's open-file limit.
    #[arg(long, default_value_t = trellis_server::conn::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, and may stay idle between
    /// requests, before it is closed (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
    #[arg(long, env = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", default_value_t = 5.0)]
    pub timeout_keep_alive: f64,
    /// Seconds a client may take to send a whole request body (408 after).
    #[arg(long, default_value_t = 60.0)]
    pub http_body_timeout: f64,
    /// The IO processor plugin (group `io_processor`, by entry name) that `/pooling` hands
    /// `data` requests to; wins over the `io_processor_plugin` key of the model's config.json.
    #[arg(long, value_name = "NAME")]
    pub io_processor_plugin: Option<String>,
    /// Allow `tool_choice: "auto"`: the model's tool calls are parsed with --tool-call-parser.
    #[arg(long, requires = "tool_call_parser")]
    pub enable_auto_tool_choice: bool,
    /// How the model writes tool calls (`hermes`: `<tool_call>{...}</tool_call>`).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(trellis_server::tool_calls::TOOL_CALL_PARSERS))]
    pub tool_call_parser: Option<String>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub prompts: PromptArgs,
}

/// Where the prompts of `generate` and `embed` come from and where the results go.
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// A prompt (repeat the flag for several).
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    pub prompt: Vec<String>,
    /// A JSONL file with one {"prompt": "..."} or {"prompt_token_ids": [...]} per line.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Write one JSON line per prompt here (generate: instead of printing the texts; embed:
    /// instead of stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub prompts: PromptArgs,
    /// L2-normalise (true/false); default: the model's pooler decides.
    #[arg(long)]
    pub normalize: Option<bool>,
}

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Number of prompts.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per prompt (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
    /// With a constraint: decode throughput constrained vs unconstrained, in one run, at batch
    /// 1 and 8 (the ratio is reported).
    #[command(flatten)]
    pub constraint: crate::constraint_args::ConstraintArgs,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests in the batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Measured iterations.
    #[arg(long, default_value_t = 3)]
    pub num_iters: usize,
    /// Warm-up iterations (not measured).
    #[arg(long, default_value_t = 1)]
    pub num_iters_warmup: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1usize << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size in bytes: {s:?} (examples: 512M, 2G, 1073741824)"))?;
    if v <= 0.0 {
        return Err(format!("the size must be positive, got {s:?}"));
    }
    Ok((v * mult as f64) as usize)
}

/// `--kv-cache-dtype`, checked when the flags are parsed (the value is kept as written).
fn parse_kv_cache_dtype_flag(value: &str) -> Result<String, String> {
    trellis_engine::parse_kv_cache_dtype(value).map(|_| value.to_string())
}

/// The default model: `models/SmolLM2-135M-Instruct.Q4_1.gguf` in the current directory or in
/// the repository this binary was built from.
pub fn default_model() -> Result<PathBuf> {
    const FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    let candidates = [
        PathBuf::from(FILE),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(FILE),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    bail!("the default model is not downloaded: run scripts/fetch-model.sh, or pass --model PATH")
}

impl EngineArgs {
    pub fn to_config(&self) -> Result<EngineConfig> {
        let model = match &self.model {
            Some(m) => m.clone(),
            None => default_model()?,
        };
        let mut c = EngineConfig::new(model);
        c.max_model_len = self.max_model_len;
        c.max_num_seqs = self.max_num_seqs;
        c.max_num_batched_tokens = self.max_num_batched_tokens;
        if let Some(b) = self.block_size {
            c.block_size = b;
            c.block_size_from_user = true;
        }
        c.kv_cache_memory = self.kv_cache_memory;
        c.kv_cache_dtype = trellis_engine::parse_kv_cache_dtype(&self.kv_cache_dtype)
            .map_err(anyhow::Error::msg)?;
        c.enable_prefix_caching = !self.no_enable_prefix_caching;
        c.seed = self.seed;
        c.attention_backend = self.attention_backend.clone();
        c.max_n = self.max_n;
        c.runner = RunnerOption::parse(&self.runner).map_err(anyhow::Error::msg)?;
        c.convert = ConvertOption::parse(&self.convert).map_err(anyhow::Error::msg)?;
        c.lora = self.lora.to_config()?;
        Ok(c)
    }
}

impl SamplingArgs {
    pub fn to_params(&self) -> Result<SamplingParams> {
        let logit_bias: HashMap<u32, f32> = match &self.logit_bias {
            None => HashMap::new(),
            Some(s) => {
                let raw: HashMap<String, f32> = serde_json::from_str(s)
                    .context("--logit-bias must be a JSON object of token id to bias")?;
                raw.into_iter()
                    .map(|(k, v)| {
                        k.parse::<u32>()
                            .map(|k| (k, v))
                            .with_context(|| format!("--logit-bias key {k:?} is not a token id"))
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(SamplingParams {
            n: self.n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.sampling_seed,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            max_tokens: Some(self.max_tokens),
            min_tokens: self.min_tokens,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            skip_special_tokens: !self.no_skip_special_tokens,
            include_stop_str_in_output: self.include_stop_str_in_output,
            logit_bias,
            structured_outputs: self.constraint.to_params()?.map(Box::new),
        })
    }
}

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model name to request; default: the first one /v1/models lists.
    #[arg(long)]
    pub model: Option<String>,
    /// Number of requests.
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Prompt length in tokens (random token ids).
    #[arg(long, default_value_t = 100)]
    pub input_len: usize,
    /// Tokens generated per request (EOS ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Requests per second (Poisson arrivals); default: all at once.
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Seed of the random prompts and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub output_json: Option<PathBuf>,
}
