//! `CPU_ATTN` against the `CPU_REFERENCE` oracle on random shapes and batches.
//!
//! Every case runs the same steps through both backends and compares the outputs.
//! Tolerance: with an f32 cache the two differ only in summation order, so 1e-4 absolute
//! (outputs are convex combinations of values in [-1, 1]). With an f16 or bf16 cache,
//! `CPU_REFERENCE` (f32 only) is fed the keys and values already rounded to that dtype (round
//! to nearest even, as `CPU_ATTN` stores them), so the same 1e-4 holds: what is checked is the
//! kernel, not the rounding. A separate check bounds the rounding itself against the unrounded
//! f32 oracle (1e-2 for f16, 5e-2 for bf16).

use candle_core::{DType, Device, Result, Tensor};
use trellis_cpu::{CpuAttnBackend, CpuReferenceBackend};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec,
    SeqAttentionMetadata,
};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn round(x: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        DType::BF16 => x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect(),
        _ => x.to_vec(),
    }
}

/// One test sequence: its block table and the q/k/v of all its positions.
struct TSeq {
    table: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    done: usize,
}

/// CPU_ATTN, the oracle fed rounded K/V, and the oracle fed exact K/V.
struct Pair {
    shape: AttentionShape,
    bs: usize,
    dtype: DType,
    attn: Box<dyn AttentionImpl>,
    oracle: Box<dyn AttentionImpl>,
    exact: Box<dyn AttentionImpl>,
}

impl Pair {
    fn new(h: usize, hkv: usize, d: usize, bs: usize, num_blocks: usize, dtype: DType) -> Self {
        let shape = AttentionShape {
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let spec = KvCacheSpec {
            num_blocks,
            block_size: bs,
            num_kv_heads: hkv,
            head_dim: d,
            dtype,
        };
        let f32_spec = KvCacheSpec {
            dtype: DType::F32,
            ..spec.clone()
        };
        let layer = |b: &dyn AttentionBackend, s: &KvCacheSpec| {
            b.new_layer(s, shape, &Device::Cpu).expect("layer")
        };
        Pair {
            shape,
            bs,
            dtype,
            attn: layer(&CpuAttnBackend, &spec),
            oracle: layer(&CpuReferenceBackend, &f32_spec),
            exact: layer(&CpuReferenceBackend, &f32_spec),
        }
    }

    fn seq(&self, rng: &mut Rng, table: Vec<u32>, len: usize) -> TSeq {
        let (h, hkv, d) = (
            self.shape.num_heads,
            self.shape.num_kv_heads,
            self.shape.head_dim,
        );
        TSeq {
            table,
            q: rng.vec(len * h * d),
            k: rng.vec(len * hkv * d),
            v: rng.vec(len * hkv * d),
            done: 0,
        }
    }

    /// Runs one step of `plan` (`(sequence, new tokens)`) through the backends; returns the
    /// largest error against the rounded oracle and against the exact one.
    fn step(&mut self, seqs: &mut [TSeq], plan: &[(usize, usize)]) -> Result<(f32, f32)> {
        let (h, hkv, d) = (
            self.shape.num_heads,
            self.shape.num_kv_heads,
            self.shape.head_dim,
        );
        let bs = self.bs;
        let mut meta = AttentionMetadata {
            block_size: bs,
            ..Default::default()
        };
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for &(i, n) in plan {
            let s = &mut seqs[i];
            let ctx = s.done + n;
            meta.seqs.push(SeqAttentionMetadata {
                query_start: meta.slot_mapping.len(),
                query_len: n,
                context_len: ctx,
                block_table: s.table.clone(),
            });
            for p in s.done..ctx {
                meta.slot_mapping
                    .push(s.table[p / bs] as usize * bs + p % bs);
            }
            q.extend_from_slice(&s.q[s.done * h * d..ctx * h * d]);
            k.extend_from_slice(&s.k[s.done * hkv * d..ctx * hkv * d]);
            v.extend_from_slice(&s.v[s.done * hkv * d..ctx * hkv * d]);
            s.done = ctx;
        }
        let t = meta.num_tokens();
        let cpu = &Device::Cpu;
        let tq = Tensor::from_vec(q, (t, h, d), cpu)?;
        let (kr, vr) = (round(&k, self.dtype), round(&v, self.dtype));
        let tk = Tensor::from_vec(k, (t, hkv, d), cpu)?;
        let tv = Tensor::from_vec(v, (t, hkv, d), cpu)?;
        let tkr = Tensor::from_vec(kr, (t, hkv, d), cpu)?;
        let tvr = Tensor::from_vec(vr, (t, hkv, d), cpu)?;
        let got = self.attn.forward(&tq, &tk, &tv, &meta)?;
        let want = self.oracle.forward(&tq, &tkr, &tvr, &meta)?;
        let exact = self.exact.forward(&tq, &tk, &tv, &meta)?;
        assert_eq!(got.dims(), [t, h, d]);
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        let max_err = |w: Tensor| -> Result<f32> {
            Ok(w.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max))
        };
        Ok((max_err(want)?, max_err(exact)?))
    }
}

fn rounding_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1e-2,
        DType::BF16 => 5e-2,
        _ => 1e-4,
    }
}

/// Block ids `0..n` in a scrambled order.
fn scrambled(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    ids
}

/// A mixed batch over several steps: prefills with and without cached prefixes, chunked
/// prefills, decodes, context lengths around block boundaries, and a sequence reading a prefix
/// block that another one writes in the same step.
fn mixed_case(rng: &mut Rng, group: usize, hkv: usize, d: usize, bs: usize, dtype: DType) {
    let h = group * hkv;
    // Total lengths: around block boundaries, and random ones.
    let mut lens = vec![1, bs - 1, bs, bs + 1, 2 * bs + 1, 15, 16, 17, 33];
    lens.extend((0..3).map(|_| 1 + rng.below(200)));
    lens.retain(|&l| l > 0);
    let blocks_per: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs) + 1).collect();
    let num_blocks = blocks_per.iter().sum::<usize>() + 4;
    let mut pair = Pair::new(h, hkv, d, bs, num_blocks, dtype);
    let mut free = scrambled(rng, num_blocks);
    let mut seqs: Vec<TSeq> = lens
        .iter()
        .zip(&blocks_per)
        .map(|(&len, &nb)| {
            let table = free.split_off(free.len() - nb);
            pair.seq(rng, table, len)
        })
        .collect();
    // Step 1: a random prefix of every sequence but the last two (a cached prefix for later).
    let plan: Vec<(usize, usize)> = (0..seqs.len() - 2)
        .map(|i| (i, rng.below(lens[i])))
        .filter(|&(_, n)| n > 0)
        .collect();
    let mut steps = vec![plan];
    // Step 2: the rest of each sequence in one chunk (prefill, or decode when one is left).
    steps.push(
        (0..seqs.len())
            .map(|i| {
                (
                    i,
                    lens[i] - steps[0].iter().find(|p| p.0 == i).map_or(0, |p| p.1),
                )
            })
            .filter(|&(_, n)| n > 0)
            .collect(),
    );
    // Sharing: the last sequence reads the first block of the one before it, which that one
    // writes in step 2 (neither is in step 1).
    let (a, b) = (seqs.len() - 2, seqs.len() - 1);
    if lens[a] >= bs && lens[b] > bs {
        let shared = seqs[a].table[0];
        seqs[b].table[0] = shared;
        let kv = bs * hkv * d;
        let (ka, va) = (seqs[a].k[..kv].to_vec(), seqs[a].v[..kv].to_vec());
        seqs[b].k[..kv].copy_from_slice(&ka);
        seqs[b].v[..kv].copy_from_slice(&va);
        seqs[b].done = bs;
        if let Some(p) = steps[1].iter_mut().find(|p| p.0 == b) {
            p.1 = lens[b] - bs;
        }
    }
    for (n, plan) in steps.iter().enumerate() {
        let (err, rounding) = pair.step(&mut seqs, plan).expect("step");
        assert!(
            err < 1e-4,
            "group {group} hkv {hkv} d {d} bs {bs} {dtype:?} step {n}: error {err}"
        );
        assert!(
            rounding < rounding_tolerance(dtype),
            "group {group} d {d} bs {bs} {dtype:?} step {n}: rounding error {rounding}"
        );
    }
    // Step 3: a decode of every sequence (one new token each: extend the data).
    for s in seqs.iter_mut() {
        s.q.extend(rng.vec(h * d));
        s.k.extend(rng.vec(hkv * d));
        s.v.extend(rng.vec(hkv * d));
    }
    let plan: Vec<(usize, usize)> = (0..seqs.len()).map(|i| (i, 1)).collect();
    let (err, _) = pair.step(&mut seqs, &plan).expect("decode step");
    assert!(
        err < 1e-4,
        "group {group} d {d} bs {bs} {dtype:?} decode: {err}"
    );
}

#[test]
fn matches_reference_on_random_shapes_f32() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for group in [1, 3, 4] {
        for d in [64, 128, 80] {
            for bs in [1, 16, 32] {
                mixed_case(&mut rng, group, 2, d, bs, DType::F32);
            }
        }
    }
}

#[test]
fn matches_reference_with_f16_and_bf16_caches() {
    let mut rng = Rng(0x0123_4567_89AB_CDEF);
    for dtype in [DType::F16, DType::BF16] {
        for (group, d, bs) in [(1, 64, 16), (3, 80, 1), (4, 128, 32), (3, 20, 16)] {
            mixed_case(&mut rng, group, 3, d, bs, dtype);
        }
    }
}

#[test]
fn odd_head_sizes_and_large_groups() {
    let mut rng = Rng(42);
    // Tails of the SIMD loops (d % 16, d % 8) and groups wider than the lane cap.
    for (group, d) in [(2, 20), (5, 36), (20, 8), (1, 3)] {
        mixed_case(&mut rng, group, 1, d, 16, DType::F32);
    }
}

#[test]
fn long_context_prefill_and_decode() {
    let mut rng = Rng(7);
    for dtype in [DType::F32, DType::F16] {
        let (h, hkv, d, bs) = (4, 1, 64, 16);
        let len = 4096;
        let nb = len / bs + 1;
        let mut pair = Pair::new(h, hkv, d, bs, nb + 2, dtype);
        let table = scrambled(&mut rng, nb + 2)[..nb].to_vec();
        let mut seqs = vec![pair.seq(&mut rng, table, len)];
        for (i, n) in [4000, 95, 1].into_iter().enumerate() {
            let (err, rounding) = pair.step(&mut seqs, &[(0, n)]).expect("step");
            assert!(err < 1e-4, "{dtype:?} step {i}: error {err}");
            assert!(
                rounding < rounding_tolerance(dtype),
                "{dtype:?}: {rounding}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() -> Result<()> {
    let shape = AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        scale: 0.5,
    };
    let spec = KvCacheSpec {
        num_blocks: 2,
        block_size: 4,
        num_kv_heads: 2,
        head_dim: 8,
        dtype: DType::F16,
    };
    let cpu = &Device::Cpu;
    let b = CpuAttnBackend;
    // Bad layer configurations.
    let bad_specs = [
        KvCacheSpec {
            dtype: DType::U8,
            ..spec.clone()
        },
        KvCacheSpec {
            block_size: 0,
            ..spec.clone()
        },
        KvCacheSpec {
            head_dim: 16,
            ..spec.clone()
        },
    ];
    for s in &bad_specs {
        assert!(b.new_layer(s, shape, cpu).is_err(), "{s:?}");
    }
    let uneven = AttentionShape {
        num_heads: 3,
        ..shape
    };
    assert!(b.new_layer(&spec, uneven, cpu).is_err());

    let mut layer = b.new_layer(&spec, shape, cpu)?;
    let good = AttentionMetadata {
        block_size: 4,
        slot_mapping: vec![0, 1],
        seqs: vec![SeqAttentionMetadata {
            query_start: 0,
            query_len: 2,
            context_len: 2,
            block_table: vec![0],
        }],
    };
    let q = Tensor::zeros((2, 4, 8), DType::F32, cpu)?;
    let kv = Tensor::zeros((2, 2, 8), DType::F32, cpu)?;
    assert!(layer.forward(&q, &kv, &kv, &good).is_ok());
    // Wrong tensor shapes.
    let q3 = Tensor::zeros((2, 3, 8), DType::F32, cpu)?;
    assert!(layer.forward(&q3, &kv, &kv, &good).is_err());
    let kv1 = Tensor::zeros((1, 2, 8), DType::F32, cpu)?;
    assert!(layer.forward(&q, &kv1, &kv, &good).is_err());
    // Bad metadata.
    let mut bad = Vec::new();
    let mut m = good.clone();
    m.slot_mapping[1] = 8; // out of range
    bad.push(m);
    let mut m = good.clone();
    m.block_size = 2;
    bad.push(m);
    let mut m = good.clone();
    m.seqs[0].block_table = vec![2]; // block out of range
    bad.push(m);
    let mut m = good.clone();
    m.seqs[0].context_len = 5; // block table too short
    bad.push(m);
    let mut m = good.clone();
    m.seqs[0].context_len = 1; // query longer than context
    bad.push(m);
    let mut m = good.clone();
    m.seqs[0].query_start = 1; // past the batch
    bad.push(m);
    let mut m = good.clone();
    m.seqs = vec![
        SeqAttentionMetadata {
            query_start: 0,
            query_len: 2,
            context_len: 2,
            block_table: vec![0],
        },
        SeqAttentionMetadata {
            query_start: 1,
            query_len: 1,
            context_len: 1,
            block_table: vec![1],
        },
    ]; // overlapping sequences
    bad.push(m);
    for m in &bad {
        assert!(layer.forward(&q, &kv, &kv, m).is_err(), "{m:?}");
    }
    // Non-contiguous and non-f32 inputs are accepted (copied).
    let qt = Tensor::zeros((2, 8, 4), DType::F32, cpu)?.transpose(1, 2)?;
    assert!(layer.forward(&qt, &kv, &kv, &good).is_ok());
    let kv16 = kv.to_dtype(DType::F16)?;
    assert!(layer.forward(&q, &kv16, &kv16, &good).is_ok());
    Ok(())
}

/// A token's output is bit-identical however the batch around it was split: one prefill of
/// 70 tokens alone, or chunks of 23, 1 and 46 next to another sequence (the engine's
/// batch-invariance tests rely on it).
#[test]
fn results_do_not_depend_on_how_the_batch_was_split() -> Result<()> {
    let cpu = &Device::Cpu;
    for (dtype, d) in [(DType::F32, 64), (DType::F16, 20), (DType::BF16, 80)] {
        let (h, hkv, bs, len) = (6, 2, 16, 70);
        let shape = AttentionShape {
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 0.3,
        };
        let spec = KvCacheSpec {
            num_blocks: 16,
            block_size: bs,
            num_kv_heads: hkv,
            head_dim: d,
            dtype,
        };
        let mut rng = Rng(11);
        let (q, k, v) = (
            rng.vec(len * h * d),
            rng.vec(len * hkv * d),
            rng.vec(len * hkv * d),
        );
        let other = (
            rng.vec(9 * h * d),
            rng.vec(9 * hkv * d),
            rng.vec(9 * hkv * d),
        );
        let table: Vec<u32> = vec![3, 9, 1, 12, 5];
        let run = |chunks: &[usize], with_other: bool| -> Result<Vec<f32>> {
            let mut layer = CpuAttnBackend.new_layer(&spec, shape, cpu)?;
            let mut out = Vec::new();
            let mut done = 0;
            for &n in chunks {
                let mut meta = AttentionMetadata {
                    block_size: bs,
                    ..Default::default()
                };
                let (mut tq, mut tk, mut tv) = (vec![], vec![], vec![]);
                if with_other {
                    meta.seqs.push(SeqAttentionMetadata {
                        query_start: 0,
                        query_len: 9,
                        context_len: 9,
                        block_table: vec![14],
                    });
                    meta.slot_mapping.extend((0..9).map(|p| 14 * bs + p));
                    tq.extend_from_slice(&other.0);
                    tk.extend_from_slice(&other.1);
                    tv.extend_from_slice(&other.2);
                }
                meta.seqs.push(SeqAttentionMetadata {
                    query_start: meta.slot_mapping.len(),
                    query_len: n,
                    context_len: done + n,
                    block_table: table.clone(),
                });
                for p in done..done + n {
                    meta.slot_mapping.push(table[p / bs] as usize * bs + p % bs);
                }
                tq.extend_from_slice(&q[done * h * d..(done + n) * h * d]);
                tk.extend_from_slice(&k[done * hkv * d..(done + n) * hkv * d]);
                tv.extend_from_slice(&v[done * hkv * d..(done + n) * hkv * d]);
                let t = meta.num_tokens();
                let o = layer.forward(
                    &Tensor::from_vec(tq, (t, h, d), cpu)?,
                    &Tensor::from_vec(tk, (t, hkv, d), cpu)?,
                    &Tensor::from_vec(tv, (t, hkv, d), cpu)?,
                    &meta,
                )?;
                let o = o.flatten_all()?.to_vec1::<f32>()?;
                let skip = if with_other { 9 * h * d } else { 0 };
                out.extend_from_slice(&o[skip..]);
                done += n;
            }
            Ok(out)
        };
        let whole = run(&[len], false)?;
        let split = run(&[23, 1, 46], true)?;
        assert!(
            whole
                .iter()
                .zip(&split)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{dtype:?} d {d}: outputs depend on the split"
        );
    }
    Ok(())
}

/// Real models have peaked attention: scores spread over tens of units (attention sinks).
#[test]
fn matches_reference_with_large_scores() -> Result<()> {
    let mut rng = Rng(0xfeed);
    for scale in [1.0f32, 8.0, 30.0] {
        let mut pair = Pair::new(9, 3, 64, 16, 64, DType::F32);
        let mut seq = pair.seq(&mut rng, vec![0, 63, 1, 62, 2], 36);
        seq.q.iter_mut().for_each(|x| *x *= scale);
        let (err, _) = pair.step(std::slice::from_mut(&mut seq), &[(0, 36)])?;
        assert!(err < 1e-4, "scale {scale}: error {err}");
    }
    Ok(())
}

/// A long context's last row is bit-identical whether it is computed in a prefill (chunk states
/// folded as the pass goes), in a decode step alone (the context split into chunk items run in
/// parallel and merged, when the pool has several threads) or in a decode step next to many
/// other sequences (no split). Also checks it against the oracle.
#[test]
fn long_rows_do_not_depend_on_the_decode_split() -> Result<()> {
    let cpu = &Device::Cpu;
    for (dtype, d, len) in [
        (DType::F32, 64, 700usize),
        (DType::F16, 64, 300),
        (DType::BF16, 40, 257),
    ] {
        let (h, hkv, bs) = (9, 3, 16);
        let shape = AttentionShape {
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let others = 9;
        let nb = len.div_ceil(bs) + others + 1;
        let spec = KvCacheSpec {
            num_blocks: nb,
            block_size: bs,
            num_kv_heads: hkv,
            head_dim: d,
            dtype,
        };
        let mut rng = Rng(0xabc + len as u64);
        let (q, k, v) = (
            rng.vec(len * h * d),
            rng.vec(len * hkv * d),
            rng.vec(len * hkv * d),
        );
        let mut rng2 = Rng(5);
        let other: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..others)
            .map(|_| (rng2.vec(h * d), rng2.vec(hkv * d), rng2.vec(hkv * d)))
            .collect();
        let table: Vec<u32> = (0..len.div_ceil(bs) as u32).rev().collect();
        // Steps of (sequence tokens `from..to`, with the other sequences' one token each).
        let run = |steps: &[(usize, usize, bool)]| -> Result<Vec<f32>> {
            let mut layer = CpuAttnBackend.new_layer(&spec, shape, cpu)?;
            let mut last = Vec::new();
            for &(from, to, with_others) in steps {
                let mut meta = AttentionMetadata {
                    block_size: bs,
                    ..Default::default()
                };
                let (mut tq, mut tk, mut tv) = (vec![], vec![], vec![]);
                if with_others {
                    for (i, o) in other.iter().enumerate() {
                        let block = (nb - 1 - i) as u32;
                        meta.seqs.push(SeqAttentionMetadata {
                            query_start: i,
                            query_len: 1,
                            context_len: 1,
                            block_table: vec![block],
                        });
                        meta.slot_mapping.push(block as usize * bs);
                        tq.extend_from_slice(&o.0);
                        tk.extend_from_slice(&o.1);
                        tv.extend_from_slice(&o.2);
                    }
                }
                meta.seqs.push(SeqAttentionMetadata {
                    query_start: meta.slot_mapping.len(),
                    query_len: to - from,
                    context_len: to,
                    block_table: table.clone(),
                });
                for p in from..to {
                    meta.slot_mapping.push(table[p / bs] as usize * bs + p % bs);
                }
                tq.extend_from_slice(&q[from * h * d..to * h * d]);
                tk.extend_from_slice(&k[from * hkv * d..to * hkv * d]);
                tv.extend_from_slice(&v[from * hkv * d..to * hkv * d]);
                let t = meta.num_tokens();
                let o = layer.forward(
                    &Tensor::from_vec(tq, (t, h, d), cpu)?,
                    &Tensor::from_vec(tk, (t, hkv, d), cpu)?,
                    &Tensor::from_vec(tv, (t, hkv, d), cpu)?,
                    &meta,
                )?;
                let o = o.flatten_all()?.to_vec1::<f32>()?;
                last = o[o.len() - h * d..].to_vec();
            }
            Ok(last)
        };
        let prefill = run(&[(0, len, false)])?;
        let alone = run(&[(0, len - 1, false), (len - 1, len, false)])?;
        let batched = run(&[(0, len - 1, false), (len - 1, len, true)])?;
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&prefill, &alone), "{dtype:?}: prefill vs decode alone");
        assert!(
            same(&prefill, &batched),
            "{dtype:?}: prefill vs batched decode"
        );
        // And close to the oracle (fed the rounded keys and values).
        let mut pair = Pair::new(h, hkv, d, bs, nb, dtype);
        let mut seq = TSeq {
            table: table.clone(),
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            done: 0,
        };
        let (err, _) = pair.step(std::slice::from_mut(&mut seq), &[(0, len)])?;
        assert!(err < 1e-4, "{dtype:?}: error {err}");
    }
    Ok(())
}
