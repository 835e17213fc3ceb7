//! AVX-512 and AVX2 kernels and the lane-set entry points compiled for them.

use std::arch::x86_64::*;

use super::{Kernels, LaneSet, TILE, attend};

/// The lane set with the AVX-512 kernels.
///
/// # Safety
/// The CPU must have AVX-512 F, BW and VL; `set` as for [`attend`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn attend_avx512(set: &LaneSet<'_>, scratch: &mut Vec<f32>) {
    // SAFETY: this function's features are those `Avx512` needs.
    unsafe { attend::<Avx512>(set, scratch) }
}

/// The lane set with the AVX2 kernels.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `set` as for [`attend`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend_avx2(set: &LaneSet<'_>, scratch: &mut Vec<f32>) {
    // SAFETY: this function's features are those `Avx2` needs.
    unsafe { attend::<Avx2>(set, scratch) }
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

/// `exp(x)` on 8 lanes, as [`exp512`]; `2^n` is built in the exponent bits.
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

/// ln 2 split in a part exact in f32 and the rest (Cody-Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Taylor coefficients of `exp`, highest degree first: 1/5040 .. 1.
const EXP_C: [f32; 8] = [
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

/// `out[j] = q_j · k` for `L` query rows of `d` starting at `q`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn dot512<const L: usize>(
    q: *const f32,
    d: usize,
    k: *const f32,
    scale: f32,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY (whole body): the caller passes `L` rows of `d` floats at `q`, `d` at `k`
    // and `L` writable floats `stride` apart at `out`; masked loads touch only the tail's lanes.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); L];
        let mut i = 0;
        while i + 16 <= d {
            let kv = _mm512_loadu_ps(k.add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(j * d + i)), kv, *a);
            }
            i += 16;
        }
        if i < d {
            let mask: __mmask16 = (1u16 << (d - i)) - 1;
            let kv = _mm512_maskz_loadu_ps(mask, k.add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q.add(j * d + i)), kv, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            *out.add(j * stride) = scale * _mm512_reduce_add_ps(*a);
        }
    }
}

/// `acc_j += w[j] * v` for `L` accumulator rows of `d` starting at `acc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn axpy512<const L: usize>(
    acc: *mut f32,
    d: usize,
    w: *const f32,
    stride: usize,
    v: *const f32,
) {
    // SAFETY (whole body): the caller passes `L` rows of `d` floats at `acc`, `L` weights
    // at `w` and `d` floats at `v`; masked accesses touch only the tail's lanes.
    unsafe {
        let mut ws = [_mm512_setzero_ps(); L];
        for (j, x) in ws.iter_mut().enumerate() {
            *x = _mm512_set1_ps(*w.add(j * stride));
        }
        let mut i = 0;
        while i + 16 <= d {
            let vv = _mm512_loadu_ps(v.add(i));
            for (j, x) in ws.iter().enumerate() {
                let p = acc.add(j * d + i);
                _mm512_storeu_ps(p, _mm512_fmadd_ps(*x, vv, _mm512_loadu_ps(p)));
            }
            i += 16;
        }
        if i < d {
            let mask: __mmask16 = (1u16 << (d - i)) - 1;
            let vv = _mm512_maskz_loadu_ps(mask, v.add(i));
            for (j, x) in ws.iter().enumerate() {
                let p = acc.add(j * d + i);
                let y = _mm512_fmadd_ps(*x, vv, _mm512_maskz_loadu_ps(mask, p));
                _mm512_mask_storeu_ps(p, mask, y);
            }
        }
    }
}

/// `acc_l += Σ_j w[l * TILE + j] * rows[j]` for `L` lanes, 64 columns at a time with the
/// accumulators held in registers across the rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn tile512<const L: usize>(acc: *mut f32, d: usize, w: *const f32, rows: &[*const f32]) {
    // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
    // `L` weight rows of `TILE` at `w` and `rows.len() <= TILE` rows of `d` floats; masked
    // accesses touch only columns below `d`.
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
                for (c, x) in a.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(masks[c], acc.add(l * d + b + 16 * c));
                }
            }
            for (j, &row) in rows.iter().enumerate() {
                let mut vs = [_mm512_setzero_ps(); 4];
                for (c, x) in vs.iter_mut().enumerate() {
                    *x = _mm512_maskz_loadu_ps(masks[c], row.add(b + 16 * c));
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

/// The four horizontal sums of `a`, as `[Σa0, Σa1, Σa2, Σa3]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn hsum4_512(a: [__m512; 4]) -> __m128 {
    let fold = |x: __m512| {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        _mm256_add_ps(_mm512_castps512_ps256(x), hi)
    };
    let h01 = _mm256_hadd_ps(fold(a[0]), fold(a[1]));
    let h23 = _mm256_hadd_ps(fold(a[2]), fold(a[3]));
    let h = _mm256_hadd_ps(h01, h23);
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

impl Kernels for Avx512 {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn dot_group(
        q: &[f32],
        d: usize,
        k: &[f32],
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let n = q.len() / d;
        if n == 0 {
            return;
        }
        assert!(k.len() >= d && out.len() > (n - 1) * stride);
        let (q, k, o) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        // SAFETY: rows `j..j + L` are inside `q` and `out` (asserted above).
        unsafe {
            while j + 4 <= n {
                dot512::<4>(q.add(j * d), d, k, scale, o.add(j * stride), stride);
                j += 4;
            }
            match n - j {
                3 => dot512::<3>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                2 => dot512::<2>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                1 => dot512::<1>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn axpy_group(acc: &mut [f32], d: usize, w: &[f32], stride: usize, n: usize, v: &[f32]) {
        if n == 0 {
            return;
        }
        assert!(acc.len() >= n * d && w.len() > (n - 1) * stride && v.len() >= d);
        let (a, w, v) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
        let mut j = 0;
        // SAFETY: rows `j..j + L` are inside `acc` and `w` (asserted above).
        unsafe {
            while j + 4 <= n {
                axpy512::<4>(a.add(j * d), d, w.add(j * stride), stride, v);
                j += 4;
            }
            match n - j {
                3 => axpy512::<3>(a.add(j * d), d, w.add(j * stride), stride, v),
                2 => axpy512::<2>(a.add(j * d), d, w.add(j * stride), stride, v),
                1 => axpy512::<1>(a.add(j * d), d, w.add(j * stride), stride, v),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn dot_tile(q: &[f32], d: usize, k: &[&[f32]], scale: f32, out: &mut [f32]) {
        let (lanes, n) = (q.len() / d, k.len());
        if lanes == 0 || n == 0 {
            return;
        }
        assert!(n <= TILE && out.len() >= (lanes - 1) * TILE + n);
        assert!(k.iter().all(|r| r.len() >= d));
        let mut rows = [std::ptr::null::<f32>(); TILE];
        for (p, r) in rows.iter_mut().zip(k) {
            *p = r.as_ptr();
        }
        // SAFETY: lane `l` reads `q[l*d..][..d]` and writes `out[l*TILE..][..n]`, rows
        // hold `d` floats each (asserted above); masked loads touch only columns below `d`.
        unsafe {
            let sv = _mm_set1_ps(scale);
            for l in 0..lanes {
                let (ql, o) = (q.as_ptr().add(l * d), out.as_mut_ptr().add(l * TILE));
                let mut j = 0;
                // Groups of four rows; the last group repeats its last row, so every
                // score comes from the same reduction whatever the tile's length (results
                // must not depend on how a batch was split).
                while j < n {
                    let r = [0, 1, 2, 3].map(|t| rows[(j + t).min(n - 1)]);
                    let mut acc = [_mm512_setzero_ps(); 4];
                    let mut i = 0;
                    while i < d {
                        let mask: __mmask16 = ((1u32 << (d - i).min(16)) - 1) as __mmask16;
                        let qv = _mm512_maskz_loadu_ps(mask, ql.add(i));
                        for (a, &row) in acc.iter_mut().zip(&r) {
                            let kv = _mm512_maskz_loadu_ps(mask, row.add(i));
                            *a = _mm512_fmadd_ps(qv, kv, *a);
                        }
                        i += 16;
                    }
                    let mut sums = [0f32; 4];
                    _mm_storeu_ps(sums.as_mut_ptr(), _mm_mul_ps(sv, hsum4_512(acc)));
                    for (t, &x) in sums.iter().enumerate().take(n - j) {
                        *o.add(j + t) = x;
                    }
                    j += 4;
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn axpy_tile(acc: &mut [f32], d: usize, w: &[f32], v: &[&[f32]]) {
        let lanes = acc.len() / d;
        if lanes == 0 || v.is_empty() {
            return;
        }
        assert!(w.len() >= (lanes - 1) * TILE + v.len() && v.len() <= TILE);
        assert!(v.iter().all(|r| r.len() >= d));
        let mut rows = [std::ptr::null::<f32>(); TILE];
        for (p, r) in rows.iter_mut().zip(v) {
            *p = r.as_ptr();
        }
        let (a, w, rows) = (acc.as_mut_ptr(), w.as_ptr(), &rows[..v.len()]);
        let mut j = 0;
        // SAFETY: lanes `j..j + L` are inside `acc` and `w`, rows hold `d` floats each
        // (asserted above).
        unsafe {
            while j + 4 <= lanes {
                tile512::<4>(a.add(j * d), d, w.add(j * TILE), rows);
                j += 4;
            }
            match lanes - j {
                3 => tile512::<3>(a.add(j * d), d, w.add(j * TILE), rows),
                2 => tile512::<2>(a.add(j * d), d, w.add(j * TILE), rows),
                1 => tile512::<1>(a.add(j * d), d, w.add(j * TILE), rows),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn scale(y: &mut [f32], a: f32) {
        let (p, d) = (y.as_mut_ptr(), y.len());
        // SAFETY: accesses stay inside `y` (full chunks, then a masked tail).
        unsafe {
            let s = _mm512_set1_ps(a);
            let mut i = 0;
            while i + 16 <= d {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(s, _mm512_loadu_ps(p.add(i))));
                i += 16;
            }
            if i < d {
                let mask: __mmask16 = (1u16 << (d - i)) - 1;
                let x = _mm512_maskz_loadu_ps(mask, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), mask, _mm512_mul_ps(s, x));
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

/// `out[j] = q_j · k` for `L` query rows of `d` starting at `q`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot256<const L: usize>(
    q: *const f32,
    d: usize,
    k: *const f32,
    scale: f32,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY (whole body): the caller passes `L` rows of `d` floats at `q`, `d` at `k`
    // and `L` writable floats `stride` apart at `out`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); L];
        let mut i = 0;
        while i + 8 <= d {
            let kv = _mm256_loadu_ps(k.add(i));
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(j * d + i)), kv, *a);
            }
            i += 8;
        }
        for (j, a) in acc.iter().enumerate() {
            let mut s = hsum256(*a);
            for x in i..d {
                s += *q.add(j * d + x) * *k.add(x);
            }
            *out.add(j * stride) = scale * s;
        }
    }
}

/// `acc_j += w[j] * v` for `L` accumulator rows of `d` starting at `acc`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn axpy256<const L: usize>(
    acc: *mut f32,
    d: usize,
    w: *const f32,
    stride: usize,
    v: *const f32,
) {
    // SAFETY (whole body): the caller passes `L` rows of `d` floats at `acc`, `L` weights
    // at `w` and `d` floats at `v`.
    unsafe {
        let mut ws = [_mm256_setzero_ps(); L];
        for (j, x) in ws.iter_mut().enumerate() {
            *x = _mm256_set1_ps(*w.add(j * stride));
        }
        let mut i = 0;
        while i + 8 <= d {
            let vv = _mm256_loadu_ps(v.add(i));
            for (j, x) in ws.iter().enumerate() {
                let p = acc.add(j * d + i);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(*x, vv, _mm256_loadu_ps(p)));
            }
            i += 8;
        }
        for j in 0..L {
            let wj = *w.add(j * stride);
            for x in i..d {
                *acc.add(j * d + x) += wj * *v.add(x);
            }
        }
    }
}

/// The four horizontal sums of `a`, as `[Σa0, Σa1, Σa2, Σa3]`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum4_256(a: [__m256; 4]) -> __m128 {
    let h01 = _mm256_hadd_ps(a[0], a[1]);
    let h23 = _mm256_hadd_ps(a[2], a[3]);
    let h = _mm256_hadd_ps(h01, h23);
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

/// `acc_l[b..b + 8C] += Σ_j w[l * TILE + j] * rows[j][b..b + 8C]` for `L` lanes, the
/// accumulators held in registers across the rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile256<const L: usize, const C: usize>(
    acc: *mut f32,
    d: usize,
    b: usize,
    w: *const f32,
    rows: &[*const f32],
) {
    // SAFETY (whole body): the caller passes `L` accumulator rows of `d` floats at `acc`,
    // `L` weight rows of `TILE` at `w`, rows of `d` floats, and `b + 8 * C <= d`.
    unsafe {
        let mut accs = [[_mm256_setzero_ps(); C]; L];
        for (l, a) in accs.iter_mut().enumerate() {
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(acc.add(l * d + b + 8 * c));
            }
        }
        for (j, &row) in rows.iter().enumerate() {
            let mut vs = [_mm256_setzero_ps(); C];
            for (c, x) in vs.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(row.add(b + 8 * c));
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

/// [`tile256`] over all columns of `L` lanes: 16 at a time, then 8, then scalar.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile256_lanes<const L: usize>(
    acc: *mut f32,
    d: usize,
    w: *const f32,
    rows: &[*const f32],
) {
    // SAFETY: as for `tile256`, every block stays below `d`.
    unsafe {
        let mut b = 0;
        while b + 16 <= d {
            tile256::<L, 2>(acc, d, b, w, rows);
            b += 16;
        }
        if b + 8 <= d {
            tile256::<L, 1>(acc, d, b, w, rows);
            b += 8;
        }
        for l in 0..L {
            for (j, &row) in rows.iter().enumerate() {
                let wj = *w.add(l * TILE + j);
                for x in b..d {
                    *acc.add(l * d + x) += wj * *row.add(x);
                }
            }
        }
    }
}

impl Kernels for Avx2 {
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_group(
        q: &[f32],
        d: usize,
        k: &[f32],
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let n = q.len() / d;
        if n == 0 {
            return;
        }
        assert!(k.len() >= d && out.len() > (n - 1) * stride);
        let (q, k, o) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        // SAFETY: rows `j..j + L` are inside `q` and `out` (asserted above).
        unsafe {
            while j + 4 <= n {
                dot256::<4>(q.add(j * d), d, k, scale, o.add(j * stride), stride);
                j += 4;
            }
            match n - j {
                3 => dot256::<3>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                2 => dot256::<2>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                1 => dot256::<1>(q.add(j * d), d, k, scale, o.add(j * stride), stride),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn axpy_group(acc: &mut [f32], d: usize, w: &[f32], stride: usize, n: usize, v: &[f32]) {
        if n == 0 {
            return;
        }
        assert!(acc.len() >= n * d && w.len() > (n - 1) * stride && v.len() >= d);
        let (a, w, v) = (acc.as_mut_ptr(), w.as_ptr(), v.as_ptr());
        let mut j = 0;
        // SAFETY: rows `j..j + L` are inside `acc` and `w` (asserted above).
        unsafe {
            while j + 4 <= n {
                axpy256::<4>(a.add(j * d), d, w.add(j * stride), stride, v);
                j += 4;
            }
            match n - j {
                3 => axpy256::<3>(a.add(j * d), d, w.add(j * stride), stride, v),
                2 => axpy256::<2>(a.add(j * d), d, w.add(j * stride), stride, v),
                1 => axpy256::<1>(a.add(j * d), d, w.add(j * stride), stride, v),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot_tile(q: &[f32], d: usize, k: &[&[f32]], scale: f32, out: &mut [f32]) {
        let (lanes, n) = (q.len() / d, k.len());
        if lanes == 0 || n == 0 {
            return;
        }
        assert!(n <= TILE && out.len() >= (lanes - 1) * TILE + n);
        assert!(k.iter().all(|r| r.len() >= d));
        let mut rows = [std::ptr::null::<f32>(); TILE];
        for (p, r) in rows.iter_mut().zip(k) {
            *p = r.as_ptr();
        }
        // SAFETY: lane `l` reads `q[l*d..][..d]` and writes `out[l*TILE..][..n]`, rows
        // hold `d` floats each (asserted above).
        unsafe {
            let full = d / 8 * 8;
            for l in 0..lanes {
                let (ql, o) = (q.as_ptr().add(l * d), out.as_mut_ptr().add(l * TILE));
                let mut j = 0;
                // Groups of four rows, the last one padded, as in the AVX-512 version.
                while j < n {
                    let r = [0, 1, 2, 3].map(|t| rows[(j + t).min(n - 1)]);
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut i = 0;
                    while i < full {
                        let qv = _mm256_loadu_ps(ql.add(i));
                        for (a, &row) in acc.iter_mut().zip(&r) {
                            *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(i)), *a);
                        }
                        i += 8;
                    }
                    let mut sums = [0f32; 4];
                    _mm_storeu_ps(sums.as_mut_ptr(), hsum4_256(acc));
                    for (t, (sum, &row)) in sums.iter_mut().zip(&r).enumerate().take(n - j) {
                        for x in full..d {
                            *sum += *ql.add(x) * *row.add(x);
                        }
                        *o.add(j + t) = scale * *sum;
                    }
                    j += 4;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn axpy_tile(acc: &mut [f32], d: usize, w: &[f32], v: &[&[f32]]) {
        let lanes = acc.len() / d;
        if lanes == 0 || v.is_empty() {
            return;
        }
        assert!(w.len() >= (lanes - 1) * TILE + v.len() && v.len() <= TILE);
        assert!(v.iter().all(|r| r.len() >= d));
        let mut rows = [std::ptr::null::<f32>(); TILE];
        for (p, r) in rows.iter_mut().zip(v) {
            *p = r.as_ptr();
        }
        let (a, w, rows) = (acc.as_mut_ptr(), w.as_ptr(), &rows[..v.len()]);
        let mut j = 0;
        // SAFETY: lanes `j..j + L` are inside `acc` and `w`, rows hold `d` floats each
        // (asserted above).
        unsafe {
            while j + 4 <= lanes {
                tile256_lanes::<4>(a.add(j * d), d, w.add(j * TILE), rows);
                j += 4;
            }
            match lanes - j {
                3 => tile256_lanes::<3>(a.add(j * d), d, w.add(j * TILE), rows),
                2 => tile256_lanes::<2>(a.add(j * d), d, w.add(j * TILE), rows),
                1 => tile256_lanes::<1>(a.add(j * d), d, w.add(j * TILE), rows),
                _ => {}
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale(y: &mut [f32], a: f32) {
        let (p, d) = (y.as_mut_ptr(), y.len());
        // SAFETY: accesses stay inside `y`.
        unsafe {
            let s = _mm256_set1_ps(a);
            let mut i = 0;
            while i + 8 <= d {
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(p.add(i))));
                i += 8;
            }
            for x in i..d {
                *p.add(x) *= a;
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
