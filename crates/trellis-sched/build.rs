//! Exports the content hash of this crate's source to the crates that depend on it through
//! `links = "trellis_sched"` (as `DEP_TRELLIS_SCHED_SOURCE_HASH`): `trellis-plugin` puts it in
//! the plugin fingerprint, because `trellis-sched` types cross the plugin boundary. It is the
//! same for a path, git or registry copy of byte-identical source.

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let hash = trellis_build::source_hash(&dir, &["src"]);
    println!("cargo:source_hash={hash}");
    println!("cargo:rerun-if-changed=build.rs");
}
