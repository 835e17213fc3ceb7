//! The small routes: models, tokenize, detokenize, health, version, auth and fallbacks.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use trellis_engine::ChatTemplateOptions;

use crate::AppState;
use crate::chat::convert_messages;
use crate::error::ApiError;
use crate::protocol::{
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
};
use crate::util::JsonBody;

/// Requires `Authorization: Bearer KEY` when an API key is set.
pub async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k.trim() == key);
        if !ok {
            return ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized").into_response();
        }
    }
    next.run(req).await
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let card = |id: String, root: String, parent: Option<String>| ModelCard {
        id,
        object: "model".into(),
        created: state.created,
        owned_by: "trellis".into(),
        root,
        parent,
        max_model_len: state.engine.max_model_len(),
    };
    let base = &state.config.served_model_name;
    let mut data = vec![card(base.clone(), state.config.model_root.clone(), None)];
    // Adapters after the base, in load order (spec §5.4).
    for l in state.lora.loaded() {
        let parent = l.base_model_name.clone().unwrap_or_else(|| base.clone());
        data.push(card(l.lora_name, l.lora_path, Some(parent)));
    }
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.check_model(req.model.as_deref())?;
    let tok = state.engine.tokenizer();
    let tokens = match (req.prompt, req.messages) {
        (Some(p), None) => tok
            .encode(&p, req.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?,
        (None, Some(m)) => {
            let template = state
                .chat_template
                .as_ref()
                .map_err(|e| ApiError::from(e.clone()))?;
            let opts = ChatTemplateOptions {
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                ..Default::default()
            };
            let text = template.render(&convert_messages(&m)?, &opts)?;
            tok.encode(&text, req.add_special_tokens.unwrap_or(false))
                .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "Give exactly one of `prompt` and `messages`.",
                None,
            ));
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: state.engine.max_model_len(),
    }))
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    state.check_model(req.model.as_deref())?;
    let tok = state.engine.tokenizer();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::bad_request(
            format!(
                "token id {bad} is out of vocabulary range [0, {}).",
                tok.vocab_size()
            ),
            Some("tokens"),
        ));
    }
    let prompt = tok
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("tokens")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// `GET /health`: 200 with an empty body while the engine runs, else 503.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::engine_dead().into_response()
    }
}

/// `GET /version`.
pub async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// Unknown routes.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Not Found: {}", req.uri().path()),
    )
}

/// Known routes, wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

/// `GET /metrics`: the Prometheus exposition (vLLM's `vllm:` families and process metrics),
/// not behind the API key, as in vLLM.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.engine.render_metrics(),
    )
        .into_response()
}
