//! Finding, filtering and loading plugins by group (vLLM's `load_plugins_by_group`, spec §1).
//!
//! Discovery lists compiled-in declarations ([`crate::compiled_in_plugins`]) first, then
//! every plugin folder (one with a `trellis-plugin.toml`) of every plugin directory
//! ([`crate::manifest::plugin_dirs`]). `VLLM_PLUGINS` filters by entry name from the
//! manifests, before any library is opened. An allowed library is then checked twice before
//! any entry is called: its manifest's fingerprint, then the fingerprint the library itself
//! exports. Libraries are never unloaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::declare::{LibraryCall, PluginEntry, call_platform, call_register, compiled_in_plugins};
use crate::fingerprint::{BUILD_FINGERPRINT, fingerprint_difference, host_shared_crates_hash};
use crate::group::PluginGroup;
use crate::log::{Level, log};
use crate::manifest::{MANIFEST_FILE, PluginManifest, plugin_dirs};
use crate::platform::{NamedPlatform, Platform};
use crate::registrar::{Recorder, Registrar, Registration};

/// Why a plugin stopped startup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginLoadError {
    /// An allowed plugin's entry returned an error or panicked.
    #[error("plugin '{name}' ({group}) failed: {reason}")]
    Failed {
        /// The entry's name.
        name: String,
        /// Its group.
        group: PluginGroup,
        /// The plugin's error text.
        reason: String,
    },
    /// The library was built for another host (fingerprint mismatch); none of its code ran.
    #[error(
        "plugin '{name}' refused: {} was built for another trellis: {difference} differ; \
         rebuild it with this trellis: trellis plugins build {rebuild} ({fingerprints})",
        library.display()
    )]
    Incompatible {
        /// The entry's name.
        name: String,
        /// What differs ([`crate::fingerprint::fingerprint_difference`]).
        difference: String,
        /// The manifest or library that was refused.
        library: PathBuf,
        /// Both fingerprints in full: `plugin: …; this trellis: …`.
        fingerprints: String,
        /// The crate directory to rebuild (or `PATH`).
        rebuild: String,
    },
    /// A library that could not be loaded or was refused, while `VLLM_PLUGINS` names the
    /// plugin explicitly: startup stops (without the allow-list it is skipped with an ERROR).
    #[error(
        "{reason}. VLLM_PLUGINS names '{name}' explicitly, so it is required: fix it, or \
         remove it from VLLM_PLUGINS to start without it"
    )]
    Required {
        /// The entry's name.
        name: String,
        /// Why the library was not loaded.
        reason: Box<PluginLoadError>,
    },
    /// The library could not be opened, or lacks the exported functions.
    #[error("plugin '{name}': cannot load {}: {message}", path.display())]
    Library {
        /// The entry's name.
        name: String,
        /// The library.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Where a discovered plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginOrigin {
    /// Linked into this binary.
    CompiledIn,
    /// A library in a plugin folder (the folder holding its manifest).
    Library(PathBuf),
}

/// One discovered plugin entry (vLLM: one entry point).
#[derive(Debug, Clone)]
pub struct DiscoveredPlugin {
    /// Its name (what `VLLM_PLUGINS` lists).
    pub name: String,
    /// Its group.
    pub group: PluginGroup,
    /// Where it comes from.
    pub origin: PluginOrigin,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Static(&'static crate::declare::PluginDecl),
    Library(Arc<PluginManifest>),
}

/// The `VLLM_PLUGINS` allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowList {
    /// Unset: every plugin is allowed.
    All,
    /// Set: exactly these names (split on `,`, not trimmed; `""` allows nothing).
    Only(Vec<String>),
}

impl AllowList {
    /// Reads `VLLM_PLUGINS`.
    pub fn from_env() -> Self {
        match std::env::var_os("VLLM_PLUGINS") {
            None => AllowList::All,
            Some(v) => {
                AllowList::Only(v.to_string_lossy().split(',').map(str::to_string).collect())
            }
        }
    }

    /// Whether the plugin `name` may be loaded.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            AllowList::All => true,
            AllowList::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Every plugin: compiled-in ones first, then library plugins by directory and folder name.
/// An unreadable manifest is reported with a warning and skipped.
pub fn discover_plugins() -> Vec<DiscoveredPlugin> {
    let mut out: Vec<DiscoveredPlugin> = compiled_in_plugins()
        .map(|d| DiscoveredPlugin {
            name: d.name.to_string(),
            group: d.group,
            origin: PluginOrigin::CompiledIn,
            source: Source::Static(d),
        })
        .collect();
    for dir in plugin_dirs() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut folders: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(MANIFEST_FILE).is_file())
            .collect();
        folders.sort();
        for folder in folders {
            match PluginManifest::read(&folder.join(MANIFEST_FILE)) {
                Ok(m) => {
                    let m = Arc::new(m);
                    for (name, group) in m.groups() {
                        out.push(DiscoveredPlugin {
                            name: name.to_string(),
                            group,
                            origin: PluginOrigin::Library(folder.clone()),
                            source: Source::Library(m.clone()),
                        });
                    }
                }
                Err(e) => warn_broken_manifest(&folder, &e.to_string()),
            }
        }
    }
    out
}

/// Warns about a folder whose manifest cannot be read, once per process and folder (discovery
/// runs once per group).
fn warn_broken_manifest(folder: &Path, message: &str) {
    static WARNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if !warned.iter().any(|f| f == folder) {
        warned.push(folder.to_path_buf());
        eprintln!("WARNING trellis: skipping a plugin folder: {message}");
    }
}

/// Warns (once per process) about each `VLLM_PLUGINS` name that matches no discovered plugin.
pub(crate) fn warn_unmatched(allow: &AllowList, discovered: &[DiscoveredPlugin]) {
    static WARNED: OnceLock<()> = OnceLock::new();
    let AllowList::Only(names) = allow else {
        return;
    };
    let missing: Vec<&str> = names
        .iter()
        .filter(|n| !n.is_empty() && !discovered.iter().any(|d| &d.name == *n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() && WARNED.set(()).is_ok() {
        let found: Vec<&str> = discovered.iter().map(|d| d.name.as_str()).collect();
        eprintln!(
            "WARNING trellis: VLLM_PLUGINS requested plugins that were not found: {} \
             (discovered: {})",
            missing.join(", "),
            if found.is_empty() {
                "none".to_string()
            } else {
                found.join(", ")
            }
        );
    }
}

type EntryFn = unsafe extern "C" fn(*mut LibraryCall<'_>);

/// An opened, checked library: only its entry function is kept (the library is leaked).
#[derive(Clone, Copy)]
struct OpenLibrary {
    entry: EntryFn,
}

fn rebuild_hint(m: &PluginManifest) -> String {
    m.source.clone().unwrap_or_else(|| "PATH".to_string())
}

/// Checks the manifest, opens the library, checks its exported fingerprint.
fn open_library(
    name: &str,
    folder: &Path,
    m: &PluginManifest,
) -> Result<OpenLibrary, PluginLoadError> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, OpenLibrary>>> = OnceLock::new();
    let cache = OPEN.get_or_init(Default::default);
    let path = folder.join(&m.library);
    if let Some(lib) = cache.lock().ok().and_then(|c| c.get(&path).copied()) {
        return Ok(lib);
    }
    let manifest_path = folder.join(MANIFEST_FILE);
    let host_lock = host_shared_crates_hash().map_err(|message| PluginLoadError::Library {
        name: name.to_string(),
        path: path.clone(),
        message,
    })?;
    if m.fingerprint != BUILD_FINGERPRINT || m.shared_crates != host_lock {
        let mut difference = fingerprint_difference(&m.fingerprint, BUILD_FINGERPRINT);
        if m.shared_crates != host_lock {
            if !difference.is_empty() {
                difference.push_str(", ");
            }
            difference.push_str(&format!(
                "the shared crates locked in Cargo.lock (plugin: {}; this trellis: {host_lock})",
                m.shared_crates
            ));
        }
        return Err(PluginLoadError::Incompatible {
            name: name.to_string(),
            difference,
            library: manifest_path,
            fingerprints: format!(
                "plugin: {}; shared crates {}; this trellis: {BUILD_FINGERPRINT}; shared crates \
                 {host_lock}",
                m.fingerprint, m.shared_crates
            ),
            rebuild: rebuild_hint(m),
        });
    }
    let lib_err = |message: String| PluginLoadError::Library {
        name: name.to_string(),
        path: path.clone(),
        message,
    };
    if !path.is_file() {
        return Err(lib_err(
            "the library file is missing (the manifest names it)".to_string(),
        ));
    }
    // SAFETY: loading runs the library's initialisers; the manifest said it was built by
    // this toolchain for this host, and it is never unloaded.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| lib_err(e.to_string()))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let fp_sym = format!("trellis_plugin_fingerprint_{}", m.crate_name);
    // SAFETY: the symbol is the `extern "C" fn() -> *const c_char` that declare_plugin! exports.
    let fp: libloading::Symbol<'static, extern "C" fn() -> *const std::ffi::c_char> =
        unsafe { lib.get(fp_sym.as_bytes()) }.map_err(|e| {
            lib_err(format!(
                "no {fp_sym} (not built with declare_plugin!?): {e}"
            ))
        })?;
    let ptr = fp();
    let found = if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: the library returns a pointer to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    };
    if found != BUILD_FINGERPRINT {
        return Err(PluginLoadError::Incompatible {
            name: name.to_string(),
            difference: fingerprint_difference(&found, BUILD_FINGERPRINT),
            library: path.clone(),
            fingerprints: format!("plugin: {found}; this trellis: {BUILD_FINGERPRINT}"),
            rebuild: rebuild_hint(m),
        });
    }
    let entry_sym = format!("trellis_plugin_entry_{}", m.crate_name);
    // SAFETY: the symbol is the entry function that declare_plugin! exports.
    let entry: libloading::Symbol<'static, EntryFn> = unsafe { lib.get(entry_sym.as_bytes()) }
        .map_err(|e| lib_err(format!("no {entry_sym}: {e}")))?;
    let open = OpenLibrary { entry: *entry };
    if let Ok(mut c) = cache.lock() {
        c.insert(path, open);
    }
    Ok(open)
}

/// A plugin that passed the allow-list and whose code is ready to call.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// Its name.
    pub name: String,
    /// Its group.
    pub group: PluginGroup,
    /// Where it comes from.
    pub origin: PluginOrigin,
    callee: Callee,
}

#[derive(Clone, Copy)]
enum Callee {
    Static(PluginEntry),
    Library(OpenLibrary),
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    fn failed(&self, reason: String) -> PluginLoadError {
        PluginLoadError::Failed {
            name: self.name.clone(),
            group: self.group,
            reason,
        }
    }

    /// Calls a registering entry (groups other than `platform`) with `registrar`.
    pub fn register(&self, registrar: &mut dyn Registrar) -> Result<(), PluginLoadError> {
        let result = match self.callee {
            Callee::Static(PluginEntry::Register(f)) => call_register(&self.name, f, registrar),
            Callee::Static(PluginEntry::Platform(_)) => Err("not a registering entry".into()),
            Callee::Library(lib) => {
                let mut result = Ok(());
                let mut call = LibraryCall::Register {
                    name: &self.name,
                    registrar,
                    result: &mut result,
                };
                // SAFETY: the library passed both fingerprint checks; `call` outlives the call.
                unsafe { (lib.entry)(&mut call) };
                result
            }
        };
        result.map_err(|r| self.failed(r))
    }

    /// Calls a `platform` entry: the platform if it activates here.
    pub fn platform(&self) -> Result<Option<Arc<dyn Platform>>, PluginLoadError> {
        let result = match self.callee {
            Callee::Static(PluginEntry::Platform(f)) => call_platform(&self.name, f),
            Callee::Static(PluginEntry::Register(_)) => Err("not a platform entry".into()),
            Callee::Library(lib) => {
                let mut result = Ok(None);
                let mut call = LibraryCall::Platform {
                    name: &self.name,
                    result: &mut result,
                };
                // SAFETY: as in `register`.
                unsafe { (lib.entry)(&mut call) };
                result
            }
        };
        result.map_err(|r| self.failed(r))
    }
}

pub(crate) fn resolve(d: &DiscoveredPlugin) -> Result<LoadedPlugin, PluginLoadError> {
    let callee = match (&d.source, &d.origin) {
        (Source::Static(decl), _) => Callee::Static(decl.entry),
        (Source::Library(m), PluginOrigin::Library(folder)) => {
            Callee::Library(open_library(&d.name, folder, m)?)
        }
        (Source::Library(m), PluginOrigin::CompiledIn) => {
            return Err(PluginLoadError::Library {
                name: d.name.clone(),
                path: PathBuf::from(&m.library),
                message: "library plugin without a folder".into(),
            });
        }
    };
    Ok(LoadedPlugin {
        name: d.name.clone(),
        group: d.group,
        origin: d.origin.clone(),
        callee,
    })
}

/// The allowed plugins of `group`, their libraries opened and checked, in discovery order
/// (a name found twice in a group: the first wins). Does not call them.
///
/// vLLM's policy (spec §1.2, §1.4): the group's discovered plugins are logged (DEBUG for
/// `general`, INFO for the other groups); a library that cannot be loaded or is refused is
/// logged at ERROR with the plugin's name, the reason and the fix, and skipped — unless
/// `VLLM_PLUGINS` is set (then every loaded plugin is named in it explicitly), in which case
/// this fails with [`PluginLoadError::Required`].
pub fn load_plugins_by_group(group: PluginGroup) -> Result<Vec<LoadedPlugin>, PluginLoadError> {
    load_group(group).map(|g| g.loaded)
}

/// A group after loading: what can be called, and one note per plugin that will not be.
pub(crate) struct GroupLoad {
    pub(crate) loaded: Vec<LoadedPlugin>,
    pub(crate) skipped: Vec<String>,
}

pub(crate) fn load_group(group: PluginGroup) -> Result<GroupLoad, PluginLoadError> {
    let discovered = discover_plugins();
    let allow = AllowList::from_env();
    warn_unmatched(&allow, &discovered);
    let vllm_group = group.vllm_name();
    let in_group: Vec<&DiscoveredPlugin> = discovered.iter().filter(|d| d.group == group).collect();
    let mut load = GroupLoad {
        loaded: Vec::new(),
        skipped: Vec::new(),
    };
    if in_group.is_empty() {
        log(
            Level::Debug,
            &format!("No plugins for group {vllm_group} found."),
        );
        return Ok(load);
    }
    let level = match group {
        PluginGroup::General => Level::Debug,
        _ => Level::Info,
    };
    log(level, &format!("Available plugins for group {vllm_group}:"));
    for d in &in_group {
        let value = match &d.origin {
            PluginOrigin::CompiledIn => "compiled in".to_string(),
            PluginOrigin::Library(folder) => folder.display().to_string(),
        };
        log(level, &format!("- {} -> {value}", d.name));
    }
    if allow == AllowList::All {
        log(
            level,
            "All plugins in this group will be loaded. Set `VLLM_PLUGINS` to control which \
             plugins to load.",
        );
    }
    for d in in_group {
        if !allow.allows(&d.name) {
            load.skipped
                .push(format!("{} (filtered out by VLLM_PLUGINS)", d.name));
            continue;
        }
        if load.loaded.iter().any(|p| p.name == d.name) {
            eprintln!(
                "WARNING trellis: plugin '{}' ({group}) found twice; using the first one",
                d.name
            );
            continue;
        }
        if allow != AllowList::All {
            log(Level::Info, &format!("Loading plugin {}", d.name));
        }
        match resolve(d) {
            Ok(p) => load.loaded.push(p),
            Err(e) if allow != AllowList::All => {
                return Err(PluginLoadError::Required {
                    name: d.name.clone(),
                    reason: Box::new(e),
                });
            }
            Err(e) => {
                let fix = match (&e, &d.source, &d.origin) {
                    (PluginLoadError::Incompatible { .. }, _, _) => String::new(),
                    (_, Source::Library(m), PluginOrigin::Library(folder)) => format!(
                        " To use it, reinstall it: trellis plugins build {} (or remove the \
                         folder {} to silence this).",
                        rebuild_hint(m),
                        folder.display()
                    ),
                    _ => String::new(),
                };
                log(
                    Level::Error,
                    &format!(
                        "Failed to load plugin {}: {e}. The plugin is skipped; set VLLM_PLUGINS \
                         to the plugins you want, to leave it out without this error.{fix}",
                        d.name
                    ),
                );
                load.skipped.push(format!("{} (failed to load)", d.name));
            }
        }
    }
    Ok(load)
}

/// The one INFO line per group saying which plugins ran (and which did not, and why).
fn log_ran(group: PluginGroup, ran: &[String], skipped: &[String]) {
    if ran.is_empty() && skipped.is_empty() {
        return;
    }
    let list = |v: &[String]| match v {
        [] => "none".to_string(),
        v => v.join(", "),
    };
    let mut line = format!("Plugins run for group {}: {}", group.vllm_name(), list(ran));
    if !skipped.is_empty() {
        line.push_str(&format!("; not run: {}", list(skipped)));
    }
    log(Level::Info, &line);
}

type GeneralOutcome = Result<Vec<Registration>, PluginLoadError>;

/// Runs every allowed `general` plugin once per process with `registrar`; later calls (a
/// second engine in the same process) replay the same registrations into their registrar.
/// The first plugin that fails stops it with an error naming the plugin.
pub fn load_general_plugins(registrar: &mut dyn Registrar) -> Result<(), PluginLoadError> {
    static GENERAL: Mutex<Option<GeneralOutcome>> = Mutex::new(None);
    let mut guard = GENERAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(outcome) = guard.as_ref() {
        let log = outcome.clone()?;
        for r in &log {
            r.replay(registrar).map_err(|e| PluginLoadError::Failed {
                name: "general".into(),
                group: PluginGroup::General,
                reason: e.to_string(),
            })?;
        }
        return Ok(());
    }
    let mut recorder = Recorder {
        inner: registrar,
        log: Vec::new(),
    };
    let outcome = load_group(PluginGroup::General).and_then(|group| {
        let mut ran = Vec::new();
        for p in &group.loaded {
            p.register(&mut recorder)?;
            ran.push(p.name.clone());
        }
        log_ran(PluginGroup::General, &ran, &group.skipped);
        Ok(())
    });
    let log = std::mem::take(&mut recorder.log);
    *guard = Some(outcome.clone().map(|()| log));
    outcome
}

/// Calls every allowed `platform` plugin and returns the activated ones with their names
/// (spec §2.2 selection is `resolve_platform`'s job). Once per process; a plugin whose
/// detection fails is logged and treated as not activated, as in vLLM.
pub fn load_platform_plugins() -> Result<Vec<NamedPlatform>, PluginLoadError> {
    type Activated = Vec<NamedPlatform>;
    static PLATFORMS: Mutex<Option<Result<Activated, PluginLoadError>>> = Mutex::new(None);
    let mut guard = PLATFORMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(done) = guard.as_ref() {
        return done.clone();
    }
    let outcome = load_group(PluginGroup::Platform).map(|group| {
        let mut active = Vec::new();
        let mut ran = Vec::new();
        for p in group.loaded {
            match p.platform() {
                Ok(Some(platform)) => {
                    ran.push(format!("{} (activated)", p.name));
                    active.push((p.name.clone(), platform));
                }
                Ok(None) => ran.push(format!("{} (not activated)", p.name)),
                Err(e) => {
                    eprintln!("WARNING trellis: {e}; the platform is not activated");
                    ran.push(format!("{} (failed)", p.name));
                }
            }
        }
        log_ran(PluginGroup::Platform, &ran, &group.skipped);
        active
    });
    *guard = Some(outcome.clone());
    outcome
}

/// Runs every allowed `stat_logger` plugin with `registries` (vLLM's
/// `load_stat_logger_plugin_factories`; only the serving engine calls it). Each entry must
/// register at least one stat logger: one that registers none is refused, as vLLM refuses an
/// entry point that is not a `StatLoggerBase` subclass. The first plugin that fails stops it
/// with an error naming the plugin.
pub fn load_stat_logger_plugins(
    registries: &mut crate::registries::Registries,
) -> Result<(), PluginLoadError> {
    let group = load_group(PluginGroup::StatLogger)?;
    let mut ran = Vec::new();
    for p in group.loaded {
        let mut counting = CountStatLoggers {
            inner: registries,
            count: 0,
        };
        p.register(&mut counting)?;
        if counting.count == 0 {
            return Err(p.failed(format!(
                "Stat logger plugin '{}' must register a stat logger \
                 (Registrar::register_stat_logger); it registered none",
                p.name
            )));
        }
        ran.push(p.name.clone());
    }
    log_ran(PluginGroup::StatLogger, &ran, &group.skipped);
    Ok(())
}

/// Forwards to the registries and counts the stat loggers registered.
struct CountStatLoggers<'a> {
    inner: &'a mut crate::registries::Registries,
    count: usize,
}

impl Registrar for CountStatLoggers<'_> {
    fn register_model(&mut self, architecture: &str, factory: crate::ModelFactory) {
        Registrar::register_model(self.inner, architecture, factory);
    }

    fn register_model_lazy(&mut self, architecture: &str, make: crate::LazyModelFactory) {
        Registrar::register_model_lazy(self.inner, architecture, make);
    }

    fn model_factory(&self, architecture: &str) -> Option<crate::ModelFactory> {
        self.inner.model_factory(architecture)
    }

    fn register_gguf_architecture(&mut self, gguf_arch: &str, architecture: &str) {
        self.inner
            .register_gguf_architecture(gguf_arch, architecture);
    }

    fn register_attention_backend(
        &mut self,
        name: &str,
        backend: Arc<dyn crate::AttentionBackend>,
    ) -> Result<(), crate::PluginError> {
        self.inner.register_attention_backend(name, backend)
    }

    fn register_stat_logger(&mut self, name: &str, factory: crate::StatLoggerFactory) {
        self.count += 1;
        self.inner.register_stat_logger(name, factory);
    }

    fn register_io_processor(&mut self, name: &str, factory: crate::IoProcessorFactory) {
        self.inner.register_io_processor(name, factory);
    }

    fn register_lora_resolver(&mut self, name: &str, resolver: Arc<dyn crate::LoraResolver>) {
        self.inner.register_lora_resolver(name, resolver);
    }
}

/// Calls every allowed `io_processor` plugin (vLLM's `get_io_processor`, run when a processor
/// is requested by name) and returns, per entry that registered an IO processor, the entry's
/// name and the factory, in discovery order. An entry that fails or registers none is logged
/// at WARNING and skipped, as vLLM skips an entry point that raises or returns `None`.
pub fn load_io_processor_plugins()
-> Result<Vec<(String, crate::IoProcessorFactory)>, PluginLoadError> {
    let group = load_group(PluginGroup::IoProcessor)?;
    let mut found = Vec::new();
    let mut ran = Vec::new();
    for p in group.loaded {
        let mut registries = crate::registries::Registries::new();
        match p.register(&mut registries) {
            Err(e) => eprintln!("WARNING trellis: {e}; the IO processor plugin is skipped"),
            Ok(()) => match registries.io_processors.into_iter().next() {
                Some((_, factory)) => {
                    ran.push(p.name.clone());
                    found.push((p.name.clone(), factory));
                }
                None => eprintln!(
                    "WARNING trellis: IO processor plugin '{}' registered no IO processor; \
                     it is skipped",
                    p.name
                ),
            },
        }
    }
    log_ran(PluginGroup::IoProcessor, &ran, &group.skipped);
    Ok(found)
}

/// Opens the library at `path` (built from crate `crate_name`), checks the fingerprint it
/// exports against this host's and returns its declarations; used by `trellis plugins build`
/// to write the manifest. The library stays loaded.
pub fn library_entries(
    path: &Path,
    crate_name: &str,
) -> Result<Vec<(String, PluginGroup)>, String> {
    // SAFETY: as in `open_library`; the caller has just built this library.
    let lib = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let fp_sym = format!("trellis_plugin_fingerprint_{crate_name}");
    // SAFETY: the symbol declare_plugin! exports.
    let fp: libloading::Symbol<'static, extern "C" fn() -> *const std::ffi::c_char> =
        unsafe { lib.get(fp_sym.as_bytes()) }.map_err(|e| {
            format!(
                "{}: no {fp_sym} (does it call declare_plugin!?): {e}",
                path.display()
            )
        })?;
    let ptr = fp();
    let found = if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    };
    if found != BUILD_FINGERPRINT {
        return Err(format!(
            "{} was built for another trellis: {} differ; build it against the trellis-plugin \
             source and with the toolchain of this trellis (plugin: [{found}]; this trellis: \
             [{BUILD_FINGERPRINT}])",
            path.display(),
            fingerprint_difference(&found, BUILD_FINGERPRINT)
        ));
    }
    let entry_sym = format!("trellis_plugin_entry_{crate_name}");
    // SAFETY: the entry declare_plugin! exports; the fingerprint matched.
    let entry: libloading::Symbol<'static, EntryFn> = unsafe { lib.get(entry_sym.as_bytes()) }
        .map_err(|e| format!("{}: no {entry_sym}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut call = LibraryCall::List(&mut out);
    // SAFETY: fingerprint checked; `call` outlives the call.
    unsafe { (*entry)(&mut call) };
    Ok(out)
}
