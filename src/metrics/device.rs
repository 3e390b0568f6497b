//! The built-in metrics' per-head math as dfdx tensor ops: the `device` bodies of their
//! [`Op`](crate::seam::Op)s, run where the forward pass left the activations (CUDA; dfdx's
//! CPU in the tests, which check these bodies against the same TransformerLens goldens as
//! the host ones).
//!
//! Owns: the device versions of the per-token loss, the source coefficients,
//! `source_suppression`'s per-head values and `projection_loss`'s per-head losses, with the
//! same factorings as the host code (`metrics::ops`, `projection_loss`), so the FLOP counts
//! of `runner bench` hold on either backend. Must not: keep state, make tables, or bring an
//! activation to the host: only per-head, per-sequence (or per-position) values come back.

use dfdx::prelude::*;
use ndarray::{s, Array1, Array2, Array3, ArrayView2};

use crate::error::{Error, Result};
use crate::hooks::{block_hook, LOGITS};
use crate::seam::DeviceActs;

type T2<D> = Tensor<(usize, usize), f32, D>;
type T3<D> = Tensor<(usize, usize, usize), f32, D>;
type T4<D> = Tensor<(usize, usize, usize, usize), f32, D>;
type Idx2<D> = Tensor<(usize, usize), usize, D>;

/// `tokens[b, q + 1]` for every position (0 at the last, whose loss is dropped): the
/// targets of the per-token loss, as a device index.
fn next_tokens<D: Device<f32>>(dev: &D, tokens: ArrayView2<u32>) -> Idx2<D> {
    let (b, s) = tokens.dim();
    let mut ids = vec![0usize; b * s];
    for i in 0..b {
        for q in 0..s.saturating_sub(1) {
            ids[i * s + q] = tokens[[i, q + 1]] as usize;
        }
    }
    dev.tensor_from_vec(ids, (b, s))
}

/// `logsumexp(x[b, q, :]) - x[b, q, target[b, q]]`, `[B, S]`, on the device.
fn token_losses<D: Device<f32>>(x: T3<D>, targets: &Idx2<D>) -> T2<D> {
    let lse: T2<D> = x.clone().logsumexp::<(usize, usize), Axis<2>>();
    let target: T2<D> = x.select(targets.clone());
    lse - target
}

/// A `[B, S]` device result as a host `[B, S - 1]` (the last position predicts nothing).
fn drop_last<D: Device<f32>>(t: &T2<D>) -> Array2<f32> {
    let (b, s) = *t.shape();
    let a = Array2::from_shape_vec((b, s), t.as_vec()).expect("b * s values");
    a.slice(s![.., ..s.saturating_sub(1)]).to_owned()
}

/// The cached activation `name` as a rank-4 tensor of TL's shape.
fn act4<D: Device<f32>>(acts: &DeviceActs<D>, name: &str) -> Result<T4<D>> {
    let t = acts.get(name)?;
    match t.shape[..] {
        [a, b, c, d] => t.as_shape(name, (a, b, c, d)),
        _ => Err(rank(name, 4, &t.shape)),
    }
}

fn act3<D: Device<f32>>(acts: &DeviceActs<D>, name: &str) -> Result<T3<D>> {
    let t = acts.get(name)?;
    match t.shape[..] {
        [a, b, c] => t.as_shape(name, (a, b, c)),
        _ => Err(rank(name, 3, &t.shape)),
    }
}

fn rank(name: &str, want: usize, shape: &[usize]) -> Error {
    Error::Hook {
        name: name.to_string(),
        msg: format!("expected {want} axes, found shape {shape:?}"),
    }
}

/// `ln_final.hook_scale` (`[B, S, 1]` in TL) as `[B, S]`.
fn final_scale<D: Device<f32>>(acts: &DeviceActs<D>) -> Result<T2<D>> {
    let scale = act3(acts, "ln_final.hook_scale")?;
    let (b, s, _) = *scale.shape();
    Ok(scale.reshape_like(&(b, s)))
}

/// TL's per-token cross-entropy `[B, S - 1]` from the cached logits.
pub fn per_token_loss<D: Device<f32>>(
    acts: &DeviceActs<D>,
    tokens: ArrayView2<u32>,
) -> Result<Array2<f32>> {
    let logits = act3(acts, LOGITS)?;
    let targets = next_tokens(acts.device(), tokens);
    Ok(drop_last(&token_losses(logits, &targets)))
}

/// The source tokens' unembeddings `U_tok` `[B * S, d_model]` (rows of `W_U`ᵀ gathered).
pub fn unembed_rows<D: Device<f32>>(acts: &DeviceActs<D>, tokens: ArrayView2<u32>) -> T2<D> {
    let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
    let n = ids.len();
    let ids = acts.device().tensor_from_vec(ids, (n,));
    acts.params().w_u_rows.clone().gather(ids)
}

/// `c[b, k, h] = (v[b, k, h] @ W_O[h]) . u[b, k]`, `[B, S, H]`, through `U_tok @ W_O_flatᵀ`
/// as on the host (`metrics::ops::source_coefficients`).
pub fn source_coefficients<D: Device<f32>>(v: T4<D>, w_o: &T3<D>, u_tok: &T2<D>) -> T3<D> {
    let (b, s, h, dh) = *v.shape();
    let d = w_o.shape().2;
    let w_flat: T2<D> = w_o.clone().reshape_like(&(h * dh, d));
    let g: T2<D> = u_tok.clone().matmul(w_flat.permute::<_, Axes2<1, 0>>());
    let g: T4<D> = g.reshape_like(&(b, s, h, dh));
    (g * v).sum::<(usize, usize, usize), Axis<3>>()
}

/// 1 where a token is not BOS (BOS and GPT-2's right padding are masked), `[B, S]`.
fn not_bos<D: Device<f32>>(dev: &D, tokens: ArrayView2<u32>, bos: u32) -> T2<D> {
    let m: Vec<f32> = tokens
        .iter()
        .map(|&t| if t != bos { 1.0 } else { 0.0 })
        .collect();
    dev.tensor_from_vec(m, tokens.dim())
}

/// `source_suppression`'s values for `heads` of `layer` (`docs/metrics.md` §1):
/// per head, `per_position [B, S]` and `per_sequence [B]`, as the host's `head_values`.
pub fn source_suppression_layer<D: Device<f32>>(
    acts: &DeviceActs<D>,
    layer: usize,
    heads: &[usize],
    tokens: ArrayView2<u32>,
    u_tok: &T2<D>,
    bos: u32,
    only_negative: bool,
) -> Result<Vec<(Array2<f32>, Array1<f32>)>> {
    let dev = acts.device();
    let v = act4(acts, &block_hook(layer, "attn.hook_v"))?;
    let pattern = act4(acts, &block_hook(layer, "attn.hook_pattern"))?;
    let (b, h, s, _) = *pattern.shape();
    let scale = final_scale(acts)?;
    let c = source_coefficients(v, &acts.params().w_o[layer], u_tok);
    let c = if only_negative {
        c.clamp(f32::NEG_INFINITY, 0.0)
    } else {
        c
    };
    let m = not_bos(dev, tokens, bos);
    let full = (b, h, s, s);
    // Over the queries q: sum_q m[q] pattern[q, k] / scale[q], and sum_q m[q] pattern[q, k].
    let m_over_scale: T4<D> = (m.clone() / scale).broadcast_like::<_, Axes2<1, 3>>(&full);
    let weighted: T3<D> = (pattern.clone() * m_over_scale).sum::<_, Axis<2>>();
    let m_q: T4<D> = m.clone().broadcast_like::<_, Axes2<1, 3>>(&full);
    let attended: T3<D> = (pattern * m_q).sum::<_, Axis<2>>();
    // Keys k are masked too: per_position[k] = c[k] m[k] weighted[k], w[k] = m[k] attended[k].
    let m_k: T3<D> = m.broadcast_like::<_, Axis<1>>(&(b, h, s));
    let c_t: T3<D> = c.permute::<_, Axes3<0, 2, 1>>().realize();
    let per_position: T3<D> = c_t * m_k.clone() * weighted;
    let w: T3<D> = m_k * attended;
    let total: T2<D> = w.clone().sum::<_, Axis<2>>();
    // A sequence with no non-BOS attention gives 0/0 = NaN, as on the host.
    let per_sequence: T2<D> = (per_position.clone() * w).sum::<_, Axis<2>>() / total;

    let pp = Array3::from_shape_vec((b, h, s), per_position.as_vec()).expect("b * h * s");
    let ps = Array2::from_shape_vec((b, h), per_sequence.as_vec()).expect("b * h");
    Ok(heads
        .iter()
        .map(|&hd| {
            (
                pp.slice(s![.., hd, ..]).to_owned(),
                ps.column(hd).to_owned(),
            )
        })
        .collect())
}

/// `projection_loss`'s per-token losses for every head of `heads_by_layer`
/// (`docs/metrics.md` §2): the unmodified loss `[B, S - 1]`, and per head `[3, B, S - 1]`
/// (proj, perp, ablation), with the host's factoring: `orig @ W_U = z_h @ (W_O[h] @ W_U)`,
/// `new @ W_U = (pattern ∘ coef) @ (U_tok @ W_U)` (through d_model space when sequences
/// are at least d_model long).
pub fn projection_losses<D: Device<f32>>(
    acts: &DeviceActs<D>,
    heads_by_layer: &[(usize, Vec<usize>)],
    tokens: ArrayView2<u32>,
    only_negative: bool,
) -> Result<(Array2<f32>, Vec<Array3<f32>>)> {
    let dev = acts.device();
    let p = acts.params();
    let logits = act3(acts, LOGITS)?;
    let (b, s, _) = *logits.shape();
    let d = p.w_u.shape().0;
    let targets = next_tokens(dev, tokens);
    let orig = drop_last(&token_losses(logits.clone(), &targets));

    let u_tok = unembed_rows(acts, tokens);
    // coef = (r . u) / (u . u), the sign the intended one (docs/metrics.md).
    let u_sq: T2<D> = u_tok
        .clone()
        .square()
        .sum::<(usize,), Axis<1>>()
        .reshape_like(&(b, s));
    let u3: T3<D> = u_tok.clone().reshape_like(&(b, s, d));
    let uu: Option<T3<D>> = (s < d).then(|| u3.clone().matmul(p.w_u.clone()));
    // The frozen final LayerNorm scale divides each query row: folded into the small left
    // operands ([B, S, S] and [B, S, d_head]) rather than into three [B, S, V] products.
    let inv: T2<D> = final_scale(acts)?.recip();

    let mut out = Vec::new();
    for (layer, heads) in heads_by_layer {
        let layer = *layer;
        let vv = act4(acts, &block_hook(layer, "attn.hook_v"))?;
        let z = act4(acts, &block_hook(layer, "attn.hook_z"))?;
        let pattern = act4(acts, &block_hook(layer, "attn.hook_pattern"))?;
        let w_o = &p.w_o[layer];
        let (_, _, n_heads, dh) = *vv.shape();
        let coef: T3<D> = source_coefficients(vv, w_o, &u_tok)
            / u_sq.clone().broadcast_like::<_, Axis<2>>(&(b, s, n_heads));
        let coef = if only_negative {
            coef.clamp(f32::NEG_INFINITY, 0.0)
        } else {
            coef
        };
        for &h in heads {
            let per_token: Idx2<D> = dev.tensor_from_vec(vec![h; b * s], (b, s));
            let per_seq = dev.tensor_from_vec(vec![h; b], (b,));
            let coef_h: T2<D> = coef.clone().select(per_token.clone());
            let pattern_h: T3<D> = pattern.clone().select(per_seq);
            let a: T3<D> = pattern_h
                * coef_h.broadcast_like::<_, Axis<1>>(&(b, s, s))
                * inv.clone().broadcast_like::<_, Axis<2>>(&(b, s, s));
            let new_u: T3<D> = match &uu {
                Some(uu) => a.matmul(uu.clone()),
                None => a.matmul(u3.clone()).matmul(p.w_u.clone()),
            };
            let z_h: T3<D> =
                z.clone().select(per_token) * inv.clone().broadcast_like::<_, Axis<2>>(&(b, s, dh));
            let w_o_h: T2<D> = w_o.clone().select(dev.tensor(h));
            let orig_u: T3<D> = z_h.matmul(w_o_h.matmul(p.w_u.clone()));
            // Each [B, S, V] pass costs memory bandwidth on a GPU: three here, one per
            // variant (proj = logits - orig + new reuses the ablation's logits).
            let abl = logits.clone() - orig_u;
            let perp = logits.clone() - new_u.clone();
            let proj = abl.clone() + new_u;
            let mut l = Array3::<f32>::zeros((3, b, s.saturating_sub(1)));
            for (k, x) in [proj, perp, abl].into_iter().enumerate() {
                l.slice_mut(s![k, .., ..])
                    .assign(&drop_last(&token_losses(x, &targets)));
            }
            out.push(l);
        }
    }
    Ok((orig, out))
}
