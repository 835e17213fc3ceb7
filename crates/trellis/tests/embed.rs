//! `trellis embed`: JSONL in, one JSON line per prompt out, through the pooling runner; a
//! generative model is refused with one error line unless `--convert embed`.

mod common;

use common::{default_model, one_error_line, repo, run, trellis};

fn minilm() -> std::path::PathBuf {
    let p = repo().join("models/all-MiniLM-L6-v2");
    assert!(
        p.join("model.safetensors").is_file(),
        "embedding model {} is missing: run scripts/fetch-embedding-model.sh",
        p.display()
    );
    p
}

fn lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn embed_jsonl_in_jsonl_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Hello world\"}\n\n{\"prompt_token_ids\": [101, 7592, 2088, 102]}\n",
    )
    .expect("write");
    let (code, stdout, stderr) = run(trellis(&[])
        .args(["embed", "--model"])
        .arg(minilm())
        .arg("--input")
        .arg(&input));
    assert_eq!(code, 0, "{stderr}");
    let out = lines(&stdout);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0]["prompt_token_ids"],
        serde_json::json!([101, 7592, 2088, 102])
    );
    assert_eq!(out[0]["embedding"].as_array().map(Vec::len), Some(384));
    assert_eq!(out[0]["embedding"], out[1]["embedding"]);
    assert!(
        stderr.contains("Using attention backend CPU_REFERENCE"),
        "{stderr}"
    );
}

#[test]
fn generative_model_needs_convert_embed() {
    let (code, _, stderr) = run(trellis(&[])
        .args([
            "embed",
            "--prompt",
            "hi",
            "--max-model-len",
            "64",
            "--model",
        ])
        .arg(default_model()));
    one_error_line(
        code,
        &stderr,
        &["does not support pooling", "--convert embed"],
    );
    let (code, stdout, stderr) = run(trellis(&[])
        .args([
            "embed",
            "--prompt",
            "hi",
            "--max-model-len",
            "64",
            "--convert",
            "embed",
        ])
        .args(["--kv-cache-memory", "64M", "--model"])
        .arg(default_model()));
    assert_eq!(code, 0, "{stderr}");
    let out = lines(&stdout);
    assert_eq!(out[0]["embedding"].as_array().map(Vec::len), Some(576));
    assert!(
        stderr.contains("Pooling runner: LAST pooling, normalized"),
        "{stderr}"
    );
}
