//! `trellis plugins list` and `trellis plugins build PATH` (the Rust counterpart of
//! `pip install` for a plugin: see docs/plugins.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use trellis_plugin::fingerprint::{shared_crates, shared_crates_hash};
use trellis_plugin::manifest::{
    MANIFEST_FILE, ManifestEntry, PluginManifest, install_dir, library_file_name, xdg_dir,
};
use trellis_plugin::{BUILD_FINGERPRINT, PluginOrigin, PluginStatus, plugin_reports};

/// The Cargo.lock this binary was built with: plugins are built against it.
pub const HOST_CARGO_LOCK: &str = include_str!("../../../Cargo.lock");

/// `trellis plugins list`: a header row and one tab-separated row per plugin, or with `json`
/// one JSON array (`name`, `group`, `origin`, `library_dir`, `status`, `detail`).
pub fn list(json: bool) -> Result<()> {
    // The built-ins, for plugins that wrap or override one.
    let mut registries = crate::platforms::host_registries();
    let reports = plugin_reports(&mut registries);
    if json {
        let rows: Vec<serde_json::Value> = reports.iter().map(report_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if reports.is_empty() {
        println!("no plugins found (plugin directories: {})", dirs_text());
        return Ok(());
    }
    println!("NAME\tGROUP\tORIGIN\tSTATUS");
    for r in reports {
        let origin = match &r.origin {
            PluginOrigin::CompiledIn => "compiled in".to_string(),
            PluginOrigin::Library(dir) => dir.display().to_string(),
        };
        println!("{}\t{}\t{}\t{}", r.name, r.group, origin, r.status);
    }
    Ok(())
}

fn report_json(r: &trellis_plugin::PluginReport) -> serde_json::Value {
    let (origin, library_dir) = match &r.origin {
        PluginOrigin::CompiledIn => ("compiled_in", None),
        PluginOrigin::Library(dir) => ("library", Some(dir.display().to_string())),
    };
    let (status, detail) = match &r.status {
        PluginStatus::Loaded(d) => ("loaded", d.as_str()),
        PluginStatus::FilteredOut => ("filtered_out", ""),
        PluginStatus::Failed(e) => ("failed", e.as_str()),
    };
    serde_json::json!({
        "name": r.name,
        "group": r.group.as_str(),
        "origin": origin,
        "library_dir": library_dir,
        "status": status,
        "detail": detail,
    })
}

fn dirs_text() -> String {
    let dirs: Vec<String> = trellis_plugin::manifest::plugin_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    dirs.join(":")
}

#[derive(serde::Deserialize)]
struct Metadata {
    packages: Vec<Package>,
    workspace_root: PathBuf,
}

#[derive(serde::Deserialize)]
struct Package {
    name: String,
    manifest_path: PathBuf,
    targets: Vec<Target>,
}

#[derive(serde::Deserialize)]
struct Target {
    name: String,
    crate_types: Vec<String>,
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Where `plugins build` compiles when neither `--target-dir` nor `CARGO_TARGET_DIR` says:
/// `$XDG_CACHE_HOME/trellis/plugin-target`, else `~/.cache/trellis/plugin-target` — outside
/// the plugin's source, and shared by every plugin, so the second one reuses the dependencies
/// the first one compiled.
pub fn default_target_dir() -> Option<PathBuf> {
    Some(xdg_dir("XDG_CACHE_HOME", ".cache")?.join("trellis/plugin-target"))
}

/// The plugin's Cargo.lock while `plugins build` holds the host's there: the file as it was
/// (or its absence) comes back when this is dropped, so the build leaves the source as it
/// found it.
struct LockSwap {
    path: PathBuf,
    original: Option<Vec<u8>>,
}

impl LockSwap {
    fn install(path: PathBuf, host_lock: &str) -> Result<Self> {
        let original = std::fs::read(&path).ok();
        std::fs::write(&path, host_lock)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { path, original })
    }
}

impl Drop for LockSwap {
    fn drop(&mut self) {
        let restored = match &self.original {
            Some(bytes) => std::fs::write(&self.path, bytes),
            None => std::fs::remove_file(&self.path),
        };
        if let Err(e) = restored {
            eprintln!("warning: cannot restore {}: {e}", self.path.display());
        }
    }
}

/// `trellis plugins build PATH`: builds the plugin crate at `path` as a cdylib against this
/// binary's Cargo.lock, in `target_dir` (else `CARGO_TARGET_DIR`, else
/// [`default_target_dir`]), and installs library and manifest into the plugin directory.
pub fn build(path: &Path, debug: bool, target_dir: Option<PathBuf>) -> Result<()> {
    let manifest_path = path.join("Cargo.toml");
    if !manifest_path.is_file() {
        bail!("{}: not a crate (no Cargo.toml)", path.display());
    }
    let source = std::fs::canonicalize(path)
        .with_context(|| format!("cannot resolve {}", path.display()))?;
    let out = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest_path)
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: Metadata = serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    let want = std::fs::canonicalize(&manifest_path)?;
    let package = meta
        .packages
        .iter()
        .find(|p| std::fs::canonicalize(&p.manifest_path).ok().as_ref() == Some(&want))
        .context("cargo metadata does not list the crate")?;
    let lib = package
        .targets
        .iter()
        .find(|t| t.crate_types.iter().any(|c| c == "cdylib"))
        .with_context(|| {
            format!(
                "{}: the crate has no cdylib target: add crate-type = [\"rlib\", \"cdylib\"] under [lib]",
                package.name
            )
        })?;
    let crate_name = lib.name.replace('-', "_");

    // Pin every crate the host shares with the plugin to the host's versions: start from the
    // host's Cargo.lock; cargo only adds the plugin's own extra crates. The plugin's own lock
    // file comes back afterwards.
    let lock = LockSwap::install(meta.workspace_root.join("Cargo.lock"), HOST_CARGO_LOCK)?;
    let target_dir = target_dir
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .or_else(default_target_dir)
        .context("no target directory: pass --target-dir, or set CARGO_TARGET_DIR or HOME")?;
    let profile = if debug { "debug" } else { "release" };
    eprintln!(
        "Building {} ({profile}, cdylib) in {}",
        package.name,
        target_dir.display()
    );
    // `cargo rustc --crate-type cdylib` builds the library alone: no rlib is written, so a
    // target directory shared with a trellis build that compiles the same crate in (its
    // `example-plugins`) never gets that build's rlib replaced by one linked against another
    // copy of trellis-plugin.
    let mut build = cargo();
    build.arg("rustc");
    if !debug {
        build.arg("--release");
    }
    let status = build
        .args(["--lib", "--crate-type", "cdylib", "--manifest-path"])
        .arg(&manifest_path)
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build of {} failed", package.name);
    }
    // Every shared crate the plugin locked must be the host's version (the host may lock a few
    // more, through features the plugin does not use); the manifest records the host's hash.
    let built_lock = std::fs::read_to_string(&lock.path)?;
    drop(lock);
    let host_hash = shared_crates_hash(HOST_CARGO_LOCK).map_err(anyhow::Error::msg)?;
    let host = shared_crates(HOST_CARGO_LOCK).map_err(anyhow::Error::msg)?;
    let plugin = shared_crates(&built_lock).map_err(anyhow::Error::msg)?;
    let foreign: Vec<&String> = plugin.difference(&host).collect();
    if !foreign.is_empty() {
        bail!("the plugin locked shared crates at versions this trellis does not use: {foreign:?}");
    }
    let file = library_file_name(&crate_name);
    let built = target_dir.join(profile).join(&file);
    let entries = read_entries(&built, &crate_name)?;
    let Some(dest_root) = install_dir() else {
        bail!("no plugin directory: set TRELLIS_PLUGIN_PATH or HOME");
    };
    let dest = dest_root.join(&package.name);
    std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    // Replace, never overwrite in place: a running trellis may have the old file mapped.
    let tmp = dest.join(format!(".{file}.new"));
    std::fs::copy(&built, &tmp).with_context(|| format!("cannot copy {}", built.display()))?;
    std::fs::rename(&tmp, dest.join(&file))?;
    let manifest = PluginManifest {
        package: package.name.clone(),
        crate_name,
        library: file,
        source: Some(source.display().to_string()),
        fingerprint: BUILD_FINGERPRINT.to_string(),
        shared_crates: host_hash,
        entries,
    };
    manifest
        .write(&dest.join(MANIFEST_FILE))
        .map_err(anyhow::Error::msg)?;
    println!(
        "installed {} into {}: {}",
        package.name,
        dest.display(),
        dest.join(&manifest.library).display()
    );
    Ok(())
}

/// Opens the freshly built library, checks its fingerprint and asks for its entries.
fn read_entries(library: &Path, crate_name: &str) -> Result<Vec<ManifestEntry>> {
    let entries =
        trellis_plugin::loader::library_entries(library, crate_name).map_err(anyhow::Error::msg)?;
    if entries.is_empty() {
        bail!(
            "{} declares no plugin entries (use trellis_plugin::declare_plugin!)",
            library.display()
        );
    }
    Ok(entries
        .into_iter()
        .map(|(name, group)| ManifestEntry {
            name,
            group: group.as_str().to_string(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::LockSwap;

    #[test]
    fn lock_swap_restores_the_plugins_own_lock_file_or_its_absence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("Cargo.lock");
        {
            let _swap = LockSwap::install(path.clone(), "host").expect("install");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), "host");
        }
        assert!(!path.exists());
        std::fs::write(&path, "plugin's own").expect("write");
        {
            let _swap = LockSwap::install(path.clone(), "host").expect("install");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), "host");
        }
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "plugin's own"
        );
    }
}
