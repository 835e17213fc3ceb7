//! vLLM V1's unified scheduler: every step, decide which requests run and on which slots.
//!
//! There is no prefill/decode split: each request simply has `num_tokens - num_computed_tokens`
//! tokens left to compute, and a step gives some of them a share of the token budget. Running
//! requests are served first (a decode token or the next chunk of a prefill), then waiting
//! requests in FCFS (or priority) order. When the cache runs out of blocks, the most recently
//! admitted running request is preempted: its blocks are freed and it returns to the front of
//! the queue, to be recomputed later with the tokens it generated kept.

use std::collections::{HashMap, VecDeque};

use crate::block_pool::BlockId;
use crate::error::SchedError;
use crate::kv_cache_manager::{KvCacheManager, PrefixCacheStats, update_block_hashes};
use crate::request::{FinishReason, NewRequest, Request, RequestId, RequestStatus, TokenId};

/// Order in which waiting requests are admitted (and running ones preempted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// First come, first served; the newest running request is preempted first.
    #[default]
    Fcfs,
    /// Lowest `priority` value first, then earliest arrival; the running request with the
    /// highest `(priority, arrival_time)` is preempted first.
    Priority,
}

/// The scheduler's own configuration (a slice of the engine configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Token budget of one step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Most requests running at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Longest sequence (prompt plus output) the model accepts.
    pub max_model_len: usize,
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Automatic prefix caching (`--enable-prefix-caching`, on by default).
    pub enable_prefix_caching: bool,
    /// Whether a prompt may be split over several steps (vLLM's `enable_chunked_prefill`, on
    /// by default). Off, a waiting request is admitted only when its whole prompt fits the
    /// step's remaining budget: pooling with non-causal attention needs every token at once.
    pub enable_chunked_prefill: bool,
    /// Admission order.
    pub policy: SchedulingPolicy,
}

impl SchedulerConfig {
    /// vLLM's CPU defaults for the offline `LLM` class: 4096 tokens and 256 sequences a step.
    pub fn cpu_offline(max_model_len: usize, num_blocks: usize) -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 4096,
            max_num_seqs: 256,
            max_model_len,
            block_size: 16,
            num_blocks,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            policy: SchedulingPolicy::Fcfs,
        }
    }

    /// vLLM's CPU defaults for the OpenAI server: 2048 tokens and 128 sequences a step.
    pub fn cpu_server(max_model_len: usize, num_blocks: usize) -> Self {
        SchedulerConfig {
            max_num_batched_tokens: 2048,
            max_num_seqs: 128,
            ..Self::cpu_offline(max_model_len, num_blocks)
        }
    }

    fn validate(&self) -> Result<(), SchedError> {
        let bad = |m: &str| Err(SchedError::InvalidConfig(m.to_string()));
        if self.block_size == 0 {
            return bad("block_size must be at least 1");
        }
        if self.num_blocks == 0 {
            return bad("the KV cache must have at least one block");
        }
        if self.max_num_batched_tokens == 0 {
            return bad("max_num_batched_tokens must be at least 1");
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs must be at least 1");
        }
        if self.max_model_len < 2 {
            return bad("max_model_len must be at least 2");
        }
        // The longest prompt is `max_model_len - 1` tokens (one is left for the output).
        if !self.enable_chunked_prefill && self.max_num_batched_tokens + 1 < self.max_model_len {
            return bad(
                "without chunked prefill, max_num_batched_tokens must hold the longest prompt \
                 (max_model_len - 1 tokens)",
            );
        }
        Ok(())
    }
}

/// One request's share of a step: what the model runner needs to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRequest {
    /// The request.
    pub request_id: RequestId,
    /// LoRA adapter id (0 = none).
    pub lora_id: u32,
    /// Token ids computed this step.
    pub token_ids: Vec<TokenId>,
    /// Position of each of those tokens in the sequence.
    pub positions: Vec<usize>,
    /// The request's whole block table.
    pub block_table: Vec<BlockId>,
    /// Cache slot (`block * block_size + offset`) of each new token.
    pub slot_mapping: Vec<usize>,
    /// Tokens already in the cache before this step.
    pub num_computed_tokens: usize,
    /// True when this step computes the request's last known token, so its logits are sampled.
    pub samples: bool,
    /// Number of tokens generated so far (the index of the token that will be sampled).
    pub num_output_tokens: usize,
}

/// The plan of one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Requests scheduled this step, running ones first.
    pub scheduled: Vec<ScheduledRequest>,
    /// Sum of the scheduled token counts.
    pub total_num_scheduled_tokens: usize,
    /// Requests finished (or aborted) since the previous step: runners drop their state.
    pub finished_req_ids: Vec<RequestId>,
    /// Requests preempted during this step.
    pub preempted_req_ids: Vec<RequestId>,
}

impl SchedulerOutput {
    /// True when nothing runs this step.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// What the model runner sampled: for each scheduled request, in plan order, the new token ids
/// (empty for a request whose prefill is not complete yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRunnerOutput {
    /// Sampled tokens, one entry per [`SchedulerOutput::scheduled`] request.
    pub sampled_token_ids: Vec<Vec<TokenId>>,
}

/// Per-request result of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineCoreOutput {
    /// The request.
    pub request_id: RequestId,
    /// Tokens generated this step.
    pub new_token_ids: Vec<TokenId>,
    /// Set when the request finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop token id that ended it, if one did.
    pub stop_reason: Option<TokenId>,
    /// Prompt tokens that were served from the prefix cache.
    pub num_cached_tokens: usize,
    /// Why the request failed, for [`FinishReason::Error`].
    pub error: Option<String>,
}

/// Numbers for stat loggers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SchedulerStats {
    /// Requests holding KV blocks.
    pub num_running_reqs: usize,
    /// Requests queued (including preempted ones).
    pub num_waiting_reqs: usize,
    /// Fraction of KV blocks owned by requests.
    pub kv_cache_usage: f64,
    /// Prefix-cache lookups and hits so far.
    pub prefix_cache: PrefixCacheStats,
    /// Preemptions so far.
    pub num_preemptions: u64,
}

/// The scheduler. See the module docs.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvCacheManager,
    requests: HashMap<RequestId, Request>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    finished_req_ids: Vec<RequestId>,
    /// Outputs of requests that finished outside a step (errors), delivered by the next update.
    pending_outputs: Vec<EngineCoreOutput>,
    num_preemptions: u64,
    /// Most distinct LoRA adapters among running requests (`--max-loras`); `None`: no limit.
    max_loras: Option<usize>,
}

impl Scheduler {
    /// A scheduler with an empty cache of `config.num_blocks` blocks.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedError> {
        config.validate()?;
        Ok(Scheduler {
            kv: KvCacheManager::new(
                config.num_blocks,
                config.block_size,
                config.enable_prefix_caching,
            ),
            config,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished_req_ids: Vec::new(),
            pending_outputs: Vec::new(),
            num_preemptions: 0,
            max_loras: None,
        })
    }

    /// Limits the distinct LoRA adapters of the running requests to `max_loras` (vLLM's
    /// `--max-loras`): a waiting request whose adapter would be one too many waits (see
    /// [`crate::lora_admission`]).
    pub fn set_max_loras(&mut self, max_loras: Option<usize>) {
        self.max_loras = max_loras;
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV-cache manager (read-only).
    pub fn kv_cache_manager(&self) -> &KvCacheManager {
        &self.kv
    }

    /// A request the scheduler holds (waiting, running or preempted).
    pub fn request(&self, request_id: &str) -> Option<&Request> {
        self.requests.get(request_id)
    }

    /// Requests not finished yet.
    pub fn num_unfinished_requests(&self) -> usize {
        self.requests.len()
    }

    /// True while any request is waiting or running, or an output is pending.
    pub fn has_unfinished_requests(&self) -> bool {
        !self.requests.is_empty() || !self.pending_outputs.is_empty()
    }

    /// Queues a request. Bad input is refused with an error naming the limit, and so is a
    /// request whose prompt plus `max_tokens` could never fit in the whole KV cache. Without a
    /// `max_tokens`, a request may grow until the context or the cache is full, whichever is
    /// smaller.
    pub fn add_request(&mut self, new: NewRequest) -> Result<(), SchedError> {
        let prompt_len = new.prompt_token_ids.len();
        let max_model_len = self.config.max_model_len;
        if prompt_len == 0 {
            return Err(SchedError::EmptyPrompt);
        }
        if prompt_len >= max_model_len {
            return Err(SchedError::PromptTooLong {
                prompt_len,
                max_model_len,
            });
        }
        let capacity = self.config.num_blocks * self.config.block_size;
        let max_tokens = new.stop.max_tokens.unwrap_or(
            max_model_len
                .min(capacity)
                .saturating_sub(prompt_len)
                .max(1),
        );
        if max_tokens == 0 {
            return Err(SchedError::ZeroMaxTokens(0));
        }
        if prompt_len + max_tokens > max_model_len {
            return Err(SchedError::ContextOverflow {
                prompt_len,
                max_tokens,
                total: prompt_len + max_tokens,
                max_model_len,
            });
        }
        if prompt_len + max_tokens > capacity {
            return Err(SchedError::ExceedsKvCache {
                prompt_len,
                max_tokens,
                needed: prompt_len + max_tokens,
                capacity,
                num_blocks: self.config.num_blocks,
                block_size: self.config.block_size,
            });
        }
        if new.stop.min_tokens > max_tokens {
            return Err(SchedError::MinTokensAboveMax {
                min_tokens: new.stop.min_tokens,
                max_tokens,
            });
        }
        if self.requests.contains_key(&new.request_id) {
            return Err(SchedError::DuplicateRequestId(new.request_id));
        }
        let mut request = Request::new(new, max_tokens);
        update_block_hashes(&mut request, self.config.block_size);
        self.waiting.push_back(request.request_id.clone());
        self.requests.insert(request.request_id.clone(), request);
        Ok(())
    }

    /// Finishes a request in any state, freeing its blocks. Returns false if it is unknown
    /// (already finished, or never added).
    pub fn finish_request(&mut self, request_id: &str, reason: FinishReason) -> bool {
        let Some(mut request) = self.requests.remove(request_id) else {
            return false;
        };
        request.status = RequestStatus::Finished(reason);
        self.running.retain(|id| id != request_id);
        self.waiting.retain(|id| id != request_id);
        self.kv.free(request_id);
        self.finished_req_ids.push(request.request_id);
        true
    }

    /// Aborts a request in any state (vLLM's `finish_requests(..., FINISHED_ABORTED)`).
    pub fn abort(&mut self, request_id: &str) -> bool {
        self.finish_request(request_id, FinishReason::Abort)
    }

    /// Stats for stat loggers.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_running_reqs: self.running.len(),
            num_waiting_reqs: self.waiting.len(),
            kv_cache_usage: self.kv.pool().usage(),
            prefix_cache: self.kv.prefix_cache_stats(),
            num_preemptions: self.num_preemptions,
        }
    }

    /// Forgets cached prefixes (only those in free blocks; owned blocks are untouched).
    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    /// Plans one step. See the module docs for the rules.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut budget = self.config.max_num_batched_tokens;
        // (request id, tokens this step), in plan order.
        let mut planned: Vec<(RequestId, usize)> = Vec::new();
        let mut preempted: Vec<RequestId> = Vec::new();

        // 1. Running requests.
        let mut idx = 0;
        while idx < self.running.len() && budget > 0 {
            let id = self.running[idx].clone();
            let Some(req) = self.requests.get(&id) else {
                self.running.remove(idx);
                continue;
            };
            let num_new = (req.num_tokens() - req.num_computed_tokens).min(budget);
            if num_new == 0 {
                idx += 1;
                continue;
            }
            let mut scheduled = false;
            loop {
                let Some(req) = self.requests.get(&id) else {
                    break;
                };
                if self.kv.allocate_slots(req, num_new, &[]) {
                    scheduled = true;
                    break;
                }
                // Out of blocks. Alone, the request can never fit: fail it instead of looping.
                if self.running.len() == 1 {
                    let needed =
                        (req.num_computed_tokens + num_new).div_ceil(self.config.block_size);
                    let msg = format!(
                        "the request needs {needed} KV-cache blocks but the cache has only {} blocks of {} tokens",
                        self.config.num_blocks, self.config.block_size
                    );
                    self.fail_request(&id, msg);
                    break;
                }
                let victim = self.pick_preemption_victim();
                if let Some(vpos) = self.running.iter().position(|r| *r == victim)
                    && vpos < idx
                {
                    // Priority policy can pick a request already planned this step: unplan it.
                    idx -= 1;
                    if let Some(ppos) = planned.iter().position(|(r, _)| *r == victim) {
                        budget += planned.remove(ppos).1;
                    }
                }
                self.preempt(&victim);
                preempted.push(victim.clone());
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            planned.push((id, num_new));
            budget -= num_new;
            idx += 1;
        }

        // 2. Waiting requests, unless this step had to preempt.
        if preempted.is_empty() {
            let mut loras = crate::lora_admission::LoraAdmission::new(
                self.max_loras,
                self.running
                    .iter()
                    .filter_map(|id| self.requests.get(id).map(|r| r.lora_id)),
            );
            while budget > 0 && self.running.len() < self.config.max_num_seqs {
                let Some(pos) = self.next_waiting_index(loras.deferred()) else {
                    break;
                };
                let id = self.waiting[pos].clone();
                let Some(req) = self.requests.get(&id) else {
                    self.waiting.remove(pos);
                    continue;
                };
                if !loras.admit(&id, req.lora_id) {
                    continue;
                }
                let (hit_blocks, hit_tokens) = self.kv.get_computed_blocks(req);
                if !self.config.enable_chunked_prefill && req.num_tokens() - hit_tokens > budget {
                    break;
                }
                let num_new = (req.num_tokens() - hit_tokens).min(budget);
                if !self.kv.allocate_slots(req, num_new, &hit_blocks) {
                    break;
                }
                self.waiting.remove(pos);
                loras.admitted(req.lora_id);
                let Some(req) = self.requests.get_mut(&id) else {
                    break;
                };
                req.num_computed_tokens = hit_tokens;
                if req.status == RequestStatus::Waiting {
                    req.num_cached_tokens = hit_tokens;
                }
                req.status = RequestStatus::Running;
                self.running.push(id.clone());
                planned.push((id, num_new));
                budget -= num_new;
            }
        }

        // 3. Build the plan and advance the computed counts.
        let bs = self.config.block_size;
        let mut out = SchedulerOutput {
            finished_req_ids: std::mem::take(&mut self.finished_req_ids),
            preempted_req_ids: preempted,
            ..Default::default()
        };
        for (id, num_new) in planned {
            let Some(req) = self.requests.get_mut(&id) else {
                continue;
            };
            let start = req.num_computed_tokens;
            let end = start + num_new;
            let block_table = self.kv.block_table(&id).to_vec();
            let slot_mapping = (start..end)
                .map(|p| block_table[p / bs] as usize * bs + p % bs)
                .collect();
            out.scheduled.push(ScheduledRequest {
                request_id: id.clone(),
                lora_id: req.lora_id,
                token_ids: req.tokens(start, end),
                positions: (start..end).collect(),
                block_table,
                slot_mapping,
                num_computed_tokens: start,
                samples: end == req.num_tokens(),
                num_output_tokens: req.num_output_tokens(),
            });
            out.total_num_scheduled_tokens += num_new;
            req.num_computed_tokens = end;
            self.kv.cache_blocks(req, end);
        }
        out
    }

    /// Applies a step's sampled tokens: appends them, checks stop conditions, frees finished
    /// requests, and returns one output per request that produced a token or finished.
    pub fn update_from_output(
        &mut self,
        plan: &SchedulerOutput,
        runner_output: &ModelRunnerOutput,
    ) -> Vec<EngineCoreOutput> {
        let mut outputs = std::mem::take(&mut self.pending_outputs);
        let max_model_len = self.config.max_model_len;
        let bs = self.config.block_size;
        for (i, sr) in plan.scheduled.iter().enumerate() {
            if !sr.samples {
                continue;
            }
            let sampled = runner_output
                .sampled_token_ids
                .get(i)
                .map_or(&[][..], |v| v.as_slice());
            let Some(req) = self.requests.get_mut(&sr.request_id) else {
                continue;
            };
            let mut new_token_ids = Vec::new();
            let mut finish = None;
            for &tok in sampled {
                req.output_token_ids.push(tok);
                new_token_ids.push(tok);
                if let Some(reason) = req.check_stop(max_model_len) {
                    finish = Some(reason);
                    break;
                }
            }
            update_block_hashes(req, bs);
            if new_token_ids.is_empty() && finish.is_none() {
                continue;
            }
            outputs.push(EngineCoreOutput {
                request_id: sr.request_id.clone(),
                new_token_ids,
                finish_reason: finish,
                stop_reason: req.stop_reason,
                num_cached_tokens: req.num_cached_tokens,
                error: None,
            });
            if let Some(reason) = finish {
                self.finish_request(&sr.request_id, reason);
            }
        }
        outputs
    }

    /// Checks the cache invariants and the scheduler's own bookkeeping.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        for (id, _) in self.kv.block_tables() {
            if !self.running.contains(id) {
                return Err(format!("request {id} holds blocks but is not running"));
            }
        }
        if self.running.len() > self.config.max_num_seqs {
            return Err(format!(
                "{} running requests over max_num_seqs",
                self.running.len()
            ));
        }
        if self.running.len() + self.waiting.len() != self.requests.len() {
            return Err("a request is neither running nor waiting".into());
        }
        Ok(())
    }

    /// The next waiting request to admit, passing over those in `deferred`.
    fn next_waiting_index(&self, deferred: &[RequestId]) -> Option<usize> {
        let first = self.waiting.iter().position(|id| !deferred.contains(id))?;
        match self.config.policy {
            SchedulingPolicy::Fcfs => Some(first),
            SchedulingPolicy::Priority => {
                let key =
                    |id: &RequestId| self.requests.get(id).map(|r| (r.priority, r.arrival_time));
                let mut best = first;
                for i in first + 1..self.waiting.len() {
                    if deferred.contains(&self.waiting[i]) {
                        continue;
                    }
                    let (a, b) = (key(&self.waiting[i]), key(&self.waiting[best]));
                    if let (Some(a), Some(b)) = (a, b)
                        && (a.0 < b.0 || (a.0 == b.0 && a.1 < b.1))
                    {
                        best = i;
                    }
                }
                Some(best)
            }
        }
    }

    fn pick_preemption_victim(&self) -> RequestId {
        match self.config.policy {
            SchedulingPolicy::Fcfs => self.running.last().cloned().unwrap_or_default(),
            SchedulingPolicy::Priority => {
                let key =
                    |id: &RequestId| self.requests.get(id).map(|r| (r.priority, r.arrival_time));
                let mut best = self.running.len().saturating_sub(1);
                for i in 0..self.running.len() {
                    let (a, b) = (key(&self.running[i]), key(&self.running[best]));
                    if let (Some(a), Some(b)) = (a, b)
                        && (a.0 > b.0 || (a.0 == b.0 && a.1 > b.1))
                    {
                        best = i;
                    }
                }
                self.running.get(best).cloned().unwrap_or_default()
            }
        }
    }

    fn preempt(&mut self, id: &str) {
        self.running.retain(|r| r != id);
        self.kv.free(id);
        if let Some(req) = self.requests.get_mut(id) {
            req.status = RequestStatus::Preempted;
            req.num_computed_tokens = 0;
            req.num_preemptions += 1;
        }
        self.num_preemptions += 1;
        self.waiting.push_front(id.to_string());
    }

    fn fail_request(&mut self, id: &str, error: String) {
        let num_cached_tokens = self.requests.get(id).map_or(0, |r| r.num_cached_tokens);
        if self.finish_request(id, FinishReason::Error) {
            self.pending_outputs.push(EngineCoreOutput {
                request_id: id.to_string(),
                new_token_ids: Vec::new(),
                finish_reason: Some(FinishReason::Error),
                stop_reason: None,
                num_cached_tokens,
                error: Some(error),
            });
        }
    }
}
