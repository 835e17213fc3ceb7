//! An out-of-tree attention backend under a new name, `EXAMPLE_ATTENTION` (vLLM: a plugin
//! calling `register_backend` with a new name). Chosen with
//! `trellis generate --attention-backend EXAMPLE_ATTENTION`; it is a plain paged attention,
//! so its greedy outputs equal `CPU_REFERENCE`'s.
//!
//! With `EXAMPLE_ATTENTION_PANIC_QUERY_LEN=N` set, `forward` panics on a step where a sequence
//! has exactly N new tokens: the tests use it to check that a plugin panic fails that step's
//! requests and nothing else.

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec,
    RegisterResult, Registrar,
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
        let inner = Box::new(paged::PagedAttention::new(NAME, spec, shape, device)?);
        let panic_query_len = std::env::var("EXAMPLE_ATTENTION_PANIC_QUERY_LEN")
            .ok()
            .and_then(|v| v.parse().ok());
        match panic_query_len {
            Some(query_len) => Ok(Box::new(PanicOnQueryLen { inner, query_len })),
            None => Ok(inner),
        }
    }
}

/// A layer that panics on a step with a sequence of `query_len` new tokens (a test marker).
struct PanicOnQueryLen {
    inner: Box<dyn AttentionImpl>,
    query_len: usize,
}

impl AttentionImpl for PanicOnQueryLen {
    fn forward(
        &mut self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor> {
        if metadata.seqs.iter().any(|s| s.query_len == self.query_len) {
            panic!(
                "EXAMPLE_ATTENTION_PANIC_QUERY_LEN: a sequence with {} new tokens",
                self.query_len
            );
        }
        self.inner.forward(query, key, value, metadata)
    }
}

/// The general-plugin entry: registers `EXAMPLE_ATTENTION` (idempotent: re-registering a
/// name replaces it).
///
/// `EXAMPLE_ATTENTION_NAME=OTHER` registers it under OTHER instead (the tests override a
/// built-in name that way: vLLM's `register_backend` on an existing member).
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    let name = std::env::var("EXAMPLE_ATTENTION_NAME").unwrap_or_else(|_| NAME.to_string());
    registrar.register_attention_backend(&name, Arc::new(ExampleAttention))?;
    Ok(())
}

trellis_plugin::declare_plugin! {
    general "register_example_attention" => register,
}
