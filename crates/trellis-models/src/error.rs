//! Errors of model loading: each names the file and the problem on one line.

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
    /// The architecture has no registered factory.
    #[error(
        "{}: unsupported model architecture {architecture}; supported: {supported} (a plugin can register more)",
        path.display()
    )]
    UnsupportedArchitecture {
        /// The model file or directory.
        path: PathBuf,
        /// The architecture(s) the model declares.
        architecture: String,
        /// The registered architectures, comma-separated.
        supported: String,
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
    /// A tensor operation failed while building the model.
    #[error("{}: {message}", path.display())]
    Candle {
        /// The model file or directory.
        path: PathBuf,
        /// The candle error, on one line.
        message: String,
    },
}

/// The first line of an error's message (candle errors may carry a backtrace).
pub(crate) fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or_default().trim().to_string()
}

impl ModelError {
    /// A [`ModelError::Candle`] for `path`.
    pub(crate) fn candle(path: &Path, e: candle_core::Error) -> Self {
        Self::Candle {
            path: path.to_path_buf(),
            message: one_line(&e),
        }
    }

    /// A [`ModelError::Config`] for `path`.
    pub(crate) fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// `Result` with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
