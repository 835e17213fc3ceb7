//! Captures the build facts that make up a plugin's fingerprint (see `src/fingerprint.rs`):
//! the rustc that compiles this crate, the target triple and this crate's enabled features.

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
    println!("cargo:rustc-env=TRELLIS_PLUGIN_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=TRELLIS_PLUGIN_TARGET={target}");
    println!(
        "cargo:rustc-env=TRELLIS_PLUGIN_FEATURES={}",
        features.join(",")
    );
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
