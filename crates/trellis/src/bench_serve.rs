//! `trellis bench serve`: a load generator against a running OpenAI-compatible server
//! (vLLM's `vllm bench serve`, random dataset): streaming completions of random token-id
//! prompts, reporting output throughput, TTFT and inter-token latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use trellis_engine::sampler::Generator;

use crate::args::ServeBenchArgs;

/// What one request measured.
#[derive(Debug, Default, Clone)]
struct RequestResult {
    ttft: f64,
    itls: Vec<f64>,
    latency: f64,
    output_tokens: usize,
    prompt_tokens: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((p / 100.0) * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    serde_json::json!({ "mean_ms": mean * 1e3, "p50_ms": percentile(&v, 50.0) * 1e3, "p99_ms": percentile(&v, 99.0) * 1e3 })
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> Result<RequestResult> {
    let start = Instant::now();
    let resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .context("request failed")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("server answered {status}: {text}");
    }
    let mut out = RequestResult::default();
    let mut last: Option<Instant> = None;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.context("stream broke")?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data.trim() == "[DONE]" {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(data).context("bad SSE chunk")?;
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let has_text = v["choices"]
                    .get(0)
                    .and_then(|c| c["text"].as_str())
                    .is_some_and(|t| !t.is_empty());
                if has_text {
                    let now = Instant::now();
                    match last {
                        None => out.ttft = (now - start).as_secs_f64(),
                        Some(prev) => out.itls.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
    }
    out.latency = start.elapsed().as_secs_f64();
    Ok(out)
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ServeBenchArgs) -> Result<()> {
    let base = args.base_url.trim_end_matches('/').to_string();
    // A fresh connection per request: llama-server (cpp-httplib) closes kept-alive connections
    // on its own schedule, and a request sent on one it is closing fails with "connection
    // closed before message completed". Connecting costs well under a millisecond locally.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let models: serde_json::Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach the server at {base}"))?
        .json()
        .await?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => models["data"][0]["id"]
            .as_str()
            .context("the server lists no model")?
            .to_string(),
    };
    let url = format!("{base}/v1/completions");
    let mut g = Generator::new(args.seed);
    let prompts: Vec<Vec<u32>> = (0..args.num_prompts)
        .map(|_| {
            (0..args.input_len)
                .map(|_| (100 + g.next_u64() % 40_000) as u32)
                .collect()
        })
        .collect();
    let limit = Arc::new(Semaphore::new(
        args.max_concurrency.unwrap_or(args.num_prompts).max(1),
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for prompt in prompts {
        if let Some(rate) = args.request_rate.filter(|r| r.is_finite() && *r > 0.0) {
            // Poisson arrivals: exponential gaps with mean 1/rate.
            let gap = -(1.0 - g.next_f64()).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = limit.clone().acquire_owned().await?;
        let client = client.clone();
        let url = url.clone();
        let body = serde_json::json!({
            "model": model, "prompt": prompt, "max_tokens": args.output_len, "ignore_eos": true,
            "temperature": 0.0, "stream": true, "stream_options": {"include_usage": true},
        });
        tasks.push(tokio::spawn(async move {
            let r = one_request(&client, &url, body).await;
            drop(permit);
            r
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let output_tokens: usize = results.iter().map(|r| r.output_tokens).sum();
    let prompt_tokens: usize = results.iter().map(|r| r.prompt_tokens).sum();
    let ttft = stats(results.iter().map(|r| r.ttft).collect());
    let itl = stats(results.iter().flat_map(|r| r.itls.clone()).collect());
    let tpot = stats(
        results
            .iter()
            .filter(|r| r.output_tokens > 1)
            .map(|r| (r.latency - r.ttft) / (r.output_tokens - 1) as f64)
            .collect(),
    );
    let report = serde_json::json!({
        "num_prompts": results.len(), "duration_s": elapsed, "max_concurrency": args.max_concurrency,
        "request_throughput": results.len() as f64 / elapsed,
        "output_throughput": output_tokens as f64 / elapsed,
        "total_token_throughput": (output_tokens + prompt_tokens) as f64 / elapsed,
        "total_output_tokens": output_tokens, "total_input_tokens": prompt_tokens,
        "ttft": ttft, "tpot": tpot, "itl": itl,
    });
    println!(
        "Requests: {} in {:.2} s; output {:.2} tok/s; TTFT mean {:.1} ms p50 {:.1} p99 {:.1}; ITL mean {:.2} ms p50 {:.2} p99 {:.2}; TPOT mean {:.2} ms",
        results.len(),
        elapsed,
        output_tokens as f64 / elapsed,
        report["ttft"]["mean_ms"].as_f64().unwrap_or(0.0),
        report["ttft"]["p50_ms"].as_f64().unwrap_or(0.0),
        report["ttft"]["p99_ms"].as_f64().unwrap_or(0.0),
        report["itl"]["mean_ms"].as_f64().unwrap_or(0.0),
        report["itl"]["p50_ms"].as_f64().unwrap_or(0.0),
        report["itl"]["p99_ms"].as_f64().unwrap_or(0.0),
        report["tpot"]["mean_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(p) = &args.output_json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
