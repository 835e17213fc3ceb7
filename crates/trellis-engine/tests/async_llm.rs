//! `AsyncLLM`: the engine on its own thread — streams, abort on drop, errors, stats, shutdown.

mod common;

use std::time::Duration;

use trellis_engine::{
    AsyncEngineError, AsyncLLM, EngineConfig, EngineError, LLM, Prompt, SamplingParams,
};

fn config() -> EngineConfig {
    let mut c = EngineConfig::new(common::model_path());
    c.max_model_len = Some(512);
    c.num_kv_blocks = Some(64);
    c
}

#[tokio::test]
async fn streams_match_offline_abort_frees_blocks_and_errors_come_back() {
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(6)
    };
    let want = LLM::new(config())
        .expect("loads")
        .generate(&["The capital of France is"], &params)
        .expect("generates");
    let engine = AsyncLLM::new(config()).expect("loads");

    // Deltas joined equal the offline text; the last update carries the whole output.
    let mut s = engine
        .generate(Prompt::from("The capital of France is"), params.clone())
        .await
        .expect("added");
    let mut text = String::new();
    let mut finished = None;
    while let Some(u) = s.recv().await {
        text.extend(u.deltas.iter().map(|d| d.text.as_str()));
        if u.finished.is_some() {
            finished = u.finished;
        }
    }
    let out = finished.expect("finished update");
    assert_eq!(text, want[0].outputs[0].text);
    assert_eq!(out.outputs[0].token_ids, want[0].outputs[0].token_ids);

    // Dropping the stream aborts the request: its blocks are freed.
    let long = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(200)
    };
    let mut s = engine
        .generate(Prompt::from("Count with me: one, two,"), long)
        .await
        .expect("added");
    let first = s.recv().await.expect("an update");
    assert!(first.finished.is_none());
    assert!(engine.stats().await.expect("stats").num_owned_blocks > 0);
    drop(s);
    let mut stats = engine.stats().await.expect("stats");
    for _ in 0..50 {
        if stats.num_owned_blocks == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = engine.stats().await.expect("stats");
    }
    assert_eq!(
        (
            stats.num_owned_blocks,
            stats.num_streams,
            stats.num_runner_requests
        ),
        (0, 0, 0),
        "{stats:?}"
    );

    // Validation errors come back as the engine's error.
    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::greedy(2)
    };
    match engine.generate(Prompt::from("x"), bad).await {
        Err(AsyncEngineError::Engine(EngineError::InvalidParams(e))) => {
            assert_eq!(e.param, "top_p")
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted top_p = 0"),
    }
    assert!(matches!(
        engine
            .generate(Prompt::Tokens(vec![]), SamplingParams::greedy(2))
            .await,
        Err(AsyncEngineError::Engine(EngineError::Scheduler(_)))
    ));

    // After shutdown: EngineDead, never a panic.
    engine.shutdown();
    assert!(!engine.is_alive());
    assert!(matches!(
        engine
            .generate(Prompt::from("x"), SamplingParams::greedy(1))
            .await,
        Err(AsyncEngineError::EngineDead)
    ));
    assert!(matches!(
        engine.stats().await,
        Err(AsyncEngineError::EngineDead)
    ));
}
