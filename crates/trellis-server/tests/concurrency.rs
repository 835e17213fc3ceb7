//! 32 concurrent streaming requests, 8 of which disconnect early: every other one completes
//! with the greedy text it gives alone, and afterwards the engine holds no KV block.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "List three colors:",
    "def fibonacci(n):",
];
const MAX_TOKENS: usize = 10;

fn body(prompt: &str, stream: bool) -> serde_json::Value {
    json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_with_disconnects_match_solo_runs_and_free_blocks() {
    let engine = common::engine();
    let (base, _stop, _h) = common::start(engine.clone(), common::server_config());
    let url = format!("{base}/v1/completions");

    // Reference: each prompt alone.
    let mut solo = Vec::new();
    for p in PROMPTS {
        let (s, b) = common::post(&url, &body(p, false)).await;
        assert_eq!(s, 200, "{b}");
        solo.push(b["choices"][0]["text"].as_str().expect("text").to_string());
    }

    let mut tasks = Vec::new();
    for i in 0..32usize {
        let url = url.clone();
        let prompt = PROMPTS[i % PROMPTS.len()];
        let disconnect = i % 4 == 3;
        tasks.push(tokio::spawn(async move {
            let r = common::client()
                .post(&url)
                .json(&body(prompt, true))
                .send()
                .await
                .expect("send");
            assert_eq!(r.status().as_u16(), 200);
            let mut s = r.bytes_stream();
            let mut buf = String::new();
            while let Some(chunk) = s.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
                if disconnect && buf.matches("data: ").count() >= 2 {
                    return None; // drops the connection mid-stream
                }
            }
            let events = common::parse_sse(&buf);
            assert_eq!(events.last(), Some(&json!("[DONE]")));
            let text: String = events
                .iter()
                .filter_map(|e| e["choices"][0]["text"].as_str())
                .collect();
            Some(text)
        }));
    }
    let mut completed = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.expect("task");
        if i % 4 == 3 {
            assert!(got.is_none());
            continue;
        }
        assert_eq!(
            got.as_deref(),
            Some(solo[i % PROMPTS.len()].as_str()),
            "request {i}"
        );
        completed += 1;
    }
    assert_eq!(completed, 24);

    // The aborted requests are dropped by the engine loop; nothing may stay owned.
    let mut stats = engine.stats().await.expect("stats");
    for _ in 0..100 {
        if stats.num_owned_blocks == 0 && stats.num_streams == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stats = engine.stats().await.expect("stats");
    }
    assert_eq!(stats.num_owned_blocks, 0, "{stats:?}");
    assert_eq!(stats.num_streams, 0, "{stats:?}");
    assert_eq!(stats.num_runner_requests, 0, "{stats:?}");
    assert_eq!(stats.num_unfinished_requests, 0, "{stats:?}");
    assert_eq!(stats.num_failed_steps, 0, "{stats:?}");
}
