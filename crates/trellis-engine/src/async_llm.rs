//! `AsyncLLM`: the [`LLMEngine`] on its own OS thread, driven through a command channel.
//!
//! ```text
//! tokio tasks ──Command::Add{prompt, params, tx}──► engine thread (one loop):
//!              ──Command::Abort / Stats──────────►    drain commands (block when idle)
//!                                                     drop requests whose stream is gone
//!                                                     step() ─► RequestUpdate per request
//! RequestStream ◄──── tokio mpsc (one per request) ───┘
//! ```
//!
//! Why a thread and not a tokio task: a step is seconds of CPU-bound compute that must not
//! stall the HTTP runtime, and the engine holds non-`Send`-friendly state (the model). The loop
//! blocks on the command channel when there is no work, so an idle server burns no CPU.
//!
//! Dropping a [`RequestStream`] (a client that went away) aborts its request: the stream sends
//! an abort command, and the loop also checks every stream before each step, so the request's
//! KV blocks are freed before the next step runs. A failing step (an error or a panic in the
//! model) fails the requests in flight with an error update and the loop keeps serving.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use trellis_sched::{FinishReason, SchedulerStats};

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::llm::{LLMEngine, Prompt, ResolvedConfig};
use crate::metrics::{LogLevel, PrometheusMetrics, StatLoggerManager, log_line};
use crate::outputs::{CompletionDelta, CompletionOutput, RequestOutput, RequestUpdate};
use crate::pooling_params::PoolingParams;
use crate::sampling_params::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Errors of the asynchronous front end: the engine's own, or the engine thread is gone.
#[derive(Debug, thiserror::Error)]
pub enum AsyncEngineError {
    /// The engine refused the request (bad parameter, prompt too long, ...).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine thread has stopped (shut down, or crashed outside a step).
    #[error("the engine is not running")]
    EngineDead,
}

/// What the engine thread reports about itself (for stat endpoints and leak checks in tests).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// The scheduler's counters.
    pub scheduler: SchedulerStats,
    /// KV blocks in the cache.
    pub num_kv_blocks: usize,
    /// KV blocks owned by requests (not free, not merely cached).
    pub num_owned_blocks: usize,
    /// Requests the model runner holds state for.
    pub num_runner_requests: usize,
    /// Requests the scheduler has not finished.
    pub num_unfinished_requests: usize,
    /// Requests with an open stream in the loop.
    pub num_streams: usize,
    /// Steps that failed so far (errors or panics in the model).
    pub num_failed_steps: u64,
    /// Requests the stats collector still tracks (0 when idle, or when stats are off).
    pub num_stats_requests: usize,
}

/// A request for [`AsyncLLM::generate_with`].
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Unique id (the server uses `cmpl-...`).
    pub request_id: String,
    /// Text or token ids.
    pub prompt: Prompt,
    /// How to sample.
    pub params: SamplingParams,
    /// Lower is served first under the priority policy.
    pub priority: i32,
    /// The LoRA adapter to run with (the server resolves `model` to it); `None`: the base.
    pub lora: Option<trellis_plugin::LoraRequest>,
}

/// A request for [`AsyncLLM::encode_with`]: one prompt to pool.
#[derive(Debug, Clone)]
pub struct PoolingRequest {
    /// Unique id (the server uses `embd-...`).
    pub request_id: String,
    /// Text (truncated to `max_model_len` tokens) or token ids.
    pub prompt: Prompt,
    /// How to pool.
    pub params: PoolingParams,
    /// Lower is served first under the priority policy.
    pub priority: i32,
}

/// A request on its way to the engine loop.
enum Submitted {
    Generate(GenerateRequest),
    Pooling(PoolingRequest),
}

impl Submitted {
    fn request_id(&self) -> &str {
        match self {
            Submitted::Generate(r) => &r.request_id,
            Submitted::Pooling(r) => &r.request_id,
        }
    }
}

enum Command {
    Add {
        request: Box<Submitted>,
        updates: mpsc::UnboundedSender<RequestUpdate>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Abort(String),
    Stats(oneshot::Sender<EngineStats>),
    AddLora {
        lora_int_id: u32,
        adapter: Arc<trellis_models::LoraAdapter>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Shutdown,
}

/// The per-request stream of [`RequestUpdate`]s; the last one has `finished` set. Dropping it
/// before then aborts the request.
pub struct RequestStream {
    request_id: String,
    rx: mpsc::UnboundedReceiver<RequestUpdate>,
    commands: std_mpsc::Sender<Command>,
    finished: bool,
}

impl RequestStream {
    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The next update; `None` after the finished one (or when the engine stopped).
    pub async fn recv(&mut self) -> Option<RequestUpdate> {
        let u = self.rx.recv().await;
        self.note(&u);
        u
    }

    /// [`Self::recv`] for code outside an async runtime.
    pub fn blocking_recv(&mut self) -> Option<RequestUpdate> {
        let u = self.rx.blocking_recv();
        self.note(&u);
        u
    }

    fn note(&mut self, u: &Option<RequestUpdate>) {
        match u {
            Some(u) if u.finished.is_some() || u.pooling.is_some() => self.finished = true,
            None => self.finished = true,
            _ => {}
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Abort(self.request_id.clone()));
        }
    }
}

/// The engine on its own thread; cheap to share behind an `Arc`.
pub struct AsyncLLM {
    commands: std_mpsc::Sender<Command>,
    config: ResolvedConfig,
    tokenizer: Arc<Tokenizer>,
    prometheus: Option<Arc<PrometheusMetrics>>,
    stat_logger_names: Vec<String>,
    lora: Option<LoraFacts>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// False once the engine loop has ended (set before its command channel closes).
    alive: Arc<std::sync::atomic::AtomicBool>,
    next_id: std::sync::atomic::AtomicU64,
}

impl AsyncLLM {
    /// Loads the model on a new engine thread and starts its loop. Blocks while loading (call
    /// it from `spawn_blocking` inside a runtime if that matters).
    /// Plugins are loaded as in [`crate::LLM::new`].
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        Self::with_registries(config, crate::platform_setup::plugin_registries()?)
    }

    /// [`Self::new`] with registries that plugins added to (see
    /// [`LLMEngine::with_registries`]); their stat loggers (`Registries::stat_loggers`) run
    /// before the built-in ones.
    pub fn with_registries(
        config: EngineConfig,
        registries: trellis_plugin::Registries,
    ) -> Result<Self, EngineError> {
        let (cmd_tx, cmd_rx) = std_mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let thread_alive = alive.clone();
        let thread = std::thread::Builder::new()
            .name("trellis-engine".into())
            .spawn(move || {
                let started = LLMEngine::with_registries(config, &registries).and_then(|engine| {
                    let stats = stat_logger_manager(&engine, &registries)?;
                    Ok((engine, stats))
                });
                match started {
                    Ok((mut engine, mut stats)) => {
                        if let Some(s) = stats.as_mut() {
                            engine.enable_stats();
                            s.log_engine_initialized();
                        }
                        let lora = engine.core().runner().lora_manager().map(|m| LoraFacts {
                            specs: Arc::new(m.specs().to_vec()),
                            max_rank: m.config().max_lora_rank,
                        });
                        let facts = Facts {
                            lora,
                            config: engine.config().clone(),
                            tokenizer: engine.tokenizer().clone(),
                            prometheus: stats.as_ref().map(|s| s.prometheus()),
                            stat_logger_names: stats.as_ref().map_or_else(Vec::new, |s| {
                                s.names().into_iter().map(str::to_string).collect()
                            }),
                        };
                        if ready_tx.send(Ok(facts)).is_ok() {
                            EngineLoop::new(engine, stats).run(cmd_rx, &thread_alive);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("cannot start the engine thread: {e}")))?;
        let facts = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                return Err(EngineError::Internal(
                    "the engine thread died while loading".into(),
                ));
            }
        };
        Ok(AsyncLLM {
            commands: cmd_tx,
            config: facts.config,
            tokenizer: facts.tokenizer,
            prometheus: facts.prometheus,
            stat_logger_names: facts.stat_logger_names,
            lora: facts.lora,
            thread: std::sync::Mutex::new(Some(thread)),
            alive,
            next_id: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The resolved configuration (model facts, scheduler limits, `max_model_len`).
    pub fn config(&self) -> &ResolvedConfig {
        &self.config
    }

    /// The tokenizer (shared with the engine thread).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The metrics the Prometheus stat logger records into; `None` when stats are off
    /// (`disable_log_stats` without stat-logger plugins).
    pub fn prometheus_metrics(&self) -> Option<&Arc<PrometheusMetrics>> {
        self.prometheus.as_ref()
    }

    /// The stat loggers in call order: plugins' by name, then `logging` and `prometheus`.
    pub fn stat_logger_names(&self) -> &[String] {
        &self.stat_logger_names
    }

    /// The Prometheus exposition served at `/metrics`: the `vllm:` families (when stats are
    /// on) and the `process_` ones.
    pub fn render_metrics(&self) -> String {
        let mut out = self
            .prometheus
            .as_ref()
            .map(|p| p.render())
            .unwrap_or_default();
        out.push_str(&crate::metrics::render_process_metrics());
        out
    }

    /// The longest sequence (prompt plus output) the engine accepts.
    pub fn max_model_len(&self) -> usize {
        self.config.scheduler.max_model_len
    }

    /// Starts a request with a generated id; updates arrive on the returned stream.
    pub async fn generate(
        &self,
        prompt: Prompt,
        params: SamplingParams,
    ) -> Result<RequestStream, AsyncEngineError> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.generate_with(GenerateRequest {
            request_id: format!("req-{id}"),
            prompt,
            params,
            priority: 0,
            lora: None,
        })
        .await
    }

    /// Whether LoRA is enabled (`--enable-lora`).
    pub fn lora_enabled(&self) -> bool {
        self.lora.is_some()
    }

    /// vLLM's `add_lora`: loads the adapter of `req` (off the engine thread) and puts it in
    /// the engine's CPU cache as `req.lora_int_id`, replacing a cached adapter of that id (a
    /// reload in place: requests already running keep the weights they started with).
    pub async fn add_lora(&self, req: &trellis_plugin::LoraRequest) -> Result<(), EngineError> {
        let Some(lora) = &self.lora else {
            return Err(EngineError::LoraNotEnabled(format!(
                "Got lora_request {} but LoRA is not enabled!",
                req.lora_name
            )));
        };
        let (specs, max_rank) = (lora.specs.clone(), lora.max_rank);
        let path = std::path::PathBuf::from(&req.lora_path);
        let adapter = tokio::task::spawn_blocking(move || {
            crate::lora::LoraManager::load_adapter(&specs, max_rank, &path)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("adapter loading panicked: {e}")))??;
        let (reply_tx, reply_rx) = oneshot::channel();
        let dead = || EngineError::Internal("the engine is not running".into());
        self.commands
            .send(Command::AddLora {
                lora_int_id: req.lora_int_id,
                adapter: Arc::new(adapter),
                reply: reply_tx,
            })
            .map_err(|_| dead())?;
        reply_rx.await.map_err(|_| dead())?
    }

    /// Starts a request; validation errors (parameters, context length) come back here.
    pub async fn generate_with(
        &self,
        request: GenerateRequest,
    ) -> Result<RequestStream, AsyncEngineError> {
        self.submit(Submitted::Generate(request)).await
    }

    /// Starts a pooling request; its one update carries [`RequestUpdate::pooling`] (or, when
    /// the step failed, a finished output with the error). Validation errors come back here.
    pub async fn encode_with(
        &self,
        request: PoolingRequest,
    ) -> Result<RequestStream, AsyncEngineError> {
        self.submit(Submitted::Pooling(request)).await
    }

    async fn submit(&self, request: Submitted) -> Result<RequestStream, AsyncEngineError> {
        let request_id = request.request_id().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply_tx, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Add {
                request: Box::new(request),
                updates: tx,
                reply: reply_tx,
            })
            .map_err(|_| AsyncEngineError::EngineDead)?;
        reply_rx.await.map_err(|_| AsyncEngineError::EngineDead)??;
        Ok(RequestStream {
            request_id,
            rx,
            commands: self.commands.clone(),
            finished: false,
        })
    }

    /// Aborts a request (a no-op for unknown or finished ones).
    pub fn abort(&self, request_id: &str) -> Result<(), AsyncEngineError> {
        self.commands
            .send(Command::Abort(request_id.to_string()))
            .map_err(|_| AsyncEngineError::EngineDead)
    }

    /// Asks the engine thread for its counters; answered between steps.
    pub async fn stats(&self) -> Result<EngineStats, AsyncEngineError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Stats(tx))
            .map_err(|_| AsyncEngineError::EngineDead)?;
        rx.await.map_err(|_| AsyncEngineError::EngineDead)
    }

    /// True while the engine thread runs.
    pub fn is_alive(&self) -> bool {
        match self.thread.lock() {
            Ok(t) => {
                self.alive.load(std::sync::atomic::Ordering::SeqCst)
                    && t.as_ref().is_some_and(|h| !h.is_finished())
            }
            Err(_) => false,
        }
    }

    /// Stops the engine thread: requests in flight are aborted (their streams end) and the
    /// thread is joined.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
        let handle = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(_) => None,
        };
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for AsyncLLM {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the engine thread reports once the engine is built.
/// What adapter loading off the engine thread needs: the model's LoRA modules and the rank
/// limit.
struct LoraFacts {
    specs: Arc<Vec<trellis_plugin::LoraModuleSpec>>,
    max_rank: usize,
}

struct Facts {
    lora: Option<LoraFacts>,
    config: ResolvedConfig,
    tokenizer: Arc<Tokenizer>,
    prometheus: Option<Arc<PrometheusMetrics>>,
    stat_logger_names: Vec<String>,
}

/// The stat loggers of a serving engine (vLLM's `StatLoggerManager` assembly, spec §7.2):
/// none when stats are disabled and no plugin brought one.
fn stat_logger_manager(
    engine: &LLMEngine,
    registries: &trellis_plugin::Registries,
) -> Result<Option<StatLoggerManager>, EngineError> {
    let rc = engine.config();
    let custom = &registries.stat_loggers;
    let disabled = rc.engine.disable_log_stats;
    if disabled && custom.is_empty() {
        return Ok(None);
    }
    if disabled {
        log_line(
            LogLevel::Info,
            "async_llm.rs",
            line!(),
            "AsyncLLM created with log_stats=False, but custom stat loggers were found; \
             enabling logging without default stat loggers.",
        );
    }
    let model = rc.engine.model.display().to_string();
    let config = trellis_plugin::StatLoggerConfig {
        served_model_name: rc
            .engine
            .served_model_name
            .clone()
            .unwrap_or_else(|| model.clone()),
        model,
        max_model_len: rc.scheduler.max_model_len,
        block_size: rc.scheduler.block_size,
        num_gpu_blocks: rc.scheduler.num_blocks,
        cache_dtype: "auto".into(),
        enable_prefix_caching: rc.scheduler.enable_prefix_caching,
        max_num_seqs: rc.scheduler.max_num_seqs,
        max_num_batched_tokens: rc.scheduler.max_num_batched_tokens,
        device_type: rc.device_type.clone(),
        log_stats_interval: trellis_plugin::stats::log_stats_interval(),
    };
    StatLoggerManager::new(&config, 0, custom, !disabled).map(Some)
}

struct Stream {
    updates: mpsc::UnboundedSender<RequestUpdate>,
    n: usize,
}

/// The stat loggers and when they last logged.
struct StatsState {
    manager: StatLoggerManager,
    interval: Duration,
    last_log: Instant,
    /// Something changed since the last record (a step ran, a request was aborted).
    dirty: bool,
}

/// Steps that fail one after another (no step in between succeeding) before the engine is
/// considered dead: its thread ends, `is_alive` turns false (`/health` answers 503) and
/// `trellis serve` exits non-zero so that a supervisor restarts it (vLLM's dead engine). One
/// failing step only fails the requests in it.
pub const MAX_CONSECUTIVE_FAILED_STEPS: u64 = 3;

/// Test-only fault injection: with this environment variable set to `1`, every step of the
/// serving engine fails (tests of the dead-engine behaviour).
pub const FAULT_INJECTION_ENV: &str = "TRELLIS_TEST_FAIL_EVERY_STEP";

/// The loop on the engine thread.
struct EngineLoop {
    engine: LLMEngine,
    streams: HashMap<String, Stream>,
    failed_steps: u64,
    /// Failed steps since the last one that succeeded.
    consecutive_failed_steps: u64,
    /// [`FAULT_INJECTION_ENV`] is set.
    inject_faults: bool,
    stats: Option<StatsState>,
}

impl EngineLoop {
    fn new(engine: LLMEngine, manager: Option<StatLoggerManager>) -> Self {
        let interval = Duration::from_secs_f64(trellis_plugin::stats::log_stats_interval());
        EngineLoop {
            engine,
            streams: HashMap::new(),
            failed_steps: 0,
            consecutive_failed_steps: 0,
            inject_faults: std::env::var(FAULT_INJECTION_ENV).is_ok_and(|v| v == "1"),
            stats: manager.map(|manager| StatsState {
                manager,
                interval,
                last_log: Instant::now(),
                dirty: false,
            }),
        }
    }

    /// Waits for a command while idle; with stat loggers, wakes up in time to log.
    fn wait(&mut self, commands: &std_mpsc::Receiver<Command>) -> Result<Option<Command>, ()> {
        let Some(s) = self.stats.as_ref() else {
            return commands.recv().map(Some).map_err(|_| ());
        };
        let wait = s.interval.saturating_sub(s.last_log.elapsed());
        match commands.recv_timeout(wait) {
            Ok(cmd) => Ok(Some(cmd)),
            Err(std_mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(()),
        }
    }

    /// Hands what changed since the last record to the stat loggers.
    fn record_stats(&mut self) {
        let Some(s) = self.stats.as_mut() else {
            return;
        };
        if s.dirty {
            s.dirty = false;
            let manager = &mut s.manager;
            self.engine
                .record_stats(|sched, it| manager.record(Some(sched), Some(it)));
        }
    }

    /// Records what changed since the last record, and logs when the interval is over.
    fn stats_tick(&mut self) {
        self.record_stats();
        let Some(s) = self.stats.as_mut() else {
            return;
        };
        if s.last_log.elapsed() >= s.interval {
            s.last_log = Instant::now();
            s.manager.log();
        }
    }

    fn mark_dirty(&mut self) {
        if let Some(s) = self.stats.as_mut() {
            s.dirty = true;
        }
    }

    /// Runs until shutdown or death; `alive` turns false before the command channel closes,
    /// so whoever sees a request refused as `EngineDead` also sees [`AsyncLLM::is_alive`] false.
    fn run(self, commands: std_mpsc::Receiver<Command>, alive: &std::sync::atomic::AtomicBool) {
        self.run_loop(&commands);
        alive.store(false, std::sync::atomic::Ordering::SeqCst);
        drop(commands);
    }

    fn run_loop(mut self, commands: &std_mpsc::Receiver<Command>) {
        loop {
            if self.streams.is_empty() {
                match self.wait(commands) {
                    Ok(Some(cmd)) => {
                        if !self.handle(cmd) {
                            return self.stop();
                        }
                    }
                    Ok(None) => {}
                    Err(()) => return self.stop(),
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return self.stop();
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            let gone: Vec<String> = self
                .streams
                .iter()
                .filter(|(_, s)| s.updates.is_closed())
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                self.abort(&id);
            }
            if !self.streams.is_empty() {
                self.step();
                if self.consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS {
                    eprintln!(
                        "ERROR trellis engine: {} steps failed in a row; the engine is dead",
                        self.consecutive_failed_steps
                    );
                    return self.stop();
                }
            }
            self.stats_tick();
        }
    }

    /// Handles one command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Add {
                request,
                updates,
                reply,
            } => {
                let result = self.add(*request, updates);
                if result.is_err() {
                    // A refusal is counted in /metrics before the client hears of it.
                    self.mark_dirty();
                    self.record_stats();
                }
                let _ = reply.send(result);
            }
            Command::Abort(id) => self.abort(&id),
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::AddLora {
                lora_int_id,
                adapter,
                reply,
            } => {
                let result = self.engine.insert_lora(lora_int_id, adapter);
                let _ = reply.send(result);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn add(
        &mut self,
        r: Submitted,
        updates: mpsc::UnboundedSender<RequestUpdate>,
    ) -> Result<(), EngineError> {
        let id = r.request_id().to_string();
        if self.streams.contains_key(&id) {
            return Err(EngineError::Config(format!(
                "request id {id} is already in use"
            )));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let n = match r {
            Submitted::Generate(r) => {
                let n = r.params.n;
                self.engine
                    .add_request_lora(&id, r.prompt, r.params, (r.priority, now), r.lora)?;
                n
            }
            Submitted::Pooling(r) => {
                self.engine
                    .add_pooling_request(&id, r.prompt, r.params, r.priority, now)?;
                1
            }
        };
        self.streams.insert(id, Stream { updates, n });
        Ok(())
    }

    fn abort(&mut self, id: &str) {
        if self.streams.remove(id).is_some() {
            self.engine.abort(id);
            self.mark_dirty();
        }
    }

    fn stats(&self) -> EngineStats {
        let core = self.engine.core();
        let pool = core.scheduler().kv_cache_manager().pool();
        EngineStats {
            scheduler: core.stats(),
            num_kv_blocks: pool.num_blocks(),
            num_owned_blocks: pool.num_blocks() - pool.num_free_blocks(),
            num_runner_requests: core.runner().num_requests(),
            num_unfinished_requests: core.scheduler().num_unfinished_requests(),
            num_streams: self.streams.len(),
            num_failed_steps: self.failed_steps,
            num_stats_requests: self
                .engine
                .stats_collector()
                .map_or(0, |c| c.num_requests()),
        }
    }

    fn step(&mut self) {
        if self.inject_faults {
            return self.fail_all(&format!("{FAULT_INJECTION_ENV} is set"));
        }
        let result = catch_unwind(AssertUnwindSafe(|| self.engine.step()));
        let updates = match result {
            Ok(Ok(updates)) => updates,
            Ok(Err(e)) => return self.fail_all(&e.to_string()),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                return self.fail_all(&format!("the engine step panicked: {msg}"));
            }
        };
        self.consecutive_failed_steps = 0;
        // Record before the outputs go out, so that a client that got its last token
        // already sees it counted in /metrics.
        self.mark_dirty();
        self.record_stats();
        for u in updates {
            let id = u.request_id.clone();
            let finished = u.finished.is_some() || u.pooling.is_some();
            let delivered = self
                .streams
                .get(&id)
                .is_some_and(|s| s.updates.send(u).is_ok());
            if finished {
                self.streams.remove(&id);
            } else if !delivered {
                self.abort(&id);
            }
        }
    }

    /// Fails every request in flight with `message`, frees them, and keeps the loop alive.
    fn fail_all(&mut self, message: &str) {
        self.failed_steps += 1;
        self.consecutive_failed_steps += 1;
        self.mark_dirty();
        eprintln!(
            "trellis engine: step failed, failing {} request(s): {message}",
            self.streams.len()
        );
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for id in ids {
            self.engine.abort_with(&id, FinishReason::Error);
            let Some(s) = self.streams.remove(&id) else {
                continue;
            };
            let _ = s.updates.send(error_update(&id, s.n, message));
        }
    }

    fn stop(mut self) {
        let ids: Vec<String> = self.streams.keys().cloned().collect();
        for id in ids {
            self.abort(&id);
        }
    }
}

/// The final update of a request that failed.
fn error_update(request_id: &str, n: usize, message: &str) -> RequestUpdate {
    let outputs: Vec<CompletionOutput> = (0..n)
        .map(|index| CompletionOutput {
            index,
            finish_reason: Some(FinishReason::Error),
            ..Default::default()
        })
        .collect();
    RequestUpdate {
        request_id: request_id.to_string(),
        deltas: (0..n)
            .map(|index| CompletionDelta {
                index,
                finish_reason: Some(FinishReason::Error),
                ..Default::default()
            })
            .collect(),
        prompt_logprobs: None,
        finished: Some(RequestOutput {
            request_id: request_id.to_string(),
            outputs,
            finished: true,
            error: Some(message.to_string()),
            ..Default::default()
        }),
        pooling: None,
    }
}
