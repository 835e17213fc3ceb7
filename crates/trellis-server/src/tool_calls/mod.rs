//! Tool calling on chat completions: `tools` and `tool_choice` (`none`, `auto`, `required`, a
//! named function), as OpenAI and vLLM define them.
//!
//! - `required` and a named function are enforced with a grammar built from the tools'
//!   parameter schemas (vLLM's way): a named call generates the arguments object itself;
//!   `required` generates a JSON array of `{"name", "parameters"}` objects. The arguments
//!   therefore always parse and validate.
//! - `auto` needs `--enable-auto-tool-choice --tool-call-parser hermes`: the model's own
//!   `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks are parsed out of its text
//!   ([`hermes`]).
//! - The tools reach the chat template as `tools`; a template that never reads `tools` cannot
//!   show them to the model, and a request with tools is then refused (400).

pub mod hermes;
mod stream;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_engine::{ChatTemplate, StructuredOutputsParams};

pub use stream::ToolStreamer;

use crate::ServerConfig;
use crate::error::ApiError;

/// The tool-call parsers `--tool-call-parser` accepts.
pub const TOOL_CALL_PARSERS: &[&str] = &["hermes"];

/// A function the model may call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// The function's name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments (default: an object with no properties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// OpenAI's strict flag (arguments are always enforced for `required` and named choices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// One entry of `tools`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatTool {
    /// Only `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDefinition,
}

fn function_type() -> String {
    "function".into()
}

/// `tool_choice`: a mode or a named function.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(NamedToolChoice),
}

/// A named `tool_choice`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedToolChoice {
    /// `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function to call.
    pub function: NamedFunction,
}

/// The name of a named `tool_choice`.
#[derive(Debug, Clone, Deserialize)]
pub struct NamedFunction {
    /// The function's name.
    pub name: String,
}

/// A tool call of a response message, or (with `index`, fields left out) of a stream delta.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ToolCallOutput {
    /// Position of the call in the message (stream deltas only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// `chatcmpl-tool-...` (in a stream: the call's first delta only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (with the id).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function and its arguments (a JSON text, streamed in fragments).
    pub function: FunctionCallOutput,
}

/// The function part of a tool call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FunctionCallOutput {
    /// The function's name (in a stream: the call's first delta only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The arguments as JSON text (in a stream: the next fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCallOutput {
    /// A whole call with a fresh id.
    pub fn new(name: &str, arguments: String) -> Self {
        ToolCallOutput {
            index: None,
            id: Some(crate::util::random_id("chatcmpl-tool")),
            kind: Some("function".into()),
            function: FunctionCallOutput {
                name: Some(name.to_string()),
                arguments: Some(arguments),
            },
        }
    }
}

/// What `tool_choice` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// No tool calls (no tools, or `tool_choice: "none"`).
    None,
    /// The model decides; its text is parsed (hermes).
    Auto,
    /// At least one call, grammar-enforced.
    Required,
    /// This function, grammar-enforced.
    Named(String),
}

/// The tool side of one chat request.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    /// The mode.
    pub mode: ToolMode,
    tools: Vec<ChatTool>,
    /// `parallel_tool_calls: false`: `required` makes exactly one call.
    single_call: bool,
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

impl ToolPlan {
    /// Resolves and checks `tools` and `tool_choice` against the server's flags and the chat
    /// template (vLLM's rules and texts where it has them).
    pub fn new(
        tools: Option<&[ChatTool]>,
        choice: Option<&ToolChoice>,
        parallel_tool_calls: Option<bool>,
        config: &ServerConfig,
        template: &ChatTemplate,
    ) -> Result<Self, ApiError> {
        let tools = tools.unwrap_or_default().to_vec();
        for t in &tools {
            if t.kind != "function" {
                return Err(bad(
                    format!("Unsupported tool type {:?}: only \"function\".", t.kind),
                    "tools",
                ));
            }
            if t.function.name.is_empty() {
                return Err(bad("Every tool needs a function name.", "tools"));
            }
            if let Some(p) = &t.function.parameters
                && !p.is_object()
            {
                return Err(bad(
                    format!(
                        "The parameters of tool {:?} must be a JSON schema object.",
                        t.function.name
                    ),
                    "tools",
                ));
            }
        }
        let mode = match choice {
            None if tools.is_empty() => ToolMode::None,
            None => ToolMode::Auto,
            Some(ToolChoice::Mode(m)) => match m.as_str() {
                "none" => ToolMode::None,
                "auto" => ToolMode::Auto,
                "required" => ToolMode::Required,
                other => {
                    return Err(bad(
                        format!(
                            "Invalid tool_choice {other:?}: expected \"none\", \"auto\", \
                             \"required\" or a named function."
                        ),
                        "tool_choice",
                    ));
                }
            },
            Some(ToolChoice::Named(n)) => ToolMode::Named(n.function.name.clone()),
        };
        if mode != ToolMode::None && tools.is_empty() {
            return Err(bad(
                "When using `tool_choice`, `tools` must be set.",
                "tool_choice",
            ));
        }
        if let ToolMode::Named(name) = &mode
            && !tools.iter().any(|t| &t.function.name == name)
        {
            return Err(bad(
                format!("Tool {name:?} named in `tool_choice` is not one of the `tools`."),
                "tool_choice",
            ));
        }
        if mode == ToolMode::Auto
            && !(config.enable_auto_tool_choice && config.tool_call_parser.is_some())
        {
            return Err(bad(
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser \
                 to be set",
                "tool_choice",
            ));
        }
        if mode != ToolMode::None && !template.reads_variable("tools") {
            return Err(bad(
                "The chat template does not support tools (it never reads `tools`), so the \
                 model could not see them; start the server with a tool-aware --chat-template \
                 (for example examples/tool_chat_template_hermes.jinja).",
                "tools",
            ));
        }
        Ok(ToolPlan {
            mode,
            tools,
            single_call: parallel_tool_calls == Some(false),
        })
    }

    /// The `tools` template variable: the request's tools, even under `tool_choice: "none"`
    /// (as vLLM), so that a conversation with earlier calls renders the same way.
    pub fn template_tools(&self) -> Option<Value> {
        (!self.tools.is_empty()).then(|| json!(self.tools))
    }

    fn parameters(&self, name: &str) -> Value {
        self.tools
            .iter()
            .find(|t| t.function.name == name)
            .and_then(|t| t.function.parameters.clone())
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
    }

    /// The grammar of `required` and named choices.
    pub fn constraint(&self) -> Option<StructuredOutputsParams> {
        let schema = match &self.mode {
            ToolMode::Named(name) => self.parameters(name),
            ToolMode::Required => {
                let alternatives: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"type": "string", "enum": [t.function.name]},
                                "parameters": self.parameters(&t.function.name),
                            },
                            "required": ["name", "parameters"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut schema =
                    json!({"type": "array", "minItems": 1, "items": {"anyOf": alternatives}});
                if self.single_call {
                    schema["maxItems"] = json!(1);
                }
                schema
            }
            ToolMode::None | ToolMode::Auto => return None,
        };
        Some(StructuredOutputsParams::json_schema(schema))
    }

    /// True when the output text is to be turned into tool calls.
    pub fn parses_output(&self) -> bool {
        self.mode != ToolMode::None
    }

    /// A finished output's content and tool calls. Text that does not parse (an output cut
    /// by `max_tokens`, or `auto` without calls) stays content.
    pub fn extract(&self, text: &str) -> (Option<String>, Vec<ToolCallOutput>) {
        let calls = match &self.mode {
            ToolMode::None => None,
            ToolMode::Named(name) => serde_json::from_str::<Value>(text)
                .ok()
                .map(|v| vec![ToolCallOutput::new(name, v.to_string())]),
            ToolMode::Required => parse_required(text),
            ToolMode::Auto => return hermes::extract(text),
        };
        match calls {
            Some(c) if !c.is_empty() => (None, c),
            _ => (Some(text.to_string()), Vec::new()),
        }
    }

    /// The incremental version of [`Self::extract`] for one streamed choice.
    pub fn streamer(&self) -> ToolStreamer {
        ToolStreamer::new(self.mode.clone())
    }
}

/// The calls of a `required` output: `[{"name": ..., "parameters": {...}}, ...]`.
fn parse_required(text: &str) -> Option<Vec<ToolCallOutput>> {
    let Value::Array(items) = serde_json::from_str::<Value>(text).ok()? else {
        return None;
    };
    items
        .iter()
        .map(|item| {
            let name = item.get("name")?.as_str()?;
            let params = item.get("parameters")?;
            Some(ToolCallOutput::new(name, params.to_string()))
        })
        .collect()
}

/// Assistant `tool_calls` as templates see them: arguments as objects, not JSON text (as
/// vLLM hands them to `apply_chat_template`).
pub fn template_tool_calls(calls: &[Value]) -> Value {
    let mut calls = calls.to_vec();
    for call in &mut calls {
        if let Some(f) = call.get_mut("function")
            && let Some(Value::String(args)) = f.get("arguments")
            && let Ok(parsed) = serde_json::from_str::<Value>(args)
        {
            f["arguments"] = parsed;
        }
    }
    Value::Array(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_engine::{ChatMessage, ChatTemplateOptions};

    const HERMES_TEMPLATE: &str =
        include_str!("../../../../examples/tool_chat_template_hermes.jinja");

    #[test]
    fn the_hermes_template_renders_tools_calls_and_results() {
        let t = ChatTemplate::new(HERMES_TEMPLATE, "", "<|im_end|>").expect("compiles");
        assert!(t.reads_variable("tools"));
        let plain = ChatTemplate::new("{{ messages[0].content }}", "", "").expect("compiles");
        assert!(!plain.reads_variable("tools"));
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(template_tool_calls(&[json!({
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
        })]));
        let mut result = ChatMessage::new("tool", "{\"temperature\": 21}");
        result.tool_call_id = Some("c1".into());
        let messages = [ChatMessage::new("user", "Weather in Paris?"), call, result];
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let options = ChatTemplateOptions {
            add_generation_prompt: true,
            extra: [("tools".to_string(), tools)].into_iter().collect(),
        };
        let s = t.render(&messages, &options).expect("renders");
        assert!(
            s.contains("<tools>\n{\"function\":{\"name\":\"get_weather\"}"),
            "{s}"
        );
        assert!(
            s.contains(
                "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call><|im_end|>"
            ),
            "{s}"
        );
        assert!(s.contains("<|im_start|>tool\n<tool_response>\n{\"temperature\": 21}\n</tool_response><|im_end|>\n"), "{s}");
        assert!(s.ends_with("<|im_start|>assistant\n"), "{s}");
        // Without tools: SmolLM2's default system turn.
        let s = t
            .render(&messages[..1], &ChatTemplateOptions::default())
            .expect("renders");
        assert!(
            s.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
            "{s}"
        );
    }
}
