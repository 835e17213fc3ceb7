//! LoRA on the forward path: which projections an adapter may target, the fixed pool of
//! adapter slots, and the per-step mapping of token rows to slots that reaches every linear
//! layer through [`ForwardContext::lora`](crate::ForwardContext::lora).
//!
//! Why a fixed pool: vLLM keeps adapter weights in `max_loras` GPU slots per layer, stacked,
//! so that a step never allocates and an adapter that is swapped in only overwrites one slot.
//! The CPU pool here does the same: for every LoRA-able module, `max_loras` slots of
//! `max_rank` rows each of `A` (`[rank, in]`) and of `Bᵀ` already multiplied by the scaling
//! (`[rank, out]`). Loading an adapter into a slot copies into preallocated memory; the step
//! reads the pool through a shared reference.
//!
//! Why rows map to slots: the batch is flattened, so one forward serves requests of different
//! adapters (and none). Each token row carries its request's slot ([`NO_LORA_SLOT`] for the
//! base model); a linear computes `y = x·Wᵀ` for all rows, then adds `(x·Aᵀ)·(s·B)ᵀ` for the
//! rows of each slot (Punica's shrink and expand). Rows without an adapter pay nothing.

/// Slot of a token row that runs the base model only.
pub const NO_LORA_SLOT: u32 = u32::MAX;

/// A projection a LoRA adapter may target (PEFT's module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl LoraTarget {
    /// Every target, in a fixed order (the order of module indices in the pool).
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The module's name in a checkpoint and in `target_modules` (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// The parent module in a Llama-family checkpoint (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }

    /// The target called `name` (`q_proj`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One linear layer of a model that an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraModuleSpec {
    /// Decoder layer index.
    pub layer: usize,
    /// Which projection.
    pub target: LoraTarget,
    /// Input features (columns of `W`, of `A`).
    pub in_features: usize,
    /// Output features (rows of `W`, of `B`).
    pub out_features: usize,
    /// When the model's weight rows are in llama.cpp's interleaved-RoPE order (GGUF `attn_q`,
    /// `attn_k`): the number of heads of that permutation. A PEFT `lora_B` (HF row order) gets
    /// the same row permutation before use.
    pub permute_heads: Option<usize>,
}

/// The slots of one module: `max_loras` × (`A` `[max_rank, in]`, scaled `Bᵀ` `[max_rank, out]`).
#[derive(Debug, Clone)]
pub struct ModuleSlots {
    in_features: usize,
    out_features: usize,
    max_rank: usize,
    a: Vec<f32>,
    b_t: Vec<f32>,
    /// Rank in use per slot (0: the adapter in that slot does not target this module).
    rank: Vec<usize>,
}

impl ModuleSlots {
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `(rank, A [rank, in], scaled Bᵀ [rank, out])` of `slot`, or `None` when the adapter in
    /// that slot does not target this module (or `slot` is out of the pool).
    pub fn weights(&self, slot: usize) -> Option<(usize, &[f32], &[f32])> {
        let rank = *self.rank.get(slot)?;
        if rank == 0 {
            return None;
        }
        let a = &self.a[slot * self.max_rank * self.in_features..][..rank * self.in_features];
        let b = &self.b_t[slot * self.max_rank * self.out_features..][..rank * self.out_features];
        Some((rank, a, b))
    }
}

/// Error of [`LoraSlotPool::set_module`]: the adapter does not fit the slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoraSlotError {
    /// The slot index is not in the pool.
    #[error("LoRA slot {slot} is out of the pool of {max_loras} slots")]
    Slot {
        /// The slot asked for.
        slot: usize,
        /// Slots in the pool.
        max_loras: usize,
    },
    /// The model has no such module.
    #[error("the model has no LoRA-capable module {target} in layer {layer}")]
    Module {
        /// Layer.
        layer: usize,
        /// Target name.
        target: &'static str,
    },
    /// Rank or shape does not fit.
    #[error("LoRA weights of layer {layer} {target}: {reason}")]
    Shape {
        /// Layer.
        layer: usize,
        /// Target name.
        target: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The fixed pool of adapter slots of a model (`max_loras` × `max_rank`), allocated once.
#[derive(Debug, Clone)]
pub struct LoraSlotPool {
    max_loras: usize,
    max_rank: usize,
    /// Indexed by `layer * 7 + target`.
    modules: Vec<Option<ModuleSlots>>,
}

impl LoraSlotPool {
    /// Allocates `max_loras` slots of rank up to `max_rank` for every module of `specs`.
    pub fn new(specs: &[LoraModuleSpec], max_loras: usize, max_rank: usize) -> Self {
        let layers = specs.iter().map(|s| s.layer + 1).max().unwrap_or(0);
        let mut modules = vec![None; layers * LoraTarget::ALL.len()];
        for s in specs {
            modules[s.layer * LoraTarget::ALL.len() + s.target.index()] = Some(ModuleSlots {
                in_features: s.in_features,
                out_features: s.out_features,
                max_rank,
                a: vec![0.0; max_loras * max_rank * s.in_features],
                b_t: vec![0.0; max_loras * max_rank * s.out_features],
                rank: vec![0; max_loras],
            });
        }
        LoraSlotPool {
            max_loras,
            max_rank,
            modules,
        }
    }

    /// Bytes the pool holds (the memory of `max_loras` loaded adapters of `max_rank`).
    pub fn bytes(specs: &[LoraModuleSpec], max_loras: usize, max_rank: usize) -> usize {
        specs
            .iter()
            .map(|s| max_loras * max_rank * (s.in_features + s.out_features) * 4)
            .sum()
    }

    /// Slots in the pool.
    pub fn max_loras(&self) -> usize {
        self.max_loras
    }

    /// Largest rank a slot holds.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// The slots of `target` in `layer`, when the model has that module.
    pub fn module(&self, layer: usize, target: LoraTarget) -> Option<&ModuleSlots> {
        self.modules
            .get(layer * LoraTarget::ALL.len() + target.index())?
            .as_ref()
    }

    /// Marks every module of `slot` as untargeted (the slot then adds nothing).
    pub fn clear_slot(&mut self, slot: usize) {
        for m in self.modules.iter_mut().flatten() {
            if let Some(r) = m.rank.get_mut(slot) {
                *r = 0;
            }
        }
    }

    /// Copies one module's weights into `slot`: `a` is `A` `[rank, in]`, `b_t` is `Bᵀ`
    /// `[rank, out]` already multiplied by the adapter's scaling.
    pub fn set_module(
        &mut self,
        slot: usize,
        layer: usize,
        target: LoraTarget,
        rank: usize,
        a: &[f32],
        b_t: &[f32],
    ) -> Result<(), LoraSlotError> {
        let (max_loras, max_rank) = (self.max_loras, self.max_rank);
        if slot >= max_loras {
            return Err(LoraSlotError::Slot { slot, max_loras });
        }
        let name = target.name();
        let m = self
            .modules
            .get_mut(layer * LoraTarget::ALL.len() + target.index())
            .and_then(Option::as_mut)
            .ok_or(LoraSlotError::Module {
                layer,
                target: name,
            })?;
        let shape = |reason: String| LoraSlotError::Shape {
            layer,
            target: name,
            reason,
        };
        if rank == 0 || rank > max_rank {
            return Err(shape(format!("rank {rank} is not in 1..={max_rank}")));
        }
        if a.len() != rank * m.in_features || b_t.len() != rank * m.out_features {
            return Err(shape(format!(
                "{} and {} values for rank {rank}, in {}, out {}",
                a.len(),
                b_t.len(),
                m.in_features,
                m.out_features
            )));
        }
        m.a[slot * max_rank * m.in_features..][..a.len()].copy_from_slice(a);
        m.b_t[slot * max_rank * m.out_features..][..b_t.len()].copy_from_slice(b_t);
        m.rank[slot] = rank;
        Ok(())
    }
}

/// The step's LoRA mapping: the pool and the slot of every token row of the flattened batch.
#[derive(Debug, Clone, Copy)]
pub struct LoraMapping<'a> {
    /// The adapter weights.
    pub pool: &'a LoraSlotPool,
    /// Slot of each token row, [`NO_LORA_SLOT`] for base-model rows.
    pub token_slots: &'a [u32],
}
