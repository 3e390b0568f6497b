//! The write of intervention units: the residual stream a resumed pass starts from.
//!
//! Owns: what `zero`, `mean`, `mean_per_position` and `patch` write at a hook point, and how
//! that write reaches the residual stream (see the module above), as one [`seam::Op`]
//! ([`WriteOp`]) with two bodies: the host body writes each unit of a stack into one host
//! buffer ([`write_unit`], reading the batch's cached activations in place); the device body
//! builds the whole stack in dfdx tensor ops where the activations are, and the resumed pass
//! starts from that tensor ([`Resid::Device`]): nothing crosses to the host but the pass's
//! final rows. Also [`CachedResid`], the unchanged residual stream at a point, the same way.
//! Must not: run passes or measure.
//!
//! The device body in one formula: with `old` and `new` the hook's activation `[b, s, c, w]`
//! (`c` heads of `w` values for `z` and `result`, else one part of `d_model`) and a mask
//! `M[k, s, c]` of what unit `k` writes, the stack is
//! `resid[k, b, s] + (M * (new - old))[k, b, s] @ W` with `W` = `W_O` (`z`), the sum over
//! heads (`result`), or nothing (the other hooks, whose change adds to the stream as it is).

use dfdx::prelude::*;
use ndarray::{ArrayD, ArrayViewD};
use rayon::prelude::*;

use super::{Hook, Kind, Unit, Value};
use crate::error::{Error, Result};
use crate::hooks::ActivationCache;
use crate::model::ops::{T2, T3, T4};
use crate::model::Resid;
use crate::seam::{self, DeviceActs, DeviceTensor};

/// What a write reads: the unchanged activation at the hook `[b, s, ...]`, the residual
/// stream at the resume point `[b, s, d]`, and the new value's source.
pub struct WriteInputs<'a> {
    pub hook: Hook,
    pub kind: Kind,
    /// The unchanged activation at the hook (standard layout).
    pub old: ArrayViewD<'a, f32>,
    /// The residual stream where the pass resumes (standard layout).
    pub resid: ArrayViewD<'a, f32>,
    /// A patch's source activation at the hook (same shape as `old`, standard layout).
    pub source: Option<ArrayViewD<'a, f32>>,
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
    let source = w.source.as_ref().map(|a| a.as_slice().expect("contiguous"));
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

/// A stack of units' writes at one layer as one op: the residual streams they resume from,
/// `[units * b, s, d_model]`, unit by unit, where the batch's activations are.
pub struct WriteOp<'a> {
    pub hook: Hook,
    pub kind: Kind,
    pub layer: usize,
    /// The batch: `b` sequences of `s` positions, `d` = `d_model`.
    pub b: usize,
    pub s: usize,
    pub d: usize,
    /// The batch's unchanged cache (the hook's activation and the residual stream).
    pub cache: &'a ActivationCache,
    /// A patch's source run (same rows, same positions), on the same device.
    pub source: Option<&'a ActivationCache>,
    /// A mean ablation's mean (the hook's shape without batch and position; `[s, ...]` per
    /// position), on the host: it is a few KB.
    pub mean: Option<&'a ArrayD<f32>>,
    /// `W_O` of the layer on the host (`z`'s host body; the device body reads the device's).
    pub w_o: Option<ndarray::ArrayView3<'a, f32>>,
    pub units: &'a [&'a Unit],
}

impl WriteOp<'_> {
    /// The hook's last axes as (parts, width): heads of `d_head` (`z`) or `d_model`
    /// (`result`), else one part of `d_model`.
    fn parts(&self, last: &[usize]) -> (usize, usize) {
        if self.hook.per_head() {
            (last[0], last[1])
        } else {
            (1, last.iter().product())
        }
    }

    fn names(&self) -> (String, String) {
        (self.hook.tl(self.layer), self.hook.resume(self.layer).1)
    }
}

/// `t` as `[b, s, n]` (its TL shape flattened past the position), checked.
fn as_bsn<D: Device<f32>>(
    t: &DeviceTensor<D>,
    name: &str,
    (b, s, n): (usize, usize, usize),
) -> Result<T3<D>> {
    if t.shape.len() < 2
        || t.shape[0] != b
        || t.shape[1] != s
        || t.shape[2..].iter().product::<usize>() != n
    {
        return Err(Error::Hook {
            name: name.to_string(),
            msg: format!(
                "shape {:?}, expected [{b}, {s}, ...] of {n} values per position",
                t.shape
            ),
        });
    }
    Ok(t.data.clone().reshape_like(&(b, s, n)))
}

impl seam::Op for WriteOp<'_> {
    type Output = Resid;

    fn host(&self) -> Result<Resid> {
        let (name, resid_name) = self.names();
        // Host caches hold standard-layout arrays: these borrow them (no copy per stack).
        let old = self.cache.get(&name)?.as_standard_layout();
        let resid = self.cache.get(&resid_name)?.as_standard_layout();
        let source = match self.source {
            Some(c) => Some(c.get(&name)?.as_standard_layout()),
            None => None,
        };
        let w = WriteInputs {
            hook: self.hook,
            kind: self.kind,
            old: old.view(),
            resid: resid.view(),
            source: source.as_ref().map(|a| a.view()),
            mean: self.mean,
            w_o: self
                .w_o
                .filter(|_| self.hook == Hook::Z)
                .map(|v| v.reborrow()),
        };
        let rows = self.b * self.s * self.d;
        let mut out = vec![0f32; self.units.len() * rows];
        // One unit per task: a unit's write is small, the stack is not (single-threaded it
        // was 3% of a z sweep, with the other core idle).
        out.par_chunks_exact_mut(rows)
            .zip(self.units.par_iter())
            .try_for_each(|(chunk, u)| write_unit(&w, u, chunk))?;
        Ok(Resid::Host(out))
    }

    fn device<D: Device<f32> + 'static>(&self, acts: &DeviceActs<D>) -> Result<Resid> {
        let (b, s, d, k) = (self.b, self.s, self.d, self.units.len());
        let dev = acts.device();
        let (name, resid_name) = self.names();
        let old_t = acts.get(&name)?;
        if old_t.shape.len() < 3 {
            return Err(Error::Hook {
                name,
                msg: format!("shape {:?}", old_t.shape),
            });
        }
        let (c, w) = self.parts(&old_t.shape[2..]);
        let cw = c * w;
        let old = as_bsn(old_t, &name, (b, s, cw))?;
        let upload = |a: &ArrayD<f32>, shape_len: usize| -> Result<Vec<f32>> {
            let v: Vec<f32> = a.as_standard_layout().iter().copied().collect();
            if v.len() != shape_len {
                return Err(Error::Other(format!(
                    "the mean of {name} holds {} values, not {shape_len}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let new: T3<D> = match self.kind {
            Kind::Ablate(Value::Zero) => dev.zeros_like(&(b, s, cw)),
            Kind::Ablate(Value::Mean) => {
                let v = upload(self.mean.expect("planned"), cw)?;
                let m: Tensor<(usize,), f32, D> = dev.tensor_from_vec(v, (cw,));
                m.broadcast_like::<_, Axes2<0, 1>>(&(b, s, cw))
            }
            Kind::Ablate(Value::MeanPerPosition) => {
                let v = upload(self.mean.expect("planned"), s * cw)?;
                let m: T2<D> = dev.tensor_from_vec(v, (s, cw));
                m.broadcast_like::<_, Axis<0>>(&(b, s, cw))
            }
            Kind::Patch => {
                let src = self
                    .source
                    .and_then(|c| c.device_acts::<D>())
                    .ok_or_else(|| {
                        Error::Other(format!(
                            "the patch's source run of {name} is not on the target's device"
                        ))
                    })?;
                as_bsn(src.get(&name)?, &name, (b, s, cw))?
            }
        };
        // What each unit writes: 1 at its (position, head) parts, 0 elsewhere.
        let mut mask = vec![0f32; k * s * cw];
        for (i, u) in self.units.iter().enumerate() {
            let positions = match u.pos {
                Some(p) => p..p + 1,
                None => 0..s,
            };
            let parts: Vec<usize> = if self.hook.per_head() {
                u.heads.clone()
            } else {
                vec![0]
            };
            for p in positions {
                for &h in &parts {
                    let at = (i * s + p) * cw + h * w;
                    mask[at..at + w].fill(1.0);
                }
            }
        }
        let mask: T3<D> = dev.tensor_from_vec(mask, (k, s, cw));
        let full = (k, b, s, cw);
        let change: T4<D> = (new - old).broadcast_like::<_, Axis<0>>(&full)
            * mask.broadcast_like::<_, Axis<1>>(&full);
        let rows = k * b * s;
        let delta: T2<D> = match self.hook {
            Hook::Z => {
                let w_o: T2<D> = acts.params().w_o[self.layer].clone().reshape_like(&(cw, d));
                let change: T2<D> = change.reshape_like(&(rows, cw));
                change.matmul(w_o)
            }
            Hook::Result => {
                let change: T3<D> = change.reshape_like(&(rows, c, d));
                change.sum::<_, Axis<1>>()
            }
            _ => change.reshape_like(&(rows, d)),
        };
        let resid = as_bsn(acts.get(&resid_name)?, &resid_name, (b, s, d))?;
        let resid: T2<D> = resid
            .broadcast_like::<_, Axis<0>>(&(k, b, s, d))
            .reshape_like(&(rows, d));
        let out: T3<D> = (resid + delta).reshape_like(&(k * b, s, d));
        Ok(Resid::device(out))
    }
}

/// The unchanged residual stream at `name` (`[b, s, d]`), where the cache holds it: a
/// pass resumed from it runs the unchanged rest (the clean and source runs' `ln_final`).
pub struct CachedResid<'a> {
    pub cache: &'a ActivationCache,
    pub name: String,
    pub b: usize,
    pub s: usize,
    pub d: usize,
}

impl seam::Op for CachedResid<'_> {
    type Output = Resid;

    fn host(&self) -> Result<Resid> {
        let a = self.cache.get(&self.name)?;
        Ok(Resid::Host(
            a.as_standard_layout().iter().copied().collect(),
        ))
    }

    fn device<D: Device<f32> + 'static>(&self, acts: &DeviceActs<D>) -> Result<Resid> {
        let t = as_bsn(acts.get(&self.name)?, &self.name, (self.b, self.s, self.d))?;
        Ok(Resid::device(t))
    }
}
