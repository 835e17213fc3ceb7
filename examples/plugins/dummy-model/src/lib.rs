//! An out-of-tree model architecture (vLLM's `vllm_add_dummy_model`): `MyLlamaForCausalLM`
//! is the host's `LlamaForCausalLM` whose logits always favour token id 0.
//!
//! It registers through the registrar it is handed, wrapping the factory the host already has
//! (vLLM's dummy model subclasses a built-in class the same way).
//!
//! With `DUMMY_MODEL_PANIC_TOKEN=ID` set, `forward` panics on a batch that contains the token
//! id ID: the tests use it to check that a plugin panic fails that step's requests and
//! nothing else.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use trellis_plugin::{
    ForwardContext, Model, ModelConfig, ModelError, ModelFactory, RegisterResult, Registrar,
};

/// The architecture name this plugin adds.
pub const ARCHITECTURE: &str = "MyLlamaForCausalLM";

/// The GGUF `general.architecture` value it maps to [`ARCHITECTURE`].
pub const GGUF_ARCHITECTURE: &str = "dummy";

struct AlwaysZero {
    inner: Box<dyn Model>,
    config: ModelConfig,
    panic_token: Option<u32>,
}

impl Model for AlwaysZero {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(
        &self,
        input_ids: &[u32],
        positions: &[usize],
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        if let Some(t) = self.panic_token
            && input_ids.contains(&t)
        {
            panic!("DUMMY_MODEL_PANIC_TOKEN: the batch contains token {t}");
        }
        // Run the real model (it fills the KV cache), then replace its logits: 1 for token 0,
        // 0 elsewhere.
        let logits = self.inner.forward(input_ids, positions, ctx)?;
        let (rows, vocab) = logits.dims2()?;
        let mut data = vec![0f32; rows * vocab];
        for row in data.chunks_mut(vocab.max(1)) {
            row[0] = 1.0;
        }
        Tensor::from_vec(data, (rows, vocab), logits.device())
    }
}

/// The general-plugin entry: registers `MyLlamaForCausalLM` unless it is already there.
///
/// Setting `DUMMY_MODEL_FAIL` makes it fail instead (`DUMMY_MODEL_FAIL=panic`: panic): the
/// tests use it to check that a failing plugin stops startup with its name.
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    if std::env::var_os("DUMMY_MODEL_FAIL").is_some_and(|v| v == "panic") {
        panic!("DUMMY_MODEL_FAIL=panic");
    }
    if std::env::var_os("DUMMY_MODEL_FAIL").is_some() {
        return Err("DUMMY_MODEL_FAIL is set".into());
    }
    if registrar.model_factory(ARCHITECTURE).is_some() {
        return Ok(());
    }
    let llama = registrar
        .model_factory("LlamaForCausalLM")
        .ok_or("the host has no LlamaForCausalLM to wrap")?;
    let factory: ModelFactory = Arc::new(move |ctx| {
        let inner = llama(ctx)?;
        let mut config = inner.config().clone();
        config.architecture = ARCHITECTURE.to_string();
        let panic_token = std::env::var("DUMMY_MODEL_PANIC_TOKEN")
            .ok()
            .and_then(|v| v.parse().ok());
        let model: Box<dyn Model> = Box::new(AlwaysZero {
            inner,
            config,
            panic_token,
        });
        Ok::<_, ModelError>(model)
    });
    registrar.register_model(ARCHITECTURE, factory);
    // GGUF files whose `general.architecture` is `dummy` (with llama's metadata) load as it.
    registrar.register_gguf_architecture(GGUF_ARCHITECTURE, ARCHITECTURE);
    Ok(())
}

trellis_plugin::declare_plugin! {
    general "register_dummy_model" => register,
}
