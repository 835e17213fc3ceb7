//! AVX2 kernels (with FMA and F16C) and the lane-set entry point compiled for them.

use std::arch::x86_64::*;

use super::kernel::{Elem, ElemKind, Kernels, KtTile, attend};
use super::x86::{EXP_C, LN2_HI, LN2_LO, next_block};
use super::{LaneSet, TILE};

/// The lane set with the AVX2 kernels.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; the rest as for [`attend`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_avx2<E: Elem>(
    set: &LaneSet<'_>,
    k: &[E::T],
    v: &[E::T],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are those `Avx2` needs.
    unsafe { attend::<Avx2, E>(set, k, v, scratch) }
}

/// `exp(x)` on 8 lanes, as [`super::x86`]'s `exp512`; `2^n` is built in the exponent bits.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp256(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_C[0]);
    for c in &EXP_C[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
}

/// 8-lane kernels (AVX2 + FMA + F16C); tails in scalar code.
pub(super) struct Avx2;

/// Horizontal sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// Eight elements at `p` widened to f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<E: Elem>(p: *const E::T) -> __m256 {
    // SAFETY: the caller passes 8 readable elements.
    unsafe {
        match E::KIND {
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::Bf16 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
    }
}

/// Scores of `L` lanes against the 16 keys of one group at `k` (`stride` between
/// dimensions), written at `out` (`TILE` apart).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scores256<E: Elem, const L: usize>(
    q: *const f32,
    d: usize,
    k: *const E::T,
    stride: usize,
    scale: f32,
    out: *mut f32,
) {
    // SAFETY (whole body): the caller passes `L` query rows of `d` at `q`, a key group
    // readable for `d` dimensions and `L` output rows of `TILE` at `out`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; L];
        for i in 0..d {
            let k0 = load8::<E>(k.add(i * stride));
            let k1 = load8::<E>(k.add(i * stride + 8));
            for (l, a) in acc.iter_mut().enumerate() {
                let qb = _mm256_set1_ps(*q.add(l * d + i));
                a[0] = _mm256_fmadd_ps(qb, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qb, k1, a[1]);
            }
        }
        let sv = _mm256_set1_ps(scale);
        for (l, a) in acc.iter().enumerate() {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(out.add(l * TILE + 8 * c), _mm256_mul_ps(*x, sv));
            }
        }
    }
}

/// `acc_l[b..b + 8C] = acc_l[b..b + 8C] * corr[l] + Σ_j w[l * TILE + j] * rows[j][b..b + 8C]`
/// for `L` lanes, the accumulators held in registers across the rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pv256<E: Elem, const L: usize, const C: usize>(
    acc: *mut f32,
    d: usize,
    b: usize,
    corr: *const f32,
    w: *const f32,
    rows: &[*const E::T],
) {
    // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
    // `L` factors at `corr`, `L` weight rows of `TILE` at `w`, rows of `d` elements, and
    // `b + 8 * C <= d`.
    unsafe {
        let mut accs = [[_mm256_setzero_ps(); C]; L];
        for (l, a) in accs.iter_mut().enumerate() {
            let cv = _mm256_set1_ps(*corr.add(l));
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm256_mul_ps(_mm256_loadu_ps(acc.add(l * d + b + 8 * c)), cv);
            }
        }
        for (j, &row) in rows.iter().enumerate() {
            let mut vs = [_mm256_setzero_ps(); C];
            for (c, x) in vs.iter_mut().enumerate() {
                *x = load8::<E>(row.add(b + 8 * c));
            }
            for (l, a) in accs.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*w.add(l * TILE + j));
                for (x, v) in a.iter_mut().zip(&vs) {
                    *x = _mm256_fmadd_ps(wv, *v, *x);
                }
            }
        }
        for (l, a) in accs.iter().enumerate() {
            for (c, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(l * d + b + 8 * c), *x);
            }
        }
    }
}

/// [`pv256`] over all columns of `L` lanes: 16 at a time, then 8, then scalar.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pv256_lanes<E: Elem, const L: usize>(
    acc: *mut f32,
    d: usize,
    corr: *const f32,
    w: *const f32,
    rows: &[*const E::T],
) {
    // SAFETY: as for `pv256`, every block stays below `d`.
    unsafe {
        let mut b = 0;
        while b + 16 <= d {
            pv256::<E, L, 2>(acc, d, b, corr, w, rows);
            b += 16;
        }
        if b + 8 <= d {
            pv256::<E, L, 1>(acc, d, b, corr, w, rows);
            b += 8;
        }
        for l in 0..L {
            for x in b..d {
                let mut a = *acc.add(l * d + x) * *corr.add(l);
                for (j, &row) in rows.iter().enumerate() {
                    a += *w.add(l * TILE + j) * E::to_f32(*row.add(x));
                }
                *acc.add(l * d + x) = a;
            }
        }
    }
}

impl Kernels for Avx2 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut off = 0;
        while off < bytes {
            // A hint: it never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
            off += 64;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scores<E: Elem>(q: &[f32], d: usize, kt: KtTile<E::T>, scale: f32, out: &mut [f32]) {
        let lanes = q.len() / d;
        if lanes == 0 {
            return;
        }
        assert!(
            (1..=2).contains(&kt.n_groups) && out.len() >= (lanes - 1) * TILE + 16 * kt.n_groups
        );
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        // SAFETY: lanes `l..l + L` are inside `q` and `out` (asserted above); the caller
        // guarantees the key tile.
        unsafe {
            for g in 0..kt.n_groups {
                let (k, s) = (kt.groups[g], kt.stride);
                let mut l = 0;
                while l < lanes {
                    let n = next_block(lanes - l, 6);
                    let (q, o) = (qp.add(l * d), op.add(l * TILE + 16 * g));
                    match n {
                        6 => scores256::<E, 6>(q, d, k, s, scale, o),
                        4 => scores256::<E, 4>(q, d, k, s, scale, o),
                        3 => scores256::<E, 3>(q, d, k, s, scale, o),
                        2 => scores256::<E, 2>(q, d, k, s, scale, o),
                        _ => scores256::<E, 1>(q, d, k, s, scale, o),
                    }
                    l += n;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn pv<E: Elem>(
        acc: &mut [f32],
        d: usize,
        corr: &[f32],
        w: &[f32],
        rows: &[*const E::T],
    ) {
        let lanes = acc.len() / d;
        if lanes == 0 {
            return;
        }
        assert!(rows.len() <= TILE && corr.len() >= lanes);
        assert!(w.len() >= (lanes - 1) * TILE + rows.len());
        let (a, c, w) = (acc.as_mut_ptr(), corr.as_ptr(), w.as_ptr());
        let mut l = 0;
        // SAFETY: lanes `l..l + L` are inside `acc`, `corr` and `w` (asserted above); the
        // caller guarantees the rows.
        unsafe {
            while l < lanes {
                let n = next_block(lanes - l, 4);
                let (a, c, w) = (a.add(l * d), c.add(l), w.add(l * TILE));
                match n {
                    4 => pv256_lanes::<E, 4>(a, d, c, w, rows),
                    3 => pv256_lanes::<E, 3>(a, d, c, w, rows),
                    2 => pv256_lanes::<E, 2>(a, d, c, w, rows),
                    _ => pv256_lanes::<E, 1>(a, d, c, w, rows),
                }
                l += n;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn max(s: &[f32]) -> f32 {
        let (p, n) = (s.as_ptr(), s.len());
        let mut i = 0;
        let mut best = f32::NEG_INFINITY;
        // SAFETY: accesses stay inside `s`.
        unsafe {
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            while i + 8 <= n {
                m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            for x in lanes {
                best = best.max(x);
            }
        }
        s[i..].iter().fold(best, |a, &b| a.max(b))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
        let (p, n) = (s.as_mut_ptr(), s.len());
        let mut i = 0;
        let mut total;
        // SAFETY: accesses stay inside `s`.
        unsafe {
            let mv = _mm256_set1_ps(m);
            let mut sum = _mm256_setzero_ps();
            while i + 8 <= n {
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
                _mm256_storeu_ps(p.add(i), e);
                sum = _mm256_add_ps(sum, e);
                i += 8;
            }
            total = hsum256(sum);
        }
        for x in s[i..].iter_mut() {
            *x = (*x - m).exp();
            total += *x;
        }
        total
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let d = src.len().min(dst.len());
        let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        // SAFETY: accesses stay inside the first `d` elements of both slices.
        unsafe {
            while i + 8 <= d {
                let h = _mm_loadu_si128(s.add(i) as *const __m128i);
                _mm256_storeu_ps(o.add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
        }
        for x in i..d {
            dst[x] = half::f16::from_bits(src[x]).to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        let d = src.len().min(dst.len());
        let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        // SAFETY: accesses stay inside the first `d` elements of both slices.
        unsafe {
            while i + 8 <= d {
                let h = _mm_loadu_si128(s.add(i) as *const __m128i);
                let x = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                _mm256_storeu_ps(o.add(i), _mm256_castsi256_ps(x));
                i += 8;
            }
        }
        for x in i..d {
            dst[x] = f32::from_bits((src[x] as u32) << 16);
        }
    }
}
