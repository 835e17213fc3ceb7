//! The registrar: what a plugin is handed to register into the host's registries.
//!
//! A plugin never touches a global registry of its own: a plugin library has its own copy of
//! every static (DESIGN.md, run-time plugin pitfalls), so registering into "the" registry from
//! inside a library would fill a table the host never reads. Instead every registering entry
//! gets a `&mut dyn Registrar` that forwards to the host's tables. The trait is object-safe so
//! that it crosses the library boundary as a plain pointer.

use std::sync::Arc;

use crate::attention::AttentionBackend;
use crate::error::PluginError;
use crate::io_processor::IoProcessorFactory;
use crate::lora_resolver::LoraResolver;
use crate::model_registry::{LazyModelFactory, ModelFactory};
use crate::stats::StatLoggerFactory;

/// What a plugin entry returns: `Ok(())`, or any error, which stops startup with the plugin's
/// name and this error's text.
pub type RegisterResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The host's registries, as a plugin sees them (vLLM: `ModelRegistry.register_model`,
/// `register_backend`, ...). Implemented by the host for its `Registries`.
pub trait Registrar {
    /// Registers (or replaces: re-registration overwrites, as in vLLM) the factory of a model
    /// architecture.
    fn register_model(&mut self, architecture: &str, factory: ModelFactory);

    /// Registers (or replaces) an architecture lazily: `make` runs only when that architecture
    /// is first loaded.
    fn register_model_lazy(&mut self, architecture: &str, make: LazyModelFactory);

    /// The factory registered for `architecture` (a built-in or another plugin's), so that a
    /// plugin can wrap it; `None` when the architecture is unknown.
    fn model_factory(&self, architecture: &str) -> Option<ModelFactory>;

    /// Maps the GGUF `general.architecture` value `gguf_arch` (`llama`, `qwen2`, ...) to
    /// `architecture`, so that GGUF files of an architecture the plugin registers load too
    /// (a later mapping of the same value replaces the earlier one).
    fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str);

    /// Registers an attention backend under `name` (case-insensitive): a new name, or an
    /// override of an existing one (a built-in or `CUSTOM`).
    fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError>;

    /// Registers a stat logger under `name` (vLLM: a `vllm.stat_logger_plugins` entry point
    /// naming a `StatLoggerBase` subclass). The serving engine builds one logger per engine
    /// from `factory`, before its built-in loggers; a second registration of `name` replaces
    /// the first.
    fn register_stat_logger(&mut self, name: &str, factory: StatLoggerFactory);

    /// Registers an IO processor (group `io_processor`, vLLM's `vllm.io_processor_plugins`
    /// entry returning its class name): the host builds it from `factory` when the entry that
    /// registered it is selected (`--io-processor-plugin`). `name` names the processor in logs.
    fn register_io_processor(&mut self, name: &str, factory: IoProcessorFactory);

    /// Registers a LoRA resolver under `name` (vLLM's
    /// `LoRAResolverRegistry.register_resolver`, called from a general plugin): tried in
    /// registration order on model names the server does not know; a second registration of
    /// `name` replaces the first in place, with a warning.
    fn register_lora_resolver(&mut self, name: &str, resolver: Arc<dyn LoraResolver>);
}

/// One registration a general plugin made, kept so that it can be replayed.
#[derive(Clone)]
pub(crate) enum Registration {
    Model(String, ModelFactory),
    ModelLazy(String, LazyModelFactory),
    GgufArchitecture(String, String),
    AttentionBackend(String, Arc<dyn AttentionBackend>),
    StatLogger(String, StatLoggerFactory),
    IoProcessor(String, IoProcessorFactory),
    LoraResolver(String, Arc<dyn LoraResolver>),
}

impl Registration {
    /// Makes the same registration into `target`.
    pub(crate) fn replay(&self, target: &mut dyn Registrar) -> Result<(), PluginError> {
        match self {
            Registration::Model(a, f) => target.register_model(a, f.clone()),
            Registration::ModelLazy(a, m) => target.register_model_lazy(a, m.clone()),
            Registration::GgufArchitecture(g, a) => target.register_gguf_architecture(g, a),
            Registration::AttentionBackend(n, b) => {
                target.register_attention_backend(n, b.clone())?
            }
            Registration::StatLogger(n, f) => target.register_stat_logger(n, f.clone()),
            Registration::IoProcessor(n, f) => target.register_io_processor(n, f.clone()),
            Registration::LoraResolver(n, r) => target.register_lora_resolver(n, r.clone()),
        }
        Ok(())
    }
}

/// A registrar that forwards to another and keeps a log of what was registered.
///
/// General plugins run once per process, but a process may build several engines, each with
/// its own registries: the first engine's registrations are recorded and replayed into the
/// next ones, so that every engine sees the plugins' models and backends.
pub(crate) struct Recorder<'a> {
    pub(crate) inner: &'a mut dyn Registrar,
    pub(crate) log: Vec<Registration>,
}

impl Registrar for Recorder<'_> {
    fn register_model(&mut self, architecture: &str, factory: ModelFactory) {
        self.log.push(Registration::Model(
            architecture.to_string(),
            factory.clone(),
        ));
        self.inner.register_model(architecture, factory);
    }

    fn register_model_lazy(&mut self, architecture: &str, make: LazyModelFactory) {
        self.log.push(Registration::ModelLazy(
            architecture.to_string(),
            make.clone(),
        ));
        self.inner.register_model_lazy(architecture, make);
    }

    fn model_factory(&self, architecture: &str) -> Option<ModelFactory> {
        self.inner.model_factory(architecture)
    }

    fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.log.push(Registration::GgufArchitecture(
            gguf_arch.to_string(),
            architecture.to_string(),
        ));
        self.inner
            .register_gguf_architecture(gguf_arch, architecture);
    }

    fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError> {
        self.inner
            .register_attention_backend(name, backend.clone())?;
        self.log
            .push(Registration::AttentionBackend(name.to_string(), backend));
        Ok(())
    }

    fn register_stat_logger(&mut self, name: &str, factory: StatLoggerFactory) {
        self.log
            .push(Registration::StatLogger(name.to_string(), factory.clone()));
        self.inner.register_stat_logger(name, factory);
    }

    fn register_io_processor(&mut self, name: &str, factory: IoProcessorFactory) {
        self.log
            .push(Registration::IoProcessor(name.to_string(), factory.clone()));
        self.inner.register_io_processor(name, factory);
    }

    fn register_lora_resolver(&mut self, name: &str, resolver: Arc<dyn LoraResolver>) {
        self.log.push(Registration::LoraResolver(
            name.to_string(),
            resolver.clone(),
        ));
        self.inner.register_lora_resolver(name, resolver);
    }
}

impl Registrar for crate::registries::Registries {
    fn register_model(&mut self, architecture: &str, factory: ModelFactory) {
        self.models.register_factory(architecture, factory);
    }

    fn register_model_lazy(&mut self, architecture: &str, make: LazyModelFactory) {
        self.models
            .register_model_lazy(architecture, move || make());
    }

    fn model_factory(&self, architecture: &str) -> Option<ModelFactory> {
        // Handed to a plugin: a panic in the host's model must not unwind into its frames.
        self.models
            .get(architecture)
            .map(|f| crate::guard::guard_host_model_factory(architecture, f))
    }

    fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.models
            .register_gguf_architecture(gguf_arch, architecture);
    }

    fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError> {
        self.attention_backends.register_backend(name, backend)
    }

    fn register_stat_logger(&mut self, name: &str, factory: StatLoggerFactory) {
        crate::registries::Registries::register_stat_logger(self, name, factory);
    }

    fn register_io_processor(&mut self, name: &str, factory: IoProcessorFactory) {
        match self.io_processors.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = factory,
            None => self.io_processors.push((name.to_string(), factory)),
        }
    }

    fn register_lora_resolver(&mut self, name: &str, resolver: Arc<dyn LoraResolver>) {
        self.lora_resolvers.register_resolver(name, resolver);
    }
}
