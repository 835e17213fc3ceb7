//! What the engine returns: vLLM's `RequestOutput` and `CompletionOutput`.

use trellis_sched::FinishReason;

use crate::sampler::PositionLogprobs;

/// Why a completion stopped, beyond the finish reason: the stop token id or stop string.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum StopReason {
    /// A stop token id from `stop_token_ids`.
    Token(u32),
    /// A stop string from `stop`.
    Text(String),
}

/// One completion of a request (there are `n`).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct CompletionOutput {
    /// Index among the request's `n` completions.
    pub index: usize,
    /// Generated text (stop string trimmed unless asked otherwise).
    pub text: String,
    /// Generated token ids.
    pub token_ids: Vec<u32>,
    /// Sum of the sampled tokens' logprobs (when logprobs were asked for).
    pub cumulative_logprob: Option<f64>,
    /// Per generated token: its logprob, rank and the top ones (when asked for).
    pub logprobs: Option<Vec<PositionLogprobs>>,
    /// Why it finished; `None` while running.
    pub finish_reason: Option<FinishReason>,
    /// The stop token id or string that ended it.
    pub stop_reason: Option<StopReason>,
}

impl CompletionOutput {
    /// True once finished.
    pub fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// The result of a request.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct RequestOutput {
    /// The request id.
    pub request_id: String,
    /// The prompt text, when given as text.
    pub prompt: Option<String>,
    /// Prompt token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Per prompt token (the first has none): logprob, rank and top ones, when asked for.
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    /// The completions.
    pub outputs: Vec<CompletionOutput>,
    /// True when every completion finished.
    pub finished: bool,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// Why the request failed, when a completion finished with [`FinishReason::Error`].
    pub error: Option<String>,
}

/// What changed in one completion during one step (for streaming).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompletionDelta {
    /// Index among the request's completions.
    pub index: usize,
    /// New text.
    pub text: String,
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// Logprobs of the new tokens (when asked for).
    pub logprobs: Vec<PositionLogprobs>,
    /// Set when the completion finished in this step.
    pub finish_reason: Option<FinishReason>,
    /// The stop token id or string, when finished by one.
    pub stop_reason: Option<StopReason>,
}

/// One step's news for a request: deltas of the completions that moved, and the whole output
/// once everything finished.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestUpdate {
    /// The request id.
    pub request_id: String,
    /// Completions that changed.
    pub deltas: Vec<CompletionDelta>,
    /// Prompt logprobs, in the first update that has them all.
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    /// The full output, set when the request finished (for a pooling request: only when it
    /// failed, with the error).
    pub finished: Option<RequestOutput>,
    /// A pooling request's result (it finishes in the step that computes its prompt).
    pub pooling: Option<PoolingRequestOutput>,
}

/// The pooled data of a request (vLLM's `PoolingOutput`).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PoolingOutput {
    /// The pooled vector (an embedding for task `embed`).
    pub data: Vec<f32>,
}

/// The result of a pooling request (vLLM's `PoolingRequestOutput`; `EmbeddingRequestOutput`
/// for task `embed`).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PoolingRequestOutput {
    /// The request id.
    pub request_id: String,
    /// The token ids that were pooled (after truncation).
    pub prompt_token_ids: Vec<u32>,
    /// The pooled data.
    pub outputs: PoolingOutput,
    /// Always true: a pooling request finishes in one step.
    pub finished: bool,
}
