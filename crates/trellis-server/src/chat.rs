//! `POST /v1/chat/completions`: messages → chat template → one engine request with `n`
//! completions; SSE chunks start with the assistant role.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use trellis_engine::sampler::PositionLogprobs;
use trellis_engine::{
    ChatMessage, ChatTemplateOptions, CompletionDelta, FinishReason, GenerateRequest, Prompt,
    RequestStream,
};

use crate::AppState;
use crate::error::ApiError;
use crate::protocol::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessageInput,
    ChatMessageOutput, ChatTokenLogprob, ChatTopLogprob, MessageContent, StreamOptions, Usage,
};
use crate::structured;
use crate::tool_calls::{self, ToolCallOutput, ToolPlan, ToolStreamer};
use crate::util::{self, JsonBody, ParamsInput, RequestLog};

/// Turns wire messages into template messages; text parts are joined with newlines.
pub fn convert_messages(messages: &[ChatMessageInput]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty.",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => texts.push(t.as_str()),
                            (kind, _) => {
                                return Err(ApiError::bad_request(
                                    format!("Unsupported content part type {kind:?}: only \"text\" parts with a \"text\" field are supported."),
                                    Some("messages"),
                                ));
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            let mut message = ChatMessage::new(m.role.clone(), content);
            message.tool_calls = m.tool_calls.as_deref().map(tool_calls::template_tool_calls);
            message.tool_call_id = m.tool_call_id.clone();
            message.name = m.name.clone();
            Ok(message)
        })
        .collect()
}

/// The handler.
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Response {
    match run(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(state: Arc<AppState>, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    let start = Instant::now();
    let lora = state.resolve_model(req.common.model.as_deref()).await?;
    let template = state
        .chat_template
        .as_ref()
        .map_err(|e| ApiError::from(e.clone()))?;
    let tools = ToolPlan::new(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        &state.config,
        template,
    )?;
    let messages = convert_messages(&req.messages)?;
    let mut options = ChatTemplateOptions {
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        extra: req.chat_template_kwargs.clone().unwrap_or_default(),
    };
    if let Some(t) = tools.template_tools() {
        options.extra.insert("tools".into(), t);
    }
    let prompt = template.render(&messages, &options)?;
    let tok = state.engine.tokenizer();
    let ids = tok
        .encode(&prompt, false)
        .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?;
    let top = util::non_negative(req.top_logprobs, "top_logprobs")?;
    if top.is_some_and(|k| k > 0) && !req.logprobs {
        return Err(ApiError::bad_request(
            "when using `top_logprobs`, `logprobs` must be set to true.",
            Some("top_logprobs"),
        ));
    }
    let logprobs = req.logprobs.then(|| top.unwrap_or(0));
    let max_tokens = match req.max_completion_tokens {
        Some(m) => (Some(m), "max_completion_tokens"),
        None => (req.max_tokens, "max_tokens"),
    };
    let mut params = ParamsInput {
        common: &req.common,
        max_tokens,
        logprobs,
        prompt_logprobs: None,
        prompt_len: ids.len(),
        max_model_len: state.engine.max_model_len(),
        vocab_size: state.engine.config().model.vocab_size,
    }
    .build()?;
    // The constraint: a tool grammar, else `structured_outputs`, else `response_format`;
    // its errors name the field the client used.
    let mut constraint_field = "structured_outputs";
    if let Some(c) = tools.constraint() {
        params.structured_outputs = Some(c.into());
        constraint_field = "tools";
    } else if params.structured_outputs.is_none()
        && let Some(rf) = &req.response_format
    {
        params.structured_outputs = rf.constraint()?.map(Box::new);
        constraint_field = structured::RESPONSE_FORMAT;
    }
    let n = params.n;
    let id = util::random_id("chatcmpl");
    let model = lora.as_ref().map_or_else(
        || state.config.served_model_name.clone(),
        |l| l.lora_name.clone(),
    );
    let stream = state
        .engine
        .generate_with(GenerateRequest {
            request_id: id.clone(),
            prompt: Prompt::Tokens(ids.clone()),
            params,
            priority: 0,
            lora,
        })
        .await
        .map_err(|e| structured::rename_param(e.into(), constraint_field))?;
    let (include_usage, continuous_usage) =
        StreamOptions::usage_flags(req.common.stream_options.as_ref());
    let job = Job {
        model,
        state,
        id,
        prompt_tokens: ids.len(),
        n,
        top_logprobs: logprobs,
        start,
        continuous_usage,
        tools,
    };
    if req.common.stream {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(job.stream(stream, include_usage, tx));
        Ok(util::sse_response(rx))
    } else {
        job.gather(stream)
            .await
            .map(|r| axum::Json(r).into_response())
    }
}

struct Job {
    state: Arc<AppState>,
    /// The `model` of every response: the adapter's name for a LoRA request, else the base
    /// model's (vLLM's `OpenAIServingModels.model_name`).
    model: String,
    id: String,
    prompt_tokens: usize,
    n: usize,
    top_logprobs: Option<usize>,
    start: Instant,
    /// `stream_options.continuous_usage_stats` (with `include_usage`): usage in every chunk.
    continuous_usage: bool,
    /// How the output becomes tool calls.
    tools: ToolPlan,
}

impl Job {
    fn log(&self, generated: usize, outcome: &str) {
        RequestLog {
            id: self.id.clone(),
            prompt_tokens: self.prompt_tokens,
            generated_tokens: generated,
            start: self.start,
            outcome: outcome.into(),
        }
        .emit(!self.state.config.disable_log_requests);
    }

    fn response(
        &self,
        object: &str,
        choices: Vec<ChatChoice>,
        usage: Option<Usage>,
    ) -> ChatCompletionResponse {
        ChatCompletionResponse {
            id: self.id.clone(),
            object: object.into(),
            created: util::unix_now(),
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn logprobs<'a>(
        &self,
        tokens: impl Iterator<Item = (&'a u32, &'a PositionLogprobs)>,
    ) -> Option<ChatLogprobs> {
        let k = self.top_logprobs?;
        let tok = self.state.engine.tokenizer();
        let content = tokens
            .map(|(&t, e)| {
                let token = util::token_text(tok, t);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: e.logprob,
                    top_logprobs: e
                        .top
                        .iter()
                        .take(k)
                        .map(|&(id, lp)| {
                            let token = util::token_text(tok, id);
                            ChatTopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob: lp,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        Some(ChatLogprobs { content })
    }

    /// The chunks of one text delta: the text itself, or (with tools) its content and tool-call
    /// fragments, the logprobs and finish reason on the last chunk.
    fn delta_choices(
        &self,
        d: &CompletionDelta,
        streamer: Option<&mut ToolStreamer>,
    ) -> Vec<ChatChoice> {
        let choice =
            |content: Option<String>, tool_calls: Option<Vec<ToolCallOutput>>| ChatChoice {
                index: d.index,
                message: None,
                delta: Some(ChatMessageOutput {
                    role: None,
                    content,
                    tool_calls,
                }),
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            };
        let mut chunks = Vec::new();
        let mut called = false;
        if let Some(s) = streamer {
            let mut parts = s.push(&d.text);
            if d.finish_reason.is_some() {
                let end = s.finish();
                parts.tool_calls.extend(end.tool_calls);
                if let Some(c) = end.content {
                    parts.content.get_or_insert_with(String::new).push_str(&c);
                }
            }
            called = s.called();
            if let Some(c) = parts.content {
                chunks.push(choice(Some(c), None));
            }
            chunks.extend(
                parts
                    .tool_calls
                    .into_iter()
                    .map(|t| choice(None, Some(vec![t]))),
            );
        } else {
            chunks.push(choice(Some(d.text.clone()), None));
        }
        if chunks.is_empty() {
            chunks.push(choice(Some(String::new()), None));
        }
        if let Some(last) = chunks.last_mut() {
            last.logprobs = self.logprobs(d.token_ids.iter().zip(d.logprobs.iter()));
            last.finish_reason = tool_finish(d.finish_reason, called);
            last.stop_reason = util::stop_value(&d.stop_reason);
        }
        chunks
    }

    async fn gather(self, mut stream: RequestStream) -> Result<ChatCompletionResponse, ApiError> {
        let mut finished = None;
        while let Some(u) = stream.recv().await {
            if u.finished.is_some() {
                finished = u.finished;
                break;
            }
        }
        let out = finished.ok_or_else(ApiError::engine_dead)?;
        if let Some(err) = &out.error {
            self.log(0, &format!("error: {err}"));
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                err.clone(),
            ));
        }
        let completion_tokens: usize = out.outputs.iter().map(|c| c.token_ids.len()).sum();
        let choices = out
            .outputs
            .iter()
            .map(|c| {
                let (content, calls) = match self.tools.parses_output() {
                    true => self.tools.extract(&c.text),
                    false => (Some(c.text.clone()), Vec::new()),
                };
                ChatChoice {
                    index: c.index,
                    finish_reason: tool_finish(c.finish_reason, !calls.is_empty()),
                    message: Some(ChatMessageOutput {
                        role: Some("assistant".into()),
                        content,
                        tool_calls: (!calls.is_empty()).then_some(calls),
                    }),
                    delta: None,
                    logprobs: self.logprobs(c.token_ids.iter().zip(c.logprobs.iter().flatten())),
                    stop_reason: util::stop_value(&c.stop_reason),
                }
            })
            .collect();
        self.log(completion_tokens, "ok");
        Ok(self.response(
            "chat.completion",
            choices,
            Some(Usage::new(self.prompt_tokens, completion_tokens)),
        ))
    }

    async fn stream(
        self,
        mut stream: RequestStream,
        include_usage: bool,
        tx: mpsc::Sender<axum::body::Bytes>,
    ) {
        const OBJ: &str = "chat.completion.chunk";
        let mut generated = 0usize;
        // The first chunk of every choice carries the role (vLLM sends them up front).
        for index in 0..self.n {
            let first = ChatChoice {
                index,
                message: None,
                delta: Some(ChatMessageOutput {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                    tool_calls: None,
                }),
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            };
            let usage = self
                .continuous_usage
                .then(|| Usage::new(self.prompt_tokens, 0));
            if tx
                .send(util::sse_json(&self.response(OBJ, vec![first], usage)))
                .await
                .is_err()
            {
                return self.log(0, "aborted: client disconnected");
            }
        }
        let mut per_choice = vec![0usize; self.n];
        let mut streamers: Vec<ToolStreamer> = match self.tools.parses_output() {
            true => (0..self.n).map(|_| self.tools.streamer()).collect(),
            false => Vec::new(),
        };
        let mut done = false;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return self.log(generated, "aborted: client disconnected"),
                u = stream.recv() => u,
            };
            let Some(update) = next else { break };
            if let Some(out) = &update.finished {
                done = true;
                if let Some(err) = &out.error {
                    let e = ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, err.clone());
                    let _ = tx.send(util::sse_json(&e.body())).await;
                    let _ = tx.send(util::sse_done()).await;
                    return self.log(generated, &format!("error: {err}"));
                }
            }
            for d in update.deltas {
                generated += d.token_ids.len();
                if let Some(c) = per_choice.get_mut(d.index) {
                    *c += d.token_ids.len();
                }
                if d.text.is_empty() && d.finish_reason.is_none() && d.token_ids.is_empty() {
                    continue;
                }
                let choices = self.delta_choices(&d, streamers.get_mut(d.index));
                let usage = self.continuous_usage.then(|| {
                    let tokens = per_choice.get(d.index).copied().unwrap_or(0);
                    Usage::new(self.prompt_tokens, tokens)
                });
                for choice in choices {
                    let chunk = self.response(OBJ, vec![choice], usage);
                    if tx.send(util::sse_json(&chunk)).await.is_err() {
                        return self.log(generated, "aborted: client disconnected");
                    }
                }
            }
            if done {
                break;
            }
        }
        if !done {
            let _ = tx
                .send(util::sse_json(&ApiError::engine_dead().body()))
                .await;
        } else if include_usage {
            let usage = Usage::new(self.prompt_tokens, generated);
            let _ = tx
                .send(util::sse_json(&self.response(OBJ, Vec::new(), Some(usage))))
                .await;
        }
        let _ = tx.send(util::sse_done()).await;
        self.log(generated, "ok");
    }
}

/// The finish reason: `tool_calls` when the output ended normally with tool calls.
fn tool_finish(reason: Option<FinishReason>, called: bool) -> Option<String> {
    match reason {
        Some(FinishReason::Stop) if called => Some("tool_calls".into()),
        r => util::finish_name(r),
    }
}
