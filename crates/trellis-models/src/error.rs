//! Errors of model loading: each names the file and the problem on one line.
//!
//! [`ModelError`] lives in `trellis-plugin` (plugin model factories return it); it is
//! re-exported here under its old path.

pub use trellis_plugin::error::{ModelError, Result, one_line, py_list};
