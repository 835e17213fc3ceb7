//! A request as the scheduler sees it: token ids, progress and stop conditions, nothing else.

use crate::block_pool::BlockHash;

/// Identifier of a request, unique among the requests the scheduler holds.
pub type RequestId = String;
/// A token id of the model's vocabulary.
pub type TokenId = u32;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RequestStatus {
    /// Queued, never scheduled yet.
    Waiting,
    /// Holds KV blocks and is scheduled every step until it finishes.
    Running,
    /// Was running, lost its blocks to a newer need; back in the queue, will be recomputed.
    Preempted,
    /// Done; see the reason.
    Finished(FinishReason),
}

impl RequestStatus {
    /// True once the request has finished, for whatever reason.
    pub fn is_finished(self) -> bool {
        matches!(self, RequestStatus::Finished(_))
    }
}

/// Why a request finished (vLLM's `FinishReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or `max_model_len` reached.
    Length,
    /// Aborted by the client or the engine.
    Abort,
    /// The request can never be served (for example it needs more KV blocks than the cache has).
    Error,
}

impl FinishReason {
    /// The OpenAI / vLLM wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
            FinishReason::Error => "error",
        }
    }
}

/// Stop conditions known by token id. Stop *strings* are matched by the detokenizer, which
/// then finishes the request through [`crate::Scheduler::finish_request`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopConditions {
    /// Most tokens to generate; `None` means "up to `max_model_len`".
    pub max_tokens: Option<usize>,
    /// Fewest tokens to generate before EOS or a stop token may end the request.
    pub min_tokens: usize,
    /// The model's end-of-sequence ids (ignored when `ignore_eos`).
    pub eos_token_ids: Vec<TokenId>,
    /// Extra token ids that stop generation (reported as the stop reason).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
}

/// What the engine hands the scheduler to start a request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewRequest {
    /// Unique id.
    pub request_id: RequestId,
    /// Prompt token ids (at least one).
    pub prompt_token_ids: Vec<TokenId>,
    /// Stop conditions by token id.
    pub stop: StopConditions,
    /// LoRA adapter id; 0 means none. Part of every prefix-block hash.
    pub lora_id: u32,
    /// Lower values are served first under the priority policy.
    pub priority: i32,
    /// Arrival time in seconds (any monotonic origin); ties in priority go to the earlier one.
    pub arrival_time: f64,
    /// Extra keys mixed into the hash of every block (for example a multi-modal input hash or a
    /// cache salt), so that equal token ids with different extra inputs never share blocks.
    pub cache_salt: Option<u64>,
    /// Never reuse cached prefix blocks for this request (it still fills the cache). Requests
    /// that want prompt logprobs set this: they need logits at every prompt position.
    pub skip_reading_prefix_cache: bool,
}

/// A request tracked by the scheduler.
#[derive(Debug, Clone)]
pub struct Request {
    /// Unique id.
    pub request_id: RequestId,
    /// Prompt token ids.
    pub prompt_token_ids: Vec<TokenId>,
    /// Generated token ids so far.
    pub output_token_ids: Vec<TokenId>,
    /// Tokens whose K/V are in the cache (or will be after the step that scheduled them).
    pub num_computed_tokens: usize,
    /// Prompt tokens served from the prefix cache when the request was (last) admitted.
    pub num_cached_tokens: usize,
    /// Lifecycle state.
    pub status: RequestStatus,
    /// Stop conditions; `max_tokens` is always resolved here.
    pub max_tokens: usize,
    /// See [`StopConditions::min_tokens`].
    pub min_tokens: usize,
    /// See [`StopConditions::eos_token_ids`].
    pub eos_token_ids: Vec<TokenId>,
    /// See [`StopConditions::stop_token_ids`].
    pub stop_token_ids: Vec<TokenId>,
    /// See [`StopConditions::ignore_eos`].
    pub ignore_eos: bool,
    /// The stop token id that finished the request, if any.
    pub stop_reason: Option<TokenId>,
    /// LoRA adapter id (0 = none).
    pub lora_id: u32,
    /// Scheduling priority (lower first).
    pub priority: i32,
    /// Arrival time.
    pub arrival_time: f64,
    /// Extra hash key.
    pub cache_salt: Option<u64>,
    /// See [`NewRequest::skip_reading_prefix_cache`].
    pub skip_reading_prefix_cache: bool,
    /// Hashes of the request's full blocks, grown as tokens arrive.
    pub(crate) block_hashes: Vec<BlockHash>,
    /// How many times this request was preempted.
    pub num_preemptions: usize,
}

impl Request {
    pub(crate) fn new(new: NewRequest, max_tokens: usize) -> Self {
        Request {
            request_id: new.request_id,
            prompt_token_ids: new.prompt_token_ids,
            output_token_ids: Vec::new(),
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            status: RequestStatus::Waiting,
            max_tokens,
            min_tokens: new.stop.min_tokens,
            eos_token_ids: new.stop.eos_token_ids,
            stop_token_ids: new.stop.stop_token_ids,
            ignore_eos: new.stop.ignore_eos,
            stop_reason: None,
            lora_id: new.lora_id,
            priority: new.priority,
            arrival_time: new.arrival_time,
            cache_salt: new.cache_salt,
            skip_reading_prefix_cache: new.skip_reading_prefix_cache,
            block_hashes: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Prompt plus output length.
    pub fn num_tokens(&self) -> usize {
        self.prompt_token_ids.len() + self.output_token_ids.len()
    }

    /// Number of generated tokens.
    pub fn num_output_tokens(&self) -> usize {
        self.output_token_ids.len()
    }

    /// The token at position `pos` of prompt-then-output.
    pub fn token_at(&self, pos: usize) -> TokenId {
        let p = self.prompt_token_ids.len();
        if pos < p {
            self.prompt_token_ids[pos]
        } else {
            self.output_token_ids[pos - p]
        }
    }

    /// Token ids of positions `start..end`.
    pub fn tokens(&self, start: usize, end: usize) -> Vec<TokenId> {
        (start..end).map(|i| self.token_at(i)).collect()
    }

    /// Applies the stop conditions after a token was appended (vLLM's `check_stop`).
    pub(crate) fn check_stop(&mut self, max_model_len: usize) -> Option<FinishReason> {
        if self.num_tokens() >= max_model_len || self.num_output_tokens() >= self.max_tokens {
            return Some(FinishReason::Length);
        }
        if self.num_output_tokens() < self.min_tokens {
            return None;
        }
        let last = *self.output_token_ids.last()?;
        if !self.ignore_eos && self.eos_token_ids.contains(&last) {
            return Some(FinishReason::Stop);
        }
        if self.stop_token_ids.contains(&last) {
            self.stop_reason = Some(last);
            return Some(FinishReason::Stop);
        }
        None
    }
}
