//! The model registry (vLLM's `ModelRegistry`, spec §4): a table from architecture name to
//! factory, filled by the host's built-ins and by plugins through the same calls.
//!
//! - [`ModelRegistry::register_model`] stores a factory now (vLLM: registering a class);
//!   [`ModelRegistry::register_model_lazy`] stores a function that makes the factory and runs
//!   it only when that architecture is first loaded (vLLM: the `"module:Class"` string form,
//!   which exists so that registering costs nothing).
//! - Registering a name again overwrites it, as in vLLM, with a WARNING; a plugin that wants
//!   to keep an existing entry checks [`ModelRegistry::contains`] first.
//! - [`ModelRegistry::get`] returns an existing factory, so a plugin can wrap a built-in
//!   (vLLM's dummy model subclasses `LlamaForCausalLM`).
//! - [`ModelRegistry::resolve_architectures`] tries config.json's `architectures` in order and
//!   fails with vLLM's text plus the hint that a plugin can add an architecture.
//!
//! Reading the files (GGUF, safetensors) is the host's job (`trellis_models::load_model_with`);
//! this module only holds the table, so that a plugin depends on nothing heavier.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::Device;

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::weights::{GgufMetadata, WeightSource};

/// Where a factory reads the model's hyper-parameters from.
#[derive(Debug, Clone, Copy)]
pub enum ModelConfigSource<'a> {
    /// A Hugging Face `config.json`, parsed.
    HfConfig {
        /// Path of config.json (for error messages).
        path: &'a Path,
        /// Its contents.
        json: &'a serde_json::Value,
    },
    /// The metadata of a GGUF file.
    Gguf(GgufMetadata<'a>),
}

/// Everything a model factory gets.
pub struct ModelLoadContext<'a> {
    /// The architecture the model is loaded as (`LlamaForCausalLM`, ...).
    pub architecture: &'a str,
    /// The model's configuration.
    pub config: ModelConfigSource<'a>,
    /// The model's weights, by Hugging Face tensor name.
    pub weights: &'a dyn WeightSource,
    /// The device to build the model on.
    pub device: &'a Device,
}

/// Builds a model of one architecture.
pub type ModelFactory = Arc<dyn Fn(&ModelLoadContext<'_>) -> Result<Box<dyn Model>> + Send + Sync>;

/// Makes a [`ModelFactory`] on first use (the lazy form of registration).
pub type LazyModelFactory = Arc<dyn Fn() -> ModelFactory + Send + Sync>;

/// One registered architecture.
#[derive(Clone)]
enum Entry {
    /// Registered with its factory.
    Eager(ModelFactory),
    /// Registered with a function that makes the factory; the cell keeps its result.
    Lazy(LazyModelFactory, Arc<OnceLock<ModelFactory>>),
}

impl Entry {
    fn factory(&self) -> ModelFactory {
        match self {
            Entry::Eager(f) => f.clone(),
            Entry::Lazy(make, cell) => cell.get_or_init(|| make()).clone(),
        }
    }
}

/// Checks an architecture name before its factory runs; `Err` carries the refusal, one
/// sentence (the engine installs the platform's `verify_model_arch` here).
pub type ArchitectureCheck = Arc<dyn Fn(&str) -> std::result::Result<(), String> + Send + Sync>;

/// Architecture name → factory, plus GGUF `general.architecture` → architecture name.
#[derive(Clone, Default)]
pub struct ModelRegistry {
    entries: BTreeMap<String, Entry>,
    gguf_architectures: BTreeMap<String, String>,
    check: Option<ArchitectureCheck>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("architectures", &self.architectures())
            .field("gguf_architectures", &self.gguf_architectures)
            .finish()
    }
}

impl ModelRegistry {
    /// An empty registry (the host adds its built-ins with
    /// `trellis_models::register_builtin_models`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the factory of `architecture`.
    pub fn register_model<F>(&mut self, architecture: &str, factory: F)
    where
        F: Fn(&ModelLoadContext<'_>) -> Result<Box<dyn Model>> + Send + Sync + 'static,
    {
        self.register_factory(architecture, Arc::new(factory));
    }

    /// Registers (or replaces) `architecture` with an already shared factory.
    pub fn register_factory(&mut self, architecture: &str, factory: ModelFactory) {
        self.warn_if_registered(architecture);
        self.entries
            .insert(architecture.to_string(), Entry::Eager(factory));
    }

    /// A WARNING when `architecture` is about to be replaced.
    fn warn_if_registered(&self, architecture: &str) {
        if self.entries.contains_key(architecture) {
            crate::log::log(
                crate::log::Level::Warning,
                &format!(
                    "Model architecture {architecture} is already registered, and will be \
                     overwritten by the new registration."
                ),
            );
        }
    }

    /// Registers (or replaces) `architecture` lazily: `make` runs once, the first time the
    /// architecture is loaded or fetched with [`ModelRegistry::get`], never before.
    pub fn register_model_lazy<F>(&mut self, architecture: &str, make: F)
    where
        F: Fn() -> ModelFactory + Send + Sync + 'static,
    {
        self.warn_if_registered(architecture);
        self.entries.insert(
            architecture.to_string(),
            Entry::Lazy(Arc::new(make), Arc::new(OnceLock::new())),
        );
    }

    /// Runs `check` on the architecture [`ModelRegistry::resolve_architectures`] or
    /// [`ModelRegistry::resolve_gguf`] picks, before its factory is returned or made (vLLM
    /// calls `Platform.verify_model_arch` before loading a model class).
    pub fn set_architecture_check(&mut self, check: ArchitectureCheck) {
        self.check = Some(check);
    }

    /// The factory of `architecture` once the check (if any) accepts it.
    fn checked(&self, path: &Path, architecture: &str) -> Result<ModelFactory> {
        if let Some(check) = &self.check {
            check(architecture).map_err(|message| ModelError::ArchitectureRefused { message })?;
        }
        self.get(architecture)
            .ok_or_else(|| self.unsupported(path, vec![architecture.to_string()]))
    }

    /// Maps the GGUF `general.architecture` value `gguf_arch` to a registered architecture.
    pub fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.gguf_architectures
            .insert(gguf_arch.to_string(), architecture.to_string());
    }

    /// The factory of `architecture`, if registered (a lazy one is made now).
    pub fn get(&self, architecture: &str) -> Option<ModelFactory> {
        self.entries.get(architecture).map(Entry::factory)
    }

    /// The registered architecture names, sorted (built-ins and plugins' alike).
    pub fn architectures(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// vLLM's `get_supported_archs()`: the registered architecture names, sorted.
    pub fn supported_archs(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// The GGUF `general.architecture` values with a mapping, sorted.
    pub fn gguf_architectures(&self) -> Vec<&str> {
        self.gguf_architectures.keys().map(String::as_str).collect()
    }

    /// Whether `architecture` is registered.
    pub fn contains(&self, architecture: &str) -> bool {
        self.entries.contains_key(architecture)
    }

    /// The error for a model at `path` declaring `architectures`, none of them registered.
    pub fn unsupported(&self, path: &Path, architectures: Vec<String>) -> ModelError {
        let mut supported = self.supported_archs();
        supported.extend(self.gguf_architectures.keys().map(|g| format!("GGUF: {g}")));
        ModelError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architectures,
            supported,
        }
    }

    /// Picks the first of config.json's `architectures` (in order) that is registered and
    /// returns its name and factory; `path` names the model in errors.
    pub fn resolve_architectures(
        &self,
        path: &Path,
        architectures: &[String],
    ) -> Result<(String, ModelFactory)> {
        if architectures.is_empty() {
            return Err(ModelError::NoArchitectures {
                path: path.to_path_buf(),
            });
        }
        let architecture = architectures
            .iter()
            .find(|a| self.contains(a))
            .ok_or_else(|| self.unsupported(path, architectures.to_vec()))?;
        Ok((architecture.clone(), self.checked(path, architecture)?))
    }

    /// The architecture name and factory for a GGUF file whose `general.architecture` is
    /// `gguf_arch`.
    pub fn resolve_gguf(&self, path: &Path, gguf_arch: &str) -> Result<(String, ModelFactory)> {
        let architecture = self
            .gguf_architectures
            .get(gguf_arch)
            .filter(|a| self.contains(a))
            .ok_or_else(|| {
                self.unsupported(
                    path,
                    vec![format!("{gguf_arch} (GGUF general.architecture)")],
                )
            })?;
        Ok((architecture.clone(), self.checked(path, architecture)?))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn failing(name: &'static str) -> ModelFactory {
        Arc::new(move |_ctx: &ModelLoadContext<'_>| {
            Err(ModelError::Config {
                path: PathBuf::from(name),
                message: "test factory".into(),
            })
        })
    }

    fn names(reg: &ModelRegistry, archs: &[&str]) -> Result<String> {
        let archs: Vec<String> = archs.iter().map(|s| s.to_string()).collect();
        reg.resolve_architectures(Path::new("/m"), &archs)
            .map(|(n, _)| n)
    }

    #[test]
    fn lazy_factory_runs_only_when_used_and_once() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let mut reg = ModelRegistry::new();
        reg.register_model_lazy("LazyForCausalLM", || {
            CALLS.fetch_add(1, Ordering::SeqCst);
            failing("lazy")
        });
        assert!(
            reg.supported_archs()
                .contains(&"LazyForCausalLM".to_string())
        );
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            0,
            "registration must not run it"
        );
        let clone = reg.clone();
        assert_eq!(
            names(&clone, &["LazyForCausalLM"]).ok().as_deref(),
            Some("LazyForCausalLM")
        );
        assert!(reg.get("LazyForCausalLM").is_some());
        assert_eq!(
            CALLS.load(Ordering::SeqCst),
            1,
            "made once, shared by clones"
        );
    }

    #[test]
    fn reregistration_overwrites_and_get_returns_existing() {
        let mut reg = ModelRegistry::new();
        reg.register_factory("A", failing("first"));
        let first = reg.get("A");
        reg.register_factory("A", failing("second"));
        let second = reg.get("A");
        assert!(first.is_some() && second.is_some());
        assert!(!Arc::ptr_eq(
            &first.unwrap_or_else(|| failing("x")),
            &second.unwrap_or_else(|| failing("y"))
        ));
        assert_eq!(reg.supported_archs(), vec!["A".to_string()]);
        assert!(reg.get("B").is_none());
    }

    #[test]
    fn architectures_are_tried_in_order() {
        let mut reg = ModelRegistry::new();
        reg.register_factory("B", failing("b"));
        reg.register_factory("C", failing("c"));
        assert_eq!(names(&reg, &["A", "C", "B"]).ok().as_deref(), Some("C"));
        assert_eq!(names(&reg, &["B", "C"]).ok().as_deref(), Some("B"));
    }

    #[test]
    fn unknown_architecture_has_vllm_text_and_hint() {
        let mut reg = ModelRegistry::new();
        reg.register_factory("LlamaForCausalLM", failing("l"));
        reg.register_gguf_architecture("llama", "LlamaForCausalLM");
        let msg = match names(&reg, &["MyOPTForCausalLM"]) {
            Err(e) => e.to_string(),
            Ok(n) => panic!("resolved {n}"),
        };
        assert!(
            msg.contains(
                "Model architectures ['MyOPTForCausalLM'] are not supported for now. \
                 Supported architectures: ['LlamaForCausalLM', 'GGUF: llama']"
            ),
            "{msg}"
        );
        assert!(msg.contains("plugin"), "{msg}");
        let empty = names(&reg, &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            empty.contains("No model architectures are specified"),
            "{empty}"
        );
    }

    #[test]
    fn gguf_architecture_maps_to_a_registered_name() {
        let mut reg = ModelRegistry::new();
        reg.register_factory("LlamaForCausalLM", failing("l"));
        reg.register_gguf_architecture("llama", "LlamaForCausalLM");
        let p = Path::new("/m.gguf");
        assert_eq!(
            reg.resolve_gguf(p, "llama").ok().map(|r| r.0).as_deref(),
            Some("LlamaForCausalLM")
        );
        assert!(reg.resolve_gguf(p, "falcon").is_err());
    }
}
