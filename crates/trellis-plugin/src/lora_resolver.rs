//! LoRA resolvers (vLLM's `LoRAResolver`): turn an adapter name that a request's `model`
//! names, but that the server has not loaded, into a [`LoraRequest`] the engine can load.
//!
//! Resolvers are registered by general plugins through the
//! [`Registrar`](crate::Registrar) (or built in, like the filesystem resolver) into a
//! [`LoraResolverRegistry`], kept in registration order. The server snapshots the registry
//! when it starts and, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING` on, tries the resolvers in
//! order on an unknown model name: the first one that finds the adapter *and* whose adapter
//! loads wins.
//!
//! Why `resolve_lora` returns a boxed future: vLLM's method is `async` (a resolver may
//! download), and a boxed `Send` future is what an object-safe trait can return without an
//! executor dependency in this crate. The host polls it on its own runtime; a resolver
//! should not rely on a runtime of its own (a plugin library has its own copy of tokio's
//! globals).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A request to serve a LoRA adapter (vLLM's `LoRARequest`). Equality is by name only.
#[derive(Debug, Clone, Default)]
pub struct LoraRequest {
    /// The name clients use in `model`.
    pub lora_name: String,
    /// The id the server gives it (≥ 1; the engine's adapter cache is keyed by it).
    pub lora_int_id: u32,
    /// The adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    pub lora_path: String,
    /// The base model it belongs to, when known (the `parent` in `/v1/models`).
    pub base_model_name: Option<String>,
    /// Replace the weights of an adapter of the same id that is already loaded.
    pub load_inplace: bool,
}

impl PartialEq for LoraRequest {
    fn eq(&self, other: &Self) -> bool {
        self.lora_name == other.lora_name
    }
}

impl Eq for LoraRequest {}

impl std::hash::Hash for LoraRequest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.lora_name.hash(state);
    }
}

/// The future [`LoraResolver::resolve_lora`] returns.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = Option<LoraRequest>> + Send + 'a>>;

/// Finds adapters by name (vLLM's `LoRAResolver`).
pub trait LoraResolver: Send + Sync {
    /// The adapter called `lora_name` for the base model `base_model_name` (the served
    /// `--model` value), or `None` when this resolver does not know it. The returned
    /// request's `lora_int_id` is overwritten by the server.
    fn resolve_lora<'a>(
        &'a self,
        base_model_name: &'a str,
        lora_name: &'a str,
    ) -> ResolveFuture<'a>;
}

/// Why a resolver cannot be found in the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("LoRA resolver '{name}' not found. Available resolvers: {available:?}")]
pub struct ResolverNotFound {
    /// The name asked for.
    pub name: String,
    /// The registered names.
    pub available: Vec<String>,
}

/// The resolvers, in registration order (vLLM's `LoRAResolverRegistry`).
#[derive(Clone, Default)]
pub struct LoraResolverRegistry {
    entries: Vec<(String, Arc<dyn LoraResolver>)>,
}

impl std::fmt::Debug for LoraResolverRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(n, _)| n))
            .finish()
    }
}

impl LoraResolverRegistry {
    /// Registers `resolver` under `name`; an existing name is replaced in place (keeping its
    /// position) with vLLM's warning.
    pub fn register_resolver(&mut self, name: &str, resolver: Arc<dyn LoraResolver>) {
        if let Some(entry) = self.entries.iter_mut().find(|(n, _)| n == name) {
            crate::log::log(
                crate::log::Level::Warning,
                &format!(
                    "LoRA resolver {name} is already registered, and will be overwritten by the \
                 new resolver instance {name}."
                ),
            );
            entry.1 = resolver;
            return;
        }
        self.entries.push((name.to_string(), resolver));
    }

    /// The registered names, in order.
    pub fn get_supported_resolvers(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The resolver registered as `name`.
    pub fn get_resolver(&self, name: &str) -> Result<Arc<dyn LoraResolver>, ResolverNotFound> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| ResolverNotFound {
                name: name.to_string(),
                available: self.get_supported_resolvers(),
            })
    }

    /// The resolvers with their names, in registration order.
    pub fn resolvers(&self) -> Vec<(String, Arc<dyn LoraResolver>)> {
        self.entries.clone()
    }
}
