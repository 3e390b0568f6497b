//! The host callbacks a plugin calls during one of its calls: activations (only the hook
//! points it declared, only in `batch`), processed weights by TransformerLens name, token
//! text (ABI >= 3, the built-ins' decoding), and `emit_row` (in `batch` and
//! `finish_dataset`, checked against the declared tables).
//!
//! Owns: [`HostCtx`] (what one call may see) and the `extern "C"` callbacks, each behind
//! `catch_unwind` so a host panic never unwinds into the plugin. Must not: outlive the call
//! it serves; views it hands out point into the cache, the weights or copies it keeps.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use hookgraph_plugin::abi::*;
use ndarray::ArrayViewD;

use super::abi_check::{read_list, TableDesc};
use crate::hooks::ActivationCache;
use crate::model::Params;
use crate::output::{Table, Value};
use crate::tokenizer::GptTokenizer;

/// Which plugin function is being called; decides what the callbacks allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Begin,
    Batch,
    Finish,
}

/// What the host callbacks see during one plugin call (behind `host_ctx`).
pub(crate) struct HostCtx<'a> {
    pub(crate) phase: Phase,
    pub(crate) cache: Option<&'a ActivationCache>,
    /// The expanded hooks the plugin declared: the only activations it may read.
    pub(crate) allowed: Vec<String>,
    pub(crate) params: &'a Params,
    pub(crate) tables: &'a [TableDesc],
    /// The run's tokenizer: `token_text` decodes as `RunContext::token_text` does.
    pub(crate) tokenizer: Option<&'a GptTokenizer>,
    pub(crate) d_vocab: usize,
    /// A mutex, not a `RefCell`: the ABI lets a plugin call back from its own threads.
    pub(crate) state: Mutex<HostState<'a>>,
}

/// What callbacks accumulate during a call.
#[derive(Default)]
pub(crate) struct HostState<'a> {
    /// Processed weights by TL name, built on the first `get_weight`.
    pub(crate) weights: Option<HashMap<String, ArrayViewD<'a, f32>>>,
    /// Views already handed out, by (is_weight, name): asking twice gives the same memory.
    pub(crate) views: HashMap<(bool, String), HgTensorView>,
    /// Shapes and contiguous copies the views point into; boxed so they never move.
    pub(crate) shapes: Vec<Box<[usize]>>,
    pub(crate) copies: Vec<Box<[f32]>>,
    /// Rows emitted in this call (`batch` or `finish_dataset`), one table per declared one.
    pub(crate) tables: Vec<Table>,
    /// Token texts handed out, boxed so the pointers stay put while the map grows.
    pub(crate) texts: HashMap<u32, Box<str>>,
    /// The first row the host rejected, reported after the call.
    pub(crate) emit_error: Option<String>,
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
        if self.phase == Phase::Begin {
            return Err(format!(
                "row for table '{table}' emitted in begin_dataset (only batch and finish_dataset may emit)"
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
        let t = st
            .tables
            .get_mut(i)
            .ok_or("no table for this call (host error)")?;
        t.push(row);
        Ok(())
    }

    /// The text of `id` as a pointer and length into `texts`, valid for the call.
    fn token_text(&self, id: u32) -> std::result::Result<(*const u8, usize), HgStatus> {
        if id as usize >= self.d_vocab {
            return Err(HG_NOT_FOUND);
        }
        let mut st = self.state.lock().map_err(|_| HG_INVALID)?;
        let tokenizer = self.tokenizer;
        let text = st.texts.entry(id).or_insert_with(|| {
            tokenizer
                .map(|t| t.decode_one(id))
                .unwrap_or_default()
                .into_boxed_str()
        });
        Ok((text.as_ptr(), text.len()))
    }
}

/// Runs a callback body, never letting a host panic unwind into the plugin.
fn host_guard(f: impl FnOnce() -> HgStatus) -> HgStatus {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(HG_INVALID)
}

/// # Safety
/// Called by the plugin with the `host_ctx` of the current call.
unsafe fn host_ctx<'a>(p: *mut c_void) -> Option<&'a HostCtx<'a>> {
    // SAFETY: `host_ctx` is the HostCtx that `PluginAdapter::call` keeps alive for the call.
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

pub(crate) unsafe extern "C" fn host_get_activation(
    ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus {
    // SAFETY: forwarded from the plugin's call.
    unsafe { host_get_tensor(false, ctx, name, out) }
}

pub(crate) unsafe extern "C" fn host_get_weight(
    ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus {
    // SAFETY: forwarded from the plugin's call.
    unsafe { host_get_tensor(true, ctx, name, out) }
}

pub(crate) unsafe extern "C" fn host_token_text(
    ctx: *mut c_void,
    id: u32,
    out: *mut *const u8,
    out_len: *mut usize,
) -> HgStatus {
    host_guard(|| {
        // SAFETY: see `host_ctx`.
        let Some(ctx) = (unsafe { host_ctx(ctx) }) else {
            return HG_INVALID;
        };
        if out.is_null() || out_len.is_null() {
            return HG_INVALID;
        }
        match ctx.token_text(id) {
            Ok((p, n)) => {
                // SAFETY: both checked non-null; the plugin's slots for this callback.
                unsafe {
                    out.write(p);
                    out_len.write(n);
                }
                HG_OK
            }
            Err(s) => s,
        }
    })
}

pub(crate) unsafe extern "C" fn host_emit_row(
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
