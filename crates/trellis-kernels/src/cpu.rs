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
    /// AVX-512 VNNI plus AMX-INT8 tiles for batches of 16 rows or more (Sapphire Rapids and
    /// later), where the CPU lists AMX and the kernel grants this process the tile state.
    Amx,
}

impl Isa {
    /// The name printed by benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
        }
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            return if amx_granted() {
                Isa::Amx
            } else {
                Isa::Avx512Vnni
            };
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Whether the CPU lists AMX-TILE and AMX-INT8 (CPUID leaf 7) and Linux grants this process
/// the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> bool {
    // CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller).
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (tile, int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
    if !(tile && int8 && cfg!(target_os = "linux")) {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with these arguments only changes this process's
    // permission to use AMX state; it touches no memory of ours.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    ret == 0
}

/// Everything this CPU (and OS) supports, AMX included when granted. Kernels asked for a level
/// explicitly run at most at this one.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

/// The level the kernels run at by default: the best this CPU supports up to AVX-512 VNNI, or
/// what `TRELLIS_ISA` (`scalar`, `avx2`, `avx512-vnni`, `amx`) asks for, capped by the CPU.
///
/// AMX is opt-in (`TRELLIS_ISA=amx`): its tiles give the same bits, but measured on this
/// project's 2-vCPU machines they were slower than the AVX-512 VNNI tiles (the per-block
/// rescaling of GGUF formats round-trips each 16 × 16 tile of sums through memory).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let want = match std::env::var("TRELLIS_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") => Isa::Avx2,
            Some("amx") => Isa::Amx,
            _ => Isa::Avx512Vnni,
        };
        want.min(detected())
    })
}

/// Whether the AVX2 level's quantized products use AVX-VNNI (`vpdpbusd` on 256 bits, VEX):
/// the CPU lists it and `TRELLIS_AVX_VNNI` is not `0` (for comparisons). The results are the
/// same bits either way.
pub fn avx_vnni() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avxvnni")
                && std::env::var("TRELLIS_AVX_VNNI").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
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
            ("amx-int8(granted)", detected() == Isa::Amx),
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
