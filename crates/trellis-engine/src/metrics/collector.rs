//! `StatsCollector`: turns what the engine does step by step into [`IterationStats`] and
//! [`SchedulerStats`] (vLLM's `IterationStats.update_from_output` / `update_from_events` /
//! `update_from_finished_request`, and the scheduler's `make_stats`).
//!
//! Per request it keeps the timestamps vLLM keeps (`RequestStateStats`): arrival (wall
//! clock), queued, first scheduled, first and last token (monotonic). One [`IterationStats`]
//! is reused step after step, so collecting allocates nothing per token.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use trellis_plugin::stats::{
    FinishReason, FinishedRequestStats, IterationStats, PrefixCacheStats, SchedulerStats,
};
use trellis_sched::{Scheduler, SchedulerOutput};

use crate::engine_core::StepOutput;

/// Seconds since the Unix epoch.
pub(crate) fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone)]
struct RequestStateStats {
    arrival_time: f64,
    prompt_len: usize,
    max_tokens: Option<usize>,
    queued_ts: f64,
    scheduled_ts: f64,
    first_token_ts: f64,
    last_token_ts: f64,
    num_generation_tokens: usize,
    num_cached_tokens: usize,
    is_prefilling: bool,
}

/// Collects the stats of one engine.
#[derive(Debug)]
pub struct StatsCollector {
    epoch: Instant,
    requests: HashMap<String, RequestStateStats>,
    iteration: IterationStats,
    prefix_seen: trellis_sched::PrefixCacheStats,
    step_counter: u64,
}

impl Default for StatsCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsCollector {
    /// An empty collector.
    pub fn new() -> Self {
        StatsCollector {
            epoch: Instant::now(),
            requests: HashMap::new(),
            iteration: IterationStats::default(),
            prefix_seen: Default::default(),
            step_counter: 0,
        }
    }

    /// Monotonic seconds since the collector was made.
    fn mono(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// A request (one of a parent's `n` samples) entered the engine core (vLLM's QUEUED
    /// event). `arrival_time` is wall-clock seconds; 0 means now.
    pub fn on_add(
        &mut self,
        request_id: &str,
        arrival_time: f64,
        prompt_len: usize,
        max_tokens: Option<usize>,
    ) {
        let arrival_time = if arrival_time > 0.0 {
            arrival_time
        } else {
            wall_now()
        };
        let queued_ts = self.mono();
        self.requests.insert(
            request_id.to_string(),
            RequestStateStats {
                arrival_time,
                prompt_len,
                max_tokens,
                queued_ts,
                scheduled_ts: 0.0,
                first_token_ts: 0.0,
                last_token_ts: 0.0,
                num_generation_tokens: 0,
                num_cached_tokens: 0,
                is_prefilling: true,
            },
        );
    }

    /// Monotonic time to pass to [`Self::on_step`] as the scheduling time of a step.
    pub fn step_started(&self) -> f64 {
        self.mono()
    }

    /// One engine-core step: `plan` was scheduled at `scheduled_at` (from
    /// [`Self::step_started`]) and produced `outputs` now.
    pub fn on_step(&mut self, plan: &SchedulerOutput, outputs: &[StepOutput], scheduled_at: f64) {
        let now = self.mono();
        let wall = wall_now();
        self.step_counter += 1;
        self.iteration.iteration_timestamp = wall;
        self.iteration.num_preempted_reqs += plan.preempted_req_ids.len();
        for s in &plan.scheduled {
            if let Some(r) = self.requests.get_mut(&s.request_id)
                && r.scheduled_ts == 0.0
            {
                r.scheduled_ts = scheduled_at;
            }
        }
        for out in outputs {
            let Some(r) = self.requests.get_mut(&out.request_id) else {
                continue;
            };
            let it = &mut self.iteration;
            let n_new = out.new_token_ids.len();
            it.num_generation_tokens += n_new;
            r.num_cached_tokens = r.num_cached_tokens.max(out.num_cached_tokens);
            if n_new > 0 {
                if r.is_prefilling {
                    r.is_prefilling = false;
                    it.prompt_token_stats
                        .add_request(r.num_cached_tokens, r.prompt_len);
                    it.time_to_first_tokens_iter.push(wall - r.arrival_time);
                    r.first_token_ts = now;
                } else {
                    it.inter_token_latencies_iter.push(now - r.last_token_ts);
                }
                r.last_token_ts = now;
                r.num_generation_tokens += n_new;
            }
            if let Some(reason) = out.finish_reason {
                self.finish(&out.request_id, reason);
            }
        }
    }

    /// A request finished outside the engine core's outputs: a stop string (`Stop`) or an
    /// abort. Unknown or already finished ids are ignored.
    pub fn finish(&mut self, request_id: &str, reason: FinishReason) {
        let Some(r) = self.requests.remove(request_id) else {
            return;
        };
        let e2e_latency = wall_now() - r.arrival_time;
        let mut f = FinishedRequestStats {
            finish_reason: reason,
            e2e_latency,
            num_prompt_tokens: r.prompt_len,
            num_generation_tokens: r.num_generation_tokens,
            max_tokens_param: r.max_tokens,
            queued_time: 0.0,
            prefill_time: 0.0,
            decode_time: 0.0,
            inference_time: 0.0,
            mean_time_per_output_token: 0.0,
            num_cached_tokens: r.num_cached_tokens,
        };
        if r.scheduled_ts > 0.0 {
            f.queued_time = r.scheduled_ts - r.queued_ts;
            if r.first_token_ts > 0.0 {
                f.prefill_time = r.first_token_ts - r.scheduled_ts;
                f.decode_time = r.last_token_ts - r.first_token_ts;
                f.inference_time = r.last_token_ts - r.scheduled_ts;
                if r.num_generation_tokens > 1 {
                    f.mean_time_per_output_token =
                        f.decode_time / (r.num_generation_tokens - 1) as f64;
                }
            }
        }
        self.iteration.finished_requests.push(f);
    }

    /// Drops a request without recording it (it was refused when added).
    pub fn forget(&mut self, request_id: &str) {
        self.requests.remove(request_id);
    }

    /// A parent request (all its `n` samples) finished; `max_generation_tokens` is its
    /// longest output.
    pub fn on_parent_finished(&mut self, n: usize, max_generation_tokens: usize) {
        self.iteration.n_params_iter.push(n);
        self.iteration
            .max_num_generation_tokens_iter
            .push(max_generation_tokens);
    }

    /// The scheduler's state now, with the prefix-cache lookups since the previous call.
    pub fn scheduler_stats(&mut self, scheduler: &Scheduler) -> SchedulerStats {
        let s = scheduler.stats();
        let cur = s.prefix_cache;
        let reset = cur.requests < self.prefix_seen.requests;
        let base = if reset {
            Default::default()
        } else {
            self.prefix_seen
        };
        self.prefix_seen = cur;
        SchedulerStats {
            num_running_reqs: s.num_running_reqs,
            num_waiting_reqs: s.num_waiting_reqs,
            step_counter: self.step_counter,
            kv_cache_usage: s.kv_cache_usage,
            prefix_cache_stats: PrefixCacheStats {
                reset,
                requests: cur.requests - base.requests,
                queries: cur.queries.saturating_sub(base.queries),
                hits: cur.hits.saturating_sub(base.hits),
            },
        }
    }

    /// A request refused at admission, for `reason` (see
    /// [`trellis_plugin::IterationStats::admission_rejections`]).
    pub fn on_rejected(&mut self, reason: &'static str) {
        self.iteration.admission_rejections.push(reason);
    }

    /// The stats gathered since the last [`Self::clear_iteration`].
    pub fn iteration(&self) -> &IterationStats {
        &self.iteration
    }

    /// Starts the next iteration (keeps the allocations).
    pub fn clear_iteration(&mut self) {
        self.iteration.clear();
    }

    /// Requests being tracked (for leak checks).
    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }
}
