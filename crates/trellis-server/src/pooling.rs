//! `POST /pooling` (vLLM's pooling endpoint): completion-style (`input`) and chat-style
//! (`messages`) pooling requests answer the pooled vectors; IO-processor requests (`data`)
//! go through the IO processor plugin (spec §6.3): `parse_data` → `pre_process` → the engine
//! pools each prompt → `post_process` → `{"request_id", "created_at", "data"}`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_engine::io_processor::{plugin_output, plugin_prompts};
use trellis_engine::{ChatTemplateOptions, PoolingParams, PoolingTask, Prompt};

use crate::AppState;
use crate::chat::convert_messages;
use crate::embeddings::{encode_all, prompts};
use crate::error::ApiError;
use crate::protocol::{ChatMessageInput, PromptInput, Usage};
use crate::util;

/// vLLM's answer to a plugin request without an IO processor.
pub const NO_IO_PROCESSOR: &str = "No IOProcessor plugin installed. Please refer to the \
    documentation and to the 'prithvi_geospatial_mae_io_processor' offline inference example \
    for more details.";

/// The body: one of completion-style, chat-style or IO-processor request.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolingRequestBody {
    /// The served model name.
    pub model: Option<String>,
    /// IO-processor request: the plugin's input.
    pub data: Option<Value>,
    /// Completion-style: texts or token ids.
    pub input: Option<PromptInput>,
    /// Chat-style: a conversation, rendered with the chat template.
    pub messages: Option<Vec<ChatMessageInput>>,
    /// `plugin` (forced for `data`), `embed` or `encode` (default).
    pub task: Option<String>,
    /// Refused: "dimensions is currently not supported".
    pub dimensions: Option<i64>,
    /// Override the pooler's normalisation.
    pub normalize: Option<bool>,
    /// Lower is served first under the priority policy.
    pub priority: Option<i32>,
    /// Part of the response's `request_id` (after `pooling-`) unless `X-Request-Id` is set.
    pub request_id: Option<String>,
}

/// The handler.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    util::JsonBody(req): util::JsonBody<PoolingRequestBody>,
) -> Response {
    match run(state, &headers, req).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn bad(message: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError::bad_request(message, param)
}

async fn run(
    state: Arc<AppState>,
    headers: &HeaderMap,
    req: PoolingRequestBody,
) -> Result<Value, ApiError> {
    state.check_model(req.model.as_deref())?;
    let task = match (&req.data, req.task.as_deref()) {
        (Some(_), _) => PoolingTask::Plugin,
        (None, None) => PoolingTask::Encode,
        (None, Some(t)) => PoolingTask::parse(t).ok_or_else(|| {
            bad(
                format!("Unsupported task: '{t}' Supported tasks: ('encode', 'embed', 'plugin')"),
                Some("task"),
            )
        })?,
    };
    if task == PoolingTask::Plugin && state.io_processor.is_none() {
        return Err(bad(NO_IO_PROCESSOR, Some("task")));
    }
    if req.dimensions.is_some() {
        return Err(bad(
            "dimensions is currently not supported",
            Some("dimensions"),
        ));
    }
    let priority = req.priority.unwrap_or(0);
    if task == PoolingTask::Plugin {
        return plugin_request(&state, headers, req, priority).await;
    }
    let inputs = match (req.input, req.messages) {
        (Some(input), None) => prompts(input)?,
        (None, Some(messages)) => {
            let template = state
                .chat_template
                .as_ref()
                .map_err(|e| ApiError::from(e.clone()))?;
            let text = template.render(
                &convert_messages(&messages)?,
                &ChatTemplateOptions::default(),
            )?;
            vec![Prompt::Text(text)]
        }
        _ => {
            return Err(bad(
                "Give exactly one of `input`, `messages` and `data`.",
                None,
            ));
        }
    };
    let params = PoolingParams {
        task,
        normalize: req.normalize,
        dimensions: None,
    };
    let id = util::random_id("pool");
    let outputs = encode_all(&state, &id, inputs, &params, priority).await?;
    let prompt_tokens: usize = outputs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let data: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, o)| json!({"index": index, "object": "pooling", "data": o.outputs.data}))
        .collect();
    Ok(json!({
        "id": id,
        "object": "list",
        "created": util::unix_now(),
        "model": state.config.served_model_name,
        "data": data,
        "usage": Usage::new(prompt_tokens, 0),
    }))
}

/// The IO-processor flow of spec §6.3.
async fn plugin_request(
    state: &AppState,
    headers: &HeaderMap,
    req: PoolingRequestBody,
    priority: i32,
) -> Result<Value, ApiError> {
    let Some(processor) = state.io_processor.clone() else {
        return Err(bad(NO_IO_PROCESSOR, Some("task")));
    };
    let suffix = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(req.request_id)
        .unwrap_or_else(|| util::random_id("").trim_start_matches('-').to_string());
    let request_id = format!("pooling-{suffix}");
    let (prompts, params) = plugin_prompts(
        processor.as_ref(),
        req.data.as_ref(),
        &request_id,
        req.normalize,
    )?;
    let outputs = encode_all(state, &request_id, prompts, &params, priority).await?;
    let data = plugin_output(processor.as_ref(), outputs, &request_id)?;
    Ok(json!({
        "request_id": request_id,
        "created_at": util::unix_now(),
        "data": data,
    }))
}
