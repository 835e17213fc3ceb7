//! Helpers of the plugin tests: the `trellis` binary with an isolated plugin environment, the
//! example plugins built and installed at run time, and a tiny random Llama directory.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether the example plugins are linked into the binary under test
/// (`--features example-plugins`); otherwise they are loaded at run time.
pub const COMPILED_IN: bool = cfg!(feature = "example-plugins");

/// A `trellis` command whose plugin directories are exactly `dirs` (HOME isolated too, and the
/// plugin-related variables of the caller's environment removed).
pub fn trellis(dirs: &[&Path]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellis"));
    // `plugins build` runs cargo, which (and rustup's proxy) finds its toolchain and registry
    // through HOME: keep the caller's, whichever way the test binary was started.
    if let Some(real) = std::env::var_os("HOME").map(PathBuf::from) {
        for (var, dir) in [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")] {
            if std::env::var_os(var).is_none() && real.join(dir).is_dir() {
                c.env(var, real.join(dir));
            }
        }
    }
    let home = std::env::temp_dir().join("trellis-plugin-tests-home");
    c.env("HOME", &home);
    for var in [
        "XDG_DATA_HOME",
        "VLLM_PLUGINS",
        "VLLM_TARGET_DEVICE",
        "VLLM_ATTENTION_BACKEND",
        "DUMMY_MODEL_FAIL",
        "DUMMY_PLATFORM_B",
        "DUMMY_MODEL_PANIC_TOKEN",
        "EXAMPLE_ATTENTION_PANIC_QUERY_LEN",
        "EXAMPLE_ATTENTION_NAME",
    ] {
        c.env_remove(var);
    }
    if dirs.is_empty() {
        c.env_remove("TRELLIS_PLUGIN_PATH");
    } else {
        let joined: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        c.env("TRELLIS_PLUGIN_PATH", joined.join(":"));
    }
    c
}

/// A plugin directory holding the example `name` (a folder of examples/plugins), built with
/// `trellis plugins build --debug` once per test process into `target/plugin-tests`, shared by
/// every example and every run (see [`build_lock`]).
pub fn installed(name: &str) -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(dir) = built.get(name) {
        return dir.clone();
    }
    let root = ROOT.get_or_init(|| tempfile::tempdir().unwrap());
    let dir = root.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (target, lock) = build_lock();
    let out = trellis(&[&dir])
        .args(["plugins", "build", "--debug"])
        .arg(repo().join("examples/plugins").join(name))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run trellis plugins build");
    drop(lock);
    assert!(
        out.status.success(),
        "plugins build {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    built.insert(name.to_string(), dir.clone());
    dir
}

/// The target directory the tests build plugins in (`target/plugin-tests`: the examples'
/// dependencies are compiled there once and reused by every example and every later run), and
/// a lock on it: one build at a time across test processes (nextest runs each test in its
/// own), since a build writes the crate's Cargo.lock and the shared artifacts. Held until the
/// returned file is dropped.
pub fn build_lock() -> (PathBuf, std::fs::File) {
    // Not the workspace's own target directory: a plugin is its own workspace, so cargo would
    // track the same example crate built standalone (cdylib) and compiled into the binary
    // (`--features trellis/example-plugins`) under one fingerprint, and one build would skip
    // the other's artifacts.
    let target = repo().join("target/plugin-tests");
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join("trellis-plugin-tests.lock")).unwrap();
    lock.lock().unwrap();
    (target, lock)
}

/// The plugin directories to pass to [`trellis`] for these examples: none when they are
/// compiled in, else each one installed.
pub fn plugins(names: &[&str]) -> Vec<PathBuf> {
    match COMPILED_IN {
        true => Vec::new(),
        false => names.iter().map(|n| installed(n)).collect(),
    }
}

/// Runs `cmd` and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run trellis");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Asserts a failed run with exactly one `error:` line on stderr that contains every needle;
/// returns that line.
pub fn one_error_line(code: i32, stderr: &str, needles: &[&str]) -> String {
    assert_ne!(code, 0, "must fail: {stderr}");
    assert_ne!(code, 101, "a panic exits with 101: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{:?} should mention {n:?}", lines[0]);
    }
    lines[0].to_string()
}

/// The default model (scripts/fetch-model.sh).
pub fn default_model() -> PathBuf {
    let p = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "model file {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Flags that keep an engine small: short context, small KV cache, greedy.
pub const SMALL: [&str; 6] = [
    "--max-model-len",
    "256",
    "--kv-cache-memory",
    "64M",
    "--temperature",
    "0",
];

/// The generated token ids of each line of a `trellis generate --output` file.
pub fn output_token_ids(path: &Path) -> Vec<Vec<u64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["outputs"][0]["token_ids"]
                .as_array()
                .unwrap_or_else(|| panic!("no token_ids in {l}"))
                .iter()
                .map(|t| t.as_u64().unwrap())
                .collect()
        })
        .collect()
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Writes a tiny random Llama as a Hugging Face directory (config.json naming `architecture`,
/// model.safetensors, a word-level tokenizer.json) into `dir`. Vocabulary: 32 tokens.
pub fn write_tiny_llama(dir: &Path, architecture: &str) {
    let (vocab, hidden, heads, kv_heads, inter) = (32usize, 16usize, 2usize, 1usize, 32usize);
    let d = hidden / heads;
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "vocab_size": vocab,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let p = "model.layers.0";
    let tensors: Vec<(String, Vec<usize>, f32)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, hidden], 1.0),
        ("model.norm.weight".into(), vec![hidden], 0.0),
        (format!("{p}.input_layernorm.weight"), vec![hidden], 0.0),
        (
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            0.0,
        ),
        (
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * d, hidden],
            0.5,
        ),
        (
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_heads * d, hidden],
            0.5,
        ),
        (
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_heads * d, hidden],
            0.5,
        ),
        (
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * d],
            0.25,
        ),
        (
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            0.25,
        ),
        (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden], 0.25),
        (
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            0.2,
        ),
    ];
    // safetensors: u64 header length, JSON header, little-endian f32 data. Scale 0 means a
    // norm weight of ones.
    let mut rng = Rng(0x5eed);
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, shape, scale) in &tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            let x = if *scale == 0.0 {
                1.0
            } else {
                rng.next() * scale
            };
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&data);
    std::fs::write(dir.join("model.safetensors"), file).unwrap();
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| {
            let w = if i == 0 {
                "<unk>".to_string()
            } else {
                format!("w{i}")
            };
            (w, serde_json::json!(i))
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}
