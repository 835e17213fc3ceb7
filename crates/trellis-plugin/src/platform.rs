//! The platform extension point (vLLM's `Platform`, spec §2): device facts and policy, and
//! the selection of the one platform a process runs on.
//!
//! A platform answers what the engine asks of the hardware — its name and type, memory,
//! dtypes and quantizations, which attention backends to prefer — and has the last word on
//! the configuration ([`Platform::check_and_update_config`]). Only the hooks the engine calls
//! are here; every one but the two names has a default.
//!
//! [`resolve_platform`] picks the platform as vLLM does (spec §2.2): `VLLM_TARGET_DEVICE=cpu`
//! short-circuits to the CPU; exactly one activated out-of-tree platform wins over the
//! built-ins; two are an error naming both; with none, the first activated built-in wins (the
//! host lists them in detection order, CPU last and always available).

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::attention::AttentionSelectorConfig;
use crate::attention_registry::{AttentionBackendRegistry, AttentionSelection};
use crate::error::PluginError;

/// The part of the engine configuration a platform may inspect and change.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV-cache budget in bytes.
    pub kv_cache_bytes: usize,
    /// The requested attention backend name; `None` means automatic.
    pub attention_backend: Option<String>,
    /// Compute dtype of the model.
    pub dtype: DType,
    /// Element type of the KV cache.
    pub kv_cache_dtype: DType,
    /// Most sequences a step, when set.
    pub max_num_seqs: Option<usize>,
    /// Token budget a step, when set.
    pub max_num_batched_tokens: Option<usize>,
    /// Longest sequence, when set.
    pub max_model_len: Option<usize>,
    /// The weights' quantization (`Q4_1`, ...), when known.
    pub quantization: Option<String>,
    /// Warnings the platform wants the engine to log (one line each).
    pub warnings: Vec<String>,
}

/// What [`Platform::validate_request`] sees of a request: its id, its prompt as token ids and
/// how many tokens it may generate (`None`: up to the context length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// The prompt, tokenized.
    pub prompt_token_ids: &'a [u32],
    /// The most tokens it may generate, when the request says.
    pub max_tokens: Option<usize>,
}

/// A hardware platform.
pub trait Platform: Send + Sync {
    /// Name used in logs and errors (`cpu`, `NVIDIA H100`, `DummyDevice`).
    fn device_name(&self) -> &str;

    /// Device type (`cpu`, `cuda`, or a plugin's own such as `privateuseone`).
    fn device_type(&self) -> &str;

    /// Whether this is a CPU platform.
    fn is_cpu(&self) -> bool {
        self.device_type() == "cpu"
    }

    /// The candle device tensors are placed on (default: the CPU).
    fn device(&self) -> Result<Device, PluginError> {
        Ok(Device::Cpu)
    }

    /// Device memory in bytes, when known.
    fn total_memory(&self) -> Option<u64> {
        None
    }

    /// Device memory in use in bytes, when known.
    fn used_memory(&self) -> Option<u64> {
        None
    }

    /// Compute dtypes the platform supports; the first is the fallback (vLLM's default
    /// `[bf16, f16, f32]`).
    fn supported_dtypes(&self) -> Vec<DType> {
        vec![DType::BF16, DType::F16, DType::F32]
    }

    /// Weight quantizations the platform supports; empty means all.
    fn supported_quantizations(&self) -> Vec<String> {
        Vec::new()
    }

    /// Rejects `quantization` when [`Platform::supported_quantizations`] does not list it
    /// (vLLM's "{quant} quantization is currently not supported in {device_name}.").
    fn verify_quantization(&self, quantization: &str) -> Result<(), PluginError> {
        let supported = self.supported_quantizations();
        if supported.is_empty()
            || supported
                .iter()
                .any(|q| q.eq_ignore_ascii_case(quantization))
        {
            return Ok(());
        }
        Err(PluginError::Config {
            platform: self.device_name().to_string(),
            message: format!(
                "{quantization} quantization is currently not supported in {}.",
                self.device_name()
            ),
        })
    }

    /// The last word on the configuration: validate and change it in place (vLLM's
    /// `check_and_update_config`). Default: accept it as is.
    fn check_and_update_config(&self, config: &mut PlatformConfig) -> Result<(), PluginError> {
        let _ = config;
        Ok(())
    }

    /// Attention backend names to try, best first, when the choice is `auto`. Empty means
    /// every registered backend in registration order.
    fn attention_backend_priority(&self) -> Vec<String> {
        Vec::new()
    }

    /// Chooses the attention backend (vLLM's `get_attn_backend_cls`). `requested` is the
    /// user's choice (`None` = auto). The default is the validated selector: an explicit
    /// choice is checked and never replaced, `auto` walks
    /// [`Platform::attention_backend_priority`].
    fn get_attn_backend(
        &self,
        requested: Option<&str>,
        config: &AttentionSelectorConfig,
        registry: &AttentionBackendRegistry,
    ) -> Result<AttentionSelection, PluginError> {
        registry.select(
            requested,
            config,
            self.device_name(),
            &self.attention_backend_priority(),
        )
    }

    /// Seeds every device random generator (vLLM's `seed_everything`). Default: nothing to
    /// seed (Trellis's sampler carries its own per-request generators).
    fn seed_everything(&self, seed: u64) {
        let _ = seed;
    }

    /// vLLM's `verify_model_arch`: called with the architecture the model registry resolved
    /// (`LlamaForCausalLM`, ...) before its factory builds the model; an error refuses it
    /// and start-up fails with that error. Default: every architecture is accepted.
    fn verify_model_arch(&self, architecture: &str) -> Result<(), PluginError> {
        let _ = architecture;
        Ok(())
    }

    /// vLLM's `check_max_model_len`: the longest sequence this platform allows, given the one
    /// the engine derived (`--max-model-len`, else the model's context length). It may clamp
    /// it (the engine logs the change); 0 is refused. Default: unchanged.
    fn check_max_model_len(&self, max_model_len: usize) -> usize {
        max_model_len
    }

    /// vLLM's `validate_request`: called for every request after tokenization, before it is
    /// queued; an error rejects that request alone (a 400 in `trellis serve`). Default:
    /// every request is accepted.
    fn validate_request(&self, request: &RequestInfo<'_>) -> Result<(), PluginError> {
        let _ = request;
        Ok(())
    }

    /// Device facts for the startup log, after the name: "Platform: NAME (FACTS)". Default:
    /// the device type and memory.
    fn describe(&self) -> String {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let mem = match (self.total_memory(), self.used_memory()) {
            (Some(t), Some(u)) => format!(", memory {} used of {}", gib(u), gib(t)),
            (Some(t), None) => format!(", memory {}", gib(t)),
            _ => String::new(),
        };
        format!("device type {}{mem}", self.device_type())
    }
}

/// A platform together with the name it was registered or detected under.
pub type NamedPlatform = (String, Arc<dyn Platform>);

/// Whether `VLLM_TARGET_DEVICE` (its value passed in) asks for the CPU, which short-circuits
/// platform selection: platform plugins need not even be loaded.
pub fn target_device_is_cpu(target_device: Option<&str>) -> bool {
    target_device.is_some_and(|v| v.trim().eq_ignore_ascii_case("cpu"))
}

/// Selects the platform as vLLM does (spec §2.2), with `VLLM_TARGET_DEVICE` passed in.
///
/// `builtins` are the activated built-in platforms in detection order (the CPU last; its name
/// must be `cpu`), `plugins` the activated out-of-tree ones with their plugin names.
pub fn resolve_platform_with(
    target_device: Option<&str>,
    builtins: &[NamedPlatform],
    plugins: &[NamedPlatform],
) -> Result<NamedPlatform, PluginError> {
    let cpu = || builtins.iter().find(|(n, p)| n == "cpu" || p.is_cpu());
    if target_device_is_cpu(target_device)
        && let Some(cpu) = cpu()
    {
        return Ok(cpu.clone());
    }
    match plugins {
        [one] => return Ok(one.clone()),
        [] => {}
        many => {
            let names = many.iter().map(|(n, _)| n.clone()).collect();
            return Err(PluginError::MultiplePlatforms(names));
        }
    }
    builtins.first().cloned().ok_or(PluginError::NoPlatform)
}

/// [`resolve_platform_with`] reading `VLLM_TARGET_DEVICE` from the environment, returning the
/// platform alone.
pub fn resolve_platform(
    builtins: &[NamedPlatform],
    plugins: &[NamedPlatform],
) -> Result<Arc<dyn Platform>, PluginError> {
    let target = std::env::var("VLLM_TARGET_DEVICE").ok();
    resolve_platform_with(target.as_deref(), builtins, plugins).map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static str, &'static str);

    impl Platform for Fake {
        fn device_name(&self) -> &str {
            self.0
        }
        fn device_type(&self) -> &str {
            self.1
        }
    }

    fn named(name: &'static str, ty: &'static str) -> NamedPlatform {
        (name.to_string(), Arc::new(Fake(name, ty)))
    }

    fn pick(target: Option<&str>, b: &[NamedPlatform], p: &[NamedPlatform]) -> String {
        match resolve_platform_with(target, b, p) {
            Ok((n, _)) => n,
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn target_device_cpu_short_circuits() {
        let b = [named("cuda", "cuda"), named("cpu", "cpu")];
        let p = [named("dummy_a", "x"), named("dummy_b", "y")];
        assert_eq!(pick(Some("cpu"), &b, &p), "cpu");
        assert_eq!(pick(Some("CPU"), &b, &[]), "cpu");
    }

    #[test]
    fn one_out_of_tree_platform_wins_over_builtins() {
        let b = [named("cuda", "cuda"), named("cpu", "cpu")];
        assert_eq!(
            pick(None, &b, &[named("dummy_platform_plugin", "privateuseone")]),
            "dummy_platform_plugin"
        );
        assert_eq!(pick(Some("cuda"), &b, &[named("dummy", "x")]), "dummy");
    }

    #[test]
    fn two_out_of_tree_platforms_are_an_error() {
        let b = [named("cpu", "cpu")];
        let p = [named("a_plugin", "x"), named("b_plugin", "y")];
        assert_eq!(
            pick(None, &b, &p),
            "Only one platform plugin can be activated, but got: ['a_plugin', 'b_plugin']"
        );
    }

    #[test]
    fn no_plugin_falls_back_to_builtin_detection() {
        assert_eq!(pick(None, &[named("cpu", "cpu")], &[]), "cpu");
        assert_eq!(
            pick(None, &[named("cuda", "cuda"), named("cpu", "cpu")], &[]),
            "cuda"
        );
        assert!(pick(None, &[], &[]).contains("Failed to infer device type"));
    }

    #[test]
    fn defaults_are_sensible() {
        let f = Fake("cpu", "cpu");
        assert!(f.is_cpu());
        assert!(f.verify_quantization("Q4_1").is_ok());
        assert!(f.verify_model_arch("LlamaForCausalLM").is_ok());
        assert_eq!(f.check_max_model_len(2048), 2048);
        let request = RequestInfo {
            request_id: "r",
            prompt_token_ids: &[1, 2],
            max_tokens: Some(4),
        };
        assert!(f.validate_request(&request).is_ok());
        assert_eq!(f.describe(), "device type cpu");
    }
}
