//! vLLM's `SamplingParams`: the same names, defaults and validation rules.

use std::collections::HashMap;

use crate::structured_output::StructuredOutputsParams;

/// An invalid sampling parameter: which one, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SamplingParamsError {
    /// The parameter's name, as the API spells it.
    pub param: &'static str,
    /// One sentence naming the parameter, the rule and the value.
    pub message: String,
}

fn bad(param: &'static str, message: String) -> Result<(), SamplingParamsError> {
    Err(SamplingParamsError { param, message })
}

/// How to sample one request (vLLM's `SamplingParams`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Completions to generate for the prompt.
    pub n: usize,
    /// Penalty for tokens that appeared in the output (-2..=2).
    pub presence_penalty: f32,
    /// Penalty proportional to how often a token appeared in the output (-2..=2).
    pub frequency_penalty: f32,
    /// Multiplicative penalty for tokens in the prompt or output (> 0; 1 = off).
    pub repetition_penalty: f32,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (0, 1].
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 or -1 keeps all.
    pub top_k: i32,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    /// Seed of this request's own generator: same seed, same tokens, whatever else runs.
    pub seed: Option<u64>,
    /// Strings that stop generation (not included in the output unless asked).
    pub stop: Vec<String>,
    /// Token ids that stop generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Most tokens to generate; `None` fills the context.
    pub max_tokens: Option<usize>,
    /// Fewest tokens to generate before EOS or stop ids may end the output.
    pub min_tokens: usize,
    /// Top log-probabilities to return per generated token (the sampled one is always added).
    pub logprobs: Option<usize>,
    /// Top log-probabilities to return per prompt token.
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Keep the matched stop string at the end of the text.
    pub include_stop_str_in_output: bool,
    /// Added to the logits of the given token ids before sampling.
    pub logit_bias: HashMap<u32, f32>,
    /// Constrain the output to a JSON schema, regex, choice or grammar (vLLM's
    /// `structured_outputs`; see [`crate::structured_output`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub structured_outputs: Option<Box<StructuredOutputsParams>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            max_tokens: Some(16),
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            include_stop_str_in_output: false,
            logit_bias: HashMap::new(),
            structured_outputs: None,
        }
    }
}

/// The most log-probabilities a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Greedy decoding with the given length.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Default::default()
        }
    }

    /// True when sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    /// Checks every value against vLLM's rules.
    pub fn validate(&self, vocab_size: usize) -> Result<(), SamplingParamsError> {
        if self.n < 1 {
            return bad("n", format!("n must be at least 1, got {}.", self.n));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!(
                    "presence_penalty must be in [-2, 2], got {}.",
                    self.presence_penalty
                ),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!(
                    "frequency_penalty must be in [-2, 2], got {}.",
                    self.frequency_penalty
                ),
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be greater than zero, got {}.",
                    self.repetition_penalty
                ),
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!(
                    "temperature must be non-negative, got {}.",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}.", self.top_p),
            );
        }
        if self.top_k < -1 {
            return bad(
                "top_k",
                format!(
                    "top_k must be 0 or -1 (disable), or at least 1, got {}.",
                    self.top_k
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(
                "min_p",
                format!("min_p must be in [0, 1], got {}.", self.min_p),
            );
        }
        if let Some(m) = self.max_tokens {
            if m < 1 {
                return bad(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {m}."),
                );
            }
            if self.min_tokens > m {
                return bad(
                    "min_tokens",
                    format!(
                        "min_tokens must be less than or equal to max_tokens={m}, got {}.",
                        self.min_tokens
                    ),
                );
            }
        }
        if let Some(k) = self.logprobs
            && k > MAX_LOGPROBS
        {
            return bad(
                "logprobs",
                format!(
                    "Requested sample logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
                ),
            );
        }
        if let Some(k) = self.prompt_logprobs
            && k > MAX_LOGPROBS
        {
            return bad(
                "prompt_logprobs",
                format!(
                    "Requested prompt logprobs of {k}, which is greater than max allowed: {MAX_LOGPROBS}"
                ),
            );
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop", "stop strings must not be empty.".to_string());
        }
        for (&tok, &bias) in &self.logit_bias {
            if tok as usize >= vocab_size {
                return bad(
                    "logit_bias",
                    format!(
                        "token_id {tok} in logit_bias is out of vocabulary range [0, {vocab_size})."
                    ),
                );
            }
            if !bias.is_finite() {
                return bad(
                    "logit_bias",
                    format!("logit_bias for token {tok} must be a finite number."),
                );
            }
        }
        if let Some(so) = &self.structured_outputs {
            so.validate()?;
        }
        for &tok in &self.stop_token_ids {
            if tok as usize >= vocab_size {
                return bad(
                    "stop_token_ids",
                    format!("stop token id {tok} is out of vocabulary range [0, {vocab_size})."),
                );
            }
        }
        Ok(())
    }
}
