//! Engine start-up against the registries: the platform is resolved, has the last word on the
//! configuration, the model is loaded through the model registry, and the attention backend
//! is chosen by the platform from the attention registry. Each decision is logged on stderr,
//! one line each ("Platform: ...", "Using attention backend ...").

use std::sync::Arc;

use candle_core::{DType, Device};
use trellis_models::{LoadedModel, load_model_with};
use trellis_plugin::attention_registry::requested_backend;
use trellis_plugin::platform::resolve_platform_with;
use trellis_plugin::{
    AttentionSelection, AttentionSelectorConfig, AttentionType, NamedPlatform, Platform,
    PlatformConfig, PluginError, Registries,
};

use crate::config::EngineConfig;
use crate::error::EngineError;

/// What `LLM::new`, `LLMEngine::new` and `AsyncLLM::new` use, as vLLM's `LLM` does: the
/// built-ins, then every allowed `general` plugin (loaded once per process), then the
/// activated `platform` plugins (not loaded when `VLLM_TARGET_DEVICE=cpu`). Plugins come from
/// `TRELLIS_PLUGIN_PATH` and the default plugin folder, filtered by `VLLM_PLUGINS` (set it to
/// an empty string to load none); `*::with_registries(builtin_registries())` opts out.
pub fn plugin_registries() -> Result<Registries, EngineError> {
    with_plugins(builtin_registries())
}

/// `base` (the built-ins; the CLI adds CUDA to them) with the plugins loaded as
/// [`plugin_registries`] does.
pub fn with_plugins(mut r: Registries) -> Result<Registries, EngineError> {
    trellis_plugin::load_general_plugins(&mut r)?;
    let target = std::env::var("VLLM_TARGET_DEVICE").ok();
    if !trellis_plugin::platform::target_device_is_cpu(target.as_deref()) {
        r.platforms = trellis_plugin::load_platform_plugins()?;
    }
    Ok(r)
}

/// The registries with everything built into Trellis: the built-in model architectures, the
/// CPU attention backends, and the CPU platform. Plugins add to a copy of it.
pub fn builtin_registries() -> Registries {
    let mut r = Registries::new();
    trellis_models::register_builtin_models(&mut r.models);
    if let Err(e) = trellis_cpu::register_cpu_attention_backends(&mut r.attention_backends) {
        eprintln!("trellis: cannot register the CPU attention backends: {e}");
    }
    r.builtin_platforms.push((
        trellis_cpu::CPU_PLATFORM_NAME.to_string(),
        trellis_cpu::cpu_platform(),
    ));
    r
}

/// Logs one line on stderr.
pub(crate) fn log(line: &str) {
    eprintln!("trellis: {line}");
}

/// What start-up decided before the KV cache is sized.
pub(crate) struct Setup {
    /// The platform the engine runs on.
    pub platform: Arc<dyn Platform>,
    /// The configuration after the platform's last word.
    pub platform_config: PlatformConfig,
    /// The device tensors live on.
    pub device: Device,
    /// The loaded model.
    pub loaded: LoadedModel,
    /// The attention backend chosen.
    pub attention: AttentionSelection,
}

/// The platform by vLLM's rules; the CPU platform is added to the built-ins when missing.
fn resolve(registries: &Registries) -> Result<Arc<dyn Platform>, EngineError> {
    let mut builtins: Vec<NamedPlatform> = registries.builtin_platforms.clone();
    if !builtins.iter().any(|(_, p)| p.is_cpu()) {
        builtins.push((
            trellis_cpu::CPU_PLATFORM_NAME.to_string(),
            trellis_cpu::cpu_platform(),
        ));
    }
    let target = std::env::var("VLLM_TARGET_DEVICE").ok();
    let (name, platform) =
        resolve_platform_with(target.as_deref(), &builtins, &registries.platforms)?;
    if registries.platforms.iter().any(|(n, _)| *n == name) {
        log(&format!("Platform plugin {name} is activated"));
    }
    log(&format!(
        "Platform: {} ({})",
        platform.device_name(),
        platform.describe()
    ));
    Ok(platform)
}

/// The weights' quantization as vLLM names it: `gguf` for a GGUF file (vLLM's `quantization`
/// of every GGUF model), else a Hugging Face directory's `quantization_config.quant_method`,
/// else none.
fn model_quantization(model: &std::path::Path) -> Option<String> {
    if model.is_file() {
        return Some("gguf".to_string());
    }
    let text = std::fs::read_to_string(model.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["quantization_config"]["quant_method"]
        .as_str()
        .map(str::to_string)
}

/// Memory the platform can still give, in bytes (total minus used), when it says.
pub(crate) fn available_memory(platform: &dyn Platform) -> Option<u64> {
    Some(
        platform
            .total_memory()?
            .saturating_sub(platform.used_memory()?),
    )
}

/// `bytes` in GiB with one decimal, for messages.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The bytes of a model's weight files: the GGUF file, or a directory's `.safetensors`.
fn model_file_bytes(model: &std::path::Path) -> u64 {
    if model.is_file() {
        return std::fs::metadata(model).map_or(0, |m| m.len());
    }
    std::fs::read_dir(model)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Refuses a model whose weights cannot fit the memory the platform has left, before any of
/// it is read.
fn check_model_fits(model: &std::path::Path, platform: &dyn Platform) -> Result<(), EngineError> {
    let (Some(available), need) = (available_memory(platform), model_file_bytes(model)) else {
        return Ok(());
    };
    if need > available {
        return Err(EngineError::Config(format!(
            "the model's weights ({}, {}) do not fit the {} of memory available on {}",
            gib(need),
            model.display(),
            gib(available),
            platform.device_name()
        )));
    }
    Ok(())
}

/// The platform's choice if it computes every attention type the model's layers need (vLLM's
/// `supports_attn_type`), else — unless the user named the backend — the first registered
/// backend that does and accepts `selector` (an encoder on the CPU: CPU_REFERENCE).
fn for_attn_types(
    chosen: AttentionSelection,
    loaded: &LoadedModel,
    selector: &AttentionSelectorConfig,
    registries: &Registries,
    pc: &PlatformConfig,
) -> Result<AttentionSelection, EngineError> {
    let m = &loaded.model;
    let mut needed: Vec<AttentionType> =
        (0..m.config().num_layers).map(|i| m.attn_type(i)).collect();
    needed.dedup();
    let supports =
        |b: &dyn trellis_plugin::AttentionBackend| needed.iter().all(|&t| b.supports_attn_type(t));
    if supports(chosen.backend.as_ref()) {
        return Ok(chosen);
    }
    let missing = needed
        .iter()
        .find(|&&t| !chosen.backend.supports_attn_type(t))
        .copied()
        .unwrap_or(AttentionType::Decoder);
    let refused = format!(
        "attention backend {} does not support {missing} attention, which {} needs",
        chosen.name,
        m.config().architecture
    );
    if pc.attention_backend.is_some() {
        return Err(EngineError::Config(refused));
    }
    let registry = &registries.attention_backends;
    for name in registry.names() {
        let Ok(backend) = registry.get(&name) else {
            continue;
        };
        if supports(backend.as_ref()) && backend.validate_configuration(selector).is_empty() {
            return Ok(AttentionSelection {
                name,
                backend,
                reason: refused,
            });
        }
    }
    Err(EngineError::Config(format!(
        "{refused}, and no registered backend does"
    )))
}

/// Runs start-up: platform, configuration, model, attention backend.
pub(crate) fn setup(config: &EngineConfig, registries: &Registries) -> Result<Setup, EngineError> {
    let platform = resolve(registries)?;
    let env = std::env::var("VLLM_ATTENTION_BACKEND").ok();
    let (requested, warning) =
        requested_backend(config.attention_backend.as_deref(), env.as_deref());
    if let Some(w) = warning {
        log(&format!("WARNING {w}"));
    }
    // Unknown names fail before the model is loaded.
    let requested = registries
        .attention_backends
        .parse_choice(requested.as_deref())?;
    let mut pc = PlatformConfig {
        block_size: config.block_size,
        kv_cache_bytes: config.kv_cache_bytes().map_err(EngineError::Config)?,
        attention_backend: requested,
        dtype: DType::F32,
        // `auto`: the model's dtype.
        kv_cache_dtype: config.kv_cache_dtype.unwrap_or(DType::F32),
        max_num_seqs: config.max_num_seqs,
        max_num_batched_tokens: config.max_num_batched_tokens,
        max_model_len: config.max_model_len,
        quantization: model_quantization(&config.model),
        warnings: Vec::new(),
    };
    platform.check_and_update_config(&mut pc)?;
    for w in std::mem::take(&mut pc.warnings) {
        log(&format!("WARNING {w}"));
    }
    // vLLM's ModelConfig checks: the weights' quantization, then the dtype.
    if let Some(q) = pc.quantization.as_deref() {
        platform.verify_quantization(q)?;
    }
    let dtypes = platform.supported_dtypes();
    if !dtypes.contains(&pc.dtype) {
        return Err(PluginError::Config {
            platform: platform.device_name().to_string(),
            message: format!(
                "dtype {:?} is not supported on {} (it supports {dtypes:?}); Trellis computes \
                 in F32",
                pc.dtype,
                platform.device_name()
            ),
        }
        .into());
    }
    platform.seed_everything(config.seed);
    check_model_fits(&config.model, platform.as_ref())?;
    let device = platform.device()?;
    // vLLM's verify_model_arch: the platform sees the architecture before it is built.
    let mut models = registries.models.clone();
    let checker = platform.clone();
    models.set_architecture_check(Arc::new(move |architecture| {
        checker
            .verify_model_arch(architecture)
            .map_err(|e| e.to_string())
    }));
    let loaded = load_model_with(&models, &config.model, &device)?;
    let m = loaded.model.config();
    let non_causal =
        (0..m.num_layers).any(|i| loaded.model.attn_type(i) == AttentionType::EncoderOnly);
    let selector = AttentionSelectorConfig {
        head_size: m.head_dim,
        num_heads: m.num_heads,
        num_kv_heads: m.num_kv_heads,
        dtype: pc.dtype,
        kv_cache_dtype: pc.kv_cache_dtype,
        // Only a block size the user chose constrains the backend (vLLM, spec §3.3).
        block_size: config.block_size_from_user.then_some(pc.block_size),
        attn_type: match non_causal {
            true => AttentionType::EncoderOnly,
            false => AttentionType::Decoder,
        },
    };
    let attention = platform.get_attn_backend(
        pc.attention_backend.as_deref(),
        &selector,
        &registries.attention_backends,
    )?;
    let attention = for_attn_types(attention, &loaded, &selector, registries, &pc)?;
    log(&format!(
        "Using attention backend {} ({})",
        attention.name, attention.reason
    ));
    // `--kv-cache-dtype auto`: a 16-bit cache where the backend keeps one (CPU_ATTN), as
    // vLLM's CPU backend (the model's bf16) and llama.cpp (f16) do: half the memory and half
    // the bytes each decode step reads. f16 rather than bf16: three more mantissa bits, and
    // K/V values stay far inside its range. Backends without one (CPU_REFERENCE, the
    // examples) keep f32.
    if config.kv_cache_dtype.is_none()
        && pc.kv_cache_dtype == DType::F32
        && attention
            .backend
            .supported_kv_cache_dtypes()
            .contains(&DType::F16)
    {
        pc.kv_cache_dtype = DType::F16;
    }
    Ok(Setup {
        platform,
        platform_config: pc,
        device,
        loaded,
        attention,
    })
}
