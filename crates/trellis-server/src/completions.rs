//! `POST /v1/completions`: one engine request per prompt, choices numbered
//! `prompt_index * n + i` (vLLM's rule), streamed as SSE or gathered into one body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use trellis_engine::{GenerateRequest, Prompt, RequestOutput, RequestStream, RequestUpdate};

use crate::AppState;
use crate::error::ApiError;
use crate::protocol::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptInput,
    StreamOptions, Usage,
};
use crate::util::{self, JsonBody, ParamsInput, RequestLog};

/// One prompt, tokenized.
struct PromptEntry {
    text: String,
    ids: Vec<u32>,
}

fn prompts(state: &AppState, input: PromptInput) -> Result<Vec<PromptEntry>, ApiError> {
    let tok = state.engine.tokenizer();
    let encode = |t: String| -> Result<PromptEntry, ApiError> {
        let ids = tok
            .encode(&t, true)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?;
        Ok(PromptEntry { text: t, ids })
    };
    let decode = |ids: Vec<u32>| -> Result<PromptEntry, ApiError> {
        let text = tok
            .decode(&ids, false)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("prompt")))?;
        Ok(PromptEntry { text, ids })
    };
    let list: Vec<PromptEntry> = match input {
        PromptInput::Text(t) => vec![encode(t)?],
        PromptInput::Texts(v) => v.into_iter().map(encode).collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![decode(ids)?],
        PromptInput::TokenLists(v) => v.into_iter().map(decode).collect::<Result<_, _>>()?,
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(
            "prompt must not be empty.",
            Some("prompt"),
        ));
    }
    if list.iter().any(|p| p.ids.is_empty()) {
        return Err(ApiError::bad_request(
            "prompt must contain at least one token.",
            Some("prompt"),
        ));
    }
    Ok(list)
}

/// The handler.
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Response {
    match run(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(state: Arc<AppState>, req: CompletionRequest) -> Result<Response, ApiError> {
    let start = Instant::now();
    let lora = state.resolve_model(req.common.model.as_deref()).await?;
    let logprobs = util::non_negative(req.logprobs, "logprobs")?;
    let entries = prompts(&state, req.prompt.clone())?;
    let id = util::random_id("cmpl");
    let cfg = state.engine.config();
    let mut streams = Vec::with_capacity(entries.len());
    let mut n = 1;
    for (i, p) in entries.iter().enumerate() {
        let params = ParamsInput {
            common: &req.common,
            max_tokens: (req.max_tokens, "max_tokens"),
            logprobs,
            prompt_logprobs: if req.echo { logprobs } else { None },
            prompt_len: p.ids.len(),
            max_model_len: state.engine.max_model_len(),
            vocab_size: cfg.model.vocab_size,
        }
        .build()?;
        n = params.n;
        let request = GenerateRequest {
            request_id: format!("{id}-{i}"),
            prompt: Prompt::Tokens(p.ids.clone()),
            params,
            priority: 0,
            lora: lora.clone(),
        };
        streams.push(state.engine.generate_with(request).await?);
    }
    let (include_usage, continuous_usage) =
        StreamOptions::usage_flags(req.common.stream_options.as_ref());
    let model = lora.as_ref().map_or_else(
        || state.config.served_model_name.clone(),
        |l| l.lora_name.clone(),
    );
    let job = Job {
        model,
        state,
        id,
        entries,
        n,
        logprobs,
        echo: req.echo,
        start,
        continuous_usage,
    };
    if req.common.stream {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(job.stream(streams, include_usage, tx));
        Ok(util::sse_response(rx))
    } else {
        job.gather(streams)
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
    entries: Vec<PromptEntry>,
    n: usize,
    logprobs: Option<usize>,
    echo: bool,
    start: Instant,
    /// `stream_options.continuous_usage_stats` (with `include_usage`): usage in every chunk.
    continuous_usage: bool,
}

/// Per-choice streaming state.
#[derive(Default)]
struct ChoiceState {
    started: bool,
    offset: usize,
    tokens: usize,
}

impl Job {
    fn prompt_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.ids.len()).sum()
    }

    fn log(&self, generated: usize, outcome: &str) {
        RequestLog {
            id: self.id.clone(),
            prompt_tokens: self.prompt_tokens(),
            generated_tokens: generated,
            start: self.start,
            outcome: outcome.into(),
        }
        .emit(!self.state.config.disable_log_requests);
    }

    fn response(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: util::unix_now(),
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// Logprobs of the echoed prompt (first token: null).
    fn echo_logprobs(
        &self,
        out: &mut CompletionLogprobs,
        prompt: usize,
        pl: Option<&Vec<Option<trellis_engine::sampler::PositionLogprobs>>>,
        k: usize,
        offset: &mut usize,
    ) {
        let tok = self.state.engine.tokenizer();
        for (j, &t) in self.entries[prompt].ids.iter().enumerate() {
            let e = pl.and_then(|v| v.get(j)).and_then(|o| o.as_ref());
            util::push_completion_logprob(out, tok, t, e, k, offset);
        }
    }

    async fn gather(self, streams: Vec<RequestStream>) -> Result<CompletionResponse, ApiError> {
        let mut outputs: Vec<RequestOutput> = Vec::with_capacity(streams.len());
        for mut s in streams {
            let mut finished = None;
            while let Some(u) = s.recv().await {
                if u.finished.is_some() {
                    finished = u.finished;
                    break;
                }
            }
            let out = finished.ok_or_else(ApiError::engine_dead)?;
            if let Some(err) = &out.error {
                self.log(0, &format!("error: {err}"));
                return Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    err.clone(),
                ));
            }
            outputs.push(out);
        }
        let tok = self.state.engine.tokenizer();
        let mut choices = Vec::new();
        let mut completion_tokens = 0;
        for (p, out) in outputs.iter().enumerate() {
            for c in &out.outputs {
                completion_tokens += c.token_ids.len();
                let prefix = if self.echo {
                    self.entries[p].text.as_str()
                } else {
                    ""
                };
                let logprobs = self.logprobs.map(|k| {
                    let mut lp = CompletionLogprobs::default();
                    let mut offset = 0;
                    if self.echo {
                        self.echo_logprobs(
                            &mut lp,
                            p,
                            out.prompt_logprobs.as_ref(),
                            k,
                            &mut offset,
                        );
                        offset = prefix.len();
                    }
                    for (t, e) in c.token_ids.iter().zip(c.logprobs.iter().flatten()) {
                        util::push_completion_logprob(&mut lp, tok, *t, Some(e), k, &mut offset);
                    }
                    lp
                });
                choices.push(CompletionChoice {
                    index: p * self.n + c.index,
                    text: format!("{prefix}{}", c.text),
                    logprobs,
                    finish_reason: util::finish_name(c.finish_reason),
                    stop_reason: util::stop_value(&c.stop_reason),
                });
            }
        }
        choices.sort_by_key(|c| c.index);
        self.log(completion_tokens, "ok");
        Ok(self.response(
            choices,
            Some(Usage::new(self.prompt_tokens(), completion_tokens)),
        ))
    }

    async fn stream(
        self,
        streams: Vec<RequestStream>,
        include_usage: bool,
        tx: mpsc::Sender<axum::body::Bytes>,
    ) {
        let tagged = streams.into_iter().enumerate().map(|(p, s)| {
            futures_util::stream::unfold(s, |mut s| async move { s.recv().await.map(|u| (u, s)) })
                .map(move |u| (p, u))
                .boxed()
        });
        let mut all = futures_util::stream::select_all(tagged);
        let mut choices: HashMap<usize, ChoiceState> = HashMap::new();
        let mut finished = 0;
        let total = self.entries.len();
        loop {
            let next = tokio::select! {
                _ = tx.closed() => {
                    let generated = choices.values().map(|c| c.tokens).sum();
                    return self.log(generated, "aborted: client disconnected");
                }
                n = all.next() => n,
            };
            let Some((p, update)) = next else { break };
            if let Some(out) = &update.finished {
                finished += 1;
                if let Some(err) = &out.error {
                    let e =
                        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, err.clone());
                    let _ = tx.send(util::sse_json(&e.body())).await;
                    let _ = tx.send(util::sse_done()).await;
                    return self.log(0, &format!("error: {err}"));
                }
            }
            for chunk in self.chunks(p, update, &mut choices) {
                if tx.send(util::sse_json(&chunk)).await.is_err() {
                    return self.log(0, "aborted: client disconnected");
                }
            }
        }
        let generated: usize = choices.values().map(|c| c.tokens).sum();
        if finished < total {
            let _ = tx
                .send(util::sse_json(&ApiError::engine_dead().body()))
                .await;
        } else if include_usage {
            let _ = tx
                .send(util::sse_json(&self.response(
                    Vec::new(),
                    Some(Usage::new(self.prompt_tokens(), generated)),
                )))
                .await;
        }
        let _ = tx.send(util::sse_done()).await;
        self.log(generated, "ok");
    }

    fn chunks(
        &self,
        p: usize,
        update: RequestUpdate,
        choices: &mut HashMap<usize, ChoiceState>,
    ) -> Vec<CompletionResponse> {
        let tok = self.state.engine.tokenizer();
        let mut out = Vec::new();
        for d in update.deltas {
            let index = p * self.n + d.index;
            let st = choices.entry(index).or_default();
            let mut text = String::new();
            let mut lp = self.logprobs.map(|_| CompletionLogprobs::default());
            if !st.started {
                st.started = true;
                if self.echo {
                    text.push_str(&self.entries[p].text);
                    if let (Some(lp), Some(k)) = (lp.as_mut(), self.logprobs) {
                        let mut off = 0;
                        self.echo_logprobs(lp, p, update.prompt_logprobs.as_ref(), k, &mut off);
                    }
                    st.offset = text.len();
                }
            }
            text.push_str(&d.text);
            st.tokens += d.token_ids.len();
            if let (Some(lp), Some(k)) = (lp.as_mut(), self.logprobs) {
                for (t, e) in d.token_ids.iter().zip(d.logprobs.iter()) {
                    util::push_completion_logprob(lp, tok, *t, Some(e), k, &mut st.offset);
                }
            }
            if text.is_empty() && d.finish_reason.is_none() && d.token_ids.is_empty() {
                continue;
            }
            out.push(
                self.response(
                    vec![CompletionChoice {
                        index,
                        text,
                        logprobs: lp,
                        finish_reason: util::finish_name(d.finish_reason),
                        stop_reason: util::stop_value(&d.stop_reason),
                    }],
                    self.continuous_usage
                        .then(|| Usage::new(self.entries[p].ids.len(), st.tokens)),
                ),
            );
        }
        out
    }
}
