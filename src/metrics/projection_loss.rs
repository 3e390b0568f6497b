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

use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4, Axis};

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

/// Vocabulary columns per step of [`chunked_losses`]: per (sequence, head) the two
/// `[S - 1, CHUNK]` products, and the sequence's logits and `U_tok @ W_U` columns that every
/// head of the layer reuses, stay in a core's L2 (S = 100: 4 x 200 KiB).
pub const CHUNK: usize = 512;

/// How far a column piece's max may exceed the running max before [`chunked_losses`] shifts
/// by the new max first: `exp(60)` times the piece's 512 columns stays far inside f32.
const MAX_JUMP: f32 = 60.0;

/// One layer's operands for [`chunked_losses`] (a group of `G` heads).
pub struct LayerOperands<'a> {
    /// `[B, S, V]`.
    pub logits: ArrayView3<'a, f32>,
    /// `[B, G, S - 1, K]`: head g's `new @ W_U` for sequence i is `lhs[i, g] @ rhs[i]`; a
    /// sequence's heads are one `[G * (S - 1), K]` matrix, multiplied by `rhs[i]` at once.
    pub lhs: ArrayView4<'a, f32>,
    /// `[B, K, V]`, or `[1, K, V]` shared by every sequence.
    pub rhs: ArrayView3<'a, f32>,
    /// `hook_z`, `[B, S, H, dh]`; `heads` picks the group's heads from it.
    pub z: ArrayView4<'a, f32>,
    pub heads: &'a [usize],
    /// The group's `W_O[h]` stacked, `[G * dh, D]`: `orig @ W_U = z_h @ (W_O[h] @ W_U)`.
    pub w_o: ArrayView2<'a, f32>,
    /// `[D, V]`.
    pub w_u: ArrayView2<'a, f32>,
    /// The frozen final LayerNorm scale, `[B, S]`.
    pub scale: ArrayView2<'a, f32>,
    pub tokens: ArrayView2<'a, u32>,
}

/// The vocabulary's column pieces are split into this many parts, each summed in order by one
/// worker and the parts joined in order: a fixed split (not rayon's adaptive one), so the
/// losses are the same bits whatever the scheduling or the number of cores, as sharded and
/// resumed runs require. 8 parts keep 2 cores balanced; each holds 48 bytes per (head, token)
/// until the join (9 MiB for 12 heads x 20 x 100 tokens).
const PARTS: usize = 8;

/// Per (head, sequence, position) and variant: the running max and sum of `exp(x - max)`
/// over the vocabulary columns seen so far, and the target logit.
struct LseAcc {
    m: Vec<[f32; 3]>,
    sum: Vec<[f64; 3]>,
    tgt: Vec<[f32; 3]>,
}

/// One worker's buffers: `W_O[h] @ W_U` for a piece, and the pieces of `new` and `orig`.
#[derive(Default)]
struct Scratch {
    wou: Vec<f32>,
    new: Vec<f32>,
    orig: Vec<f32>,
}

impl LseAcc {
    fn new(entries: usize) -> Self {
        LseAcc {
            m: vec![[f32::NEG_INFINITY; 3]; entries],
            sum: vec![[0.0; 3]; entries],
            tgt: vec![[0.0; 3]; entries],
        }
    }

    /// Joins partial sums over disjoint vocabulary columns (`self`'s before `other`'s).
    fn merge(mut self, other: LseAcc) -> LseAcc {
        for e in 0..self.m.len() {
            for x in 0..3 {
                let (ma, mb) = (self.m[e][x], other.m[e][x]);
                let m = ma.max(mb);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let rescale = |old: f32| {
                    if old == m {
                        1.0
                    } else {
                        ((old - m) as f64).exp()
                    }
                };
                self.sum[e][x] = self.sum[e][x] * rescale(ma) + other.sum[e][x] * rescale(mb);
                self.m[e][x] = m;
                // Only the columns holding the target wrote it; the others left 0.
                self.tgt[e][x] += other.tgt[e][x];
            }
        }
        self
    }
}

/// Per-token losses `[3, B, S - 1]` (proj, perp, ablation) of each head of the group, without
/// any `[S, V]` logit change in memory: the vocabulary is cut into [`CHUNK`]-column pieces
/// spread over the cores; per piece `W_O[h] @ W_U` for the group's heads is one matmul whose
/// result stays in cache, then per sequence and head `new = lhs @ rhs` and
/// `orig = z_h @ (W_O[h] @ W_U)` go straight into an online log-sum-exp per row and variant
/// (a running max and sum; the `PARTS` partial sums joined at the end, in order). Compared with
/// one task per (head, sequence) over the whole vocabulary, the logits, `rhs` and `W_U` are
/// read once per layer instead of once per head, and `W_O[h] @ W_U` ([dh, V] per head) is
/// never stored.
pub fn chunked_losses(op: &LayerOperands) -> Vec<Array3<f32>> {
    let (b, s, v) = op.logits.dim();
    let rows = s.saturating_sub(1);
    let g = op.heads.len();
    if rows == 0 || g == 0 || v == 0 {
        return vec![Array3::<f32>::zeros((3, b, rows)); g];
    }
    let (dh, d, k) = (op.z.dim().3, op.w_u.nrows(), op.lhs.dim().3);
    let hd = op.z.dim().2 * dh;
    let logits = op.logits.as_standard_layout();
    let lhs = op.lhs.as_standard_layout();
    let rhs = op.rhs.as_standard_layout();
    let z = op.z.as_standard_layout();
    let w_o = op.w_o.as_standard_layout();
    let w_u = op.w_u.as_standard_layout();
    let (l_s, lhs_s, rhs_s, z_s, w_o_s, w_u_s) = (
        logits.as_slice().expect("standard layout"),
        lhs.as_slice().expect("standard layout"),
        rhs.as_slice().expect("standard layout"),
        z.as_slice().expect("standard layout"),
        w_o.as_slice().expect("standard layout"),
        w_u.as_slice().expect("standard layout"),
    );
    let per_seq_rhs = rhs.dim().0 > 1;
    let inv: Vec<f32> = (0..b * rows)
        .map(|e| 1.0 / op.scale[[e / rows, e % rows]])
        .collect();
    let target: Vec<usize> = (0..b * rows)
        .map(|e| op.tokens[[e / rows, e % rows + 1]] as usize)
        .collect();
    let n_chunks = v.div_ceil(CHUNK);
    let step = |scratch: &mut Scratch, acc: &mut LseAcc, c: usize| {
        let c0 = c * CHUNK;
        let w = CHUNK.min(v - c0);
        let Scratch { wou, new, orig } = scratch;
        let wou = sized(wou, g * dh * w);
        // SAFETY (the three matmuls): every operand is addressed inside its slice (row
        // strides V for the column pieces of W_U, rhs and logits; H * dh for z) and the
        // outputs are this worker's own scratch.
        unsafe {
            kernels::sgemm_strided(
                g * dh,
                d,
                w,
                kernels::MatPtr::row_major(w_o_s.as_ptr(), d),
                kernels::MatPtr::row_major(w_u_s.as_ptr().add(c0), v),
                wou.as_mut_ptr(),
                w as isize,
                1,
                false,
                1.0,
                kernels::Par::One,
            );
        }
        let (new_b, orig_b) = (sized(new, g * rows * w), sized(orig, rows * w));
        for i in 0..b {
            let rhs_i = &rhs_s[if per_seq_rhs { i * k * v } else { 0 }..];
            // Every head's new @ W_U for this sequence in one matmul: the piece of rhs is
            // packed once, not once per head.
            unsafe {
                kernels::sgemm_strided(
                    g * rows,
                    k,
                    w,
                    kernels::MatPtr::row_major(lhs_s.as_ptr().add(i * g * rows * k), k),
                    kernels::MatPtr::row_major(rhs_i.as_ptr().add(c0), v),
                    new_b.as_mut_ptr(),
                    w as isize,
                    1,
                    false,
                    1.0,
                    kernels::Par::One,
                );
            }
            for (gi, &h) in op.heads.iter().enumerate() {
                let new_h = &new_b[gi * rows * w..(gi + 1) * rows * w];
                unsafe {
                    kernels::sgemm_strided(
                        rows,
                        dh,
                        w,
                        kernels::MatPtr::row_major(z_s.as_ptr().add(i * s * hd + h * dh), hd),
                        kernels::MatPtr::row_major(wou.as_ptr().add(gi * dh * w), w),
                        orig_b.as_mut_ptr(),
                        w as isize,
                        1,
                        false,
                        1.0,
                        kernels::Par::One,
                    );
                }
                for q in 0..rows {
                    let (t, e) = (i * rows + q, (gi * b + i) * rows + q);
                    let off = (i * s + q) * v + c0;
                    let lq = &l_s[off..off + w];
                    let (nq, oq) = (&new_h[q * w..(q + 1) * w], &orig_b[q * w..(q + 1) * w]);
                    let (m, sum) = (&mut acc.m[e], &mut acc.sum[e]);
                    // One pass, shifted by the running max of earlier columns: the max of
                    // these columns comes out of the same pass, and the sum is rescaled when
                    // it grew. A separate max pass first only where there is no running max
                    // yet, or where these columns exceed it by so much that exp(x - max)
                    // could overflow f32 (e^60 x 512 columns is far from it).
                    let fresh = m.contains(&f32::NEG_INFINITY);
                    let (mut add, mut cm) = if fresh {
                        ([0.0; 3], [f32::INFINITY; 3])
                    } else {
                        kernels::sum_exp3(lq, nq, oq, inv[t], *m)
                    };
                    if (0..3).any(|x| cm[x] > m[x] + MAX_JUMP) {
                        let shift = kernels::max3(lq, nq, oq, inv[t]);
                        for x in 0..3 {
                            // Rescale what was summed under the old max.
                            if shift[x] > m[x] {
                                sum[x] *= if m[x] == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    ((m[x] - shift[x]) as f64).exp()
                                };
                                m[x] = shift[x];
                            }
                        }
                        (add, cm) = kernels::sum_exp3(lq, nq, oq, inv[t], *m);
                    }
                    for x in 0..3 {
                        sum[x] += add[x];
                        // (A NaN never wins the max; it reaches the loss through the sum.)
                        if cm[x] > m[x] {
                            sum[x] *= ((m[x] - cm[x]) as f64).exp();
                            m[x] = cm[x];
                        }
                    }
                    if (c0..c0 + w).contains(&target[t]) {
                        let j = target[t] - c0;
                        acc.tgt[e] = kernels::three_variants(lq[j], nq[j], oq[j], inv[t]);
                    }
                }
            }
        }
    };
    let entries = g * b * rows;
    let parts = PARTS.min(n_chunks);
    let accs: Vec<LseAcc> = (0..parts)
        .into_par_iter()
        .map_init(Scratch::default, |scratch, p| {
            let mut acc = LseAcc::new(entries);
            for c in p * n_chunks / parts..(p + 1) * n_chunks / parts {
                step(scratch, &mut acc, c);
            }
            acc
        })
        .collect();
    let acc = accs
        .into_iter()
        .reduce(LseAcc::merge)
        .expect("at least one part");
    (0..g)
        .map(|gi| {
            Array3::from_shape_fn((3, b, rows), |(x, i, q)| {
                let e = (gi * b + i) * rows + q;
                acc.m[e][x] + acc.sum[e][x].ln() as f32 - acc.tgt[e][x]
            })
        })
        .collect()
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The most memory the left sides of `new @ W_U` (`[B, G, S - 1, K]`) may take at once: heads
/// are taken in groups that fit (all 12 of a GPT-2 layer at 20 x 100 tokens: 9.5 MiB).
const LHS_BYTES: usize = 128 << 20;

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
    let (b, s) = batch.tokens.dim();
    let rows = s.saturating_sub(1);
    let w_o = ctx.params.blocks[layer].attn.w_o.view();
    let w_u = ctx.params.w_u.view();
    let (dh, d) = (w_o.dim().1, w_o.dim().2);

    // coef[b, k] = (r . u) / (u . u), with r . u from the same factorisation as
    // source_suppression; the sign is the intended one, sign(r . u) (docs/metrics.md).
    let r_dot_u = source_coefficients(v, w_o, u_tok);
    let u_sq: Vec<f32> = u_tok.outer_iter().map(|u| u.dot(&u)).collect();

    // new @ W_U: through the source rows of U_tok @ W_U (S·S·V) for sequences shorter than
    // d_model, else through d_model space ((pattern ∘ coef) @ U_tok, then @ W_U: S·S·D + S·D·V).
    let k = if uu.is_some() { s } else { d };
    let rhs = match uu {
        Some(uu) => uu.view(),
        None => w_u.insert_axis(Axis(0)),
    };
    let group = (LHS_BYTES / (b * rows * k * 4).max(1)).clamp(1, heads.len().max(1));
    let mut outs = Vec::with_capacity(heads.len());
    for hs in heads.chunks(group) {
        let g = hs.len();
        let mut lhs = Array4::<f32>::zeros((b, g, rows, k));
        lhs.view_mut()
            .into_shape_with_order((b * g, rows, k))
            .expect("fresh array")
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(e, mut out)| {
                let (i, h) = (e / g, hs[e % g]);
                // pattern ∘ coef: row q, column k scaled by head h's coefficient of source k.
                let mut a = pattern.slice(s![i, h, ..rows, ..]).to_owned(); // [Q, K]
                for kk in 0..s {
                    let mut coef = r_dot_u[[i, kk, h]] / u_sq[i * s + kk];
                    if only_negative && coef >= 0.0 {
                        coef = 0.0;
                    }
                    a.column_mut(kk).mapv_inplace(|p| p * coef);
                }
                if uu.is_some() {
                    out.assign(&a);
                } else {
                    let src = u_tok.slice(s![i * s..(i + 1) * s, ..]);
                    out.assign(&kernels::matmul_par(a.view(), src, kernels::Par::One));
                }
            });
        let mut w_o_rows = Array2::<f32>::zeros((hs.len() * dh, d));
        for (j, &h) in hs.iter().enumerate() {
            w_o_rows
                .slice_mut(s![j * dh..(j + 1) * dh, ..])
                .assign(&w_o.index_axis(Axis(0), h));
        }
        // Re-borrowed views: one lifetime for all (array views are invariant in it).
        outs.extend(chunked_losses(&LayerOperands {
            logits: logits.view(),
            lhs: lhs.view(),
            rhs: rhs.view(),
            z: z.view(),
            heads: hs,
            w_o: w_o_rows.view(),
            w_u: w_u.view(),
            scale: scale.view(),
            tokens: batch.tokens.view(),
        }));
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

    fn device<D: Device<f32> + 'static>(&self, acts: &DeviceActs<D>) -> Result<Self::Output> {
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

    fn merge_state(&mut self, _ctx: &RunContext, dataset: &Dataset, st: &State) -> Result<()> {
        let name = self.name().to_string();
        let sums = st.f64_n(&name, "sums", self.heads.len() * 8)?;
        let counts = st.u64(&name, "counts")?;
        let [n_all, n_nopad] = counts else {
            return Err(crate::error::Error::Metric {
                metric: name,
                msg: "saved state 'counts' must have 2 values".into(),
            });
        };
        // The counts can never exceed what the dataset holds: predicted positions, and of
        // those the ones whose target is a real token.
        let most_all = dataset.n_sequences() * dataset.seq_len().saturating_sub(1);
        let most_nopad: usize = dataset.lengths.iter().map(|l| l.saturating_sub(1)).sum();
        let (all, nopad) = (
            (self.n_all as u64).saturating_add(*n_all),
            (self.n_nopad as u64).saturating_add(*n_nopad),
        );
        if all > most_all as u64 || nopad > most_nopad as u64 || nopad > all {
            return Err(crate::error::Error::Metric {
                metric: name,
                msg: format!(
                    "saved state 'counts' ({n_all} positions, {n_nopad} without padding) exceeds dataset '{}' ({most_all} positions, {most_nopad} without padding)",
                    dataset.name
                ),
            });
        }
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

    /// The chunked kernel (online log-sum-exp, vocabulary pieces spread over workers and
    /// joined) equals the plain one over a vocabulary that spans several chunks (the goldens'
    /// vocabularies fit in one), the max moving between chunks, for two heads picked out of
    /// three and two sequences, with per-sequence and shared right sides.
    #[test]
    fn chunked_losses_match_plain_losses_across_chunks() {
        let (b, s, v, k, dh, nh, d) = (2, 7, 3 * CHUNK + 37, 5, 4, 3, 6);
        let heads = [2usize, 0];
        let g = heads.len();
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 3.0;
        let logits = Array3::from_shape_fn((b, s, v), |(i, q, j)| {
            f((i * s + q) * v + j, 0.37) + j as f32 * 1e-3
        });
        let lhs = Array4::from_shape_fn((b, g, s, k), |(i, a, q, j)| {
            f(((a * b + i) * s + q) * k + j, 1.3)
        });
        let z = Array4::from_shape_fn((b, s, nh, dh), |(i, q, h, e)| {
            f(((i * s + q) * nh + h) * dh + e, 2.1)
        });
        let w_o = Array2::from_shape_fn((g * dh, d), |(r, c)| f(r * d + c, 0.53) * 0.5);
        let w_u = Array2::from_shape_fn((d, v), |(r, c)| f(r * v + c, 0.19) * 0.5);
        let scale = Array2::from_shape_fn((b, s), |(i, q)| 0.5 + (i * s + q) as f32 * 0.1);
        let tokens = Array2::from_shape_fn((b, s), |(i, q)| ((i * 31 + q * 977) % v) as u32);
        let rhs_seq = Array3::from_shape_fn((b, k, v), |(i, r, c)| f((i * k + r) * v + c, 0.71));
        let rhs_shared = rhs_seq.slice(s![..1, .., ..]).to_owned();
        for rhs in [rhs_seq.view(), rhs_shared.view()] {
            let got = chunked_losses(&LayerOperands {
                logits: logits.view(),
                lhs: lhs.slice(s![.., .., ..s - 1, ..]),
                rhs,
                z: z.view(),
                heads: &heads,
                w_o: w_o.view(),
                w_u: w_u.view(),
                scale: scale.view(),
                tokens: tokens.view(),
            });
            let mut checked_big = false;
            for (gi, &h) in heads.iter().enumerate() {
                let wou = w_o.slice(s![gi * dh..(gi + 1) * dh, ..]).dot(&w_u);
                for i in 0..b {
                    let r = rhs.index_axis(Axis(0), if rhs.dim().0 > 1 { i } else { 0 });
                    let want = token_losses(
                        logits.index_axis(Axis(0), i),
                        z.slice(s![i, .., h, ..]).dot(&wou).view(),
                        lhs.slice(s![i, gi, .., ..]).dot(&r).view(),
                        scale.row(i),
                        tokens.row(i),
                    );
                    let got = got[gi].slice(s![.., i, ..]);
                    for (a, w) in got.iter().zip(want.iter()) {
                        assert!((a - w).abs() <= 1e-4 * w.abs().max(1.0), "{a} vs {w}");
                    }
                    checked_big |= want.iter().any(|&x| x > 1.0);
                }
            }
            assert!(checked_big, "a test whose losses are all ~0 cannot fail");
        }
    }
}
