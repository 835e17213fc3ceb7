//! What a model factory reads its weights and hyper-parameters through: [`WeightSource`]
//! (tensors by Hugging Face name, in whatever format the host found), [`RopeStyle`] (the q/k
//! row order of those weights) and [`GgufMetadata`] (typed GGUF key/value access).
//!
//! The implementations (safetensors, GGUF) live in `trellis-models`; a plugin's model factory
//! sees only these traits and types.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result, one_line};

/// Which elements of a head RoPE rotates together; it must match the q/k row order of the
/// weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp / GGUF order (candle's `rope_i`).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face order (candle's `rope`).
    HalfSplit,
}

/// A store of named weights, asked for by Hugging Face tensor names.
pub trait WeightSource {
    /// The file or directory the weights come from (for error messages).
    fn path(&self) -> &Path;

    /// The device tensors are loaded onto.
    fn device(&self) -> &Device;

    /// Whether the tensor `name` exists.
    fn contains(&self, name: &str) -> bool;

    /// Loads `name` as a dense f32 tensor (dequantized if needed).
    fn tensor(&self, name: &str) -> Result<Tensor>;

    /// Loads the matrix `name` (`[out, in]`) for a matmul, kept quantized when stored so.
    fn matmul(&self, name: &str) -> Result<QMatMul>;

    /// The RoPE variant that matches this source's q/k row order.
    fn rope_style(&self) -> RopeStyle;
}

/// Typed access to GGUF metadata; errors name the file and the key.
#[derive(Debug, Clone, Copy)]
pub struct GgufMetadata<'a> {
    /// The GGUF file.
    pub path: &'a Path,
    /// Its key/value metadata.
    pub values: &'a HashMap<String, Value>,
}

impl<'a> GgufMetadata<'a> {
    fn get(&self, key: &str) -> Result<&'a Value> {
        self.values.get(key).ok_or_else(|| {
            ModelError::config(self.path, format!("GGUF metadata key {key} is missing"))
        })
    }

    fn bad(&self, key: &str, e: candle_core::Error) -> ModelError {
        ModelError::config(
            self.path,
            format!("GGUF metadata key {key}: {}", one_line(&e)),
        )
    }

    /// An unsigned integer value (any integer width).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
                let x = v
                    .to_i64()
                    .or_else(|_| v.to_i32().map(i64::from))
                    .map_err(|e| self.bad(key, e))?;
                u64::try_from(x).map_err(|_| {
                    ModelError::config(self.path, format!("GGUF metadata key {key} is negative"))
                })?
            }
            _ => {
                return Err(ModelError::config(
                    self.path,
                    format!("GGUF metadata key {key} is not an integer"),
                ));
            }
        };
        usize::try_from(n).map_err(|_| {
            ModelError::config(self.path, format!("GGUF metadata key {key} is too large"))
        })
    }

    /// A float value (f32 or f64).
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => v.to_f32().map(f64::from).map_err(|e| self.bad(key, e)),
        }
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<&'a str> {
        let v = self.get(key)?;
        v.to_string()
            .map(String::as_str)
            .map_err(|e| self.bad(key, e))
    }

    /// The length of an array value.
    pub fn array_len(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_vec().map(Vec::len).map_err(|e| self.bad(key, e))
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }
}
