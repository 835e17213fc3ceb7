//! The output processor: incremental detokenization, stop strings, logprobs and `n > 1`.
//!
//! The engine core speaks token ids; this turns its per-step outputs into text deltas and
//! finished [`RequestOutput`]s. A request with `n > 1` fans out into `n` child requests in the
//! core (ids `"{index}_{request_id}"`, vLLM's scheme; with a seed, child `i` uses `seed + i`) and
//! is gathered back here.

use std::collections::HashMap;
use std::sync::Arc;

use trellis_sched::FinishReason;

use crate::detokenizer::{IncrementalDetokenizer, StopChecker};
use crate::engine_core::StepOutput;
use crate::outputs::{CompletionDelta, CompletionOutput, RequestOutput, RequestUpdate, StopReason};
use crate::sampler::PositionLogprobs;
use crate::sampling_params::SamplingParams;
use crate::tokenizer::Tokenizer;

struct Child {
    output: CompletionOutput,
    detokenizer: IncrementalDetokenizer,
    stop_checker: StopChecker,
    /// Bytes of detokenized text already returned in deltas.
    emitted: usize,
}

struct Parent {
    output: RequestOutput,
    children: Vec<Child>,
    want_logprobs: bool,
    prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
    prompt_logprobs_sent: bool,
}

/// Id of child `index` of a request (the request's own id when `n == 1`).
pub fn child_request_id(request_id: &str, index: usize, n: usize) -> String {
    if n == 1 {
        request_id.to_string()
    } else {
        format!("{index}_{request_id}")
    }
}

/// Turns engine-core outputs into text and finished requests.
pub struct OutputProcessor {
    tokenizer: Arc<Tokenizer>,
    parents: HashMap<String, Parent>,
    /// child id → (parent id, index)
    children: HashMap<String, (String, usize)>,
}

impl OutputProcessor {
    /// A processor decoding with `tokenizer`.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        OutputProcessor {
            tokenizer,
            parents: HashMap::new(),
            children: HashMap::new(),
        }
    }

    /// Starts tracking a request whose `n` children were added to the core.
    pub fn add_request(
        &mut self,
        request_id: &str,
        prompt: Option<String>,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) {
        let n = params.n;
        let children = (0..n)
            .map(|index| {
                self.children.insert(
                    child_request_id(request_id, index, n),
                    (request_id.to_string(), index),
                );
                Child {
                    output: CompletionOutput {
                        index,
                        logprobs: params.logprobs.map(|_| Vec::new()),
                        cumulative_logprob: params.logprobs.map(|_| 0.0),
                        ..Default::default()
                    },
                    detokenizer: IncrementalDetokenizer::new(
                        Some(prompt_ids),
                        params.skip_special_tokens,
                    ),
                    stop_checker: StopChecker::new(
                        params.stop.clone(),
                        params.include_stop_str_in_output,
                    ),
                    emitted: 0,
                }
            })
            .collect();
        let prompt_logprobs = params.prompt_logprobs.map(|_| {
            let mut v = Vec::with_capacity(prompt_ids.len());
            v.push(None);
            v
        });
        self.parents.insert(
            request_id.to_string(),
            Parent {
                output: RequestOutput {
                    request_id: request_id.to_string(),
                    prompt,
                    prompt_token_ids: prompt_ids.to_vec(),
                    ..Default::default()
                },
                children,
                want_logprobs: params.logprobs.is_some(),
                prompt_logprobs,
                prompt_logprobs_sent: false,
            },
        );
    }

    /// Ids of a request's children that are still running (for aborts).
    pub fn unfinished_children(&self, request_id: &str) -> Vec<String> {
        let Some(p) = self.parents.get(request_id) else {
            return Vec::new();
        };
        let n = p.children.len();
        p.children
            .iter()
            .filter(|c| !c.output.finished())
            .map(|c| child_request_id(request_id, c.output.index, n))
            .collect()
    }

    /// Forgets a request (after an abort).
    pub fn remove_request(&mut self, request_id: &str) {
        if let Some(p) = self.parents.remove(request_id) {
            let n = p.children.len();
            for c in &p.children {
                self.children
                    .remove(&child_request_id(request_id, c.output.index, n));
            }
        }
    }

    /// Number of requests being tracked.
    pub fn num_requests(&self) -> usize {
        self.parents.len()
    }

    /// Processes one step. Returns the updates and the child ids that a stop string finished
    /// (the caller must finish them in the core).
    pub fn process(&mut self, outputs: Vec<StepOutput>) -> (Vec<RequestUpdate>, Vec<String>) {
        let mut updates: Vec<RequestUpdate> = Vec::new();
        let mut index_of: HashMap<String, usize> = HashMap::new();
        let mut stopped = Vec::new();
        for out in outputs {
            let Some((parent_id, index)) = self.children.get(&out.request_id).cloned() else {
                continue;
            };
            let Some(parent) = self.parents.get_mut(&parent_id) else {
                continue;
            };
            let u = *index_of.entry(parent_id.clone()).or_insert_with(|| {
                updates.push(RequestUpdate {
                    request_id: parent_id.clone(),
                    ..Default::default()
                });
                updates.len() - 1
            });
            if let Some(pl) = parent.prompt_logprobs.as_mut() {
                pl.extend(out.prompt_logprobs.iter().cloned().map(Some));
                if !parent.prompt_logprobs_sent && pl.len() >= parent.output.prompt_token_ids.len()
                {
                    parent.prompt_logprobs_sent = true;
                    updates[u].prompt_logprobs = Some(pl.clone());
                }
            }
            if out.num_cached_tokens > parent.output.num_cached_tokens {
                parent.output.num_cached_tokens = out.num_cached_tokens;
            }
            if out.error.is_some() {
                parent.output.error = out.error.clone();
            }
            let want_logprobs = parent.want_logprobs;
            let Some(child) = parent.children.get_mut(index) else {
                continue;
            };
            if child.output.finished() {
                continue;
            }
            let tok = &self.tokenizer;
            let mut delta_len = child.detokenizer.push(tok, &out.new_token_ids).len();
            if out.finish_reason.is_some() {
                delta_len += child.detokenizer.flush(tok).len();
            }
            let check = child.stop_checker.check(
                child.detokenizer.output_text(),
                delta_len,
                out.finish_reason.is_some(),
            );
            child.output.token_ids.extend_from_slice(&out.new_token_ids);
            if want_logprobs {
                if let Some(l) = child.output.logprobs.as_mut() {
                    l.extend(out.new_logprobs.iter().cloned());
                }
                if let Some(c) = child.output.cumulative_logprob.as_mut() {
                    *c += out
                        .new_logprobs
                        .iter()
                        .map(|l| l.logprob as f64)
                        .sum::<f64>();
                }
            }
            child.output.text.push_str(&check.text);
            child.emitted += check.text.len();
            let mut finish = out.finish_reason;
            let mut stop_reason = out.stop_reason.map(StopReason::Token);
            if let Some(s) = check.stop {
                finish = Some(FinishReason::Stop);
                stop_reason = Some(StopReason::Text(s));
                stopped.push(out.request_id.clone());
            }
            child.output.finish_reason = finish;
            child.output.stop_reason = stop_reason.clone();
            updates[u].deltas.push(CompletionDelta {
                index,
                text: check.text,
                token_ids: out.new_token_ids,
                logprobs: if want_logprobs {
                    out.new_logprobs
                } else {
                    Vec::new()
                },
                finish_reason: finish,
                stop_reason,
            });
        }
        for update in &mut updates {
            let done = self
                .parents
                .get(&update.request_id)
                .is_some_and(|p| p.children.iter().all(|c| c.output.finished()));
            if done && let Some(p) = self.parents.remove(&update.request_id) {
                let n = p.children.len();
                let mut output = p.output;
                output.prompt_logprobs = p.prompt_logprobs;
                output.finished = true;
                for c in p.children {
                    self.children
                        .remove(&child_request_id(&update.request_id, c.output.index, n));
                    output.outputs.push(c.output);
                }
                update.finished = Some(output);
            }
        }
        (updates, stopped)
    }
}
