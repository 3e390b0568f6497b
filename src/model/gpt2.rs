//! GPT-2 on a dfdx device, with TransformerLens hook points: [`HookedGpt2`], and the steps
//! of the forward pass as dfdx tensor ops.
//!
//! Owns: the model a run holds ([`HookedGpt2`]: which backend, picked by the device's type),
//! the device-side parameters (laid out for matmuls but named after TL's state dict), and
//! the dfdx bodies of the forward's steps (`TensorPass`, CUDA's path and the tests' on the
//! CPU); the host bodies are `model::host`'s, and the order of the steps and hook points is
//! written once in `model::pass`. Must not: read files, process weights, or compute
//! metrics. Right padding needs no attention mask: the causal mask already keeps pad tokens
//! out of earlier positions, and TL does not mask them either.

use std::sync::Arc;

use dfdx::prelude::*;
use ndarray::{Array2, ArrayD};

use super::checkpoint::{LayerNormParams, Params, W1, W2, W3};
use super::config::ModelConfig;
use super::host::HostModel;
use super::ops::{self, Linear, T1, T2, T3, T4};
use super::pass::{self, LnSite, ResumeAt, Steps};
use crate::error::{Error, Result};
use crate::hooks::{block_hook, Hooks, LOGITS};
use crate::seam::{DeviceParams, DeviceTensor, SeamDevice};

struct LayerNorm<D: Device<f32>> {
    w: T1<D>,
    b: T1<D>,
}

/// `blocks.L.attn`: per-head weights concatenated along the output axis for one matmul.
struct Attention<D: Device<f32>> {
    /// `W_Q`, `b_Q` as `[d_model, n_heads * d_head]`, `[n_heads * d_head]`.
    q: Linear<D>,
    k: Linear<D>,
    v: Linear<D>,
    /// `W_O`, `b_O` as `[n_heads * d_head, d_model]`, `[d_model]`.
    o: Linear<D>,
    /// `W_O` per head `[n_heads, d_head, d_model]`, for `hook_result` only.
    w_o_heads: T3<D>,
}

/// `blocks.L.mlp`: `W_in`, `b_in` and `W_out`, `b_out`.
struct Mlp<D: Device<f32>> {
    fc_in: Linear<D>,
    fc_out: Linear<D>,
}

/// `blocks.L`.
struct Block<D: Device<f32>> {
    ln1: Option<LayerNorm<D>>,
    attn: Attention<D>,
    ln2: Option<LayerNorm<D>>,
    mlp: Mlp<D>,
}

/// A GPT-2 on device `D`, ready to run with hooks.
///
/// On the CPU the pass runs on host buffers (`model::host`: the weights are the shared
/// host parameters, nothing crosses the dfdx seam); on any other device, or when built with
/// [`Self::new_generic`], it runs as dfdx tensor ops ([`super::ops`]).
pub struct HookedGpt2<D: Device<f32>> {
    pub cfg: ModelConfig,
    dev: D,
    backend: Backend<D>,
}

// One of the two lives for the model's whole life: their sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend<D: Device<f32>> {
    Host(HostModel),
    Tensors(TensorWeights<D>),
}

/// The parameters as dfdx tensors on the device.
struct TensorWeights<D: Device<f32>> {
    /// `embed.W_E` `[d_vocab, d_model]`.
    w_e: T2<D>,
    /// `pos_embed.W_pos` `[n_ctx, d_model]`.
    w_pos: T2<D>,
    blocks: Vec<Block<D>>,
    ln_final: Option<LayerNorm<D>>,
    /// `unembed.W_U` `[d_model, d_vocab]` and `b_U`.
    unembed: Linear<D>,
    /// The weights the metrics' device ops read, attached to every cache the pass fills.
    params: Arc<DeviceParams<D>>,
}

/// What a forward pass returns besides the hook cache.
pub struct ForwardOutput<D: Device<f32>> {
    /// `[batch, seq, d_vocab]`, on the device.
    pub logits: T3<D>,
}

impl<D: SeamDevice> HookedGpt2<D> {
    /// The model on `dev`: host kernels on the CPU (sharing `p`'s buffers), dfdx tensors
    /// (uploaded from `p`) elsewhere; the device's type decides ([`SeamDevice::HOST_KERNELS`]).
    pub fn new(dev: D, cfg: ModelConfig, p: &Params) -> Result<Self> {
        if D::HOST_KERNELS {
            let host = HostModel::new(&cfg, p);
            return Ok(HookedGpt2 {
                backend: Backend::Host(host),
                cfg,
                dev,
            });
        }
        Self::new_generic(dev, cfg, p)
    }

    /// The model as dfdx tensor ops on any device, the CPU included: the code path CUDA
    /// runs, which the tests check on the CPU against the same goldens.
    pub fn new_generic(dev: D, cfg: ModelConfig, p: &Params) -> Result<Self> {
        let (d, h, dh) = (cfg.d_model, cfg.n_heads, cfg.d_head);
        let up1 = |a: &W1| ops::upload(&dev, &a.view().into_dyn().to_owned(), (a.len(),));
        let up2 = |a: &W2| {
            let (r, c) = a.dim();
            ops::upload(&dev, &a.view().into_dyn().to_owned(), (r, c))
        };
        let ln = |l: &Option<LayerNormParams>| -> Result<Option<LayerNorm<D>>> {
            l.as_ref()
                .map(|l| {
                    Ok(LayerNorm {
                        w: up1(&l.w)?,
                        b: up1(&l.b)?,
                    })
                })
                .transpose()
        };
        let linear = |w: &W2, b: &W1| Linear::new(&dev, w, b);
        // TL's [n_heads, d_model, d_head] -> [d_model, n_heads * d_head] (a copy), bias
        // [n_heads * d_head].
        let heads_in = |w: &W3, b: &W2| {
            let w = w
                .view()
                .permuted_axes([1, 0, 2])
                .as_standard_layout()
                .into_owned();
            let w = w
                .into_shape_with_order((d, h * dh))
                .expect("d_model x (heads d_head)");
            let b = b
                .clone()
                .into_shape_with_order(h * dh)
                .expect("heads x d_head");
            Linear::new(&dev, &w.into_shared(), &b)
        };
        let mut blocks = Vec::with_capacity(p.blocks.len());
        for b in &p.blocks {
            let a = &b.attn;
            // [n_heads, d_head, d_model] is already [(n_heads d_head), d_model].
            let w_o = a
                .w_o
                .clone()
                .into_shape_with_order((h * dh, d))
                .expect("heads x d_head");
            blocks.push(Block {
                ln1: ln(&b.ln1)?,
                attn: Attention {
                    q: heads_in(&a.w_q, &a.b_q)?,
                    k: heads_in(&a.w_k, &a.b_k)?,
                    v: heads_in(&a.w_v, &a.b_v)?,
                    o: Linear::new(&dev, &w_o, &a.b_o)?,
                    w_o_heads: ops::upload(&dev, &a.w_o.view().into_dyn().to_owned(), (h, dh, d))?,
                },
                ln2: ln(&b.ln2)?,
                mlp: Mlp {
                    fc_in: linear(&b.mlp.w_in, &b.mlp.b_in)?,
                    fc_out: linear(&b.mlp.w_out, &b.mlp.b_out)?,
                },
            });
        }
        let unembed = linear(&p.w_u, &p.b_u)?;
        let (d_model, d_vocab) = p.w_u.dim();
        // What the metrics read on the device: the same buffers as the model's (shared).
        let params = Arc::new(DeviceParams {
            w_u: unembed.weight().clone(),
            w_u_rows: ops::upload(
                &dev,
                &p.w_u.t().as_standard_layout().into_owned().into_dyn(),
                (d_vocab, d_model),
            )?,
            w_o: blocks.iter().map(|b| b.attn.w_o_heads.clone()).collect(),
        });
        let weights = TensorWeights {
            w_e: up2(&p.w_e)?,
            w_pos: up2(&p.w_pos)?,
            ln_final: ln(&p.ln_final)?,
            unembed,
            blocks,
            params,
        };
        Ok(HookedGpt2 {
            backend: Backend::Tensors(weights),
            cfg,
            dev,
        })
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Checks token ids and shape before anything runs.
    fn check_tokens(&self, tokens: &Array2<u32>) -> Result<()> {
        let (b, s) = tokens.dim();
        if b == 0 || s == 0 {
            return Err(Error::Other("forward: empty batch".into()));
        }
        if s > self.cfg.n_ctx {
            return Err(Error::Other(format!(
                "forward: sequence length {s} exceeds the model's context n_ctx = {}",
                self.cfg.n_ctx
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.d_vocab) {
            return Err(Error::Other(format!(
                "forward: token id {t} is outside the vocabulary (d_vocab = {})",
                self.cfg.d_vocab
            )));
        }
        Ok(())
    }

    /// The forward pass over `tokens` `[batch, seq]`, visiting every hook point.
    pub fn forward(&self, tokens: &Array2<u32>, hooks: &mut Hooks) -> Result<ForwardOutput<D>> {
        let logits = match &self.backend {
            Backend::Host(host) => {
                self.check_tokens(tokens)?;
                let (b, s) = tokens.dim();
                let v = host
                    .run(tokens, hooks, true, true)?
                    .expect("asked for logits");
                // On the CPU (the only device with host kernels) this moves the buffer.
                self.dev.tensor_from_vec(v, (b, s, self.cfg.d_vocab))
            }
            Backend::Tensors(w) => self.run(w, tokens, hooks, true)?.expect("asked for logits"),
        };
        Ok(ForwardOutput { logits })
    }

    /// A forward pass run for its hook points (TL's `run_with_cache`): the unembedding, a
    /// `[tokens, d_model] x [d_model, d_vocab]` matmul and the largest activation, is skipped
    /// unless `logits` is cached or written.
    pub fn run_hooks(&self, tokens: &Array2<u32>, hooks: &mut Hooks) -> Result<()> {
        let logits = hooks.touches(LOGITS);
        match &self.backend {
            Backend::Host(host) => {
                self.check_tokens(tokens)?;
                host.run(tokens, hooks, logits, false).map(|_| ())
            }
            Backend::Tensors(w) => self.run(w, tokens, hooks, logits).map(|_| ()),
        }
    }

    fn run(
        &self,
        w: &TensorWeights<D>,
        tokens: &Array2<u32>,
        hooks: &mut Hooks,
        logits: bool,
    ) -> Result<Option<T3<D>>> {
        self.check_tokens(tokens)?;
        let mut steps = TensorPass {
            m: self,
            w,
            tokens,
            resid: None,
            x: None,
        };
        pass::run(&mut steps, hooks, self.cfg.n_layers, logits)
    }

    /// A forward pass resumed at `at` with the residual stream there set to `resid`
    /// (`[b, s, d_model]`, where it was made: [`Resid`]): the layers from `at` on, then
    /// `ln_final`, whose output (`[b * s * d_model]`) comes back to the host; the
    /// unembedding is the caller's. Layers below `at` do not run: every intervention at a
    /// layer shares them.
    ///
    /// `rows`: when the caller reads only some rows (flat `b * s` indices), the last MLP and
    /// `ln_final` run on those alone and the output is `[rows.len() * d_model]` in their
    /// order (hooks past the last attention then see `[rows.len(), 1, ...]`).
    pub fn resume(
        &self,
        s: usize,
        at: ResumeAt,
        resid: Resid,
        rows: Option<&[usize]>,
        hooks: &mut Hooks,
    ) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let n = self.cfg.n_layers;
        match (resid, &self.backend) {
            (Resid::Host(v), backend) => {
                if s == 0 || v.len() % (s * d) != 0 {
                    return Err(Error::Other(format!(
                        "resume: a residual stream of {} values for [_, {s}, {d}]",
                        v.len()
                    )));
                }
                let b = v.len() / (s * d);
                match backend {
                    Backend::Host(host) => host.resume(b, s, at, &v, rows, hooks),
                    Backend::Tensors(w) => {
                        // Only the shape of the tokens is read past the embedding.
                        let tokens = Array2::<u32>::zeros((b, s));
                        let mut steps = TensorPass {
                            m: self,
                            w,
                            tokens: &tokens,
                            resid: None,
                            x: None,
                        };
                        pass::run_from(&mut steps, hooks, n, at, Some(&v), rows)
                    }
                }
            }
            (Resid::Device { tensor, .. }, Backend::Tensors(w)) => {
                let t: T3<D> = *tensor.downcast::<T3<D>>().map_err(|_| {
                    Error::Other("resume: a residual stream made on another device".into())
                })?;
                let (b, s2, d2) = *t.shape();
                if (s2, d2) != (s, d) {
                    return Err(Error::Other(format!(
                        "resume: a residual stream [{b}, {s2}, {d2}] for [_, {s}, {d}]"
                    )));
                }
                // Started from the device tensor as it is: nothing goes through the host.
                let tokens = Array2::<u32>::zeros((b, s));
                let mut steps = TensorPass {
                    m: self,
                    w,
                    tokens: &tokens,
                    resid: Some(t),
                    x: None,
                };
                pass::run_from(&mut steps, hooks, n, at, None, rows)
            }
            (Resid::Device { tensor, .. }, Backend::Host(host)) => {
                // A host-kernel model's caches are host buffers, so its writes are too; a
                // device tensor here is dfdx's CPU tensor of a test: read it as host data.
                let t: T3<D> = *tensor.downcast::<T3<D>>().map_err(|_| {
                    Error::Other("resume: a residual stream made on another device".into())
                })?;
                let (b, _, _) = *t.shape();
                host.resume(b, s, at, &t.as_vec(), rows, hooks)
            }
        }
    }

    /// Runs the model and returns the logits on the host as `[batch, seq, d_vocab]`.
    pub fn logits_host(
        &self,
        tokens: &Array2<u32>,
        hooks: &mut Hooks,
    ) -> Result<ndarray::Array3<f32>> {
        if let Backend::Host(host) = &self.backend {
            self.check_tokens(tokens)?;
            let (b, s) = tokens.dim();
            let v = host
                .run(tokens, hooks, true, true)?
                .expect("asked for logits");
            return Ok(ndarray::Array3::from_shape_vec((b, s, self.cfg.d_vocab), v)
                .expect("b * s * d_vocab values"));
        }
        let out = self.forward(tokens, hooks)?;
        let host: ArrayD<f32> = ops::download(&out.logits);
        Ok(host.into_dimensionality().expect("logits are 3-d"))
    }
}

/// The passes a metric may ask of the model inside a batch, whatever its device: an
/// unchanged pass caching some hook points (a patch's source run) and resumed passes.
pub trait Passes {
    fn config(&self) -> &ModelConfig;
    /// An unchanged pass over `tokens` caching exactly `hooks` (TL names).
    fn cache_pass(
        &self,
        tokens: &Array2<u32>,
        hooks: &[String],
    ) -> Result<crate::hooks::ActivationCache>;
    /// [`HookedGpt2::resume`] without hooks.
    fn resume_from(
        &self,
        s: usize,
        at: ResumeAt,
        resid: Resid,
        rows: Option<&[usize]>,
    ) -> Result<Vec<f32>>;
}

/// The residual stream a resumed pass starts from (`[b, s, d_model]`), kept where it was
/// made: on the host for the host kernels, on the device for dfdx's tensor ops.
pub enum Resid {
    /// Row-major on the host.
    Host(Vec<f32>),
    /// A dfdx `T3` tensor on a device. Boxed because the op that made it (the device body
    /// of a [`crate::seam::Op`]) is generic over the device: the model takes it back by its
    /// own device type, and refuses another device's.
    Device {
        tensor: Box<dyn std::any::Any>,
        /// `b`: how many sequences it holds.
        sequences: usize,
    },
}

impl Resid {
    /// A device tensor `[b, s, d_model]`.
    pub fn device<D: Device<f32> + 'static>(t: Tensor<(usize, usize, usize), f32, D>) -> Self {
        let sequences = t.shape().0;
        Resid::Device {
            tensor: Box::new(t),
            sequences,
        }
    }

    /// How many sequences (`b`) it holds, at `s` positions of `d` values.
    pub fn sequences(&self, s: usize, d: usize) -> usize {
        match self {
            Resid::Host(v) => v.len() / (s * d).max(1),
            Resid::Device { sequences, .. } => *sequences,
        }
    }
}

impl<D: SeamDevice> Passes for HookedGpt2<D> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn cache_pass(
        &self,
        tokens: &Array2<u32>,
        hooks: &[String],
    ) -> Result<crate::hooks::ActivationCache> {
        let filter = crate::hooks::HookFilter::checked(hooks, self.cfg.n_layers)?;
        let mut h = Hooks::caching(filter);
        self.run_hooks(tokens, &mut h)?;
        Ok(h.take_cache())
    }
    fn resume_from(
        &self,
        s: usize,
        at: ResumeAt,
        resid: Resid,
        rows: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        self.resume(s, at, resid, rows, &mut Hooks::default())
    }
}

/// One pass as dfdx tensor ops: the residual stream and the next normalised input, on the
/// device.
struct TensorPass<'a, D: SeamDevice> {
    m: &'a HookedGpt2<D>,
    w: &'a TensorWeights<D>,
    tokens: &'a Array2<u32>,
    resid: Option<T3<D>>,
    x: Option<T3<D>>,
}

impl<D: SeamDevice> TensorPass<'_, D> {
    fn resid_take(&mut self) -> T3<D> {
        self.resid.take().expect("embed runs first")
    }

    fn x_take(&mut self) -> T3<D> {
        self.x
            .take()
            .expect("a LayerNorm runs before each sublayer")
    }

    /// Runs a hook point at TL's shape of `x`.
    fn point<S: Shape>(
        &self,
        hooks: &mut Hooks,
        name: &str,
        x: Tensor<S, f32, D>,
    ) -> Result<Tensor<S, f32, D>> {
        let shape: Vec<usize> = x.shape().concrete().into_iter().collect();
        self.point_as(hooks, name, x, shape)
    }

    /// Runs a hook point whose TL shape is `tl_shape` (a `[B, S]` LayerNorm scale is
    /// `[B, S, 1]` in TL). A cached activation stays on the device (the cache shares its
    /// buffer); only a write hook brings it to the host, and sends the new value back.
    fn point_as<S: Shape>(
        &self,
        hooks: &mut Hooks,
        name: &str,
        x: Tensor<S, f32, D>,
        tl_shape: Vec<usize>,
    ) -> Result<Tensor<S, f32, D>> {
        if !hooks.touches(name) {
            return Ok(x);
        }
        let dev = &self.m.dev;
        let x = if hooks.writes(name) {
            let shape = *x.shape();
            let mut host = ops::download(&x)
                .into_shape_with_order(tl_shape.clone())
                .expect("same size");
            hooks.rewrite(name, &mut host)?;
            ops::upload(dev, &host, shape)?
        } else {
            x
        };
        if hooks.wants(name) {
            let t = DeviceTensor::with_shape(&x, tl_shape);
            hooks
                .cache
                .insert_device(dev, &self.w.params, name.to_string(), t);
        }
        Ok(x)
    }
}

impl<D: SeamDevice> Steps for TensorPass<'_, D> {
    type Logits = T3<D>;

    fn embed(&mut self, hooks: &mut Hooks) -> Result<()> {
        let (b, s) = self.tokens.dim();
        let d = self.m.cfg.d_model;
        let ids: Vec<usize> = self.tokens.iter().map(|&t| t as usize).collect();
        let ids: Tensor<(usize, usize), usize, D> = self.m.dev.tensor_from_vec(ids, (b, s));
        let embed: T3<D> = self.w.w_e.clone().gather(ids);
        let embed = self.point(hooks, "hook_embed", embed)?;
        let pos: T2<D> = self.w.w_pos.clone().slice((0..s, ..)).realize();
        let pos: T3<D> = pos.broadcast_like::<_, Axis<0>>(&(b, s, d));
        let pos = self.point(hooks, "hook_pos_embed", pos)?;
        self.resid = Some(embed + pos);
        Ok(())
    }

    fn resid(&mut self, hooks: &mut Hooks, name: &str) -> Result<()> {
        let r = self.resid_take();
        self.resid = Some(self.point(hooks, name, r)?);
        Ok(())
    }

    /// TL's LayerNorm / LayerNormPre with its `hook_scale` and `hook_normalized`.
    fn layer_norm(&mut self, hooks: &mut Hooks, site: LnSite) -> Result<()> {
        let prefix = site.prefix();
        let ln = match site {
            LnSite::Ln1(l) => self.w.blocks[l].ln1.as_ref(),
            LnSite::Ln2(l) => self.w.blocks[l].ln2.as_ref(),
            LnSite::Final => self.w.ln_final.as_ref(),
        };
        let resid = self.resid.clone().expect("embed runs first");
        let (centered, scale) = ops::center_and_scale(resid, self.m.cfg.eps);
        let (b, s) = *scale.shape();
        let scale = self.point_as(hooks, &format!("{prefix}.hook_scale"), scale, vec![b, s, 1])?;
        let normalized = ops::normalize(centered, &scale);
        let normalized = self.point(hooks, &format!("{prefix}.hook_normalized"), normalized)?;
        self.x = Some(match ln {
            Some(l) => ops::affine(normalized, &l.w, &l.b),
            None => normalized,
        });
        Ok(())
    }

    fn attention(&mut self, hooks: &mut Hooks, l: usize) -> Result<()> {
        let name = |h: &str| block_hook(l, h);
        let a = &self.w.blocks[l].attn;
        let x = self.x_take();
        let (b, s, d) = *x.shape();
        let (h, dh) = (self.m.cfg.n_heads, self.m.cfg.d_head);
        let split = |t: T3<D>| -> T4<D> { t.reshape_like(&(b, s, h, dh)) };

        let q = self.point(
            hooks,
            &name("attn.hook_q"),
            split(ops::linear(x.clone(), &a.q)),
        )?;
        let k = self.point(
            hooks,
            &name("attn.hook_k"),
            split(ops::linear(x.clone(), &a.k)),
        )?;
        let v = self.point(hooks, &name("attn.hook_v"), split(ops::linear(x, &a.v)))?;

        // [B, S, H, dh] -> [B, H, S, dh]
        let q = q.permute::<_, Axes4<0, 2, 1, 3>>();
        let k = k.permute::<_, Axes4<0, 2, 1, 3>>();
        let v = v.permute::<_, Axes4<0, 2, 1, 3>>();
        let scores = ops::causal_scores(q, k, dh);
        let scores = self.point(hooks, &name("attn.hook_attn_scores"), scores)?;
        let pattern = ops::softmax_keys(scores);
        let pattern = self.point(hooks, &name("attn.hook_pattern"), pattern)?;

        // z: [B, H, S, dh] -> [B, S, H, dh]
        let z: T4<D> = pattern
            .matmul(v)
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .realize();
        let z = self.point(hooks, &name("attn.hook_z"), z)?;

        let result_name = name("attn.hook_result");
        if hooks.touches(&result_name) {
            // Per-head outputs [B, S, H, d_model] are only built when asked for: TL's
            // `use_attn_result`. The sum below gives the same attn_out either way.
            let w_o_heads: T3<D> = a.w_o_heads.clone();
            let z_heads: T3<D> =
                z.clone()
                    .permute::<_, Axes4<2, 0, 1, 3>>()
                    .reshape_like(&(h, b * s, dh));
            let result: T4<D> = z_heads
                .matmul(w_o_heads)
                .reshape_like(&(h, b, s, d))
                .permute::<_, Axes4<1, 2, 0, 3>>()
                .realize();
            let result = self.point(hooks, &result_name, result)?;
            if hooks.writes(&result_name) {
                // A written result is what the heads output now: attn_out is its sum over
                // heads plus b_O (TL's use_attn_result), not z @ W_O.
                let summed: T3<D> = result.sum::<_, Axis<2>>();
                let attn_out = summed
                    + a.o
                        .bias()
                        .clone()
                        .broadcast_like::<_, Axes2<0, 1>>(&(b, s, d));
                let attn_out = self.point(hooks, &name("hook_attn_out"), attn_out)?;
                let resid = self.resid_take();
                self.resid = Some(resid + attn_out);
                return Ok(());
            }
        }

        let z_flat: T3<D> = z.reshape_like(&(b, s, h * dh));
        let attn_out = self.point(hooks, &name("hook_attn_out"), ops::linear(z_flat, &a.o))?;
        let resid = self.resid_take();
        self.resid = Some(resid + attn_out);
        Ok(())
    }

    fn mlp(&mut self, hooks: &mut Hooks, l: usize) -> Result<()> {
        let name = |h: &str| block_hook(l, h);
        let mlp = &self.w.blocks[l].mlp;
        let x = self.x_take();
        let pre = self.point(hooks, &name("mlp.hook_pre"), ops::linear(x, &mlp.fc_in))?;
        let post = self.point(hooks, &name("mlp.hook_post"), ops::gelu_new(pre))?;
        let mlp_out = self.point(hooks, &name("hook_mlp_out"), ops::linear(post, &mlp.fc_out))?;
        let resid = self.resid_take();
        self.resid = Some(resid + mlp_out);
        Ok(())
    }

    fn unembed(&mut self, hooks: &mut Hooks) -> Result<T3<D>> {
        let x = self.x_take();
        self.point(hooks, LOGITS, ops::linear(x, &self.w.unembed))
    }

    fn set_resid(&mut self, resid: &[f32]) -> Result<()> {
        let (b, s) = self.tokens.dim();
        let d = self.m.cfg.d_model;
        self.resid = Some(self.m.dev.tensor_from_vec(resid.to_vec(), (b, s, d)));
        Ok(())
    }

    fn final_x(&mut self) -> Result<Vec<f32>> {
        Ok(self.x_take().as_vec())
    }

    /// A gather along the rows, on the device: nothing goes through the host.
    fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let r = self.resid_take();
        let (b, s, d) = *r.shape();
        if let Some(&i) = rows.iter().find(|&&i| i >= b * s) {
            return Err(Error::Other(format!(
                "keep_rows: row {i} of a [{b}, {s}] pass"
            )));
        }
        let flat: T2<D> = r.reshape_like(&(b * s, d));
        let idx: Tensor<(usize,), usize, D> =
            self.m.dev.tensor_from_vec(rows.to_vec(), (rows.len(),));
        let kept: T2<D> = flat.gather(idx);
        self.resid = Some(kept.reshape_like(&(rows.len(), 1, d)));
        Ok(())
    }
}
