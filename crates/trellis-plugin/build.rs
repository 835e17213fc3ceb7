//! Captures the build facts that make up a plugin's fingerprint (see `src/fingerprint.rs`):
//! a hash of the source of this crate and of the shared crate `trellis-sched` (whose
//! `FinishReason` crosses the boundary; it exports its hash through `links`), the rustc that
//! compiles it, the target triple and this crate's enabled features.

use std::path::PathBuf;
use std::process::Command;

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
    let own = trellis_build::source_hash(&manifest_dir, &["src", "build.rs"]);
    // trellis-sched exports the hash of its own source (`links = "trellis_sched"`): the same
    // for a path, git or registry copy.
    let sched = std::env::var("DEP_TRELLIS_SCHED_SOURCE_HASH")
        .unwrap_or_else(|_| "unknown (trellis-sched exported no source hash)".to_string());
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
    println!("cargo:rerun-if-env-changed=DEP_TRELLIS_SCHED_SOURCE_HASH");
}
