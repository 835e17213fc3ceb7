//! # trellis-models — architectures, shared layers and weight loaders
//!
//! Data flow of one step: the engine calls
//! [`Model::forward_hidden_states`](trellis_plugin::Model::forward_hidden_states) with the
//! flattened batch; the model embeds the tokens, computes the step's rotary tables once, and
//! runs its decoder layers, each of which projects q/k/v ([`layers::Attention`]) and hands them
//! to the paged attention backend in the `ForwardContext`, then the final norm. The LM head
//! ([`Model::compute_logits`](trellis_plugin::Model::compute_logits)) runs on the rows that are
//! sampled only; a pooling model's [`Pooler`](trellis_plugin::Pooler) reads the hidden states.
//!
//! Loading: [`load_model`] (or [`load_model_with`] and a [`ModelRegistry`] that plugins added
//! to) tells a GGUF file from a Hugging Face
//! directory, reads the architecture (`general.architecture` or config.json `architectures`),
//! and calls the registered factory with a [`WeightSource`] that serves tensors by their
//! Hugging Face names. Model files never know the weight format; the source decides the
//! RoPE variant that matches its q/k row order.
//!
//! Every loading failure is a [`ModelError`] naming the file and the problem on one line.

pub mod bert;
pub mod error;
pub mod gguf;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod qwen2;
pub mod registry;
pub mod weights;

pub use error::ModelError;
pub use gguf::GgufSource;
pub use lora::{LoraAdapter, LoraError};
pub use registry::{
    LazyModelFactory, LoadedModel, ModelConfigSource, ModelFactory, ModelLoadContext,
    ModelRegistry, WeightFormat, builtin_model_registry, load_model, load_model_with,
    register_builtin_models,
};
pub use weights::{SafetensorsSource, WeightSource};
