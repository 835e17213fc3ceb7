//! # trellis-build — source hashes for plugin fingerprints
//!
//! Used by the build scripts of `trellis-sched` and `trellis-plugin`: a plugin library and the
//! host that loads it must have been compiled from byte-identical sources of the crates whose
//! types cross the boundary, whether those crates came from a path, a git checkout or a
//! registry. [`source_hash`] hashes the relative path and the bytes of every file under some
//! directories of a crate, so the hash does not depend on where the crate lies on disk.

use std::path::{Path, PathBuf};

pub mod lock;

/// Every file under `dir`, recursively, sorted (empty when `dir` does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// FNV-1a (64 bits) over the relative path (to `root`, with `/` separators) and the bytes of
/// every file under `root/d` for each of `dirs` (a file name works too), as `fnv1a64:<hex>`.
/// Prints `cargo:rerun-if-changed` for each, so call it from a build script.
pub fn source_hash(root: &Path, dirs: &[&str]) -> String {
    let mut h = Fnv::default();
    for d in dirs {
        let path = root.join(d);
        println!("cargo:rerun-if-changed={}", path.display());
        let list = match path.is_file() {
            true => vec![path],
            false => files(&path),
        };
        for f in list {
            let rel = f.strip_prefix(root).unwrap_or(&f);
            h.eat(rel.to_string_lossy().replace('\\', "/").as_bytes(), 0);
            h.eat(&std::fs::read(&f).unwrap_or_default(), 0);
        }
    }
    h.finish()
}

/// FNV-1a, 64 bits: the one hash of this crate's `fnv1a64:<hex>` values.
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Hashes `bytes` followed by `terminator` (so that concatenations stay distinct).
    pub(crate) fn eat(&mut self, bytes: &[u8], terminator: u8) {
        for &b in bytes.iter().chain(std::iter::once(&terminator)) {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// `fnv1a64:<16 hex digits>`.
    pub(crate) fn finish(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::source_hash;

    #[test]
    fn the_hash_depends_on_content_and_relative_paths_not_on_location() {
        let a = tempfile_dir("a");
        let b = tempfile_dir("b");
        for root in [&a, &b] {
            std::fs::create_dir_all(root.join("src/x")).expect("mkdir");
            std::fs::write(root.join("src/lib.rs"), "pub fn f() {}").expect("write");
            std::fs::write(root.join("src/x/m.rs"), "pub fn g() {}").expect("write");
        }
        assert_eq!(source_hash(&a, &["src"]), source_hash(&b, &["src"]));
        std::fs::write(b.join("src/x/m.rs"), "pub fn h() {}").expect("write");
        assert_ne!(source_hash(&a, &["src"]), source_hash(&b, &["src"]));
        std::fs::remove_dir_all(&a).ok();
        std::fs::remove_dir_all(&b).ok();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("trellis-build-test-{}-{name}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        d
    }
}
