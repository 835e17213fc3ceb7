//! `LLMEngine` (engine core + output processor) and the offline `LLM` API.

use std::collections::HashMap;
use std::sync::Arc;

use trellis_models::WeightFormat;
use trellis_plugin::{
    IoProcessor, LoraRequest, Model, ModelConfig, Pooler, PoolingType, Registries,
};
use trellis_sched::{Scheduler, SchedulerConfig};

use crate::config::{ConvertOption, EngineConfig, RunnerOption, RunnerType, UsageContext};
use crate::engine_core::{EngineCore, EngineCoreRequest, StepOutput};
use crate::error::EngineError;
use crate::io_processor::{plugin_output, plugin_prompts, select_io_processor};
use crate::metrics::StatsCollector;
use crate::model_runner::ModelRunner;
use crate::output_processor::{OutputProcessor, child_request_id};
use crate::outputs::{PoolingOutput, PoolingRequestOutput, RequestOutput, RequestUpdate};
use crate::platform_setup::{log, plugin_registries, setup};
use crate::pooling_params::PoolingParams;
use crate::sampler::Generator;
use crate::sampling_params::SamplingParams;
use crate::structured_output::StructuredOutputBackend;
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
    /// Generation or pooling.
    pub runner: RunnerType,
}

/// The engine: tokenizer, engine core and output processor, driven step by step.
pub struct LLMEngine {
    core: EngineCore,
    processor: OutputProcessor,
    tokenizer: Arc<Tokenizer>,
    /// The pooling runner's tokenizer: truncates text to `max_model_len` tokens.
    pooling_tokenizer: Option<Arc<Tokenizer>>,
    /// Pooling requests in flight and their prompt ids.
    pooling: HashMap<String, Vec<u32>>,
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
        let runner_type = resolve_runner(&config, loaded.model.as_ref())?;
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
        // A pooling runner computes each prompt in one step and keeps no KV after it: no
        // chunked prefill (non-causal attention sees the whole sequence), no prefix cache, a
        // step budget that holds the longest prompt, and a prompt may fill the whole context
        // (the scheduler counts the pooled vector as the request's one output token).
        let mut sched_run = sched_cfg.clone();
        if runner_type == RunnerType::Pooling {
            sched_cfg.enable_prefix_caching = false;
            sched_cfg.enable_chunked_prefill = false;
            sched_cfg.max_num_batched_tokens = sched_cfg.max_num_batched_tokens.max(max_model_len);
            sched_run = sched_cfg.clone();
            sched_run.max_model_len = max_model_len + 1;
        }
        let mut scheduler = Scheduler::new(sched_run)?;
        scheduler.set_max_loras(config.lora.as_ref().map(|l| l.max_loras));
        let backend = setup.attention.backend;
        let pooler = match runner_type {
            RunnerType::Pooling => Some(loaded.model.pooler().unwrap_or(Pooler {
                pooling_type: PoolingType::Last,
                normalize: true,
            })),
            RunnerType::Generate => None,
        };
        let mut runner = ModelRunner::new(
            loaded.model,
            backend.as_ref(),
            num_blocks,
            block_size,
            kv_cache_dtype,
            &device,
        )?;
        if let Some(lora) = &config.lora {
            let manager = crate::lora::LoraManager::new(runner.model(), lora.clone())?;
            log(&format!(
                "LoRA enabled: {} slots of rank <= {} ({:.1} MiB), up to {} adapters cached on the CPU",
                lora.max_loras,
                lora.max_lora_rank,
                manager.pool_bytes() as f64 / (1 << 20) as f64,
                lora.cpu_capacity()
            ));
            runner.set_lora_manager(manager);
        }
        if let Some(p) = pooler {
            log(&format!(
                "Pooling runner: {} pooling{}",
                p.pooling_type.as_str(),
                if p.normalize { ", normalized" } else { "" }
            ));
            runner.set_pooler(p);
        }
        let pooling_tokenizer = match runner_type {
            RunnerType::Pooling => Some(Arc::new(tokenizer.truncating(max_model_len)?)),
            RunnerType::Generate => None,
        };
        let mut core = EngineCore::new(scheduler, runner);
        if runner_type == RunnerType::Generate {
            let t = std::time::Instant::now();
            // A tokenizer llguidance cannot read (a plugin model's toy tokenizer without a
            // decoder, say) leaves the engine without structured outputs, not without a start.
            match StructuredOutputBackend::new(&tokenizer, model_cfg.vocab_size) {
                Ok(backend) => {
                    core.set_structured_output_backend(backend);
                    log(&format!(
                        "Structured outputs: llguidance token trie of {} tokens built in {:.0} ms",
                        model_cfg.vocab_size,
                        t.elapsed().as_secs_f64() * 1e3
                    ));
                }
                Err(e) => log(&format!(
                    "WARNING structured outputs are not available for this tokenizer: {e}"
                )),
            }
        }
        let tokenizer = Arc::new(tokenizer);
        let seeds = Generator::new(config.seed);
        Ok(LLMEngine {
            core,
            processor: OutputProcessor::new(tokenizer.clone()),
            tokenizer,
            pooling_tokenizer,
            pooling: HashMap::new(),
            config: ResolvedConfig {
                engine: config,
                scheduler: sched_cfg,
                model: model_cfg,
                attention_backend: setup.attention.name,
                platform: setup.platform.device_name().to_string(),
                device_type: setup.platform.device_type().to_string(),
                runner: runner_type,
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
        n: usize,
        max_tokens: Option<usize>,
    ) -> Result<(), (&'static str, EngineError)> {
        let engine = &self.config.engine;
        if n > engine.max_n {
            let message = format!("n must be at most {} (--max-n), got {}.", engine.max_n, n);
            let e = crate::sampling_params::SamplingParamsError {
                param: "n",
                message,
            };
            return Err(("n_limit", e.into()));
        }
        if let Some(limit) = engine.max_waiting_requests {
            let waiting = self.core.scheduler().stats().num_waiting_reqs;
            if waiting + n > limit {
                let e = EngineError::QueueFull {
                    waiting,
                    adding: n,
                    limit,
                };
                return Err(("queue_full", e));
            }
        }
        self.platform
            .validate_request(&trellis_plugin::RequestInfo {
                request_id,
                prompt_token_ids: prompt_ids,
                max_tokens,
            })
            .map_err(|e| ("platform", EngineError::Rejected(e.to_string())))
    }

    /// [`Self::admit`], counting a refusal in the stats.
    fn admit_or_count(
        &mut self,
        request_id: &str,
        prompt_ids: &[u32],
        n: usize,
        max_tokens: Option<usize>,
    ) -> Result<(), EngineError> {
        let Err((reason, e)) = self.admit(request_id, prompt_ids, n, max_tokens) else {
            return Ok(());
        };
        if let Some(stats) = self.stats.as_mut() {
            stats.on_rejected(reason);
        }
        Err(e)
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

    /// Puts an adapter loaded off the engine thread in the CPU cache as `lora_int_id`.
    pub fn insert_lora(
        &mut self,
        lora_int_id: u32,
        adapter: Arc<trellis_models::LoraAdapter>,
    ) -> Result<(), EngineError> {
        let manager = self.core.lora_manager_mut().ok_or_else(|| {
            EngineError::LoraNotEnabled("LoRA is not enabled (--enable-lora)".into())
        })?;
        manager.insert(lora_int_id, adapter);
        Ok(())
    }

    /// [`Self::add_request_with`] without an adapter.
    pub fn add_request_with(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
        priority: i32,
        arrival_time: f64,
    ) -> Result<(), EngineError> {
        self.add_request_lora(request_id, prompt, params, (priority, arrival_time), None)
    }

    /// [`Self::add_request`] with a priority and an arrival time (`when`), and the LoRA adapter
    /// it runs with (loaded on first use).
    pub fn add_request_lora(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: SamplingParams,
        when: (i32, f64),
        lora: Option<LoraRequest>,
    ) -> Result<(), EngineError> {
        let (priority, arrival_time) = when;
        params.validate(self.config.model.vocab_size)?;
        let prompt_ids = self.tokenize(&prompt)?;
        self.admit_or_count(request_id, &prompt_ids, params.n, params.max_tokens)?;
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
                lora: lora.clone(),
                priority,
                arrival_time,
                fallback_seed: self.seeds.next_u64(),
                pooling_params: None,
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

    /// Tokenizes a pooling prompt: text is cut to `max_model_len` tokens (special tokens
    /// included, as sentence-transformers does with `max_seq_length`); token ids are used as
    /// they are.
    pub fn tokenize_for_pooling(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        match (prompt, &self.pooling_tokenizer) {
            (Prompt::Text(t), Some(tok)) => Ok(tok.encode(t, true)?),
            _ => self.tokenize(prompt),
        }
    }

    /// Adds a pooling request (vLLM's `LLMEngine.add_request` with `PoolingParams`): its
    /// prompt is computed in one step, pooled and returned in [`RequestUpdate::pooling`].
    /// Refused on a generative model, for an empty prompt, ids out of the vocabulary or over
    /// the context, and for parameters the model does not support.
    pub fn add_pooling_request(
        &mut self,
        request_id: &str,
        prompt: Prompt,
        params: PoolingParams,
        priority: i32,
        arrival_time: f64,
    ) -> Result<(), EngineError> {
        if self.config.runner != RunnerType::Pooling {
            return Err(EngineError::Config(format!(
                "the model {} does not support pooling (it runs the generate runner; \
                 --convert embed makes it an embedding model)",
                self.config.model.architecture
            )));
        }
        let name = self.served_model_name();
        params.verify(&name)?;
        let prompt_ids = self.tokenize_for_pooling(&prompt)?;
        if prompt_ids.is_empty() {
            return Err(EngineError::Config("the prompt must not be empty".into()));
        }
        let max = self.config.scheduler.max_model_len;
        if prompt_ids.len() > max {
            return Err(EngineError::Config(format!(
                "This model's maximum context length is {max} tokens. However, you requested \
                 {} tokens in the input for embedding generation. Please reduce the length of \
                 the input.",
                prompt_ids.len()
            )));
        }
        if self.pooling.contains_key(request_id) {
            return Err(EngineError::Config(format!(
                "request id {request_id} is already in use"
            )));
        }
        // The waiting queue and vLLM's Platform.validate_request, as for generation.
        self.admit_or_count(request_id, &prompt_ids, 1, Some(1))?;
        self.core.add_request(EngineCoreRequest {
            request_id: request_id.to_string(),
            prompt_token_ids: prompt_ids.clone(),
            params: SamplingParams::default(),
            eos_token_ids: Vec::new(),
            lora: None,
            priority,
            arrival_time,
            fallback_seed: 0,
            pooling_params: Some(params),
        })?;
        self.pooling.insert(request_id.to_string(), prompt_ids);
        Ok(())
    }

    /// The served model name (`--served-model-name`, else the model path).
    fn served_model_name(&self) -> String {
        let e = &self.config.engine;
        e.served_model_name
            .clone()
            .unwrap_or_else(|| e.model.display().to_string())
    }

    /// Aborts a request and all its children; their KV blocks are freed now.
    pub fn abort(&mut self, request_id: &str) {
        self.abort_with(request_id, trellis_sched::FinishReason::Abort);
    }

    /// [`Self::abort`], recorded in the stats with `reason` (`Error` when a failing step
    /// ended it).
    pub fn abort_with(&mut self, request_id: &str, reason: trellis_sched::FinishReason) {
        if self.pooling.remove(request_id).is_some() {
            self.core.abort(request_id);
            return;
        }
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
        self.core.has_unfinished_requests()
            || self.processor.num_requests() > 0
            || !self.pooling.is_empty()
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
        let (pooled, outputs): (Vec<StepOutput>, Vec<StepOutput>) = outputs
            .into_iter()
            .partition(|o| self.pooling.contains_key(&o.request_id));
        let (mut updates, stopped) = self.processor.process(outputs);
        for o in pooled {
            if let Some(u) = self.pooling_update(o) {
                updates.push(u);
            }
        }
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

impl LLMEngine {
    /// The update of a pooling request that finished (pooled, or failed).
    fn pooling_update(&mut self, o: StepOutput) -> Option<RequestUpdate> {
        o.finish_reason?;
        let prompt_token_ids = self.pooling.remove(&o.request_id)?;
        let mut u = RequestUpdate {
            request_id: o.request_id.clone(),
            ..Default::default()
        };
        match o.pooled {
            Some(data) => {
                u.pooling = Some(PoolingRequestOutput {
                    request_id: o.request_id,
                    prompt_token_ids,
                    outputs: PoolingOutput { data },
                    finished: true,
                })
            }
            None => {
                u.finished = Some(RequestOutput {
                    request_id: o.request_id,
                    prompt_token_ids,
                    finished: true,
                    error: Some(o.error.unwrap_or_else(|| "the request was aborted".into())),
                    ..Default::default()
                })
            }
        }
        Some(u)
    }
}

/// Which runner `config` asks for on `model` (vLLM's `--runner` / `--convert` resolution).
fn resolve_runner(config: &EngineConfig, model: &dyn Model) -> Result<RunnerType, EngineError> {
    let arch = &model.config().architecture;
    let pooling = match (config.runner, config.convert) {
        (RunnerOption::Generate, ConvertOption::Embed) => {
            return Err(EngineError::Config(
                "--convert embed needs --runner pooling (or auto)".into(),
            ));
        }
        (RunnerOption::Pooling, _) | (_, ConvertOption::Embed) => true,
        (RunnerOption::Generate, _) => false,
        (RunnerOption::Auto, _) => !model.is_generative(),
    };
    if !pooling && !model.is_generative() {
        return Err(EngineError::Config(format!(
            "{arch} is a pooling model: it does not support `--runner generate`"
        )));
    }
    if pooling && config.convert == ConvertOption::None && model.pooler().is_none() {
        return Err(EngineError::Config(format!(
            "{arch} has no pooler: use --convert embed to pool it"
        )));
    }
    Ok(match pooling {
        true => RunnerType::Pooling,
        false => RunnerType::Generate,
    })
}

/// The offline API: `LLM::new(config)?.generate(prompts, &params)?`.
pub struct LLM {
    engine: LLMEngine,
    next_id: u64,
    io_processor: Option<Arc<dyn IoProcessor>>,
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
        let engine = LLMEngine::with_registries(config, registries)?;
        let io_processor = select_io_processor(
            engine.config().engine.io_processor_plugin.as_deref(),
            engine.config(),
        )?
        .map(|(_, p)| p);
        Ok(LLM {
            engine,
            next_id: 0,
            io_processor,
        })
    }

    /// Sets (or removes) the IO processor [`Self::encode_plugin`] uses.
    pub fn set_io_processor(&mut self, processor: Option<Arc<dyn IoProcessor>>) {
        self.io_processor = processor;
    }

    /// vLLM's `LLM.encode({"data": ...})` with an IO processor (spec §6.3, offline):
    /// `parse_data` → `pre_process` → every prompt pooled (one batch) → `post_process`; the
    /// plugin's output.
    pub fn encode_plugin(
        &mut self,
        data: &serde_json::Value,
    ) -> Result<serde_json::Value, EngineError> {
        let processor = self.io_processor.clone().ok_or_else(|| {
            EngineError::IoProcessor(
                "No IOProcessor plugin installed: set io_processor_plugin (or the model's \
                 config.json io_processor_plugin)"
                    .into(),
            )
        })?;
        let request_id = format!("pooling-{}", self.next_id);
        let (prompts, params) = plugin_prompts(processor.as_ref(), Some(data), &request_id, None)?;
        let outputs = self.encode(&prompts, &params)?;
        plugin_output(processor.as_ref(), outputs, &request_id)
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

    /// Embeds every prompt (task `embed`, the model's normalisation); outputs come back in
    /// prompt order (vLLM's `LLM.embed`).
    pub fn embed<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
    ) -> Result<Vec<PoolingRequestOutput>, EngineError> {
        self.encode(prompts, &PoolingParams::embed())
    }

    /// Pools every prompt with `params` (vLLM's `LLM.encode`); outputs in prompt order.
    pub fn encode<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &PoolingParams,
    ) -> Result<Vec<PoolingRequestOutput>, EngineError> {
        self.encode_each(prompts, params, |_, _| {})
    }

    /// [`Self::encode`], calling `progress(done, total)` as requests finish.
    pub fn encode_each<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &PoolingParams,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<PoolingRequestOutput>, EngineError> {
        let mut ids: Vec<String> = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let id = self.next_id.to_string();
            self.next_id += 1;
            let added =
                self.engine
                    .add_pooling_request(&id, prompt.clone().into(), params.clone(), 0, 0.0);
            if let Err(e) = added {
                for added in &ids {
                    self.engine.abort(added);
                }
                return Err(e);
            }
            ids.push(id);
        }
        let mut done: HashMap<String, PoolingRequestOutput> = HashMap::new();
        while done.len() < ids.len() {
            for update in self.engine.step()? {
                if let Some(out) = update.pooling {
                    done.insert(out.request_id.clone(), out);
                    progress(done.len(), ids.len());
                } else if let Some(err) = update.finished.and_then(|o| o.error) {
                    for id in &ids {
                        self.engine.abort(id);
                    }
                    return Err(EngineError::Internal(err));
                }
            }
        }
        Ok(ids.into_iter().filter_map(|id| done.remove(&id)).collect())
    }

    /// Generates with per-prompt parameters, calling `progress(done, total)` as requests finish.
    pub fn generate_each<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &[SamplingParams],
        progress: impl FnMut(usize, usize),
    ) -> Result<Vec<RequestOutput>, EngineError> {
        self.generate_lora(prompts, params, &vec![None; prompts.len()], progress)
    }

    /// Generates with per-prompt parameters and per-prompt LoRA adapters (`None`: the base
    /// model), calling `progress(done, total)` as requests finish.
    pub fn generate_lora<P: Into<Prompt> + Clone>(
        &mut self,
        prompts: &[P],
        params: &[SamplingParams],
        loras: &[Option<LoraRequest>],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<RequestOutput>, EngineError> {
        if prompts.len() != loras.len() {
            return Err(EngineError::Config(format!(
                "{} prompts but {} LoRA requests",
                prompts.len(),
                loras.len()
            )));
        }
        if prompts.len() != params.len() {
            return Err(EngineError::Config(format!(
                "{} prompts but {} sampling parameter sets",
                prompts.len(),
                params.len()
            )));
        }
        let mut ids: Vec<String> = Vec::with_capacity(prompts.len());
        for ((prompt, p), lora) in prompts.iter().zip(params).zip(loras) {
            let id = self.next_id.to_string();
            self.next_id += 1;
            let when = (0, 0.0);
            if let Err(e) = self.engine.add_request_lora(
                &id,
                prompt.clone().into(),
                p.clone(),
                when,
                lora.clone(),
            ) {
                for added in &ids {
                    self.engine.abort(added);
                }
                return Err(e);
            }
            ids.push(id);
        }
        let mut done: HashMap<String, RequestOutput> = HashMap::new();
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
