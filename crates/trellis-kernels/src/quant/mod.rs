//! Quantized matrix products over GGUF block formats.
//!
//! A weight `[n, k]` (n output features, each a row of `k/32` blocks in the file) is repacked
//! once at load into groups of [`COLS`] = 16 output columns. For each group and each block of
//! 32 inputs, the 16 columns' quants are interleaved 4 bytes at a time, so that one 64-byte
//! vector holds 4 consecutive inputs of each of the 16 columns: exactly the operand of one
//! `vpdpbusd` (u8 × i8 → i32, 4 products per lane), against 4 activation bytes broadcast to
//! every lane. Scales stay f16 as in the file (converted in registers), so the repacked
//! matrix is no larger than the file's blocks and decode reads the same bytes.
//!
//! | format | per group and block | integer sum per (row, column, block) |
//! |---|---|---|
//! | Q4_0 | 4 × 64 B of nibbles + 16 f16 `d` | `Σ q·a − 8·Σa` (q in 0..16) |
//! | Q4_1 | 4 × 64 B of nibbles + 16 f16 `d` + 16 f16 `m` | `Σ q·a` |
//! | Q8_0 | 8 × 64 B of `w + 128` + 16 f16 `d` | `Σ (w+128)·a − 128·Σa` |
//!
//! Activations are quantized once per layer input ([`QActs`], llama.cpp's Q8_1: blocks of 32
//! `i8` with an f16-rounded scale `d`, the f16-rounded `s = d·Σq` and the exact `Σq`) and
//! shared by every weight that reads the same input (q/k/v, gate/up).
//!
//! The K-quants (Q4_K, Q5_K, Q6_K against Q8_K activations) follow the same design in
//! [`KMatrix`] and [`QActsK`]; see `kquants.rs`.
//!
//! Every output element is the float expression of the scalar reference ([`matmul_ref`],
//! which is candle's and llama.cpp's reference `vec_dot`), accumulated block by block in
//! order, with separate multiplies and adds (no FMA): `acc += (sumi·d_w)·d_a` (Q4_0, Q8_0)
//! and `acc += (sumi·d_w)·d_a + m_w·s_a` (Q4_1). The integer sums are exact, so the SIMD
//! kernels give the same bits as the reference, whatever the instruction set, the number of
//! rows in the batch or the split over threads: greedy outputs do not depend on the batch.

#[cfg(target_arch = "x86_64")]
mod amx;
mod kquants;
mod kquants_scalar;
#[cfg(target_arch = "x86_64")]
mod kquants_x86;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use kquants::{KMatrix, KQuantError, KType, QActsK, QK_K, matmul_ref_k};

use half::f16;

use crate::cpu::{Isa, detected, isa};
use crate::pool;

/// Output columns per repacked group.
pub const COLS: usize = 16;
/// Inputs per block (every supported format).
pub const QK: usize = 32;

/// A GGUF block format the kernels compute on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 32 × 4-bit, `w = d·(q − 8)`.
    Q4_0,
    /// 32 × 4-bit, `w = d·q + m`.
    Q4_1,
    /// 32 × 8-bit, `w = d·q`.
    Q8_0,
}

impl QType {
    /// Bytes of one block in a GGUF file.
    pub fn file_block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
        }
    }

    /// Bytes of quants of one repacked group-block (16 columns × 32 inputs).
    fn quant_bytes(self) -> usize {
        match self {
            QType::Q4_0 | QType::Q4_1 => 256,
            QType::Q8_0 => 512,
        }
    }

    /// Bytes of one repacked group-block: quants, then 16 f16 `d` (and 16 f16 `m` for Q4_1).
    fn group_block_bytes(self) -> usize {
        self.quant_bytes()
            + match self {
                QType::Q4_1 => 64,
                _ => 32,
            }
    }

    /// The integer correction `−shift·Σa` is `Σa << shift` subtracted (0: none).
    fn isum_shift(self) -> u32 {
        match self {
            QType::Q4_0 => 3,
            QType::Q4_1 => 0,
            QType::Q8_0 => 7,
        }
    }
}

/// Why a weight cannot be repacked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// The input width is not a whole number of blocks.
    #[error("{qtype:?} weight rows of {k} values are not a multiple of {QK}")]
    PartialBlock {
        /// The format.
        qtype: QType,
        /// Input features.
        k: usize,
    },
    /// The data does not hold `n × k` values of the format.
    #[error("{qtype:?} weight [{n}, {k}] needs {expected} bytes, got {actual}")]
    Size {
        /// The format.
        qtype: QType,
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

/// A quantized weight `[n, k]`, repacked for the kernels.
#[derive(Clone)]
pub struct QMatrix {
    qtype: QType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, [{}, {}])", self.qtype, self.n, self.k)
    }
}

impl QMatrix {
    /// Repacks `raw`, the file's blocks of a `[n, k]` weight (row-major: `n` rows of `k/32`
    /// blocks), checking its size.
    pub fn from_gguf_blocks(
        qtype: QType,
        n: usize,
        k: usize,
        raw: &[u8],
    ) -> Result<Self, QuantError> {
        if !k.is_multiple_of(QK) {
            return Err(QuantError::PartialBlock { qtype, k });
        }
        let kb = k / QK;
        let fb = qtype.file_block_bytes();
        let expected = n * kb * fb;
        if raw.len() != expected {
            return Err(QuantError::Size {
                qtype,
                n,
                k,
                expected,
                actual: raw.len(),
            });
        }
        let groups = n.div_ceil(COLS);
        let gbb = qtype.group_block_bytes();
        let qb = qtype.quant_bytes();
        // Missing columns of the last group stay zero (d = 0): computed, never stored.
        let mut data = vec![0u8; groups * kb * gbb];
        for col in 0..n {
            let (g, c) = (col / COLS, col % COLS);
            for b in 0..kb {
                let src = &raw[(col * kb + b) * fb..][..fb];
                let dst = &mut data[(g * kb + b) * gbb..][..gbb];
                dst[qb + 2 * c..qb + 2 * c + 2].copy_from_slice(&src[0..2]);
                match qtype {
                    QType::Q4_0 | QType::Q4_1 => {
                        let qs = match qtype {
                            QType::Q4_1 => {
                                dst[qb + 32 + 2 * c..qb + 32 + 2 * c + 2]
                                    .copy_from_slice(&src[2..4]);
                                &src[4..20]
                            }
                            _ => &src[2..18],
                        };
                        // Vector j, lane c = file bytes 4j..4j+4: low nibbles are inputs
                        // 4j..4j+4, high nibbles inputs 16+4j..16+4j+4.
                        for j in 0..4 {
                            dst[64 * j + 4 * c..64 * j + 4 * c + 4]
                                .copy_from_slice(&qs[4 * j..4 * j + 4]);
                        }
                    }
                    QType::Q8_0 => {
                        let qs = &src[2..34];
                        for s in 0..8 {
                            for t in 0..4 {
                                dst[64 * s + 4 * c + t] = (qs[4 * s + t] as i8 as i16 + 128) as u8;
                            }
                        }
                    }
                }
            }
        }
        Ok(QMatrix { qtype, n, k, data })
    }

    /// The format.
    pub fn qtype(&self) -> QType {
        self.qtype
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Bytes of the repacked weight (what one full product reads).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The weights stacked along the output dimension (`[Σn, k]`), for products that read the
    /// same input (q/k/v, gate/up): one pass and one dispatch instead of several. `None` when
    /// the formats or widths differ, or a part but the last has a partial column group.
    pub fn concat(parts: &[&QMatrix]) -> Option<QMatrix> {
        let parts: Vec<_> = parts
            .iter()
            .map(|p| (p.qtype, p.n, p.k, &p.data[..]))
            .collect();
        stack_parts(&parts).map(|(qtype, n, k, data)| QMatrix { qtype, n, k, data })
    }

    fn group(&self, g: usize) -> &[u8] {
        let len = (self.k / QK) * self.qtype.group_block_bytes();
        &self.data[g * len..][..len]
    }

    /// `out[r, j] = Σ_i x[r, i]·w[j, i]` for the `acts.rows()` quantized rows: `out` is
    /// `[rows, n]` row-major. Runs on the global compute pool.
    ///
    /// # Panics
    /// When `acts` has another width than the weight or `out` is not `rows × n` long (a
    /// caller bug, not user input).
    pub fn matmul(&self, acts: &QActs, out: &mut [f32]) {
        self.matmul_isa(acts, out, isa())
    }

    /// [`QMatrix::matmul`] at a chosen instruction-set level (capped by the CPU's).
    pub fn matmul_isa(&self, acts: &QActs, out: &mut [f32], want: Isa) {
        assert_eq!(acts.k, self.k, "activation width");
        assert_eq!(out.len(), acts.m * self.n, "output size");
        let use_isa = want.min(detected());
        let m = acts.m;
        // AMX for whole tiles of 16 rows when the activations carry their u8 copy.
        let amx_rows = match use_isa {
            Isa::Amx if acts.qs_u8.len() == m * self.k => m / 16 * 16,
            _ => 0,
        };
        for_each_group(self.n, m, out, |g, tile, store| {
            #[cfg(target_arch = "x86_64")]
            if amx_rows > 0 {
                let mut emit = |row0: usize, t: &[f32; COLS * 16]| store(row0, 16, &t[..]);
                // SAFETY: `Isa::Amx` means AVX-512 VNNI and granted AMX; the u8 copy of the
                // activations covers all m rows (checked above).
                unsafe {
                    amx::group_rows(self.qtype, self.group(g), acts, 0, amx_rows / 16, &mut emit)
                };
            }
            let mut r0 = amx_rows;
            while r0 < m {
                let rows = (m - r0).min(8);
                self.group_tile(g, acts, r0, rows, tile, use_isa);
                store(r0, rows, &tile[..]);
                r0 += rows;
            }
        });
    }

    /// One group × up to 8 rows into `tile` (`[rows, 16]`).
    fn group_tile(
        &self,
        g: usize,
        acts: &QActs,
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
                unsafe { x86::tile_avx512(self.qtype, w, acts, r0, rows, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if crate::cpu::avx_vnni() => {
                // SAFETY: the CPU has AVX2, FMA and F16C (`isa()` checked at run time) and
                // AVX-VNNI (`avx_vnni()` checked it).
                unsafe { x86::tile_avx_vnni(self.qtype, w, acts, r0, rows, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: the CPU has AVX2, FMA and F16C (`isa()` checked at run time).
                unsafe { x86::tile_avx2(self.qtype, w, acts, r0, rows, tile) }
            }
            _ => scalar::tile(self.qtype, w, acts, r0, rows, tile),
        }
    }
}

/// Stacks repacked weights `(format, n, k, data)` along the output dimension (their groups
/// are contiguous, so the data is concatenated): `None` when the formats or widths differ, or
/// a part but the last has a partial column group. Shared by [`QMatrix::concat`] and
/// [`KMatrix::concat`].
pub(super) fn stack_parts<F: PartialEq + Copy>(
    parts: &[(F, usize, usize, &[u8])],
) -> Option<(F, usize, usize, Vec<u8>)> {
    let &(format, _, k, _) = parts.first()?;
    let last = parts.len() - 1;
    let ok = parts
        .iter()
        .enumerate()
        .all(|(i, p)| p.0 == format && p.2 == k && (i == last || p.1 % COLS == 0));
    if !ok {
        return None;
    }
    let data = parts.iter().flat_map(|p| p.3.iter().copied()).collect();
    Some((format, parts.iter().map(|p| p.1).sum(), k, data))
}

/// The parallel driver of an `[m, n]` product over column groups: `group(g, tile, store)`
/// computes the rows of group `g` (any number of rows at a time, in the item's scratch
/// `tile`, zeroed once per item rather than once per group) and hands each `[rows, 16]` tile
/// to `store(first_row, rows, tile)`, which copies its existing columns into `out`. Items of a few
/// contiguous groups, 4 per thread (16 for 32 rows or more), are claimed from the global pool.
pub(super) fn for_each_group<G>(n: usize, m: usize, out: &mut [f32], group: G)
where
    G: Fn(usize, &mut [f32; COLS * 8], &mut dyn FnMut(usize, usize, &[f32])) + Sync,
{
    let groups = n.div_ceil(COLS);
    let out_ptr = SendPtr(out.as_mut_ptr());
    assert!(out.len() >= m * n, "output size");
    // Many rows (prefill): small items, so that the threads finish together; few rows
    // (decode): a few contiguous groups per item, for the weight prefetcher.
    let per_thread = if m >= 32 { 16 } else { 4 };
    let per = groups
        .div_ceil(pool::global().threads() * per_thread)
        .clamp(1, 64);
    pool::global().run(groups.div_ceil(per), |item| {
        let g0 = item * per;
        let mut tile = [0f32; COLS * 8];
        for g in g0..(g0 + per).min(groups) {
            let cols = (n - g * COLS).min(COLS);
            let mut store = |row0: usize, rows: usize, tile: &[f32]| {
                assert!(row0 + rows <= m && tile.len() >= rows * COLS);
                for r in 0..rows {
                    let dst = out_ptr.get().wrapping_add((row0 + r) * n + g * COLS);
                    // SAFETY: `out` has m × n elements (asserted) and lives until `run`
                    // returns; each (row, column) is written by exactly one item (groups are
                    // split between items). A whole group is a fixed-size copy (two vector
                    // moves, not a call to memmove per row).
                    unsafe {
                        if cols == COLS {
                            (dst as *mut [f32; COLS]).write_unaligned(
                                *(tile[r * COLS..].as_ptr() as *const [f32; COLS]),
                            );
                        } else {
                            std::ptr::copy_nonoverlapping(tile[r * COLS..].as_ptr(), dst, cols);
                        }
                    }
                }
            };
            group(g, &mut tile, &mut store);
        }
    });
}

#[derive(Clone, Copy)]
pub(super) struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint parts of one output from the pool's threads.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Where [`QActs`]' blocks are written from the pool's threads (its buffers, sized).
#[derive(Clone, Copy)]
struct BlockOut {
    qs: SendPtr,
    d: SendPtr,
    s: SendPtr,
    isum: SendPtr,
    blocks: usize,
}

impl BlockOut {
    /// Quantizes the 32 values `xs` into block `bi`.
    ///
    /// # Safety
    /// `bi < self.blocks`, the buffers are alive and unmoved, and no other thread writes
    /// block `bi` at the same time.
    unsafe fn block(&self, bi: usize, xs: &[f32], use_isa: Isa) {
        debug_assert!(bi < self.blocks);
        // SAFETY: block `bi` is inside the sized buffers and written by this caller only.
        let (qs, d, s, isum) = unsafe {
            (
                std::slice::from_raw_parts_mut((self.qs.get() as *mut i8).add(bi * QK), QK),
                &mut *self.d.get().add(bi),
                &mut *self.s.get().add(bi),
                &mut *(self.isum.get() as *mut i32).add(bi),
            )
        };
        match use_isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F/BW/VL (`isa()` checked at run time).
            Isa::Avx512Vnni | Isa::Amx => unsafe { x86::quantize_block_avx512(xs, qs, d, s, isum) },
            _ => quantize_block(xs, qs, d, s, isum),
        }
    }
}

/// Rows of activations quantized to Q8_1 blocks, reused from step to step (no allocation
/// once the buffers have grown to the largest batch).
#[derive(Debug, Clone, Default)]
pub struct QActs {
    m: usize,
    k: usize,
    /// `[m, k]` quants.
    qs: Vec<i8>,
    /// `[m, k/32]` f16-rounded scales, as f32.
    d: Vec<f32>,
    /// `[m, k/32]` f16-rounded `d·Σq`, as f32.
    s: Vec<f32>,
    /// `[m, k/32]` exact `Σq`.
    isum: Vec<i32>,
    /// `[m, k]` quants + 128 as `u8` (AMX's unsigned operand), only for batches of 16 rows or
    /// more on CPUs with AMX; empty otherwise.
    qs_u8: Vec<u8>,
}

impl QActs {
    /// Empty; grows on the first [`QActs::quantize`].
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

    /// Quantizes `x` (`[m, k]` row-major, `k` a multiple of 32), in parallel over rows.
    /// The `u8` copy for AMX is made when the default level is AMX; see also
    /// [`QActs::quantize_for`].
    ///
    /// # Panics
    /// When `k` is not a multiple of 32 or `x.len()` is not a multiple of `k`.
    pub fn quantize(&mut self, x: &[f32], k: usize) {
        self.quantize_for(x, k, isa())
    }

    /// [`QActs::quantize`] for products run at `level` (AMX needs a `u8` copy).
    pub fn quantize_for(&mut self, x: &[f32], k: usize, level: Isa) {
        let out = self.resize_for(x.len(), k);
        let use_isa = level.min(detected());
        // Chunks of at least 256 blocks (a few microseconds of work, about what a parallel
        // loop costs): decode-sized batches are quantized on the caller.
        pool::global().run_chunked(out.blocks, 256, |range| {
            for bi in range {
                // SAFETY: each block index is visited by exactly one item.
                unsafe { out.block(bi, &x[bi * QK..][..QK], use_isa) };
            }
        });
        self.finish(use_isa);
    }

    /// Produces and quantizes rows in one pass: `produce(first_row, rows)` writes whole rows
    /// of `x` (`[m, k]`, `k` a multiple of 32), and each run of rows is quantized right after,
    /// while it is still in cache (fused RMSNorm + quantize). Runs over rows on the compute
    /// pool; the result equals `produce` over all of `x` followed by [`QActs::quantize`].
    ///
    /// # Panics
    /// When `k` is not a multiple of 32 or `x.len()` is not a multiple of `k`.
    pub fn quantize_rows_with<F: Fn(usize, &mut [f32]) + Sync>(
        &mut self,
        x: &mut [f32],
        k: usize,
        produce: F,
    ) {
        let out = self.resize_for(x.len(), k);
        let (kb, use_isa) = (k / QK, isa());
        pool::global().for_rows_mut(x, k, |r0, rows| {
            produce(r0, rows);
            for (j, xs) in rows.chunks(QK).enumerate() {
                // SAFETY: block `r0·kb + j` belongs to this run's rows, which no other run
                // touches.
                unsafe { out.block(r0 * kb + j, xs, use_isa) };
            }
        });
        self.finish(use_isa);
    }

    /// Sizes the buffers for `len` values of rows of `k` and returns where blocks go.
    fn resize_for(&mut self, len: usize, k: usize) -> BlockOut {
        assert!(
            k > 0 && k.is_multiple_of(QK) && len.is_multiple_of(k),
            "activation shape"
        );
        let m = len / k;
        let kb = k / QK;
        self.m = m;
        self.k = k;
        self.qs.resize(m * k, 0);
        self.d.resize(m * kb, 0.0);
        self.s.resize(m * kb, 0.0);
        self.isum.resize(m * kb, 0);
        BlockOut {
            qs: SendPtr(self.qs.as_mut_ptr() as *mut f32),
            d: SendPtr(self.d.as_mut_ptr()),
            s: SendPtr(self.s.as_mut_ptr()),
            isum: SendPtr(self.isum.as_mut_ptr() as *mut f32),
            blocks: m * kb,
        }
    }

    /// The AMX `u8` copy when products run at the AMX level on 16 rows or more.
    fn finish(&mut self, use_isa: Isa) {
        if use_isa == Isa::Amx && self.m >= 16 {
            self.fill_u8();
        } else {
            self.qs_u8.clear();
        }
    }

    /// Fills the `u8` copy that AMX tiles read (`q + 128`).
    fn fill_u8(&mut self) {
        self.qs_u8.resize(self.qs.len(), 0);
        let (src, dst) = (&self.qs, SendPtr(self.qs_u8.as_mut_ptr() as *mut f32));
        pool::global().run_chunked(src.len(), 1 << 14, |range| {
            for i in range {
                // SAFETY: each index is written by one item, inside the resized buffer.
                unsafe { *(dst.get() as *mut u8).add(i) = (src[i] as u8) ^ 0x80 };
            }
        });
    }

    fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..][..self.k]
    }
}

/// llama.cpp's reference `quantize_row_q8_1` for one block (candle's `BlockQ8_1::from_float`):
/// `d = amax/127` rounded to f16, `q = round(x/d)` with the unrounded `d`, and the f16 of
/// `f16(Σq)·f16(d)`.
pub(crate) fn quantize_block(
    xs: &[f32],
    qs: &mut [i8],
    d_out: &mut f32,
    s_out: &mut f32,
    isum: &mut i32,
) {
    let mut amax = 0f32;
    for &x in xs {
        amax = amax.max(x.abs())
    }
    let d = amax / 127.0;
    let id = if d != 0f32 { 1. / d } else { 0. };
    let d16 = f16::from_f32(d);
    let mut sum = 0i32;
    for (q, &x) in qs.iter_mut().zip(xs) {
        *q = f32::round(x * id) as i8;
        sum += *q as i32;
    }
    *d_out = d16.to_f32();
    *s_out = (f16::from_f32(sum as f32) * d16).to_f32();
    *isum = sum;
}

/// The scalar reference: `out[r, j]` for every row of `acts`, from the file's blocks `raw`
/// of a `[n, k]` weight, block by block in order. The kernels must equal it bit for bit.
pub fn matmul_ref(qtype: QType, n: usize, k: usize, raw: &[u8], acts: &QActs) -> Vec<f32> {
    scalar::reference(qtype, n, k, raw, acts)
}

#[cfg(test)]
mod kquants_tests;
#[cfg(test)]
mod tests;
