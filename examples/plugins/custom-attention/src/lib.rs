//! An out-of-tree attention backend under a new name, `EXAMPLE_ATTENTION` (vLLM: a plugin
//! calling `register_backend` with a new name). Chosen with
//! `trellis generate --attention-backend EXAMPLE_ATTENTION`; it is a plain paged attention,
//! so its greedy outputs equal `CPU_REFERENCE`'s.

use std::sync::Arc;

use candle_core::{Device, Result};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionShape, KvCacheSpec, RegisterResult, Registrar,
};

mod paged;

/// The name this plugin registers.
pub const NAME: &str = "EXAMPLE_ATTENTION";

/// The `EXAMPLE_ATTENTION` backend: f32 KV cache, any head size and block size.
pub struct ExampleAttention;

impl AttentionBackend for ExampleAttention {
    fn name(&self) -> &str {
        NAME
    }

    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        Ok(Box::new(paged::PagedAttention::new(
            NAME, spec, shape, device,
        )?))
    }
}

/// The general-plugin entry: registers `EXAMPLE_ATTENTION` (idempotent: re-registering a
/// name replaces it).
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    registrar.register_attention_backend(NAME, Arc::new(ExampleAttention))?;
    Ok(())
}

trellis_plugin::declare_plugin! {
    general "register_example_attention" => register,
}
