//! Incremental detokenization on the real SmolLM2 tokenizer, and stop strings.

mod common;

use common::{golden, smollm2};
use trellis_engine::detokenizer::{IncrementalDetokenizer, StopCheck, StopChecker};

#[test]
fn golden_completions_stream_to_the_full_decode() {
    let tok = smollm2();
    for case in golden() {
        for prompt in [None, Some(case.prompt_token_ids.as_slice())] {
            let mut detok = IncrementalDetokenizer::new(prompt, true);
            let mut streamed = String::new();
            for id in &case.completion_token_ids {
                let delta = detok.push(tok, &[*id]);
                assert!(!delta.contains('\u{FFFD}'), "{delta:?}");
                streamed.push_str(&delta);
            }
            streamed.push_str(&detok.flush(tok));
            assert_eq!(
                streamed,
                tok.decode(&case.completion_token_ids, true).unwrap()
            );
            assert_eq!(streamed, case.completion_text);
            assert_eq!(detok.output_text(), streamed);
        }
    }
}

#[test]
fn multibyte_characters_never_stream_as_replacement_chars() {
    let tok = smollm2();
    let text = "Crab: 🦀🦀, 世界你好, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ẞ — done";
    let ids = tok.encode(text, false).unwrap();
    // The test is only meaningful if some single token decodes to an incomplete character.
    let partial = ids
        .iter()
        .filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(partial > 0, "expected byte-split characters in {ids:?}");

    let mut detok = IncrementalDetokenizer::new(None, false);
    let mut streamed = String::new();
    let mut empty_steps = 0;
    for id in &ids {
        let delta = detok.push(tok, &[*id]);
        assert!(!delta.contains('\u{FFFD}'), "token {id} gave {delta:?}");
        empty_steps += usize::from(delta.is_empty());
        streamed.push_str(&delta);
    }
    assert!(empty_steps > 0, "some tokens should have been held back");
    assert_eq!(detok.flush(tok), "");
    assert_eq!(streamed, text);

    // Several ids at once behave the same.
    let mut detok = IncrementalDetokenizer::new(None, false);
    let mut chunks = String::new();
    for chunk in ids.chunks(3) {
        chunks.push_str(&detok.push(tok, chunk));
    }
    assert_eq!(chunks, text);
}

#[test]
fn special_tokens_skipped_or_kept() {
    let tok = smollm2();
    let ids = tok.encode("Hi<|im_end|>", false).unwrap();
    let mut skip = IncrementalDetokenizer::new(None, true);
    let mut keep = IncrementalDetokenizer::new(None, false);
    let (mut a, mut b) = (String::new(), String::new());
    for id in &ids {
        a.push_str(&skip.push(tok, &[*id]));
        b.push_str(&keep.push(tok, &[*id]));
    }
    assert_eq!(a, "Hi");
    assert_eq!(b, "Hi<|im_end|>");
}

#[test]
fn incomplete_character_at_the_end_is_flushed() {
    let tok = smollm2();
    let ids = tok.encode("🦀", false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut detok = IncrementalDetokenizer::new(None, true);
    assert_eq!(detok.push(tok, &ids[..1]), "");
    assert!(detok.flush(tok).contains('\u{FFFD}'));
}

/// Streams `deltas` through a checker as the output processor would.
fn stream(stop: &[&str], include: bool, deltas: &[&str]) -> (String, Option<String>, String) {
    let mut checker = StopChecker::new(stop.iter().map(|s| s.to_string()).collect(), include);
    let mut acc = String::new();
    let mut out = String::new();
    for (i, d) in deltas.iter().enumerate() {
        acc.push_str(d);
        let finished = i + 1 == deltas.len();
        let StopCheck {
            text,
            stop,
            truncate_to,
        } = checker.check(&acc, d.len(), finished);
        out.push_str(&text);
        if let Some(s) = stop {
            acc.truncate(truncate_to.expect("a stop has a truncation point"));
            return (out, Some(s), acc);
        }
    }
    (out, None, acc)
}

#[test]
fn stop_string_across_token_boundaries_is_trimmed() {
    let (out, stop, acc) = stream(&["STOP"], false, &["Hello S", "T", "OP and more"]);
    assert_eq!(out, "Hello ");
    assert_eq!(stop.as_deref(), Some("STOP"));
    assert_eq!(acc, "Hello ");
}

#[test]
fn stop_string_kept_with_include_stop_str_in_output() {
    let (out, stop, acc) = stream(&["STOP"], true, &["Hello S", "T", "OP and more"]);
    assert_eq!(out, "Hello STOP");
    assert_eq!(stop.as_deref(), Some("STOP"));
    assert_eq!(acc, "Hello STOP");
}

#[test]
fn earliest_of_several_stop_strings_wins() {
    // "world" is listed first but "lo w" starts earlier.
    let (out, stop, _) = stream(&["world", "lo w"], false, &["Hello world"]);
    assert_eq!(out, "Hel");
    assert_eq!(stop.as_deref(), Some("lo w"));
    // Same start: the longer one.
    let (out, stop, _) = stream(&["ab", "abc"], true, &["xx", "abcd"]);
    assert_eq!(out, "xxabc");
    assert_eq!(stop.as_deref(), Some("abc"));
}

#[test]
fn possible_stop_prefix_is_held_back_then_released() {
    let mut checker = StopChecker::new(vec!["</answer>".into()], false);
    let mut acc = String::from("The result </");
    let step = checker.check(&acc, acc.len(), false);
    assert_eq!(step.text, "The result ", "'</' may begin the stop string");
    acc.push_str("b> is bold");
    let step = checker.check(&acc, 10, false);
    assert_eq!(step.text, "</b> is bold");
    assert!(step.stop.is_none() && !checker.is_stopped());
    // Finished: nothing is held back.
    acc.push_str(" </ans");
    let step = checker.check(&acc, 6, true);
    assert_eq!(step.text, " </ans");
}

#[test]
fn stop_checking_is_utf8_safe() {
    let (out, stop, _) = stream(&["世界", "é!"], false, &["héllo 世", "界 more"]);
    assert_eq!(out, "héllo ");
    assert_eq!(stop.as_deref(), Some("世界"));
    let (out, stop, _) = stream(&["🦀🦀"], false, &["a🦀", "b🦀", "🦀c"]);
    assert_eq!(out, "a🦀b");
    assert_eq!(stop.as_deref(), Some("🦀🦀"));
    let (out, stop, _) = stream(&["xyz", ""], false, &["ünïcödé", " text"]);
    assert_eq!(out, "ünïcödé text");
    assert!(stop.is_none());
}

#[test]
fn stop_strings_on_real_detokenized_stream() {
    let tok = smollm2();
    let case = &golden()[0];
    // "United States" spans two tokens (" United", " States").
    let mut detok = IncrementalDetokenizer::new(Some(&case.prompt_token_ids), true);
    let mut checker = StopChecker::new(vec!["d Sta".into()], false);
    let mut out = String::new();
    let mut stopped_at = None;
    for (i, id) in case.completion_token_ids.iter().enumerate() {
        let delta = detok.push(tok, &[*id]);
        let step = checker.check(detok.output_text(), delta.len(), false);
        out.push_str(&step.text);
        if step.stop.is_some() {
            stopped_at = Some(i);
            break;
        }
    }
    assert_eq!(out, " Paris.\n\nThe Unite");
    assert_eq!(stopped_at, Some(6));
}
