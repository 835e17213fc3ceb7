//! An out-of-tree platform (vLLM's `vllm_add_dummy_platform`): `DummyDevice`, device type
//! `dummy`, which activates itself wherever it is installed and prefers its own attention
//! backend, `DUMMY_ATTN` (registered by the general entry of the same crate). Tensors stay on
//! the CPU: the point is the plumbing, not the hardware.
//!
//! A second platform entry, `dummy_platform_plugin_b`, activates only when the environment
//! variable `DUMMY_PLATFORM_B` is set: the tests use it to check that two activated platform
//! plugins are an error. Other variables exercise the platform hooks the engine calls:
//! `DUMMY_PLATFORM_QUANTIZATIONS`, `DUMMY_PLATFORM_REFUSE_ARCH`, `DUMMY_PLATFORM_MAX_MODEL_LEN`
//! and `DUMMY_PLATFORM_MAX_PROMPT_TOKENS`.

use std::sync::Arc;

use candle_core::{Device, Result};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionShape, KvCacheSpec, Platform, PluginError,
    RegisterResult, Registrar, RequestInfo,
};

mod paged;

/// The device name the platform reports.
pub const DEVICE_NAME: &str = "DummyDevice";

/// The attention backend this plugin registers and its platform prefers.
pub const DUMMY_ATTN: &str = "DUMMY_ATTN";

/// The `DummyDevice` platform.
pub struct DummyPlatform {
    name: &'static str,
}

impl Platform for DummyPlatform {
    fn device_name(&self) -> &str {
        self.name
    }

    fn device_type(&self) -> &str {
        "dummy"
    }

    /// The model computes in f32, as on the CPU.
    fn supported_dtypes(&self) -> Vec<candle_core::DType> {
        vec![candle_core::DType::F32]
    }

    /// Every quantization, unless `DUMMY_PLATFORM_QUANTIZATIONS` lists some (comma-separated;
    /// tests: a platform that supports only `fp8` refuses a GGUF model).
    fn supported_quantizations(&self) -> Vec<String> {
        std::env::var("DUMMY_PLATFORM_QUANTIZATIONS")
            .map(|v| v.split(',').map(|q| q.trim().to_string()).collect())
            .unwrap_or_default()
    }

    /// Its own backend first; `CPU_REFERENCE` when `DUMMY_ATTN` is not registered (the
    /// general entry filtered out by `VLLM_PLUGINS`).
    fn attention_backend_priority(&self) -> Vec<String> {
        vec![DUMMY_ATTN.to_string(), "CPU_REFERENCE".to_string()]
    }

    /// Refuses the architecture named by `DUMMY_PLATFORM_REFUSE_ARCH` (tests).
    fn verify_model_arch(&self, architecture: &str) -> std::result::Result<(), PluginError> {
        match std::env::var("DUMMY_PLATFORM_REFUSE_ARCH") {
            Ok(refused) if refused == architecture => Err(self.error(format!(
                "model architecture {architecture} is not supported on {}",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// At most `DUMMY_PLATFORM_MAX_MODEL_LEN` tokens a sequence, when set (tests).
    fn check_max_model_len(&self, max_model_len: usize) -> usize {
        std::env::var("DUMMY_PLATFORM_MAX_MODEL_LEN")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(max_model_len, |limit: usize| max_model_len.min(limit))
    }

    /// Refuses prompts longer than `DUMMY_PLATFORM_MAX_PROMPT_TOKENS`, when set (tests).
    fn validate_request(&self, request: &RequestInfo<'_>) -> std::result::Result<(), PluginError> {
        let limit: Option<usize> = std::env::var("DUMMY_PLATFORM_MAX_PROMPT_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok());
        match limit {
            Some(limit) if request.prompt_token_ids.len() > limit => Err(self.error(format!(
                "request {}: a prompt of {} tokens is longer than the {limit} tokens {} accepts",
                request.request_id,
                request.prompt_token_ids.len(),
                self.name
            ))),
            _ => Ok(()),
        }
    }

    fn describe(&self) -> String {
        "device type dummy, an example platform plugin running on the CPU".to_string()
    }
}

impl DummyPlatform {
    fn error(&self, message: String) -> PluginError {
        PluginError::Config {
            platform: self.name.to_string(),
            message,
        }
    }
}

/// The platform entry: always activates.
pub fn detect() -> Option<Arc<dyn Platform>> {
    Some(Arc::new(DummyPlatform { name: DEVICE_NAME }))
}

/// The second platform entry: activates only when `DUMMY_PLATFORM_B` is set.
pub fn detect_b() -> Option<Arc<dyn Platform>> {
    std::env::var_os("DUMMY_PLATFORM_B").map(|_| {
        Arc::new(DummyPlatform {
            name: "DummyDeviceB",
        }) as Arc<dyn Platform>
    })
}

/// `DUMMY_ATTN`: a plain paged attention.
pub struct DummyAttention;

impl AttentionBackend for DummyAttention {
    fn name(&self) -> &str {
        DUMMY_ATTN
    }

    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        Ok(Box::new(paged::PagedAttention::new(
            DUMMY_ATTN, spec, shape, device,
        )?))
    }
}

/// The general entry: registers `DUMMY_ATTN`.
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    registrar.register_attention_backend(DUMMY_ATTN, Arc::new(DummyAttention))?;
    Ok(())
}

trellis_plugin::declare_plugin! {
    platform "dummy_platform_plugin" => detect,
    platform "dummy_platform_plugin_b" => detect_b,
    general "register_dummy_attention" => register,
}
