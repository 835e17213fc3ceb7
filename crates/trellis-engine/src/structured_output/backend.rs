//! The llguidance side that lives once per engine: the tokenizer's vocabulary as a token trie
//! (built at startup), the parser factory, and a small cache of compiled grammars.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};

use super::{ConstraintKind, GrammarMatcher, PARAM, StructuredOutputsParams};
use crate::sampling_params::SamplingParamsError;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Compiled grammars kept for reuse (a tool schema or a response format repeats across
/// requests, and `n > 1` compiles once); the cache is emptied when full.
const GRAMMAR_CACHE_SIZE: usize = 64;

/// The vocabulary as llguidance sees it, with our tokenizer for the canonical tokenization of
/// forced bytes.
struct TrellisTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for TrellisTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode_fast(text, false) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Grammar compilation for one engine.
pub struct StructuredOutputBackend {
    factory: ParserFactory,
    cache: HashMap<String, TokenParser>,
}

impl std::fmt::Debug for StructuredOutputBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StructuredOutputBackend")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .field("cached_grammars", &self.cache.len())
            .finish()
    }
}

fn build_error(message: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        origin: "structured outputs (llguidance token trie)".into(),
        message: message.to_string(),
    }
}

impl StructuredOutputBackend {
    /// Turns the tokenizer's vocabulary into llguidance's token trie: byte-level tokens by
    /// their bytes, special tokens marked so that no grammar can produce them; ids the model
    /// has beyond the tokenizer's vocabulary are never allowed. EOS is the tokenizer's EOS
    /// ids (all of them).
    pub fn new(tokenizer: &Tokenizer, model_vocab_size: usize) -> Result<Self, TokenizerError> {
        let json = serde_json::to_value(tokenizer.inner()).map_err(build_error)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(build_error)?;
        if words.len() > model_vocab_size {
            return Err(build_error(format!(
                "the tokenizer has {} tokens, more than the model's vocabulary of {model_vocab_size}",
                words.len()
            )));
        }
        words.resize(model_vocab_size, Vec::new());
        let eos = tokenizer.eos_token_ids();
        let first_eos = *eos
            .first()
            .ok_or_else(|| build_error("the tokenizer has no EOS token"))?;
        let info = TokRxInfo::new(model_vocab_size as u32, first_eos);
        let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words).with_eos_tokens(eos))
            .map_err(|_| build_error("llguidance could not build the token trie"))?;
        let env: TokEnv = Arc::new(TrellisTokEnv {
            trie,
            tokenizer: tokenizer.inner().clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(build_error)?;
        factory.quiet();
        Ok(StructuredOutputBackend {
            factory,
            cache: HashMap::new(),
        })
    }

    /// Compiles a request's constraint into a fresh matcher; an invalid schema, regex or
    /// grammar (or an unsupported schema keyword) is an error naming the field and the reason.
    pub fn compile(
        &mut self,
        params: &StructuredOutputsParams,
    ) -> Result<GrammarMatcher, SamplingParamsError> {
        let kind = params.kind()?;
        let key = serde_json::to_string(params).map_err(|e| SamplingParamsError {
            param: PARAM,
            message: e.to_string(),
        })?;
        let parser = match self.cache.get(&key) {
            Some(p) => p.deep_clone(),
            None => {
                let factory = &self.factory;
                let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    top_level_grammar(params, kind).map(|g| factory.create_parser(g))
                }));
                let parser = match compiled {
                    Ok(Ok(Ok(parser))) => parser,
                    Ok(Ok(Err(e))) => return Err(invalid(kind, first_line(&e.to_string()))),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(invalid(kind, "the grammar compiler panicked")),
                };
                if self.cache.len() >= GRAMMAR_CACHE_SIZE {
                    self.cache.clear();
                }
                let copy = parser.deep_clone();
                self.cache.insert(key, parser);
                copy
            }
        };
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(kind, first_line(&e)));
        }
        Ok(GrammarMatcher::new(matcher))
    }
}

fn invalid(kind: ConstraintKind, reason: impl std::fmt::Display) -> SamplingParamsError {
    SamplingParamsError {
        param: PARAM,
        message: format!("Invalid structured_outputs.{}: {reason}", field_name(kind)),
    }
}

/// An llguidance error on one line, cut to a readable length.
fn first_line(s: &str) -> String {
    let joined = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    match joined.char_indices().nth(400) {
        Some((i, _)) => format!("{}...", &joined[..i]),
        None => joined,
    }
}

fn field_name(kind: ConstraintKind) -> &'static str {
    match kind {
        ConstraintKind::Json => "json",
        ConstraintKind::JsonObject => "json_object",
        ConstraintKind::Regex => "regex",
        ConstraintKind::Choice => "choice",
        ConstraintKind::Grammar => "grammar",
    }
}

/// The llguidance grammar of a constraint: JSON schemas as they are, a regex as a one-rule
/// Lark grammar, choices as an alternation of JSON-quoted literals.
fn top_level_grammar(
    params: &StructuredOutputsParams,
    kind: ConstraintKind,
) -> Result<TopLevelGrammar, SamplingParamsError> {
    Ok(match kind {
        ConstraintKind::Json | ConstraintKind::JsonObject => {
            TopLevelGrammar::from_json_schema(params.schema()?)
        }
        ConstraintKind::Regex => TopLevelGrammar::from_regex(params.regex.as_deref().unwrap_or("")),
        ConstraintKind::Choice => {
            let alternatives: Vec<String> = params
                .choice
                .iter()
                .flatten()
                .map(|c| serde_json::Value::String(c.clone()).to_string())
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
        }
        ConstraintKind::Grammar => {
            TopLevelGrammar::from_lark_or_grammar_list(params.grammar.as_deref().unwrap_or(""))
                .map_err(|e| invalid(kind, first_line(&e.to_string())))?
        }
    })
}
