//! Chat templates: a list of messages rendered into one prompt string with the model's Jinja
//! template, the way Hugging Face `apply_chat_template` does it.
//!
//! Templates come from the tokenizer ([`Tokenizer::chat_template`], read from the GGUF
//! `tokenizer.chat_template` key or `tokenizer_config.json`) or from a file given by the user
//! (`--chat-template`). They are rendered with `minijinja`, set up like HF's Jinja environment:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods (`.strip()`, `.startswith()`, ...)
//! through `minijinja-contrib`'s pycompat, and the helpers HF templates call:
//! `raise_exception(msg)`, `tojson`, `strftime_now(fmt)`. The variables are `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, plus any extra keyword arguments.

use std::collections::BTreeMap;

use minijinja::{Environment, Error, ErrorKind, Value};

use crate::tokenizer::Tokenizer;

/// A chat template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model ships no chat template and none was given.
    #[error(
        "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat template if the tokenizer does not define one."
    )]
    Missing,
    /// The template source has a syntax error.
    #[error("invalid chat template: {0}")]
    Syntax(String),
    /// Rendering failed (for example the template called `raise_exception`).
    #[error("{0}")]
    Render(String),
}

/// One chat message: a role (`system`, `user`, `assistant`, `tool`, ...) and its text, plus
/// the tool-calling fields templates read (`tool_calls` of an assistant turn, `tool_call_id`
/// of a tool result), present only when set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What is said (text parts already joined).
    pub content: String,
    /// The tool calls of an assistant message, in OpenAI's shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The speaker's (or the tool's) name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Options of one rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatTemplateOptions {
    /// End with the assistant's turn header so that the model answers.
    pub add_generation_prompt: bool,
    /// Extra template variables (vLLM's `chat_template_kwargs`).
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A compiled chat template with the special-token strings it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("bad strftime format {format:?}"),
        )
    })?;
    Ok(out)
}

/// The instructions one render may execute (minijinja fuel): a chat template over a long
/// conversation uses well under a million; a hostile endless loop stops here with an error.
pub const TEMPLATE_FUEL: u64 = 50_000_000;

/// The longest prompt a template may render, in bytes: far beyond any context length, far
/// below what would exhaust memory.
pub const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// A writer that refuses to grow past [`TEMPLATE_MAX_OUTPUT`].
struct BoundedOutput(Vec<u8>);

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_MAX_OUTPUT {
            return Err(std::io::Error::other(
                "the chat template's output is too long",
            ));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the strings the template sees.
    pub fn new(
        source: impl Into<String>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates come from model files and users: bound the work and the output.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.into())
            .map_err(|e| ChatTemplateError::Syntax(error_text(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The tokenizer's own template, or `override_source` when given (the `--chat-template`
    /// file's content).
    pub fn for_tokenizer(
        tokenizer: &Tokenizer,
        override_source: Option<&str>,
    ) -> Result<Self, ChatTemplateError> {
        let source = override_source
            .or(tokenizer.chat_template())
            .ok_or(ChatTemplateError::Missing)?;
        Self::new(
            source,
            tokenizer.bos_token().unwrap_or(""),
            tokenizer.eos_token().unwrap_or(""),
        )
    }

    /// True when the template reads the variable `name` (for example `tools`: a template that
    /// never reads it cannot show tools to the model).
    pub fn reads_variable(&self, name: &str) -> bool {
        self.env
            .get_template(NAME)
            .is_ok_and(|t| t.undeclared_variables(false).contains(name))
    }

    /// Renders the messages into a prompt string.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        options: &ChatTemplateOptions,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatTemplateError::Render(error_text(&e)))?;
        let mut ctx: BTreeMap<String, Value> = options
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(options.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::from(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::from(self.eos_token.clone()));
        let mut out = BoundedOutput(Vec::new());
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.0)
                .map_err(|e| ChatTemplateError::Render(format!("the output is not UTF-8: {e}"))),
            Err(e) if e.kind() == ErrorKind::WriteFailure => {
                Err(ChatTemplateError::Render(format!(
                    "the chat template's output exceeds {} MiB",
                    TEMPLATE_MAX_OUTPUT >> 20
                )))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ChatTemplateError::Render(
                "the chat template runs too long (more than the instructions one render may \
                 execute)"
                    .to_string(),
            )),
            Err(e) => Err(ChatTemplateError::Render(error_text(&e))),
        }
    }
}

/// The message of a minijinja error, without the debug dump of the template.
fn error_text(e: &Error) -> String {
    match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").expect("compiles");
        let msgs = [ChatMessage::new("user", "Hi")];
        let opts = ChatTemplateOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let s = t.render(&msgs, &opts).expect("renders");
        assert!(s.starts_with("<|im_start|>system\nYou are a helpful AI assistant"));
        assert!(s.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn helpers_work() {
        let src = "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}{{ messages[0].content.strip()|tojson }}|{{ strftime_now('%Y') }}|{{ bos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        let opts = ChatTemplateOptions::default();
        let s = t
            .render(&[ChatMessage::new("user", "  a\"b ")], &opts)
            .expect("renders");
        assert!(s.starts_with("\"a\\\"b\"|2"), "{s}");
        assert!(s.ends_with("|<s>"));
        let err = t.render(&[], &opts).expect_err("raises");
        assert_eq!(err, ChatTemplateError::Render("no messages".into()));
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }

    /// Hostile templates (they come from model files and `--chat-template`): an endless
    /// recursion, a loop of a hundred million steps, a gigabyte of output — each ends with an
    /// error, never a hang or an exhausted memory.
    #[test]
    fn hostile_templates_fail_with_an_error() {
        let msgs = [ChatMessage::new("user", "Hi")];
        let opts = ChatTemplateOptions::default();
        let render = |src: &str| {
            ChatTemplate::new(src, "", "")
                .expect("compiles")
                .render(&msgs, &opts)
        };
        let recursion = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        let long_loop = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}\
                         {% endfor %}";
        let big_output = "{% for i in range(100000) %}{{ 'x' * 10000 }}{% endfor %}";
        let huge_string = "{{ 'x' * 1000000000 }}";
        for src in [recursion, long_loop, big_output, huge_string] {
            match render(src) {
                Err(ChatTemplateError::Render(m)) => assert!(!m.is_empty()),
                other => panic!("{src}: {other:?}"),
            }
        }
        assert!(matches!(
            render(big_output),
            Err(ChatTemplateError::Render(m)) if m.contains("exceeds 64 MiB")
        ));
        assert!(matches!(
            render(long_loop),
            Err(ChatTemplateError::Render(m)) if m.contains("runs too long")
        ));
    }
}
