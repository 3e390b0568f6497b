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
pub mod cspa;
pub mod device;
pub mod direct;
pub mod dla;
pub mod logit_lens;
pub mod loss;
pub mod ops;
pub mod plugin;
pub mod projection_loss;
pub mod registry;
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

    /// The passes of its own it runs in each batch of `dataset` (after `start_dataset`),
    /// through [`BatchView::model`]: a resumed pass counts one per intervention it carries.
    /// The progress bar counts passes, the engine's unchanged one and these.
    fn passes_per_batch(&self, ctx: &RunContext, dataset: &Dataset) -> usize {
        let _ = (ctx, dataset);
        0
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
    fn passes_per_batch(&self, ctx: &RunContext, dataset: &Dataset) -> usize {
        (**self).passes_per_batch(ctx, dataset)
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

pub use registry::{BuildCtx, Built, MetricDef, OptType, OptionDef, OptionError, Opts};

/// Whether `kind` names a built-in [`WeightMetric`].
pub fn is_weight_metric(kind: &str) -> bool {
    registry::find(kind).is_some_and(|b| b.weights_only)
}

const fn opt(
    name: &'static str,
    ty: OptType,
    default: Option<&'static str>,
    about: &'static str,
) -> OptionDef {
    OptionDef {
        name,
        ty,
        default,
        about,
    }
}

const EMBEDDING: OptionDef = opt(
    "embedding",
    OptType::Str,
    Some("\"W_EE\""),
    "W_EE, W_E, W_EE0 or W_EE0A: the effective embedding of the source tokens (ov_circuit) / the key side (qk_circuit)",
);
const BLOCK_ROWS: OptionDef = opt(
    "block_rows",
    OptType::Int,
    Some("256"),
    "vocabulary rows per block, 1 to 1048576 (memory ~ block_rows x (heads x d_head + 1024) floats per core)",
);

/// The built-in metrics, listed once (`runner list`, the runner, views and the docs read
/// this; [`registry`] checks the options).
pub const BUILTINS: &[MetricDef] = &[
    MetricDef {
        name: "source_suppression",
        about: "per head: how much the head's output at a destination suppresses the logit of the source tokens it attends to (docs/metrics.md §1)",
        options: &[opt("only_negative", OptType::Bool, Some("false"), "keep only negative source coefficients")],
        tables: &["source_suppression", "source_suppression_per_sequence", "source_suppression_per_position"],
        weights_only: false,
        build: |_, o| Ok(Built::Metric(Box::new(source_suppression::SourceSuppression::new(o.bool("only_negative"))))),
    },
    MetricDef {
        name: "projection_loss",
        about: "per head: loss when the head's direct effect is kept only along / perpendicular to the source unembedding, or ablated (docs/metrics.md §2)",
        options: &[opt("only_negative", OptType::Bool, Some("false"), "project only negative coefficients")],
        tables: &["projection_loss"],
        weights_only: false,
        build: |_, o| Ok(Built::Metric(Box::new(projection_loss::ProjectionLoss::new(o.bool("only_negative"))))),
    },
    MetricDef {
        name: "loss",
        about: "per-token cross-entropy loss of the unmodified model",
        options: &[],
        tables: &["loss"],
        weights_only: false,
        build: |_, _| Ok(Built::Metric(Box::<loss::Loss>::default())),
    },
    MetricDef {
        name: "ov_circuit",
        about: "per head, from the weights alone: how often the full OV circuit LN(W_EE) W_V W_O W_U ranks each source token's own logit among the most suppressed (neg) / most boosted (pos) (docs/metrics.md §4); needs no dataset",
        options: &[EMBEDDING, BLOCK_ROWS],
        tables: &["ov_circuit", "ov_circuit_per_token"],
        weights_only: true,
        build: |_, o| circuits::CircuitMetric::build(circuits::Circuit::Ov, o),
    },
    MetricDef {
        name: "qk_circuit",
        about: "per head, from the weights alone: how often the full QK circuit LN(W_U)^T W_Q W_K^T LN(W_EE) puts the diagonal (attend back to the predicted token) first (docs/metrics.md §5); needs no dataset",
        options: &[EMBEDDING, BLOCK_ROWS],
        tables: &["qk_circuit", "qk_circuit_per_token"],
        weights_only: true,
        build: |_, o| circuits::CircuitMetric::build(circuits::Circuit::Qk, o),
    },
    MetricDef {
        name: "direct_mean_ablation",
        about: "per head: the head's direct contribution to the final residual stream replaced by its per-position mean over mean_over (final LayerNorm scale frozen): pooled KL(unchanged || ablated), loss and its increase (docs/metrics.md §7)",
        options: &[MEAN_OVER, MEAN_SEQUENCES, ALLOW_SHORT_MEAN],
        tables: &["direct_mean_ablation", "direct_mean_ablation_per_position"],
        weights_only: false,
        build: |ctx, o| {
            let (over, n) = mean_options(ctx, o)?;
            Ok(Built::Metric(Box::new(cspa::DirectPath::mean_ablation(over, n))))
        },
    },
    MetricDef {
        name: "cspa",
        about: "the Copy Suppression paper's copy suppression-preserving ablation of each of `heads`: effect_explained = 1 - mean KL(CSPA) / mean KL(mean ablation) (docs/metrics.md §8)",
        options: &[
            opt("heads", OptType::List, Some("[\"10.7\"]"), "the heads ablated, each on its own, as \"layer.head\""),
            MEAN_OVER,
            MEAN_SEQUENCES,
            ALLOW_SHORT_MEAN,
            opt("k_fraction", OptType::Float, Some("0.05"), "in (0, 1]: at destination d the pairs scoring at least the K-th logit-lens value, K = ceil(k_fraction (d + 1)), are kept"),
            opt("only_negative", OptType::Bool, Some("true"), "keep only the negative part of a kept pair's projection"),
            opt("ov_only", OptType::Bool, Some("false"), "every pair kept (projection only; the paper's OV-only row)"),
            opt("qk_only", OptType::Bool, Some("false"), "kept pairs move their output unprojected (the paper's QK-only row)"),
            opt("function_words", OptType::Str, Some("\"paper\""), "source tokens never kept: \"paper\" (the paper's list), \"none\", or a JSON file of token ids"),
        ],
        tables: &["cspa", "cspa_per_position"],
        weights_only: false,
        build: build_cspa,
    },
    MetricDef {
        name: "direct_logit_attribution",
        about: "per head and position: the head's direct effect on the next token's logit, result / final_scale . W_U[:, target] (TL's apply_ln_to_stack + logit_attrs); with dataset answers also on logit[correct] - logit[wrong] at the last position (docs/metrics.md §9)",
        options: &[],
        tables: &["direct_logit_attribution", "direct_logit_attribution_per_sequence", "direct_logit_attribution_per_position"],
        weights_only: false,
        build: |_, _| Ok(Built::Metric(Box::<dla::DirectLogitAttribution>::default())),
    },
    MetricDef {
        name: "logit_lens",
        about: "per layer: resid_pre 0 and every resid_post through ln_final (own scale) and the unembedding: loss on the next token and mean rank of the target, per layer and position, with a layers x positions picture (docs/metrics.md §10)",
        options: &[],
        tables: &["logit_lens", "logit_lens_per_position"],
        weights_only: false,
        build: |_, _| Ok(Built::Metric(Box::<logit_lens::LogitLens>::default())),
    },
];

const MEAN_OVER: OptionDef = opt(
    "mean_over",
    OptType::Dataset,
    None,
    "required: the [[dataset]] whose per-position mean of the head's result replaces it (the paper: OpenWebText)",
);
const MEAN_SEQUENCES: OptionDef = opt(
    "mean_sequences",
    OptType::Int,
    Some("100"),
    "the first this many sequences of mean_over are averaged (the paper: 100)",
);
const ALLOW_SHORT_MEAN: OptionDef = opt(
    "allow_short_mean",
    OptType::Bool,
    Some("false"),
    "true: average what there is when mean_over has fewer than mean_sequences sequences (else an error)",
);

/// `mean_over`, `mean_sequences`, `allow_short_mean` checked against the spec's datasets.
fn mean_options(ctx: &BuildCtx, o: &Opts) -> std::result::Result<(String, usize), OptionError> {
    let Some(over) = o.str("mean_over") else {
        return Err(OptionError {
            key: None,
            msg: "option 'mean_over' is required: the [[dataset]] whose per-position mean replaces the head's output (the paper averages 100 OpenWebText sequences)".into(),
        });
    };
    let n = o.int("mean_sequences").unwrap_or(100);
    if n < 1 {
        return Err(OptionError::at(
            "mean_sequences",
            format!("option 'mean_sequences' must be at least 1, not {n}"),
        ));
    }
    let mut n = n as usize;
    if let Some(d) = ctx.dataset(over) {
        if d.n_sequences < n {
            if !o.bool("allow_short_mean") {
                return Err(OptionError::at(
                    "mean_over",
                    format!(
                        "option 'mean_over': dataset '{over}' has {} sequences, fewer than the {n} the mean is over; give it more, lower `mean_sequences`, or set `allow_short_mean = true` to average the {} there are",
                        d.n_sequences, d.n_sequences
                    ),
                ));
            }
            n = d.n_sequences;
        }
        if let Some(longer) = ctx
            .datasets
            .into_iter()
            .flatten()
            .find(|x| x.seq_len > d.seq_len)
        {
            return Err(OptionError::at(
                "mean_over",
                format!(
                    "option 'mean_over': dataset '{over}' has sequences of {} tokens, but '{}' has {}: the per-position mean needs every position",
                    d.seq_len, longer.name, longer.seq_len
                ),
            ));
        }
    }
    Ok((over.to_string(), n))
}

fn build_cspa(ctx: &BuildCtx, o: &Opts) -> std::result::Result<Built, OptionError> {
    let heads = registry::parse_heads("heads", o.list("heads").unwrap_or(&[]), ctx.cfg)?;
    let (mean_over, mean_sequences) = mean_options(ctx, o)?;
    let k = o.float("k_fraction").unwrap_or(0.05);
    if !(k > 0.0 && k <= 1.0) {
        return Err(OptionError::at(
            "k_fraction",
            format!("option 'k_fraction' must be in (0, 1], not {k}"),
        ));
    }
    let mode =
        match (o.bool("ov_only"), o.bool("qk_only")) {
            (false, false) => cspa::Mode::Both,
            (true, false) => cspa::Mode::OvOnly,
            (false, true) => cspa::Mode::QkOnly,
            (true, true) => return Err(OptionError::at(
                "qk_only",
                "options 'ov_only' and 'qk_only' exclude each other (both false is the full CSPA)",
            )),
        };
    let fw = o.str("function_words").unwrap_or("paper");
    let function_words = cspa::function_words_option(fw, ctx.spec_dir)
        .map_err(|e| OptionError::at("function_words", format!("option 'function_words': {e}")))?;
    Ok(Built::Metric(Box::new(cspa::DirectPath::cspa(
        cspa::CspaConfig {
            heads,
            mean_over,
            mean_sequences,
            k_fraction: k,
            only_negative: o.bool("only_negative"),
            mode,
            function_words,
        },
    ))))
}

/// Reads a bool option, rejecting anything else (for metrics outside the registry).
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

/// A built-in by name with its options checked, knowing nothing of the run (tests, bench).
pub fn build_builtin(kind: &str, options: &toml::Table) -> Result<Built> {
    let def = registry::find(kind).ok_or_else(|| registry::unknown(kind))?;
    def.build(&BuildCtx::default(), options)
        .map_err(|e| e.into_error(kind))
}

/// A built-in metric by name, with its options checked.
pub fn builtin(kind: &str, options: &toml::Table) -> Result<Box<dyn Metric>> {
    match build_builtin(kind, options)? {
        Built::Metric(m) => Ok(m),
        Built::Weights(_) => Err(Error::Metric {
            metric: kind.to_string(),
            msg: "is computed from the weights (use `weight_builtin`)".into(),
        }),
    }
}

/// A built-in weight metric by name, with its options checked.
pub fn weight_builtin(kind: &str, options: &toml::Table) -> Result<Box<dyn WeightMetric>> {
    match build_builtin(kind, options)? {
        Built::Weights(m) => Ok(m),
        Built::Metric(_) => Err(Error::Metric {
            metric: kind.to_string(),
            msg: "not a built-in weight metric".into(),
        }),
    }
}
