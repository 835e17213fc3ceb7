//! # trellis-engine — the engine: model runner, engine core, LLM engine, offline API
//!
//! Data flow (DESIGN.md §1):
//!
//! ```text
//! LLM::generate / AsyncLLM ─► LLMEngine::add_request(prompt, SamplingParams)
//!     tokenizer ─► EngineCore::add_request (ids; n children) ─► Scheduler (waiting)
//! LLMEngine::step():
//!     EngineCore::step():  plan = scheduler.schedule()
//!                          out  = runner.execute(&plan)        // one forward, then sampling
//!                          done = scheduler.update_from_output(&plan, &out.sampled)
//!     OutputProcessor:     detokenize incrementally, stop strings, logprobs ─► RequestUpdate
//! ```

pub mod async_llm;
pub mod chat_template;
pub mod config;
pub mod detokenizer;
pub mod engine_core;
pub mod error;
pub mod io_processor;
pub mod llm;
pub mod lora;
pub mod metrics;
pub mod model_runner;
pub mod output_processor;
pub mod outputs;
pub mod platform_setup;
pub mod pooling_params;
pub mod sampler;
pub mod sampling_params;
pub mod structured_output;
pub mod tokenizer;

pub use async_llm::{
    AsyncEngineError, AsyncLLM, EngineStats, GenerateRequest, PoolingRequest, RequestStream,
};
pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError, ChatTemplateOptions};
pub use config::{
    ConvertOption, DEFAULT_MAX_N, DEFAULT_MAX_WAITING_REQUESTS, EngineConfig, KV_CACHE_DTYPES,
    RunnerOption, RunnerType, UsageContext, parse_kv_cache_dtype,
};
pub use engine_core::{EngineCore, EngineCoreRequest, StepOutput};
pub use error::EngineError;
pub use io_processor::select_io_processor;
pub use llm::{LLM, LLMEngine, Prompt, ResolvedConfig};
pub use lora::{ActiveLora, LoraConfig, LoraManager};
pub use metrics::{PrometheusMetrics, StatLoggerManager, StatsCollector};
pub use outputs::{
    CompletionDelta, CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput,
    RequestUpdate, StopReason,
};
pub use platform_setup::{builtin_registries, plugin_registries, with_plugins};
pub use pooling_params::{PoolingParams, PoolingParamsError, PoolingTask};
pub use sampling_params::{SamplingParams, SamplingParamsError};
pub use structured_output::{StructuredOutputBackend, StructuredOutputsParams};
pub use trellis_models::LoraError;
pub use trellis_plugin::Registries;
pub use trellis_plugin::{
    IoPoolingOutput, IoPoolingParams, IoProcessor, IoPrompt, IoResult, Pooler, PoolingType,
};
pub use trellis_plugin::{LoraRequest, LoraResolver, LoraResolverRegistry, ResolveFuture};
pub use trellis_sched::FinishReason;
