//! `GET /metrics` against a known workload: token counters equal the usage the API returned,
//! histogram counts equal the number of requests, and the running/waiting gauges follow a
//! stream held open (with one sequence a step, a second request waits).

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use trellis_engine::{AsyncLLM, EngineConfig, UsageContext};

/// `name{labels}` → value, from the text format (comments skipped).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse::<f64>().expect("value"))
        })
        .collect()
}

fn key(name: &str, extra: &str) -> String {
    format!(
        "{name}{{model_name=\"{}\",engine=\"0\"{extra}}}",
        common::MODEL
    )
}

async fn scrape(base: &str) -> HashMap<String, f64> {
    let r = common::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse(&r.text().await.expect("body"))
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, k: &str) -> f64 {
    after
        .get(k)
        .copied()
        .unwrap_or_else(|| panic!("{k} missing"))
        - before.get(k).copied().unwrap_or(0.0)
}

fn engine() -> Arc<AsyncLLM> {
    let mut c = EngineConfig::new(common::model_path());
    c.max_model_len = Some(2048);
    c.kv_cache_memory = Some(256 << 20);
    c.usage = UsageContext::Server;
    c.max_num_seqs = Some(1);
    c.served_model_name = Some(common::MODEL.into());
    Arc::new(AsyncLLM::new(c).expect("the default model loads"))
}

/// Polls `/metrics` until running and waiting are as expected (each step records them).
async fn wait_for_gauges(base: &str, running: f64, waiting: f64) {
    for _ in 0..20_000 {
        let m = scrape(base).await;
        if m[&key("vllm:num_requests_running", "")] == running
            && m[&key("vllm:num_requests_waiting", "")] == waiting
        {
            assert_eq!(
                m[&key(
                    "vllm:num_requests_waiting_by_reason",
                    ",reason=\"capacity\""
                )],
                waiting
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("gauges never reached running={running} waiting={waiting}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_known_workload() {
    let engine = engine();
    let (base, _stop, _h) = common::start(engine.clone(), common::server_config());
    let before = scrape(&base).await;
    assert_eq!(before[&key("vllm:num_requests_running", "")], 0.0);

    // Known workload: three completions and a chat, greedy.
    let url = format!("{base}/v1/completions");
    let mut prompt_tokens = 0.0;
    let mut completion_tokens = 0.0;
    let mut requests = 0.0;
    for (prompt, max_tokens) in [
        ("The capital of France is", 6),
        ("Once upon a time, in a small village,", 9),
        ("The capital of France is", 4), // a prefix-cache hit
    ] {
        let (s, b) = common::post(
            &url,
            &json!({"model": common::MODEL, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        prompt_tokens += b["usage"]["prompt_tokens"].as_f64().expect("usage");
        completion_tokens += b["usage"]["completion_tokens"].as_f64().expect("usage");
        requests += 1.0;
    }
    let (s, b) = common::post(
        &format!("{base}/v1/chat/completions"),
        &json!({"model": common::MODEL, "messages": [{"role": "user", "content": "Hi!"}],
                "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    prompt_tokens += b["usage"]["prompt_tokens"].as_f64().expect("usage");
    completion_tokens += b["usage"]["completion_tokens"].as_f64().expect("usage");
    requests += 1.0;

    let after = scrape(&base).await;
    let d = |k: &str| delta(&before, &after, k);
    assert_eq!(d(&key("vllm:prompt_tokens_total", "")), prompt_tokens);
    assert_eq!(
        d(&key("vllm:generation_tokens_total", "")),
        completion_tokens
    );
    let success = d(&key(
        "vllm:request_success_total",
        ",finished_reason=\"length\"",
    )) + d(&key(
        "vllm:request_success_total",
        ",finished_reason=\"stop\"",
    ));
    assert_eq!(success, requests);
    for h in [
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_prefill_kv_computed_tokens",
    ] {
        assert_eq!(d(&key(&format!("{h}_count"), "")), requests, "{h}");
        assert_eq!(
            d(&key(&format!("{h}_bucket"), ",le=\"+Inf\"")),
            requests,
            "{h}"
        );
    }
    assert_eq!(d(&key("vllm:request_prompt_tokens_sum", "")), prompt_tokens);
    assert_eq!(
        d(&key("vllm:request_generation_tokens_sum", "")),
        completion_tokens
    );
    // One inter-token latency per token after each request's first.
    assert_eq!(
        d(&key("vllm:inter_token_latency_seconds_count", "")),
        completion_tokens - requests
    );
    // Every token computed or generated lands in exactly one step.
    assert_eq!(
        d(&key("vllm:iteration_tokens_total_sum", "")),
        prompt_tokens + completion_tokens
    );
    // The repeated prompt hit the prefix cache only if it spans a full block; in every case
    // cached + computed = all prompt tokens.
    let computed = d(&key(
        "vllm:prompt_tokens_by_source_total",
        ",source=\"local_compute\"",
    ));
    let cached = d(&key("vllm:prompt_tokens_cached_total", ""));
    assert_eq!(computed + cached, prompt_tokens);
    assert!(d(&key("vllm:prefix_cache_queries_total", "")) >= prompt_tokens);
    assert_eq!(after[&key("vllm:num_requests_running", "")], 0.0);
    assert_eq!(
        after[&format!(
            "vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",\
             enable_prefix_caching=\"True\",num_gpu_blocks=\"{}\",num_cpu_blocks=\"None\",\
             engine=\"0\"}}",
            engine.config().scheduler.num_blocks
        )],
        1.0
    );
    assert!(after["process_resident_memory_bytes"] > 0.0);

    // Gauges while a stream is held open: one sequence a step, so a second request waits.
    let before = after;
    let long = common::client()
        .post(&url)
        .json(
            &json!({"model": common::MODEL, "prompt": "Count slowly:", "max_tokens": 1500,
                      "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("send");
    let mut long_stream = long.bytes_stream();
    let first = long_stream.next().await.expect("an event").expect("chunk");
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    wait_for_gauges(&base, 1.0, 0.0).await;
    let url2 = url.clone();
    let second = tokio::spawn(async move {
        common::post(
            &url2,
            &json!({"model": common::MODEL, "prompt": "Hello", "max_tokens": 3,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await
    });
    wait_for_gauges(&base, 1.0, 1.0).await;
    // The held stream goes away: it is aborted, the waiting request runs and finishes.
    drop(long_stream);
    let (s, b) = second.await.expect("task");
    assert_eq!(s, 200, "{b}");
    wait_for_gauges(&base, 0.0, 0.0).await;
    let after = scrape(&base).await;
    let d = |k: &str| delta(&before, &after, k);
    assert_eq!(
        d(&key(
            "vllm:request_success_total",
            ",finished_reason=\"abort\""
        )),
        1.0
    );
    assert_eq!(
        d(&key(
            "vllm:request_success_total",
            ",finished_reason=\"length\""
        )),
        1.0
    );
    assert_eq!(d(&key("vllm:e2e_request_latency_seconds_count", "")), 2.0);
    let stats = engine.stats().await.expect("stats");
    assert_eq!(stats.num_stats_requests, 0);
    assert_eq!(stats.num_owned_blocks, 0);
}
