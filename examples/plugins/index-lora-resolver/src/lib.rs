//! A LoRA resolver plugin (group `general`; a stand-in for vLLM's remote resolvers such as
//! the Hugging Face Hub one): adapter names are looked up in a JSON index,
//!
//! ```json
//! {"my-adapter": "/srv/adapters/my-adapter", "org/other": "/srv/adapters/other"}
//! ```
//!
//! read from the file named by `LORA_INDEX_FILE` on every lookup (so entries added while the
//! server runs are found). A name that is not in the index is "not found here", and the server
//! tries the next resolver. `trellis serve` consults resolvers only with
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` and `--enable-lora`.

use std::path::PathBuf;
use std::sync::Arc;

use trellis_plugin::{LoraRequest, LoraResolver, RegisterResult, Registrar, ResolveFuture};

/// The plugin's entry name (what `VLLM_PLUGINS` lists).
pub const NAME: &str = "index_lora_resolver";

/// The name the resolver is registered under.
pub const RESOLVER: &str = "Index Resolver";

/// The variable naming the index file.
pub const INDEX_VAR: &str = "LORA_INDEX_FILE";

/// Resolves names through the index file.
pub struct IndexResolver {
    index: Option<PathBuf>,
}

impl IndexResolver {
    /// A resolver over the index at `index` (`None`: finds nothing).
    pub fn new(index: Option<PathBuf>) -> Self {
        IndexResolver { index }
    }

    /// The directory the index maps `name` to.
    pub fn lookup(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.index.as_ref()?).ok()?;
        let index: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("WARNING {NAME}: the index is not JSON: {e}");
                return None;
            }
        };
        index.get(name)?.as_str().map(str::to_string)
    }
}

impl LoraResolver for IndexResolver {
    fn resolve_lora<'a>(
        &'a self,
        base_model_name: &'a str,
        lora_name: &'a str,
    ) -> ResolveFuture<'a> {
        let _ = base_model_name;
        let found = self.lookup(lora_name).map(|path| LoraRequest {
            lora_name: lora_name.to_string(),
            lora_int_id: 1,
            lora_path: path,
            ..Default::default()
        });
        Box::pin(std::future::ready(found))
    }
}

/// The `general` entry: registers the resolver.
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    let index = std::env::var_os(INDEX_VAR).map(PathBuf::from);
    registrar.register_lora_resolver(RESOLVER, Arc::new(IndexResolver::new(index)));
    Ok(())
}

trellis_plugin::declare_plugin! {
    general "index_lora_resolver" => register,
}
