//! Shared plumbing of the handlers: the JSON extractor with OpenAI-shaped rejections, request
//! ids, sampling-parameter conversion, logprob shapes, SSE bodies and request logs.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use trellis_engine::sampler::PositionLogprobs;
use trellis_engine::tokenizer::Tokenizer;
use trellis_engine::{FinishReason, SamplingParams, StopReason};

use crate::error::ApiError;
use crate::protocol::{CommonParams, StopInput};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh id with a prefix (`cmpl`, `chatcmpl`): 32 hex digits, unique per process run.
pub fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(c);
    h.write_u128(nanos);
    format!("{prefix}-{:016x}{:016x}", h.finish(), c ^ (nanos as u64))
}

/// A JSON body whose rejections (bad JSON, too large) answer with the OpenAI error body.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let status = r.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "The request body is too large.")
            } else {
                ApiError::new(status, r.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}"), None))
    }
}

/// Converts the shared request fields into [`SamplingParams`] and checks the context length.
/// `max_tokens` is the request's value (`None`: fill the context, or the KV cache if smaller).
pub struct ParamsInput<'a> {
    /// The shared fields.
    pub common: &'a CommonParams,
    /// Requested output length and the name of the field it came from.
    pub max_tokens: (Option<i64>, &'static str),
    /// Top logprobs per generated token.
    pub logprobs: Option<usize>,
    /// Top logprobs per prompt token (completions with `echo`).
    pub prompt_logprobs: Option<usize>,
    /// Prompt length in tokens.
    pub prompt_len: usize,
    /// The engine's context length.
    pub max_model_len: usize,
    /// The vocabulary size (for `logit_bias` and `stop_token_ids`).
    pub vocab_size: usize,
}

/// A non-negative integer parameter.
pub fn non_negative(v: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x < 0 => Err(ApiError::bad_request(
            format!("{param} must be non-negative, got {x}."),
            Some(param),
        )),
        Some(x) => Ok(Some(x as usize)),
    }
}

/// The context-length error (vLLM's text).
pub fn context_error(max_model_len: usize, prompt_len: usize, max_tokens: usize) -> ApiError {
    ApiError::bad_request(
        format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
            prompt_len + max_tokens
        ),
        None,
    )
}

impl ParamsInput<'_> {
    /// Validates and converts.
    pub fn build(&self) -> Result<SamplingParams, ApiError> {
        let c = self.common;
        let d = SamplingParams::default();
        let n = match c.n {
            Some(n) if n < 1 => {
                return Err(ApiError::bad_request(
                    format!("n must be at least 1, got {n}."),
                    Some("n"),
                ));
            }
            Some(n) => n as usize,
            None => 1,
        };
        let (max_tokens, max_name) = self.max_tokens;
        let max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::bad_request(
                    format!("{max_name} must be at least 1, got {m}."),
                    Some(max_name),
                ));
            }
            Some(m) => {
                let m = m as usize;
                if self.prompt_len.saturating_add(m) > self.max_model_len {
                    return Err(context_error(self.max_model_len, self.prompt_len, m));
                }
                Some(m)
            }
            None => {
                if self.prompt_len >= self.max_model_len {
                    return Err(ApiError::bad_request(
                        format!(
                            "This model's maximum context length is {} tokens. However, your request has {} input tokens. Please reduce the length of the input messages.",
                            self.max_model_len, self.prompt_len
                        ),
                        None,
                    ));
                }
                // The engine fills the context, or the KV cache if that is smaller.
                None
            }
        };
        let mut logit_bias = HashMap::new();
        for (k, v) in c.logit_bias.iter().flatten() {
            let id: u32 = k.trim().parse().map_err(|_| {
                ApiError::bad_request(
                    format!("Invalid key in 'logit_bias': {k:?} is not a token id."),
                    Some("logit_bias"),
                )
            })?;
            logit_bias.insert(id, v.clamp(-100.0, 100.0));
        }
        let stop = match &c.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        let params = SamplingParams {
            n,
            presence_penalty: c.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: c.frequency_penalty.unwrap_or(d.frequency_penalty),
            repetition_penalty: c.repetition_penalty.unwrap_or(d.repetition_penalty),
            temperature: c.temperature.unwrap_or(d.temperature),
            top_p: c.top_p.unwrap_or(d.top_p),
            top_k: c.top_k.unwrap_or(d.top_k),
            min_p: c.min_p.unwrap_or(d.min_p),
            seed: c.seed.map(|s| s as u64),
            stop,
            stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: c.ignore_eos,
            max_tokens,
            min_tokens: non_negative(c.min_tokens, "min_tokens")?.unwrap_or(0),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
            include_stop_str_in_output: c.include_stop_str_in_output,
            logit_bias,
            structured_outputs: c.structured_outputs.clone(),
        };
        params
            .validate(self.vocab_size)
            .map_err(|e| ApiError::bad_request(e.message, Some(e.param)))?;
        Ok(params)
    }
}

/// The text of one token as clients see it.
pub fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false)
        .unwrap_or_else(|_| format!("<token {id}>"))
}

/// Appends one position to completion logprobs; `offset` is the text offset of the token.
pub fn push_completion_logprob(
    out: &mut crate::protocol::CompletionLogprobs,
    tok: &Tokenizer,
    token_id: u32,
    entry: Option<&PositionLogprobs>,
    k: usize,
    offset: &mut usize,
) {
    let text = token_text(tok, token_id);
    out.text_offset.push(*offset);
    *offset += text.len();
    out.tokens.push(text.clone());
    out.token_logprobs.push(entry.map(|e| e.logprob));
    out.top_logprobs.push(entry.map(|e| {
        let mut m: BTreeMap<String, f32> = e
            .top
            .iter()
            .take(k)
            .map(|&(id, lp)| (token_text(tok, id), lp))
            .collect();
        m.entry(text).or_insert(e.logprob);
        m
    }));
}

/// The wire name of a finish reason.
pub fn finish_name(r: Option<FinishReason>) -> Option<String> {
    r.map(|r| r.as_str().to_string())
}

/// The wire value of a stop reason.
pub fn stop_value(r: &Option<StopReason>) -> Option<serde_json::Value> {
    r.as_ref().and_then(|r| serde_json::to_value(r).ok())
}

/// One SSE event with a JSON payload.
pub fn sse_json(v: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!("data: {json}\n\n"))
}

/// The stream's last event.
pub fn sse_done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A `text/event-stream` response reading events from `rx`.
pub fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    resp
}

/// What a finished request logs.
pub struct RequestLog {
    /// Request id.
    pub id: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Arrival.
    pub start: Instant,
    /// `ok`, `aborted`, or the error.
    pub outcome: String,
}

impl RequestLog {
    /// Writes the line to stderr unless logging is off.
    pub fn emit(&self, enabled: bool) {
        if enabled {
            eprintln!(
                "INFO trellis: request {} done: prompt_tokens={} generated_tokens={} latency={:.3}s {}",
                self.id,
                self.prompt_tokens,
                self.generated_tokens,
                self.start.elapsed().as_secs_f64(),
                self.outcome
            );
        }
    }
}
