//! `direct_logit_attribution` (`docs/metrics.md` §9): each selected head's direct effect on
//! the next token's logit, `result / final_scale · W_U[:, target]`, as TL's
//! `cache.apply_ln_to_stack` (centre, divide by the unchanged run's `ln_final.hook_scale`)
//! and `cache.logit_attrs` compute it; with dataset answers also on
//! `logit[correct] − logit[wrong]` at the last real position.
//!
//! Owns: the metric, its per-head, per-sequence and per-position tables and its partial
//! state. Reads `blocks.L.attn.hook_z` and `ln_final.hook_scale`. Must not: run the model
//! or write files.
//!
//! Cost per head and token: `z · (W_O[h] ũ)`, with `ũ = W_U[:, t] − mean(W_U[:, t])` (the
//! centring moved onto the direction), so `d_head · d_model` per distinct target, never the
//! `[S, D]` result.

use ndarray::{s, Axis, Ix4};
use rayon::prelude::*;

use super::direct::{self, TokenRows};
use super::state::State;
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::Result;
use crate::hooks::block_hook;
use crate::output::{Table, Value};
use crate::seam::{DeviceActs, Op};
use dfdx::prelude::Device;

/// A direction in the residual stream centred over d_model (TL's LayerNorm centring moved
/// from the residual onto the direction: `(r − mean r) · u = r · (u − mean u)`).
fn centred(u: ndarray::ArrayView1<f32>) -> Vec<f32> {
    let m = u.iter().map(|&x| x as f64).sum::<f64>() / u.len().max(1) as f64;
    u.iter().map(|&x| x - m as f32).collect()
}

/// Per head: per sequence `(dla [S] (last 0), logit_diff or NaN)`.
type HeadValues = Vec<Vec<(Vec<f32>, f32)>>;

struct Values<'a, 'c, 'b> {
    ctx: &'a RunContext<'c>,
    batch: &'a BatchView<'b>,
}

impl Values<'_, '_, '_> {
    fn host_values(&self) -> Result<HeadValues> {
        let (ctx, batch) = (self.ctx, self.batch);
        let scale = batch.final_scale()?;
        let (b, s) = batch.tokens.dim();
        let w_u = ctx.params.w_u.view();
        let answers = batch.dataset.answers.as_ref();
        let (tokens, lengths, start) = (batch.tokens, &batch.dataset.lengths, batch.start);
        let mut out = Vec::new();
        for (layer, heads) in ctx.heads_by_layer() {
            let z = batch.activation::<Ix4>(&block_hook(layer, "attn.hook_z"))?;
            let w_o = &ctx.params.blocks[layer].attn.w_o;
            for &h in &heads {
                let w_oh = w_o.index_axis(Axis(0), h); // [dh, D]
                let rows: Vec<(Vec<f32>, f32)> = (0..b)
                    .into_par_iter()
                    .map(|i| {
                        let zi = z.slice(s![i, .., h, ..]);
                        let len = lengths[start + i].min(s);
                        let dir = |u: Vec<f32>| -> ndarray::Array1<f32> {
                            w_oh.dot(&ndarray::Array1::from(u))
                        };
                        let mut dla = vec![0f32; s];
                        for q in 0..len.saturating_sub(1) {
                            let t = tokens[[i, q + 1]] as usize;
                            let d = dir(centred(w_u.column(t)));
                            dla[q] = zi.row(q).dot(&d) / scale[[i, q]];
                        }
                        let ld = match answers {
                            Some(a) if len > 0 => {
                                let [c, w] = a[start + i];
                                let diff: Vec<f32> = w_u
                                    .column(c as usize)
                                    .iter()
                                    .zip(w_u.column(w as usize))
                                    .map(|(x, y)| x - y)
                                    .collect();
                                let d = dir(centred(ndarray::ArrayView1::from(&diff)));
                                zi.row(len - 1).dot(&d) / scale[[i, len - 1]]
                            }
                            _ => f32::NAN,
                        };
                        (dla, ld)
                    })
                    .collect();
                out.push(rows);
            }
        }
        Ok(out)
    }
}

impl Op for Values<'_, '_, '_> {
    type Output = HeadValues;
    fn host(&self) -> Result<HeadValues> {
        self.host_values()
    }
    /// Not yet written in dfdx ops: reads the two hooks through the cache's host views.
    fn device<D: Device<f32> + 'static>(&self, _acts: &DeviceActs<D>) -> Result<HeadValues> {
        self.host_values()
    }
}

/// The `direct_logit_attribution` metric.
#[derive(Default)]
pub struct DirectLogitAttribution {
    seq_len: usize,
    lengths: Vec<usize>,
    tokens: Vec<u32>,
    has_answers: bool,
    per_token: TokenRows,
    per_seq: TokenRows,
}

impl Metric for DirectLogitAttribution {
    fn name(&self) -> &str {
        "direct_logit_attribution"
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let mut h: Vec<String> = ctx
            .heads_by_layer()
            .into_iter()
            .map(|(l, _)| block_hook(l, "attn.hook_z"))
            .collect();
        h.push("ln_final.hook_scale".into());
        h
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        self.seq_len = dataset.seq_len();
        self.lengths = dataset.lengths.clone();
        self.tokens = dataset.tokens.iter().copied().collect();
        self.has_answers = dataset.answers.is_some();
        self.per_token = TokenRows::new(&["dla"], ctx.heads.len(), self.seq_len);
        self.per_seq = TokenRows::new(&["logit_diff"], ctx.heads.len(), 1);
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let vals = batch.cache.run(&Values { ctx, batch })?;
        for (hi, seqs) in vals.into_iter().enumerate() {
            for (dla, ld) in seqs {
                self.per_token.push(0, hi, &dla);
                self.per_seq.push(0, hi, &[ld]);
            }
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let s = self.seq_len;
        let lens = &self.lengths;
        // The same columns for every dataset (one CSV holds them all): `logit_diff` is NaN,
        // counted as undefined, on a dataset without answers.
        let mut summary = Table::new(
            "direct_logit_attribution",
            &["layer", "head", "dla", "n_tokens", "logit_diff"],
        )
        .per_head("dla")
        .undefined_as_nan("logit_diff");
        let mut per_seq = Table::new(
            "direct_logit_attribution_per_sequence",
            &["layer", "head", "seq", "value", "logit_diff"],
        )
        .undefined_as_nan("value")
        .undefined_as_nan("logit_diff");
        let mut per_pos = Table::new(
            "direct_logit_attribution_per_position",
            &["layer", "head", "seq", "pos", "token", "value"],
        )
        .undefined_as_nan("value");
        let text = ctx.token_texts(&self.tokens);
        for (hi, &(l, h)) in ctx.heads.iter().enumerate() {
            let dla = self.per_token.get(0, hi);
            let (mean, n) = direct::pooled(dla, s, |i| lens[i].saturating_sub(1));
            let ld = self.per_seq.get(0, hi);
            let mut row: Vec<Value> = vec![l.into(), h.into(), Value::Float(mean), n.into()];
            row.push(Value::Float(if self.has_answers {
                ld.iter().map(|&x| x as f64).sum::<f64>() / ld.len().max(1) as f64
            } else {
                f64::NAN
            }));
            summary.push(row);
            for (i, &len) in lens.iter().enumerate() {
                let (m, _) = direct::pooled(&dla[i * s..(i + 1) * s], s, |_| len.saturating_sub(1));
                per_seq.push(vec![
                    l.into(),
                    h.into(),
                    i.into(),
                    Value::Float(m),
                    Value::Float(ld[i] as f64),
                ]);
                for p in 0..len.min(s) {
                    let e = i * s + p;
                    let v = if p + 1 < len { dla[e] as f64 } else { f64::NAN };
                    per_pos.push(vec![
                        l.into(),
                        h.into(),
                        i.into(),
                        p.into(),
                        text[&self.tokens[e]].as_str().into(),
                        Value::Float(v),
                    ]);
                }
            }
        }
        Ok(vec![summary, per_seq, per_pos])
    }

    fn save_state(&self) -> Result<State> {
        let mut st = State::new();
        self.per_token.save("dla", &mut st);
        self.per_seq.save("seq", &mut st);
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, _dataset: &Dataset, st: &State) -> Result<()> {
        self.per_token
            .merge("direct_logit_attribution", "dla", st)?;
        self.per_seq.merge("direct_logit_attribution", "seq", st)
    }
}
