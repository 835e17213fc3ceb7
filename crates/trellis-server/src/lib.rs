//! # trellis-server — the OpenAI-compatible HTTP server (`trellis serve`)
//!
//! A thin axum shell over [`AsyncLLM`] (DESIGN.md §1):
//!
//! ```text
//! HTTP JSON ─► CompletionRequest / ChatCompletionRequest    (validate; chat template; tokenize)
//!           ─► AsyncLLM::generate_with(GenerateRequest)      (one per prompt; n children inside)
//!           ◄─ RequestStream of RequestUpdate                 (deltas, then the finished output)
//!           ─► JSON body, or SSE `data: {...}` chunks ending with `data: [DONE]`
//! ```
//!
//! Everything here is wire format and HTTP policy (auth, body limit, error bodies, request
//! logs, graceful shutdown); sampling, stop strings, logprobs and chat templates live in
//! `trellis-engine`, so the Rust API can do all the server does.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod error;
pub mod pooling;
pub mod protocol;
mod routes;
pub mod structured;
pub mod tool_calls;
mod util;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use trellis_engine::{AsyncLLM, ChatTemplate, ChatTemplateError, IoProcessor};

pub use error::ApiError;

/// Server settings (the HTTP side; the engine has its own `EngineConfig`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients use in `model` (`--served-model-name`; default: the model path).
    pub served_model_name: String,
    /// The model path, reported as `root` by `/v1/models`.
    pub model_root: String,
    /// Required bearer token for `/v1/*` (`--api-key`, `VLLM_API_KEY`).
    pub api_key: Option<String>,
    /// A chat template that replaces the tokenizer's (`--chat-template` file content).
    pub chat_template: Option<String>,
    /// No per-request log lines.
    pub disable_log_requests: bool,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// How long shutdown waits for requests in flight before aborting them.
    pub shutdown_grace: Duration,
    /// `tool_choice: "auto"` is allowed (`--enable-auto-tool-choice`).
    pub enable_auto_tool_choice: bool,
    /// The parser of the model's tool calls under `auto` (`--tool-call-parser`: `hermes`).
    pub tool_call_parser: Option<String>,
}

impl ServerConfig {
    /// Defaults for a served model name and path.
    pub fn new(served_model_name: impl Into<String>, model_root: impl Into<String>) -> Self {
        ServerConfig {
            served_model_name: served_model_name.into(),
            model_root: model_root.into(),
            api_key: None,
            chat_template: None,
            disable_log_requests: false,
            max_body_bytes: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
            enable_auto_tool_choice: false,
            tool_call_parser: None,
        }
    }
}

/// What every handler sees.
pub struct AppState {
    /// The engine.
    pub engine: Arc<AsyncLLM>,
    /// The settings.
    pub config: ServerConfig,
    /// The chat template, or why there is none.
    pub chat_template: Result<ChatTemplate, ChatTemplateError>,
    /// Server start time (Unix seconds), the `created` of `/v1/models`.
    pub created: u64,
    /// The IO processor plugin `/pooling` hands `data` requests to (`--io-processor-plugin`).
    pub io_processor: Option<Arc<dyn IoProcessor>>,
}

impl AppState {
    /// Builds the state; a `--chat-template` that does not compile is an error here, a model
    /// without a template only fails chat requests.
    pub fn new(
        engine: Arc<AsyncLLM>,
        config: ServerConfig,
    ) -> Result<Arc<Self>, ChatTemplateError> {
        Self::with_io_processor(engine, config, None)
    }

    /// [`Self::new`] with the IO processor `/pooling` uses for `data` requests.
    pub fn with_io_processor(
        engine: Arc<AsyncLLM>,
        config: ServerConfig,
        io_processor: Option<Arc<dyn IoProcessor>>,
    ) -> Result<Arc<Self>, ChatTemplateError> {
        let chat_template =
            ChatTemplate::for_tokenizer(engine.tokenizer(), config.chat_template.as_deref());
        if config.chat_template.is_some()
            && let Err(e) = &chat_template
        {
            return Err(e.clone());
        }
        Ok(Arc::new(AppState {
            engine,
            config,
            chat_template,
            created: util::unix_now(),
            io_processor,
        }))
    }

    /// Checks the `model` field of a request.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.config.served_model_name => Err(ApiError::model_not_found(m)),
            _ => Ok(()),
        }
    }
}

/// The routes, with auth on `/v1/*`, the body limit and OpenAI-shaped errors everywhere.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/models", get(routes::models))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth,
        ));
    Router::new()
        .merge(v1)
        .route("/pooling", post(pooling::create))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting, waits up to
/// [`ServerConfig::shutdown_grace`] for requests in flight, and aborts what is left.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_grace;
    let engine = state.engine.clone();
    let notify = Arc::new(tokio::sync::Notify::new());
    let signalled = notify.clone();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        signalled.notify_one();
    });
    let deadline = async move {
        notify.notified().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r?,
        _ = deadline => {
            eprintln!("trellis: requests still running after {}s; aborting them", grace.as_secs());
        }
    }
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
/// Resolves once the engine thread has ended on its own (a dead engine, see
/// `trellis_engine::async_llm::MAX_CONSECUTIVE_FAILED_STEPS`): the server should then shut
/// down and the process exit non-zero, so that a supervisor restarts it.
pub async fn engine_died(engine: Arc<trellis_engine::AsyncLLM>) {
    while engine.is_alive() {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
