//! The GGUF tokenizer of SmolLM2 against llama.cpp's token ids, HF round trip, bad input.

mod common;

use common::{golden, model_path, smollm2};
use trellis_engine::tokenizer::{Tokenizer, TokenizerError};

#[test]
fn golden_prompts_encode_to_llamacpp_ids() {
    let tok = smollm2();
    for case in golden() {
        // add_special_tokens = true: SmolLM2 has add_bos_token=false, so no BOS either way.
        let ids = tok.encode(&case.prompt, true).unwrap();
        assert_eq!(ids, case.prompt_token_ids, "prompt {:?}", case.prompt);
        assert_eq!(
            tok.encode(&case.prompt, false).unwrap(),
            case.prompt_token_ids
        );
    }
}

#[test]
fn golden_completions_decode_to_llamacpp_text() {
    let tok = smollm2();
    for case in golden() {
        let text = tok.decode(&case.completion_token_ids, true).unwrap();
        assert_eq!(text, case.completion_text, "prompt {:?}", case.prompt);
        for (id, piece) in case
            .completion_token_ids
            .iter()
            .zip(&case.completion_token_pieces)
        {
            if !tok.is_special(*id) {
                assert_eq!(&tok.decode(&[*id], true).unwrap(), piece, "token {id}");
            }
        }
    }
}

#[test]
fn hf_tokenizer_checks_match_transformers() {
    #[derive(serde::Deserialize)]
    struct Check {
        text: String,
        ids: Vec<u32>,
        pieces: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Checks {
        checks: Vec<Check>,
    }
    let checks: Checks =
        serde_json::from_str(include_str!("data/smollm2-hf-tokenizer-checks.json")).unwrap();
    let tok = smollm2();
    assert_eq!(checks.checks.len(), 7);
    for c in checks.checks {
        assert_eq!(
            tok.encode(&c.text, true).unwrap(),
            c.ids,
            "text {:?}",
            c.text
        );
        let pieces: Vec<String> = c.ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, c.pieces);
        assert_eq!(tok.decode(&c.ids, false).unwrap(), c.text);
    }
}

#[test]
fn special_tokens_are_single_tokens() {
    let tok = smollm2();
    assert_eq!(tok.encode("<|im_start|>", false).unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", false).unwrap(), vec![2]);
    assert_eq!(tok.encode("<|endoftext|>", false).unwrap(), vec![0]);
    assert_eq!(
        tok.encode("a<|im_end|>b", false)
            .unwrap()
            .iter()
            .filter(|&&i| i == 2)
            .count(),
        1
    );
    for id in [0, 1, 2] {
        assert!(tok.is_special(id), "id {id} is special");
    }
    assert!(!tok.is_special(504));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.decode(&[1, 4093, 2], true).unwrap(), "user");
    assert_eq!(
        tok.decode(&[1, 4093, 2], false).unwrap(),
        "<|im_start|>user<|im_end|>"
    );
}

#[test]
fn special_token_facts_from_gguf() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.add_bos_token());
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let template = tok.chat_template().expect("chat template in GGUF");
    assert!(
        template.starts_with("{% for message in messages %}"),
        "{template}"
    );
    assert!(template.contains("<|im_start|>") && template.contains("<|im_end|>"));
}

#[test]
fn from_gguf_content_matches_from_gguf() {
    let mut f = std::fs::File::open(model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf_content(&content).unwrap();
    for case in golden() {
        assert_eq!(
            tok.encode(&case.prompt, true).unwrap(),
            case.prompt_token_ids
        );
    }
}

#[test]
fn tricky_text_round_trips() {
    let tok = smollm2();
    for text in [
        "Hello 🦀 世界! naïve café — ½ 12345 3.14159",
        "  leading spaces\n\n\ttabs   and trailing  ",
        "don't I'll we've THEY'RE",
        "<|im_start|>system\nBe brief.<|im_end|>\n",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Digits are split one by one (smollm pre-tokenizer).
    let ids = tok.encode("12345", false).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
}

#[test]
fn save_hf_json_round_trip() {
    let tok = smollm2();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf_json(dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{
            "add_bos_token": false,
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "special": true},
            "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "x"}]
        }"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0]}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
    for case in golden() {
        assert_eq!(
            hf.encode(&case.prompt, true).unwrap(),
            case.prompt_token_ids
        );
        assert_eq!(
            hf.decode(&case.completion_token_ids, true).unwrap(),
            case.completion_text
        );
    }
    assert_eq!(hf.eos_token_ids(), &[2, 0]);
    assert_eq!(hf.bos_token_id(), Some(1));
    assert_eq!(hf.eos_token(), Some("<|im_end|>"));
    assert_eq!(hf.chat_template(), Some("{{ messages }}"));
    assert!(hf.is_special(0) && hf.is_special(1) && hf.is_special(2));

    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(dir.path().join("chat_template.jinja"), "JINJA").unwrap();
    assert_eq!(
        Tokenizer::from_hf_dir(dir.path()).unwrap().chat_template(),
        Some("JINJA")
    );
}

#[test]
fn hf_dir_adds_bos_when_asked() {
    let tok = smollm2();
    let dir = tempfile::tempdir().unwrap();
    tok.save_hf_json(dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": true, "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}"#,
    )
    .unwrap();
    let hf = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(hf.encode("The capital", true).unwrap()[0], 0);
    assert_eq!(hf.encode("The capital", false).unwrap()[0], 504);
    // Not doubled when the text already starts with BOS.
    assert_eq!(hf.encode("<|endoftext|>The", true).unwrap(), vec![0, 504]);
}

#[test]
fn missing_gguf_is_an_error_naming_the_path() {
    let err = Tokenizer::from_gguf("/nonexistent/dir/model.gguf").unwrap_err();
    assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/dir/model.gguf"),
        "{err}"
    );
}

#[test]
fn truncated_gguf_is_an_error_naming_the_path() {
    let bytes = std::fs::read(model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    std::fs::write(&path, &bytes[..1000]).unwrap();
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    // Not a GGUF at all.
    std::fs::write(&path, b"hello, this is not a model").unwrap();
    let err = Tokenizer::from_gguf(&path).unwrap_err();
    assert!(err.to_string().contains("truncated.gguf"), "{err}");
}

#[test]
fn bad_hf_dirs_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    smollm2()
        .save_hf_json(dir.path().join("tokenizer.json"))
        .unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), "[1, 2").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": "yes"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("add_bos_token"), "{err}");
}

#[test]
fn decode_out_of_range_id_does_not_panic() {
    let tok = smollm2();
    // Whatever `tokenizers` does with unknown ids, it must not panic.
    let _ = tok.decode(&[u32::MAX, 504], true);
}

/// Found by `trellis-fuzz tokenizer-json`: a tokenizer.json whose `decoder` holds a broken
/// string made the `tokenizers` library panic (`expect("Helper")`); it is now an error that
/// names the file.
#[test]
fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let crash = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz/tokenizer-json-decoder-panic.json");
    std::fs::copy(&crash, dir.path().join("tokenizer.json")).unwrap();
    let err = trellis_engine::tokenizer::Tokenizer::from_hf_dir(dir.path())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
