//! The tensor operations of the dfdx forward pass: the seam between the model and dfdx.
//!
//! Owns: linear layers, LayerNorm(Pre) with its scale, causal attention softmax, GPT-2's tanh
//! GELU, and moving tensors between host arrays and the device. Must not: know layer
//! numbers or hook names. Keeping every dfdx call of the tensor path here is what lets a
//! faster kernel (or a CUDA one) replace one function without touching the model.
//!
//! This is the device-generic path (CUDA's, and the CPU's in the tests that check it against
//! the goldens). A normal CPU run does not come here: it runs on host buffers in
//! `model::host`, so no op here asks which device it is on.

use dfdx::prelude::*;
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

pub type T1<D> = Tensor<(usize,), f32, D>;
pub type T2<D> = Tensor<(usize, usize), f32, D>;
pub type T3<D> = Tensor<(usize, usize, usize), f32, D>;
pub type T4<D> = Tensor<(usize, usize, usize, usize), f32, D>;

/// Copies a host array to the device with the given runtime shape (elements in row-major
/// order of the array's logical layout).
pub fn upload<S: Shape, D: Device<f32>>(
    dev: &D,
    a: &ArrayD<f32>,
    shape: S,
) -> Result<Tensor<S, f32, D>> {
    if a.len() != shape.num_elements() {
        return Err(Error::Other(format!(
            "upload: {} elements for shape {:?}",
            a.len(),
            shape.concrete().into_iter().collect::<Vec<_>>()
        )));
    }
    let data: Vec<f32> = a.iter().copied().collect();
    Ok(dev.tensor_from_vec(data, shape))
}

/// Copies a device tensor to a host array of the same shape.
pub fn download<S: Shape, D: Device<f32>>(t: &Tensor<S, f32, D>) -> ArrayD<f32> {
    let shape: Vec<usize> = t.shape().concrete().into_iter().collect();
    ArrayD::from_shape_vec(IxDyn(&shape), t.as_vec())
        .expect("dfdx returns shape.num_elements() values")
}

/// A linear layer `x @ w + b` (`w`: `[in, out]`) as device tensors.
pub struct Linear<D: Device<f32>> {
    w: T2<D>,
    b: T1<D>,
}

impl<D: Device<f32>> Linear<D> {
    /// Uploads host weights `w` (`[n_in, n_out]`) and bias `b` (`[n_out]`).
    pub fn new(dev: &D, w: &ndarray::ArcArray2<f32>, b: &ndarray::ArcArray1<f32>) -> Result<Self> {
        let (n_in, n_out) = w.dim();
        if b.len() != n_out {
            return Err(Error::Other(format!(
                "linear: bias of {} values for [{n_in}, {n_out}] weights",
                b.len()
            )));
        }
        Ok(Linear {
            w: dev.tensor_from_vec(w.iter().copied().collect(), (n_in, n_out)),
            b: dev.tensor_from_vec(b.iter().copied().collect(), (n_out,)),
        })
    }
}

impl<D: Device<f32>> Linear<D> {
    /// `w`, `[n_in, n_out]`.
    pub fn weight(&self) -> &T2<D> {
        &self.w
    }

    /// `b`, `[n_out]`.
    pub fn bias(&self) -> &T1<D> {
        &self.b
    }
}

/// `x @ w + b` over the last axis: `[B, S, in] @ [in, out] + [out]`.
pub fn linear<D: Device<f32>>(x: T3<D>, l: &Linear<D>) -> T3<D> {
    let y = x.matmul(l.w.clone());
    let shape = *y.shape();
    y + l.b.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
}

/// `x - mean(x)` and TL's `hook_scale` = `sqrt(mean((x - mean)^2) + eps)` over d_model,
/// returned separately because TL hooks the scale before dividing.
pub fn center_and_scale<D: Device<f32>>(x: T3<D>, eps: f64) -> (T3<D>, T2<D>) {
    let shape = *x.shape();
    let mean: T2<D> = x.clone().mean::<_, Axis<2>>();
    let centered = x - mean.broadcast_like::<_, Axis<2>>(&shape);
    let var: T2<D> = centered.clone().square().mean::<_, Axis<2>>();
    let scale = (var + eps as f32).sqrt();
    (centered, scale)
}

/// `centered / scale`: TL's `hook_normalized` (taken before the affine part).
pub fn normalize<D: Device<f32>>(centered: T3<D>, scale: &T2<D>) -> T3<D> {
    let shape = *centered.shape();
    centered / scale.clone().broadcast_like::<_, Axis<2>>(&shape)
}

/// `x * w + b`, a LayerNorm's affine part while it has not been folded.
pub fn affine<D: Device<f32>>(x: T3<D>, w: &T1<D>, b: &T1<D>) -> T3<D> {
    let shape = *x.shape();
    x * w.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
        + b.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
}

/// Attention scores `q . k / sqrt(d_head)` with the causal mask applied as `-inf`, exactly as
/// TL's `hook_attn_scores` shows them. `q`, `k`: `[B, H, S, d_head]`.
pub fn causal_scores<D: Device<f32>>(q: T4<D>, k: T4<D>, d_head: usize) -> T4<D> {
    let dev = q.device().clone();
    let kt = k.permute::<_, Axes4<0, 1, 3, 2>>();
    let scores = q.matmul(kt) / (d_head as f32).sqrt();
    let shape = *scores.shape();
    // Adding 0 below the diagonal leaves scores bit-identical; -inf above masks them.
    let mask: T4<D> = dev.upper_tri_like(&shape, f32::NEG_INFINITY, 1);
    scores + mask
}

/// Softmax over the key axis.
pub fn softmax_keys<D: Device<f32>>(scores: T4<D>) -> T4<D> {
    scores.softmax::<Axis<3>>()
}

/// GPT-2's GELU (`gelu_new`, the tanh approximation; dfdx's `fast_gelu`).
pub fn gelu_new<D: Device<f32>>(x: T3<D>) -> T3<D> {
    x.fast_gelu()
}
