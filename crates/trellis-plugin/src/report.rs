//! What `trellis plugins list` shows: every discovered plugin and what happens when it loads.

use crate::group::PluginGroup;
use crate::loader::{AllowList, PluginOrigin, discover_plugins, resolve, warn_unmatched};
use crate::registrar::Registrar;

/// What happened to one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginStatus {
    /// Loaded and called successfully: `general`, `io_processor` and `stat_logger` entries
    /// registered (the last two say "registered"), `platform` entries answered whether they
    /// activate (the detail says which).
    Loaded(String),
    /// Not in `VLLM_PLUGINS`.
    FilteredOut,
    /// Refused or failed, with the reason.
    Failed(String),
}

impl std::fmt::Display for PluginStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginStatus::Loaded(d) if d.is_empty() => f.write_str("loaded"),
            PluginStatus::Loaded(d) => write!(f, "loaded ({d})"),
            PluginStatus::FilteredOut => f.write_str("filtered out by VLLM_PLUGINS"),
            PluginStatus::Failed(r) => write!(f, "failed: {r}"),
        }
    }
}

/// One line of `trellis plugins list`.
#[derive(Debug, Clone)]
pub struct PluginReport {
    /// The plugin's name.
    pub name: String,
    /// Its group.
    pub group: PluginGroup,
    /// Compiled in, or the folder it was found in.
    pub origin: PluginOrigin,
    /// What happened when it was loaded.
    pub status: PluginStatus,
}

/// Discovers every plugin and tries each allowed one on its own: libraries are checked and
/// opened, `general` entries are run into `registrar`, `platform` entries are asked whether
/// they activate. Unlike startup, a failure does not stop the others.
pub fn plugin_reports(registrar: &mut dyn Registrar) -> Vec<PluginReport> {
    let allow = AllowList::from_env();
    let discovered = discover_plugins();
    warn_unmatched(&allow, &discovered);
    discovered
        .into_iter()
        .map(|d| {
            let status = if !allow.allows(&d.name) {
                PluginStatus::FilteredOut
            } else {
                match resolve(&d) {
                    Err(e) => PluginStatus::Failed(e.to_string()),
                    Ok(p) => match p.group {
                        PluginGroup::General => match p.register(registrar) {
                            Ok(()) => PluginStatus::Loaded(String::new()),
                            Err(e) => PluginStatus::Failed(e.to_string()),
                        },
                        PluginGroup::Platform => match p.platform() {
                            Ok(Some(pl)) => {
                                PluginStatus::Loaded(format!("activated: {}", pl.device_name()))
                            }
                            Ok(None) => PluginStatus::Loaded("not activated here".into()),
                            Err(e) => PluginStatus::Failed(e.to_string()),
                        },
                        // Called too, so that "registered" is only said of what really
                        // registered (into `registrar`, a throwaway copy of the built-ins).
                        PluginGroup::IoProcessor | PluginGroup::StatLogger => {
                            match p.register(registrar) {
                                Ok(()) => PluginStatus::Loaded("registered".into()),
                                Err(e) => PluginStatus::Failed(e.to_string()),
                            }
                        }
                    },
                }
            };
            PluginReport {
                name: d.name,
                group: d.group,
                origin: d.origin,
                status,
            }
        })
        .collect()
}
