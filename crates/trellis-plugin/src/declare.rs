//! How a plugin crate declares itself: [`declare_plugin!`](crate::declare_plugin) and the
//! declarations it produces.
//!
//! One macro serves both ways of shipping a plugin:
//! - **compiled in** (the crate is a dependency of the `trellis` build): each declaration is
//!   submitted to an [`inventory`] table at link time, and the host walks that table;
//! - **run time** (the crate built as a `cdylib`): inside a library, `inventory` fills the
//!   *library's own* copy of the table, which the host cannot see. So the macro also exports
//!   two C-ABI functions whose names end in the crate name (so that several compiled-in plugin
//!   crates never clash): `trellis_plugin_fingerprint_<crate>`, the build fingerprint, and
//!   `trellis_plugin_entry_<crate>`, which walks the library's own table on the host's behalf
//!   ([`LibraryCall`]).

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::group::PluginGroup;
use crate::guard::{GuardingRegistrar, guard_platform};
use crate::platform::Platform;
use crate::registrar::{RegisterResult, Registrar};

/// An entry that registers through the host's registrar (groups `general`, `io_processor`,
/// `stat_logger`).
pub type RegisterFn = fn(&mut dyn Registrar) -> RegisterResult;

/// A platform entry: the platform when it is usable on this machine, `None` when it is not
/// (vLLM: the platform plugin function returns a class name or `None`).
pub type PlatformFn = fn() -> Option<Arc<dyn Platform>>;

/// What a declaration calls.
#[derive(Clone, Copy)]
pub enum PluginEntry {
    /// Registers through the registrar.
    Register(RegisterFn),
    /// Detects a platform.
    Platform(PlatformFn),
}

/// One plugin entry a crate declares: vLLM's `(group, name, value)` entry point.
#[derive(Clone, Copy)]
pub struct PluginDecl {
    /// The entry's name: what `VLLM_PLUGINS` lists and `trellis plugins list` shows.
    pub name: &'static str,
    /// Its group.
    pub group: PluginGroup,
    /// What it calls.
    pub entry: PluginEntry,
}

impl std::fmt::Debug for PluginDecl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginDecl")
            .field("name", &self.name)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl PluginDecl {
    /// A `general` entry.
    pub const fn general(name: &'static str, f: RegisterFn) -> Self {
        Self {
            name,
            group: PluginGroup::General,
            entry: PluginEntry::Register(f),
        }
    }

    /// A `platform` entry.
    pub const fn platform(name: &'static str, f: PlatformFn) -> Self {
        Self {
            name,
            group: PluginGroup::Platform,
            entry: PluginEntry::Platform(f),
        }
    }

    /// An `io_processor` entry.
    pub const fn io_processor(name: &'static str, f: RegisterFn) -> Self {
        Self {
            name,
            group: PluginGroup::IoProcessor,
            entry: PluginEntry::Register(f),
        }
    }

    /// A `stat_logger` entry.
    pub const fn stat_logger(name: &'static str, f: RegisterFn) -> Self {
        Self {
            name,
            group: PluginGroup::StatLogger,
            entry: PluginEntry::Register(f),
        }
    }
}

inventory::collect!(PluginDecl);

/// Every declaration linked into this binary (or, inside a plugin library, into that
/// library), in link order.
pub fn compiled_in_plugins() -> impl Iterator<Item = &'static PluginDecl> {
    inventory::iter::<PluginDecl>.into_iter()
}

/// Declares a crate's plugin entries, each as `GROUP "name" => function`, where GROUP is
/// `general`, `platform`, `io_processor` or `stat_logger`:
///
/// ```ignore
/// trellis_plugin::declare_plugin! {
///     general "register_dummy_model" => register,
///     platform "dummy_platform_plugin" => detect,
/// }
/// ```
///
/// `general`, `io_processor` and `stat_logger` functions are [`RegisterFn`]s
/// (`fn(&mut dyn Registrar) -> RegisterResult`); `platform` functions are [`PlatformFn`]s.
/// Invoke it once per crate (it exports the library's C-ABI functions).
#[macro_export]
macro_rules! declare_plugin {
    ($($group:ident $name:literal => $entry:path),+ $(,)?) => {
        $(
            $crate::__private::inventory::submit! {
                $crate::PluginDecl::$group($name, $entry)
            }
        )+
        const _: () = {
            #[unsafe(export_name = concat!("trellis_plugin_fingerprint_", env!("CARGO_CRATE_NAME")))]
            extern "C" fn trellis_plugin_fingerprint() -> *const ::std::ffi::c_char {
                $crate::__private::fingerprint_ptr()
            }
            #[unsafe(export_name = concat!("trellis_plugin_layout_", env!("CARGO_CRATE_NAME")))]
            extern "C" fn trellis_plugin_layout() -> *const ::std::ffi::c_char {
                $crate::__private::layout_probe_ptr()
            }
            #[unsafe(export_name = concat!("trellis_plugin_entry_", env!("CARGO_CRATE_NAME")))]
            unsafe extern "C" fn trellis_plugin_entry(call: *mut $crate::__private::LibraryCall<'_>) {
                // SAFETY: the host passes a valid, exclusive pointer for the call's duration.
                unsafe { $crate::__private::serve_library_call(call) }
            }
        };
    };
}

/// A request from the host to a plugin library, passed by pointer to its entry function.
///
/// Rust types cross here: that is sound only because the host has checked, before this call,
/// that the library was built by the same rustc from the same `trellis-plugin` (fingerprint).
#[doc(hidden)]
pub enum LibraryCall<'a> {
    /// List the library's declarations (name, group).
    List(&'a mut Vec<(String, PluginGroup)>),
    /// Run the registering entry `name`.
    Register {
        /// The entry.
        name: &'a str,
        /// The host's registrar.
        registrar: &'a mut dyn Registrar,
        /// Set by the library: `Err(message)` when the entry failed or is unknown.
        result: &'a mut Result<(), String>,
    },
    /// Run the platform entry `name`.
    Platform {
        /// The entry.
        name: &'a str,
        /// Set by the library.
        result: &'a mut Result<Option<Arc<dyn Platform>>, String>,
    },
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    format!("panicked: {}", crate::guard::panic_text(p))
}

fn find(name: &str, group_ok: impl Fn(&PluginEntry) -> bool) -> Option<PluginEntry> {
    compiled_in_plugins()
        .find(|d| d.name == name && group_ok(&d.entry))
        .map(|d| d.entry)
}

/// Calls the registering entry `name`, turning its error or panic into a message. The entry
/// registers through a [`GuardingRegistrar`] made here, so that every object it registers is
/// wrapped by this copy of the crate (inside a library: the library's own).
pub(crate) fn call_register(
    name: &str,
    f: RegisterFn,
    registrar: &mut dyn Registrar,
) -> Result<(), String> {
    let mut guarding = GuardingRegistrar::new(registrar, name);
    match catch_unwind(AssertUnwindSafe(|| f(&mut guarding))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(panic_message(p.as_ref())),
    }
}

/// Calls the platform entry `name`, turning a panic into a message; the platform it returns
/// is wrapped by this copy of the crate ([`guard_platform`]).
pub(crate) fn call_platform(
    name: &str,
    f: PlatformFn,
) -> Result<Option<Arc<dyn Platform>>, String> {
    match catch_unwind(f).map_err(|p| panic_message(p.as_ref()))? {
        Some(platform) => guard_platform(name, platform).map(Some),
        None => Ok(None),
    }
}

/// Answers a [`LibraryCall`] from this library's own declarations (used by the exported
/// entry function that [`declare_plugin!`](crate::declare_plugin) generates).
///
/// # Safety
/// `call` must be null or point to a valid `LibraryCall` not aliased during the call.
#[doc(hidden)]
pub unsafe fn serve_library_call(call: *mut LibraryCall<'_>) {
    // SAFETY: guaranteed by the caller.
    let Some(call) = (unsafe { call.as_mut() }) else {
        return;
    };
    match call {
        LibraryCall::List(out) => {
            out.extend(compiled_in_plugins().map(|d| (d.name.to_string(), d.group)));
        }
        LibraryCall::Register {
            name,
            registrar,
            result,
        } => {
            **result = match find(name, |e| matches!(e, PluginEntry::Register(_))) {
                Some(PluginEntry::Register(f)) => call_register(name, f, &mut **registrar),
                _ => Err(format!(
                    "the library declares no registering entry {name:?}"
                )),
            };
        }
        LibraryCall::Platform { name, result } => {
            **result = match find(name, |e| matches!(e, PluginEntry::Platform(_))) {
                Some(PluginEntry::Platform(f)) => call_platform(name, f),
                _ => Err(format!("the library declares no platform entry {name:?}")),
            };
        }
    }
}

/// The NUL-terminated layout probe of this copy of `trellis-plugin`.
#[doc(hidden)]
pub fn layout_probe_ptr() -> *const c_char {
    crate::fingerprint::layout_probe_ptr()
}

/// The NUL-terminated build fingerprint of this copy of `trellis-plugin`.
#[doc(hidden)]
pub fn fingerprint_ptr() -> *const c_char {
    crate::fingerprint::BUILD_FINGERPRINT_C.as_ptr().cast()
}
