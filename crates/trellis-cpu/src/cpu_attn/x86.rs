//! AVX-512 kernels and the lane-set entry point compiled for them (the AVX2 ones are in
//! [`super::avx2`]).

use std::arch::x86_64::*;

use super::kernel::{Elem, ElemKind, Kernels, KtTile, attend};
use super::{LaneSet, TILE};

/// The lane set with the AVX-512 kernels.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; the rest as for [`attend`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn attend_avx512<E: Elem>(
    set: &LaneSet<'_>,
    k: &[E::T],
    v: &[E::T],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: this function's features are those `Avx512` needs.
    unsafe { attend::<Avx512, E>(set, k, v, scratch) }
}

/// `exp(x)` on 16 lanes: `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2 / 2`, `p` the
/// degree-7 Taylor polynomial (truncation error below 1e-8: a few f32 ulps in all);
/// inputs below -87.3 give ~0.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp512(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.3)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_C[0]);
    for c in &EXP_C[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(p, n)
}

/// One lane of [`exp512`], for tests.
#[cfg(test)]
#[target_feature(enable = "avx512f")]
pub(super) fn exp512_for_test(x: f32) -> f32 {
    _mm512_cvtss_f32(exp512(_mm512_set1_ps(x)))
}

/// ln 2 split in a part exact in f32 and the rest (Cody-Waite reduction).
pub(super) const LN2_HI: f32 = 0.693_145_75;
pub(super) const LN2_LO: f32 = 1.428_606_8e-6;
/// Taylor coefficients of `exp`, highest degree first: 1/5040 .. 1.
pub(super) const EXP_C: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// 16-lane kernels (AVX-512 F/BW/VL); tails use masked loads and stores.
pub(super) struct Avx512;

/// Sixteen elements at `p` widened to f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load16<E: Elem>(p: *const E::T) -> __m512 {
    // SAFETY: the caller passes 16 readable elements.
    unsafe {
        match E::KIND {
            ElemKind::F32 => _mm512_loadu_ps(p as *const f32),
            ElemKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            ElemKind::Bf16 => {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// The elements of `mask` at `p` widened to f32 (zeros elsewhere).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn load16_masked<E: Elem>(p: *const E::T, mask: __mmask16) -> __m512 {
    // SAFETY: the caller passes readable elements under `mask`; masked lanes are not touched.
    unsafe {
        match E::KIND {
            ElemKind::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            ElemKind::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
            ElemKind::Bf16 => {
                let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// The size of the next lane block: `max` while that many are left, then 4, then the rest.
#[inline(always)]
pub(super) fn next_block(left: usize, max: usize) -> usize {
    if left >= max {
        max
    } else if left >= 4 {
        4
    } else {
        left
    }
}

/// Scores of `L` lanes against `G` groups of 16 keys, the accumulators in registers: per
/// dimension one load of each group's key elements and one broadcast of each lane's query
/// element.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn scores512<E: Elem, const L: usize, const G: usize>(
    q: *const f32,
    d: usize,
    kt: &KtTile<E::T>,
    scale: f32,
    out: *mut f32,
) {
    // SAFETY (whole body): the caller passes `L` query rows of `d` at `q`, `G` key groups
    // readable for `d` dimensions and `L` output rows of `TILE` at `out`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); G]; L];
        for i in 0..d {
            let mut k = [_mm512_setzero_ps(); G];
            for (g, x) in k.iter_mut().enumerate() {
                *x = load16::<E>(kt.groups[g].add(i * kt.stride));
            }
            for (l, a) in acc.iter_mut().enumerate() {
                let qb = _mm512_set1_ps(*q.add(l * d + i));
                for (x, kv) in a.iter_mut().zip(&k) {
                    *x = _mm512_fmadd_ps(qb, *kv, *x);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for (l, a) in acc.iter().enumerate() {
            for (g, x) in a.iter().enumerate() {
                _mm512_storeu_ps(out.add(l * TILE + 16 * g), _mm512_mul_ps(*x, sv));
            }
        }
    }
}

/// [`scores512`] for `L` lanes with the group count known at run time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn scores512_g<E: Elem, const L: usize>(
    q: *const f32,
    d: usize,
    kt: &KtTile<E::T>,
    scale: f32,
    out: *mut f32,
) {
    // SAFETY: as for `scores512`.
    unsafe {
        match kt.n_groups {
            1 => scores512::<E, L, 1>(q, d, kt, scale, out),
            _ => scores512::<E, L, 2>(q, d, kt, scale, out),
        }
    }
}

/// `acc_l = acc_l * corr[l] + Σ_j w[l * TILE + j] * rows[j]` for `L` lanes, 64 columns at a
/// time with the accumulators held in registers across the rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn pv512<E: Elem, const L: usize>(
    acc: *mut f32,
    d: usize,
    corr: *const f32,
    w: *const f32,
    rows: &[*const E::T],
) {
    // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
    // `L` factors at `corr`, `L` weight rows of `TILE` at `w` and `rows.len() <= TILE` rows
    // of `d` elements; masked accesses touch only columns below `d`.
    unsafe {
        let mut b = 0;
        while b < d {
            let mut masks = [0 as __mmask16; 4];
            for (c, m) in masks.iter_mut().enumerate() {
                let left = d.saturating_sub(b + 16 * c).min(16);
                *m = ((1u32 << left) - 1) as __mmask16;
            }
            let mut accs = [[_mm512_setzero_ps(); 4]; L];
            for (l, a) in accs.iter_mut().enumerate() {
                let cv = _mm512_set1_ps(*corr.add(l));
                for (c, x) in a.iter_mut().enumerate() {
                    let y = _mm512_maskz_loadu_ps(masks[c], acc.add(l * d + b + 16 * c));
                    *x = _mm512_mul_ps(y, cv);
                }
            }
            for (j, &row) in rows.iter().enumerate() {
                let mut vs = [_mm512_setzero_ps(); 4];
                for (c, x) in vs.iter_mut().enumerate() {
                    *x = load16_masked::<E>(row.add(b + 16 * c), masks[c]);
                }
                for (l, a) in accs.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w.add(l * TILE + j));
                    for (x, v) in a.iter_mut().zip(&vs) {
                        *x = _mm512_fmadd_ps(wv, *v, *x);
                    }
                }
            }
            for (l, a) in accs.iter().enumerate() {
                for (c, x) in a.iter().enumerate() {
                    _mm512_mask_storeu_ps(acc.add(l * d + b + 16 * c), masks[c], *x);
                }
            }
            b += 64;
        }
    }
}

impl Kernels for Avx512 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut off = 0;
        while off < bytes {
            // A hint: it never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
            off += 64;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
        let mut l = 0;
        // SAFETY: lanes `l..l + L` are inside `q` and `out` (asserted above); the caller
        // guarantees the key tile.
        unsafe {
            while l < lanes {
                let n = next_block(lanes - l, 8);
                let (q, o) = (qp.add(l * d), op.add(l * TILE));
                match n {
                    8 => scores512_g::<E, 8>(q, d, &kt, scale, o),
                    4 => scores512_g::<E, 4>(q, d, &kt, scale, o),
                    3 => scores512_g::<E, 3>(q, d, &kt, scale, o),
                    2 => scores512_g::<E, 2>(q, d, &kt, scale, o),
                    _ => scores512_g::<E, 1>(q, d, &kt, scale, o),
                }
                l += n;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
                    4 => pv512::<E, 4>(a, d, c, w, rows),
                    3 => pv512::<E, 3>(a, d, c, w, rows),
                    2 => pv512::<E, 2>(a, d, c, w, rows),
                    _ => pv512::<E, 1>(a, d, c, w, rows),
                }
                l += n;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn max(s: &[f32]) -> f32 {
        let (p, n) = (s.as_ptr(), s.len());
        // SAFETY: accesses stay inside `s` (full chunks, then a masked tail).
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 16 <= n {
                m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1u16 << (n - i)) - 1;
                m = _mm512_mask_max_ps(m, mask, m, _mm512_maskz_loadu_ps(mask, p.add(i)));
            }
            _mm512_reduce_max_ps(m)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn exp_sum(s: &mut [f32], m: f32) -> f32 {
        let (p, n) = (s.as_mut_ptr(), s.len());
        // SAFETY: accesses stay inside `s` (full chunks, then a masked tail).
        unsafe {
            let mv = _mm512_set1_ps(m);
            let mut sum = _mm512_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mv));
                _mm512_storeu_ps(p.add(i), e);
                sum = _mm512_add_ps(sum, e);
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = (1u16 << (n - i)) - 1;
                let x = _mm512_maskz_loadu_ps(mask, p.add(i));
                let e = exp512(_mm512_sub_ps(x, mv));
                _mm512_mask_storeu_ps(p.add(i), mask, e);
                sum = _mm512_mask_add_ps(sum, mask, sum, e);
            }
            _mm512_reduce_add_ps(sum)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
        let d = src.len().min(dst.len());
        let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
        // SAFETY: accesses stay inside the first `d` elements of both slices.
        unsafe {
            let mut i = 0;
            while i + 16 <= d {
                let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
                _mm512_storeu_ps(o.add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
            if i < d {
                let mask: __mmask16 = (1u16 << (d - i)) - 1;
                let h = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const i16);
                _mm512_mask_storeu_ps(o.add(i), mask, _mm512_cvtph_ps(h));
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
        let d = src.len().min(dst.len());
        let (s, o) = (src.as_ptr(), dst.as_mut_ptr());
        // SAFETY: accesses stay inside the first `d` elements of both slices.
        unsafe {
            let mut i = 0;
            while i + 16 <= d {
                let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
                let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                _mm512_storeu_ps(o.add(i), _mm512_castsi512_ps(x));
                i += 16;
            }
            if i < d {
                let mask: __mmask16 = (1u16 << (d - i)) - 1;
                let h = _mm256_maskz_loadu_epi16(mask, s.add(i) as *const i16);
                let x = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
                _mm512_mask_storeu_ps(o.add(i), mask, _mm512_castsi512_ps(x));
            }
        }
    }
}
