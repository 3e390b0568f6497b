//! The write of one intervention unit: the residual stream a resumed pass starts from.
//!
//! Owns: what `zero`, `mean`, `mean_per_position` and `patch` write at a hook point, and how
//! that write reaches the residual stream (see the module above). Must not: run passes or
//! measure. Works on host buffers: the batch's cached activations, read in place.

use ndarray::ArrayD;

use super::{Hook, Kind, Unit, Value};
use crate::error::{Error, Result};

/// What a write reads: the unchanged activation at the hook `[b, s, ...]`, the residual
/// stream at the resume point `[b, s, d]`, and the new value's source.
pub struct WriteInputs<'a> {
    pub hook: Hook,
    pub kind: Kind,
    /// The unchanged activation at the hook.
    pub old: &'a ArrayD<f32>,
    /// The residual stream where the pass resumes.
    pub resid: &'a ArrayD<f32>,
    /// A patch's source activation at the hook (same shape as `old`).
    pub source: Option<&'a ArrayD<f32>>,
    /// A mean ablation's mean: the hook's shape without batch and position (`[pos, ...]`
    /// per position).
    pub mean: Option<&'a ArrayD<f32>>,
    /// `W_O` of the layer `[heads, d_head, d_model]` (for `z`).
    pub w_o: Option<ndarray::ArrayView3<'a, f32>>,
}

/// Writes `unit` into `out` (`[b * s * d]`, the residual stream the pass resumes from).
pub fn write_unit(w: &WriteInputs, unit: &Unit, out: &mut [f32]) -> Result<()> {
    let shape = w.old.shape();
    let (b, s) = (shape[0], shape[1]);
    let d = w.resid.shape()[2];
    let resid = w
        .resid
        .as_slice()
        .ok_or_else(|| Error::Other("resid not contiguous".into()))?;
    out.copy_from_slice(resid);
    let old = w
        .old
        .as_slice()
        .ok_or_else(|| Error::Other("activation not contiguous".into()))?;
    let k: usize = shape[2..].iter().product();
    // The parts of the hook's last axes written: (offset, width) per head, or all of it.
    let (parts, width): (Vec<(usize, usize)>, usize) = if w.hook.per_head() {
        let width = shape[3];
        (unit.heads.iter().map(|&h| (h, h * width)).collect(), width)
    } else {
        (vec![(0, 0)], k)
    };
    let positions: Vec<usize> = match unit.pos {
        Some(p) => vec![p],
        None => (0..s).collect(),
    };
    let source = w.source.map(|a| a.as_slice().expect("contiguous"));
    let mean = w.mean.map(|a| a.as_slice().expect("contiguous"));
    let mut new = vec![0f32; width];
    let mut delta = vec![0f32; width];
    for i in 0..b {
        for &p in &positions {
            let row = (i * s + p) * k;
            let r = &mut out[(i * s + p) * d..(i * s + p + 1) * d];
            for &(h, off) in &parts {
                match w.kind {
                    Kind::Ablate(Value::Zero) => new.fill(0.0),
                    Kind::Ablate(Value::Mean) => {
                        new.copy_from_slice(&mean.expect("planned")[off..off + width])
                    }
                    Kind::Ablate(Value::MeanPerPosition) => {
                        let m = mean.expect("planned");
                        new.copy_from_slice(&m[p * k + off..p * k + off + width]);
                    }
                    Kind::Patch => {
                        new.copy_from_slice(&source.expect("planned")[row + off..row + off + width])
                    }
                }
                match w.hook {
                    Hook::ResidPre | Hook::ResidPost => r.copy_from_slice(&new),
                    Hook::Result | Hook::AttnOut | Hook::MlpOut => {
                        for ((r, n), o) in r.iter_mut().zip(&new).zip(&old[row + off..]) {
                            *r += n - o;
                        }
                    }
                    Hook::Z => {
                        for ((dl, n), o) in delta.iter_mut().zip(&new).zip(&old[row + off..]) {
                            *dl = n - o;
                        }
                        let w_o = w.w_o.expect("z has W_O");
                        let wh = w_o.index_axis(ndarray::Axis(0), h);
                        for (e, &dl) in delta.iter().enumerate() {
                            if dl == 0.0 {
                                continue;
                            }
                            let wr = wh.row(e);
                            for (r, &wv) in r.iter_mut().zip(wr.iter()) {
                                *r += dl * wv;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
