//! The hermes tool-call format (`--tool-call-parser hermes`): the model writes
//! `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` blocks, possibly after some text.

use serde_json::Value;

use super::ToolCallOutput;

/// Opens a call.
pub const START: &str = "<tool_call>";
/// Closes a call.
pub const END: &str = "</tool_call>";

/// One call's JSON body, or `None` when it is not `{"name": string, "arguments": ...}`.
pub fn parse_call(body: &str) -> Option<ToolCallOutput> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    let args = match v.get("arguments") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCallOutput::new(name, args))
}

/// A whole output's content (the text before the first call; `None` when empty) and calls.
/// As in vLLM, an output whose calls do not all parse is returned as content.
pub fn extract(text: &str) -> (Option<String>, Vec<ToolCallOutput>) {
    let Some(first) = text.find(START) else {
        return (Some(text.to_string()), Vec::new());
    };
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(START) {
        let body_start = start + START.len();
        let (body, next) = match rest[body_start..].find(END) {
            Some(end) => (
                &rest[body_start..body_start + end],
                &rest[body_start + end + END.len()..],
            ),
            None => (&rest[body_start..], ""),
        };
        match parse_call(body) {
            Some(c) => calls.push(c),
            None => return (Some(text.to_string()), Vec::new()),
        }
        rest = next;
    }
    let content = &text[..first];
    let content = (!content.trim().is_empty()).then(|| content.to_string());
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls_after_text() {
        let (content, calls) = extract(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}",
        );
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name.as_deref(), Some("get_weather"));
        assert_eq!(
            calls[0].function.arguments.as_deref(),
            Some("{\"city\":\"Paris\"}")
        );
        assert_eq!(calls[1].function.arguments.as_deref(), Some("{}"));
        assert!(
            calls[0]
                .id
                .as_deref()
                .is_some_and(|i| i.starts_with("chatcmpl-tool-"))
        );
    }

    #[test]
    fn text_without_valid_calls_is_content() {
        assert_eq!(extract("Hello").0.as_deref(), Some("Hello"));
        let broken = "<tool_call>{\"name\": oops}</tool_call>";
        let (content, calls) = extract(broken);
        assert_eq!(content.as_deref(), Some(broken));
        assert!(calls.is_empty());
    }
}
