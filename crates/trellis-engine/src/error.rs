//! Engine errors.

use crate::sampling_params::SamplingParamsError;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A sampling parameter is invalid.
    #[error(transparent)]
    InvalidParams(#[from] SamplingParamsError),
    /// A pooling parameter is invalid (`dimensions`).
    #[error(transparent)]
    InvalidPoolingParams(#[from] crate::pooling_params::PoolingParamsError),
    /// The scheduler refused the request (empty prompt, context overflow, ...).
    #[error(transparent)]
    Scheduler(#[from] trellis_sched::SchedError),
    /// Loading the model failed.
    #[error(transparent)]
    Model(#[from] trellis_models::ModelError),
    /// Platform resolution or attention-backend selection failed.
    #[error(transparent)]
    Plugin(#[from] trellis_plugin::PluginError),
    /// Loading or registering a plugin failed (vLLM's failure policy: docs/plugins.md).
    #[error(transparent)]
    PluginLoad(Box<trellis_plugin::PluginLoadError>),
    /// Building or using the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A tensor operation failed during a forward pass.
    #[error("forward pass failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The engine configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(String),

    /// The platform refused the request (`Platform::validate_request`).
    #[error("{0}")]
    Rejected(String),

    /// The waiting queue is full (`max_waiting_requests`): try again later.
    #[error(
        "the server is overloaded: {waiting} requests are waiting and this one adds {adding}, \
         above the limit of {limit} (--max-waiting-requests); retry later"
    )]
    QueueFull {
        /// Requests waiting now.
        waiting: usize,
        /// Completions this request would add (its `n`).
        adding: usize,
        /// The limit.
        limit: usize,
    },
    /// An IO processor refused a request's `data` (its own text).
    #[error("{0}")]
    InvalidPluginData(String),
    /// The IO processor plugin could not be selected or built (vLLM's startup texts).
    #[error("{0}")]
    IoProcessor(String),
    /// A LoRA adapter could not be loaded (its own text, vLLM's where vLLM has one).
    #[error(transparent)]
    Lora(#[from] trellis_models::LoraError),
    /// A request names an adapter but LoRA is off (`--enable-lora`).
    #[error("{0}")]
    LoraNotEnabled(String),
    /// A broken internal expectation (a bug): reported, never a panic.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<trellis_plugin::PluginLoadError> for EngineError {
    fn from(e: trellis_plugin::PluginLoadError) -> Self {
        EngineError::PluginLoad(Box::new(e))
    }
}
