//! CPU compute kernels for Trellis, with no dependency on a tensor library.
//!
//! - [`pool`]: the one compute pool of the process. Its threads spin for a few microseconds
//!   between the operations of a step, then park: an idle server uses no CPU, and a busy
//!   neighbour that deschedules a worker does not stall the others (work is handed out item by
//!   item, so whoever runs takes the next item).
//! - [`quant`]: GGUF block formats (Q4_0, Q4_1, Q8_0) repacked once at load into a
//!   column-interleaved layout for int8 dot-product instructions, activations quantized once
//!   per layer input, and GEMM/GEMV micro-kernels chosen at run time (AVX-512 VNNI, AVX2,
//!   scalar). Every output element is reduced block by block in a fixed order with the scalar
//!   reference's float expression, so results are bit-identical across instruction sets and
//!   batch sizes.
//! - [`cpu`]: run-time CPU feature detection.
//! - [`lora`]: LoRA shrink and expand for one token row.
//! - [`peak`]: the measured int8 multiply-add rate of the cores (for benchmark reports).
//! - [`act`]: element-wise activations (SiLU·up) with one polynomial `exp` on every ISA.

pub mod act;
pub mod cpu;
pub mod lora;
pub mod peak;
pub mod pool;
pub mod quant;
