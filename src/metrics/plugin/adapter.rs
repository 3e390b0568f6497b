//! [`PluginAdapter`]: a loaded plugin as a [`Metric`].
//!
//! Owns: creating the plugin's state from the spec's options (as JSON), expanding its
//! `{layer}` hook templates, one call into the plugin per metric phase (with a fresh host
//! context and message buffer), turning its status into an error that names the call, never
//! calling a plugin again after it panicked, and destroying its state. Must not: check the
//! ABI (that happened in [`super::abi_check`]) or serve the callbacks (`host`).

use std::ffi::{c_void, CString};
use std::path::Path;
use std::sync::Mutex;

use hookgraph_plugin::abi::*;

use super::abi_check::{open, Plugin, TableDesc};
use super::host::{
    host_emit_row, host_get_activation, host_get_weight, host_token_text, HostCtx, HostState, Phase,
};
use super::{locate, plugin_error, PluginInfo};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::metrics::registry::OptType;
use crate::metrics::state::Array;
use crate::metrics::{BatchView, Metric, RunContext, State};
use crate::output::{Table, Value};

/// Capacity of the buffer a plugin writes its error or panic message into.
const MESSAGE_CAP: usize = 16 * 1024;

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

/// Why [`PluginAdapter::load_planned`] failed.
#[derive(Debug)]
pub enum PlanError {
    /// The spec's options for it are wrong: `key` is the option to point at, when one is.
    Option { key: Option<String>, error: Error },
    /// The library cannot be found, loaded or checked.
    Load(Error),
}

/// A plugin loaded as a [`Metric`] (the host's side; the plugin author's trait is
/// `hookgraph_plugin::PluginMetric`). Keeps its library loaded for as long as it lives.
pub struct PluginAdapter {
    /// The plugin's state from `create`; destroyed in `Drop`.
    state: *mut c_void,
    /// Set when the plugin panicked: it is not called again.
    poisoned: Option<String>,
    /// Rows the plugin emitted in `batch` calls of the current dataset (ABI >= 3), one table
    /// per declared table. Part of the partial state (`save_state` writes them, `merge_state`
    /// appends them), so sharded and resumed runs get exactly the unsharded rows; written
    /// before the rows `finish_dataset` emits.
    batch_rows: Vec<Table>,
    plugin: Plugin,
}

// SAFETY: the ABI requires a plugin's state to tolerate being called from another thread
// than the one that created it, as long as calls are serialised (which `&mut self`
// guarantees); the Rust layer enforces this with `PluginAdapter: Send`.
unsafe impl Send for PluginAdapter {}

impl PluginAdapter {
    /// See [`super::load_metric`].
    pub fn load(spec: &str, spec_dir: &Path, options: &toml::Table) -> Result<Self> {
        Self::load_planned(spec, spec_dir, options).map_err(|e| match e {
            PlanError::Option { error, .. } => error,
            PlanError::Load(e) => e,
        })
    }

    /// Like [`PluginAdapter::load`], telling a spec's mistake in the options (an option the
    /// plugin does not declare, or values its `create` refuses: the spec names the place)
    /// from a library that cannot be loaded (a failed metric, the run goes on).
    pub fn load_planned(
        spec: &str,
        spec_dir: &Path,
        options: &toml::Table,
    ) -> std::result::Result<Self, PlanError> {
        let path = locate(spec, spec_dir).map_err(PlanError::Load)?;
        let plugin = open(&path).map_err(|e| PlanError::Load(plugin_error(spec, e.msg())))?;
        let label = plugin.info.name.clone();
        let option_error = |key: Option<String>, msg: String| PlanError::Option {
            key,
            error: plugin_error(&label, msg),
        };
        // The same checks as a built-in's options (`metrics::registry`): undeclared keys
        // are errors, and a declared type (the description's first word, e.g. "bool,
        // default false: ...") is enforced before `create` sees the value.
        crate::metrics::registry::check_options(
            &label,
            plugin
                .info
                .options
                .iter()
                .map(|(n, about)| (n.as_str(), OptType::from_about(about), None)),
            options,
            None,
        )
        .map_err(|e| option_error(e.key, e.msg))?;
        let json = options_json(options).map_err(|m| option_error(None, m))?;
        let json = CString::new(json.to_string())
            .map_err(|_| option_error(None, "options contain a NUL character".into()))?;
        let mut state: *mut c_void = std::ptr::null_mut();
        let (status, msg) = with_message(|m| {
            // SAFETY: a checked plugin's create, with a valid string, slot and buffer.
            unsafe { (plugin.create)(json.as_ptr(), &mut state, m) }
        });
        describe_status(status, &msg, "create (reading its options)")
            .map_err(|m| option_error(None, m))?;
        if state.is_null() {
            return Err(PlanError::Load(plugin_error(
                &label,
                "create succeeded but returned no state".into(),
            )));
        }
        Ok(PluginAdapter {
            state,
            poisoned: None,
            batch_rows: Vec::new(),
            plugin,
        })
    }

    /// The plugin's metadata.
    pub fn info(&self) -> &PluginInfo {
        &self.plugin.info
    }

    fn no_state(&self) -> Error {
        let why = if self.plugin.abi_version < 2 {
            format!(
                "it was built for plugin ABI version {}, which has no partial state; rebuild it against this hookgraph-plugin and implement `save_state`/`merge_state`",
                self.plugin.abi_version
            )
        } else {
            "it does not implement partial state (`PluginMetric::PARTIAL_STATE`, `save_state`, `merge_state`)".to_string()
        };
        self.err(format!(
            "cannot be sharded or resumed: {why}; or run it unsharded, without --shard or --resume"
        ))
    }

    fn err(&self, msg: String) -> Error {
        plugin_error(&self.plugin.info.name, msg)
    }

    /// One call into the plugin with a fresh host context; returns the tables emitted
    /// (`batch` and `finish_dataset` may emit; `begin_dataset` returns none).
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
            tokenizer: ctx.tokenizer,
            d_vocab: cfg.d_vocab,
            state: Mutex::new(HostState {
                // Every declared table, so a dataset with no rows still yields its header.
                tables: if phase == Phase::Begin {
                    Vec::new()
                } else {
                    self.plugin.tables.iter().map(TableDesc::empty).collect()
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
            ctx_size: std::mem::size_of::<HgCallCtx>(),
            token_text: Some(host_token_text),
            answers: match &dataset.answers {
                Some(a) if a.len() == n_sequences => a.as_ptr().cast::<u32>(),
                _ => std::ptr::null(),
            },
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

/// `HgStateSink::write`: appends the plugin's bytes to the host's `Vec<u8>`.
unsafe extern "C" fn host_write_state(sink: *mut c_void, data: *const u8, len: usize) -> HgStatus {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if sink.is_null() || (data.is_null() && len > 0) {
            return HG_INVALID;
        }
        // SAFETY: `sink` is the Vec<u8> that `save_state` lends for this call.
        let buf = unsafe { &mut *(sink as *mut Vec<u8>) };
        if len > 0 {
            // SAFETY: the plugin passes `len` readable bytes, valid during the callback.
            buf.extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
        }
        HG_OK
    }))
    .unwrap_or(HG_INVALID)
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

impl Drop for PluginAdapter {
    fn drop(&mut self) {
        // SAFETY: the state came from this plugin's create and is destroyed exactly once,
        // before the library (a later field) is unloaded.
        unsafe { (self.plugin.destroy)(self.state) };
    }
}

impl Metric for PluginAdapter {
    fn name(&self) -> &str {
        &self.plugin.info.name
    }

    /// The declared hooks, `{layer}` templates expanded for every layer with selected heads.
    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        expand_hooks(&self.plugin.info.hooks, ctx.heads)
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        self.batch_rows = self.plugin.tables.iter().map(TableDesc::empty).collect();
        self.call(Phase::Begin, ctx, dataset, None).map(drop)
    }

    /// Keeps the rows the batch emitted (only once the call succeeded: a failed batch adds
    /// nothing).
    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let tables = self.call(Phase::Batch, ctx, batch.dataset, Some(batch))?;
        append_rows(&mut self.batch_rows, tables);
        Ok(())
    }

    /// The rows emitted per batch, in sequence order, then those `finish_dataset` emitted.
    fn finish_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<Vec<Table>> {
        let finished = self.call(Phase::Finish, ctx, dataset, None)?;
        let mut out = std::mem::take(&mut self.batch_rows);
        if out.len() != finished.len() {
            return Ok(finished);
        }
        append_rows(&mut out, finished);
        Ok(out)
    }

    /// The plugin's bytes (ABI >= 2, when it opts in), kept as one `u8` array; a plugin
    /// without partial state is refused, naming it.
    fn save_state(&self) -> Result<State> {
        let Some((save, _)) = self.plugin.state_fns else {
            return Err(self.no_state());
        };
        if let Some(p) = &self.poisoned {
            return Err(self.err(format!("not called again after it panicked ({p})")));
        }
        let mut bytes: Vec<u8> = Vec::new();
        let sink = HgStateSink {
            sink: &mut bytes as *mut Vec<u8> as *mut c_void,
            write: Some(host_write_state),
        };
        let state = self.state;
        let (status, msg) = with_message(|m| {
            // SAFETY: a checked plugin's save_state with its own state, a sink whose buffer
            // outlives the call, and a message buffer.
            unsafe { save(state, &sink, m) }
        });
        describe_status(status, &msg, "save_state").map_err(|m| self.err(m))?;
        let mut st = State::new();
        st.put("bytes", Array::U8(bytes));
        st.put("batch_rows", Array::U8(encode_rows(&self.batch_rows)));
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, _dataset: &Dataset, st: &State) -> Result<()> {
        let Some((_, merge)) = self.plugin.state_fns else {
            return Err(self.no_state());
        };
        if let Some(p) = &self.poisoned {
            return Err(self.err(format!("not called again after it panicked ({p})")));
        }
        let bytes = st.u8(&self.plugin.info.name, "bytes")?;
        let state = self.state;
        let (status, msg) = with_message(|m| {
            // SAFETY: a checked plugin's merge_state with its own state and `bytes.len()`
            // readable bytes that outlive the call.
            unsafe { merge(state, bytes.as_ptr(), bytes.len(), m) }
        });
        if status == HG_PANIC {
            self.poisoned = Some(format!("merge_state: {msg}"));
        }
        describe_status(status, &msg, "merge_state").map_err(|m| self.err(m))?;
        // States saved before ABI 3 have no batch rows.
        if st.arrays.contains_key("batch_rows") {
            let rows = st.u8(&self.plugin.info.name, "batch_rows")?;
            let tables = decode_rows(rows, &self.plugin.tables)
                .map_err(|m| self.err(format!("merge_state: saved batch rows: {m}")))?;
            if self.batch_rows.len() != tables.len() {
                self.batch_rows = self.plugin.tables.iter().map(TableDesc::empty).collect();
            }
            append_rows(&mut self.batch_rows, tables);
        }
        Ok(())
    }
}

/// Appends `more`'s rows to `into`'s, table by table (both in the declared order).
fn append_rows(into: &mut [Table], more: Vec<Table>) {
    for (t, m) in into.iter_mut().zip(more) {
        t.rows.extend(m.rows);
    }
}

/// Cell tags of [`encode_rows`].
const CELL_INT: u8 = 1;
const CELL_FLOAT: u8 = 2;
const CELL_STR: u8 = 3;

/// Batch rows as bytes, exactly (floats by their bits): per table, a `u64` row count, then
/// each cell as a tag and its value (`i64`, `f64` bits, or a `u64` length and UTF-8), all
/// little-endian. The declared tables fix the columns, so they are not written.
fn encode_rows(tables: &[Table]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tables {
        out.extend((t.rows.len() as u64).to_le_bytes());
        for row in &t.rows {
            for cell in row {
                match cell {
                    Value::Int(i) => {
                        out.push(CELL_INT);
                        out.extend(i.to_le_bytes());
                    }
                    Value::Float(x) => {
                        out.push(CELL_FLOAT);
                        out.extend(x.to_bits().to_le_bytes());
                    }
                    Value::Str(s) => {
                        out.push(CELL_STR);
                        out.extend((s.len() as u64).to_le_bytes());
                        out.extend(s.as_bytes());
                    }
                }
            }
        }
    }
    out
}

/// Reads [`encode_rows`]'s bytes front to back.
struct Reader<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> std::result::Result<&'b [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn word(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// The inverse of [`encode_rows`] for the declared `tables`.
fn decode_rows(bytes: &[u8], tables: &[TableDesc]) -> std::result::Result<Vec<Table>, String> {
    let mut r = Reader { bytes, at: 0 };
    let mut out = Vec::with_capacity(tables.len());
    for desc in tables {
        let mut t = desc.empty();
        let n = r.word()? as usize;
        for _ in 0..n {
            let mut row = Vec::with_capacity(desc.columns.len());
            for _ in &desc.columns {
                let tag = r.take(1)?[0];
                let cell = match tag {
                    CELL_INT => Value::Int(r.word()? as i64),
                    CELL_FLOAT => Value::Float(f64::from_bits(r.word()?)),
                    CELL_STR => {
                        let len = r.word()? as usize;
                        let s = std::str::from_utf8(r.take(len)?)
                            .map_err(|_| "a string is not UTF-8".to_string())?;
                        Value::Str(s.to_string())
                    }
                    k => return Err(format!("unknown cell tag {k}")),
                };
                row.push(cell);
            }
            t.push(row);
        }
        out.push(t);
    }
    if r.at != bytes.len() {
        return Err(format!("{} bytes left over", bytes.len() - r.at));
    }
    Ok(out)
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
    fn batch_rows_round_trip_exactly() {
        let desc = TableDesc {
            name: "t".into(),
            columns: vec!["a".into(), "b".into(), "c".into()],
            score: None,
            nan: vec!["b".into()],
        };
        let mut t = desc.empty();
        t.push(vec![Value::Int(-3), Value::Float(f64::NAN), "é,x".into()]);
        t.push(vec![Value::Int(7), Value::Float(0.1), "".into()]);
        let bytes = encode_rows(std::slice::from_ref(&t));
        let back = decode_rows(&bytes, std::slice::from_ref(&desc)).unwrap();
        assert_eq!(back[0].rows.len(), 2);
        // The declared undefined-NaN column travels with the table, so the NaN is a value.
        assert_eq!(back[0].non_finite(), None);
        assert!(matches!(back[0].rows[0][1], Value::Float(x) if x.is_nan()));
        assert_eq!(back[0].rows[1], t.rows[1]);
        assert_eq!(back[0].rows[0][2], t.rows[0][2]);
        assert!(decode_rows(&bytes[..bytes.len() - 1], &[desc]).is_err());
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
