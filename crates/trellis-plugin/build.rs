//! Captures the build facts that make up a plugin's fingerprint (see `src/fingerprint.rs`):
//! a hash of the source of this crate and of the shared crate that lives beside it
//! (`trellis-sched`, whose `FinishReason` crosses the boundary), the rustc that compiles it, the
//! target triple and this crate's enabled features.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every file under `dir`, recursively, sorted (`None` when `dir` does not exist).
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Some(out)
}

/// FNV-1a (64 bits) over the relative path and the bytes of every file of `dirs` (relative
/// to `root`), so that byte-identical sources hash the same wherever they are checked out.
fn source_hash(root: &Path, dirs: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for d in dirs {
        let dir = root.join(d);
        println!("cargo:rerun-if-changed={}", dir.display());
        for f in files(&dir).unwrap_or_default() {
            let rel = f.strip_prefix(root).unwrap_or(&f);
            eat(rel.to_string_lossy().replace('\\', "/").as_bytes());
            eat(&std::fs::read(&f).unwrap_or_default());
        }
    }
    format!("fnv1a64:{h:016x}")
}

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let version = Command::new(&rustc)
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc (unknown version)".to_string());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_lowercase()))
        .collect();
    features.sort();
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let own = source_hash(&manifest_dir, &["src", "build.rs"]);
    // The path dependency beside it, when built from a checkout of the repository (a registry
    // build is identified by the versions in Cargo.lock, checked from the manifest).
    let sched = source_hash(&manifest_dir.join(".."), &["trellis-sched/src"]);
    println!("cargo:rustc-env=TRELLIS_PLUGIN_SOURCE_HASH={own}");
    println!("cargo:rustc-env=TRELLIS_PLUGIN_SCHED_SOURCE_HASH={sched}");
    println!("cargo:rustc-env=TRELLIS_PLUGIN_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=TRELLIS_PLUGIN_TARGET={target}");
    println!(
        "cargo:rustc-env=TRELLIS_PLUGIN_FEATURES={}",
        features.join(",")
    );
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
