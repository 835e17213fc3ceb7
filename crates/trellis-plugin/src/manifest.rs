//! `trellis-plugin.toml`: what the host knows about a plugin library before loading it.
//!
//! ```toml
//! package = "dummy-model"              # the crate it was built from
//! crate_name = "dummy_model"           # suffix of the exported symbols
//! library = "libdummy_model.so"        # beside the manifest
//! source = "/path/to/dummy-model"      # where `trellis plugins build` built it from
//! fingerprint = "trellis-plugin 0.1.0; rustc 1.95.0 (...); target ...; features []"
//! shared_crates = "fnv1a64:..."        # hash of the shared crates' locked versions
//!
//! [[entries]]
//! name = "register_dummy_model"
//! group = "general"
//! ```
//!
//! The entries are listed here so that `VLLM_PLUGINS` filtering happens before any code of the
//! library is loaded.

use std::path::{Path, PathBuf};

use crate::group::PluginGroup;

/// The manifest's file name, in each plugin's own folder.
pub const MANIFEST_FILE: &str = "trellis-plugin.toml";

/// One entry of a library.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestEntry {
    /// The entry's name (what `VLLM_PLUGINS` lists).
    pub name: String,
    /// Its group: `general`, `platform`, `io_processor` or `stat_logger`.
    pub group: String,
}

/// A parsed `trellis-plugin.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginManifest {
    /// The package (crate) name it was built from.
    pub package: String,
    /// The Rust crate name: the exported symbols end in it.
    pub crate_name: String,
    /// The library's file name, in the manifest's folder.
    pub library: String,
    /// The crate's directory when it was built (for the rebuild hint).
    #[serde(default)]
    pub source: Option<String>,
    /// The compile-time fingerprint ([`crate::fingerprint::BUILD_FINGERPRINT`] of the library).
    pub fingerprint: String,
    /// [`crate::fingerprint::shared_crates_hash`] of the Cargo.lock it was built with.
    pub shared_crates: String,
    /// Its entries.
    #[serde(default)]
    pub entries: Vec<ManifestEntry>,
}

impl PluginManifest {
    /// Reads and checks `path`; the error is one line naming the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let m: PluginManifest = toml::from_str(&text).map_err(|e| {
            let msg = e.to_string().replace('\n', " ");
            format!("{}: invalid manifest: {}", path.display(), msg.trim())
        })?;
        for e in &m.entries {
            e.group
                .parse::<PluginGroup>()
                .map_err(|err| format!("{}: entry {:?}: {err}", path.display(), e.name))?;
        }
        if m.library.contains('/') || m.library.contains('\\') {
            return Err(format!(
                "{}: `library` must be a file name beside the manifest, got {:?}",
                path.display(),
                m.library
            ));
        }
        Ok(m)
    }

    /// Writes the manifest to `path`.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| format!("cannot encode manifest: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))
    }

    /// The entries with their parsed groups (unknown groups were rejected by [`Self::read`]).
    pub fn groups(&self) -> impl Iterator<Item = (&str, PluginGroup)> {
        self.entries
            .iter()
            .filter_map(|e| e.group.parse().ok().map(|g| (e.name.as_str(), g)))
    }
}

/// The platform's file name of a dynamic library for crate `crate_name`
/// (`lib<name>.so`, `lib<name>.dylib`, `<name>.dll`).
pub fn library_file_name(crate_name: &str) -> String {
    format!(
        "{}{crate_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The plugin directories: every entry of `TRELLIS_PLUGIN_PATH` (colon-separated, empty
/// entries skipped), then the user directory [`default_plugin_dir`].
pub fn plugin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("TRELLIS_PLUGIN_PATH")
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    if let Some(d) = default_plugin_dir()
        && !dirs.contains(&d)
    {
        dirs.push(d);
    }
    dirs
}

/// `$XDG_DATA_HOME/trellis/plugins`, else `~/.local/share/trellis/plugins`.
pub fn default_plugin_dir() -> Option<PathBuf> {
    Some(xdg_dir("XDG_DATA_HOME", ".local/share")?.join("trellis/plugins"))
}

/// The XDG base directory `$xdg_var` when set and not empty, else `~/home_default`
/// (`xdg_dir("XDG_CACHE_HOME", ".cache")`); `None` without HOME either.
pub fn xdg_dir(xdg_var: &str, home_default: &str) -> Option<PathBuf> {
    std::env::var_os(xdg_var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(home_default))
        })
}

/// Where `trellis plugins build` installs: the first entry of `TRELLIS_PLUGIN_PATH`, else the
/// user directory.
pub fn install_dir() -> Option<PathBuf> {
    plugin_dirs().into_iter().next()
}
