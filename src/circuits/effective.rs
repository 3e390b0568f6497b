//! Effective embeddings (`docs/metrics.md` §3; the notebook's setup cell,
//! `get_effective_embedding_2`): what block 0 turns each token's embedding into when the
//! token attends only to itself.
//!
//! Owns: `W_E`, `W_EE` (block 0's heads and MLP included), `W_EE0` (MLP 0's output only) and
//! `W_EE0A` (`W_EE - W_E`) from the processed host weights, and the LayerNorm a head applies
//! to its input ([`head_input`]). Must not: know about heads other than block 0's, files or
//! metrics; the circuits and `runner cache --effective-embeddings` read these.
//!
//! Memory: rows are processed [`ROWS`] at a time, so beyond the four `[d_vocab, d_model]`
//! outputs only a `[ROWS, d_mlp]` block of MLP activations is ever held.

use ndarray::{s, Array2, ArrayView2, Axis, Zip};
use rayon::prelude::*;

use crate::kernels;
use crate::kernels::gelu_new as gelu_new_one;
use crate::model::checkpoint::LayerNormParams;
use crate::model::{ModelConfig, Params};

/// Vocabulary rows per block: bounds the MLP's activations to `ROWS x d_mlp` floats.
pub const ROWS: usize = 4096;

/// The names the notebook's `effective_embeddings` dict uses (and the safetensors file).
pub const NAMES: [&str; 4] = ["W_E", "W_EE", "W_EE0", "W_EE0A"];

/// Which of the four matrices a circuit reads as its token side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Embedding {
    WE,
    WEE,
    WEE0,
    WEE0A,
}

impl Embedding {
    /// From its notebook name (`W_E`, `W_EE`, `W_EE0`, `W_EE0A`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "W_E" => Embedding::WE,
            "W_EE" => Embedding::WEE,
            "W_EE0" => Embedding::WEE0,
            "W_EE0A" => Embedding::WEE0A,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Embedding::WE => NAMES[0],
            Embedding::WEE => NAMES[1],
            Embedding::WEE0 => NAMES[2],
            Embedding::WEE0A => NAMES[3],
        }
    }
}

/// `W_E`, `W_EE` and `W_EE0`, each `[d_vocab, d_model]`; `W_EE0A` is derived.
pub struct EffectiveEmbeddings {
    pub w_e: Array2<f32>,
    pub w_ee: Array2<f32>,
    pub w_ee0: Array2<f32>,
}

impl EffectiveEmbeddings {
    /// `W_EE - W_E` (= block 0's attention plus MLP output).
    pub fn w_ee0a(&self) -> Array2<f32> {
        &self.w_ee - &self.w_e
    }

    /// One of the four, owned (W_EE0A is computed on the fly).
    pub fn get(&self, which: Embedding) -> Array2<f32> {
        match which {
            Embedding::WE => self.w_e.clone(),
            Embedding::WEE => self.w_ee.clone(),
            Embedding::WEE0 => self.w_ee0.clone(),
            Embedding::WEE0A => self.w_ee0a(),
        }
    }

    /// All four under the notebook's names, in [`NAMES`] order.
    pub fn into_named(self) -> Vec<(&'static str, Array2<f32>)> {
        let w_ee0a = self.w_ee0a();
        vec![
            (NAMES[0], self.w_e),
            (NAMES[1], self.w_ee),
            (NAMES[2], self.w_ee0),
            (NAMES[3], w_ee0a),
        ]
    }
}

/// Each row through a LayerNorm: `(x - mean) / sqrt(var + eps)` (population variance, TL's
/// `LayerNormPre`), then `* w + b` while the LayerNorm has not been folded (`ln` is `Some`).
/// The row statistics are accumulated in f64: rows are d_model long and the goldens are f64.
pub fn head_input(x: ArrayView2<f32>, ln: Option<&LayerNormParams>, eps: f64) -> Array2<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let d = out.ncols();
    out.axis_iter_mut(Axis(0))
        .into_par_iter()
        .for_each(|mut row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.mapv_inplace(|v| ((v as f64 - mean) * inv) as f32);
            if let Some(ln) = ln {
                Zip::from(&mut row)
                    .and(&ln.w)
                    .and(&ln.b)
                    .for_each(|v, &w, &b| *v = *v * w + b);
            }
        });
    out
}

/// `[heads, d_model, d_head]` (W_Q, W_K, W_V of the listed heads) side by side as
/// `[d_model, heads * d_head]`, so one matmul serves every head.
pub fn heads_side_by_side(w: ndarray::ArrayView3<f32>, heads: &[usize]) -> Array2<f32> {
    let (_, d, dh) = w.dim();
    let mut out = Array2::<f32>::zeros((d, heads.len() * dh));
    for (i, &h) in heads.iter().enumerate() {
        out.slice_mut(s![.., i * dh..(i + 1) * dh])
            .assign(&w.index_axis(Axis(0), h));
    }
    out
}

/// The effective embeddings of the processed weights `p` (`docs/metrics.md` §3).
///
/// Block 0's value and output weights are used without `b_V` and `b_O`, and MLP 0 with its
/// biases, exactly as the notebook's `get_effective_embedding_2` does.
pub fn effective_embeddings(p: &Params, cfg: &ModelConfig) -> EffectiveEmbeddings {
    let b0 = &p.blocks[0];
    let (v, d) = p.w_e.dim();
    let heads: Vec<usize> = (0..cfg.n_heads).collect();
    let w_v = heads_side_by_side(b0.attn.w_v.view(), &heads); // [D, H*dh]
    let w_o = b0
        .attn
        .w_o
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((cfg.n_heads * cfg.d_head, d))
        .expect("[H, dh, D] holds H*dh*D values"); // [H*dh, D]
    let w_e = p.w_e.to_owned();
    let mut w_ee = Array2::<f32>::zeros((v, d));
    let mut w_ee0 = Array2::<f32>::zeros((v, d));
    for r0 in (0..v).step_by(ROWS) {
        let r1 = (r0 + ROWS).min(v);
        let x = w_e.slice(s![r0..r1, ..]);
        // resid_mid = x + sum_h LN1(x) @ W_V[h] @ W_O[h]
        let n1 = head_input(x, b0.ln1.as_ref(), cfg.eps);
        let z = kernels::matmul(n1.view(), w_v.view());
        let mut m = kernels::matmul(z.view(), w_o.view());
        m += &x;
        // mlp_out = W_out . gelu_new(LN2(resid_mid) @ W_in + b_in) + b_out
        let n2 = head_input(m.view(), b0.ln2.as_ref(), cfg.eps);
        let mut pre = kernels::matmul(n2.view(), b0.mlp.w_in.view());
        let b_in = b0
            .mlp
            .b_in
            .as_slice()
            .expect("1-d owned array is contiguous");
        pre.as_slice_mut()
            .expect("fresh matmul output is contiguous")
            .par_chunks_mut(b_in.len())
            .for_each(|row| {
                for (x, b) in row.iter_mut().zip(b_in) {
                    *x = gelu_new_one(*x + b);
                }
            });
        let mut f = kernels::matmul(pre.view(), b0.mlp.w_out.view());
        f += &b0.mlp.b_out;
        w_ee.slice_mut(s![r0..r1, ..]).assign(&(&m + &f));
        w_ee0.slice_mut(s![r0..r1, ..]).assign(&f);
    }
    EffectiveEmbeddings { w_e, w_ee, w_ee0 }
}
