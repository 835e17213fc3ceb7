//! GGUF weights (llama.cpp's format): metadata access and a [`WeightSource`] that maps Hugging
//! Face tensor names to GGUF ones and keeps quantized matrices quantized.
//!
//! llama.cpp stores `attn_q`/`attn_k` with each head's rows permuted for its interleaved RoPE,
//! so this source asks for [`RopeStyle::Interleaved`]; attention scores are unchanged because
//! queries and keys share the permutation.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;

use crate::error::{ModelError, Result, one_line};
use crate::weights::progress_bar;
pub use trellis_plugin::weights::GgufMetadata;
use trellis_plugin::weights::{RopeStyle, WeightSource};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Whether `path` is a GGUF file (by extension or magic).
pub fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == GGUF_MAGIC
}

/// Maps a Hugging Face tensor name to its GGUF name; other names pass through unchanged.
pub fn gguf_name(hf: &str) -> String {
    let (stem, suffix) = match hf.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, x),
        _ => return hf.to_string(),
    };
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let Some(rest) = stem.strip_prefix("model.layers.") else {
                return hf.to_string();
            };
            let Some((i, part)) = rest.split_once('.') else {
                return hf.to_string();
            };
            let g = match part {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return hf.to_string(),
            };
            format!("blk.{i}.{g}")
        }
    };
    format!("{mapped}.{suffix}")
}

/// Names an unexpected end of file as what it is.
fn truncation(msg: String) -> String {
    match msg.contains("failed to fill whole buffer") {
        true => "file is truncated (unexpected end of file)".to_string(),
        false => msg,
    }
}

/// A GGUF file opened for loading: parsed header, tensors read on demand.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    device: Device,
    progress: ProgressBar,
}

impl GgufSource {
    /// Opens `path` and parses its header and metadata.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: one_line(&e),
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = one_line(&e);
            match msg.strip_prefix("unknown dtype for tensor ") {
                Some(code) => ModelError::UnsupportedDType {
                    path: path.to_path_buf(),
                    name: "(one in the header)".to_string(),
                    dtype: format!("GGML type {code}"),
                },
                None => ModelError::InvalidGguf {
                    path: path.to_path_buf(),
                    message: truncation(msg),
                },
            }
        })?;
        let progress = progress_bar(content.tensor_infos.len());
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            device: device.clone(),
            progress,
        })
    }

    /// The file's metadata.
    pub fn metadata(&self) -> GgufMetadata<'_> {
        GgufMetadata {
            path: &self.path,
            values: &self.content.metadata,
        }
    }

    /// `general.architecture` (for example `llama`).
    pub fn architecture(&self) -> Result<&str> {
        self.metadata().string("general.architecture")
    }

    /// Reads the tensor stored as `gguf` (a GGUF name).
    pub fn qtensor(&self, gguf: &str) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(gguf) else {
            return Err(ModelError::MissingTensor {
                path: self.path.clone(),
                name: gguf.to_string(),
            });
        };
        if matches!(info.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(ModelError::UnsupportedDType {
                path: self.path.clone(),
                name: gguf.to_string(),
                dtype: format!("{:?}", info.ggml_dtype),
            });
        }
        let mut reader = self.reader.lock().map_err(|_| ModelError::Io {
            path: self.path.clone(),
            message: "reader poisoned by an earlier panic".to_string(),
        })?;
        let t = self
            .content
            .tensor(&mut *reader, gguf, &self.device)
            .map_err(|e| ModelError::InvalidGguf {
                path: self.path.clone(),
                message: format!("tensor {gguf}: {}", one_line(&e)),
            })?;
        self.progress.inc(1);
        Ok(t)
    }
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&gguf_name(name))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let q = self.qtensor(&gguf_name(name))?;
        q.dequantize(&self.device)
            .map_err(|e| ModelError::candle(&self.path, e))
    }

    fn matmul(&self, name: &str) -> Result<QMatMul> {
        let q = self.qtensor(&gguf_name(name))?;
        QMatMul::from_qtensor(q).map_err(|e| ModelError::candle(&self.path, e))
    }

    fn rope_style(&self) -> RopeStyle {
        RopeStyle::Interleaved
    }
}

impl Drop for GgufSource {
    fn drop(&mut self) {
        self.progress.finish_and_clear();
    }
}
