//! Llama (and Mistral): pre-norm decoder layers of grouped-query attention with rotary
//! embeddings and a gated SiLU MLP, RMS norms, optionally tied LM head.
//!
//! - HF: `LlamaForCausalLM`, `MistralForCausalLM` (config.json + safetensors, half-split RoPE).
//! - GGUF: `general.architecture = llama` (metadata `llama.*`, q/k rows permuted for the
//!   interleaved RoPE).
//!
//! Mistral's `sliding_window` is not applied (exact for contexts up to the window).

use candle_core::{Device, Result, Tensor};
use serde::Deserialize;
use trellis_plugin::{ForwardContext, Model, ModelConfig};

use crate::error::{ModelError, Result as LoadResult};
use crate::gguf::GgufMetadata;
use crate::layers::{
    AttentionConfig, DecoderLayer, Embedding, Linear, RmsNorm, RopeConfig, RopeScaling,
    RotaryEmbedding, StepScratch, decoder_hidden_states, lm_head_logits,
};
use crate::registry::{ModelConfigSource, ModelLoadContext, parse_hf_config};
use crate::weights::WeightSource;

fn default_rope_theta() -> f64 {
    10_000.0
}

/// The `config.json` fields Llama uses (names as in transformers' `LlamaConfig`).
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
    /// Key/value heads (defaults to `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Size of one head (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
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
    /// Whether q/k/v/o projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Dimensions of a head that RoPE rotates (GGUF `rope.dimension_count`; HF: all).
    #[serde(skip)]
    pub rotary_dim: Option<usize>,
}

impl Config {
    /// Reads the configuration from GGUF metadata (`llama.*` keys).
    pub fn from_gguf(meta: &GgufMetadata<'_>) -> LoadResult<Self> {
        let p = "llama";
        let hidden_size = meta.usize(&format!("{p}.embedding_length"))?;
        let num_attention_heads = meta.usize(&format!("{p}.attention.head_count"))?;
        let kv_key = format!("{p}.attention.head_count_kv");
        let head_key = format!("{p}.attention.key_length");
        let rope_dim_key = format!("{p}.rope.dimension_count");
        let scaling_key = format!("{p}.rope.scaling.type");
        let rope_scaling = match meta.contains(&scaling_key) {
            true => match meta.string(&scaling_key)? {
                "none" => None,
                kind => Some(RopeScaling {
                    rope_type: Some(kind.to_string()),
                    factor: Some(meta.f64(&format!("{p}.rope.scaling.factor"))?),
                    ..Default::default()
                }),
            },
            false => None,
        };
        let vocab_size = match meta.contains("tokenizer.ggml.tokens") {
            true => meta.array_len("tokenizer.ggml.tokens")?,
            false => 0, // taken from the embedding matrix
        };
        let theta_key = format!("{p}.rope.freq_base");
        Ok(Self {
            hidden_size,
            intermediate_size: meta.usize(&format!("{p}.feed_forward_length"))?,
            num_hidden_layers: meta.usize(&format!("{p}.block_count"))?,
            num_attention_heads,
            num_key_value_heads: Some(if meta.contains(&kv_key) {
                meta.usize(&kv_key)?
            } else {
                num_attention_heads
            }),
            head_dim: if meta.contains(&head_key) {
                Some(meta.usize(&head_key)?)
            } else {
                None
            },
            rms_norm_eps: meta.f64(&format!("{p}.attention.layer_norm_rms_epsilon"))?,
            rope_theta: if meta.contains(&theta_key) {
                meta.f64(&theta_key)?
            } else {
                default_rope_theta()
            },
            rope_scaling,
            max_position_embeddings: meta.usize(&format!("{p}.context_length"))?,
            vocab_size,
            tie_word_embeddings: false,
            attention_bias: false,
            rotary_dim: if meta.contains(&rope_dim_key) {
                Some(meta.usize(&rope_dim_key)?)
            } else {
                None
            },
        })
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            hidden_size: self.hidden_size,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim(),
            qkv_bias: self.attention_bias,
        }
    }
}

/// `LlamaForCausalLM`.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    scratch: std::sync::Mutex<StepScratch>,
    rotary: RotaryEmbedding,
    config: ModelConfig,
}

impl Llama {
    /// Builds the model from `cfg` and the weights in `ws`.
    pub fn load(
        cfg: &Config,
        ws: &dyn WeightSource,
        architecture: &str,
        _device: &Device,
    ) -> LoadResult<Self> {
        let mut cfg = cfg.clone();
        let embed = ws.tensor("model.embed_tokens.weight")?;
        if cfg.vocab_size == 0 {
            cfg.vocab_size = embed.dims().first().copied().unwrap_or(0);
        }
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
        let embed_tokens = Embedding::new(ws, "model.embed_tokens.weight", embed, vocab, h)?;
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
            rotary_dim: cfg.rotary_dim.unwrap_or(attn.head_dim),
            scaling: cfg.rope_scaling.clone(),
            freq_factors: match ws.contains("rope_freqs.weight") {
                true => Some(
                    ws.tensor("rope_freqs.weight")?
                        .to_vec1::<f32>()
                        .map_err(|e| ModelError::candle(ws.path(), e))?,
                ),
                false => None,
            },
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

    /// The registry factory: reads the configuration from config.json or GGUF metadata.
    pub fn factory(ctx: &ModelLoadContext<'_>) -> LoadResult<Box<dyn Model>> {
        let cfg = match &ctx.config {
            ModelConfigSource::HfConfig { path, json } => parse_hf_config::<Config>(path, json)?,
            ModelConfigSource::Gguf(meta) => Config::from_gguf(meta)?,
        };
        Ok(Box::new(Self::load(
            &cfg,
            ctx.weights,
            ctx.architecture,
            ctx.device,
        )?))
    }
}

impl Model for Llama {
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
