//! The direct path to the logits, shared by `cspa`, `direct_mean_ablation` and
//! `direct_logit_attribution` (`docs/metrics.md` §7-9): a head's direct effect is what it
//! adds to the final residual stream, read through the unchanged run's final LayerNorm
//! scale, as the Copy Suppression paper's code (`get_cspa_results`) and TL's
//! `cache.apply_ln_to_stack` do.
//!
//! Owns: [`variant_kl_loss`] (per-token KL and loss when the final residual stream of one
//! sequence changes by a `[S, D]` delta, in row chunks: never a `[tokens, vocab]` array per
//! head), a head's result from `hook_z`, the paper's function-word list as GPT-2 ids, and
//! the per-token accumulator the three metrics save for shards and `--resume`. Must not:
//! make tables or know options.

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayView3};
use rayon::prelude::*;

use super::ops::kernels;
use super::state::{Array, State};
use crate::error::{Error, Result};

/// Rows of modified logits in flight per sequence: `ROWS x d_vocab` floats.
pub const ROWS: usize = 64;

/// The paper's `FUNCTION_STR_TOKS` (`cspa_functions.py` at c2a732c, 150 strings, 147
/// distinct) as GPT-2 token ids, each string one token (`GPT2TokenizerFast` on GPT-2's
/// vocabulary, checked by `tests/golden/make_cspa_golden.py`). `50256` is
/// `<|endoftext|>`: a model's own BOS stands for it ([`function_word_ids`]).
pub const PAPER_FUNCTION_WORDS: &[u32] = &[
    0, 1, 6, 11, 13, 30, 188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 200, 201, 202,
    203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 217, 218, 219, 221, 257,
    262, 281, 284, 286, 287, 290, 326, 329, 338, 340, 345, 351, 355, 366, 373, 379, 383, 389, 416,
    423, 428, 464, 477, 481, 484, 511, 534, 543, 546, 554, 588, 606, 607, 616, 617, 618, 632, 644,
    663, 679, 691, 703, 705, 749, 770, 777, 783, 845, 881, 883, 884, 887, 921, 1002, 1011, 1026,
    1081, 1114, 1119, 1169, 1320, 1462, 1537, 1649, 1675, 1722, 1752, 2048, 2080, 2102, 2215, 2312,
    2504, 2514, 2750, 2753, 2893, 3025, 3152, 3226, 3336, 3574, 3588, 3633, 3737, 3844, 3886, 4232,
    4480, 4525, 4864, 5189, 5334, 5832, 5845, 6363, 6660, 8013, 9627, 13111, 14108, 14307, 14574,
    15066, 19032, 20459, 50256,
];

/// GPT-2's `<|endoftext|>`.
const GPT2_EOT: u32 = 50256;

/// The function-word mask over a model's vocabulary from GPT-2 ids: `<|endoftext|>` is the
/// model's BOS, ids the vocabulary lacks are dropped (on GPT-2's vocabulary this is the
/// paper's list exactly; on a small random model it keeps the ids that exist).
pub fn function_word_ids(ids: &[u32], d_vocab: usize, bos: u32) -> Vec<bool> {
    let mut mask = vec![false; d_vocab];
    for &id in ids {
        let id = if id == GPT2_EOT { bos } else { id };
        if (id as usize) < d_vocab {
            mask[id as usize] = true;
        }
    }
    mask
}

/// A head's result `z[q, h] @ W_O[h]` for one sequence: `[S, D]` (TL's `hook_result`, no
/// `b_O`). `z`: `[S, H, dh]`, `w_o`: `[dh, D]` (the head's slice).
pub fn head_result(z: ArrayView3<f32>, h: usize, w_o: ArrayView2<f32>) -> Array2<f32> {
    kernels::matmul_par(z.slice(s![.., h, ..]), w_o, kernels::Par::One)
}

/// `log(sum(exp(row)))` of every row of `logits` `[S, V]`.
pub fn row_lse(logits: ArrayView2<f32>) -> Vec<f32> {
    logits
        .outer_iter()
        .map(|r| match r.as_slice() {
            Some(x) => kernels::log_sum_exp(x),
            None => kernels::log_sum_exp(&r.to_vec()),
        })
        .collect()
}

/// Per-token `(kl [S], loss [S - 1])` of one sequence whose final residual stream becomes
/// `resid + delta`, unembedded as the paper does: `((resid + delta) / scale) @ W_U + b_U`
/// with the unchanged run's scale. `kl[q]` is KL(unchanged ‖ changed) of the next-token
/// distributions (the paper's `kl_div(logits, logits_new)`), `loss[q]` the cross-entropy on
/// `tokens[q + 1]`. `logits` `[S, V]` are the unchanged run's, `lse` their row
/// log-sum-exps. Rows go [`ROWS`] at a time through one matmul each; `par` is the matmul's
/// parallelism (the caller may already be running one sequence per core).
#[allow(clippy::too_many_arguments)]
pub fn variant_kl_loss(
    resid: ArrayView2<f32>,
    delta: ArrayView2<f32>,
    scale: ArrayView1<f32>,
    logits: ArrayView2<f32>,
    lse: &[f32],
    tokens: ArrayView1<u32>,
    w_u: ArrayView2<f32>,
    b_u: ArrayView1<f32>,
    par: kernels::Par,
) -> (Vec<f32>, Vec<f32>) {
    let (s, d) = resid.dim();
    let v = w_u.ncols();
    let mut kl = vec![0f32; s];
    let mut loss = vec![0f32; s.saturating_sub(1)];
    let w_u = w_u.as_standard_layout();
    let w_u = w_u.as_slice().expect("standard layout");
    let b_u = b_u.to_vec();
    let mut x = vec![0f32; ROWS * d];
    let mut out = vec![0f32; ROWS * v];
    for r0 in (0..s).step_by(ROWS) {
        let n = ROWS.min(s - r0);
        for i in 0..n {
            let q = r0 + i;
            let sc = scale[q];
            for j in 0..d {
                x[i * d + j] = (resid[[q, j]] + delta[[q, j]]) / sc;
            }
        }
        for i in 0..n {
            out[i * v..(i + 1) * v].copy_from_slice(&b_u);
        }
        kernels::sgemm_into(n, d, v, &x[..n * d], w_u, &mut out[..n * v], true, par);
        let rows: Vec<(f32, Option<f32>)> = (0..n)
            .into_par_iter()
            .map(|i| {
                let q = r0 + i;
                let m = &out[i * v..(i + 1) * v];
                let lse_m = kernels::log_sum_exp(m);
                let o = logits.row(q);
                let o_owned;
                let o = match o.as_slice() {
                    Some(o) => o,
                    None => {
                        o_owned = o.to_vec();
                        &o_owned
                    }
                };
                // KL = sum p (lo - lse_o - lm + lse_m) = sum p (lo - lm) + lse_m - lse_o.
                let lse_o = lse[q];
                let mut acc = 0f64;
                for (a, b) in o.iter().zip(m) {
                    let p = kernels::exp(a - lse_o);
                    acc += (p * (a - b)) as f64;
                }
                let kl = (acc + (lse_m - lse_o) as f64) as f32;
                let loss = (q + 1 < s).then(|| lse_m - m[tokens[q + 1] as usize]);
                (kl, loss)
            })
            .collect();
        for (i, (k, l)) in rows.into_iter().enumerate() {
            kl[r0 + i] = k;
            if let Some(l) = l {
                loss[r0 + i] = l;
            }
        }
    }
    (kl, loss)
}

/// Per-token rows of one dataset, several named columns per head: the exact partial state
/// of the direct-path metrics (values per (head, sequence, position), never means).
#[derive(Default, Clone)]
pub struct TokenRows {
    /// Column names, e.g. `["kl_cspa", "kl_ablated", ...]`.
    pub cols: Vec<&'static str>,
    pub n_heads: usize,
    /// Values per column per position of a sequence (`seq_len`, or 1 for per-sequence).
    pub width: usize,
    /// `[col][head]` → values, sequence after sequence.
    pub data: Vec<Vec<Vec<f32>>>,
}

impl TokenRows {
    pub fn new(cols: &[&'static str], n_heads: usize, width: usize) -> Self {
        TokenRows {
            cols: cols.to_vec(),
            n_heads,
            width,
            data: vec![vec![Vec::new(); n_heads]; cols.len()],
        }
    }

    /// The number of sequences held.
    pub fn n_sequences(&self) -> usize {
        match self.data.first().and_then(|c| c.first()) {
            Some(v) if self.width > 0 => v.len() / self.width,
            _ => 0,
        }
    }

    /// Appends one sequence's values for column `col` and head `head` (`width` values).
    pub fn push(&mut self, col: usize, head: usize, vals: &[f32]) {
        debug_assert_eq!(vals.len(), self.width);
        self.data[col][head].extend_from_slice(vals);
    }

    pub fn get(&self, col: usize, head: usize) -> &[f32] {
        &self.data[col][head]
    }

    /// Saved under `prefix.col`, each column's heads one after another.
    pub fn save(&self, prefix: &str, st: &mut State) {
        for (c, name) in self.cols.iter().enumerate() {
            st.put(
                &format!("{prefix}.{name}"),
                Array::F32(self.data[c].iter().flatten().copied().collect()),
            );
        }
    }

    /// Appends a saved state's sequences (after those held).
    pub fn merge(&mut self, metric: &str, prefix: &str, st: &State) -> Result<()> {
        for (c, name) in self.cols.iter().enumerate() {
            let all = st.f32(metric, &format!("{prefix}.{name}"))?;
            let per_head = all.len().checked_div(self.n_heads).unwrap_or(0);
            if per_head * self.n_heads != all.len() || per_head % self.width.max(1) != 0 {
                return Err(Error::Metric {
                    metric: metric.to_string(),
                    msg: format!(
                        "saved state '{prefix}.{name}' does not fit {} heads x {} positions (other heads or dataset?)",
                        self.n_heads, self.width
                    ),
                });
            }
            for h in 0..self.n_heads {
                self.data[c][h].extend_from_slice(&all[h * per_head..(h + 1) * per_head]);
            }
        }
        Ok(())
    }
}

/// The pooled mean of per-token values over every sequence `i` and position `p < n(i)`
/// (`vals` is `width` values per sequence).
pub fn pooled(vals: &[f32], width: usize, n: impl Fn(usize) -> usize) -> (f64, usize) {
    let mut sum = 0f64;
    let mut count = 0usize;
    for (i, row) in vals.chunks(width.max(1)).enumerate() {
        for &x in &row[..n(i).min(row.len())] {
            sum += x as f64;
            count += 1;
        }
    }
    (
        if count == 0 {
            f64::NAN
        } else {
            sum / count as f64
        },
        count,
    )
}

/// `[S]` of a `[B, S]` row as a contiguous vector (for the per-sequence loops).
pub fn row_vec(a: ArrayView2<f32>, i: usize) -> Array1<f32> {
    a.row(i).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    /// The chunked KL/loss equals a plain computation (rows across a chunk boundary).
    #[test]
    fn variant_kl_loss_matches_plain() {
        let (s, d, v) = (ROWS + 3, 5, 11);
        let f = |i: usize, k: usize| ((i * 31 + k * 17) % 13) as f32 / 7.0 - 0.9;
        let resid = Array2::from_shape_fn((s, d), |(i, j)| f(i, j));
        let delta = Array2::from_shape_fn((s, d), |(i, j)| f(i + 5, j + 2) * 0.3);
        let scale = Array1::from_shape_fn(s, |i| 1.0 + (i % 3) as f32 * 0.5);
        let w_u = Array2::from_shape_fn((d, v), |(i, j)| f(i + 1, j + 7));
        let b_u = Array1::from_shape_fn(v, |j| j as f32 * 0.01);
        let tokens = Array1::from_shape_fn(s, |i| (i % v) as u32);
        let logits = Array2::from_shape_fn((s, v), |(i, j)| f(i + 2, j));
        let lse = row_lse(logits.view());
        let (kl, loss) = variant_kl_loss(
            resid.view(),
            delta.view(),
            scale.view(),
            logits.view(),
            &lse,
            tokens.view(),
            w_u.view(),
            b_u.view(),
            kernels::Par::All,
        );
        for q in 0..s {
            let x: Vec<f64> = (0..d)
                .map(|j| ((resid[[q, j]] + delta[[q, j]]) / scale[q]) as f64)
                .collect();
            let m: Vec<f64> = (0..v)
                .map(|t| (0..d).map(|j| x[j] * w_u[[j, t]] as f64).sum::<f64>() + b_u[t] as f64)
                .collect();
            let lse_m = m.iter().map(|x| x.exp()).sum::<f64>().ln();
            let lse_o = logits
                .row(q)
                .iter()
                .map(|&x| (x as f64).exp())
                .sum::<f64>()
                .ln();
            let want: f64 = (0..v)
                .map(|t| {
                    let lo = logits[[q, t]] as f64 - lse_o;
                    lo.exp() * (lo - (m[t] - lse_m))
                })
                .sum();
            assert!(
                (kl[q] as f64 - want).abs() < 1e-5,
                "kl {q}: {} vs {want}",
                kl[q]
            );
            if q + 1 < s {
                let want = lse_m - m[tokens[q + 1] as usize];
                assert!((loss[q] as f64 - want).abs() < 1e-4, "loss {q}");
            }
        }
    }

    #[test]
    fn function_words_map_eot_to_bos_and_drop_outside_ids() {
        let m = function_word_ids(PAPER_FUNCTION_WORDS, 512, 511);
        assert!(m[13] && m[511] && !m[2]);
        assert_eq!(PAPER_FUNCTION_WORDS.len(), 147);
        let m = function_word_ids(PAPER_FUNCTION_WORDS, 300, 299);
        assert!(m[299] && m[262] && !m[298]);
    }
}
