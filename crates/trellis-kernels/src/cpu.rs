//! Run-time CPU feature detection: one binary runs on any x86-64 and uses what it finds.

use std::sync::OnceLock;

/// The instruction-set level a kernel runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell and later).
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (Cascade Lake, Ice Lake, Sapphire Rapids and later, Zen 4).
    Avx512Vnni,
}

impl Isa {
    /// The name printed by benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            return Isa::Avx512Vnni;
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// The best level this CPU supports, capped by `TRELLIS_ISA` (`scalar`, `avx2`,
/// `avx512-vnni`) when set, for comparisons.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        let cap = match std::env::var("TRELLIS_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") => Isa::Avx2,
            _ => Isa::Avx512Vnni,
        };
        best.min(cap)
    })
}

/// CPU features worth printing next to a benchmark (what this process detected).
pub fn feature_summary() -> String {
    let mut out: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, on) in [
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vnni", has!("avx512vnni")),
            ("avxvnni", has!("avxvnni")),
        ] {
            if on {
                out.push(name);
            }
        }
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(" ")
    }
}
