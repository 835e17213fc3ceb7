//! # trellis-plugin — the API a Trellis plugin is written against
//!
//! Small on purpose (candle-core and nothing heavy): a plugin author depends on this crate
//! alone. It holds the extension-point traits — [`AttentionBackend`], [`Model`] — and the
//! types that cross them.

pub mod attention;
pub mod model;

pub use attention::{
    AttentionBackend, AttentionImpl, AttentionMetadata, AttentionShape, KvCacheSpec,
    SeqAttentionMetadata,
};
pub use model::{ForwardContext, Model, ModelConfig};
