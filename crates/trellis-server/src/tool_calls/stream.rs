//! Tool calls in a stream: each choice's text deltas go through a [`ToolStreamer`], which
//! turns them into content deltas and `delta.tool_calls` entries (index, id, type and function
//! name first, then argument fragments).
//!
//! A named choice streams its arguments as they are generated, and so does a hermes call once
//! its `"name"` and `"arguments":` keys are out (the raw argument text, less a tail that may be
//! the call's closing brace). `required` calls are sent when the array is complete.

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
    /// The hermes call being streamed: where its arguments start in the call's body and how
    /// many of their bytes were sent.
    partial: Option<(usize, usize)>,
}

impl ToolStreamer {
    pub(super) fn new(mode: ToolMode) -> Self {
        ToolStreamer {
            mode,
            buffer: String::new(),
            pos: 0,
            in_call: false,
            calls: 0,
            partial: None,
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
                    let body = rest.to_string();
                    self.stream_arguments(&body, false, out);
                    return;
                };
                let body = rest[..end].to_string();
                self.pos += end + hermes::END.len();
                self.end_call(&body, out);
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

    /// A hermes call whose body is complete: the rest of its arguments, or the whole call when
    /// its name was not known early (or the body does not parse: then it is content, unless a
    /// part was already sent).
    fn end_call(&mut self, body: &str, out: &mut StreamDelta) {
        self.in_call = false;
        if self.partial.is_some() {
            self.stream_arguments(body, true, out);
            self.partial = None;
            return;
        }
        match hermes::parse_call(body) {
            Some(call) => self.emit(call, out),
            None => self.content(format!("{}{body}{}", hermes::START, hermes::END), out),
        }
    }

    /// Streams a hermes call's arguments as they arrive: once `"name"` and `"arguments":` are
    /// seen, the call's first delta (id, name), then the raw argument text, holding back a
    /// tail that may be the call's closing `}` or the start of `</tool_call>`.
    fn stream_arguments(&mut self, body: &str, complete: bool, out: &mut StreamDelta) {
        if self.partial.is_none() {
            let Some((name, args_start)) = hermes_header(body) else {
                return;
            };
            let index = Some(self.calls);
            self.calls += 1;
            let call = ToolCallOutput::new(&name, String::new());
            out.tool_calls.push(ToolCallOutput { index, ..call });
            self.partial = Some((args_start, 0));
        }
        let Some((start, sent)) = self.partial else {
            return;
        };
        let mut text = body.get(start..).unwrap_or_default();
        if !complete
            && let Some(lt) = text.rfind('<')
            && hermes::END.starts_with(&text[lt..])
        {
            text = &text[..lt];
        }
        // Hold back a last `}`: it may close the call's object rather than the arguments.
        if let Some(t) = text.trim_end().strip_suffix('}') {
            text = t;
        }
        if text.len() > sent {
            out.tool_calls.push(ToolCallOutput {
                index: Some(self.calls - 1),
                function: FunctionCallOutput {
                    name: None,
                    arguments: Some(text[sent..].to_string()),
                },
                ..Default::default()
            });
            self.partial = Some((start, text.len()));
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
            ToolMode::Auto if self.in_call => self.end_call(&rest, &mut out),
            ToolMode::Auto => self.content(rest, &mut out),
            ToolMode::None | ToolMode::Named(_) => {}
        }
        out
    }
}

/// The name of a hermes call and where its arguments start, once the body has both
/// (`{"name": "f", "arguments": ...`, in that order).
fn hermes_header(body: &str) -> Option<(String, usize)> {
    let args_key = body.find("\"arguments\"")?;
    let head = &body[..args_key];
    let after_name = &head[head.find("\"name\"")? + "\"name\"".len()..];
    let quoted = after_name.trim_start().strip_prefix(':')?.trim_start();
    let mut de = serde_json::Deserializer::from_str(quoted).into_iter::<String>();
    let name = de.next()?.ok()?;
    let after_key = &body[args_key + "\"arguments\"".len()..];
    let colon = after_key.trim_start().strip_prefix(':')?;
    let value = colon.trim_start();
    if value.is_empty() {
        return None;
    }
    Some((name, body.len() - value.len()))
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
                    "{\"city\": \"Paris\"}".to_string()
                ),
                ("now".to_string(), "{}".to_string())
            ]
        );
        // The first call's arguments came in fragments, as they were generated.
        let fragments: Vec<&str> = calls
            .iter()
            .filter(|c| c.index == Some(0))
            .filter_map(|c| c.function.arguments.as_deref())
            .filter(|a| !a.is_empty())
            .collect();
        assert_eq!(fragments, ["{\"city\": ", "\"Paris\"}"]);
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
