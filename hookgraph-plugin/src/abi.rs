//! The raw C ABI between the runner (host) and a metric plugin.
//!
//! Owns: every `#[repr(C)]` type, constant and function-pointer type that crosses the
//! boundary, and nothing else. Must not: contain logic, or any Rust-only type (`String`,
//! `Vec`, `&str`, slices, trait objects): both sides may be built by different compilers,
//! each with its own allocator and its own copy of `std`.
//!
//! Plugin authors writing Rust never touch this module: [`crate::export_plugin!`] and the
//! safe layer ([`crate::PluginMetric`]) produce and consume it. It is public so the host can
//! read it, and so a plugin can be written in another language (C, C++, Zig) from this file.
//!
//! The contract, in short (the crate docs have the full table):
//! - the library exports one symbol, [`HG_DESCRIPTOR_SYMBOL`], a function returning a pointer
//!   to a static [`HgPluginDescriptor`] that stays valid while the library is loaded;
//! - its first 16 bytes, [`HgPluginHeader`], never change layout: the host checks `magic`,
//!   then `abi_version` (which must equal [`HG_PLUGIN_ABI_VERSION`]), then `struct_size`,
//!   before it reads anything else or calls any other function;
//! - strings are NUL-terminated UTF-8 (`*const c_char`), lists are pointer + length;
//! - whoever allocates frees: the host owns tensor views, the call context and message
//!   buffers; the plugin owns its descriptor and its state (freed by `destroy`); rows the
//!   plugin emits are copied by the host before `emit_row` returns;
//! - no function may unwind across the boundary: plugin functions catch panics and return
//!   [`HG_PANIC`] with the panic message in the host's [`HgMessage`] buffer.

use std::ffi::{c_char, c_void};

/// `b"HGPLUGIN"` read as a little-endian u64: the first field of every descriptor.
pub const HG_PLUGIN_MAGIC: u64 = u64::from_le_bytes(*b"HGPLUGIN");

/// The ABI version this crate speaks. Any change to a `#[repr(C)]` type or a function
/// signature below bumps it, and only by appending (a field at the end of a struct, never
/// in the middle of one, never in an array's element type). Version 2 appended
/// `save_state` / `merge_state` (partial state, for sharded and resumable runs) to
/// [`HgPluginDescriptor`]. Version 3 appended `ctx_size`, `token_text` and `answers` to the
/// host-owned [`HgCallCtx`] (older plugins read its first fields only), lets `emit_row`
/// work in `batch` too, and appended `undefined_nan` / `n_undefined_nan` to the descriptor.
pub const HG_PLUGIN_ABI_VERSION: u32 = 3;

/// The oldest ABI version a host of this crate still loads: a version-1 plugin (no partial
/// state) runs as before, and is refused by name for `--shard` and `--resume`.
pub const HG_PLUGIN_ABI_MIN_VERSION: u32 = 1;

/// The one exported symbol: `extern "C" fn() -> *const HgPluginDescriptor` (type
/// [`HgDescriptorFn`]). Its signature is part of the stable header and never changes.
pub const HG_DESCRIPTOR_SYMBOL: &str = "hookgraph_plugin_descriptor";

/// Status code returned by every plugin function and host callback.
pub type HgStatus = i32;
/// Success.
pub const HG_OK: HgStatus = 0;
/// The plugin returned an error; the message buffer holds its text.
pub const HG_ERROR: HgStatus = 1;
/// The plugin panicked (caught before the boundary); the message buffer holds the panic text.
pub const HG_PANIC: HgStatus = 2;
/// Host callback: no such activation or weight (or the plugin did not declare that hook).
pub const HG_NOT_FOUND: HgStatus = 3;
/// Bad arguments: a null pointer, invalid UTF-8, an undeclared table, a wrong row length, a
/// callback used outside the call it belongs to.
pub const HG_INVALID: HgStatus = 4;

/// `HgTensorView::dtype`: little-endian `f32` (activations and weights).
pub const HG_DTYPE_F32: u32 = 1;
/// `HgTensorView::dtype`: `u32` (token ids).
pub const HG_DTYPE_U32: u32 = 2;

/// `HgValue::kind`: the value is `int`.
pub const HG_VALUE_INT: u32 = 1;
/// `HgValue::kind`: the value is `float`.
pub const HG_VALUE_FLOAT: u32 = 2;
/// `HgValue::kind`: the value is `str` (NUL-terminated UTF-8, copied by the host).
pub const HG_VALUE_STR: u32 = 3;

/// The fixed first 16 bytes of every descriptor, of every ABI version. The host reads only
/// this until all three fields check out.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HgPluginHeader {
    /// Must be [`HG_PLUGIN_MAGIC`].
    pub magic: u64,
    /// Must be [`HG_PLUGIN_ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<HgPluginDescriptor>()` as the plugin was compiled.
    pub struct_size: u32,
}

/// One output table the plugin may emit rows into.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HgTableDesc {
    /// File stem of the CSV (`attention_entropy` -> `attention_entropy.csv`).
    pub name: *const c_char,
    pub columns: *const *const c_char,
    pub n_columns: usize,
    /// For a per-head table (it has `layer` and `head` columns): the headline column the
    /// summary and heatmaps show. Null otherwise.
    pub score_column: *const c_char,
}

/// A column of a declared table where NaN means "undefined here" (a 0/0 the metric counts,
/// e.g. the last position's attribution, which has no next token), not a failure. The
/// runner fails a metric whose table holds any other NaN or infinity.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HgColumnRef {
    pub table: *const c_char,
    pub column: *const c_char,
}

/// One option the plugin accepts (keys of its `[[metric]]` table besides `plugin`/`name`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HgOptionDesc {
    pub name: *const c_char,
    pub description: *const c_char,
}

/// A host-owned buffer the plugin writes an error or panic message into (UTF-8, truncated to
/// `cap` bytes at a character boundary, no NUL needed); the plugin sets `len`. Nothing to free.
#[repr(C)]
#[derive(Debug)]
pub struct HgMessage {
    pub buf: *mut u8,
    pub cap: usize,
    pub len: usize,
}

/// A read-only, C-contiguous (row-major) tensor owned by the host, valid only until the call
/// that produced it returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HgTensorView {
    pub data: *const c_void,
    pub shape: *const usize,
    pub ndim: usize,
    /// [`HG_DTYPE_F32`] or [`HG_DTYPE_U32`].
    pub dtype: u32,
}

impl HgTensorView {
    /// No tensor (null data, zero dimensions).
    pub const EMPTY: HgTensorView = HgTensorView {
        data: std::ptr::null(),
        shape: std::ptr::null(),
        ndim: 0,
        dtype: 0,
    };
}

/// A selected attention head.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HgHead {
    pub layer: u32,
    pub head: u32,
}

/// One table cell. A tagged struct rather than a union: only the field named by `kind` is
/// read.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HgValue {
    /// [`HG_VALUE_INT`], [`HG_VALUE_FLOAT`] or [`HG_VALUE_STR`].
    pub kind: u32,
    pub int: i64,
    pub float: f64,
    pub str: *const c_char,
}

/// `get_activation` / `get_weight`: fills `out` with a view of the named tensor.
/// Returns [`HG_OK`], [`HG_NOT_FOUND`] or [`HG_INVALID`].
pub type HgGetTensorFn = unsafe extern "C" fn(
    host_ctx: *mut c_void,
    name: *const c_char,
    out: *mut HgTensorView,
) -> HgStatus;

/// `token_text` (ABI >= 3): the text of token `id` as the run's tokenizer decodes it, the
/// same text the built-ins write in their `token` columns (empty when the run has no
/// tokenizer). Writes a pointer to UTF-8 bytes (not NUL-terminated) and their length into
/// `out` / `out_len`; the bytes are the host's, valid until the call that got them returns.
/// Returns [`HG_OK`], or [`HG_NOT_FOUND`] for an id outside the vocabulary.
pub type HgTokenTextFn = unsafe extern "C" fn(
    host_ctx: *mut c_void,
    id: u32,
    out: *mut *const u8,
    out_len: *mut usize,
) -> HgStatus;

/// `emit_row`: appends one row (`n_values` cells, one per declared column) to `table`. The
/// host copies everything before returning. Returns [`HG_OK`] or [`HG_INVALID`].
pub type HgEmitRowFn = unsafe extern "C" fn(
    host_ctx: *mut c_void,
    table: *const c_char,
    values: *const HgValue,
    n_values: usize,
) -> HgStatus;

/// Everything a plugin call may read, owned by the host and valid only during the call.
///
/// `tokens`, `first_sequence` and `get_activation` are for `batch` only (outside it the view
/// is [`HgTensorView::EMPTY`] and the callback returns [`HG_INVALID`]); `emit_row` works in
/// `batch` (ABI >= 3) and `finish_dataset`; `get_weight` and `token_text` work in all three
/// calls.
///
/// The host owns and allocates this struct, so it grows by appending: a plugin of version
/// `v` reads only the fields of version `v` (the host never loads a plugin newer than
/// itself, so they are always there), and `ctx_size` tells a plugin how much a newer host
/// passed.
#[repr(C)]
#[derive(Debug)]
pub struct HgCallCtx {
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_model: usize,
    pub d_head: usize,
    pub d_vocab: usize,
    /// BOS id; GPT-2 also right-pads with it.
    pub bos: u32,
    /// The selected heads, sorted by (layer, head).
    pub heads: *const HgHead,
    pub n_selected_heads: usize,
    /// The dataset's name (NUL-terminated UTF-8).
    pub dataset: *const c_char,
    pub n_sequences: usize,
    pub seq_len: usize,
    /// `n_sequences` unpadded lengths (everything from `lengths[i]` on is right padding).
    pub lengths: *const usize,
    /// `[batch, seq]` token ids ([`HG_DTYPE_U32`]).
    pub tokens: HgTensorView,
    /// Index in the dataset of the batch's first sequence.
    pub first_sequence: usize,
    /// Opaque; passed back to the callbacks.
    pub host_ctx: *mut c_void,
    pub get_activation: Option<HgGetTensorFn>,
    pub get_weight: Option<HgGetTensorFn>,
    pub emit_row: Option<HgEmitRowFn>,
    // ---- ABI >= 3 (appended; a version-1 or -2 plugin never reads past `emit_row`) ----
    /// `size_of::<HgCallCtx>()` as the host was compiled: at least the version-3 size.
    pub ctx_size: usize,
    /// Token text for `token` columns and labels (all three calls).
    pub token_text: Option<HgTokenTextFn>,
    /// The dataset's answers, `2 * n_sequences` ids (`[correct, wrong]` per sequence, as
    /// IOI has them), or null for a dataset without answers.
    pub answers: *const u32,
}

/// `create`: parses `options_json` (a JSON object, NUL-terminated) and stores a new state in
/// `*state_out`. On failure writes `msg` and leaves `*state_out` untouched.
pub type HgCreateFn = unsafe extern "C" fn(
    options_json: *const c_char,
    state_out: *mut *mut c_void,
    msg: *mut HgMessage,
) -> HgStatus;

/// `begin_dataset`, `batch`, `finish_dataset`.
pub type HgCallFn = unsafe extern "C" fn(
    state: *mut c_void,
    ctx: *const HgCallCtx,
    msg: *mut HgMessage,
) -> HgStatus;

/// `destroy`: frees a state from `create`. Never fails (a panic inside is swallowed).
pub type HgDestroyFn = unsafe extern "C" fn(state: *mut c_void);

/// Where `save_state` writes its bytes: `write(sink, data, len)` appends `len` bytes (the
/// host copies them before returning). Host-owned, valid only during the call.
#[repr(C)]
#[derive(Debug)]
pub struct HgStateSink {
    pub sink: *mut c_void,
    pub write:
        Option<unsafe extern "C" fn(sink: *mut c_void, data: *const u8, len: usize) -> HgStatus>,
}

/// `save_state` (ABI >= 2): writes the exact partial state accumulated since
/// `begin_dataset` (sums, counts, rows: never means) into `sink`, in a format of the
/// plugin's choosing. It must not change the state.
pub type HgSaveStateFn = unsafe extern "C" fn(
    state: *mut c_void,
    sink: *const HgStateSink,
    msg: *mut HgMessage,
) -> HgStatus;

/// `merge_state` (ABI >= 2): adds a state `save_state` wrote (same plugin and options, same
/// dataset, for the sequences right after those already seen) to `state`. Into a state
/// fresh from `begin_dataset` it restores it. `data` is host-owned, valid for the call.
pub type HgMergeStateFn = unsafe extern "C" fn(
    state: *mut c_void,
    data: *const u8,
    len: usize,
    msg: *mut HgMessage,
) -> HgStatus;

/// The type of the exported [`HG_DESCRIPTOR_SYMBOL`]. Null means the plugin could not build
/// its descriptor (e.g. a NUL inside a name).
pub type HgDescriptorFn = unsafe extern "C" fn() -> *const HgPluginDescriptor;

/// What a plugin is and how to call it. Lives as long as the library is loaded.
#[repr(C)]
#[derive(Debug)]
pub struct HgPluginDescriptor {
    /// Checked before anything else.
    pub header: HgPluginHeader,
    pub name: *const c_char,
    pub version: *const c_char,
    pub description: *const c_char,
    /// Hook points the metric reads: templates with `{layer}` (expanded by the host for every
    /// layer that has selected heads) or fixed names (`ln_final.hook_scale`, `logits`).
    pub hooks: *const *const c_char,
    pub n_hooks: usize,
    pub tables: *const HgTableDesc,
    pub n_tables: usize,
    pub options: *const HgOptionDesc,
    pub n_options: usize,
    pub create: Option<HgCreateFn>,
    pub begin_dataset: Option<HgCallFn>,
    pub batch: Option<HgCallFn>,
    pub finish_dataset: Option<HgCallFn>,
    pub destroy: Option<HgDestroyFn>,
    /// ABI >= 2. Both null: the plugin has no partial state (it cannot be sharded or
    /// resumed); both set: it can. One without the other is rejected.
    pub save_state: Option<HgSaveStateFn>,
    pub merge_state: Option<HgMergeStateFn>,
    /// ABI >= 3: the columns where NaN is an undefined value (see [`HgColumnRef`]).
    pub undefined_nan: *const HgColumnRef,
    pub n_undefined_nan: usize,
}

/// How many bytes of [`HgPluginDescriptor`] a plugin built for ABI `version` defines. Every
/// version only appends fields (the prefix-type idea of abi_stable), so an older plugin's
/// descriptor is a prefix of the current one, read without a copy of its struct: version 1
/// ends before the partial-state functions, version 2 before the undefined-NaN columns.
pub const fn descriptor_len(version: u32) -> usize {
    match version {
        1 => std::mem::offset_of!(HgPluginDescriptor, save_state),
        2 => std::mem::offset_of!(HgPluginDescriptor, undefined_nan),
        _ => std::mem::size_of::<HgPluginDescriptor>(),
    }
}

/// A descriptor of ABI `version` in the current layout: its first
/// [`descriptor_len`]`(version)` bytes, and null, `None` or 0 for every field appended since.
///
/// # Safety
/// `desc` must point to at least `descriptor_len(version)` readable bytes laid out as this
/// crate's descriptor (a plugin built for `version`).
pub unsafe fn read_descriptor(desc: *const HgPluginDescriptor, version: u32) -> HgPluginDescriptor {
    let mut out = std::mem::MaybeUninit::<HgPluginDescriptor>::zeroed();
    // SAFETY: the caller guarantees the bytes; all-zero is a valid value of every field
    // (raw pointers, `Option` of functions, integers), so the fields not copied are too.
    unsafe {
        std::ptr::copy_nonoverlapping(
            desc.cast::<u8>(),
            out.as_mut_ptr().cast::<u8>(),
            descriptor_len(version),
        );
        out.assume_init()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sixteen_bytes_and_first() {
        assert_eq!(std::mem::size_of::<HgPluginHeader>(), 16);
        assert_eq!(std::mem::offset_of!(HgPluginDescriptor, header), 0);
        assert_eq!(&HG_PLUGIN_MAGIC.to_le_bytes(), b"HGPLUGIN");
    }

    #[test]
    fn version_3_only_appends_to_the_call_context() {
        use std::mem::offset_of;
        // The version-2 context ended with `emit_row`: everything new comes after it.
        assert!(offset_of!(HgCallCtx, ctx_size) > offset_of!(HgCallCtx, emit_row));
        assert!(offset_of!(HgCallCtx, token_text) > offset_of!(HgCallCtx, ctx_size));
        assert!(offset_of!(HgCallCtx, answers) > offset_of!(HgCallCtx, token_text));
        assert_eq!(
            offset_of!(HgCallCtx, emit_row) + std::mem::size_of::<usize>(),
            offset_of!(HgCallCtx, ctx_size)
        );
    }

    #[test]
    fn older_descriptors_are_prefixes_ending_where_their_fields_ended() {
        use std::mem::{offset_of, size_of};
        // Version 1 ended with `destroy`, version 2 with `merge_state` (both pointer-sized,
        // so no padding after them): the prefixes end right after those fields.
        let ptr = size_of::<usize>();
        assert_eq!(
            descriptor_len(1),
            offset_of!(HgPluginDescriptor, destroy) + ptr
        );
        assert_eq!(
            descriptor_len(2),
            offset_of!(HgPluginDescriptor, merge_state) + ptr
        );
        assert_eq!(descriptor_len(3), size_of::<HgPluginDescriptor>());
        assert!(descriptor_len(1) < descriptor_len(2) && descriptor_len(2) < descriptor_len(3));
    }
}
