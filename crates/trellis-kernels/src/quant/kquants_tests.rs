use half::f16;

use super::kquants::{scale_min_k4, unpack_values};
use super::*;

const KTYPES: [KType; 3] = [KType::Q4K, KType::Q5K, KType::Q6K];

use super::tests::Rng;

/// Random file super-blocks of a `[n, k]` weight: any quant and scale bytes, `d`/`dmin` of
/// ordinary size.
fn random_blocks(q: KType, n: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
    let fb = q.file_block_bytes();
    let mut raw = Vec::with_capacity(n * k / QK_K * fb);
    for _ in 0..n * k / QK_K {
        let mut blk: Vec<u8> = (0..fb).map(|_| rng.next() as u8).collect();
        let d = f16::from_f32(rng.f32() * 0.01).to_le_bytes();
        match q {
            KType::Q6K => blk[208..210].copy_from_slice(&d),
            _ => {
                blk[0..2].copy_from_slice(&d);
                blk[2..4].copy_from_slice(&f16::from_f32(rng.f32() * 0.01).to_le_bytes());
            }
        }
        raw.extend_from_slice(&blk);
    }
    raw
}

fn dequantize(q: KType, raw: &[u8]) -> Vec<f32> {
    let fb = q.file_block_bytes();
    let mut out = Vec::new();
    for blk in raw.chunks(fb) {
        let v = unpack_values(q, blk);
        for (i, &x) in v.iter().enumerate() {
            out.push(match q {
                KType::Q6K => {
                    let d = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
                    d * blk[192 + i / 16] as i8 as f32 * (x as f32 - 32.0)
                }
                _ => {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let dmin = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let (sc, m) = scale_min_k4(i / 32, &blk[4..16]);
                    d * sc as f32 * x as f32 - dmin * m as f32
                }
            });
        }
    }
    out
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
        .into_iter()
        .filter(|&i| i <= isa())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_isa_equals_the_reference_bit_for_bit() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for q in KTYPES {
        for &(n, k) in &[
            (5usize, 256usize),
            (16, 512),
            (33, 1536),
            (17, 2816),
            (40, 256),
        ] {
            let raw = random_blocks(q, n, k, &mut rng);
            let w = KMatrix::from_gguf_blocks(q, n, k, &raw).expect("repack");
            for m in [1usize, 2, 3, 7, 8, 9, 17] {
                let mut x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
                x[0] = 0.0;
                // An all-zero super-block (d = 0) where there are two, and a huge value.
                if k >= 512 {
                    x[256..512].fill(0.0);
                }
                x[m * k - 1] = -1e4;
                let mut acts = QActsK::new();
                acts.quantize(&x, k);
                let want = matmul_ref_k(q, n, k, &raw, &acts);
                for &i in &isas() {
                    let mut got = vec![f32::NAN; m * n];
                    w.matmul_isa(&acts, &mut got, i);
                    assert_eq!(bits(&got), bits(&want), "{q:?} n={n} k={k} m={m} {i:?}");
                }
            }
        }
    }
}

#[test]
fn rows_do_not_depend_on_the_batch() {
    let mut rng = Rng(77);
    let (n, k) = (40, 512);
    for q in KTYPES {
        let raw = random_blocks(q, n, k, &mut rng);
        let w = KMatrix::from_gguf_blocks(q, n, k, &raw).expect("repack");
        let x: Vec<f32> = (0..13 * k).map(|_| rng.f32()).collect();
        let mut acts = QActsK::new();
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
    let mut rng = Rng(5);
    let (n, k) = (16, 512);
    for q in KTYPES {
        let raw = random_blocks(q, n, k, &mut rng);
        let deq = dequantize(q, &raw);
        let x: Vec<f32> = (0..k).map(|_| rng.f32()).collect();
        let mut acts = QActsK::new();
        acts.quantize(&x, k);
        let mut got = vec![0f32; n];
        KMatrix::from_gguf_blocks(q, n, k, &raw)
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
fn q8k_activations_are_llama_cpp_s() {
    let mut rng = Rng(11);
    let k = 512;
    let x: Vec<f32> = (0..2 * k).map(|_| rng.f32() * 3.0).collect();
    let mut acts = QActsK::new();
    acts.quantize(&x, k);
    for r in 0..2 {
        for b in 0..k / QK_K {
            let xs = &x[r * k + b * QK_K..][..QK_K];
            let d = acts.d[r * 2 + b];
            let mut bsum = [0i32; 16];
            for (i, &v) in xs.iter().enumerate() {
                let q = acts.q(r, b * QK_K + i);
                assert!((q as f32 * d - v).abs() <= d.abs() * 0.5 + 1e-6);
                bsum[i / 16] += q as i32;
            }
            for (j, &s) in bsum.iter().enumerate() {
                assert_eq!(acts.bsums[(r * 2 + b) * 16 + j] as i32, s);
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(matches!(
        KMatrix::from_gguf_blocks(KType::Q4K, 2, 288, &[0; 1000]),
        Err(KQuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        KMatrix::from_gguf_blocks(KType::Q6K, 2, 512, &[0; 10]),
        Err(KQuantError::Size { expected: 840, .. })
    ));
}

#[test]
fn concatenated_weights_equal_the_parts() {
    let mut rng = Rng(9);
    let k = 256;
    for q in KTYPES {
        let (ra, rb) = (
            random_blocks(q, 32, k, &mut rng),
            random_blocks(q, 21, k, &mut rng),
        );
        let a = KMatrix::from_gguf_blocks(q, 32, k, &ra).expect("a");
        let b = KMatrix::from_gguf_blocks(q, 21, k, &rb).expect("b");
        assert!(KMatrix::concat(&[&b, &a]).is_none(), "partial group first");
        let ab = KMatrix::concat(&[&a, &b]).expect("concat");
        let x: Vec<f32> = (0..3 * k).map(|_| rng.f32()).collect();
        let mut acts = QActsK::new();
        acts.quantize(&x, k);
        let mut both = vec![0f32; 3 * 53];
        ab.matmul(&acts, &mut both);
        let (wa, wb) = (
            matmul_ref_k(q, 32, k, &ra, &acts),
            matmul_ref_k(q, 21, k, &rb, &acts),
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
