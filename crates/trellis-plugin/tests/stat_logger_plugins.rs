//! vLLM's `tests/plugins_tests/test_stats_logger_plugins.py`, with compiled-in entries: the
//! `stat_logger` group is filtered by `VLLM_PLUGINS`, each allowed entry contributes its
//! factory, and an entry that registers no stat logger is refused with its name.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use trellis_plugin::stats::{
    IterationStats, SchedulerStats, StatLogger, StatLoggerConfig, StatLoggerFactory,
};
use trellis_plugin::{RegisterResult, Registrar, Registries, load_stat_logger_plugins};

struct Dummy {
    records: usize,
}

impl StatLogger for Dummy {
    fn record(&mut self, _: Option<&SchedulerStats>, _: Option<&IterationStats>, _: usize) {
        self.records += 1;
    }
    fn log_engine_initialized(&mut self) {}
}

fn register_dummy(registrar: &mut dyn Registrar) -> RegisterResult {
    let f: StatLoggerFactory = Arc::new(|_, _| Ok(Box::new(Dummy { records: 0 })));
    registrar.register_stat_logger("dummy_stat_logger", f);
    Ok(())
}

/// Registers nothing (vLLM: an entry point that is not a `StatLoggerBase` subclass).
fn register_nothing(_: &mut dyn Registrar) -> RegisterResult {
    Ok(())
}

trellis_plugin::declare_plugin! {
    stat_logger "dummy_stat_logger" => register_dummy,
    stat_logger "bad" => register_nothing,
}

fn config() -> StatLoggerConfig {
    StatLoggerConfig {
        served_model_name: "m".into(),
        model: "m".into(),
        max_model_len: 128,
        block_size: 16,
        num_gpu_blocks: 8,
        cache_dtype: "auto".into(),
        enable_prefix_caching: true,
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        device_type: "cpu".into(),
        log_stats_interval: 10.0,
    }
}

fn load(allow: &str) -> Result<Registries, String> {
    // SAFETY: the only test of this binary; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("VLLM_PLUGINS", allow) };
    let mut r = Registries::new();
    load_stat_logger_plugins(&mut r).map_err(|e| e.to_string())?;
    Ok(r)
}

#[test]
fn stat_logger_group_follows_vllm_plugins() {
    // SAFETY: as in `load`.
    unsafe { std::env::remove_var("TRELLIS_PLUGIN_PATH") };
    let r = load("dummy_stat_logger").unwrap();
    assert_eq!(r.stat_loggers.len(), 1);
    assert_eq!(r.stat_loggers[0].0, "dummy_stat_logger");
    // Instantiable with a configuration, and usable.
    let mut logger = (r.stat_loggers[0].1)(&config(), 0).unwrap();
    logger.record(None, None, 0);
    logger.log();

    assert!(load("").unwrap().stat_loggers.is_empty());

    let err = load("bad").err().unwrap();
    assert!(
        err.contains("Stat logger plugin 'bad' must register a stat logger"),
        "{err}"
    );
    assert!(err.contains("plugin 'bad' (stat_logger) failed"), "{err}");
}
