//! Every kernel set this CPU can run against plain loops, whatever `TRELLIS_ISA` says.

use super::*;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

/// # Safety
/// The CPU features `K` needs must be present.
unsafe fn check<K: Kernels>() {
    for d in [1, 3, 8, 15, 16, 17, 20, 64, 80, 128] {
        for n in 1..=9 {
            let (q, k) = (data(n * d, 1), data(d, 2));
            let stride = 3;
            let mut got = vec![0f32; n * stride];
            // SAFETY: the caller guarantees `K`'s features.
            unsafe { K::dot_group(&q, d, &k, 0.5, &mut got, stride) };
            for j in 0..n {
                let want: f32 = q[j * d..][..d].iter().zip(&k).map(|(a, b)| a * b).sum();
                assert!(
                    (got[j * stride] - 0.5 * want).abs() < 1e-4,
                    "dot d {d} n {n}"
                );
            }
            let (mut acc, w, v) = (data(n * d, 3), data(n * stride, 4), data(d, 5));
            let mut want = acc.clone();
            for j in 0..n {
                for x in 0..d {
                    want[j * d + x] += w[j * stride] * v[x];
                }
            }
            // SAFETY: as above.
            unsafe { K::axpy_group(&mut acc, d, &w, stride, n, &v) };
            assert!(acc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        }
        // A tile of key rows against 1..=5 lanes.
        for lanes in 1..=5 {
            let rows: Vec<Vec<f32>> = (0..TILE - 1).map(|j| data(d, 20 + j as u32)).collect();
            let views: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let q = data(lanes * d, 12);
            let mut out = vec![0f32; lanes * TILE];
            // SAFETY: as above.
            unsafe { K::dot_tile(&q, d, &views, 0.5, &mut out) };
            for l in 0..lanes {
                for (j, r) in rows.iter().enumerate() {
                    let want: f32 = q[l * d..][..d].iter().zip(r).map(|(a, b)| a * b).sum();
                    assert!(
                        (out[l * TILE + j] - 0.5 * want).abs() < 1e-4,
                        "dot_tile d {d}"
                    );
                }
            }
        }
        // A tile of value rows into 1..=5 lanes.
        for lanes in 1..=5 {
            let rows: Vec<Vec<f32>> = (0..TILE - 3).map(|j| data(d, 10 + j as u32)).collect();
            let views: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let w = data(lanes * TILE, 9);
            let mut acc = data(lanes * d, 11);
            let mut want = acc.clone();
            for l in 0..lanes {
                for (j, r) in rows.iter().enumerate() {
                    for x in 0..d {
                        want[l * d + x] += w[l * TILE + j] * r[x];
                    }
                }
            }
            // SAFETY: as above.
            unsafe { K::axpy_tile(&mut acc, d, &w, &views) };
            assert!(
                acc.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4),
                "tile d {d}"
            );
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
        let mut y = data(d, 6);
        let want: Vec<f32> = y.iter().map(|x| x * 0.25).collect();
        // SAFETY: as above.
        unsafe { K::scale(&mut y, 0.25) };
        assert_eq!(y, want);
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
            unsafe { check::<x86::Avx2>() };
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
