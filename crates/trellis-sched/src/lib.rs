//! # trellis-sched — who runs next, and on which KV-cache slots
//!
//! Pure bookkeeping: token ids in, a step plan out. No tensors, no model, no threads; this
//! crate is tested on its own and fast. It follows vLLM V1's scheduler:
//!
//! ```text
//! engine ──add_request(NewRequest)──► Scheduler ── waiting queue
//!                                       │
//!   each step:  schedule() ─► SchedulerOutput { per request: token ids, positions,
//!                                              block table, slot mapping, samples? }
//!               (model runner computes, samples) ─► ModelRunnerOutput
//!               update_from_output(&plan, out) ─► Vec<EngineCoreOutput> (tokens, finish reason)
//! ```
//!
//! - [`Request`]: prompt and output ids, `num_computed_tokens`, stop conditions by id, status.
//! - [`BlockPool`]: fixed blocks with reference counts, an LRU free queue and the prefix-cache
//!   map of full-block hashes ([`BlockHash`] = parent hash + token ids + LoRA id + extra key).
//! - [`KvCacheManager`]: per-request block tables, prefix lookups, slot allocation.
//! - [`Scheduler`]: the step policy — running requests first, then waiting ones; chunked
//!   prefill under a token budget; preemption of the newest running request when blocks run out.
//!
//! Invariants, checked by the randomized simulation in `tests/`: no block is both free and
//! owned; reference counts equal the number of block tables listing a block; every step stays
//! within `max_num_batched_tokens` and `max_num_seqs`; a cached block only ever holds the
//! tokens its hash names.

mod block_pool;
mod error;
mod kv_cache_manager;
pub mod lora_admission;
mod request;
mod scheduler;

pub use block_pool::{BlockHash, BlockId, BlockPool};
pub use error::SchedError;
pub use kv_cache_manager::{KvCacheManager, PrefixCacheStats};
pub use request::{
    FinishReason, NewRequest, Request, RequestId, RequestStatus, StopConditions, TokenId,
};
pub use scheduler::{
    EngineCoreOutput, ModelRunnerOutput, ScheduledRequest, Scheduler, SchedulerConfig,
    SchedulerOutput, SchedulerStats, SchedulingPolicy,
};
