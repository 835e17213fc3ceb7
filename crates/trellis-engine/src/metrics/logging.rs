//! `LoggingStatLogger`: vLLM's periodic stats line (spec §7.3), so that log parsers written
//! for vLLM keep working:
//!
//! ```text
//! INFO 11-29 17:04:29 [loggers.py:257] Engine 000: Avg prompt throughput: 12.3 tokens/s, Avg generation throughput: 45.6 tokens/s, Running: 2 reqs, Waiting: 0 reqs, CPU KV cache usage: 3.1%, Prefix cache hit rate: 50.0%
//! ```

use std::collections::VecDeque;
use std::time::Instant;

use trellis_plugin::stats::{
    IterationStats, PrefixCacheStats, SchedulerStats, StatLogger, StatLoggerConfig,
};

/// Log levels of vLLM's logger (`VLLM_LOGGING_LEVEL`, default `INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// `DEBUG`
    Debug,
    /// `INFO`
    Info,
    /// `WARNING`
    Warning,
    /// `ERROR` (and `CRITICAL`)
    Error,
}

impl LogLevel {
    /// `VLLM_LOGGING_LEVEL` (case-insensitive); INFO when unset or unknown.
    pub fn from_env() -> Self {
        match std::env::var("VLLM_LOGGING_LEVEL")
            .unwrap_or_default()
            .trim()
            .to_ascii_uppercase()
            .as_str()
        {
            "DEBUG" => LogLevel::Debug,
            "WARNING" | "WARN" => LogLevel::Warning,
            "ERROR" | "CRITICAL" => LogLevel::Error,
            _ => LogLevel::Info,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warning => "WARNING",
            LogLevel::Error => "ERROR",
        }
    }
}

/// Writes one log line on stderr in vLLM's format (`LEVEL MM-DD HH:MM:SS [file:line] msg`)
/// when `level` is enabled.
pub fn log_line(level: LogLevel, file: &str, line: u32, message: &str) {
    if level < LogLevel::from_env() {
        return;
    }
    let ts = chrono::Local::now().format("%m-%d %H:%M:%S");
    eprintln!("{} {ts} [{file}:{line}] {message}", level.name());
}

/// Hit rate over the most recent requests (vLLM's `CachingMetrics`: a window of 1000
/// requests; the newest entry is always kept).
#[derive(Debug, Clone)]
pub struct CachingMetrics {
    max_recent_requests: u64,
    requests: u64,
    queries: u64,
    hits: u64,
    window: VecDeque<(u64, u64, u64)>,
}

impl Default for CachingMetrics {
    fn default() -> Self {
        Self::new(1000)
    }
}

impl CachingMetrics {
    /// A window over the last `max_recent_requests` requests.
    pub fn new(max_recent_requests: u64) -> Self {
        CachingMetrics {
            max_recent_requests,
            requests: 0,
            queries: 0,
            hits: 0,
            window: VecDeque::new(),
        }
    }

    /// Adds one step's lookups.
    pub fn observe(&mut self, s: &PrefixCacheStats) {
        if s.reset {
            *self = Self::new(self.max_recent_requests);
        }
        if s.requests == 0 {
            return;
        }
        self.window.push_back((s.requests, s.queries, s.hits));
        self.requests += s.requests;
        self.queries += s.queries;
        self.hits += s.hits;
        while self.window.len() > 1 && self.requests > self.max_recent_requests {
            if let Some((r, q, h)) = self.window.pop_front() {
                self.requests -= r;
                self.queries -= q;
                self.hits -= h;
            }
        }
    }

    /// True until a request looked up the cache.
    pub fn is_empty(&self) -> bool {
        self.requests == 0
    }

    /// Hits over queries in the window, 0..=1.
    pub fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }
}

/// The built-in logging logger of one engine.
#[derive(Debug)]
pub struct LoggingStatLogger {
    engine_index: usize,
    num_gpu_blocks: usize,
    device: String,
    last_log_time: Instant,
    num_prompt_tokens: u64,
    num_generation_tokens: u64,
    num_preemptions: usize,
    num_rejected: usize,
    last_scheduler_stats: SchedulerStats,
    prefix_caching: CachingMetrics,
    last_prompt_throughput: f64,
    last_generation_throughput: f64,
}

impl LoggingStatLogger {
    /// The logger of engine `engine_index`.
    pub fn new(config: &StatLoggerConfig, engine_index: usize) -> Self {
        // vLLM writes GPU for CUDA and the upper-cased device type otherwise.
        let device = match config.device_type.as_str() {
            "cuda" => "GPU".to_string(),
            other => other.to_ascii_uppercase(),
        };
        LoggingStatLogger {
            engine_index,
            num_gpu_blocks: config.num_gpu_blocks,
            device,
            last_log_time: Instant::now(),
            num_prompt_tokens: 0,
            num_generation_tokens: 0,
            num_preemptions: 0,
            num_rejected: 0,
            last_scheduler_stats: SchedulerStats::default(),
            prefix_caching: CachingMetrics::default(),
            last_prompt_throughput: 0.0,
            last_generation_throughput: 0.0,
        }
    }

    /// The line for the interval that ends now, and whether the engine was idle through it
    /// and the previous one (then vLLM logs it at DEBUG). Starts the next interval.
    pub fn next_line(&mut self) -> (String, bool) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_log_time).as_secs_f64();
        let rate = |n: u64| if dt > 0.0 { n as f64 / dt } else { 0.0 };
        let prompt = rate(self.num_prompt_tokens);
        let generation = rate(self.num_generation_tokens);
        let idle = prompt == 0.0
            && generation == 0.0
            && self.last_prompt_throughput == 0.0
            && self.last_generation_throughput == 0.0;
        self.last_prompt_throughput = prompt;
        self.last_generation_throughput = generation;
        let s = &self.last_scheduler_stats;
        let mut line = format!(
            "Engine {:03}: Avg prompt throughput: {prompt:.1} tokens/s, Avg generation \
             throughput: {generation:.1} tokens/s, Running: {} reqs, Waiting: {} reqs",
            self.engine_index, s.num_running_reqs, s.num_waiting_reqs
        );
        if self.num_preemptions > 0 {
            line.push_str(&format!(", Preemptions: {}", self.num_preemptions));
        }
        if self.num_rejected > 0 {
            line.push_str(&format!(", Rejected: {} reqs", self.num_rejected));
        }
        line.push_str(&format!(
            ", {} KV cache usage: {:.1}%",
            self.device,
            s.kv_cache_usage * 100.0
        ));
        if !self.prefix_caching.is_empty() {
            line.push_str(&format!(
                ", Prefix cache hit rate: {:.1}%",
                self.prefix_caching.hit_rate() * 100.0
            ));
        }
        self.last_log_time = now;
        self.num_prompt_tokens = 0;
        self.num_generation_tokens = 0;
        self.num_preemptions = 0;
        self.num_rejected = 0;
        (line, idle)
    }
}

impl StatLogger for LoggingStatLogger {
    fn record(
        &mut self,
        scheduler_stats: Option<&SchedulerStats>,
        iteration_stats: Option<&IterationStats>,
        _engine_idx: usize,
    ) {
        if let Some(it) = iteration_stats {
            // Prompt throughput counts computed tokens, not cached ones.
            self.num_prompt_tokens += it.prompt_token_stats.computed;
            self.num_generation_tokens += it.num_generation_tokens as u64;
            self.num_preemptions += it.num_preempted_reqs;
            self.num_rejected += it.admission_rejections.len();
        }
        if let Some(s) = scheduler_stats {
            self.prefix_caching.observe(&s.prefix_cache_stats);
            self.last_scheduler_stats = *s;
        }
    }

    fn log_engine_initialized(&mut self) {
        log_line(
            LogLevel::Debug,
            "loggers.rs",
            line!(),
            &format!(
                "Engine {:03}: vllm cache_config_info with initialization after \
                 num_gpu_blocks is: {}",
                self.engine_index, self.num_gpu_blocks
            ),
        );
    }

    fn log(&mut self) {
        let (line, idle) = self.next_line();
        let level = if idle {
            LogLevel::Debug
        } else {
            LogLevel::Info
        };
        log_line(level, "loggers.rs", line!(), &line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> StatLoggerConfig {
        StatLoggerConfig {
            served_model_name: "m".into(),
            model: "m".into(),
            max_model_len: 2048,
            block_size: 16,
            num_gpu_blocks: 100,
            cache_dtype: "auto".into(),
            enable_prefix_caching: true,
            max_num_seqs: 128,
            max_num_batched_tokens: 2048,
            device_type: "cpu".into(),
            log_stats_interval: 10.0,
        }
    }

    #[test]
    fn line_has_vllm_shape() {
        let mut l = LoggingStatLogger::new(&config(), 0);
        let (line, idle) = l.next_line();
        assert!(idle);
        assert_eq!(
            line,
            "Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0 \
             tokens/s, Running: 0 reqs, Waiting: 0 reqs, CPU KV cache usage: 0.0%"
        );
        let mut it = IterationStats::default();
        it.prompt_token_stats.add_request(16, 40);
        it.num_generation_tokens = 5;
        it.num_preempted_reqs = 2;
        let s = SchedulerStats {
            num_running_reqs: 2,
            num_waiting_reqs: 1,
            kv_cache_usage: 0.031,
            prefix_cache_stats: PrefixCacheStats {
                reset: false,
                requests: 2,
                queries: 80,
                hits: 40,
            },
            ..Default::default()
        };
        l.record(Some(&s), Some(&it), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (line, idle) = l.next_line();
        assert!(!idle);
        let re_num = |prefix: &str| -> f64 {
            let start = line.find(prefix).unwrap() + prefix.len();
            let rest = &line[start..];
            rest[..rest.find(' ').unwrap()].parse().unwrap()
        };
        assert!(re_num("Avg prompt throughput: ") > 0.0, "{line}");
        assert!(
            line.ends_with(
                "Running: 2 reqs, Waiting: 1 reqs, Preemptions: 2, CPU KV cache usage: 3.1%, \
                 Prefix cache hit rate: 50.0%"
            ),
            "{line}"
        );
        // The interval after a busy one is logged at INFO; then idle again.
        assert!(!l.next_line().1);
        assert!(l.next_line().1);
        let mut cuda = config();
        cuda.device_type = "cuda".into();
        let (line, _) = LoggingStatLogger::new(&cuda, 3).next_line();
        assert!(line.starts_with("Engine 003: "));
        assert!(line.contains(", GPU KV cache usage: 0.0%"));
    }

    #[test]
    fn caching_metrics_window_drops_oldest_but_keeps_newest() {
        let mut m = CachingMetrics::new(3);
        let s = |requests, queries, hits| PrefixCacheStats {
            reset: false,
            requests,
            queries,
            hits,
        };
        m.observe(&s(2, 100, 0));
        m.observe(&s(0, 0, 0));
        assert!((m.hit_rate() - 0.0).abs() < 1e-12);
        m.observe(&s(2, 100, 100));
        // 4 requests > 3: the oldest entry goes.
        assert!((m.hit_rate() - 1.0).abs() < 1e-12);
        m.observe(&s(5, 10, 5));
        assert!((m.hit_rate() - 0.5).abs() < 1e-12);
        m.observe(&PrefixCacheStats {
            reset: true,
            ..s(0, 0, 0)
        });
        assert!(m.is_empty());
    }
}
