//! Write hookgraph metrics as plugins: shared libraries the `runner` loads at run time.
//!
//! Owns: the C ABI between the runner and a plugin ([`abi`]), the safe Rust layer a plugin
//! is written against ([`PluginMetric`], [`Ctx`], [`BatchCtx`], [`TensorRef`], [`Emitter`]),
//! the contractions of attribution metrics ([`contract`]), and [`export_plugin!`], which
//! generates the one exported symbol. Must not: depend on the
//! runner (`hookgraph`), or grow dependencies a plugin would have to build (serde_json only,
//! re-exported as [`serde_json`] so plugins need not pin a version).
//!
//! A plugin computes one metric from activations the runner caches (TransformerLens hook
//! names and shapes, `f32`) and processed weights (TransformerLens state-dict names), and
//! returns rows of tables that the runner writes as CSV next to the built-in metrics'. The
//! runner runs **one** forward pass per batch caching the union of what all metrics declare,
//! so a plugin adds no forward passes.
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "bos_attention"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! hookgraph-plugin = { path = "../../hookgraph-plugin" }
//! ```
//!
//! `src/lib.rs` (no `unsafe` anywhere):
//!
//! ```
//! use std::collections::BTreeMap;
//!
//! use hookgraph_plugin::{export_plugin, BatchCtx, Ctx, Emitter, PluginMetric};
//!
//! /// Per head: the mean attention paid to position 0, averaged over destination positions
//! /// of each sequence and then over sequences (so the batch size does not matter).
//! struct BosAttention {
//!     /// (layer, head) -> (sum over sequences of the per-sequence mean, sequences)
//!     sums: BTreeMap<(usize, usize), (f64, usize)>,
//! }
//!
//! impl PluginMetric for BosAttention {
//!     fn new(_options: &hookgraph_plugin::serde_json::Value) -> Result<Self, String> {
//!         Ok(BosAttention { sums: BTreeMap::new() })
//!     }
//!
//!     fn begin_dataset(&mut self, _ctx: &Ctx) -> Result<(), String> {
//!         self.sums.clear();
//!         Ok(())
//!     }
//!
//!     fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
//!         for &(layer, head) in ctx.heads() {
//!             // [batch, head, q, k]
//!             let pattern = ctx.activation(&format!("blocks.{layer}.attn.hook_pattern"))?;
//!             let &[batch, _, q_len, _] = pattern.shape() else {
//!                 return Err(format!("hook_pattern has shape {:?}", pattern.shape()));
//!             };
//!             for b in 0..batch {
//!                 let mean = (0..q_len).map(|q| pattern.at(&[b, head, q, 0]) as f64).sum::<f64>()
//!                     / q_len as f64;
//!                 let e = self.sums.entry((layer, head)).or_default();
//!                 e.0 += mean;
//!                 e.1 += 1;
//!             }
//!         }
//!         Ok(())
//!     }
//!
//!     fn finish(&mut self, _ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
//!         for (&(layer, head), &(sum, n)) in &self.sums {
//!             out.row("bos_attention", &[layer.into(), head.into(), (sum / n as f64).into()])?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! export_plugin!(
//!     BosAttention,
//!     name = "bos_attention",
//!     version = env!("CARGO_PKG_VERSION"),
//!     description = "per head: mean attention to position 0",
//!     hooks = ["blocks.{layer}.attn.hook_pattern"],
//!     tables = [{ name = "bos_attention", columns = ["layer", "head", "bos_attention"], score = "bos_attention" }],
//!     options = [],
//! );
//! # fn main() {
//! #     let d = hookgraph_plugin_descriptor();
//! #     assert!(!d.is_null());
//! # }
//! ```
//!
//! Build it with `cargo build --release -p bos_attention` and use it in a spec with
//! `[[metric]] plugin = "bos_attention"` (found on `HOOKGRAPH_PLUGIN_PATH` or in the
//! workspace's `target/release`/`target/debug`) or `plugin = "path/to/libbos_attention.so"`
//! (relative to the spec). `plugins/README.md` in the repository has more.
//!
//! # What the plugin sees
//!
//! - [`PluginMetric::new`] gets the `[[metric]]` table's other keys as JSON. Declare them in
//!   `options = [("name", "what it does"), ...]`: the runner rejects keys not declared.
//! - `hooks` lists the hook points read. A `{layer}` template is expanded for every layer
//!   that has a selected head; other names (`ln_final.hook_scale`, `logits`) are taken as
//!   they are. [`BatchCtx::activation`] returns only declared points.
//! - [`Ctx::weight`] gives any processed weight by TransformerLens name: `unembed.W_U`
//!   `[d_model, d_vocab]`, `blocks.L.attn.W_O` `[n_heads, d_head, d_model]`, `embed.W_E`, ...
//! - [`Ctx::heads`] are the selected heads, sorted; [`Ctx::lengths`] the unpadded length of
//!   every sequence (GPT-2 right-pads with BOS); [`BatchCtx::first_sequence`] places a batch
//!   in the dataset.
//! - [`Ctx::token_text`] is a token's text as the built-ins write it (ABI 3);
//!   [`Ctx::answers`] the dataset's `[correct, wrong]` ids, if any.
//! - [`BatchCtx::row`] emits a row from `batch` (ABI 3): a table is its batch rows in order,
//!   then `finish`'s; the runner keeps batch rows exact under sharding and resume.
//! - [`contract`]: [`Ctx::unembed_columns`] (`W_U[:, t]` rows), [`Ctx::w_o`] with
//!   [`OutProj::z_w_o`] (`z @ W_O[h]`), [`dot`], [`centred`].
//! - Each table declared in `tables` becomes `<name>.csv` with a `dataset` column prepended.
//!   A table with `layer` and `head` columns and a `score` is a per-head table: the summary
//!   and heatmaps show its score column.
//!
//! # Errors and panics
//!
//! Return `Err(text)` from any method: the run reports `plugin '<name>': <call> failed:
//! <text>`, still writes every other metric's results, and exits with code 3. A panic is
//! caught inside the plugin (the plugin must be built with the default `panic = "unwind"`)
//! and reported the same way, as `<call> panicked: <message> (at <file:line:col>)`; the
//! metric is not called again. The panic is not printed by the plugin unless
//! `RUST_BACKTRACE` is set (the plugin's own panic hook, installed on the first call, only
//! affects panics inside calls from the runner).
//!
//! # The ABI
//!
//! | What | Contract |
//! |---|---|
//! | symbol | `hookgraph_plugin_descriptor`: `extern "C" fn() -> *const HgPluginDescriptor` |
//! | header | first 16 bytes: `magic: u64` = `b"HGPLUGIN"` LE, `abi_version: u32` = [`abi::HG_PLUGIN_ABI_VERSION`], `struct_size: u32`; checked in that order before any other read or call |
//! | strings, lists | NUL-terminated UTF-8; pointer + length |
//! | ownership | the plugin owns its descriptor (static) and its state (`create` .. `destroy`); the host owns contexts, tensor views and message buffers; `emit_row` copies the row before returning |
//! | version 3 | appended `ctx_size`, `token_text`, `answers` to the host-owned `HgCallCtx`; `emit_row` works in `batch` too |
//! | partial state | ABI version 2, optional: [`PluginMetric::PARTIAL_STATE`] with [`PluginMetric::save_state`] / [`PluginMetric::merge_state`] lets the runner shard (`--shard I/N`, `runner merge`) and resume (`--resume`) the plugin; the host still loads version-1 plugins and refuses to shard them, by name |
//! | views | read-only, row-major, valid only during the call that produced them |
//! | status | `0` ok, `1` error, `2` panic (message written into the host's buffer, truncated at its capacity), `3` not found, `4` invalid |
//! | threading | calls on one state are serialised (maybe from different threads over time: the state must be `Send`); callbacks may be called from any thread during the call |

pub mod abi;
pub mod contract;
#[doc(hidden)]
pub mod export;
mod safe;

pub use contract::{centred, dot, Matrix, OutProj};
pub use safe::{BatchCtx, Ctx, Dtype, Emitter, PluginMetric, TensorRef, Value};
pub use serde_json;

/// Exports a [`PluginMetric`] as a hookgraph plugin: generates the `#[no_mangle]`
/// descriptor function and the `extern "C"` functions behind it. Use it once per library.
///
/// ```ignore
/// export_plugin!(
///     MyMetric,
///     name = "my_metric",                          // how specs and `runner list` name it
///     version = env!("CARGO_PKG_VERSION"),
///     description = "one line for `runner list`",
///     hooks = ["blocks.{layer}.attn.hook_pattern", "ln_final.hook_scale"],
///     tables = [
///         { name = "my_metric", columns = ["layer", "head", "score"], score = "score" },
///         // `nan`: columns where NaN means "undefined here" (a 0/0 the metric counts);
///         // any other NaN or infinity fails the metric.
///         { name = "my_metric_per_sequence", columns = ["layer", "head", "sequence", "value"], nan = ["value"] },
///     ],
///     options = [("only_negative", "bool, default false: ...")],
/// );
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        $ty:ty,
        name = $name:expr,
        version = $version:expr,
        description = $description:expr,
        hooks = [$($hook:expr),* $(,)?],
        tables = [$({
            name = $tname:expr,
            columns = [$($col:expr),* $(,)?]
            $(, score = $score:expr)?
            $(, nan = [$($nan:expr),* $(,)?])?
            $(,)?
        }),* $(,)?],
        options = [$(($oname:expr, $odesc:expr)),* $(,)?]
        $(,)?
    ) => {
        /// The hookgraph plugin descriptor (generated by `hookgraph_plugin::export_plugin!`).
        #[no_mangle]
        pub extern "C" fn hookgraph_plugin_descriptor(
        ) -> *const $crate::abi::HgPluginDescriptor {
            static META: $crate::export::PluginMeta = $crate::export::PluginMeta {
                name: $name,
                version: $version,
                description: $description,
                hooks: &[$($hook),*],
                tables: &[$($crate::export::TableMeta {
                    name: $tname,
                    columns: &[$($col),*],
                    score: $crate::__hg_option!($($score)?),
                    nan: &[$($($nan),*)?],
                }),*],
                options: &[$(($oname, $odesc)),*],
            };
            static DESCRIPTOR: ::std::sync::OnceLock<
                ::std::option::Option<$crate::export::DescriptorHolder>,
            > = ::std::sync::OnceLock::new();
            $crate::export::descriptor::<$ty>(&META, &DESCRIPTOR)
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hg_option {
    () => {
        ::std::option::Option::None
    };
    ($e:expr) => {
        ::std::option::Option::Some($e)
    };
}
