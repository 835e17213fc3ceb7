//! # trellis-plugin — the API a Trellis plugin is written against
//!
//! Small on purpose (candle-core and nothing heavy): a plugin author depends on this crate
//! alone. It holds the extension-point traits — [`AttentionBackend`], [`Model`] — and the
//! types that cross them.

pub mod attention;
pub mod attention_registry;
pub mod error;
pub mod io_processor;
pub mod lora;
pub mod lora_fs_resolver;
pub mod lora_resolver;
pub mod model;
pub mod model_registry;
pub mod platform;
pub mod pooler;
pub mod registries;
pub mod stats;
pub mod weights;

pub use attention::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionSelectorConfig, AttentionShape,
    AttentionType, KvCacheSpec, SeqAttentionMetadata,
};
pub use attention_registry::{AttentionBackendRegistry, AttentionSelection};
pub use error::{ModelError, PluginError};
pub use io_processor::{
    IoPoolingOutput, IoPoolingParams, IoProcessor, IoProcessorContext, IoProcessorFactory,
    IoPrompt, IoResult,
};
pub use lora::{
    LoraMapping, LoraModuleSpec, LoraSlotError, LoraSlotPool, LoraTarget, ModuleSlots, NO_LORA_SLOT,
};
pub use lora_resolver::{
    LoraRequest, LoraResolver, LoraResolverRegistry, ResolveFuture, ResolverNotFound,
};
pub use model::{ForwardContext, Model, ModelConfig, select_rows};
pub use model_registry::{
    LazyModelFactory, ModelConfigSource, ModelFactory, ModelLoadContext, ModelRegistry,
};
pub use platform::{
    NamedPlatform, Platform, PlatformConfig, RequestInfo, resolve_platform, resolve_platform_with,
};
pub use pooler::{Pooler, PoolingType, l2_normalize};
pub use registries::Registries;
pub use stats::{
    FinishReason, FinishedRequestStats, IterationStats, PrefixCacheStats, PromptTokenStats,
    SchedulerStats, StatLogger, StatLoggerConfig, StatLoggerError, StatLoggerFactory,
};
pub use weights::{GgufMetadata, RopeStyle, WeightSource};

// Plugin loading (groups, declarations, registrar, discovery, fingerprints): see
// docs/plugins.md.
pub mod declare;
pub mod fingerprint;
pub mod group;
pub mod guard;
pub mod loader;
mod log;
pub mod manifest;
pub mod registrar;
pub mod report;

pub use declare::{PlatformFn, PluginDecl, PluginEntry, RegisterFn, compiled_in_plugins};
pub use fingerprint::{BUILD_FINGERPRINT, set_host_cargo_lock};
pub use group::PluginGroup;
pub use loader::{
    AllowList, DiscoveredPlugin, LoadedPlugin, PluginLoadError, PluginOrigin, discover_plugins,
    load_general_plugins, load_io_processor_plugins, load_platform_plugins, load_plugins_by_group,
    load_stat_logger_plugins,
};
pub use registrar::{RegisterResult, Registrar};
pub use report::{PluginReport, PluginStatus, plugin_reports};

/// What [`declare_plugin!`] expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::declare::{LibraryCall, fingerprint_ptr, serve_library_call};
    pub use inventory;
}
