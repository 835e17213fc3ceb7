//! A Q4_1 × Q8_1 matmul for the CPU, bit-identical to candle's.
//!
//! candle 0.11 has no SIMD dot product for Q4_1 weights (`BlockQ4_1::vec_dot` is the scalar
//! `vec_dot_unopt`), and Q4_1 is the default model's format: that loop was two thirds of a
//! decode step. This computes exactly what candle computes — activations quantized to Q8_1
//! by candle's `quantize_row_q8_1` arithmetic, per block an exact integer dot product (AVX2
//! when the CPU has it), then candle's float expression, accumulated block by block in the
//! same order — so every output is the same f32, whatever the batch: greedy outputs, the
//! llama.cpp golden test and batch invariance are unchanged. Work is split over candle's own
//! thread pool (`CANDLE_NUM_THREADS`), so the two never compete.
//!
//! `TRELLIS_DISABLE_Q4_1_KERNEL=1` falls back to candle's path (for A/B benchmarks).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

const QK: usize = 32;

/// One Q4_1 block as in the file (20 bytes: the f16 scale and minimum, 32 nibbles).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Q4Block {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}

impl Q4Block {
    #[inline]
    fn d(&self) -> f32 {
        self.d.to_f32()
    }

    #[inline]
    fn m(&self) -> f32 {
        self.m.to_f32()
    }
}

/// One Q8_1 block of activations, scales as the f32 values of their f16 (exact).
#[derive(Debug, Clone, Copy)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight `[n, k]` (output features × input features).
#[derive(Debug, Clone)]
pub struct Q41Matrix {
    n: usize,
    k: usize,
    blocks: Vec<Q4Block>,
}

/// Whether the kernel is switched off (`TRELLIS_DISABLE_Q4_1_KERNEL=1`).
pub fn kernel_disabled() -> bool {
    std::env::var("TRELLIS_DISABLE_Q4_1_KERNEL").is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Q41Matrix {
    /// The matrix of a 2-D Q4_1 tensor on the CPU whose rows are whole blocks; `None` for
    /// anything else (other types stay with candle).
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let dims = t.shape().dims();
        if t.dtype() != GgmlDType::Q4_1 || dims.len() != 2 || !t.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = (dims[0], dims[1]);
        if k % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        if data.len() != n * k / QK * 20 {
            return Ok(None);
        }
        let blocks = data
            .chunks_exact(20)
            .map(|b| {
                let mut qs = [0u8; QK / 2];
                qs.copy_from_slice(&b[4..20]);
                Q4Block {
                    d: f16::from_le_bytes([b[0], b[1]]),
                    m: f16::from_le_bytes([b[2], b[3]]),
                    qs,
                }
            })
            .collect();
        Ok(Some(Q41Matrix { n, k, blocks }))
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `x Wᵀ` for `x` `[..., k]` (f32): `[..., n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("q4_1 matmul: a scalar input");
        };
        if k != self.k {
            candle_core::bail!("q4_1 matmul: input has {k} features, the weight {}", self.k);
        }
        let m: usize = lead.iter().product();
        let xs: Vec<f32> = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let kb = self.k / QK;
        let mut acts = Vec::with_capacity(m * kb);
        for row in xs.chunks_exact(self.k) {
            quantize_row_q8_1(row, &mut acts);
        }
        let mut dst = vec![0f32; m * self.n];
        self.matmul(m, &acts, &mut dst);
        let mut out_dims = lead.to_vec();
        out_dims.push(self.n);
        Tensor::from_vec(dst, out_dims, &Device::Cpu)
    }

    fn matmul(&self, m: usize, acts: &[Q8Block], dst: &mut [f32]) {
        let (n, kb) = (self.n, self.k / QK);
        let avx2 = has_avx2();
        let dst_ptr = dst.as_mut_ptr() as usize;
        let column = |col: usize| &self.blocks[col * kb..(col + 1) * kb];
        // One work item = four columns (independent dot products interleave well), all rows.
        let quad = |q: usize| {
            let col = q * 4;
            for row in 0..m {
                let a = &acts[row * kb..(row + 1) * kb];
                let vals: [f32; 4] = if col + 4 <= n {
                    dot4(
                        [
                            column(col),
                            column(col + 1),
                            column(col + 2),
                            column(col + 3),
                        ],
                        a,
                        avx2,
                    )
                } else {
                    let mut v = [0f32; 4];
                    for (i, c) in (col..n).enumerate() {
                        v[i] = dot(column(c), a, avx2);
                    }
                    v
                };
                for (i, v) in vals.iter().enumerate().take(n - col) {
                    // SAFETY: `dst` has m * n elements and outlives the pool call; every
                    // (row, col) is written by exactly one work item (columns are split).
                    unsafe { *(dst_ptr as *mut f32).add(row * n + col + i) = *v };
                }
            }
        };
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(4), |quads| {
            for q in quads {
                quad(q)
            }
        });
    }
}

/// candle's `BlockQ8_1::from_float` (llama.cpp's `quantize_row_q8_1` reference), appending
/// `row.len() / 32` blocks to `out`.
fn quantize_row_q8_1(row: &[f32], out: &mut Vec<Q8Block>) {
    for xs in row.chunks_exact(QK) {
        let mut amax = 0f32;
        for &x in xs {
            amax = amax.max(x.abs())
        }
        let d = amax / ((1 << 7) - 1) as f32;
        let id = if d != 0f32 { 1. / d } else { 0. };
        let d16 = f16::from_f32(d);
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            let v0 = xs[j] * id;
            let v1 = xs[j + QK / 2] * id;
            qs[j] = f32::round(v0) as i8;
            qs[j + QK / 2] = f32::round(v1) as i8;
            sum += qs[j] as i32 + qs[j + QK / 2] as i32;
        }
        let s16 = f16::from_f32(sum as f32) * d16;
        out.push(Q8Block {
            d: d16.to_f32(),
            s: s16.to_f32(),
            qs,
        });
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// candle's `vec_dot_unopt` for Q4_1 × Q8_1: exact integer block sums, then the same float
/// expression in the same order.
#[inline]
fn dot(w: &[Q4Block], a: &[Q8Block], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { dot_avx2(w, a) };
    }
    let _ = avx2;
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        sumf += block_sumi(x, y) as f32 * x.d() * y.d + x.m() * y.s;
    }
    sumf
}

/// [`dot`] of four columns against the same activations.
#[inline]
fn dot4(w: [&[Q4Block]; 4], a: &[Q8Block], avx2: bool) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 (checked at run time).
        return unsafe { dot4_avx2(w, a) };
    }
    w.map(|w| dot(w, a, avx2))
}

#[inline]
fn block_sumi(x: &Q4Block, y: &Q8Block) -> i32 {
    let mut sumi = 0i32;
    for j in 0..QK / 2 {
        let v0 = x.qs[j] as i32 & 0x0F;
        let v1 = x.qs[j] as i32 >> 4;
        sumi += (v0 * y.qs[j] as i32) + (v1 * y.qs[j + QK / 2] as i32);
    }
    sumi
}

/// The products of one Q4_1 block with one Q8_1 block as 8 exact i32 partial sums (AVX2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn block_products_avx2(x: &Q4Block, q8: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let low_nibbles = _mm_set1_epi8(0x0F);
    // SAFETY: 16 bytes are read from an array of exactly that size (unaligned load).
    let raw = unsafe { _mm_loadu_si128(x.qs.as_ptr() as *const __m128i) };
    let lo = _mm_and_si128(raw, low_nibbles);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_nibbles);
    // Weights 0..=15 in the order of the activations: low nibbles are positions 0..16, high
    // nibbles 16..32.
    let q4 = _mm256_set_m128i(hi, lo);
    // u8 × i8 pairs summed to i16: at most 2 · 15 · 128 = 3840, no saturation; exact.
    let pairs = _mm256_maddubs_epi16(q4, q8);
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn load_q8(y: &Q8Block) -> std::arch::x86_64::__m256i {
    // SAFETY: 32 bytes are read from an array of exactly that size (unaligned load).
    unsafe { std::arch::x86_64::_mm256_loadu_si256(y.qs.as_ptr() as *const _) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2(w: &[Q4Block], a: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mut sumf = 0f32;
    for (x, y) in w.iter().zip(a) {
        let p = block_products_avx2(x, load_q8(y));
        let s128 = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
        let sumi = _mm_cvtsi128_si32(_mm_add_epi32(s64, _mm_shuffle_epi32(s64, 1)));
        sumf += sumi as f32 * x.d() * y.d + x.m() * y.s;
    }
    sumf
}

/// Four columns at once: the four block sums are reduced together, and the float update
/// runs in four SSE lanes with the scalar expression's operations in the scalar order
/// (separate multiplies and adds, no FMA), so each lane equals [`dot`] bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot4_avx2(w: [&[Q4Block]; 4], a: &[Q8Block]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mut acc = _mm_setzero_ps();
    for (b, y) in a.iter().enumerate() {
        let q8 = load_q8(y);
        let (x0, x1, x2, x3) = (&w[0][b], &w[1][b], &w[2][b], &w[3][b]);
        let p0 = block_products_avx2(x0, q8);
        let p1 = block_products_avx2(x1, q8);
        let p2 = block_products_avx2(x2, q8);
        let p3 = block_products_avx2(x3, q8);
        // Exact i32 sums: [p0 lo, p1 lo, p0 hi, p1 hi ...] pairwise, then both 128-bit halves.
        let h01 = _mm256_hadd_epi32(p0, p1);
        let h23 = _mm256_hadd_epi32(p2, p3);
        let h = _mm256_hadd_epi32(h01, h23);
        let sumi = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        // |sumi| < 2^24: the conversion is exact, as `sumi as f32` is.
        let sumi = _mm_cvtepi32_ps(sumi);
        let d4 = _mm_set_ps(x3.d(), x2.d(), x1.d(), x0.d());
        let m4 = _mm_set_ps(x3.m(), x2.m(), x1.m(), x0.m());
        let t = _mm_mul_ps(_mm_mul_ps(sumi, d4), _mm_set1_ps(y.d));
        let u = _mm_mul_ps(m4, _mm_set1_ps(y.s));
        acc = _mm_add_ps(acc, _mm_add_ps(t, u));
    }
    let mut out = [0f32; 4];
    // SAFETY: four f32 are written to an array of four.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_core::quantized::QMatMul;

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

    #[test]
    fn bit_identical_to_candle_for_any_batch() {
        for &(n, k) in &[(5usize, 64usize), (33, 576), (7, 1536)] {
            let w = Tensor::from_vec(random(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            let ours = Q41Matrix::from_qtensor(&q).unwrap().unwrap();
            let candle = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 2, 3, 17] {
                let mut xs = random(m * k, (m * 31 + k) as u64);
                xs[0] = 0.0; // a zero block scale somewhere is fine too
                let x = Tensor::from_vec(xs, (m, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = candle
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got: Vec<f32> = ours
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want_bits: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                let got_bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got_bits, want_bits, "n={n} k={k} m={m}");
                // The scalar path agrees too.
                let kb = k / QK;
                let mut acts = Vec::new();
                let row0: Vec<f32> = x.get(0).unwrap().to_vec1().unwrap();
                quantize_row_q8_1(&row0, &mut acts);
                for col in 0..n {
                    let wcol = &ours.blocks[col * kb..(col + 1) * kb];
                    assert_eq!(dot(wcol, &acts, false).to_bits(), want[col].to_bits());
                }
            }
        }
    }

    #[test]
    fn three_dimensional_input_and_wrong_width() {
        let (n, k) = (4, 64);
        let w = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q41Matrix::from_qtensor(&q).unwrap().unwrap();
        let x = Tensor::from_vec(random(2 * 3 * k, 9), (2, 3, k), &Device::Cpu).unwrap();
        assert_eq!(ours.forward(&x).unwrap().dims(), &[2, 3, n]);
        let bad = Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(ours.forward(&bad).is_err());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q8).unwrap().is_none());
    }
}
