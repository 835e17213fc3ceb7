//! The model runner: turns a [`SchedulerOutput`] into one forward pass over the flattened batch,
//! then samples (vLLM's `GPUModelRunner`, on CPU and much smaller).
//!
//! It owns the model, one attention layer (with its share of the paged KV cache) per model
//! layer, and per-request sampling state. It never decides *what* runs: that is the scheduler's
//! job; it only executes the plan.

use std::collections::HashMap;

use candle_core::Device;
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, ForwardContext,
    KvCacheSpec, LoraMapping, Model, NO_LORA_SLOT, Pooler, SeqAttentionMetadata,
};
use trellis_sched::{ModelRunnerOutput, RequestId, SchedulerOutput};

use crate::error::EngineError;
use crate::lora::{ActiveLora, LoraManager};
use crate::pooling_params::PoolingParams;
use crate::sampler::{Generator, PositionLogprobs, SamplingContext, position_logprobs, sample};
use crate::sampling_params::SamplingParams;
use crate::structured_output::GrammarMatcher;

/// What the runner keeps per request between steps.
#[derive(Debug, Clone)]
pub struct RunnerRequest {
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Token ids sampled so far.
    pub output_ids: Vec<u32>,
    /// EOS and stop token ids (masked under `min_tokens`).
    pub stop_ids: Vec<u32>,
    /// The request's own generator.
    pub generator: Generator,
    /// Prompt positions whose logprobs were already returned (they are not repeated after a
    /// preemption recomputes the prompt).
    pub prompt_logprobs_done: usize,
    /// Set for a pooling request: pooled once its prompt is computed, never sampled.
    pub pooling: Option<PoolingParams>,
    /// The adapter (version and weights) the request runs with, pinned when it was added.
    pub lora: Option<ActiveLora>,
    /// Set for a constrained request (`structured_outputs`): its grammar state.
    pub grammar: Option<GrammarMatcher>,
}

/// A step's result: sampled tokens for the scheduler, logprobs for the output processor.
#[derive(Debug, Clone, Default)]
pub struct RunnerOutput {
    /// Sampled token ids, one entry per scheduled request.
    pub sampled: ModelRunnerOutput,
    /// Logprobs of the sampled token, for requests that asked.
    pub logprobs: HashMap<RequestId, PositionLogprobs>,
    /// Logprobs of prompt tokens computed this step, for requests that asked.
    pub prompt_logprobs: HashMap<RequestId, Vec<PositionLogprobs>>,
    /// Pooled outputs of the pooling requests whose prompt was computed this step, in batch
    /// order.
    pub pooled: Vec<(RequestId, Vec<f32>)>,
    /// Constrained requests whose grammar failed this step (nothing was sampled for them).
    pub grammar_errors: Vec<(RequestId, String)>,
}

/// The flattened batch of one step.
struct BatchInputs {
    input_ids: Vec<u32>,
    positions: Vec<usize>,
    metadata: AttentionMetadata,
}

/// Runs the model on the paged KV cache.
pub struct ModelRunner {
    model: Box<dyn Model>,
    attn_layers: Vec<Box<dyn AttentionImpl>>,
    block_size: usize,
    requests: HashMap<RequestId, RunnerRequest>,
    /// The pooling head of a pooling runner (`None`: the runner generates).
    pooler: Option<Pooler>,
    /// Adapters and slots, when LoRA is enabled.
    lora: Option<LoraManager>,
    /// Per step: the slot of each scheduled request with an adapter, then of each token row.
    lora_step_slots: Vec<u32>,
    lora_token_slots: Vec<u32>,
}

impl ModelRunner {
    /// Allocates the KV cache (`num_blocks` blocks per layer, elements of `kv_cache_dtype`)
    /// through `backend`.
    pub fn new(
        model: Box<dyn Model>,
        backend: &dyn AttentionBackend,
        num_blocks: usize,
        block_size: usize,
        kv_cache_dtype: candle_core::DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let c = model.config().clone();
        let spec = KvCacheSpec {
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype: kv_cache_dtype,
        };
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let attn_layers = (0..c.num_layers)
            // Guarded: a plugin's model calls these layers, and a panic in them must not
            // unwind through its frames (trellis_plugin::guard).
            .map(|i| {
                let layer = backend.new_layer_of_type(&spec, shape, model.attn_type(i), device)?;
                Ok(trellis_plugin::guard::guard_host_layer(
                    backend.name(),
                    layer,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ModelRunner {
            model,
            attn_layers,
            block_size,
            requests: HashMap::new(),
            pooler: None,
            lora: None,
            lora_step_slots: Vec::new(),
            lora_token_slots: Vec::new(),
        })
    }

    /// Enables LoRA with `manager` (its slot pool sized for this model).
    pub fn set_lora_manager(&mut self, manager: LoraManager) {
        self.lora = Some(manager);
    }

    /// The LoRA manager, when LoRA is enabled.
    pub fn lora_manager(&self) -> Option<&LoraManager> {
        self.lora.as_ref()
    }

    /// The LoRA manager, mutable (adding and removing adapters).
    pub fn lora_manager_mut(&mut self) -> Option<&mut LoraManager> {
        self.lora.as_mut()
    }

    /// Puts the step's adapters in slots and maps every token row to its slot; false when no
    /// scheduled request has an adapter (the forward then gets no mapping at all).
    fn prepare_lora(&mut self, plan: &SchedulerOutput) -> Result<bool, EngineError> {
        let Some(manager) = self.lora.as_mut() else {
            return Ok(false);
        };
        let wanted: Vec<&ActiveLora> = plan
            .scheduled
            .iter()
            .filter_map(|sr| self.requests.get(&sr.request_id)?.lora.as_ref())
            .collect();
        if wanted.is_empty() {
            return Ok(false);
        }
        manager.assign_slots(&wanted, &mut self.lora_step_slots)?;
        self.lora_token_slots.clear();
        let mut next = self.lora_step_slots.iter();
        for sr in &plan.scheduled {
            let has = self
                .requests
                .get(&sr.request_id)
                .is_some_and(|r| r.lora.is_some());
            let slot = match has {
                true => next.next().copied().unwrap_or(NO_LORA_SLOT),
                false => NO_LORA_SLOT,
            };
            self.lora_token_slots
                .extend(std::iter::repeat_n(slot, sr.token_ids.len()));
        }
        Ok(true)
    }

    /// Makes this a pooling runner with `pooler`: every request is pooled, none sampled.
    pub fn set_pooler(&mut self, pooler: Pooler) {
        self.pooler = Some(pooler);
    }

    /// The pooling head, for a pooling runner.
    pub fn pooler(&self) -> Option<Pooler> {
        self.pooler
    }

    /// The model.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// Registers a request's sampling state before it is first scheduled.
    pub fn add_request(&mut self, request_id: RequestId, state: RunnerRequest) {
        self.requests.insert(request_id, state);
    }

    /// Number of requests with sampling state (for leak checks).
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Drops the state of a finished request.
    pub fn remove_request(&mut self, request_id: &str) {
        self.requests.remove(request_id);
    }

    /// The step's tokens, positions and attention metadata, in plan order.
    fn batch_inputs(&self, plan: &SchedulerOutput) -> BatchInputs {
        let n = plan.total_num_scheduled_tokens;
        let mut b = BatchInputs {
            input_ids: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            metadata: AttentionMetadata {
                block_size: self.block_size,
                slot_mapping: Vec::with_capacity(n),
                seqs: Vec::with_capacity(plan.scheduled.len()),
            },
        };
        for sr in &plan.scheduled {
            let start = b.input_ids.len();
            b.input_ids.extend_from_slice(&sr.token_ids);
            b.positions.extend_from_slice(&sr.positions);
            b.metadata.slot_mapping.extend_from_slice(&sr.slot_mapping);
            b.metadata.seqs.push(SeqAttentionMetadata {
                query_start: start,
                query_len: sr.token_ids.len(),
                context_len: sr.num_computed_tokens + sr.token_ids.len(),
                block_table: sr.block_table.clone(),
            });
        }
        b
    }

    /// A pooling step: the hidden states of the batch, then each request whose prompt is
    /// complete pooled over its own rows (the whole prompt: the scheduler does not chunk
    /// prefills for a pooling runner). Nothing is sampled.
    fn execute_pooling(
        &mut self,
        plan: &SchedulerOutput,
        pooler: Pooler,
        input_ids: &[u32],
        positions: &[usize],
        metadata: &AttentionMetadata,
    ) -> Result<RunnerOutput, EngineError> {
        let mut ctx = ForwardContext {
            attn_metadata: metadata,
            attn_layers: &mut self.attn_layers,
            logits_indices: &[],
            lora: None,
        };
        let hidden = self
            .model
            .forward_hidden_states(input_ids, positions, &mut ctx)?;
        let hidden: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
        let h = self.model.config().hidden_size;
        if hidden.len() != input_ids.len() * h {
            return Err(EngineError::Internal(format!(
                "the model returned {} hidden values for {} tokens of width {h}",
                hidden.len(),
                input_ids.len()
            )));
        }
        let mut out = RunnerOutput::default();
        for (sr, seq) in plan.scheduled.iter().zip(&metadata.seqs) {
            out.sampled.sampled_token_ids.push(Vec::new());
            if !sr.samples {
                continue;
            }
            if sr.num_computed_tokens != 0 {
                return Err(EngineError::Internal(format!(
                    "pooling request {} was split over steps",
                    sr.request_id
                )));
            }
            let normalize = self
                .requests
                .get(&sr.request_id)
                .and_then(|r| r.pooling.as_ref())
                .and_then(|p| p.normalize)
                .unwrap_or(pooler.normalize);
            let rows = &hidden[seq.query_start * h..(seq.query_start + seq.query_len) * h];
            out.pooled
                .push((sr.request_id.clone(), pooler.pool(rows, h, normalize)));
        }
        Ok(out)
    }

    /// Executes one step: a single forward over every scheduled token, then sampling.
    pub fn execute(&mut self, plan: &SchedulerOutput) -> Result<RunnerOutput, EngineError> {
        for id in &plan.finished_req_ids {
            self.requests.remove(id);
        }
        let mut out = RunnerOutput::default();
        if plan.scheduled.is_empty() {
            return Ok(out);
        }
        let BatchInputs {
            input_ids,
            positions,
            metadata,
        } = self.batch_inputs(plan);
        if let Some(pooler) = self.pooler {
            return self.execute_pooling(plan, pooler, &input_ids, &positions, &metadata);
        }
        // Rows of the logits: per request, the prompt positions whose logprobs are wanted,
        // then (when it samples) its last token.
        let mut logits_indices = Vec::new();
        let mut rows: Vec<(usize, usize, Option<usize>)> = Vec::with_capacity(plan.scheduled.len());
        for (sr, seq) in plan.scheduled.iter().zip(&metadata.seqs) {
            let start = seq.query_start;
            let state = self.requests.get(&sr.request_id).ok_or_else(|| {
                EngineError::Internal(format!("no runner state for request {}", sr.request_id))
            })?;
            let first_prompt_row = logits_indices.len();
            if state.params.prompt_logprobs.is_some() {
                let prompt_len = state.prompt_ids.len();
                for (i, &pos) in sr.positions.iter().enumerate() {
                    if pos + 1 < prompt_len && pos + 1 > state.prompt_logprobs_done {
                        logits_indices.push(start + i);
                    }
                }
            }
            let num_prompt_rows = logits_indices.len() - first_prompt_row;
            let sample_row = if sr.samples {
                logits_indices.push(start + sr.token_ids.len() - 1);
                Some(logits_indices.len() - 1)
            } else {
                None
            };
            rows.push((first_prompt_row, num_prompt_rows, sample_row));
        }
        let with_lora = self.prepare_lora(plan)?;
        let lora = match (&self.lora, with_lora) {
            (Some(m), true) => Some(LoraMapping {
                pool: &m.pool,
                token_slots: &self.lora_token_slots,
            }),
            _ => None,
        };
        // The grammar masks of the constrained requests that sample this step, computed on this
        // thread before the forward: about 0.1 ms a request on SmolLM2's 49k vocabulary, and the
        // forward's compute pool already holds every core, so another thread would only contend
        // with it. Unconstrained requests cost one map lookup here.
        for sr in plan.scheduled.iter().filter(|sr| sr.samples) {
            if let Some(g) = self
                .requests
                .get_mut(&sr.request_id)
                .and_then(|r| r.grammar.as_mut())
                && let Err(e) = g.compute_mask()
            {
                out.grammar_errors.push((sr.request_id.clone(), e));
            }
        }
        let mut ctx = ForwardContext {
            attn_metadata: &metadata,
            attn_layers: &mut self.attn_layers,
            logits_indices: &logits_indices,
            lora,
        };
        let logits = self.model.forward(&input_ids, &positions, &mut ctx)?;
        let mut logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let vocab = self.model.config().vocab_size;
        if logits.len() != logits_indices.len() * vocab {
            return Err(EngineError::Internal(format!(
                "the model returned {} logits for {} rows of vocabulary {vocab}",
                logits.len(),
                logits_indices.len()
            )));
        }
        for (sr, &(first, count, sample_row)) in plan.scheduled.iter().zip(&rows) {
            let Some(state) = self.requests.get_mut(&sr.request_id) else {
                continue;
            };
            if count > 0 {
                let k = state.params.prompt_logprobs.unwrap_or(0);
                let mut lps = Vec::with_capacity(count);
                for r in first..first + count {
                    let pos = positions[logits_indices[r]];
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    lps.push(position_logprobs(row, state.prompt_ids[pos + 1], k));
                    state.prompt_logprobs_done = pos + 1;
                }
                out.prompt_logprobs.insert(sr.request_id.clone(), lps);
            }
            let Some(r) = sample_row else {
                out.sampled.sampled_token_ids.push(Vec::new());
                continue;
            };
            let row = &mut logits[r * vocab..(r + 1) * vocab];
            if let Some(g) = &state.grammar {
                if !g.has_mask() {
                    // Its grammar failed (listed in `grammar_errors`): nothing is sampled.
                    out.sampled.sampled_token_ids.push(Vec::new());
                    continue;
                }
                g.apply_mask(row);
            }
            let raw_logprobs_k = state.params.logprobs;
            let raw = raw_logprobs_k.map(|_| row.to_vec());
            let ctx = SamplingContext {
                params: &state.params,
                prompt_ids: &state.prompt_ids,
                output_ids: &state.output_ids,
                stop_ids: &state.stop_ids,
            };
            let mut token = sample(row, &ctx, &mut state.generator);
            if let Some(g) = state.grammar.as_mut() {
                // Penalties or `min_tokens` may leave no allowed token with a finite logit:
                // the grammar has the last word.
                if !g.is_allowed(token) {
                    token = g.first_allowed().unwrap_or(token);
                }
                if let Err(e) = g.accept(token) {
                    out.grammar_errors.push((sr.request_id.clone(), e));
                    out.sampled.sampled_token_ids.push(Vec::new());
                    continue;
                }
            }
            if let (Some(k), Some(raw)) = (raw_logprobs_k, raw) {
                let mut lp = position_logprobs(&raw, token, k);
                if state.grammar.is_some() {
                    crate::structured_output::clamp_masked_logprobs(&mut lp);
                }
                out.logprobs.insert(sr.request_id.clone(), lp);
            }
            state.output_ids.push(token);
            out.sampled.sampled_token_ids.push(vec![token]);
        }
        Ok(out)
    }
}
