//! Metric plugins: shared libraries loaded at run time (`[[metric]] plugin = ...`).
//!
//! Owns, one submodule each: finding a plugin library ([`mod@locate`]: a path, or a name on the
//! search path, and [`find_files`] for `runner list`, which loads nothing), whether a file
//! may be loaded at all (`trust`: owner and permissions, as ssh judges keys), loading it and
//! the ABI checks
//! ([`abi_check`]: symbol, magic, ABI version, struct size, in that order, before any other
//! read or call, then the metadata), the [`PluginAdapter`] that makes a loaded plugin a
//! [`Metric`] ([`adapter`]), and the host callbacks a plugin calls during a call (`host`).
//! Must not: know any particular plugin, or compute anything itself.
//!
//! The ABI lives in the `hookgraph-plugin` crate (`hookgraph_plugin::abi`), which plugin
//! authors depend on; its crate docs and `plugins/README.md` describe the contract. (Its
//! `PluginMetric` is the trait a plugin *author* implements; the host's side is
//! [`PluginAdapter`].) Every failure here is an [`Error::Plugin`] naming the plugin (as the
//! spec wrote it until its metadata is read, then its declared name) and the cause,
//! including the plugin's own message when it returns an error or panics.

pub mod abi_check;
pub mod adapter;
mod host;
pub mod locate;
pub mod testing;
mod trust;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::metrics::Metric;

pub use adapter::{expand_hooks, PlanError, PluginAdapter};
pub use locate::{
    discover_in, find_files, load_info, locate, search_path, PluginFile, PLUGIN_PATH_ENV,
    TEST_PLUGIN_PREFIX,
};

/// What `runner list` shows about a plugin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The library file.
    pub path: PathBuf,
    /// Hook points as declared (`{layer}` templates unexpanded).
    pub hooks: Vec<String>,
    pub tables: Vec<String>,
    /// Each table's columns, in `tables`' order.
    #[serde(skip)]
    pub table_columns: Vec<Vec<String>>,
    /// (name, description).
    pub options: Vec<(String, String)>,
}

/// Loads a plugin metric: `spec` is a library path (relative to `spec_dir`; anything with a
/// path separator or a library suffix) or a name looked up as `lib<name>.so` (the platform's
/// [`libloading::library_filename`]) on [`search_path`]. Checks the ABI, rejects options the
/// plugin does not declare, and creates the plugin's state from `options` (as JSON).
pub fn load_metric(spec: &str, spec_dir: &Path, options: &toml::Table) -> Result<Box<dyn Metric>> {
    Ok(Box::new(PluginAdapter::load(spec, spec_dir, options)?))
}

/// Loads and checks a plugin without creating a metric (for `runner validate` and `list`).
pub fn describe(spec: &str, spec_dir: &Path) -> Result<PluginInfo> {
    let path = locate(spec, spec_dir)?;
    abi_check::open(&path)
        .map(|p| p.info.clone())
        .map_err(|e| plugin_error(spec, e.msg()))
}

pub(crate) fn plugin_error(plugin: &str, msg: String) -> Error {
    Error::Plugin {
        plugin: plugin.to_string(),
        msg,
    }
}
