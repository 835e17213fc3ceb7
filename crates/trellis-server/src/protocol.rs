//! OpenAI wire types (requests and responses), with vLLM's extra sampling fields.
//!
//! Numbers a client may get wrong (`max_tokens`, `n`, `logprobs`, ...) are read as signed
//! integers so that a negative value is answered with a 400 naming the parameter, not with a
//! generic JSON error.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `prompt` of a completion request: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One text.
    Text(String),
    /// Several texts (one request each).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
    /// Put the usage so far in every chunk (vLLM's extension).
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

impl StreamOptions {
    /// `(include_usage, continuous usage)` of a request's options: as in vLLM, continuous
    /// usage needs `include_usage` too.
    pub fn usage_flags(options: Option<&StreamOptions>) -> (bool, bool) {
        let include = options.is_some_and(|o| o.include_usage);
        (
            include,
            include && options.is_some_and(|o| o.continuous_usage_stats),
        )
    }
}

/// The sampling fields completions and chat completions share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Model name; must be the served one when given.
    pub model: Option<String>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
    /// Completions per prompt.
    pub n: Option<i64>,
    /// Softmax temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k (vLLM).
    pub top_k: Option<i32>,
    /// Min-p (vLLM).
    pub min_p: Option<f32>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// Stop token ids (vLLM).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Per-request seed.
    pub seed: Option<i64>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (vLLM).
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) → bias.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// End-user id (accepted, unused).
    pub user: Option<String>,
    /// Fewest generated tokens (vLLM).
    pub min_tokens: Option<i64>,
    /// Keep going past EOS (vLLM).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Leave special tokens out of the text (vLLM; default true).
    pub skip_special_tokens: Option<bool>,
    /// Keep a matched stop string (vLLM).
    #[serde(default)]
    pub include_stop_str_in_output: bool,
    /// Constrain the output: JSON schema, regex, choice or grammar (vLLM's extra field).
    pub structured_outputs: Option<Box<trellis_engine::StructuredOutputsParams>>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: PromptInput,
    /// Most tokens to generate; default: what is left of the context.
    pub max_tokens: Option<i64>,
    /// Top log-probabilities per token (0..=20).
    pub logprobs: Option<i64>,
    /// Put the prompt in front of the completion.
    #[serde(default)]
    pub echo: bool,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// One text part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    pub text: Option<String>,
}

/// A message's content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts.
    Parts(Vec<ContentPart>),
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageInput {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The content (may be null for assistant messages).
    pub content: Option<MessageContent>,
    /// Optional speaker name (passed to the chat template).
    pub name: Option<String>,
    /// The tool calls of an assistant message.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<ChatMessageInput>,
    /// Most tokens to generate (deprecated alias of `max_completion_tokens`).
    pub max_tokens: Option<i64>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities of the output tokens.
    #[serde(default)]
    pub logprobs: bool,
    /// How many top log-probabilities per token (needs `logprobs`).
    pub top_logprobs: Option<i64>,
    /// End the prompt with the assistant header (vLLM; default true).
    pub add_generation_prompt: Option<bool>,
    /// Extra chat-template variables (vLLM).
    pub chat_template_kwargs: Option<BTreeMap<String, serde_json::Value>>,
    /// `text`, `json_object` or `json_schema` (constrains the output).
    pub response_format: Option<crate::structured::ResponseFormat>,
    /// Functions the model may call.
    pub tools: Option<Vec<crate::tool_calls::ChatTool>>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<crate::tool_calls::ToolChoice>,
    /// `false`: `tool_choice: "required"` makes exactly one call.
    pub parallel_tool_calls: Option<bool>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (each prompt once).
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Completion logprobs (the legacy OpenAI shape).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Token strings.
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for the first prompt token under `echo`).
    pub token_logprobs: Vec<Option<f32>>,
    /// Per token: top token strings → log-probability.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion response or chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    /// `prompt_index * n + i`.
    pub index: usize,
    /// The text (a delta in chunks).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null while running.
    pub finish_reason: Option<String>,
    /// The stop string or token id that ended it (vLLM).
    #[serde(default)]
    pub stop_reason: Option<serde_json::Value>,
}

/// A completion response, or (`object = "text_completion"` too, like OpenAI) a stream chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (absent from most chunks).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub usage: Option<Usage>,
}

/// A top log-probability entry of chat logprobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One token of chat logprobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat logprobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// A message of a chat response, or a delta of a chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatMessageOutput {
    /// `assistant` (in chunks: only the first delta).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role: Option<String>,
    /// The text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub content: Option<String>,
    /// Tool calls (whole in a message; index-tagged fragments in a delta).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_calls: Option<Vec<crate::tool_calls::ToolCallOutput>>,
}

/// One choice of a chat response (`message`) or chunk (`delta`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    /// `i` of `n`.
    pub index: usize,
    /// The whole message (responses).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<ChatMessageOutput>,
    /// The new part (chunks).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub delta: Option<ChatMessageOutput>,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`; null while running.
    pub finish_reason: Option<String>,
    /// The stop string or token id that ended it (vLLM).
    #[serde(default)]
    pub stop_reason: Option<serde_json::Value>,
}

/// A chat response (`chat.completion`) or chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub usage: Option<Usage>,
}

/// `POST /tokenize`: a prompt or chat messages.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// Model name (checked when given).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Chat messages to render with the template, then tokenize.
    pub messages: Option<Vec<ChatMessageInput>>,
    /// Add BOS etc. (default true for prompts, false for messages).
    pub add_special_tokens: Option<bool>,
    /// For messages (default true).
    pub add_generation_prompt: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizeResponse {
    /// The token ids.
    pub tokens: Vec<u32>,
    /// How many.
    pub count: usize,
    /// The engine's context length.
    pub max_model_len: usize,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    /// Model name (checked when given).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// The served model name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// `trellis`.
    pub owned_by: String,
    /// The model path.
    pub root: String,
    /// Base model (none).
    pub parent: Option<String>,
    /// The engine's context length.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The served models (one).
    pub data: Vec<ModelCard>,
}
