//! An out-of-tree platform (vLLM's `vllm_add_dummy_platform`): `DummyDevice`, device type
//! `dummy`, which activates itself wherever it is installed and prefers its own attention
//! backend, `DUMMY_ATTN` (registered by the general entry of the same crate). Tensors stay on
//! the CPU: the point is the plumbing, not the hardware.
//!
//! A second platform entry, `dummy_platform_plugin_b`, activates only when the environment
//! variable `DUMMY_PLATFORM_B` is set: the tests use it to check that two activated platform
//! plugins are an error.

use std::sync::Arc;

use candle_core::{Device, Result};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionShape, KvCacheSpec, Platform, RegisterResult,
    Registrar,
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

    fn describe(&self) -> String {
        "device type dummy, an example platform plugin running on the CPU".to_string()
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
