//! The example plugins of examples/plugins through the real `trellis generate` (spec §1.5,
//! §2.6, §3.6, §4.5). Without features the examples are built once per test process with
//! `trellis plugins build --debug` and loaded at run time; with `--features example-plugins`
//! the same tests run against the examples compiled into the binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    SMALL, default_model, installed, one_error_line, output_token_ids, plugins, run, trellis,
    write_tiny_llama,
};

const DUMMY_MODEL: &str = "dummy-model";
const DUMMY_PLATFORM: &str = "dummy-platform";
const CUSTOM_ATTENTION: &str = "custom-attention";

/// `trellis` with the given examples installed (or compiled in).
fn with(examples: &[&str]) -> Command {
    let dirs: Vec<PathBuf> = plugins(examples);
    let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    trellis(&refs)
}

/// `generate` of `input` (a JSONL file) on `model`, writing `output`, plus `extra` flags.
fn generate(cmd: &mut Command, model: &Path, input: &Path, output: &Path, extra: &[&str]) {
    cmd.arg("generate")
        .args(SMALL)
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra);
}

fn write_input(dir: &Path, lines: &str) -> PathBuf {
    let p = dir.join("in.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

/// The library API loads plugins as the CLI does (vLLM's `LLM` loads them too): `LLM::new`
/// with the dummy-model plugin installed loads `MyLlamaForCausalLM`. Plugins are found through
/// the environment, so the test runs itself again in a child process that has it.
#[test]
fn llm_new_loads_installed_plugins() {
    const CHILD: &str = "TRELLIS_TEST_LLM_NEW_MODEL";
    if let Some(model) = std::env::var_os(CHILD) {
        // A library host tells the loader its Cargo.lock, as the `trellis` binary does.
        trellis_plugin::set_host_cargo_lock(include_str!("../../../Cargo.lock"));
        let mut c = trellis_engine::EngineConfig::new(PathBuf::from(model));
        c.num_kv_blocks = Some(16);
        let mut llm = trellis_engine::LLM::new(c).unwrap_or_else(|e| panic!("LLM::new: {e}"));
        let outs = llm
            .generate(
                &[trellis_engine::Prompt::Tokens(vec![5, 9, 3])],
                &trellis_engine::SamplingParams::greedy(4),
            )
            .expect("generates");
        assert_eq!(outs[0].outputs[0].token_ids, vec![0; 4]);
        println!("child: MyLlamaForCausalLM generated only token 0");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, "MyLlamaForCausalLM");
    let child = |allow: Option<&str>| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "llm_new_loads_installed_plugins", "--nocapture"])
            .env(CHILD, &model)
            // A run-time library even when the binary has the examples compiled in.
            .env("TRELLIS_PLUGIN_PATH", installed(DUMMY_MODEL))
            .env_remove("VLLM_PLUGINS");
        if let Some(a) = allow {
            cmd.env("VLLM_PLUGINS", a);
        }
        cmd.output().unwrap()
    };
    let out = child(None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child: MyLlamaForCausalLM generated only token 0"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With no plugin allowed, the architecture is unknown: the child fails.
    let out = child(Some(""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("MyLlamaForCausalLM") && stderr.contains("not supported"),
        "{stderr}"
    );
}

#[test]
fn dummy_model_generates_only_token_zero_and_vllm_plugins_filters_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, "MyLlamaForCausalLM");
    let input = write_input(
        tmp.path(),
        "{\"prompt_token_ids\": [5, 9, 3]}\n{\"prompt_token_ids\": [7]}\n",
    );
    let output = tmp.path().join("out.jsonl");
    for allow in [None, Some("register_dummy_model")] {
        let mut cmd = with(&[DUMMY_MODEL]);
        if let Some(a) = allow {
            cmd.env("VLLM_PLUGINS", a);
        }
        generate(&mut cmd, &model, &input, &output, &["--max-tokens", "4"]);
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 0, "VLLM_PLUGINS={allow:?}: {err}");
        assert_eq!(output_token_ids(&output), vec![vec![0; 4], vec![0; 4]]);
    }
    // The same directory without the plugin: vLLM's unsupported-architecture error.
    let mut cmd = with(&[DUMMY_MODEL]);
    cmd.env("VLLM_PLUGINS", "");
    generate(&mut cmd, &model, &input, &output, &[]);
    let (code, _, err) = run(&mut cmd);
    one_error_line(code, &err, &["MyLlamaForCausalLM", "not supported"]);
}

#[test]
fn dummy_platform_runs_generate_and_cpu_short_circuits() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"The capital of France is\"}\n");
    let on_dummy = tmp.path().join("dummy.jsonl");
    let mut cmd = with(&[DUMMY_PLATFORM]);
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &on_dummy,
        &["--max-tokens", "4"],
    );
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Platform: DummyDevice"), "{err}");
    assert!(
        err.contains("Platform plugin dummy_platform_plugin is activated"),
        "{err}"
    );
    assert!(err.contains("Using attention backend DUMMY_ATTN"), "{err}");
    // VLLM_TARGET_DEVICE=cpu: the CPU even though the dummy platform is installed.
    let on_cpu = tmp.path().join("cpu.jsonl");
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.env("VLLM_TARGET_DEVICE", "cpu");
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &on_cpu,
        &["--max-tokens", "4"],
    );
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("Platform: cpu"), "{err}");
    assert!(!err.contains("DummyDevice"), "{err}");
    assert!(err.contains("Using attention backend CPU_ATTN"), "{err}");
    // DUMMY_ATTN is a plain paged attention: the same greedy tokens.
    assert_eq!(output_token_ids(&on_dummy), output_token_ids(&on_cpu));
}

#[test]
fn two_activated_platform_plugins_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.env("DUMMY_PLATFORM_B", "1");
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &[],
    );
    let (code, _, err) = run(&mut cmd);
    one_error_line(
        code,
        &err,
        &[
            "Only one platform plugin can be activated, but got: [",
            "'dummy_platform_plugin'",
            "'dummy_platform_plugin_b'",
        ],
    );
    // Filtering one of them out with VLLM_PLUGINS leaves one: no error.
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.env("DUMMY_PLATFORM_B", "1")
        .env("VLLM_PLUGINS", "dummy_platform_plugin_b")
        .args(["plugins", "list"]);
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("activated: DummyDeviceB"), "{out}");
}

/// vLLM's `verify_quantization`: a platform that supports only fp8 refuses a GGUF model
/// (vLLM's quantization name for every GGUF file) with vLLM's text; listing gguf lets it run.
#[test]
fn a_platform_refuses_a_quantization_it_does_not_list() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let output = tmp.path().join("o");
    let only_fp8 = [("DUMMY_PLATFORM_QUANTIZATIONS", "fp8")];
    let (code, _, err) = generate_on_dummy_platform(&only_fp8, &input, &output);
    one_error_line(
        code,
        &err,
        &["gguf quantization is currently not supported in DummyDevice."],
    );
    let with_gguf = [("DUMMY_PLATFORM_QUANTIZATIONS", "fp8,gguf")];
    let (code, _, err) = generate_on_dummy_platform(&with_gguf, &input, &output);
    assert_eq!(code, 0, "{err}");
}

/// `generate` of `input` on the default model (2 tokens) with the dummy platform and `envs`.
fn generate_on_dummy_platform(
    envs: &[(&str, &str)],
    input: &Path,
    output: &Path,
) -> (i32, String, String) {
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.envs(envs.iter().copied());
    generate(
        &mut cmd,
        &default_model(),
        input,
        output,
        &["--max-tokens", "2"],
    );
    run(&mut cmd)
}

/// Issue 11, the platform hooks vLLM calls: `verify_model_arch` before the model is built,
/// `check_max_model_len` (which may clamp), and `validate_request` for every request.
#[test]
fn platform_hooks_verify_model_arch_check_max_model_len_and_validate_request() {
    let tmp = tempfile::tempdir().unwrap();
    // 6 tokens.
    let input = write_input(tmp.path(), "{\"prompt\": \"The capital of France is a\"}\n");
    let output = tmp.path().join("o");
    let run_with = |envs: &[(&str, &str)]| generate_on_dummy_platform(envs, &input, &output);
    let (code, _, err) = run_with(&[("DUMMY_PLATFORM_REFUSE_ARCH", "LlamaForCausalLM")]);
    one_error_line(
        code,
        &err,
        &[
            "platform DummyDevice: model architecture LlamaForCausalLM is not supported on \
           DummyDevice",
        ],
    );
    assert!(!err.contains("Using attention backend"), "{err}");

    let (code, _, err) = run_with(&[("DUMMY_PLATFORM_MAX_MODEL_LEN", "4")]);
    assert!(
        err.contains("Platform DummyDevice limits max_model_len to 4 (was 256)"),
        "{err}"
    );
    one_error_line(
        code,
        &err,
        &["is longer than the maximum model length of 4"],
    );

    let (code, _, err) = run_with(&[("DUMMY_PLATFORM_MAX_PROMPT_TOKENS", "3")]);
    one_error_line(
        code,
        &err,
        &["a prompt of 6 tokens is longer than the 3 tokens DummyDevice accepts"],
    );
    let (code, _, err) = run_with(&[("DUMMY_PLATFORM_MAX_PROMPT_TOKENS", "6")]);
    assert_eq!(code, 0, "{err}");
}

/// Issue 11, `Platform::validate_request` in `trellis serve`: a refused request is a 400 with
/// the platform's sentence, and the server keeps serving the others.
#[test]
fn serve_answers_a_request_the_platform_refuses_with_400() {
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.env("DUMMY_PLATFORM_MAX_PROMPT_TOKENS", "3");
    let s = Served::start(cmd);
    let (status, body) = s.post_completion(serde_json::json!([1, 2, 3, 4, 5]), 2);
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("a prompt of 5 tokens is longer than the 3 tokens DummyDevice accepts"),
        "{body}"
    );
    let (status, body) = s.post_completion(serde_json::json!([1, 2, 3]), 2);
    assert_eq!(status, 200, "{body}");
}

/// Issue 11, registries reachable from plugins: the dummy-model plugin maps the GGUF
/// `general.architecture` value `dummy` to its architecture, so a GGUF file that says `dummy`
/// loads as `MyLlamaForCausalLM`; without the plugin it is an unsupported architecture.
#[test]
fn a_plugin_maps_a_gguf_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(default_model()).unwrap();
    // `general.architecture` = "llama" → "dummy" (same length: the layout does not move).
    let key = b"general.architecture";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("general.architecture in the header");
    let value = at + key.len() + 4 + 8; // type (u32), string length (u64)
    assert_eq!(&bytes[value..value + 5], b"llama");
    bytes[value..value + 5].copy_from_slice(b"dummy");
    let model = tmp.path().join("dummy.gguf");
    std::fs::write(&model, &bytes).unwrap();
    drop(bytes);
    let input = write_input(tmp.path(), "{\"prompt_token_ids\": [5, 9, 3]}\n");
    let output = tmp.path().join("out.jsonl");
    let mut cmd = with(&[DUMMY_MODEL]);
    generate(&mut cmd, &model, &input, &output, &["--max-tokens", "3"]);
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(output_token_ids(&output), vec![vec![0, 0, 0]]);

    let mut cmd = with(&[DUMMY_MODEL]);
    cmd.env("VLLM_PLUGINS", "");
    generate(&mut cmd, &model, &input, &output, &["--max-tokens", "3"]);
    let (code, _, err) = run(&mut cmd);
    one_error_line(
        code,
        &err,
        &["Model architectures ['dummy (GGUF general.architecture)'] are not supported"],
    );
}

#[test]
fn custom_attention_backend_matches_cpu_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(
        tmp.path(),
        "{\"prompt\": \"The capital of France is\"}\n{\"prompt\": \"Once upon a time\"}\n{\"prompt\": \"Hi\"}\n",
    );
    let mut ids = Vec::new();
    for backend in ["CPU_REFERENCE", "example_attention"] {
        let output = tmp.path().join(format!("{backend}.jsonl"));
        let mut cmd = with(&[CUSTOM_ATTENTION]);
        generate(
            &mut cmd,
            &default_model(),
            &input,
            &output,
            &[
                "--max-tokens",
                "16",
                "--ignore-eos",
                "--attention-backend",
                backend,
            ],
        );
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 0, "{backend}: {err}");
        let want = format!("Using attention backend {}", backend.to_ascii_uppercase());
        assert!(err.contains(&want), "{err}");
        ids.push(output_token_ids(&output));
    }
    assert_eq!(ids[0].len(), 3);
    assert!(ids[0].iter().all(|t| t.len() == 16));
    assert_eq!(ids[0], ids[1], "EXAMPLE_ATTENTION must equal CPU_REFERENCE");
}

#[test]
fn unknown_attention_backend_lists_valid_options() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let mut cmd = with(&[CUSTOM_ATTENTION]);
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &["--attention-backend", "NO_SUCH_BACKEND"],
    );
    let (code, _, err) = run(&mut cmd);
    one_error_line(
        code,
        &err,
        &[
            "Unknown attention backend: 'NO_SUCH_BACKEND'. Valid options are: ",
            "CPU_REFERENCE",
            "EXAMPLE_ATTENTION",
        ],
    );
}

#[test]
fn failing_plugin_stops_generate_with_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let mut cmd = with(&[DUMMY_MODEL]);
    cmd.env("DUMMY_MODEL_FAIL", "1");
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &[],
    );
    let (code, _, err) = run(&mut cmd);
    one_error_line(
        code,
        &err,
        &[
            "plugin 'register_dummy_model' (general) failed",
            "DUMMY_MODEL_FAIL is set",
        ],
    );
    assert!(
        !err.contains("Platform:"),
        "start-up stops before the platform: {err}"
    );
}

const JSON_STAT_LOGGER: &str = "json-stat-logger";

/// A `trellis serve` child on an ephemeral port with its stderr lines on a channel.
struct Served {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    addr: String,
    seen: Vec<String>,
}

impl Served {
    fn start(cmd: Command) -> Served {
        Served::start_with(cmd, &default_model(), &["--max-model-len", "512"])
    }

    /// `trellis serve MODEL` with `extra` flags.
    fn start_with(mut cmd: Command, model: &Path, extra: &[&str]) -> Served {
        cmd.arg("serve")
            .arg(model)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--kv-cache-memory",
                "64M",
            ])
            .args(extra)
            .args(["--served-model-name", "smollm2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut s = Served {
            child,
            lines,
            addr: String::new(),
            seen: Vec::new(),
        };
        let l = s.wait_line(|l| l.starts_with("Trellis serving "));
        s.addr = l.rsplit("http://").next().unwrap().to_string();
        s
    }

    /// The next stderr line that satisfies `f` (panics if the server exits first).
    fn wait_line(&mut self, f: impl Fn(&str) -> bool) -> String {
        while let Ok(l) = self.lines.recv() {
            self.seen.push(l.clone());
            if f(&l) {
                return l;
            }
        }
        panic!("trellis serve ended: {}", self.seen.join("\n"));
    }

    /// POST /v1/completions over a plain TCP connection; returns the JSON body of a 200.
    fn complete(&self, prompt: &str, max_tokens: usize) -> serde_json::Value {
        let (status, body) = self.post_completion(serde_json::json!(prompt), max_tokens);
        assert_eq!(status, 200, "{body}");
        body
    }

    /// POST /v1/completions with `prompt` (a string or token ids); returns the HTTP status and
    /// the JSON body.
    fn post_completion(
        &self,
        prompt: serde_json::Value,
        max_tokens: usize,
    ) -> (u16, serde_json::Value) {
        self.post_model("smollm2", prompt, max_tokens)
    }

    /// [`Self::post_completion`] with `model` (a LoRA adapter's name, for example).
    fn post_model(
        &self,
        model: &str,
        prompt: serde_json::Value,
        max_tokens: usize,
    ) -> (u16, serde_json::Value) {
        use std::io::{Read, Write};
        let body = serde_json::json!({"model": model, "prompt": prompt,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
        .to_string();
        let mut c = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        let status = resp
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {resp}"));
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"));
        (status, body)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn json_stat_logger_fills_its_file_and_vllm_plugins_switches_it_off() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("stats.jsonl");
    let serve = |allow: Option<&str>| {
        let mut cmd = with(&[JSON_STAT_LOGGER]);
        cmd.env("JSON_STAT_LOGGER_FILE", &file)
            .env("VLLM_LOG_STATS_INTERVAL", "0.3")
            // Every interval prints its line (idle ones at DEBUG): a clock for the test.
            .env("VLLM_LOGGING_LEVEL", "DEBUG")
            .env("VLLM_TARGET_DEVICE", "cpu");
        if let Some(a) = allow {
            cmd.env("VLLM_PLUGINS", a);
        }
        Served::start(cmd)
    };
    let is_busy_line =
        |l: &str| l.contains("Engine 000: ") && !l.contains("generation throughput: 0.0");

    let mut s = serve(None);
    let r = s.complete("The capital of France is", 6);
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let total = |lines: &[serde_json::Value], field: &str| -> u64 {
        lines.iter().map(|l| l[field].as_u64().unwrap()).sum()
    };
    // One line per interval: the request may span several; wait until they add up to what
    // the API returned (the engine records before the last token goes out, so they will).
    let want = r["usage"]["completion_tokens"].as_u64().unwrap();
    let mut lines = read();
    for _ in 0..1000 {
        if total(&lines, "generation_tokens") >= want {
            break;
        }
        s.wait_line(|l| l.contains("Engine 000: "));
        lines = read();
    }
    assert_eq!(total(&lines, "generation_tokens"), want, "{lines:?}");
    assert_eq!(
        total(&lines, "prompt_tokens"),
        r["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(total(&lines, "finished_requests"), 1);
    let done = lines.iter().find(|l| l["finished_requests"] == 1).unwrap();
    assert_eq!(done["finish_reasons"], serde_json::json!({"length": 1}));
    assert!(
        lines
            .iter()
            .all(|l| l["model_name"] == "smollm2" && l["initialized"] == true)
    );
    // Idle intervals still get their line.
    let n = lines.len();
    for _ in 0..1000 {
        if read().len() > n {
            break;
        }
        s.wait_line(|l| l.contains("Engine 000: "));
    }
    assert!(read().len() > n);
    drop(s);

    // VLLM_PLUGINS="" leaves it out: the intervals pass, the file is never written.
    std::fs::remove_file(&file).unwrap();
    let mut s = serve(Some(""));
    s.complete("The capital of France is", 6);
    s.wait_line(is_busy_line);
    s.wait_line(|l| l.contains("Engine 000: "));
    assert!(
        !file.exists(),
        "the filtered-out plugin wrote {}",
        file.display()
    );
    drop(s);

    // Listed in its group.
    let (code, out, err) = run(with(&[JSON_STAT_LOGGER]).args(["plugins", "list"]));
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("json_stat_logger\t"))
        .unwrap_or_else(|| panic!("not listed: {out}"));
    assert!(line.contains("\tstat_logger\t"), "{line}");
    // Its entry was called, and registered.
    assert!(line.ends_with("\tloaded (registered)"), "{line}");
}

/// Asserts a 500 with an OpenAI error body whose message contains `needle`.
fn assert_plugin_panic_500(status: u16, body: &serde_json::Value, needle: &str) {
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["type"], "InternalServerError", "{body}");
    assert_eq!(body["error"]["code"], 500, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{body}");
}

/// Issue 11, panic isolation: a panic inside a plugin's `Model::forward` (a library with its
/// own standard library: the host cannot catch it) is caught on the plugin's side by the
/// adapter `declare_plugin!` wraps it in; `trellis serve` answers that request with a 500 and
/// keeps serving.
#[test]
fn plugin_model_forward_panic_fails_the_request_and_serve_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, "MyLlamaForCausalLM");
    let mut cmd = with(&[DUMMY_MODEL]);
    cmd.env("DUMMY_MODEL_PANIC_TOKEN", "9")
        .env("VLLM_TARGET_DEVICE", "cpu");
    let mut s = Served::start_with(cmd, &model, &["--max-model-len", "128"]);
    for _ in 0..2 {
        let (status, body) = s.post_completion(serde_json::json!([5, 9, 3]), 4);
        assert_plugin_panic_500(
            status,
            &body,
            "plugin 'register_dummy_model' panicked in Model::forward: \
             DUMMY_MODEL_PANIC_TOKEN: the batch contains token 9",
        );
        let (status, body) = s.post_completion(serde_json::json!([5, 3]), 4);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    }
    assert!(s.child.try_wait().unwrap().is_none(), "the server exited");
    s.wait_line(|l| l.contains("step failed"));
}

/// Issue 11, panic isolation: the same for a plugin's `AttentionImpl::forward`.
#[test]
fn plugin_attention_forward_panic_fails_the_request_and_serve_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny_llama(&model, "LlamaForCausalLM");
    let mut cmd = with(&[CUSTOM_ATTENTION]);
    cmd.env("EXAMPLE_ATTENTION_PANIC_QUERY_LEN", "5")
        .env("VLLM_TARGET_DEVICE", "cpu");
    let s = Served::start_with(
        cmd,
        &model,
        &[
            "--max-model-len",
            "128",
            "--attention-backend",
            "EXAMPLE_ATTENTION",
        ],
    );
    for _ in 0..2 {
        let (status, body) = s.post_completion(serde_json::json!([1, 2, 3, 4, 5]), 3);
        assert_plugin_panic_500(
            status,
            &body,
            "plugin 'register_example_attention' panicked in AttentionImpl::forward: \
             EXAMPLE_ATTENTION_PANIC_QUERY_LEN: a sequence with 5 new tokens",
        );
        let (status, body) = s.post_completion(serde_json::json!([1, 2]), 3);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    }
}

/// Issue 11, spec §1.2: every run logs the discovered plugins per group (INFO, DEBUG for the
/// general group) and which of them ran.
#[test]
fn discovered_plugins_and_those_that_ran_are_logged_per_group() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    for level in [None, Some("DEBUG")] {
        let mut cmd = with(&[DUMMY_PLATFORM]);
        if let Some(l) = level {
            cmd.env("VLLM_LOGGING_LEVEL", l);
        }
        generate(
            &mut cmd,
            &default_model(),
            &input,
            &tmp.path().join("o"),
            &["--max-tokens", "1"],
        );
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("INFO trellis: Available plugins for group vllm.platform_plugins:"),
            "{err}"
        );
        assert!(
            err.contains("INFO trellis: - dummy_platform_plugin -> "),
            "{err}"
        );
        assert!(
            err.contains(
                "All plugins in this group will be loaded. Set `VLLM_PLUGINS` to control which \
                 plugins to load."
            ),
            "{err}"
        );
        let ran = |group: &str| {
            let prefix = format!("INFO trellis: Plugins run for group {group}: ");
            err.lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no {prefix:?}: {err}"))
                .to_string()
        };
        assert!(
            ran("vllm.general_plugins").contains("register_dummy_attention"),
            "{err}"
        );
        let platforms = ran("vllm.platform_plugins");
        assert!(
            platforms.contains("dummy_platform_plugin (activated)")
                && platforms.contains("dummy_platform_plugin_b (not activated)"),
            "{platforms}"
        );
        let general_listed =
            err.contains("DEBUG trellis: Available plugins for group vllm.general_plugins:");
        assert_eq!(general_listed, level.is_some(), "{err}");
    }
    // With VLLM_PLUGINS, each allowed plugin is announced and the others are listed as not run.
    let mut cmd = with(&[DUMMY_PLATFORM]);
    cmd.env(
        "VLLM_PLUGINS",
        "dummy_platform_plugin,register_dummy_attention",
    );
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &["--max-tokens", "1"],
    );
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("INFO trellis: Loading plugin dummy_platform_plugin"),
        "{err}"
    );
    assert!(
        err.contains("dummy_platform_plugin_b (filtered out by VLLM_PLUGINS)"),
        "{err}"
    );
}

/// Issue 11: a registration that replaces an existing backend is a WARNING (vLLM's
/// `register_backend` on an existing member overrides it).
#[test]
fn overriding_a_builtin_backend_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let mut cmd = with(&[CUSTOM_ATTENTION]);
    cmd.env("EXAMPLE_ATTENTION_NAME", "CPU_REFERENCE");
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &["--max-tokens", "1", "--attention-backend", "CPU_REFERENCE"],
    );
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "WARNING trellis: Attention backend CPU_REFERENCE is already registered, and will be \
             overwritten by the new registration."
        ),
        "{err}"
    );
    // Without the override, no warning.
    let mut cmd = with(&[CUSTOM_ATTENTION]);
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &["--max-tokens", "1"],
    );
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("is already registered"), "{err}");
}

/// Issue 11, spec §2.4: on the CPU a requested backend that cannot run here (a vLLM name
/// without an implementation in Trellis) is ignored with vLLM's INFO line and CPU_ATTN is used;
/// the greedy tokens are CPU_ATTN's.
#[test]
fn cpu_ignores_an_unusable_backend_with_vllm_info_and_uses_cpu_attn() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"The capital of France is\"}\n");
    let mut ids = Vec::new();
    for backend in ["FLASH_ATTN", "CPU_ATTN"] {
        let output = tmp.path().join(format!("{backend}.jsonl"));
        let mut cmd = with(&[]);
        cmd.env("VLLM_TARGET_DEVICE", "cpu");
        generate(
            &mut cmd,
            &default_model(),
            &input,
            &output,
            &["--max-tokens", "4", "--attention-backend", backend],
        );
        let (code, _, err) = run(&mut cmd);
        assert_eq!(code, 0, "{backend}: {err}");
        let info = "INFO trellis: Cannot use FLASH_ATTN backend on CPU.";
        assert_eq!(err.contains(info), backend == "FLASH_ATTN", "{err}");
        assert!(err.contains("Using attention backend CPU_ATTN"), "{err}");
        ids.push(output_token_ids(&output));
    }
    assert_eq!(ids[0], ids[1]);
}

/// Issue 11: a plugin whose registration panics (inside a library: a foreign exception to the
/// host) stops start-up with one `error:` line naming it, not an abort.
#[test]
fn panicking_registration_is_one_error_line_naming_the_plugin() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(tmp.path(), "{\"prompt\": \"hi\"}\n");
    let mut cmd = with(&[DUMMY_MODEL]);
    cmd.env("DUMMY_MODEL_FAIL", "panic");
    generate(
        &mut cmd,
        &default_model(),
        &input,
        &tmp.path().join("o"),
        &[],
    );
    let (code, _, err) = run(&mut cmd);
    assert_ne!(code, 0, "{err}");
    assert_ne!(code, 101, "{err}");
    assert_ne!(code, 134, "aborted: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(
            "plugin 'register_dummy_model' (general) failed: panicked: DUMMY_MODEL_FAIL=panic"
        ),
        "{err}"
    );
}

/// Issue 12: the example LoRA resolver plugin (examples/plugins/index-lora-resolver), built with
/// `trellis plugins build` (or compiled in) and used by `trellis serve` without a rebuild: an
/// unknown `model` found in its JSON index is loaded and served; a name it does not know is the
/// generic 404.
#[test]
fn index_lora_resolver_serves_adapters_from_its_index() {
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index.json");
    let adapter = common::repo().join("testdata/lora/lora-smollm2-r4-qv");
    let entry = serde_json::json!({"my-adapter": adapter.to_string_lossy()});
    std::fs::write(&index, entry.to_string()).unwrap();
    let mut cmd = with(&["index-lora-resolver"]);
    cmd.env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        .env("LORA_INDEX_FILE", &index)
        .env("VLLM_TARGET_DEVICE", "cpu");
    let s = Served::start_with(
        cmd,
        &default_model(),
        &["--max-model-len", "512", "--enable-lora"],
    );
    let (status, body) = s.post_model("my-adapter", serde_json::json!("Hi"), 3);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let (status, err) = s.post_model("not-in-the-index", serde_json::json!("Hi"), 3);
    assert_eq!(status, 404, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Valid aliases: smollm2, my-adapter"),
        "{err}"
    );
}
