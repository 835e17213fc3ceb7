//! The built-in CPU platform (vLLM's `CpuPlatform`, spec §2.4): detects the ISA features,
//! cores and memory of this host, prefers `CPU_ATTN` (then `CPU_REFERENCE`), and has the last
//! word on the
//! configuration (`VLLM_CPU_KVCACHE_SPACE`, block size advice).

use std::sync::Arc;

use candle_core::DType;
use trellis_plugin::{
    AttentionBackendRegistry, AttentionSelection, AttentionSelectorConfig, Platform,
    PlatformConfig, PluginError,
};

use crate::cpu_attn::cpu_attn_backend;
use crate::reference::cpu_reference_backend;

/// Name of the built-in CPU platform (and of its `VLLM_TARGET_DEVICE` value).
pub const CPU_PLATFORM_NAME: &str = "cpu";

/// What the CPU offers, detected once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFeatures {
    /// `x86_64`, `aarch64`, ...
    pub arch: &'static str,
    /// Instruction-set extensions found (`avx2`, `avx512f`, `avx512vnni`, `avx512bf16`, `neon`).
    pub isa: Vec<&'static str>,
    /// Usable hardware threads.
    pub cores: usize,
}

impl CpuFeatures {
    /// Detects this host's CPU.
    pub fn detect() -> Self {
        CpuFeatures {
            arch: std::env::consts::ARCH,
            isa: detect_isa(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Whether `feature` (as named in [`CpuFeatures::isa`]) was found.
    pub fn has(&self, feature: &str) -> bool {
        self.isa.contains(&feature)
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_isa() -> Vec<&'static str> {
    let mut isa = Vec::new();
    if std::arch::is_x86_feature_detected!("avx2") {
        isa.push("avx2");
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        isa.push("avx512f");
    }
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        isa.push("avx512vnni");
    }
    if std::arch::is_x86_feature_detected!("avx512bf16") {
        isa.push("avx512bf16");
    }
    isa
}

#[cfg(target_arch = "aarch64")]
fn detect_isa() -> Vec<&'static str> {
    match std::arch::is_aarch64_feature_detected!("neon") {
        true => vec!["neon"],
        false => Vec::new(),
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_isa() -> Vec<&'static str> {
    Vec::new()
}

/// `(MemTotal, MemTotal - MemAvailable)` in bytes from a `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((total, total.saturating_sub(available)))
}

fn meminfo() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The CPU platform.
#[derive(Debug, Clone)]
pub struct CpuPlatform {
    features: CpuFeatures,
    name: String,
}

impl Default for CpuPlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuPlatform {
    /// The platform of this host, features detected now.
    pub fn new() -> Self {
        CpuPlatform {
            features: CpuFeatures::detect(),
            name: CPU_PLATFORM_NAME.to_string(),
        }
    }

    /// The detected CPU features.
    pub fn features(&self) -> &CpuFeatures {
        &self.features
    }
}

impl Platform for CpuPlatform {
    fn device_name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> &str {
        "cpu"
    }

    fn total_memory(&self) -> Option<u64> {
        meminfo().map(|m| m.0)
    }

    fn used_memory(&self) -> Option<u64> {
        meminfo().map(|m| m.1)
    }

    /// The model runs in f32 on the CPU.
    fn supported_dtypes(&self) -> Vec<DType> {
        vec![DType::F32]
    }

    /// vLLM's CPU rules that apply here: `VLLM_CPU_KVCACHE_SPACE` is honoured by the engine
    /// config already (it sets `kv_cache_bytes`); any compute dtype but f32, and any cache
    /// dtype but f32, f16 and bf16 (what `CPU_ATTN` stores), falls back to f32, with a warning.
    /// (vLLM's "block size not a multiple of 32" advice does not apply: neither CPU backend
    /// has a kernel block size.)
    fn check_and_update_config(&self, config: &mut PlatformConfig) -> Result<(), PluginError> {
        if config.dtype != DType::F32 {
            config.warnings.push(format!(
                "dtype {:?} is not supported on CPU; using F32",
                config.dtype
            ));
            config.dtype = DType::F32;
        }
        if !matches!(config.kv_cache_dtype, DType::F32 | DType::F16 | DType::BF16) {
            config.warnings.push(format!(
                "kv_cache_dtype {:?} is not supported on CPU; using F32",
                config.kv_cache_dtype
            ));
            config.kv_cache_dtype = DType::F32;
        }
        Ok(())
    }

    fn attention_backend_priority(&self) -> Vec<String> {
        vec![
            crate::cpu_attn::CPU_ATTN.to_string(),
            crate::reference::CPU_REFERENCE.to_string(),
        ]
    }

    /// vLLM's CPU rule (spec §2.4): a requested backend that cannot run here — one of vLLM's
    /// names without an implementation in this build (`FLASH_ATTN`, ...), or `CUSTOM` while
    /// unregistered — is ignored with vLLM's INFO "Cannot use X backend on CPU." and the
    /// automatic choice (`CPU_ATTN` first) is used instead; no error. A requested backend that
    /// has an implementation (`CPU_ATTN`, `CPU_REFERENCE`, a plugin's) is validated and never
    /// replaced, as on validated platforms: unlike vLLM, Trellis runs more than one backend on
    /// the CPU.
    fn get_attn_backend(
        &self,
        requested: Option<&str>,
        config: &AttentionSelectorConfig,
        registry: &AttentionBackendRegistry,
    ) -> Result<AttentionSelection, PluginError> {
        let priority = self.attention_backend_priority();
        let requested = registry.parse_choice(requested)?;
        if let Some(name) = requested.as_deref()
            && !registry.is_registered(name)
        {
            eprintln!("INFO trellis: Cannot use {name} backend on CPU.");
            let mut selection = registry.select(None, config, self.device_name(), &priority)?;
            selection.reason = format!("{name} cannot be used on CPU; {}", selection.reason);
            return Ok(selection);
        }
        registry.select(requested.as_deref(), config, self.device_name(), &priority)
    }

    fn describe(&self) -> String {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let mem = self
            .total_memory()
            .map_or(String::new(), |t| format!(", {} memory", gib(t)));
        let isa = match self.features.isa.is_empty() {
            true => "no SIMD extensions detected".to_string(),
            false => self.features.isa.join(" "),
        };
        format!(
            "device type cpu, {}, {} cores, {isa}{mem}",
            self.features.arch, self.features.cores
        )
    }
}

/// The CPU platform as a shared trait object.
pub fn cpu_platform() -> Arc<dyn Platform> {
    Arc::new(CpuPlatform::new())
}

/// Registers the CPU attention backends (`CPU_ATTN`, `CPU_REFERENCE`) into `registry`.
pub fn register_cpu_attention_backends(
    registry: &mut AttentionBackendRegistry,
) -> Result<(), PluginError> {
    registry.register_backend(crate::cpu_attn::CPU_ATTN, cpu_attn_backend())?;
    registry.register_backend(crate::reference::CPU_REFERENCE, cpu_reference_backend())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_sane() {
        let p = CpuPlatform::new();
        assert!(p.is_cpu());
        assert_eq!(p.device_name(), "cpu");
        assert!(p.features().cores >= 1);
        #[cfg(target_arch = "x86_64")]
        if p.features().has("avx512f") {
            assert!(p.features().has("avx2"), "every AVX-512 CPU has AVX2");
        }
        #[cfg(target_os = "linux")]
        {
            let (total, used) = (p.total_memory(), p.used_memory());
            assert!(total.is_some_and(|t| t > 0));
            assert!(used.is_some_and(|u| Some(u) <= total));
        }
        assert!(p.describe().starts_with("device type cpu, "));
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    4096 kB\n";
        assert_eq!(parse_meminfo(text), Some((16384 * 1024, 12288 * 1024)));
        assert_eq!(parse_meminfo("garbage"), None);
    }

    #[test]
    fn cpu_prefers_cpu_attn_and_selects_it() {
        let p = CpuPlatform::new();
        let mut reg = AttentionBackendRegistry::new();
        assert!(register_cpu_attention_backends(&mut reg).is_ok());
        let cfg = trellis_plugin::AttentionSelectorConfig {
            head_size: 64,
            num_heads: 9,
            num_kv_heads: 3,
            dtype: DType::F32,
            kv_cache_dtype: DType::F32,
            block_size: Some(16),
            attn_type: trellis_plugin::AttentionType::Decoder,
        };
        let s = p.get_attn_backend(None, &cfg, &reg).map(|s| s.name);
        assert_eq!(s.ok().as_deref(), Some("CPU_ATTN"));
        // Chosen by name, CPU_REFERENCE is still there.
        let s = p.get_attn_backend(Some("CPU_REFERENCE"), &cfg, &reg);
        assert_eq!(s.ok().map(|s| s.name).as_deref(), Some("CPU_REFERENCE"));
        // An f16 cache: only CPU_ATTN stores it; CPU_REFERENCE by name is refused.
        let f16 = trellis_plugin::AttentionSelectorConfig {
            kv_cache_dtype: DType::F16,
            ..cfg
        };
        let s = p.get_attn_backend(None, &f16, &reg).map(|s| s.name);
        assert_eq!(s.ok().as_deref(), Some("CPU_ATTN"));
        assert!(
            p.get_attn_backend(Some("CPU_REFERENCE"), &f16, &reg)
                .is_err()
        );
        // An encoder (non-causal attention): CPU_ATTN is skipped with vLLM's reasons, and
        // refused with them when named.
        let encoder = trellis_plugin::AttentionSelectorConfig {
            attn_type: trellis_plugin::AttentionType::EncoderOnly,
            ..cfg
        };
        let s = p.get_attn_backend(None, &encoder, &reg).map(|s| s.name);
        assert_eq!(s.ok().as_deref(), Some("CPU_REFERENCE"));
        let e = p
            .get_attn_backend(Some("CPU_ATTN"), &encoder, &reg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("Selected backend CPU_ATTN is not valid for this configuration.")
                && e.contains(
                    "'attention type encoder_only not supported', 'non-causal attention not \
                     supported'"
                ),
            "{e}"
        );
    }

    #[test]
    fn config_gets_the_last_word() {
        let p = CpuPlatform::new();
        let mut cfg = PlatformConfig {
            block_size: 16,
            kv_cache_bytes: 1 << 20,
            attention_backend: None,
            dtype: DType::BF16,
            kv_cache_dtype: DType::F32,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            max_model_len: None,
            quantization: None,
            warnings: Vec::new(),
        };
        assert!(p.check_and_update_config(&mut cfg).is_ok());
        assert_eq!(cfg.dtype, DType::F32);
        assert_eq!(cfg.warnings.len(), 1);
        // f16 and bf16 caches are kept (CPU_ATTN stores them); others fall back to f32.
        cfg.kv_cache_dtype = DType::BF16;
        assert!(p.check_and_update_config(&mut cfg).is_ok());
        assert_eq!(cfg.kv_cache_dtype, DType::BF16);
        cfg.kv_cache_dtype = DType::U8;
        assert!(p.check_and_update_config(&mut cfg).is_ok());
        assert_eq!(cfg.kv_cache_dtype, DType::F32);
        assert_eq!(cfg.warnings.len(), 2);
    }
}
