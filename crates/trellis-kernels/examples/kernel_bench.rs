//! Throughput of the quantized kernels on the default model's shapes (SmolLM2-135M: 30 layers
//! of q/k/v [960, 576], o [576, 576], gate/up [3072, 576], down [576, 1536] in Q4_1, and the
//! tied head [49152, 576] in Q8_0), with random weights.
//!
//! `cargo run --release -p trellis-kernels --example kernel_bench [rows...]` prints, per batch
//! size, the time of one pass over all weights, the weight bytes read per second and the int8
//! multiply-adds per second. Set `TRELLIS_ISA=avx2|scalar` to compare instruction sets.

use std::time::Instant;

use trellis_kernels::quant::{QActs, QMatrix, QType};

fn random_blocks(q: QType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let fb = q.file_block_bytes();
    let mut raw = vec![0u8; n * k / 32 * fb];
    for (i, b) in raw.iter_mut().enumerate() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Small f16 scales (bytes 1 and 3 of each block kept low), anything else random.
        *b = if i % fb == 1 || (q == QType::Q4_1 && i % fb == 3) {
            0x1c
        } else {
            s as u8
        };
    }
    raw
}

/// CPU seconds this process has used (user + system, all threads), from /proc/self/stat:
/// unlike wall time, it does not count time the threads spent descheduled by neighbours.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // Fields 14 and 15 of the file; the state (field 3) is not a number and is skipped.
    f.get(10)
        .zip(f.get(11))
        .map_or(0.0, |(u, s)| (u + s) / 100.0)
}

fn main() {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 8, 64, 512]
    } else {
        rows
    };
    let mut layers = Vec::new();
    for l in 0..30u64 {
        for (i, &(n, k)) in [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)]
            .iter()
            .enumerate()
        {
            let raw = random_blocks(QType::Q4_1, n, k, l * 8 + i as u64 + 1);
            layers.push(QMatrix::from_gguf_blocks(QType::Q4_1, n, k, &raw).expect("repack"));
        }
    }
    let head_raw = random_blocks(QType::Q8_0, 49152, 576, 99);
    let head = QMatrix::from_gguf_blocks(QType::Q8_0, 49152, 576, &head_raw).expect("repack");
    let bytes: usize = layers.iter().map(|w| w.bytes()).sum::<usize>() + head.bytes();
    let macs_per_row: usize = layers
        .iter()
        .chain(std::iter::once(&head))
        .map(|w| w.out_features() * w.in_features())
        .sum();
    println!(
        "isa {}, {} threads, {:.1} MB of weights",
        trellis_kernels::cpu::isa().name(),
        trellis_kernels::pool::global().threads(),
        bytes as f64 / 1e6
    );
    for &m in &rows {
        let x576: Vec<f32> = (0..m * 576)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let x1536: Vec<f32> = (0..m * 1536)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let (mut a576, mut a1536) = (QActs::new(), QActs::new());
        a576.quantize(&x576, 576);
        a1536.quantize(&x1536, 1536);
        let mut out = vec![0f32; m * 49152];
        let pass = |out: &mut Vec<f32>| {
            for w in &layers {
                let a = if w.in_features() == 576 {
                    &a576
                } else {
                    &a1536
                };
                w.matmul(a, &mut out[..m * w.out_features()]);
            }
            head.matmul(&a576, &mut out[..m * 49152]);
        };
        pass(&mut out);
        let iters = (64 / m).clamp(4, 20);
        let mut best = f64::MAX;
        let cpu0 = cpu_seconds();
        for _ in 0..iters {
            let t = Instant::now();
            pass(&mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        let cpu = (cpu_seconds() - cpu0) / iters as f64;
        println!(
            "rows {m:4}: best pass {:8.2} ms (cpu {:8.2} ms)  {:6.1} GB/s of weights  {:7.1} G int8 MAC/s  ({:.0} rows/s)",
            best * 1e3,
            cpu * 1e3,
            bytes as f64 / best / 1e9,
            (macs_per_row * m) as f64 / best / 1e9,
            m as f64 / best
        );
    }
}
