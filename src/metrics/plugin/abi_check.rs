//! Opening a library as a plugin and checking it against the ABI before trusting it.
//!
//! Owns: the checks, in order (before loading: the file's owner and permissions, and that
//! it names the descriptor symbol at all; then the descriptor symbol, magic number, ABI
//! version, descriptor size) before anything else is read or called, then reading and validating the metadata
//! (names, hook templates, tables, options). Must not: call the plugin's metric functions;
//! the adapter does.

use std::ffi::{c_char, CStr};
use std::path::Path;

use hookgraph_plugin::abi::*;
use libloading::Library;

use super::PluginInfo;
use crate::hooks::{hook_point_names, BLOCK_HOOKS};
use crate::output::Table;

/// A sanity bound on list lengths read from a descriptor: a garbage descriptor fails cleanly
/// instead of making the host read gigabytes.
const MAX_LIST: usize = 4096;

/// A table as the plugin declared it.
#[derive(Debug, Clone)]
pub(crate) struct TableDesc {
    pub(crate) name: String,
    pub(crate) columns: Vec<String>,
    pub(crate) score: Option<String>,
    /// Columns where NaN means "undefined here" (ABI >= 3), not a failed metric.
    pub(crate) nan: Vec<String>,
}

impl TableDesc {
    /// An empty [`Table`] with this table's columns (per-head when it has a score column).
    pub(crate) fn empty(&self) -> Table {
        let cols: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        let mut table = Table::new(&self.name, &cols);
        if let Some(s) = &self.score {
            table = table.per_head(s);
        }
        for c in &self.nan {
            table = table.undefined_as_nan(c);
        }
        table
    }
}

/// A loaded, checked plugin library and the functions copied out of its descriptor.
pub(crate) struct Plugin {
    pub(crate) info: PluginInfo,
    pub(crate) tables: Vec<TableDesc>,
    pub(crate) create: HgCreateFn,
    pub(crate) begin_dataset: HgCallFn,
    pub(crate) batch: HgCallFn,
    pub(crate) finish_dataset: HgCallFn,
    pub(crate) destroy: HgDestroyFn,
    /// Partial state (ABI >= 2, when the plugin opts in): both or neither.
    pub(crate) state_fns: Option<(HgSaveStateFn, HgMergeStateFn)>,
    /// The ABI version it was built for.
    pub(crate) abi_version: u32,
    /// Last field, so it is dropped (unloaded) after everything pointing into it.
    pub(crate) _lib: Library,
}

/// Why a library could not be opened as a plugin.
pub(crate) enum OpenError {
    /// Not loadable, or without the descriptor symbol: not a plugin at all (discovery skips
    /// these silently).
    NotAPlugin(String),
    /// Looks like a plugin but fails a check.
    Invalid(String),
}

impl OpenError {
    pub(crate) fn msg(self) -> String {
        match self {
            OpenError::NotAPlugin(m) | OpenError::Invalid(m) => m,
        }
    }
}

/// Loads `path` and checks it, in order: the descriptor symbol, the magic number, the ABI
/// version, the descriptor's size; only then is the rest of the descriptor read.
pub(crate) fn open(path: &Path) -> std::result::Result<Plugin, OpenError> {
    use OpenError::*;
    let shown = path.display();
    // Before anything is loaded (loading runs the library's constructors): the file must be
    // the user's own and not writable by others, and must name the descriptor symbol.
    super::trust::check(path).map_err(Invalid)?;
    if !super::locate::has_descriptor_name(path) {
        return Err(NotAPlugin(format!(
            "{shown} is not a hookgraph plugin: it has no `{HG_DESCRIPTOR_SYMBOL}` symbol (missing `hookgraph_plugin::export_plugin!`?); it was not loaded"
        )));
    }
    // SAFETY: loading a library runs its initialisers: a plugin is code the user asked to
    // run (a spec or `runner list --load` named it), it passed the ownership check above.
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
    let v = header.abi_version;
    if !(HG_PLUGIN_ABI_MIN_VERSION..=HG_PLUGIN_ABI_VERSION).contains(&v) {
        let which = if v < HG_PLUGIN_ABI_VERSION {
            "an older"
        } else {
            "a newer"
        };
        return Err(Invalid(format!(
            "plugin ABI version {v} vs this runner's version {HG_PLUGIN_ABI_VERSION} (which also reads versions from {HG_PLUGIN_ABI_MIN_VERSION}): the plugin was built against {which} `hookgraph-plugin`; rebuild it against this hookgraph's"
        )));
    }
    // An older version's descriptor is a prefix of ours (`descriptor_len`).
    let expected = hookgraph_plugin::abi::descriptor_len(v);
    if header.struct_size as usize != expected {
        return Err(Invalid(format!(
            "its descriptor is {} bytes but ABI version {v} expects {expected} (built for another platform, or a hand-written descriptor that does not match)",
            header.struct_size
        )));
    }
    // SAFETY: magic, version and size match: a descriptor of version `v`, static in the
    // library, which `lib` keeps loaded; only that version's bytes are read.
    let owned = unsafe { hookgraph_plugin::abi::read_descriptor(desc, v) };
    let d = &owned;
    // SAFETY: the descriptor's pointers are valid while the library is loaded (ABI contract).
    let (info, tables) = unsafe { read_metadata(d, path) }.map_err(Invalid)?;
    fn need<F>(f: Option<F>, what: &str) -> std::result::Result<F, OpenError> {
        f.ok_or_else(|| OpenError::Invalid(format!("its descriptor has no `{what}` function")))
    }
    let state_fns =
        match (d.save_state, d.merge_state) {
            (Some(s), Some(m)) => Some((s, m)),
            (None, None) => None,
            _ => return Err(Invalid(
                "its descriptor has only one of `save_state` and `merge_state` (both or neither)"
                    .into(),
            )),
        };
    Ok(Plugin {
        state_fns,
        abi_version: v,
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
pub(crate) unsafe fn read_str(
    p: *const c_char,
    field: &str,
) -> std::result::Result<String, String> {
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
pub(crate) unsafe fn read_list<'a, T>(
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
pub(crate) unsafe fn read_metadata(
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
            nan: Vec::new(),
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
    for r in unsafe { read_list(d.undefined_nan, d.n_undefined_nan, "undefined_nan") }? {
        let t = unsafe { read_str(r.table, "undefined_nan[].table") }?;
        let c = unsafe { read_str(r.column, "undefined_nan[].column") }?;
        let Some(table) = tables.iter_mut().find(|x| x.name == t) else {
            return Err(format!(
                "undefined-NaN column '{c}' of table '{t}': no such table"
            ));
        };
        if !table.columns.contains(&c) {
            return Err(format!(
                "undefined-NaN column '{c}' is not a column of table '{t}'"
            ));
        }
        if !table.nan.contains(&c) {
            table.nan.push(c);
        }
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
        table_columns: tables.iter().map(|t| t.columns.clone()).collect(),
        options,
    };
    Ok((info, tables))
}

/// A declared hook must be a real hook point: `blocks.{layer}.<block hook>`,
/// `blocks.<N>.<block hook>`, or a model-level point (`ln_final.hook_scale`, `logits`, ...).
/// Whether layer N exists is checked by the runner against the model.
pub(crate) fn check_hook_template(h: &str) -> std::result::Result<(), String> {
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
pub(crate) fn check_table(t: &TableDesc) -> std::result::Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
            nan: Vec::new(),
        };
        assert!(check_table(&t(&["layer", "head", "x"], Some("x"))).is_ok());
        assert!(check_table(&t(&["x"], Some("x"))).is_err());
        assert!(check_table(&t(&["layer", "head"], Some("x"))).is_err());
        assert!(check_table(&t(&["dataset"], None)).is_err());
        assert!(check_table(&t(&["a", "a"], None)).is_err());
    }
}
