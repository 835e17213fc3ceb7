//! The shared crates of a `Cargo.lock`: `trellis-plugin` and everything it depends on,
//! transitively, identified by name, version, source and registry checksum. Their hash is part
//! of the plugin fingerprint (`trellis_plugin::BUILD_FINGERPRINT`): the build script of
//! `trellis-plugin` computes it from the lock it is built with, and `trellis plugins build`
//! from the plugin's.

use std::collections::{BTreeMap, BTreeSet};

/// The shared crates whose source the plugin fingerprint hashes, and `trellis-build`, which
/// computes the hashes (none of its types cross the plugin boundary).
const SOURCE_HASHED: &[&str] = &["trellis-plugin", "trellis-sched", "trellis-build"];

/// The crate whose dependency closure is "shared" between host and plugins.
const ROOT_CRATE: &str = "trellis-plugin";

/// A hash (`fnv1a64:<hex>`) of the identity of `trellis-plugin` and of every crate it depends
/// on, transitively, as recorded in the text of a `Cargo.lock`: name, version, source and
/// registry checksum; for the crates whose source the plugin fingerprint hashes, name and
/// version only (so that a git checkout of the same source is accepted).
///
/// Errors when the text is not a Cargo.lock or does not contain `trellis-plugin`.
pub fn shared_crates_hash(cargo_lock: &str) -> Result<String, String> {
    Ok(fnv(&shared_crates(cargo_lock)?))
}

/// The crates whose types appear in trellis-plugin's API (tensors, devices and dtypes, JSON
/// configs, scheduler types, serde derives): their locked identity must be the same in a
/// plugin and its host. The other shared crates may differ in how many of them a lock lists
/// (a workspace locks its members' dev-dependencies and unified features too).
pub const BOUNDARY_CRATES: &[&str] = &[
    "trellis-plugin",
    "trellis-sched",
    "candle-core",
    "half",
    "serde",
    "serde_json",
];

/// [`shared_crates_hash`] restricted to the [`BOUNDARY_CRATES`]: what the plugin fingerprint
/// holds, the same for a plugin whose lock was resolved from the host's and for the host.
pub fn boundary_crates_hash(cargo_lock: &str) -> Result<String, String> {
    let boundary: BTreeSet<String> = shared_crates(cargo_lock)?
        .into_iter()
        .filter(|id| {
            id.split(' ')
                .next()
                .is_some_and(|name| BOUNDARY_CRATES.contains(&name))
        })
        .collect();
    Ok(fnv(&boundary))
}

fn fnv(lines: &BTreeSet<String>) -> String {
    let mut h = crate::Fnv::default();
    for line in lines {
        h.eat(line.as_bytes(), b'\n');
    }
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::{boundary_crates_hash, shared_crates_hash};

    const CHECKSUM: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    /// A lock with trellis-plugin → candle-core → half, and trellis-sched → `extra`.
    fn lock(candle_version: &str, extra: &str) -> String {
        let registry = "registry+https://github.com/rust-lang/crates.io-index";
        format!(
            "version = 4\n\n\
             [[package]]\nname = \"trellis-plugin\"\nversion = \"0.1.0\"\n\
             dependencies = [\"candle-core\", \"trellis-sched\"]\n\n\
             [[package]]\nname = \"trellis-sched\"\nversion = \"0.1.0\"\n\
             dependencies = [\"{extra}\"]\n\n\
             [[package]]\nname = \"{extra}\"\nversion = \"1.0.0\"\nsource = \"{registry}\"\n\
             checksum = \"{CHECKSUM}\"\n\n\
             [[package]]\nname = \"candle-core\"\nversion = \"{candle_version}\"\n\
             source = \"{registry}\"\nchecksum = \"{CHECKSUM}\"\ndependencies = [\"half\"]\n\n\
             [[package]]\nname = \"half\"\nversion = \"2.7.1\"\nsource = \"{registry}\"\n\
             checksum = \"{CHECKSUM}\"\n"
        )
    }

    #[test]
    fn the_boundary_hash_follows_candle_core_but_not_other_shared_crates() {
        let host = lock("0.11.1", "proptest");
        let same_boundary = lock("0.11.1", "something-else");
        let other_candle = lock("0.11.2", "proptest");
        let b = |l: &str| boundary_crates_hash(l).expect("a lock");
        let s = |l: &str| shared_crates_hash(l).expect("a lock");
        assert_eq!(b(&host), b(&same_boundary));
        assert_ne!(s(&host), s(&same_boundary));
        assert_ne!(b(&host), b(&other_candle));
        assert!(boundary_crates_hash("not a lock").is_err());
    }
}
