//! Plugin groups: vLLM's entry-point groups, under the names vLLM gives them.

use std::fmt;
use std::str::FromStr;

/// The group a plugin entry belongs to; it decides who calls the entry, when, and with what.
///
/// The short names (`general`, `platform`, `io_processor`, `stat_logger`) are what manifests
/// and `trellis plugins list` show; [`PluginGroup::vllm_name`] gives vLLM's entry-point group
/// (`vllm.general_plugins`, ...), which [`FromStr`] accepts too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginGroup {
    /// Called once per process with a [`crate::Registrar`]: registers models, attention
    /// backends and the like. A failure stops startup.
    General,
    /// Called during platform resolution; returns a platform, or nothing when that platform is
    /// not usable on this machine.
    Platform,
    /// IO processors for `/pooling` (vLLM's `vllm.io_processor_plugins`), loaded only when one
    /// is requested by name; registers through the [`crate::Registrar`].
    IoProcessor,
    /// Stat loggers (vLLM's `vllm.stat_logger_plugins`), loaded by the async engine only;
    /// registers through the [`crate::Registrar`].
    StatLogger,
}

impl PluginGroup {
    /// Every group, in the order above.
    pub const ALL: [PluginGroup; 4] = [
        PluginGroup::General,
        PluginGroup::Platform,
        PluginGroup::IoProcessor,
        PluginGroup::StatLogger,
    ];

    /// The short name: `general`, `platform`, `io_processor` or `stat_logger`.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginGroup::General => "general",
            PluginGroup::Platform => "platform",
            PluginGroup::IoProcessor => "io_processor",
            PluginGroup::StatLogger => "stat_logger",
        }
    }

    /// vLLM's entry-point group name, e.g. `vllm.general_plugins`.
    pub fn vllm_name(self) -> &'static str {
        match self {
            PluginGroup::General => "vllm.general_plugins",
            PluginGroup::Platform => "vllm.platform_plugins",
            PluginGroup::IoProcessor => "vllm.io_processor_plugins",
            PluginGroup::StatLogger => "vllm.stat_logger_plugins",
        }
    }
}

impl fmt::Display for PluginGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not a plugin group name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown plugin group {0:?}: expected general, platform, io_processor or stat_logger")]
pub struct UnknownGroup(pub String);

impl FromStr for PluginGroup {
    type Err = UnknownGroup;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PluginGroup::ALL
            .into_iter()
            .find(|g| g.as_str() == s || g.vllm_name() == s)
            .ok_or_else(|| UnknownGroup(s.to_string()))
    }
}
