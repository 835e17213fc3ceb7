//! SentencePiece-style ("llama") GGUF vocabularies, on a tiny hand-made vocabulary.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use trellis_engine::tokenizer::{Tokenizer, TokenizerError};

fn content(md: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// <unk>, <s>, </s>, 256 byte tokens, then pieces with scores.
fn tiny_spm() -> Content {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.1),
        ("l", -2.2),
        ("o", -2.3),
        ("w", -2.4),
        ("r", -2.5),
        ("d", -2.6),
        ("ll", -3.0),
        ("▁h", -3.1),
        ("▁he", -3.2),
        ("llo", -3.3),
        ("▁hello", -3.4),
        ("▁w", -3.5),
        ("or", -3.6),
        ("▁wor", -3.7),
        ("ld", -3.8),
        ("▁world", -3.9),
    ];
    for (p, s) in pieces {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(s);
    }
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    content(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&refs)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ])
}

#[test]
fn spm_vocab_encodes_with_space_prefix_bos_and_byte_fallback() {
    let tok = Tokenizer::from_gguf_content(&tiny_spm()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(tok.add_bos_token(), "SPM default adds BOS");
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.bos_token(), Some("<s>"));

    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, id("▁hello"), id("▁world")]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello world");

    // "é" is not in the vocabulary: its two UTF-8 bytes come out as byte tokens.
    let ids = tok.encode("hé", false).unwrap();
    assert_eq!(ids, vec![id("▁h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "hé");

    // Control tokens are single tokens and special.
    assert_eq!(tok.encode("</s>", false).unwrap().last(), Some(&2));
    assert!(tok.is_special(2) && !tok.is_special(id("▁hello")));
}

#[test]
fn unsupported_or_incomplete_metadata_is_an_error() {
    let err = Tokenizer::from_gguf_content(&content(vec![])).unwrap_err();
    assert!(
        matches!(err, TokenizerError::MissingMetadata { ref key, .. } if key == "tokenizer.ggml.model"),
        "{err}"
    );

    let err = Tokenizer::from_gguf_content(&content(vec![
        ("tokenizer.ggml.model", Value::String("bert".into())),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported tokenizer model `bert`"),
        "{err}"
    );

    let err = Tokenizer::from_gguf_content(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b"])),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let err = Tokenizer::from_gguf_content(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
        ("tokenizer.ggml.merges", strings(&["a b"])),
        ("tokenizer.ggml.eos_token_id", Value::U32(99)),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");

    let err = Tokenizer::from_gguf_content(&content(vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::U32(3)),
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("expected an array"), "{err}");
}
