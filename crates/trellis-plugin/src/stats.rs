//! Stat loggers (vLLM's `StatLoggerBase`, spec §7) and the stats the engine hands them.
//!
//! The engine records after every step: [`SchedulerStats`] (the scheduler's state now, and
//! the prefix-cache lookups of this step) and [`IterationStats`] (tokens, latencies and the
//! requests that finished in this step). Every `VLLM_LOG_STATS_INTERVAL` seconds it calls
//! [`StatLogger::log`]. A stat-logger plugin (group `stat_logger`) registers a
//! [`StatLoggerFactory`] through [`crate::Registrar::register_stat_logger`]; the engine
//! builds one logger per engine from it with the [`StatLoggerConfig`], and custom loggers
//! run before the built-in logging and Prometheus loggers.
//!
//! As in vLLM, the stats structs are not a stable interface: fields may be added.

use std::sync::Arc;

pub use trellis_sched::FinishReason;

/// Prefix-cache lookups of one step (vLLM's `PrefixCacheStats`), in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// The prefix cache was reset before this step.
    pub reset: bool,
    /// Requests that looked up the cache this step.
    pub requests: u64,
    /// Tokens they looked up.
    pub queries: u64,
    /// Tokens found in the cache.
    pub hits: u64,
}

/// The scheduler's state after a step (vLLM's `SchedulerStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    /// Requests in the running batch.
    pub num_running_reqs: usize,
    /// Requests waiting (including preempted ones).
    pub num_waiting_reqs: usize,
    /// Steps run so far.
    pub step_counter: u64,
    /// Fraction of KV blocks in use, 0..=1.
    pub kv_cache_usage: f64,
    /// Prefix-cache lookups of this step.
    pub prefix_cache_stats: PrefixCacheStats,
}

/// Where the prompt tokens of the requests that started this step came from (vLLM's
/// `PromptTokenStats`).
///
/// `computed + local_cache_hit + external_kv_transfer - recomputed_tokens == total` and
/// `local_cache_hit + external_kv_transfer - recomputed_tokens == cached_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptTokenStats {
    /// Tokens prefilled by the model (the actual compute).
    pub computed: u64,
    /// Tokens found in the local prefix cache.
    pub local_cache_hit: u64,
    /// Tokens received from an external KV transfer (always 0 here: no KV connector).
    pub external_kv_transfer: u64,
    /// Tokens skipped in prefill.
    pub cached_tokens: u64,
    /// Cached tokens computed again (the last prompt token when the whole prompt was cached).
    pub recomputed_tokens: u64,
    /// All prompt tokens.
    pub total: u64,
}

impl PromptTokenStats {
    /// The `source` label values of `vllm:prompt_tokens_by_source`, in vLLM's order.
    pub const ALL_SOURCES: [&'static str; 3] =
        ["local_compute", "local_cache_hit", "external_kv_transfer"];

    /// Adds one request whose prefill produced its first token: `prompt_len` tokens of which
    /// `num_cached_tokens` came from the prefix cache.
    pub fn add_request(&mut self, num_cached_tokens: usize, prompt_len: usize) {
        let (cached, len) = (num_cached_tokens as u64, prompt_len as u64);
        // A fully cached prompt still computes its last token (the scheduler always leaves
        // one to run); vLLM counts that token as a recomputed cache hit.
        let recomputed = u64::from(cached + 1 == len);
        self.computed += len.saturating_sub(cached);
        self.local_cache_hit += cached + recomputed;
        self.cached_tokens += cached;
        self.recomputed_tokens += recomputed;
        self.total += len;
    }

    /// The count for one of [`Self::ALL_SOURCES`] (0 for anything else).
    pub fn by_source(&self, source: &str) -> u64 {
        match source {
            "local_compute" => self.computed,
            "local_cache_hit" => self.local_cache_hit,
            "external_kv_transfer" => self.external_kv_transfer,
            _ => 0,
        }
    }
}

/// A request that finished in this step (vLLM's `FinishedRequestStats`). Times are in
/// seconds; the phases a request never reached are 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinishedRequestStats {
    /// Why it finished.
    pub finish_reason: FinishReason,
    /// Arrival to finish.
    pub e2e_latency: f64,
    /// Prompt length.
    pub num_prompt_tokens: usize,
    /// Tokens generated.
    pub num_generation_tokens: usize,
    /// The request's `max_tokens`, when it set one.
    pub max_tokens_param: Option<usize>,
    /// Queued until first scheduled.
    pub queued_time: f64,
    /// First scheduled until the first token.
    pub prefill_time: f64,
    /// First token until the last token.
    pub decode_time: f64,
    /// First scheduled until the last token.
    pub inference_time: f64,
    /// `decode_time / (num_generation_tokens - 1)`, 0 with fewer than two tokens.
    pub mean_time_per_output_token: f64,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
}

/// What one step did (vLLM's `IterationStats`). The engine reuses one value step after step
/// ([`IterationStats::clear`] keeps the allocations).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IterationStats {
    /// Wall-clock time of the step's outputs (seconds since the Unix epoch).
    pub iteration_timestamp: f64,
    /// Tokens generated in this step.
    pub num_generation_tokens: usize,
    /// Prompt tokens of the requests whose prefill finished in this step.
    pub prompt_token_stats: PromptTokenStats,
    /// Requests preempted in this step.
    pub num_preempted_reqs: usize,
    /// Requests that finished in this step.
    pub finished_requests: Vec<FinishedRequestStats>,
    /// For each request (all its `n` samples) that finished: its longest output.
    pub max_num_generation_tokens_iter: Vec<usize>,
    /// For each request (all its `n` samples) that finished: its `n`.
    pub n_params_iter: Vec<usize>,
    /// Time to first token (arrival to first token) of requests that got it this step.
    pub time_to_first_tokens_iter: Vec<f64>,
    /// Inter-token latency of every decoding request this step.
    pub inter_token_latencies_iter: Vec<f64>,
    /// One reason per request refused at admission since the previous record (vLLM's
    /// `record_admission_rejection`): `queue_full`, `n_limit` or `platform`.
    pub admission_rejections: Vec<&'static str>,
}

impl IterationStats {
    /// All prompt tokens (vLLM's `num_prompt_tokens`).
    pub fn num_prompt_tokens(&self) -> u64 {
        self.prompt_token_stats.total
    }

    /// Empties it for the next step, keeping the allocations.
    pub fn clear(&mut self) {
        self.iteration_timestamp = 0.0;
        self.num_generation_tokens = 0;
        self.prompt_token_stats = PromptTokenStats::default();
        self.num_preempted_reqs = 0;
        self.finished_requests.clear();
        self.max_num_generation_tokens_iter.clear();
        self.n_params_iter.clear();
        self.time_to_first_tokens_iter.clear();
        self.inter_token_latencies_iter.clear();
        self.admission_rejections.clear();
    }

    /// True when the step did nothing worth recording.
    pub fn is_empty(&self) -> bool {
        self.num_generation_tokens == 0
            && self.prompt_token_stats.total == 0
            && self.num_preempted_reqs == 0
            && self.finished_requests.is_empty()
            && self.n_params_iter.is_empty()
            && self.admission_rejections.is_empty()
    }
}

/// What a stat logger is built with: the part of vLLM's `VllmConfig` loggers read.
#[derive(Debug, Clone, PartialEq)]
pub struct StatLoggerConfig {
    /// The model name clients use (`--served-model-name`, else the model path): Prometheus's
    /// `model_name` label.
    pub served_model_name: String,
    /// The model path.
    pub model: String,
    /// Longest sequence (prompt plus output).
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache (vLLM's `num_gpu_blocks`, whatever the device).
    pub num_gpu_blocks: usize,
    /// KV-cache element type (`auto` = the model's compute type).
    pub cache_dtype: String,
    /// Automatic prefix caching on.
    pub enable_prefix_caching: bool,
    /// Most sequences a step.
    pub max_num_seqs: usize,
    /// Token budget a step.
    pub max_num_batched_tokens: usize,
    /// The platform's device type (`cpu`, `cuda`, ...).
    pub device_type: String,
    /// Seconds between two [`StatLogger::log`] calls (`VLLM_LOG_STATS_INTERVAL`).
    pub log_stats_interval: f64,
}

/// A stat logger (vLLM's `StatLoggerBase`). One is built per engine; all its calls come from
/// that engine's thread.
pub trait StatLogger: Send {
    /// The stats of one step (`None` for what is not known this time). `engine_idx` is the
    /// index of the engine that ran it.
    fn record(
        &mut self,
        scheduler_stats: Option<&SchedulerStats>,
        iteration_stats: Option<&IterationStats>,
        engine_idx: usize,
    );

    /// Called once, after the engine is built (the KV-cache size is known).
    fn log_engine_initialized(&mut self);

    /// Called every `VLLM_LOG_STATS_INTERVAL` seconds, busy or idle: flush or print here.
    fn log(&mut self) {}

    /// The engine went to sleep (`is_awake == 0`, with a sleep `level`) or woke up.
    fn record_sleep_state(&mut self, is_awake: u32, level: u32) {
        let _ = (is_awake, level);
    }
}

/// Error a factory returns: stops the engine start with the logger's name and this text.
pub type StatLoggerError = Box<dyn std::error::Error + Send + Sync>;

/// Builds a logger for the engine with index `engine_index` (vLLM: the logger class, called
/// as `cls(vllm_config, engine_index)`).
pub type StatLoggerFactory = Arc<
    dyn Fn(&StatLoggerConfig, usize) -> Result<Box<dyn StatLogger>, StatLoggerError> + Send + Sync,
>;

/// `VLLM_LOG_STATS_INTERVAL` in seconds: 10 when unset, unparsable or not positive.
pub fn log_stats_interval() -> f64 {
    std::env::var("VLLM_LOG_STATS_INTERVAL")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_token_stats_keep_vllm_invariants() {
        let mut s = PromptTokenStats::default();
        s.add_request(0, 10); // nothing cached
        s.add_request(16, 20); // partly cached
        s.add_request(31, 32); // fully cached: the last token is recomputed
        assert_eq!(s.total, 62);
        assert_eq!(s.computed, 10 + 4 + 1);
        assert_eq!(s.cached_tokens, 47);
        assert_eq!(s.recomputed_tokens, 1);
        assert_eq!(
            s.computed + s.local_cache_hit + s.external_kv_transfer - s.recomputed_tokens,
            s.total
        );
        assert_eq!(
            s.local_cache_hit + s.external_kv_transfer - s.recomputed_tokens,
            s.cached_tokens
        );
        assert_eq!(s.by_source("local_cache_hit"), 48);
    }

    #[test]
    fn iteration_stats_clear_keeps_capacity() {
        let mut it = IterationStats::default();
        it.time_to_first_tokens_iter.extend([0.1; 32]);
        it.num_generation_tokens = 3;
        let cap = it.time_to_first_tokens_iter.capacity();
        it.clear();
        assert!(it.is_empty());
        assert_eq!(it.time_to_first_tokens_iter.capacity(), cap);
    }
}
