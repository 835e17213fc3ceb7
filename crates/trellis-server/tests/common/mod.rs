//! Test helpers: in-process servers on ephemeral ports over the default model, and SSE parsing.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use futures_util::StreamExt;
use serde_json::Value;
use trellis_engine::{AsyncLLM, EngineConfig, UsageContext};
use trellis_server::{AppState, ServerConfig};

/// The served model name in tests.
pub const MODEL: &str = "smollm2";

/// The default model; panics with instructions when it was not fetched.
pub fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "model file {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// A small engine: 2048-token context, 256 MiB of KV cache, server defaults.
pub fn engine() -> Arc<AsyncLLM> {
    let mut c = EngineConfig::new(model_path());
    c.max_model_len = Some(2048);
    c.kv_cache_memory = Some(256 << 20);
    c.usage = UsageContext::Server;
    Arc::new(AsyncLLM::new(c).expect("the default model loads"))
}

/// The runtime the servers run on (kept for the whole test binary).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Server settings used by tests.
pub fn server_config() -> ServerConfig {
    let mut c = ServerConfig::new(MODEL, model_path().display().to_string());
    c.disable_log_requests = true;
    c
}

/// Starts a server on 127.0.0.1:0 on the background runtime; returns its base URL and a
/// trigger that shuts it down, plus the join handle of `serve`.
pub fn start(
    engine: Arc<AsyncLLM>,
    config: ServerConfig,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let state = AppState::new(engine, config).expect("state");
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let addr = std_listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = runtime().spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        trellis_server::serve(listener, state, async move {
            let _ = rx.await;
        })
        .await
    });
    (format!("http://{addr}"), tx, handle)
}

/// A plain-HTTP client that ignores proxy variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// POSTs JSON; returns status and body (JSON, or Null when empty).
pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// GETs; returns status and body.
pub async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// POSTs a streaming request and returns the SSE payloads (`[DONE]` included as a string).
pub async fn post_stream(url: &str, body: &Value) -> Vec<Value> {
    let r = client().post(url).json(body).send().await.expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut buf = String::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    parse_sse(&buf)
}

/// Splits an SSE body into its `data:` payloads.
pub fn parse_sse(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|ev| ev.strip_prefix("data: "))
        .map(|d| {
            if d == "[DONE]" {
                Value::String(d.into())
            } else {
                serde_json::from_str(d).expect("SSE JSON")
            }
        })
        .collect()
}
