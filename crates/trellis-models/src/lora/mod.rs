//! PEFT LoRA adapters, loaded as `peft` writes them: `adapter_config.json` (see [`config`])
//! and `adapter_model.safetensors` with tensors
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{target}.lora_{A|B}.weight`.
//!
//! [`LoraAdapter::load`] reads and checks everything before it returns, so a refused adapter
//! leaves nothing half loaded; the result is held on the CPU (the engine's LRU of loaded
//! adapters) and copied into a slot of the fixed pool ([`LoraAdapter::write_to`]) when a step
//! needs it. On a GGUF base, `lora_B` of q and k gets llama.cpp's row permutation (the one the
//! GGUF converter applies to `attn_q`/`attn_k`), with the scaling folded in.

pub mod config;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use trellis_plugin::{LoraModuleSpec, LoraSlotError, LoraSlotPool, LoraTarget};

pub use config::{PeftConfig, TargetModules};

/// Why an adapter cannot be loaded (vLLM's texts where vLLM has one).
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// No `adapter_config.json` at the path (the server maps this to 404).
    #[error("No adapter found for {}", .0.display())]
    NotFound(PathBuf),
    /// Only pickled PyTorch weights.
    #[error(
        "{}: adapter_model.bin (pickled PyTorch weights) is not supported; save the adapter \
         with safetensors (adapter_model.safetensors)",
        .0.display()
    )]
    PickledWeights(PathBuf),
    /// `adapter_config.json` cannot be parsed.
    #[error("invalid adapter_config.json in {}: {msg}", path.display())]
    Config {
        /// The adapter directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A feature vLLM refuses (DoRA, modules_to_save, bias, ...).
    #[error("{0}")]
    Unsupported(String),
    /// Rank above `--max-lora-rank`.
    #[error("LoRA rank {rank} is greater than max_lora_rank {max}.")]
    Rank {
        /// The adapter's largest rank.
        rank: usize,
        /// `--max-lora-rank`.
        max: usize,
    },
    /// Modules the model has no LoRA support for.
    #[error(
        "While loading {}, expected target modules in {expected:?} but received {received:?}. \
         Please verify that the loaded LoRA module is correct",
        path.display()
    )]
    UnexpectedModules {
        /// The adapter directory.
        path: PathBuf,
        /// What the model supports.
        expected: Vec<String>,
        /// What the adapter has that the model lacks.
        received: Vec<String>,
    },
    /// Embedding or LM-head adapters.
    #[error(
        "While loading {}: LoRA adapters on embeddings or the LM head are not supported ({name})",
        path.display()
    )]
    EmbeddingAdapter {
        /// The adapter directory.
        path: PathBuf,
        /// The tensor.
        name: String,
    },
    /// The weights file is unreadable or a tensor has the wrong shape.
    #[error("invalid LoRA weights in {}: {msg}", path.display())]
    Weights {
        /// The adapter directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

/// One module's adapter weights, ready for a slot.
#[derive(Debug, Clone)]
struct AdapterModule {
    layer: usize,
    target: LoraTarget,
    rank: usize,
    /// `A` `[rank, in]`.
    a: Vec<f32>,
    /// `(s·B)ᵀ` `[rank, out]`, rows of `B` in the model's order.
    b_t: Vec<f32>,
}

/// A loaded adapter, held on the CPU until a step copies it into a slot.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    path: PathBuf,
    config: PeftConfig,
    modules: Vec<AdapterModule>,
}

/// A tensor read as `f32` with its shape.
struct Raw {
    dims: Vec<usize>,
    data: Vec<f32>,
}

impl LoraAdapter {
    /// Loads the adapter in `dir` for a model with LoRA-capable `specs`, refusing ranks above
    /// `max_lora_rank`.
    pub fn load(
        dir: &Path,
        specs: &[LoraModuleSpec],
        max_lora_rank: usize,
    ) -> Result<Self, LoraError> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            return Err(LoraError::NotFound(dir.to_path_buf()));
        }
        let config_err = |msg: String| LoraError::Config {
            path: dir.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| config_err(e.to_string()))?;
        let config = PeftConfig::parse(&text).map_err(config_err)?;
        config.validate(max_lora_rank)?;
        let supported: Vec<String> = LoraTarget::ALL
            .iter()
            .filter(|t| specs.iter().any(|s| s.target == **t))
            .map(|t| t.name().to_string())
            .collect();
        let lacking: Vec<String> = config
            .listed_targets()
            .into_iter()
            .filter(|t| !supported.contains(t))
            .collect();
        if !lacking.is_empty() {
            return Err(LoraError::UnexpectedModules {
                path: dir.to_path_buf(),
                expected: supported,
                received: lacking,
            });
        }
        let tensors = read_weights(dir)?;
        let modules = assemble(dir, &config, specs, tensors, &supported)?;
        Ok(LoraAdapter {
            path: dir.to_path_buf(),
            config,
            modules,
        })
    }

    /// The directory it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `adapter_config.json`.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The largest rank of its modules.
    pub fn rank(&self) -> usize {
        self.modules.iter().map(|m| m.rank).max().unwrap_or(0)
    }

    /// The modules it targets, as `(layer, target)`.
    pub fn targets(&self) -> impl Iterator<Item = (usize, LoraTarget)> + '_ {
        self.modules.iter().map(|m| (m.layer, m.target))
    }

    /// Bytes its weights take in memory.
    pub fn bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| (m.a.len() + m.b_t.len()) * 4)
            .sum()
    }

    /// Copies the adapter into `slot` of `pool` (clearing what the slot held first).
    pub fn write_to(&self, pool: &mut LoraSlotPool, slot: usize) -> Result<(), LoraSlotError> {
        pool.clear_slot(slot);
        for m in &self.modules {
            pool.set_module(slot, m.layer, m.target, m.rank, &m.a, &m.b_t)?;
        }
        Ok(())
    }
}

/// Reads `adapter_model.safetensors` (refusing a `.bin`-only adapter) as f32 tensors.
fn read_weights(dir: &Path) -> Result<BTreeMap<String, Raw>, LoraError> {
    let st = dir.join("adapter_model.safetensors");
    if !st.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            return Err(LoraError::PickledWeights(dir.to_path_buf()));
        }
        return Err(LoraError::NotFound(dir.to_path_buf()));
    }
    let weights_err = |msg: String| LoraError::Weights {
        path: dir.to_path_buf(),
        msg,
    };
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
        .map_err(|e| weights_err(format!("adapter_model.safetensors: {e}")))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let dims = t.dims().to_vec();
            let data = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| weights_err(format!("{name}: {e}")))?;
            Ok((name, Raw { dims, data }))
        })
        .collect()
}

/// `(layer, target, is_a)` of a PEFT tensor name, `None` for names of another form.
fn parse_name(name: &str) -> Option<(usize, &str, &str, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (parent, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let is_a = match rest {
        "lora_A.weight" => true,
        "lora_B.weight" => false,
        _ => return None,
    };
    Some((layer, parent, module, is_a))
}

/// Checks every tensor against the model and turns pairs of `A`/`B` into slot-ready modules.
fn assemble(
    dir: &Path,
    config: &PeftConfig,
    specs: &[LoraModuleSpec],
    mut tensors: BTreeMap<String, Raw>,
    supported: &[String],
) -> Result<Vec<AdapterModule>, LoraError> {
    let weights_err = |msg: String| LoraError::Weights {
        path: dir.to_path_buf(),
        msg,
    };
    let mut unexpected = Vec::new();
    let mut pairs: BTreeMap<(usize, LoraTarget), (Option<Raw>, Option<Raw>)> = BTreeMap::new();
    let names: Vec<String> = tensors.keys().cloned().collect();
    for name in names {
        if name.contains("embed_tokens") || name.contains("lm_head") || name.contains("embedding") {
            return Err(LoraError::EmbeddingAdapter {
                path: dir.to_path_buf(),
                name,
            });
        }
        let parsed = parse_name(&name).and_then(|(layer, parent, module, is_a)| {
            let target = LoraTarget::from_name(module).filter(|t| t.parent() == parent)?;
            specs
                .iter()
                .any(|s| s.layer == layer && s.target == target)
                .then_some((layer, target, is_a))
        });
        let Some((layer, target, is_a)) = parsed else {
            unexpected.push(name);
            continue;
        };
        let raw = tensors.remove(&name);
        let entry = pairs.entry((layer, target)).or_default();
        match is_a {
            true => entry.0 = raw,
            false => entry.1 = raw,
        }
    }
    if !unexpected.is_empty() {
        return Err(LoraError::UnexpectedModules {
            path: dir.to_path_buf(),
            expected: supported.to_vec(),
            received: unexpected,
        });
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for ((layer, target), pair) in pairs {
        let key = format!("model.layers.{layer}.{}.{}", target.parent(), target.name());
        let (Some(a), Some(b)) = pair else {
            return Err(weights_err(format!("{key} lacks lora_A or lora_B")));
        };
        let Some(spec) = specs
            .iter()
            .find(|s| s.layer == layer && s.target == target)
        else {
            continue;
        };
        let rank = config.rank_of(&key);
        let (inp, out) = (spec.in_features, spec.out_features);
        if a.dims != [rank, inp] || b.dims != [out, rank] {
            return Err(weights_err(format!(
                "{key}: lora_A is {:?} and lora_B {:?}, expected [{rank}, {inp}] and [{out}, {rank}]",
                a.dims, b.dims
            )));
        }
        let scale = config.scaling_of(&key) as f32;
        let mut b_t = vec![0f32; rank * out];
        for row in 0..out {
            let src = spec.permute_heads.map_or(row, |n| hf_row(row, out, n));
            for j in 0..rank {
                b_t[j * out + row] = scale * b.data[src * rank + j];
            }
        }
        modules.push(AdapterModule {
            layer,
            target,
            rank,
            a: a.data,
            b_t,
        });
    }
    Ok(modules)
}

/// The Hugging Face row that llama.cpp's permutation for `n` heads puts at row `row` of
/// `rows`: `gguf = hf.reshape(n, 2, rows/n/2, ·).swapaxes(1, 2)`.
fn hf_row(row: usize, rows: usize, n: usize) -> usize {
    let half = rows / n / 2;
    if half == 0 {
        return row;
    }
    let (head, within) = (row / (2 * half), row % (2 * half));
    let (i, j) = (within / 2, within % 2);
    head * 2 * half + j * half + i
}

#[cfg(test)]
mod tests {
    use super::hf_row;

    #[test]
    fn permutation_matches_llama_cpp() {
        // permute(w, n) = w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (rows, n) = (12usize, 2usize);
        let half = rows / n / 2;
        let mut want = Vec::new();
        for h in 0..n {
            for i in 0..half {
                for j in 0..2 {
                    want.push(h * 2 * half + j * half + i);
                }
            }
        }
        let got: Vec<usize> = (0..rows).map(|r| hf_row(r, rows, n)).collect();
        assert_eq!(got, want);
    }
}
