//! BERT: an encoder of post-norm layers (non-causal self-attention with biases, GELU MLP,
//! LayerNorms), token + position + token-type embeddings. A pooling model: no LM head.
//!
//! - HF: `BertModel` (config.json + safetensors; tensor names with or without the `bert.`
//!   prefix of `BertFor*` checkpoints).
//! - A sentence-transformers directory is read as it is: `modules.json` lists the modules,
//!   `1_Pooling/config.json` picks the pooling (mean / cls / last / max), a `Normalize` module
//!   turns on L2 normalisation, and `sentence_bert_config.json`'s `max_seq_length` caps the
//!   context (inputs are truncated to it, as sentence-transformers does).
//!
//! Every product is a plain row-by-row dot product in a fixed order, so a sequence's hidden
//! states are the same bits whatever else is in the batch.

use std::path::Path;

use candle_core::{Device, Result, Tensor, bail};
use serde::Deserialize;
use trellis_kernels::pool;
use trellis_plugin::{AttentionType, ForwardContext, Model, ModelConfig, Pooler, PoolingType};

use crate::error::{ModelError, Result as LoadResult, one_line};
use crate::registry::{ModelConfigSource, ModelLoadContext, parse_hf_config};
use crate::weights::WeightSource;

fn default_act() -> String {
    "gelu".to_string()
}

fn default_eps() -> f64 {
    1e-12
}

/// The `config.json` fields BERT uses (names as in transformers' `BertConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Position embeddings (longest input).
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Token types (segments).
    #[serde(default)]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `gelu` (erf form) or `gelu_new` / `gelu_pytorch_tanh` (tanh form).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

/// What a sentence-transformers directory adds to the transformer: pooling, normalisation and
/// the length cap. Directories without `modules.json` get CLS pooling without normalisation
/// (vLLM's default for a bare `BertModel`).
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceTransformers {
    /// The pooling head.
    pub pooler: Pooler,
    /// `sentence_bert_config.json` `max_seq_length`.
    pub max_seq_length: Option<usize>,
}

fn read_json(path: &Path) -> LoadResult<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::config(path, format!("invalid JSON: {}", one_line(&e)))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::Io {
            path: path.to_path_buf(),
            message: one_line(&e),
        }),
    }
}

impl SentenceTransformers {
    /// Reads `modules.json`, the pooling module's `config.json` and
    /// `sentence_bert_config.json` of `dir`.
    pub fn read(dir: &Path) -> LoadResult<Self> {
        let mut st = SentenceTransformers {
            pooler: Pooler {
                pooling_type: PoolingType::Cls,
                normalize: false,
            },
            max_seq_length: None,
        };
        let modules_path = dir.join("modules.json");
        let Some(modules) = read_json(&modules_path)? else {
            return Ok(st);
        };
        let Some(modules) = modules.as_array() else {
            return Err(ModelError::config(
                &modules_path,
                "expected a list of modules",
            ));
        };
        for m in modules {
            let kind = m["type"].as_str().unwrap_or_default();
            let sub = m["path"].as_str().unwrap_or_default();
            match kind.rsplit('.').next().unwrap_or_default() {
                "Pooling" => {
                    let path = dir.join(sub).join("config.json");
                    let Some(cfg) = read_json(&path)? else {
                        return Err(ModelError::NotFound { path });
                    };
                    st.pooler.pooling_type = pooling_mode(&path, &cfg)?;
                }
                "Normalize" => st.pooler.normalize = true,
                _ => {}
            }
        }
        let path = dir.join("sentence_bert_config.json");
        if let Some(cfg) = read_json(&path)? {
            st.max_seq_length = cfg["max_seq_length"].as_u64().map(|v| v as usize);
        }
        Ok(st)
    }
}

/// The one pooling mode a sentence-transformers `Pooling` config turns on.
fn pooling_mode(path: &Path, cfg: &serde_json::Value) -> LoadResult<PoolingType> {
    if let Some(mode) = cfg["pooling_mode"].as_str() {
        return PoolingType::parse(mode)
            .ok_or_else(|| ModelError::config(path, format!("unsupported pooling_mode {mode}")));
    }
    let on = |k: &str| cfg[k].as_bool().unwrap_or(false);
    let modes = [
        ("pooling_mode_cls_token", PoolingType::Cls),
        ("pooling_mode_mean_tokens", PoolingType::Mean),
        ("pooling_mode_max_tokens", PoolingType::Max),
        ("pooling_mode_lasttoken", PoolingType::Last),
    ];
    let chosen: Vec<PoolingType> = modes
        .iter()
        .filter(|(k, _)| on(k))
        .map(|&(_, t)| t)
        .collect();
    let unsupported = [
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
    ];
    match (chosen.as_slice(), unsupported.iter().find(|k| on(k))) {
        ([one], None) => Ok(*one),
        (_, Some(k)) => Err(ModelError::config(path, format!("{k} is not supported"))),
        _ => Err(ModelError::config(
            path,
            "exactly one of the cls / mean / max / lasttoken pooling modes must be on",
        )),
    }
}

/// A dense layer `y = x Wᵀ + b` with f32 weights `[out, in]`.
#[derive(Debug, Clone)]
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    inp: usize,
    out: usize,
}

fn load_vec(ws: &dyn WeightSource, name: &str, dims: &[usize]) -> LoadResult<Vec<f32>> {
    let t = ws.tensor(name)?;
    if t.dims() != dims {
        return Err(ModelError::Shape {
            path: ws.path().to_path_buf(),
            name: name.to_string(),
            actual: t.dims().to_vec(),
            expected: dims.to_vec(),
        });
    }
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| ModelError::candle(ws.path(), e))
}

impl Dense {
    fn load(ws: &dyn WeightSource, prefix: &str, out: usize, inp: usize) -> LoadResult<Self> {
        Ok(Self {
            w: load_vec(ws, &format!("{prefix}.weight"), &[out, inp])?,
            b: load_vec(ws, &format!("{prefix}.bias"), &[out])?,
            inp,
            out,
        })
    }

    /// `x` `[rows, in]` → `[rows, out]`, rows in parallel, four rows per pass over the weights
    /// (each dot product is computed alone, in the same order whatever the grouping).
    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inp;
        let mut y = vec![0f32; rows * self.out];
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        pool::global().for_rows_mut(&mut y, self.out, |r0, part| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above). Without FMA the lanes compute the
                // same products and sums as the baseline code: the same bits.
                unsafe { self.rows_avx2(x, r0, part) };
                return;
            }
            self.rows(x, r0, part);
        });
        y
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2(&self, x: &[f32], r0: usize, part: &mut [f32]) {
        self.rows(x, r0, part);
    }

    /// The output rows `part`, from input row `r0` on: blocks of four rows by two outputs,
    /// then what is left one by one.
    #[inline(always)]
    fn rows(&self, x: &[f32], r0: usize, part: &mut [f32]) {
        let (inp, out) = (self.inp, self.out);
        let n = part.len() / out;
        let xr = |i: usize| &x[(r0 + i) * inp..][..inp];
        let wr = |o: usize| &self.w[o * inp..][..inp];
        let mut i = 0;
        while i + 4 <= n {
            let xs = [xr(i), xr(i + 1), xr(i + 2), xr(i + 3)];
            let mut o = 0;
            while o + 2 <= out {
                let d = dots(xs, [wr(o), wr(o + 1)]);
                for (r, pair) in d.iter().enumerate() {
                    part[(i + r) * out + o] = pair[0] + self.b[o];
                    part[(i + r) * out + o + 1] = pair[1] + self.b[o + 1];
                }
                o += 2;
            }
            for o in o..out {
                for (r, v) in dots(xs, [wr(o)]).iter().enumerate() {
                    part[(i + r) * out + o] = v[0] + self.b[o];
                }
            }
            i += 4;
        }
        for i in i..n {
            for o in 0..out {
                part[i * out + o] = dots([xr(i)], [wr(o)])[0][0] + self.b[o];
            }
        }
    }
}

/// `Σ x·w` for each row of `xs` and each weight row of `ws`: eight lanes, then the lanes in
/// order, then the tail. Vectorises; one result does not depend on the other rows.
#[inline(always)]
fn dots<const R: usize, const O: usize>(xs: [&[f32]; R], ws: [&[f32]; O]) -> [[f32; O]; R] {
    let mut acc = [[[0f32; 8]; O]; R];
    let len = ws[0].len();
    let full = len / 8 * 8;
    for c in (0..full).step_by(8) {
        for (ar, x) in acc.iter_mut().zip(&xs) {
            let xc = &x[c..c + 8];
            for (a, w) in ar.iter_mut().zip(&ws) {
                let wc = &w[c..c + 8];
                for l in 0..8 {
                    a[l] += xc[l] * wc[l];
                }
            }
        }
    }
    let mut out = [[0f32; O]; R];
    for ((orow, ar), x) in out.iter_mut().zip(&acc).zip(&xs) {
        for ((o, a), w) in orow.iter_mut().zip(ar).zip(&ws) {
            let mut s = a.iter().fold(0f32, |s, v| s + v);
            for (xv, wv) in x[full..].iter().zip(&w[full..]) {
                s += xv * wv;
            }
            *o = s;
        }
    }
    out
}

/// LayerNorm with weight and bias, statistics in f64.
#[derive(Debug, Clone)]
struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f64,
}

impl LayerNorm {
    fn load(ws: &dyn WeightSource, prefix: &str, h: usize, eps: f64) -> LoadResult<Self> {
        Ok(Self {
            w: load_vec(ws, &format!("{prefix}.weight"), &[h])?,
            b: load_vec(ws, &format!("{prefix}.bias"), &[h])?,
            eps,
        })
    }

    /// Normalises the rows of `x` in place.
    fn forward(&self, x: &mut [f32]) {
        let h = self.w.len();
        pool::global().for_rows_mut(x, h, |_, part| {
            for row in part.chunks_mut(h) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
                let inv = 1.0 / (var + self.eps).sqrt();
                for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                    *v = ((*v as f64 - mean) * inv) as f32 * w + b;
                }
            }
        });
    }
}

/// One post-norm encoder layer.
#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

impl Layer {
    fn load(ws: &dyn WeightSource, p: &str, cfg: &Config) -> LoadResult<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            query: Dense::load(ws, &format!("{p}.attention.self.query"), h, h)?,
            key: Dense::load(ws, &format!("{p}.attention.self.key"), h, h)?,
            value: Dense::load(ws, &format!("{p}.attention.self.value"), h, h)?,
            attn_out: Dense::load(ws, &format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: LayerNorm::load(ws, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
            intermediate: Dense::load(ws, &format!("{p}.intermediate.dense"), i, h)?,
            output: Dense::load(ws, &format!("{p}.output.dense"), h, i)?,
            out_norm: LayerNorm::load(ws, &format!("{p}.output.LayerNorm"), h, eps)?,
        })
    }
}

/// `BertModel`.
#[derive(Debug)]
pub struct BertModel {
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    token_type_embedding: Vec<f32>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    gelu_tanh: bool,
    pooler: Pooler,
    config: ModelConfig,
}

impl BertModel {
    /// Builds the model from `cfg`, the sentence-transformers modules `st` and the weights.
    pub fn load(
        cfg: &Config,
        st: &SentenceTransformers,
        ws: &dyn WeightSource,
        architecture: &str,
    ) -> LoadResult<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if heads == 0 || !h.is_multiple_of(heads) {
            let msg = format!("hidden size {h} is not a multiple of {heads} attention heads");
            return Err(ModelError::config(ws.path(), msg));
        }
        let gelu_tanh = match cfg.hidden_act.as_str() {
            "gelu" => false,
            "gelu_new" | "gelu_pytorch_tanh" => true,
            other => {
                let msg = format!("hidden_act {other} is not supported (gelu, gelu_new)");
                return Err(ModelError::config(ws.path(), msg));
            }
        };
        let p = match ws.contains("bert.embeddings.word_embeddings.weight") {
            true => "bert.",
            false => "",
        };
        let e = format!("{p}embeddings");
        let token_types = cfg.type_vocab_size.max(1);
        let types = load_vec(
            ws,
            &format!("{e}.token_type_embeddings.weight"),
            &[token_types, h],
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(ws, &format!("{p}encoder.layer.{i}"), cfg))
            .collect::<LoadResult<Vec<_>>>()?;
        let max_len = st.max_seq_length.map_or(cfg.max_position_embeddings, |m| {
            m.min(cfg.max_position_embeddings)
        });
        let config = ModelConfig {
            architecture: architecture.to_string(),
            num_layers: cfg.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: h / heads,
            hidden_size: h,
            vocab_size: cfg.vocab_size,
            max_position_embeddings: max_len,
        };
        Ok(Self {
            word_embeddings: load_vec(
                ws,
                &format!("{e}.word_embeddings.weight"),
                &[cfg.vocab_size, h],
            )?,
            position_embeddings: load_vec(
                ws,
                &format!("{e}.position_embeddings.weight"),
                &[cfg.max_position_embeddings, h],
            )?,
            token_type_embedding: types[..h].to_vec(),
            embed_norm: LayerNorm::load(ws, &format!("{e}.LayerNorm"), h, cfg.layer_norm_eps)?,
            layers,
            gelu_tanh,
            pooler: st.pooler,
            config,
        })
    }

    /// The registry factory: config.json and the sentence-transformers files beside it.
    pub fn factory(ctx: &ModelLoadContext<'_>) -> LoadResult<Box<dyn Model>> {
        let ModelConfigSource::HfConfig { path, json } = &ctx.config else {
            return Err(ModelError::config(
                ctx.weights.path(),
                "BERT is loaded from Hugging Face safetensors only",
            ));
        };
        let cfg = parse_hf_config::<Config>(path, json)?;
        let st = SentenceTransformers::read(path.parent().unwrap_or(Path::new(".")))?;
        Ok(Box::new(Self::load(
            &cfg,
            &st,
            ctx.weights,
            ctx.architecture,
        )?))
    }

    fn gelu(&self, x: &mut [f32]) {
        let tanh = self.gelu_tanh;
        pool::global().for_rows_mut(x, 1, |_, part| {
            for v in part.iter_mut() {
                let z = *v as f64;
                let g = match tanh {
                    false => 0.5 * z * (1.0 + candle_core::cpu::erf::erf_f64(z / 2f64.sqrt())),
                    true => {
                        let c = (2.0 / std::f64::consts::PI).sqrt();
                        0.5 * z * (1.0 + (c * (z + 0.044715 * z * z * z)).tanh())
                    }
                };
                *v = g as f32;
            }
        });
    }

    /// `x = LN(x + attn(x))` for layer `idx`, attention through the paged backend.
    fn attention(
        &self,
        idx: usize,
        layer: &Layer,
        x: &mut [f32],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<()> {
        let c = &self.config;
        let t = x.len() / c.hidden_size;
        let shape = (t, c.num_heads, c.head_dim);
        let dev = Device::Cpu;
        let q = Tensor::from_vec(layer.query.forward(x), shape, &dev)?;
        let k = Tensor::from_vec(layer.key.forward(x), shape, &dev)?;
        let v = Tensor::from_vec(layer.value.forward(x), shape, &dev)?;
        let Some(attn) = ctx.attn_layers.get_mut(idx) else {
            bail!("no attention layer {idx} in the forward context");
        };
        let out = attn.forward(&q, &k, &v, ctx.attn_metadata)?;
        let out: Vec<f32> = out.flatten_all()?.to_vec1()?;
        if out.len() != x.len() {
            bail!(
                "attention returned {} values, expected {}",
                out.len(),
                x.len()
            );
        }
        let proj = layer.attn_out.forward(&out);
        x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
        layer.attn_norm.forward(x);
        Ok(())
    }
}

impl Model for BertModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward_hidden_states(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        crate::layers::check_batch(input_ids, positions)?;
        let h = self.config.hidden_size;
        let vocab = self.word_embeddings.len() / h;
        let max_pos = self.position_embeddings.len() / h;
        let mut x = Vec::with_capacity(input_ids.len() * h);
        for (&id, &pos) in input_ids.iter().zip(positions) {
            if id as usize >= vocab {
                bail!("token id {id} is out of the vocabulary ({vocab})");
            }
            if pos >= max_pos {
                bail!("position {pos} is beyond the {max_pos} position embeddings");
            }
            let w = &self.word_embeddings[id as usize * h..][..h];
            let p = &self.position_embeddings[pos * h..][..h];
            x.extend(
                w.iter()
                    .zip(p)
                    .zip(&self.token_type_embedding)
                    .map(|((a, b), c)| a + b + c),
            );
        }
        self.embed_norm.forward(&mut x);
        for (i, layer) in self.layers.iter().enumerate() {
            self.attention(i, layer, &mut x, ctx)?;
            let mut inter = layer.intermediate.forward(&x);
            self.gelu(&mut inter);
            let out = layer.output.forward(&inter);
            x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
            layer.out_norm.forward(&mut x);
        }
        Tensor::from_vec(x, (input_ids.len(), h), &Device::Cpu)
    }

    fn pooler(&self) -> Option<Pooler> {
        Some(self.pooler)
    }

    fn is_generative(&self) -> bool {
        false
    }

    fn attn_type(&self, _layer: usize) -> AttentionType {
        AttentionType::EncoderOnly
    }
}
