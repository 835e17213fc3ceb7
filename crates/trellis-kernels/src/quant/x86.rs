//! AVX-512 VNNI and AVX2 tiles: one group of 16 columns × up to 8 rows, all blocks of K.
//!
//! Per block, the group's weights are loaded (and for 4-bit formats split into nibbles) once
//! and reused by every row of the tile; per row, eight `vpdpbusd` (AVX2: `vpmaddubsw` +
//! `vpmaddwd`) give the 16 exact integer sums, then the reference float expression runs in
//! the 16 lanes with separate multiplies and adds.

use std::arch::x86_64::*;

use super::{COLS, QActs, QK, QType};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;

fn code(q: QType) -> u8 {
    match q {
        QType::Q4_0 => Q4_0,
        QType::Q4_1 => Q4_1,
        QType::Q8_0 => Q8_0,
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $q:expr, $($args:expr),*) => {
        match $q {
            Q4_0 => dispatch_rows!(@rows $f, Q4_0, $($args),*),
            Q4_1 => dispatch_rows!(@rows $f, Q4_1, $($args),*),
            _ => dispatch_rows!(@rows $f, Q8_0, $($args),*),
        }
    };
    (@rows $f:ident, $q:ident, $w:expr, $acts:expr, $r0:expr, $rows:expr, $tile:expr) => {
        // SAFETY: forwarded from the caller's contract (the CPU features are present).
        unsafe {
            match $rows {
                1 => $f::<$q, 1>($w, $acts, $r0, $tile),
                2 => $f::<$q, 2>($w, $acts, $r0, $tile),
                3 => $f::<$q, 3>($w, $acts, $r0, $tile),
                4 => $f::<$q, 4>($w, $acts, $r0, $tile),
                5 => $f::<$q, 5>($w, $acts, $r0, $tile),
                6 => $f::<$q, 6>($w, $acts, $r0, $tile),
                7 => $f::<$q, 7>($w, $acts, $r0, $tile),
                _ => $f::<$q, 8>($w, $acts, $r0, $tile),
            }
        }
    };
}

/// How far ahead of the block being computed its successors are prefetched. Weights stream
/// from memory once per step (decode reads ~100 MB): without this, each block's loads stall
/// and the arithmetic of small batches does not overlap them.
fn prefetch_bytes() -> usize {
    static PF: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PF.get_or_init(|| {
        std::env::var("TRELLIS_PREFETCH_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
    })
}

/// Prefetches the cache lines `TRELLIS_PREFETCH_BYTES` (default 2048) after the `len` bytes at `p` (the next group's
/// blocks when `p` is near a group's end: the items of a product are contiguous groups).
#[inline(always)]
fn prefetch_ahead(p: *const u8, len: usize) {
    let pf = prefetch_bytes();
    if pf == 0 {
        return;
    }
    let ahead = p.wrapping_add(pf);
    let mut off = 0;
    while off < len {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8) };
        off += 64;
    }
}

/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI; `w` is one repacked group of `qtype` for
/// `acts.k` inputs; rows `r0..r0+rows` exist in `acts`; `1 <= rows <= 8`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn tile_avx512(
    qtype: QType,
    w: &[u8],
    acts: &QActs,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    debug_assert!(w.len() >= acts.k / QK * qtype.group_block_bytes());
    dispatch_rows!(tile512, code(qtype), w, acts, r0, rows, tile)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
unsafe fn tile512<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActs,
    r0: usize,
    tile: &mut [f32; COLS * 8],
) {
    let k = acts.k;
    let kb = k / QK;
    let (qb, gbb) = match Q {
        Q4_0 => (256, 288),
        Q4_1 => (256, 320),
        _ => (512, 544),
    };
    let shift = match Q {
        Q4_0 => 3,
        _ => 7,
    };
    let mut acc = [_mm512_setzero_ps(); 8];
    let wp = w.as_ptr();
    let nib = _mm512_set1_epi8(0x0F);
    // SAFETY (whole function): rows r0..r0+R exist in `acts` (caller), so the row pointers
    // and the per-block offsets below stay inside `qs`, `d`, `s` and `isum`.
    let qs = unsafe { acts.qs.as_ptr().add(r0 * k) };
    let dp = unsafe { acts.d.as_ptr().add(r0 * kb) };
    let sp = unsafe { acts.s.as_ptr().add(r0 * kb) };
    let ip = unsafe { acts.isum.as_ptr().add(r0 * kb) };
    for b in 0..kb {
        // SAFETY (whole block): offsets stay inside the group (`kb` blocks of `gbb` bytes)
        // and inside the activation rows (`k` quants and `kb` scales per row).
        let blk = unsafe { wp.add(b * gbb) };
        prefetch_ahead(blk, gbb);
        let mut wv = [_mm512_setzero_si512(); 8];
        if Q == Q8_0 {
            for (s, v) in wv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_si512(blk.add(64 * s) as *const _) };
            }
        } else {
            for j in 0..4 {
                let raw = unsafe { _mm512_loadu_si512(blk.add(64 * j) as *const _) };
                wv[j] = _mm512_and_si512(raw, nib);
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
            }
        }
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(qb) as *const _) });
        let mw = if Q == Q4_1 {
            _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(qb + 32) as *const _) })
        } else {
            _mm512_setzero_ps()
        };
        // One row: two independent chains of four `vpdpbusd` (integer sums are exact, so the
        // split changes nothing), then the reference float expression.
        let row = |r: usize, acc: __m512| -> __m512 {
            let a = unsafe { qs.add(r * k + b * QK) } as *const i32;
            let bc = |s: usize| _mm512_set1_epi32(unsafe { a.add(s).read_unaligned() });
            let mut s0 = if Q == Q4_1 {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(-(unsafe { *ip.add(r * kb + b) } << shift))
            };
            let mut s1 = _mm512_setzero_si512();
            s0 = _mm512_dpbusd_epi32(s0, wv[0], bc(0));
            s1 = _mm512_dpbusd_epi32(s1, wv[1], bc(1));
            s0 = _mm512_dpbusd_epi32(s0, wv[2], bc(2));
            s1 = _mm512_dpbusd_epi32(s1, wv[3], bc(3));
            s0 = _mm512_dpbusd_epi32(s0, wv[4], bc(4));
            s1 = _mm512_dpbusd_epi32(s1, wv[5], bc(5));
            s0 = _mm512_dpbusd_epi32(s0, wv[6], bc(6));
            s1 = _mm512_dpbusd_epi32(s1, wv[7], bc(7));
            let sum = _mm512_add_epi32(s0, s1);
            let da = _mm512_set1_ps(unsafe { *dp.add(r * kb + b) });
            let t = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), dw), da);
            let t = if Q == Q4_1 {
                let sa = _mm512_set1_ps(unsafe { *sp.add(r * kb + b) });
                _mm512_add_ps(t, _mm512_mul_ps(mw, sa))
            } else {
                t
            };
            _mm512_add_ps(acc, t)
        };
        // Constant indices only, so the accumulators stay in registers.
        macro_rules! rows {
            ($($r:literal)*) => { $( if R > $r { acc[$r] = row($r, acc[$r]); } )* };
        }
        rows!(0 1 2 3 4 5 6 7);
    }
    for (r, a) in acc.iter().enumerate().take(R) {
        // SAFETY: 16 floats into row r of the 8 × 16 tile.
        unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add(r * COLS), *a) };
    }
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C; otherwise as [`tile_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2(
    qtype: QType,
    w: &[u8],
    acts: &QActs,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    debug_assert!(w.len() >= acts.k / QK * qtype.group_block_bytes());
    dispatch_rows!(tile256, code(qtype), w, acts, r0, rows, tile)
}

/// Both halves (columns 0..8 and 8..16) of the group, one after the other.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActs,
    r0: usize,
    tile: &mut [f32; COLS * 8],
) {
    for half in 0..2 {
        // SAFETY: forwarded.
        unsafe { half256::<Q, R>(w, acts, r0, tile, half) };
    }
}

/// [`tile_avx2`] with AVX-VNNI's `vpdpbusd` (256-bit, VEX) for the integer sums: the same
/// bits (the sums are exact either way), one instruction where AVX2 needs three.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-VNNI; otherwise as [`tile_avx512`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn tile_avx_vnni(
    qtype: QType,
    w: &[u8],
    acts: &QActs,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    debug_assert!(w.len() >= acts.k / QK * qtype.group_block_bytes());
    dispatch_rows!(tile256_vnni, code(qtype), w, acts, r0, rows, tile)
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn tile256_vnni<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActs,
    r0: usize,
    tile: &mut [f32; COLS * 8],
) {
    for half in 0..2 {
        // SAFETY: forwarded.
        unsafe { half256_vnni::<Q, R>(w, acts, r0, tile, half) };
    }
}

/// One half (8 of the 16 columns) of an AVX2-level tile, defined twice: with `vpmaddubsw` (AVX2)
/// and with AVX-VNNI's 256-bit `vpdpbusd` for the integer sums. The float epilogue is the same
/// code, and the integer sums are exact either way, so both give the scalar reference's bits.
macro_rules! half256_fn {
    ($name:ident, $features:literal, $vnni:literal) => {
        #[target_feature(enable = $features)]
        #[allow(unused_unsafe)]
        unsafe fn $name<const Q: u8, const R: usize>(
            w: &[u8],
            acts: &QActs,
            r0: usize,
            tile: &mut [f32; COLS * 8],
            half: usize,
        ) {
            let k = acts.k;
            let kb = k / QK;
            let (qb, gbb) = match Q {
                Q4_0 => (256, 288),
                Q4_1 => (256, 320),
                _ => (512, 544),
            };
            let shift = match Q {
                Q4_0 => 3,
                _ => 7,
            };
            let mut acc = [_mm256_setzero_ps(); R];
            let wp = w.as_ptr();
            let qs = acts.qs.as_ptr();
            let nib = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            for b in 0..kb {
                // SAFETY (whole block): as in `tile512`; `32 * half` selects 8 of the 16 lanes.
                let blk = unsafe { wp.add(b * gbb) };
                if half == 0 {
                    prefetch_ahead(blk, gbb);
                }
                let mut wv = [_mm256_setzero_si256(); 8];
                if Q == Q8_0 {
                    for (s, v) in wv.iter_mut().enumerate() {
                        let u =
                            unsafe { _mm256_loadu_si256(blk.add(64 * s + 32 * half) as *const _) };
                        // VNNI multiplies the stored u8 (w + 128) and corrects with the activation sum;
                        // maddubs needs the signed weights back for the sign trick (no u8 × i8 overflow).
                        *v = if $vnni { u } else { _mm256_xor_si256(u, flip) };
                    }
                } else {
                    for j in 0..4 {
                        let raw =
                            unsafe { _mm256_loadu_si256(blk.add(64 * j + 32 * half) as *const _) };
                        wv[j] = _mm256_and_si256(raw, nib);
                        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
                    }
                }
                let dw = _mm256_cvtph_ps(unsafe {
                    _mm_loadu_si128(blk.add(qb + 16 * half) as *const _)
                });
                let mw = if Q == Q4_1 {
                    _mm256_cvtph_ps(unsafe {
                        _mm_loadu_si128(blk.add(qb + 32 + 16 * half) as *const _)
                    })
                } else {
                    _mm256_setzero_ps()
                };
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let row = r0 + r;
                    let i = row * kb + b;
                    let a = unsafe { qs.add(row * k + b * QK) };
                    let sum = if $vnni {
                        // u8 weights × i8 activations, four products per i32 lane (exact), in two
                        // chains, then the offset of the stored weights taken out (as `tile512`).
                        let bc = |s: usize| {
                            _mm256_set1_epi32(unsafe {
                                (a.add(4 * s) as *const i32).read_unaligned()
                            })
                        };
                        let mut s0 = if Q == Q4_1 {
                            _mm256_setzero_si256()
                        } else {
                            _mm256_set1_epi32(-(unsafe { *acts.isum.get_unchecked(i) } << shift))
                        };
                        let mut s1 = _mm256_setzero_si256();
                        for s in (0..8).step_by(2) {
                            s0 = unsafe { _mm256_dpbusd_avx_epi32(s0, wv[s], bc(s)) };
                            s1 = unsafe { _mm256_dpbusd_avx_epi32(s1, wv[s + 1], bc(s + 1)) };
                        }
                        _mm256_add_epi32(s0, s1)
                    } else if Q == Q8_0 {
                        let mut sum = _mm256_setzero_si256();
                        for (s, v) in wv.iter().enumerate() {
                            let a4 = _mm256_set1_epi32(unsafe {
                                (a.add(4 * s) as *const i32).read_unaligned()
                            });
                            // |w| · (a · sign(w)): at most 2 · 128 · 127 per i16, exact.
                            let p = _mm256_maddubs_epi16(
                                _mm256_sign_epi8(*v, *v),
                                _mm256_sign_epi8(a4, *v),
                            );
                            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
                        }
                        sum
                    } else {
                        // 4-bit: eight i16 partial sums of at most 2 · 15 · 128 each fit in i16.
                        let mut s16 = _mm256_setzero_si256();
                        for (s, v) in wv.iter().enumerate() {
                            let a4 = _mm256_set1_epi32(unsafe {
                                (a.add(4 * s) as *const i32).read_unaligned()
                            });
                            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*v, a4));
                        }
                        let sum = _mm256_madd_epi16(s16, ones);
                        if Q == Q4_0 {
                            _mm256_sub_epi32(
                                sum,
                                _mm256_set1_epi32(unsafe { *acts.isum.get_unchecked(i) } << shift),
                            )
                        } else {
                            sum
                        }
                    };
                    let da = _mm256_set1_ps(unsafe { *acts.d.get_unchecked(i) });
                    let t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), dw), da);
                    let t = if Q == Q4_1 {
                        let sa = _mm256_set1_ps(unsafe { *acts.s.get_unchecked(i) });
                        _mm256_add_ps(t, _mm256_mul_ps(mw, sa))
                    } else {
                        t
                    };
                    *acc_r = _mm256_add_ps(*acc_r, t);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: 8 floats into row r, half `half`, of the 8 × 16 tile.
                unsafe { _mm256_storeu_ps(tile.as_mut_ptr().add(r * COLS + 8 * half), *a) };
            }
        }
    };
}

half256_fn!(half256, "avx2,fma,f16c", false);
half256_fn!(half256_vnni, "avx2,fma,f16c,avxvnni", true);

/// [`super::quantize_block`] with AVX-512: the same values bit for bit (`f32::round` is
/// rounding half away from zero, done here as truncation plus a correction).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL; `xs` and `qs` hold 32 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_block_avx512(
    xs: &[f32],
    qs: &mut [i8],
    d_out: &mut f32,
    s_out: &mut f32,
    isum: &mut i32,
) {
    use half::f16;
    assert!(xs.len() >= QK && qs.len() >= QK);
    // SAFETY: 32 floats are read from `xs` (checked above).
    let (x0, x1) = unsafe {
        (
            _mm512_loadu_ps(xs.as_ptr()),
            _mm512_loadu_ps(xs.as_ptr().add(16)),
        )
    };
    // max(|x|) is exact whatever the order.
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    let d = amax / 127.0;
    let id = if d != 0f32 { 1. / d } else { 0. };
    let d16 = f16::from_f32(d);
    let idv = _mm512_set1_ps(id);
    let round = |x: __m512| -> __m512i {
        let v = _mm512_mul_ps(x, idv);
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        // |v - t| is exact; at least a half rounds away from zero.
        let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let one = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(_mm512_set1_ps(1.0)),
            sign,
        ));
        _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, one))
    };
    let (q0, q1) = (round(x0), round(x1));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    // SAFETY: 16 + 16 bytes are written to `qs` (checked above).
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(
            qs.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtepi32_epi8(q1),
        );
    }
    *d_out = d16.to_f32();
    *s_out = (f16::from_f32(sum as f32) * d16).to_f32();
    *isum = sum;
}
