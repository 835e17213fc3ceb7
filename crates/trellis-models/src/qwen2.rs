//! Qwen2: the Llama anatomy with biases on the q/k/v projections (not on o_proj), RMS norms,
//! gated SiLU MLP and an LM head that is often tied to the embeddings.
//!
//! - HF: `Qwen2ForCausalLM` (config.json + safetensors, half-split RoPE).
//!
//! Sliding-window attention (`use_sliding_window`, off in released checkpoints) is not applied.

use candle_core::{Device, Result, Tensor};
use serde::Deserialize;
use trellis_plugin::{ForwardContext, Model, ModelConfig};

use crate::error::{ModelError, Result as LoadResult};
use crate::layers::{
    AttentionConfig, DecoderLayer, Embedding, Linear, RmsNorm, RopeConfig, RopeScaling,
    RotaryEmbedding, StepScratch, decoder_hidden_states, lm_head_logits,
};
use crate::registry::{ModelConfigSource, ModelLoadContext, parse_hf_config};
use crate::weights::WeightSource;

fn default_rope_theta() -> f64 {
    10_000.0
}

/// The `config.json` fields Qwen2 uses (names as in transformers' `Qwen2Config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Optional RoPE scaling (`llama3`, `linear`).
    pub rope_scaling: Option<RopeScaling>,
    /// Training context length.
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl Config {
    fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            hidden_size: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            qkv_bias: true,
        }
    }
}

/// `Qwen2ForCausalLM`.
#[derive(Debug)]
pub struct Qwen2 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    scratch: std::sync::Mutex<StepScratch>,
    rotary: RotaryEmbedding,
    config: ModelConfig,
}

impl Qwen2 {
    /// Builds the model from `cfg` and the weights in `ws`.
    pub fn load(
        cfg: &Config,
        ws: &dyn WeightSource,
        architecture: &str,
        _device: &Device,
    ) -> LoadResult<Self> {
        let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let attn = cfg.attention();
        if attn.num_heads == 0
            || attn.num_kv_heads == 0
            || !attn.num_heads.is_multiple_of(attn.num_kv_heads)
        {
            let msg = format!(
                "{} attention heads are not a multiple of {} KV heads",
                attn.num_heads, attn.num_kv_heads
            );
            return Err(ModelError::config(ws.path(), msg));
        }
        let embed_tokens = Embedding::load(ws, "model.embed_tokens.weight", vocab, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                DecoderLayer::load(
                    ws,
                    i,
                    cfg.attention(),
                    cfg.rms_norm_eps,
                    cfg.intermediate_size,
                )
            })
            .collect::<LoadResult<Vec<_>>>()?;
        let norm = RmsNorm::load(ws, "model.norm.weight", h, cfg.rms_norm_eps)?;
        let head = match cfg.tie_word_embeddings || !ws.contains("lm_head.weight") {
            true => "model.embed_tokens",
            false => "lm_head",
        };
        let lm_head = Linear::load(ws, head, false, vocab, h)?;
        let rope = RopeConfig {
            theta: cfg.rope_theta,
            rotary_dim: attn.head_dim,
            scaling: cfg.rope_scaling.clone(),
            freq_factors: None,
        };
        let rotary = RotaryEmbedding::new(&rope, ws.rope_style())
            .map_err(|m| ModelError::config(ws.path(), m))?;
        let config = ModelConfig {
            architecture: architecture.to_string(),
            num_layers: cfg.num_hidden_layers,
            num_heads: attn.num_heads,
            num_kv_heads: attn.num_kv_heads,
            head_dim: attn.head_dim,
            hidden_size: h,
            vocab_size: vocab,
            max_position_embeddings: cfg.max_position_embeddings,
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            scratch: Default::default(),
            rotary,
            config,
        })
    }

    /// The registry factory: reads the configuration from config.json.
    pub fn factory(ctx: &ModelLoadContext<'_>) -> LoadResult<Box<dyn Model>> {
        let cfg = match &ctx.config {
            ModelConfigSource::HfConfig { path, json } => parse_hf_config::<Config>(path, json)?,
            ModelConfigSource::Gguf(meta) => {
                return Err(ModelError::config(
                    meta.path,
                    "Qwen2 is loaded from Hugging Face safetensors only",
                ));
            }
        };
        Ok(Box::new(Self::load(
            &cfg,
            ctx.weights,
            ctx.architecture,
            ctx.device,
        )?))
    }
}

impl Model for Qwen2 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_hidden_states(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        decoder_hidden_states(
            &self.scratch,
            &self.embed_tokens,
            &self.layers,
            &self.norm,
            &self.rotary,
            input_ids,
            positions,
            ctx,
        )
    }

    fn lora_modules(&self) -> Vec<trellis_plugin::LoraModuleSpec> {
        crate::layers::decoder_lora_modules(&self.layers, self.rotary.style())
    }

    fn compute_logits(&self, hidden_states: &Tensor) -> Result<Tensor> {
        lm_head_logits(
            &self.scratch,
            &self.lm_head,
            self.config.vocab_size,
            hidden_states,
        )
    }
}
