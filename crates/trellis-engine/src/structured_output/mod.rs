//! Structured outputs: constrain what a request may generate to a JSON schema, a regex, a list
//! of choices or a Lark grammar (vLLM's `StructuredOutputsParams`, served by its `guidance`
//! backend), built on [`llguidance`].
//!
//! ```text
//! startup:   Tokenizer ─► StructuredOutputBackend::new   (token bytes → llguidance TokTrie, once)
//! add time:  SamplingParams.structured_outputs ─► backend.compile() ─► GrammarMatcher   (400 on error)
//! each step: ModelRunner: the constrained rows' masks (GrammarMatcher::compute_mask) before
//!            the forward; apply_mask(row) before the sampler; accept(token) after it
//! ```
//!
//! Why llguidance: it is the library behind vLLM's `guidance` backend and llama.cpp's
//! `%llguidance` grammars; it computes a token mask from a lazily built lexer and an Earley
//! parser over the tokenizer's byte trie in tens of microseconds, and it compiles JSON schemas,
//! regexes and Lark grammars itself, so we keep no hand-written matcher.
//!
//! EOS is in the mask only where the grammar accepts, so a constrained request ends with
//! `stop` exactly when its output is complete, or with `length` when `max_tokens` comes first
//! (as in vLLM). Unconstrained requests never touch this module.

mod backend;
mod matcher;

pub use backend::StructuredOutputBackend;
pub use matcher::GrammarMatcher;

use crate::sampling_params::SamplingParamsError;

/// vLLM's `StructuredOutputsParams`: exactly one of `json`, `regex`, `choice`, `grammar` and
/// `json_object` is set; `whitespace_pattern` and `disable_any_whitespace` shape the JSON
/// that `json` and `json_object` allow.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StructuredOutputsParams {
    /// A JSON schema (an object, or a string holding one); `true` allows any JSON object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// A regular expression (Rust `regex` syntax) the whole output must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The output is exactly one of these strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice: Option<Vec<String>>,
    /// A grammar in llguidance's Lark syntax (or its JSON grammar list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_object: Option<bool>,
    /// The whitespace allowed between JSON tokens, as a regex (llguidance's
    /// `whitespace_pattern`); default: any JSON whitespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whitespace_pattern: Option<String>,
    /// No whitespace at all between JSON tokens (compact JSON).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disable_any_whitespace: bool,
    /// Accepted for vLLM compatibility; llguidance always enforces the schema's own
    /// `additionalProperties`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disable_fallback: bool,
}

/// The whitespace allowed between two JSON tokens by default: one space, or a newline and an
/// indentation of at most 20 spaces or tabs (llama.cpp's rule for JSON-schema grammars).
/// Unbounded whitespace (llguidance's own default) lets a small model loop on blank lines
/// until `max_tokens`; pretty-printed JSON still fits.
pub const DEFAULT_WHITESPACE: &str = r"(?: |\n[ \t]{0,20})";

/// The parameter name errors are reported under.
pub const PARAM: &str = "structured_outputs";

fn invalid(message: String) -> SamplingParamsError {
    SamplingParamsError {
        param: PARAM,
        message,
    }
}

/// The kind of constraint a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintKind {
    /// `json`.
    Json,
    /// `json_object`.
    JsonObject,
    /// `regex`.
    Regex,
    /// `choice`.
    Choice,
    /// `grammar`.
    Grammar,
}

impl StructuredOutputsParams {
    /// A JSON-schema constraint.
    pub fn json_schema(schema: serde_json::Value) -> Self {
        StructuredOutputsParams {
            json: Some(schema),
            ..Default::default()
        }
    }

    /// A regex constraint.
    pub fn regex(regex: impl Into<String>) -> Self {
        StructuredOutputsParams {
            regex: Some(regex.into()),
            ..Default::default()
        }
    }

    /// A choice constraint.
    pub fn choice(choices: Vec<String>) -> Self {
        StructuredOutputsParams {
            choice: Some(choices),
            ..Default::default()
        }
    }

    /// A Lark-grammar constraint.
    pub fn grammar(grammar: impl Into<String>) -> Self {
        StructuredOutputsParams {
            grammar: Some(grammar.into()),
            ..Default::default()
        }
    }

    /// Which constraint is set; an error unless exactly one is (vLLM's texts).
    pub fn kind(&self) -> Result<ConstraintKind, SamplingParamsError> {
        let set: Vec<(&str, ConstraintKind)> = [
            (self.json.is_some(), "json", ConstraintKind::Json),
            (self.regex.is_some(), "regex", ConstraintKind::Regex),
            (self.choice.is_some(), "choice", ConstraintKind::Choice),
            (self.grammar.is_some(), "grammar", ConstraintKind::Grammar),
            (
                self.json_object == Some(true),
                "json_object",
                ConstraintKind::JsonObject,
            ),
        ]
        .into_iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, name, kind)| (name, kind))
        .collect();
        match set.as_slice() {
            [(_, kind)] => Ok(*kind),
            [] => Err(invalid(
                "You must use one kind of structured outputs constraint but none are specified \
                 (json, regex, choice, grammar or json_object)."
                    .into(),
            )),
            many => Err(invalid(format!(
                "You can only use one kind of structured outputs constraint but multiple are \
                 specified: {}.",
                many.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The checks that need no tokenizer: one kind set, non-empty choices and grammar, a
    /// schema that is a JSON object or `true`. Compiling (at add time) checks the rest.
    pub fn validate(&self) -> Result<(), SamplingParamsError> {
        match self.kind()? {
            ConstraintKind::Choice => {
                let choices = self.choice.as_deref().unwrap_or_default();
                if choices.is_empty() {
                    return Err(invalid(
                        "structured_outputs.choice must list at least one choice.".into(),
                    ));
                }
            }
            ConstraintKind::Grammar => {
                if self
                    .grammar
                    .as_deref()
                    .unwrap_or_default()
                    .trim()
                    .is_empty()
                {
                    return Err(invalid(
                        "structured_outputs.grammar must not be empty.".into(),
                    ));
                }
            }
            ConstraintKind::Regex => {
                if self.regex.as_deref().unwrap_or_default().is_empty() {
                    return Err(invalid(
                        "structured_outputs.regex must not be empty.".into(),
                    ));
                }
            }
            ConstraintKind::Json => {
                self.schema()?;
            }
            ConstraintKind::JsonObject => {}
        }
        Ok(())
    }

    /// The JSON schema of a `json` or `json_object` constraint, with the whitespace options
    /// applied (llguidance's `x-guidance` key).
    pub(crate) fn schema(&self) -> Result<serde_json::Value, SamplingParamsError> {
        use serde_json::Value;
        let schema = match (&self.json, self.json_object) {
            (Some(Value::Bool(true)), _) | (None, Some(true)) => {
                serde_json::json!({"type": "object"})
            }
            (Some(Value::String(s)), _) => serde_json::from_str::<Value>(s).map_err(|e| {
                invalid(format!(
                    "structured_outputs.json is a string but not valid JSON: {e}."
                ))
            })?,
            (Some(v), _) => v.clone(),
            (None, _) => {
                return Err(invalid("structured_outputs has no JSON schema.".into()));
            }
        };
        let Value::Object(mut obj) = schema else {
            return Err(invalid(format!(
                "structured_outputs.json must be a JSON schema object (or true), got {}.",
                short(&schema)
            )));
        };
        let mut options = serde_json::Map::new();
        if self.disable_any_whitespace {
            options.insert("whitespace_flexible".into(), Value::Bool(false));
        } else {
            let pattern = self
                .whitespace_pattern
                .as_deref()
                .unwrap_or(DEFAULT_WHITESPACE);
            options.insert("whitespace_pattern".into(), Value::String(pattern.into()));
        }
        obj.insert("x-guidance".into(), Value::Object(options));
        Ok(Value::Object(obj))
    }
}

/// The log-probability reported for a token the grammar forbids (vLLM's floor: JSON has no
/// `-inf`).
pub const MASKED_LOGPROB: f32 = -9999.0;

/// Logprobs of a constrained row are of the constrained distribution: forbidden tokens have
/// `-inf`, reported as [`MASKED_LOGPROB`].
pub(crate) fn clamp_masked_logprobs(lp: &mut crate::sampler::PositionLogprobs) {
    lp.logprob = lp.logprob.max(MASKED_LOGPROB);
    for (_, l) in &mut lp.top {
        *l = l.max(MASKED_LOGPROB);
    }
}

/// A value's JSON, cut for an error message.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exactly_one_kind() {
        assert_eq!(
            StructuredOutputsParams::regex("a+").kind(),
            Ok(ConstraintKind::Regex)
        );
        let none = StructuredOutputsParams::default().validate().unwrap_err();
        assert_eq!(none.param, PARAM);
        assert!(none.message.contains("none are specified"));
        let two = StructuredOutputsParams {
            regex: Some("a".into()),
            choice: Some(vec!["b".into()]),
            ..Default::default()
        };
        let e = two.validate().unwrap_err();
        assert!(
            e.message.contains("multiple are specified: regex, choice"),
            "{e}"
        );
    }

    #[test]
    fn schema_forms() {
        let ws = json!({"whitespace_pattern": DEFAULT_WHITESPACE});
        let any = StructuredOutputsParams::json_schema(json!(true));
        assert_eq!(
            any.schema().unwrap(),
            json!({"type": "object", "x-guidance": ws})
        );
        let text = StructuredOutputsParams::json_schema(json!("{\"type\": \"integer\"}"));
        assert_eq!(
            text.schema().unwrap(),
            json!({"type": "integer", "x-guidance": ws})
        );
        let bad = StructuredOutputsParams::json_schema(json!("{not json"));
        assert!(
            bad.validate()
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
        let array = StructuredOutputsParams::json_schema(json!([1, 2]));
        assert!(array.validate().unwrap_err().message.contains("[1,2]"));
        let compact = StructuredOutputsParams {
            disable_any_whitespace: true,
            ..StructuredOutputsParams::json_schema(json!({"type": "object"}))
        };
        assert_eq!(
            compact.schema().unwrap()["x-guidance"],
            json!({"whitespace_flexible": false})
        );
        assert!(
            StructuredOutputsParams::choice(vec![])
                .validate()
                .unwrap_err()
                .message
                .contains("at least one")
        );
    }

    #[test]
    fn deserializes_vllm_shape() {
        let p: StructuredOutputsParams =
            serde_json::from_value(json!({"choice": ["yes", "no"]})).unwrap();
        assert_eq!(p.kind(), Ok(ConstraintKind::Choice));
        assert!(serde_json::from_value::<StructuredOutputsParams>(json!({"jsn": {}})).is_err());
    }
}
