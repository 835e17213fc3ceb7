//! # trellis-cuda — the CUDA platform
//!
//! Detection and device facts only, and on purpose without a CUDA toolkit: the GPUs are found
//! by running `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`
//! (vLLM asks NVML; `nvidia-smi` is NVML's command-line face and ships with the driver). The
//! platform is *activated* only when at least one GPU is listed ([`CudaPlatform::detect`]).
//!
//! Trellis has no CUDA kernels yet: tensors stay on the CPU and attention is `CPU_REFERENCE`,
//! which [`CudaPlatform::describe`](trellis_plugin::Platform::describe) says in the startup
//! log. The binary includes this crate only with its `cuda` feature, so the default build
//! needs nothing from NVIDIA.

use std::process::Command;
use std::sync::Arc;

use candle_core::DType;
use trellis_plugin::Platform;

/// Name of the built-in CUDA platform.
pub const CUDA_PLATFORM_NAME: &str = "cuda";

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Marketing name (`NVIDIA H200`).
    pub name: String,
    /// Memory in bytes.
    pub total_memory: u64,
    /// Memory in use in bytes, when reported.
    pub used_memory: Option<u64>,
}

/// Parses `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits`
/// output (MiB values, one GPU a line); lines that do not parse are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    let mib = |s: &str| -> Option<u64> {
        let v: u64 = s.trim().trim_end_matches("MiB").trim().parse().ok()?;
        v.checked_mul(1 << 20)
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(',');
            let name = parts.next()?.trim().to_string();
            let total_memory = mib(parts.next()?)?;
            let used_memory = parts.next().and_then(mib);
            (!name.is_empty()).then_some(GpuInfo {
                name,
                total_memory,
                used_memory,
            })
        })
        .collect()
}

/// Runs `nvidia-smi`; `None` when it is missing, fails, or lists no GPU.
pub fn query_gpus() -> Option<Vec<GpuInfo>> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let gpus = parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout));
    (!gpus.is_empty()).then_some(gpus)
}

/// The CUDA platform: the first GPU's facts.
#[derive(Debug, Clone)]
pub struct CudaPlatform {
    gpus: Vec<GpuInfo>,
    name: String,
}

impl CudaPlatform {
    /// The platform for `gpus` (the first one is the device); `None` when the list is empty.
    pub fn from_gpus(gpus: Vec<GpuInfo>) -> Option<Self> {
        let name = gpus.first()?.name.clone();
        Some(CudaPlatform { gpus, name })
    }

    /// Activates the platform when `nvidia-smi` lists at least one GPU.
    pub fn detect() -> Option<Self> {
        Self::from_gpus(query_gpus()?)
    }

    /// The GPUs found.
    pub fn gpus(&self) -> &[GpuInfo] {
        &self.gpus
    }
}

impl Platform for CudaPlatform {
    fn device_name(&self) -> &str {
        &self.name
    }

    fn device_type(&self) -> &str {
        "cuda"
    }

    fn total_memory(&self) -> Option<u64> {
        self.gpus.first().map(|g| g.total_memory)
    }

    fn used_memory(&self) -> Option<u64> {
        query_gpus()
            .and_then(|g| g.first().and_then(|g| g.used_memory))
            .or_else(|| self.gpus.first().and_then(|g| g.used_memory))
    }

    /// The model runs in f32 (on the CPU, see the crate docs).
    fn supported_dtypes(&self) -> Vec<DType> {
        vec![DType::F32]
    }

    fn attention_backend_priority(&self) -> Vec<String> {
        vec!["CPU_REFERENCE".to_string()]
    }

    fn describe(&self) -> String {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let total = self
            .total_memory()
            .map_or(String::new(), |t| format!(", {}", gib(t)));
        format!(
            "device type cuda, {} GPU(s){total}; no CUDA kernels in this build: computing on the CPU",
            self.gpus.len()
        )
    }
}

/// The CUDA platform as a shared trait object, when a GPU is present.
pub fn detect_cuda_platform() -> Option<Arc<dyn Platform>> {
    CudaPlatform::detect().map(|p| Arc::new(p) as Arc<dyn Platform>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_output() {
        let gpus = parse_nvidia_smi("NVIDIA H200, 143771, 1024\nbad line\nTesla T4, 15360\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA H200");
        assert_eq!(gpus[0].total_memory, 143771 << 20);
        assert_eq!(gpus[0].used_memory, Some(1024 << 20));
        assert_eq!(gpus[1].used_memory, None);
        assert!(parse_nvidia_smi("").is_empty());
    }

    #[test]
    fn platform_needs_a_gpu() {
        assert!(CudaPlatform::from_gpus(Vec::new()).is_none());
        let p = CudaPlatform::from_gpus(parse_nvidia_smi("NVIDIA H200, 143771, 0"));
        let p = p.map(|p| {
            (
                p.device_name().to_string(),
                p.device_type().to_string(),
                p.is_cpu(),
            )
        });
        assert_eq!(p, Some(("NVIDIA H200".into(), "cuda".into(), false)));
    }

    /// Runs where `nvidia-smi` exists; elsewhere detection must say "not activated".
    #[test]
    fn detection_matches_nvidia_smi() {
        match CudaPlatform::detect() {
            Some(p) => assert!(p.total_memory().is_some_and(|t| t > 0)),
            None => assert!(query_gpus().is_none()),
        }
    }
}
