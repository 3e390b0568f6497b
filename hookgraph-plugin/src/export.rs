//! What [`crate::export_plugin!`] expands to: the descriptor and the `extern "C"` trampolines.
//!
//! Owns: turning a [`PluginMeta`] into a static [`HgPluginDescriptor`], and the generic
//! trampolines that call a [`PluginMetric`] from the host, each behind `catch_unwind` so no
//! panic unwinds across the boundary (that would abort the runner). Must not: be called by
//! plugin code directly; the macro is the interface.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

use crate::abi::*;
use crate::safe::{c_str, BatchCtx, Ctx, Emitter};
use crate::PluginMetric;

/// A plugin's metadata as the macro writes it: plain `&'static str`s.
#[derive(Debug)]
pub struct PluginMeta {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub hooks: &'static [&'static str],
    pub tables: &'static [TableMeta],
    pub options: &'static [(&'static str, &'static str)],
}

/// One output table in [`PluginMeta`].
#[derive(Debug)]
pub struct TableMeta {
    pub name: &'static str,
    pub columns: &'static [&'static str],
    /// The headline column of a per-head table.
    pub score: Option<&'static str>,
    /// Columns where NaN means "undefined here", not a failure (ABI >= 3).
    pub nan: &'static [&'static str],
}

/// Owns the C strings and arrays a descriptor points into, so the pointers stay valid for as
/// long as the holder (a `static`, hence the library) lives.
pub struct DescriptorHolder {
    desc: HgPluginDescriptor,
    _strings: Vec<CString>,
    _hooks: Vec<*const c_char>,
    _columns: Vec<Vec<*const c_char>>,
    _tables: Vec<HgTableDesc>,
    _options: Vec<HgOptionDesc>,
    _undefined_nan: Vec<HgColumnRef>,
}

// SAFETY: the holder is immutable once built and everything its pointers reach is owned by
// it (heap buffers that never move), so sharing it between threads is sound.
unsafe impl Send for DescriptorHolder {}
// SAFETY: as above.
unsafe impl Sync for DescriptorHolder {}

impl DescriptorHolder {
    fn build<M: PluginMetric>(meta: &PluginMeta) -> Result<Self, String> {
        let mut strings = Vec::new();
        // A CString's buffer is on the heap: moving the CString into `strings` keeps the
        // pointer valid.
        let mut c = |s: &str| -> Result<*const c_char, String> {
            let cs = CString::new(s).map_err(|_| format!("metadata string {s:?} has a NUL"))?;
            let p = cs.as_ptr();
            strings.push(cs);
            Ok(p)
        };
        let name = c(meta.name)?;
        let version = c(meta.version)?;
        let description = c(meta.description)?;
        let hooks: Vec<*const c_char> =
            meta.hooks.iter().map(|h| c(h)).collect::<Result<_, _>>()?;
        let columns: Vec<Vec<*const c_char>> = meta
            .tables
            .iter()
            .map(|t| t.columns.iter().map(|col| c(col)).collect())
            .collect::<Result<_, _>>()?;
        let mut tables = Vec::new();
        for (t, cols) in meta.tables.iter().zip(&columns) {
            tables.push(HgTableDesc {
                name: c(t.name)?,
                columns: cols.as_ptr(),
                n_columns: cols.len(),
                score_column: match t.score {
                    Some(s) => c(s)?,
                    None => std::ptr::null(),
                },
            });
        }
        let options: Vec<HgOptionDesc> = meta
            .options
            .iter()
            .map(|(n, d)| {
                Ok(HgOptionDesc {
                    name: c(n)?,
                    description: c(d)?,
                })
            })
            .collect::<Result<_, String>>()?;
        let mut undefined_nan = Vec::new();
        for t in meta.tables {
            for col in t.nan {
                undefined_nan.push(HgColumnRef {
                    table: c(t.name)?,
                    column: c(col)?,
                });
            }
        }
        let desc = HgPluginDescriptor {
            header: HgPluginHeader {
                magic: HG_PLUGIN_MAGIC,
                abi_version: HG_PLUGIN_ABI_VERSION,
                struct_size: std::mem::size_of::<HgPluginDescriptor>() as u32,
            },
            name,
            version,
            description,
            hooks: hooks.as_ptr(),
            n_hooks: hooks.len(),
            tables: tables.as_ptr(),
            n_tables: tables.len(),
            options: options.as_ptr(),
            n_options: options.len(),
            create: Some(create::<M>),
            begin_dataset: Some(begin_dataset::<M>),
            batch: Some(batch::<M>),
            finish_dataset: Some(finish_dataset::<M>),
            destroy: Some(destroy::<M>),
            save_state: if M::PARTIAL_STATE {
                Some(save_state::<M>)
            } else {
                None
            },
            merge_state: if M::PARTIAL_STATE {
                Some(merge_state::<M>)
            } else {
                None
            },
            undefined_nan: undefined_nan.as_ptr(),
            n_undefined_nan: undefined_nan.len(),
        };
        Ok(DescriptorHolder {
            desc,
            _strings: strings,
            _hooks: hooks,
            _columns: columns,
            _tables: tables,
            _options: options,
            _undefined_nan: undefined_nan,
        })
    }
}

/// The body of the exported descriptor function: builds the descriptor once, or returns null
/// if the metadata cannot be expressed (a NUL in a string), never unwinding.
pub fn descriptor<M: PluginMetric>(
    meta: &'static PluginMeta,
    cell: &'static OnceLock<Option<DescriptorHolder>>,
) -> *const HgPluginDescriptor {
    let holder = catch_unwind(AssertUnwindSafe(|| {
        cell.get_or_init(|| DescriptorHolder::build::<M>(meta).ok())
            .as_ref()
    }));
    match holder {
        Ok(Some(h)) => &h.desc,
        _ => std::ptr::null(),
    }
}

thread_local! {
    /// Whether this thread is inside a call from the host (see [`guard`]).
    static IN_HOST_CALL: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic inside a host call happened.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that, for panics inside a host call, records the location
/// for the error message instead of printing to the runner's stderr; the runner reports the
/// panic itself. Other panics (e.g. in the plugin's own threads), and every panic when
/// `RUST_BACKTRACE` is set, still go to the previous hook. Each Rust cdylib has its own
/// `std`, so this hook is the plugin's alone and never touches the runner's.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            if IN_HOST_CALL.with(Cell::get) {
                let at = info.location().map(|l| l.to_string());
                PANIC_LOCATION.with(|p| *p.borrow_mut() = at);
                if !backtrace {
                    return;
                }
            }
            previous(info)
        }));
    });
}

/// Runs `f`, turning an error or a panic into a status code and a message for the host.
fn guard(msg: *mut HgMessage, f: impl FnOnce() -> Result<(), String>) -> HgStatus {
    install_panic_hook();
    let outer = IN_HOST_CALL.with(|c| c.replace(true));
    PANIC_LOCATION.with(|p| p.borrow_mut().take());
    let result = catch_unwind(AssertUnwindSafe(f));
    IN_HOST_CALL.with(|c| c.set(outer));
    match result {
        Ok(Ok(())) => HG_OK,
        Ok(Err(e)) => {
            write_message(msg, &e);
            HG_ERROR
        }
        Err(payload) => {
            let mut text = panic_message(payload.as_ref());
            if let Some(at) = PANIC_LOCATION.with(|p| p.borrow_mut().take()) {
                text = format!("{text} (at {at})");
            }
            write_message(msg, &text);
            // Dropping a payload can itself panic (a payload whose Drop panics); forget it.
            std::mem::forget(payload);
            HG_PANIC
        }
    }
}

/// The text of a panic: `panic!("...")` payloads are `&str` or `String`.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic with a non-string payload)".to_string()
    }
}

/// Copies `text` into the host's buffer, truncated at a character boundary.
fn write_message(msg: *mut HgMessage, text: &str) {
    if msg.is_null() {
        return;
    }
    // SAFETY: the host passes a valid HgMessage whose buffer has `cap` writable bytes.
    let m = unsafe { &mut *msg };
    if m.buf.is_null() {
        m.len = 0;
        return;
    }
    let mut n = text.len().min(m.cap);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    // SAFETY: `n <= cap` bytes into a host buffer of `cap` bytes; the regions cannot overlap.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), m.buf, n) };
    m.len = n;
}

/// The state behind the opaque pointer.
///
/// # Safety
/// `state` must come from `create::<M>` and not have been destroyed.
unsafe fn state<'a, M>(state: *mut c_void) -> Result<&'a mut M, String> {
    if state.is_null() {
        return Err("host passed a null state".into());
    }
    // SAFETY: forwarded from the caller; the host serialises calls on one state.
    Ok(unsafe { &mut *(state as *mut M) })
}

fn ctx_ref<'a>(ctx: *const HgCallCtx) -> Result<&'a HgCallCtx, String> {
    // SAFETY: the host passes a context valid for the call, or null (checked).
    unsafe { ctx.as_ref() }.ok_or_else(|| "host passed a null context".to_string())
}

unsafe extern "C" fn create<M: PluginMetric>(
    options_json: *const c_char,
    state_out: *mut *mut c_void,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        if state_out.is_null() {
            return Err("host passed a null state_out".into());
        }
        // SAFETY: a NUL-terminated string from the host, valid for the call.
        let text = unsafe { c_str(options_json) }.map_err(|e| format!("options: {e}"))?;
        let options: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("options are not JSON: {e}"))?;
        let metric = M::new(&options)?;
        // SAFETY: checked non-null above; the host gives a writable slot.
        unsafe { *state_out = Box::into_raw(Box::new(metric)) as *mut c_void };
        Ok(())
    })
}

unsafe extern "C" fn begin_dataset<M: PluginMetric>(
    st: *mut c_void,
    ctx: *const HgCallCtx,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        // SAFETY: `st` is from create::<M> (host contract).
        let m = unsafe { state::<M>(st) }?;
        // SAFETY: the host's context, valid for this call.
        let c = unsafe { Ctx::from_raw(ctx_ref(ctx)?) }?;
        m.begin_dataset(&c)
    })
}

unsafe extern "C" fn batch<M: PluginMetric>(
    st: *mut c_void,
    ctx: *const HgCallCtx,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        // SAFETY: `st` is from create::<M> (host contract).
        let m = unsafe { state::<M>(st) }?;
        // SAFETY: the host's context, valid for this call.
        let c = unsafe { BatchCtx::from_raw(ctx_ref(ctx)?) }?;
        m.batch(&c)
    })
}

unsafe extern "C" fn finish_dataset<M: PluginMetric>(
    st: *mut c_void,
    ctx: *const HgCallCtx,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        // SAFETY: `st` is from create::<M> (host contract).
        let m = unsafe { state::<M>(st) }?;
        let raw = ctx_ref(ctx)?;
        // SAFETY: the host's context, valid for this call.
        let c = unsafe { Ctx::from_raw(raw) }?;
        m.finish(&c, &mut Emitter::new(raw))
    })
}

unsafe extern "C" fn save_state<M: PluginMetric>(
    st: *mut c_void,
    sink: *const HgStateSink,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        // SAFETY: `st` is from create::<M> (host contract).
        let m = unsafe { state::<M>(st) }?;
        // SAFETY: the host passes a sink valid for the call, or null (checked).
        let sink = unsafe { sink.as_ref() }.ok_or("host passed a null state sink")?;
        let write = sink
            .write
            .ok_or("host passed a state sink without `write`")?;
        let bytes = m.save_state()?;
        // SAFETY: the host's callback and sink, with a buffer of `bytes.len()` bytes.
        match unsafe { write(sink.sink, bytes.as_ptr(), bytes.len()) } {
            HG_OK => Ok(()),
            s => Err(format!(
                "the host refused the state ({} bytes): status {s}",
                bytes.len()
            )),
        }
    })
}

unsafe extern "C" fn merge_state<M: PluginMetric>(
    st: *mut c_void,
    data: *const u8,
    len: usize,
    msg: *mut HgMessage,
) -> HgStatus {
    guard(msg, || {
        // SAFETY: `st` is from create::<M> (host contract).
        let m = unsafe { state::<M>(st) }?;
        let bytes: &[u8] = if len == 0 {
            &[]
        } else if data.is_null() {
            return Err("host passed a null state".into());
        } else {
            // SAFETY: the host passes `len` readable bytes, valid for the call.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        m.merge_state(bytes)
    })
}

unsafe extern "C" fn destroy<M: PluginMetric>(st: *mut c_void) {
    if st.is_null() {
        return;
    }
    // A panicking Drop must not unwind into the host; the state is gone either way.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `st` came from Box::into_raw in create::<M> and is destroyed once.
        drop(unsafe { Box::from_raw(st as *mut M) });
    }));
}

/// The descriptor `d` as a plugin built for the older ABI `version` exports it: only its
/// first [`descriptor_len`]`(version)` bytes, with that version and size in the header, in
/// an allocation no longer than that (so a host reading past its version's fields reads
/// past the end). For the tests of hosts that must keep loading old plugins; the words
/// keep the descriptor's 8-byte alignment.
#[doc(hidden)]
pub fn as_older_version(d: &HgPluginDescriptor, version: u32) -> Vec<u64> {
    let n = descriptor_len(version);
    let mut words = vec![0u64; n.div_ceil(8)];
    // SAFETY: `d` is a whole descriptor (at least `n` bytes); `words` holds `n` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (d as *const HgPluginDescriptor).cast::<u8>(),
            words.as_mut_ptr().cast::<u8>(),
            n,
        );
        let header = words.as_mut_ptr().cast::<HgPluginHeader>();
        (*header).abi_version = version;
        (*header).struct_size = n as u32;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_truncate_at_char_boundaries() {
        let mut buf = [0u8; 4];
        let mut m = HgMessage {
            buf: buf.as_mut_ptr(),
            cap: buf.len(),
            len: 0,
        };
        write_message(&mut m, "aéé");
        assert_eq!(m.len, 3);
        assert_eq!(std::str::from_utf8(&buf[..m.len]).unwrap(), "aé");
    }

    #[test]
    fn guard_catches_panics_with_their_message() {
        let mut buf = [0u8; 64];
        let mut m = HgMessage {
            buf: buf.as_mut_ptr(),
            cap: buf.len(),
            len: 0,
        };
        let status = guard(&mut m, || panic!("boom {}", 7));
        assert_eq!(status, HG_PANIC);
        let text = std::str::from_utf8(&buf[..m.len]).unwrap();
        assert!(
            text.starts_with("boom 7 (at ") && text.contains("export.rs:"),
            "{text}"
        );
        assert_eq!(guard(&mut m, || Err("no".into())), HG_ERROR);
        assert_eq!(guard(&mut m, || Ok(())), HG_OK);
    }
}
