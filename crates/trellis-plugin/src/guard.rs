//! Panic isolation at the library boundary: adapters that run every call of a plugin's trait
//! object under `catch_unwind`.
//!
//! A plugin library carries its own copy of the Rust standard library, so a panic raised in
//! its code is a *foreign* exception to the host: the host's `catch_unwind` cannot stop it and
//! the process aborts ("Rust cannot catch foreign exceptions"). Unwinding therefore must end on
//! the side that started it. The code that [`declare_plugin!`](crate::declare_plugin)
//! generates hands its registering entries a [`GuardingRegistrar`] and wraps the platform an
//! entry returns: both are compiled into the plugin (they are instantiated by the plugin's
//! copy of this crate), and they wrap every trait object the plugin hands the host — model
//! factories and the models they build, attention backends and their per-layer
//! implementations, platforms, stat-logger factories and loggers — in
//! an adapter whose every method catches the plugin's panic on the plugin's side.
//!
//! What a caught panic becomes:
//! - in a method that returns an error, that error, naming the plugin, the method and the
//!   panic message (`plugin 'NAME' panicked in Model::forward: MESSAGE`) — in `trellis serve`,
//!   a panicking `forward` fails the requests of that step and the server keeps serving;
//! - in [`AttentionBackend::validate_configuration`], a reason with the same text (the backend
//!   is then not valid for the configuration);
//! - in any other method, an ERROR line on stderr and the trait's default answer (for a name
//!   or a model's configuration, the value read when the object was wrapped).
//!
//! The other direction is guarded the same way by the host: the model factories a plugin
//! gets from [`Registrar::model_factory`] and the attention layers a plugin model is handed
//! ([`guard_host_model_factory`], [`guard_host_layer`]).
//!
//! Wrapping is idempotent in effect (a compiled-in plugin is wrapped by the host's copy, which
//! costs one more landing pad per call) and free on the path without a panic.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::attention::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionSelectorConfig, AttentionShape,
    AttentionType, KvCacheSpec,
};
use crate::attention_registry::{AttentionBackendRegistry, AttentionSelection};
use crate::error::{ModelError, PluginError};
use crate::io_processor::{
    IoPoolingOutput, IoPoolingParams, IoProcessor, IoProcessorContext, IoProcessorFactory,
    IoPrompt, IoResult,
};
use crate::model::{ForwardContext, Model, ModelConfig};
use crate::model_registry::{LazyModelFactory, ModelFactory, ModelLoadContext};
use crate::platform::{Platform, PlatformConfig, RequestInfo};
use crate::pooler::Pooler;
use crate::registrar::Registrar;
use crate::stats::{
    IterationStats, SchedulerStats, StatLogger, StatLoggerConfig, StatLoggerError,
    StatLoggerFactory,
};

/// The text of a panic payload (`&str` or `String`; anything else is "unknown panic payload").
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_string())
}

/// Who a guarded object belongs to: the plugin entry that registered it (or, for what the
/// host hands a plugin, the host's component), and how messages name it.
#[derive(Debug, Clone)]
struct Owner {
    name: Arc<str>,
    /// `plugin 'NAME'` or `trellis's built-in NAME`.
    label: Arc<str>,
}

impl Owner {
    fn plugin(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            label: Arc::from(format!("plugin '{name}'")),
        }
    }

    fn host(component: &str) -> Self {
        Self {
            name: Arc::from("trellis"),
            label: Arc::from(format!("trellis's built-in {component}")),
        }
    }

    /// The message of a panic caught in `method`.
    fn panicked(&self, method: &str, p: &(dyn std::any::Any + Send)) -> String {
        format!("{} panicked in {method}: {}", self.label, panic_text(p))
    }

    /// Runs `f`, turning a panic into its message.
    fn call<T>(&self, method: &str, f: impl FnOnce() -> T) -> Result<T, String> {
        catch_unwind(AssertUnwindSafe(f)).map_err(|p| self.panicked(method, p.as_ref()))
    }

    /// Runs `f`; a panic is logged at ERROR and `fallback` answers instead.
    fn or_default<T>(
        &self,
        method: &str,
        f: impl FnOnce() -> T,
        fallback: impl FnOnce() -> T,
    ) -> T {
        match self.call(method, f) {
            Ok(v) => v,
            Err(message) => {
                eprintln!("ERROR trellis: {message}; using the default answer");
                fallback()
            }
        }
    }

    fn plugin_error(&self, message: String) -> PluginError {
        PluginError::Panicked {
            plugin: self.name.to_string(),
            message,
        }
    }
}

/// A registrar that wraps every object a plugin registers in a guarding adapter before
/// forwarding it to the host's registrar. Handed to every registering entry by the code
/// [`declare_plugin!`](crate::declare_plugin) generates; a plugin never builds one.
pub struct GuardingRegistrar<'a> {
    inner: &'a mut dyn Registrar,
    owner: Owner,
}

impl<'a> GuardingRegistrar<'a> {
    /// Wraps `inner` for the entry `plugin`.
    pub fn new(inner: &'a mut dyn Registrar, plugin: &str) -> Self {
        Self {
            inner,
            owner: Owner::plugin(plugin),
        }
    }
}

impl Registrar for GuardingRegistrar<'_> {
    fn register_model(&mut self, architecture: &str, factory: ModelFactory) {
        let guarded = guard_model_factory(&self.owner, factory);
        self.inner.register_model(architecture, guarded);
    }

    fn register_model_lazy(&mut self, architecture: &str, make: LazyModelFactory) {
        let owner = self.owner.clone();
        let guarded: LazyModelFactory =
            Arc::new(
                move || match owner.call("the lazy model registration", || make()) {
                    Ok(f) => guard_model_factory(&owner, f),
                    Err(message) => Arc::new(move |_ctx: &ModelLoadContext<'_>| {
                        Err(ModelError::Panicked {
                            message: message.clone(),
                        })
                    }),
                },
            );
        self.inner.register_model_lazy(architecture, guarded);
    }

    fn model_factory(&self, architecture: &str) -> Option<ModelFactory> {
        self.inner.model_factory(architecture)
    }

    fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.inner
            .register_gguf_architecture(gguf_arch, architecture);
    }

    fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError> {
        let guarded = guard_attention_backend(&self.owner, backend)?;
        self.inner.register_attention_backend(name, guarded)
    }

    fn register_stat_logger(&mut self, name: &str, factory: StatLoggerFactory) {
        let owner = self.owner.clone();
        let guarded: StatLoggerFactory = Arc::new(move |config: &StatLoggerConfig, index| {
            let logger = owner
                .call("StatLogger factory", || factory(config, index))
                .map_err(StatLoggerError::from)??;
            let logger: Box<dyn StatLogger> = Box::new(GuardedStatLogger {
                inner: logger,
                owner: owner.clone(),
            });
            Ok(logger)
        });
        self.inner.register_stat_logger(name, guarded);
    }

    fn register_lora_resolver(&mut self, name: &str, resolver: Arc<dyn crate::LoraResolver>) {
        let guarded = lora_resolver::GuardedResolver {
            inner: resolver,
            owner: self.owner.clone(),
        };
        self.inner.register_lora_resolver(name, Arc::new(guarded));
    }

    fn register_io_processor(&mut self, name: &str, factory: IoProcessorFactory) {
        let owner = self.owner.clone();
        let guarded: IoProcessorFactory = Arc::new(move |ctx: &IoProcessorContext<'_>| {
            let inner = owner
                .call("IoProcessor factory", || factory(ctx))
                .map_err(|m| -> Box<dyn std::error::Error + Send + Sync> { m.into() })??;
            let processor: Box<dyn IoProcessor> = Box::new(GuardedIoProcessor {
                inner,
                owner: owner.clone(),
            });
            Ok(processor)
        });
        self.inner.register_io_processor(name, guarded);
    }
}

/// A plugin's IO processor: a panic in a method is that request's error (the default
/// answer for the merge methods).
struct GuardedIoProcessor {
    inner: Box<dyn IoProcessor>,
    owner: Owner,
}

impl GuardedIoProcessor {
    fn call<T>(&self, method: &str, f: impl FnOnce() -> IoResult<T>) -> IoResult<T> {
        self.owner
            .call(method, f)
            .map_err(|m| -> Box<dyn std::error::Error + Send + Sync> { m.into() })?
    }
}

impl IoProcessor for GuardedIoProcessor {
    fn parse_data(&self, data: &serde_json::Value) -> IoResult<serde_json::Value> {
        self.call("IoProcessor::parse_data", || self.inner.parse_data(data))
    }

    fn merge_pooling_params(&self, params: Option<IoPoolingParams>) -> IoPoolingParams {
        let fallback = params.clone();
        self.owner.or_default(
            "IoProcessor::merge_pooling_params",
            || self.inner.merge_pooling_params(params),
            || fallback.unwrap_or_default(),
        )
    }

    fn merge_sampling_params(&self, params: Option<serde_json::Value>) -> serde_json::Value {
        let fallback = params.clone();
        self.owner.or_default(
            "IoProcessor::merge_sampling_params",
            || self.inner.merge_sampling_params(params),
            || fallback.unwrap_or_default(),
        )
    }

    fn pre_process(
        &self,
        input: &serde_json::Value,
        request_id: Option<&str>,
    ) -> IoResult<Vec<IoPrompt>> {
        self.call("IoProcessor::pre_process", || {
            self.inner.pre_process(input, request_id)
        })
    }

    fn post_process(
        &self,
        outputs: &[IoPoolingOutput],
        request_id: Option<&str>,
    ) -> IoResult<serde_json::Value> {
        self.call("IoProcessor::post_process", || {
            self.inner.post_process(outputs, request_id)
        })
    }
}

/// Wraps a model factory of the host (`architecture`) that is handed to a plugin
/// ([`Registrar::model_factory`]): a panic in the host's model, called from the plugin's code,
/// must end on the host's side too, as the model's error.
pub fn guard_host_model_factory(architecture: &str, factory: ModelFactory) -> ModelFactory {
    guard_model_factory(&Owner::host(architecture), factory)
}

/// Wraps one layer of the host's attention backend `backend`: a plugin's model calls the
/// layers it is handed ([`ForwardContext::attn_layers`]), and a panic in them must end on the
/// host's side, as the layer's error.
pub fn guard_host_layer(backend: &str, layer: Box<dyn AttentionImpl>) -> Box<dyn AttentionImpl> {
    Box::new(GuardedLayer {
        inner: layer,
        owner: Owner::host(backend),
    })
}

fn guard_model_factory(owner: &Owner, factory: ModelFactory) -> ModelFactory {
    let owner = owner.clone();
    Arc::new(move |ctx: &ModelLoadContext<'_>| {
        let panicked = |message| ModelError::Panicked { message };
        let model = owner
            .call("ModelFactory", || factory(ctx))
            .map_err(panicked)??;
        let config = owner
            .call("Model::config", || model.config().clone())
            .map_err(panicked)?;
        let model: Box<dyn Model> = Box::new(GuardedModel {
            inner: model,
            config,
            owner: owner.clone(),
        });
        Ok(model)
    })
}

/// A plugin's model; its configuration is read once, when it is built.
struct GuardedModel {
    inner: Box<dyn Model>,
    config: ModelConfig,
    owner: Owner,
}

impl GuardedModel {
    /// Calls `f` (the plugin's `method`); a panic becomes the step's error.
    fn call<T>(
        &self,
        method: &str,
        f: impl FnOnce() -> candle_core::Result<T>,
    ) -> candle_core::Result<T> {
        self.owner
            .call(method, f)
            .map_err(candle_core::Error::Msg)?
    }
}

impl Model for GuardedModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> candle_core::Result<Tensor> {
        self.call("Model::forward", || {
            self.inner.forward(input_ids, positions, ctx)
        })
    }

    fn forward_hidden_states(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> candle_core::Result<Tensor> {
        self.call("Model::forward_hidden_states", || {
            self.inner.forward_hidden_states(input_ids, positions, ctx)
        })
    }

    fn compute_logits(&self, hidden_states: &Tensor) -> candle_core::Result<Tensor> {
        self.call("Model::compute_logits", || {
            self.inner.compute_logits(hidden_states)
        })
    }

    fn pooler(&self) -> Option<Pooler> {
        self.owner
            .or_default("Model::pooler", || self.inner.pooler(), || None)
    }

    fn is_generative(&self) -> bool {
        self.owner.or_default(
            "Model::is_generative",
            || self.inner.is_generative(),
            || true,
        )
    }

    fn attn_type(&self, layer: usize) -> AttentionType {
        self.owner.or_default(
            "Model::attn_type",
            || self.inner.attn_type(layer),
            || AttentionType::Decoder,
        )
    }

    fn lora_modules(&self) -> Vec<crate::lora::LoraModuleSpec> {
        self.owner.or_default(
            "Model::lora_modules",
            || self.inner.lora_modules(),
            Vec::new,
        )
    }
}

fn guard_attention_backend(
    owner: &Owner,
    backend: Arc<dyn AttentionBackend>,
) -> Result<Arc<dyn AttentionBackend>, PluginError> {
    let name = owner
        .call("AttentionBackend::name", || backend.name().to_string())
        .map_err(|m| owner.plugin_error(m))?;
    Ok(Arc::new(GuardedBackend {
        inner: backend,
        name,
        owner: owner.clone(),
    }))
}

/// A plugin's attention backend; its name is read once, when it is registered.
struct GuardedBackend {
    inner: Arc<dyn AttentionBackend>,
    name: String,
    owner: Owner,
}

/// The trait's default answers, for a backend method that panicked.
struct DefaultBackend;

impl AttentionBackend for DefaultBackend {
    fn name(&self) -> &str {
        ""
    }

    fn new_layer(
        &self,
        _spec: &KvCacheSpec,
        _shape: AttentionShape,
        _device: &Device,
    ) -> candle_core::Result<Box<dyn AttentionImpl>> {
        Err(candle_core::Error::Msg("no backend".into()))
    }
}

impl AttentionBackend for GuardedBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn supported_head_sizes(&self) -> Vec<usize> {
        self.owner.or_default(
            "AttentionBackend::supported_head_sizes",
            || self.inner.supported_head_sizes(),
            || DefaultBackend.supported_head_sizes(),
        )
    }

    fn supported_dtypes(&self) -> Vec<DType> {
        self.owner.or_default(
            "AttentionBackend::supported_dtypes",
            || self.inner.supported_dtypes(),
            || DefaultBackend.supported_dtypes(),
        )
    }

    fn supported_kv_cache_dtypes(&self) -> Vec<DType> {
        self.owner.or_default(
            "AttentionBackend::supported_kv_cache_dtypes",
            || self.inner.supported_kv_cache_dtypes(),
            || DefaultBackend.supported_kv_cache_dtypes(),
        )
    }

    fn supported_block_sizes(&self) -> Vec<usize> {
        self.owner.or_default(
            "AttentionBackend::supported_block_sizes",
            || self.inner.supported_block_sizes(),
            || DefaultBackend.supported_block_sizes(),
        )
    }

    fn validate_configuration(&self, config: &AttentionSelectorConfig) -> Vec<String> {
        self.owner
            .call("AttentionBackend::validate_configuration", || {
                self.inner.validate_configuration(config)
            })
            .unwrap_or_else(|message| vec![message])
    }

    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> candle_core::Result<Box<dyn AttentionImpl>> {
        self.new_layer_of_type(spec, shape, AttentionType::Decoder, device)
    }

    fn supports_attn_type(&self, attn_type: AttentionType) -> bool {
        self.owner.or_default(
            "AttentionBackend::supports_attn_type",
            || self.inner.supports_attn_type(attn_type),
            || DefaultBackend.supports_attn_type(attn_type),
        )
    }

    fn new_layer_of_type(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        attn_type: AttentionType,
        device: &Device,
    ) -> candle_core::Result<Box<dyn AttentionImpl>> {
        let layer = self
            .owner
            .call("AttentionBackend::new_layer", || {
                self.inner.new_layer_of_type(spec, shape, attn_type, device)
            })
            .map_err(candle_core::Error::Msg)??;
        Ok(Box::new(GuardedLayer {
            inner: layer,
            owner: self.owner.clone(),
        }))
    }
}

/// One layer of a plugin's attention backend.
struct GuardedLayer {
    inner: Box<dyn AttentionImpl>,
    owner: Owner,
}

impl AttentionImpl for GuardedLayer {
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> candle_core::Result<Tensor> {
        let inner = &mut self.inner;
        self.owner
            .call("AttentionImpl::forward", || {
                inner.forward(query, key, value, metadata)
            })
            .map_err(candle_core::Error::Msg)?
    }
}

/// A plugin's stat logger: a panic is logged and the call skipped.
struct GuardedStatLogger {
    inner: Box<dyn StatLogger>,
    owner: Owner,
}

impl StatLogger for GuardedStatLogger {
    fn record(
        &mut self,
        scheduler_stats: Option<&SchedulerStats>,
        iteration_stats: Option<&IterationStats>,
        engine_idx: usize,
    ) {
        let inner = &mut self.inner;
        self.owner.or_default(
            "StatLogger::record",
            || inner.record(scheduler_stats, iteration_stats, engine_idx),
            || (),
        )
    }

    fn log_engine_initialized(&mut self) {
        let inner = &mut self.inner;
        self.owner.or_default(
            "StatLogger::log_engine_initialized",
            || inner.log_engine_initialized(),
            || (),
        )
    }

    fn log(&mut self) {
        let inner = &mut self.inner;
        self.owner
            .or_default("StatLogger::log", || inner.log(), || ())
    }

    fn record_sleep_state(&mut self, is_awake: u32, level: u32) {
        let inner = &mut self.inner;
        self.owner.or_default(
            "StatLogger::record_sleep_state",
            || inner.record_sleep_state(is_awake, level),
            || (),
        )
    }
}

/// Wraps the platform a `platform` entry of `plugin` returned; its names are read now (a
/// panic there is this error).
pub fn guard_platform(
    plugin: &str,
    platform: Arc<dyn Platform>,
) -> Result<Arc<dyn Platform>, String> {
    let owner = Owner::plugin(plugin);
    let (device_name, device_type) = owner.call("Platform::device_name", || {
        (
            platform.device_name().to_string(),
            platform.device_type().to_string(),
        )
    })?;
    Ok(Arc::new(GuardedPlatform {
        inner: platform,
        device_name,
        device_type,
        owner,
    }))
}

/// A plugin's platform; its names are read once, when it is activated.
struct GuardedPlatform {
    inner: Arc<dyn Platform>,
    device_name: String,
    device_type: String,
    owner: Owner,
}

/// The trait's default answers, for a platform method that panicked.
struct DefaultPlatform<'a>(&'a str, &'a str);

impl Platform for DefaultPlatform<'_> {
    fn device_name(&self) -> &str {
        self.0
    }

    fn device_type(&self) -> &str {
        self.1
    }
}

impl GuardedPlatform {
    fn defaults(&self) -> DefaultPlatform<'_> {
        DefaultPlatform(&self.device_name, &self.device_type)
    }

    fn fallible<T>(
        &self,
        method: &str,
        f: impl FnOnce() -> Result<T, PluginError>,
    ) -> Result<T, PluginError> {
        self.owner
            .call(method, f)
            .map_err(|m| self.owner.plugin_error(m))?
    }
}

impl Platform for GuardedPlatform {
    fn device_name(&self) -> &str {
        &self.device_name
    }

    fn device_type(&self) -> &str {
        &self.device_type
    }

    fn is_cpu(&self) -> bool {
        self.owner.or_default(
            "Platform::is_cpu",
            || self.inner.is_cpu(),
            || self.defaults().is_cpu(),
        )
    }

    fn device(&self) -> Result<Device, PluginError> {
        self.fallible("Platform::device", || self.inner.device())
    }

    fn total_memory(&self) -> Option<u64> {
        self.owner.or_default(
            "Platform::total_memory",
            || self.inner.total_memory(),
            || None,
        )
    }

    fn used_memory(&self) -> Option<u64> {
        self.owner.or_default(
            "Platform::used_memory",
            || self.inner.used_memory(),
            || None,
        )
    }

    fn supported_dtypes(&self) -> Vec<DType> {
        self.owner.or_default(
            "Platform::supported_dtypes",
            || self.inner.supported_dtypes(),
            || self.defaults().supported_dtypes(),
        )
    }

    fn supported_quantizations(&self) -> Vec<String> {
        self.owner.or_default(
            "Platform::supported_quantizations",
            || self.inner.supported_quantizations(),
            || self.defaults().supported_quantizations(),
        )
    }

    fn verify_quantization(&self, quantization: &str) -> Result<(), PluginError> {
        self.fallible("Platform::verify_quantization", || {
            self.inner.verify_quantization(quantization)
        })
    }

    fn check_and_update_config(&self, config: &mut PlatformConfig) -> Result<(), PluginError> {
        self.fallible("Platform::check_and_update_config", || {
            self.inner.check_and_update_config(config)
        })
    }

    fn attention_backend_priority(&self) -> Vec<String> {
        self.owner.or_default(
            "Platform::attention_backend_priority",
            || self.inner.attention_backend_priority(),
            || self.defaults().attention_backend_priority(),
        )
    }

    fn get_attn_backend(
        &self,
        requested: Option<&str>,
        config: &AttentionSelectorConfig,
        registry: &AttentionBackendRegistry,
    ) -> Result<AttentionSelection, PluginError> {
        self.fallible("Platform::get_attn_backend", || {
            self.inner.get_attn_backend(requested, config, registry)
        })
    }

    fn seed_everything(&self, seed: u64) {
        self.owner.or_default(
            "Platform::seed_everything",
            || self.inner.seed_everything(seed),
            || (),
        )
    }

    fn verify_model_arch(&self, architecture: &str) -> Result<(), PluginError> {
        self.fallible("Platform::verify_model_arch", || {
            self.inner.verify_model_arch(architecture)
        })
    }

    fn check_max_model_len(&self, max_model_len: usize) -> usize {
        self.owner.or_default(
            "Platform::check_max_model_len",
            || self.inner.check_max_model_len(max_model_len),
            || max_model_len,
        )
    }

    fn validate_request(&self, request: &RequestInfo<'_>) -> Result<(), PluginError> {
        self.fallible("Platform::validate_request", || {
            self.inner.validate_request(request)
        })
    }

    fn describe(&self) -> String {
        self.owner.or_default(
            "Platform::describe",
            || self.inner.describe(),
            || self.defaults().describe(),
        )
    }
}

mod lora_resolver;
#[cfg(test)]
mod tests;
