//! The host's registries: the engine's built-ins (models, CPU attention backends, CPU
//! platform) plus, with the `cuda` feature, the CUDA platform ahead of the CPU when
//! `nvidia-smi` lists a GPU; then the plugins (docs/plugins.md). `cfg(feature = "cuda")` lives
//! here and in platform crates only.

use anyhow::Result;
use trellis_plugin::Registries;

/// The built-in registries, before any plugin.
pub fn host_registries() -> Registries {
    #[allow(unused_mut)]
    let mut r = trellis_engine::builtin_registries();
    #[cfg(feature = "cuda")]
    if let Some(cuda) = trellis_cuda::detect_cuda_platform() {
        r.builtin_platforms
            .insert(0, (trellis_cuda::CUDA_PLATFORM_NAME.to_string(), cuda));
    }
    r
}

/// The registries an engine is built from (`generate`, `serve`, `bench`): the built-ins, then
/// every allowed `general` plugin (once per process), then the activated `platform` plugins
/// (not even loaded when `VLLM_TARGET_DEVICE=cpu`, which short-circuits platform selection).
/// An allowed plugin that fails stops start-up with an error naming it.
pub fn engine_registries() -> Result<Registries> {
    Ok(trellis_engine::with_plugins(host_registries())?)
}
