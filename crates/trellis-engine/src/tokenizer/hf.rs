//! Loading a Hugging Face tokenizer directory.
//!
//! Files: `tokenizer.json` (required); `tokenizer_config.json` (`add_bos_token`, `bos_token`,
//! `eos_token` — a string or an `{"content": ..}` object —, `chat_template` — a string or a
//! list of `{name, template}` of which `default` is taken); `generation_config.json`
//! (`eos_token_id`, an integer or a list; `bos_token_id`); `chat_template.jinja`, which wins
//! over `chat_template` in `tokenizer_config.json` as in transformers.

use std::path::Path;

use serde_json::Value;

use super::{Result, SpecialTokens, Tokenizer, TokenizerError};

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_json_optional(path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| TokenizerError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if !value.is_object() {
        return Err(TokenizerError::Json {
            path: path.to_path_buf(),
            message: "expected a JSON object at the top level".to_string(),
        });
    }
    Ok(Some(value))
}

fn shape_error(path: &Path, message: String) -> TokenizerError {
    TokenizerError::Json {
        path: path.to_path_buf(),
        message,
    }
}

/// A special-token entry: `"<s>"` or `{"content": "<s>", ...}`; `null` means none.
fn token_string(path: &Path, key: &str, v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(shape_error(
                path,
                format!("`{key}` object has no string `content`"),
            )),
        },
        Some(other) => Err(shape_error(
            path,
            format!("`{key}` must be a string or an object, got {other}"),
        )),
    }
}

/// `eos_token_id`/`bos_token_id`: an integer or a list of integers; `null` means none.
fn token_ids(path: &Path, key: &str, v: Option<&Value>) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| shape_error(path, format!("`{key}` must hold token ids, got {v}")))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the `default` one is taken).
fn chat_template(path: &Path, v: Option<&Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for entry in list {
                if entry.get("name").and_then(Value::as_str) == Some("default") {
                    return match entry.get("template") {
                        Some(Value::String(t)) => Ok(Some(t.clone())),
                        _ => Err(shape_error(
                            path,
                            "`chat_template` entry `default` has no string `template`".into(),
                        )),
                    };
                }
            }
            Ok(None)
        }
        Some(other) => Err(shape_error(
            path,
            format!("`chat_template` must be a string or a list, got {other}"),
        )),
    }
}

/// Parses a `tokenizer.json` with the `tokenizers` library, which panics on some malformed
/// files (found by fuzzing: a broken string inside `decoder`): the JSON syntax is checked
/// first, and a panic that still escapes is turned into an error naming the file.
fn parse_tokenizer_json(path: &Path, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    let bad = |message: String| TokenizerError::Json {
        path: path.to_path_buf(),
        message,
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| bad(e.to_string()))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(r) => r.map_err(|e| bad(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(bad(format!(
                "the tokenizers library cannot read it ({msg})"
            )))
        }
    }
}

pub(crate) fn load_dir(dir: &Path) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&tok_path).map_err(|source| TokenizerError::Io {
        path: tok_path.clone(),
        source,
    })?;
    let mut inner = parse_tokenizer_json(&tok_path, &bytes)?;
    inner
        .with_truncation(None)
        .map_err(|e| TokenizerError::Build {
            origin: tok_path.display().to_string(),
            message: e.to_string(),
        })?;
    inner.with_padding(None);

    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json_optional(&cfg_path)?.unwrap_or(Value::Null);
    let gen_path = dir.join("generation_config.json");
    let gen_cfg = read_json_optional(&gen_path)?.unwrap_or(Value::Null);

    let add_bos_token = match cfg.get("add_bos_token") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(shape_error(
                &cfg_path,
                format!("`add_bos_token` must be a boolean, got {other}"),
            ));
        }
    };
    let bos_token = token_string(&cfg_path, "bos_token", cfg.get("bos_token"))?;
    let eos_token = token_string(&cfg_path, "eos_token", cfg.get("eos_token"))?;

    let mut eos_token_ids = Vec::new();
    if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
        eos_token_ids.push(id);
    }
    eos_token_ids.extend(token_ids(
        &gen_path,
        "eos_token_id",
        gen_cfg.get("eos_token_id"),
    )?);
    let bos_token_id = bos_token
        .as_deref()
        .and_then(|t| inner.token_to_id(t))
        .or(
            token_ids(&gen_path, "bos_token_id", gen_cfg.get("bos_token_id"))?
                .first()
                .copied(),
        );

    let jinja = read_optional(&dir.join("chat_template.jinja"))?;
    let chat_template = match jinja {
        Some(t) => Some(t),
        None => chat_template(&cfg_path, cfg.get("chat_template"))?,
    };

    Ok(Tokenizer::assemble(
        inner,
        SpecialTokens {
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            chat_template,
            bos_token,
            eos_token,
        },
    ))
}
