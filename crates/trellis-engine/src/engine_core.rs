//! `EngineCore`: the spine. One step = schedule → execute → update.
//!
//! ```text
//! let plan = scheduler.schedule();                         // who runs, on which slots
//! let out  = runner.execute(&plan)?;                        // one forward for the whole batch
//! let done = scheduler.update_from_output(&plan, &out);     // append tokens, stop, free
//! ```
//!
//! Everything above this (tokenization, detokenization, stop strings, `n > 1`) is the output
//! processor's job; everything below (tensors) is the runner's.

use std::collections::HashMap;

use trellis_sched::{
    FinishReason, NewRequest, RequestId, Scheduler, SchedulerOutput, SchedulerStats, StopConditions,
};

use crate::error::EngineError;
use crate::model_runner::{ModelRunner, RunnerRequest};
use crate::pooling_params::PoolingParams;
use crate::sampler::{Generator, PositionLogprobs};
use crate::sampling_params::SamplingParams;
use crate::structured_output::StructuredOutputBackend;

/// A request as the engine core receives it: token ids and parameters, no text.
#[derive(Debug, Clone)]
pub struct EngineCoreRequest {
    /// Unique id.
    pub request_id: RequestId,
    /// Prompt token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Sampling parameters (`n` is handled above the core: it must be 1 here).
    pub params: SamplingParams,
    /// The model's EOS token ids.
    pub eos_token_ids: Vec<u32>,
    /// The LoRA adapter to run with (vLLM's `lora_request`), loaded on first use.
    pub lora: Option<trellis_plugin::LoraRequest>,
    /// Lower is served first under the priority policy.
    pub priority: i32,
    /// Arrival time in seconds.
    pub arrival_time: f64,
    /// Seed of the request's generator when `params.seed` is unset.
    pub fallback_seed: u64,
    /// Set for a pooling request (vLLM's `pooling_params`): prefill only, pooled, never
    /// sampled; `params` is then unused.
    pub pooling_params: Option<PoolingParams>,
}

/// Per-request result of one step.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// The request.
    pub request_id: RequestId,
    /// Tokens generated this step.
    pub new_token_ids: Vec<u32>,
    /// Logprobs of those tokens (when asked for).
    pub new_logprobs: Vec<PositionLogprobs>,
    /// Prompt logprobs computed this step (when asked for).
    pub prompt_logprobs: Vec<PositionLogprobs>,
    /// Set when the request finished.
    pub finish_reason: Option<FinishReason>,
    /// The stop token id that ended it.
    pub stop_reason: Option<u32>,
    /// Prompt tokens served from the prefix cache.
    pub num_cached_tokens: usize,
    /// The reason of a [`FinishReason::Error`].
    pub error: Option<String>,
    /// A pooling request's pooled output (it finished in this step).
    pub pooled: Option<Vec<f32>>,
}

/// Scheduler plus model runner.
pub struct EngineCore {
    scheduler: Scheduler,
    runner: ModelRunner,
    last_plan: Option<SchedulerOutput>,
    /// Compiles `structured_outputs` (set by [`Self::set_structured_output_backend`]).
    structured: Option<StructuredOutputBackend>,
}

impl EngineCore {
    /// Joins a scheduler and a runner that share the same KV-cache geometry.
    pub fn new(scheduler: Scheduler, runner: ModelRunner) -> Self {
        EngineCore {
            scheduler,
            runner,
            last_plan: None,
            structured: None,
        }
    }

    /// Enables `structured_outputs` with the backend built from the engine's tokenizer.
    pub fn set_structured_output_backend(&mut self, backend: StructuredOutputBackend) {
        self.structured = Some(backend);
    }

    /// The scheduler (read-only).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The LoRA manager of the runner, when LoRA is enabled.
    pub fn lora_manager_mut(&mut self) -> Option<&mut crate::lora::LoraManager> {
        self.runner.lora_manager_mut()
    }

    /// The model runner (read-only).
    pub fn runner(&self) -> &ModelRunner {
        &self.runner
    }

    /// Queues a request; invalid ones are refused with an error naming the parameter or limit.
    pub fn add_request(&mut self, req: EngineCoreRequest) -> Result<(), EngineError> {
        let vocab = self.runner.model().config().vocab_size;
        req.params.validate(vocab)?;
        if let Some(&bad) = req.prompt_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Config(format!(
                "prompt token id {bad} is out of vocabulary range [0, {vocab})"
            )));
        }
        let lora = match &req.lora {
            None => None,
            Some(l) => match self.runner.lora_manager_mut() {
                Some(m) => Some(m.add_lora(l)?),
                None => {
                    return Err(EngineError::LoraNotEnabled(format!(
                        "Got lora_request {} but LoRA is not enabled!",
                        l.lora_name
                    )));
                }
            },
        };
        let p = &req.params;
        let pooling = req.pooling_params.is_some();
        if pooling != self.runner.pooler().is_some() {
            return Err(EngineError::Config(match pooling {
                true => "this model runs the generate runner: it does not pool".into(),
                false => "this model runs the pooling runner: it does not generate".into(),
            }));
        }
        let grammar = match (&p.structured_outputs, &mut self.structured) {
            (None, _) => None,
            (Some(so), Some(backend)) => Some(backend.compile(so)?),
            (Some(_), None) => {
                return Err(EngineError::Config(
                    "structured outputs are not available: this engine has no grammar backend"
                        .into(),
                ));
            }
        };
        let stop = StopConditions {
            // A pooling request's one "output" is its pooled vector.
            max_tokens: if pooling { Some(1) } else { p.max_tokens },
            min_tokens: p.min_tokens,
            eos_token_ids: req.eos_token_ids.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            ignore_eos: p.ignore_eos,
        };
        self.scheduler.add_request(NewRequest {
            request_id: req.request_id.clone(),
            prompt_token_ids: req.prompt_token_ids.clone(),
            stop,
            lora_id: lora.as_ref().map_or(0, |l| l.version),
            priority: req.priority,
            arrival_time: req.arrival_time,
            cache_salt: None,
            skip_reading_prefix_cache: p.prompt_logprobs.is_some() || pooling,
        })?;
        let mut stop_ids = p.stop_token_ids.clone();
        if !p.ignore_eos {
            stop_ids.extend(&req.eos_token_ids);
        }
        let seed = p.seed.unwrap_or(req.fallback_seed);
        self.runner.add_request(
            req.request_id,
            RunnerRequest {
                params: req.params,
                prompt_ids: req.prompt_token_ids,
                output_ids: Vec::new(),
                stop_ids,
                generator: Generator::new(seed),
                prompt_logprobs_done: 0,
                pooling: req.pooling_params,
                lora,
                grammar,
            },
        );
        Ok(())
    }

    /// Aborts a request in any state; its blocks are freed now.
    pub fn abort(&mut self, request_id: &str) -> bool {
        self.finish_request(request_id, FinishReason::Abort)
    }

    /// Finishes a request (for example on a stop string); its blocks are freed now.
    pub fn finish_request(&mut self, request_id: &str, reason: FinishReason) -> bool {
        let known = self.scheduler.finish_request(request_id, reason);
        self.runner.remove_request(request_id);
        known
    }

    /// True while any request is queued, running or has an output pending.
    pub fn has_unfinished_requests(&self) -> bool {
        self.scheduler.has_unfinished_requests()
    }

    /// Scheduler stats for stat loggers.
    pub fn stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }

    /// The plan of the last step that ran (for stats).
    pub fn last_plan(&self) -> Option<&SchedulerOutput> {
        self.last_plan.as_ref()
    }

    /// One engine step.
    pub fn step(&mut self) -> Result<Vec<StepOutput>, EngineError> {
        let plan = self.scheduler.schedule();
        let mut out = self.runner.execute(&plan)?;
        let done = self.scheduler.update_from_output(&plan, &out.sampled);
        let mut results: HashMap<RequestId, StepOutput> = HashMap::new();
        let mut order = Vec::new();
        // Pooling requests finish in the step that computed their prompt; their KV blocks
        // are freed now.
        for (id, data) in out.pooled.drain(..) {
            self.scheduler.finish_request(&id, FinishReason::Stop);
            self.runner.remove_request(&id);
            order.push(id.clone());
            results.insert(
                id.clone(),
                StepOutput {
                    request_id: id,
                    finish_reason: Some(FinishReason::Stop),
                    pooled: Some(data),
                    ..Default::default()
                },
            );
        }
        // A grammar that failed ends its request with an error (nothing was sampled for it).
        for (id, error) in out.grammar_errors.drain(..) {
            self.finish_request(&id, FinishReason::Error);
            order.push(id.clone());
            results.insert(
                id.clone(),
                StepOutput {
                    request_id: id,
                    finish_reason: Some(FinishReason::Error),
                    error: Some(format!("structured outputs: {error}")),
                    ..Default::default()
                },
            );
        }
        for (id, lps) in out.prompt_logprobs.drain() {
            order.push(id.clone());
            results.insert(
                id.clone(),
                StepOutput {
                    request_id: id,
                    prompt_logprobs: lps,
                    ..Default::default()
                },
            );
        }
        for o in done {
            if o.finish_reason.is_some() {
                self.runner.remove_request(&o.request_id);
            }
            let entry = results.entry(o.request_id.clone()).or_insert_with(|| {
                order.push(o.request_id.clone());
                StepOutput {
                    request_id: o.request_id.clone(),
                    ..Default::default()
                }
            });
            if let Some(lp) = out.logprobs.remove(&o.request_id)
                && !o.new_token_ids.is_empty()
            {
                entry.new_logprobs.push(lp);
            }
            entry.new_token_ids = o.new_token_ids;
            entry.finish_reason = o.finish_reason;
            entry.stop_reason = o.stop_reason;
            entry.num_cached_tokens = o.num_cached_tokens;
            entry.error = o.error;
        }
        self.last_plan = Some(plan);
        Ok(order
            .into_iter()
            .filter_map(|id| results.remove(&id))
            .collect())
    }
}
