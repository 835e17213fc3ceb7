//! The IO processor extension point (vLLM's `IOProcessor`, the 0.33 contract): a plugin that
//! turns the `data` of a `/pooling` request into engine prompts and their pooled outputs into
//! the response's `data`.
//!
//! Flow (spec §6.3): `parse_data(data)` → `pre_process(input)` → one prompt or more →
//! `merge_pooling_params()` applies to each → the engine pools them (in order) →
//! `post_process(outputs)` → `{"request_id", "created_at", "data"}`. vLLM validates neither the
//! plugin's input nor its output; Trellis neither.
//!
//! A plugin registers a factory in group `io_processor` ([`crate::Registrar::register_io_processor`]);
//! the host builds the processor when one is selected by name (`--io-processor-plugin NAME`, or
//! the `io_processor_plugin` key of the model's `config.json`), matching the *entry* name.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

/// What the IO processor methods return: a message the client sees as a 400.
pub type IoResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A prompt an IO processor hands the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoPrompt {
    /// Text, tokenized by the model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    TokenIds(Vec<u32>),
}

/// Pooling parameters as an IO processor merges them (the fields of vLLM's `PoolingParams`
/// that Trellis reads).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IoPoolingParams {
    /// The task; `plugin` when unset.
    pub task: Option<String>,
    /// Override the pooler's L2 normalisation.
    pub normalize: Option<bool>,
}

/// One pooled prompt handed to [`IoProcessor::post_process`] (vLLM's `PoolingRequestOutput`).
#[derive(Debug, Clone, PartialEq)]
pub struct IoPoolingOutput {
    /// The engine's id of this prompt's request.
    pub request_id: String,
    /// The token ids that were pooled.
    pub prompt_token_ids: Vec<u32>,
    /// The pooled vector.
    pub data: Vec<f32>,
}

/// An IO processor (vLLM's `IOProcessor`). The plugin input and output are JSON values.
pub trait IoProcessor: Send + Sync {
    /// Validates and converts the request's raw `data` into the plugin's input. vLLM's
    /// default raises `NotImplementedError`; so does this one.
    fn parse_data(&self, data: &Value) -> IoResult<Value> {
        let _ = data;
        Err("IoProcessor::parse_data is not implemented".into())
    }

    /// The pooling parameters of every prompt: the given ones, or task `plugin`.
    fn merge_pooling_params(&self, params: Option<IoPoolingParams>) -> IoPoolingParams {
        params.unwrap_or(IoPoolingParams {
            task: Some("plugin".into()),
            normalize: None,
        })
    }

    /// The sampling parameters (as JSON, vLLM's field names) of a generating use: the given
    /// ones, or the defaults (`{}`).
    fn merge_sampling_params(&self, params: Option<Value>) -> Value {
        params.unwrap_or_else(|| Value::Object(Default::default()))
    }

    /// Turns the plugin input into engine prompts (one or more).
    fn pre_process(&self, input: &Value, request_id: Option<&str>) -> IoResult<Vec<IoPrompt>>;

    /// Turns the pooled outputs (in prompt order) into the response's `data`.
    fn post_process(
        &self,
        outputs: &[IoPoolingOutput],
        request_id: Option<&str>,
    ) -> IoResult<Value>;
}

/// What an IO processor is built with (vLLM: `Cls(vllm_config, renderer)`).
#[derive(Debug, Clone, Copy)]
pub struct IoProcessorContext<'a> {
    /// The model path.
    pub model: &'a Path,
    /// The model's architecture.
    pub architecture: &'a str,
    /// The width of its hidden states (and of pooled vectors).
    pub hidden_size: usize,
}

/// Builds the plugin's IO processor.
pub type IoProcessorFactory =
    Arc<dyn Fn(&IoProcessorContext<'_>) -> IoResult<Box<dyn IoProcessor>> + Send + Sync>;
