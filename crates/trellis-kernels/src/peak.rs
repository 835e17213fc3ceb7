//! The machine's int8 multiply-add rate, measured with the instruction the quantized kernels
//! are built on, so that benchmarks can say how close a figure is to what the cores can do.

use std::time::{Duration, Instant};

use crate::cpu::{Isa, isa};
use crate::pool::Pool;

/// Independent accumulator chains in the measuring loop (enough to hide the latency).
const CHAINS: usize = 12;

/// Measures the int8 multiply-adds per second of all of `pool`'s threads together, running
/// dependency-free chains of the kernels' dot-product instruction for about `per_thread` on
/// every thread at once: AVX-512 VNNI `vpdpbusd` (64 MACs), AVX-VNNI `vpdpbusd` on 256 bits
/// (32 MACs) where the AVX2 level uses it, else AVX2 `vpmaddubsw` (32 MACs; its `vpaddw` is
/// counted too, as in the 4-bit kernels). `None` at the scalar level.
pub fn measure_int8_macs_per_s(pool: &Pool, per_thread: Duration) -> Option<f64> {
    let level = isa();
    if level < Isa::Avx2 {
        return None;
    }
    let threads = pool.threads();
    let rates: Vec<std::sync::Mutex<f64>> =
        (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
    pool.run(threads, |i| {
        let start = Instant::now();
        let mut macs = 0u64;
        while start.elapsed() < per_thread {
            macs += burst(level);
        }
        let rate = macs as f64 / start.elapsed().as_secs_f64();
        if let Ok(mut r) = rates[i].lock() {
            *r = rate;
        }
    });
    Some(rates.iter().map(|r| r.lock().map_or(0.0, |r| *r)).sum())
}

/// One burst of the loop at `level`; returns the multiply-adds done.
fn burst(level: Isa) -> u64 {
    const ITERS: u64 = 20_000;
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: the CPU has AVX-512 VNNI (`isa()` checked at run time).
        Isa::Avx512Vnni | Isa::Amx => return unsafe { x86::vnni(ITERS) } * 64,
        // SAFETY: the CPU has AVX2 (`isa()` checked at run time) and AVX-VNNI (checked).
        Isa::Avx2 if crate::cpu::avx_vnni() => return unsafe { x86::avx_vnni(ITERS) } * 32,
        // SAFETY: the CPU has AVX2 (`isa()` checked at run time).
        Isa::Avx2 => return unsafe { x86::maddubs(ITERS) } * 32,
        Isa::Scalar => {}
    }
    let _ = level;
    0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// `iters` rounds of `CHAINS` independent `vpdpbusd`; returns the instructions run.
    ///
    /// # Safety
    /// AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn vnni(iters: u64) -> u64 {
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        let (mut a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(5));
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_dpbusd_epi32(*c, a, b);
            }
            a = std::hint::black_box(a);
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64
    }

    /// `iters` rounds of `CHAINS` independent 256-bit `vpdpbusd` (AVX-VNNI); returns the
    /// instructions run.
    ///
    /// # Safety
    /// AVX2 and AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn avx_vnni(iters: u64) -> u64 {
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        let (mut a, b) = (_mm256_set1_epi8(3), _mm256_set1_epi8(5));
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_dpbusd_avx_epi32(*c, a, b);
            }
            a = std::hint::black_box(a);
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64
    }

    /// `iters` rounds of `CHAINS` independent `vpmaddubsw` + `vpaddw`; returns the
    /// `vpmaddubsw` run.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maddubs(iters: u64) -> u64 {
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        let (mut a, b) = (_mm256_set1_epi8(3), _mm256_set1_epi8(5));
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm256_add_epi16(*c, _mm256_maddubs_epi16(a, b));
            }
            a = std::hint::black_box(a);
        }
        std::hint::black_box(acc);
        iters * CHAINS as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_measured_where_simd_exists() {
        let pool = Pool::new(1);
        match measure_int8_macs_per_s(&pool, Duration::from_millis(5)) {
            Some(r) => assert!(r > 1e8, "{r}"),
            None => assert!(isa() < Isa::Avx2),
        }
    }
}
