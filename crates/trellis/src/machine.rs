//! What the machine can do and what a model costs per token, for the figures `trellis bench
//! latency|throughput` print next to their timings: achieved memory bandwidth against a
//! measured streaming read, achieved int8 operations against the measured peak of the cores.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use trellis_kernels::cpu::Isa;

/// What one forward pass costs, from the weight files.
#[derive(Debug, Clone, Copy)]
pub struct ModelCost {
    /// Bytes of weight data: read once per engine step (decode reads every weight matrix
    /// once per step whatever the batch size).
    pub weight_bytes: u64,
    /// Weight parameters: one token costs about `2 * params` int8 operations (a
    /// multiply-add is 2 ops; attention over the context is left out).
    pub params: u64,
}

impl ModelCost {
    /// Int8 operations per token (`2 * params`).
    pub fn ops_per_token(&self) -> f64 {
        2.0 * self.params as f64
    }
}

/// The weight bytes and parameter count of a GGUF file or a Hugging Face directory of
/// safetensors files.
///
/// GGUF: the exact sum of the tensors' data, i.e. the file size minus the header, metadata and
/// tensor index (`tensor_data_offset`), alignment padding included; parameters are the sum of
/// the tensors' element counts. Safetensors: the byte ranges and shapes of each file's header.
/// The whole embedding table is counted although a step reads only its rows of the batch;
/// with tied embeddings (SmolLM2) it is read whole as the output projection anyway.
pub fn model_cost(path: &Path) -> Result<ModelCost> {
    if path.is_dir() {
        let mut cost = ModelCost {
            weight_bytes: 0,
            params: 0,
        };
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "safetensors") {
                let c = safetensors_cost(&p)?;
                cost.weight_bytes += c.weight_bytes;
                cost.params += c.params;
            }
        }
        anyhow::ensure!(
            cost.params > 0,
            "no safetensors files in {}",
            path.display()
        );
        return Ok(cost);
    }
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata()?.len();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .with_context(|| format!("read the GGUF header of {}", path.display()))?;
    let params = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count() as u64)
        .sum();
    Ok(ModelCost {
        weight_bytes: len.saturating_sub(content.tensor_data_offset),
        params,
    })
}

fn safetensors_cost(path: &Path) -> Result<ModelCost> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    let n = u64::from_le_bytes(n);
    anyhow::ensure!(
        n < 100 << 20,
        "safetensors header too large in {}",
        path.display()
    );
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let mut cost = ModelCost {
        weight_bytes: 0,
        params: 0,
    };
    for (name, t) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offs = &t["data_offsets"];
        let (a, b) = (offs[0].as_u64().unwrap_or(0), offs[1].as_u64().unwrap_or(0));
        cost.weight_bytes += b.saturating_sub(a);
        cost.params += t["shape"]
            .as_array()
            .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product::<u64>())
            .unwrap_or(0);
    }
    Ok(cost)
}

/// The machine's figures, measured at bench start (bandwidth, int8 peak).
#[derive(Debug, Clone)]
pub struct Machine {
    /// Threads of the compute pool (what the engine uses).
    pub threads: usize,
    /// Best multi-threaded streaming-read bandwidth, bytes per second.
    pub read_bytes_per_s: f64,
    /// Size of the buffer the read streamed over.
    pub buffer_bytes: u64,
    /// Last-level (L3) cache size of CPU 0 when the OS says.
    pub l3_bytes: Option<u64>,
    /// Peak int8 operations per second of `threads` cores: measured (the kernels' dot-product
    /// instruction run back to back on every thread) or, at the scalar level, nominal.
    pub int8_ops_per_s: f64,
    /// How the int8 peak was obtained.
    pub int8_basis: String,
    /// How long the probe took.
    pub probe_seconds: f64,
}

impl Machine {
    /// Measures the streaming-read bandwidth (about 0.5 s for 1 GiB, most of it spent
    /// faulting the buffer in) and the int8 peak (0.1 s).
    pub fn probe() -> Machine {
        let start = Instant::now();
        let pool = trellis_kernels::pool::global();
        let threads = pool.threads();
        let l3_bytes = l3_cache_bytes();
        // At least 1 GiB and twice the L3 (hundreds of MiB on some servers): a sequential pass
        // over twice the cache evicts what the next pass needs first, so the passes stream from
        // DRAM (a cache that keeps part of the buffer would make this an over-estimate). At
        // most a quarter of the available memory.
        let mut buffer = (1u64 << 30).max(2 * l3_bytes.unwrap_or(0)).min(4 << 30);
        if let Some(avail) = mem_available_bytes() {
            buffer = buffer.min(avail / 4).max(64 << 20);
        }
        let read_bytes_per_s = streaming_read(pool, buffer as usize);
        // The int8 peak is measured with the kernels' own instruction where there is one.
        let measured =
            trellis_kernels::peak::measure_int8_macs_per_s(pool, Duration::from_millis(100));
        let (int8_ops_per_s, int8_basis) = match measured {
            Some(macs) => (
                2.0 * macs,
                format!(
                    "{threads} threads x {} back to back, measured",
                    match trellis_kernels::cpu::isa() {
                        Isa::Avx2 if trellis_kernels::cpu::avx_vnni() => "vpdpbusd (avx-vnni)",
                        Isa::Avx2 => "vpmaddubsw (avx2)",
                        _ => "vpdpbusd (avx512-vnni)",
                    }
                ),
            ),
            None => nominal_int8(threads),
        };
        Machine {
            threads,
            read_bytes_per_s,
            buffer_bytes: buffer,
            l3_bytes,
            int8_ops_per_s,
            int8_basis,
            probe_seconds: start.elapsed().as_secs_f64(),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "threads": self.threads,
            "isa": trellis_kernels::cpu::isa().name(),
            "streaming_read_gb_per_s": self.read_bytes_per_s / 1e9,
            "streaming_read_buffer_bytes": self.buffer_bytes,
            "l3_cache_bytes": self.l3_bytes,
            "int8_peak_gops_per_s": self.int8_ops_per_s / 1e9,
            "int8_peak_basis": self.int8_basis,
            "probe_seconds": self.probe_seconds,
        })
    }

    /// `Achieved memory bandwidth: ...` for `steps_per_s` engine steps, each reading the
    /// weights once.
    pub fn bandwidth_line(&self, cost: &ModelCost, steps_per_s: f64, what: &str) -> String {
        let achieved = cost.weight_bytes as f64 * steps_per_s;
        let mut line = format!(
            "Achieved memory bandwidth: {:.1} GB/s {what} ({:.1} MB of weights per step; machine: {:.1} GB/s streaming read, {:.0}%)",
            achieved / 1e9,
            cost.weight_bytes as f64 / 1e6,
            self.read_bytes_per_s / 1e9,
            100.0 * achieved / self.read_bytes_per_s.max(1.0),
        );
        if let Some(l3) = self.l3_bytes.filter(|&l3| cost.weight_bytes < l3) {
            line.push_str(&format!(
                "; the weights fit in the {} MiB L3, so this can exceed DRAM bandwidth",
                l3 >> 20
            ));
        }
        line
    }

    /// Int8 ops per second for `tokens_per_s` tokens through the weights.
    pub fn ops(cost: &ModelCost, tokens_per_s: f64) -> f64 {
        cost.ops_per_token() * tokens_per_s
    }
}

/// Streams `bytes` bytes with all pool threads (a wrapping sum of u64 words), two passes after
/// the buffer is written; returns the better pass in bytes per second.
fn streaming_read(pool: &trellis_kernels::pool::Pool, bytes: usize) -> f64 {
    const CHUNK: usize = 4 << 20;
    let words = bytes / 8;
    let chunks = words.div_ceil(CHUNK / 8);
    let mut buf: Vec<u64> = Vec::with_capacity(words);
    let base = buf.as_mut_ptr() as usize;
    // Touch every page from the pool (first touch places pages near the thread that reads
    // them); non-zero data so no page stays the shared zero page.
    pool.run(chunks, |c| {
        let lo = c * (CHUNK / 8);
        let hi = (lo + CHUNK / 8).min(words);
        for i in lo..hi {
            // SAFETY: `i < words <= capacity`; chunks are disjoint, written once each.
            unsafe { (base as *mut u64).add(i).write(i as u64) };
        }
    });
    // SAFETY: every element in 0..words was written above.
    unsafe { buf.set_len(words) };
    let sink = AtomicU64::new(0);
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        pool.run(chunks, |c| {
            let lo = c * (CHUNK / 8);
            let hi = (lo + CHUNK / 8).min(words);
            let mut acc = [0u64; 8];
            let part = &buf[lo..hi];
            let mut it = part.chunks_exact(8);
            for w in &mut it {
                for k in 0..8 {
                    acc[k] = acc[k].wrapping_add(w[k]);
                }
            }
            let mut s = it.remainder().iter().fold(0u64, |a, &w| a.wrapping_add(w));
            for a in acc {
                s = s.wrapping_add(a);
            }
            sink.fetch_add(s, Ordering::Relaxed);
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.load(Ordering::Relaxed));
    (words * 8) as f64 / best.max(1e-9)
}

/// Nominal int8 peak: `threads x MACs/cycle x 2 ops x clock`. Assumptions, per core and
/// cycle: AVX-512 VNNI one 512-bit `vpdpbusd` = 64 u8 x s8 multiply-adds (parts with two
/// 512-bit FMA ports can do twice that); AVX2 one 256-bit `vpmaddubsw` = 32 (its widening
/// `vpmaddwd`/`vpaddd` share the ports, so this is an upper bound); otherwise SSE2-level
/// 16-bit `pmaddwd`, 8. The clock is the model name's `@ x.xxGHz` if given, else the highest
/// `cpu MHz` in /proc/cpuinfo, else 2 GHz; turbo is not counted.
fn nominal_int8(threads: usize) -> (f64, String) {
    let isa = trellis_kernels::cpu::isa();
    let macs = match isa {
        Isa::Avx512Vnni => 64.0,
        // One 16 x 16 x 64 `tdpbusd` every 16 cycles.
        Isa::Amx => 1024.0,
        Isa::Avx2 => 32.0,
        Isa::Scalar => 8.0,
    };
    let ghz = cpu_ghz().unwrap_or(2.0);
    let ops = threads as f64 * macs * 2.0 * ghz * 1e9;
    (
        ops,
        format!(
            "{threads} threads x {macs:.0} int8 MACs/cycle ({}) x 2 ops x {ghz:.2} GHz",
            isa.name()
        ),
    )
}

fn cpu_ghz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let from_name = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split('@').nth(1))
        .and_then(|s| s.trim().trim_end_matches("GHz").trim().parse::<f64>().ok());
    from_name.or_else(|| {
        info.lines()
            .filter(|l| l.starts_with("cpu MHz"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .reduce(f64::max)
            .map(|mhz| mhz / 1000.0)
    })
}

fn l3_cache_bytes() -> Option<u64> {
    for idx in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{idx}");
        let level = std::fs::read_to_string(format!("{dir}/level")).ok()?;
        if level.trim() != "3" {
            continue;
        }
        let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
        let s = size.trim();
        let (num, mult) = match s.chars().last()? {
            'K' => (&s[..s.len() - 1], 1u64 << 10),
            'M' => (&s[..s.len() - 1], 1 << 20),
            'G' => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        return num.parse::<u64>().ok().map(|n| n * mult);
    }
    None
}

fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `Int8 ops: ...` with the figures given as (label, ops per second).
pub fn ops_line(machine: &Machine, parts: &[(&str, f64)]) -> String {
    let figures: Vec<String> = parts
        .iter()
        .map(|(label, ops)| format!("{label} {:.1} Gop/s", ops / 1e9))
        .collect();
    format!(
        "Int8 ops: {} (machine peak: {:.0} Gop/s = {})",
        figures.join(", "),
        machine.int8_ops_per_s / 1e9,
        machine.int8_basis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_cost_sums_ranges_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let header = serde_json::json!({
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        })
        .to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 32]);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let c = model_cost(dir.path()).unwrap();
        assert_eq!((c.weight_bytes, c.params), (32, 10));
        assert_eq!(c.ops_per_token(), 20.0);
    }

    /// The default model's figures are llama-bench's `model_size` and `model_n_params`.
    #[test]
    fn gguf_cost_of_the_default_model() {
        let Ok(path) = crate::args::default_model() else {
            eprintln!("skipped: the default model is not downloaded");
            return;
        };
        let c = model_cost(&path).unwrap();
        assert_eq!(c.weight_bytes, 96_576_768);
        assert_eq!(c.params, 134_515_008);
    }

    #[test]
    fn streaming_read_reports_a_rate() {
        let pool = trellis_kernels::pool::Pool::new(2);
        let rate = streaming_read(&pool, (8 << 20) + 24);
        assert!(rate.is_finite() && rate > 0.0);
    }
}
