//! `PrometheusStatLogger`: vLLM's `vllm:` metric families (spec §7.4) with the same names,
//! types, labels and histogram buckets, rendered in the Prometheus text format (0.0.4) the
//! way Python's `prometheus_client` renders them, so that vLLM's Grafana dashboards and alerts
//! work unchanged. The server serves [`PrometheusMetrics::render`] plus
//! [`render_process_metrics`] at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use trellis_plugin::stats::{
    FinishReason, IterationStats, PromptTokenStats, SchedulerStats, StatLogger, StatLoggerConfig,
};

/// Buckets 1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's `build_1_2_5_buckets`).
pub fn build_1_2_5_buckets(max_value: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale: usize = 1;
    loop {
        for m in [1usize, 2, 5] {
            let Some(v) = m.checked_mul(scale) else {
                return out;
            };
            if v > max_value {
                return out;
            }
            out.push(v as f64);
        }
        match scale.checked_mul(10) {
            Some(s) => scale = s,
            None => return out,
        }
    }
}

const ITERATION_TOKENS_BUCKETS: [f64; 13] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
const N_BUCKETS: [f64; 5] = [1.0, 2.0, 5.0, 10.0, 20.0];

/// vLLM's finish reasons, in the order of its `FinishReason` enum.
const FINISH_REASONS: [&str; 5] = ["stop", "length", "abort", "error", "repetition"];

/// The `reason` label values of `vllm:admission_rejections` (every one is always exported).
pub(crate) const REJECTION_REASONS: [&str; 3] = ["queue_full", "n_limit", "platform"];

/// A histogram with fixed upper bounds (`le`) plus `+Inf`.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative), the last one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// A float as Python's `prometheus_client` writes it (`floatToGoString`): `+Inf`, `1.0`,
/// `0.25`, `1e-05`.
fn go_float(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v.is_nan() {
        return "NaN".into();
    }
    if v == v.trunc() && v.abs() < 1e16 {
        return format!("{v:.1}");
    }
    format!("{v}")
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes families in the text format; every sample carries `model_name` and `engine`.
struct Writer<'a> {
    out: &'a mut String,
    base: String,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: &[(&str, &str)], v: f64) {
        let mut labels = self.base.clone();
        for (k, val) in extra {
            let _ = write!(labels, ",{k}=\"{}\"", escape_label(val));
        }
        let _ = writeln!(self.out, "{name}{{{labels}}} {}", go_float(v));
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        let total = format!("{name}_total");
        self.header(&total, help, "counter");
        self.sample(&total, &[], v as f64);
    }

    fn labelled_counter(&mut self, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        let total = format!("{name}_total");
        self.header(&total, help, "counter");
        for (lv, v) in values {
            self.sample(&total, &[(label, lv)], *v as f64);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut acc = 0;
        for (i, c) in h.counts.iter().enumerate() {
            acc += c;
            let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| go_float(*b));
            self.sample(&bucket, &[("le", &le)], acc as f64);
        }
        self.sample(&format!("{name}_count"), &[], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
    }
}

#[derive(Debug, Clone)]
struct Families {
    running: f64,
    waiting: f64,
    kv_cache_usage: f64,
    awake: bool,
    sleep_level: u32,
    prefix_cache_queries: u64,
    prefix_cache_hits: u64,
    num_preemptions: u64,
    /// Admission rejections by reason, in [`REJECTION_REASONS`] order.
    admission_rejections: [u64; 3],
    prompt_tokens: u64,
    prompt_tokens_by_source: [u64; 3],
    prompt_tokens_cached: u64,
    prompt_tokens_recomputed: u64,
    generation_tokens: u64,
    request_success: [u64; 5],
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    iteration_tokens: Histogram,
    request_max_num_generation_tokens: Histogram,
    request_params_n: Histogram,
    request_params_max_tokens: Histogram,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    request_time_per_output_token: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
    request_inference_time: Histogram,
    request_prefill_time: Histogram,
    request_decode_time: Histogram,
    request_prefill_kv_computed_tokens: Histogram,
    cache_config_info: Option<Vec<(String, String)>>,
}

/// The `vllm:` families of one engine, shared between the engine thread (which records) and
/// the server (which renders).
#[derive(Debug)]
pub struct PrometheusMetrics {
    config: StatLoggerConfig,
    engine: String,
    families: Mutex<Families>,
}

impl PrometheusMetrics {
    /// Families at zero for the engine with index `engine_index`.
    pub fn new(config: &StatLoggerConfig, engine_index: usize) -> Self {
        let len_buckets = build_1_2_5_buckets(config.max_model_len);
        let h = Histogram::new;
        PrometheusMetrics {
            config: config.clone(),
            engine: engine_index.to_string(),
            families: Mutex::new(Families {
                running: 0.0,
                waiting: 0.0,
                kv_cache_usage: 0.0,
                awake: true,
                sleep_level: 0,
                prefix_cache_queries: 0,
                prefix_cache_hits: 0,
                num_preemptions: 0,
                admission_rejections: [0; 3],
                prompt_tokens: 0,
                prompt_tokens_by_source: [0; 3],
                prompt_tokens_cached: 0,
                prompt_tokens_recomputed: 0,
                generation_tokens: 0,
                request_success: [0; 5],
                request_prompt_tokens: h(&len_buckets),
                request_generation_tokens: h(&len_buckets),
                iteration_tokens: h(&ITERATION_TOKENS_BUCKETS),
                request_max_num_generation_tokens: h(&len_buckets),
                request_params_n: h(&N_BUCKETS),
                request_params_max_tokens: h(&len_buckets),
                time_to_first_token: h(&TTFT_BUCKETS),
                inter_token_latency: h(&ITL_BUCKETS),
                request_time_per_output_token: h(&ITL_BUCKETS),
                e2e_request_latency: h(&REQUEST_LATENCY_BUCKETS),
                request_queue_time: h(&REQUEST_LATENCY_BUCKETS),
                request_inference_time: h(&REQUEST_LATENCY_BUCKETS),
                request_prefill_time: h(&REQUEST_LATENCY_BUCKETS),
                request_decode_time: h(&REQUEST_LATENCY_BUCKETS),
                request_prefill_kv_computed_tokens: h(&len_buckets),
                cache_config_info: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Families> {
        self.families.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, scheduler: Option<&SchedulerStats>, iteration: Option<&IterationStats>) {
        let mut f = self.lock();
        if let Some(s) = scheduler {
            f.running = s.num_running_reqs as f64;
            f.waiting = s.num_waiting_reqs as f64;
            f.kv_cache_usage = s.kv_cache_usage;
            f.prefix_cache_queries += s.prefix_cache_stats.queries;
            f.prefix_cache_hits += s.prefix_cache_stats.hits;
        }
        let Some(it) = iteration else {
            return;
        };
        let pts = &it.prompt_token_stats;
        f.num_preemptions += it.num_preempted_reqs as u64;
        for reason in &it.admission_rejections {
            if let Some(i) = REJECTION_REASONS.iter().position(|r| r == reason) {
                f.admission_rejections[i] += 1;
            }
        }
        f.prompt_tokens += pts.total;
        for (i, source) in PromptTokenStats::ALL_SOURCES.iter().enumerate() {
            f.prompt_tokens_by_source[i] += pts.by_source(source);
        }
        f.prompt_tokens_cached += pts.cached_tokens;
        f.prompt_tokens_recomputed += pts.recomputed_tokens;
        f.generation_tokens += it.num_generation_tokens as u64;
        let step_tokens = pts.total + it.num_generation_tokens as u64;
        // vLLM observes every recorded iteration, even an empty one (0 falls in le=1).
        f.iteration_tokens.observe(step_tokens as f64);
        for &m in &it.max_num_generation_tokens_iter {
            f.request_max_num_generation_tokens.observe(m as f64);
        }
        for &n in &it.n_params_iter {
            f.request_params_n.observe(n as f64);
        }
        for &t in &it.time_to_first_tokens_iter {
            f.time_to_first_token.observe(t);
        }
        for &t in &it.inter_token_latencies_iter {
            f.inter_token_latency.observe(t);
        }
        for r in &it.finished_requests {
            let idx = match r.finish_reason {
                FinishReason::Stop => 0,
                FinishReason::Length => 1,
                FinishReason::Abort => 2,
                FinishReason::Error => 3,
            };
            f.request_success[idx] += 1;
            f.e2e_request_latency.observe(r.e2e_latency);
            f.request_queue_time.observe(r.queued_time);
            f.request_prefill_time.observe(r.prefill_time);
            f.request_inference_time.observe(r.inference_time);
            f.request_decode_time.observe(r.decode_time);
            f.request_prefill_kv_computed_tokens
                .observe(r.num_prompt_tokens.saturating_sub(r.num_cached_tokens) as f64);
            f.request_prompt_tokens.observe(r.num_prompt_tokens as f64);
            f.request_generation_tokens
                .observe(r.num_generation_tokens as f64);
            f.request_time_per_output_token
                .observe(r.mean_time_per_output_token);
            if let Some(m) = r.max_tokens_param.filter(|m| *m > 0) {
                f.request_params_max_tokens.observe(m as f64);
            }
        }
    }

    fn set_cache_config_info(&self) {
        let c = &self.config;
        let info = vec![
            ("block_size".to_string(), c.block_size.to_string()),
            ("cache_dtype".to_string(), c.cache_dtype.clone()),
            (
                "enable_prefix_caching".to_string(),
                if c.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                }
                .to_string(),
            ),
            ("num_gpu_blocks".to_string(), c.num_gpu_blocks.to_string()),
            ("num_cpu_blocks".to_string(), "None".to_string()),
            ("engine".to_string(), self.engine.clone()),
        ];
        self.lock().cache_config_info = Some(info);
    }

    /// The `vllm:` families in the Prometheus text format.
    pub fn render(&self) -> String {
        let f = self.lock().clone();
        let mut out = String::new();
        let base = format!(
            "model_name=\"{}\",engine=\"{}\"",
            escape_label(&self.config.served_model_name),
            self.engine
        );
        let mut w = Writer {
            out: &mut out,
            base,
        };
        w.gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            f.running,
        );
        w.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            f.waiting,
        );
        w.header(
            "vllm:num_requests_waiting_by_reason",
            "Number of requests waiting, by reason (capacity: waiting for KV-cache space or a \
             batch slot; deferred: held back by the scheduler).",
            "gauge",
        );
        w.sample(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", "capacity")],
            f.waiting,
        );
        w.sample(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", "deferred")],
            0.0,
        );
        w.header(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is \
             awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep \
             level 2.",
            "gauge",
        );
        let asleep = !f.awake;
        for (state, on) in [
            ("awake", f.awake),
            ("weights_offloaded", asleep && f.sleep_level == 1),
            ("discard_all", asleep && f.sleep_level == 2),
        ] {
            w.sample(
                "vllm:engine_sleep_state",
                &[("sleep_state", state)],
                f64::from(u8::from(on)),
            );
        }
        w.gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            f.kv_cache_usage,
        );
        w.counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            f.prefix_cache_queries,
        );
        w.counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            f.prefix_cache_hits,
        );
        w.counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in \
             terms of number of queried tokens.",
            0,
        );
        w.counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in \
             terms of number of cached tokens.",
            0,
        );
        w.counter(
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
            0,
        );
        w.counter(
            "vllm:mm_cache_hits",
            "Multi-modal cache hits, in terms of number of cached items.",
            0,
        );
        w.counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            f.num_preemptions,
        );
        let rejections: Vec<(&str, u64)> = REJECTION_REASONS
            .iter()
            .copied()
            .zip(f.admission_rejections)
            .collect();
        w.labelled_counter(
            "vllm:admission_rejections",
            "Requests refused at admission, by reason.",
            "reason",
            &rejections,
        );
        w.counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            f.prompt_tokens,
        );
        let by_source: Vec<(&str, u64)> = PromptTokenStats::ALL_SOURCES
            .iter()
            .copied()
            .zip(f.prompt_tokens_by_source)
            .collect();
        w.labelled_counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            "source",
            &by_source,
        );
        w.counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            f.prompt_tokens_cached,
        );
        w.counter(
            "vllm:prompt_tokens_recomputed",
            "Number of cached tokens recomputed for forward pass.",
            f.prompt_tokens_recomputed,
        );
        w.counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            f.generation_tokens,
        );
        let success: Vec<(&str, u64)> = FINISH_REASONS
            .iter()
            .copied()
            .zip(f.request_success)
            .collect();
        w.labelled_counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            "finished_reason",
            &success,
        );
        let histograms: [(&str, &str, &Histogram); 15] = [
            (
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                &f.request_prompt_tokens,
            ),
            (
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                &f.request_generation_tokens,
            ),
            (
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                &f.iteration_tokens,
            ),
            (
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                &f.request_max_num_generation_tokens,
            ),
            (
                "vllm:request_params_n",
                "Histogram of the n request parameter.",
                &f.request_params_n,
            ),
            (
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                &f.request_params_max_tokens,
            ),
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &f.time_to_first_token,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &f.inter_token_latency,
            ),
            (
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                &f.request_time_per_output_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &f.e2e_request_latency,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &f.request_queue_time,
            ),
            (
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                &f.request_inference_time,
            ),
            (
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                &f.request_prefill_time,
            ),
            (
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                &f.request_decode_time,
            ),
            (
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                &f.request_prefill_kv_computed_tokens,
            ),
        ];
        for (name, help, h) in histograms {
            w.histogram(name, help, h);
        }
        if let Some(info) = &f.cache_config_info {
            let name = "vllm:cache_config_info";
            w.header(name, "Information of the LLMEngine CacheConfig", "gauge");
            let labels: Vec<String> = info
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = writeln!(w.out, "{name}{{{}}} 1.0", labels.join(","));
        }
        out
    }
}

/// The built-in Prometheus logger: records into a [`PrometheusMetrics`] the server renders.
#[derive(Debug, Clone)]
pub struct PrometheusStatLogger {
    metrics: Arc<PrometheusMetrics>,
}

impl PrometheusStatLogger {
    /// A logger for engine `engine_index`.
    pub fn new(config: &StatLoggerConfig, engine_index: usize) -> Self {
        PrometheusStatLogger {
            metrics: Arc::new(PrometheusMetrics::new(config, engine_index)),
        }
    }

    /// The metrics it records into.
    pub fn metrics(&self) -> Arc<PrometheusMetrics> {
        self.metrics.clone()
    }
}

impl StatLogger for PrometheusStatLogger {
    fn record(
        &mut self,
        scheduler_stats: Option<&SchedulerStats>,
        iteration_stats: Option<&IterationStats>,
        _engine_idx: usize,
    ) {
        self.metrics.record(scheduler_stats, iteration_stats);
    }

    fn log_engine_initialized(&mut self) {
        self.metrics.set_cache_config_info();
    }

    fn record_sleep_state(&mut self, is_awake: u32, level: u32) {
        let mut f = self.metrics.lock();
        f.awake = is_awake != 0;
        f.sleep_level = level;
    }
}

/// The process families of Python's `prometheus_client` (`process_*`), read from `/proc` on
/// Linux; nothing elsewhere.
pub fn render_process_metrics() -> String {
    let mut out = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return out;
    };
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return out;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> f64 {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on every Linux target Rust supports.
    let ticks = 100.0;
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("btime ")
                        .map(|v| v.trim().parse::<f64>().ok())
                })
                .flatten()
        })
        .unwrap_or(0.0);
    let mut gauge = |name: &str, help: &str, kind: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            go_float(v)
        );
    };
    gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        "gauge",
        field(23),
    );
    gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        "gauge",
        rss_kib * 1024.0,
    );
    gauge(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "gauge",
        boot_time + field(22) / ticks,
    );
    gauge(
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        "counter",
        (field(14) + field(15)) / ticks,
    );
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            fds.count() as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
                .and_then(|v| v.parse::<f64>().ok())
        });
    if let Some(m) = max_fds {
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            m,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_plugin::stats::FinishedRequestStats;

    #[test]
    fn buckets_1_2_5() {
        assert_eq!(
            build_1_2_5_buckets(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(build_1_2_5_buckets(8192).last(), Some(&5000.0));
        assert!(build_1_2_5_buckets(usize::MAX).len() > 50);
    }

    #[test]
    fn floats_as_python_writes_them() {
        assert_eq!(go_float(1.0), "1.0");
        assert_eq!(go_float(0.001), "0.001");
        assert_eq!(go_float(2560.0), "2560.0");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
        assert_eq!(go_float(0.25), "0.25");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_le_inclusive() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1, 1]);
        let mut out = String::new();
        let mut w = Writer {
            out: &mut out,
            base: "model_name=\"m\",engine=\"0\"".into(),
        };
        w.histogram("x", "doc", &h);
        assert!(out.contains("x_bucket{model_name=\"m\",engine=\"0\",le=\"1.0\"} 2.0\n"));
        assert!(out.contains("x_bucket{model_name=\"m\",engine=\"0\",le=\"2.0\"} 3.0\n"));
        assert!(out.contains("x_bucket{model_name=\"m\",engine=\"0\",le=\"+Inf\"} 4.0\n"));
        assert!(out.contains("x_count{model_name=\"m\",engine=\"0\"} 4.0\n"));
        assert!(out.contains("x_sum{model_name=\"m\",engine=\"0\"} 6.0\n"));
    }

    #[test]
    fn records_into_vllm_families() {
        let cfg = StatLoggerConfig {
            served_model_name: "my \"model\"".into(),
            model: "m".into(),
            max_model_len: 100,
            block_size: 16,
            num_gpu_blocks: 10,
            cache_dtype: "auto".into(),
            enable_prefix_caching: true,
            max_num_seqs: 4,
            max_num_batched_tokens: 64,
            device_type: "cpu".into(),
            log_stats_interval: 10.0,
        };
        let mut logger = PrometheusStatLogger::new(&cfg, 0);
        logger.log_engine_initialized();
        let mut it = IterationStats::default();
        it.prompt_token_stats.add_request(0, 7);
        it.num_generation_tokens = 1;
        it.time_to_first_tokens_iter.push(0.2);
        it.finished_requests.push(FinishedRequestStats {
            finish_reason: FinishReason::Length,
            e2e_latency: 0.5,
            num_prompt_tokens: 7,
            num_generation_tokens: 1,
            max_tokens_param: Some(1),
            queued_time: 0.0,
            prefill_time: 0.2,
            decode_time: 0.0,
            inference_time: 0.2,
            mean_time_per_output_token: 0.0,
            num_cached_tokens: 0,
        });
        it.n_params_iter.push(1);
        it.max_num_generation_tokens_iter.push(1);
        let s = SchedulerStats {
            num_running_reqs: 1,
            num_waiting_reqs: 2,
            kv_cache_usage: 0.5,
            ..Default::default()
        };
        logger.record(Some(&s), Some(&it), 0);
        let text = logger.metrics().render();
        let labels = "model_name=\"my \\\"model\\\"\",engine=\"0\"";
        for line in [
            format!("vllm:num_requests_running{{{labels}}} 1.0"),
            format!("vllm:num_requests_waiting{{{labels}}} 2.0"),
            format!("vllm:num_requests_waiting_by_reason{{{labels},reason=\"capacity\"}} 2.0"),
            format!("vllm:kv_cache_usage_perc{{{labels}}} 0.5"),
            format!("vllm:prompt_tokens_total{{{labels}}} 7.0"),
            format!("vllm:generation_tokens_total{{{labels}}} 1.0"),
            format!("vllm:request_success_total{{{labels},finished_reason=\"length\"}} 1.0"),
            format!("vllm:request_success_total{{{labels},finished_reason=\"repetition\"}} 0.0"),
            format!("vllm:prompt_tokens_by_source_total{{{labels},source=\"local_compute\"}} 7.0"),
            format!("vllm:time_to_first_token_seconds_count{{{labels}}} 1.0"),
            format!("vllm:request_prompt_tokens_bucket{{{labels},le=\"10.0\"}} 1.0"),
            format!("vllm:request_prompt_tokens_bucket{{{labels},le=\"5.0\"}} 0.0"),
            format!("vllm:iteration_tokens_total_bucket{{{labels},le=\"8.0\"}} 1.0"),
            format!("vllm:engine_sleep_state{{{labels},sleep_state=\"awake\"}} 1.0"),
            "# TYPE vllm:prompt_tokens_total counter".to_string(),
            "# TYPE vllm:e2e_request_latency_seconds histogram".to_string(),
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "missing {line}:\n{text}"
            );
        }
        assert!(text.contains("vllm:cache_config_info{block_size=\"16\""));
        assert!(render_process_metrics().contains("process_resident_memory_bytes "));
    }
}
