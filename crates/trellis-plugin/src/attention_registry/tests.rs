//! Mirrors vLLM's `test_attention_backend_registry.py` and `test_attention_selector.py`
//! (spec §3.6) on the Rust registry.

use candle_core::{DType, Device, Result};

use super::*;
use crate::attention::{AttentionImpl, AttentionShape, KvCacheSpec};

/// A fake backend: a name and the head sizes / block sizes it supports.
struct Fake {
    name: &'static str,
    heads: Vec<usize>,
    blocks: Vec<usize>,
}

impl AttentionBackend for Fake {
    fn name(&self) -> &str {
        self.name
    }
    fn supported_head_sizes(&self) -> Vec<usize> {
        self.heads.clone()
    }
    fn supported_block_sizes(&self) -> Vec<usize> {
        self.blocks.clone()
    }
    fn new_layer(
        &self,
        _spec: &KvCacheSpec,
        _shape: AttentionShape,
        _device: &Device,
    ) -> Result<Box<dyn AttentionImpl>> {
        Err(candle_core::Error::Msg("fake".into()))
    }
}

fn fake(name: &'static str, heads: &[usize]) -> Arc<dyn AttentionBackend> {
    Arc::new(Fake {
        name,
        heads: heads.to_vec(),
        blocks: Vec::new(),
    })
}

fn cfg(head_size: usize) -> AttentionSelectorConfig {
    AttentionSelectorConfig {
        head_size,
        num_heads: 9,
        num_kv_heads: 3,
        dtype: DType::F32,
        kv_cache_dtype: DType::F32,
        block_size: Some(16),
        attn_type: crate::AttentionType::Decoder,
    }
}

fn with_builtin() -> AttentionBackendRegistry {
    let mut r = AttentionBackendRegistry::new();
    assert!(
        r.register_backend("CPU_REFERENCE", fake("CPU_REFERENCE", &[]))
            .is_ok()
    );
    r
}

fn err<T>(r: std::result::Result<T, PluginError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn chosen(r: std::result::Result<AttentionSelection, PluginError>) -> String {
    match r {
        Ok(s) => s.name,
        Err(e) => panic!("selection failed: {e}"),
    }
}

#[test]
fn custom_is_a_placeholder_until_registered() {
    let mut r = with_builtin();
    assert!(r.names().contains(&"CUSTOM".to_string()));
    assert!(!r.is_registered("CUSTOM"));
    let e = err(r.get("CUSTOM"));
    assert!(
        e.starts_with("Backend CUSTOM must be registered before use."),
        "{e}"
    );
    assert!(err(r.select(Some("custom"), &cfg(64), "cpu", &[])).contains("must be registered"));
    assert!(r.register_backend("CUSTOM", fake("CUSTOM", &[])).is_ok());
    assert!(r.is_registered("custom"));
    assert_eq!(
        r.get("CUSTOM")
            .map(|b| b.name().to_string())
            .ok()
            .as_deref(),
        Some("CUSTOM")
    );
}

#[test]
fn register_creates_new_names_and_overrides_existing_ones() {
    let mut r = with_builtin();
    assert!(r.register_backend("my_backend", fake("MINE", &[])).is_ok());
    let names = r.names();
    assert_eq!(names.len(), VLLM_BACKEND_NAMES.len() + 2);
    assert_eq!(
        names[names.len() - 3..],
        ["CUSTOM", "CPU_REFERENCE", "MY_BACKEND"]
    );
    assert!(
        r.register_backend("cpu_reference", fake("OVERRIDE", &[]))
            .is_ok()
    );
    assert_eq!(
        r.names().len(),
        VLLM_BACKEND_NAMES.len() + 2,
        "an override creates no new name"
    );
    let b = r.get("CPU_REFERENCE").map(|b| b.name().to_string());
    assert_eq!(b.ok().as_deref(), Some("OVERRIDE"));
    for bad in ["", "1abc", "has-dash", "auto", "AUTO"] {
        let e = err(r.register_backend(bad, fake("X", &[])));
        assert_eq!(e, format!("Invalid or reserved backend name: {bad}"));
    }
}

#[test]
fn names_are_case_insensitive_and_auto_means_automatic() {
    let r = with_builtin();
    assert_eq!(
        r.canonical_name("cpu_reference").ok().as_deref(),
        Some("CPU_REFERENCE")
    );
    for auto in [None, Some("auto"), Some("AUTO"), Some("Auto"), Some("")] {
        assert_eq!(r.parse_choice(auto).ok(), Some(None), "{auto:?}");
    }
    assert_eq!(
        chosen(r.select(Some("Cpu_Reference"), &cfg(64), "cpu", &[])),
        "CPU_REFERENCE"
    );
    assert_eq!(
        chosen(r.select(None, &cfg(64), "cpu", &[])),
        chosen(r.select(Some("auto"), &cfg(64), "cpu", &[]))
    );
}

#[test]
fn unknown_name_lists_valid_options() {
    let r = with_builtin();
    let e = err(r.parse_choice(Some("INVALID")));
    assert!(
        e.starts_with(
            "Unknown attention backend: 'INVALID'. Valid options are: FLASH_ATTN, \
             FLASH_ATTN_DIFFKV, TRITON_ATTN, "
        ),
        "{e}"
    );
    assert!(
        e.ends_with(", CPU_ATTN, CPU_MLA, AMX_MLA, TURBOQUANT, ROCM_OCTAVE, ULTRAQUANT, CUSTOM, CPU_REFERENCE"),
        "{e}"
    );
    assert!(err(r.get("nope")).starts_with("Unknown attention backend: 'nope'"));
}

#[test]
fn explicit_invalid_choice_is_an_error_not_a_fallback() {
    let mut r = with_builtin();
    assert!(
        r.register_backend("ONLY_128", fake("ONLY_128", &[128]))
            .is_ok()
    );
    let e = err(r.select(Some("only_128"), &cfg(64), "cpu", &[]));
    assert_eq!(
        e,
        "Selected backend ONLY_128 is not valid for this configuration. \
         Reason: ['head_size not supported']"
    );
}

#[test]
fn auto_walks_the_priority_list() {
    let mut r = with_builtin();
    assert!(
        r.register_backend("ONLY_128", fake("ONLY_128", &[128]))
            .is_ok()
    );
    let prio = ["ONLY_128".to_string(), "CPU_REFERENCE".to_string()];
    let s = r.select(None, &cfg(64), "cpu", &prio);
    assert_eq!(chosen(s.clone()), "CPU_REFERENCE");
    assert!(s.map(|s| s.reason).unwrap_or_default().contains("priority"));
    assert_eq!(chosen(r.select(None, &cfg(128), "cpu", &prio)), "ONLY_128");
}

#[test]
fn nothing_fits_lists_every_backend_with_reasons() {
    let mut r = AttentionBackendRegistry::new();
    assert!(
        r.register_backend("ONLY_128", fake("ONLY_128", &[128]))
            .is_ok()
    );
    let blocks32: Arc<dyn AttentionBackend> = Arc::new(Fake {
        name: "BLOCK_32",
        heads: vec![64],
        blocks: vec![32],
    });
    assert!(r.register_backend("BLOCK_32", blocks32).is_ok());
    let prio = [
        "ONLY_128".to_string(),
        "BLOCK_32".to_string(),
        "CUSTOM".to_string(),
    ];
    let mut c = cfg(64);
    c.kv_cache_dtype = DType::BF16;
    let e = err(r.select(None, &c, "cpu", &prio));
    assert!(
        e.starts_with(
            "No valid attention backend found for cpu with AttentionSelectorConfig(head_size=64"
        ),
        "{e}"
    );
    assert!(
        e.contains("ONLY_128: ['head_size not supported', 'kv_cache_dtype not supported']"),
        "{e}"
    );
    assert!(
        e.contains("BLOCK_32: ['kv_cache_dtype not supported', 'block_size not supported']"),
        "{e}"
    );
    assert!(
        e.contains("CUSTOM: ['Backend CUSTOM must be registered before use."),
        "{e}"
    );
    // Block size 64 is a multiple of the kernel block size 32.
    c.kv_cache_dtype = DType::F32;
    c.block_size = Some(64);
    assert_eq!(chosen(r.select(None, &c, "cpu", &prio)), "BLOCK_32");
}

#[test]
fn deprecated_env_var_is_an_alias_with_a_warning() {
    assert_eq!(requested_backend(None, None), (None, None));
    let (b, w) = requested_backend(None, Some("CPU_REFERENCE"));
    assert_eq!(b.as_deref(), Some("CPU_REFERENCE"));
    assert!(w.unwrap_or_default().contains("deprecated"));
    let (b, w) = requested_backend(Some("X"), Some("Y"));
    assert_eq!(b.as_deref(), Some("X"));
    assert!(w.is_some());
    assert_eq!(requested_backend(Some("X"), None), (Some("X".into()), None));
}

#[test]
fn every_vllm_name_is_valid_but_a_placeholder_until_registered() {
    let mut r = AttentionBackendRegistry::new();
    assert_eq!(r.names(), VLLM_BACKEND_NAMES);
    for name in ["flash_attn", "FLASHINFER", "cpu_attn", "Custom"] {
        let canonical = name.to_ascii_uppercase();
        assert_eq!(
            r.parse_choice(Some(name)).ok(),
            Some(Some(canonical.clone()))
        );
        assert!(!r.is_registered(name));
        assert!(
            err(r.get(name)).starts_with(&format!("Backend {canonical} must be registered")),
            "{name}"
        );
    }
    // Auto selection never picks a placeholder; filling one keeps its position.
    assert!(err(r.select(None, &cfg(64), "cpu", &[])).starts_with("No valid attention backend"));
    assert!(
        r.register_backend("cpu_attn", fake("CPU_ATTN", &[]))
            .is_ok()
    );
    assert_eq!(r.names(), VLLM_BACKEND_NAMES);
    assert_eq!(chosen(r.select(None, &cfg(64), "cpu", &[])), "CPU_ATTN");
}

#[test]
fn block_size_is_checked_only_when_given() {
    let mut r = AttentionBackendRegistry::new();
    let blocks32: Arc<dyn AttentionBackend> = Arc::new(Fake {
        name: "BLOCK_32",
        heads: Vec::new(),
        blocks: vec![32],
    });
    assert!(r.register_backend("BLOCK_32", blocks32).is_ok());
    let mut c = cfg(64);
    c.block_size = None;
    assert_eq!(
        chosen(r.select(Some("BLOCK_32"), &c, "cpu", &[])),
        "BLOCK_32"
    );
    c.block_size = Some(16);
    assert_eq!(
        err(r.select(Some("BLOCK_32"), &c, "cpu", &[])),
        "Selected backend BLOCK_32 is not valid for this configuration. \
         Reason: ['block_size not supported']"
    );
}
