//! Build fingerprints: what must be equal between the host and a plugin library for Rust
//! types to cross between them.
//!
//! Rust has no stable ABI: a trait object or a candle tensor made by a library is only
//! understood by a host built by the same rustc from the same versions and features of every
//! shared crate. The fingerprint has two parts:
//! - [`BUILD_FINGERPRINT`], known when `trellis-plugin` is compiled (its build script):
//!   trellis-plugin version, rustc version, target triple, trellis-plugin's features. Every
//!   plugin library exports it, so the host checks the code it is about to call.
//! - a hash of the versions of the shared crates (trellis-plugin and everything it depends on,
//!   candle-core included) in the `Cargo.lock` the library was built with
//!   ([`shared_crates_hash`]), written into the manifest by `trellis plugins build`, which
//!   builds against the host's own `Cargo.lock`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

/// The compile-time half of the fingerprint of this build of `trellis-plugin`.
pub const BUILD_FINGERPRINT: &str = concat!(
    "trellis-plugin ",
    env!("CARGO_PKG_VERSION"),
    "; ",
    env!("TRELLIS_PLUGIN_RUSTC_VERSION"),
    "; target ",
    env!("TRELLIS_PLUGIN_TARGET"),
    "; features [",
    env!("TRELLIS_PLUGIN_FEATURES"),
    "]"
);

/// [`BUILD_FINGERPRINT`] with a terminating NUL, as plugin libraries export it.
pub(crate) const BUILD_FINGERPRINT_C: &str = concat!(
    "trellis-plugin ",
    env!("CARGO_PKG_VERSION"),
    "; ",
    env!("TRELLIS_PLUGIN_RUSTC_VERSION"),
    "; target ",
    env!("TRELLIS_PLUGIN_TARGET"),
    "; features [",
    env!("TRELLIS_PLUGIN_FEATURES"),
    "]\0"
);

/// The crate whose dependency closure is "shared" between host and plugins.
const ROOT_CRATE: &str = "trellis-plugin";

/// A hash (`fnv1a64:<hex>`) of the name, version and source of `trellis-plugin` and of every
/// crate it depends on, transitively, as recorded in the text of a `Cargo.lock`.
///
/// Errors when the text is not a Cargo.lock or does not contain `trellis-plugin`.
pub fn shared_crates_hash(cargo_lock: &str) -> Result<String, String> {
    let shared = shared_crates(cargo_lock)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for line in &shared {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

/// `name version source` of every shared crate, sorted.
pub fn shared_crates(cargo_lock: &str) -> Result<BTreeSet<String>, String> {
    #[derive(serde::Deserialize)]
    struct Lock {
        #[serde(default)]
        package: Vec<Package>,
    }
    #[derive(serde::Deserialize)]
    struct Package {
        name: String,
        version: String,
        #[serde(default)]
        source: Option<String>,
        #[serde(default)]
        dependencies: Vec<String>,
    }
    let lock: Lock = toml::from_str(cargo_lock).map_err(|e| format!("not a Cargo.lock: {e}"))?;
    // A dependency is written `name`, or `name version` when several versions are locked.
    let mut by_name: BTreeMap<&str, Vec<&Package>> = BTreeMap::new();
    for p in &lock.package {
        by_name.entry(p.name.as_str()).or_default().push(p);
    }
    let lookup = |dep: &str| -> Option<&Package> {
        let mut parts = dep.split(' ');
        let name = parts.next()?;
        let version = parts.next();
        let candidates = by_name.get(name)?;
        match version {
            Some(v) => candidates.iter().copied().find(|p| p.version == v),
            None => candidates.first().copied(),
        }
    };
    let root = lookup(ROOT_CRATE).ok_or_else(|| format!("the Cargo.lock has no {ROOT_CRATE}"))?;
    let mut seen = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        let source = p.source.as_deref().unwrap_or("path");
        if seen.insert(format!("{} {} {}", p.name, p.version, source)) {
            stack.extend(p.dependencies.iter().filter_map(|d| lookup(d)));
        }
    }
    Ok(seen)
}

static HOST_LOCK: OnceLock<String> = OnceLock::new();

/// Tells the plugin loader the text of the `Cargo.lock` this host was built with (the
/// `trellis` binary embeds its own). Only the first call counts.
pub fn set_host_cargo_lock(cargo_lock: &str) {
    let _ = HOST_LOCK.set(cargo_lock.to_string());
}

/// The text given to [`set_host_cargo_lock`], if any.
pub fn host_cargo_lock() -> Option<&'static str> {
    HOST_LOCK.get().map(String::as_str)
}

/// The host's shared-crates hash, or a message saying why it is unknown.
pub(crate) fn host_shared_crates_hash() -> Result<String, String> {
    match host_cargo_lock() {
        Some(text) => shared_crates_hash(text),
        None => Err(
            "this host does not know its Cargo.lock (trellis_plugin::set_host_cargo_lock was \
             not called), so it cannot check run-time plugins"
                .to_string(),
        ),
    }
}
