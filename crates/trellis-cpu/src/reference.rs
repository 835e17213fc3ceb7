//! `CPU_REFERENCE`: paged attention in plain loops over `f32` slices.
//!
//! Correctness first, but not wasteful: tensors are turned into flat `Vec<f32>` once per call,
//! every sequence's slots are resolved once, and the output is built with one
//! `Tensor::from_vec`. Scores and the softmax are computed in f32 with the running maximum
//! subtracted.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, bail};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, AttentionType, KvCacheSpec,
};

/// The registry name of this backend.
pub const CPU_REFERENCE: &str = "CPU_REFERENCE";

/// The `CPU_REFERENCE` attention backend: f32 KV cache, any head size and block size.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuReferenceBackend;

/// Returns the `CPU_REFERENCE` backend as a shareable trait object.
pub fn cpu_reference_backend() -> Arc<dyn AttentionBackend> {
    Arc::new(CpuReferenceBackend)
}

impl AttentionBackend for CpuReferenceBackend {
    fn name(&self) -> &str {
        CPU_REFERENCE
    }

    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        Ok(Box::new(CpuReferenceAttention::new(spec, shape, device)?))
    }

    fn supports_attn_type(&self, attn_type: AttentionType) -> bool {
        matches!(
            attn_type,
            AttentionType::Decoder | AttentionType::EncoderOnly
        )
    }

    fn new_layer_of_type(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        attn_type: AttentionType,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        let mut layer = CpuReferenceAttention::new(spec, shape, device)?;
        layer.causal = attn_type == AttentionType::Decoder;
        Ok(Box::new(layer))
    }
}

/// One layer of `CPU_REFERENCE` attention with its K and V caches.
#[derive(Debug, Clone)]
pub struct CpuReferenceAttention {
    shape: AttentionShape,
    /// Causal (decoder) or not (encoder-only: every token sees its whole sequence).
    causal: bool,
    block_size: usize,
    num_slots: usize,
    /// `[num_slots, num_kv_heads, head_dim]`.
    k_cache: Vec<f32>,
    /// `[num_slots, num_kv_heads, head_dim]`.
    v_cache: Vec<f32>,
}

impl CpuReferenceAttention {
    /// Allocates the zeroed K and V caches described by `spec` for a layer of shape `shape`.
    pub fn new(spec: &KvCacheSpec, shape: AttentionShape, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            bail!("{CPU_REFERENCE}: runs on the CPU only, got device {device:?}");
        }
        if spec.dtype != DType::F32 {
            bail!(
                "{CPU_REFERENCE}: KV cache dtype must be f32, got {:?}",
                spec.dtype
            );
        }
        if spec.block_size == 0 {
            bail!("{CPU_REFERENCE}: block size must be positive");
        }
        if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            bail!(
                "{CPU_REFERENCE}: {} query heads are not a multiple of {} KV heads",
                shape.num_heads,
                shape.num_kv_heads
            );
        }
        if spec.num_kv_heads != shape.num_kv_heads || spec.head_dim != shape.head_dim {
            bail!(
                "{CPU_REFERENCE}: KV cache spec {spec:?} does not match attention shape {shape:?}"
            );
        }
        let num_slots = spec.num_blocks * spec.block_size;
        let len = num_slots * spec.num_kv_heads * spec.head_dim;
        Ok(Self {
            shape,
            causal: true,
            block_size: spec.block_size,
            num_slots,
            k_cache: vec![0.0; len],
            v_cache: vec![0.0; len],
        })
    }
}

/// Flat f32 contents of `t`, checked against the expected `[tokens, heads, head_dim]` shape.
fn flat(t: &Tensor, what: &str, dims: [usize; 3]) -> Result<Vec<f32>> {
    if t.dims() != dims {
        bail!(
            "{CPU_REFERENCE}: {what} has shape {:?}, expected {dims:?}",
            t.dims()
        );
    }
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl AttentionImpl for CpuReferenceAttention {
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor> {
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = self.shape;
        let num_tokens = metadata.num_tokens();
        let q = flat(query, "query", [num_tokens, num_heads, head_dim])?;
        let k = flat(key, "key", [num_tokens, num_kv_heads, head_dim])?;
        let v = flat(value, "value", [num_tokens, num_kv_heads, head_dim])?;
        if metadata.block_size != self.block_size {
            bail!(
                "{CPU_REFERENCE}: metadata block size {} != cache block size {}",
                metadata.block_size,
                self.block_size
            );
        }

        // 1. Write every new key and value into its slot.
        let row = num_kv_heads * head_dim;
        for (t, &slot) in metadata.slot_mapping.iter().enumerate() {
            if slot >= self.num_slots {
                bail!(
                    "{CPU_REFERENCE}: slot {slot} out of range ({} slots)",
                    self.num_slots
                );
            }
            self.k_cache[slot * row..(slot + 1) * row].copy_from_slice(&k[t * row..(t + 1) * row]);
            self.v_cache[slot * row..(slot + 1) * row].copy_from_slice(&v[t * row..(t + 1) * row]);
        }

        // 2. Attention of every new token over its own sequence (causal unless encoder-only).
        let group = num_heads / num_kv_heads;
        let mut out = vec![0f32; num_tokens * num_heads * head_dim];
        let mut slots = Vec::new();
        let mut scores = Vec::new();
        for seq in &metadata.seqs {
            let end = seq.query_start + seq.query_len;
            if end > num_tokens || seq.query_len > seq.context_len {
                bail!(
                    "{CPU_REFERENCE}: sequence {seq:?} does not fit a batch of {num_tokens} tokens"
                );
            }
            if seq.block_table.len() * self.block_size < seq.context_len {
                bail!(
                    "{CPU_REFERENCE}: block table of {} blocks is too short for {} tokens",
                    seq.block_table.len(),
                    seq.context_len
                );
            }
            slots.clear();
            for pos in 0..seq.context_len {
                let slot = seq.block_table[pos / self.block_size] as usize * self.block_size
                    + pos % self.block_size;
                if slot >= self.num_slots {
                    bail!(
                        "{CPU_REFERENCE}: slot {slot} out of range ({} slots)",
                        self.num_slots
                    );
                }
                slots.push(slot);
            }
            let first_pos = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                let t = seq.query_start + i;
                let visible = match self.causal {
                    true => &slots[..first_pos + i + 1],
                    false => &slots[..],
                };
                for h in 0..num_heads {
                    let kv_off = (h / group) * head_dim;
                    let q_row = &q[(t * num_heads + h) * head_dim..][..head_dim];
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for &slot in visible {
                        let k_row = &self.k_cache[slot * row + kv_off..][..head_dim];
                        let s = q_row.iter().zip(k_row).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(s);
                        scores.push(s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o_row = &mut out[(t * num_heads + h) * head_dim..][..head_dim];
                    for (&slot, &w) in visible.iter().zip(&scores) {
                        let v_row = &self.v_cache[slot * row + kv_off..][..head_dim];
                        for (o, x) in o_row.iter_mut().zip(v_row) {
                            *o += w * x;
                        }
                    }
                    let inv = 1.0 / sum;
                    o_row.iter_mut().for_each(|o| *o *= inv);
                }
            }
        }
        Tensor::from_vec(out, (num_tokens, num_heads, head_dim), query.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_plugin::SeqAttentionMetadata;

    /// A small deterministic generator (xorshift) for test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    /// Dense causal attention of the queries at positions `start..start+n` over `k`/`v` history.
    fn naive(q: &[f32], k: &[f32], v: &[f32], start: usize, shape: AttentionShape) -> Vec<f32> {
        let AttentionShape {
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            scale,
        } = shape;
        let n = q.len() / (h * d);
        let mut out = vec![0f32; q.len()];
        for i in 0..n {
            let p = start + i;
            for hh in 0..h {
                let kh = hh / (h / hkv);
                let s: Vec<f64> = (0..=p)
                    .map(|j| {
                        (0..d)
                            .map(|x| (q[(i * h + hh) * d + x] * k[(j * hkv + kh) * d + x]) as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let acc: f64 = (0..=p)
                        .map(|j| e[j] * v[(j * hkv + kh) * d + x] as f64)
                        .sum();
                    out[(i * h + hh) * d + x] = (acc / z) as f32;
                }
            }
        }
        out
    }

    struct Seq {
        table: Vec<u32>,
        k: Vec<f32>,
        v: Vec<f32>,
        q: Vec<f32>,
        /// Tokens per step (0 = not scheduled in that step).
        steps: Vec<usize>,
    }

    #[test]
    fn matches_dense_causal_attention() -> Result<()> {
        let shape = AttentionShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 8,
            scale: 1.0 / 8f32.sqrt(),
        };
        let bs = 4;
        let spec = KvCacheSpec {
            num_blocks: 16,
            block_size: bs,
            num_kv_heads: 2,
            head_dim: 8,
            dtype: DType::F32,
        };
        let mut layer = CpuReferenceBackend.new_layer(&spec, shape, &Device::Cpu)?;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (h, hkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        // Out-of-order block tables; chunked prefills; decode steps mixed with prefill chunks.
        let mut seqs = [
            (vec![7u32, 2, 11, 0], vec![5usize, 4, 1, 1, 1]),
            (vec![3, 14, 9], vec![9, 0, 1, 1, 1]),
            (vec![15, 1, 5, 6], vec![0, 3, 6, 1, 1]),
            (vec![12], vec![1, 1, 1, 0, 1]),
        ]
        .into_iter()
        .map(|(table, steps)| {
            let n: usize = steps.iter().sum();
            Seq {
                table,
                k: rng.vec(n * hkv * d),
                v: rng.vec(n * hkv * d),
                q: rng.vec(n * h * d),
                steps,
            }
        })
        .collect::<Vec<_>>();
        for step in 0..5 {
            let mut meta = AttentionMetadata {
                block_size: bs,
                ..Default::default()
            };
            let (mut q, mut k, mut v, mut expected) = (vec![], vec![], vec![], vec![]);
            for s in seqs.iter_mut() {
                let n = s.steps[step];
                if n == 0 {
                    continue;
                }
                let done: usize = s.steps[..step].iter().sum();
                let ctx = done + n;
                meta.seqs.push(SeqAttentionMetadata {
                    query_start: meta.slot_mapping.len(),
                    query_len: n,
                    context_len: ctx,
                    block_table: s.table.clone(),
                });
                for p in done..ctx {
                    meta.slot_mapping
                        .push(s.table[p / bs] as usize * bs + p % bs);
                }
                let qs = &s.q[done * h * d..ctx * h * d];
                q.extend_from_slice(qs);
                k.extend_from_slice(&s.k[done * hkv * d..ctx * hkv * d]);
                v.extend_from_slice(&s.v[done * hkv * d..ctx * hkv * d]);
                expected.extend(naive(
                    qs,
                    &s.k[..ctx * hkv * d],
                    &s.v[..ctx * hkv * d],
                    done,
                    shape,
                ));
            }
            let t = meta.num_tokens();
            let out = layer.forward(
                &Tensor::from_vec(q, (t, h, d), &Device::Cpu)?,
                &Tensor::from_vec(k, (t, hkv, d), &Device::Cpu)?,
                &Tensor::from_vec(v, (t, hkv, d), &Device::Cpu)?,
                &meta,
            )?;
            assert_eq!(out.dims(), [t, h, d]);
            let got = out.flatten_all()?.to_vec1::<f32>()?;
            let max_err = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max_err < 1e-5, "step {step}: max error {max_err}");
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_inputs() -> Result<()> {
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
        };
        let spec = KvCacheSpec {
            num_blocks: 2,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        };
        let f16 = KvCacheSpec {
            dtype: DType::F16,
            ..spec.clone()
        };
        assert!(
            CpuReferenceBackend
                .new_layer(&f16, shape, &Device::Cpu)
                .is_err()
        );
        let mut layer = CpuReferenceBackend.new_layer(&spec, shape, &Device::Cpu)?;
        let meta = AttentionMetadata {
            block_size: 2,
            slot_mapping: vec![4],
            seqs: vec![SeqAttentionMetadata {
                query_start: 0,
                query_len: 1,
                context_len: 1,
                block_table: vec![2],
            }],
        };
        let q = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu)?;
        let kv = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu)?;
        assert!(layer.forward(&q, &kv, &kv, &meta).is_err());
        Ok(())
    }
}
