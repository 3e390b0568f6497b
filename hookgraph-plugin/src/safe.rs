//! The safe Rust layer a plugin author programs against.
//!
//! Owns: the [`PluginMetric`] trait and the borrowed views of the host's call context
//! ([`Ctx`], [`BatchCtx`], [`TensorRef`], [`Emitter`]). Every raw pointer from the host is
//! checked and turned into a slice here, once, so plugin code has no `unsafe`. Must not:
//! export symbols or catch panics (that is [`crate::export`]'s job).
//!
//! Lifetimes carry the ABI's rule that views are valid only during the call: a [`TensorRef`]
//! borrows the context it came from, and the trait methods get the context by reference
//! for the call only, so a view cannot be kept in the metric's state.

use std::ffi::{c_char, CStr, CString};
use std::ops::Deref;

use crate::abi::{
    HgCallCtx, HgTensorView, HgValue, HG_DTYPE_F32, HG_DTYPE_U32, HG_INVALID, HG_NOT_FOUND, HG_OK,
    HG_VALUE_FLOAT, HG_VALUE_INT, HG_VALUE_STR,
};

/// A metric implemented as a plugin. One value per `[[metric]]` of a run: created from the
/// metric's options, then, for each dataset, `begin_dataset`, `batch` for every batch, and
/// `finish`. The host calls these one at a time.
///
/// Errors are plain strings: the runner reports them as
/// `plugin '<name>': <call> failed: <your text>`. A panic is caught and reported the same
/// way (`... panicked: <message>`), and the metric is not called again.
pub trait PluginMetric: Sized + Send + 'static {
    /// Builds the metric from its options: the `[[metric]]` table's other keys, as a JSON
    /// object (TOML integers, floats, strings, booleans, arrays and tables map one to one;
    /// dates become strings). Unknown keys are rejected by the host before this is called,
    /// using the options the plugin declares.
    fn new(options: &serde_json::Value) -> Result<Self, String>;

    /// Called before a dataset's first batch. The default does nothing.
    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        let _ = ctx;
        Ok(())
    }

    /// Called once per batch with that batch's activations. Rows may be emitted here too
    /// ([`BatchCtx::row`]): per-position rows need not pile up in the metric's state, and
    /// the runner keeps them exact under `--shard` and `--resume` itself.
    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String>;

    /// Called after the dataset's last batch: emit this dataset's rows into `out`.
    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String>;

    /// Set to `true`, with [`save_state`](Self::save_state) and
    /// [`merge_state`](Self::merge_state), to let the runner shard this metric (`--shard`,
    /// `runner merge`) and resume it (`--resume`). Without it the runner refuses both for
    /// this plugin, by name, and runs it unsharded as before.
    const PARTIAL_STATE: bool = false;

    /// The exact partial state since `begin_dataset`, as bytes in a format of your choosing:
    /// sums and counts, per-sequence rows; never means (a mean of shard means is not the
    /// mean). Must not change the metric.
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Err("this plugin has no partial state".into())
    }

    /// Adds a state [`save_state`](Self::save_state) made (same options and dataset) for
    /// the sequences right after those already seen. Called after `begin_dataset`; merging
    /// every shard's state in order, then `finish`, must give the unsharded rows.
    fn merge_state(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = state;
        Err("this plugin has no partial state".into())
    }
}

/// What every call may read: model dimensions, the selected heads, the dataset, and the
/// processed weights.
pub struct Ctx<'a> {
    raw: &'a HgCallCtx,
    heads: Vec<(usize, usize)>,
    lengths: &'a [usize],
    dataset: &'a str,
}

impl<'a> Ctx<'a> {
    /// Wraps the host's context, checking every pointer.
    ///
    /// # Safety
    /// `raw` must be a context the host passed to the current call: its pointers valid for
    /// the lengths it states, for the duration of the call.
    pub(crate) unsafe fn from_raw(raw: &'a HgCallCtx) -> Result<Self, String> {
        // SAFETY: the host guarantees `heads` points at `n_selected_heads` pairs.
        let heads = unsafe { slice_or_empty(raw.heads, raw.n_selected_heads) }
            .ok_or("host passed null selected heads")?
            .iter()
            .map(|h| (h.layer as usize, h.head as usize))
            .collect();
        // SAFETY: as above, `lengths` has `n_sequences` entries.
        let lengths = unsafe { slice_or_empty(raw.lengths, raw.n_sequences) }
            .ok_or("host passed null sequence lengths")?;
        let dataset = if raw.dataset.is_null() {
            ""
        } else {
            // SAFETY: a NUL-terminated string owned by the host for the call.
            unsafe { CStr::from_ptr(raw.dataset) }
                .to_str()
                .map_err(|_| "dataset name is not UTF-8")?
        };
        Ok(Ctx {
            raw,
            heads,
            lengths,
            dataset,
        })
    }

    pub fn n_layers(&self) -> usize {
        self.raw.n_layers
    }
    /// Heads per layer in the model (not the number selected).
    pub fn n_heads(&self) -> usize {
        self.raw.n_heads
    }
    pub fn d_model(&self) -> usize {
        self.raw.d_model
    }
    pub fn d_head(&self) -> usize {
        self.raw.d_head
    }
    pub fn d_vocab(&self) -> usize {
        self.raw.d_vocab
    }
    /// The BOS id; GPT-2 also right-pads with it.
    pub fn bos(&self) -> u32 {
        self.raw.bos
    }

    /// The selected heads as (layer, head), sorted.
    pub fn heads(&self) -> &[(usize, usize)] {
        &self.heads
    }

    /// The layers that have at least one selected head, ascending: the layers a `{layer}`
    /// hook template was expanded for.
    pub fn layers(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self.heads.iter().map(|&(l, _)| l).collect();
        out.dedup();
        out
    }

    /// The selected heads of one layer.
    pub fn heads_in_layer(&self, layer: usize) -> Vec<usize> {
        self.heads
            .iter()
            .filter(|&&(l, _)| l == layer)
            .map(|&(_, h)| h)
            .collect()
    }

    /// The dataset's name.
    pub fn dataset(&self) -> &str {
        self.dataset
    }
    pub fn n_sequences(&self) -> usize {
        self.raw.n_sequences
    }
    pub fn seq_len(&self) -> usize {
        self.raw.seq_len
    }
    /// Every sequence's length without right padding (positions from it on are padding).
    pub fn lengths(&self) -> &[usize] {
        self.lengths
    }

    /// The text of token `id`, exactly as the built-ins write it in their `token` columns
    /// (the run's tokenizer; empty when the run has none). For a per-position table's
    /// `token` column and for labels. Errors for an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Result<&str, String> {
        let f = self
            .raw
            .token_text
            .ok_or("token_text: not available from this host")?;
        let mut p: *const u8 = std::ptr::null();
        let mut n = 0usize;
        // SAFETY: callback and host_ctx from the host for this call; `p` and `n` are valid
        // places to write.
        match unsafe { f(self.raw.host_ctx, id, &mut p, &mut n) } {
            HG_OK => {}
            HG_NOT_FOUND => return Err(format!("token {id} is outside the vocabulary")),
            s => return Err(format!("token_text({id}): host returned status {s}")),
        }
        if n == 0 {
            return Ok("");
        }
        if p.is_null() {
            return Err(format!("token_text({id}): host returned null"));
        }
        // SAFETY: the host's `n` bytes, valid until this call returns, which the borrow of
        // `self` (the call's context) does not outlive.
        let bytes = unsafe { std::slice::from_raw_parts(p, n) };
        std::str::from_utf8(bytes).map_err(|_| format!("token_text({id}) is not UTF-8"))
    }

    /// The dataset's answers, `[correct, wrong]` per sequence (IOI's IO and S), for logit
    /// differences at the last real position; `None` for a dataset without answers.
    pub fn answers(&self) -> Option<&[[u32; 2]]> {
        if self.raw.answers.is_null() {
            return None;
        }
        // SAFETY: the host passes `2 * n_sequences` ids, valid for the call; `[u32; 2]` has
        // the alignment of `u32`.
        Some(unsafe {
            std::slice::from_raw_parts(self.raw.answers.cast::<[u32; 2]>(), self.raw.n_sequences)
        })
    }

    /// A processed weight by its TransformerLens state-dict name, e.g. `unembed.W_U`
    /// `[d_model, d_vocab]` or `blocks.3.attn.W_O` `[n_heads, d_head, d_model]`.
    pub fn weight(&self, name: &str) -> Result<TensorRef<'_, f32>, String> {
        self.tensor(self.raw.get_weight, "weight", name)
    }

    fn tensor<T: Dtype>(
        &self,
        get: Option<crate::abi::HgGetTensorFn>,
        what: &str,
        name: &str,
    ) -> Result<TensorRef<'_, T>, String> {
        let get = get.ok_or_else(|| format!("{what} '{name}': not available in this call"))?;
        let c_name = CString::new(name).map_err(|_| format!("{what} name '{name}' has a NUL"))?;
        let mut view = HgTensorView::EMPTY;
        // SAFETY: the callback and host_ctx come from the host for this call; `view` is a
        // valid place to write.
        let status = unsafe { get(self.raw.host_ctx, c_name.as_ptr(), &mut view) };
        match status {
            HG_OK => {}
            HG_NOT_FOUND if what == "activation" => {
                return Err(format!(
                    "activation '{name}' is not available (declare it in `hooks` of export_plugin!)"
                ))
            }
            HG_NOT_FOUND => return Err(format!("{what} '{name}' does not exist")),
            HG_INVALID => return Err(format!("{what} '{name}': not available in this call")),
            s => return Err(format!("{what} '{name}': host returned status {s}")),
        }
        // SAFETY: on HG_OK the host filled `view` with a tensor valid for this call, which is
        // what the returned borrow of `self` is limited to.
        unsafe { TensorRef::from_view(&view) }.map_err(|e| format!("{what} '{name}': {e}"))
    }
}

/// A batch: [`Ctx`] (through `Deref`) plus the batch's tokens and cached activations.
pub struct BatchCtx<'a> {
    ctx: Ctx<'a>,
    tokens: TensorRef<'a, u32>,
}

impl<'a> BatchCtx<'a> {
    /// # Safety
    /// As [`Ctx::from_raw`]; `raw.tokens` must be valid for the call.
    pub(crate) unsafe fn from_raw(raw: &'a HgCallCtx) -> Result<Self, String> {
        // SAFETY: forwarded from the caller.
        let ctx = unsafe { Ctx::from_raw(raw) }?;
        // SAFETY: the host's token view is valid for the call.
        let tokens =
            unsafe { TensorRef::from_view(&raw.tokens) }.map_err(|e| format!("tokens: {e}"))?;
        if tokens.ndim() != 2 {
            return Err(format!(
                "tokens have shape {:?}, not [batch, seq]",
                tokens.shape()
            ));
        }
        Ok(BatchCtx { ctx, tokens })
    }

    /// An activation by its TransformerLens hook name (`blocks.3.attn.hook_pattern`
    /// `[batch, head, q, k]`, `ln_final.hook_scale` `[batch, pos, 1]`, `logits`
    /// `[batch, pos, vocab]`, ...). Only the hook points the plugin declared are available.
    pub fn activation(&self, name: &str) -> Result<TensorRef<'_, f32>, String> {
        self.ctx
            .tensor(self.ctx.raw.get_activation, "activation", name)
    }

    /// The batch's token ids, `[batch, seq]`.
    pub fn tokens(&self) -> TensorRef<'_, u32> {
        self.tokens
    }

    /// Sequences in this batch.
    pub fn batch_size(&self) -> usize {
        self.tokens.shape()[0]
    }

    /// Index in the dataset of this batch's first sequence.
    pub fn first_sequence(&self) -> usize {
        self.ctx.raw.first_sequence
    }

    /// Appends a row to one of the declared tables now, one value per declared column (see
    /// [`Emitter::row`]). The runner keeps a dataset's batch rows in order and writes them
    /// before the rows `finish` emits.
    pub fn row(&self, table: &str, values: &[Value]) -> Result<(), String> {
        Emitter::new(self.ctx.raw).row(table, values)
    }

    /// Unpadded lengths of this batch's sequences.
    pub fn batch_lengths(&self) -> &[usize] {
        let start = self.first_sequence().min(self.lengths().len());
        let end = (start + self.batch_size()).min(self.lengths().len());
        &self.lengths()[start..end]
    }
}

impl<'a> Deref for BatchCtx<'a> {
    type Target = Ctx<'a>;
    fn deref(&self) -> &Ctx<'a> {
        &self.ctx
    }
}

/// Element types a [`TensorRef`] can hold.
pub trait Dtype: Copy + sealed::Sealed {
    #[doc(hidden)]
    const CODE: u32;
}
impl Dtype for f32 {
    const CODE: u32 = HG_DTYPE_F32;
}
impl Dtype for u32 {
    const CODE: u32 = HG_DTYPE_U32;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
}

/// A read-only, row-major tensor borrowed from the host for the current call.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a, T> {
    shape: &'a [usize],
    data: &'a [T],
}

impl<'a, T: Dtype> TensorRef<'a, T> {
    /// # Safety
    /// `view` must describe memory valid for `'a`.
    unsafe fn from_view(view: &HgTensorView) -> Result<Self, String> {
        if view.dtype != T::CODE {
            return Err(format!(
                "dtype code {} where {} was expected",
                view.dtype,
                T::CODE
            ));
        }
        // SAFETY: the host guarantees `shape` has `ndim` entries.
        let shape = unsafe { slice_or_empty(view.shape, view.ndim) }.ok_or("null shape")?;
        let len = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or("shape overflows")?;
        if len > 0 && (view.data.is_null() || !(view.data as *const T).is_aligned()) {
            return Err("null or misaligned data".into());
        }
        // SAFETY: the host guarantees `data` holds `len` elements of the stated dtype.
        let data = unsafe { slice_or_empty(view.data as *const T, len) }.ok_or("null data")?;
        Ok(TensorRef { shape, data })
    }
}

impl<'a, T: Copy> TensorRef<'a, T> {
    /// A view of plugin-owned memory (tests, or a plugin's own arrays); panics when `data`
    /// does not have `shape`'s length.
    pub fn from_parts(shape: &'a [usize], data: &'a [T]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?}"
        );
        TensorRef { shape, data }
    }
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// Every element, row-major.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Errors unless the shape is `expected`, naming both.
    pub fn expect_shape(&self, what: &str, expected: &[usize]) -> Result<(), String> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(format!(
                "{what} has shape {:?}, expected {expected:?}",
                self.shape
            ))
        }
    }

    /// Row-major offset of an index; panics when it is out of bounds.
    pub fn offset(&self, index: &[usize]) -> usize {
        assert_eq!(
            index.len(),
            self.shape.len(),
            "index {index:?} for shape {:?}",
            self.shape
        );
        let mut off = 0;
        for (&i, &d) in index.iter().zip(self.shape) {
            assert!(
                i < d,
                "index {index:?} out of bounds for shape {:?}",
                self.shape
            );
            off = off * d + i;
        }
        off
    }

    /// One element; panics when the index is out of bounds.
    pub fn at(&self, index: &[usize]) -> T {
        self.data[self.offset(index)]
    }

    /// The contiguous run of the last axis at `prefix` (all but the last index), e.g. a
    /// `d_head` vector of `hook_v[b, k, h, :]`.
    pub fn lane(&self, prefix: &[usize]) -> &'a [T] {
        let last = *self.shape.last().expect("lane of a 0-d tensor");
        let mut index = prefix.to_vec();
        index.push(0);
        let start = self.offset(&index);
        &self.data[start..start + last]
    }
}

/// One table cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Str(String),
}

macro_rules! value_from {
    ($($t:ty => $v:ident as $as:ty),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x as $as)
            }
        }
    )*};
}
value_from!(i64 => Int as i64, i32 => Int as i64, u32 => Int as i64, usize => Int as i64,
            f64 => Float as f64, f32 => Float as f64);
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

/// Where `finish` (and, through [`BatchCtx::row`], `batch`) writes rows: each row goes to
/// the host at once, which copies it.
pub struct Emitter<'a> {
    raw: &'a HgCallCtx,
}

impl<'a> Emitter<'a> {
    pub(crate) fn new(raw: &'a HgCallCtx) -> Self {
        Emitter { raw }
    }

    /// Appends a row to one of the declared tables, one value per declared column.
    pub fn row(&mut self, table: &str, values: &[Value]) -> Result<(), String> {
        let emit = self
            .raw
            .emit_row
            .ok_or("rows can be emitted only from batch and finish")?;
        let c_table = CString::new(table).map_err(|_| format!("table name '{table}' has a NUL"))?;
        // The CStrings must outlive the call: collect them first, then point at them.
        let strings: Vec<Option<CString>> = values
            .iter()
            .map(|v| match v {
                Value::Str(s) => CString::new(s.as_str())
                    .map(Some)
                    .map_err(|_| format!("table '{table}': a string value has a NUL: {s:?}")),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let cells: Vec<HgValue> = values
            .iter()
            .zip(&strings)
            .map(|(v, s)| {
                let mut cell = HgValue {
                    kind: 0,
                    int: 0,
                    float: 0.0,
                    str: std::ptr::null(),
                };
                match v {
                    Value::Int(i) => {
                        cell.kind = HG_VALUE_INT;
                        cell.int = *i;
                    }
                    Value::Float(f) => {
                        cell.kind = HG_VALUE_FLOAT;
                        cell.float = *f;
                    }
                    Value::Str(_) => {
                        cell.kind = HG_VALUE_STR;
                        cell.str = s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                    }
                }
                cell
            })
            .collect();
        // SAFETY: callback and host_ctx from the host for this call; `cells` and the strings
        // it points into live until after the call returns.
        let status = unsafe {
            emit(
                self.raw.host_ctx,
                c_table.as_ptr(),
                cells.as_ptr(),
                cells.len(),
            )
        };
        match status {
            HG_OK => Ok(()),
            _ => Err(format!(
                "the host rejected a row of table '{table}' ({} values; is the table declared with that many columns?)",
                values.len()
            )),
        }
    }
}

/// A slice from a host pointer and length; `None` for a null pointer with a non-zero length.
///
/// # Safety
/// When non-null, `ptr` must point at `len` initialised `T`s valid for `'a`.
unsafe fn slice_or_empty<'a, T>(ptr: *const T, len: usize) -> Option<&'a [T]> {
    if len == 0 {
        Some(&[])
    } else if ptr.is_null() {
        None
    } else {
        // SAFETY: forwarded from the caller.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

/// Reads a C string from the descriptor side (host-provided), for the export layer.
///
/// # Safety
/// `ptr` must be null or a NUL-terminated string valid for the call.
pub(crate) unsafe fn c_str<'a>(ptr: *const c_char) -> Result<&'a str, String> {
    if ptr.is_null() {
        return Err("null string".into());
    }
    // SAFETY: forwarded from the caller.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| "string is not UTF-8".into())
}
