//! Helpers shared by the scheduler tests: a fake model runner and request builders.
#![allow(dead_code)]

use trellis_sched::*;

pub fn config(
    num_blocks: usize,
    block_size: usize,
    budget: usize,
    max_seqs: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: max_seqs,
        max_model_len: 4096,
        block_size,
        num_blocks,
        enable_prefix_caching: true,
        enable_chunked_prefill: true,
        policy: SchedulingPolicy::Fcfs,
    }
}

pub fn req(id: &str, prompt: Vec<u32>, max_tokens: usize) -> NewRequest {
    NewRequest {
        request_id: id.to_string(),
        prompt_token_ids: prompt,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The token a fake model "generates" for a request at output index `i`: a pure function of
/// the request's id and the index, so outputs are the same however the request was scheduled.
pub fn fake_token(request_id: &str, i: usize, vocab: u32) -> u32 {
    let mut h: u64 = 1469598103934665603;
    for b in request_id.bytes().chain(i.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(1099511628211);
    }
    (h % vocab as u64) as u32
}

/// A fake runner with a fake KV cache: each slot remembers (lora id, token, position) written
/// into it. Before "attending", it checks that every position of each scheduled sequence is
/// readable through its block table and holds exactly that sequence's token — so a prefix-cache
/// hit on wrong content, or a slot overwritten while shared, fails the test.
pub struct FakeRunner {
    pub slots: Vec<Option<(u32, u32, usize)>>,
    pub vocab: u32,
    /// Full token sequences (prompt + outputs) of every live request, kept by the test.
    pub steps: usize,
}

impl FakeRunner {
    pub fn new(num_blocks: usize, block_size: usize, vocab: u32) -> Self {
        FakeRunner {
            slots: vec![None; num_blocks * block_size],
            vocab,
            steps: 0,
        }
    }

    pub fn execute(
        &mut self,
        sched: &Scheduler,
        plan: &SchedulerOutput,
    ) -> Result<ModelRunnerOutput, String> {
        self.steps += 1;
        let bs = sched.config().block_size;
        for sr in &plan.scheduled {
            for ((&tok, &pos), &slot) in
                sr.token_ids.iter().zip(&sr.positions).zip(&sr.slot_mapping)
            {
                self.slots[slot] = Some((sr.lora_id, tok, pos));
            }
        }
        let mut out = ModelRunnerOutput::default();
        for sr in &plan.scheduled {
            let req = sched
                .request(&sr.request_id)
                .ok_or("scheduled an unknown request")?;
            let end = sr.num_computed_tokens + sr.token_ids.len();
            if sr.positions.first() != Some(&sr.num_computed_tokens) {
                return Err(format!(
                    "{}: positions do not start at num_computed_tokens",
                    sr.request_id
                ));
            }
            if sr.block_table.len() * bs < end {
                return Err(format!(
                    "{}: block table too short for {end} tokens",
                    sr.request_id
                ));
            }
            for pos in 0..end {
                let slot = sr.block_table[pos / bs] as usize * bs + pos % bs;
                let want = (sr.lora_id, req.token_at(pos), pos);
                if self.slots[slot] != Some(want) {
                    return Err(format!(
                        "{}: slot {slot} for position {pos} holds {:?}, expected {want:?}",
                        sr.request_id, self.slots[slot]
                    ));
                }
            }
            if sr.samples {
                out.sampled_token_ids.push(vec![fake_token(
                    &sr.request_id,
                    sr.num_output_tokens,
                    self.vocab,
                )]);
            } else {
                out.sampled_token_ids.push(Vec::new());
            }
        }
        Ok(out)
    }
}

/// Runs steps until no request is left, checking invariants after each; returns all outputs.
pub fn run_to_completion(
    sched: &mut Scheduler,
    runner: &mut FakeRunner,
    max_steps: usize,
) -> Vec<EngineCoreOutput> {
    let mut all = Vec::new();
    for _ in 0..max_steps {
        if !sched.has_unfinished_requests() {
            return all;
        }
        let plan = sched.schedule();
        check_plan(sched, &plan);
        let out = runner.execute(sched, &plan).unwrap();
        all.extend(sched.update_from_output(&plan, &out));
        sched.check_invariants().unwrap();
    }
    panic!("requests still unfinished after {max_steps} steps");
}

pub fn check_plan(sched: &Scheduler, plan: &SchedulerOutput) {
    let c = sched.config();
    assert!(
        plan.total_num_scheduled_tokens <= c.max_num_batched_tokens,
        "budget exceeded"
    );
    assert!(plan.scheduled.len() <= c.max_num_seqs, "seq cap exceeded");
    let total: usize = plan.scheduled.iter().map(|s| s.token_ids.len()).sum();
    assert_eq!(total, plan.total_num_scheduled_tokens);
    sched.check_invariants().unwrap();
}
