//! Stat loggers on the serving engine (spec §7.2, vLLM's `test_stats_logger_plugins.py` and
//! `test_engine_logger_apis.py`): assembly order, `disable_log_stats` with and without a
//! custom logger, and what a custom logger receives for a known workload.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use trellis_engine::{AsyncLLM, EngineConfig, Prompt, Registries, SamplingParams};
use trellis_plugin::stats::{
    FinishReason, IterationStats, SchedulerStats, StatLogger, StatLoggerFactory,
};

fn config(disable_log_stats: bool) -> EngineConfig {
    let mut c = EngineConfig::new(common::model_path());
    c.max_model_len = Some(512);
    c.num_kv_blocks = Some(64);
    c.served_model_name = Some("smollm2".into());
    c.disable_log_stats = disable_log_stats;
    c
}

/// What the recording logger saw (vLLM's `DummyStatLogger` keeps its `record` calls).
#[derive(Default)]
struct Seen {
    records: usize,
    initialized: bool,
    prompt_tokens: u64,
    generation_tokens: usize,
    ttfts: usize,
    itls: usize,
    finished: Vec<(FinishReason, usize, usize)>,
    last: Option<SchedulerStats>,
    config_model_name: String,
    config_blocks: usize,
}

struct Recording(Arc<Mutex<Seen>>);

impl StatLogger for Recording {
    fn record(&mut self, s: Option<&SchedulerStats>, it: Option<&IterationStats>, idx: usize) {
        assert_eq!(idx, 0);
        let mut seen = self.0.lock().unwrap();
        seen.records += 1;
        if let Some(s) = s {
            seen.last = Some(*s);
        }
        if let Some(it) = it {
            seen.prompt_tokens += it.prompt_token_stats.total;
            seen.generation_tokens += it.num_generation_tokens;
            seen.ttfts += it.time_to_first_tokens_iter.len();
            seen.itls += it.inter_token_latencies_iter.len();
            for f in &it.finished_requests {
                seen.finished.push((
                    f.finish_reason,
                    f.num_prompt_tokens,
                    f.num_generation_tokens,
                ));
                assert!(f.e2e_latency >= f.inference_time, "{f:?}");
                assert!(
                    f.inference_time + 1e-9 >= f.prefill_time + f.decode_time,
                    "{f:?}"
                );
            }
        }
    }

    fn log_engine_initialized(&mut self) {
        self.0.lock().unwrap().initialized = true;
    }
}

fn registries_with_recorder() -> (Registries, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let factory: StatLoggerFactory = Arc::new(move |cfg, idx| {
        assert_eq!(idx, 0);
        let mut g = s.lock().unwrap();
        g.config_model_name = cfg.served_model_name.clone();
        g.config_blocks = cfg.num_gpu_blocks;
        Ok(Box::new(Recording(s.clone())))
    });
    let mut r = trellis_engine::builtin_registries();
    r.register_stat_logger("recording", factory);
    (r, seen)
}

async fn run(engine: &AsyncLLM, prompt: &str, max_tokens: usize) -> (usize, usize) {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    };
    let mut s = engine
        .generate(Prompt::from(prompt), params)
        .await
        .expect("added");
    while let Some(u) = s.recv().await {
        if let Some(out) = u.finished {
            return (out.prompt_token_ids.len(), out.outputs[0].token_ids.len());
        }
    }
    panic!("stream ended without a finished update");
}

#[tokio::test]
async fn custom_logger_comes_first_and_sees_the_workload() {
    let (registries, seen) = registries_with_recorder();
    // vLLM: disable_log_stats + a custom logger → exactly [custom, Prometheus].
    let engine = AsyncLLM::with_registries(config(true), registries).expect("loads");
    assert_eq!(engine.stat_logger_names(), ["recording", "prometheus"]);
    assert!(seen.lock().unwrap().initialized);
    assert_eq!(seen.lock().unwrap().config_model_name, "smollm2");
    assert_eq!(seen.lock().unwrap().config_blocks, 64);

    let a = run(&engine, "The capital of France is", 5).await;
    let b = run(&engine, "Once upon a time", 3).await;
    let stats = engine.stats().await.expect("stats");
    assert_eq!(stats.num_stats_requests, 0, "{stats:?}");

    let seen = seen.lock().unwrap();
    assert!(seen.records >= 8, "one record per step: {}", seen.records);
    assert_eq!(seen.prompt_tokens, (a.0 + b.0) as u64);
    assert_eq!(seen.generation_tokens, a.1 + b.1);
    assert_eq!(seen.ttfts, 2);
    // One inter-token latency per decoded token after the first.
    assert_eq!(seen.itls, (a.1 - 1) + (b.1 - 1));
    assert_eq!(
        seen.finished,
        vec![
            (FinishReason::Length, a.0, a.1),
            (FinishReason::Length, b.0, b.1)
        ]
    );
    let last = seen.last.expect("scheduler stats");
    assert_eq!((last.num_running_reqs, last.num_waiting_reqs), (0, 0));
    assert!(last.step_counter >= 8);
    // The Prometheus logger still runs: its counters agree.
    let text = engine.render_metrics();
    let total = format!(
        "vllm:generation_tokens_total{{model_name=\"smollm2\",engine=\"0\"}} {}.0\n",
        a.1 + b.1
    );
    assert!(text.contains(&total), "{text}");
}

#[tokio::test]
async fn default_loggers_and_disable_log_stats() {
    // Defaults: the logging logger, then Prometheus.
    let engine = AsyncLLM::new(config(false)).expect("loads");
    assert_eq!(engine.stat_logger_names(), ["logging", "prometheus"]);
    assert!(
        engine
            .render_metrics()
            .contains("vllm:num_requests_running{")
    );
    drop(engine);
    // Custom loggers come before the defaults.
    let (registries, _seen) = registries_with_recorder();
    let engine = AsyncLLM::with_registries(config(false), registries).expect("loads");
    assert_eq!(
        engine.stat_logger_names(),
        ["recording", "logging", "prometheus"]
    );
    drop(engine);
    // --disable-log-stats without custom loggers: no stat logger, no vllm: families, and the
    // engine still serves.
    let engine = AsyncLLM::new(config(true)).expect("loads");
    assert!(engine.stat_logger_names().is_empty());
    assert!(engine.prometheus_metrics().is_none());
    let (_, n) = run(&engine, "Hello", 2).await;
    assert_eq!(n, 2);
    let text = engine.render_metrics();
    assert!(!text.contains("vllm:"), "{text}");
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
}

#[tokio::test]
async fn failing_stat_logger_stops_the_engine_with_its_name() {
    let mut r = trellis_engine::builtin_registries();
    let factory: StatLoggerFactory = Arc::new(|_, _| Err("no sink configured".into()));
    r.register_stat_logger("broken", factory);
    let err = match AsyncLLM::with_registries(config(false), r) {
        Ok(_) => panic!("a failing stat logger must stop the engine"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("stat logger 'broken'"), "{err}");
    assert!(err.contains("no sink configured"), "{err}");
}

#[tokio::test]
async fn aborted_request_is_recorded_as_abort() {
    let (registries, seen) = registries_with_recorder();
    let engine = AsyncLLM::with_registries(config(true), registries).expect("loads");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(400)
    };
    let mut s = engine
        .generate(Prompt::from("Count to one thousand:"), params)
        .await
        .expect("added");
    // Two updates, then the client goes away.
    for _ in 0..2 {
        assert!(s.recv().await.is_some());
    }
    drop(s);
    // Stats are answered between steps: wait until the abort was recorded.
    for _ in 0..10_000 {
        if !seen.lock().unwrap().finished.is_empty() {
            break;
        }
        tokio::task::yield_now().await;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let finished = seen.lock().unwrap().finished.clone();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].0, FinishReason::Abort);
    assert!(finished[0].2 >= 2, "{finished:?}");
    let stats = engine.stats().await.expect("stats");
    assert_eq!(stats.num_stats_requests, 0);
}
