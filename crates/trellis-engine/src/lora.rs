//! LoRA in the engine: the configuration (`--max-loras`, `--max-lora-rank`, `--max-cpu-loras`,
//! `--lora-dtype`) and the [`LoraManager`] the model runner owns — the CPU-side LRU of loaded
//! adapters and the fixed slot pool the forward reads.
//!
//! Versions: every load of an adapter (a first load, or a reload in place) gets a new engine
//! *version* id. A request pins the version (and its weights, an `Arc`) it was added with, and
//! the scheduler sees that version as the request's LoRA id: the `--max-loras` limit and the
//! prefix-cache hash both follow the weights actually used, so a request already running keeps
//! its weights when the same name is reloaded in place, and never shares cached blocks with
//! the new weights.

use std::path::Path;
use std::sync::Arc;

use trellis_models::{LoraAdapter, LoraError};
use trellis_plugin::{LoraModuleSpec, LoraRequest, LoraSlotPool, Model};

use crate::error::EngineError;

/// `--max-lora-rank` choices (vLLM's).
pub const MAX_LORA_RANK_CHOICES: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// The LoRA knobs of an engine; LoRA is on when [`crate::EngineConfig::lora`] holds one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraConfig {
    /// Distinct adapters in one step (`--max-loras`, default 1): the slots of the pool.
    pub max_loras: usize,
    /// Largest rank an adapter may have (`--max-lora-rank`, default 16).
    pub max_lora_rank: usize,
    /// Loaded adapters kept on the CPU (`--max-cpu-loras`, default `max_loras`).
    pub max_cpu_loras: Option<usize>,
    /// `--lora-dtype`: `auto`, `float16` or `bfloat16`. Adapter weights are kept in f32 on
    /// the CPU whatever it says (the base model computes in f32 there).
    pub lora_dtype: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            max_loras: 1,
            max_lora_rank: 16,
            max_cpu_loras: None,
            lora_dtype: "auto".into(),
        }
    }
}

impl LoraConfig {
    /// Checks the knobs with vLLM's texts.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_loras < 1 {
            return Err(format!("max_loras ({}) must be >= 1.", self.max_loras));
        }
        if !MAX_LORA_RANK_CHOICES.contains(&self.max_lora_rank) {
            return Err(format!(
                "max_lora_rank ({}) must be one of {MAX_LORA_RANK_CHOICES:?}.",
                self.max_lora_rank
            ));
        }
        if self.cpu_capacity() < self.max_loras {
            return Err(format!(
                "max_cpu_loras ({}) must be >= max_loras ({}).",
                self.cpu_capacity(),
                self.max_loras
            ));
        }
        if !["auto", "float16", "bfloat16"].contains(&self.lora_dtype.as_str()) {
            return Err(format!(
                "lora_dtype must be one of auto, float16, bfloat16 (got {})",
                self.lora_dtype
            ));
        }
        Ok(())
    }

    /// The capacity of the CPU cache (`max_cpu_loras`, values ≤ 0 or unset: `max_loras`).
    pub fn cpu_capacity(&self) -> usize {
        self.max_cpu_loras
            .filter(|&n| n > 0)
            .unwrap_or(self.max_loras)
    }
}

/// The adapter a request runs with: the engine version and the weights of that version.
#[derive(Debug, Clone)]
pub struct ActiveLora {
    /// Engine version id (≥ 1), the request's LoRA id in the scheduler.
    pub version: u32,
    /// The weights.
    pub adapter: Arc<LoraAdapter>,
}

#[derive(Debug)]
struct Cached {
    lora_int_id: u32,
    active: ActiveLora,
}

/// The CPU cache of loaded adapters and the slot pool.
#[derive(Debug)]
pub struct LoraManager {
    config: LoraConfig,
    specs: Vec<LoraModuleSpec>,
    /// Least recently used first.
    cache: Vec<Cached>,
    next_version: u32,
    pub(crate) pool: LoraSlotPool,
    /// Version held by each slot.
    slots: Vec<Option<u32>>,
}

impl LoraManager {
    /// Sizes the pool for `model` (refusing a model without LoRA support, as vLLM does).
    pub fn new(model: &dyn Model, config: LoraConfig) -> Result<Self, EngineError> {
        config.validate().map_err(EngineError::Config)?;
        let specs = model.lora_modules();
        if specs.is_empty() {
            let arch = &model.config().architecture;
            return Err(EngineError::Config(format!(
                "LoRA is not supported for {arch} (this model). Supported models are the \
                 Llama-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)."
            )));
        }
        let pool = LoraSlotPool::new(&specs, config.max_loras, config.max_lora_rank);
        Ok(LoraManager {
            slots: vec![None; config.max_loras],
            config,
            specs,
            cache: Vec::new(),
            next_version: 1,
            pool,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The modules an adapter may target.
    pub fn specs(&self) -> &[LoraModuleSpec] {
        &self.specs
    }

    /// Bytes of the slot pool.
    pub fn pool_bytes(&self) -> usize {
        LoraSlotPool::bytes(
            &self.specs,
            self.config.max_loras,
            self.config.max_lora_rank,
        )
    }

    /// Bytes of the adapters in the CPU cache.
    pub fn cached_bytes(&self) -> usize {
        self.cache.iter().map(|c| c.active.adapter.bytes()).sum()
    }

    /// Loads the adapter in `dir` for these modules (no engine state touched; may run on any
    /// thread).
    pub fn load_adapter(
        specs: &[LoraModuleSpec],
        max_lora_rank: usize,
        dir: &Path,
    ) -> Result<LoraAdapter, LoraError> {
        LoraAdapter::load(dir, specs, max_lora_rank)
    }

    /// The ids of the adapters in the CPU cache, least recently used first.
    pub fn list_loras(&self) -> Vec<u32> {
        self.cache.iter().map(|c| c.lora_int_id).collect()
    }

    /// Drops adapter `lora_int_id` from the CPU cache (requests running with it keep their
    /// weights); false when it is not there.
    pub fn remove_lora(&mut self, lora_int_id: u32) -> bool {
        let before = self.cache.len();
        self.cache.retain(|c| c.lora_int_id != lora_int_id);
        before != self.cache.len()
    }

    /// vLLM's `add_lora`: the adapter of `req`, loaded from its path unless it is cached (and
    /// not asked to reload in place); the most recently used from now on.
    pub fn add_lora(&mut self, req: &LoraRequest) -> Result<ActiveLora, EngineError> {
        if !req.load_inplace
            && let Some(pos) = self
                .cache
                .iter()
                .position(|c| c.lora_int_id == req.lora_int_id)
        {
            let c = self.cache.remove(pos);
            let active = c.active.clone();
            self.cache.push(c);
            return Ok(active);
        }
        let adapter = Self::load_adapter(
            &self.specs,
            self.config.max_lora_rank,
            Path::new(&req.lora_path),
        )?;
        Ok(self.insert(req.lora_int_id, Arc::new(adapter)))
    }

    /// Puts an adapter loaded elsewhere ([`Self::load_adapter`]) in the cache as `lora_int_id`
    /// (replacing an entry of that id), evicting the least recently used beyond capacity.
    pub fn insert(&mut self, lora_int_id: u32, adapter: Arc<LoraAdapter>) -> ActiveLora {
        self.cache.retain(|c| c.lora_int_id != lora_int_id);
        let active = ActiveLora {
            version: self.next_version,
            adapter,
        };
        self.next_version = self.next_version.wrapping_add(1).max(1);
        self.cache.push(Cached {
            lora_int_id,
            active: active.clone(),
        });
        while self.cache.len() > self.config.cpu_capacity() {
            self.cache.remove(0);
        }
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        crate::platform_setup::log(&format!(
            "LoRA adapter {lora_int_id} loaded from {} (rank {}, {:.1} MiB); {} adapters cached \
             on the CPU ({:.1} MiB)",
            active.adapter.path().display(),
            active.adapter.rank(),
            mib(active.adapter.bytes()),
            self.cache.len(),
            mib(self.cached_bytes())
        ));
        active
    }

    /// The slot of each adapter of a step (`versions[i]` → slot), writing adapters that are
    /// not in a slot yet into slots no adapter of this step uses.
    pub fn assign_slots(
        &mut self,
        wanted: &[&ActiveLora],
        out: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        out.clear();
        let mut distinct: Vec<u32> = Vec::new();
        for a in wanted {
            if !distinct.contains(&a.version) {
                distinct.push(a.version);
            }
        }
        if distinct.len() > self.config.max_loras {
            return Err(EngineError::Internal(format!(
                "Number of requested LoRAs ({}) is greater than the number of GPU LoRA slots ({}).",
                distinct.len(),
                self.config.max_loras
            )));
        }
        for a in wanted {
            let slot = match self.slots.iter().position(|s| *s == Some(a.version)) {
                Some(s) => s,
                None => {
                    let free = self
                        .slots
                        .iter()
                        .position(|s| s.is_none_or(|v| !distinct.contains(&v)))
                        .ok_or_else(|| {
                            EngineError::Internal("no free LoRA slot for the step".into())
                        })?;
                    a.adapter
                        .write_to(&mut self.pool, free)
                        .map_err(|e| EngineError::Internal(e.to_string()))?;
                    self.slots[free] = Some(a.version);
                    free
                }
            };
            out.push(slot as u32);
        }
        Ok(())
    }
}
