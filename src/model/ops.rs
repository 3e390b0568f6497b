//! The tensor operations the forward pass is built from: the one seam between the model and
//! dfdx.
//!
//! Owns: linear layers, LayerNorm(Pre) with its scale, causal attention softmax, GPT-2's tanh
//! GELU, and moving tensors between host arrays and the device. Must not: know layer
//! numbers or hook names. Keeping every dfdx call of the hot path here is what lets a faster
//! kernel (or a CUDA one) replace one function without touching the model.
//!
//! On the CPU two kernels replace dfdx's: the linear layers' matmul goes to gemm 0.19, which
//! uses AVX-512 where the processor has it (dfdx 0.13's gemm 0.15 does not, ~65 vs ~107
//! GFLOP/s per core measured here), and GPT-2's GELU runs on every core with a vectorised
//! `exp` (dfdx's element-wise kernels are single-threaded), as do LayerNorm and the attention
//! softmax. Each is picked at run time by the device's type, so the generic (and CUDA) path
//! is unchanged.

use std::any::Any;

use dfdx::prelude::*;
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;

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

/// Reinterprets a tensor known to live on `Cpu` as one of the generic device `D` (they are
/// the same type at run time; `None` otherwise).
fn from_cpu<S: Shape, D: Device<f32> + 'static>(
    t: Tensor<S, f32, Cpu>,
) -> Option<Tensor<S, f32, D>> {
    let boxed: Box<dyn Any> = Box::new(t);
    boxed.downcast::<Tensor<S, f32, D>>().ok().map(|b| *b)
}

fn as_cpu<S: Shape, D: Device<f32> + 'static>(
    t: &Tensor<S, f32, D>,
) -> Option<&Tensor<S, f32, Cpu>> {
    (t as &dyn Any).downcast_ref::<Tensor<S, f32, Cpu>>()
}

/// A linear layer `x @ w + b` (`w`: `[in, out]`). On the CPU its weights live in host
/// vectors that gemm 0.19 reads in place (dfdx 0.13 cannot lend a tensor's buffer, and
/// copying the weights on every call costs more than the small matmuls themselves); on other
/// devices they are dfdx tensors.
pub struct Linear<D: Device<f32>> {
    inner: LinearWeights<D>,
}

enum LinearWeights<D: Device<f32>> {
    /// Shares the buffers of the host parameters (`Params`): no second copy on the CPU.
    Host {
        w: ndarray::ArcArray2<f32>,
        b: ndarray::ArcArray1<f32>,
    },
    Device {
        w: T2<D>,
        b: T1<D>,
    },
}

impl<D: Device<f32>> Linear<D> {
    /// From host weights `w` (`[n_in, n_out]`) and bias `b` (`[n_out]`).
    pub fn new(dev: &D, w: ndarray::ArcArray2<f32>, b: ndarray::ArcArray1<f32>) -> Result<Self> {
        let (n_in, n_out) = w.dim();
        if b.len() != n_out {
            return Err(Error::Other(format!(
                "linear: bias of {} values for [{n_in}, {n_out}] weights",
                b.len()
            )));
        }
        let inner = if (dev as &dyn Any).is::<Cpu>() {
            // gemm reads row-major slices: keep the shared buffer when it already is one.
            let w = if w.is_standard_layout() {
                w
            } else {
                w.as_standard_layout().to_owned().into_shared()
            };
            LinearWeights::Host { w, b }
        } else {
            LinearWeights::Device {
                w: dev.tensor_from_vec(w.iter().copied().collect(), (n_in, n_out)),
                b: dev.tensor_from_vec(b.to_vec(), (n_out,)),
            }
        };
        Ok(Linear { inner })
    }
}

/// `x @ w + b` over the last axis: `[B, S, in] @ [in, out] + [out]`.
pub fn linear<D: Device<f32> + 'static>(x: T3<D>, l: &Linear<D>) -> T3<D> {
    match &l.inner {
        LinearWeights::Host { w, b } => {
            let cpu = as_cpu(&x).expect("host weights exist only on the Cpu device");
            let (bs, s, k) = *cpu.shape();
            let (n_in, n_out) = w.dim();
            assert_eq!(k, n_in, "linear: input width");
            let w = w
                .as_slice()
                .expect("standard layout, checked in Linear::new");
            let b = b.as_slice().expect("a 1-d owned array is contiguous");
            let mut y = crate::kernels::sgemm(bs * s, k, n_out, &cpu.as_vec(), w);
            y.par_chunks_mut(n_out)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
            from_cpu(cpu.device().tensor_from_vec(y, (bs, s, n_out))).expect("D is Cpu")
        }
        LinearWeights::Device { w, b } => {
            let y = x.matmul(w.clone());
            let shape = *y.shape();
            y + b.clone().broadcast_like::<_, Axes2<0, 1>>(&shape)
        }
    }
}

/// `x - mean(x)` and TL's `hook_scale` = `sqrt(mean((x - mean)^2) + eps)` over d_model,
/// returned separately because TL hooks the scale before dividing.
pub fn center_and_scale<D: Device<f32>>(x: T3<D>, eps: f64) -> (T3<D>, T2<D>) {
    if let Some(cpu) = as_cpu(&x) {
        let (b, s, d) = *cpu.shape();
        let mut v = cpu.as_vec();
        let mut scale = vec![0f32; b * s];
        v.par_chunks_mut(d)
            .zip(scale.par_iter_mut())
            .for_each(|(row, sc)| {
                let mean = row.iter().sum::<f32>() / d as f32;
                row.iter_mut().for_each(|x| *x -= mean);
                let var = row.iter().map(|x| x * x).sum::<f32>() / d as f32;
                *sc = (var + eps as f32).sqrt();
            });
        let dev = cpu.device();
        if let (Some(c), Some(sc)) = (
            from_cpu(dev.tensor_from_vec(v, (b, s, d))),
            from_cpu(dev.tensor_from_vec(scale, (b, s))),
        ) {
            return (c, sc);
        }
    }
    let shape = *x.shape();
    let mean: T2<D> = x.clone().mean::<_, Axis<2>>();
    let centered = x - mean.broadcast_like::<_, Axis<2>>(&shape);
    let var: T2<D> = centered.clone().square().mean::<_, Axis<2>>();
    let scale = (var + eps as f32).sqrt();
    (centered, scale)
}

/// `centered / scale`: TL's `hook_normalized` (taken before the affine part).
pub fn normalize<D: Device<f32>>(centered: T3<D>, scale: &T2<D>) -> T3<D> {
    if let (Some(c), Some(sc)) = (as_cpu(&centered), as_cpu(scale)) {
        let d = c.shape().2;
        let mut v = c.as_vec();
        let sc = sc.as_vec();
        v.par_chunks_mut(d)
            .zip(sc.par_iter())
            .for_each(|(row, &s)| {
                row.iter_mut().for_each(|x| *x /= s);
            });
        if let Some(y) = from_cpu(c.device().tensor_from_vec(v, *c.shape())) {
            return y;
        }
    }
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
    if let Some(cpu) = as_cpu(&scores) {
        let k = cpu.shape().3;
        let mut v = cpu.as_vec();
        v.par_chunks_mut(k).for_each(|row| {
            let m = crate::kernels::max(row);
            let mut sum = 0f32;
            for x in row.iter_mut() {
                // Masked scores are -inf: exactly 0 after softmax, as in TL.
                let e = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    crate::kernels::exp(*x - m)
                };
                *x = e;
                sum += e;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        });
        if let Some(y) = from_cpu(cpu.device().tensor_from_vec(v, *cpu.shape())) {
            return y;
        }
    }
    scores.softmax::<Axis<3>>()
}

/// `gelu_new` of one value: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with
/// `tanh(u) = 1 - 2 / (exp(2u) + 1)` so it vectorises.
#[inline(always)]
pub(crate) fn gelu_new_one(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (crate::kernels::exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// GPT-2's GELU (`gelu_new`, the tanh approximation).
pub fn gelu_new<D: Device<f32> + 'static>(x: T3<D>) -> T3<D> {
    if let Some(cpu) = as_cpu(&x) {
        let mut v = cpu.as_vec();
        v.par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|x| *x = gelu_new_one(*x)));
        if let Some(y) = from_cpu(cpu.device().tensor_from_vec(v, *cpu.shape())) {
            return y;
        }
    }
    x.fast_gelu()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_fast_paths_are_taken_and_agree_with_dfdx() {
        let dev = Cpu::default();
        let x: T3<Cpu> =
            dev.tensor_from_vec((0..24).map(|i| i as f32 * 0.1 - 1.0).collect(), (2, 3, 4));
        let w: T2<Cpu> =
            dev.tensor_from_vec((0..20).map(|i| (i as f32 * 0.37).sin()).collect(), (4, 5));
        let b: T1<Cpu> = dev.tensor_from_vec(vec![0.1, -0.2, 0.3, 0.0, 1.0], (5,));
        let w_host = ndarray::Array2::from_shape_vec((4, 5), w.as_vec())
            .unwrap()
            .into_shared();
        let b_host = ndarray::Array1::from_vec(b.as_vec()).into_shared();
        let l = Linear::new(&dev, w_host, b_host).unwrap();
        assert!(
            matches!(l.inner, LinearWeights::Host { .. }),
            "Cpu keeps host weights"
        );
        let fast = linear(x.clone(), &l);
        let slow =
            x.clone().matmul(w.clone()) + b.clone().broadcast_like::<_, Axes2<0, 1>>(&(2, 3, 5));
        for (a, b) in fast.as_vec().iter().zip(slow.as_vec()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let g = gelu_new(x.clone()).as_vec();
        for (a, b) in g.iter().zip(x.clone().fast_gelu().as_vec()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }

        let (c, sc) = center_and_scale(x.clone(), 1e-5);
        let n = normalize(c, &sc);
        let reference = x.clone().normalize::<Axis<2>>(1e-5);
        for (a, b) in n.as_vec().iter().zip(reference.as_vec()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }

        let q: T4<Cpu> = dev.tensor_from_vec(
            (0..48).map(|i| (i as f32 * 0.71).cos()).collect(),
            (1, 2, 4, 6),
        );
        let scores = causal_scores(q.clone(), q, 6);
        let p = softmax_keys(scores.clone()).as_vec();
        for (a, b) in p.iter().zip(scores.softmax::<Axis<3>>().as_vec()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Above the diagonal the pattern is exactly zero.
        assert_eq!(p[1], 0.0);
    }
}
