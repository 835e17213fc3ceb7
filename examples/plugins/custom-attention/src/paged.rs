//! A plain paged attention (the same algorithm as Trellis's `CPU_REFERENCE`): an f32 KV cache
//! per layer, `[num_blocks * block_size, num_kv_heads, head_dim]`; a forward writes the step's
//! keys and values into their slots, then computes, for every new token, a softmax over its
//! own sequence's cached keys gathered through the block table.

use candle_core::{DType, Device, Result, Tensor, bail};
use trellis_plugin::{AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec};

/// One layer's attention with its K and V caches.
pub struct PagedAttention {
    name: &'static str,
    shape: AttentionShape,
    block_size: usize,
    num_slots: usize,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

impl PagedAttention {
    /// Allocates the caches `spec` describes; `name` is the backend's, for error messages.
    pub fn new(
        name: &'static str,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Self> {
        if !device.is_cpu() {
            bail!("{name}: runs on the CPU only, got {device:?}");
        }
        if spec.dtype != DType::F32 || spec.block_size == 0 {
            bail!("{name}: needs an f32 cache and a positive block size, got {spec:?}");
        }
        if shape.num_kv_heads == 0 || !shape.num_heads.is_multiple_of(shape.num_kv_heads) {
            bail!("{name}: query heads must be a multiple of KV heads: {shape:?}");
        }
        let num_slots = spec.num_blocks * spec.block_size;
        let len = num_slots * spec.num_kv_heads * spec.head_dim;
        Ok(Self {
            name,
            shape,
            block_size: spec.block_size,
            num_slots,
            k_cache: vec![0.0; len],
            v_cache: vec![0.0; len],
        })
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl AttentionImpl for PagedAttention {
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor> {
        let name = self.name;
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = self.shape;
        let num_tokens = metadata.num_tokens();
        let (q, k, v) = (flat(query)?, flat(key)?, flat(value)?);
        if q.len() != num_tokens * num_heads * head_dim
            || k.len() != num_tokens * num_kv_heads * head_dim
            || v.len() != k.len()
        {
            bail!("{name}: q/k/v shapes do not match {num_tokens} tokens");
        }
        if metadata.block_size != self.block_size {
            bail!(
                "{name}: block size {} != {}",
                metadata.block_size,
                self.block_size
            );
        }
        // 1. Every new key and value into its slot.
        let row = num_kv_heads * head_dim;
        for (t, &slot) in metadata.slot_mapping.iter().enumerate() {
            if slot >= self.num_slots {
                bail!("{name}: slot {slot} out of range");
            }
            self.k_cache[slot * row..][..row].copy_from_slice(&k[t * row..][..row]);
            self.v_cache[slot * row..][..row].copy_from_slice(&v[t * row..][..row]);
        }
        // 2. Causal attention of every new token over its own sequence.
        let group = num_heads / num_kv_heads;
        let mut out = vec![0f32; num_tokens * num_heads * head_dim];
        let mut scores = Vec::new();
        for seq in &metadata.seqs {
            if seq.query_start + seq.query_len > num_tokens
                || seq.query_len > seq.context_len
                || seq.block_table.len() * self.block_size < seq.context_len
            {
                bail!("{name}: inconsistent sequence metadata {seq:?}");
            }
            let slots: Vec<usize> = (0..seq.context_len)
                .map(|pos| {
                    seq.block_table[pos / self.block_size] as usize * self.block_size
                        + pos % self.block_size
                })
                .collect();
            if slots.iter().any(|&s| s >= self.num_slots) {
                bail!("{name}: block table out of range");
            }
            let first = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                let t = seq.query_start + i;
                let visible = &slots[..first + i + 1];
                for h in 0..num_heads {
                    let kv = (h / group) * head_dim;
                    let q_row = &q[(t * num_heads + h) * head_dim..][..head_dim];
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for &slot in visible {
                        let k_row = &self.k_cache[slot * row + kv..][..head_dim];
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
                        let v_row = &self.v_cache[slot * row + kv..][..head_dim];
                        for (o, x) in o_row.iter_mut().zip(v_row) {
                            *o += w * x;
                        }
                    }
                    // Scaled by the reciprocal, as CPU_REFERENCE does: the same bits.
                    let inv = 1.0 / sum;
                    o_row.iter_mut().for_each(|o| *o *= inv);
                }
            }
        }
        Tensor::from_vec(out, (num_tokens, num_heads, head_dim), query.device())
    }
}
