//! Tool calls in a stream: each choice's text deltas go through a [`ToolStreamer`], which
//! turns them into content deltas and `delta.tool_calls` entries (index, id, type and function
//! name first, then argument fragments).
//!
//! A named choice streams its arguments as they are generated. `required` and hermes calls are
//! sent when each call is complete (the JSON must parse before its name is certain).

use super::{ToolCallOutput, ToolMode, hermes, parse_required};
use crate::tool_calls::FunctionCallOutput;

/// What one text delta became.
#[derive(Debug, Default, PartialEq)]
pub struct StreamDelta {
    /// Content text to send (none: nothing).
    pub content: Option<String>,
    /// Tool-call deltas, one chunk each.
    pub tool_calls: Vec<ToolCallOutput>,
}

/// The tool-call state of one streamed choice.
#[derive(Debug)]
pub struct ToolStreamer {
    mode: ToolMode,
    buffer: String,
    /// Bytes of `buffer` already handled.
    pos: usize,
    in_call: bool,
    calls: usize,
}

impl ToolStreamer {
    pub(super) fn new(mode: ToolMode) -> Self {
        ToolStreamer {
            mode,
            buffer: String::new(),
            pos: 0,
            in_call: false,
            calls: 0,
        }
    }

    /// True once a tool call was sent (the finish reason is then `tool_calls`).
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// The first delta of a call (its id, type and name) and its arguments.
    fn emit(&mut self, call: ToolCallOutput, out: &mut StreamDelta) {
        let index = Some(self.calls);
        self.calls += 1;
        let args = call.function.arguments.clone().unwrap_or_default();
        out.tool_calls.push(ToolCallOutput {
            index,
            function: FunctionCallOutput {
                name: call.function.name,
                arguments: Some(String::new()),
            },
            ..call
        });
        out.tool_calls.push(ToolCallOutput {
            index,
            function: FunctionCallOutput {
                name: None,
                arguments: Some(args),
            },
            ..Default::default()
        });
    }

    /// Takes the next text delta.
    pub fn push(&mut self, text: &str) -> StreamDelta {
        let mut out = StreamDelta::default();
        match self.mode.clone() {
            ToolMode::None => out.content = Some(text.to_string()),
            ToolMode::Named(name) => {
                if self.calls == 0 {
                    self.emit(ToolCallOutput::new(&name, String::new()), &mut out);
                    out.tool_calls.pop();
                }
                if !text.is_empty() {
                    out.tool_calls.push(ToolCallOutput {
                        index: Some(0),
                        function: FunctionCallOutput {
                            name: None,
                            arguments: Some(text.to_string()),
                        },
                        ..Default::default()
                    });
                }
            }
            ToolMode::Required => self.buffer.push_str(text),
            ToolMode::Auto => {
                self.buffer.push_str(text);
                self.scan(&mut out);
            }
        }
        out
    }

    /// Hermes: content up to a possible `<tool_call>`, each call once it is closed.
    fn scan(&mut self, out: &mut StreamDelta) {
        loop {
            let rest = &self.buffer[self.pos..];
            if self.in_call {
                let Some(end) = rest.find(hermes::END) else {
                    return;
                };
                let body = rest[..end].to_string();
                self.pos += end + hermes::END.len();
                self.in_call = false;
                match hermes::parse_call(&body) {
                    Some(call) => self.emit(call, out),
                    None => self.content(format!("{}{body}{}", hermes::START, hermes::END), out),
                }
                continue;
            }
            if let Some(start) = rest.find(hermes::START) {
                let text = rest[..start].to_string();
                self.content(text, out);
                self.pos += start + hermes::START.len();
                self.in_call = true;
                continue;
            }
            // Hold back a tail that may be the start of `<tool_call>`.
            let keep = (1..hermes::START.len())
                .rev()
                .find(|&k| rest.ends_with(&hermes::START[..k]))
                .unwrap_or(0);
            let text = rest[..rest.len() - keep].to_string();
            self.pos += text.len();
            self.content(text, out);
            return;
        }
    }

    /// Content text; once a call was made only calls follow (as vLLM's hermes parser).
    fn content(&mut self, text: String, out: &mut StreamDelta) {
        if text.is_empty() || self.calls > 0 {
            return;
        }
        out.content.get_or_insert_with(String::new).push_str(&text);
    }

    /// The end of the choice's text: what was held back.
    pub fn finish(&mut self) -> StreamDelta {
        let mut out = StreamDelta::default();
        let rest = self.buffer[self.pos..].to_string();
        self.pos = self.buffer.len();
        match self.mode {
            ToolMode::Required => match parse_required(&rest) {
                Some(calls) if !calls.is_empty() => {
                    for c in calls {
                        self.emit(c, &mut out);
                    }
                }
                _ => out.content = Some(rest),
            },
            ToolMode::Auto if self.in_call => match hermes::parse_call(&rest) {
                Some(call) => self.emit(call, &mut out),
                None => self.content(format!("{}{rest}", hermes::START), &mut out),
            },
            ToolMode::Auto => self.content(rest, &mut out),
            ToolMode::None | ToolMode::Named(_) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: ToolMode, pieces: &[&str]) -> (String, Vec<ToolCallOutput>) {
        let mut s = ToolStreamer::new(mode);
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut deltas: Vec<StreamDelta> = pieces.iter().map(|p| s.push(p)).collect();
        deltas.push(s.finish());
        for d in deltas {
            content.push_str(d.content.as_deref().unwrap_or(""));
            calls.extend(d.tool_calls);
        }
        (content, calls)
    }

    /// Joins deltas by index the way the OpenAI client does.
    fn joined(calls: &[ToolCallOutput]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for c in calls {
            let i = c.index.expect("stream deltas carry an index");
            if i == out.len() {
                assert!(c.id.is_some(), "the first delta of a call has its id");
                out.push((
                    c.function.name.clone().expect("and its name"),
                    String::new(),
                ));
            }
            out[i]
                .1
                .push_str(c.function.arguments.as_deref().unwrap_or(""));
        }
        out
    }

    #[test]
    fn hermes_calls_split_across_deltas() {
        let pieces = [
            "Sure. <tool",
            "_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": ",
            "\"Paris\"}}\n</tool_call>",
            "\n<tool_call>{\"name\": \"now\"}",
        ];
        let (content, calls) = run(ToolMode::Auto, &pieces);
        assert_eq!(content, "Sure. ");
        assert_eq!(
            joined(&calls),
            vec![
                (
                    "get_weather".to_string(),
                    "{\"city\":\"Paris\"}".to_string()
                ),
                ("now".to_string(), "{}".to_string())
            ]
        );
        let (content, calls) = run(ToolMode::Auto, &["a < b", " and <tool", "s>"]);
        assert_eq!(content, "a < b and <tools>");
        assert!(calls.is_empty());
    }

    #[test]
    fn named_streams_arguments_and_required_sends_whole_calls() {
        let (content, calls) = run(ToolMode::Named("f".into()), &["{\"a\"", ": 1}"]);
        assert!(content.is_empty());
        assert_eq!(
            joined(&calls),
            vec![("f".to_string(), "{\"a\": 1}".to_string())]
        );
        let (_, calls) = run(
            ToolMode::Required,
            &["[{\"name\": \"f\", ", "\"parameters\": {\"a\": 1}}]"],
        );
        assert_eq!(
            joined(&calls),
            vec![("f".to_string(), "{\"a\":1}".to_string())]
        );
    }
}
