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
pub mod conn;
pub mod embeddings;
pub mod error;
pub mod lora_routes;
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

pub use conn::ConnLimits;
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
    /// Connection cap and timeouts (see [`conn`]).
    pub conn: ConnLimits,
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`: the load/unload routes exist, and unknown model
    /// names go to the LoRA resolvers.
    pub allow_runtime_lora_updating: bool,
    /// The LoRA resolvers (snapshotted when the state is built).
    pub lora_resolvers: trellis_engine::LoraResolverRegistry,
    /// `VLLM_SKIP_MODEL_NAME_VALIDATION`: any `model` is accepted (as the base model).
    pub skip_model_name_validation: bool,
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
            conn: ConnLimits::default(),
            allow_runtime_lora_updating: false,
            lora_resolvers: Default::default(),
            skip_model_name_validation: false,
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
    /// The served LoRA adapters.
    pub lora: lora_routes::LoraModels,
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
            lora: lora_routes::LoraModels::new(&config),
            engine,
            config,
            chat_template,
            created: util::unix_now(),
            io_processor,
        }))
    }

    /// Checks the `model` field of a request to an endpoint without LoRA support.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.config.served_model_name => {
                Err(ApiError::model_not_found(m, &self.config.served_model_name))
            }
            _ => Ok(()),
        }
    }

    /// The LoRA adapter a generation request's `model` selects (`None`: the base model), or
    /// the 404 (spec §5.3).
    pub async fn resolve_model(
        &self,
        model: Option<&str>,
    ) -> Result<Option<trellis_engine::LoraRequest>, ApiError> {
        self.lora
            .resolve(&self.engine, model, self.config.skip_model_name_validation)
            .await
    }
}

/// The routes, with auth on `/v1/*`, the body deadline and limit, and OpenAI-shaped errors
/// everywhere. Auth comes before the body is read, so a client without the key cannot make
/// the server buffer a body.
pub fn router(state: Arc<AppState>) -> Router {
    let body = axum::middleware::from_fn_with_state(
        (state.config.conn.body_timeout, state.config.max_body_bytes),
        conn::read_body,
    );
    let v1 = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/models", get(routes::models));
    let v1 = match state.lora.runtime_updating() {
        true => v1
            .route("/v1/load_lora_adapter", post(lora_routes::load))
            .route("/v1/unload_lora_adapter", post(lora_routes::unload)),
        false => v1,
    };
    let v1 = v1
        .layer(body.clone())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth,
        ));
    let rest = Router::new()
        .route("/pooling", post(pooling::create))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(routes::metrics))
        .layer(body);
    Router::new()
        .merge(v1)
        .merge(rest)
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
    let limits = state.config.conn;
    let engine = state.engine.clone();
    let stop = Arc::new(tokio::sync::Notify::new());
    let (stopper, signalled) = (stop.clone(), Arc::new(tokio::sync::Notify::new()));
    let notify = signalled.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.notify_one();
        notify.notify_one();
    });
    let server = conn::accept_loop(listener, router(state), limits, stop);
    let deadline = async move {
        signalled.notified().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        _ = server => {}
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
