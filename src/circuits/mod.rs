//! Weight-based circuits: what a head does to every token, from the processed weights
//! alone (`docs/metrics.md` §3-5; the Copy Suppression paper's §3.1-3.2).
//!
//! Owns: the effective embeddings ([`effective`]), the blocked diagonal-rank engine
//! ([`rank`]), and the two circuits built on them, per layer: the full OV circuit's rank of a
//! source token's own logit ([`ov_ranks`], §4) and the full QK circuit's rank of the
//! diagonal ([`qk_ranks`], §5). Must not: read activations, datasets or the spec, or make
//! tables (the `ov_circuit` / `qk_circuit` metrics in `metrics::circuits` do).
//!
//! Cost, per head, with `V = d_vocab`, `D = d_model`, `dh = d_head`: the `[V, V]` matrix
//! is never built; it is made `[block_rows, 1024]` tile by tile as `(X @ W_h) @ R_h`,
//! `2·V²·dh` FLOP (GPT-2 small: 0.32 TFLOP a head and circuit, 93 TFLOP for both circuits on
//! all 144 heads), plus a counting pass over the same `V²` values. Per layer the right
//! factors `R_h` of its selected heads take `heads x dh x V` floats (one `W_U`'s worth for
//! all 12 heads of GPT-2 small).

pub mod effective;
pub mod rank;

use ndarray::{Array2, Array3, ArrayView2, Axis};

pub use effective::{effective_embeddings, head_input, EffectiveEmbeddings, Embedding};
pub use rank::{rank_stats, RankStats};

use crate::error::Result;
use crate::kernels;
use crate::model::{ModelConfig, Params};

/// FLOPs of the matmuls of one head of one circuit on a `V`-token vocabulary.
pub fn head_flop(cfg: &ModelConfig) -> f64 {
    2.0 * (cfg.d_vocab as f64).powi(2) * cfg.d_head as f64
}

/// One head's OV ranks: `rank_neg[s]` = 1 + #{t : M[s, t] < M[s, s]} (1 = the head pushes
/// s's own logit down the most), `rank_pos[s]` = 1 + #{t : M[s, t] > M[s, s]}.
#[derive(Debug, Clone, PartialEq)]
pub struct OvRanks {
    pub rank_neg: Vec<u32>,
    pub rank_pos: Vec<u32>,
}

/// `R_h` for `heads` of a `[heads, dh, V]` stack from `[V, heads * dh]` (key side of QK).
fn transpose_heads(k: Array2<f32>, heads: usize, dh: usize) -> Array3<f32> {
    let v = k.nrows();
    k.into_shape_with_order((v, heads, dh))
        .expect("[V, heads * dh]")
        .permuted_axes([1, 2, 0])
        .as_standard_layout()
        .into_owned()
}

/// The full OV circuit of `heads` of `layer` (`docs/metrics.md` §4):
/// `M[s, t] = LN(E[s]) @ W_V[h] @ W_O[h] @ W_U[:, t]`, biases left out, with `E` the token
/// side (normally `W_EE`) and `LN` layer `layer`'s ln1 as the head would apply it.
pub fn ov_ranks(
    p: &Params,
    cfg: &ModelConfig,
    source: ArrayView2<f32>,
    layer: usize,
    heads: &[usize],
    block_rows: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<OvRanks>> {
    let attn = &p.blocks[layer].attn;
    let x = head_input(source, p.blocks[layer].ln1.as_ref(), cfg.eps);
    let w = effective::heads_side_by_side(attn.w_v.view(), heads);
    let (d, v, dh) = (cfg.d_model, cfg.d_vocab, cfg.d_head);
    let mut r = Array3::<f32>::zeros((heads.len(), dh, v));
    for (i, &h) in heads.iter().enumerate() {
        // W_O[h] @ W_U: [dh, V], made once per head and read by every block.
        let wo = attn.w_o.index_axis(Axis(0), h);
        debug_assert_eq!(wo.dim(), (dh, d));
        r.index_axis_mut(Axis(0), i)
            .assign(&kernels::matmul(wo, p.w_u.view()));
    }
    let f = rank::Factors {
        x: x.view(),
        w: w.view(),
        r: r.view(),
    };
    let opts = rank::Options {
        block_rows,
        below: true,
    };
    let counts = rank::diagonal_counts(&f, opts, progress)?;
    Ok(counts
        .into_iter()
        .map(|c| OvRanks {
            rank_neg: c.below.into_iter().map(|n| n + 1).collect(),
            rank_pos: c.above.into_iter().map(|n| n + 1).collect(),
        })
        .collect())
}

/// The full QK circuit of `heads` of `layer` (`docs/metrics.md` §5):
/// `S[t, s] = LN(W_U[:, t]) @ W_Q[h] @ W_K[h]^T @ LN(E[s])^T`, biases dropped; returns
/// `rank[t]` = 1 + #{s : S[t, s] > S[t, t]} per head. The `1 / sqrt(d_head)` scale does not
/// change a rank and is left out.
pub fn qk_ranks(
    p: &Params,
    cfg: &ModelConfig,
    source: ArrayView2<f32>,
    layer: usize,
    heads: &[usize],
    block_rows: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Vec<u32>>> {
    let block = &p.blocks[layer];
    let ln = block.ln1.as_ref();
    // Query side: each token's unembedding direction, as a residual-stream vector.
    let q_in = head_input(p.w_u.t(), ln, cfg.eps);
    let k_in = head_input(source, ln, cfg.eps);
    let w_q = effective::heads_side_by_side(block.attn.w_q.view(), heads);
    let w_k = effective::heads_side_by_side(block.attn.w_k.view(), heads);
    let r = transpose_heads(
        kernels::matmul(k_in.view(), w_k.view()),
        heads.len(),
        cfg.d_head,
    );
    drop(k_in);
    let f = rank::Factors {
        x: q_in.view(),
        w: w_q.view(),
        r: r.view(),
    };
    let opts = rank::Options {
        block_rows,
        below: false,
    };
    let counts = rank::diagonal_counts(&f, opts, progress)?;
    Ok(counts
        .into_iter()
        .map(|c| c.above.into_iter().map(|n| n + 1).collect())
        .collect())
}
