//! Test helpers: a tiny paged runner over CPU_REFERENCE, tiny random models written as HF
//! safetensors or GGUF, and a plain unpaged reference forward on dense HF-order weights.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use trellis_plugin::{
    AttentionImpl, AttentionMetadata, ForwardContext, KvCacheSpec, Model, SeqAttentionMetadata,
};

/// A small deterministic generator (xorshift) for test data.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0) * n as f32) as usize % n
    }
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// One sequence in the paged runner.
#[derive(Debug, Default, Clone)]
pub struct SeqState {
    pub block_table: Vec<u32>,
    pub len: usize,
}

/// Owns one CPU_REFERENCE attention layer per model layer and a scrambled free-block list.
pub struct PagedRunner {
    pub layers: Vec<Box<dyn AttentionImpl>>,
    pub block_size: usize,
    free: Vec<u32>,
    /// Adapter slots; when set, every token row runs with slot `lora_slot`.
    pub lora: Option<(trellis_plugin::LoraSlotPool, u32)>,
}

impl PagedRunner {
    pub fn new(model: &dyn Model, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::with_dtype(model, num_blocks, block_size, DType::F32)
    }

    pub fn with_dtype(
        model: &dyn Model,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
    ) -> Result<Self> {
        let backend = trellis_cpu::cpu_reference_backend();
        Self::with_backend(model, num_blocks, block_size, dtype, backend)
    }

    /// A runner on any attention backend.
    pub fn with_backend(
        model: &dyn Model,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        backend: std::sync::Arc<dyn trellis_plugin::AttentionBackend>,
    ) -> Result<Self> {
        let c = model.config();
        let spec = KvCacheSpec {
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            dtype,
        };
        let shape = trellis_plugin::AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        };
        let layers = (0..c.num_layers)
            .map(|_| backend.new_layer(&spec, shape, &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Hand out blocks out of order: 0, n-1, 1, n-2, ...
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.sort_by_key(|&b| {
            if b % 2 == 0 {
                b
            } else {
                num_blocks as u32 * 2 - b
            }
        });
        free.reverse();
        Ok(Self {
            layers,
            block_size,
            free,
            lora: None,
        })
    }

    /// Runs one step: each `(seq, new_tokens)` appends its tokens; returns the logits of every
    /// new token (`want_all`) or only of each sequence's last new token, per sequence.
    pub fn step(
        &mut self,
        model: &dyn Model,
        work: &mut [(&mut SeqState, &[u32])],
        want_all: bool,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut meta = AttentionMetadata {
            block_size: self.block_size,
            ..Default::default()
        };
        let (mut ids, mut positions, mut rows, mut per_seq) = (vec![], vec![], vec![], vec![]);
        for (seq, toks) in work.iter_mut() {
            let start = seq.len;
            let end = start + toks.len();
            while seq.block_table.len() * self.block_size < end {
                seq.block_table.push(
                    self.free
                        .pop()
                        .ok_or_else(|| anyhow::anyhow!("out of blocks"))?,
                );
            }
            let q0 = ids.len();
            for (i, &t) in toks.iter().enumerate() {
                let p = start + i;
                ids.push(t);
                positions.push(p);
                meta.slot_mapping.push(
                    seq.block_table[p / self.block_size] as usize * self.block_size
                        + p % self.block_size,
                );
            }
            meta.seqs.push(SeqAttentionMetadata {
                query_start: q0,
                query_len: toks.len(),
                context_len: end,
                block_table: seq.block_table.clone(),
            });
            let wanted: Vec<usize> = if want_all {
                (q0..ids.len()).collect()
            } else {
                vec![ids.len() - 1]
            };
            per_seq.push(wanted.len());
            rows.extend(wanted);
            seq.len = end;
        }
        let slots = vec![self.lora.as_ref().map_or(0, |l| l.1); ids.len()];
        let lora = self
            .lora
            .as_ref()
            .map(|(pool, _)| trellis_plugin::LoraMapping {
                pool,
                token_slots: &slots,
            });
        let mut ctx = ForwardContext {
            attn_metadata: &meta,
            attn_layers: &mut self.layers,
            logits_indices: &rows,
            lora,
        };
        let logits = model.forward(&ids, &positions, &mut ctx)?;
        assert_eq!(logits.dims(), [rows.len(), model.config().vocab_size]);
        let mut all = logits.to_vec2::<f32>()?.into_iter();
        Ok(per_seq
            .iter()
            .map(|&n| all.by_ref().take(n).collect())
            .collect())
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Hyper-parameters of a tiny random model.
#[derive(Debug, Clone)]
pub struct Tiny {
    pub arch: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub inter: usize,
    pub theta: f64,
    pub tie: bool,
    pub qkv_bias: bool,
    /// `llama3` rope scaling (factor, low, high, original context).
    pub llama3: Option<(f64, f64, f64, usize)>,
}

impl Tiny {
    /// Two layers of width 32, four heads over two KV heads.
    pub fn small(arch: &'static str) -> Tiny {
        Tiny {
            arch,
            vocab: 97,
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            inter: 48,
            theta: 10_000.0,
            tie: false,
            qkv_bias: false,
            llama3: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Random weights in HF names and row order.
    pub fn weights(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut r = Rng(seed);
        let (h, d) = (self.hidden, self.head_dim());
        let mut w = HashMap::new();
        let s_in = |n: usize| 1.0 / (n as f32).sqrt();
        w.insert(
            "model.embed_tokens.weight".into(),
            r.tensor(&[self.vocab, h], 1.0),
        );
        w.insert(
            "model.norm.weight".into(),
            r.tensor(&[h], 0.2).affine(1.0, 1.0).unwrap(),
        );
        if !self.tie {
            w.insert("lm_head.weight".into(), r.tensor(&[self.vocab, h], s_in(h)));
        }
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            w.insert(
                format!("{p}.input_layernorm.weight"),
                r.tensor(&[h], 0.2).affine(1.0, 1.0).unwrap(),
            );
            w.insert(
                format!("{p}.post_attention_layernorm.weight"),
                r.tensor(&[h], 0.2).affine(1.0, 1.0).unwrap(),
            );
            for (n, out) in [
                ("q", self.heads * d),
                ("k", self.kv_heads * d),
                ("v", self.kv_heads * d),
            ] {
                w.insert(
                    format!("{p}.self_attn.{n}_proj.weight"),
                    r.tensor(&[out, h], 2.0 * s_in(h)),
                );
                if self.qkv_bias {
                    w.insert(
                        format!("{p}.self_attn.{n}_proj.bias"),
                        r.tensor(&[out], 0.5),
                    );
                }
            }
            w.insert(
                format!("{p}.self_attn.o_proj.weight"),
                r.tensor(&[h, self.heads * d], s_in(h)),
            );
            w.insert(
                format!("{p}.mlp.gate_proj.weight"),
                r.tensor(&[self.inter, h], s_in(h)),
            );
            w.insert(
                format!("{p}.mlp.up_proj.weight"),
                r.tensor(&[self.inter, h], s_in(h)),
            );
            w.insert(
                format!("{p}.mlp.down_proj.weight"),
                r.tensor(&[h, self.inter], s_in(self.inter)),
            );
        }
        w
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [self.arch],
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.theta,
            "max_position_embeddings": 256,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tie,
        });
        if let Some((factor, low, high, orig)) = self.llama3 {
            c["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": orig,
            });
        }
        c
    }

    /// Writes an HF directory; `shards > 1` writes `model.safetensors.index.json` too.
    pub fn write_hf(&self, dir: &Path, w: &HashMap<String, Tensor>, shards: usize) -> Result<()> {
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json())?,
        )?;
        if shards <= 1 {
            candle_core::safetensors::save(w, dir.join("model.safetensors"))?;
            return Ok(());
        }
        let mut names: Vec<&String> = w.keys().collect();
        names.sort();
        let mut map = serde_json::Map::new();
        for s in 0..shards {
            let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
            let part: HashMap<String, Tensor> = names
                .iter()
                .skip(s)
                .step_by(shards)
                .map(|n| ((*n).clone(), w[*n].clone()))
                .collect();
            for n in part.keys() {
                map.insert(n.clone(), serde_json::Value::String(file.clone()));
            }
            candle_core::safetensors::save(&part, dir.join(&file))?;
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string(&index)?,
        )?;
        Ok(())
    }

    /// Writes a llama GGUF (f32 tensors, q/k rows permuted like llama.cpp's converter).
    pub fn write_gguf(&self, path: &Path, w: &HashMap<String, Tensor>) -> Result<()> {
        let permute = |t: &Tensor, n: usize| -> Result<Tensor> {
            let (rows, cols) = t.dims2()?;
            Ok(t.reshape((n, 2, rows / n / 2, cols))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((rows, cols))?)
        };
        let mut tensors = vec![];
        for (name, t) in w {
            let t = if name.ends_with("q_proj.weight") {
                permute(t, self.heads)?
            } else if name.ends_with("k_proj.weight") {
                permute(t, self.kv_heads)?
            } else {
                t.clone()
            };
            tensors.push((
                trellis_models::gguf::gguf_name(name),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
        let u = |v: usize| Value::U32(v as u32);
        let meta: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", u(self.layers)),
            ("llama.embedding_length", u(self.hidden)),
            ("llama.attention.head_count", u(self.heads)),
            ("llama.attention.head_count_kv", u(self.kv_heads)),
            ("llama.rope.freq_base", Value::F32(self.theta as f32)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.context_length", u(256)),
            ("llama.feed_forward_length", u(self.inter)),
            ("llama.rope.dimension_count", u(self.head_dim())),
        ];
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &meta_refs, &t_refs)?;
        Ok(())
    }

    fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim();
        let mut f: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some((factor, low, high, orig)) = self.llama3 {
            let orig = orig as f64;
            for x in f.iter_mut() {
                let wl = 2.0 * std::f64::consts::PI / *x;
                if wl > orig / low {
                    *x /= factor;
                } else if wl >= orig / high {
                    let s = (orig / wl - low) / (high - low);
                    *x = (1.0 - s) * *x / factor + s * *x;
                }
            }
        }
        f
    }

    /// Plain unpaged forward of one whole sequence on dense HF weights: logits of every position.
    pub fn reference_logits(
        &self,
        w: &HashMap<String, Tensor>,
        ids: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        let (n, h, d, nh, nkv) = (
            ids.len(),
            self.hidden,
            self.head_dim(),
            self.heads,
            self.kv_heads,
        );
        let lin = |x: &Tensor, name: &str| -> Result<Tensor> {
            let y = x.matmul(&w[&format!("{name}.weight")].t()?)?;
            Ok(match w.get(&format!("{name}.bias")) {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        let norm = |x: &Tensor, name: &str| -> Result<Tensor> {
            let ms = x.sqr()?.mean_keepdim(1)?;
            Ok(x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?
                .broadcast_mul(&w[name])?)
        };
        let inv = self.inv_freq();
        let rope = |x: Vec<f32>, heads: usize| -> Vec<f32> {
            let mut x = x;
            for p in 0..n {
                for hh in 0..heads {
                    let o = (p * heads + hh) * d;
                    for i in 0..d / 2 {
                        let (c, s) = (
                            (p as f64 * inv[i]).cos() as f32,
                            (p as f64 * inv[i]).sin() as f32,
                        );
                        let (a, b) = (x[o + i], x[o + i + d / 2]);
                        x[o + i] = a * c - b * s;
                        x[o + i + d / 2] = a * s + b * c;
                    }
                }
            }
            x
        };
        let idx = Tensor::new(ids, &Device::Cpu)?;
        let mut x = w["model.embed_tokens.weight"].index_select(&idx, 0)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let xn = norm(&x, &format!("{p}.input_layernorm.weight"))?;
            let q = rope(
                lin(&xn, &format!("{p}.self_attn.q_proj"))?
                    .flatten_all()?
                    .to_vec1()?,
                nh,
            );
            let k = rope(
                lin(&xn, &format!("{p}.self_attn.k_proj"))?
                    .flatten_all()?
                    .to_vec1()?,
                nkv,
            );
            let v: Vec<f32> = lin(&xn, &format!("{p}.self_attn.v_proj"))?
                .flatten_all()?
                .to_vec1()?;
            let mut att = vec![0f32; n * nh * d];
            for i in 0..n {
                for hh in 0..nh {
                    let kh = hh / (nh / nkv);
                    let s: Vec<f32> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|e| q[(i * nh + hh) * d + e] * k[(j * nkv + kh) * d + e])
                                .sum::<f32>()
                                / (d as f32).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for c in 0..d {
                        att[(i * nh + hh) * d + c] = (0..=i)
                            .map(|j| e[j] * v[(j * nkv + kh) * d + c])
                            .sum::<f32>()
                            / z;
                    }
                }
            }
            let att = Tensor::from_vec(att, (n, nh * d), &Device::Cpu)?;
            x = (x + lin(&att, &format!("{p}.self_attn.o_proj"))?)?;
            let xn = norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
            let g = lin(&xn, &format!("{p}.mlp.gate_proj"))?;
            let g = (&g
                * candle_core::Tensor::ones_like(&g)?.broadcast_div(&(g.neg()?.exp()? + 1.0)?)?)?;
            x = (&x
                + lin(
                    &(g * lin(&xn, &format!("{p}.mlp.up_proj"))?)?,
                    &format!("{p}.mlp.down_proj"),
                )?)?;
        }
        let head = if self.tie {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let _ = h;
        Ok(lin(&norm(&x, "model.norm.weight")?, head)?.to_vec2()?)
    }
}
