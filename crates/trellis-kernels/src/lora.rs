//! LoRA's two halves for one token row (Punica's shrink and expand, on the CPU), chosen at run
//! time: AVX2 with FMA where the CPU has it, portable Rust otherwise.
//!
//! Each output is reduced in a fixed order that depends only on the shapes, never on which
//! other rows are in the batch: a row's result is the same alone or in any batch.

use crate::cpu::{self, Isa};

/// `t[j] = x · a[j·k .. (j+1)·k]` for every `j < t.len()`, where `k = x.len()`.
///
/// Each dot product runs in eight lanes over `k` rounded down to 8, the lanes summed as
/// `((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7))`, then the tail added in order.
///
/// # Panics
/// If `a` holds fewer than `t.len() · x.len()` values.
pub fn shrink(x: &[f32], a: &[f32], t: &mut [f32]) {
    let k = x.len();
    assert!(a.len() >= t.len() * k, "lora shrink: A is too short");
    #[cfg(target_arch = "x86_64")]
    if cpu::isa() >= Isa::Avx2 {
        // SAFETY: isa() reports AVX2 only where the CPU has AVX2 and FMA; lengths checked.
        unsafe { x86::shrink(x, a, t) };
        return;
    }
    for (j, tj) in t.iter_mut().enumerate() {
        *tj = dot_scalar(x, &a[j * k..][..k]);
    }
}

/// `y[c] += Σ_j t[j] · b_t[j·n + c]` for every `c < n = y.len()`, `j` ascending.
///
/// # Panics
/// If `b_t` holds fewer than `t.len() · y.len()` values.
pub fn expand(t: &[f32], b_t: &[f32], y: &mut [f32]) {
    let n = y.len();
    assert!(b_t.len() >= t.len() * n, "lora expand: B is too short");
    #[cfg(target_arch = "x86_64")]
    if cpu::isa() >= Isa::Avx2 {
        // SAFETY: as in `shrink`.
        unsafe { x86::expand(t, b_t, y) };
        return;
    }
    for (j, &tj) in t.iter().enumerate() {
        y.iter_mut()
            .zip(&b_t[j * n..][..n])
            .for_each(|(y, b)| *y += tj * b);
    }
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn lanes(v: __m256) -> f32 {
        let mut l = [0f32; 8];
        // SAFETY: `l` holds eight floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    }

    /// See [`super::shrink`]: four rows of `a` at a time share each load of `x`.
    ///
    /// # Safety
    /// AVX2 and FMA; `a.len() >= t.len() * x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn shrink(x: &[f32], a: &[f32], t: &mut [f32]) {
        let k = x.len();
        let body = k / 8 * 8;
        let xp = x.as_ptr();
        let tail = |row: &[f32]| -> f32 {
            x[body..]
                .iter()
                .zip(&row[body..k])
                .map(|(x, y)| x * y)
                .sum()
        };
        let mut j = 0;
        while j + 4 <= t.len() {
            let ap = a[j * k..].as_ptr();
            let (mut s0, mut s1, mut s2, mut s3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut i = 0;
            while i < body {
                // SAFETY: i + 8 <= body <= k, and rows j..j+4 of `a` lie within `a`.
                unsafe {
                    let xv = _mm256_loadu_ps(xp.add(i));
                    s0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ap.add(i)), s0);
                    s1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ap.add(k + i)), s1);
                    s2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ap.add(2 * k + i)), s2);
                    s3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(ap.add(3 * k + i)), s3);
                }
                i += 8;
            }
            for (q, s) in [s0, s1, s2, s3].into_iter().enumerate() {
                t[j + q] = lanes(s) + tail(&a[(j + q) * k..]);
            }
            j += 4;
        }
        while j < t.len() {
            let ap = a[j * k..].as_ptr();
            let mut s = _mm256_setzero_ps();
            let mut i = 0;
            while i < body {
                // SAFETY: as above, for one row.
                unsafe {
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(ap.add(i)), s);
                }
                i += 8;
            }
            t[j] = lanes(s) + tail(&a[j * k..]);
            j += 1;
        }
    }

    /// See [`super::expand`]: each group of 32 outputs stays in registers over all of `t`.
    ///
    /// # Safety
    /// AVX2 and FMA; `b_t.len() >= t.len() * y.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand(t: &[f32], b_t: &[f32], y: &mut [f32]) {
        let n = y.len();
        let bp = b_t.as_ptr();
        let yp = y.as_mut_ptr();
        let mut c = 0;
        while c + 32 <= n {
            // SAFETY: c + 32 <= n, and every row j of b_t holds n values.
            unsafe {
                let mut y0 = _mm256_loadu_ps(yp.add(c));
                let mut y1 = _mm256_loadu_ps(yp.add(c + 8));
                let mut y2 = _mm256_loadu_ps(yp.add(c + 16));
                let mut y3 = _mm256_loadu_ps(yp.add(c + 24));
                for (j, &tj) in t.iter().enumerate() {
                    let s = _mm256_set1_ps(tj);
                    let b = bp.add(j * n + c);
                    y0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(b), y0);
                    y1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(b.add(8)), y1);
                    y2 = _mm256_fmadd_ps(s, _mm256_loadu_ps(b.add(16)), y2);
                    y3 = _mm256_fmadd_ps(s, _mm256_loadu_ps(b.add(24)), y3);
                }
                _mm256_storeu_ps(yp.add(c), y0);
                _mm256_storeu_ps(yp.add(c + 8), y1);
                _mm256_storeu_ps(yp.add(c + 16), y2);
                _mm256_storeu_ps(yp.add(c + 24), y3);
            }
            c += 32;
        }
        while c + 8 <= n {
            // SAFETY: c + 8 <= n.
            unsafe {
                let mut y0 = _mm256_loadu_ps(yp.add(c));
                for (j, &tj) in t.iter().enumerate() {
                    y0 =
                        _mm256_fmadd_ps(_mm256_set1_ps(tj), _mm256_loadu_ps(bp.add(j * n + c)), y0);
                }
                _mm256_storeu_ps(yp.add(c), y0);
            }
            c += 8;
        }
        for (cc, yc) in y.iter_mut().enumerate().skip(c) {
            for (j, &tj) in t.iter().enumerate() {
                *yc = tj.mul_add(b_t[j * n + cc], *yc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Both halves against a plain f64 product, for shapes with every kind of tail.
    #[test]
    fn shrink_and_expand_match_a_plain_product() {
        for (k, n, rank) in [
            (576, 1536, 8),
            (13, 7, 1),
            (64, 40, 5),
            (9, 33, 16),
            (1, 1, 3),
        ] {
            let x = vals(k, 1);
            let a = vals(rank * k, 2);
            let b_t = vals(rank * n, 3);
            let mut t = vec![0f32; rank];
            shrink(&x, &a, &mut t);
            for j in 0..rank {
                let want: f64 = (0..k).map(|i| x[i] as f64 * a[j * k + i] as f64).sum();
                assert!((t[j] as f64 - want).abs() < 1e-4, "k={k} j={j}");
            }
            let y0 = vals(n, 4);
            let mut y = y0.clone();
            expand(&t, &b_t, &mut y);
            for c in 0..n {
                let want = y0[c] as f64
                    + (0..rank)
                        .map(|j| t[j] as f64 * b_t[j * n + c] as f64)
                        .sum::<f64>();
                assert!((y[c] as f64 - want).abs() < 1e-4, "n={n} c={c}");
            }
        }
    }

    /// A rank processed four at a time or one at a time gives the same bits for each `j`.
    #[test]
    fn each_shrink_output_is_independent_of_the_rank() {
        let k = 100;
        let x = vals(k, 5);
        let a = vals(7 * k, 6);
        let mut all = vec![0f32; 7];
        shrink(&x, &a, &mut all);
        for j in 0..7 {
            let mut one = [0f32; 1];
            shrink(&x, &a[j * k..], &mut one);
            assert_eq!(one[0].to_bits(), all[j].to_bits(), "j={j}");
        }
    }
}
