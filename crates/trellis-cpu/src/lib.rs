//! # trellis-cpu — the CPU platform and its attention backends
//!
//! [`CpuPlatform`] is the built-in platform (always available): it detects ISA features,
//! cores and memory, and prefers `CPU_ATTN`, then `CPU_REFERENCE`.
//!
//! [`CpuAttnBackend`] (`CPU_ATTN`, vLLM's name for its CPU backend) is the fast one: K/V read
//! in place from `[num_blocks, num_kv_heads, block_size, head_dim]` blocks in f32, f16 or
//! bf16, online softmax with the query heads of a GQA group sharing every K/V row, SIMD kernels
//! chosen at run time, items spread over the compute pool (see [`cpu_attn`]).
//!
//! [`CpuReferenceBackend`] (`CPU_REFERENCE`) is the simple, obviously correct paged attention
//! that faster backends are checked against. Its KV cache is two plain `Vec<f32>` per layer
//! (`[num_blocks * block_size, num_kv_heads, head_dim]`, slot-major) and its forward is the
//! textbook algorithm: write the step's keys and values into their slots, then, for every
//! new token, a softmax over its own sequence's cached keys gathered through the block table.

pub mod cpu_attn;
pub mod platform;
pub mod reference;

pub use cpu_attn::{CPU_ATTN, CpuAttnAttention, CpuAttnBackend, cpu_attn_backend};
pub use platform::{
    CPU_PLATFORM_NAME, CpuFeatures, CpuPlatform, cpu_platform, register_cpu_attention_backends,
};
pub use reference::{CpuReferenceAttention, CpuReferenceBackend, cpu_reference_backend};
