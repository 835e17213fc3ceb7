//! [`Registries`]: the host's tables that built-ins and plugins fill through the same calls —
//! models, attention backends and activated out-of-tree platforms. The engine is built from
//! one (`LLMEngine::with_registries`); the plugin loader's registrar writes into one.

use std::sync::Arc;

use crate::attention::AttentionBackend;
use crate::attention_registry::AttentionBackendRegistry;
use crate::error::{PluginError, Result as ModelResult};
use crate::io_processor::IoProcessorFactory;
use crate::model::Model;
use crate::model_registry::{ModelFactory, ModelLoadContext, ModelRegistry};
use crate::platform::{NamedPlatform, Platform};
use crate::stats::StatLoggerFactory;

/// Every registry a plugin can register into.
#[derive(Clone, Default)]
pub struct Registries {
    /// Architecture name → model factory.
    pub models: ModelRegistry,
    /// Name → attention backend.
    pub attention_backends: AttentionBackendRegistry,
    /// Activated out-of-tree platforms, with their plugin names, in registration order.
    pub platforms: Vec<NamedPlatform>,
    /// Activated built-in platforms in detection order (the host fills it: CUDA when built
    /// with it and a GPU is found, then the CPU, always). Plugins do not touch it.
    pub builtin_platforms: Vec<NamedPlatform>,
    /// Custom stat loggers (group `stat_logger`), with their names, in registration order.
    pub stat_loggers: Vec<(String, StatLoggerFactory)>,
    /// IO processors (group `io_processor`), with the names they registered under.
    pub io_processors: Vec<(String, IoProcessorFactory)>,
    /// LoRA resolvers (registered by general plugins), in registration order.
    pub lora_resolvers: crate::lora_resolver::LoraResolverRegistry,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let platforms: Vec<&str> = self.platforms.iter().map(|(n, _)| n.as_str()).collect();
        let builtins: Vec<&str> = self
            .builtin_platforms
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        f.debug_struct("Registries")
            .field("models", &self.models)
            .field("attention_backends", &self.attention_backends)
            .field("platforms", &platforms)
            .field("builtin_platforms", &builtins)
            .field(
                "stat_loggers",
                &self
                    .stat_loggers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("lora_resolvers", &self.lora_resolvers)
            .finish()
    }
}

impl Registries {
    /// Empty registries (only the `CUSTOM` attention placeholder).
    pub fn new() -> Self {
        Self::default()
    }

    /// Selects the platform from [`Registries::builtin_platforms`] and
    /// [`Registries::platforms`] by vLLM's rules ([`crate::platform::resolve_platform`]).
    pub fn resolve_platform(&self) -> Result<Arc<dyn Platform>, PluginError> {
        crate::platform::resolve_platform(&self.builtin_platforms, &self.platforms)
    }

    /// Registers (or replaces) the model factory of `architecture`.
    pub fn register_model<F>(&mut self, architecture: &str, factory: F)
    where
        F: Fn(&ModelLoadContext<'_>) -> ModelResult<Box<dyn Model>> + Send + Sync + 'static,
    {
        self.models.register_model(architecture, factory);
    }

    /// Registers (or replaces) `architecture` lazily: `make` runs only when it is loaded.
    pub fn register_model_lazy<F>(&mut self, architecture: &str, make: F)
    where
        F: Fn() -> ModelFactory + Send + Sync + 'static,
    {
        self.models.register_model_lazy(architecture, make);
    }

    /// Registers `backend` under `name`: a new name, or an override of an existing one
    /// (including `CUSTOM`).
    pub fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError> {
        self.attention_backends.register_backend(name, backend)
    }

    /// Records an activated out-of-tree platform under its plugin `name` (a second
    /// registration of the same name replaces the first).
    pub fn register_platform(&mut self, name: &str, platform: Arc<dyn Platform>) {
        match self.platforms.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = platform,
            None => self.platforms.push((name.to_string(), platform)),
        }
    }

    /// Registers a custom stat logger under `name` (a second registration of the same name
    /// replaces the first, keeping its place).
    pub fn register_stat_logger(&mut self, name: &str, factory: StatLoggerFactory) {
        match self.stat_loggers.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = factory,
            None => self.stat_loggers.push((name.to_string(), factory)),
        }
    }
}
