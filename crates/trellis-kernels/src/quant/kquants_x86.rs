//! AVX-512 VNNI and AVX2 K-quant tiles: one group of 16 columns × up to 8 rows, all
//! super-blocks of K.
//!
//! Per super-block and lane `l` (input position mod 8), each block of 32's weights are
//! unpacked once (nibbles, plus the 5th or 5th/6th bits) and reused by every row: per row one
//! `vpmaddubsw` (u8 quants × 4 i8 activations broadcast: two i16 pair sums per column, exact)
//! and one `vpdpwssd` (AVX2: `vpmaddwd` + `vpaddd`) by the i16 scale pair, into the lane's
//! exact integer sum. Q6_K subtracts `32·Σa` per pair (precomputed in [`QActsK`]) before the
//! scale. Then the reference float expression in the 16 (8) column lanes, separate mul/add.

use std::arch::x86_64::*;

use super::COLS;
use super::kquants::{KType, QActsK, QK_K};
use super::kquants_scalar::finish;

const Q4K: u8 = 0;
const Q5K: u8 = 1;
const Q6K: u8 = 2;

fn code(k: KType) -> u8 {
    match k {
        KType::Q4K => Q4K,
        KType::Q5K => Q5K,
        KType::Q6K => Q6K,
    }
}

fn ktype(q: u8) -> KType {
    match q {
        Q4K => KType::Q4K,
        Q5K => KType::Q5K,
        _ => KType::Q6K,
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $q:expr, $($args:expr),*) => {
        match $q {
            Q4K => dispatch_rows!(@rows $f, Q4K, $($args),*),
            Q5K => dispatch_rows!(@rows $f, Q5K, $($args),*),
            _ => dispatch_rows!(@rows $f, Q6K, $($args),*),
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

/// Writes row `r`'s final values from the per-lane float state (`st[l]`, 8 lanes + `sumf`).
fn finish_row(kt: KType, st: &[[f32; COLS]; 9], cols: std::ops::Range<usize>, out: &mut [f32]) {
    for c in cols {
        let sums = [
            st[0][c], st[1][c], st[2][c], st[3][c], st[4][c], st[5][c], st[6][c], st[7][c],
        ];
        out[c] = finish(kt, st[8][c], &sums);
    }
}

/// # Safety
/// The CPU must have AVX-512 F, BW, VL and VNNI; `w` is one repacked group of `ktype` for
/// `acts.k` inputs; rows `r0..r0+rows` exist in `acts`; `1 <= rows <= 8`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
pub(super) unsafe fn tile_avx512(
    ktype: KType,
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    debug_assert!(w.len() >= acts.k / QK_K * ktype.group_block_bytes());
    dispatch_rows!(tile512, code(ktype), w, acts, r0, rows, tile)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
#[allow(clippy::needless_range_loop)] // rows and lanes index several arrays at once
unsafe fn tile512<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    tile: &mut [f32; COLS * 8],
) {
    let kt = ktype(Q);
    let k = acts.k;
    let kb = k / QK_K;
    let gbb = kt.group_block_bytes();
    let (sc, mn, doff, hi) = (kt.sc_off(), kt.min_off(), kt.d_off(), KType::HI);
    let mut st = [[_mm512_setzero_ps(); 9]; R];
    let wp = w.as_ptr();
    let qs = acts.qs.as_ptr();
    let nib = _mm512_set1_epi8(0x0F);
    for b in 0..kb {
        // SAFETY (whole block): offsets stay inside the group (`kb` blocks of `gbb` bytes)
        // and inside the activation rows (`k` quants, `k/4` offset pairs, `k/32` sums per row).
        let blk = unsafe { wp.add(b * gbb) };
        let ld = |off: usize| unsafe { _mm512_loadu_si512(blk.add(off) as *const _) };
        let ld16 = |off: usize| unsafe { _mm_loadu_si128(blk.add(off) as *const _) };
        let mut scv = [_mm512_setzero_si512(); 8];
        for (s, v) in scv.iter_mut().enumerate() {
            *v = if Q == Q6K {
                let lo = _mm512_cvtepi8_epi32(ld16(sc + 32 * s));
                let hi = _mm512_cvtepi8_epi32(ld16(sc + 32 * s + 16));
                _mm512_or_si512(
                    _mm512_and_si512(lo, _mm512_set1_epi32(0xFFFF)),
                    _mm512_slli_epi32::<16>(hi),
                )
            } else {
                let x = _mm512_cvtepu8_epi32(ld16(sc + 16 * s));
                _mm512_or_si512(x, _mm512_slli_epi32::<16>(x))
            };
        }
        let dx = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(doff) as *const _) });
        let mut dy = [0f32; R];
        let mut dr = [_mm512_setzero_ps(); R];
        for r in 0..R {
            dy[r] = unsafe { *acts.d.get_unchecked((r0 + r) * kb + b) };
            dr[r] = _mm512_mul_ps(dx, _mm512_set1_ps(dy[r]));
        }
        for l in 0..8 {
            let mut acc = [_mm512_setzero_si512(); R];
            let (qh0, qh1) = match Q {
                Q5K => (ld(hi + 64 * l), _mm512_setzero_si512()),
                Q6K => (ld(hi + 64 * l), ld(hi + 64 * (8 + l))),
                _ => (_mm512_setzero_si512(), _mm512_setzero_si512()),
            };
            for j in 0..4 {
                let raw = ld(64 * (8 * j + l));
                let pair = [
                    _mm512_and_si512(raw, nib),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nib),
                ];
                for (h, v) in pair.into_iter().enumerate() {
                    let s = 2 * j + h;
                    let v = match Q {
                        Q5K => {
                            let m = _mm512_test_epi8_mask(qh0, _mm512_set1_epi8(1 << s));
                            _mm512_mask_add_epi8(v, m, v, _mm512_set1_epi8(16))
                        }
                        Q6K => {
                            let q = if s < 4 { qh0 } else { qh1 };
                            let x = match s % 4 {
                                0 => _mm512_slli_epi16::<4>(q),
                                1 => _mm512_slli_epi16::<2>(q),
                                2 => q,
                                _ => _mm512_srli_epi16::<2>(q),
                            };
                            _mm512_or_si512(v, _mm512_and_si512(x, _mm512_set1_epi8(0x30)))
                        }
                        _ => v,
                    };
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let row = r0 + r;
                        let a4 = unsafe {
                            (qs.add(row * k + b * QK_K + 32 * s + 4 * l) as *const i32)
                                .read_unaligned()
                        };
                        let mut p = _mm512_maddubs_epi16(v, _mm512_set1_epi32(a4));
                        if Q == Q6K {
                            let c =
                                unsafe { *acts.c32.get_unchecked((row * kb + b) * 64 + 8 * s + l) };
                            p = _mm512_sub_epi16(p, _mm512_set1_epi32(c));
                        }
                        *acc_r = _mm512_dpwssd_epi32(*acc_r, p, scv[s]);
                    }
                }
            }
            for r in 0..R {
                st[r][l] =
                    _mm512_add_ps(st[r][l], _mm512_mul_ps(dr[r], _mm512_cvtepi32_ps(acc[r])));
            }
        }
        if Q != Q6K {
            let dminx =
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(doff + 32) as *const _) });
            let mut mp = [_mm512_setzero_si512(); 4];
            for (p, v) in mp.iter_mut().enumerate() {
                let lo = _mm512_cvtepu8_epi32(ld16(mn + 32 * p));
                let hi = _mm512_cvtepu8_epi32(ld16(mn + 32 * p + 16));
                *v = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            }
            for r in 0..R {
                let bs = unsafe { acts.bs32.as_ptr().add(((r0 + r) * kb + b) * 8) };
                let mut summ = _mm512_setzero_si512();
                for (p, v) in mp.iter().enumerate() {
                    let pair = unsafe { (bs.add(2 * p) as *const i32).read_unaligned() };
                    summ = _mm512_dpwssd_epi32(summ, *v, _mm512_set1_epi32(pair));
                }
                let dmin = _mm512_mul_ps(dminx, _mm512_set1_ps(dy[r]));
                st[r][8] = _mm512_sub_ps(st[r][8], _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(summ)));
            }
        }
    }
    for (r, st_r) in st.iter().enumerate() {
        let mut buf = [[0f32; COLS]; 9];
        for (x, v) in buf.iter_mut().zip(st_r) {
            // SAFETY: 16 floats into a 16-float row.
            unsafe { _mm512_storeu_ps(x.as_mut_ptr(), *v) };
        }
        finish_row(kt, &buf, 0..COLS, &mut tile[r * COLS..(r + 1) * COLS]);
    }
}

/// # Safety
/// The CPU must have AVX2, FMA and F16C; otherwise as [`tile_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2(
    ktype: KType,
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    debug_assert!(w.len() >= acts.k / QK_K * ktype.group_block_bytes());
    dispatch_rows!(tile256, code(ktype), w, acts, r0, rows, tile)
}

/// Both halves (columns 0..8 and 8..16) of the group, one after the other.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    tile: &mut [f32; COLS * 8],
) {
    for half in 0..2 {
        // SAFETY: forwarded.
        unsafe { half256::<Q, R>(w, acts, r0, tile, half) };
    }
}

/// The 5th bit of block `s` (bit `s` of each byte of `qh`) moved to bit 4.
#[target_feature(enable = "avx2")]
fn bit5(qh: __m256i, s: usize) -> __m256i {
    let x = match s {
        0 => _mm256_slli_epi16::<4>(qh),
        1 => _mm256_slli_epi16::<3>(qh),
        2 => _mm256_slli_epi16::<2>(qh),
        3 => _mm256_slli_epi16::<1>(qh),
        4 => qh,
        5 => _mm256_srli_epi16::<1>(qh),
        6 => _mm256_srli_epi16::<2>(qh),
        _ => _mm256_srli_epi16::<3>(qh),
    };
    _mm256_and_si256(x, _mm256_set1_epi8(0x10))
}

/// Bits `2u..2u+2` of each byte of `qh` moved to bits 4..6.
#[target_feature(enable = "avx2")]
fn bits56(qh: __m256i, u: usize) -> __m256i {
    let x = match u {
        0 => _mm256_slli_epi16::<4>(qh),
        1 => _mm256_slli_epi16::<2>(qh),
        2 => qh,
        _ => _mm256_srli_epi16::<2>(qh),
    };
    _mm256_and_si256(x, _mm256_set1_epi8(0x30))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // rows and lanes index several arrays at once
unsafe fn half256<const Q: u8, const R: usize>(
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    tile: &mut [f32; COLS * 8],
    half: usize,
) {
    let kt = ktype(Q);
    let k = acts.k;
    let kb = k / QK_K;
    let gbb = kt.group_block_bytes();
    let (sc, mn, doff, hi) = (kt.sc_off(), kt.min_off(), kt.d_off(), KType::HI);
    let mut st = [[_mm256_setzero_ps(); 9]; R];
    let wp = w.as_ptr();
    let qs = acts.qs.as_ptr();
    let nib = _mm256_set1_epi8(0x0F);
    for b in 0..kb {
        // SAFETY (whole block): as in `tile512`; `32 * half` (vectors), `8 * half` (bytes per
        // column) and `16 * half` (f16 per column) select 8 of the 16 columns.
        let blk = unsafe { wp.add(b * gbb) };
        let ld = |off: usize| unsafe { _mm256_loadu_si256(blk.add(off + 32 * half) as *const _) };
        let ld8 = |off: usize| unsafe { _mm_loadl_epi64(blk.add(off + 8 * half) as *const _) };
        let mut scv = [_mm256_setzero_si256(); 8];
        for (s, v) in scv.iter_mut().enumerate() {
            *v = if Q == Q6K {
                let lo = _mm256_cvtepi8_epi32(ld8(sc + 32 * s));
                let hi = _mm256_cvtepi8_epi32(ld8(sc + 32 * s + 16));
                _mm256_or_si256(
                    _mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)),
                    _mm256_slli_epi32::<16>(hi),
                )
            } else {
                let x = _mm256_cvtepu8_epi32(ld8(sc + 16 * s));
                _mm256_or_si256(x, _mm256_slli_epi32::<16>(x))
            };
        }
        let dx = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(blk.add(doff + 16 * half) as *const _) });
        let mut dy = [0f32; R];
        let mut dr = [_mm256_setzero_ps(); R];
        for r in 0..R {
            dy[r] = unsafe { *acts.d.get_unchecked((r0 + r) * kb + b) };
            dr[r] = _mm256_mul_ps(dx, _mm256_set1_ps(dy[r]));
        }
        for l in 0..8 {
            let mut acc = [_mm256_setzero_si256(); R];
            let (qh0, qh1) = match Q {
                Q5K => (ld(hi + 64 * l), _mm256_setzero_si256()),
                Q6K => (ld(hi + 64 * l), ld(hi + 64 * (8 + l))),
                _ => (_mm256_setzero_si256(), _mm256_setzero_si256()),
            };
            for j in 0..4 {
                let raw = ld(64 * (8 * j + l));
                let pair = [
                    _mm256_and_si256(raw, nib),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nib),
                ];
                for (h, v) in pair.into_iter().enumerate() {
                    let s = 2 * j + h;
                    let v = match Q {
                        Q5K => _mm256_or_si256(v, bit5(qh0, s)),
                        Q6K => _mm256_or_si256(v, bits56(if s < 4 { qh0 } else { qh1 }, s % 4)),
                        _ => v,
                    };
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let row = r0 + r;
                        let a4 = unsafe {
                            (qs.add(row * k + b * QK_K + 32 * s + 4 * l) as *const i32)
                                .read_unaligned()
                        };
                        let mut p = _mm256_maddubs_epi16(v, _mm256_set1_epi32(a4));
                        if Q == Q6K {
                            let c =
                                unsafe { *acts.c32.get_unchecked((row * kb + b) * 64 + 8 * s + l) };
                            p = _mm256_sub_epi16(p, _mm256_set1_epi32(c));
                        }
                        *acc_r = _mm256_add_epi32(*acc_r, _mm256_madd_epi16(p, scv[s]));
                    }
                }
            }
            for r in 0..R {
                st[r][l] =
                    _mm256_add_ps(st[r][l], _mm256_mul_ps(dr[r], _mm256_cvtepi32_ps(acc[r])));
            }
        }
        if Q != Q6K {
            let dminx = _mm256_cvtph_ps(unsafe {
                _mm_loadu_si128(blk.add(doff + 32 + 16 * half) as *const _)
            });
            let mut mp = [_mm256_setzero_si256(); 4];
            for (p, v) in mp.iter_mut().enumerate() {
                let lo = _mm256_cvtepu8_epi32(ld8(mn + 32 * p));
                let hi = _mm256_cvtepu8_epi32(ld8(mn + 32 * p + 16));
                *v = _mm256_or_si256(lo, _mm256_slli_epi32::<16>(hi));
            }
            for r in 0..R {
                let bs = unsafe { acts.bs32.as_ptr().add(((r0 + r) * kb + b) * 8) };
                let mut summ = _mm256_setzero_si256();
                for (p, v) in mp.iter().enumerate() {
                    let pair = unsafe { (bs.add(2 * p) as *const i32).read_unaligned() };
                    summ = _mm256_add_epi32(summ, _mm256_madd_epi16(*v, _mm256_set1_epi32(pair)));
                }
                let dmin = _mm256_mul_ps(dminx, _mm256_set1_ps(dy[r]));
                st[r][8] = _mm256_sub_ps(st[r][8], _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(summ)));
            }
        }
    }
    for (r, st_r) in st.iter().enumerate() {
        let mut buf = [[0f32; COLS]; 9];
        for (x, v) in buf.iter_mut().zip(st_r) {
            // SAFETY: 8 floats into the chosen half of a 16-float row.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr().add(8 * half), *v) };
        }
        finish_row(
            kt,
            &buf,
            8 * half..8 * half + 8,
            &mut tile[r * COLS..(r + 1) * COLS],
        );
    }
}
