//! The example plugins of examples/plugins through the real `trellis generate` (spec §1.5,
//! §2.6, §3.6, §4.5). Without features the examples are built once per test process with
//! `trellis plugins build --debug` and loaded at run time; with `--features example-plugins`
//! the same tests run against the examples compiled into the binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    SMALL, default_model, one_error_line, output_token_ids, plugins, run, trellis, write_tiny_llama,
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
    assert!(
        err.contains("Using attention backend CPU_REFERENCE"),
        "{err}"
    );
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

#[test]
fn custom_attention_backend_matches_cpu_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write_input(
        tmp.path(),
        "{\"prompt\": \"The capital of France is\"}\n{\"prompt\": \"Once upon a time\"}\n",
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
    assert_eq!(ids[0].len(), 2);
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
