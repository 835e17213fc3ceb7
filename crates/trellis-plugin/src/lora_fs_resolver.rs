//! The built-in filesystem LoRA resolver (vLLM's `lora_filesystem_resolver`): an adapter
//! called `NAME` is the directory `<VLLM_LORA_RESOLVER_CACHE_DIR>/NAME` (so `org/repo` names
//! map to sub-directories) when its `adapter_config.json` says `peft_type` `LORA` and names the
//! served base model in `base_model_name_or_path`.
//!
//! Beyond vLLM, paths are confined to the cache root: a name with `..`, an absolute path, or a
//! symlink that leads out of the root is not resolved (a request's `model` is user input).

use std::path::{Component, Path, PathBuf};

use crate::lora_resolver::{LoraRequest, LoraResolver, ResolveFuture};

/// Resolves adapter names to directories under a cache root.
#[derive(Debug, Clone)]
pub struct FilesystemResolver {
    root: PathBuf,
}

impl FilesystemResolver {
    /// A resolver over `dir`, which must be a directory (else vLLM's startup error).
    pub fn new(dir: impl AsRef<Path>) -> Result<Self, String> {
        let bad = || {
            "VLLM_LORA_RESOLVER_CACHE_DIR must be set to a valid directory for Filesystem \
             Resolver plugin to function"
                .to_string()
        };
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(bad());
        }
        let root = dir.canonicalize().map_err(|_| bad())?;
        Ok(FilesystemResolver { root })
    }

    /// The adapter directory of `lora_name` for `base_model_name`, or `None`.
    pub fn resolve_path(&self, base_model_name: &str, lora_name: &str) -> Option<PathBuf> {
        let rel = Path::new(lora_name);
        let plain =
            !lora_name.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            crate::log::log(
                crate::log::Level::Warning,
                &format!("Filesystem Resolver: refusing the adapter name {lora_name:?}"),
            );
            return None;
        }
        let path = self.root.join(rel);
        let config = path.join("adapter_config.json");
        if !config.is_file() {
            return None;
        }
        // Symlinks may not lead out of the root.
        let real = config.canonicalize().ok()?;
        if !real.starts_with(&self.root) {
            crate::log::log(
                crate::log::Level::Warning,
                &format!("Filesystem Resolver: {lora_name} leaves the cache directory"),
            );
            return None;
        }
        let text = std::fs::read_to_string(&real).ok()?;
        let json: serde_json::Value = match serde_json::from_str(&text) {
            Ok(j) => j,
            Err(e) => {
                crate::log::log(
                    crate::log::Level::Warning,
                    &format!("Filesystem Resolver: {}: {e}", config.display()),
                );
                return None;
            }
        };
        let is_lora = json.get("peft_type").and_then(|v| v.as_str()) == Some("LORA");
        let same_base =
            json.get("base_model_name_or_path").and_then(|v| v.as_str()) == Some(base_model_name);
        (is_lora && same_base).then_some(path)
    }
}

impl LoraResolver for FilesystemResolver {
    fn resolve_lora<'a>(
        &'a self,
        base_model_name: &'a str,
        lora_name: &'a str,
    ) -> ResolveFuture<'a> {
        let found = self.resolve_path(base_model_name, lora_name);
        Box::pin(std::future::ready(found.map(|p| LoraRequest {
            lora_name: lora_name.to_string(),
            lora_int_id: 1,
            lora_path: p.to_string_lossy().into_owned(),
            ..Default::default()
        })))
    }
}
