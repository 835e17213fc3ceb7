use half::f16;

use super::*;

/// A small deterministic generator (xorshift), shared with the K-quant tests.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Random file blocks of a `[n, k]` weight: any quant bytes, scales of ordinary size.
fn random_blocks(q: QType, n: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let fb = q.file_block_bytes();
    let mut raw = Vec::with_capacity(n * k / QK * fb);
    for _ in 0..n * k / QK {
        raw.extend_from_slice(&f16::from_f32(rng.f32() * 0.1).to_le_bytes());
        if q == QType::Q4_1 {
            raw.extend_from_slice(&f16::from_f32(rng.f32()).to_le_bytes());
        }
        for _ in 0..fb - raw.len() % fb {
            if raw.len() % fb == 0 {
                break;
            }
            raw.push(rng.next() as u8);
        }
    }
    assert_eq!(raw.len(), n * k / QK * fb);
    raw
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]
        .into_iter()
        .filter(|&i| i <= crate::cpu::detected())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_isa_equals_the_reference_bit_for_bit() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for q in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        for &(n, k) in &[(5usize, 32usize), (16, 64), (33, 576), (48, 1536), (17, 96)] {
            let raw = random_blocks(q, n, k, &mut rng);
            let w = QMatrix::from_gguf_blocks(q, n, k, &raw).expect("repack");
            for m in [1usize, 2, 3, 7, 8, 9, 16, 17, 33, 48] {
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
                x[0] = 0.0;
                if k >= 64 {
                    // An all-zero block (d = 0) and a huge one.
                    x[32..64].fill(0.0);
                    x[m * k - 1] = 1e4;
                }
                let mut acts = QActs::new();
                acts.quantize_for(&x, k, crate::cpu::detected());
                let want = matmul_ref(q, n, k, &raw, &acts);
                for &i in &isas() {
                    let mut got = vec![f32::NAN; m * n];
                    w.matmul_isa(&acts, &mut got, i);
                    assert_eq!(bits(&got), bits(&want), "{q:?} n={n} k={k} m={m} {i:?}");
                }
            }
        }
    }
}

/// Both AVX2-level tiles, `vpmaddubsw` and AVX-VNNI `vpdpbusd` (whichever `matmul_isa` picks on
/// this CPU), give the scalar tile's bits for every format and row count.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_tiles_with_and_without_avx_vnni_equal_the_scalar_tile() {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx2") && has!("fma") && has!("f16c")) {
        return;
    }
    let vnni = has!("avxvnni");
    let mut rng = Rng(0x0bad_cafe_f00d_0001);
    for q in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        for &(n, k) in &[(16usize, 32usize), (16, 576), (32, 1536)] {
            let raw = random_blocks(q, n, k, &mut rng);
            let w = QMatrix::from_gguf_blocks(q, n, k, &raw).expect("repack");
            for m in 1..=8 {
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
                x[m * k - 1] = 1e4;
                let mut acts = QActs::new();
                acts.quantize_for(&x, k, Isa::Avx2);
                for g in 0..n / COLS {
                    let mut want = [0f32; COLS * 8];
                    scalar::tile(q, w.group(g), &acts, 0, m, &mut want);
                    let mut got = [f32::NAN; COLS * 8];
                    // SAFETY: AVX2, FMA and F16C checked above; `m <= 8` rows exist.
                    unsafe { x86::tile_avx2(q, w.group(g), &acts, 0, m, &mut got) };
                    assert_eq!(
                        bits(&got[..m * COLS]),
                        bits(&want[..m * COLS]),
                        "{q:?} maddubs m={m}"
                    );
                    if vnni {
                        let mut got = [f32::NAN; COLS * 8];
                        // SAFETY: as above, and the CPU lists AVX-VNNI.
                        unsafe { x86::tile_avx_vnni(q, w.group(g), &acts, 0, m, &mut got) };
                        assert_eq!(
                            bits(&got[..m * COLS]),
                            bits(&want[..m * COLS]),
                            "{q:?} vnni m={m}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rows_do_not_depend_on_the_batch() {
    let mut rng = Rng(77);
    let (n, k) = (40, 128);
    for q in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        let raw = random_blocks(q, n, k, &mut rng);
        let w = QMatrix::from_gguf_blocks(q, n, k, &raw).expect("repack");
        let x: Vec<f32> = (0..13 * k).map(|_| rng.f32()).collect();
        let mut acts = QActs::new();
        acts.quantize(&x, k);
        let mut all = vec![0f32; 13 * n];
        w.matmul(&acts, &mut all);
        for r in 0..13 {
            acts.quantize(&x[r * k..(r + 1) * k], k);
            let mut one = vec![0f32; n];
            w.matmul(&acts, &mut one);
            assert_eq!(bits(&one), bits(&all[r * n..(r + 1) * n]), "{q:?} row {r}");
        }
    }
}

#[test]
fn close_to_the_float_product() {
    // Sanity of the formats themselves: dequantized weights × x, within quantization error.
    let mut rng = Rng(5);
    let (n, k) = (16, 256);
    for q in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        let raw = random_blocks(q, n, k, &mut rng);
        let fb = q.file_block_bytes();
        let deq: Vec<f32> = (0..n * k)
            .map(|i| {
                let blk = &raw[(i / QK) * fb..][..fb];
                let j = i % QK;
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                match q {
                    QType::Q8_0 => d * blk[2 + j] as i8 as f32,
                    _ => {
                        let qs = &blk[fb - 16..];
                        let v = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 } as f32;
                        match q {
                            QType::Q4_0 => d * (v - 8.0),
                            _ => d * v + f16::from_le_bytes([blk[2], blk[3]]).to_f32(),
                        }
                    }
                }
            })
            .collect();
        let x: Vec<f32> = (0..k).map(|_| rng.f32()).collect();
        let mut acts = QActs::new();
        acts.quantize(&x, k);
        let mut got = vec![0f32; n];
        QMatrix::from_gguf_blocks(q, n, k, &raw)
            .expect("repack")
            .matmul(&acts, &mut got);
        for c in 0..n {
            let exact: f32 = (0..k).map(|i| deq[c * k + i] * x[i]).sum();
            let scale: f32 = (0..k).map(|i| (deq[c * k + i] * x[i]).abs()).sum();
            assert!(
                (got[c] - exact).abs() <= 0.02 * scale + 1e-4,
                "{q:?} col {c}: {} vs {exact}",
                got[c]
            );
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(matches!(
        QMatrix::from_gguf_blocks(QType::Q4_1, 2, 48, &[0; 40]),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        QMatrix::from_gguf_blocks(QType::Q8_0, 2, 64, &[0; 10]),
        Err(QuantError::Size { expected: 136, .. })
    ));
}

#[test]
fn concatenated_weights_equal_the_parts() {
    let mut rng = Rng(9);
    let k = 64;
    for q in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
        let (ra, rb) = (
            random_blocks(q, 32, k, &mut rng),
            random_blocks(q, 21, k, &mut rng),
        );
        let a = QMatrix::from_gguf_blocks(q, 32, k, &ra).expect("a");
        let b = QMatrix::from_gguf_blocks(q, 21, k, &rb).expect("b");
        assert!(QMatrix::concat(&[&b, &a]).is_none(), "partial group first");
        let ab = QMatrix::concat(&[&a, &b]).expect("concat");
        let x: Vec<f32> = (0..3 * k).map(|_| rng.f32()).collect();
        let mut acts = QActs::new();
        acts.quantize(&x, k);
        let mut both = vec![0f32; 3 * 53];
        ab.matmul(&acts, &mut both);
        let (wa, wb) = (
            matmul_ref(q, 32, k, &ra, &acts),
            matmul_ref(q, 21, k, &rb, &acts),
        );
        for r in 0..3 {
            assert_eq!(
                bits(&both[r * 53..r * 53 + 32]),
                bits(&wa[r * 32..(r + 1) * 32])
            );
            assert_eq!(
                bits(&both[r * 53 + 32..(r + 1) * 53]),
                bits(&wb[r * 21..(r + 1) * 21])
            );
        }
    }
}

#[test]
fn simd_quantization_equals_the_scalar_one() {
    let mut rng = Rng(3);
    let mut cases: Vec<Vec<f32>> = (0..2000)
        .map(|i| {
            (0..QK)
                .map(|_| rng.f32() * (1 << (i % 12)) as f32)
                .collect()
        })
        .collect();
    // Exact halves after scaling: amax 127 gives id = 1, so 0.5, 1.5, -2.5 are ties.
    let mut ties: Vec<f32> = (0..QK).map(|i| i as f32 - 15.5).collect();
    ties[0] = 127.0;
    cases.push(ties);
    cases.push(vec![0.0; QK]);
    for xs in &cases {
        let (mut qa, mut qb) = ([0i8; QK], [0i8; QK]);
        let (mut da, mut sa, mut ia) = (0f32, 0f32, 0i32);
        let (mut db, mut sb, mut ib) = (0f32, 0f32, 0i32);
        quantize_block(xs, &mut qa, &mut da, &mut sa, &mut ia);
        #[cfg(target_arch = "x86_64")]
        if isa() >= Isa::Avx512Vnni {
            // SAFETY: checked above.
            unsafe { x86::quantize_block_avx512(xs, &mut qb, &mut db, &mut sb, &mut ib) };
            assert_eq!(
                (qa, da.to_bits(), sa.to_bits(), ia),
                (qb, db.to_bits(), sb.to_bits(), ib)
            );
        }
        let _ = (&mut qb, &mut db, &mut sb, &mut ib);
    }
}

#[test]
fn fused_produce_and_quantize_equals_the_two_passes() {
    let mut rng = Rng(77);
    for (m, k) in [(1usize, 64usize), (3, 576), (300, 576)] {
        let src: Vec<f32> = (0..m * k).map(|_| rng.f32() * 8.0).collect();
        let mut two = QActs::new();
        let doubled: Vec<f32> = src.iter().map(|v| v * 2.0).collect();
        two.quantize(&doubled, k);
        let mut fused = QActs::new();
        let mut out = vec![0f32; m * k];
        fused.quantize_rows_with(&mut out, k, |r0, rows| {
            for (o, v) in rows.iter_mut().zip(&src[r0 * k..]) {
                *o = v * 2.0;
            }
        });
        assert_eq!(bits(&out), bits(&doubled));
        assert_eq!((fused.m, fused.k), (two.m, two.k));
        assert_eq!(fused.qs, two.qs);
        assert_eq!(bits(&fused.d), bits(&two.d));
        assert_eq!(bits(&fused.s), bits(&two.s));
        assert_eq!(fused.isum, two.isum);
        assert_eq!(fused.qs_u8, two.qs_u8);
    }
}
