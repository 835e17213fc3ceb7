//! Errors of the extension points.
//!
//! [`ModelError`]: model loading; each names the file and the problem on one line. Model
//! factories written in plugins return it too, so it lives here rather than in
//! `trellis-models`.
//!
//! [`PluginError`]: platform resolution and attention-backend registration and selection, with
//! vLLM's texts (spec §2.2, §3.5) so that a vLLM user recognises them.

use std::path::{Path, PathBuf};

/// What can go wrong while finding, reading and building a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model path does not exist.
    #[error("{}: no such file or directory", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("{}: {message}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error, on one line.
        message: String,
    },
    /// The path is neither a GGUF file nor a directory with `config.json`.
    #[error("{}: not a GGUF file nor a Hugging Face model directory with config.json", path.display())]
    UnknownFormat {
        /// The path given.
        path: PathBuf,
    },
    /// A GGUF file could not be parsed (truncated, bad magic, bad metadata).
    #[error("{}: invalid GGUF file: {message}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file could not be parsed (truncated, bad header).
    #[error("{}: invalid safetensors file: {message}", path.display())]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A configuration (config.json or GGUF metadata) lacks a field or has a bad value.
    #[error("{}: {message}", path.display())]
    Config {
        /// The file the configuration came from.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// None of the architectures the model declares has a registered factory. The text is
    /// vLLM's ("Model architectures ['X'] are not supported for now. Supported architectures:
    /// [...]"), after the path, plus the hint that a plugin can add one.
    #[error(
        "{}: Model architectures [{}] are not supported for now. Supported architectures: [{}]. \
         A plugin can register more (see docs/plugins.md; VLLM_PLUGINS selects which plugins load)",
        path.display(),
        py_list(architectures),
        py_list(supported)
    )]
    UnsupportedArchitecture {
        /// The model file or directory.
        path: PathBuf,
        /// The architecture(s) the model declares, in order.
        architectures: Vec<String>,
        /// The registered architectures (config.json names, then `GGUF: x` entries).
        supported: Vec<String>,
    },
    /// config.json lists no architecture (vLLM: "No model architectures are specified").
    #[error("{}: No model architectures are specified", path.display())]
    NoArchitectures {
        /// The config.json.
        path: PathBuf,
    },
    /// A tensor the architecture needs is not in the weights.
    #[error("{}: missing tensor {name}", path.display())]
    MissingTensor {
        /// The weight file or directory.
        path: PathBuf,
        /// The tensor name as stored.
        name: String,
    },
    /// A tensor is stored in a type (quantization or dtype) that is not supported.
    #[error("{}: tensor {name} has unsupported type {dtype}", path.display())]
    UnsupportedDType {
        /// The weight file.
        path: PathBuf,
        /// The tensor name as stored.
        name: String,
        /// The stored type.
        dtype: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("{}: tensor {name} has shape {actual:?}, expected {expected:?}", path.display())]
    Shape {
        /// The weight file.
        path: PathBuf,
        /// The tensor name as stored.
        name: String,
        /// The stored shape.
        actual: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A plugin's factory or model panicked; the panic was caught on the plugin's side
    /// ([`crate::guard`]). The message names the plugin and the method.
    #[error("{message}")]
    Panicked {
        /// `plugin 'NAME' panicked in METHOD: MESSAGE`.
        message: String,
    },
    /// The platform refused the architecture (its `verify_model_arch`).
    #[error("{message}")]
    ArchitectureRefused {
        /// The platform's sentence.
        message: String,
    },
    /// A tensor operation failed while building the model.
    #[error("{}: {message}", path.display())]
    Candle {
        /// The model file or directory.
        path: PathBuf,
        /// The candle error, on one line.
        message: String,
    },
}

/// Formats names as the body of a Python list literal: `'A', 'B'` (vLLM prints lists so).
pub fn py_list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first line of an error's message (candle errors may carry a backtrace).
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().trim().to_string()
}

impl ModelError {
    /// A [`ModelError::Candle`] for `path`.
    pub fn candle(path: &Path, e: candle_core::Error) -> Self {
        Self::Candle {
            path: path.to_path_buf(),
            message: one_line(&e),
        }
    }

    /// A [`ModelError::Config`] for `path`.
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors of platform resolution and of the attention-backend registry and selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// More than one platform was activated (vLLM's text, spec §2.2).
    #[error("Only one platform plugin can be activated, but got: [{}]", py_list(.0))]
    MultiplePlatforms(Vec<String>),
    /// No platform at all: neither a plugin nor a built-in activated.
    #[error(
        "Failed to infer device type: no platform was activated (set VLLM_TARGET_DEVICE=cpu, \
         or install a platform plugin)"
    )]
    NoPlatform,
    /// An attention backend name that is not registered (vLLM's text, spec §3.1).
    #[error("Unknown attention backend: '{name}'. Valid options are: {}", valid.join(", "))]
    UnknownAttentionBackend {
        /// The name asked for.
        name: String,
        /// Every registered name.
        valid: Vec<String>,
    },
    /// A name that exists only as a placeholder (`CUSTOM`) was used (vLLM's text, spec §3.1).
    #[error(
        "Backend {0} must be registered before use. Use register_backend(\"{0}\", backend) \
         (Registries::register_attention_backend) in a general plugin"
    )]
    BackendNotRegistered(String),
    /// A name that cannot be a backend name (vLLM's text, spec §3.1).
    #[error("Invalid or reserved backend name: {0}")]
    InvalidBackendName(String),
    /// An explicitly chosen backend does not support the configuration (vLLM's text, §3.3).
    #[error(
        "Selected backend {name} is not valid for this configuration. Reason: [{}]",
        py_list(reasons)
    )]
    InvalidSelectedBackend {
        /// The chosen backend.
        name: String,
        /// Why it does not fit (vLLM's reason strings).
        reasons: Vec<String>,
    },
    /// Automatic selection found nothing that fits (vLLM's text, spec §3.3).
    #[error(
        "No valid attention backend found for {device} with {config}. Reasons: {{{}}}.",
        reasons.iter().map(|(n, r)| format!("{n}: [{}]", py_list(r))).collect::<Vec<_>>().join(", ")
    )]
    NoValidBackend {
        /// The platform's device name.
        device: String,
        /// The selector configuration, debug-printed.
        config: String,
        /// Every backend tried with its reasons, in priority order.
        reasons: Vec<(String, Vec<String>)>,
    },
    /// A platform's selection hook returned no backend (vLLM's text, spec §3.3).
    #[error("Invalid attention backend for {0}")]
    InvalidPlatformBackend(String),
    /// A plugin's platform or backend panicked; the panic was caught on the
    /// plugin's side ([`crate::guard`]).
    #[error("{message}")]
    Panicked {
        /// The plugin entry that registered or returned the object.
        plugin: String,
        /// `plugin 'NAME' panicked in METHOD: MESSAGE`.
        message: String,
    },
    /// A platform rejected the configuration in `check_and_update_config`.
    #[error("platform {platform}: {message}")]
    Config {
        /// The platform's device name.
        platform: String,
        /// What is wrong.
        message: String,
    },
}
