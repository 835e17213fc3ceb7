//! `LLMEngine` (engine core + output processor) and the offline `LLM` API.

use std::sync::Arc;

use trellis_models::WeightFormat;
use trellis_plugin::{ModelConfig, Registries};
use trellis_sched::{Scheduler, SchedulerConfig};

use crate::config::{EngineConfig, UsageContext};
use crate::engine_core::{EngineCore, EngineCoreRequest};
use crate::error::EngineError;
use crate::metrics::StatsCollector;
use crate::model_runner::ModelRunner;
use crate::output_processor::{OutputProcessor, child_request_id};
use crate::outputs::{RequestOutput, RequestUpdate};
use crate::platform_setup::{plugin_registries, setup};
use crate::sampler::Generator;
use crate::sampling_params::SamplingParams;
use crate::tokenizer::Tokenizer;

/// A prompt: text to tokenize, or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer (BOS added when the model wants it).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Tokens(ids)
    }
}

/// The resolved numbers an engine runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// The input configuration.
    pub engine: EngineConfig,
    /// The scheduler's configuration (budget, caps, cache geometry).
    pub scheduler: SchedulerConfig,
    /// The model's facts.
    pub model: ModelConfig,
    /// Name of the attention backend in use.
    pub attention_backend: String,
    /// Device name of the platform the engine runs on.
    pub platform: String,
    /// Device type of that platform (`cpu`, `cuda`, ...).
    pub device_type: String,
}

/// The engine: tokenizer, engine core and output processor, driven step by step.
pub struct LLMEngine {
    core: EngineCore,
    processor: OutputProcessor,
    tokenizer: Arc<Tokenizer>,
    config: ResolvedConfig,
    seeds: Generator,
    stats: Option<StatsCollector>,
    /// The platform, asked to validate every request.
    platform: Arc<dyn trellis_plugin::Platform>,
}

impl LLMEngine {
    /// Loads the model and tokenizer and sizes the KV cache, with the built-ins and the
    /// installed plugins ([`crate::plugin_registries`]), as the CLI does.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_registries(config, &plugin_registries()?)
    }

    /// [`Self::new`] with registries that plugins added to: the platform is resolved from
    /// them and has the last word on the configuration, the model comes from their model
    /// registry and the attention backend from their attention registry.
    pub fn with_registries(
        config: EngineConfig,
        registries: &Registries,
    ) -> Result<Self, EngineError> {
        let setup = setup(&config, registries)?;
        let (device, loaded, pc) = (setup.device, setup.loaded, setup.platform_config);
        let tokenizer = match loaded.format {
            WeightFormat::Gguf => Tokenizer::from_gguf(&config.model)?,
            _ => Tokenizer::from_hf_dir(&config.model)?,
        };
        let model_cfg = loaded.model.config().clone();
        let max_model_len = match pc.max_model_len {
            Some(m) if m > model_cfg.max_position_embeddings => {
                return Err(EngineError::Config(format!(
                    "max_model_len {m} is larger than the model's context length {}",
                    model_cfg.max_position_embeddings
                )));
            }
            Some(m) => m,
            None => model_cfg.max_position_embeddings,
        };
        // vLLM's check_max_model_len: the platform may clamp it.
        let max_model_len = match setup.platform.check_max_model_len(max_model_len) {
            0 => {
                return Err(EngineError::Config(format!(
                    "platform {} allows no max_model_len (it returned 0 for {max_model_len})",
                    setup.platform.device_name()
                )));
            }
            m if m != max_model_len => {
                crate::platform_setup::log(&format!(
                    "Platform {} limits max_model_len to {m} (was {max_model_len})",
                    setup.platform.device_name()
                ));
                m
            }
            m => m,
        };
        let block_size = pc.block_size;
        if block_size == 0 {
            return Err(EngineError::Config("block_size must be at least 1".into()));
        }
        let kv_cache_dtype = pc.kv_cache_dtype;
        let bytes_per_block = 2
            * model_cfg.num_layers
            * block_size
            * model_cfg.num_kv_heads
            * model_cfg.head_dim
            * kv_cache_dtype.size_in_bytes();
        let num_blocks = match config.num_kv_blocks {
            Some(n) => n,
            None => pc.kv_cache_bytes / bytes_per_block.max(1),
        };
        if num_blocks == 0 {
            return Err(EngineError::Config(format!(
                "the KV-cache budget is smaller than one block ({bytes_per_block} bytes)"
            )));
        }
        // Refused before anything is allocated: a cache the machine cannot hold.
        let kv_bytes = (num_blocks * bytes_per_block) as u64;
        if let Some(available) = crate::platform_setup::available_memory(setup.platform.as_ref())
            && kv_bytes > available
        {
            use crate::platform_setup::gib;
            return Err(EngineError::Config(format!(
                "the KV cache needs {} (--kv-cache-memory or VLLM_CPU_KVCACHE_SPACE), but only {} \
                 of memory is available on {} after loading the model; lower it",
                gib(kv_bytes),
                gib(available),
                setup.platform.device_name()
            )));
        }
        let mut sched_cfg = match config.usage {
            UsageContext::Offline => SchedulerConfig::cpu_offline(max_model_len, num_blocks),
            UsageContext::Server => SchedulerConfig::cpu_server(max_model_len, num_blocks),
        };
        sched_cfg.block_size = block_size;
        sched_cfg.enable_prefix_caching = config.enable_prefix_caching;
        sched_cfg.policy = config.scheduling_policy;
        if let Some(n) = pc.max_num_seqs {
            sched_cfg.max_num_seqs = n;
        }
        if let Some(n) = pc.max_num_batched_tokens {
            sched_cfg.max_num_batched_tokens = n;
        }
        let scheduler = Scheduler::new(sched_cfg.clone())?;
        let backend = setup.attention.backend;
        let runner = ModelRunner::new(
            loaded.model,
            backend.as_ref(),
            num_blocks,
            block_size,
            kv_cache_dtype,
            &device,
        )?;
        let tokenizer = Arc::new(tokenizer);
        let seeds = Generator::new(config.seed);
        Ok(LLMEngine {
            core: EngineCore::new(scheduler, runner),
            processor: OutputProcessor::new(tokenizer.clone()),
            tokenizer,
            config: ResolvedConfig {
                engine: config,
                scheduler: sched_cfg,
                model: model_cfg,
                attention_backend: setup.attention.name,
                platform: setup.platform.device_name().to_string(),
                device_type: setup.platform.device_type().to_string(),
            },
            seeds,
            stats: None,
            platform: setup.platform,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ResolvedConfig {
        &self.config
    }

    /// The engine core (read-only; stats and leak checks).
    pub fn core(&self) -> &EngineCore {
        &self.core
    }

    /// Starts collecting stats for stat loggers (vLLM's `log_stats`); off by default.
    pub fn enable_stats(&mut self) {
        if self.stats.is_none() {
            self.stats = Some(StatsCollector::new());
        }
    }

    /// The stats collector, when stats are on.
    pub fn stats_collector(&self) -> Option<&StatsCollector> {
        self.stats.as_ref()
    }

    /// Hands the scheduler's state and the iteration stats gathered since the previous call to
    /// `sink`, then starts a new iteration. Nothing happens when stats are off.
    pub fn record_stats(
        &mut self,
        sink: impl FnOnce(&trellis_plugin::SchedulerStats, &trellis_plugin::IterationStats),
    ) {
        let Some(stats) = self.stats.as_mut() else {
            return;
        };
        let sched = stats.scheduler_stats(self.core.scheduler());
        sink(&sched, stats.iteration());
        stats.clear_iteration();
    }

    /// Tokenizes a prompt.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match prompt {
            Prompt::Text(t) => Ok(self.tokenizer.encode(t, true)?),
            Prompt::Tokens(ids) => Ok(ids.clone()),
        }
    }

    /// The admission checks of a tokenized request: its `n` against `max_n`, the waiting queue
    /// against `max_waiting_requests`, then the platform's `validate_request` (vLLM calls it
    /// once per request, before `n` splits it). On refusal: the metrics reason and the error.
    fn admit(
        &self,
        request_id: &str,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(), (&'static str, EngineError)> {
        let engine = &self.config.engine;
        if params.n > engine.max_n {
            let message = format!(
                "n must be at most {} (--max-n), got {}.",
                engine.max_n, params.n
            );
            let e = crate::sampling_params::SamplingParamsError {
                param: "n",
                message,
            };
            return Err(("n_limit", e.into()));
        }
        if let Some(limit) = engine.max_waiting_requests {
            let waiting = self.core.scheduler().stats().num_waiting_reqs;
            if waiting + params.n > limit {
                let e = EngineError::QueueFull {
                    waiting,
                    adding: params.n,
                    limit,
                };
                return Err(("queue_full", e));
            }
        }
        self.platform
            .validate_request(&trellis_plugin::RequestInfo {
                request_id,
                prompt_token_ids: prompt_ids,
                max_tokens: params.max_tokens,
            })
            .map_err(|e| ("platform", EngineError::Rejected(e.to_string())))
    }

    /// Adds a request; with `n > 1` its children run as separate requests in the core.
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        self.add_request_with(request_id, prompt, params, 0, 0.0)
    }

    /// [`Self::add_request`] with a priority and an arrival time.
    pub fn add_request_with(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
        arrival_time: f64,
    ) -> Result<(), EngineError> {
        params.validate(self.config.model.vocab_size)?;
        let prompt_ids = self.tokenize(&prompt)?;
        if let Err((reason, e)) = self.admit(request_id, &prompt_ids, &params) {
            if let Some(stats) = self.stats.as_mut() {
                stats.on_rejected(reason);
            }
            return Err(e);
        }
        let n = params.n;
        for index in 0..n {
            let mut child = params.clone();
            child.n = 1;
            if let Some(seed) = params.seed {
                child.seed = Some(seed.wrapping_add(index as u64));
            }
            let child_id = child_request_id(request_id, index, n);
            if let Some(stats) = self.stats.as_mut() {
                stats.on_add(&child_id, arrival_time, prompt_ids.len(), params.max_tokens);
            }
            let res = self.core.add_request(EngineCoreRequest {
                request_id: child_id,
                prompt_token_ids: prompt_ids.clone(),
                params: child,
                eos_token_ids: self.tokenizer.eos_token_ids().to_vec(),
                lora_id: 0,
                priority,
                arrival_time,
                fallback_seed: self.seeds.next_u64(),
            });
            if let Err(e) = res {
                for j in 0..=index {
                    let child = child_request_id(request_id, j, n);
                    self.core.abort(&child);
                    if let Some(stats) = self.stats.as_mut() {
                        stats.forget(&child);
                    }
                }
                return Err(e);
            }
        }
        let text = match prompt {
            Prompt::Text(t) => Some(t),
            Prompt::Tokens(_) => None,
        };
        self.processor
            .add_request(request_id, text, &prompt_ids, &params);
        Ok(())
    }

    /// Aborts a request and all its children; their KV blocks are freed now.
    pub fn abort(&mut self, request_id: &str) {
        self.abort_with(request_id, trellis_sched::FinishReason::Abort);
    }

    /// [`Self::abort`], recorded in the stats with `reason` (`Error` when a failing step
    /// ended it).
    pub fn abort_with(&mut self, request_id: &str, reason: trellis_sched::FinishReason) {
        for child in self.processor.unfinished_children(request_id) {
            self.core.abort(&child);
            if let Some(stats) = self.stats.as_mut() {
                stats.finish(&child, reason);
            }
        }
        self.processor.remove_request(request_id);
    }

    /// True while any request is unfinished.
    pub fn has_unfinished_requests(&self) -> bool {
        self.core.has_unfinished_requests() || self.processor.num_requests() > 0
    }

    /// One engine step; returns what changed for each request.
    pub fn step(&mut self) -> Result<Vec<RequestUpdate>, EngineError> {
        let scheduled_at = self.stats.as_ref().map(|s| s.step_started());
        let outputs = self.core.step()?;
        if let (Some(stats), Some(at), Some(plan)) =
            (self.stats.as_mut(), scheduled_at, self.core.last_plan())
        {
            stats.on_step(plan, &outputs, at);
        }
        let (updates, stopped) = self.processor.process(outputs);
        for id in stopped {
            self.core
                .finish_request(&id, trellis_sched::FinishReason::Stop);
            if let Some(stats) = self.stats.as_mut() {
                stats.finish(&id, trellis_sched::FinishReason::Stop);
            }
        }
        if let Some(stats) = self.stats.as_mut() {
            for u in &updates {
                if let Some(out) = &u.finished {
                    let longest = out.outputs.iter().map(|o| o.token_ids.len()).max();
                    stats.on_parent_finished(out.outputs.len(), longest.unwrap_or(0));
                }
            }
        }
        Ok(updates)
    }
}

/// The offline API: `LLM::new(config)?.generate(prompts, &params)?`.
pub struct LLM {
    engine: LLMEngine,
    next_id: u64,
}

impl LLM {
    /// Loads the model, with the built-ins and the installed plugins
    /// ([`crate::plugin_registries`]), as vLLM's `LLM` and the CLI do.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_registries(config, &plugin_registries()?)
    }

    /// Loads the model with registries that plugins added to (see
    /// [`LLMEngine::with_registries`]).
    pub fn with_registries(
        config: EngineConfig,
        registries: &Registries,
    ) -> Result<Self, EngineError> {
        Ok(LLM {
            engine: LLMEngine::with_registries(config, registries)?,
            next_id: 0,
        })
    }

    /// The engine underneath.
    pub fn engine(&mut self) -> &mut LLMEngine {
        &mut self.engine
    }

    /// Generates for every prompt with the same parameters; outputs come back in prompt order.
    pub fn generate<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &SamplingParams,
    ) -> Result<Vec<RequestOutput>, EngineError> {
        let params = vec![params.clone(); prompts.len()];
        self.generate_each(prompts, &params, |_, _| {})
    }

    /// Generates with per-prompt parameters, calling `progress(done, total)` as requests finish.
    pub fn generate_each<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &[SamplingParams],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<RequestOutput>, EngineError> {
        if prompts.len() != params.len() {
            return Err(EngineError::Config(format!(
                "{} prompts but {} sampling parameter sets",
                prompts.len(),
                params.len()
            )));
        }
        let mut ids: Vec<String> = Vec::with_capacity(prompts.len());
        for (prompt, p) in prompts.iter().zip(params) {
            let id = self.next_id.to_string();
            self.next_id += 1;
            if let Err(e) = self
                .engine
                .add_request(&id, prompt.clone().into(), p.clone())
            {
                for added in &ids {
                    self.engine.abort(added);
                }
                return Err(e);
            }
            ids.push(id);
        }
        let mut done: std::collections::HashMap<String, RequestOutput> =
            std::collections::HashMap::new();
        while done.len() < ids.len() {
            for update in self.engine.step()? {
                if let Some(out) = update.finished {
                    done.insert(out.request_id.clone(), out);
                    progress(done.len(), ids.len());
                }
            }
        }
        Ok(ids.into_iter().filter_map(|id| done.remove(&id)).collect())
    }
}
