//! One `[[intervention]]` run as a metric: per batch, every unit of the sweep resumed from
//! the unchanged pass's residual stream at its layer, and measured.
//!
//! Owns: the per-sequence accumulators of each unit (sums and counts, pooled in sequence
//! order at the end so the table does not depend on `batch_size`), the stacking of a
//! layer's units along the batch axis, and the table. Must not: parse the spec.

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD};

use super::measure::{score, Rows, SeqScore, Unembed};
use super::write::{CachedResid, WriteOp};
use super::{Kind, Plan, Unit, Value};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::ActivationCache;
use crate::means::{MeanRequest, Means};
use crate::metrics::state::Array;
use crate::metrics::{BatchView, Metric, RunContext, State};
use crate::model::ResumeAt;
use crate::output::Table;

/// What a dataset's sweep accumulates.
struct DatasetAcc {
    units: Vec<Unit>,
    /// [unit][sequence]
    scores: Vec<Vec<SeqScore>>,
    orig: Vec<SeqScore>,
    source: Vec<SeqScore>,
    /// Which sequences a batch has scored (shards and resumed runs merge exactly these).
    seen: Vec<u8>,
}

fn flat(v: &[SeqScore]) -> impl Iterator<Item = f64> + '_ {
    v.iter().flat_map(|x| {
        [
            x.loss_sum,
            x.loss_n as f64,
            x.kl_sum,
            x.kl_n as f64,
            x.logit_diff,
        ]
    })
}

fn unflat(v: &[f64], out: &mut [SeqScore], seen: &[u8]) {
    for ((o, c), &s) in out.iter_mut().zip(v.chunks_exact(5)).zip(seen) {
        if s != 0 {
            *o = SeqScore {
                loss_sum: c[0],
                loss_n: c[1] as u64,
                kl_sum: c[2],
                kl_n: c[3] as u64,
                logit_diff: c[4],
            };
        }
    }
}

/// One planned intervention as a metric.
pub struct Sweep {
    plan: Plan,
    /// The source dataset's tokens (patches).
    source_tokens: Option<Array2<u32>>,
    means: BTreeMap<(String, String), ArrayD<f32>>,
    acc: Option<DatasetAcc>,
    /// Most rows a resumed pass runs at once: the rows of a plain pass, times how much
    /// smaller a resumed pass's activations are than a plain pass's logits.
    max_rows: usize,
    n_layers: usize,
}

impl Sweep {
    pub fn new(
        plan: Plan,
        datasets: &[Dataset],
        batch_size: usize,
        seq_len: usize,
        cfg: &crate::model::ModelConfig,
    ) -> Self {
        let source_tokens = plan
            .source
            .as_ref()
            .and_then(|s| datasets.iter().find(|d| &d.name == s))
            .map(|d| d.tokens.clone());
        // A resumed pass keeps no logits ([rows, vocab]); its largest activation is the MLP's
        // [rows, 4 d_model]. Stack units so that it stays under a plain pass's logits.
        let per_row = 8 * cfg.d_model;
        let factor = (cfg.d_vocab / per_row).clamp(1, 8);
        Sweep {
            plan,
            source_tokens,
            means: BTreeMap::new(),
            acc: None,
            max_rows: batch_size.max(1) * seq_len.max(1) * factor,
            n_layers: cfg.n_layers,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn layers(&self, n_layers: usize) -> Vec<usize> {
        let mut l: Vec<usize> = self
            .plan
            .units(n_layers, 1)
            .iter()
            .map(|u| u.layer)
            .collect();
        l.dedup();
        l
    }

    fn targets(&self, dataset: &str) -> bool {
        self.plan.datasets.iter().any(|d| d == dataset)
    }
}

fn last_resid(n_layers: usize) -> String {
    crate::hooks::block_hook(n_layers - 1, "hook_resid_post")
}

impl Metric for Sweep {
    fn name(&self) -> &str {
        &self.plan.name
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let n = ctx.cfg.n_layers;
        let mut out = vec![last_resid(n)];
        for l in self.layers(n) {
            out.push(self.plan.hook.tl(l));
            out.push(self.plan.hook.resume(l).1);
        }
        out.sort();
        out.dedup();
        out
    }

    fn mean_requests(&self, ctx: &RunContext) -> Vec<MeanRequest> {
        let per_position = match self.plan.kind {
            Kind::Ablate(Value::Mean) => false,
            Kind::Ablate(Value::MeanPerPosition) => true,
            _ => return vec![],
        };
        let mut out = Vec::new();
        for t in &self.plan.datasets {
            for l in self.layers(ctx.cfg.n_layers) {
                out.push(MeanRequest {
                    dataset: self.plan.mean_dataset(t).to_string(),
                    hook: self.plan.hook.tl(l),
                    per_position,
                    max_sequences: None,
                });
            }
        }
        out
    }

    fn set_means(&mut self, means: &Means) -> Result<()> {
        let per_position = match self.plan.kind {
            Kind::Ablate(Value::Mean) => false,
            Kind::Ablate(Value::MeanPerPosition) => true,
            _ => return Ok(()),
        };
        for t in self.plan.datasets.clone() {
            let over = self.plan.mean_dataset(&t).to_string();
            for l in self.layers(self.n_layers) {
                let req = MeanRequest {
                    dataset: over.clone(),
                    hook: self.plan.hook.tl(l),
                    per_position,
                    max_sequences: None,
                };
                let m = means.get(&req).ok_or_else(|| Error::Metric {
                    metric: self.plan.name.clone(),
                    msg: format!("no mean of {} over '{over}' was computed", req.hook),
                })?;
                self.means.insert((over.clone(), req.hook), m.clone());
            }
        }
        Ok(())
    }

    /// One pass per intervention (stacked or not) and the source's, as the engine's
    /// progress bar counts them (a unit resumed at `ln_final`'s input runs no layer).
    fn passes_per_batch(&self, ctx: &RunContext, dataset: &Dataset) -> usize {
        let Some(acc) = self.acc.as_ref().filter(|_| self.targets(&dataset.name)) else {
            return 0;
        };
        let n = ctx.cfg.n_layers;
        let units = acc
            .units
            .iter()
            .filter(|u| self.plan.hook.resume(u.layer).0.runs_layers(n))
            .count();
        units + usize::from(self.source_tokens.is_some())
    }

    fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Result<()> {
        if !self.targets(&dataset.name) {
            self.acc = None;
            return Ok(());
        }
        let units = self.plan.units(ctx.cfg.n_layers, dataset.seq_len());
        let n = dataset.n_sequences();
        self.acc = Some(DatasetAcc {
            scores: vec![vec![SeqScore::default(); n]; units.len()],
            units,
            orig: vec![SeqScore::default(); n],
            source: vec![SeqScore::default(); n],
            seen: vec![0; n],
        });
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let layers = self.layers(ctx.cfg.n_layers);
        let Some(acc) = self.acc.as_mut() else {
            return Ok(());
        };
        let model = batch.model.ok_or_else(|| Error::Metric {
            metric: self.plan.name.clone(),
            msg: "an intervention needs the model (run it through the engine)".into(),
        })?;
        let cfg = ctx.cfg;
        let (b, s) = batch.tokens.dim();
        let d = cfg.d_model;
        let nl = cfg.n_layers;
        let m = self.plan.measures;
        let tokens = batch.tokens.as_standard_layout().to_owned();
        let lens = crate::means::seq_lens(tokens.view(), ctx.bos);
        let answers: Vec<Option<[u32; 2]>> = (0..b)
            .map(|i| batch.dataset.answers.as_ref().map(|a| a[batch.start + i]))
            .collect();
        let w_u = ctx.params.w_u.as_standard_layout();
        let b_u = ctx.params.b_u.as_standard_layout();
        let u = Unembed {
            w_u: w_u.as_slice().expect("standard"),
            b_u: b_u.as_slice().expect("standard"),
            d,
            v: cfg.d_vocab,
        };
        let cache = batch.cache;
        // The unchanged residual stream at `name`, where the cache holds it.
        let cached = |c: &ActivationCache, name: String| {
            c.run(&CachedResid {
                cache: c,
                name,
                b,
                s,
                d,
            })
        };

        // The unchanged run: its ln_final output, log-probabilities (for KL) and scores.
        let x_clean =
            model.resume_from(s, ResumeAt::Pre(nl), cached(cache, last_resid(nl))?, None)?;
        let tok_flat = tokens.as_slice().expect("standard");
        let batch_rows = Rows {
            x: &[],
            n_seq: 0,
            s,
            tokens: tok_flat,
            lens: &lens,
            answers: &answers,
            first_changed: None,
        };
        let (orig, clean) = score(&u, m, &batch_rows.over(&x_clean, d), None, true);
        acc.orig[batch.start..batch.start + b].copy_from_slice(&orig);

        acc.seen[batch.start..batch.start + b].fill(1);

        // A patch's source run: the same rows of the source dataset, unchanged.
        let mut source_cache = None;
        if let Some(st) = &self.source_tokens {
            let rows = st
                .slice(ndarray::s![batch.start..batch.start + b, ..])
                .to_owned();
            let mut names: Vec<String> = layers.iter().map(|&l| self.plan.hook.tl(l)).collect();
            names.push(last_resid(nl));
            names.sort();
            names.dedup();
            let c = model.cache_pass(&rows, &names)?;
            let x_src =
                model.resume_from(s, ResumeAt::Pre(nl), cached(&c, last_resid(nl))?, None)?;
            if m.logit_diff {
                let only_ld = super::Measures {
                    logit_diff: true,
                    ..Default::default()
                };
                let (src, _) = score(&u, only_ld, &batch_rows.over(&x_src, d), None, false);
                acc.source[batch.start..batch.start + b].copy_from_slice(&src);
            }
            source_cache = Some(c);
        }

        // A logit difference alone reads each sequence's last row (see below), as a sequence
        // of one position.
        let ones = vec![1usize; b];
        // Every layer's units, resumed from that layer's residual stream, stacked.
        let per_pass = (self.max_rows / (b * s)).max(1);
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (j, unit) in acc.units.iter().enumerate() {
            by_layer.entry(unit.layer).or_default().push(j);
        }
        for (l, js) in by_layer {
            let name = self.plan.hook.tl(l);
            let (at, _) = self.plan.hook.resume(l);
            let mean_key = (
                self.plan.mean_dataset(&batch.dataset.name).to_string(),
                name.clone(),
            );
            let mean = match self.plan.kind {
                Kind::Ablate(Value::Mean | Value::MeanPerPosition) => {
                    let mean = self.means.get(&mean_key).ok_or_else(|| Error::Metric {
                        metric: self.plan.name.clone(),
                        msg: format!("no mean of {} over '{}' was computed", name, mean_key.0),
                    })?;
                    // A mean per position over a longer dataset: its first `s` positions.
                    Some(
                        if matches!(self.plan.kind, Kind::Ablate(Value::MeanPerPosition)) {
                            mean.slice_axis(ndarray::Axis(0), ndarray::Slice::from(0..s))
                                .to_owned()
                        } else {
                            mean.clone()
                        },
                    )
                }
                _ => None,
            };
            for chunk in js.chunks(per_pass) {
                let units: Vec<&Unit> = chunk.iter().map(|&j| &acc.units[j]).collect();
                // The stack's residual streams, written where the activations are (the
                // cache picks the op's host or device body).
                let written = cache.run(&WriteOp {
                    hook: self.plan.hook,
                    kind: self.plan.kind,
                    layer: l,
                    b,
                    s,
                    d,
                    cache,
                    source: source_cache.as_ref(),
                    mean: mean.as_ref(),
                    w_o: Some(ctx.params.blocks[l].attn.w_o.view()),
                    units: &units,
                })?;
                let n_seq = chunk.len() * b;
                let scores = if m.full_vocab() {
                    let x = model.resume_from(s, at, written, None)?;
                    // Every unit of the chunk at once: one unembedding per block of rows,
                    // from each unit's position on (the rows before it are the unchanged
                    // run's).
                    let firsts: Vec<usize> = units
                        .iter()
                        .flat_map(|u| std::iter::repeat(u.pos.unwrap_or(0)).take(b))
                        .collect();
                    let pass_rows = Rows {
                        first_changed: Some(&firsts),
                        ..batch_rows.over(&x, d)
                    };
                    score(&u, m, &pass_rows, clean.as_ref(), false).0
                } else {
                    // The logit difference reads one row per sequence, its last: the last
                    // MLP and ln_final run on those rows alone, which come back as
                    // sequences of one position.
                    let last_rows: Vec<usize> =
                        (0..n_seq).map(|k| k * s + lens[k % b] - 1).collect();
                    let x = model.resume_from(s, at, written, Some(&last_rows))?;
                    let pass_rows = Rows {
                        x: &x,
                        n_seq,
                        s: 1,
                        lens: &ones,
                        first_changed: None,
                        ..batch_rows
                    };
                    score(&u, m, &pass_rows, None, false).0
                };
                for (c, &j) in chunk.iter().enumerate() {
                    acc.scores[j][batch.start..batch.start + b]
                        .copy_from_slice(&scores[c * b..(c + 1) * b]);
                }
            }
        }
        Ok(())
    }

    fn save_state(&self) -> Result<State> {
        let mut st = State::new();
        let Some(acc) = &self.acc else {
            // A dataset it does not change: a state all the same, so shards agree.
            st.put("untouched", Array::U8(vec![1]));
            return Ok(st);
        };
        let scores: Vec<f64> = acc.scores.iter().flat_map(|u| flat(u)).collect();
        st.put("scores", Array::F64(scores))
            .put("orig", Array::F64(flat(&acc.orig).collect()))
            .put("source", Array::F64(flat(&acc.source).collect()))
            .put("seen", Array::U8(acc.seen.clone()));
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, dataset: &Dataset, st: &State) -> Result<()> {
        let name = self.plan.name.clone();
        let Some(acc) = self.acc.as_mut() else {
            return Ok(());
        };
        let seen = st.u8(&name, "seen")?;
        let n = acc.seen.len();
        let scores = st.f64(&name, "scores")?;
        if seen.len() != n || scores.len() != acc.units.len() * n * 5 {
            return Err(Error::Metric {
                metric: name,
                msg: format!(
                    "saved state does not fit dataset '{}' ({} sequences, {} interventions)",
                    dataset.name,
                    n,
                    acc.units.len()
                ),
            });
        }
        for (u, chunk) in acc.scores.iter_mut().zip(scores.chunks_exact(n * 5)) {
            unflat(chunk, u, seen);
        }
        unflat(st.f64(&name, "orig")?, &mut acc.orig, seen);
        unflat(st.f64(&name, "source")?, &mut acc.source, seen);
        for (a, &b) in acc.seen.iter_mut().zip(seen) {
            *a |= b;
        }
        Ok(())
    }

    fn finish_dataset(&mut self, _ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let Some(acc) = self.acc.take() else {
            return Ok(vec![]);
        };
        let m = self.plan.measures;
        let patch = self.plan.kind == Kind::Patch;
        let mut cols: Vec<&str> = vec!["layer"];
        if self.plan.hook.per_head() {
            cols.push("head");
        }
        if self.plan.per_position {
            cols.push("pos");
        }
        if m.loss {
            cols.extend(["loss_orig", "loss", "increase"]);
        }
        if m.kl {
            cols.push("kl");
        }
        if m.logit_diff {
            cols.extend(["logit_diff_orig", "logit_diff"]);
            if patch {
                cols.extend(["logit_diff_source", "recovered"]);
            }
        }
        let mut t = Table::new(self.plan.name.clone(), &cols);
        if self.plan.hook.per_head()
            && !self.plan.together
            && !self.plan.per_position
            && m.logit_diff
        {
            t = t.per_head(if patch { "recovered" } else { "logit_diff" });
        } else if self.plan.hook.per_head()
            && !self.plan.together
            && !self.plan.per_position
            && m.loss
        {
            t = t.per_head("increase");
        }
        let pool = |v: &[SeqScore], f: fn(&SeqScore) -> (f64, u64)| -> f64 {
            let (mut s, mut n) = (0f64, 0u64);
            for x in v {
                let (a, b) = f(x);
                s += a;
                n += b;
            }
            s / n as f64
        };
        let loss = |v: &[SeqScore]| pool(v, |x| (x.loss_sum, x.loss_n));
        let kl = |v: &[SeqScore]| pool(v, |x| (x.kl_sum, x.kl_n));
        let ld = |v: &[SeqScore]| pool(v, |x| (x.logit_diff, 1));
        let (loss_orig, ld_orig, ld_src) = (loss(&acc.orig), ld(&acc.orig), ld(&acc.source));
        for (unit, scores) in acc.units.iter().zip(&acc.scores) {
            let mut row: Vec<crate::output::Value> = vec![unit.layer.into()];
            if self.plan.hook.per_head() {
                let heads: Vec<String> = unit.heads.iter().map(|h| h.to_string()).collect();
                row.push(if heads.len() == 1 {
                    unit.heads[0].into()
                } else {
                    heads.join("+").into()
                });
            }
            if let Some(p) = unit.pos {
                row.push(p.into());
            }
            if m.loss {
                let l = loss(scores);
                row.extend([loss_orig.into(), l.into(), (l - loss_orig).into()]);
            }
            if m.kl {
                row.push(kl(scores).into());
            }
            if m.logit_diff {
                let l = ld(scores);
                row.extend([ld_orig.into(), l.into()]);
                if patch {
                    row.extend([ld_src.into(), ((l - ld_orig) / (ld_src - ld_orig)).into()]);
                }
            }
            t.push(row);
        }
        Ok(vec![t])
    }
}
