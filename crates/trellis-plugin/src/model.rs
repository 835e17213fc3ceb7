//! The model extension point, split as vLLM's is: [`Model::forward_hidden_states`] runs the
//! body over a flattened batch and returns hidden states (vLLM's `forward`),
//! [`Model::compute_logits`] is the generative head and [`Model::pooler`] the pooling head.
//! [`Model::forward`] is the composition the generate path calls: hidden states, the rows in
//! `logits_indices`, their logits.

use candle_core::{Result, Tensor, bail};

use crate::attention::{AttentionImpl, AttentionMetadata, AttentionType};
use crate::lora::{LoraMapping, LoraModuleSpec};
use crate::pooler::Pooler;

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
    /// The step's LoRA mapping (token rows → adapter slots), read by every LoRA-capable
    /// linear layer; `None` when no row of the batch has an adapter.
    pub lora: Option<LoraMapping<'a>>,
}

/// A model over the paged KV cache: a body that produces hidden states, and a generative head
/// ([`Model::compute_logits`]), a pooling head ([`Model::pooler`]) or both.
///
/// Implement [`Model::forward_hidden_states`] and [`Model::compute_logits`] (the built-in
/// architectures do); a model that only overrides [`Model::forward`] (the plugin API before
/// the split) still generates, but cannot pool.
pub trait Model: Send {
    /// Facts about the model.
    fn config(&self) -> &ModelConfig;

    /// The body (vLLM's `forward`): runs the flattened batch `input_ids`/`positions` (one entry
    /// per token) and returns the hidden states `[num_tokens, hidden_size]` as f32, after the
    /// final norm. `ctx.logits_indices` is not read.
    fn forward_hidden_states(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let _ = (input_ids, positions, ctx);
        bail!(
            "model {} does not return hidden states",
            self.config().architecture
        )
    }

    /// The generative head (vLLM's `compute_logits`): logits `[rows, vocab_size]` as f32 of
    /// hidden states `[rows, hidden_size]`.
    fn compute_logits(&self, hidden_states: &Tensor) -> Result<Tensor> {
        let _ = hidden_states;
        bail!(
            "model {} has no language-model head",
            self.config().architecture
        )
    }

    /// The pooling head the model brings (BERT's sentence-transformers pooling), or `None`
    /// for a generative model (the engine then pools as `--convert embed` says).
    fn pooler(&self) -> Option<Pooler> {
        None
    }

    /// Whether the model has a generative head ([`Model::compute_logits`]).
    fn is_generative(&self) -> bool {
        true
    }

    /// The attention each layer needs (vLLM's `attn_type`): causal decoder attention unless
    /// the model says otherwise (an encoder: [`AttentionType::EncoderOnly`]).
    fn attn_type(&self, layer: usize) -> AttentionType {
        let _ = layer;
        AttentionType::Decoder
    }

    /// The linear layers an adapter may target, with their shapes (vLLM's
    /// `SupportsLoRA`); empty (the default) means the model does not support LoRA.
    fn lora_modules(&self) -> Vec<LoraModuleSpec> {
        Vec::new()
    }

    /// Logits `[logits_indices.len(), vocab_size]` as f32 of the rows `ctx.logits_indices`:
    /// [`Model::forward_hidden_states`], those rows, [`Model::compute_logits`].
    fn forward(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden_states(input_ids, positions, ctx)?;
        let rows = select_rows(&hidden, ctx.logits_indices)?;
        self.compute_logits(&rows)
    }
}

/// The rows `indices` (in that order) of `hidden` `[num_tokens, hidden_size]`.
pub fn select_rows(hidden: &Tensor, indices: &[usize]) -> Result<Tensor> {
    let (t, _) = hidden.dims2()?;
    if let Some(bad) = indices.iter().find(|&&r| r >= t) {
        bail!("logits index {bad} is out of the batch ({t} tokens)");
    }
    let idx: Vec<u32> = indices.iter().map(|&r| r as u32).collect();
    let idx = Tensor::from_vec(idx, indices.len(), hidden.device())?;
    hidden.index_select(&idx, 0)
}
