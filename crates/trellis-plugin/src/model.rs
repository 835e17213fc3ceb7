//! The model extension point: an architecture turns a flattened batch into logits.

use candle_core::{Result, Tensor};

use crate::attention::{AttentionImpl, AttentionMetadata};

/// Facts about a loaded model that the engine needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The architecture name it was loaded as (`LlamaForCausalLM`, ...).
    pub architecture: String,
    /// Decoder layers (one KV cache each).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Vocabulary size (columns of the logits).
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

/// Everything one forward pass uses besides the token ids and positions.
pub struct ForwardContext<'a> {
    /// Per-step attention metadata, shared by every layer.
    pub attn_metadata: &'a AttentionMetadata,
    /// One attention implementation (with its KV cache) per layer.
    pub attn_layers: &'a mut [Box<dyn AttentionImpl>],
    /// Rows of the batch whose logits are wanted (for sampling or prompt logprobs), in order.
    pub logits_indices: &'a [usize],
}

/// A causal language model over the paged KV cache.
pub trait Model: Send {
    /// Facts about the model.
    fn config(&self) -> &ModelConfig;

    /// Runs the flattened batch `input_ids`/`positions` (one entry per token) and returns the
    /// logits `[logits_indices.len(), vocab_size]` as f32.
    fn forward(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor>;
}
