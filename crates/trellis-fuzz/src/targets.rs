//! The fuzz targets: each takes one input and runs it through the code that reads such input
//! from strangers, exactly as the engine or the server would. An `Err` is the expected answer
//! to bad input; a panic, an abort or a hang is a finding.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::body::Body;
use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use tower::ServiceExt;
use trellis_engine::tokenizer::Tokenizer;
use trellis_engine::{AsyncLLM, ChatMessage, ChatTemplate, ChatTemplateOptions, EngineConfig};
use trellis_models::gguf::GgufMetadata;

use crate::tiny;

/// The targets, by name.
pub const TARGETS: [&str; 8] = [
    "gguf-header",
    "gguf-model",
    "safetensors",
    "hf-config",
    "tokenizer-json",
    "tokenizer-config",
    "chat-template",
    "openai-request",
];

/// Files and state the targets share: the seeds' sources and a scratch directory.
pub struct Ctx {
    /// The default model (the source of the real tokenizer and template).
    pub real_gguf: PathBuf,
    /// The embedding model directory, if fetched (real tokenizer.json / config.json seeds).
    pub minilm: Option<PathBuf>,
    tiny_gguf: Vec<u8>,
    tiny_st: Vec<u8>,
    tiny_tok: Vec<u8>,
    scratch: tempfile::TempDir,
    server: Option<(tokio::runtime::Runtime, axum::Router)>,
}

impl Ctx {
    /// Builds the seeds from the models in `models_dir` (the repository's `models/`).
    pub fn new(models_dir: &Path) -> Result<Self> {
        let real_gguf = models_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !real_gguf.is_file() {
            bail!(
                "{} is missing: run scripts/fetch-model.sh first",
                real_gguf.display()
            );
        }
        let minilm = Some(models_dir.join("all-MiniLM-L6-v2")).filter(|p| p.is_dir());
        let tiny_gguf = tiny::gguf(&real_gguf)?;
        let tiny_tok = tiny::tokenizer_json(&tiny_gguf)?;
        Ok(Ctx {
            real_gguf,
            minilm,
            tiny_st: tiny::safetensors()?,
            tiny_gguf,
            tiny_tok,
            scratch: tempfile::tempdir()?,
            server: None,
        })
    }

    /// The seed inputs of `target`.
    pub fn seeds(&self, target: &str) -> Result<Vec<Vec<u8>>> {
        let mut seeds = Vec::new();
        match target {
            "gguf-header" | "gguf-model" => seeds.push(self.tiny_gguf.clone()),
            "safetensors" => seeds.push(self.tiny_st.clone()),
            "hf-config" => {
                seeds.push(tiny::hf_config().into_bytes());
                if let Some(m) = &self.minilm {
                    seeds.push(std::fs::read(m.join("config.json"))?);
                }
            }
            "tokenizer-json" => {
                seeds.push(self.tiny_tok.clone());
                if let Some(m) = &self.minilm {
                    seeds.push(std::fs::read(m.join("tokenizer.json"))?);
                }
            }
            "tokenizer-config" => {
                seeds.push(
                    br#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": true}, "add_bos_token": false, "model_max_length": 2048, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}"#.to_vec(),
                );
                if let Some(m) = &self.minilm {
                    seeds.push(std::fs::read(m.join("tokenizer_config.json"))?);
                }
            }
            "chat-template" => {
                let tok = Tokenizer::from_gguf(&self.real_gguf)?;
                if let Some(t) = tok.chat_template() {
                    seeds.push(t.as_bytes().to_vec());
                }
                seeds.push(b"{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}".to_vec());
                seeds.push(b"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_vec());
                seeds.push(b"{% for i in range(1000) %}{% for j in range(1000) %}{{ i * j }}{% endfor %}{% endfor %}".to_vec());
                seeds.push(b"{{ 'x' * 1000000 }}{{ messages[0]['content'] | upper }}{{ raise_exception('no') if messages | length > 9 }}".to_vec());
            }
            "openai-request" => {
                for s in [
                    r#"/v1/completions
{"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0}"#,
                    r#"/v1/completions
{"model": "m", "prompt": [[1, 2, 3], "two"], "max_tokens": 3, "n": 2, "logprobs": 2, "echo": true, "stop": ["a", "b"], "seed": 7, "logit_bias": {"5": 10}}"#,
                    r#"/v1/chat/completions
{"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2}"#,
                    r#"/v1/chat/completions
{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3, "top_p": 0.5, "top_k": 5, "min_p": 0.1, "presence_penalty": 1, "frequency_penalty": 1, "repetition_penalty": 1.2, "stop_token_ids": [3], "min_tokens": 1}"#,
                    r#"/tokenize
{"prompt": "Hello world", "add_special_tokens": true}"#,
                    r#"/detokenize
{"tokens": [1, 2, 3]}"#,
                    r#"/v1/embeddings
{"model": "m", "input": "hi"}"#,
                ] {
                    seeds.push(s.as_bytes().to_vec());
                }
            }
            other => bail!(
                "unknown fuzz target {other:?}: one of {}",
                TARGETS.join(", ")
            ),
        }
        Ok(seeds)
    }

    /// Runs one input through `target`. `Ok` says what happened (an accepted input or the
    /// error it was refused with, as text), for the driver's novelty check.
    pub fn run(&mut self, target: &str, input: &[u8]) -> Result<String> {
        let dir = self.scratch.path().to_path_buf();
        match target {
            "gguf-header" => {
                let content = match Content::read(&mut Cursor::new(input)) {
                    Ok(c) => c,
                    Err(e) => return Ok(format!("header: {e}")),
                };
                let path = dir.join("h.gguf");
                let meta = GgufMetadata {
                    path: &path,
                    values: &content.metadata,
                };
                let cfg = trellis_models::llama::Config::from_gguf(&meta).map(|_| ());
                let tok = Tokenizer::from_gguf_content(&content).map(|t| {
                    let _ = t.encode("Hello, world! 123", true);
                });
                Ok(format!("config: {cfg:?} tokenizer: {:?}", tok.err()))
            }
            "gguf-model" => {
                let path = dir.join("m.gguf");
                std::fs::write(&path, input)?;
                Ok(outcome(
                    trellis_models::load_model(&path, &Device::Cpu).map(|_| ()),
                ))
            }
            "safetensors" | "hf-config" => {
                let m = dir.join("hf");
                std::fs::create_dir_all(&m)?;
                let (st, cfg) = match target {
                    "safetensors" => (input.to_vec(), tiny::hf_config().into_bytes()),
                    _ => (self.tiny_st.clone(), input.to_vec()),
                };
                std::fs::write(m.join("model.safetensors"), st)?;
                std::fs::write(m.join("config.json"), cfg)?;
                Ok(outcome(
                    trellis_models::load_model(&m, &Device::Cpu).map(|_| ()),
                ))
            }
            "tokenizer-json" | "tokenizer-config" => {
                let m = dir.join("tok");
                std::fs::create_dir_all(&m)?;
                let (tj, tc): (&[u8], &[u8]) = match target {
                    "tokenizer-json" => (input, b"{}"),
                    _ => (&self.tiny_tok, input),
                };
                std::fs::write(m.join("tokenizer.json"), tj)?;
                std::fs::write(m.join("tokenizer_config.json"), tc)?;
                Ok(outcome(Tokenizer::from_hf_dir(&m).map(|t| {
                    if let Ok(ids) = t.encode("Hello, world! 123 <|im_start|>", true) {
                        let _ = t.decode(&ids, false);
                    }
                })))
            }
            "chat-template" => {
                let src = String::from_utf8_lossy(input).into_owned();
                let t = match ChatTemplate::new(src, "<s>", "</s>") {
                    Ok(t) => t,
                    Err(e) => return Ok(format!("compile: {e}")),
                };
                let msgs = [
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hello"),
                    ChatMessage::new("assistant", "Hi!"),
                ];
                let opts = ChatTemplateOptions {
                    add_generation_prompt: true,
                    ..Default::default()
                };
                Ok(outcome(t.render(&msgs, &opts).map(|_| ())))
            }
            "openai-request" => self.request(input),
            other => bail!("unknown fuzz target {other:?}"),
        }
    }

    /// Sets up what `target` needs before its inputs are timed (the engine and router of
    /// `openai-request`, whose loading is not part of any input's time).
    pub fn prepare(&mut self, target: &str) -> Result<()> {
        if target == "openai-request" && self.server.is_none() {
            let mut c = EngineConfig::new(&self.real_gguf);
            c.max_model_len = Some(48);
            c.kv_cache_memory = Some(64 << 20);
            c.usage = trellis_engine::UsageContext::Server;
            let engine = Arc::new(AsyncLLM::new(c).context("the default model loads")?);
            let cfg = trellis_server::ServerConfig::new("m", "m");
            let state = trellis_server::AppState::new(engine, cfg)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            self.server = Some((rt, trellis_server::router(state)));
        }
        Ok(())
    }

    /// Sends `PATH\nBODY` through the real router over the real engine (the default model,
    /// context cut to 48 tokens so that any request ends quickly).
    fn request(&mut self, input: &[u8]) -> Result<String> {
        self.prepare("openai-request")?;
        let Some((rt, router)) = &self.server else {
            bail!("no server");
        };
        let split = input
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(input.len());
        let path = String::from_utf8_lossy(&input[..split]).into_owned();
        let body = input.get(split + 1..).unwrap_or_default().to_vec();
        let Ok(req) = axum::http::Request::post(path.trim())
            .header("content-type", "application/json")
            .body(Body::from(body))
        else {
            return Ok("bad path".into());
        };
        let router = router.clone();
        rt.block_on(async move {
            let resp = router.oneshot(req).await?;
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20).await?;
            if status.is_server_error() && status.as_u16() != 503 {
                bail!(
                    "server error {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                );
            }
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            Ok(match status.is_success() {
                true => format!("{status}"),
                false => format!("{status} {text}"),
            })
        })
    }
}

/// The text of an outcome: "ok", or the error's first line.
fn outcome<E: std::fmt::Display>(r: std::result::Result<(), E>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e.to_string(),
    }
}
