//! Portable K-quant code: the reference product on the file's super-blocks (candle's
//! `vec_dot_unopt`, llama.cpp's generic `vec_dot`), and the scalar tile on the repacked layout.

use super::COLS;
use super::kquants::{KType, QActsK, QK_K, f16_at, scale_min_k4, unpack_values};

/// The last step of the reference: `sumf + Σ_l sums[l]` (Q6_K: `Σ_l sums[l]`), summed as
/// `Iterator::sum` does.
#[inline]
pub(super) fn finish(ktype: KType, sumf: f32, sums: &[f32; 8]) -> f32 {
    let s = sums.iter().sum::<f32>();
    if ktype == KType::Q6K { s } else { sumf + s }
}

pub(super) fn reference(ktype: KType, n: usize, k: usize, raw: &[u8], acts: &QActsK) -> Vec<f32> {
    assert_eq!(acts.k, k, "activation width");
    let kb = k / QK_K;
    let fb = ktype.file_block_bytes();
    let mut out = vec![0f32; acts.m * n];
    for r in 0..acts.m {
        for col in 0..n {
            let mut sums = [0f32; 8];
            let mut sumf = 0f32;
            for b in 0..kb {
                let blk = &raw[(col * kb + b) * fb..][..fb];
                let dy = acts.d[r * kb + b];
                let v = unpack_values(ktype, blk);
                let q8 = |i: usize| acts.q(r, b * QK_K + i);
                match ktype {
                    KType::Q4K | KType::Q5K => {
                        let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
                        for s in 0..8 {
                            (scales[s], mins[s]) = scale_min_k4(s, &blk[4..16]);
                        }
                        let mut sumi = 0i32;
                        for j in 0..16 {
                            sumi += acts.bsums[(r * kb + b) * 16 + j] as i32 * mins[j / 2] as i32;
                        }
                        let mut aux32 = [0i32; 8];
                        for (s, &scale) in scales.iter().enumerate() {
                            for g in 0..4 {
                                for (l, a) in aux32.iter_mut().enumerate() {
                                    let i = 32 * s + 8 * g + l;
                                    let aux16 = q8(i) as i16 * v[i] as i8 as i16;
                                    *a += scale as i32 * aux16 as i32;
                                }
                            }
                        }
                        let d = f16_at(blk, 0) * dy;
                        for l in 0..8 {
                            sums[l] += d * aux32[l] as f32;
                        }
                        let dmin = f16_at(blk, 2) * dy;
                        sumf -= dmin * sumi as f32;
                    }
                    KType::Q6K => {
                        let mut aux32 = [0f32; 8];
                        for j in 0..16 {
                            let scale = blk[192 + j] as i8 as f32;
                            for h in 0..2 {
                                for (l, a) in aux32.iter_mut().enumerate() {
                                    let i = 16 * j + 8 * h + l;
                                    let aux16 = q8(i) as i16 * (v[i] as i32 - 32) as i8 as i16;
                                    *a += scale * aux16 as f32;
                                }
                            }
                        }
                        let d = f16_at(blk, 208) * dy;
                        for l in 0..8 {
                            sums[l] += aux32[l] * d;
                        }
                    }
                }
            }
            out[r * n + col] = finish(ktype, sumf, &sums);
        }
    }
    out
}

/// Unsigned quant of input `32s + l + 8t` of column `c` in a repacked group-super-block.
fn value(ktype: KType, blk: &[u8], s: usize, l: usize, c: usize, t: usize) -> i32 {
    let b = blk[64 * (8 * (s / 2) + l) + 4 * c + t];
    let nib = if s.is_multiple_of(2) { b & 0xF } else { b >> 4 };
    let hi = match ktype {
        KType::Q4K => 0,
        KType::Q5K => ((blk[KType::HI + 64 * l + 4 * c + t] >> s) & 1) << 4,
        KType::Q6K => {
            ((blk[KType::HI + 64 * (8 * (s / 4) + l) + 4 * c + t] >> (2 * (s % 4))) & 3) << 4
        }
    };
    (nib | hi) as i32
}

pub(super) fn tile(
    ktype: KType,
    w: &[u8],
    acts: &QActsK,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    let k = acts.k;
    let kb = k / QK_K;
    let gbb = ktype.group_block_bytes();
    let (sc, mn, doff) = (ktype.sc_off(), ktype.min_off(), ktype.d_off());
    // Per row and column: the eight lane sums and `sumf`.
    let mut st = [[[0f32; 9]; COLS]; 8];
    for b in 0..kb {
        let blk = &w[b * gbb..][..gbb];
        for (r, st_r) in st.iter_mut().enumerate().take(rows) {
            let row = r0 + r;
            let dy = acts.d[row * kb + b];
            let a = &acts.qs[row * k + b * QK_K..][..QK_K];
            for (c, st_rc) in st_r.iter_mut().enumerate() {
                let mut aux = [0i32; 8];
                for s in 0..8 {
                    for (l, x) in aux.iter_mut().enumerate() {
                        for t in 0..4 {
                            let v = value(ktype, blk, s, l, c, t);
                            let a = a[32 * s + 4 * l + t] as i32;
                            *x += match ktype {
                                KType::Q6K => {
                                    blk[sc + 16 * (2 * s + t / 2) + c] as i8 as i32 * (v - 32) * a
                                }
                                _ => blk[sc + 16 * s + c] as i32 * v * a,
                            };
                        }
                    }
                }
                let d = f16_at(blk, doff + 2 * c) * dy;
                for l in 0..8 {
                    st_rc[l] += d * aux[l] as f32;
                }
                if ktype != KType::Q6K {
                    let summ: i32 = (0..8)
                        .map(|s| {
                            blk[mn + 16 * s + c] as i32 * acts.bs32[(row * kb + b) * 8 + s] as i32
                        })
                        .sum();
                    let dmin = f16_at(blk, doff + 32 + 2 * c) * dy;
                    st_rc[8] -= dmin * summ as f32;
                }
            }
        }
    }
    for (r, st_r) in st.iter().enumerate().take(rows) {
        for (c, x) in st_r.iter().enumerate() {
            let sums: [f32; 8] = [x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]];
            tile[r * COLS + c] = finish(ktype, x[8], &sums);
        }
    }
}
