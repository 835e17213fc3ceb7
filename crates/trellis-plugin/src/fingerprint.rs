//! Build fingerprints: what must be equal between the host and a plugin library for Rust
//! types to cross between them.
//!
//! Rust has no stable ABI: a trait object or a candle tensor made by a library is only
//! understood by a host built by the same rustc from the same versions and features of every
//! shared crate. [`BUILD_FINGERPRINT`] is known when `trellis-plugin` is compiled (its build
//! script) and every plugin library exports it, so the host checks the code it is about to
//! call: trellis-plugin's version and source hash, trellis-sched's source hash, rustc, the
//! target, trellis-plugin's features, and the locked identity (version, source, checksum) of
//! the crates whose types cross the boundary, candle-core included ([`boundary_crates_hash`]
//! of the `Cargo.lock` it was built with: `trellis plugins build` resolves the plugin's lock,
//! starting from the host's own, and hands the hash to the build). The manifest also records
//! [`shared_crates_hash`] of the host's lock, after `plugins build` checked that every crate
//! the plugin shares with trellis-plugin is locked at the host's version.

use std::sync::OnceLock;

/// The compile-time half of the fingerprint of this build of `trellis-plugin`.
///
/// Its parts, separated by `; `: the crate's version and the hash of its source (every file of
/// `src/` and `build.rs`: a change to a trait, even one that keeps the version, changes it),
/// the source hash of `trellis-sched` (a shared crate), `rustc -V`, the target triple, the
/// enabled features and the boundary-crates hash of the Cargo.lock. Paths are not part of it: a byte-identical copy elsewhere (a git
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
    "]; boundary crates ",
    env!("TRELLIS_PLUGIN_SHARED_CRATES_HASH"),
    ""
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
    "]; boundary crates ",
    env!("TRELLIS_PLUGIN_SHARED_CRATES_HASH"),
    "\0"
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
        } else if part.starts_with("boundary crates") {
            "the crates locked in Cargo.lock whose types cross the boundary (candle-core, half, \
             serde, serde_json)"
                .to_string()
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

/// What the fingerprint cannot see: the layouts of boundary types that depend on the features
/// the whole build turned on (a crate anywhere in the host's graph can turn on serde_json's
/// `preserve_order`, which makes `serde_json::Map` an `IndexMap`). Computed at run time by each
/// copy of `trellis-plugin`, the host's and the plugin's, which must agree.
pub fn layout_probe() -> &'static str {
    layout_probe_cstr().to_str().unwrap_or("")
}

fn layout_probe_cstr() -> &'static std::ffi::CStr {
    static PROBE: OnceLock<std::ffi::CString> = OnceLock::new();
    PROBE.get_or_init(|| {
        let mut map = serde_json::Map::new();
        map.insert("b".into(), 1.into());
        map.insert("a".into(), 2.into());
        let order = match map.keys().next().map(String::as_str) {
            Some("b") => "insertion",
            _ => "sorted",
        };
        let text = format!(
            "serde_json::Value {}/{}, Map {}/{} ({order} order), Number {}; \
             HashMap<String, String> {}; candle Tensor {}",
            std::mem::size_of::<serde_json::Value>(),
            std::mem::align_of::<serde_json::Value>(),
            std::mem::size_of::<serde_json::Map<String, serde_json::Value>>(),
            std::mem::align_of::<serde_json::Map<String, serde_json::Value>>(),
            std::mem::size_of::<serde_json::Number>(),
            std::mem::size_of::<std::collections::HashMap<String, String>>(),
            std::mem::size_of::<candle_core::Tensor>(),
        );
        std::ffi::CString::new(text).unwrap_or_default()
    })
}

/// [`layout_probe`] as a NUL-terminated pointer, as plugin libraries export it.
pub(crate) fn layout_probe_ptr() -> *const std::ffi::c_char {
    layout_probe_cstr().as_ptr()
}

/// Calls a library's exported `extern "C" fn() -> *const c_char` (the fingerprint or layout
/// probe declare_plugin! exports) and returns its string (empty for null).
pub(crate) fn read_string_symbol(
    lib: &libloading::Library,
    symbol: &str,
) -> Result<String, libloading::Error> {
    // SAFETY: the symbols this is called with are the `extern "C" fn() -> *const c_char`
    // functions that declare_plugin! exports.
    let f: libloading::Symbol<'_, extern "C" fn() -> *const std::ffi::c_char> =
        unsafe { lib.get(symbol.as_bytes()) }?;
    let ptr = f();
    Ok(if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: the library returns a pointer to a NUL-terminated string it keeps forever.
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    })
}

/// Reads a library's layout probe through its exported `symbol` and compares it with this
/// host's; `Err` names both when they differ or the symbol is missing.
pub(crate) fn check_layout(lib: &libloading::Library, symbol: &str) -> Result<(), String> {
    let found = read_string_symbol(lib, symbol)
        .map_err(|e| format!("no {symbol} (built with an older declare_plugin!?): {e}"))?;
    match found == layout_probe() {
        true => Ok(()),
        false => Err(format!(
            "the layouts of types that cross the boundary differ (features of serde_json or \
             other shared crates; plugin: {found}; this trellis: {})",
            layout_probe()
        )),
    }
}

pub use trellis_build::lock::{
    BOUNDARY_CRATES, boundary_crates_hash, shared_crates, shared_crates_hash,
};

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
    fn the_layout_probe_names_the_serde_json_map_order() {
        // The workspace turns on preserve_order (llguidance needs it in the host).
        assert!(
            layout_probe().contains("(insertion order)"),
            "{}",
            layout_probe()
        );
        assert!(!layout_probe_ptr().is_null());
    }

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
