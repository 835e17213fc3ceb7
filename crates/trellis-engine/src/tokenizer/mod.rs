//! The tokenizer: text ⇄ token ids, plus what the engine needs around it (BOS/EOS ids, the
//! chat template and its special-token strings).
//!
//! A [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] (the HF `tokenizers` crate) and is built
//! from one of two sources:
//!
//! - a GGUF file ([`Tokenizer::from_gguf`]): the vocabulary, merges, token types and special
//!   ids in the `tokenizer.ggml.*` metadata are turned into an equivalent HF tokenizer; the
//!   pre-tokenizer follows `tokenizer.ggml.pre` with the same regexes llama.cpp uses (see
//!   `tokenizer/gguf.rs` for the table);
//! - a Hugging Face model directory ([`Tokenizer::from_hf_dir`]): `tokenizer.json`, plus the
//!   optional `tokenizer_config.json`, `generation_config.json` and `chat_template.jinja`.
//!
//! Why not llama.cpp's own tokenizer code: the `tokenizers` crate is what HF models ship with
//! and what vLLM uses, so a GGUF vocabulary is translated once into that form and everything
//! downstream (decode, incremental detokenization, saving a `tokenizer.json`) has one path.

mod gguf;
mod hf;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

/// Errors from loading or using a tokenizer. Messages name the file (or source) and the
/// problem.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that was read.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },
    /// A GGUF file could not be parsed (truncated, not GGUF, corrupt header).
    #[error("{path}: not a readable GGUF file: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What the GGUF reader reported.
        message: String,
    },
    /// A required metadata key is absent.
    #[error("{origin}: missing metadata key `{key}`")]
    MissingMetadata {
        /// The file or source whose metadata was read.
        origin: String,
        /// The missing key.
        key: String,
    },
    /// A metadata key is present but has the wrong type or an invalid value.
    #[error("{origin}: metadata key `{key}` is invalid: {message}")]
    BadMetadata {
        /// The file or source whose metadata was read.
        origin: String,
        /// The offending key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A JSON file is malformed or has an unexpected shape.
    #[error("{path}: bad JSON: {message}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parse or shape error.
        message: String,
    },
    /// The tokenizer model named in the metadata is not supported.
    #[error("{origin}: unsupported tokenizer model `{model}` (supported: gpt2, llama)")]
    UnsupportedModel {
        /// The file or source whose metadata was read.
        origin: String,
        /// The `tokenizer.ggml.model` value.
        model: String,
    },
    /// The `tokenizers` crate rejected the tokenizer we built or loaded.
    #[error("{origin}: cannot build tokenizer: {message}")]
    Build {
        /// The file or source the tokenizer came from.
        origin: String,
        /// The error from `tokenizers`.
        message: String,
    },
    /// Encoding text failed.
    #[error("encode failed: {0}")]
    Encode(String),
    /// Decoding ids failed (for example an id outside the vocabulary).
    #[error("decode failed: {0}")]
    Decode(String),
    /// Writing `tokenizer.json` failed.
    #[error("cannot write {path}: {message}")]
    Save {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Result alias for tokenizer operations.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A tokenizer with the special-token facts the engine needs.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    special_ids: HashSet<u32>,
}

/// Everything but the `tokenizers::Tokenizer` itself, gathered by the GGUF and HF loaders.
#[derive(Debug, Default)]
pub(crate) struct SpecialTokens {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl Tokenizer {
    /// Assembles a tokenizer from its parts; token strings are filled in from ids (and ids
    /// from strings) where only one side is known.
    pub(crate) fn assemble(inner: tokenizers::Tokenizer, mut sp: SpecialTokens) -> Self {
        if sp.bos_token.is_none() {
            sp.bos_token = sp.bos_token_id.and_then(|id| inner.id_to_token(id));
        }
        if sp.bos_token_id.is_none() {
            sp.bos_token_id = sp.bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        }
        if sp.eos_token.is_none() {
            sp.eos_token = sp
                .eos_token_ids
                .first()
                .and_then(|&id| inner.id_to_token(id));
        }
        let mut seen = HashSet::new();
        sp.eos_token_ids.retain(|id| seen.insert(*id));
        let special_ids = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, tok)| tok.special)
            .map(|(id, _)| *id)
            .collect();
        Self {
            inner,
            bos_token_id: sp.bos_token_id,
            eos_token_ids: sp.eos_token_ids,
            add_bos_token: sp.add_bos_token,
            chat_template: sp.chat_template,
            bos_token: sp.bos_token,
            eos_token: sp.eos_token,
            special_ids,
        }
    }

    /// Loads the tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| TokenizerError::Gguf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        gguf::build(&content, &path.display().to_string())
    }

    /// Builds the tokenizer from already-parsed GGUF metadata (the model loader reads the
    /// file once and hands the content to both the weights loader and this).
    pub fn from_gguf_content(content: &gguf_file::Content) -> Result<Self> {
        gguf::build(content, "GGUF metadata")
    }

    /// Loads a Hugging Face tokenizer directory: `tokenizer.json` (required),
    /// `tokenizer_config.json`, `generation_config.json` and `chat_template.jinja` (optional).
    ///
    /// Truncation and padding stored in `tokenizer.json` are switched off: the engine decides
    /// lengths itself (sentence-transformers models, for example, ship a padding setting that
    /// would otherwise change every encoding).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        hf::load_dir(dir.as_ref())
    }

    /// Encodes `text`. Special-token strings in the text (like `<|im_start|>`) are always
    /// recognised as single tokens. With `add_special_tokens`, the tokenizer's post-processor
    /// runs (HF tokenizers may add e.g. `[CLS]`/`[SEP]`) and the BOS token is prepended when
    /// the model asks for it (`add_bos_token`) and it is not already there.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens
            && self.add_bos_token
            && let Some(bos) = self.bos_token_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// A copy whose encodings are cut to `max_len` tokens, special tokens included (what
    /// sentence-transformers does with `max_seq_length`; the pooling runner's text inputs).
    pub fn truncating(&self, max_len: usize) -> Result<Self> {
        let mut t = self.clone();
        let params = tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        };
        t.inner
            .with_truncation(Some(params))
            .map_err(|e| TokenizerError::Build {
                origin: format!("truncation to {max_len} tokens"),
                message: e.to_string(),
            })?;
        Ok(t)
    }

    /// Decodes ids to text; with `skip_special_tokens`, special tokens (control tokens such
    /// as `<|im_end|>`) produce no text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The token string of `id` as stored in the vocabulary (byte-level form for GPT-2 style
    /// vocabularies, e.g. `Ġthe`), or `None` when out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary token string (in its stored form), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a special token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The BOS token id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Token ids that end generation (deduplicated, in declaration order).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The Jinja chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The BOS token string (`bos_token` in chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string (`eos_token` in chat templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json` (special-token facts such as
    /// `add_bos_token` and the chat template belong in `tokenizer_config.json`, which this does
    /// not write).
    pub fn save_hf_json(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Save {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }
}
