//! The attention-backend extension point (vLLM's `AttentionBackend` / `AttentionImpl`).
//!
//! A backend owns the layout of the paged KV cache. Per layer, the model hands the step's
//! new queries, keys and values for the whole flattened batch to [`AttentionImpl::forward`];
//! the implementation first writes every new key and value into its slot
//! ([`AttentionMetadata::slot_mapping`]), then computes causal attention of every new token over
//! its own sequence's blocks. Writing all slots before attending is part of the contract: two
//! sequences of the same step may share prefix blocks.

use candle_core::{DType, Device, Result, Tensor};

/// One sequence's part of the flattened batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAttentionMetadata {
    /// Offset of the sequence's first new token in the flattened batch.
    pub query_start: usize,
    /// New tokens of this sequence in this step.
    pub query_len: usize,
    /// Tokens in the cache once this step's keys are written (`computed + query_len`). The
    /// new tokens sit at positions `context_len - query_len .. context_len`.
    pub context_len: usize,
    /// The sequence's block table (block ids in position order).
    pub block_table: Vec<u32>,
}

/// What a backend needs to run one step, for every layer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttentionMetadata {
    /// Tokens per block.
    pub block_size: usize,
    /// Cache slot of every new token (`block * block_size + offset`), in batch order.
    pub slot_mapping: Vec<usize>,
    /// The sequences, in batch order.
    pub seqs: Vec<SeqAttentionMetadata>,
}

impl AttentionMetadata {
    /// Total new tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }
}

/// The shape of one layer's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCacheSpec {
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads (GQA: fewer than query heads).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Element type of the cache.
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Bytes one layer's K and V caches take.
    pub fn bytes_per_layer(&self) -> usize {
        2 * self.num_blocks
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * self.dtype.size_in_bytes()
    }
}

/// The shape of the attention a layer computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; `num_heads` is a multiple of it.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Multiplier of `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: f32,
}

/// What the attention selector checks a backend against (vLLM's `AttentionSelectorConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionSelectorConfig {
    /// Size of one head.
    pub head_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Compute dtype of queries, keys and values.
    pub dtype: DType,
    /// Element type of the KV cache.
    pub kv_cache_dtype: DType,
    /// Tokens per KV block, only when the user chose it (`--block-size`), as in vLLM.
    pub block_size: Option<usize>,
    /// The attention the model's layers compute: [`AttentionType::EncoderOnly`] when any layer
    /// is non-causal (BERT), else [`AttentionType::Decoder`].
    pub attn_type: AttentionType,
}

impl std::fmt::Display for AttentionSelectorConfig {
    /// vLLM's repr: `AttentionSelectorConfig(head_size=64, dtype=F32, ...)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bs = self
            .block_size
            .map_or("None".to_string(), |b| b.to_string());
        write!(
            f,
            "AttentionSelectorConfig(head_size={}, num_heads={}, num_kv_heads={}, dtype={:?}, \
             kv_cache_dtype={:?}, block_size={bs}, attn_type={})",
            self.head_size,
            self.num_heads,
            self.num_kv_heads,
            self.dtype,
            self.kv_cache_dtype,
            self.attn_type
        )
    }
}

/// The attention a layer computes (vLLM's `AttentionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionType {
    /// Causal self-attention of a decoder: token `i` sees positions `..=i` of its sequence.
    Decoder,
    /// Non-causal self-attention of an encoder-only model (BERT): every token sees every
    /// token of its sequence. The whole sequence is in one step (no chunked prefill).
    EncoderOnly,
}

impl std::fmt::Display for AttentionType {
    /// vLLM's names: `decoder`, `encoder_only`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttentionType::Decoder => "decoder",
            AttentionType::EncoderOnly => "encoder_only",
        })
    }
}

/// One layer's attention together with its share of the paged KV cache.
pub trait AttentionImpl: Send {
    /// Writes `key`/`value` (`[num_tokens, num_kv_heads, head_dim]`) into their slots, then
    /// returns the attention output `[num_tokens, num_heads, head_dim]` for `query`
    /// (`[num_tokens, num_heads, head_dim]`), causal within each sequence.
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor>;
}

/// An attention backend: a name, what it supports, and a factory of per-layer implementations.
pub trait AttentionBackend: Send + Sync {
    /// The registry name, for example `CPU_REFERENCE`.
    fn name(&self) -> &str;

    /// Head sizes this backend computes; empty means any.
    fn supported_head_sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Compute dtypes (of queries, keys and values) this backend accepts.
    fn supported_dtypes(&self) -> Vec<DType> {
        vec![DType::F32]
    }

    /// KV-cache dtypes this backend stores.
    fn supported_kv_cache_dtypes(&self) -> Vec<DType> {
        vec![DType::F32]
    }

    /// Kernel block sizes; a block size is accepted when it is a multiple of one of them
    /// (vLLM's `get_supported_kernel_block_sizes`). Empty means any.
    fn supported_block_sizes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Why this backend cannot serve `config`, with vLLM's reason strings ("head_size not
    /// supported", "dtype not supported", "kv_cache_dtype not supported", "block_size not
    /// supported", "attention type encoder_only not supported", "non-causal attention not
    /// supported"); empty means it can. Override to add reasons of your own.
    fn validate_configuration(&self, config: &AttentionSelectorConfig) -> Vec<String> {
        let mut reasons = Vec::new();
        let heads = self.supported_head_sizes();
        if !heads.is_empty() && !heads.contains(&config.head_size) {
            reasons.push("head_size not supported".to_string());
        }
        if !self.supported_dtypes().contains(&config.dtype) {
            reasons.push("dtype not supported".to_string());
        }
        if !self
            .supported_kv_cache_dtypes()
            .contains(&config.kv_cache_dtype)
        {
            reasons.push("kv_cache_dtype not supported".to_string());
        }
        if let Some(bs) = config.block_size {
            let bases = self.supported_block_sizes();
            if bs == 0 || !(bases.is_empty() || bases.iter().any(|&b| b > 0 && bs % b == 0)) {
                reasons.push("block_size not supported".to_string());
            }
        }
        if !self.supports_attn_type(config.attn_type) {
            reasons.push(format!("attention type {} not supported", config.attn_type));
            if config.attn_type == AttentionType::EncoderOnly {
                reasons.push("non-causal attention not supported".to_string());
            }
        }
        reasons
    }

    /// Allocates one layer's KV cache and the object that computes its attention.
    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>>;

    /// Whether this backend computes attention of type `attn_type` (vLLM's
    /// `supports_attn_type`); by default causal decoder attention only.
    fn supports_attn_type(&self, attn_type: AttentionType) -> bool {
        attn_type == AttentionType::Decoder
    }

    /// [`AttentionBackend::new_layer`] for a layer of type `attn_type`; by default decoder
    /// layers only. Backends that declare [`AttentionType::EncoderOnly`] override it.
    fn new_layer_of_type(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        attn_type: AttentionType,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        match attn_type {
            AttentionType::Decoder => self.new_layer(spec, shape, device),
            other => candle_core::bail!(
                "attention backend {} does not support {other} attention",
                self.name()
            ),
        }
    }
}
