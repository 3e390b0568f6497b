//! `logit_lens` (`docs/metrics.md` §10): every layer's residual stream read as the model's
//! prediction. Stage 0 is `blocks.0.hook_resid_pre` (the embeddings), stage k ≥ 1 is
//! `blocks.{k-1}.hook_resid_post`; each goes through `ln_final` with its own LayerNorm
//! scale (recomputed, not the final one) and the unembedding. The last stage is the model's
//! own logits.
//!
//! Owns: the metric, its per-layer and per-position tables (loss on the next token and the
//! target's rank, 1 = top), and its partial state. Must not: run the model or write files.
//! The layers × positions picture is drawn by `report::lens` from the per-position table.
//!
//! Cost: one unembedding per stage and token (`n_layers + 1` in all), `ROWS` rows at a time:
//! never a `[tokens, vocab]` array.

use ndarray::{ArrayView1, ArrayView2, Axis, Ix3};
use rayon::prelude::*;

use super::direct::{self, TokenRows, ROWS};
use super::ops::kernels::{self, Par};
use super::state::State;
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::Result;
use crate::hooks::block_hook;
use crate::model::ModelConfig;
use crate::output::{Table, Value};
use crate::seam::{DeviceActs, Op};
use dfdx::prelude::Device;

/// The hook of stage `k` (0 = `blocks.0.hook_resid_pre`).
pub fn stage_hook(k: usize) -> String {
    if k == 0 {
        block_hook(0, "hook_resid_pre")
    } else {
        block_hook(k - 1, "hook_resid_post")
    }
}

/// `(loss [S], rank [S])` of one sequence's residual stream `x` `[S, D]` at one stage
/// (position S − 1 predicts nothing: 0). `ln_final` is applied as TL does: centre, divide
/// by `sqrt(mean(x²) + eps)`, then its weight and bias when not folded.
pub fn lens_values(
    x: ArrayView2<f32>,
    tokens: ArrayView1<u32>,
    ctx_params: &crate::model::Params,
    cfg: &ModelConfig,
) -> (Vec<f32>, Vec<f32>) {
    let (s, d) = x.dim();
    let w_u = ctx_params.w_u.as_standard_layout();
    let v = w_u.ncols();
    let w_u = w_u.as_slice().expect("standard layout");
    let b_u = ctx_params.b_u.to_vec();
    let mut loss = vec![0f32; s];
    let mut rank = vec![0f32; s];
    let rows_n = s.saturating_sub(1);
    let mut buf = vec![0f32; ROWS * d];
    let mut out = vec![0f32; ROWS * v];
    for r0 in (0..rows_n).step_by(ROWS) {
        let n = ROWS.min(rows_n - r0);
        for i in 0..n {
            let row = x.row(r0 + i);
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / d as f32;
            let sc = (var + cfg.eps as f32).sqrt();
            for j in 0..d {
                let mut y = (row[j] - mean) / sc;
                if let Some(ln) = &ctx_params.ln_final {
                    y = y * ln.w[j] + ln.b[j];
                }
                buf[i * d + j] = y;
            }
            out[i * v..(i + 1) * v].copy_from_slice(&b_u);
        }
        kernels::sgemm_into(
            n,
            d,
            v,
            &buf[..n * d],
            w_u,
            &mut out[..n * v],
            true,
            Par::One,
        );
        for i in 0..n {
            let q = r0 + i;
            let l = &out[i * v..(i + 1) * v];
            let t = l[tokens[q + 1] as usize];
            loss[q] = kernels::log_sum_exp(l) - t;
            rank[q] = 1.0 + l.iter().filter(|&&a| a > t).count() as f32;
        }
    }
    (loss, rank)
}

/// Per stage: per sequence `(loss, rank)`.
type StageValues = Vec<Vec<(Vec<f32>, Vec<f32>)>>;

struct Values<'a, 'c, 'b> {
    ctx: &'a RunContext<'c>,
    batch: &'a BatchView<'b>,
}

impl Values<'_, '_, '_> {
    fn host_values(&self) -> Result<StageValues> {
        let (ctx, batch) = (self.ctx, self.batch);
        let tokens = batch.tokens;
        let b = tokens.nrows();
        (0..=ctx.cfg.n_layers)
            .map(|k| {
                let x = batch.activation::<Ix3>(&stage_hook(k))?;
                Ok((0..b)
                    .into_par_iter()
                    .map(|i| {
                        lens_values(x.index_axis(Axis(0), i), tokens.row(i), ctx.params, ctx.cfg)
                    })
                    .collect())
            })
            .collect()
    }
}

impl Op for Values<'_, '_, '_> {
    type Output = StageValues;
    fn host(&self) -> Result<StageValues> {
        self.host_values()
    }
    /// Not yet written in dfdx ops: reads the residual streams through the host views.
    fn device<D: Device<f32> + 'static>(&self, _acts: &DeviceActs<D>) -> Result<StageValues> {
        self.host_values()
    }
}

/// The `logit_lens` metric.
#[derive(Default)]
pub struct LogitLens {
    seq_len: usize,
    lengths: Vec<usize>,
    tokens: Vec<u32>,
    /// Columns `loss`, `rank`; one "head" per stage.
    rows: TokenRows,
}

impl Metric for LogitLens {
    fn name(&self) -> &str {
        "logit_lens"
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        (0..=ctx.cfg.n_layers).map(stage_hook).collect()
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        self.seq_len = dataset.seq_len();
        self.lengths = dataset.lengths.clone();
        self.tokens = dataset.tokens.iter().copied().collect();
        self.rows = TokenRows::new(&["loss", "rank"], ctx.cfg.n_layers + 1, self.seq_len);
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        for (k, seqs) in batch
            .cache
            .run(&Values { ctx, batch })?
            .into_iter()
            .enumerate()
        {
            for (loss, rank) in seqs {
                self.rows.push(0, k, &loss);
                self.rows.push(1, k, &rank);
            }
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let s = self.seq_len;
        let lens = &self.lengths;
        let n = |i: usize| lens[i].saturating_sub(1);
        let mut summary = Table::new(
            "logit_lens",
            &["layer", "hook", "loss", "mean_rank", "n_tokens"],
        );
        let mut per_pos = Table::new(
            "logit_lens_per_position",
            &[
                "layer", "hook", "seq", "pos", "token", "target", "loss", "rank",
            ],
        );
        let text = ctx.token_texts(&self.tokens);
        for k in 0..=ctx.cfg.n_layers {
            let (loss, rank) = (self.rows.get(0, k), self.rows.get(1, k));
            let (ml, count) = direct::pooled(loss, s, n);
            let (mr, _) = direct::pooled(rank, s, n);
            summary.push(vec![
                k.into(),
                stage_hook(k).into(),
                Value::Float(ml),
                Value::Float(mr),
                count.into(),
            ]);
            for (i, _) in lens.iter().enumerate() {
                for p in 0..n(i) {
                    let e = i * s + p;
                    per_pos.push(vec![
                        k.into(),
                        stage_hook(k).into(),
                        i.into(),
                        p.into(),
                        text[&self.tokens[e]].as_str().into(),
                        text[&self.tokens[e + 1]].as_str().into(),
                        loss[e].into(),
                        rank[e].into(),
                    ]);
                }
            }
        }
        Ok(vec![summary, per_pos])
    }

    fn save_state(&self) -> Result<State> {
        let mut st = State::new();
        self.rows.save("rows", &mut st);
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, _dataset: &Dataset, st: &State) -> Result<()> {
        self.rows.merge("logit_lens", "rows", st)
    }
}
