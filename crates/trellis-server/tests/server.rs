//! Every endpoint and every error of `trellis serve`, against in-process servers that share one
//! engine (SmolLM2-135M, 2048-token context, 256 MiB KV cache).

mod common;

use std::sync::{Arc, OnceLock};

use common::{MODEL, get, post, post_stream};
use serde_json::{Value, json};
use trellis_engine::AsyncLLM;

struct Servers {
    engine: Arc<AsyncLLM>,
    /// Open server with a 64 KiB body limit.
    open: String,
    /// Server that requires the API key `secret`.
    keyed: String,
    /// Server whose chat template is overridden.
    templated: String,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn servers() -> &'static Servers {
    static S: OnceLock<Servers> = OnceLock::new();
    S.get_or_init(|| {
        let engine = common::engine();
        let mut open_cfg = common::server_config();
        open_cfg.max_body_bytes = 64 << 10;
        let (open, s1, _) = common::start(engine.clone(), open_cfg);
        let mut keyed_cfg = common::server_config();
        keyed_cfg.api_key = Some("secret".into());
        let (keyed, s2, _) = common::start(engine.clone(), keyed_cfg);
        let mut t_cfg = common::server_config();
        t_cfg.chat_template =
            Some("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}".into());
        let (templated, s3, _) = common::start(engine.clone(), t_cfg);
        Servers {
            engine,
            open,
            keyed,
            templated,
            _stop: vec![s1, s2, s3],
        }
    })
}

fn url(path: &str) -> String {
    format!("{}{path}", servers().open)
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["type"], want_type, "{body}");
    assert_eq!(e["code"], want_status, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e.get("param").is_some(), "{body}");
}

async fn greedy_completion(prompt: &str, max_tokens: usize) -> String {
    let (s, b) = post(
        &url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    b["choices"][0]["text"].as_str().expect("text").to_string()
}

#[tokio::test]
async fn models_health_version() {
    let (s, body) = get(&url("/v1/models")).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "list");
    let m = &v["data"][0];
    assert_eq!(m["id"], MODEL);
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "trellis");
    assert_eq!(m["max_model_len"], 2048);
    assert!(m["root"].as_str().is_some_and(|r| r.ends_with(".gguf")));
    assert_eq!(get(&url("/health")).await, (200, String::new()));
    let (s, body) = get(&url("/version")).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert!(v["version"].is_string());
}

#[tokio::test]
async fn tokenize_and_detokenize() {
    let (s, t) = post(&url("/tokenize"), &json!({"prompt": "Hello world"})).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        t["count"],
        t["tokens"].as_array().map(|a| a.len()).unwrap_or(0)
    );
    assert_eq!(t["max_model_len"], 2048);
    let (s, d) = post(&url("/detokenize"), &json!({"tokens": t["tokens"]})).await;
    assert_eq!(s, 200);
    assert_eq!(d["prompt"], "Hello world");
    let (s, m) = post(
        &url("/tokenize"),
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{m}");
    let (_, text) = post(&url("/detokenize"), &json!({"tokens": m["tokens"]})).await;
    let text = text["prompt"].as_str().expect("prompt").to_string();
    assert!(
        text.contains("<|im_start|>user\nHi<|im_end|>")
            && text.ends_with("<|im_start|>assistant\n"),
        "{text}"
    );
    // --chat-template replaces the model's template.
    let (s, m) = post(
        &format!("{}/tokenize", servers().templated),
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, text) = post(&url("/detokenize"), &json!({"tokens": m["tokens"]})).await;
    assert_eq!(text["prompt"], "[user] Hi\n");
    let (s, e) = post(&url("/detokenize"), &json!({"tokens": [99999999]})).await;
    assert_error(s, &e, 400, "BadRequestError");
}

#[tokio::test]
async fn completion_shape_usage_and_prompt_forms() {
    let (s, b) = post(&url("/v1/completions"), &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["id"].as_str().is_some_and(|i| i.starts_with("cmpl-")));
    assert_eq!(b["object"], "text_completion");
    assert_eq!(b["model"], MODEL);
    assert!(b["created"].as_u64().is_some());
    let c = &b["choices"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    let (_, t) = post(
        &url("/tokenize"),
        &json!({"prompt": "The capital of France is"}),
    )
    .await;
    assert_eq!(b["usage"]["prompt_tokens"], t["count"]);
    assert_eq!(b["usage"]["completion_tokens"], 6);
    assert_eq!(
        b["usage"]["total_tokens"],
        t["count"].as_u64().unwrap_or(0) + 6
    );
    let text = c["text"].as_str().expect("text").to_string();

    // Token ids give the same text; several prompts and n=2 give prompt_index * n + i.
    let ids = t["tokens"].clone();
    let (s, b) = post(
        &url("/v1/completions"),
        &json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["choices"][0]["text"], text.as_str());
    let (s, b) = post(&url("/v1/completions"), &json!({"prompt": [ids, [1, 2, 3]], "max_tokens": 2, "temperature": 0, "n": 2, "ignore_eos": true})).await;
    assert_eq!(s, 200, "{b}");
    let idx: Vec<u64> = b["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .filter_map(|c| c["index"].as_u64())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(b["choices"][0]["text"], b["choices"][1]["text"]);
    assert_eq!(b["usage"]["completion_tokens"], 8);
    let (s, b) = post(
        &url("/v1/completions"),
        &json!({"prompt": ["Hi", "Hello"], "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["choices"].as_array().map(|a| a.len()), Some(2));
}

#[tokio::test]
async fn completion_logprobs_echo_and_stop() {
    let prompt = "The capital of France is";
    let (s, b) = post(&url("/v1/completions"), &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "ignore_eos": true})).await;
    assert_eq!(s, 200, "{b}");
    let lp = &b["choices"][0]["logprobs"];
    let toks = lp["tokens"].as_array().expect("tokens");
    assert_eq!(toks.len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().map(|a| a.len()), Some(4));
    assert_eq!(lp["text_offset"][0], 0);
    for top in lp["top_logprobs"].as_array().expect("top") {
        let n = top.as_object().map(|o| o.len()).unwrap_or(0);
        assert!((1..=3).contains(&n), "{top}");
    }
    let joined: String = toks.iter().filter_map(|t| t.as_str()).collect();
    assert_eq!(joined, b["choices"][0]["text"].as_str().unwrap_or(""));

    // echo: the prompt comes first, with its own logprobs (the first one null).
    let (s, e) = post(
        &url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(s, 200, "{e}");
    let text = e["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with(prompt), "{text}");
    assert!(e["choices"][0]["logprobs"]["token_logprobs"][0].is_null());

    // A stop string cuts the text before it.
    let full = greedy_completion(prompt, 8).await;
    let stop: String = full.trim_start().chars().skip(2).take(3).collect();
    assert!(!stop.is_empty(), "{full:?}");
    let (s, b) = post(
        &url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": [stop]}),
    )
    .await;
    assert_eq!(s, 200);
    let c = &b["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], stop.as_str());
    let cut = c["text"].as_str().expect("text");
    assert!(
        full.starts_with(cut) && !cut.contains(&stop),
        "{full:?} / {cut:?} / {stop:?}"
    );
}

#[tokio::test]
async fn completion_streaming_matches_non_streaming() {
    let prompt = "Once upon a time";
    let want = greedy_completion(prompt, 6).await;
    let events = post_stream(&url("/v1/completions"), &json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    let chunks = &events[..events.len() - 1];
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want);
    for c in chunks {
        assert_eq!(c["object"], "text_completion");
        assert!(c["id"].as_str().is_some_and(|i| i.starts_with("cmpl-")));
    }
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert!(
        usage["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n))
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1);
}

#[tokio::test]
async fn chat_completion_stream_n_and_logprobs() {
    let msgs = json!([{"role": "system", "content": "You are terse."}, {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]);
    let (s, b) = post(
        &url("/v1/chat/completions"),
        &json!({"messages": msgs, "max_completion_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["id"].as_str().is_some_and(|i| i.starts_with("chatcmpl-")));
    assert_eq!(b["object"], "chat.completion");
    let m = &b["choices"][0]["message"];
    assert_eq!(m["role"], "assistant");
    let want = m["content"].as_str().expect("content").to_string();
    assert!(b["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 5));

    let events = post_stream(
        &url("/v1/chat/completions"),
        &json!({"messages": msgs, "max_tokens": 6, "temperature": 0, "stream": true}),
    )
    .await;
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    let text: String = events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);

    let (s, b) = post(&url("/v1/chat/completions"), &json!({"messages": msgs, "max_tokens": 3, "temperature": 0.8, "seed": 7, "n": 2, "logprobs": true, "top_logprobs": 2})).await;
    assert_eq!(s, 200, "{b}");
    let choices = b["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for c in choices {
        let content = c["logprobs"]["content"].as_array().expect("logprobs");
        assert!(!content.is_empty());
        assert_eq!(
            content[0]["top_logprobs"].as_array().map(|a| a.len()),
            Some(2)
        );
        assert!(content[0]["logprob"].as_f64().is_some_and(|l| l <= 0.0));
    }
}

#[tokio::test]
async fn invalid_requests_are_400_naming_the_parameter() {
    let c = url("/v1/completions");
    for (body, param) in [
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": -3}), "max_tokens"),
        (json!({"prompt": "x", "top_p": 2.0}), "top_p"),
        (json!({"prompt": "x", "logprobs": 50}), "logprobs"),
        (
            json!({"prompt": "x", "logit_bias": {"abc": 1.0}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "presence_penalty": 3.0}),
            "presence_penalty",
        ),
        (json!({"prompt": []}), "prompt"),
    ] {
        let (s, e) = post(&c, &body).await;
        assert_error(s, &e, 400, "BadRequestError");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
    }
    let chat = url("/v1/chat/completions");
    let (s, e) = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    )
    .await;
    assert_error(s, &e, 400, "BadRequestError");
    let (s, e) = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    )
    .await;
    assert_error(s, &e, 400, "BadRequestError");
    let (s, e) = post(&chat, &json!({"messages": []})).await;
    assert_error(s, &e, 400, "BadRequestError");
}

#[tokio::test]
async fn context_overflow_model_and_json_errors() {
    let (s, e) = post(
        &url("/v1/completions"),
        &json!({"prompt": "Hello there", "max_tokens": 5000}),
    )
    .await;
    assert_error(s, &e, 400, "BadRequestError");
    let msg = e["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.starts_with(
            "This model's maximum context length is 2048 tokens. However, you requested"
        ),
        "{msg}"
    );
    assert!(msg.contains("5000 in the completion"), "{msg}");
    let (s, e) = post(
        &url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2040}),
    )
    .await;
    assert_error(s, &e, 400, "BadRequestError");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("2040 in the completion")
    );
    let long: Vec<u32> = vec![28; 2100];
    let (s, e) = post(&url("/v1/completions"), &json!({"prompt": long})).await;
    assert_error(s, &e, 400, "BadRequestError");

    let (s, e) = post(
        &url("/v1/completions"),
        &json!({"model": "foo", "prompt": "x"}),
    )
    .await;
    assert_error(s, &e, 404, "NotFoundError");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("The model `foo` does not exist. Valid aliases: ")
    );
    let (s, e) = post(
        &url("/v1/chat/completions"),
        &json!({"model": "foo", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_error(s, &e, 404, "NotFoundError");

    let r = common::client()
        .post(url("/v1/completions"))
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .expect("send");
    let s = r.status().as_u16();
    let e: Value = r.json().await.expect("json");
    assert_error(s, &e, 400, "BadRequestError");
    let (s, e) = post(&url("/v1/completions"), &json!({"prompt": 12.5})).await;
    assert_error(s, &e, 400, "BadRequestError");

    let big = "a".repeat(100 << 10);
    let (s, e) = post(&url("/v1/completions"), &json!({"prompt": big})).await;
    assert_error(s, &e, 413, "PayloadTooLargeError");

    let (s, body) = get(&url("/v1/nothing")).await;
    let e: Value = serde_json::from_str(&body).expect("json");
    assert_error(s, &e, 404, "NotFoundError");
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let base = &servers().keyed;
    let (s, body) = get(&format!("{base}/v1/models")).await;
    let e: Value = serde_json::from_str(&body).expect("json");
    assert_error(s, &e, 401, "AuthenticationError");
    let r = common::client()
        .get(format!("{base}/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let r = common::client()
        .get(format!("{base}/v1/models"))
        .bearer_auth("secret")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    // /health stays open (as in vLLM, only /v1 is guarded).
    assert_eq!(get(&format!("{base}/health")).await.0, 200);
}

#[tokio::test]
async fn no_blocks_leak_after_requests() {
    let _ = greedy_completion("Leak check", 3).await;
    let engine = &servers().engine;
    let stats = engine.stats().await.expect("stats");
    assert!(stats.num_kv_blocks > 0);
    assert_eq!(stats.num_failed_steps, 0);
}

/// A server on its own engine: shutdown lets the request in flight finish, then the engine
/// stops and the routes answer 503.
#[tokio::test]
async fn graceful_shutdown_then_503() {
    let engine = common::engine();
    let (base, stop, handle) = common::start(engine.clone(), common::server_config());
    let c = format!("{base}/v1/completions");
    let inflight = tokio::spawn(async move {
        post(&c, &json!({"prompt": "One two three", "max_tokens": 4, "temperature": 0, "ignore_eos": true})).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = stop.send(());
    let (s, b) = inflight.await.expect("join");
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["usage"]["completion_tokens"], 4);
    handle.await.expect("join").expect("serve ok");
    assert!(!engine.is_alive());
    // A new server over the stopped engine: 503 for generation and health.
    let (base, _stop, _h) = common::start(engine.clone(), common::server_config());
    let (s, e) = post(
        &format!("{base}/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_error(s, &e, 503, "ServiceUnavailableError");
    assert_eq!(get(&format!("{base}/health")).await.0, 503);
}
