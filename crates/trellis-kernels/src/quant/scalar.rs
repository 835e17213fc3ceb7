//! Portable code: the reference product on the file's blocks, and the scalar tile on the
//! repacked layout (used where the CPU has neither AVX2 nor AVX-512).

use half::f16;

use super::{COLS, QActs, QK, QType};

fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// One output element's block update, the reference float expression.
#[inline(always)]
pub(super) fn update(acc: f32, qtype: QType, sumi: i32, dw: f32, mw: f32, da: f32, sa: f32) -> f32 {
    let t = sumi as f32 * dw * da;
    match qtype {
        QType::Q4_1 => acc + (t + mw * sa),
        _ => acc + t,
    }
}

pub(super) fn reference(qtype: QType, n: usize, k: usize, raw: &[u8], acts: &QActs) -> Vec<f32> {
    assert_eq!(acts.k, k, "activation width");
    let kb = k / QK;
    let fb = qtype.file_block_bytes();
    let mut out = vec![0f32; acts.m * n];
    for r in 0..acts.m {
        let a = acts.row_qs(r);
        for col in 0..n {
            let mut acc = 0f32;
            for b in 0..kb {
                let blk = &raw[(col * kb + b) * fb..][..fb];
                let ab = &a[b * QK..][..QK];
                let (sumi, mw) = match qtype {
                    QType::Q4_0 | QType::Q4_1 => {
                        let qs = &blk[blk.len() - 16..];
                        let off = if qtype == QType::Q4_0 { 8 } else { 0 };
                        let mut s = 0i32;
                        for j in 0..16 {
                            let lo = (qs[j] & 0x0F) as i32 - off;
                            let hi = (qs[j] >> 4) as i32 - off;
                            s += lo * ab[j] as i32 + hi * ab[j + 16] as i32;
                        }
                        let mw = if qtype == QType::Q4_1 {
                            f16_at(blk, 2)
                        } else {
                            0.0
                        };
                        (s, mw)
                    }
                    QType::Q8_0 => {
                        let s = blk[2..34]
                            .iter()
                            .zip(ab)
                            .map(|(&w, &a)| w as i8 as i32 * a as i32)
                            .sum();
                        (s, 0.0)
                    }
                };
                let i = r * kb + b;
                acc = update(acc, qtype, sumi, f16_at(blk, 0), mw, acts.d[i], acts.s[i]);
            }
            out[r * n + col] = acc;
        }
    }
    out
}

pub(super) fn tile(
    qtype: QType,
    w: &[u8],
    acts: &QActs,
    r0: usize,
    rows: usize,
    tile: &mut [f32; COLS * 8],
) {
    let kb = acts.k / QK;
    let gbb = qtype.group_block_bytes();
    let qb = qtype.quant_bytes();
    tile.fill(0.0);
    for b in 0..kb {
        let blk = &w[b * gbb..][..gbb];
        for r in 0..rows {
            let row = r0 + r;
            let a = &acts.row_qs(row)[b * QK..][..QK];
            let i = row * kb + b;
            let corr = acts.isum[i] << qtype.isum_shift();
            for c in 0..COLS {
                let mut sumi = 0i32;
                match qtype {
                    QType::Q4_0 | QType::Q4_1 => {
                        for j in 0..4 {
                            for t in 0..4 {
                                let byte = blk[64 * j + 4 * c + t];
                                sumi += (byte & 0x0F) as i32 * a[4 * j + t] as i32;
                                sumi += (byte >> 4) as i32 * a[16 + 4 * j + t] as i32;
                            }
                        }
                    }
                    QType::Q8_0 => {
                        for s in 0..8 {
                            for t in 0..4 {
                                sumi += blk[64 * s + 4 * c + t] as i32 * a[4 * s + t] as i32;
                            }
                        }
                    }
                }
                if qtype != QType::Q4_1 {
                    sumi -= corr;
                }
                let mw = if qtype == QType::Q4_1 {
                    f16_at(blk, qb + 32 + 2 * c)
                } else {
                    0.0
                };
                let v = &mut tile[r * COLS + c];
                *v = update(
                    *v,
                    qtype,
                    sumi,
                    f16_at(blk, qb + 2 * c),
                    mw,
                    acts.d[i],
                    acts.s[i],
                );
            }
        }
    }
}
