//! A stat-logger plugin (vLLM's `vllm_add_dummy_stat_logger`, group `stat_logger`): every
//! stats interval (`VLLM_LOG_STATS_INTERVAL`, 10 s by default) it appends one JSON line to
//! the file named by `JSON_STAT_LOGGER_FILE`, with what the engine recorded since the
//! previous line:
//!
//! ```json
//! {"engine":0,"model_name":"m","time":1764435869.2,"records":12,"prompt_tokens":40,
//!  "computed_prompt_tokens":40,"generation_tokens":24,"finished_requests":2,
//!  "finish_reasons":{"length":2},"running":0,"waiting":0,"kv_cache_usage":0.0,
//!  "initialized":true}
//! ```
//!
//! Without `JSON_STAT_LOGGER_FILE` it writes nothing (and says so once). `trellis serve` loads
//! it unless `VLLM_PLUGINS` leaves `json_stat_logger` out.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use trellis_plugin::stats::{
    IterationStats, SchedulerStats, StatLogger, StatLoggerConfig, StatLoggerFactory,
};
use trellis_plugin::{RegisterResult, Registrar};

/// The plugin's entry name (what `VLLM_PLUGINS` lists).
pub const NAME: &str = "json_stat_logger";

/// The variable naming the output file.
pub const FILE_VAR: &str = "JSON_STAT_LOGGER_FILE";

/// Sums what was recorded in the current interval; [`StatLogger::log`] writes and resets it.
pub struct JsonStatLogger {
    path: Option<PathBuf>,
    engine: usize,
    model_name: String,
    initialized: bool,
    records: u64,
    prompt_tokens: u64,
    computed_prompt_tokens: u64,
    generation_tokens: u64,
    finish_reasons: BTreeMap<&'static str, u64>,
    last: SchedulerStats,
}

impl JsonStatLogger {
    /// A logger for engine `engine_index` writing to `path` (nothing when `None`).
    pub fn new(config: &StatLoggerConfig, engine_index: usize, path: Option<PathBuf>) -> Self {
        JsonStatLogger {
            path,
            engine: engine_index,
            model_name: config.served_model_name.clone(),
            initialized: false,
            records: 0,
            prompt_tokens: 0,
            computed_prompt_tokens: 0,
            generation_tokens: 0,
            finish_reasons: BTreeMap::new(),
            last: SchedulerStats::default(),
        }
    }

    /// The JSON line of the current interval.
    pub fn line(&self) -> serde_json::Value {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let finished: u64 = self.finish_reasons.values().sum();
        serde_json::json!({
            "engine": self.engine,
            "model_name": self.model_name,
            "time": time,
            "records": self.records,
            "prompt_tokens": self.prompt_tokens,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "finished_requests": finished,
            "finish_reasons": self.finish_reasons,
            "running": self.last.num_running_reqs,
            "waiting": self.last.num_waiting_reqs,
            "kv_cache_usage": self.last.kv_cache_usage,
            "initialized": self.initialized,
        })
    }
}

impl StatLogger for JsonStatLogger {
    fn record(
        &mut self,
        scheduler_stats: Option<&SchedulerStats>,
        iteration_stats: Option<&IterationStats>,
        _engine_idx: usize,
    ) {
        self.records += 1;
        if let Some(s) = scheduler_stats {
            self.last = *s;
        }
        if let Some(it) = iteration_stats {
            self.prompt_tokens += it.prompt_token_stats.total;
            self.computed_prompt_tokens += it.prompt_token_stats.computed;
            self.generation_tokens += it.num_generation_tokens as u64;
            for r in &it.finished_requests {
                *self
                    .finish_reasons
                    .entry(r.finish_reason.as_str())
                    .or_default() += 1;
            }
        }
    }

    fn log_engine_initialized(&mut self) {
        self.initialized = true;
    }

    fn log(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        let line = self.line();
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!("WARNING {NAME}: cannot write {}: {e}", path.display());
        }
        self.records = 0;
        self.prompt_tokens = 0;
        self.computed_prompt_tokens = 0;
        self.generation_tokens = 0;
        self.finish_reasons.clear();
    }
}

/// The `stat_logger` entry: registers the factory of [`JsonStatLogger`].
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    let factory: StatLoggerFactory = Arc::new(|config, engine_index| {
        let path = std::env::var_os(FILE_VAR).map(PathBuf::from);
        if path.is_none() {
            eprintln!("WARNING {NAME}: {FILE_VAR} is not set; writing nothing");
        }
        Ok(Box::new(JsonStatLogger::new(config, engine_index, path)))
    });
    registrar.register_stat_logger(NAME, factory);
    Ok(())
}

trellis_plugin::declare_plugin! {
    stat_logger "json_stat_logger" => register,
}
