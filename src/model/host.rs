//! The CPU forward pass: the host bodies of the forward's steps (`model::pass`), on host
//! buffers, with the same hook points as the dfdx bodies.
//!
//! Owns: the CPU kernels of the forward (fused QKV matmul, attention per (batch, head),
//! LayerNorm, GELU) and the scratch buffers they reuse across layers and batches. Must not:
//! know about metrics, files or dfdx. [`super::gpt2::HookedGpt2`] hands the whole pass here
//! when its device's type says so (`SeamDevice::HOST_KERNELS`: the CPU), so nothing
//! crosses the dfdx seam: activations are read and written in place, and a hook point costs
//! one copy into the cache only when it is cached (plus one back when a hook rewrites it).
//!
//! What it fuses that eager PyTorch cannot: Q, K and V in one `[d_model, 3 * heads * d_head]`
//! matmul read in place by the attention (no head split/permute copies); per (batch, head)
//! `QK^T`, mask, softmax and `AV` in one task whose scores stay in cache; biases written
//! into the output before the matmul accumulates onto them; the attention and MLP outputs
//! accumulated straight into the residual stream when nobody hooks them.

use std::sync::Mutex;

use ndarray::{ArcArray1, ArcArray2, Array2};
use rayon::prelude::*;

use super::checkpoint::{LayerNormParams, Params, W3};
use super::config::ModelConfig;
use super::pass::{self, LnSite, Steps};
use crate::error::Result;
use crate::hooks::{block_hook, Hooks, LOGITS};
use crate::kernels::{self, MatPtr, Par};

/// `x @ w + b` with the weights read in place from the shared host parameters.
struct Lin {
    w: ArcArray2<f32>,
    b: ArcArray1<f32>,
    /// GPT-2's `b_U` is zero (and stays zero through center_unembed): the unembedding then
    /// skips writing [tokens, d_vocab] zeros before its matmul.
    zero_bias: bool,
}

impl Lin {
    fn new(w: ArcArray2<f32>, b: ArcArray1<f32>) -> Self {
        let w = if w.is_standard_layout() {
            w
        } else {
            w.as_standard_layout().to_owned().into_shared()
        };
        let b = if b.is_standard_layout() {
            b
        } else {
            b.to_owned().into_shared()
        };
        let zero_bias = b.iter().all(|&x| x == 0.0);
        Lin { w, b, zero_bias }
    }

    fn n_out(&self) -> usize {
        self.w.ncols()
    }

    /// `y = x @ w + b` (`accumulate`: `y += x @ w + b`), `x`: `[rows, n_in]`.
    fn apply(&self, x: &[f32], y: &mut [f32], accumulate: bool) {
        let (k, n) = self.w.dim();
        let rows = x.len() / k;
        let w = self.w.as_slice().expect("standard layout");
        if self.zero_bias {
            kernels::sgemm_into(rows, k, n, x, w, y, accumulate, Par::All);
            return;
        }
        let b = self.b.as_slice().expect("standard layout");
        // The bias goes in first and the matmul accumulates onto it: one pass fewer.
        y.par_chunks_mut(n * 16).for_each(|block| {
            for row in block.chunks_exact_mut(n) {
                if accumulate {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                } else {
                    row.copy_from_slice(b);
                }
            }
        });
        kernels::sgemm_into(rows, k, n, x, w, y, true, Par::All);
    }
}

struct Ln {
    w: ArcArray1<f32>,
    b: ArcArray1<f32>,
}

struct Block {
    ln1: Option<Ln>,
    /// `[W_Q | W_K | W_V]` as `[d_model, 3 * heads * d_head]` (heads major inside each).
    qkv: Lin,
    /// `W_O` as `[heads * d_head, d_model]`.
    o: Lin,
    /// `W_O` as `[heads, d_head, d_model]`, for `hook_result`.
    w_o: W3,
    ln2: Option<Ln>,
    fc_in: Lin,
    fc_out: Lin,
}

/// Buffers one pass needs, kept between passes so a sweep allocates them once.
#[derive(Default)]
struct Scratch {
    resid: Vec<f32>,
    x: Vec<f32>,
    qkv: Vec<f32>,
    z: Vec<f32>,
    mlp: Vec<f32>,
    /// An attention or MLP output that a hook reads before it joins the residual stream.
    out: Vec<f32>,
    scale: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The CPU model: weights shared with [`Params`] (no second copy) and the scratch buffers.
pub(crate) struct HostModel {
    cfg: ModelConfig,
    w_e: ArcArray2<f32>,
    w_pos: ArcArray2<f32>,
    blocks: Vec<Block>,
    ln_final: Option<Ln>,
    unembed: Lin,
    scratch: Mutex<Scratch>,
}

/// A raw pointer that the attention tasks share; each task writes disjoint elements.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl HostModel {
    pub(crate) fn new(cfg: &ModelConfig, p: &Params) -> Self {
        let (d, h, dh) = (cfg.d_model, cfg.n_heads, cfg.d_head);
        let ln = |l: &Option<LayerNormParams>| {
            l.as_ref().map(|l| Ln {
                w: l.w.clone(),
                b: l.b.clone(),
            })
        };
        let blocks = p
            .blocks
            .iter()
            .map(|b| {
                let a = &b.attn;
                // TL's [heads, d_model, d_head] side by side: [d_model, 3 * heads * d_head].
                let mut w = Array2::<f32>::zeros((d, 3 * h * dh));
                let mut bias = Vec::with_capacity(3 * h * dh);
                for (i, (wm, bm)) in [(&a.w_q, &a.b_q), (&a.w_k, &a.b_k), (&a.w_v, &a.b_v)]
                    .into_iter()
                    .enumerate()
                {
                    for head in 0..h {
                        let col = i * h * dh + head * dh;
                        w.slice_mut(ndarray::s![.., col..col + dh])
                            .assign(&wm.index_axis(ndarray::Axis(0), head));
                    }
                    bias.extend(bm.iter());
                }
                let w_o = a
                    .w_o
                    .clone()
                    .into_shape_with_order((h * dh, d))
                    .expect("[heads, d_head, d_model] is [(heads d_head), d_model]");
                Block {
                    ln1: ln(&b.ln1),
                    qkv: Lin::new(w.into_shared(), ArcArray1::from_vec(bias)),
                    o: Lin::new(w_o, a.b_o.clone()),
                    w_o: a.w_o.clone(),
                    ln2: ln(&b.ln2),
                    fc_in: Lin::new(b.mlp.w_in.clone(), b.mlp.b_in.clone()),
                    fc_out: Lin::new(b.mlp.w_out.clone(), b.mlp.b_out.clone()),
                }
            })
            .collect();
        HostModel {
            cfg: cfg.clone(),
            w_e: p.w_e.as_standard_layout().into_owned().into_shared(),
            w_pos: p.w_pos.as_standard_layout().into_owned().into_shared(),
            blocks,
            ln_final: ln(&p.ln_final),
            unembed: Lin::new(p.w_u.clone(), p.b_u.clone()),
            scratch: Mutex::new(Scratch::default()),
        }
    }

    /// The forward pass over checked `tokens` ([`pass::run`] on host buffers); the logits
    /// `[batch * seq * d_vocab]` unless `logits` is false. `logits_out`: whether the caller
    /// takes the logits (else, when cached, they move into the cache instead of being copied).
    pub(crate) fn run(
        &self,
        tokens: &Array2<u32>,
        hooks: &mut Hooks,
        logits: bool,
        logits_out: bool,
    ) -> Result<Option<Vec<f32>>> {
        let (b, s) = tokens.dim();
        let mut steps = HostPass {
            m: self,
            sc: self.scratch.lock().unwrap_or_else(|e| e.into_inner()),
            ids: tokens.iter().map(|&t| t as usize).collect(),
            b,
            s,
            logits_out,
        };
        Ok(pass::run(&mut steps, hooks, self.cfg.n_layers, logits)?.flatten())
    }

    /// A pass resumed at `at` from `resid` (`[b, s, d_model]`); `ln_final`'s output (of
    /// `rows` alone when given: [`pass::run_from`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn resume(
        &self,
        b: usize,
        s: usize,
        at: pass::ResumeAt,
        resid: &[f32],
        rows: Option<&[usize]>,
        hooks: &mut Hooks,
    ) -> Result<Vec<f32>> {
        let mut steps = HostPass {
            m: self,
            sc: self.scratch.lock().unwrap_or_else(|e| e.into_inner()),
            ids: Vec::new(),
            b,
            s,
            logits_out: false,
        };
        pass::run_from(&mut steps, hooks, self.cfg.n_layers, at, Some(resid), rows)
    }

    /// TL's LayerNorm(Pre) of `sc.resid` into `sc.x`, with `hook_scale` `[B, S, 1]` and
    /// `hook_normalized`; the affine part when it has not been folded.
    fn layer_norm(
        &self,
        hooks: &mut Hooks,
        prefix: &str,
        ln: Option<&Ln>,
        sc: &mut Scratch,
        b: usize,
        s: usize,
    ) -> Result<()> {
        let (n, d) = (b * s, self.cfg.d_model);
        let eps = self.cfg.eps as f32;
        let resid = &sc.resid[..n * d];
        let x = sized(&mut sc.x, n * d);
        let scale = sized(&mut sc.scale, n);
        x.par_chunks_mut(d)
            .zip(resid.par_chunks(d))
            .zip(scale.par_iter_mut())
            .for_each(|((x, r), sc)| *sc = kernels::center_row(x, r, eps));
        let name_scale = format!("{prefix}.hook_scale");
        if hooks.touches(&name_scale) {
            hooks.visit_slice(&name_scale, &[b, s, 1], scale)?;
        }
        x.par_chunks_mut(d)
            .zip(scale.par_iter())
            .for_each(|(x, &sc)| kernels::scale_slice(x, 1.0 / sc));
        let name_norm = format!("{prefix}.hook_normalized");
        if hooks.touches(&name_norm) {
            hooks.visit_slice(&name_norm, &[b, s, d], x)?;
        }
        if let Some(ln) = ln {
            let (w, bb) = (
                ln.w.as_slice().expect("contiguous"),
                ln.b.as_slice().expect("contiguous"),
            );
            x.par_chunks_mut(d).for_each(|row| {
                for ((v, w), bb) in row.iter_mut().zip(w).zip(bb) {
                    *v = *v * w + bb;
                }
            });
        }
        Ok(())
    }

    /// A hook point on the columns `[off, off + width)` of a `[rows, stride]` buffer (one of
    /// q, k, v inside the fused QKV output).
    #[allow(clippy::too_many_arguments)]
    fn point_cols(
        hooks: &mut Hooks,
        name: &str,
        shape: &[usize],
        buf: &mut [f32],
        stride: usize,
        off: usize,
        width: usize,
    ) -> Result<()> {
        if !hooks.touches(name) {
            return Ok(());
        }
        let mut part: Vec<f32> = buf
            .chunks_exact(stride)
            .flat_map(|row| row[off..off + width].iter().copied())
            .collect();
        hooks.visit_slice(name, shape, &mut part)?;
        if hooks.writes(name) {
            for (row, new) in buf.chunks_exact_mut(stride).zip(part.chunks_exact(width)) {
                row[off..off + width].copy_from_slice(new);
            }
        }
        Ok(())
    }

    /// `resid += attn(x)` for block `l` (see [`Steps::attention`]).
    fn attention_step(
        &self,
        hooks: &mut Hooks,
        l: usize,
        sc: &mut Scratch,
        b: usize,
        s: usize,
    ) -> Result<()> {
        let blk = &self.blocks[l];
        let name = |h: &str| block_hook(l, h);
        let (n, d) = (b * s, self.cfg.d_model);
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let hd = h * dh;
        let touch = |hooks: &Hooks, h: &str| hooks.touches(&name(h));

        // Q, K, V in one matmul; the hook points are column blocks of it.
        let qkv = sized(&mut sc.qkv, n * 3 * hd);
        blk.qkv.apply(&sc.x[..n * d], qkv, false);
        let shape = [b, s, h, dh];
        for (i, p) in ["attn.hook_q", "attn.hook_k", "attn.hook_v"]
            .into_iter()
            .enumerate()
        {
            Self::point_cols(hooks, &name(p), &shape, qkv, 3 * hd, i * hd, hd)?;
        }

        let z = sized(&mut sc.z, n * hd);
        self.attention(hooks, l, qkv, z, b, s)?;
        if touch(hooks, "attn.hook_z") {
            hooks.visit_slice(&name("attn.hook_z"), &shape, z)?;
        }
        if touch(hooks, "attn.hook_result") {
            // Per-head outputs [B, S, H, d_model], only when asked for (TL's
            // use_attn_result); attn_out below is their sum plus b_O either way.
            let mut result = vec![0f32; n * h * d];
            let w_o = blk.w_o.as_slice().expect("standard layout");
            let rp = SendPtr(result.as_mut_ptr());
            let zp = z.as_ptr() as usize;
            (0..h).into_par_iter().for_each(|head| {
                // SAFETY: head `head` writes only columns [head * d, (head + 1) * d) of
                // each row of `result`; reads are in bounds of z and W_O.
                unsafe {
                    kernels::sgemm_strided(
                        n,
                        dh,
                        d,
                        MatPtr {
                            ptr: (zp as *const f32).add(head * dh),
                            rs: hd as isize,
                            cs: 1,
                        },
                        MatPtr::row_major(w_o.as_ptr().add(head * dh * d), d),
                        rp.get().add(head * d),
                        (h * d) as isize,
                        1,
                        false,
                        1.0,
                        Par::One,
                    )
                }
            });
            hooks.visit_slice(&name("attn.hook_result"), &[b, s, h, d], &mut result)?;
            if hooks.writes(&name("attn.hook_result")) {
                // A written result is what the heads output now: attn_out is its sum over
                // heads plus b_O (TL's use_attn_result), not z @ W_O.
                let out = sized(&mut sc.out, n * d);
                let b_o = blk.o.b.as_slice().expect("contiguous");
                out.par_chunks_mut(d)
                    .zip(result.par_chunks(h * d))
                    .for_each(|(o, r)| {
                        o.copy_from_slice(b_o);
                        for rh in r.chunks_exact(d) {
                            o.iter_mut().zip(rh).for_each(|(o, v)| *o += v);
                        }
                    });
                hooks.visit_slice(&name("hook_attn_out"), &[b, s, d], out)?;
                sc.resid[..n * d]
                    .par_chunks_mut(d)
                    .zip(out.par_chunks(d))
                    .for_each(|(r, o)| r.iter_mut().zip(o).for_each(|(r, o)| *r += o));
                return Ok(());
            }
        }

        // attn_out, straight into the residual stream unless hooked.
        Self::into_resid(
            hooks,
            &name("hook_attn_out"),
            &blk.o,
            &sc.z[..n * hd],
            &mut sc.resid[..n * d],
            &mut sc.out,
            b,
            s,
        )?;
        Ok(())
    }

    /// `resid += mlp(x)` for block `l` (see [`Steps::mlp`]).
    fn mlp_step(
        &self,
        hooks: &mut Hooks,
        l: usize,
        sc: &mut Scratch,
        b: usize,
        s: usize,
    ) -> Result<()> {
        let blk = &self.blocks[l];
        let (n, d, m) = (b * s, self.cfg.d_model, blk.fc_in.n_out());
        let mlp = sized(&mut sc.mlp, n * m);
        blk.fc_in.apply(&sc.x[..n * d], mlp, false);
        // `visit_slice` does nothing at a point nobody caches or writes.
        hooks.visit_slice(&block_hook(l, "mlp.hook_pre"), &[b, s, m], mlp)?;
        mlp.par_chunks_mut(4096).for_each(kernels::gelu_slice);
        hooks.visit_slice(&block_hook(l, "mlp.hook_post"), &[b, s, m], mlp)?;
        Self::into_resid(
            hooks,
            &block_hook(l, "hook_mlp_out"),
            &blk.fc_out,
            &sc.mlp[..n * m],
            &mut sc.resid[..n * d],
            &mut sc.out,
            b,
            s,
        )?;
        Ok(())
    }

    /// `resid += x @ w + b`, through the hook point `name` when it is hooked.
    #[allow(clippy::too_many_arguments)]
    fn into_resid(
        hooks: &mut Hooks,
        name: &str,
        lin: &Lin,
        x: &[f32],
        resid: &mut [f32],
        out: &mut Vec<f32>,
        b: usize,
        s: usize,
    ) -> Result<()> {
        if !hooks.touches(name) {
            lin.apply(x, resid, true);
            return Ok(());
        }
        let d = lin.n_out();
        let out = sized(out, b * s * d);
        lin.apply(x, out, false);
        hooks.visit_slice(name, &[b, s, d], out)?;
        resid
            .par_chunks_mut(d)
            .zip(out.par_chunks(d))
            .for_each(|(r, o)| r.iter_mut().zip(o).for_each(|(r, o)| *r += o));
        Ok(())
    }

    /// Causal attention of every (batch, head) from the fused QKV buffer into `z`
    /// (`[B, S, H, d_head]`). When neither the scores nor the pattern is hooked each task keeps
    /// its `[S, S]` block in its own scratch (in cache); otherwise the full
    /// `[B, H, S, S]` tensors are built for the hooks, in TL's layout.
    fn attention(
        &self,
        hooks: &mut Hooks,
        l: usize,
        qkv: &[f32],
        z: &mut [f32],
        b: usize,
        s: usize,
    ) -> Result<()> {
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let hd = h * dh;
        let stride = 3 * hd;
        let inv_sqrt = 1.0 / (dh as f32).sqrt();
        let zp = SendPtr(z.as_mut_ptr());
        let qp = qkv.as_ptr() as usize;
        // SAFETY (both helpers): every pointer below stays inside `qkv` ([b*s, 3*hd]) or
        // `z` ([b*s, hd]); task (bi, head) writes only z's columns [head*dh, (head+1)*dh) of
        // the rows of sequence bi, which no other task touches.
        let scores_into = move |bh: usize, out: &mut [f32]| {
            let (bi, head) = (bh / h, bh % h);
            let base = (qp as *const f32).wrapping_add(bi * s * stride + head * dh);
            unsafe {
                kernels::sgemm_strided(
                    s,
                    dh,
                    s,
                    MatPtr {
                        ptr: base,
                        rs: stride as isize,
                        cs: 1,
                    },
                    // K^T: element (e, k) at K[k, e].
                    MatPtr {
                        ptr: base.wrapping_add(hd),
                        rs: 1,
                        cs: stride as isize,
                    },
                    out.as_mut_ptr(),
                    s as isize,
                    1,
                    false,
                    inv_sqrt,
                    Par::One,
                );
            }
        };
        let av_into = move |bh: usize, pattern: &[f32]| {
            let (bi, head) = (bh / h, bh % h);
            let v = (qp as *const f32).wrapping_add(bi * s * stride + 2 * hd + head * dh);
            unsafe {
                kernels::sgemm_strided(
                    s,
                    s,
                    dh,
                    MatPtr::row_major(pattern.as_ptr(), s),
                    MatPtr {
                        ptr: v,
                        rs: stride as isize,
                        cs: 1,
                    },
                    zp.get().add(bi * s * hd + head * dh),
                    hd as isize,
                    1,
                    false,
                    1.0,
                    Par::One,
                );
            }
        };
        let scores_name = block_hook(l, "attn.hook_attn_scores");
        let pattern_name = block_hook(l, "attn.hook_pattern");
        if !hooks.touches(&scores_name) && !hooks.touches(&pattern_name) {
            (0..b * h).into_par_iter().for_each_init(
                || vec![0f32; s * s],
                |buf, bh| {
                    scores_into(bh, buf);
                    for (q, row) in buf.chunks_exact_mut(s).enumerate() {
                        kernels::softmax_causal(row, q);
                    }
                    av_into(bh, buf);
                },
            );
            return Ok(());
        }
        let mut full = vec![0f32; b * h * s * s];
        full.par_chunks_mut(s * s)
            .enumerate()
            .for_each(|(bh, blk)| {
                scores_into(bh, blk);
                for (q, row) in blk.chunks_exact_mut(s).enumerate() {
                    row[q + 1..].fill(f32::NEG_INFINITY);
                }
            });
        hooks.visit_slice(&scores_name, &[b, h, s, s], &mut full)?;
        full.par_chunks_mut(s).for_each(kernels::softmax_masked);
        hooks.visit_slice(&pattern_name, &[b, h, s, s], &mut full)?;
        full.par_chunks(s * s)
            .enumerate()
            .for_each(|(bh, blk)| av_into(bh, blk));
        Ok(())
    }
}

/// One pass on host buffers: the scratch buffers (held for the whole pass), the token ids.
struct HostPass<'m> {
    m: &'m HostModel,
    sc: std::sync::MutexGuard<'m, Scratch>,
    ids: Vec<usize>,
    b: usize,
    s: usize,
    logits_out: bool,
}

impl Steps for HostPass<'_> {
    /// `None` when the logits moved into the cache (cached, and not returned).
    type Logits = Option<Vec<f32>>;

    fn embed(&mut self, hooks: &mut Hooks) -> Result<()> {
        let (b, s) = (self.b, self.s);
        let (n, d) = (b * s, self.m.cfg.d_model);
        let ids = &self.ids;
        let w_e = self.m.w_e.as_slice().expect("standard layout");
        let w_pos = self.m.w_pos.as_slice().expect("standard layout");
        let resid = sized(&mut self.sc.resid, n * d);
        let embed_hooked = hooks.touches("hook_embed") || hooks.touches("hook_pos_embed");
        if embed_hooked {
            let mut e = vec![0f32; n * d];
            let mut p = vec![0f32; n * d];
            for (r, &id) in ids.iter().enumerate() {
                e[r * d..(r + 1) * d].copy_from_slice(&w_e[id * d..(id + 1) * d]);
                let j = r % s;
                p[r * d..(r + 1) * d].copy_from_slice(&w_pos[j * d..(j + 1) * d]);
            }
            hooks.visit_slice("hook_embed", &[b, s, d], &mut e)?;
            hooks.visit_slice("hook_pos_embed", &[b, s, d], &mut p)?;
            resid
                .par_chunks_mut(d)
                .zip(e.par_chunks(d).zip(p.par_chunks(d)))
                .for_each(|(r, (e, p))| {
                    r.iter_mut()
                        .zip(e.iter().zip(p))
                        .for_each(|(r, (e, p))| *r = e + p)
                });
        } else {
            resid.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
                let (id, j) = (ids[r], r % s);
                let (e, p) = (&w_e[id * d..(id + 1) * d], &w_pos[j * d..(j + 1) * d]);
                row.iter_mut()
                    .zip(e.iter().zip(p))
                    .for_each(|(r, (e, p))| *r = e + p)
            });
        }
        Ok(())
    }

    fn resid(&mut self, hooks: &mut Hooks, name: &str) -> Result<()> {
        if hooks.touches(name) {
            let (b, s, d) = (self.b, self.s, self.m.cfg.d_model);
            hooks.visit_slice(name, &[b, s, d], &mut self.sc.resid[..b * s * d])?;
        }
        Ok(())
    }

    fn layer_norm(&mut self, hooks: &mut Hooks, site: LnSite) -> Result<()> {
        let ln = match site {
            LnSite::Ln1(l) => self.m.blocks[l].ln1.as_ref(),
            LnSite::Ln2(l) => self.m.blocks[l].ln2.as_ref(),
            LnSite::Final => self.m.ln_final.as_ref(),
        };
        self.m
            .layer_norm(hooks, &site.prefix(), ln, &mut self.sc, self.b, self.s)
    }

    fn attention(&mut self, hooks: &mut Hooks, layer: usize) -> Result<()> {
        self.m
            .attention_step(hooks, layer, &mut self.sc, self.b, self.s)
    }

    fn mlp(&mut self, hooks: &mut Hooks, layer: usize) -> Result<()> {
        self.m.mlp_step(hooks, layer, &mut self.sc, self.b, self.s)
    }

    fn unembed(&mut self, hooks: &mut Hooks) -> Result<Option<Vec<f32>>> {
        let (b, s) = (self.b, self.s);
        let (n, d) = (b * s, self.m.cfg.d_model);
        let v = self.m.unembed.n_out();
        let mut out = vec![0f32; n * v];
        self.m.unembed.apply(&self.sc.x[..n * d], &mut out, false);
        if !self.logits_out && hooks.wants(LOGITS) && !hooks.writes(LOGITS) {
            // Cached and not returned: the one buffer moves into the cache.
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[b, s, v]), out)
                .expect("b * s * d_vocab values");
            hooks.visit(LOGITS, a)?;
            return Ok(None);
        }
        hooks.visit_slice(LOGITS, &[b, s, v], &mut out)?;
        Ok(Some(out))
    }

    fn set_resid(&mut self, resid: &[f32]) -> Result<()> {
        let n = self.b * self.s * self.m.cfg.d_model;
        assert_eq!(resid.len(), n, "a [batch, seq, d_model] residual stream");
        sized(&mut self.sc.resid, n).copy_from_slice(resid);
        Ok(())
    }

    fn final_x(&mut self) -> Result<Vec<f32>> {
        let n = self.b * self.s * self.m.cfg.d_model;
        Ok(self.sc.x[..n].to_vec())
    }

    fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let (n, d) = (self.b * self.s, self.m.cfg.d_model);
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            return Err(crate::error::Error::Other(format!(
                "keep_rows: row {r} of a [{}, {}] pass",
                self.b, self.s
            )));
        }
        let kept: Vec<f32> = rows
            .iter()
            .flat_map(|&r| self.sc.resid[r * d..(r + 1) * d].iter().copied())
            .collect();
        self.sc.resid[..kept.len()].copy_from_slice(&kept);
        (self.b, self.s) = (rows.len(), 1);
        Ok(())
    }
}
