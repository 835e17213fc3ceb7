//! Randomized simulation: random arrivals, prompt lengths, shared prefixes, output lengths,
//! aborts and tiny caches, driven by a fake runner with a fake KV cache. After every step the
//! cache and plan invariants hold; at the end every request finished with exactly the tokens its
//! stop conditions allow, and every block is free (cached-and-evictable or not).

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use trellis_sched::*;

const VOCAB: u32 = 16;
const MAX_MODEL_LEN: usize = 64;

#[derive(Debug, Clone)]
struct Spec {
    arrival: usize,
    prefix: usize,
    prefix_len: usize,
    tail: Vec<u32>,
    max_tokens: usize,
    min_tokens: usize,
    eos: bool,
    ignore_eos: bool,
    stop_token: Option<u32>,
    lora: u32,
    priority: i32,
    abort_at: Option<usize>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0usize..30,
        0usize..3,
        0usize..24,
        prop::collection::vec(0u32..VOCAB, 0..14),
        1usize..14,
        0usize..4,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u32..VOCAB),
        0u32..2,
        -2i32..3,
        prop::option::weighted(0.15, 0usize..60),
    )
        .prop_map(
            |(
                arrival,
                prefix,
                prefix_len,
                tail,
                max_tokens,
                min_tokens,
                eos,
                ignore_eos,
                stop_token,
                lora,
                priority,
                abort_at,
            )| Spec {
                arrival,
                prefix,
                prefix_len,
                tail,
                max_tokens,
                min_tokens: min_tokens.min(max_tokens),
                eos,
                ignore_eos,
                stop_token,
                lora,
                priority,
                abort_at,
            },
        )
}

fn prompt_of(s: &Spec) -> Vec<u32> {
    let mut p: Vec<u32> = (0..s.prefix_len)
        .map(|i| 100 + (s.prefix as u32) * 50 + i as u32)
        .collect();
    p.extend(&s.tail);
    p
}

/// The tokens the stop conditions allow, given the fake model's deterministic stream.
fn expected(id: &str, s: &Spec, prompt_len: usize) -> (Vec<u32>, FinishReason) {
    let mut out = Vec::new();
    loop {
        let t = fake_token(id, out.len(), VOCAB);
        out.push(t);
        if prompt_len + out.len() >= MAX_MODEL_LEN || out.len() >= s.max_tokens {
            return (out, FinishReason::Length);
        }
        if out.len() < s.min_tokens {
            continue;
        }
        if s.eos && !s.ignore_eos && t == 0 {
            return (out, FinishReason::Stop);
        }
        if s.stop_token == Some(t) {
            return (out, FinishReason::Stop);
        }
    }
}

fn simulate(
    specs: Vec<Spec>,
    num_blocks: usize,
    block_size: usize,
    budget: usize,
    max_seqs: usize,
    caching: bool,
    priority: bool,
) -> Result<(), TestCaseError> {
    let config = SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: max_seqs,
        max_model_len: MAX_MODEL_LEN,
        block_size,
        num_blocks,
        enable_prefix_caching: caching,
        enable_chunked_prefill: true,
        policy: if priority {
            SchedulingPolicy::Priority
        } else {
            SchedulingPolicy::Fcfs
        },
    };
    let capacity = num_blocks * block_size;
    let mut sched = Scheduler::new(config).unwrap();
    let mut runner = FakeRunner::new(num_blocks, block_size, VOCAB);
    let mut tokens: HashMap<String, Vec<u32>> = HashMap::new();
    let mut finished: HashMap<String, FinishReason> = HashMap::new();
    let mut accepted: HashMap<String, usize> = HashMap::new();
    let mut aborted: Vec<String> = Vec::new();
    let mut step = 0;
    loop {
        for (i, s) in specs.iter().enumerate() {
            if s.arrival == step {
                let id = format!("req-{i}");
                let prompt = prompt_of(s);
                let mut stop = StopConditions {
                    max_tokens: Some(s.max_tokens),
                    min_tokens: s.min_tokens,
                    ignore_eos: s.ignore_eos,
                    ..Default::default()
                };
                if s.eos {
                    stop.eos_token_ids = vec![0];
                }
                stop.stop_token_ids = s.stop_token.into_iter().collect();
                let new = NewRequest {
                    request_id: id.clone(),
                    prompt_token_ids: prompt.clone(),
                    stop,
                    lora_id: s.lora,
                    priority: s.priority,
                    arrival_time: step as f64,
                    cache_salt: None,
                    skip_reading_prefix_cache: false,
                };
                let too_long = prompt.is_empty()
                    || prompt.len() + s.max_tokens > MAX_MODEL_LEN
                    || prompt.len() + s.max_tokens > capacity
                    || prompt.len() >= MAX_MODEL_LEN;
                match sched.add_request(new) {
                    Ok(()) => {
                        prop_assert!(!too_long, "accepted a request over the limits");
                        accepted.insert(id, prompt.len());
                    }
                    Err(_) => prop_assert!(too_long, "refused a valid request"),
                }
            }
            if s.abort_at == Some(step) {
                let id = format!("req-{i}");
                if sched.abort(&id) {
                    aborted.push(id);
                }
            }
        }
        let all_arrived = specs.iter().all(|s| s.arrival <= step);
        if all_arrived && !sched.has_unfinished_requests() {
            break;
        }
        prop_assert!(
            step < 5000,
            "no progress: requests still unfinished after 5000 steps"
        );
        let plan = sched.schedule();
        prop_assert!(plan.total_num_scheduled_tokens <= budget);
        prop_assert!(plan.scheduled.len() <= max_seqs);
        sched.check_invariants().map_err(TestCaseError::fail)?;
        let out = runner.execute(&sched, &plan).map_err(TestCaseError::fail)?;
        for o in sched.update_from_output(&plan, &out) {
            prop_assert!(!finished.contains_key(&o.request_id), "output after finish");
            tokens
                .entry(o.request_id.clone())
                .or_default()
                .extend(&o.new_token_ids);
            if let Some(r) = o.finish_reason {
                finished.insert(o.request_id.clone(), r);
            }
        }
        sched.check_invariants().map_err(TestCaseError::fail)?;
        step += 1;
    }

    for (i, s) in specs.iter().enumerate() {
        let id = format!("req-{i}");
        let Some(&prompt_len) = accepted.get(&id) else {
            continue;
        };
        let got = tokens.get(&id).cloned().unwrap_or_default();
        let (want, reason) = expected(&id, s, prompt_len);
        if aborted.contains(&id) {
            prop_assert!(!finished.contains_key(&id), "{id}: aborted yet finished");
            prop_assert!(want.starts_with(&got), "{id}: aborted output not a prefix");
            continue;
        }
        match finished.get(&id) {
            Some(FinishReason::Error) => {
                prop_assert!(want.starts_with(&got), "{id}: failed output not a prefix");
                prop_assert!(
                    prompt_len + got.len() > capacity,
                    "{id}: failed though it fits the cache"
                );
            }
            Some(r) => {
                prop_assert_eq!(&got, &want, "{} tokens", id);
                prop_assert_eq!(*r, reason, "{} finish reason", id);
            }
            None => prop_assert!(false, "{id} never finished"),
        }
    }
    prop_assert_eq!(
        sched.kv_cache_manager().pool().num_free_blocks(),
        num_blocks
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_every_invariant(
        specs in prop::collection::vec(spec(), 1..16),
        num_blocks in 1usize..24,
        block_size in 1usize..6,
        budget in 1usize..40,
        max_seqs in 1usize..6,
        caching in any::<bool>(),
        priority in prop::bool::weighted(0.2),
    ) {
        simulate(specs, num_blocks, block_size, budget, max_seqs, caching, priority)?;
    }
}
