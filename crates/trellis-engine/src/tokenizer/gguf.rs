//! Building a `tokenizers::Tokenizer` from GGUF `tokenizer.ggml.*` metadata.
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the stored merges. The pre-tokenizer
//!   follows `tokenizer.ggml.pre` with llama.cpp's regexes (`llama-vocab.cpp`):
//!   `smollm`/`starcoder`/`refact`/`command-r`/`codeshell`/`exaone`/`minerva` split every digit
//!   (`\p{N}`) and then apply the GPT-2 regex — the same as the HF tokenizer.json of those
//!   models (`Digits(individual)` + `ByteLevel`); `gpt2`/`mpt`/`olmo`/`jais` use the GPT-2
//!   regex alone; `llama-bpe`/`llama3` and `qwen2`/`stablelm2` use their own regexes; anything
//!   else gets llama.cpp's default sequence of four regexes.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE (best effort): merges are derived from
//!   the vocabulary and `tokenizer.ggml.scores` as HF's converter does, `▁` replaces spaces,
//!   a `▁` is prepended unless `tokenizer.ggml.add_space_prefix = false`, unknown characters
//!   fall back to `<0xXX>` byte tokens.
//!
//! Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
//! Unknown and control tokens become special added tokens, user-defined ones non-special
//! added tokens, so that `<|im_start|>` and the like are single tokens wherever they appear.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::{Result, SpecialTokens, Tokenizer, TokenizerError};

const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 pre-tokenizer regex as llama.cpp writes it.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3 (`llama-bpe`), as adapted by llama.cpp (case-insensitive contractions spelled out).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 / StableLM2.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's default BPE pre-tokenizer: these four regexes applied one after the other.
const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// Typed access to GGUF metadata with errors that name the origin and key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    origin: &'a str,
}

impl<'a> Meta<'a> {
    fn bad(&self, key: &str, message: impl Into<String>) -> TokenizerError {
        TokenizerError::BadMetadata {
            origin: self.origin.to_string(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn missing(&self, key: &str) -> TokenizerError {
        TokenizerError::MissingMetadata {
            origin: self.origin.to_string(),
            key: key.to_string(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.md.get(key)
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(key, format!("expected a string, got {:?}", v.value_type()))),
        }
    }

    fn int_opt(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => value_as_i64(v).map(Some).ok_or_else(|| {
                self.bad(
                    key,
                    format!("expected an integer, got {:?}", v.value_type()),
                )
            }),
        }
    }

    fn id_opt(&self, key: &str, vocab_len: usize) -> Result<Option<u32>> {
        match self.int_opt(key)? {
            None => Ok(None),
            // Some converters write -1 (or u32::MAX) for "none".
            Some(v) if v < 0 || v == i64::from(u32::MAX) => Ok(None),
            Some(v) => {
                let id = u32::try_from(v)
                    .map_err(|_| self.bad(key, format!("{v} is not a token id")))?;
                if (id as usize) < vocab_len {
                    Ok(Some(id))
                } else {
                    Err(self.bad(
                        key,
                        format!("id {id} is outside the vocabulary of {vocab_len}"),
                    ))
                }
            }
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => value_as_i64(v)
                .map(|i| Some(i != 0))
                .ok_or_else(|| self.bad(key, "expected a boolean")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.bad(key, format!("expected an array, got {:?}", v.value_type()))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.bad(key, format!("element {i} is not a string"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                value_as_i64(v)
                    .ok_or_else(|| self.bad(key, format!("element {i} is not an integer")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(f) => Ok(f64::from(*f)),
                Value::F64(f) => Ok(*f),
                other => value_as_i64(other)
                    .map(|x| x as f64)
                    .ok_or_else(|| self.bad(key, format!("element {i} is not a number"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// Builds the tokenizer described by `content`'s metadata; `origin` names it in errors.
pub(crate) fn build(content: &Content, origin: &str) -> Result<Tokenizer> {
    let meta = Meta {
        md: &content.metadata,
        origin,
    };
    let model = meta
        .str_opt("tokenizer.ggml.model")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.model"))?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
    if tokens.is_empty() {
        return Err(meta.bad("tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types = match meta.ints("tokenizer.ggml.token_type")? {
        Some(t) if t.len() != tokens.len() => {
            return Err(meta.bad(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", t.len(), tokens.len()),
            ));
        }
        Some(t) => t,
        None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
    };

    let (mut inner, spm) = match model {
        "gpt2" => (build_gpt2(&meta, &tokens)?, false),
        "llama" => (build_spm(&meta, &tokens, &types)?, true),
        other => {
            return Err(TokenizerError::UnsupportedModel {
                origin: origin.to_string(),
                model: other.to_string(),
            });
        }
    };

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter_map(|(tok, ty)| match *ty {
            TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL => {
                Some(AddedToken::from(*tok, true).normalized(false))
            }
            TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(*tok, false).normalized(false)),
            _ => None,
        })
        .collect();
    inner
        .add_special_tokens(added)
        .map_err(|e| build_error(&meta, e))?;

    let n = tokens.len();
    let bos = meta.id_opt("tokenizer.ggml.bos_token_id", n)?;
    let mut eos_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = meta.id_opt(key, n)? {
            eos_ids.push(id);
        }
    }
    // llama.cpp's defaults when the key is absent: SentencePiece vocabularies add BOS,
    // byte-level BPE ones do not.
    let add_bos_token = meta
        .bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(spm);
    let chat_template = meta.str_opt("tokenizer.chat_template")?.map(str::to_string);
    Ok(Tokenizer::assemble(
        inner,
        SpecialTokens {
            bos_token_id: bos,
            eos_token_ids: eos_ids,
            add_bos_token,
            chat_template,
            bos_token: None,
            eos_token: None,
        },
    ))
}

fn build_error(meta: &Meta<'_>, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        origin: meta.origin.to_string(),
        message: e.to_string(),
    }
}

fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        // Keep the first id of a duplicated string; ids fit u32 (the GGUF reader caps arrays).
        vocab.entry((*tok).to_string()).or_insert(id as u32);
    }
    vocab
}

fn build_gpt2(meta: &Meta<'_>, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    let merges: Merges = meta
        .strings("tokenizer.ggml.merges")?
        .ok_or_else(|| meta.missing("tokenizer.ggml.merges"))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    meta.bad(
                        "tokenizer.ggml.merges",
                        format!("merge {i} `{m}` has no space"),
                    )
                })
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .build()
        .map_err(|e| build_error(meta, e))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    let pre = meta.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    tk.with_pre_tokenizer(Some(
        gpt2_pre_tokenizer(pre).map_err(|e| build_error(meta, e))?,
    ));
    tk.with_decoder(Some(ByteLevel::default()));
    Ok(tk)
}

fn split(regex: &str) -> tokenizers::Result<PreTokenizerWrapper> {
    Ok(Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )?
    .into())
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` name (see the module docs).
fn gpt2_pre_tokenizer(pre: &str) -> tokenizers::Result<PreTokenizerWrapper> {
    // ByteLevel without its own regex: it only maps bytes to the GPT-2 alphabet.
    let bytes_only = || PreTokenizerWrapper::from(ByteLevel::new(false, false, false));
    let seq = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ]
        }
        "gpt2" | "mpt" | "olmo" | "jais" | "trillion" => {
            vec![ByteLevel::new(false, true, true).into()]
        }
        "llama-bpe" | "llama3" => vec![split(LLAMA3_REGEX)?, bytes_only()],
        "qwen2" | "stablelm2" => vec![split(QWEN2_REGEX)?, bytes_only()],
        _ => {
            let mut v = DEFAULT_REGEXES
                .iter()
                .map(|r| split(r))
                .collect::<tokenizers::Result<Vec<_>>>()?;
            v.push(bytes_only());
            v
        }
    };
    Ok(PreSequence::new(seq).into())
}

fn build_spm(meta: &Meta<'_>, tokens: &[&str], types: &[i64]) -> Result<tokenizers::Tokenizer> {
    let scores = match meta.floats("tokenizer.ggml.scores")? {
        Some(s) if s.len() != tokens.len() => {
            return Err(meta.bad(
                "tokenizer.ggml.scores",
                format!("{} entries for {} tokens", s.len(), tokens.len()),
            ));
        }
        Some(s) => s,
        // Without scores, earlier ids merge first.
        None => (0..tokens.len()).map(|i| -(i as f64)).collect(),
    };
    let vocab = vocab_map(tokens);
    let merges = spm_merges(tokens, types, &scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab.clone(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = meta.id_opt("tokenizer.ggml.unknown_token_id", tokens.len())? {
        builder = builder.unk_token(tokens[unk as usize].to_string());
    } else if vocab.contains_key("<unk>") {
        builder = builder.unk_token("<unk>".to_string());
    }
    let bpe = builder.build().map_err(|e| build_error(meta, e))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);

    let add_space_prefix = meta
        .bool_opt("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace = Replace::new(" ", "▁").map_err(|e| build_error(meta, e))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".to_string()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tk.with_normalizer(Some(normalizer))
        .map_err(|e| build_error(meta, e))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")
            .map_err(|e| build_error(meta, e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tk)
}

/// Merges for a SentencePiece BPE vocabulary, as HF's `SentencePieceExtractor` derives them:
/// every split of a piece into two vocabulary pieces is a merge, ranked by the merged piece's
/// score (highest first), ties by the ids of the parts.
fn spm_merges(tokens: &[&str], types: &[i64], scores: &[f64], vocab: &Vocab) -> Merges {
    let mut found: Vec<(f64, u32, u32, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL);
        if ty != TOKEN_TYPE_NORMAL && ty != TOKEN_TYPE_USER_DEFINED {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local = Vec::new();
        for (split_at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split_at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((score, li, ri, l, r));
            }
        }
        local.sort_by_key(|&(_, li, ri, _, _)| (li, ri));
        found.extend(local);
    }
    // Stable sort: equal scores keep vocabulary order.
    found.sort_by(|a, b| b.0.total_cmp(&a.0));
    found
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}
