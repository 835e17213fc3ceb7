//! `POST /v1/embeddings`: one pooling request per input, through the same engine (and batched
//! by the same scheduler) as generation; OpenAI's response shape, `float` or `base64`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_engine::{PoolingParams, PoolingRequest, PoolingRequestOutput, Prompt, RunnerType};

use crate::AppState;
use crate::error::ApiError;
use crate::protocol::{PromptInput, Usage};
use crate::util::{self, JsonBody, RequestLog};

/// vLLM's answer when the served model is not a pooling model.
pub const NOT_SUPPORTED: &str = "The model does not support Embeddings API";

/// The request body (OpenAI's `EmbeddingCreateParams`).
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// The served model name.
    pub model: Option<String>,
    /// A text, texts, token ids or lists of token ids.
    pub input: PromptInput,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Matryoshka dimensions: refused (no Trellis model supports them).
    pub dimensions: Option<i64>,
    /// Ignored (OpenAI's end-user id).
    pub user: Option<String>,
    /// vLLM's extra: override the model's normalisation.
    pub normalize: Option<bool>,
}

/// One embedding.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// Its input's index.
    pub index: usize,
    /// A list of floats, or a base64 string.
    pub embedding: serde_json::Value,
}

/// The response body.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingResponse {
    /// `embd-...`.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// Prompt tokens (completion tokens are 0).
    pub usage: Usage,
}

/// The handler.
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<EmbeddingRequest>,
) -> Response {
    match run(state, req).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The inputs as engine prompts; empty inputs are refused.
pub fn prompts(input: PromptInput) -> Result<Vec<Prompt>, ApiError> {
    let empty =
        |what: &str| ApiError::bad_request(format!("{what} must not be empty."), Some("input"));
    let list: Vec<Prompt> = match input {
        PromptInput::Text(t) => vec![Prompt::Text(t)],
        PromptInput::Texts(v) => v.into_iter().map(Prompt::Text).collect(),
        PromptInput::Tokens(ids) => vec![Prompt::Tokens(ids)],
        PromptInput::TokenLists(v) => v.into_iter().map(Prompt::Tokens).collect(),
    };
    if list.is_empty() {
        return Err(empty("input"));
    }
    for p in &list {
        match p {
            Prompt::Text(t) if t.is_empty() => return Err(empty("An input string")),
            Prompt::Tokens(ids) if ids.is_empty() => return Err(empty("An input token list")),
            _ => {}
        }
    }
    Ok(list)
}

async fn run(state: Arc<AppState>, req: EmbeddingRequest) -> Result<EmbeddingResponse, ApiError> {
    let start = Instant::now();
    state.check_model(req.model.as_deref())?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("encoding_format must be 'float' or 'base64', got '{other}'."),
                Some("encoding_format"),
            ));
        }
    };
    let params = PoolingParams {
        normalize: req.normalize,
        dimensions: req.dimensions.map(|d| d.max(0) as usize),
        ..PoolingParams::embed()
    };
    params
        .verify(&state.config.served_model_name)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("dimensions")))?;
    let id = util::random_id("embd");
    let outputs = encode_all(&state, &id, prompts(req.input)?, &params, 0).await?;
    let mut data = Vec::with_capacity(outputs.len());
    let mut prompt_tokens = 0;
    for (index, out) in outputs.into_iter().enumerate() {
        prompt_tokens += out.prompt_token_ids.len();
        let embedding = match base64 {
            true => serde_json::Value::String(encode_base64(&out.outputs.data)),
            false => serde_json::json!(out.outputs.data),
        };
        data.push(EmbeddingData {
            object: "embedding",
            index,
            embedding,
        });
    }
    RequestLog {
        id: id.clone(),
        prompt_tokens,
        generated_tokens: 0,
        start,
        outcome: "ok".into(),
    }
    .emit(!state.config.disable_log_requests);
    Ok(EmbeddingResponse {
        id,
        object: "list",
        created: util::unix_now(),
        model: state.config.served_model_name.clone(),
        data,
        usage: Usage::new(prompt_tokens, 0),
    })
}

/// Pools every prompt through the engine (one request each, `{id}-{i}`, batched by the
/// scheduler) and returns the outputs in prompt order. The model must be a pooling model.
pub async fn encode_all(
    state: &AppState,
    id: &str,
    prompts: Vec<Prompt>,
    params: &PoolingParams,
    priority: i32,
) -> Result<Vec<PoolingRequestOutput>, ApiError> {
    if state.engine.config().runner != RunnerType::Pooling {
        return Err(ApiError::bad_request(NOT_SUPPORTED, None));
    }
    let mut streams = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let request = PoolingRequest {
            request_id: format!("{id}-{i}"),
            prompt,
            params: params.clone(),
            priority,
        };
        streams.push(state.engine.encode_with(request).await?);
    }
    let mut outputs = Vec::with_capacity(streams.len());
    for mut s in streams {
        let mut pooled = None;
        while let Some(u) = s.recv().await {
            if let Some(err) = u.finished.and_then(|o| o.error) {
                return Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    err,
                ));
            }
            if u.pooling.is_some() {
                pooled = u.pooling;
                break;
            }
        }
        outputs.push(pooled.ok_or_else(ApiError::engine_dead)?);
    }
    Ok(outputs)
}

/// The little-endian bytes of `v` in standard base64 with padding (what the `openai` client
/// decodes with `np.frombuffer(base64.b64decode(s), dtype="float32")`).
pub fn encode_base64(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            match i <= chunk.len() {
                true => out.push(ALPHABET[(n >> shift & 63) as usize] as char),
                false => out.push('='),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_of_floats() {
        // 1.0f32 = 00 00 80 3f.
        assert_eq!(super::encode_base64(&[1.0]), "AACAPw==");
        assert_eq!(super::encode_base64(&[]), "");
    }
}
