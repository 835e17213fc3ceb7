//! `--max-loras` at admission: at most that many distinct adapters among running requests.
//!
//! A waiting request whose adapter would be one too many is deferred (it keeps its place in
//! the queue). To keep it from starving behind a stream of requests of adapters already
//! running, once one request is deferred no later waiting request with an adapter is admitted
//! in that step: the running adapters drain, and the deferred request is first in line for the
//! freed adapter slot. Base-model requests (LoRA id 0) take no slot and are never deferred.

use crate::request::RequestId;

/// The admission state of one step.
#[derive(Debug)]
pub struct LoraAdmission {
    max_loras: Option<usize>,
    active: Vec<u32>,
    deferred: Vec<RequestId>,
}

impl LoraAdmission {
    /// Starts a step whose running requests have the adapters `running` (0 = none).
    pub fn new(max_loras: Option<usize>, running: impl Iterator<Item = u32>) -> Self {
        let mut active = Vec::new();
        if max_loras.is_some() {
            for id in running.filter(|&id| id != 0) {
                if !active.contains(&id) {
                    active.push(id);
                }
            }
        }
        LoraAdmission {
            max_loras,
            active,
            deferred: Vec::new(),
        }
    }

    /// Requests deferred in this step.
    pub fn deferred(&self) -> &[RequestId] {
        &self.deferred
    }

    /// Whether request `id` of adapter `lora_id` may be admitted now; when not, it is deferred.
    pub fn admit(&mut self, id: &RequestId, lora_id: u32) -> bool {
        let Some(max) = self.max_loras else {
            return true;
        };
        if lora_id == 0 {
            return true;
        }
        let fits = self.active.contains(&lora_id) || self.active.len() < max;
        if fits && self.deferred.is_empty() {
            return true;
        }
        self.deferred.push(id.clone());
        false
    }

    /// Records that a request of adapter `lora_id` was admitted.
    pub fn admitted(&mut self, lora_id: u32) {
        if self.max_loras.is_some() && lora_id != 0 && !self.active.contains(&lora_id) {
            self.active.push(lora_id);
        }
    }
}
