//! Where weights come from. Model files ask for tensors by their Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`); a [`WeightSource`] finds them in its format:
//! [`SafetensorsSource`] here (memory-mapped, single file or sharded), and
//! [`GgufSource`](crate::gguf::GgufSource), which maps the names to llama.cpp's.

use std::collections::{BTreeSet, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{ModelError, Result, one_line};
pub use trellis_plugin::weights::{RopeStyle, WeightSource};

/// A progress bar over the tensors of a model, drawn only when stderr is a terminal.
pub(crate) fn progress_bar(len: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} tensors")
    {
        bar.set_style(style);
    }
    bar
}

/// Hugging Face safetensors weights: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`, memory-mapped and converted to f32 on load.
pub struct SafetensorsSource {
    dir: PathBuf,
    st: MmapedSafetensors,
    names: HashSet<String>,
    device: Device,
    progress: ProgressBar,
}

impl SafetensorsSource {
    /// Opens the safetensors files of the model directory `dir`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.clone(),
                message: one_line(&e),
            })?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::config(&index, format!("invalid JSON: {}", one_line(&e)))
            })?;
            let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
                return Err(ModelError::config(&index, "missing field `weight_map`"));
            };
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for f in &files {
            if !f.is_file() {
                return Err(ModelError::NotFound { path: f.clone() });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we assume they
        // are not modified while the model is loaded.
        let st = unsafe {
            if files.len() == 1 {
                MmapedSafetensors::new(&files[0])
            } else {
                MmapedSafetensors::multi(&files)
            }
        }
        .map_err(|e| match files.as_slice() {
            [one] => ModelError::InvalidSafetensors {
                path: one.clone(),
                message: strip_path(&one_line(&e)),
            },
            _ => ModelError::InvalidSafetensors {
                path: dir.to_path_buf(),
                message: one_line(&e),
            },
        })?;
        let names: HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let progress = progress_bar(names.len());
        Ok(Self {
            dir: dir.to_path_buf(),
            st,
            names,
            device: device.clone(),
            progress,
        })
    }
}

/// Drops the `path: "..."` annotation candle adds to the message; the path is ours to say.
fn strip_path(s: &str) -> String {
    match s.strip_prefix("path: \"").and_then(|r| r.split_once("\" ")) {
        Some((_, rest)) => rest.to_string(),
        None => s.to_string(),
    }
}

impl WeightSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(ModelError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            });
        }
        let t = self
            .st
            .load(name, &self.device)
            .map_err(|e| ModelError::InvalidSafetensors {
                path: self.dir.clone(),
                message: format!("tensor {name}: {}", one_line(&e)),
            })?;
        if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::UnsupportedDType {
                path: self.dir.clone(),
                name: name.to_string(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        self.progress.inc(1);
        t.to_dtype(DType::F32)
            .map_err(|e| ModelError::candle(&self.dir, e))
    }

    fn matmul(&self, name: &str) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.tensor(name)?))
    }

    fn rope_style(&self) -> RopeStyle {
        RopeStyle::HalfSplit
    }
}

impl Drop for SafetensorsSource {
    fn drop(&mut self) {
        self.progress.finish_and_clear();
    }
}
