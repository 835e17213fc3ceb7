//! The plugin loader's log lines, filtered by `VLLM_LOGGING_LEVEL` as vLLM's logger is
//! (default `INFO`): `LEVEL trellis: message` on stderr.

/// A log level (vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
        }
    }

    /// `VLLM_LOGGING_LEVEL` (case-insensitive); INFO when unset or unknown.
    fn threshold() -> Self {
        let v = std::env::var("VLLM_LOGGING_LEVEL").unwrap_or_default();
        match v.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Level::Debug,
            "WARNING" | "WARN" => Level::Warning,
            "ERROR" | "CRITICAL" => Level::Error,
            _ => Level::Info,
        }
    }
}

/// Prints `message` at `level` unless `VLLM_LOGGING_LEVEL` is above it.
pub(crate) fn log(level: Level, message: &str) {
    if level >= Level::threshold() {
        eprintln!("{} trellis: {message}", level.name());
    }
}
