//! Metric plugins: shared libraries loaded at run time (`[[metric]] plugin = ...`).
//!
//! Owns: finding a plugin library (a path, or a name on the search path: [`search_path`]),
//! loading it with `libloading`, the ABI checks (symbol, magic, ABI version, struct size, in
//! that order, before any other read or call), reading and validating its metadata, and
//! [`PluginMetric`], which adapts a loaded plugin to the [`Metric`] trait: it expands the
//! plugin's `{layer}` hook templates, hands it the batch's cache and the processed weights
//! through host callbacks, and collects the rows it emits into [`Table`]s. Also
//! [`discover`] for `runner list`. Must not: know any particular plugin, or compute anything
//! itself.
//!
//! The ABI lives in the `hookgraph-plugin` crate (`hookgraph_plugin::abi`), which plugin
//! authors depend on; its crate docs and `plugins/README.md` describe the contract. Every
//! failure here is an [`Error::Plugin`] naming the plugin (as the spec wrote it until its
//! metadata is read, then its declared name) and the cause, including the plugin's own
//! message when it returns an error or panics.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString, OsString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hookgraph_plugin::abi::*;
use libloading::Library;
use ndarray::ArrayViewD;
use serde::Serialize;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::{hook_point_names, ActivationCache, BLOCK_HOOKS};
use crate::metrics::{BatchView, Metric, RunContext};
use crate::model::Params;
use crate::output::{Table, Value};

/// Directories (`:`-separated on Unix) searched first for a plugin given by name.
pub const PLUGIN_PATH_ENV: &str = "HOOKGRAPH_PLUGIN_PATH";

/// Capacity of the buffer a plugin writes its error or panic message into.
const MESSAGE_CAP: usize = 16 * 1024;

/// A sanity bound on list lengths read from a descriptor: a garbage descriptor fails cleanly
/// instead of making the host read gigabytes.
const MAX_LIST: usize = 4096;

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
    /// (name, description).
    pub options: Vec<(String, String)>,
}

/// A table as the plugin declared it.
#[derive(Debug, Clone)]
struct TableDesc {
    name: String,
    columns: Vec<String>,
    score: Option<String>,
}

impl TableDesc {
    /// An empty [`Table`] with this table's columns (per-head when it has a score column).
    fn empty(&self) -> Table {
        let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        let table = Table::new(&self.name, &cols);
        match &self.score {
            Some(s) => table.per_head(s),
            None => table,
        }
    }
}

/// A loaded, checked plugin library and the functions copied out of its descriptor.
struct Plugin {
    info: PluginInfo,
    tables: Vec<TableDesc>,
    create: HgCreateFn,
    begin_dataset: HgCallFn,
    batch: HgCallFn,
    finish_dataset: HgCallFn,
    destroy: HgDestroyFn,
    /// Last field, so it is dropped (unloaded) after everything pointing into it.
    _lib: Library,
}

/// Why a library could not be opened as a plugin.
enum OpenError {
    /// Not loadable, or without the descriptor symbol: not a plugin at all (discovery skips
    /// these silently).
    NotAPlugin(String),
    /// Looks like a plugin but fails a check.
    Invalid(String),
}

impl OpenError {
    fn msg(self) -> String {
        match self {
            OpenError::NotAPlugin(m) | OpenError::Invalid(m) => m,
        }
    }
}

/// Loads a plugin metric: `spec` is a library path (relative to `spec_dir`; anything with a
/// path separator or a library suffix) or a name looked up as `lib<name>.so` (the platform's
/// [`libloading::library_filename`]) on [`search_path`]. Checks the ABI, rejects options the
/// plugin does not declare, and creates the plugin's state from `options` (as JSON).
pub fn load_metric(spec: &str, spec_dir: &Path, options: &toml::Table) -> Result<Box<dyn Metric>> {
    Ok(Box::new(PluginMetric::load(spec, spec_dir, options)?))
}

/// Loads and checks a plugin without creating a metric (for `runner validate` and `list`).
pub fn describe(spec: &str, spec_dir: &Path) -> Result<PluginInfo> {
    let path = locate(spec, spec_dir)?;
    open(&path)
        .map(|p| p.info.clone())
        .map_err(|e| plugin_error(spec, e.msg()))
}

/// Every loadable hookgraph plugin on [`search_path`], first occurrence of a file name
/// winning (as loading by name would pick it). Libraries without the descriptor symbol and
/// plugins that fail their checks are skipped; [`discover_in`] reports the latter.
pub fn discover() -> Vec<PluginInfo> {
    discover_in(&search_path())
        .into_iter()
        .filter_map(|r| r.ok())
        .collect()
}

/// Like [`discover`] over `dirs`, with an error for each library that exports the descriptor
/// symbol but fails a check (wrong magic, other ABI version, bad metadata).
pub fn discover_in(dirs: &[PathBuf]) -> Vec<Result<PluginInfo>> {
    let prefix = std::env::consts::DLL_PREFIX;
    let suffix = std::env::consts::DLL_SUFFIX;
    let mut seen_names = std::collections::BTreeSet::new();
    let mut seen_dirs = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in dirs {
        let canon = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        if !seen_dirs.insert(canon) {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<(OsString, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n.ends_with(suffix)
            })
            .map(|e| (e.file_name(), e.path()))
            .collect();
        files.sort();
        for (name, path) in files {
            if !seen_names.insert(name) {
                continue;
            }
            match open(&path) {
                Ok(p) => out.push(Ok(p.info.clone())),
                Err(OpenError::NotAPlugin(_)) => {}
                Err(OpenError::Invalid(msg)) => {
                    out.push(Err(plugin_error(&path.display().to_string(), msg)))
                }
            }
        }
    }
    out
}

/// Where plugins given by name are looked for, in order: each directory of
/// `HOOKGRAPH_PLUGIN_PATH`, then `release` and `debug` of the cargo target directory the
/// running executable was built in (when it lives in one), of `CARGO_TARGET_DIR`, and of
/// `./target`.
pub fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os(PLUGIN_PATH_ENV) {
        dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    let mut targets = Vec::new();
    if let Some(t) = std::env::current_exe()
        .ok()
        .and_then(|exe| cargo_target_dir_of(&exe))
    {
        targets.push(t);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        targets.push(match std::env::current_dir() {
            Ok(cwd) if t.is_relative() => cwd.join(t),
            _ => t,
        });
    }
    if let Ok(cwd) = std::env::current_dir() {
        targets.push(cwd.join("target"));
    }
    for t in targets {
        dirs.push(t.join("release"));
        dirs.push(t.join("debug"));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The cargo target directory an executable sits in (`target/<profile>/exe` or, for tests,
/// `target/<profile>/deps/exe`), recognised by cargo's `CACHEDIR.TAG`.
fn cargo_target_dir_of(exe: &Path) -> Option<PathBuf> {
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    let target = dir.parent()?;
    target
        .join("CACHEDIR.TAG")
        .is_file()
        .then(|| target.to_path_buf())
}

/// Whether a spec's `plugin` value is a path rather than a name.
fn looks_like_path(spec: &str) -> bool {
    spec.contains('/')
        || spec.contains(std::path::MAIN_SEPARATOR)
        || [".so", ".dylib", ".dll"].iter().any(|s| spec.ends_with(s))
}

/// The library file a spec's `plugin` value names.
pub fn locate(spec: &str, spec_dir: &Path) -> Result<PathBuf> {
    if spec.trim().is_empty() {
        return Err(plugin_error(spec, "`plugin` is empty".into()));
    }
    if looks_like_path(spec) {
        let p = Path::new(spec);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            spec_dir.join(p)
        };
        // Absolute: the dynamic loader looks a path without a `/` (`libfoo.so` next to a spec
        // run as `runner spec.toml`) up on its search path, not in the working directory.
        let p = std::path::absolute(&p).unwrap_or(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(plugin_error(
                spec,
                format!("no such library file: {}", p.display()),
            ))
        };
    }
    // Cargo turns `-` into `_` in library names: accept the package name either way.
    let mut files = vec![libloading::library_filename(spec)];
    if spec.contains('-') {
        files.push(libloading::library_filename(spec.replace('-', "_")));
    }
    let dirs = search_path();
    for dir in &dirs {
        for f in &files {
            let p = dir.join(f);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(plugin_error(
        spec,
        format!(
            "no {} on the plugin search path ({}); build it (`cargo build --release -p {spec}`), set {PLUGIN_PATH_ENV}, or give a path",
            files[0].to_string_lossy(),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

fn plugin_error(plugin: &str, msg: String) -> Error {
    Error::Plugin {
        plugin: plugin.to_string(),
        msg,
    }
}

/// Loads `path` and checks it, in order: the descriptor symbol, the magic number, the ABI
/// version, the descriptor's size; only then is the rest of the descriptor read.
fn open(path: &Path) -> std::result::Result<Plugin, OpenError> {
    use OpenError::*;
    let shown = path.display();
    // SAFETY: loading a library runs its initialisers: a plugin is code the user asked to
    // run, like the runner itself.
    let lib = unsafe { Library::new(path) }
        .map_err(|e| NotAPlugin(format!("cannot load {shown}: {e}")))?;
    // SAFETY: the symbol's type is part of the ABI's fixed header and never changes.
    let get: HgDescriptorFn = unsafe { lib.get::<HgDescriptorFn>(HG_DESCRIPTOR_SYMBOL.as_bytes()) }
        .map(|s| *s)
        .map_err(|_| {
            NotAPlugin(format!(
                "{shown} is not a hookgraph plugin: it has no `{HG_DESCRIPTOR_SYMBOL}` symbol (missing `hookgraph_plugin::export_plugin!`?)"
            ))
        })?;
    // SAFETY: calling the descriptor function is the first call the ABI allows; it takes no
    // arguments and returns a pointer we check before reading.
    let desc = unsafe { get() };
    if desc.is_null() {
        return Err(Invalid(
            "its descriptor function returned null (it could not build its metadata, e.g. a NUL inside a name)".into(),
        ));
    }
    if !desc.cast::<HgPluginHeader>().is_aligned() {
        return Err(Invalid("its descriptor pointer is misaligned".into()));
    }
    // SAFETY: every ABI version starts with this 16-byte header; nothing past it is read
    // until the header checks out.
    let header = unsafe { std::ptr::read(desc.cast::<HgPluginHeader>()) };
    if header.magic != HG_PLUGIN_MAGIC {
        return Err(Invalid(format!(
            "wrong magic number {:#018x} in its descriptor (expected {HG_PLUGIN_MAGIC:#018x}): not a hookgraph plugin, or a corrupt build",
            header.magic
        )));
    }
    if header.abi_version != HG_PLUGIN_ABI_VERSION {
        let which = if header.abi_version < HG_PLUGIN_ABI_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(Invalid(format!(
            "plugin ABI version {} vs this runner's version {HG_PLUGIN_ABI_VERSION}: the plugin was built against {which} `hookgraph-plugin`; rebuild it against this hookgraph's",
            header.abi_version
        )));
    }
    let expected = std::mem::size_of::<HgPluginDescriptor>();
    if header.struct_size as usize != expected {
        return Err(Invalid(format!(
            "its descriptor is {} bytes but ABI version {HG_PLUGIN_ABI_VERSION} expects {expected} (built for another platform, or a hand-written descriptor that does not match)",
            header.struct_size
        )));
    }
    // SAFETY: magic, version and size match: this is an HgPluginDescriptor of our ABI, static
    // in the library, which `lib` keeps loaded.
    let d = unsafe { &*desc };
    // SAFETY: the descriptor's pointers are valid while the library is loaded (ABI contract).
    let (info, tables) = unsafe { read_metadata(d, path) }.map_err(Invalid)?;
    fn need<F>(f: Option<F>, what: &str) -> std::result::Result<F, OpenError> {
        f.ok_or_else(|| OpenError::Invalid(format!("its descriptor has no `{what}` function")))
    }
    Ok(Plugin {
        create: need(d.create, "create")?,
        begin_dataset: need(d.begin_dataset, "begin_dataset")?,
        batch: need(d.batch, "batch")?,
        finish_dataset: need(d.finish_dataset, "finish_dataset")?,
        destroy: need(d.destroy, "destroy")?,
        info,
        tables,
        _lib: lib,
    })
}

/// A descriptor string.
///
/// # Safety
/// `p` must be null or a NUL-terminated string valid while the library is loaded.
unsafe fn read_str(p: *const c_char, field: &str) -> std::result::Result<String, String> {
    if p.is_null() {
        return Err(format!("descriptor field `{field}` is null"));
    }
    // SAFETY: forwarded from the caller.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map(str::to_string)
        .map_err(|_| format!("descriptor field `{field}` is not UTF-8"))
}

/// A descriptor list.
///
/// # Safety
/// `p` must point at `n` valid `T`s (or `n` be 0).
unsafe fn read_list<'a, T>(
    p: *const T,
    n: usize,
    field: &str,
) -> std::result::Result<&'a [T], String> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() || n > MAX_LIST || !p.is_aligned() {
        return Err(format!(
            "descriptor field `{field}` is invalid (null, misaligned or {n} entries)"
        ));
    }
    // SAFETY: forwarded from the caller.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Reads and validates a checked descriptor's metadata.
///
/// # Safety
/// `d` must be a descriptor of this ABI version whose pointers are valid.
unsafe fn read_metadata(
    d: &HgPluginDescriptor,
    path: &Path,
) -> std::result::Result<(PluginInfo, Vec<TableDesc>), String> {
    // SAFETY (all blocks below): pointers and lengths from the checked descriptor.
    let name = unsafe { read_str(d.name, "name") }?;
    if name.trim().is_empty() {
        return Err("its name is empty".into());
    }
    let version = unsafe { read_str(d.version, "version") }?;
    let description = unsafe { read_str(d.description, "description") }?;
    let mut hooks = Vec::new();
    for &h in unsafe { read_list(d.hooks, d.n_hooks, "hooks") }? {
        let h = unsafe { read_str(h, "hooks[]") }?;
        check_hook_template(&h)?;
        hooks.push(h);
    }
    let mut tables: Vec<TableDesc> = Vec::new();
    for t in unsafe { read_list(d.tables, d.n_tables, "tables") }? {
        let tname = unsafe { read_str(t.name, "tables[].name") }?;
        let mut columns = Vec::new();
        for &c in unsafe { read_list(t.columns, t.n_columns, "tables[].columns") }? {
            columns.push(unsafe { read_str(c, "tables[].columns[]") }?);
        }
        let score = if t.score_column.is_null() {
            None
        } else {
            Some(unsafe { read_str(t.score_column, "tables[].score_column") }?)
        };
        let table = TableDesc {
            name: tname,
            columns,
            score,
        };
        check_table(&table)?;
        if tables.iter().any(|o| o.name == table.name) {
            return Err(format!("it declares table '{}' twice", table.name));
        }
        tables.push(table);
    }
    if tables.is_empty() {
        return Err("it declares no output table".into());
    }
    let mut options: Vec<(String, String)> = Vec::new();
    for o in unsafe { read_list(d.options, d.n_options, "options") }? {
        let oname = unsafe { read_str(o.name, "options[].name") }?;
        let odesc = unsafe { read_str(o.description, "options[].description") }?;
        if matches!(oname.as_str(), "plugin" | "kind" | "name") || oname.is_empty() {
            return Err(format!("option name '{oname}' is reserved or empty"));
        }
        if options.iter().any(|(n, _)| *n == oname) {
            return Err(format!("it declares option '{oname}' twice"));
        }
        options.push((oname, odesc));
    }
    let info = PluginInfo {
        name,
        version,
        description,
        path: path.to_path_buf(),
        hooks,
        tables: tables.iter().map(|t| t.name.clone()).collect(),
        options,
    };
    Ok((info, tables))
}

/// A declared hook must be a real hook point: `blocks.{layer}.<block hook>`,
/// `blocks.<N>.<block hook>`, or a model-level point (`ln_final.hook_scale`, `logits`, ...).
/// Whether layer N exists is checked by the runner against the model.
fn check_hook_template(h: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "hook '{h}': {why} (see `runner list` for hook names)"
        ))
    };
    if let Some(rest) = h.strip_prefix("blocks.") {
        let Some((layer, hook)) = rest.split_once('.') else {
            return bad("not a hook point");
        };
        if layer != "{layer}" && layer.parse::<usize>().is_err() {
            return bad("the layer must be a number or `{layer}`");
        }
        if !BLOCK_HOOKS.contains(&hook) {
            return bad("no such per-layer hook point");
        }
        Ok(())
    } else if h.contains(['{', '}']) {
        bad("`{layer}` is the only template placeholder, and only as `blocks.{layer}.`")
    } else if hook_point_names(0).iter().any(|n| n == h) {
        Ok(())
    } else {
        bad("no such hook point")
    }
}

/// Table names become file stems; `dataset` is the column the runner prepends.
fn check_table(t: &TableDesc) -> std::result::Result<(), String> {
    let file_safe = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !file_safe(&t.name) || t.name.starts_with('.') {
        return Err(format!(
            "table name '{}' must be a file stem (letters, digits, _ - .)",
            t.name
        ));
    }
    if t.columns.is_empty() {
        return Err(format!("table '{}' has no columns", t.name));
    }
    for (i, c) in t.columns.iter().enumerate() {
        if c.is_empty() || c == "dataset" {
            return Err(format!(
                "table '{}': column '{c}' is empty or reserved (the runner adds `dataset`)",
                t.name
            ));
        }
        if t.columns[..i].contains(c) {
            return Err(format!("table '{}': column '{c}' appears twice", t.name));
        }
    }
    if let Some(s) = &t.score {
        if !t.columns.contains(s) {
            return Err(format!(
                "table '{}': score column '{s}' is not one of its columns",
                t.name
            ));
        }
        if !(t.columns.iter().any(|c| c == "layer") && t.columns.iter().any(|c| c == "head")) {
            return Err(format!(
                "table '{}': a score column makes it a per-head table, which needs `layer` and `head` columns",
                t.name
            ));
        }
    }
    Ok(())
}

/// A spec's options as the JSON object handed to the plugin's `create`.
fn options_json(options: &toml::Table) -> std::result::Result<serde_json::Value, String> {
    fn conv(key: &str, v: &toml::Value) -> std::result::Result<serde_json::Value, String> {
        use serde_json::Value as J;
        Ok(match v {
            toml::Value::String(s) => J::String(s.clone()),
            toml::Value::Integer(i) => J::from(*i),
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .ok_or_else(|| format!("option '{key}': {f} cannot be passed to a plugin"))?,
            toml::Value::Boolean(b) => J::Bool(*b),
            toml::Value::Datetime(d) => J::String(d.to_string()),
            toml::Value::Array(a) => J::Array(
                a.iter()
                    .map(|x| conv(key, x))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            toml::Value::Table(t) => J::Object(
                t.iter()
                    .map(|(k, x)| Ok((k.clone(), conv(key, x)?)))
                    .collect::<std::result::Result<_, String>>()?,
            ),
        })
    }
    conv("", &toml::Value::Table(options.clone()))
}

/// Calls a plugin function with a fresh message buffer; returns its status and message.
fn with_message(f: impl FnOnce(*mut HgMessage) -> HgStatus) -> (HgStatus, String) {
    let mut buf = vec![0u8; MESSAGE_CAP];
    let mut msg = HgMessage {
        buf: buf.as_mut_ptr(),
        cap: buf.len(),
        len: 0,
    };
    let status = f(&mut msg);
    let len = msg.len.min(buf.len());
    let text = String::from_utf8_lossy(&buf[..len]).trim().to_string();
    (
        status,
        if text.is_empty() {
            "(no message)".into()
        } else {
            text
        },
    )
}

/// A plugin loaded as a [`Metric`]. Keeps its library loaded for as long as it lives.
pub struct PluginMetric {
    /// The plugin's state from `create`; destroyed in `Drop`.
    state: *mut c_void,
    /// Set when the plugin panicked: it is not called again.
    poisoned: Option<String>,
    plugin: Plugin,
}

// SAFETY: the ABI requires a plugin's state to tolerate being called from another thread
// than the one that created it, as long as calls are serialised (which `&mut self`
// guarantees); the Rust layer enforces this with `PluginMetric: Send`.
unsafe impl Send for PluginMetric {}

impl PluginMetric {
    /// See [`load_metric`].
    pub fn load(spec: &str, spec_dir: &Path, options: &toml::Table) -> Result<Self> {
        let path = locate(spec, spec_dir)?;
        let plugin = open(&path).map_err(|e| plugin_error(spec, e.msg()))?;
        let label = plugin.info.name.clone();
        let err = |msg: String| plugin_error(&label, msg);
        let declared = &plugin.info.options;
        for key in options.keys() {
            if !declared.iter().any(|(n, _)| n == key) {
                let known: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
                return Err(err(format!(
                    "unknown option '{key}' (known: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        let json = options_json(options).map_err(err)?;
        let json = CString::new(json.to_string())
            .map_err(|_| err("options contain a NUL character".into()))?;
        let mut state: *mut c_void = std::ptr::null_mut();
        let (status, msg) = with_message(|m| {
            // SAFETY: a checked plugin's create, with a valid string, slot and buffer.
            unsafe { (plugin.create)(json.as_ptr(), &mut state, m) }
        });
        describe_status(status, &msg, "create (reading its options)").map_err(err)?;
        if state.is_null() {
            return Err(err("create succeeded but returned no state".into()));
        }
        Ok(PluginMetric {
            state,
            poisoned: None,
            plugin,
        })
    }

    /// The plugin's metadata.
    pub fn info(&self) -> &PluginInfo {
        &self.plugin.info
    }

    fn err(&self, msg: String) -> Error {
        plugin_error(&self.plugin.info.name, msg)
    }

    /// One call into the plugin with a fresh host context; returns the tables emitted (only
    /// `finish_dataset` may emit).
    fn call(
        &mut self,
        phase: Phase,
        ctx: &RunContext,
        dataset: &Dataset,
        batch: Option<&BatchView>,
    ) -> Result<Vec<Table>> {
        if let Some(p) = &self.poisoned {
            return Err(self.err(format!("not called again after it panicked ({p})")));
        }
        let cfg = ctx.cfg;
        let heads: Vec<HgHead> = ctx
            .heads
            .iter()
            .map(|&(l, h)| HgHead {
                layer: l as u32,
                head: h as u32,
            })
            .collect();
        let dataset_name = CString::new(dataset.name.replace('\0', "")).unwrap_or_default();
        let n_sequences = dataset.n_sequences();
        // The ABI promises one length per sequence; never hand out a shorter array.
        let fallback;
        let lengths: &[usize] = if dataset.lengths.len() == n_sequences {
            &dataset.lengths
        } else {
            fallback = vec![dataset.seq_len(); n_sequences];
            &fallback
        };
        let tokens_owned;
        let (tokens, first_sequence, allowed) = match batch {
            Some(b) => {
                let data = match b.tokens.as_slice() {
                    Some(s) => s,
                    None => {
                        tokens_owned = b.tokens.as_standard_layout().into_owned();
                        tokens_owned.as_slice().expect("standard layout")
                    }
                };
                let shape = [b.tokens.nrows(), b.tokens.ncols()];
                (Some((data, shape)), b.start, self.hooks(ctx))
            }
            None => (None, 0, Vec::new()),
        };
        let host = HostCtx {
            phase,
            cache: batch.map(|b| b.cache),
            allowed,
            params: ctx.params,
            tables: &self.plugin.tables,
            state: Mutex::new(HostState {
                // Every declared table, so a dataset with no rows still yields its header.
                tables: if phase == Phase::Finish {
                    self.plugin.tables.iter().map(TableDesc::empty).collect()
                } else {
                    Vec::new()
                },
                ..HostState::default()
            }),
        };
        let raw = HgCallCtx {
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads,
            d_model: cfg.d_model,
            d_head: cfg.d_head,
            d_vocab: cfg.d_vocab,
            bos: ctx.bos,
            heads: heads.as_ptr(),
            n_selected_heads: heads.len(),
            dataset: dataset_name.as_ptr(),
            n_sequences,
            seq_len: dataset.seq_len(),
            lengths: lengths.as_ptr(),
            tokens: match &tokens {
                Some((data, shape)) => HgTensorView {
                    data: data.as_ptr().cast(),
                    shape: shape.as_ptr(),
                    ndim: 2,
                    dtype: HG_DTYPE_U32,
                },
                None => HgTensorView::EMPTY,
            },
            first_sequence,
            host_ctx: &host as *const HostCtx as *mut c_void,
            get_activation: Some(host_get_activation),
            get_weight: Some(host_get_weight),
            emit_row: Some(host_emit_row),
        };
        let f = match phase {
            Phase::Begin => self.plugin.begin_dataset,
            Phase::Batch => self.plugin.batch,
            Phase::Finish => self.plugin.finish_dataset,
        };
        let state = self.state;
        let (status, msg) = with_message(|m| {
            // SAFETY: a checked plugin function with its own state, a context whose pointers
            // (heads, name, lengths, tokens, host) outlive the call, and a message buffer.
            unsafe { f(state, &raw, m) }
        });
        let what = match (phase, batch) {
            (Phase::Begin, _) => format!("begin_dataset (dataset '{}')", dataset.name),
            (Phase::Batch, Some(b)) => format!(
                "batch (dataset '{}', sequences {}..{})",
                dataset.name,
                b.start,
                b.start + b.tokens.nrows()
            ),
            (Phase::Batch, None) => unreachable!("a batch call always has a batch"),
            (Phase::Finish, _) => format!("finish_dataset (dataset '{}')", dataset.name),
        };
        let host_state = host
            .state
            .into_inner()
            .unwrap_or_else(|poison| poison.into_inner());
        if status == HG_PANIC {
            self.poisoned = Some(format!("{what}: {msg}"));
        }
        let plugin_result = describe_status(status, &msg, &what);
        match (plugin_result, host_state.emit_error) {
            (Ok(()), None) => Ok(host_state.tables),
            (Ok(()), Some(e)) => Err(self.err(format!("{what}: emit_row: {e}"))),
            (Err(m), None) => Err(self.err(m)),
            (Err(m), Some(e)) => Err(self.err(format!("{m} (emit_row: {e})"))),
        }
    }
}

/// The plugin's status as a result; the message names the call.
fn describe_status(status: HgStatus, msg: &str, what: &str) -> std::result::Result<(), String> {
    match status {
        HG_OK => Ok(()),
        HG_ERROR => Err(format!("{what} failed: {msg}")),
        HG_PANIC => Err(format!("{what} panicked: {msg}")),
        s => Err(format!("{what} returned unknown status {s}: {msg}")),
    }
}

impl Drop for PluginMetric {
    fn drop(&mut self) {
        // SAFETY: the state came from this plugin's create and is destroyed exactly once,
        // before the library (a later field) is unloaded.
        unsafe { (self.plugin.destroy)(self.state) };
    }
}

impl Metric for PluginMetric {
    fn name(&self) -> &str {
        &self.plugin.info.name
    }

    /// The declared hooks, `{layer}` templates expanded for every layer with selected heads.
    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        expand_hooks(&self.plugin.info.hooks, ctx.heads)
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        self.call(Phase::Begin, ctx, dataset, None).map(drop)
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        self.call(Phase::Batch, ctx, batch.dataset, Some(batch))
            .map(drop)
    }

    fn finish_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<Vec<Table>> {
        self.call(Phase::Finish, ctx, dataset, None)
    }
}

/// Expands `{layer}` templates for each layer that has a selected head; keeps order, drops
/// duplicates.
pub fn expand_hooks(templates: &[String], heads: &[(usize, usize)]) -> Vec<String> {
    let mut layers: Vec<usize> = heads.iter().map(|&(l, _)| l).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut out: Vec<String> = Vec::new();
    for t in templates {
        let names: Vec<String> = if t.contains("{layer}") {
            layers
                .iter()
                .map(|l| t.replace("{layer}", &l.to_string()))
                .collect()
        } else {
            vec![t.clone()]
        };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
}

/// Which plugin function is being called; decides what the callbacks allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Begin,
    Batch,
    Finish,
}

/// What the host callbacks see during one plugin call (behind `host_ctx`).
struct HostCtx<'a> {
    phase: Phase,
    cache: Option<&'a ActivationCache>,
    /// The expanded hooks the plugin declared: the only activations it may read.
    allowed: Vec<String>,
    params: &'a Params,
    tables: &'a [TableDesc],
    /// A mutex, not a `RefCell`: the ABI lets a plugin call back from its own threads.
    state: Mutex<HostState<'a>>,
}

/// What callbacks accumulate during a call.
#[derive(Default)]
struct HostState<'a> {
    /// Processed weights by TL name, built on the first `get_weight`.
    weights: Option<HashMap<String, ArrayViewD<'a, f32>>>,
    /// Views already handed out, by (is_weight, name): asking twice gives the same memory.
    views: HashMap<(bool, String), HgTensorView>,
    /// Shapes and contiguous copies the views point into; boxed so they never move.
    shapes: Vec<Box<[usize]>>,
    copies: Vec<Box<[f32]>>,
    /// Rows emitted in `finish_dataset`.
    tables: Vec<Table>,
    /// The first row the host rejected, reported after the call.
    emit_error: Option<String>,
}

impl<'a> HostCtx<'a> {
    fn tensor(&self, weight: bool, name: &str) -> std::result::Result<HgTensorView, HgStatus> {
        let mut st = self.state.lock().map_err(|_| HG_INVALID)?;
        if let Some(v) = st.views.get(&(weight, name.to_string())) {
            return Ok(*v);
        }
        let array: ArrayViewD<'a, f32> = if weight {
            let params = self.params;
            let weights = st
                .weights
                .get_or_insert_with(|| params.named().into_iter().collect());
            weights.get(name).cloned().ok_or(HG_NOT_FOUND)?
        } else {
            if self.phase != Phase::Batch {
                return Err(HG_INVALID);
            }
            if !self.allowed.iter().any(|a| a == name) {
                return Err(HG_NOT_FOUND);
            }
            let cache = self.cache.ok_or(HG_INVALID)?;
            cache.get(name).map_err(|_| HG_NOT_FOUND)?.view()
        };
        let shape: Box<[usize]> = array.shape().into();
        let data: *const f32 = match array.as_slice() {
            Some(s) => s.as_ptr(),
            None => {
                let copy: Box<[f32]> = array.iter().copied().collect();
                let p = copy.as_ptr();
                st.copies.push(copy);
                p
            }
        };
        let view = HgTensorView {
            data: data.cast(),
            shape: shape.as_ptr(),
            ndim: shape.len(),
            dtype: HG_DTYPE_F32,
        };
        st.shapes.push(shape);
        st.views.insert((weight, name.to_string()), view);
        Ok(view)
    }

    fn emit(&self, table: &str, cells: &[HgValue]) -> std::result::Result<(), String> {
        if self.phase != Phase::Finish {
            return Err(format!(
                "row for table '{table}' emitted outside finish_dataset"
            ));
        }
        let desc = self
            .tables
            .iter()
            .find(|t| t.name == table)
            .ok_or_else(|| {
                format!(
                    "table '{table}' is not declared (declared: {})",
                    self.tables
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        if cells.len() != desc.columns.len() {
            return Err(format!(
                "table '{table}' has {} columns ({}), the row has {} values",
                desc.columns.len(),
                desc.columns.join(", "),
                cells.len()
            ));
        }
        let mut row = Vec::with_capacity(cells.len());
        for (cell, col) in cells.iter().zip(&desc.columns) {
            row.push(match cell.kind {
                HG_VALUE_INT => Value::Int(cell.int),
                HG_VALUE_FLOAT => Value::Float(cell.float),
                HG_VALUE_STR if !cell.str.is_null() => {
                    // SAFETY: a NUL-terminated string the plugin keeps alive during emit_row.
                    let s = unsafe { CStr::from_ptr(cell.str) };
                    Value::Str(
                        s.to_str()
                            .map_err(|_| {
                                format!("table '{table}', column '{col}': string is not UTF-8")
                            })?
                            .to_string(),
                    )
                }
                k => {
                    return Err(format!(
                        "table '{table}', column '{col}': bad value (kind {k})"
                    ))
                }
            });
        }
        let mut st = self.state.lock().map_err(|_| "host state poisoned")?;
        let i = self
            .tables
            .iter()
            .position(|t| t.name == table)
            .expect("found above");
        st.tables[i].push(row);
        Ok(())
    }
}

/// Runs a callback body, never letting a host panic unwind into the plugin.
fn host_guard(f: impl FnOnce() -> HgStatus) -> HgStatus {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(HG_INVALID)
}

/// # Safety
/// Called by the plugin with the `host_ctx` of the current call.
unsafe fn host_ctx<'a>(p: *mut c_void) -> Option<&'a HostCtx<'a>> {
    // SAFETY: `host_ctx` is the HostCtx that `PluginMetric::call` keeps alive for the call.
    unsafe { (p as *const HostCtx).as_ref() }
}

unsafe extern "C" fn host_get_tensor(
    weight: bool,
    ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus {
    host_guard(|| {
        // SAFETY: see `host_ctx`.
        let Some(ctx) = (unsafe { host_ctx(ctx) }) else {
            return HG_INVALID;
        };
        if name.is_null() || out.is_null() {
            return HG_INVALID;
        }
        // SAFETY: a NUL-terminated name from the plugin, valid during the callback.
        let Ok(name) = unsafe { CStr::from_ptr(name) }.to_str() else {
            return HG_INVALID;
        };
        match ctx.tensor(weight, name) {
            Ok(view) => {
                // SAFETY: `out` is non-null and points at the plugin's HgTensorView.
                unsafe { out.write(view) };
                HG_OK
            }
            Err(status) => status,
        }
    })
}

unsafe extern "C" fn host_get_activation(
    ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus {
    // SAFETY: forwarded from the plugin's call.
    unsafe { host_get_tensor(false, ctx, name, out) }
}

unsafe extern "C" fn host_get_weight(
    ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus {
    // SAFETY: forwarded from the plugin's call.
    unsafe { host_get_tensor(true, ctx, name, out) }
}

unsafe extern "C" fn host_emit_row(
    ctx: *mut c_void,
    table: *const c_char,
    values: *const HgValue,
    n_values: usize,
) -> HgStatus {
    host_guard(|| {
        // SAFETY: see `host_ctx`.
        let Some(ctx) = (unsafe { host_ctx(ctx) }) else {
            return HG_INVALID;
        };
        let result = (|| {
            if table.is_null() {
                return Err("emit_row with a null table name".to_string());
            }
            // SAFETY: a NUL-terminated name from the plugin, valid during the callback.
            let table = unsafe { CStr::from_ptr(table) }
                .to_str()
                .map_err(|_| "table name is not UTF-8".to_string())?;
            // SAFETY: the plugin passes `n_values` cells (the bound rejects garbage).
            let cells = unsafe { read_list(values, n_values, "emit_row values") }?;
            ctx.emit(table, cells)
        })();
        match result {
            Ok(()) => HG_OK,
            Err(e) => {
                if let Ok(mut st) = ctx.state.lock() {
                    st.emit_error.get_or_insert(e);
                }
                HG_INVALID
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_templates_expand_per_selected_layer() {
        let t = vec![
            "blocks.{layer}.attn.hook_v".to_string(),
            "ln_final.hook_scale".to_string(),
            "blocks.{layer}.attn.hook_v".to_string(),
        ];
        assert_eq!(
            expand_hooks(&t, &[(0, 1), (0, 2), (3, 0)]),
            vec![
                "blocks.0.attn.hook_v",
                "blocks.3.attn.hook_v",
                "ln_final.hook_scale"
            ]
        );
    }

    #[test]
    fn hook_declarations_are_checked() {
        assert!(check_hook_template("blocks.{layer}.attn.hook_pattern").is_ok());
        assert!(check_hook_template("blocks.2.hook_resid_post").is_ok());
        assert!(check_hook_template("logits").is_ok());
        assert!(check_hook_template("ln_final.hook_scale").is_ok());
        assert!(check_hook_template("blocks.{layer}.attn.hook_patern").is_err());
        assert!(check_hook_template("blocks.{l}.attn.hook_v").is_err());
        assert!(check_hook_template("{layer}.attn.hook_v").is_err());
    }

    #[test]
    fn tables_are_checked() {
        let t = |cols: &[&str], score: Option<&str>| TableDesc {
            name: "t".into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            score: score.map(str::to_string),
        };
        assert!(check_table(&t(&["layer", "head", "x"], Some("x"))).is_ok());
        assert!(check_table(&t(&["x"], Some("x"))).is_err());
        assert!(check_table(&t(&["layer", "head"], Some("x"))).is_err());
        assert!(check_table(&t(&["dataset"], None)).is_err());
        assert!(check_table(&t(&["a", "a"], None)).is_err());
    }

    #[test]
    fn paths_and_names_are_told_apart() {
        assert!(looks_like_path("plugins/libx.so"));
        assert!(looks_like_path("libx.dylib"));
        assert!(!looks_like_path("hg_attention_entropy"));
        let err = locate("surely_not_a_plugin_xyz", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("surely_not_a_plugin_xyz") && err.contains("search path"),
            "{err}"
        );
        let err = locate("nope/libx.so", Path::new("/tmp"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/tmp/nope/libx.so"), "{err}");
    }

    #[test]
    fn options_become_json() {
        let t: toml::Table = toml::from_str("a = true\nb = [1, 2.5]\nc = { d = \"x\" }").unwrap();
        assert_eq!(
            options_json(&t).unwrap(),
            serde_json::json!({"a": true, "b": [1, 2.5], "c": {"d": "x"}})
        );
    }
}
