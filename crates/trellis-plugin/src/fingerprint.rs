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
///
/// Its parts, separated by `; `: the crate's version and the hash of its source (every file of
/// `src/` and `build.rs`: a change to a trait, even one that keeps the version, changes it),
/// the source hash of `trellis-sched` (a shared path crate), `rustc -V`, the target triple and
/// the enabled features. Paths are not part of it: a byte-identical copy elsewhere (a git
/// checkout) has the same fingerprint.
pub const BUILD_FINGERPRINT: &str = concat!(
    "trellis-plugin ",
    env!("CARGO_PKG_VERSION"),
    " source ",
    env!("TRELLIS_PLUGIN_SOURCE_HASH"),
    "; trellis-sched source ",
    env!("TRELLIS_PLUGIN_SCHED_SOURCE_HASH"),
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
    " source ",
    env!("TRELLIS_PLUGIN_SOURCE_HASH"),
    "; trellis-sched source ",
    env!("TRELLIS_PLUGIN_SCHED_SOURCE_HASH"),
    "; ",
    env!("TRELLIS_PLUGIN_RUSTC_VERSION"),
    "; target ",
    env!("TRELLIS_PLUGIN_TARGET"),
    "; features [",
    env!("TRELLIS_PLUGIN_FEATURES"),
    "]\0"
);

/// What differs between two fingerprints, part by part, as a sentence fragment: `the
/// trellis-plugin source (plugin: …; this trellis: …)`, or `rustc (…)`. Empty when equal.
pub fn fingerprint_difference(plugin: &str, host: &str) -> String {
    let (p, h): (Vec<&str>, Vec<&str>) = (plugin.split("; ").collect(), host.split("; ").collect());
    let label = |part: &str| -> String {
        if part.starts_with("trellis-plugin ") {
            "the trellis-plugin API (version and source)".to_string()
        } else if part.starts_with("trellis-sched source") {
            "the trellis-sched source".to_string()
        } else if part.starts_with("rustc") {
            "the rustc".to_string()
        } else if part.starts_with("target") {
            "the target".to_string()
        } else if part.starts_with("features") {
            "the trellis-plugin features".to_string()
        } else {
            "the build".to_string()
        }
    };
    let n = p.len().max(h.len());
    (0..n)
        .filter_map(|i| {
            let (a, b) = (
                p.get(i).copied().unwrap_or(""),
                h.get(i).copied().unwrap_or(""),
            );
            (a != b).then(|| {
                format!(
                    "{} (plugin: {a}; this trellis: {b})",
                    label(if b.is_empty() { a } else { b })
                )
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shared crates whose source [`BUILD_FINGERPRINT`] hashes, and `trellis-build`, the
/// build-time helper that computes those hashes (nothing of it is in the compiled code).
const SOURCE_HASHED: &[&str] = &["trellis-plugin", "trellis-sched", "trellis-build"];

/// The crate whose dependency closure is "shared" between host and plugins.
const ROOT_CRATE: &str = "trellis-plugin";

/// A hash (`fnv1a64:<hex>`) of the identity of `trellis-plugin` and of every crate it depends
/// on, transitively, as recorded in the text of a `Cargo.lock`: name, version, source and
/// registry checksum; for the crates whose source [`BUILD_FINGERPRINT`] hashes, name and
/// version only (so that a git checkout of the same source is accepted).
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
        checksum: Option<String>,
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
        // The crates whose source BUILD_FINGERPRINT hashes are identified by it, wherever they
        // come from (a path, a git checkout of the same commit); the others by their source
        // and, from a registry, the checksum of the package.
        let source = match p.source.as_deref() {
            _ if SOURCE_HASHED.contains(&p.name.as_str()) => "source in BUILD_FINGERPRINT",
            Some(s) => s,
            None => "path",
        };
        let id = match &p.checksum {
            Some(c) => format!("{} {} {source} {c}", p.name, p.version),
            None => format!("{} {} {source}", p.name, p.version),
        };
        if seen.insert(id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difference_names_each_differing_part() {
        assert_eq!(
            fingerprint_difference(BUILD_FINGERPRINT, BUILD_FINGERPRINT),
            ""
        );
        let other_source = BUILD_FINGERPRINT.replacen(" source fnv1a64:", " source fnv1a64:0", 1);
        let d = fingerprint_difference(&other_source, BUILD_FINGERPRINT);
        assert!(
            d.starts_with("the trellis-plugin API (version and source) (plugin: trellis-plugin "),
            "{d}"
        );
        assert!(!d.contains("rustc"), "{d}");
        let other_rustc = BUILD_FINGERPRINT.replace("rustc ", "rustc 0.0.0-other ");
        let d = fingerprint_difference(&other_rustc, BUILD_FINGERPRINT);
        assert!(d.starts_with("the rustc (plugin: rustc 0.0.0-other"), "{d}");
    }
}
