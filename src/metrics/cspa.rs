//! `cspa` and `direct_mean_ablation` (`docs/metrics.md` §7-8): the Copy Suppression
//! paper's copy suppression-preserving ablation (`get_cspa_results` in
//! `transformer_lens/rs/callum2/cspa/cspa_functions.py`, callummcdougall/SERI-MATS-2023-
//! Streamlit-pages at c2a732c) and its plain per-position mean ablation of a head's direct
//! effect, both analytic on one forward pass's cache.
//!
//! Owns: the two metrics, their per-head and per-token tables, their means requests and
//! their partial state. Reads `blocks.L.attn.hook_z` (the head's result), and for `cspa`
//! `blocks.L.hook_resid_pre`, `attn.hook_v`, `attn.hook_pattern`; the final residual stream
//! `blocks.{n-1}.hook_resid_post`, `ln_final.hook_scale` and `logits`; and the per-position
//! mean of `hook_z` over the first `mean_sequences` sequences of `mean_over`
//! ([`crate::means`]). Must not: run the model or write files.
//!
//! Cost per head and sequence of S tokens (D = d_model, V = d_vocab): two unembeddings of
//! `[S, D]` (ablated, CSPA), `ROWS` rows at a time (never `[S, V]`), and for `cspa` three
//! `[S, S] x D` matmuls: the logit-lens scores `(resid_pre / scale) @ U_tokᵀ`, the mean
//! term's coefficients `mean @ Ûᵀ`, and the kept projections `C @ Û`. The paper's
//! `[S, S, D]` `output_attn` is never formed: a pair's projection coefficient is
//! `A[d, s] · (v_s W_O · û_s − mean[d] · û_s)`.

use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayView3, Axis, Ix3, Ix4};
use rayon::prelude::*;

use super::direct::{self, TokenRows};
use super::ops::kernels::{self, Par};
use super::state::State;
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::{block_hook, LOGITS};
use crate::means::{MeanRequest, Means};
use crate::output::{Table, Value};
use crate::seam::{DeviceActs, Op};
use dfdx::prelude::Device;

/// Which pairs keep their projected output (the paper's `interventions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// QK filter and OV projection (`["qk", "ov"]`): the headline CSPA.
    Both,
    /// Every pair projected (OV only).
    OvOnly,
    /// Kept pairs unchanged, no projection (QK only, `["qk"]` without an OV config).
    QkOnly,
}

/// The `cspa` options after checking.
#[derive(Clone, Debug)]
pub struct CspaConfig {
    pub heads: Vec<(usize, usize)>,
    pub mean_over: String,
    pub mean_sequences: usize,
    pub k_fraction: f64,
    pub only_negative: bool,
    pub mode: Mode,
    /// Function-word token ids (GPT-2 ids; see [`direct::function_word_ids`]).
    pub function_words: Vec<u32>,
}

/// One sequence's inputs for one head, host side.
pub struct SeqInputs<'a> {
    pub tokens: ArrayView1<'a, u32>,
    /// `ln_final.hook_scale` `[S]`.
    pub scale: ArrayView1<'a, f32>,
    /// `blocks.{n-1}.hook_resid_post` `[S, D]`.
    pub resid_final: ArrayView2<'a, f32>,
    /// `logits` `[S, V]` and their row log-sum-exps.
    pub logits: ArrayView2<'a, f32>,
    pub lse: &'a [f32],
    /// `hook_z` `[S, H, dh]`.
    pub z: ArrayView3<'a, f32>,
    /// The head's per-position mean result `[S, D]`.
    pub mean: ArrayView2<'a, f32>,
}

/// The CSPA-only inputs of one sequence.
pub struct CspaInputs<'a> {
    /// `blocks.L.hook_resid_pre` `[S, D]`.
    pub resid_pre: ArrayView2<'a, f32>,
    /// `hook_v` `[S, H, dh]`.
    pub v: ArrayView3<'a, f32>,
    /// The head's `hook_pattern` `[Q, K]`.
    pub pattern: ArrayView2<'a, f32>,
    /// Function-word mask over the vocabulary.
    pub function: &'a [bool],
}

/// Which (d, s) pairs the paper keeps, `[S, S]`, from the logit-lens scores `[S, S]`
/// (`get_top_predicted_semantically_similar_tokens` with K_semantic = 1, bit for bit in its
/// rules): function-word sources and s > d are set to −1e9; the K-th largest value per row
/// (K = ⌈k_fraction · (d + 1)⌉) is taken with later repeats of a token also at −1e9; a pair
/// is kept when its score (repeats not masked) + 1e-6 ≥ that value. When fewer than K
/// sources are eligible the K-th value is −1e9 and every pair is kept, as in the paper.
pub fn kept_pairs(
    scores: ArrayView2<f32>,
    tokens: ArrayView1<u32>,
    function: &[bool],
    k_fraction: f64,
) -> Array2<bool> {
    let s = scores.nrows();
    const MASKED: f32 = -1e9;
    let mut first = vec![true; s];
    let mut seen = std::collections::HashSet::new();
    for (k, &t) in tokens.iter().enumerate() {
        first[k] = seen.insert(t);
    }
    let mut keep = Array2::from_elem((s, s), false);
    let mut row = vec![0f32; s];
    for d in 0..s {
        let masked = |k: usize| -> f32 {
            if function[tokens[k] as usize] || k > d {
                MASKED
            } else {
                scores[[d, k]]
            }
        };
        for (k, r) in row.iter_mut().enumerate() {
            *r = if first[k] { masked(k) } else { MASKED };
        }
        let kk = ((k_fraction * (d + 1) as f64).ceil() as usize).clamp(1, s);
        // The K-th largest (ties counted as in torch.topk: by value).
        row.select_nth_unstable_by(kk - 1, |a, b| b.total_cmp(a));
        let kth = row[kk - 1];
        for k in 0..s {
            keep[[d, k]] = masked(k) + 1e-6 >= kth;
        }
    }
    keep
}

/// One head's CSPA result `[S, D]` for one sequence (`head_result_cspa` in the paper).
pub fn cspa_result(
    x: &SeqInputs,
    c: &CspaInputs,
    h: usize,
    w_o: ArrayView2<f32>,
    w_u: ArrayView2<f32>,
    cfg: &CspaConfig,
) -> Array2<f32> {
    let (s, d_model) = x.resid_final.dim();
    // The source tokens' unembeddings as rows, and normalised (the paper's Gram–Schmidt on
    // one direction: zero when the norm is at most 1e-6).
    let mut u = Array2::<f32>::zeros((s, d_model));
    let mut u_hat = Array2::<f32>::zeros((s, d_model));
    for k in 0..s {
        let col = w_u.column(x.tokens[k] as usize);
        u.row_mut(k).assign(&col);
        let norm = col.iter().map(|a| a * a).sum::<f32>().sqrt();
        if norm > 1e-6 {
            u_hat.row_mut(k).assign(&col.mapv(|a| a / norm));
        }
    }
    let keep = match cfg.mode {
        Mode::OvOnly => Array2::from_shape_fn((s, s), |(d, k)| k <= d),
        _ => {
            let mut scaled = c.resid_pre.to_owned();
            for (mut r, &sc) in scaled.outer_iter_mut().zip(x.scale) {
                r.mapv_inplace(|a| a / sc);
            }
            let scores = kernels::matmul_par(scaled.view(), u.t(), Par::One);
            kept_pairs(scores.view(), x.tokens, c.function, cfg.k_fraction)
        }
    };
    let out = kernels::matmul_par(c.v.slice(s![.., h, ..]), w_o, Par::One); // [S, D]
    let a = c.pattern;
    let mut result = Array2::<f32>::zeros((s, d_model));
    match cfg.mode {
        Mode::QkOnly => {
            // Kept pairs move their output unchanged, the rest their mean term.
            let mut ak = Array2::<f32>::zeros((s, s));
            for d in 0..s {
                let mut rest = 0f32;
                for k in 0..=d {
                    if keep[[d, k]] {
                        ak[[d, k]] = a[[d, k]];
                    } else {
                        rest += a[[d, k]];
                    }
                }
                result.row_mut(d).scaled_add(rest, &x.mean.row(d));
            }
            result += &kernels::matmul_par(ak.view(), out.view(), Par::One);
        }
        Mode::Both | Mode::OvOnly => {
            // coef[d, k] = A[d, k] (out_k · û_k − mean_d · û_k), kept pairs only.
            let out_u: Vec<f32> = (0..s).map(|k| out.row(k).dot(&u_hat.row(k))).collect();
            let mean_u = kernels::matmul_par(x.mean, u_hat.t(), Par::One); // [S, S]
            let mut coef = Array2::<f32>::zeros((s, s));
            for d in 0..s {
                let mut total = 0f32;
                for k in 0..=d {
                    total += a[[d, k]];
                    if keep[[d, k]] {
                        let cdk = a[[d, k]] * (out_u[k] - mean_u[[d, k]]);
                        coef[[d, k]] = if cfg.only_negative { cdk.min(0.0) } else { cdk };
                    }
                }
                result.row_mut(d).scaled_add(total, &x.mean.row(d));
            }
            result += &kernels::matmul_par(coef.view(), u_hat.view(), Par::One);
        }
    }
    result
}

/// The per-position mean result of head `h` `[S, D]` from the mean of `hook_z`
/// `[S_mean, H, dh]` (its first `s` positions).
pub fn mean_result(
    mean_z: &ndarray::ArrayD<f32>,
    h: usize,
    s: usize,
    w_o: ArrayView2<f32>,
) -> Result<Array2<f32>> {
    let z = mean_z
        .view()
        .into_dimensionality::<Ix3>()
        .map_err(|e| Error::Other(format!("mean of hook_z: unexpected shape: {e}")))?;
    if z.dim().0 < s {
        return Err(Error::Other(format!(
            "the mean has {} positions, the dataset's sequences {s}",
            z.dim().0
        )));
    }
    Ok(kernels::matmul_par(z.slice(s![..s, h, ..]), w_o, Par::One))
}

/// What one batch gives per head: for every sequence, per-token columns.
type HeadRows = Vec<Vec<Vec<f32>>>;

/// Which metric a [`Values`] op computes.
enum Which<'a> {
    Ablation,
    Cspa(&'a CspaConfig, &'a [bool]),
}

/// One batch's per-token values for each head, computed where the activations are.
struct Values<'a, 'c, 'b> {
    ctx: &'a RunContext<'c>,
    batch: &'a BatchView<'b>,
    heads: &'a [(usize, usize)],
    /// Per head, its mean result `[S_mean, D]` (positions beyond the batch's unused).
    means: &'a [Array2<f32>],
    which: Which<'a>,
}

impl Values<'_, '_, '_> {
    /// Per head, per sequence: `[kl_abl, loss_abl]` or `[kl_cspa, kl_abl, loss_cspa,
    /// loss_abl]` (losses padded with a trailing 0 to S values).
    fn host_values(&self) -> Result<Vec<HeadRows>> {
        let (ctx, batch) = (self.ctx, self.batch);
        let n = ctx.cfg.n_layers;
        let scale = batch.final_scale()?;
        let resid_final = batch.activation::<Ix3>(&block_hook(n - 1, "hook_resid_post"))?;
        let logits = batch.activation::<Ix3>(LOGITS)?;
        let (b, s) = batch.tokens.dim();
        let lse: Vec<Vec<f32>> = (0..b)
            .into_par_iter()
            .map(|i| direct::row_lse(logits.index_axis(Axis(0), i)))
            .collect();
        let w_u = ctx.params.w_u.view();
        let b_u = ctx.params.b_u.view();
        let mut out = Vec::with_capacity(self.heads.len());
        for (hi, &(l, h)) in self.heads.iter().enumerate() {
            let z = batch.activation::<Ix4>(&block_hook(l, "attn.hook_z"))?;
            let w_o = ctx.params.blocks[l].attn.w_o.index_axis(Axis(0), h);
            let mean = self.means[hi].slice(s![..s, ..]);
            let cspa_acts = match &self.which {
                Which::Cspa(..) => Some((
                    batch.activation::<Ix3>(&block_hook(l, "hook_resid_pre"))?,
                    batch.activation::<Ix4>(&block_hook(l, "attn.hook_v"))?,
                    batch.activation::<Ix4>(&block_hook(l, "attn.hook_pattern"))?,
                )),
                Which::Ablation => None,
            };
            let (tokens, which) = (batch.tokens, &self.which);
            let rows: Vec<Vec<Vec<f32>>> = (0..b)
                .into_par_iter()
                .map(|i| {
                    let x = SeqInputs {
                        tokens: tokens.row(i),
                        scale: scale.row(i),
                        resid_final: resid_final.index_axis(Axis(0), i),
                        logits: logits.index_axis(Axis(0), i),
                        lse: &lse[i],
                        z: z.index_axis(Axis(0), i),
                        mean,
                    };
                    let r = direct::head_result(x.z, h, w_o);
                    let delta_abl = &x.mean - &r;
                    let kl_loss = |delta: ArrayView2<f32>| {
                        let (kl, mut loss) = direct::variant_kl_loss(
                            x.resid_final,
                            delta,
                            x.scale,
                            x.logits,
                            x.lse,
                            x.tokens,
                            w_u,
                            b_u,
                            Par::One,
                        );
                        loss.push(0.0);
                        (kl, loss)
                    };
                    let (kl_abl, loss_abl) = kl_loss(delta_abl.view());
                    match (which, &cspa_acts) {
                        (Which::Cspa(cfg, function), Some((rp, v, p))) => {
                            let c = CspaInputs {
                                resid_pre: rp.index_axis(Axis(0), i),
                                v: v.index_axis(Axis(0), i),
                                pattern: p.slice(s![i, h, .., ..]),
                                function,
                            };
                            let new = cspa_result(&x, &c, h, w_o, w_u, cfg);
                            let (kl_c, loss_c) = kl_loss((&new - &r).view());
                            vec![kl_c, kl_abl, loss_c, loss_abl]
                        }
                        _ => vec![kl_abl, loss_abl],
                    }
                })
                .collect();
            out.push(rows);
        }
        Ok(out)
    }
}

impl Op for Values<'_, '_, '_> {
    type Output = Vec<HeadRows>;

    fn host(&self) -> Result<Self::Output> {
        self.host_values()
    }

    /// The device body: the same math through the activations' host views. The direct-path
    /// metrics are analytic on a handful of `[S, D]` and `[S, S]` operands per head; their
    /// dfdx version is not written yet, so on a device the op reads the hooks it needs from
    /// the cache (counted as downloads, see [`DeviceActs::downloads`]).
    fn device<D: Device<f32> + 'static>(&self, _acts: &DeviceActs<D>) -> Result<Self::Output> {
        self.host_values()
    }
}

/// Loss of the unchanged run per token of one sequence (`[S]`, last 0).
fn orig_losses(logits: ArrayView2<f32>, lse: &[f32], tokens: ArrayView1<u32>) -> Vec<f32> {
    let s = tokens.len();
    (0..s)
        .map(|q| {
            if q + 1 < s {
                lse[q] - logits[[q, tokens[q + 1] as usize]]
            } else {
                0.0
            }
        })
        .collect()
}

/// The orig loss op (shared by both metrics, one per batch).
struct OrigLoss<'a, 'b>(&'a BatchView<'b>);

impl Op for OrigLoss<'_, '_> {
    type Output = Vec<Vec<f32>>;
    fn host(&self) -> Result<Self::Output> {
        let logits = self.0.activation::<Ix3>(LOGITS)?;
        let tokens = self.0.tokens;
        Ok((0..tokens.nrows())
            .into_par_iter()
            .map(|i| {
                let l = logits.index_axis(Axis(0), i);
                orig_losses(l, &direct::row_lse(l), tokens.row(i))
            })
            .collect())
    }
    fn device<D: Device<f32> + 'static>(&self, _acts: &DeviceActs<D>) -> Result<Self::Output> {
        // The per-token loss op computes this where the logits are.
        let l = self.0.cache.run(&super::ops::PerTokenLoss(self.0))?;
        Ok(l.outer_iter()
            .map(|r| {
                let mut v = r.to_vec();
                v.push(0.0);
                v
            })
            .collect())
    }
}

/// The two metrics' shared body: means, per-token rows, tables.
pub struct DirectPath {
    name: &'static str,
    /// `None`: `direct_mean_ablation` (the run's heads).
    cspa: Option<CspaConfig>,
    mean_over: String,
    mean_sequences: usize,
    /// Per head of [`Self::heads`], the per-position mean result.
    means: Vec<Array2<f32>>,
    heads: Vec<(usize, usize)>,
    function: Vec<bool>,
    seq_len: usize,
    lengths: Vec<usize>,
    tokens: Vec<u32>,
    rows: TokenRows,
    /// Loss of the unchanged run, per token (one "head").
    orig: TokenRows,
    /// The means the engine handed over, until the first dataset (they need the weights).
    pending: Option<Means>,
}

const CSPA_COLS: &[&str] = &["kl_cspa", "kl_ablated", "loss_cspa", "loss_ablated"];
const ABL_COLS: &[&str] = &["kl", "loss"];

impl DirectPath {
    /// `direct_mean_ablation` of the run's heads.
    pub fn mean_ablation(mean_over: String, mean_sequences: usize) -> Self {
        Self::new("direct_mean_ablation", None, mean_over, mean_sequences)
    }

    /// `cspa` of `cfg.heads`.
    pub fn cspa(cfg: CspaConfig) -> Self {
        let (m, n) = (cfg.mean_over.clone(), cfg.mean_sequences);
        Self::new("cspa", Some(cfg), m, n)
    }

    fn new(
        name: &'static str,
        cspa: Option<CspaConfig>,
        mean_over: String,
        mean_sequences: usize,
    ) -> Self {
        DirectPath {
            name,
            cspa,
            mean_over,
            mean_sequences,
            means: Vec::new(),
            heads: Vec::new(),
            function: Vec::new(),
            seq_len: 0,
            lengths: Vec::new(),
            tokens: Vec::new(),
            rows: TokenRows::default(),
            orig: TokenRows::default(),
            pending: None,
        }
    }

    fn heads_of(&self, ctx: &RunContext) -> Vec<(usize, usize)> {
        match &self.cspa {
            Some(c) => c.heads.clone(),
            None => ctx.heads.to_vec(),
        }
    }

    fn request(&self, layer: usize) -> MeanRequest {
        MeanRequest {
            dataset: self.mean_over.clone(),
            hook: block_hook(layer, "attn.hook_z"),
            per_position: true,
            max_sequences: Some(self.mean_sequences),
        }
    }

    fn cols(&self) -> &'static [&'static str] {
        if self.cspa.is_some() {
            CSPA_COLS
        } else {
            ABL_COLS
        }
    }

    /// Sets the means directly (tests; the engine calls [`Metric::set_means`]).
    pub fn set_head_means(&mut self, ctx: &RunContext, means: &Means) -> Result<()> {
        self.heads = self.heads_of(ctx);
        self.means = self
            .heads
            .iter()
            .map(|&(l, h)| {
                let req = self.request(l);
                let m = means.get(&req).ok_or_else(|| Error::Metric {
                    metric: self.name.into(),
                    msg: format!(
                        "no mean of {} over '{}' was computed",
                        req.hook, req.dataset
                    ),
                })?;
                let w_o = ctx.params.blocks[l].attn.w_o.index_axis(Axis(0), h);
                let s = m.shape()[0];
                mean_result(m, h, s, w_o).map_err(|e| Error::Metric {
                    metric: self.name.into(),
                    msg: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

impl Metric for DirectPath {
    fn name(&self) -> &str {
        self.name
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let n = ctx.cfg.n_layers;
        let mut hooks = vec![
            "ln_final.hook_scale".to_string(),
            LOGITS.to_string(),
            block_hook(n - 1, "hook_resid_post"),
        ];
        for (l, _) in self.heads_of(ctx) {
            hooks.push(block_hook(l, "attn.hook_z"));
            if self.cspa.is_some() {
                hooks.push(block_hook(l, "hook_resid_pre"));
                hooks.push(block_hook(l, "attn.hook_v"));
                hooks.push(block_hook(l, "attn.hook_pattern"));
            }
        }
        hooks.sort();
        hooks.dedup();
        hooks
    }

    fn mean_requests(&self, ctx: &RunContext) -> Vec<MeanRequest> {
        let mut r: Vec<MeanRequest> = self
            .heads_of(ctx)
            .iter()
            .map(|&(l, _)| self.request(l))
            .collect();
        r.dedup();
        r
    }

    fn set_means(&mut self, means: &Means) -> Result<()> {
        // The engine hands the means before any dataset; the heads' results need the
        // weights, so they are made at `start_dataset` from the kept copy.
        self.pending = Some(means.clone());
        Ok(())
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        if let Some(m) = self.pending.take() {
            self.set_head_means(ctx, &m)?;
        }
        // No means is only an error where they are read (`batch`): a merge of shards or a
        // resumed run past its last batch restores states and finishes without them, so the
        // heads do not wait for the means either.
        self.heads = self.heads_of(ctx);
        let s = dataset.seq_len();
        if let Some(short) = self.means.iter().find(|m| m.nrows() < s) {
            return Err(Error::Metric {
                metric: self.name.into(),
                msg: format!(
                    "dataset '{}' has sequences of {s} tokens, the mean over '{}' only {} positions",
                    dataset.name,
                    self.mean_over,
                    short.nrows()
                ),
            });
        }
        if let Some(c) = &self.cspa {
            self.function = direct::function_word_ids(&c.function_words, ctx.cfg.d_vocab, ctx.bos);
        }
        self.seq_len = s;
        self.lengths = dataset.lengths.clone();
        self.tokens = dataset.tokens.iter().copied().collect();
        self.rows = TokenRows::new(self.cols(), self.heads.len(), s);
        self.orig = TokenRows::new(&["loss"], 1, s);
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        if self.means.is_empty() {
            return Err(Error::Metric {
                metric: self.name.into(),
                msg: format!("the mean over '{}' was not computed", self.mean_over),
            });
        }
        let which = match &self.cspa {
            Some(c) => Which::Cspa(c, &self.function),
            None => Which::Ablation,
        };
        let op = Values {
            ctx,
            batch,
            heads: &self.heads,
            means: &self.means,
            which,
        };
        let per_head = batch.cache.run(&op)?;
        for (hi, seqs) in per_head.iter().enumerate() {
            for cols in seqs {
                for (c, vals) in cols.iter().enumerate() {
                    self.rows.push(c, hi, vals);
                }
            }
        }
        for l in batch.cache.run(&OrigLoss(batch))? {
            self.orig.push(0, 0, &l);
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let name = self.name;
        let s = self.seq_len;
        let lens = &self.lengths;
        let kl_n = |i: usize| lens[i];
        let loss_n = |i: usize| lens[i].saturating_sub(1);
        let (loss_orig, _) = direct::pooled(self.orig.get(0, 0), s, loss_n);
        let cspa = self.cspa.is_some();
        let mut summary = if cspa {
            Table::new(
                name,
                &[
                    "layer",
                    "head",
                    "effect_explained",
                    "kl_cspa",
                    "kl_ablated",
                    "loss_orig",
                    "loss_cspa",
                    "loss_ablated",
                    "n_tokens",
                ],
            )
            .per_head("effect_explained")
        } else {
            Table::new(
                name,
                &[
                    "layer",
                    "head",
                    "loss_orig",
                    "loss",
                    "increase",
                    "kl",
                    "n_tokens",
                ],
            )
            .per_head("kl")
        };
        let per_cols: Vec<&str> = if cspa {
            vec![
                "layer",
                "head",
                "seq",
                "pos",
                "token",
                "value",
                "kl_ablated",
                "loss_cspa",
                "loss_ablated",
            ]
        } else {
            vec!["layer", "head", "seq", "pos", "token", "value", "loss"]
        };
        let mut per_pos = Table::new(format!("{name}_per_position"), &per_cols);
        let text = ctx.token_texts(&self.tokens);
        for (hi, &(l, h)) in self.heads.iter().enumerate() {
            let col = |c: usize| self.rows.get(c, hi);
            if cspa {
                let (kl_c, n_tok) = direct::pooled(col(0), s, kl_n);
                let (kl_a, _) = direct::pooled(col(1), s, kl_n);
                let (loss_c, _) = direct::pooled(col(2), s, loss_n);
                let (loss_a, _) = direct::pooled(col(3), s, loss_n);
                summary.push(vec![
                    l.into(),
                    h.into(),
                    // get_performance_recovered: 1 - mean(kl_cspa) / mean(kl_ablated).
                    Value::Float(1.0 - kl_c / kl_a),
                    Value::Float(kl_c),
                    Value::Float(kl_a),
                    Value::Float(loss_orig),
                    Value::Float(loss_c),
                    Value::Float(loss_a),
                    n_tok.into(),
                ]);
            } else {
                let (kl, n_tok) = direct::pooled(col(0), s, kl_n);
                let (loss, _) = direct::pooled(col(1), s, loss_n);
                summary.push(vec![
                    l.into(),
                    h.into(),
                    Value::Float(loss_orig),
                    Value::Float(loss),
                    Value::Float(loss - loss_orig),
                    Value::Float(kl),
                    n_tok.into(),
                ]);
            }
            for (i, &len) in lens.iter().enumerate() {
                for p in 0..len.min(s) {
                    let e = i * s + p;
                    let tok = self.tokens[e];
                    let mut row: Vec<Value> = vec![
                        l.into(),
                        h.into(),
                        i.into(),
                        p.into(),
                        text[&tok].as_str().into(),
                        col(0)[e].into(),
                    ];
                    // The last real position predicts nothing: no loss there.
                    let loss = |c: usize| -> Value {
                        if p + 1 < len {
                            col(c)[e].into()
                        } else {
                            Value::Float(f64::NAN)
                        }
                    };
                    if cspa {
                        row.push(col(1)[e].into());
                        row.push(loss(2));
                        row.push(loss(3));
                    } else {
                        row.push(loss(1));
                    }
                    per_pos.push(row);
                }
            }
        }
        let per_pos = if cspa {
            per_pos
                .undefined_as_nan("loss_cspa")
                .undefined_as_nan("loss_ablated")
        } else {
            per_pos.undefined_as_nan("loss")
        };
        Ok(vec![summary, per_pos])
    }

    fn save_state(&self) -> Result<State> {
        let mut st = State::new();
        self.rows.save("rows", &mut st);
        self.orig.save("orig", &mut st);
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, _dataset: &Dataset, st: &State) -> Result<()> {
        self.rows.merge(self.name, "rows", st)?;
        self.orig.merge(self.name, "orig", st)
    }
}

/// The function-word ids a `function_words` option names: `"paper"` (the paper's list),
/// `"none"`, or a JSON file of GPT-2-style token ids.
pub fn function_words_option(
    value: &str,
    spec_dir: Option<&std::path::Path>,
) -> std::result::Result<Vec<u32>, String> {
    match value {
        "paper" => Ok(direct::PAPER_FUNCTION_WORDS.to_vec()),
        "none" => Ok(Vec::new()),
        path => {
            let p = match spec_dir {
                Some(d) => d.join(path),
                None => std::path::PathBuf::from(path),
            };
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            serde_json::from_str::<Vec<u32>>(&text)
                .map_err(|e| format!("{} is not a JSON list of token ids: {e}", p.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn kept_pairs_follow_the_papers_rules() {
        // 4 positions, token 9 is a function word, token 5 repeats.
        let tokens = array![9u32, 5, 7, 5];
        let mut function = vec![false; 10];
        function[9] = true;
        let scores = array![
            [1.0f32, 0., 0., 0.],
            [1.0, 2.0, 0., 0.],
            [1.0, 2.0, 3.0, 0.],
            [1.0, 2.0, 1.5, 2.0],
        ];
        let keep = kept_pairs(scores.view(), tokens.view(), &function, 0.5);
        // d = 0: only the function word is eligible: K-th value -1e9, every pair kept.
        assert!(keep.row(0).iter().all(|&k| k));
        // d = 1: K = 1, the top is 5 (2.0).
        assert_eq!(keep.row(1).to_vec(), vec![false, true, false, false]);
        // d = 2: K = 2 of {5: 2.0, 7: 3.0}.
        assert_eq!(keep.row(2).to_vec(), vec![false, true, true, false]);
        // d = 3: K = 2 of first occurrences {5: 2.0, 7: 1.5}; the repeat of 5 kept too.
        assert_eq!(keep.row(3).to_vec(), vec![false, true, true, true]);
    }
}
