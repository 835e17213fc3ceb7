//! Attention time per layer, `CPU_ATTN` vs `CPU_REFERENCE`, for the default model's shape
//! (SmolLM2-135M: 9 query heads, 3 KV heads, head size 64, block size 16).
//!
//! ```text
//! cargo run --release -p trellis-cpu --example attn_bench            # prefill and decode
//! cargo run --release -p trellis-cpu --example attn_bench -- prefill # one mode only
//! TRELLIS_ISA=avx2 cargo run --release -p trellis-cpu --example attn_bench -- decode
//! cargo run --release -p trellis-cpu --example attn_bench -- decode 512  # one depth
//! cargo run --release -p trellis-cpu --example attn_bench -- layers 512  # 30 layers in turn
//! ```
//!
//! Prefill: one causal prompt of [`PROMPT`] tokens (the whole sequence in one step), timed
//! over repeated calls; reported in ms per layer and GFLOP/s (`4 * heads * head size *
//! Σ visible positions`: the multiply-adds of `q·k` and of `p·v`).
//!
//! Times are the mean of the fastest half of the calls (the machine may be shared).
//!
//! Decode: for each context depth (tokens already cached: 0, 512, 4096) the cache is filled by
//! one prefill, then a decode step of `batch` sequences (each sharing that prefix and writing
//! its own next slot) is timed over repeated calls (fastest half, as above). Numbers are a
//! report, not a test. `layers` decodes (batch 1) through 30 layers in turn, each with its own
//! cache, so that the caches are read from where a model's step finds them (not the L1/L2 of
//! one layer timed alone).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use trellis_cpu::{CpuAttnBackend, CpuReferenceBackend};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec,
    SeqAttentionMetadata,
};

const H: usize = 9;
const HKV: usize = 3;
const D: usize = 64;
const BS: usize = 16;
/// Prompt length of the prefill mode.
const PROMPT: usize = 512;

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn inputs(tokens: usize, seed: u64) -> Result<(Tensor, Tensor, Tensor)> {
    let cpu = &Device::Cpu;
    Ok((
        Tensor::from_vec(data(tokens * H * D, seed), (tokens, H, D), cpu)?,
        Tensor::from_vec(data(tokens * HKV * D, seed + 1), (tokens, HKV, D), cpu)?,
        Tensor::from_vec(data(tokens * HKV * D, seed + 2), (tokens, HKV, D), cpu)?,
    ))
}

/// Mean microseconds of one decode call of `batch` sequences at `depth` cached tokens.
fn decode_us(layer: &mut Box<dyn AttentionImpl>, depth: usize, batch: usize) -> Result<f64> {
    decode_layers_us(std::slice::from_mut(layer), depth, batch)
}

/// [`decode_us`] per layer over `layers` run in turn, as a model's step runs them (with
/// [`LAYERS`] of them the caches do not all fit the CPU's private caches).
fn decode_layers_us(
    layers: &mut [Box<dyn AttentionImpl>],
    depth: usize,
    batch: usize,
) -> Result<f64> {
    let prefix: Vec<u32> = (0..(depth / BS) as u32).collect();
    let mut meta = AttentionMetadata {
        block_size: BS,
        ..Default::default()
    };
    for i in 0..batch {
        let own = (depth / BS + i) as u32;
        let mut table = prefix.clone();
        table.push(own);
        meta.slot_mapping.push(own as usize * BS);
        meta.seqs.push(SeqAttentionMetadata {
            query_start: i,
            query_len: 1,
            context_len: depth + 1,
            block_table: table,
        });
    }
    let (q, k, v) = inputs(batch, 99)?;
    for layer in layers.iter_mut() {
        layer.forward(&q, &k, &v, &meta)?;
    }
    // Batches of calls (one call can be shorter than the clock's resolution).
    let per = 10usize.div_ceil(layers.len()) * layers.len();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 20 || (start.elapsed().as_secs_f64() < 0.5 && times.len() < 1000) {
        let t = Instant::now();
        for i in 0..per {
            layers[i % layers.len()].forward(&q, &k, &v, &meta)?;
        }
        times.push(t.elapsed().as_secs_f64() * 1e6 / per as f64);
    }
    Ok(robust(&mut times))
}

/// Layers of the default model: the `layers` mode decodes through this many.
const LAYERS: usize = 30;

/// Decode per layer through [`LAYERS`] layers of `CPU_ATTN`, each with its own cache filled
/// to `depth`, as in a model's decode step.
fn layers(shape: AttentionShape, depths: &[usize]) -> Result<()> {
    println!("decode attention per layer, {LAYERS} layers in turn, batch 1");
    println!("depth  backend         kv dtype  us/layer");
    for &depth in depths {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let spec = KvCacheSpec {
                num_blocks: depth / BS + 2,
                block_size: BS,
                num_kv_heads: HKV,
                head_dim: D,
                dtype,
            };
            let mut all = Vec::new();
            for i in 0..LAYERS {
                let mut layer = CpuAttnBackend.new_layer(&spec, shape, &Device::Cpu)?;
                if depth > 0 {
                    let (q, k, v) = inputs(depth, 7 + i as u64)?;
                    let meta = AttentionMetadata {
                        block_size: BS,
                        slot_mapping: (0..depth).collect(),
                        seqs: vec![SeqAttentionMetadata {
                            query_start: 0,
                            query_len: depth,
                            context_len: depth,
                            block_table: (0..(depth / BS) as u32).collect(),
                        }],
                    };
                    layer.forward(&q, &k, &v, &meta)?;
                }
                all.push(layer);
            }
            let us = decode_layers_us(&mut all, depth, 1)?;
            println!(
                "{depth:>5}  {:<15} {:<9?} {us:.1}",
                CpuAttnBackend.name(),
                dtype
            );
        }
    }
    Ok(())
}

/// Mean milliseconds of one causal prefill of `PROMPT` tokens (at least 0.5 s or 10 calls).
fn prefill_ms(layer: &mut dyn AttentionImpl) -> Result<f64> {
    let meta = AttentionMetadata {
        block_size: BS,
        slot_mapping: (0..PROMPT).collect(),
        seqs: vec![SeqAttentionMetadata {
            query_start: 0,
            query_len: PROMPT,
            context_len: PROMPT,
            block_table: (0..PROMPT.div_ceil(BS) as u32).collect(),
        }],
    };
    let (q, k, v) = inputs(PROMPT, 5)?;
    layer.forward(&q, &k, &v, &meta)?;
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 10 || start.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        layer.forward(&q, &k, &v, &meta)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(robust(&mut times))
}

/// The mean of the fastest half of `times`: the machine may be shared, and a slow call says
/// more about the neighbours than about the kernel.
fn robust(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    let half = &times[..times.len().div_ceil(2)];
    half.iter().sum::<f64>() / half.len() as f64
}

fn prefill(shape: AttentionShape) -> Result<()> {
    let flops = 4.0 * (H * D) as f64 * (PROMPT * (PROMPT + 1) / 2) as f64;
    println!("prefill of {PROMPT} tokens (causal), per layer");
    println!("backend         kv dtype  ms/layer  GFLOP/s");
    let backends: [(&dyn AttentionBackend, DType); 4] = [
        (&CpuReferenceBackend, DType::F32),
        (&CpuAttnBackend, DType::F32),
        (&CpuAttnBackend, DType::F16),
        (&CpuAttnBackend, DType::BF16),
    ];
    for (backend, dtype) in backends {
        let spec = KvCacheSpec {
            num_blocks: PROMPT.div_ceil(BS),
            block_size: BS,
            num_kv_heads: HKV,
            head_dim: D,
            dtype,
        };
        let mut layer = backend.new_layer(&spec, shape, &Device::Cpu)?;
        let ms = prefill_ms(layer.as_mut())?;
        println!(
            "{:<15} {:<9?} {ms:>8.3}  {:>7.1}",
            backend.name(),
            dtype,
            flops / ms / 1e6
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let shape = AttentionShape {
        num_heads: H,
        num_kv_heads: HKV,
        head_dim: D,
        scale: 1.0 / (D as f32).sqrt(),
    };
    let mode = std::env::args().nth(1).unwrap_or_default();
    println!(
        "{H} heads, {HKV} KV heads, head size {D}, block {BS}; isa {}, {} threads",
        trellis_kernels::cpu::isa().name(),
        trellis_kernels::pool::global().threads()
    );
    if mode != "decode" {
        prefill(shape)?;
    }
    if mode == "layers" {
        let depths = match std::env::args().nth(2).and_then(|d| d.parse().ok()) {
            Some(depth) => vec![depth],
            None => vec![0, 512, 4096],
        };
        return layers(shape, &depths);
    }
    if mode != "prefill" {
        // `decode DEPTH` times that depth alone.
        let depths = match std::env::args().nth(2).and_then(|d| d.parse().ok()) {
            Some(depth) => vec![depth],
            None => vec![0, 512, 4096],
        };
        decode(shape, &depths)?;
    }
    Ok(())
}

fn decode(shape: AttentionShape, depths: &[usize]) -> Result<()> {
    let batches = [1, 8];
    println!("decode attention per layer");
    println!("depth  batch  backend         kv dtype  us/call");
    for &depth in depths {
        let backends: [(&dyn AttentionBackend, DType); 4] = [
            (&CpuReferenceBackend, DType::F32),
            (&CpuAttnBackend, DType::F32),
            (&CpuAttnBackend, DType::F16),
            (&CpuAttnBackend, DType::BF16),
        ];
        for (backend, dtype) in backends {
            let spec = KvCacheSpec {
                num_blocks: depth / BS + batches[1] + 1,
                block_size: BS,
                num_kv_heads: HKV,
                head_dim: D,
                dtype,
            };
            let mut layer = backend.new_layer(&spec, shape, &Device::Cpu)?;
            if depth > 0 {
                let (q, k, v) = inputs(depth, 7)?;
                let meta = AttentionMetadata {
                    block_size: BS,
                    slot_mapping: (0..depth).collect(),
                    seqs: vec![SeqAttentionMetadata {
                        query_start: 0,
                        query_len: depth,
                        context_len: depth,
                        block_table: (0..(depth / BS) as u32).collect(),
                    }],
                };
                let t = Instant::now();
                layer.forward(&q, &k, &v, &meta)?;
                println!(
                    "{depth:>5}  prefill {:<15} {:<9?} {:.0} (prefill of {depth})",
                    backend.name(),
                    dtype,
                    t.elapsed().as_secs_f64() * 1e6
                );
            }
            for batch in batches {
                let us = decode_us(&mut layer, depth, batch)?;
                println!(
                    "{depth:>5}  {batch:>5}  {:<15} {:<9?} {us:.1}",
                    backend.name(),
                    dtype
                );
            }
        }
    }
    Ok(())
}
