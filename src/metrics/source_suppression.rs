//! `source_suppression`: how much a head's output suppresses the logits of the tokens it
//! attends to (`docs/metrics.md` §1, the notebook's `return_new_loss=False` path).
//!
//! Owns: the per-head, per-sequence and per-position values and their tables. Reads
//! `blocks.L.attn.hook_v`, `blocks.L.attn.hook_pattern` (every selected layer) and
//! `ln_final.hook_scale`, all from the run's single forward pass per batch. Must not: run the
//! model or write files.
//!
//! Cost: the notebook computes `r = v @ W_O` ([K, d_model]) then `r . u` per head. Here
//! `c[k] = v[k] . (W_O[h] @ u_k)`, and `W_O @ u_k` for all heads of a layer is one matmul
//! `U_tok [N, d_model] @ W_O_flatᵀ [d_model, H * d_head]`, shared by every head.

use ndarray::{Array1, Array2, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use super::device;
pub use super::ops::{source_coefficients, unembed_rows};
use super::state::{Array, State};
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::block_hook;
use crate::output::{Table, Value};
use crate::seam::{DeviceActs, Op};
use dfdx::prelude::Device;

/// One head's values (metrics.md §1): `per_position [B, S]` and `per_sequence [B]`.
/// `c`: `[B, S]` source coefficients, `pattern`: `[B, Q, K]`, `scale`: `[B, S]`.
pub fn head_values(
    c: ArrayView2<f32>,
    pattern: ArrayView3<f32>,
    scale: ArrayView2<f32>,
    tokens: ArrayView2<u32>,
    bos: u32,
    only_negative: bool,
) -> (Array2<f32>, Array1<f32>) {
    let (b, s) = c.dim();
    let mut per_position = Array2::<f32>::zeros((b, s));
    let mut per_sequence = Array1::<f32>::zeros(b);
    for i in 0..b {
        // BOS, and right padding (which GPT-2 fills with the BOS id), are masked.
        let m: Vec<f32> = tokens
            .row(i)
            .iter()
            .map(|&t| if t != bos { 1.0 } else { 0.0 })
            .collect();
        let ci: Vec<f32> = c
            .row(i)
            .iter()
            .map(|&x| if only_negative { x.min(0.0) } else { x })
            .collect();
        let mut w = vec![0f32; s];
        let mut pp = per_position.row_mut(i);
        for q in 0..s {
            if m[q] == 0.0 {
                continue;
            }
            let inv_scale = 1.0 / scale[[i, q]];
            // Causal: pattern[q, k] is exactly 0 for k > q.
            for k in 0..=q {
                let a = pattern[[i, q, k]] * m[k];
                pp[k] += ci[k] * a * inv_scale;
                w[k] += a;
            }
        }
        let total: f32 = w.iter().sum();
        let weighted: f32 = pp.iter().zip(&w).map(|(p, w)| p * w).sum();
        // A sequence with no non-BOS attention gives 0/0 = NaN: reported, not hidden.
        per_sequence[i] = weighted / total;
    }
    (per_position, per_sequence)
}

/// One batch's values for every selected head (in `ctx.heads` order), computed where the
/// activations are: per head `(per_position [B, S], per_sequence [B])`.
struct Values<'a, 'c, 'b> {
    ctx: &'a RunContext<'c>,
    batch: &'a BatchView<'b>,
    only_negative: bool,
}

impl Op for Values<'_, '_, '_> {
    type Output = Vec<(Array2<f32>, Array1<f32>)>;

    fn host(&self) -> Result<Self::Output> {
        let (ctx, batch) = (self.ctx, self.batch);
        let scale = batch.final_scale()?;
        let (tokens, only_negative) = (batch.tokens, self.only_negative);
        let u_tok = unembed_rows(ctx.params.w_u.view(), tokens);
        let mut out = Vec::with_capacity(ctx.heads.len());
        for (layer, heads) in ctx.heads_by_layer() {
            let v = batch.activation::<ndarray::Ix4>(&block_hook(layer, "attn.hook_v"))?;
            let pattern =
                batch.activation::<ndarray::Ix4>(&block_hook(layer, "attn.hook_pattern"))?;
            let c = source_coefficients(v, ctx.params.blocks[layer].attn.w_o.view(), u_tok.view());
            let results: Vec<(Array2<f32>, Array1<f32>)> = heads
                .par_iter()
                .map(|&h| {
                    head_values(
                        c.index_axis(Axis(2), h),
                        pattern.index_axis(Axis(1), h),
                        scale,
                        tokens,
                        ctx.bos,
                        only_negative,
                    )
                })
                .collect();
            out.extend(results);
        }
        Ok(out)
    }

    fn device<D: Device<f32> + 'static>(&self, acts: &DeviceActs<D>) -> Result<Self::Output> {
        let tokens = self.batch.tokens;
        let u_tok = device::unembed_rows(acts, tokens);
        let mut out = Vec::with_capacity(self.ctx.heads.len());
        for (layer, heads) in self.ctx.heads_by_layer() {
            out.extend(device::source_suppression_layer(
                acts,
                layer,
                &heads,
                tokens,
                &u_tok,
                self.ctx.bos,
                self.only_negative,
            )?);
        }
        Ok(out)
    }
}

/// Per-head accumulators for one dataset.
struct HeadState {
    per_sequence: Vec<f32>,
    /// `[seq][pos]` flattened, seq_len per sequence.
    per_position: Vec<f32>,
}

/// The `source_suppression` metric.
pub struct SourceSuppression {
    only_negative: bool,
    seq_len: usize,
    heads: Vec<HeadState>,
    tokens: Vec<u32>,
}

impl SourceSuppression {
    pub fn new(only_negative: bool) -> Self {
        SourceSuppression {
            only_negative,
            seq_len: 0,
            heads: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl Metric for SourceSuppression {
    fn name(&self) -> &str {
        "source_suppression"
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let mut hooks: Vec<String> = ctx
            .heads_by_layer()
            .into_iter()
            .flat_map(|(l, _)| {
                [
                    block_hook(l, "attn.hook_v"),
                    block_hook(l, "attn.hook_pattern"),
                ]
            })
            .collect();
        hooks.push("ln_final.hook_scale".into());
        hooks
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        self.seq_len = dataset.seq_len();
        self.tokens = dataset.tokens.iter().copied().collect();
        self.heads = ctx
            .heads
            .iter()
            .map(|_| HeadState {
                per_sequence: Vec::new(),
                per_position: Vec::new(),
            })
            .collect();
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let op = Values {
            ctx,
            batch,
            only_negative: self.only_negative,
        };
        let results = batch.cache.run(&op)?;
        for (st, (pp, ps)) in self.heads.iter_mut().zip(results) {
            st.per_sequence.extend(ps.iter());
            st.per_position.extend(pp.iter());
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let mut scores = Table::new(
            "source_suppression",
            &[
                "layer",
                "head",
                "score",
                "score_negative",
                "n_sequences",
                "n_undefined",
            ],
        )
        .per_head("score");
        // NaN there is a sequence with no non-BOS attention (0/0, metrics.md §1), counted in
        // `n_undefined`: a value, not a failure.
        let mut per_seq = Table::new(
            "source_suppression_per_sequence",
            &["layer", "head", "seq", "value"],
        )
        .undefined_as_nan("value");
        let mut per_pos = Table::new(
            "source_suppression_per_position",
            &[
                "layer",
                "head",
                "seq",
                "pos",
                "token",
                "token_text",
                "value",
            ],
        );
        let text = ctx.token_texts(&self.tokens);
        for (&(l, h), st) in ctx.heads.iter().zip(&self.heads) {
            let defined: Vec<f32> = st
                .per_sequence
                .iter()
                .copied()
                .filter(|x| x.is_finite())
                .collect();
            // The notebook's score: the mean over sequences of per_sequence. Sequences whose
            // masked attention sums to 0 are undefined (0/0) and left out, and counted.
            let score = defined.iter().map(|&x| x as f64).sum::<f64>() / defined.len() as f64;
            scores.push(vec![
                l.into(),
                h.into(),
                Value::Float(score),
                Value::Float(score.min(0.0)),
                defined.len().into(),
                (st.per_sequence.len() - defined.len()).into(),
            ]);
            for (seq, &v) in st.per_sequence.iter().enumerate() {
                per_seq.push(vec![l.into(), h.into(), seq.into(), v.into()]);
            }
            for (i, &v) in st.per_position.iter().enumerate() {
                let tok = self.tokens[i];
                per_pos.push(vec![
                    l.into(),
                    h.into(),
                    (i / self.seq_len).into(),
                    (i % self.seq_len).into(),
                    // The id, as in loss.csv, and its text for reading.
                    Value::Int(i64::from(tok)),
                    text[&tok].as_str().into(),
                    v.into(),
                ]);
            }
        }
        Ok(vec![scores, per_seq, per_pos])
    }

    /// Per head (in order) the per-sequence values and per-position rows seen so far.
    fn save_state(&self) -> Result<State> {
        let mut st = State::new();
        st.put(
            "per_sequence",
            Array::F32(
                self.heads
                    .iter()
                    .flat_map(|h| h.per_sequence.iter().copied())
                    .collect(),
            ),
        )
        .put(
            "per_position",
            Array::F32(
                self.heads
                    .iter()
                    .flat_map(|h| h.per_position.iter().copied())
                    .collect(),
            ),
        );
        Ok(st)
    }

    /// Appends each head's rows: states merged in sequence order rebuild the whole dataset.
    fn merge_state(&mut self, _ctx: &RunContext, dataset: &Dataset, st: &State) -> Result<()> {
        let name = self.name().to_string();
        let per_seq = st.f32(&name, "per_sequence")?;
        let per_pos = st.f32(&name, "per_position")?;
        let n_heads = self.heads.len();
        let m = per_seq.len().checked_div(n_heads).unwrap_or(0);
        if m * n_heads != per_seq.len() || per_pos.len() != per_seq.len() * self.seq_len {
            return Err(Error::Metric {
                metric: name,
                msg: format!(
                    "saved state does not fit {n_heads} heads x {} positions (other heads or dataset?)",
                    self.seq_len
                ),
            });
        }
        let seen = self.heads.first().map_or(0, |h| h.per_sequence.len());
        if seen + m > dataset.n_sequences() {
            return Err(Error::Metric {
                metric: name,
                msg: format!(
                    "saved state has {} sequences per head, more than dataset '{}' has ({})",
                    seen + m,
                    dataset.name,
                    dataset.n_sequences()
                ),
            });
        }
        for (i, h) in self.heads.iter_mut().enumerate() {
            h.per_sequence
                .extend_from_slice(&per_seq[i * m..(i + 1) * m]);
            let w = m * self.seq_len;
            h.per_position
                .extend_from_slice(&per_pos[i * w..(i + 1) * w]);
        }
        Ok(())
    }
}
