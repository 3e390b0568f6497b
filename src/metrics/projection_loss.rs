//! `projection_loss`: the loss when a head's direct effect is kept only along the source
//! tokens' unembedding directions, only perpendicular to them, or ablated
//! (`docs/metrics.md` §2, the notebook's `return_new_loss=True` path).
//!
//! Owns: the per-head mean losses and their tables. Reads `blocks.L.attn.hook_v`,
//! `hook_z`, `hook_pattern` (selected layers), `ln_final.hook_scale` and `logits` from the
//! run's single forward pass per batch. Must not: run the model or write files.
//!
//! Cost, per head and sequence of S tokens (V = d_vocab, D = d_model, dh = d_head). The
//! notebook computes `(new - orig) / scale @ W_U` and `-orig / scale @ W_U` in d_model space,
//! 2·S·D·V multiply-adds. Here both logit changes are factored through small matrices:
//! - `orig @ W_U = z_h @ (W_O[h] @ W_U)`: S·dh·V, with `W_O[h] @ W_U` ([dh, V]) made once
//!   per head and batch (dh·D·V, amortised over the batch's tokens);
//! - `new @ W_U = (pattern ∘ coef) @ (U_tok @ W_U)`: S·S·V, with `U_tok @ W_U` (the source
//!   tokens' unembeddings through W_U, [S, V]) made once per batch and shared by every head.
//!
//! Only each token's log-sum-exp and target logit are kept: never a [heads, tokens, vocab]
//! tensor, and at most [S, V] per head in flight.

use ndarray::{s, Array2, Array3, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

use super::device;
use super::ops::{kernels, source_coefficients, unembed_rows, PerTokenLoss};
use super::state::{Array, State};
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::Result;
use crate::hooks::{block_hook, LOGITS};
use crate::output::{Table, Value};
use crate::seam::{DeviceActs, Op};
use dfdx::prelude::Device;

/// The three interventions, in this order everywhere.
pub const VARIANTS: [&str; 3] = ["proj", "perp", "ablation"];

/// Per-token losses of one head for one sequence: `[3, S - 1]` (proj, perp, ablation).
///
/// `logits`: `[S, V]`; `orig_u` = `orig @ W_U` and `new_u` = `new @ W_U`, both `[S, V]`,
/// not yet divided by the final LayerNorm scale (frozen, as in the notebook).
pub fn token_losses(
    logits: ArrayView2<f32>,
    orig_u: ArrayView2<f32>,
    new_u: ArrayView2<f32>,
    scale: ArrayView1<f32>,
    tokens: ArrayView1<u32>,
) -> Array2<f32> {
    let (s, v) = logits.dim();
    let mut out = Array2::<f32>::zeros((3, s.saturating_sub(1)));
    // One row of each variant's logits at a time: 3 x V floats stay in cache.
    let mut bufs = [vec![0f32; v], vec![0f32; v], vec![0f32; v]];
    for q in 0..s.saturating_sub(1) {
        let target = tokens[q + 1] as usize;
        let inv = 1.0 / scale[q];
        let (l, o, n) = (logits.row(q), orig_u.row(q), new_u.row(q));
        let (l, o, n) = (
            l.as_slice().expect("contiguous"),
            o.as_slice().expect("contiguous"),
            n.as_slice().expect("contiguous"),
        );
        let [proj, perp, abl] = &mut bufs;
        for j in 0..v {
            proj[j] = l[j] + (n[j] - o[j]) * inv; // keep only the projection: new - orig
            perp[j] = l[j] - n[j] * inv; // keep only the perpendicular part: -new
            abl[j] = l[j] - o[j] * inv; // remove the head's direct effect: -orig
        }
        for (k, buf) in bufs.iter().enumerate() {
            out[[k, q]] = kernels::log_sum_exp(buf) - buf[target];
        }
    }
    out
}

/// Columns of the vocabulary handled at once by [`fused_token_losses`]: two `[S, CHUNK]`
/// blocks stay in a core's L2 (S = 100: 400 KiB).
const CHUNK: usize = 512;

/// [`token_losses`] without the `[S, V]` logit changes: `new @ W_U = lhs @ rhs` and
/// `orig @ W_U = z @ wou` are made `CHUNK` vocabulary columns at a time, straight into an
/// online log-sum-exp per row and variant (a running max and sum), so what a head touches per
/// sequence stays in cache instead of streaming two `[S, V]` matrices through memory.
///
/// `logits`: `[S, V]`; `lhs`: `[S, K]` and `rhs`: `[K, V]` (both row-major); `z`: `[S, dh]`
/// (row stride `z_rs`), `wou`: `[dh, V]`. Single-threaded: callers run one per core.
#[allow(clippy::too_many_arguments)]
pub fn fused_token_losses(
    logits: ArrayView2<f32>,
    lhs: ArrayView2<f32>,
    rhs: ArrayView2<f32>,
    z: ArrayView2<f32>,
    wou: ArrayView2<f32>,
    scale: ArrayView1<f32>,
    tokens: ArrayView1<u32>,
) -> Array2<f32> {
    let (s, v) = logits.dim();
    let rows = s.saturating_sub(1);
    let mut out = Array2::<f32>::zeros((3, rows));
    if rows == 0 {
        return out;
    }
    let (k, dh) = (lhs.ncols(), z.ncols());
    let logits = logits.as_standard_layout();
    let lhs = lhs.as_standard_layout();
    let rhs = rhs.as_standard_layout();
    let wou = wou.as_standard_layout();
    let (l, lhs_s, rhs_s, wou_s) = (
        logits.as_slice().expect("standard layout"),
        lhs.as_slice().expect("standard layout"),
        rhs.as_slice().expect("standard layout"),
        wou.as_slice().expect("standard layout"),
    );
    let z_rs = z.strides()[0];
    assert_eq!(z.strides()[1], 1, "z rows are contiguous");
    let inv: Vec<f32> = scale.iter().map(|x| 1.0 / x).collect();
    let target: Vec<usize> = (0..rows).map(|q| tokens[q + 1] as usize).collect();
    // Per row and variant: running max, running sum of exp(x - max), target logit.
    let mut m = vec![[f32::NEG_INFINITY; 3]; rows];
    let mut sum = vec![[0f64; 3]; rows];
    let mut tgt = vec![[0f32; 3]; rows];
    let chunk = CHUNK;
    let mut new = vec![0f32; rows * chunk];
    let mut orig = vec![0f32; rows * chunk];
    let mut buf = [vec![0f32; chunk], vec![0f32; chunk], vec![0f32; chunk]];
    for c0 in (0..v).step_by(chunk) {
        let w = chunk.min(v - c0);
        // SAFETY: every operand is addressed inside its slice ([rows, k] of lhs, [k, w]
        // columns c0.. of rhs with row stride v, etc.); `new` and `orig` are unique here.
        unsafe {
            kernels::sgemm_strided(
                rows,
                k,
                w,
                kernels::MatPtr::row_major(lhs_s.as_ptr(), k),
                kernels::MatPtr::row_major(rhs_s.as_ptr().add(c0), v),
                new.as_mut_ptr(),
                w as isize,
                1,
                false,
                1.0,
                kernels::Par::One,
            );
            kernels::sgemm_strided(
                rows,
                dh,
                w,
                kernels::MatPtr {
                    ptr: z.as_ptr(),
                    rs: z_rs,
                    cs: 1,
                },
                kernels::MatPtr::row_major(wou_s.as_ptr().add(c0), v),
                orig.as_mut_ptr(),
                w as isize,
                1,
                false,
                1.0,
                kernels::Par::One,
            );
        }
        for q in 0..rows {
            let lq = &l[q * v + c0..q * v + c0 + w];
            let (n, o) = (&new[q * w..(q + 1) * w], &orig[q * w..(q + 1) * w]);
            let [proj, perp, abl] = &mut buf;
            kernels::three_variants(lq, n, o, inv[q], proj, perp, abl);
            let t = target[q];
            for (x, b) in buf.iter().enumerate() {
                let b = &b[..w];
                if (c0..c0 + w).contains(&t) {
                    tgt[q][x] = b[t - c0];
                }
                let cm = kernels::max(b);
                if cm > m[q][x] {
                    // Rescale what was summed under the old max.
                    let old = m[q][x];
                    sum[q][x] *= if old == f32::NEG_INFINITY {
                        0.0
                    } else {
                        ((old - cm) as f64).exp()
                    };
                    m[q][x] = cm;
                }
                sum[q][x] += kernels::sum_exp_shifted(b, m[q][x]);
            }
        }
    }
    for q in 0..rows {
        for x in 0..3 {
            out[[x, q]] = m[q][x] + sum[q][x].ln() as f32 - tgt[q][x];
        }
    }
    out
}

/// Per-token losses `[3, B, S - 1]` for every selected head of one layer.
#[allow(clippy::too_many_arguments)]
pub fn layer_losses(
    ctx: &RunContext,
    layer: usize,
    heads: &[usize],
    batch: &BatchView,
    u_tok: ArrayView2<f32>,
    uu: Option<&Array3<f32>>,
    only_negative: bool,
) -> Result<Vec<Array3<f32>>> {
    let v = batch.activation::<ndarray::Ix4>(&block_hook(layer, "attn.hook_v"))?;
    let z = batch.activation::<ndarray::Ix4>(&block_hook(layer, "attn.hook_z"))?;
    let pattern = batch.activation::<ndarray::Ix4>(&block_hook(layer, "attn.hook_pattern"))?;
    let logits = batch.activation::<ndarray::Ix3>(LOGITS)?;
    let scale = batch.final_scale()?;
    let tokens = batch.tokens;
    let (b, s) = tokens.dim();
    let w_o = ctx.params.blocks[layer].attn.w_o.view();
    let w_u = ctx.params.w_u.view();

    // coef[b, k] = (r . u) / (u . u), with r . u from the same factorisation as
    // source_suppression; the sign is the intended one, sign(r . u) (docs/metrics.md).
    let r_dot_u = source_coefficients(v, w_o, u_tok);
    let u_sq: Vec<f32> = u_tok.outer_iter().map(|u| u.dot(&u)).collect();

    // W_O[h] @ W_U ([dh, V], 12 MiB for GPT-2) for a group of heads at once, as one
    // [heads x dh, D] @ [D, V] matmul on all cores (a [dh, D] left side alone is too thin to
    // keep the cores busy: W_U would stream through memory once per head); then every
    // (head, sequence) pair of the group is one single-threaded task. Groups of 4 bound
    // the [dh, V] matrices alive at once (48 MiB for GPT-2 small).
    let group = 4.max(rayon::current_num_threads());
    let (dh, d) = (w_o.dim().1, w_o.dim().2);
    let mut per_task: Vec<((usize, usize), Array2<f32>)> = Vec::with_capacity(heads.len() * b);
    for h0 in (0..heads.len()).step_by(group) {
        let hs = h0..(h0 + group).min(heads.len());
        let mut lhs = Array2::<f32>::zeros((hs.len() * dh, d));
        for (j, &h) in heads[hs.clone()].iter().enumerate() {
            lhs.slice_mut(s![j * dh..(j + 1) * dh, ..])
                .assign(&w_o.index_axis(Axis(0), h));
        }
        let wou_all = kernels::matmul(lhs.view(), w_u);
        let wous: Vec<ArrayView2<f32>> = (0..hs.len())
            .map(|j| wou_all.slice(s![j * dh..(j + 1) * dh, ..]))
            .collect();
        let tasks: Vec<(usize, usize)> = hs.flat_map(|hi| (0..b).map(move |i| (hi, i))).collect();
        let done: Vec<((usize, usize), Array2<f32>)> = tasks
            .par_iter()
            .map(|&(hi, i)| {
                let h = heads[hi];
                let mut a = pattern.slice(s![i, h, .., ..]).to_owned(); // [Q, K]
                for k in 0..s {
                    let mut coef = r_dot_u[[i, k, h]] / u_sq[i * s + k];
                    if only_negative && coef >= 0.0 {
                        coef = 0.0;
                    }
                    a.column_mut(k).mapv_inplace(|p| p * coef);
                }
                // new @ W_U: through the source rows of U_tok @ W_U (S·S·V) for sequences
                // shorter than d_model, else through d_model space (S·S·D + S·D·V).
                let (lhs, rhs) = match uu {
                    Some(uu) => (a, uu.index_axis(Axis(0), i)),
                    None => {
                        let rows = u_tok.slice(s![i * s..(i + 1) * s, ..]);
                        (kernels::matmul_par(a.view(), rows, kernels::Par::One), w_u)
                    }
                };
                let l = fused_token_losses(
                    logits.index_axis(Axis(0), i),
                    lhs.view(),
                    rhs,
                    z.slice(s![i, .., h, ..]),
                    wous[hi - h0],
                    scale.row(i),
                    tokens.row(i),
                );
                ((hi, i), l)
            })
            .collect();
        per_task.extend(done);
    }
    let mut outs = vec![Array3::<f32>::zeros((3, b, s.saturating_sub(1))); heads.len()];
    for ((hi, i), l) in per_task {
        outs[hi].slice_mut(s![.., i, ..]).assign(&l);
    }
    Ok(outs)
}

/// One batch's per-token losses, computed where the activations are: the unmodified loss
/// `[B, S - 1]` and, per selected head (in `ctx.heads` order), `[3, B, S - 1]`.
struct Losses<'a, 'c, 'b> {
    ctx: &'a RunContext<'c>,
    batch: &'a BatchView<'b>,
    only_negative: bool,
}

impl Op for Losses<'_, '_, '_> {
    type Output = (Array2<f32>, Vec<Array3<f32>>);

    fn host(&self) -> Result<Self::Output> {
        let (ctx, batch) = (self.ctx, self.batch);
        let (b, s) = batch.tokens.dim();
        let orig = PerTokenLoss(batch).host()?;
        let u_tok = unembed_rows(ctx.params.w_u.view(), batch.tokens);
        // U_tok @ W_U per sequence: [B, S, V], shared by every head of every layer; only
        // worth it (and only made) while sequences are shorter than d_model.
        let v = ctx.params.w_u.ncols();
        let uu = (s < ctx.cfg.d_model).then(|| {
            kernels::matmul(u_tok.view(), ctx.params.w_u.view())
                .into_shape_with_order((b, s, v))
                .expect("[B*S, V] -> [B, S, V]")
        });
        let mut out = Vec::with_capacity(ctx.heads.len());
        for (layer, heads) in ctx.heads_by_layer() {
            out.extend(layer_losses(
                ctx,
                layer,
                &heads,
                batch,
                u_tok.view(),
                uu.as_ref(),
                self.only_negative,
            )?);
        }
        Ok((orig, out))
    }

    fn device<D: Device<f32>>(&self, acts: &DeviceActs<D>) -> Result<Self::Output> {
        device::projection_losses(
            acts,
            &self.ctx.heads_by_layer(),
            self.batch.tokens,
            self.only_negative,
        )
    }
}

/// Sums for one head over a dataset: [orig, proj, perp, ablation] x [all, no padding].
#[derive(Clone, Default)]
struct Sums {
    all: [f64; 4],
    nopad: [f64; 4],
}

/// The `projection_loss` metric.
pub struct ProjectionLoss {
    only_negative: bool,
    heads: Vec<Sums>,
    n_all: usize,
    n_nopad: usize,
}

impl ProjectionLoss {
    pub fn new(only_negative: bool) -> Self {
        ProjectionLoss {
            only_negative,
            heads: Vec::new(),
            n_all: 0,
            n_nopad: 0,
        }
    }
}

impl Metric for ProjectionLoss {
    fn name(&self) -> &str {
        "projection_loss"
    }

    fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let mut hooks: Vec<String> = ctx
            .heads_by_layer()
            .into_iter()
            .flat_map(|(l, _)| {
                ["attn.hook_v", "attn.hook_z", "attn.hook_pattern"].map(|h| block_hook(l, h))
            })
            .collect();
        hooks.push("ln_final.hook_scale".into());
        hooks.push(LOGITS.into());
        hooks
    }

    fn start_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<()> {
        self.heads = vec![Sums::default(); ctx.heads.len()];
        self.n_all = 0;
        self.n_nopad = 0;
        Ok(())
    }

    fn batch(&mut self, ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let (b, s) = batch.tokens.dim();
        let op = Losses {
            ctx,
            batch,
            only_negative: self.only_negative,
        };
        let (orig, losses) = batch.cache.run(&op)?;
        // A position counts as "no padding" when the token it predicts is real.
        let real = |i: usize, q: usize| !batch.dataset.is_pad(batch.start + i, q + 1);
        self.n_all += b * s.saturating_sub(1);
        self.n_nopad += (0..b)
            .map(|i| (0..s.saturating_sub(1)).filter(|&q| real(i, q)).count())
            .sum::<usize>();
        let orig_sum = |all: bool| -> f64 {
            let mut t = 0.0;
            for ((i, q), &x) in orig.indexed_iter() {
                if all || real(i, q) {
                    t += x as f64;
                }
            }
            t
        };
        let (orig_all, orig_nopad) = (orig_sum(true), orig_sum(false));
        for (st, l) in self.heads.iter_mut().zip(losses) {
            st.all[0] += orig_all;
            st.nopad[0] += orig_nopad;
            for k in 0..3 {
                for ((i, q), &x) in l.index_axis(Axis(0), k).indexed_iter() {
                    st.all[k + 1] += x as f64;
                    if real(i, q) {
                        st.nopad[k + 1] += x as f64;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let mut cols: Vec<String> = vec!["layer".into(), "head".into()];
        for suffix in ["", "_nopad"] {
            cols.push(format!("loss_orig{suffix}"));
            for v in VARIANTS {
                cols.push(format!("loss_{v}{suffix}"));
            }
            for v in VARIANTS {
                cols.push(format!("increase_{v}{suffix}"));
            }
        }
        let col_refs: Vec<&str> = cols.iter().map(String::as_str).collect();
        let mut table = Table::new("projection_loss", &col_refs).per_head("increase_ablation");
        for (&(l, h), st) in ctx.heads.iter().zip(&self.heads) {
            let mut row: Vec<Value> = vec![l.into(), h.into()];
            for (sums, n) in [(&st.all, self.n_all), (&st.nopad, self.n_nopad)] {
                let mean: Vec<f64> = sums.iter().map(|x| x / n as f64).collect();
                row.push(Value::Float(mean[0]));
                row.extend(mean[1..].iter().map(|&m| Value::Float(m)));
                row.extend(mean[1..].iter().map(|&m| Value::Float(m - mean[0])));
            }
            table.push(row);
        }
        Ok(vec![table])
    }

    /// Per head the eight sums ([orig, proj, perp, ablation] x [all, no padding]), and the
    /// two token counts: merged, they give exactly the unsharded means.
    fn save_state(&self) -> Result<State> {
        let sums: Vec<f64> = self
            .heads
            .iter()
            .flat_map(|h| h.all.iter().chain(&h.nopad).copied())
            .collect();
        let mut st = State::new();
        st.put("sums", Array::F64(sums)).put(
            "counts",
            Array::U64(vec![self.n_all as u64, self.n_nopad as u64]),
        );
        Ok(st)
    }

    fn merge_state(&mut self, _ctx: &RunContext, _dataset: &Dataset, st: &State) -> Result<()> {
        let name = self.name().to_string();
        let sums = st.f64_n(&name, "sums", self.heads.len() * 8)?;
        let counts = st.u64(&name, "counts")?;
        let [n_all, n_nopad] = counts else {
            return Err(crate::error::Error::Metric {
                metric: name,
                msg: "saved state 'counts' must have 2 values".into(),
            });
        };
        for (h, s) in self.heads.iter_mut().zip(sums.chunks_exact(8)) {
            for k in 0..4 {
                h.all[k] += s[k];
                h.nopad[k] += s[4 + k];
            }
        }
        self.n_all += *n_all as usize;
        self.n_nopad += *n_nopad as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked kernel with its online log-sum-exp equals the plain one over a vocabulary
    /// that spans several chunks (the goldens' vocabularies fit in one), the max moving
    /// between chunks.
    #[test]
    fn fused_losses_match_plain_losses_across_chunks() {
        let (s, v, k, dh) = (7, 3 * CHUNK + 37, 5, 4);
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 3.0;
        let logits = Array2::from_shape_fn((s, v), |(q, j)| f(q * v + j, 0.37) + j as f32 * 1e-3);
        let lhs = Array2::from_shape_fn((s, k), |(q, j)| f(q * k + j, 1.3));
        let rhs = Array2::from_shape_fn((k, v), |(q, j)| f(q * v + j, 0.71));
        let z = Array2::from_shape_fn((s, dh), |(q, j)| f(q * dh + j, 2.1));
        let wou = Array2::from_shape_fn((dh, v), |(q, j)| f(q * v + j, 0.19));
        let scale = ndarray::Array1::from_shape_fn(s, |q| 0.5 + q as f32 * 0.1);
        let tokens = ndarray::Array1::from_shape_fn(s, |q| ((q * 977) % v) as u32);
        let want = token_losses(
            logits.view(),
            z.dot(&wou).view(),
            lhs.dot(&rhs).view(),
            scale.view(),
            tokens.view(),
        );
        let got = fused_token_losses(
            logits.view(),
            lhs.view(),
            rhs.view(),
            z.view(),
            wou.view(),
            scale.view(),
            tokens.view(),
        );
        for (a, b) in got.iter().zip(want.iter()) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert!(
            want.iter().any(|&x| x > 1.0),
            "a test whose losses are all ~0 cannot fail"
        );
    }
}
