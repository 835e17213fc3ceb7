//! The attention-backend registry and selector (vLLM's `AttentionBackendEnum`,
//! `register_backend` and `get_attn_backend`, spec §3).
//!
//! - Names are case-insensitive and stored upper-case. Every member of vLLM's
//!   `AttentionBackendEnum` ([`VLLM_BACKEND_NAMES`], in vLLM's order, `CUSTOM` last) exists from
//!   the start as a placeholder, so that a vLLM name is never "unknown": it has no
//!   implementation until one is registered under it (the CPU platform fills `CPU_ATTN`);
//!   other names are appended in registration order.
//! - Registering over a name that already has a backend replaces it with a WARNING (filling a
//!   placeholder is not a replacement).
//! - [`AttentionBackendRegistry::register_backend`] creates a new name or overrides an
//!   existing one (built-in or `CUSTOM`); the host registers its built-ins the same way.
//! - [`AttentionBackendRegistry::select`] is the selector the platforms' default
//!   [`Platform::get_attn_backend`](crate::Platform::get_attn_backend) uses: an explicit choice
//!   is validated and never replaced; `auto` walks the platform's priority list; when nothing
//!   fits the error lists every backend tried with its reasons.

use std::sync::Arc;

use crate::attention::{AttentionBackend, AttentionSelectorConfig};
use crate::error::PluginError;

/// The placeholder name a plugin may fill without inventing a new one.
pub const CUSTOM: &str = "CUSTOM";

/// The members of vLLM's `AttentionBackendEnum` (0.33.0, spec §3.1), in vLLM's order: valid
/// `--attention-backend` names even where this build has no implementation for them.
pub const VLLM_BACKEND_NAMES: &[&str] = &[
    "FLASH_ATTN",
    "FLASH_ATTN_DIFFKV",
    "TRITON_ATTN",
    "TRITON_ATTN_DIFFKV",
    "TRITON_FLASH_ATTN",
    "ROCM_ATTN",
    "ROCM_SEGMENTED_ATTN",
    "ROCM_AITER_MLA",
    "ROCM_AITER_TRITON_MLA",
    "ROCM_AITER_FA",
    "ROCM_AITER_MLA_SPARSE",
    "XPU_MLA_SPARSE",
    "TORCH_SDPA",
    "FLASHINFER",
    "TRITON_FLASHINFER",
    "FLASHINFER_MLA",
    "TOKENSPEED_MLA",
    "FLASHINFER_MLA_SPARSE",
    "FLASHINFER_MLA_SPARSE_SM120",
    "FLASHINFER_MLA_SPARSE_SM90",
    "TRITON_MLA",
    "CUTLASS_MLA",
    "FLASHMLA",
    "FLASHMLA_SPARSE",
    "FLASHMLA_SPARSE_DSV4",
    "FLASHINFER_MLA_SPARSE_DSV4",
    "ROCM_FLASHMLA_SPARSE_DSV4",
    "FLASHMLA_SPARSE_DSV41",
    "FLASHINFER_MLA_SPARSE_DSV41",
    "ROCM_FLASHMLA_SPARSE_DSV41",
    "FLASHMLA_MEGA_ATTN_DSV41",
    "B12X",
    "FLASH_ATTN_MLA",
    "FLASH_ATTN_MLA_SPARSE",
    "FLASH_ATTN_MLA_SPARSE_FA4",
    "MINIMAX_M3_SPARSE",
    "CUTLASS_MSA",
    "TRITON_MSA",
    "STEP5_DSA",
    "NO_ATTENTION",
    "FLEX_ATTENTION",
    "HPC_ATTN",
    "ROCM_AITER_UNIFIED_ATTN",
    "CPU_ATTN",
    "CPU_MLA",
    "AMX_MLA",
    "TURBOQUANT",
    "ROCM_OCTAVE",
    "ULTRAQUANT",
    CUSTOM,
];

/// The value of `--attention-backend` that means automatic selection (any case).
pub const AUTO: &str = "auto";

/// A backend the selector chose, and why.
#[derive(Clone)]
pub struct AttentionSelection {
    /// The registry name it was chosen under.
    pub name: String,
    /// The backend.
    pub backend: Arc<dyn AttentionBackend>,
    /// Why it was chosen, for the engine's log line.
    pub reason: String,
}

impl std::fmt::Debug for AttentionSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionSelection")
            .field("name", &self.name)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// Name → attention backend; `None` marks a placeholder (a vLLM name such as `CUSTOM` or
/// `FLASH_ATTN`) with no implementation registered.
#[derive(Clone)]
pub struct AttentionBackendRegistry {
    entries: Vec<(String, Option<Arc<dyn AttentionBackend>>)>,
}

impl Default for AttentionBackendRegistry {
    fn default() -> Self {
        Self {
            entries: VLLM_BACKEND_NAMES
                .iter()
                .map(|n| (n.to_string(), None))
                .collect(),
        }
    }
}

impl std::fmt::Debug for AttentionBackendRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionBackendRegistry")
            .field("names", &self.names())
            .finish()
    }
}

/// Whether `name` can name a backend: an identifier, not `auto`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.eq_ignore_ascii_case(AUTO)
}

impl AttentionBackendRegistry {
    /// A registry holding only the placeholders of vLLM's names ([`VLLM_BACKEND_NAMES`]).
    pub fn new() -> Self {
        Self::default()
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Registers `backend` under `name` (case-insensitive): a new name is created, an existing
    /// one (a built-in, another plugin's, or a placeholder such as `CUSTOM`) is overridden —
    /// with a WARNING when it already had a backend.
    pub fn register_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn AttentionBackend>,
    ) -> Result<(), PluginError> {
        if !valid_name(name) {
            return Err(PluginError::InvalidBackendName(name.to_string()));
        }
        match self.index(name) {
            Some(i) => {
                if self.entries[i].1.is_some() {
                    crate::log::log(
                        crate::log::Level::Warning,
                        &format!(
                            "Attention backend {} is already registered, and will be \
                             overwritten by the new registration.",
                            self.entries[i].0
                        ),
                    );
                }
                self.entries[i].1 = Some(backend)
            }
            None => self
                .entries
                .push((name.to_ascii_uppercase(), Some(backend))),
        }
        Ok(())
    }

    /// Every name, registered or placeholder, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Whether `name` exists and has a backend (a bare `CUSTOM` does not).
    pub fn is_registered(&self, name: &str) -> bool {
        self.index(name)
            .is_some_and(|i| self.entries[i].1.is_some())
    }

    fn unknown(&self, name: &str) -> PluginError {
        PluginError::UnknownAttentionBackend {
            name: name.to_string(),
            valid: self.names(),
        }
    }

    /// The canonical (upper-case) form of `name`, or vLLM's "Unknown attention backend" error.
    pub fn canonical_name(&self, name: &str) -> Result<String, PluginError> {
        self.index(name)
            .map(|i| self.entries[i].0.clone())
            .ok_or_else(|| self.unknown(name))
    }

    /// Parses an `--attention-backend` value: `None`, empty or `auto` (any case) mean
    /// automatic (`Ok(None)`); a name must exist.
    pub fn parse_choice(&self, value: Option<&str>) -> Result<Option<String>, PluginError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case(AUTO) => Ok(None),
            Some(v) => self.canonical_name(v).map(Some),
        }
    }

    /// The backend registered under `name`: unknown names and an unfilled `CUSTOM` are errors
    /// with vLLM's texts.
    pub fn get(&self, name: &str) -> Result<Arc<dyn AttentionBackend>, PluginError> {
        let i = self.index(name).ok_or_else(|| self.unknown(name))?;
        let (canonical, backend) = &self.entries[i];
        backend
            .clone()
            .ok_or_else(|| PluginError::BackendNotRegistered(canonical.clone()))
    }

    /// Chooses a backend for `config` on the platform named `device`.
    ///
    /// `requested` (a name, or `None`/`auto`) is validated and, if it does not fit, is an error
    /// — never silently replaced. Otherwise `priority` is walked in order (all registered
    /// names in registration order when it is empty) and the first backend without reasons
    /// wins; when none fits the error lists every backend tried with its reasons.
    pub fn select(
        &self,
        requested: Option<&str>,
        config: &AttentionSelectorConfig,
        device: &str,
        priority: &[String],
    ) -> Result<AttentionSelection, PluginError> {
        if let Some(name) = self.parse_choice(requested)? {
            let backend = self.get(&name)?;
            let reasons = backend.validate_configuration(config);
            if !reasons.is_empty() {
                return Err(PluginError::InvalidSelectedBackend { name, reasons });
            }
            return Ok(AttentionSelection {
                name,
                backend,
                reason: "selected with --attention-backend".to_string(),
            });
        }
        let candidates: Vec<String> = match priority.is_empty() {
            true => self
                .entries
                .iter()
                .filter(|(_, b)| b.is_some())
                .map(|(n, _)| n.clone())
                .collect(),
            false => priority.to_vec(),
        };
        let mut tried = Vec::new();
        for name in &candidates {
            let reasons = match self.get(name) {
                Ok(backend) => {
                    let reasons = backend.validate_configuration(config);
                    if reasons.is_empty() {
                        let name = self.canonical_name(name)?;
                        return Ok(AttentionSelection {
                            reason: format!(
                                "automatic: first valid of {device}'s priority list [{}]",
                                crate::error::py_list(&candidates)
                            ),
                            name,
                            backend,
                        });
                    }
                    reasons
                }
                Err(e) => vec![e.to_string()],
            };
            tried.push((name.clone(), reasons));
        }
        Err(PluginError::NoValidBackend {
            device: device.to_string(),
            config: config.to_string(),
            reasons: tried,
        })
    }
}

/// The requested backend from the `--attention-backend` flag and the deprecated
/// `VLLM_ATTENTION_BACKEND` environment variable (pass their values): the flag wins; the
/// variable alone is used with a deprecation warning, returned for the caller to log.
pub fn requested_backend(
    flag: Option<&str>,
    env: Option<&str>,
) -> (Option<String>, Option<String>) {
    let env = env.map(str::trim).filter(|v| !v.is_empty());
    match (flag, env) {
        (Some(f), Some(_)) => (
            Some(f.to_string()),
            Some("VLLM_ATTENTION_BACKEND is deprecated and ignored because --attention-backend is set".to_string()),
        ),
        (Some(f), None) => (Some(f.to_string()), None),
        (None, Some(e)) => (
            Some(e.to_string()),
            Some(format!(
                "VLLM_ATTENTION_BACKEND is deprecated; use --attention-backend {e} instead"
            )),
        ),
        (None, None) => (None, None),
    }
}

#[cfg(test)]
mod tests;
