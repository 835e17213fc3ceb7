//! Stats and stat loggers (vLLM's `vllm/v1/metrics`, spec §7).
//!
//! ```text
//! LLMEngine::step ─► StatsCollector (per-request timestamps, one reused IterationStats)
//! engine loop, after every step: StatLoggerManager::record(SchedulerStats, IterationStats)
//!     custom loggers (stat_logger plugins) ─► LoggingStatLogger ─► PrometheusStatLogger
//! every VLLM_LOG_STATS_INTERVAL s: StatLoggerManager::log()     GET /metrics: render()
//! ```

mod collector;
pub mod logging;
pub mod prometheus;

use std::sync::Arc;

pub use collector::StatsCollector;
pub use logging::{CachingMetrics, LogLevel, LoggingStatLogger, log_line};
pub use prometheus::{
    PrometheusMetrics, PrometheusStatLogger, build_1_2_5_buckets, render_process_metrics,
};
use trellis_plugin::stats::{
    IterationStats, SchedulerStats, StatLogger, StatLoggerConfig, StatLoggerFactory,
};

use crate::error::EngineError;

/// The loggers of one engine, in vLLM's order: custom ones first, then the logging logger,
/// then the Prometheus logger (always last).
pub struct StatLoggerManager {
    loggers: Vec<(String, Box<dyn StatLogger>)>,
    prometheus: Arc<PrometheusMetrics>,
    engine_index: usize,
}

impl std::fmt::Debug for StatLoggerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatLoggerManager")
            .field("loggers", &self.names())
            .finish_non_exhaustive()
    }
}

impl StatLoggerManager {
    /// Builds the loggers of engine `engine_index`: one from each custom factory, the logging
    /// logger when `enable_default_loggers` is set and vLLM's logger is at INFO or below, and
    /// the Prometheus logger. A failing factory is an error naming it.
    pub fn new(
        config: &StatLoggerConfig,
        engine_index: usize,
        custom: &[(String, StatLoggerFactory)],
        enable_default_loggers: bool,
    ) -> Result<Self, EngineError> {
        let mut loggers: Vec<(String, Box<dyn StatLogger>)> = Vec::new();
        for (name, factory) in custom {
            let logger = factory(config, engine_index).map_err(|e| {
                EngineError::Config(format!("stat logger '{name}' failed to start: {e}"))
            })?;
            loggers.push((name.clone(), logger));
        }
        if enable_default_loggers && LogLevel::from_env() <= LogLevel::Info {
            loggers.push((
                "logging".into(),
                Box::new(LoggingStatLogger::new(config, engine_index)),
            ));
        }
        let prometheus = PrometheusStatLogger::new(config, engine_index);
        let metrics = prometheus.metrics();
        loggers.push(("prometheus".into(), Box::new(prometheus)));
        Ok(StatLoggerManager {
            loggers,
            prometheus: metrics,
            engine_index,
        })
    }

    /// The loggers' names in call order (`logging` and `prometheus` for the built-ins).
    pub fn names(&self) -> Vec<&str> {
        self.loggers.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// What the Prometheus logger records into.
    pub fn prometheus(&self) -> Arc<PrometheusMetrics> {
        self.prometheus.clone()
    }

    /// Hands one step's stats to every logger.
    pub fn record(
        &mut self,
        scheduler: Option<&SchedulerStats>,
        iteration: Option<&IterationStats>,
    ) {
        for (_, l) in &mut self.loggers {
            l.record(scheduler, iteration, self.engine_index);
        }
    }

    /// The periodic call.
    pub fn log(&mut self) {
        for (_, l) in &mut self.loggers {
            l.log();
        }
    }

    /// Once, after the engine is built.
    pub fn log_engine_initialized(&mut self) {
        for (_, l) in &mut self.loggers {
            l.log_engine_initialized();
        }
    }

    /// The engine went to sleep or woke up.
    pub fn record_sleep_state(&mut self, is_awake: u32, level: u32) {
        for (_, l) in &mut self.loggers {
            l.record_sleep_state(is_awake, level);
        }
    }
}
