//! Metrics: what a run computes from cached activations.
//!
//! Owns: the [`Metric`] trait every metric implements (built-in or plugin), the registry of
//! built-ins ([`builtin`], [`BUILTINS`]) and their option parsing. Each metric *declares* the
//! hook points it reads; the runner caches the union in one forward pass per batch and hands
//! every metric the same cache (the hook graph). Must not: run the model, or write files.
//!
//! Aggregation is per sequence and averaged at the end, so results do not depend on the
//! batch size.
//!
//! A second kind, [`WeightMetric`], reads only the processed weights (`ov_circuit`,
//! `qk_circuit`, `docs/metrics.md` §4-5): the runner computes it once per run, before any
//! dataset, and a spec with only such metrics needs no dataset.

pub mod circuits;
pub mod device;
pub mod loss;
pub mod ops;
pub mod plugin;
pub mod projection_loss;
pub mod source_suppression;
pub mod state;

use ndarray::ArrayView2;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::ActivationCache;
use crate::model::{ModelConfig, Params};
use crate::output::Table;
use crate::tokenizer::GptTokenizer;
pub use state::State;

/// What every metric may read besides activations; the same for the whole run.
pub struct RunContext<'a> {
    pub cfg: &'a ModelConfig,
    /// Processed weights on the host (W_O, W_U, ...).
    pub params: &'a Params,
    /// The selected heads, sorted by (layer, head).
    pub heads: &'a [(usize, usize)],
    /// BOS id (GPT-2 pads with it too).
    pub bos: u32,
    pub tokenizer: Option<&'a GptTokenizer>,
}

impl<'a> RunContext<'a> {
    /// The context of a run of `model` over `heads` (sorted by (layer, head)).
    pub fn of<D: crate::seam::SeamDevice>(
        model: &'a crate::model::LoadedModel<D>,
        heads: &'a [(usize, usize)],
    ) -> Self {
        RunContext {
            cfg: model.cfg(),
            params: &model.params,
            heads,
            bos: model.cfg().bos_token_id,
            tokenizer: model.tokenizer.as_ref(),
        }
    }

    /// The selected heads grouped by layer, in order.
    pub fn heads_by_layer(&self) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for &(l, h) in self.heads {
            match out.last_mut() {
                Some((ll, hs)) if *ll == l => hs.push(h),
                _ => out.push((l, vec![h])),
            }
        }
        out
    }

    /// A token's text for tables (empty when there is no tokenizer).
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.map(|t| t.decode_one(id)).unwrap_or_default()
    }

    /// The text of every distinct token in `ids`, decoded once each.
    pub fn token_texts(&self, ids: &[u32]) -> std::collections::HashMap<u32, String> {
        let mut out = std::collections::HashMap::new();
        for &id in ids {
            out.entry(id).or_insert_with(|| self.token_text(id));
        }
        out
    }
}

/// One batch of one dataset, with the activations its forward pass cached.
pub struct BatchView<'a> {
    pub dataset: &'a Dataset,
    /// Index of the batch's first sequence in the dataset.
    pub start: usize,
    /// `[batch, seq]`.
    pub tokens: ArrayView2<'a, u32>,
    pub cache: &'a ActivationCache,
    /// The model, for metrics that run passes of their own (interventions: resumed passes,
    /// a patch's source run). `None` where a caller hands a cache alone.
    pub model: Option<&'a dyn crate::model::Passes>,
}

impl<'a> BatchView<'a> {
    /// The cached activation `name` with the dimensionality `D` (e.g. `Ix4` for `hook_v`).
    pub fn activation<D: ndarray::Dimension>(
        &self,
        name: &str,
    ) -> Result<ndarray::ArrayView<'a, f32, D>> {
        self.cache
            .get(name)?
            .view()
            .into_dimensionality::<D>()
            .map_err(|e| Error::Hook {
                name: name.to_string(),
                msg: format!("unexpected shape: {e}"),
            })
    }

    /// `ln_final.hook_scale` (`[B, S, 1]` in TL) as `[B, S]`.
    pub fn final_scale(&self) -> Result<ArrayView2<'a, f32>> {
        let scale = self.activation::<ndarray::Ix3>("ln_final.hook_scale")?;
        Ok(scale.index_axis_move(ndarray::Axis(2), 0))
    }
}

/// A metric over cached activations.
pub trait Metric {
    /// The metric's name (and its tables' name prefix).
    fn name(&self) -> &str;
    /// The hook points it reads, e.g. `blocks.3.attn.hook_v` or `logits`.
    fn hooks(&self, ctx: &RunContext) -> Vec<String>;
    /// Called before a dataset's first batch.
    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()>;
    /// Called once per batch with that batch's cache.
    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()>;
    /// Called after a dataset's last batch; returns its tables.
    fn finish_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<Vec<Table>>;

    /// The exact partial state accumulated since `start_dataset`: sums, counts and
    /// per-sequence rows, never means ([`State`]). Shards save it for `runner merge`, and a
    /// run saves it after every batch so `--resume` can continue. The default refuses: such
    /// a metric cannot be sharded or resumed (the error says so, naming it).
    fn save_state(&self) -> Result<State> {
        Err(no_state(self.name()))
    }

    /// Adds a state `save_state` made (same metric, options and dataset) covering the
    /// sequences right after those already seen; into a fresh `start_dataset` it restores it.
    /// Merging the shards' states in order then `finish_dataset` gives the unsharded tables.
    fn merge_state(&mut self, ctx: &RunContext, dataset: &Dataset, state: &State) -> Result<()> {
        let _ = (ctx, dataset, state);
        Err(no_state(self.name()))
    }

    /// The means over datasets it reads ([`crate::means`]): the engine runs these mean
    /// passes once, before the datasets, and hands the results to [`Self::set_means`].
    fn mean_requests(&self, ctx: &RunContext) -> Vec<crate::means::MeanRequest> {
        let _ = ctx;
        vec![]
    }

    /// Receives the means [`Self::mean_requests`] asked for (called before any dataset).
    fn set_means(&mut self, means: &crate::means::Means) -> Result<()> {
        let _ = means;
        Ok(())
    }
}

/// The error of a metric without partial state.
pub fn no_state(metric: &str) -> Error {
    Error::Metric {
        metric: metric.to_string(),
        msg: "it cannot save or merge partial state, so it cannot be sharded or resumed; run it in an unsharded spec of its own".into(),
    }
}

/// A lent metric is a metric (the engine holds boxes; tests and the bench lend theirs).
impl<M: Metric + ?Sized> Metric for &mut M {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        (**self).hooks(ctx)
    }
    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        (**self).start_dataset(ctx, dataset)
    }
    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        (**self).batch(ctx, batch)
    }
    fn finish_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<Vec<Table>> {
        (**self).finish_dataset(ctx, dataset)
    }
    fn save_state(&self) -> Result<State> {
        (**self).save_state()
    }
    fn merge_state(&mut self, ctx: &RunContext, dataset: &Dataset, state: &State) -> Result<()> {
        (**self).merge_state(ctx, dataset, state)
    }
    fn mean_requests(&self, ctx: &RunContext) -> Vec<crate::means::MeanRequest> {
        (**self).mean_requests(ctx)
    }
    fn set_means(&mut self, means: &crate::means::Means) -> Result<()> {
        (**self).set_means(means)
    }
}

/// A metric computed from the processed weights alone, once per run: no dataset, no
/// forward pass, no activations.
pub trait WeightMetric {
    /// The metric's name (and its tables' name prefix).
    fn name(&self) -> &str;
    /// Units of work [`compute`](Self::compute) reports through `progress` in all.
    fn work(&self, ctx: &RunContext) -> u64;
    /// Matmul FLOPs of [`compute`](Self::compute), for the achieved-rate line and manifest.
    fn flop(&self, ctx: &RunContext) -> f64;
    /// Its tables, one set for the whole run (written under the dataset name
    /// [`WEIGHTS_DATASET`]). `shared` holds what several weight metrics read (made once);
    /// `detail` lists the heads whose per-token values a `[[view]]` asks for;
    /// `progress(k)` reports `k` more units done.
    fn compute(
        &mut self,
        ctx: &RunContext,
        shared: &WeightInputs,
        detail: &[(usize, usize)],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<Table>>;
}

/// What weight metrics share in one run, made on first use: the effective embeddings
/// (`docs/metrics.md` §3; 0.6 TFLOP for GPT-2 small, so `ov_circuit` and `qk_circuit` in one
/// spec make them once).
#[derive(Default)]
pub struct WeightInputs {
    effective: std::sync::OnceLock<crate::circuits::EffectiveEmbeddings>,
}

impl WeightInputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// The effective embeddings of the run's processed weights.
    pub fn effective(&self, ctx: &RunContext) -> &crate::circuits::EffectiveEmbeddings {
        self.effective
            .get_or_init(|| crate::circuits::effective_embeddings(ctx.params, ctx.cfg))
    }
}

/// The `dataset` column of a weight metric's tables (they depend on no dataset).
pub const WEIGHTS_DATASET: &str = "weights";

/// A built-in metric's name, what it computes, and its options.
pub struct BuiltinInfo {
    pub name: &'static str,
    pub about: &'static str,
    pub options: &'static [(&'static str, &'static str)],
    pub tables: &'static [&'static str],
    /// Computed from the weights alone ([`WeightMetric`]): needs no dataset.
    pub weights_only: bool,
}

/// Whether `kind` names a built-in [`WeightMetric`].
pub fn is_weight_metric(kind: &str) -> bool {
    BUILTINS.iter().any(|b| b.name == kind && b.weights_only)
}

/// The built-in metrics (`runner list` prints this).
pub const BUILTINS: &[BuiltinInfo] = &[
    BuiltinInfo {
        name: "source_suppression",
        about: "per head: how much the head's output at a destination suppresses the logit of the source tokens it attends to (docs/metrics.md §1)",
        options: &[("only_negative", "bool, default false: keep only negative source coefficients")],
        tables: &["source_suppression", "source_suppression_per_sequence", "source_suppression_per_position"],
        weights_only: false,
    },
    BuiltinInfo {
        name: "projection_loss",
        about: "per head: loss when the head's direct effect is kept only along / perpendicular to the source unembedding, or ablated (docs/metrics.md §2)",
        options: &[("only_negative", "bool, default false: project only negative coefficients")],
        tables: &["projection_loss"],
        weights_only: false,
    },
    BuiltinInfo {
        name: "loss",
        about: "per-token cross-entropy loss of the unmodified model",
        options: &[],
        tables: &["loss"],
        weights_only: false,
    },
    BuiltinInfo {
        name: "ov_circuit",
        about: "per head, from the weights alone: how often the full OV circuit LN(W_EE) W_V W_O W_U ranks each source token's own logit among the most suppressed (neg) / most boosted (pos) (docs/metrics.md §4); needs no dataset",
        options: &[
            ("embedding", "W_EE (default), W_E, W_EE0 or W_EE0A: the source tokens' effective embedding"),
            ("block_rows", "integer, default 256: vocabulary rows per block (memory ~ block_rows x (heads x d_head + 1024) floats per core)"),
        ],
        tables: &["ov_circuit", "ov_circuit_per_token"],
        weights_only: true,
    },
    BuiltinInfo {
        name: "qk_circuit",
        about: "per head, from the weights alone: how often the full QK circuit LN(W_U)^T W_Q W_K^T LN(W_EE) puts the diagonal (attend back to the predicted token) first (docs/metrics.md §5); needs no dataset",
        options: &[
            ("embedding", "W_EE (default), W_E, W_EE0 or W_EE0A: the key side's effective embedding"),
            ("block_rows", "integer, default 256: vocabulary rows per block"),
        ],
        tables: &["qk_circuit", "qk_circuit_per_token"],
        weights_only: true,
    },
];

/// Reads a bool option, rejecting anything else.
pub fn bool_option(metric: &str, options: &toml::Table, key: &str, default: bool) -> Result<bool> {
    match options.get(key) {
        None => Ok(default),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(other) => Err(Error::Metric {
            metric: metric.to_string(),
            msg: format!("option '{key}' must be true or false, not {other}"),
        }),
    }
}

/// Rejects options a built-in does not know.
fn check_options(info: &BuiltinInfo, options: &toml::Table) -> Result<()> {
    for key in options.keys() {
        if !info.options.iter().any(|(k, _)| k == key) {
            let known: Vec<&str> = info.options.iter().map(|(k, _)| *k).collect();
            return Err(Error::Metric {
                metric: info.name.to_string(),
                msg: format!(
                    "unknown option '{key}' (known: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            });
        }
    }
    Ok(())
}

/// A built-in metric by name, with its options checked.
pub fn builtin(kind: &str, options: &toml::Table) -> Result<Box<dyn Metric>> {
    let info = BUILTINS
        .iter()
        .find(|b| b.name == kind)
        .ok_or_else(|| Error::Metric {
            metric: kind.to_string(),
            msg: format!(
                "unknown metric (built-ins: {}; or use `plugin = ...`)",
                BUILTINS
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    check_options(info, options)?;
    Ok(match kind {
        "source_suppression" => Box::new(source_suppression::SourceSuppression::new(bool_option(
            kind,
            options,
            "only_negative",
            false,
        )?)),
        "projection_loss" => Box::new(projection_loss::ProjectionLoss::new(bool_option(
            kind,
            options,
            "only_negative",
            false,
        )?)),
        "loss" => Box::new(loss::Loss::default()),
        _ if info.weights_only => {
            return Err(Error::Metric {
                metric: kind.to_string(),
                msg: "is computed from the weights (use `weight_builtin`)".into(),
            })
        }
        _ => unreachable!("BUILTINS and this match list the same names"),
    })
}

/// A built-in weight metric by name, with its options checked.
pub fn weight_builtin(kind: &str, options: &toml::Table) -> Result<Box<dyn WeightMetric>> {
    let info = BUILTINS
        .iter()
        .find(|b| b.name == kind && b.weights_only)
        .ok_or_else(|| Error::Metric {
            metric: kind.to_string(),
            msg: "not a built-in weight metric".into(),
        })?;
    check_options(info, options)?;
    let circuit = match kind {
        "ov_circuit" => circuits::Circuit::Ov,
        "qk_circuit" => circuits::Circuit::Qk,
        _ => unreachable!("BUILTINS and this match list the same names"),
    };
    Ok(Box::new(circuits::CircuitMetric::new(circuit, options)?))
}
