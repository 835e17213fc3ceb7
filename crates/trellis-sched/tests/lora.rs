//! `--max-loras` at admission (issue 12): at most that many distinct adapters run at once, a
//! request whose adapter would be one too many waits, and it is not starved by a stream of
//! requests of an adapter already running.

mod common;

use std::collections::HashSet;

use common::{config, req};
use trellis_sched::*;

fn lora_req(id: &str, lora: u32, max_tokens: usize) -> NewRequest {
    NewRequest {
        lora_id: lora,
        ..req(id, vec![1, 2, 3, 4], max_tokens)
    }
}

/// Runs one step with a fake model (token 7 for everyone) and returns the LoRA ids scheduled.
fn step(s: &mut Scheduler) -> (Vec<String>, HashSet<u32>) {
    let plan = s.schedule();
    let ids = plan
        .scheduled
        .iter()
        .map(|r| r.request_id.clone())
        .collect();
    let loras = plan.scheduled.iter().map(|r| r.lora_id).collect();
    let out = ModelRunnerOutput {
        sampled_token_ids: plan
            .scheduled
            .iter()
            .map(|r| if r.samples { vec![7] } else { vec![] })
            .collect(),
    };
    s.update_from_output(&plan, &out);
    (ids, loras)
}

#[test]
fn at_most_max_loras_distinct_adapters_per_step() {
    let mut s = Scheduler::new(config(256, 4, 512, 64)).unwrap();
    s.set_max_loras(Some(2));
    for (i, lora) in [1u32, 2, 3, 0, 1, 4, 0, 2].iter().enumerate() {
        s.add_request(lora_req(&format!("r{i}"), *lora, 3)).unwrap();
    }
    let mut finished_order = Vec::new();
    let mut seen = HashSet::new();
    while s.has_unfinished_requests() {
        let (ids, loras) = step(&mut s);
        let adapters: HashSet<u32> = loras.into_iter().filter(|&l| l != 0).collect();
        assert!(adapters.len() <= 2, "adapters in one step: {adapters:?}");
        for id in ids {
            if seen.insert(id.clone()) {
                finished_order.push(id);
            }
        }
    }
    assert_eq!(seen.len(), 8, "every request ran");
    // The base-model requests are never held back by the adapter limit.
    let first_step: Vec<&str> = finished_order.iter().take(5).map(|s| s.as_str()).collect();
    assert!(
        first_step.contains(&"r3") && first_step.contains(&"r6"),
        "{finished_order:?}"
    );
}

#[test]
fn deferred_adapter_is_not_starved_by_a_stream_of_another() {
    let mut s = Scheduler::new(config(256, 4, 512, 64)).unwrap();
    s.set_max_loras(Some(1));
    s.add_request(lora_req("a0", 1, 4)).unwrap();
    s.add_request(lora_req("b", 2, 2)).unwrap();
    let mut b_ran_at = None;
    for t in 0..50 {
        // A new request of the running adapter arrives every step.
        s.add_request(lora_req(&format!("a{}", t + 1), 1, 4))
            .unwrap();
        let (ids, _) = step(&mut s);
        if ids.iter().any(|i| i == "b") {
            b_ran_at = Some(t);
            break;
        }
    }
    let t = b_ran_at.expect("the request of adapter 2 never ran");
    assert!(t <= 6, "adapter 2 waited {t} steps");
}

#[test]
fn no_limit_admits_everything() {
    let mut s = Scheduler::new(config(256, 4, 512, 64)).unwrap();
    for i in 0..6u32 {
        s.add_request(lora_req(&format!("r{i}"), i + 1, 2)).unwrap();
    }
    let (ids, _) = step(&mut s);
    assert_eq!(ids.len(), 6);
}
