//! Errors a request can be refused with when it is added to the scheduler.

/// Why the scheduler refused a request. Each message names the limit that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// The prompt has no tokens: there is nothing to compute logits from.
    #[error("the prompt is empty: at least one prompt token is required")]
    EmptyPrompt,
    /// The prompt alone does not fit the model's context.
    #[error(
        "the prompt (length {prompt_len}) is longer than the maximum model length of {max_model_len}"
    )]
    PromptTooLong {
        /// Number of prompt tokens.
        prompt_len: usize,
        /// The engine's `max_model_len`.
        max_model_len: usize,
    },
    /// Prompt plus `max_tokens` do not fit the model's context.
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but {total} tokens were requested ({prompt_len} in the prompt, {max_tokens} in the completion)"
    )]
    ContextOverflow {
        /// Number of prompt tokens.
        prompt_len: usize,
        /// Requested `max_tokens`.
        max_tokens: usize,
        /// `prompt_len + max_tokens`.
        total: usize,
        /// The engine's `max_model_len`.
        max_model_len: usize,
    },
    /// Prompt plus `max_tokens` would need more KV-cache slots than the whole cache has: the
    /// request could never run to its end, even alone.
    #[error(
        "this request needs {needed} tokens of KV cache ({prompt_len} in the prompt, {max_tokens} in the completion), but the cache holds only {capacity} tokens ({num_blocks} blocks of {block_size}); lower max_tokens or shorten the prompt"
    )]
    ExceedsKvCache {
        /// Number of prompt tokens.
        prompt_len: usize,
        /// Requested `max_tokens`.
        max_tokens: usize,
        /// `prompt_len + max_tokens`.
        needed: usize,
        /// Tokens the whole cache holds (`num_blocks * block_size`).
        capacity: usize,
        /// Blocks in the cache.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// `max_tokens` must allow at least one generated token.
    #[error("max_tokens must be at least 1, got {0}")]
    ZeroMaxTokens(usize),
    /// `min_tokens` may not exceed `max_tokens`.
    #[error("min_tokens ({min_tokens}) must be less than or equal to max_tokens ({max_tokens})")]
    MinTokensAboveMax {
        /// Requested `min_tokens`.
        min_tokens: usize,
        /// Requested or derived `max_tokens`.
        max_tokens: usize,
    },
    /// A request with the same id is already known to the scheduler.
    #[error("a request with id {0:?} is already in the scheduler")]
    DuplicateRequestId(String),
    /// The scheduler configuration itself is invalid.
    #[error("invalid scheduler configuration: {0}")]
    InvalidConfig(String),
}
