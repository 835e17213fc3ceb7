//! The host's registries: the engine's built-ins (models, CPU attention backends, the CPU
//! platform), then the plugins (docs/plugins.md). Trellis has no built-in accelerator platform
//! yet: one is added here when it really computes on its device.

use anyhow::Result;
use trellis_plugin::Registries;

/// The built-in registries, before any plugin.
pub fn host_registries() -> Registries {
    trellis_engine::builtin_registries()
}

/// The registries an engine is built from (`generate`, `serve`, `bench`): the built-ins, then
/// every allowed `general` plugin (once per process), then the activated `platform` plugins
/// (not even loaded when `VLLM_TARGET_DEVICE=cpu`, which short-circuits platform selection).
/// An allowed plugin that fails stops start-up with an error naming it.
pub fn engine_registries() -> Result<Registries> {
    Ok(trellis_engine::with_plugins(host_registries())?)
}
