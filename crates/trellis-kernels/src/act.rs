//! Element-wise activations of the decoder step.
//!
//! [`silu_mul`] is the gated MLP's `silu(gate) · up` = `g / (1 + e^-g) · u`. Its `e^x`
//! ([`exp`]) is computed in f64 — range reduction `x = n·ln2 + r` with ln 2 in two parts, a
//! degree-11 Taylor polynomial of `e^r` (relative error below 1e-14), an exact scaling by
//! `2^n` — and rounded once to f32: the correctly rounded `e^x` except within 1e-6 ulp of a
//! rounding midpoint, so it agrees with libm's `expf` (what candle and the scalar step used)
//! on practically every input, and the step's numbers (and the llama.cpp golden tokens) stay
//! as they were. Its operations are the same in the scalar, AVX2 and AVX-512 versions (fused
//! multiply-adds where the scalar code calls `mul_add`), so every instruction set gives the
//! same bits, and an element's result never depends on its neighbours or on the batch.

use crate::cpu::{Isa, isa};

const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2 split in two: `LN2_HI` has 21 significant bits, so `n · LN2_HI` is exact.
const LN2_HI: f64 = 0.693_146_705_627_441_4;
const LN2_LO: f64 = 4.749_325_038_799_767_6e-7;
/// Inputs are clamped to this range, beyond which the f32 result is 0 or infinity anyway.
const X_MIN: f64 = -110.0;
const X_MAX: f64 = 90.0;
/// `1/k!` for k = 11 down to 0: Horner's scheme of the Taylor polynomial of `e^r`.
const C: [f64; 12] = [
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` rounded to f32: the reference of the SIMD versions.
pub fn exp(x: f32) -> f32 {
    let x = (x as f64).clamp(X_MIN, X_MAX);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = C[0];
    for c in &C[1..] {
        p = p.mul_add(r, *c);
    }
    (p * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `out[i] = gate[i] / (1 + e^-gate[i]) · up[i]` (the SiLU-gated product), at the run-time
/// instruction set; the same bits on every instruction set.
///
/// # Panics
/// When the three slices differ in length (a caller bug).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "lengths");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F (`isa()` checked at run time).
        Isa::Avx512Vnni | Isa::Amx => unsafe { x86::silu_mul_avx512(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (`isa()` checked at run time).
        Isa::Avx2 => unsafe { x86::silu_mul_avx2(gate, up, out) },
        _ => silu_mul_scalar(gate, up, out),
    }
}

/// [`silu_mul`] one element at a time.
pub fn silu_mul_scalar(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{C, LN2_HI, LN2_LO, LOG2E, X_MAX, X_MIN, silu_mul_scalar};

    /// `e^x` of 8 f64 lanes, as [`super::exp`] before its rounding to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_pd512(x: __m512d) -> __m512d {
        let x = _mm512_min_pd(
            _mm512_max_pd(x, _mm512_set1_pd(X_MIN)),
            _mm512_set1_pd(X_MAX),
        );
        let n = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_pd(x, _mm512_set1_pd(LOG2E)),
        );
        let r = _mm512_fmadd_pd(
            n,
            _mm512_set1_pd(-LN2_LO),
            _mm512_fmadd_pd(n, _mm512_set1_pd(-LN2_HI), x),
        );
        let mut p = _mm512_set1_pd(C[0]);
        for c in &C[1..] {
            p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(*c));
        }
        // p · 2^n, exact.
        _mm512_scalef_pd(p, n)
    }

    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= the length of all three slices.
            let (g, u) = unsafe {
                (
                    _mm512_loadu_ps(gate.as_ptr().add(i)),
                    _mm512_loadu_ps(up.as_ptr().add(i)),
                )
            };
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), g);
            let lo = exp_pd512(_mm512_cvtps_pd(_mm512_castps512_ps256(neg)));
            let hi = exp_pd512(_mm512_cvtps_pd(_mm256_castpd_ps(
                _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(neg)),
            )));
            let e = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo))),
                _mm256_castps_pd(_mm512_cvtpd_ps(hi)),
            ));
            let s = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
            // SAFETY: as the loads.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), s) };
        }
        silu_mul_scalar(&gate[n..], &up[n..], &mut out[n..]);
    }

    /// `e^x` of 4 f64 lanes, as [`super::exp`] before its rounding to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_pd256(x: __m256d) -> __m256d {
        let x = _mm256_min_pd(
            _mm256_max_pd(x, _mm256_set1_pd(X_MIN)),
            _mm256_set1_pd(X_MAX),
        );
        let n = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, _mm256_set1_pd(LOG2E)),
        );
        let r = _mm256_fmadd_pd(
            n,
            _mm256_set1_pd(-LN2_LO),
            _mm256_fmadd_pd(n, _mm256_set1_pd(-LN2_HI), x),
        );
        let mut p = _mm256_set1_pd(C[0]);
        for c in &C[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(*c));
        }
        // 2^n from its bits: (n + 1023) << 52, n integral in -160..130.
        let bits = _mm256_slli_epi64::<52>(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(
            _mm256_add_pd(n, _mm256_set1_pd(1023.0)),
        )));
        _mm256_mul_pd(p, _mm256_castsi256_pd(bits))
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n <= the length of all three slices.
            let (g, u) = unsafe {
                (
                    _mm256_loadu_ps(gate.as_ptr().add(i)),
                    _mm256_loadu_ps(up.as_ptr().add(i)),
                )
            };
            let neg = _mm256_sub_ps(_mm256_setzero_ps(), g);
            let lo = exp_pd256(_mm256_cvtps_pd(_mm256_castps256_ps128(neg)));
            let hi = exp_pd256(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(neg)));
            let e = _mm256_insertf128_ps::<1>(
                _mm256_castps128_ps256(_mm256_cvtpd_ps(lo)),
                _mm256_cvtpd_ps(hi),
            );
            let s = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            // SAFETY: as the loads.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), s) };
        }
        silu_mul_scalar(&gate[n..], &up[n..], &mut out[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Correctly rounded on every sampled input (against f64 `exp` rounded to f32), hence
    /// within an ulp of libm's `expf` — which is not always correctly rounded (glibc's
    /// differs from it on ~1 input in 2000) — and equal to it on all but a few.
    #[test]
    fn exp_is_correctly_rounded_and_libms_expf_almost_always() {
        let (mut differ, mut total) = (0u32, 0u32);
        let mut x = -104.0f32;
        while x < 89.0 {
            let (ours, libm) = (exp(x), x.exp());
            assert_eq!(ours, (x as f64).exp() as f32, "{x}");
            assert!(ulps(ours, libm) <= 1, "{x}: {ours} vs {libm}");
            differ += (ours != libm) as u32;
            total += 1;
            x += 0.000_37;
        }
        assert!(
            differ * 1_000 <= total,
            "{differ} of {total} differ from libm"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(1000.0), f32::INFINITY);
    }

    #[test]
    fn every_isa_gives_the_scalar_bits() {
        let n = 16 * 40 + 7;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let mut want = vec![0.0; n];
        silu_mul_scalar(&gate, &up, &mut want);
        let mut got = vec![0.0; n];
        silu_mul(&gate, &up, &mut got);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::detected() >= Isa::Avx2 {
            // SAFETY: AVX2 and FMA detected.
            unsafe { x86::silu_mul_avx2(&gate, &up, &mut got) };
            assert_eq!(got, want);
        }
        // And libm's SiLU (candle's), to an ulp or two of the exponential.
        for ((&g, &u), &w) in gate.iter().zip(&up).zip(&want) {
            let libm = g / (1.0 + (-g).exp()) * u;
            assert!((libm - w).abs() <= 4e-7 * libm.abs(), "{g}: {libm} vs {w}");
        }
    }
}
