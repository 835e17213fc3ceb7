//! The lean step: decoder layers over flat `f32` buffers that live from step to step.
//!
//! One [`StepScratch`] per model holds every intermediate buffer (hidden state, normed input,
//! quantized activations, q/k/v, MLP) and only grows, to the largest batch seen; a layer's
//! input is quantized once and shared by the products that read it (q/k/v are one stacked
//! product, gate/up another); RoPE runs in place on the q/k part of the stacked output; SiLU
//! and the `up` product are fused into one pass. Tensors appear only where the plugin API
//! wants them: at the attention backend's boundary and for the logits.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Module, Result, Storage, Tensor, bail};
use trellis_kernels::pool;
use trellis_kernels::quant::{KMatrix, QActs, QActsK, QMatrix};
use trellis_plugin::{ForwardContext, LoraMapping, LoraTarget};

use super::lora::add_lora;
use super::{
    Attention, DecoderLayer, Embedding, Linear, Mlp, RmsNorm, Rope, RotaryEmbedding, Weight,
};

/// The buffers of one step, reused by the next.
#[derive(Debug, Default)]
pub struct StepScratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    acts: Acts,
    qkv: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// A weight repacked for our kernels: Q4_0/Q4_1/Q8_0 (Q8_1 activations) or a K-quant
/// (Q8_K activations).
#[derive(Debug, Clone)]
pub(super) enum Packed {
    Q(QMatrix),
    K(KMatrix),
}

impl Packed {
    pub(super) fn out_features(&self) -> usize {
        match self {
            Packed::Q(w) => w.out_features(),
            Packed::K(w) => w.out_features(),
        }
    }

    pub(super) fn in_features(&self) -> usize {
        match self {
            Packed::Q(w) => w.in_features(),
            Packed::K(w) => w.in_features(),
        }
    }
}

/// Both kinds of quantized activations of one input.
#[derive(Debug, Default)]
pub(super) struct Acts {
    q8_1: QActs,
    q8_k: QActsK,
}

/// Rows of one input that several linears read: quantized on first use to the kind each
/// weight needs (each kind at most once), then shared.
struct Input<'a> {
    x: &'a [f32],
    k: usize,
    q8_1: bool,
    q8_k: bool,
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], k: usize) -> Self {
        Input {
            x,
            k,
            q8_1: false,
            q8_k: false,
        }
    }

    /// Rows whose Q8_1 quantization `acts.q8_1` already holds when `q8_1`.
    fn quantized(x: &'a [f32], k: usize, q8_1: bool) -> Self {
        Input {
            q8_1,
            ..Input::new(x, k)
        }
    }

    fn rows(&self) -> usize {
        self.x.len() / self.k
    }
}

/// `out = x Wᵀ` on a packed weight, quantizing the input first if this kind is not there yet.
fn packed_into(w: &Packed, inp: &mut Input<'_>, acts: &mut Acts, out: &mut Vec<f32>) {
    out.resize(inp.rows() * w.out_features(), 0.0);
    match w {
        Packed::Q(w) => {
            if !inp.q8_1 {
                acts.q8_1.quantize(inp.x, inp.k);
                inp.q8_1 = true;
            }
            w.matmul(&acts.q8_1, out);
        }
        Packed::K(w) => {
            if !inp.q8_k {
                acts.q8_k.quantize(inp.x, inp.k);
                inp.q8_k = true;
            }
            w.matmul(&acts.q8_k, out);
        }
    }
}

/// Whether the first product on an input is on a Q4_0/Q4_1/Q8_0 weight (it reads Q8_1
/// activations, which the layer's norm can then produce in the same pass).
fn reads_q8_1(stacked: &Option<Packed>, first: &Linear) -> bool {
    matches!(stacked, Some(Packed::Q(_)))
        || (stacked.is_none() && matches!(first.weight, Weight::Packed(Packed::Q(_))))
}

/// `out = x Wᵀ (+ b)` for the rows of `inp`.
fn linear_into(
    lin: &Linear,
    inp: &mut Input<'_>,
    acts: &mut Acts,
    out: &mut Vec<f32>,
) -> Result<()> {
    let rows = inp.rows();
    match &lin.weight {
        Weight::Packed(w) => packed_into(w, inp, acts, out),
        Weight::Candle(w) => {
            let x = Tensor::from_slice(inp.x, (rows, inp.k), &candle_core::Device::Cpu)?;
            let y = w.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?;
            out.clear();
            out.extend_from_slice(&y.to_vec1::<f32>()?);
        }
    }
    if let Some(b) = &lin.bias {
        for row in out.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
    Ok(())
}

/// [`Linear::forward`] on a packed weight.
pub(super) fn packed_forward(w: &Packed, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("quantized matmul: a scalar input");
    };
    if k != w.in_features() {
        bail!(
            "quantized matmul: input has {k} features, the weight {}",
            w.in_features()
        );
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::new();
    packed_into(w, &mut Input::new(&xs, k), &mut Acts::default(), &mut out);
    let mut out_dims = lead.to_vec();
    out_dims.push(w.out_features());
    Tensor::from_vec(out, out_dims, x.device())
}

/// Stacks packed linears that read the same input (`None` unless all are packed in the same
/// format and none has a bias: Q4_K_M files mix Q4_K and Q6_K, those stay separate).
pub(super) fn stack(parts: &[&Linear]) -> Option<Packed> {
    let packed: Option<Vec<&Packed>> = parts
        .iter()
        .map(|l| match (&l.weight, &l.bias) {
            (Weight::Packed(w), None) => Some(w),
            _ => None,
        })
        .collect();
    let packed = packed?;
    let q: Option<Vec<&QMatrix>> = packed
        .iter()
        .map(|p| if let Packed::Q(w) = p { Some(w) } else { None })
        .collect();
    if let Some(q) = q {
        return QMatrix::concat(&q).map(Packed::Q);
    }
    let k: Option<Vec<&KMatrix>> = packed
        .iter()
        .map(|p| if let Packed::K(w) = p { Some(w) } else { None })
        .collect();
    KMatrix::concat(&k?).map(Packed::K)
}

impl RmsNorm {
    /// Normalises the rows of `x` into `out` (rows in parallel for large batches).
    fn forward_into(&self, x: &[f32], out: &mut Vec<f32>) {
        out.resize(x.len(), 0.0);
        pool::global().for_rows_mut(out, self.weight.len(), |r0, part| {
            self.norm_rows(x, r0, part)
        });
    }

    /// [`RmsNorm::forward_into`] fused with the Q8_1 quantization of the normed rows (one
    /// pass over the rows, each quantized while still in cache).
    fn forward_quantized(&self, x: &[f32], out: &mut Vec<f32>, acts: &mut QActs) {
        out.resize(x.len(), 0.0);
        acts.quantize_rows_with(out, self.weight.len(), |r0, part| {
            self.norm_rows(x, r0, part)
        });
    }

    /// Rows `first..` of `x` normalised into `out` (whole rows).
    fn norm_rows(&self, x: &[f32], first: usize, out: &mut [f32]) {
        let n = self.weight.len();
        for (i, row) in out.chunks_mut(n).enumerate() {
            let src = &x[(first + i) * n..][..n];
            // Eight f64 partial sums (independent chains, so the loop is not one long
            // dependency), combined in a fixed order.
            let mut part = [0f64; 8];
            let (body, tail) = src.split_at(n / 8 * 8);
            for c in body.chunks_exact(8) {
                for l in 0..8 {
                    part[l] += (c[l] * c[l]) as f64;
                }
            }
            let ss = ((part[0] + part[4]) + (part[1] + part[5]))
                + ((part[2] + part[6]) + (part[3] + part[7]))
                + tail.iter().map(|&v| (v * v) as f64).sum::<f64>();
            let scale = 1.0 / ((ss / n as f64) as f32 + self.eps as f32).sqrt();
            for ((o, &v), w) in row.iter_mut().zip(src).zip(&self.weight) {
                *o = (v * scale) * w;
            }
        }
    }

    /// Normalises `x` into `s.normed`, quantized too when `quantize` (the next products read
    /// Q8_1): returns whether `s.acts` now holds the normed rows.
    fn normalize(
        &self,
        x: &[f32],
        s_normed: &mut Vec<f32>,
        acts: &mut Acts,
        quantize: bool,
    ) -> bool {
        let k = self.weight.len();
        if quantize && k.is_multiple_of(trellis_kernels::quant::QK) {
            self.forward_quantized(x, s_normed, &mut acts.q8_1);
            true
        } else {
            self.forward_into(x, s_normed);
            false
        }
    }
}

impl Attention {
    /// `x += o_proj(attention(q, k, v))` for `normed` = the layer's normed input.
    fn forward_step(
        &self,
        s: &mut StepScratch,
        rope: &Rope,
        ctx: &mut ForwardContext<'_>,
        quantized: bool,
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let t = s.normed.len() / h;
        let (nh, nkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let (nq, nk) = (nh * d, nkv * d);
        let w = nq + 2 * nk;
        let mut inp = Input::quantized(&s.normed, h, quantized);
        match &self.qkv {
            Some(qkv) => packed_into(qkv, &mut inp, &mut s.acts, &mut s.qkv),
            None => {
                // Three products, interleaved into the stacked layout.
                s.qkv.resize(t * w, 0.0);
                for (lin, off, len) in [
                    (&self.q_proj, 0, nq),
                    (&self.k_proj, nq, nk),
                    (&self.v_proj, nq + nk, nk),
                ] {
                    linear_into(lin, &mut inp, &mut s.acts, &mut s.proj)?;
                    for (row, src) in s.qkv.chunks_mut(w).zip(s.proj.chunks(len)) {
                        row[off..off + len].copy_from_slice(src);
                    }
                }
            }
        }
        let (lora, layer) = (ctx.lora, self.layer_idx);
        for (target, off) in [
            (LoraTarget::QProj, 0),
            (LoraTarget::KProj, nq),
            (LoraTarget::VProj, nq + nk),
        ] {
            add_lora(lora, layer, target, &s.normed, h, &mut s.qkv, w, off);
        }
        rope.check(t, d)?;
        // q, k and v out of the stacked rows, q and k rotated on the way (rows in parallel).
        let qkv = &s.qkv;
        let part = |off: usize, len: usize, rotate: bool| -> Vec<f32> {
            let mut dst = vec![0f32; t * len];
            if len > 0 {
                pool::global().for_rows_mut(&mut dst, len, |r0, rows| {
                    for (i, row) in rows.chunks_mut(len).enumerate() {
                        row.copy_from_slice(&qkv[(r0 + i) * w + off..][..len]);
                        if rotate {
                            rope.rotate_heads(row, d, r0 + i);
                        }
                    }
                });
            }
            dst
        };
        let dev = candle_core::Device::Cpu;
        let q = Tensor::from_vec(part(0, nq, true), (t, nh, d), &dev)?;
        let k = Tensor::from_vec(part(nq, nk, true), (t, nkv, d), &dev)?;
        let v = Tensor::from_vec(part(nq + nk, nk, false), (t, nkv, d), &dev)?;
        let Some(layer) = ctx.attn_layers.get_mut(self.layer_idx) else {
            bail!(
                "no attention layer {} in the forward context",
                self.layer_idx
            );
        };
        let out = layer.forward(&q, &k, &v, ctx.attn_metadata)?;
        if out.elem_count() != t * nq {
            bail!(
                "attention returned {} values, expected {}",
                out.elem_count(),
                t * nq
            );
        }
        // Read in place when the backend returns a contiguous f32 tensor (CPU backends do).
        let out = out.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = out.storage_and_layout();
        let vals: &[f32] = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[layout.start_offset()..][..t * nq],
            _ => bail!("attention returned a tensor off the CPU"),
        };
        let mut inp = Input::new(vals, nq);
        linear_into(&self.o_proj, &mut inp, &mut s.acts, &mut s.proj)?;
        add_lora(
            lora,
            self.layer_idx,
            LoraTarget::OProj,
            vals,
            nq,
            &mut s.proj,
            h,
            0,
        );
        add_rows(&mut s.x, &s.proj, h);
        Ok(())
    }
}

impl Mlp {
    /// `x += down(silu(gate(normed)) · up(normed))`.
    fn forward_step(
        &self,
        s: &mut StepScratch,
        hidden: usize,
        quantized: bool,
        lora: (Option<LoraMapping<'_>>, usize),
    ) -> Result<()> {
        let (lora, layer) = lora;
        let mut inp = Input::quantized(&s.normed, hidden, quantized);
        let inter = self.intermediate;
        match &self.gate_up {
            Some(gu) => packed_into(gu, &mut inp, &mut s.acts, &mut s.gate_up),
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
        for (target, off) in [(LoraTarget::GateProj, 0), (LoraTarget::UpProj, inter)] {
            add_lora(
                lora,
                layer,
                target,
                &s.normed,
                hidden,
                &mut s.gate_up,
                2 * inter,
                off,
            );
        }
        let t = s.gate_up.len() / (2 * inter).max(1);
        s.act.resize(t * inter, 0.0);
        let gate_up = &s.gate_up;
        if inter > 0 {
            pool::global().for_rows_mut(&mut s.act, inter, |r0, rows| {
                for (i, row) in rows.chunks_mut(inter).enumerate() {
                    let (g, u) = gate_up[(r0 + i) * 2 * inter..][..2 * inter].split_at(inter);
                    // SiLU `v / (1 + e^-v)` times `up`, vectorised (same bits on every ISA).
                    trellis_kernels::act::silu_mul(g, u, row);
                }
            });
        }
        let mut inp = Input::new(&s.act, inter);
        linear_into(&self.down_proj, &mut inp, &mut s.acts, &mut s.proj)?;
        let act = &s.act;
        add_lora(
            lora,
            layer,
            LoraTarget::DownProj,
            act,
            inter,
            &mut s.proj,
            hidden,
            0,
        );
        add_rows(&mut s.x, &s.proj, hidden);
        Ok(())
    }
}

/// `x += y` over rows of `width` (rows in parallel for large batches).
fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    if width == 0 {
        return;
    }
    pool::global().for_rows_mut(x, width, |r0, rows| {
        rows.iter_mut()
            .zip(&y[r0 * width..])
            .for_each(|(x, y)| *x += y);
    });
}

impl DecoderLayer {
    /// Runs the layer on the hidden state `s.x` `[num_tokens, hidden]`, in place.
    fn forward_step(
        &self,
        s: &mut StepScratch,
        rope: &Rope,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<()> {
        let h = self.self_attn.cfg.hidden_size;
        let a = &self.self_attn;
        let q = self.input_layernorm.normalize(
            &s.x,
            &mut s.normed,
            &mut s.acts,
            reads_q8_1(&a.qkv, &a.q_proj),
        );
        a.forward_step(s, rope, ctx, q)?;
        let q = self.post_attention_layernorm.normalize(
            &s.x,
            &mut s.normed,
            &mut s.acts,
            reads_q8_1(&self.mlp.gate_up, &self.mlp.gate_proj),
        );
        self.mlp.forward_step(s, h, q, (ctx.lora, a.layer_idx))
    }
}

/// The body of a Llama-family decoder (vLLM's `forward`): embed, layers, final norm; the
/// hidden states `[num_tokens, hidden]` as f32.
#[allow(clippy::too_many_arguments)]
pub fn decoder_hidden_states(
    scratch: &Mutex<StepScratch>,
    embed: &Embedding,
    layers: &[DecoderLayer],
    norm: &RmsNorm,
    rotary: &RotaryEmbedding,
    input_ids: &[u32],
    positions: &[usize],
    ctx: &mut ForwardContext<'_>,
) -> Result<Tensor> {
    super::check_batch(input_ids, positions)?;
    let t = input_ids.len();
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
    norm.forward_into(&s.x, &mut s.normed);
    Tensor::from_slice(&s.normed, (t, h), &candle_core::Device::Cpu)
}

/// The LM head (vLLM's `compute_logits`) on hidden states `[rows, hidden]`: logits
/// `[rows, vocab]` as f32.
pub fn lm_head_logits(
    scratch: &Mutex<StepScratch>,
    lm_head: &Linear,
    vocab: usize,
    hidden_states: &Tensor,
) -> Result<Tensor> {
    let (rows, h) = hidden_states.dims2()?;
    let mut logits = Vec::new();
    if rows > 0 {
        let x = hidden_states
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut guard = scratch.lock().unwrap_or_else(|e| e.into_inner());
        let mut inp = Input::new(&x, h);
        linear_into(lm_head, &mut inp, &mut guard.acts, &mut logits)?;
    }
    Tensor::from_vec(logits, (rows, vocab), &candle_core::Device::Cpu)
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
                let want: Vec<u32> = candle
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let got: Vec<u32> = super::packed_forward(&ours, &x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(got, want, "n={n} k={k} m={m}");
            }
        }
    }

    /// K-quants. candle 0.11's `QMatMul` cannot be matched bit for bit on an x86 CPU with AVX2:
    /// it picks at run time (`has_avx2_fma()`, and with AVX-512 VNNI its own repacked tiles in
    /// `repack_x86`) kernels that fuse multiply-adds and sum in other orders, so its bits
    /// depend on the CPU (the Q4_1 test above matches because candle's Q4_1 `vec_dot` has no
    /// SIMD path). The reference arithmetic is candle's `vec_dot_unopt` (llama.cpp's generic
    /// `vec_dot`) on `BlockQ8K::from_float` activations: we equal that bit for bit, and
    /// candle's `QMatMul` within float-reassociation error.
    mod kquants {
        use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, GgmlType};
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Module, Tensor};

        use super::random;

        const DTYPES: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

        fn reference_of<T: GgmlType<VecDotType = BlockQ8K>>(
            q: &QTensor,
            n: usize,
            k: usize,
            xs: &[f32],
        ) -> Vec<f32> {
            let data = q.data().unwrap();
            let kb = k / 256;
            let mut blocks = vec![T::zeros(); n * kb];
            assert_eq!(data.len(), std::mem::size_of_val(blocks.as_slice()));
            // SAFETY: `blocks` is `data.len()` bytes of plain-old-data `repr(C)` blocks.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    blocks.as_mut_ptr() as *mut u8,
                    data.len(),
                )
            };
            let m = xs.len() / k;
            let mut out = vec![0f32; m * n];
            for r in 0..m {
                let mut ys = vec![BlockQ8K::zeros(); kb];
                BlockQ8K::from_float(&xs[r * k..(r + 1) * k], &mut ys);
                for c in 0..n {
                    out[r * n + c] = T::vec_dot_unopt(k, &blocks[c * kb..(c + 1) * kb], &ys);
                }
            }
            out
        }

        fn reference(q: &QTensor, n: usize, k: usize, xs: &[f32]) -> Vec<f32> {
            match q.dtype() {
                GgmlDType::Q4K => reference_of::<BlockQ4K>(q, n, k, xs),
                GgmlDType::Q5K => reference_of::<BlockQ5K>(q, n, k, xs),
                _ => reference_of::<BlockQ6K>(q, n, k, xs),
            }
        }

        fn ours(q: &QTensor, x: &Tensor) -> Vec<f32> {
            let w = super::super::super::pack(q).unwrap().expect("packed");
            super::super::packed_forward(&w, x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        }

        fn bits(v: &[f32]) -> Vec<u32> {
            v.iter().map(|x| x.to_bits()).collect()
        }

        #[test]
        fn kquants_bit_identical_to_candle_reference_for_any_batch() {
            for dt in DTYPES {
                for &(n, k) in &[(5usize, 256usize), (33, 512), (16, 1536), (7, 2816)] {
                    let w = Tensor::from_vec(random(n * k, n as u64 + 3), (n, k), &Device::Cpu)
                        .unwrap();
                    let q = QTensor::quantize(&w, dt).unwrap();
                    for m in [1usize, 2, 3, 17] {
                        let mut xs = random(m * k, (m * 31 + k) as u64);
                        xs[0] = 0.0;
                        let want = reference(&q, n, k, &xs);
                        let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap();
                        assert_eq!(bits(&ours(&q, &x)), bits(&want), "{dt:?} n={n} k={k} m={m}");
                    }
                }
            }
        }

        #[test]
        fn kquants_close_to_candle_qmatmul() {
            for dt in DTYPES {
                for &(n, k) in &[(32usize, 512usize), (48, 1536)] {
                    let w = Tensor::from_vec(random(n * k, n as u64 + 5), (n, k), &Device::Cpu)
                        .unwrap();
                    let q = QTensor::quantize(&w, dt).unwrap();
                    let wmax = q
                        .dequantize(&Device::Cpu)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let q2 = QTensor::quantize(&w, dt).unwrap();
                    let candle = QMatMul::from_qtensor(q2).unwrap();
                    for m in [1usize, 5] {
                        let xs = random(m * k, (m * 7 + k) as u64);
                        let x = Tensor::from_vec(xs.clone(), (m, k), &Device::Cpu).unwrap();
                        let got = ours(&q, &x);
                        let want: Vec<f32> = candle
                            .forward(&x)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        for (i, (g, c)) in got.iter().zip(&want).enumerate() {
                            let scale: f32 = xs[(i / n) * k..(i / n + 1) * k]
                                .iter()
                                .map(|v| v.abs())
                                .sum::<f32>()
                                * wmax;
                            assert!(
                                (g - c).abs() <= 1e-5 * scale,
                                "{dt:?} n={n} k={k} m={m} #{i}: {g} vs {c}"
                            );
                        }
                    }
                }
            }
        }

        /// Rough timing, ours against candle's `QMatMul` on Q4_K (run with `--ignored
        /// --nocapture`, in release for meaningful numbers).
        #[test]
        #[ignore]
        fn q4k_speed_against_candle() {
            for &(n, k) in &[(1536usize, 512usize), (49152, 512), (576, 1536)] {
                let w = Tensor::from_vec(random(n * k, 1), (n, k), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
                let packed = super::super::super::pack(&q).unwrap().expect("packed");
                let candle = QMatMul::from_qtensor(q).unwrap();
                // Context: our Q4_0 kernel on the same shape.
                let q40 = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
                let packed40 = super::super::super::pack(&q40).unwrap().expect("packed");
                for m in [1usize, 64] {
                    let x = Tensor::from_vec(random(m * k, 2), (m, k), &Device::Cpu).unwrap();
                    let time = |f: &dyn Fn()| {
                        f();
                        let reps = 20;
                        let t = std::time::Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        t.elapsed().as_secs_f64() * 1e6 / reps as f64
                    };
                    let ours = time(&|| {
                        super::super::packed_forward(&packed, &x).unwrap();
                    });
                    let theirs = time(&|| {
                        candle.forward(&x).unwrap();
                    });
                    let q40 = time(&|| {
                        super::super::packed_forward(&packed40, &x).unwrap();
                    });
                    println!(
                        "Q4_K [{n}, {k}] m={m}: ours {ours:.0} µs, candle {theirs:.0} µs (our Q4_0: {q40:.0} µs)"
                    );
                }
            }
        }
    }
}
