//! The engine built from registries that "plugins" added to (spec §2.6, §3.6, §4.5 where
//! they apply): an out-of-tree platform wins and chooses its backend, a new attention backend
//! is chosen by name and matches the built-in choice, CPU_ATTN (vLLM's name) is the CPU's
//! default and the only one for 16-bit KV caches, unknown or unfit choices fail with vLLM's
//! texts, and a lazily registered model factory runs only when its architecture is loaded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Result as CResult};
use trellis_engine::{
    EngineConfig, LLM, LLMEngine, Registries, SamplingParams, builtin_registries,
};
use trellis_plugin::{
    AttentionBackend, AttentionImpl, AttentionShape, KvCacheSpec, ModelFactory, Platform,
};

fn config() -> EngineConfig {
    let mut c = EngineConfig::new(common::model_path());
    c.max_model_len = Some(256);
    c.num_kv_blocks = Some(32);
    c
}

/// A backend under a new name that delegates to CPU_REFERENCE.
struct Renamed;

impl AttentionBackend for Renamed {
    fn name(&self) -> &str {
        "MY_ATTN"
    }
    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> CResult<Box<dyn AttentionImpl>> {
        trellis_cpu::cpu_reference_backend().new_layer(spec, shape, device)
    }
}

/// A backend that supports only head size 128 (the model's is 64).
struct Only128;

impl AttentionBackend for Only128 {
    fn name(&self) -> &str {
        "ONLY_128"
    }
    fn supported_head_sizes(&self) -> Vec<usize> {
        vec![128]
    }
    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> CResult<Box<dyn AttentionImpl>> {
        trellis_cpu::cpu_reference_backend().new_layer(spec, shape, device)
    }
}

/// A backend whose kernels need blocks of a multiple of 32 tokens.
struct Block32;

impl AttentionBackend for Block32 {
    fn name(&self) -> &str {
        "BLOCK_32"
    }
    fn supported_block_sizes(&self) -> Vec<usize> {
        vec![32]
    }
    fn new_layer(
        &self,
        spec: &KvCacheSpec,
        shape: AttentionShape,
        device: &Device,
    ) -> CResult<Box<dyn AttentionImpl>> {
        trellis_cpu::cpu_reference_backend().new_layer(spec, shape, device)
    }
}

/// Spec §3.3: the block size reaches the backend's validation only when the user chose it.
#[test]
fn block_size_is_validated_only_when_the_user_set_it() {
    let mut regs = builtin_registries();
    regs.register_attention_backend("BLOCK_32", Arc::new(Block32))
        .expect("registers");
    let mut c = config();
    c.attention_backend = Some("BLOCK_32".into());
    // The default block size (16) is not the user's: not checked.
    let engine = LLMEngine::with_registries(c.clone(), &regs).expect("loads");
    assert_eq!(engine.config().attention_backend, "BLOCK_32");
    c.block_size_from_user = true;
    assert_eq!(
        engine_err(c.clone(), &regs),
        "Selected backend BLOCK_32 is not valid for this configuration. \
         Reason: ['block_size not supported']"
    );
    c.block_size = 64;
    let engine = LLMEngine::with_registries(c, &regs).expect("loads");
    assert_eq!(engine.config().attention_backend, "BLOCK_32");
}

/// vLLM's dummy platform: its own device name, and its own attention backend first.
struct DummyPlatform;

impl Platform for DummyPlatform {
    fn device_name(&self) -> &str {
        "DummyDevice"
    }
    fn device_type(&self) -> &str {
        "privateuseone"
    }
    fn attention_backend_priority(&self) -> Vec<String> {
        vec!["MY_ATTN".into(), "CPU_REFERENCE".into()]
    }
}

fn greedy_tokens(llm: &mut LLM) -> Vec<u32> {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(5)
    };
    let out = llm
        .generate(&["The capital of France is"], &params)
        .expect("generates");
    out[0].outputs[0].token_ids.clone()
}

fn engine_err(config: EngineConfig, regs: &Registries) -> String {
    match LLMEngine::with_registries(config, regs) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn builtins_run_on_cpu_with_cpu_attn() {
    let engine = LLMEngine::with_registries(config(), &builtin_registries()).expect("loads");
    assert_eq!(engine.config().platform, "cpu");
    assert_eq!(engine.config().attention_backend, "CPU_ATTN");
}

#[test]
fn cpu_attn_by_vllm_name_and_16_bit_kv_caches() {
    let regs = builtin_registries();
    let mut c = config();
    c.attention_backend = Some("CPU_ATTN".into());
    let mut llm = LLM::with_registries(c, &regs).expect("loads");
    assert_eq!(llm.engine().config().attention_backend, "CPU_ATTN");
    let f32_tokens = greedy_tokens(&mut llm);

    // float16: CPU_REFERENCE stores only f32, so auto picks CPU_ATTN; by name it is refused.
    let mut c = config();
    c.kv_cache_dtype = Some(candle_core::DType::F16);
    let mut llm = LLM::with_registries(c.clone(), &regs).expect("loads");
    assert_eq!(llm.engine().config().attention_backend, "CPU_ATTN");
    assert_eq!(greedy_tokens(&mut llm).len(), f32_tokens.len());
    c.attention_backend = Some("CPU_REFERENCE".into());
    assert!(engine_err(c, &regs).contains("kv_cache_dtype not supported"));

    // Memory accounting: a 16-bit cache fits twice the blocks of an f32 one.
    let blocks = |dtype| {
        let mut c = config();
        c.num_kv_blocks = None;
        c.kv_cache_memory = Some(8 << 20);
        c.kv_cache_dtype = dtype;
        let engine = LLMEngine::with_registries(c, &regs).expect("loads");
        engine.config().scheduler.num_blocks
    };
    let (f32_blocks, bf16_blocks) = (
        blocks(Some(candle_core::DType::F32)),
        blocks(Some(candle_core::DType::BF16)),
    );
    assert!(f32_blocks > 0);
    assert_eq!(bf16_blocks, 2 * f32_blocks);
    // `auto` on CPU_ATTN (the CPU default) is an f16 cache.
    assert_eq!(blocks(None), bf16_blocks);
}

#[test]
fn new_backend_chosen_by_name_matches_cpu_reference_and_oot_platform_wins() {
    let mut regs = builtin_registries();
    regs.register_attention_backend("my_attn", Arc::new(Renamed))
        .expect("registers");
    let mut reference = config();
    reference.attention_backend = Some("CPU_REFERENCE".into());
    let want = greedy_tokens(&mut LLM::with_registries(reference, &regs).expect("loads"));

    let mut c = config();
    c.attention_backend = Some("My_Attn".into());
    let mut llm = LLM::with_registries(c, &regs).expect("loads");
    assert_eq!(llm.engine().config().attention_backend, "MY_ATTN");
    assert_eq!(greedy_tokens(&mut llm), want);

    // An activated out-of-tree platform wins over the CPU and picks its own backend.
    regs.register_platform("dummy_platform_plugin", Arc::new(DummyPlatform));
    let engine = LLMEngine::with_registries(config(), &regs).expect("loads");
    assert_eq!(engine.config().platform, "DummyDevice");
    assert_eq!(engine.config().attention_backend, "MY_ATTN");

    regs.register_platform("second_platform", Arc::new(DummyPlatform));
    assert_eq!(
        engine_err(config(), &regs),
        "Only one platform plugin can be activated, but got: \
         ['dummy_platform_plugin', 'second_platform']"
    );
}

#[test]
fn unknown_custom_and_unfit_choices_fail_with_vllm_texts() {
    let mut regs = builtin_registries();
    regs.register_attention_backend("ONLY_128", Arc::new(Only128))
        .expect("registers");
    let with = |name: &str| {
        let mut c = config();
        c.attention_backend = Some(name.into());
        c
    };
    let e = engine_err(with("INVALID"), &regs);
    assert!(
        e.starts_with("Unknown attention backend: 'INVALID'. Valid options are: FLASH_ATTN, "),
        "{e}"
    );
    assert!(e.ends_with(", CUSTOM, CPU_REFERENCE, ONLY_128"), "{e}");
    // The CPU platform (spec §2.4): a vLLM name without an implementation here, or CUSTOM
    // unregistered, is ignored (INFO "Cannot use X backend on CPU.") and CPU_ATTN is used.
    for name in ["FLASH_ATTN", "flashinfer", "custom"] {
        let engine = LLMEngine::with_registries(with(name), &regs).expect("loads");
        assert_eq!(engine.config().attention_backend, "CPU_ATTN", "{name}");
    }
    assert_eq!(
        engine_err(with("only_128"), &regs),
        "Selected backend ONLY_128 is not valid for this configuration. \
         Reason: ['head_size not supported']"
    );
    // `auto` on the CPU never picks it: CPU_ATTN heads the CPU's priority list.
    let engine = LLMEngine::with_registries(with("AUTO"), &regs).expect("loads");
    assert_eq!(engine.config().attention_backend, "CPU_ATTN");
}

#[test]
fn lazy_model_factory_runs_only_when_its_architecture_is_loaded() {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    static BUILT: AtomicUsize = AtomicUsize::new(0);
    let builtin = builtin_registries()
        .models
        .get("LlamaForCausalLM")
        .expect("llama is built in");
    let mut regs = builtin_registries();
    // Wraps the built-in (as vLLM's dummy model subclasses the Llama class).
    regs.register_model_lazy("LlamaForCausalLM", move || {
        MADE.fetch_add(1, Ordering::SeqCst);
        let inner = builtin.clone();
        let f: ModelFactory = Arc::new(move |ctx| {
            BUILT.fetch_add(1, Ordering::SeqCst);
            inner(ctx)
        });
        f
    });
    regs.register_model_lazy("NeverLoadedForCausalLM", || panic!("must not run"));
    assert!(
        regs.models
            .supported_archs()
            .contains(&"NeverLoadedForCausalLM".to_string())
    );
    assert_eq!(MADE.load(Ordering::SeqCst), 0);
    LLMEngine::with_registries(config(), &regs).expect("loads");
    assert_eq!(MADE.load(Ordering::SeqCst), 1);
    assert_eq!(BUILT.load(Ordering::SeqCst), 1);
}
