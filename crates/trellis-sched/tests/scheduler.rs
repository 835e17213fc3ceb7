//! Unit tests of the scheduling rules and their corners.

mod common;

use common::*;
use trellis_sched::*;

fn ids(n: u32, offset: u32) -> Vec<u32> {
    (0..n).map(|i| 1000 + offset + i).collect()
}

fn step(s: &mut Scheduler, r: &mut FakeRunner) -> (SchedulerOutput, Vec<EngineCoreOutput>) {
    let plan = s.schedule();
    check_plan(s, &plan);
    let out = r.execute(s, &plan).unwrap();
    let outs = s.update_from_output(&plan, &out);
    s.check_invariants().unwrap();
    (plan, outs)
}

fn tokens_of(outs: &[EngineCoreOutput], id: &str) -> Vec<u32> {
    outs.iter()
        .filter(|o| o.request_id == id)
        .flat_map(|o| o.new_token_ids.clone())
        .collect()
}

fn finish_of(outs: &[EngineCoreOutput], id: &str) -> Option<FinishReason> {
    outs.iter()
        .filter(|o| o.request_id == id)
        .find_map(|o| o.finish_reason)
}

#[test]
fn bad_input_is_an_error_naming_the_limit() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 64,
        ..config(16, 16, 64, 8)
    })
    .unwrap();
    assert_eq!(
        s.add_request(req("a", vec![], 4)),
        Err(SchedError::EmptyPrompt)
    );
    let e = s.add_request(req("b", ids(70, 0), 4)).unwrap_err();
    assert!(e.to_string().contains("64"), "{e}");
    let e = s.add_request(req("c", ids(60, 0), 10)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this model's maximum context length is 64 tokens, but 70 tokens were requested (60 in the prompt, 10 in the completion)"
    );
    assert!(matches!(
        s.add_request(req("d", ids(4, 0), 0)),
        Err(SchedError::ZeroMaxTokens(_))
    ));
    let mut r = req("e", ids(4, 0), 3);
    r.stop.min_tokens = 5;
    assert!(matches!(
        s.add_request(r),
        Err(SchedError::MinTokensAboveMax { .. })
    ));
    s.add_request(req("f", ids(4, 0), 3)).unwrap();
    assert!(matches!(
        s.add_request(req("f", ids(4, 0), 3)),
        Err(SchedError::DuplicateRequestId(_))
    ));
    assert!(Scheduler::new(config(0, 16, 64, 8)).is_err());
    assert!(Scheduler::new(config(4, 0, 64, 8)).is_err());
}

#[test]
fn default_max_tokens_fills_the_context() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 20,
        ..config(16, 4, 64, 8)
    })
    .unwrap();
    let mut r = req("a", ids(5, 0), 1);
    r.stop.max_tokens = None;
    s.add_request(r).unwrap();
    let mut fr = FakeRunner::new(16, 4, 50_000);
    let outs = run_to_completion(&mut s, &mut fr, 100);
    assert_eq!(tokens_of(&outs, "a").len(), 15);
    assert_eq!(finish_of(&outs, "a"), Some(FinishReason::Length));
}

#[test]
fn prefill_then_decode_until_max_tokens() {
    let mut s = Scheduler::new(config(16, 16, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 16, 50_000);
    s.add_request(req("a", ids(10, 0), 3)).unwrap();
    let (plan, outs) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled.len(), 1);
    let sr = &plan.scheduled[0];
    assert_eq!(sr.token_ids.len(), 10);
    assert_eq!(sr.positions, (0..10).collect::<Vec<_>>());
    assert!(sr.samples);
    assert_eq!(
        sr.slot_mapping,
        (0..10)
            .map(|p| sr.block_table[0] as usize * 16 + p)
            .collect::<Vec<_>>()
    );
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0].new_token_ids, vec![fake_token("a", 0, 50_000)]);
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(
        plan.scheduled[0].token_ids,
        vec![fake_token("a", 0, 50_000)]
    );
    assert_eq!(plan.scheduled[0].positions, vec![10]);
    let (_, outs) = step(&mut s, &mut fr);
    assert_eq!(outs[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(s.num_unfinished_requests(), 0);
    assert_eq!(s.kv_cache_manager().pool().num_free_blocks(), 16);
    let plan = s.schedule();
    assert_eq!(plan.finished_req_ids, vec!["a".to_string()]);
}

#[test]
fn eos_min_tokens_ignore_eos_and_stop_token_ids() {
    let vocab = 50_000;
    let first = fake_token("a", 0, vocab);
    let second = fake_token("a", 1, vocab);
    // EOS on the first token stops at once.
    let mut s = Scheduler::new(config(16, 16, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 16, vocab);
    let mut r = req("a", ids(5, 0), 10);
    r.stop.eos_token_ids = vec![first];
    s.add_request(r.clone()).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 50);
    assert_eq!(tokens_of(&outs, "a"), vec![first]);
    assert_eq!(finish_of(&outs, "a"), Some(FinishReason::Stop));
    assert_eq!(outs.last().unwrap().stop_reason, None);
    // min_tokens = 2 lets it pass the EOS; ignore_eos runs to max_tokens.
    let mut r2 = r.clone();
    r2.stop.min_tokens = 2;
    r2.stop.stop_token_ids = vec![second];
    s.add_request(r2).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 50);
    assert_eq!(tokens_of(&outs, "a").len(), 2);
    let r3 = {
        let mut x = r.clone();
        x.stop.ignore_eos = true;
        x
    };
    s.add_request(r3).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 50);
    assert_eq!(tokens_of(&outs, "a").len(), 10);
    assert_eq!(finish_of(&outs, "a"), Some(FinishReason::Length));
    // A stop token id is reported as the stop reason.
    let mut r4 = req("a", ids(5, 0), 10);
    r4.stop.stop_token_ids = vec![second];
    s.add_request(r4).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 50);
    assert_eq!(tokens_of(&outs, "a"), vec![first, second]);
    assert_eq!(outs.last().unwrap().stop_reason, Some(second));
}

#[test]
fn prompt_that_exactly_fills_a_block() {
    let mut s = Scheduler::new(config(8, 16, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(8, 16, 50_000);
    s.add_request(req("a", ids(16, 0), 3)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].block_table.len(), 1);
    let (plan, _) = step(&mut s, &mut fr);
    // The first decode token is position 16: a second block.
    assert_eq!(plan.scheduled[0].positions, vec![16]);
    assert_eq!(plan.scheduled[0].block_table.len(), 2);
    assert_eq!(
        plan.scheduled[0].slot_mapping,
        vec![plan.scheduled[0].block_table[1] as usize * 16]
    );
}

#[test]
fn prefix_hit_covering_the_whole_prompt_recomputes_the_last_block() {
    let mut s = Scheduler::new(config(16, 16, 256, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 16, 50_000);
    s.add_request(req("a", ids(32, 0), 2)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    s.add_request(req("b", ids(32, 0), 2)).unwrap();
    let (plan, outs) = step(&mut s, &mut fr);
    let sr = &plan.scheduled[0];
    // 32 prompt tokens = 2 full blocks, both cached; only the first may be reused.
    assert_eq!(sr.num_computed_tokens, 16);
    assert_eq!(sr.token_ids.len(), 16);
    assert!(sr.samples);
    assert_eq!(outs[0].num_cached_tokens, 16);
    let st = s.stats().prefix_cache;
    assert_eq!(st.requests, 2);
    assert_eq!(st.queries, 64);
    assert_eq!(st.hits, 16);
}

#[test]
fn partial_prefix_hit_and_shared_blocks_are_reference_counted() {
    let mut s = Scheduler::new(config(16, 4, 256, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 4, 50_000);
    s.add_request(req("a", ids(10, 0), 20)).unwrap();
    step(&mut s, &mut fr);
    // b shares the first 8 tokens (2 full blocks) with a, which is still running.
    let mut p = ids(8, 0);
    p.extend([7, 7, 7]);
    s.add_request(req("b", p, 2)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    let b = plan.scheduled.iter().find(|r| r.request_id == "b").unwrap();
    let a = plan.scheduled.iter().find(|r| r.request_id == "a").unwrap();
    assert_eq!(b.num_computed_tokens, 8);
    assert_eq!(&b.block_table[..2], &a.block_table[..2]);
    assert_eq!(s.kv_cache_manager().pool().ref_cnt(a.block_table[0]), 2);
    run_to_completion(&mut s, &mut fr, 100);
}

#[test]
fn lora_id_and_cache_salt_separate_prefixes() {
    let mut s = Scheduler::new(config(16, 4, 256, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 4, 50_000);
    s.add_request(req("a", ids(9, 0), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    let mut b = req("b", ids(9, 0), 1);
    b.lora_id = 3;
    s.add_request(b).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].num_computed_tokens, 0);
    let mut c = req("c", ids(9, 0), 1);
    c.cache_salt = Some(42);
    s.add_request(c).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].num_computed_tokens, 0);
    s.add_request(req("d", ids(9, 0), 1)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].num_computed_tokens, 8);
}

#[test]
fn prefix_caching_can_be_switched_off() {
    let mut s = Scheduler::new(SchedulerConfig {
        enable_prefix_caching: false,
        ..config(16, 4, 256, 8)
    })
    .unwrap();
    let mut fr = FakeRunner::new(16, 4, 50_000);
    s.add_request(req("a", ids(9, 0), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    s.add_request(req("b", ids(9, 0), 1)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].num_computed_tokens, 0);
    assert_eq!(s.stats().prefix_cache.hits, 0);
}

#[test]
fn cached_blocks_are_evicted_in_lru_order() {
    // 4 blocks of 4 tokens. a then b each leave one cached full block behind.
    let mut s = Scheduler::new(config(4, 4, 256, 8)).unwrap();
    let mut fr = FakeRunner::new(4, 4, 50_000);
    s.add_request(req("a", ids(5, 0), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    s.add_request(req("b", ids(5, 100), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    // c needs 3 blocks: the uncached free blocks go first, then a's (older) cached block.
    s.add_request(req("c", ids(12, 200), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    s.add_request(req("b2", ids(5, 100), 1)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(
        plan.scheduled[0].num_computed_tokens, 4,
        "b's block must have survived"
    );
    run_to_completion(&mut s, &mut fr, 20);
    s.add_request(req("a2", ids(5, 0), 1)).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(
        plan.scheduled[0].num_computed_tokens, 0,
        "a's block was the LRU one"
    );
}

#[test]
fn chunk_boundary_inside_a_block() {
    let mut s = Scheduler::new(config(16, 16, 10, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 16, 50_000);
    s.add_request(req("a", ids(25, 0), 2)).unwrap();
    let mut chunks = Vec::new();
    loop {
        let (plan, outs) = step(&mut s, &mut fr);
        let sr = &plan.scheduled[0];
        chunks.push((sr.num_computed_tokens, sr.token_ids.len(), sr.samples));
        if !outs.is_empty() {
            break;
        }
    }
    assert_eq!(chunks, vec![(0, 10, false), (10, 10, false), (20, 5, true)]);
}

#[test]
fn one_prompt_larger_than_the_whole_budget() {
    let mut s = Scheduler::new(config(32, 16, 16, 8)).unwrap();
    let mut fr = FakeRunner::new(32, 16, 50_000);
    s.add_request(req("a", ids(100, 0), 3)).unwrap();
    s.add_request(req("b", ids(3, 500), 3)).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 50);
    assert_eq!(tokens_of(&outs, "a").len(), 3);
    assert_eq!(tokens_of(&outs, "b").len(), 3);
    // 100 tokens at 16 a step: 7 steps of prefill before the first token.
    assert!(fr.steps >= 7 + 2);
}

#[test]
fn running_requests_are_served_before_waiting_ones_and_the_seq_cap_holds() {
    let mut s = Scheduler::new(config(64, 4, 64, 2)).unwrap();
    let mut fr = FakeRunner::new(64, 4, 50_000);
    for i in 0..4 {
        s.add_request(req(&format!("r{i}"), ids(3, i * 10), 4))
            .unwrap();
    }
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(
        plan.scheduled
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        vec!["r0", "r1"]
    );
    assert_eq!(s.stats().num_running_reqs, 2);
    assert_eq!(s.stats().num_waiting_reqs, 2);
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(
        plan.scheduled
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        vec!["r0", "r1"]
    );
    run_to_completion(&mut s, &mut fr, 50);
}

#[test]
fn preemption_during_a_chunked_prefill_keeps_generated_tokens() {
    // 6 blocks of 4 tokens = 24 slots. a decodes; b's long prompt is prefilled in chunks until
    // blocks run out, then b (the newest) is preempted and recomputed later.
    let mut s = Scheduler::new(SchedulerConfig {
        enable_prefix_caching: false,
        ..config(5, 4, 6, 8)
    })
    .unwrap();
    let mut fr = FakeRunner::new(5, 4, 50_000);
    s.add_request(req("a", ids(4, 0), 12)).unwrap();
    let (_, mut outs) = step(&mut s, &mut fr);
    s.add_request(req("b", ids(16, 100), 2)).unwrap();
    let mut preempted_mid_prefill = false;
    for _ in 0..200 {
        if !s.has_unfinished_requests() {
            break;
        }
        let b_mid_prefill = s
            .request("b")
            .is_some_and(|r| r.num_computed_tokens > 0 && r.num_output_tokens() == 0);
        let (plan, o) = step(&mut s, &mut fr);
        if plan.preempted_req_ids.contains(&"b".to_string()) && b_mid_prefill {
            preempted_mid_prefill = true;
            assert_eq!(s.request("b").unwrap().status, RequestStatus::Preempted);
            assert_eq!(s.request("b").unwrap().num_computed_tokens, 0);
            assert!(s.kv_cache_manager().block_table("b").is_empty());
        }
        outs.extend(o);
    }
    assert!(
        preempted_mid_prefill,
        "the test did not exercise preemption during prefill"
    );
    assert_eq!(
        tokens_of(&outs, "a"),
        (0..12)
            .map(|i| fake_token("a", i, 50_000))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        tokens_of(&outs, "b"),
        (0..2)
            .map(|i| fake_token("b", i, 50_000))
            .collect::<Vec<_>>()
    );
    assert!(s.stats().num_preemptions >= 1);
    assert_eq!(s.kv_cache_manager().pool().num_free_blocks(), 5);
}

#[test]
fn abort_works_in_every_state_including_preempted() {
    let mut s = Scheduler::new(config(4, 4, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(4, 4, 50_000);
    s.add_request(req("a", ids(4, 0), 8)).unwrap();
    s.add_request(req("b", ids(4, 100), 8)).unwrap();
    let mut saw_preempted = false;
    let mut outs = Vec::new();
    for _ in 0..50 {
        outs.extend(step(&mut s, &mut fr).1);
        if s.request("b")
            .is_some_and(|r| r.status == RequestStatus::Preempted)
        {
            saw_preempted = true;
            break;
        }
    }
    assert!(saw_preempted);
    assert!(s.abort("b"));
    assert!(!s.abort("b"));
    s.check_invariants().unwrap();
    s.add_request(req("w", ids(2, 300), 1)).unwrap();
    assert!(s.abort("w"));
    outs.extend(run_to_completion(&mut s, &mut fr, 100));
    assert_eq!(tokens_of(&outs, "a").len(), 8);
    assert!(tokens_of(&outs, "b").len() < 8);
    assert_eq!(
        finish_of(&outs, "b"),
        None,
        "an aborted request gets no further output"
    );
    assert!(s.abort("zz") == false);
    assert_eq!(s.kv_cache_manager().pool().num_free_blocks(), 4);
    let plan = s.schedule();
    assert!(plan.finished_req_ids.contains(&"a".to_string()));
}

#[test]
fn requests_that_can_never_fit_the_kv_cache_are_refused_with_both_numbers() {
    let mut s = Scheduler::new(config(2, 4, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(2, 4, 50_000);
    // The prompt alone is larger than the cache (8 slots).
    let err = s.add_request(req("big", ids(9, 0), 1)).unwrap_err();
    assert!(matches!(
        err,
        SchedError::ExceedsKvCache {
            needed: 10,
            capacity: 8,
            ..
        }
    ));
    // The prompt fits, but prompt + max_tokens cannot.
    let err = s.add_request(req("grow", ids(6, 100), 10)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("needs 16 tokens of KV cache") && msg.contains("holds only 8 tokens"),
        "{msg}"
    );
    // Exactly the cache is fine, and runs to its end alone.
    s.add_request(req("fits", ids(6, 100), 2)).unwrap();
    let outs = run_to_completion(&mut s, &mut fr, 100);
    assert_eq!(finish_of(&outs, "fits"), Some(FinishReason::Length));
    assert_eq!(tokens_of(&outs, "fits").len(), 2);
}

#[test]
fn priority_policy_admits_lowest_priority_value_first() {
    let mut s = Scheduler::new(SchedulerConfig {
        policy: SchedulingPolicy::Priority,
        ..config(64, 4, 64, 1)
    })
    .unwrap();
    let mut fr = FakeRunner::new(64, 4, 50_000);
    for (i, p) in [5, 1, 3].iter().enumerate() {
        let mut r = req(&format!("r{i}"), ids(3, i as u32 * 10), 1);
        r.priority = *p;
        r.arrival_time = i as f64;
        s.add_request(r).unwrap();
    }
    let mut order = Vec::new();
    while s.has_unfinished_requests() {
        let (plan, _) = step(&mut s, &mut fr);
        order.extend(plan.scheduled.iter().map(|r| r.request_id.clone()));
    }
    assert_eq!(order, vec!["r1", "r2", "r0"]);
}

#[test]
fn finish_request_with_stop_frees_blocks_and_stats_report_usage() {
    let mut s = Scheduler::new(config(8, 4, 64, 8)).unwrap();
    let mut fr = FakeRunner::new(8, 4, 50_000);
    s.add_request(req("a", ids(8, 0), 20)).unwrap();
    step(&mut s, &mut fr);
    assert!(
        (s.stats().kv_cache_usage - 3.0 / 8.0).abs() < 1e-9
            || (s.stats().kv_cache_usage - 2.0 / 8.0).abs() < 1e-9
    );
    assert!(s.finish_request("a", FinishReason::Stop));
    assert_eq!(s.stats().kv_cache_usage, 0.0);
    assert_eq!(s.stats().num_running_reqs, 0);
}

#[test]
fn skip_reading_prefix_cache_computes_the_whole_prompt() {
    let mut s = Scheduler::new(config(16, 4, 256, 8)).unwrap();
    let mut fr = FakeRunner::new(16, 4, 50_000);
    s.add_request(req("a", ids(9, 0), 1)).unwrap();
    run_to_completion(&mut s, &mut fr, 20);
    let mut b = req("b", ids(9, 0), 1);
    b.skip_reading_prefix_cache = true;
    s.add_request(b).unwrap();
    let (plan, _) = step(&mut s, &mut fr);
    assert_eq!(plan.scheduled[0].num_computed_tokens, 0);
}

#[test]
fn lookups_after_a_preemption_are_counted_apart() {
    // The scenario above with prefix caching on: b is preempted and looks the cache up again
    // when it comes back; vLLM keeps that lookup out of the hit-rate counters.
    let mut s = Scheduler::new(config(5, 4, 6, 8)).unwrap();
    let mut fr = FakeRunner::new(5, 4, 50_000);
    s.add_request(req("a", ids(4, 0), 12)).unwrap();
    step(&mut s, &mut fr);
    s.add_request(req("b", ids(16, 100), 2)).unwrap();
    for _ in 0..200 {
        if !s.has_unfinished_requests() {
            break;
        }
        step(&mut s, &mut fr);
    }
    let st = s.stats();
    assert!(st.num_preemptions >= 1);
    let pc = st.prefix_cache;
    assert_eq!((pc.requests, pc.queries), (2, 4 + 16));
    // One lookup per admission attempt (as in vLLM), so at least one per preemption.
    assert!(pc.preempted_requests >= st.num_preemptions);
    assert!(pc.preempted_queries >= 16);
}

#[test]
fn without_chunked_prefill_a_prompt_waits_for_a_step_it_fits_whole() {
    let mut s = Scheduler::new(SchedulerConfig {
        enable_chunked_prefill: false,
        max_model_len: 16,
        ..config(64, 4, 16, 8)
    })
    .unwrap();
    s.add_request(req("a", (0..10).collect(), 1)).unwrap();
    s.add_request(req("b", (100..110).collect(), 1)).unwrap();
    let plan = s.schedule();
    // b does not fit the 6 tokens left: it is not chunked, it waits.
    assert_eq!(plan.scheduled.len(), 1);
    assert_eq!(plan.scheduled[0].token_ids.len(), 10);
    assert!(plan.scheduled[0].samples);
    // Over the budget of a step without chunking: refused at start-up.
    let bad = Scheduler::new(SchedulerConfig {
        enable_chunked_prefill: false,
        max_model_len: 32,
        ..config(64, 4, 16, 8)
    });
    assert!(bad.is_err());
}
