//! The model registry: a table from architecture name to factory, extendable at run time, and
//! [`load_model`], which finds a model's format, configuration and architecture.
//!
//! Adding an architecture is one [`ModelRegistry::register_model`] line (built-ins in
//! [`register_builtin_models`]); nothing else names it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::de::DeserializeOwned;
use trellis_plugin::{Model, ModelConfig};

use crate::error::{ModelError, Result, one_line};
use crate::gguf::{GgufMetadata, GgufSource, is_gguf};
use crate::weights::{SafetensorsSource, WeightSource};

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

/// The weight format a model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face directory with config.json and safetensors.
    Safetensors,
}

/// A loaded model and what is known about where it came from.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn Model>,
    /// Its configuration (same as `model.config()`).
    pub config: ModelConfig,
    /// The weight format.
    pub format: WeightFormat,
    /// The GGUF file or model directory.
    pub path: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", &self.config)
            .field("format", &self.format)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Architecture name → factory, plus GGUF `general.architecture` → architecture name.
#[derive(Clone, Default)]
pub struct ModelRegistry {
    factories: BTreeMap<String, ModelFactory>,
    gguf_architectures: BTreeMap<String, String>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("architectures", &self.architectures())
            .field("gguf_architectures", &self.gguf_architectures)
            .finish()
    }
}

/// Registers the architectures built into Trellis.
pub fn register_builtin_models(registry: &mut ModelRegistry) {
    registry.register_model("LlamaForCausalLM", crate::llama::Llama::factory);
    registry.register_model("MistralForCausalLM", crate::llama::Llama::factory);
    registry.register_model("Qwen2ForCausalLM", crate::qwen2::Qwen2::factory);
    registry.register_gguf_architecture("llama", "LlamaForCausalLM");
}

impl ModelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the built-in architectures.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        register_builtin_models(&mut r);
        r
    }

    /// Registers (or replaces) the factory of `architecture`.
    pub fn register_model<F>(&mut self, architecture: &str, factory: F)
    where
        F: Fn(&ModelLoadContext<'_>) -> Result<Box<dyn Model>> + Send + Sync + 'static,
    {
        self.factories
            .insert(architecture.to_string(), Arc::new(factory));
    }

    /// Maps the GGUF `general.architecture` value `gguf_arch` to a registered architecture.
    pub fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.gguf_architectures
            .insert(gguf_arch.to_string(), architecture.to_string());
    }

    /// The registered architecture names, sorted.
    pub fn architectures(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Whether `architecture` has a factory.
    pub fn contains(&self, architecture: &str) -> bool {
        self.factories.contains_key(architecture)
    }

    fn unsupported(&self, path: &Path, architecture: String) -> ModelError {
        let mut supported = self.architectures().join(", ");
        if !self.gguf_architectures.is_empty() {
            let gguf: Vec<&str> = self.gguf_architectures.keys().map(String::as_str).collect();
            supported.push_str(&format!("; GGUF: {}", gguf.join(", ")));
        }
        ModelError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture,
            supported,
        }
    }

    /// Loads the model at `path`: a `.gguf` file (or a file with the GGUF magic), or a Hugging
    /// Face directory with `config.json` and safetensors weights.
    pub fn load(&self, path: &Path, device: &Device) -> Result<LoadedModel> {
        if !path.exists() {
            return Err(ModelError::NotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_file() && is_gguf(path) {
            return self.load_gguf(path, device);
        }
        let dir = match path.is_dir() {
            true => path,
            false if path.file_name().is_some_and(|n| n == "config.json") => {
                path.parent().unwrap_or(path)
            }
            false => {
                return Err(ModelError::UnknownFormat {
                    path: path.to_path_buf(),
                });
            }
        };
        self.load_hf(dir, device)
    }

    fn load_gguf(&self, path: &Path, device: &Device) -> Result<LoadedModel> {
        let source = GgufSource::open(path, device)?;
        let gguf_arch = source.architecture()?;
        let Some((architecture, factory)) = self
            .gguf_architectures
            .get(gguf_arch)
            .and_then(|a| self.factories.get(a).map(|f| (a.as_str(), f)))
        else {
            return Err(self.unsupported(path, format!("{gguf_arch} (GGUF general.architecture)")));
        };
        let ctx = ModelLoadContext {
            architecture,
            config: ModelConfigSource::Gguf(source.metadata()),
            weights: &source,
            device,
        };
        let model = factory(&ctx)?;
        Ok(LoadedModel {
            config: model.config().clone(),
            model,
            format: WeightFormat::Gguf,
            path: path.to_path_buf(),
        })
    }

    fn load_hf(&self, dir: &Path, device: &Device) -> Result<LoadedModel> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::UnknownFormat {
                path: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::Io {
            path: config_path.clone(),
            message: one_line(&e),
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::config(&config_path, format!("invalid JSON: {}", one_line(&e)))
        })?;
        let architectures: Vec<String> = match json.get("architectures") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                ModelError::config(
                    &config_path,
                    format!("field `architectures`: {}", one_line(&e)),
                )
            })?,
            None => {
                return Err(ModelError::config(
                    &config_path,
                    "missing field `architectures`",
                ));
            }
        };
        let Some((architecture, factory)) = architectures
            .iter()
            .find_map(|a| self.factories.get(a).map(|f| (a.as_str(), f)))
        else {
            return Err(self.unsupported(dir, architectures.join(", ")));
        };
        let weights = SafetensorsSource::open(dir, device)?;
        let ctx = ModelLoadContext {
            architecture,
            config: ModelConfigSource::HfConfig {
                path: &config_path,
                json: &json,
            },
            weights: &weights,
            device,
        };
        let model = factory(&ctx)?;
        Ok(LoadedModel {
            config: model.config().clone(),
            model,
            format: WeightFormat::Safetensors,
            path: dir.to_path_buf(),
        })
    }
}

/// Loads the model at `path` with the built-in architectures (see [`ModelRegistry::load`]).
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    ModelRegistry::with_builtins().load(path, device)
}

/// Deserializes a model's `Config` from config.json; errors name the file and the field.
///
/// transformers 5 writes RoPE settings under `rope_parameters` (with `rope_theta` inside)
/// instead of top-level `rope_theta` and `rope_scaling`; both spellings are accepted.
pub fn parse_hf_config<T: DeserializeOwned>(path: &Path, json: &serde_json::Value) -> Result<T> {
    let mut json = json.clone();
    if let Some(obj) = json.as_object_mut()
        && let Some(params) = obj
            .get("rope_parameters")
            .and_then(|p| p.as_object())
            .cloned()
    {
        if !obj.contains_key("rope_theta")
            && let Some(theta) = params.get("rope_theta")
        {
            obj.insert("rope_theta".into(), theta.clone());
        }
        if obj.get("rope_scaling").is_none_or(|v| v.is_null()) {
            obj.insert("rope_scaling".into(), serde_json::Value::Object(params));
        }
    }
    T::deserialize(&json).map_err(|e| ModelError::config(path, one_line(&e)))
}
