//! TransformerLens's weight processing, step by step and switchable.
//!
//! Owns: `fold_ln`, `center_writing_weights`, `center_unembed`, `fold_value_biases`, applied
//! to host [`Params`] in TransformerLens's order. Each is a pure rewrite of the parameters
//! that leaves the model's output (logits) unchanged up to the softmax's shift invariance,
//! and each must match TL's `load_and_process_state_dict` number for number (the goldens
//! check it). Must not: know about devices, files or hooks.

use ndarray::Axis;
use serde::{Deserialize, Serialize};

use super::checkpoint::{LayerNormParams, Params, W1, W2, W3};

/// Which processing steps to apply; the default is TransformerLens's `from_pretrained`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Processing {
    pub fold_ln: bool,
    pub center_writing_weights: bool,
    pub center_unembed: bool,
    pub fold_value_biases: bool,
}

impl Default for Processing {
    fn default() -> Self {
        Processing::ALL
    }
}

impl Processing {
    /// All four steps: TL's `from_pretrained` defaults, and the notebook's setting.
    pub const ALL: Processing = Processing {
        fold_ln: true,
        center_writing_weights: true,
        center_unembed: true,
        fold_value_biases: true,
    };
    /// No processing: TL's `from_pretrained_no_processing`.
    pub const NONE: Processing = Processing {
        fold_ln: false,
        center_writing_weights: false,
        center_unembed: false,
        fold_value_biases: false,
    };
}

/// Applies the chosen steps in TransformerLens's order.
pub fn process(p: &mut Params, how: Processing) {
    if how.fold_ln {
        fold_ln(p);
    }
    if how.center_writing_weights {
        center_writing_weights(p);
    }
    if how.center_unembed {
        center_unembed(p);
    }
    if how.fold_value_biases {
        fold_value_biases(p);
    }
}

/// `b' = b + b_ln @ W` for a `[.., d_model, ..]` weight read by a LayerNorm, per head.
fn fold_bias_heads(b: &mut W2, w: &W3, ln_b: &W1) {
    // w: [heads, d_model, d_head]; b: [heads, d_head]
    for (mut bh, wh) in b.outer_iter_mut().zip(w.outer_iter()) {
        bh += &ln_b.dot(&wh);
    }
}

/// `W' = w_ln[:, None] * W`, then centre along d_model: the LayerNorm's mean subtraction
/// makes the component of `W` along the all-ones direction irrelevant, and TL removes it.
fn fold_weight_heads(w: &mut W3, ln_w: &W1) {
    for mut wh in w.outer_iter_mut() {
        wh *= &ln_w.view().insert_axis(Axis(1));
        let mean = wh.mean_axis(Axis(0)).expect("d_model > 0");
        wh -= &mean.insert_axis(Axis(0));
    }
}

fn fold_matrix(w: &mut W2, b: &mut W1, ln: &LayerNormParams) {
    *b += &ln.b.dot(&*w);
    *w *= &ln.w.view().insert_axis(Axis(1));
    let mean = w.mean_axis(Axis(0)).expect("d_model > 0");
    *w -= &mean.insert_axis(Axis(0));
}

/// Folds each LayerNorm's affine part into the weights that read it (ln1 -> Q, K, V;
/// ln2 -> W_in; ln_final -> W_U), leaving TL's `LayerNormPre`.
pub fn fold_ln(p: &mut Params) {
    for block in &mut p.blocks {
        if let Some(ln) = block.ln1.take() {
            let a = &mut block.attn;
            fold_bias_heads(&mut a.b_q, &a.w_q, &ln.b);
            fold_bias_heads(&mut a.b_k, &a.w_k, &ln.b);
            fold_bias_heads(&mut a.b_v, &a.w_v, &ln.b);
            fold_weight_heads(&mut a.w_q, &ln.w);
            fold_weight_heads(&mut a.w_k, &ln.w);
            fold_weight_heads(&mut a.w_v, &ln.w);
        }
        if let Some(ln) = block.ln2.take() {
            fold_matrix(&mut block.mlp.w_in, &mut block.mlp.b_in, &ln);
        }
    }
    if let Some(ln) = p.ln_final.take() {
        fold_matrix(&mut p.w_u, &mut p.b_u, &ln);
    }
}

/// Subtracts the mean over d_model (the last axis) from every row.
fn center_last_axis<D: ndarray::RemoveAxis>(w: &mut ndarray::ArcArray<f32, D>) {
    let last = Axis(w.ndim() - 1);
    let mean = w.mean_axis(last).expect("non-empty axis");
    *w -= &mean.insert_axis(last);
}

fn center_vector(b: &mut W1) {
    let mean = b.mean().unwrap_or(0.0);
    *b -= mean;
}

/// Makes every matrix (and bias) that writes to the residual stream zero-mean along
/// d_model; the LayerNorms that read the stream subtract the mean anyway.
pub fn center_writing_weights(p: &mut Params) {
    center_last_axis(&mut p.w_e);
    center_last_axis(&mut p.w_pos);
    for block in &mut p.blocks {
        center_last_axis(&mut block.attn.w_o);
        center_vector(&mut block.attn.b_o);
        center_last_axis(&mut block.mlp.w_out);
        center_vector(&mut block.mlp.b_out);
    }
}

/// `W_U -= W_U.mean(-1)`, `b_U -= b_U.mean()`: log-softmax is shift invariant per token.
pub fn center_unembed(p: &mut Params) {
    center_last_axis(&mut p.w_u);
    center_vector(&mut p.b_u);
}

/// `b_O += sum_h b_V[h] @ W_O[h]`, `b_V = 0`: pattern rows sum to 1, so the value bias
/// reaches the output as a constant.
pub fn fold_value_biases(p: &mut Params) {
    for block in &mut p.blocks {
        let a = &mut block.attn;
        for (bv, wo) in a.b_v.outer_iter().zip(a.w_o.outer_iter()) {
            a.b_o += &bv.dot(&wo);
        }
        a.b_v.fill(0.0);
    }
}
