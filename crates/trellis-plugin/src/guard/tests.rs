//! The adapters turn a panic into the method's error (or a reason, or the default answer).
//! Within one binary; the cross-library case is tested against the real `trellis` binary and
//! example plugins (crates/trellis/tests/plugin_examples.rs).

use super::*;
use crate::registries::Registries;

struct NoWeights;

impl crate::weights::WeightSource for NoWeights {
    fn path(&self) -> &std::path::Path {
        std::path::Path::new("/m")
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn contains(&self, _name: &str) -> bool {
        false
    }
    fn tensor(&self, name: &str) -> crate::error::Result<Tensor> {
        Err(ModelError::config(self.path(), name))
    }
    fn matmul(&self, name: &str) -> crate::error::Result<candle_core::quantized::QMatMul> {
        Err(ModelError::config(self.path(), name))
    }
    fn rope_style(&self) -> crate::weights::RopeStyle {
        crate::weights::RopeStyle::HalfSplit
    }
}

struct PanickingModel(ModelConfig);

impl Model for PanickingModel {
    fn config(&self) -> &ModelConfig {
        &self.0
    }

    fn forward(
        &self,
        _input_ids: &[u32],
        _positions: &[usize],
        _ctx: &mut ForwardContext<'_>,
    ) -> candle_core::Result<Tensor> {
        panic!("forward marker")
    }
}

struct PanickingLayer;

impl AttentionImpl for PanickingLayer {
    fn forward(
        &mut self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _m: &AttentionMetadata,
    ) -> candle_core::Result<Tensor> {
        panic!("attention marker")
    }
}

struct PanickingBackend;

impl AttentionBackend for PanickingBackend {
    fn name(&self) -> &str {
        "PANICKY"
    }

    fn supported_dtypes(&self) -> Vec<DType> {
        panic!("dtypes marker")
    }

    fn new_layer(
        &self,
        _spec: &KvCacheSpec,
        _shape: AttentionShape,
        _device: &Device,
    ) -> candle_core::Result<Box<dyn AttentionImpl>> {
        Ok(Box::new(PanickingLayer))
    }
}

fn config() -> ModelConfig {
    ModelConfig {
        architecture: "PanicForCausalLM".into(),
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 4,
        hidden_size: 4,
        vocab_size: 8,
        max_position_embeddings: 16,
    }
}

#[test]
fn model_forward_panic_becomes_its_error() {
    let mut reg = Registries::new();
    let factory: ModelFactory = Arc::new(|_ctx: &ModelLoadContext<'_>| {
        let m: Box<dyn Model> = Box::new(PanickingModel(config()));
        Ok(m)
    });
    GuardingRegistrar::new(&mut reg, "my_plugin").register_model("PanicForCausalLM", factory);
    let factory = reg.models.get("PanicForCausalLM").expect("registered");
    let weights = NoWeights;
    let json = serde_json::json!({});
    let ctx = ModelLoadContext {
        architecture: "PanicForCausalLM",
        config: crate::ModelConfigSource::HfConfig {
            path: std::path::Path::new("/m/config.json"),
            json: &json,
        },
        weights: &weights,
        device: &Device::Cpu,
    };
    let model = factory(&ctx).expect("built");
    assert_eq!(model.config().architecture, "PanicForCausalLM");
    let meta = AttentionMetadata::default();
    let mut layers: Vec<Box<dyn AttentionImpl>> = Vec::new();
    let mut fctx = ForwardContext {
        attn_metadata: &meta,
        attn_layers: &mut layers,
        logits_indices: &[],
        lora: None,
    };
    let err = model
        .forward(&[1], &[0], &mut fctx)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("plugin 'my_plugin' panicked in Model::forward: forward marker"),
        "{err}"
    );
}

#[test]
fn attention_panics_become_errors_and_reasons() {
    let mut reg = Registries::new();
    GuardingRegistrar::new(&mut reg, "attn_plugin")
        .register_attention_backend("PANICKY", Arc::new(PanickingBackend))
        .expect("registered");
    let backend = reg.attention_backends.get("PANICKY").expect("found");
    assert_eq!(backend.name(), "PANICKY");
    // A panicking capability method: the trait's default answer.
    assert_eq!(backend.supported_dtypes(), vec![DType::F32]);
    let spec = KvCacheSpec {
        num_blocks: 1,
        block_size: 1,
        num_kv_heads: 1,
        head_dim: 4,
        dtype: DType::F32,
    };
    let shape = AttentionShape {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
    };
    let mut layer = backend
        .new_layer(&spec, shape, &Device::Cpu)
        .expect("layer");
    let t = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu).expect("tensor");
    let err = layer
        .forward(&t, &t, &t, &AttentionMetadata::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("plugin 'attn_plugin' panicked in AttentionImpl::forward: attention marker"),
        "{err}"
    );
}

struct PanickingPlatform;

impl Platform for PanickingPlatform {
    fn device_name(&self) -> &str {
        "PanicDevice"
    }
    fn device_type(&self) -> &str {
        "panic"
    }
    fn check_and_update_config(&self, _config: &mut PlatformConfig) -> Result<(), PluginError> {
        panic!("config marker")
    }
    fn describe(&self) -> String {
        panic!("describe marker")
    }
}

#[test]
fn platform_panics_become_errors_or_defaults() {
    let p = guard_platform("plat_plugin", Arc::new(PanickingPlatform)).expect("wrapped");
    assert_eq!(p.device_name(), "PanicDevice");
    assert_eq!(p.describe(), "device type panic");
    let mut cfg = PlatformConfig {
        block_size: 16,
        kv_cache_bytes: 0,
        attention_backend: None,
        dtype: DType::F32,
        kv_cache_dtype: DType::F32,
        max_num_seqs: None,
        max_num_batched_tokens: None,
        max_model_len: None,
        quantization: None,
        warnings: Vec::new(),
    };
    let err = p
        .check_and_update_config(&mut cfg)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        "plugin 'plat_plugin' panicked in Platform::check_and_update_config: config marker"
    );
}
