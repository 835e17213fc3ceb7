//! The built-in architectures and [`load_model_with`], which finds a model's format,
//! configuration and architecture and calls the registered factory.
//!
//! The table itself, [`ModelRegistry`], lives in `trellis-plugin` so that plugins register
//! into it; the types a factory sees are re-exported here under their old paths. Adding an
//! architecture is one `register_model` line in [`register_builtin_models`]; nothing else
//! names it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::de::DeserializeOwned;
pub use trellis_plugin::{
    LazyModelFactory, ModelConfigSource, ModelFactory, ModelLoadContext, ModelRegistry,
};
use trellis_plugin::{Model, ModelConfig};

use crate::error::{ModelError, Result, one_line};
use crate::gguf::{GgufSource, is_gguf};
use crate::weights::SafetensorsSource;

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

/// Registers the architectures built into Trellis.
pub fn register_builtin_models(registry: &mut ModelRegistry) {
    registry.register_model("LlamaForCausalLM", crate::llama::Llama::factory);
    registry.register_model("MistralForCausalLM", crate::llama::Llama::factory);
    registry.register_model("Qwen2ForCausalLM", crate::qwen2::Qwen2::factory);
    registry.register_model("BertModel", crate::bert::BertModel::factory);
    registry.register_gguf_architecture("llama", "LlamaForCausalLM");
}

/// A model registry holding the built-in architectures.
pub fn builtin_model_registry() -> ModelRegistry {
    let mut r = ModelRegistry::new();
    register_builtin_models(&mut r);
    r
}

/// Loads the model at `path` with the architectures of `registry`: a `.gguf` file (or a file
/// with the GGUF magic), or a Hugging Face directory with `config.json` and safetensors
/// weights (its `architectures` tried in order).
pub fn load_model_with(
    registry: &ModelRegistry,
    path: &Path,
    device: &Device,
) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(ModelError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_file() && is_gguf(path) {
        return load_gguf(registry, path, device);
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
    load_hf(registry, dir, device)
}

fn load_gguf(registry: &ModelRegistry, path: &Path, device: &Device) -> Result<LoadedModel> {
    let source = GgufSource::open(path, device)?;
    let gguf_arch = source.architecture()?;
    let (architecture, factory) = registry.resolve_gguf(path, gguf_arch)?;
    let ctx = ModelLoadContext {
        architecture: &architecture,
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

fn load_hf(registry: &ModelRegistry, dir: &Path, device: &Device) -> Result<LoadedModel> {
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
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::config(&config_path, format!("invalid JSON: {}", one_line(&e))))?;
    let architectures: Vec<String> = match json.get("architectures") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            ModelError::config(
                &config_path,
                format!("field `architectures`: {}", one_line(&e)),
            )
        })?,
        None => return Err(ModelError::NoArchitectures { path: config_path }),
    };
    let (architecture, factory) = registry.resolve_architectures(dir, &architectures)?;
    let weights = SafetensorsSource::open(dir, device)?;
    let ctx = ModelLoadContext {
        architecture: &architecture,
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

/// Loads the model at `path` with the built-in architectures (see [`load_model_with`]).
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_model_with(&builtin_model_registry(), path, device)
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
