//! Helpers a metric author needs, in one place: the per-token loss, the source tokens'
//! unembedding rows, the source coefficients shared by `source_suppression` and
//! `projection_loss`, and (re-exported) the host numeric [`kernels`] (matmul, `exp`,
//! log-sum-exp) the metrics' inner loops use.
//!
//! Owns: these functions' definitions and accuracy (they are checked against TransformerLens
//! through the metrics' goldens). Must not: know any particular metric's tables or options,
//! run the model, or allocate more than their results.

use ndarray::parallel::prelude::*;
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, ArrayView4};

/// The host numeric kernels (owned by `crate::kernels`; re-exported here so a metric finds
/// everything it computes with under `metrics::ops`).
pub use crate::kernels;

/// TL's `lm_cross_entropy_loss(logits, tokens, per_token=True)`: `[batch, seq - 1]`,
/// `-log_softmax(logits[:, s])[tokens[:, s + 1]]`.
pub fn per_token_loss(
    logits: ndarray::ArrayView3<f32>,
    tokens: ndarray::ArrayView2<u32>,
) -> Array2<f32> {
    use rayon::prelude::*;
    let (b, s, _) = logits.dim();
    let rows: Vec<(usize, usize)> = (0..b)
        .flat_map(|i| (0..s.saturating_sub(1)).map(move |j| (i, j)))
        .collect();
    let losses: Vec<f32> = rows
        .par_iter()
        .map(|&(i, j)| {
            let row = logits.slice(ndarray::s![i, j, ..]);
            // Rows of a standard-layout array are slices; any other layout is copied once.
            let owned: Vec<f32>;
            let row = match row.as_slice() {
                Some(r) => r,
                None => {
                    owned = row.to_vec();
                    &owned
                }
            };
            kernels::log_sum_exp(row) - row[tokens[[i, j + 1]] as usize]
        })
        .collect();
    Array2::from_shape_vec((b, s.saturating_sub(1)), losses).expect("b * (s - 1) losses")
}

/// The per-token loss of a batch's cached logits, `[batch, seq - 1]`, computed where the
/// logits are (the op `loss` and `projection_loss` share).
pub struct PerTokenLoss<'a, 'b>(pub &'a super::BatchView<'b>);

impl crate::seam::Op for PerTokenLoss<'_, '_> {
    type Output = Array2<f32>;

    fn host(&self) -> crate::Result<Array2<f32>> {
        let logits = self.0.activation::<ndarray::Ix3>(crate::hooks::LOGITS)?;
        Ok(per_token_loss(logits, self.0.tokens))
    }

    fn device<D: dfdx::prelude::Device<f32> + 'static>(
        &self,
        acts: &crate::seam::DeviceActs<D>,
    ) -> crate::Result<Array2<f32>> {
        super::device::per_token_loss(acts, self.0.tokens)
    }
}

/// Rows of `W_U` columns for each token: `[N, d_model]` with `N = tokens.len()`.
pub fn unembed_rows(w_u: ArrayView2<f32>, tokens: ArrayView2<u32>) -> Array2<f32> {
    let d = w_u.nrows();
    let mut out = Array2::<f32>::zeros((tokens.len(), d));
    for (mut row, &t) in out.outer_iter_mut().zip(tokens.iter()) {
        row.assign(&w_u.column(t as usize));
    }
    out
}

/// `c[b, k, h] = (v[b, k, h] @ W_O[h]) . W_U[:, tok[b, k]]` for every head of a layer.
/// `v`: `[B, S, H, d_head]`, `w_o`: `[H, d_head, d_model]`, `u_tok`: `[B * S, d_model]`.
pub fn source_coefficients(
    v: ArrayView4<f32>,
    w_o: ArrayView3<f32>,
    u_tok: ArrayView2<f32>,
) -> Array3<f32> {
    let (b, s, h, dh) = v.dim();
    let d = w_o.dim().2;
    let w_o_flat = w_o
        .into_shape_with_order((h * dh, d))
        .expect("W_O is contiguous");
    // g[n, h * dh + e] = (W_O[h] @ u_n)[e]
    let g = kernels::matmul(u_tok, w_o_flat.t());
    let v = v
        .into_shape_with_order((b * s, h, dh))
        .expect("hook_v is contiguous");
    let mut c = Array3::<f32>::zeros((b, s, h));
    let mut c_flat = c
        .view_mut()
        .into_shape_with_order((b * s, h))
        .expect("fresh array");
    // One token's heads per task, on every core.
    c_flat
        .axis_iter_mut(ndarray::Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(n, mut row)| {
            for head in 0..h {
                let gv = g.slice(s![n, head * dh..(head + 1) * dh]);
                row[head] = gv.dot(&v.slice(s![n, head, ..]));
            }
        });
    c
}
