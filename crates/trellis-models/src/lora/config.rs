//! `adapter_config.json` as PEFT writes it: the fields LoRA serving needs, every other key
//! ignored, and vLLM's refusals of what it cannot serve (DoRA, `modules_to_save`, bias,
//! PiSSA/OLoRA initialisation, ranks above `--max-lora-rank`).

use std::collections::BTreeMap;

use regex::Regex;
use serde::Deserialize;

use super::LoraError;

/// `target_modules`: a list of module names (a module matches when its dotted name is the
/// entry or ends with `.entry`) or one regular expression matched against the whole name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module-name suffixes.
    List(Vec<String>),
    /// A regular expression.
    Regex(String),
}

/// `init_lora_weights`: a bool, or the name of an initialisation (`pissa`, `olora`, ...).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// Plain LoRA initialisation (`true`) or random (`false`): both serve as is.
    Bool(bool),
    /// A named initialisation.
    Name(String),
}

/// The fields of `adapter_config.json` that serving reads (vLLM's `PEFTHelper`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeftConfig {
    /// `LORA` for a LoRA adapter.
    #[serde(default)]
    pub peft_type: Option<String>,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Which modules carry adapters.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Rank-stabilised scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (refused).
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks, keyed by a module-name pattern.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, keyed by a module-name pattern.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Extra trained modules (refused unless `classifier`/`score`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `none`, `all` or `lora_only`: anything but `none` is refused.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// LoRA bias on `lora_B` (refused).
    #[serde(default)]
    pub lora_bias: bool,
    /// The initialisation the adapter was made with.
    #[serde(default)]
    pub init_lora_weights: Option<InitLoraWeights>,
}

fn default_alpha() -> f64 {
    8.0
}

fn default_bias() -> String {
    "none".to_string()
}

/// Whether `key` (a dotted module name) matches `pattern` as PEFT's `get_pattern_key` does:
/// the pattern matches the whole name or a dotted suffix of it.
fn pattern_matches(pattern: &str, key: &str) -> bool {
    Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).is_ok_and(|re| re.is_match(key))
}

impl PeftConfig {
    /// Parses `text`, the contents of `adapter_config.json`.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// vLLM's refusals, joined (empty when the adapter can be served).
    pub fn unsupported_features(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(m) = &self.modules_to_save
            && !m.is_empty()
            && !m.iter().all(|n| n == "classifier" || n == "score")
        {
            errors.push(
                "vLLM only supports modules_to_save being None or [\"classifier\", \"score\"]."
                    .to_string(),
            );
        }
        if self.use_dora {
            errors.push("vLLM does not yet support DoRA.".to_string());
        }
        if self.bias != "none" || self.lora_bias {
            errors.push("Adapter bias is not supported.".to_string());
        }
        if let Some(InitLoraWeights::Name(name)) = &self.init_lora_weights {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("pissa") || lower.starts_with("olora") || lower == "corda" {
                errors.push(format!(
                    "LoRA adapters initialised with init_lora_weights '{name}' are not supported; \
                     convert them to plain LoRA first."
                ));
            }
        }
        errors
    }

    /// Checks everything that does not need the weights: type, features, rank, scaling.
    pub fn validate(&self, max_lora_rank: usize) -> Result<(), LoraError> {
        if let Some(t) = &self.peft_type
            && t != "LORA"
        {
            return Err(LoraError::Unsupported(format!(
                "PEFT adapters of type {t} are not LoRA adapters."
            )));
        }
        if self.r == 0 {
            return Err(LoraError::Unsupported(format!(
                "LoRA rank `r` must be a positive integer, got {}.",
                self.r
            )));
        }
        let errors = self.unsupported_features();
        if !errors.is_empty() {
            return Err(LoraError::Unsupported(errors.join(" ")));
        }
        let rank = self.max_rank();
        if rank > max_lora_rank {
            return Err(LoraError::Rank {
                rank,
                max: max_lora_rank,
            });
        }
        if let Some(TargetModules::Regex(re)) = &self.target_modules
            && let Err(e) = Regex::new(re)
        {
            return Err(LoraError::Unsupported(format!(
                "target_modules is not a valid regular expression: {e}"
            )));
        }
        Ok(())
    }

    /// The largest rank any module has (`r` and every `rank_pattern` value).
    pub fn max_rank(&self) -> usize {
        self.rank_pattern
            .values()
            .copied()
            .chain([self.r])
            .max()
            .unwrap_or(self.r)
    }

    /// The rank of module `key` (`model.layers.3.self_attn.q_proj`).
    pub fn rank_of(&self, key: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, key))
            .map_or(self.r, |(_, &r)| r)
    }

    /// The scaling `alpha / r` (or `alpha / sqrt(r)` under rsLoRA) of module `key`.
    pub fn scaling_of(&self, key: &str) -> f64 {
        let rank = self.rank_of(key) as f64;
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(p, _)| pattern_matches(p, key))
            .map_or(self.lora_alpha, |(_, &a)| a);
        match self.use_rslora {
            true => alpha / rank.sqrt(),
            false => alpha / rank,
        }
    }

    /// The `target_modules` list entries that are not module names a model may have
    /// (a regex is not checked this way).
    pub fn listed_targets(&self) -> Vec<String> {
        match &self.target_modules {
            Some(TargetModules::List(l)) => l.clone(),
            _ => Vec::new(),
        }
    }
}
