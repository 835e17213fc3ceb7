//! Every kernel set this CPU can run against plain loops, whatever `TRELLIS_ISA` says.

use super::kernel::{Elem, Kernels, KtTile};
use super::*;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

/// `x` stored as `E` and read back (the exact values a kernel sees).
fn stored<E: Elem>(x: &[f32], to: impl Fn(f32) -> E::T) -> (Vec<E::T>, Vec<f32>) {
    let t: Vec<E::T> = x.iter().map(|&v| to(v)).collect();
    let back = t.iter().map(|&v| E::to_f32(v)).collect();
    (t, back)
}

/// `scores` and `pv` of `K` on elements `E` against plain loops, for 1..=13 lanes (every lane
/// block size and remainder), one and two key groups, in-place strides and tails of `d`.
///
/// # Safety
/// The CPU features `K` needs must be present.
unsafe fn check_tiles<K: Kernels, E: Elem>(d: usize, to: impl Fn(f32) -> E::T + Copy) {
    for lanes in 1..=13 {
        for (n_groups, stride) in [(1, 16), (2, 16), (2, 48)] {
            // Keys: `n_groups` groups of `[d][stride]`, the group's 16 keys at columns 0..16.
            let (kt, kf) = stored::<E>(&data(2 * d * stride, 20 + lanes as u32), to);
            let q = data(lanes * d, 12);
            let mut out = vec![f32::NAN; lanes * TILE];
            let tile = KtTile {
                groups: [kt.as_ptr(), kt[d * stride..].as_ptr()],
                n_groups,
                stride,
            };
            // SAFETY: the caller guarantees `K`'s features; both groups hold `d` rows of
            // `stride >= 16` elements.
            unsafe { K::scores::<E>(&q, d, tile, 0.5, &mut out) };
            for l in 0..lanes {
                for g in 0..n_groups {
                    for j in 0..16 {
                        let want: f32 = (0..d)
                            .map(|i| q[l * d + i] * kf[g * d * stride + i * stride + j])
                            .sum();
                        let got = out[l * TILE + 16 * g + j];
                        assert!(
                            (got - 0.5 * want).abs() < 1e-4,
                            "scores d {d} lanes {lanes} g {g} j {j}: {got} vs {}",
                            0.5 * want
                        );
                    }
                }
            }
            // Score `(l, j)` is the same whatever the other lanes are.
            for l in 0..lanes {
                let mut one = vec![0f32; TILE];
                // SAFETY: as above.
                unsafe { K::scores::<E>(&q[l * d..][..d], d, tile, 0.5, &mut one) };
                for j in 0..16 * n_groups {
                    assert_eq!(one[j].to_bits(), out[l * TILE + j].to_bits(), "lane {l}");
                }
            }
        }
        // Values: `n` rows of `d` into `lanes` accumulators, with rescale factors.
        let n = TILE - 3;
        let (vt, vf) = stored::<E>(&data(n * d, 10 + lanes as u32), to);
        let rows: Vec<*const E::T> = (0..n).map(|j| vt[j * d..].as_ptr()).collect();
        let w = data(lanes * TILE, 9);
        let corr: Vec<f32> = (0..lanes).map(|l| 1.0 - 0.1 * l as f32).collect();
        let mut acc = data(lanes * d, 11);
        let mut want = acc.clone();
        for l in 0..lanes {
            for x in 0..d {
                want[l * d + x] *= corr[l];
                for j in 0..n {
                    want[l * d + x] += w[l * TILE + j] * vf[j * d + x];
                }
            }
        }
        // SAFETY: the caller guarantees `K`'s features; every row holds `d` elements.
        unsafe { K::pv::<E>(&mut acc, d, &corr, &w, &rows) };
        assert!(
            acc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
            "pv d {d} lanes {lanes}"
        );
    }
}

/// # Safety
/// The CPU features `K` needs must be present.
unsafe fn check<K: Kernels>() {
    for d in [1, 3, 8, 15, 16, 17, 20, 64, 80, 128] {
        // SAFETY: the caller guarantees `K`'s features.
        unsafe {
            check_tiles::<K, F32E>(d, |x| x);
            check_tiles::<K, F16E>(d, |x| half::f16::from_f32(x).to_bits());
            check_tiles::<K, Bf16E>(d, |x| half::bf16::from_f32(x).to_bits());
        }
        let s = data(d, 8);
        // SAFETY: as above.
        let got = unsafe { K::max(&s) };
        assert_eq!(got, s.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut e: Vec<f32> = s.iter().map(|x| x * 60.0).collect();
        let m = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: Vec<f32> = e.iter().map(|x| (x - m).exp()).collect();
        // SAFETY: as above.
        let sum = unsafe { K::exp_sum(&mut e, m) };
        assert!(
            (sum - want.iter().sum::<f32>()).abs() < 1e-5 * sum.max(1.0),
            "sum d {d}"
        );
        for (g, w) in e.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.max(1e-30) + 1e-37,
                "exp d {d}: {g} vs {w}"
            );
        }
        let x = data(d, 7);
        let h: Vec<u16> = x
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let b: Vec<u16> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let mut out = vec![0f32; d];
        // SAFETY: as above.
        unsafe { K::f16_to_f32(&h, &mut out) };
        assert!(
            out.iter()
                .zip(&h)
                .all(|(o, &s)| *o == half::f16::from_bits(s).to_f32())
        );
        // SAFETY: as above.
        unsafe { K::bf16_to_f32(&b, &mut out) };
        assert!(
            out.iter()
                .zip(&b)
                .all(|(o, &s)| *o == half::bf16::from_bits(s).to_f32())
        );
    }
}

#[test]
fn kernels_match_plain_loops() {
    // SAFETY: the scalar kernels need no CPU feature.
    unsafe { check::<Scalar>() };
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: the features were just detected.
            unsafe { check::<avx2::Avx2>() };
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            // SAFETY: the features were just detected.
            unsafe { check::<x86::Avx512>() };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod exp {
    #[test]
    fn vector_exp_is_accurate_over_the_softmax_range() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            // SAFETY: AVX-512 F checked above.
            let got = unsafe { crate::cpu_attn::x86::exp512_for_test(x) };
            let want = (x as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }
}
