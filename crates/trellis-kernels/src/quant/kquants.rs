//! K-quants: GGUF Q4_K, Q5_K and Q6_K weights (super-blocks of [`QK_K`] = 256 inputs) against
//! Q8_K activations ([`QActsK`]), in the design of the Q4_0/Q4_1/Q8_0 kernels.
//!
//! The reference arithmetic (llama.cpp's `ggml_vec_dot_q*_K_q8_K_generic`, candle's
//! `vec_dot_unopt`) keeps, per output, eight running float sums, one per input position
//! modulo 8 ("lane" `l`): per super-block `sums[l] += (d_w·d_a)·aux[l]`, where `aux[l]` is the
//! exact integer `Σ scale·q·a` over the inputs `i ≡ l (mod 8)`; Q4_K/Q5_K also keep
//! `sumf −= (dmin_w·d_a)·Σ min·bsum`; the result is `sumf + Σ_l sums[l]`. Reproducing it bit
//! for bit needs the eight lane sums separately, so both the weights and the activations are
//! laid out by lane: within each block of 32 inputs, the 4 bytes a `vpdpbusd`-style step
//! consumes are the inputs `l, l+8, l+16, l+24` (one lane, one block of 32).
//!
//! Repacked group-super-block (16 columns × 256 inputs), vector = 64 bytes, lane `c` of a
//! vector = 4 bytes of column `c`, byte `t` = input `32s + l + 8t` of block `s`:
//!
//! | bytes | content |
//! |---|---|
//! | 32 vectors, index `8j + l` | nibbles: low = block `2j`, high = block `2j+1` |
//! | Q5_K: 8 vectors, index `l` | bit `s` = 5th bit of block `s` |
//! | Q6_K: 16 vectors, index `8h + l` | bits `2u..2u+2` = bits 4..6 of block `4h + u` |
//! | Q4_K/Q5_K: 8 × 16 u8, 8 × 16 u8 | 6-bit scales, then mins, per block of 32 and column |
//! | Q6_K: 16 × 16 i8 | scales per block of 16 and column |
//! | 16 f16 (+ 16 f16) | `d` (then `dmin`) |
//!
//! That is the file's size (Q4_K: 148 bytes per column and super-block against 144, the
//! unpacked scales; Q5_K 180/176; Q6_K 210/210).

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::kquants_x86 as x86;
use super::{COLS, SendPtr, kquants_scalar as scalar};
use crate::cpu::{Isa, isa};
use crate::pool;

/// Inputs per K-quant super-block.
pub const QK_K: usize = 256;

/// A GGUF K-quant format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KType {
    /// 8 blocks of 32 × 4-bit, 6-bit scales and mins: `w = d·sc·q − dmin·m`.
    Q4K,
    /// As Q4_K with a 5th bit per value.
    Q5K,
    /// 16 blocks of 16 × 6-bit, i8 scales: `w = d·sc·(q − 32)`.
    Q6K,
}

impl KType {
    /// Bytes of one super-block in a GGUF file.
    pub fn file_block_bytes(self) -> usize {
        match self {
            KType::Q4K => 144,
            KType::Q5K => 176,
            KType::Q6K => 210,
        }
    }

    /// Offset of the high-bit vectors (right after the 32 nibble vectors).
    pub(super) const HI: usize = 2048;

    /// Offset of the scales in a repacked group-super-block.
    pub(super) fn sc_off(self) -> usize {
        Self::HI
            + match self {
                KType::Q4K => 0,
                KType::Q5K => 512,
                KType::Q6K => 1024,
            }
    }

    /// Offset of the mins (Q4_K, Q5_K).
    pub(super) fn min_off(self) -> usize {
        self.sc_off() + 128
    }

    /// Offset of the 16 f16 `d` (then 16 f16 `dmin` for Q4_K/Q5_K).
    pub(super) fn d_off(self) -> usize {
        self.sc_off() + 256
    }

    /// Bytes of one repacked group-super-block.
    pub(super) fn group_block_bytes(self) -> usize {
        self.d_off() + if self == KType::Q6K { 32 } else { 64 }
    }
}

/// Why a K-quant weight cannot be repacked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KQuantError {
    /// The input width is not a whole number of super-blocks.
    #[error("{ktype:?} weight rows of {k} values are not a multiple of {QK_K}")]
    PartialBlock {
        /// The format.
        ktype: KType,
        /// Input features.
        k: usize,
    },
    /// The data does not hold `n × k` values of the format.
    #[error("{ktype:?} weight [{n}, {k}] needs {expected} bytes, got {actual}")]
    Size {
        /// The format.
        ktype: KType,
        /// Output features.
        n: usize,
        /// Input features.
        k: usize,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
}

/// ggml's unpacking of the 12 bytes of 6-bit scales and mins of Q4_K/Q5_K (`get_scale_min_k4`).
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 256 unsigned quants (Q4_K 0..16, Q5_K 0..32, Q6_K 0..64 before its −32) of a file block.
pub(super) fn unpack_values(ktype: KType, blk: &[u8]) -> [u8; QK_K] {
    let mut v = [0u8; QK_K];
    match ktype {
        KType::Q4K | KType::Q5K => {
            let (qh, qs) = if ktype == KType::Q5K {
                (&blk[16..48], &blk[48..176])
            } else {
                (&blk[0..0], &blk[16..144])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let b = qs[32 * j + l];
                    v[64 * j + l] = b & 0xF;
                    v[64 * j + 32 + l] = b >> 4;
                    if ktype == KType::Q5K {
                        v[64 * j + l] |= ((qh[l] >> (2 * j)) & 1) << 4;
                        v[64 * j + 32 + l] |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                }
            }
        }
        KType::Q6K => {
            let (ql, qh) = (&blk[0..128], &blk[128..192]);
            for h in 0..2 {
                let (ql, qh, v) = (&ql[64 * h..], &qh[32 * h..], &mut v[128 * h..]);
                for l in 0..32 {
                    v[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    v[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
    v
}

/// A K-quant weight `[n, k]`, repacked for the kernels.
#[derive(Clone)]
pub struct KMatrix {
    ktype: KType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KMatrix({:?}, [{}, {}])", self.ktype, self.n, self.k)
    }
}

impl KMatrix {
    /// Repacks `raw`, the file's super-blocks of a `[n, k]` weight (row-major: `n` rows of
    /// `k/256` super-blocks), checking its size.
    pub fn from_gguf_blocks(
        ktype: KType,
        n: usize,
        k: usize,
        raw: &[u8],
    ) -> Result<Self, KQuantError> {
        if !k.is_multiple_of(QK_K) {
            return Err(KQuantError::PartialBlock { ktype, k });
        }
        let kb = k / QK_K;
        let fb = ktype.file_block_bytes();
        let expected = n * kb * fb;
        if raw.len() != expected {
            return Err(KQuantError::Size {
                ktype,
                n,
                k,
                expected,
                actual: raw.len(),
            });
        }
        let gbb = ktype.group_block_bytes();
        let (hi, sc, mn, d) = (KType::HI, ktype.sc_off(), ktype.min_off(), ktype.d_off());
        // Missing columns of the last group stay zero (d = 0): computed, never stored.
        let mut data = vec![0u8; n.div_ceil(COLS) * kb * gbb];
        for col in 0..n {
            let (g, c) = (col / COLS, col % COLS);
            for b in 0..kb {
                let src = &raw[(col * kb + b) * fb..][..fb];
                let dst = &mut data[(g * kb + b) * gbb..][..gbb];
                let v = unpack_values(ktype, src);
                for (vec, l) in (0..32).map(|x| (x, x % 8)) {
                    let j = vec / 8;
                    for t in 0..4 {
                        let i = l + 8 * t;
                        dst[64 * vec + 4 * c + t] =
                            (v[64 * j + i] & 0xF) | ((v[64 * j + 32 + i] & 0xF) << 4);
                    }
                }
                match ktype {
                    KType::Q4K | KType::Q5K => {
                        for t in 0..4 {
                            for l in 0..8 {
                                let i = l + 8 * t;
                                if ktype == KType::Q5K {
                                    let bits = (0..8).fold(0u8, |acc, s| {
                                        acc | (((v[32 * s + i] >> 4) & 1) << s)
                                    });
                                    dst[hi + 64 * l + 4 * c + t] = bits;
                                }
                            }
                        }
                        for s in 0..8 {
                            let (scale, min) = scale_min_k4(s, &src[4..16]);
                            dst[sc + 16 * s + c] = scale;
                            dst[mn + 16 * s + c] = min;
                        }
                        dst[d + 2 * c..d + 2 * c + 2].copy_from_slice(&src[0..2]);
                        dst[d + 32 + 2 * c..d + 34 + 2 * c].copy_from_slice(&src[2..4]);
                    }
                    KType::Q6K => {
                        for h in 0..2 {
                            for l in 0..8 {
                                for t in 0..4 {
                                    let i = l + 8 * t;
                                    let bits = (0..4).fold(0u8, |acc, u| {
                                        acc | (((v[32 * (4 * h + u) + i] >> 4) & 3) << (2 * u))
                                    });
                                    dst[hi + 64 * (8 * h + l) + 4 * c + t] = bits;
                                }
                            }
                        }
                        for j in 0..16 {
                            dst[sc + 16 * j + c] = src[192 + j];
                        }
                        dst[d + 2 * c..d + 2 * c + 2].copy_from_slice(&src[208..210]);
                    }
                }
            }
        }
        Ok(KMatrix { ktype, n, k, data })
    }

    /// The format.
    pub fn ktype(&self) -> KType {
        self.ktype
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Bytes of the repacked weight.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The weights stacked along the output dimension, as [`super::QMatrix::concat`]: `None`
    /// when the formats or widths differ, or a part but the last has a partial column group.
    pub fn concat(parts: &[&KMatrix]) -> Option<KMatrix> {
        let parts: Vec<_> = parts
            .iter()
            .map(|p| (p.ktype, p.n, p.k, &p.data[..]))
            .collect();
        super::stack_parts(&parts).map(|(ktype, n, k, data)| KMatrix { ktype, n, k, data })
    }

    fn group(&self, g: usize) -> &[u8] {
        let len = (self.k / QK_K) * self.ktype.group_block_bytes();
        &self.data[g * len..][..len]
    }

    /// `out[r, j] = Σ_i x[r, i]·w[j, i]` for the rows of `acts`; `out` is `[rows, n]`.
    ///
    /// # Panics
    /// When `acts` has another width than the weight or `out` is not `rows × n` long.
    pub fn matmul(&self, acts: &QActsK, out: &mut [f32]) {
        self.matmul_isa(acts, out, isa())
    }

    /// [`KMatrix::matmul`] at a chosen instruction-set level (capped by the CPU's).
    pub fn matmul_isa(&self, acts: &QActsK, out: &mut [f32], want: Isa) {
        assert_eq!(acts.k, self.k, "activation width");
        assert_eq!(out.len(), acts.m * self.n, "output size");
        let use_isa = want.min(isa());
        let m = acts.m;
        super::for_each_group(self.n, m, out, |g, tile, store| {
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(8);
                self.group_tile(g, acts, r0, rows, tile, use_isa);
                store(r0, rows, &tile[..]);
                r0 += rows;
            }
        });
    }

    fn group_tile(
        &self,
        g: usize,
        acts: &QActsK,
        r0: usize,
        rows: usize,
        tile: &mut [f32; COLS * 8],
        use_isa: Isa,
    ) {
        let w = self.group(g);
        match use_isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Amx => {
                // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI (`isa()` checked at run time).
                unsafe { x86::tile_avx512(self.ktype, w, acts, r0, rows, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: the CPU has AVX2, FMA and F16C (`isa()` checked at run time).
                unsafe { x86::tile_avx2(self.ktype, w, acts, r0, rows, tile) }
            }
            _ => scalar::tile(self.ktype, w, acts, r0, rows, tile),
        }
    }
}

/// Rows of activations quantized to Q8_K (llama.cpp's `quantize_row_q8_K`, candle's
/// `BlockQ8K::from_float`), with the quants of each block of 32 stored by lane (see the
/// module documentation). Reused from step to step.
#[derive(Debug, Clone, Default)]
pub struct QActsK {
    pub(super) m: usize,
    pub(super) k: usize,
    /// `[m, k]` quants, by lane within each block of 32.
    pub(super) qs: Vec<i8>,
    /// `[m, k/256]` scales.
    pub(super) d: Vec<f32>,
    /// `[m, k/16]` sums of the quants of each 16 inputs.
    pub(super) bsums: Vec<i16>,
    /// `[m, k/32]` sums of the quants of each 32 inputs.
    pub(super) bs32: Vec<i16>,
    /// `[m, k/4]` for Q6_K's −32: per 4-byte lane group, the i16 pair `32·(a0+a1), 32·(a2+a3)`.
    pub(super) c32: Vec<i32>,
}

/// Position of input `i` (natural order) in [`QActsK::qs`].
pub(super) fn lane_pos(i: usize) -> usize {
    (i & !31) | ((i & 7) << 2) | ((i >> 3) & 3)
}

impl QActsK {
    /// Empty; grows on the first [`QActsK::quantize`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Width.
    pub fn width(&self) -> usize {
        self.k
    }

    /// Quantizes `x` (`[m, k]` row-major, `k` a multiple of 256), in parallel over blocks.
    ///
    /// # Panics
    /// When `k` is not a multiple of 256 or `x.len()` is not a multiple of `k`.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        assert!(
            k > 0 && k.is_multiple_of(QK_K) && x.len().is_multiple_of(k),
            "activation shape"
        );
        let m = x.len() / k;
        let blocks = m * k / QK_K;
        self.m = m;
        self.k = k;
        self.qs.resize(m * k, 0);
        self.d.resize(blocks, 0.0);
        self.bsums.resize(blocks * 16, 0);
        self.bs32.resize(blocks * 8, 0);
        self.c32.resize(blocks * 64, 0);
        let ptrs = (
            SendPtr(self.qs.as_mut_ptr() as *mut f32),
            SendPtr(self.d.as_mut_ptr()),
            SendPtr(self.bsums.as_mut_ptr() as *mut f32),
            SendPtr(self.bs32.as_mut_ptr() as *mut f32),
            SendPtr(self.c32.as_mut_ptr() as *mut f32),
        );
        // At least 32 super-blocks per chunk: decode-sized batches run on the caller.
        pool::global().run_chunked(blocks, 32, |range| {
            for bi in range {
                // SAFETY: each block index is visited by exactly one item; the slices lie in
                // the buffers resized above, alive until `run_chunked` returns.
                let (qs, d, bsums, bs32, c32) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(
                            (ptrs.0.get() as *mut i8).add(bi * QK_K),
                            QK_K,
                        ),
                        &mut *ptrs.1.get().add(bi),
                        std::slice::from_raw_parts_mut((ptrs.2.get() as *mut i16).add(bi * 16), 16),
                        std::slice::from_raw_parts_mut((ptrs.3.get() as *mut i16).add(bi * 8), 8),
                        std::slice::from_raw_parts_mut((ptrs.4.get() as *mut i32).add(bi * 64), 64),
                    )
                };
                quantize_block_k(&x[bi * QK_K..][..QK_K], qs, d, bsums, bs32, c32);
            }
        });
    }

    /// Quant of input `i` of row `r` (natural order).
    pub(super) fn q(&self, r: usize, i: usize) -> i8 {
        self.qs[r * self.k + lane_pos(i)]
    }
}

/// `BlockQ8K::from_float` for one super-block: `iscale = −127/max` (`max` the first value of
/// largest magnitude), `q = round(iscale·x)` clamped, `d = 1/iscale`; plus the lane layout,
/// the sums per 16 and 32 and Q6_K's offset pairs.
fn quantize_block_k(
    xs: &[f32],
    qs: &mut [i8],
    d: &mut f32,
    bsums: &mut [i16],
    bs32: &mut [i16],
    c32: &mut [i32],
) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &x in xs {
        if amax < x.abs() {
            amax = x.abs();
            max = x;
        }
    }
    let mut nat = [0i8; QK_K];
    if amax == 0.0 {
        *d = 0.0;
    } else {
        let iscale = -127f32 / max;
        for (q, &x) in nat.iter_mut().zip(xs) {
            *q = (iscale * x).round().clamp(-128., 127.) as i8;
        }
        *d = 1.0 / iscale;
    }
    for (j, s) in bsums.iter_mut().enumerate() {
        *s = nat[16 * j..16 * j + 16]
            .iter()
            .map(|&q| q as i32)
            .sum::<i32>() as i16;
    }
    for (s, v) in bs32.iter_mut().enumerate() {
        *v = bsums[2 * s] + bsums[2 * s + 1];
    }
    for (i, &q) in nat.iter().enumerate() {
        qs[lane_pos(i)] = q;
    }
    for (g, c) in c32.iter_mut().enumerate() {
        let a = &qs[4 * g..4 * g + 4];
        let lo = 32 * (a[0] as i32 + a[1] as i32);
        let hi = 32 * (a[2] as i32 + a[3] as i32);
        *c = (lo & 0xFFFF) | (hi << 16);
    }
}

/// The scalar reference: `out[r, j]` for every row of `acts`, from the file's super-blocks
/// `raw` of a `[n, k]` weight: candle's / llama.cpp's reference `vec_dot` arithmetic. The
/// kernels equal it bit for bit.
pub fn matmul_ref_k(ktype: KType, n: usize, k: usize, raw: &[u8], acts: &QActsK) -> Vec<f32> {
    scalar::reference(ktype, n, k, raw, acts)
}

/// `f16` at `off` of `b`, as f32.
pub(super) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}
