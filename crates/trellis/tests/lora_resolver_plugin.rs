//! The example LoRA resolver plugin (examples/plugins/index-lora-resolver, issue 12): built
//! with `trellis plugins build` (or compiled in with `--features example-plugins`) and used by
//! `trellis serve` without a rebuild — an unknown `model` found in its JSON index is loaded and
//! served; a name it does not know is the generic 404.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use common::{default_model, plugins, trellis};

fn post(addr: &str, model: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": model, "prompt": "Hi", "max_tokens": 3,
        "temperature": 0})
    .to_string();
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    (status, serde_json::from_str(body).unwrap())
}

#[test]
fn index_resolver_plugin_serves_adapters_from_its_index() {
    let dirs: Vec<PathBuf> = plugins(&["index-lora-resolver"]);
    let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let tmp = tempfile::tempdir().unwrap();
    let index = tmp.path().join("index.json");
    let adapter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/lora/lora-smollm2-r4-qv");
    std::fs::write(
        &index,
        serde_json::json!({"my-adapter": adapter.to_string_lossy()}).to_string(),
    )
    .unwrap();
    let mut cmd = trellis(&refs);
    cmd.arg("serve")
        .arg(default_model())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--kv-cache-memory",
            "64M",
        ])
        .args([
            "--max-model-len",
            "512",
            "--served-model-name",
            "smollm2",
            "--enable-lora",
        ])
        .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
        .env("LORA_INDEX_FILE", &index)
        .env("VLLM_TARGET_DEVICE", "cpu")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let addr = loop {
        let Some(Ok(l)) = lines.next() else {
            let _ = child.kill();
            panic!("trellis serve ended: {}", seen.join("\n"));
        };
        if let Some(a) = l.strip_prefix("Trellis serving smollm2 on http://") {
            break a.to_string();
        }
        seen.push(l);
    };
    std::thread::spawn(move || lines.for_each(drop));
    let (status, body) = post(&addr, "my-adapter");
    let (missing, err) = post(&addr, "not-in-the-index");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(missing, 404, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Valid aliases: smollm2, my-adapter"),
        "{err}"
    );
}
