//! The lean step: decoder layers over flat `f32` buffers that live from step to step.
//!
//! One [`StepScratch`] per model holds every intermediate buffer (hidden state, normed input,
//! quantized activations, q/k/v, MLP) and only grows, to the largest batch seen; a layer's
//! input is quantized once and shared by the products that read it (q/k/v are one stacked
//! product, gate/up another); RoPE runs in place on the q/k part of the stacked output; SiLU
//! and the `up` product are fused into one pass. Tensors appear only where the plugin API
//! wants them: at the attention backend's boundary and for the logits.

use std::sync::Mutex;

use candle_core::{DType, Module, Result, Tensor, bail};
use trellis_kernels::quant::{QActs, QMatrix};
use trellis_plugin::ForwardContext;

use super::{Attention, DecoderLayer, Embedding, Linear, Mlp, RmsNorm, Rope, RotaryEmbedding, Weight};

/// The buffers of one step, reused by the next.
#[derive(Debug, Default)]
pub struct StepScratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    acts: QActs,
    qkv: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// Rows of one input that several linears read: quantized on first use, then shared.
struct Input<'a> {
    x: &'a [f32],
    k: usize,
    quantized: bool,
}

impl Input<'_> {
    fn rows(&self) -> usize {
        self.x.len() / self.k
    }
}

/// `out = x Wᵀ (+ b)` for the rows of `inp`.
fn linear_into(lin: &Linear, inp: &mut Input<'_>, acts: &mut QActs, out: &mut Vec<f32>) -> Result<()> {
    let rows = inp.rows();
    match &lin.weight {
        Weight::Packed(w) => {
            if !inp.quantized {
                acts.quantize(inp.x, inp.k);
                inp.quantized = true;
            }
            out.resize(rows * w.out_features(), 0.0);
            w.matmul(acts, out);
        }
        Weight::Candle(w) => {
            let x = Tensor::from_slice(inp.x, (rows, inp.k), &candle_core::Device::Cpu)?;
            let y = w.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?;
            out.clear();
            out.extend_from_slice(&y.to_vec1::<f32>()?);
        }
    }
    if let Some(b) = &lin.bias {
        let b = b.to_vec1::<f32>()?;
        for row in out.chunks_mut(b.len()) {
            row.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
        }
    }
    Ok(())
}

/// [`Linear::forward`] on a packed weight.
pub(super) fn packed_forward(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("quantized matmul: a scalar input");
    };
    if k != w.in_features() {
        bail!("quantized matmul: input has {k} features, the weight {}", w.in_features());
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut acts = QActs::new();
    acts.quantize(&xs, k);
    let mut out = vec![0f32; acts.rows() * w.out_features()];
    w.matmul(&acts, &mut out);
    let mut out_dims = lead.to_vec();
    out_dims.push(w.out_features());
    Tensor::from_vec(out, out_dims, x.device())
}

/// Stacks packed linears that read the same input (`None` unless all are packed alike and
/// none has a bias).
pub(super) fn stack(parts: &[&Linear]) -> Option<QMatrix> {
    let packed: Option<Vec<&QMatrix>> = parts
        .iter()
        .map(|l| match (&l.weight, &l.bias) {
            (Weight::Packed(w), None) => Some(w),
            _ => None,
        })
        .collect();
    QMatrix::concat(&packed?)
}

fn stacked_into(w: &QMatrix, inp: &mut Input<'_>, acts: &mut QActs, out: &mut Vec<f32>) {
    if !inp.quantized {
        acts.quantize(inp.x, inp.k);
        inp.quantized = true;
    }
    out.resize(inp.rows() * w.out_features(), 0.0);
    w.matmul(acts, out);
}

impl RmsNorm {
    /// Normalises the rows of `x` into `out`.
    fn forward_into(&self, x: &[f32], out: &mut Vec<f32>) {
        let n = self.weight.len();
        out.clear();
        out.extend_from_slice(x);
        for row in out.chunks_mut(n) {
            let ss: f64 = row.iter().map(|&v| (v * v) as f64).sum();
            let scale = 1.0 / ((ss / n as f64) as f32 + self.eps as f32).sqrt();
            for (v, w) in row.iter_mut().zip(&self.weight) {
                *v = (*v * scale) * w;
            }
        }
    }
}

impl Attention {
    /// `x += o_proj(attention(q, k, v))` for `normed` = the layer's normed input.
    fn forward_step(&self, s: &mut StepScratch, rope: &Rope, ctx: &mut ForwardContext<'_>) -> Result<()> {
        let h = self.cfg.hidden_size;
        let t = s.normed.len() / h;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let (nq, nk) = (nh * d, nkv * d);
        let w = nq + 2 * nk;
        let mut inp = Input { x: &s.normed, k: h, quantized: false };
        match &self.qkv {
            Some(qkv) => stacked_into(qkv, &mut inp, &mut s.acts, &mut s.qkv),
            None => {
                // Three products, interleaved into the stacked layout.
                s.qkv.resize(t * w, 0.0);
                for (lin, off, len) in [(&self.q_proj, 0, nq), (&self.k_proj, nq, nk), (&self.v_proj, nq + nk, nk)] {
                    linear_into(lin, &mut inp, &mut s.acts, &mut s.proj)?;
                    for (row, src) in s.qkv.chunks_mut(w).zip(s.proj.chunks(len)) {
                        row[off..off + len].copy_from_slice(src);
                    }
                }
            }
        }
        rope.apply_rows(&mut s.qkv, w, 0, nh, d)?;
        rope.apply_rows(&mut s.qkv, w, nq, nkv, d)?;
        let gather = |off: usize, len: usize| -> Vec<f32> {
            let mut v = Vec::with_capacity(t * len);
            for row in s.qkv.chunks(w) {
                v.extend_from_slice(&row[off..off + len]);
            }
            v
        };
        let dev = candle_core::Device::Cpu;
        let q = Tensor::from_vec(gather(0, nq), (t, nh, d), &dev)?;
        let k = Tensor::from_vec(gather(nq, nk), (t, nkv, d), &dev)?;
        let v = Tensor::from_vec(gather(nq + nk, nk), (t, nkv, d), &dev)?;
        let Some(layer) = ctx.attn_layers.get_mut(self.layer_idx) else {
            bail!("no attention layer {} in the forward context", self.layer_idx);
        };
        let out = layer.forward(&q, &k, &v, ctx.attn_metadata)?;
        let out: Vec<f32> = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if out.len() != t * nq {
            bail!("attention returned {} values, expected {}", out.len(), t * nq);
        }
        let mut inp = Input { x: &out, k: nq, quantized: false };
        linear_into(&self.o_proj, &mut inp, &mut s.acts, &mut s.proj)?;
        s.x.iter_mut().zip(&s.proj).for_each(|(x, o)| *x += o);
        Ok(())
    }
}

impl Mlp {
    /// `x += down(silu(gate(normed)) · up(normed))`.
    fn forward_step(&self, s: &mut StepScratch, hidden: usize) -> Result<()> {
        let mut inp = Input { x: &s.normed, k: hidden, quantized: false };
        let inter = self.down_proj_in();
        match &self.gate_up {
            Some(gu) => stacked_into(gu, &mut inp, &mut s.acts, &mut s.gate_up),
            None => {
                let t = inp.rows();
                s.gate_up.resize(t * 2 * inter, 0.0);
                for (lin, off) in [(&self.gate_proj, 0), (&self.up_proj, inter)] {
                    linear_into(lin, &mut inp, &mut s.acts, &mut s.proj)?;
                    for (row, src) in s.gate_up.chunks_mut(2 * inter).zip(s.proj.chunks(inter)) {
                        row[off..off + inter].copy_from_slice(src);
                    }
                }
            }
        }
        s.act.clear();
        for row in s.gate_up.chunks(2 * inter) {
            let (g, u) = row.split_at(inter);
            // candle's f32 SiLU, `v / (1 + e^-v)`, times `up`.
            s.act.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
        }
        let mut inp = Input { x: &s.act, k: inter, quantized: false };
        linear_into(&self.down_proj, &mut inp, &mut s.acts, &mut s.proj)?;
        s.x.iter_mut().zip(&s.proj).for_each(|(x, o)| *x += o);
        Ok(())
    }
}

impl DecoderLayer {
    /// Runs the layer on the hidden state `s.x` `[num_tokens, hidden]`, in place.
    fn forward_step(&self, s: &mut StepScratch, rope: &Rope, ctx: &mut ForwardContext<'_>) -> Result<()> {
        let h = self.self_attn.cfg.hidden_size;
        self.input_layernorm.forward_into(&s.x, &mut s.normed);
        self.self_attn.forward_step(s, rope, ctx)?;
        self.post_attention_layernorm.forward_into(&s.x, &mut s.normed);
        self.mlp.forward_step(s, h)
    }
}

/// The whole forward of a Llama-family decoder: embed, layers, final norm and the LM head on
/// the rows in `ctx.logits_indices` only; the logits `[rows, vocab]` as f32.
#[allow(clippy::too_many_arguments)]
pub fn decoder_forward(
    scratch: &Mutex<StepScratch>,
    embed: &Embedding,
    layers: &[DecoderLayer],
    norm: &RmsNorm,
    lm_head: &Linear,
    rotary: &RotaryEmbedding,
    input_ids: &[u32],
    positions: &[usize],
    ctx: &mut ForwardContext<'_>,
) -> Result<Tensor> {
    if input_ids.len() != positions.len() {
        bail!("{} input ids but {} positions", input_ids.len(), positions.len());
    }
    let t = input_ids.len();
    let rows = ctx.logits_indices;
    if let Some(bad) = rows.iter().find(|&&r| r >= t) {
        bail!("logits index {bad} is out of the batch ({t} tokens)");
    }
    let mut guard = scratch.lock().unwrap_or_else(|e| e.into_inner());
    let s = &mut *guard;
    let rope = rotary.at(positions);
    let x = embed.forward(input_ids)?;
    let h = x.dim(1)?;
    s.x.clear();
    s.x.extend_from_slice(&x.flatten_all()?.to_vec1::<f32>()?);
    for layer in layers {
        layer.forward_step(s, &rope, ctx)?;
    }
    // The LM head only for the rows that are sampled.
    s.proj.clear();
    for &r in rows {
        s.proj.extend_from_slice(&s.x[r * h..(r + 1) * h]);
    }
    norm.forward_into(&s.proj, &mut s.normed);
    let mut inp = Input { x: &s.normed, k: h, quantized: false };
    let mut logits = Vec::new();
    if !rows.is_empty() {
        linear_into(lm_head, &mut inp, &mut s.acts, &mut logits)?;
    }
    let vocab = logits.len() / rows.len().max(1);
    Tensor::from_vec(logits, (rows.len(), vocab), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Q4_1's reference arithmetic is candle's scalar `vec_dot`: our kernels give its bits.
    #[test]
    fn q4_1_bit_identical_to_candle_for_any_batch() {
        for &(n, k) in &[(5usize, 64usize), (33, 576), (7, 1536)] {
            let w = Tensor::from_vec(random(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let ours = super::super::pack(&q).unwrap().unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 2, 3, 17] {
                let mut xs = random(m * k, (m * 31 + k) as u64);
                xs[0] = 0.0;
                let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap();
                let want: Vec<u32> = candle.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
                let got: Vec<u32> = super::packed_forward(&ours, &x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "n={n} k={k} m={m}");
            }
        }
    }
}
