//! GPT-2's forward pass, written once: TransformerLens's `HookedTransformer.forward` as a
//! sequence of steps, each with one body per backend.
//!
//! Owns: the order of the steps and of the hook points between them ([`run`]), and the
//! [`Steps`] a backend implements: the host kernels (`model::host`, the CPU) and the dfdx
//! tensor ops (`model::gpt2`: CUDA, and the CPU in the tests). Must not: hold weights or
//! buffers, or know how a step is computed.
//!
//! A step is as coarse as the CPU's fusions need: the attention step reads Q, K and V out of
//! one fused matmul and adds its output into the residual stream in place, so it is one step
//! rather than "linear, split, attend, linear, add". Each step's doc lists the hook points it
//! visits, in TL's order; the points between steps are visited here.

use crate::error::Result;
use crate::hooks::{block_hook, Hooks};

/// Which LayerNorm a step normalises with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LnSite {
    /// `blocks.L.ln1`, before the attention.
    Ln1(usize),
    /// `blocks.L.ln2`, before the MLP.
    Ln2(usize),
    /// `ln_final`, before the unembedding.
    Final,
}

impl LnSite {
    /// The hook name prefix (`blocks.3.ln1`, `ln_final`).
    pub(crate) fn prefix(self) -> String {
        match self {
            LnSite::Ln1(l) => block_hook(l, "ln1"),
            LnSite::Ln2(l) => block_hook(l, "ln2"),
            LnSite::Final => "ln_final".to_string(),
        }
    }
}

/// One forward pass in progress on a backend: the residual stream `resid` and the
/// normalised input `x` of the next attention, MLP or unembedding live in the backend.
pub(crate) trait Steps {
    /// What the unembedding gives back.
    type Logits;

    /// `resid = W_E[tokens] + W_pos[positions]`: `hook_embed`, `hook_pos_embed`.
    fn embed(&mut self, hooks: &mut Hooks) -> Result<()>;

    /// The residual stream at the point `name` (`hook_resid_pre`, `_mid`, `_post`).
    fn resid(&mut self, hooks: &mut Hooks, name: &str) -> Result<()>;

    /// `x = LayerNorm(resid)`: `hook_scale`, `hook_normalized` (then the affine part, while
    /// it has not been folded into the next weights).
    fn layer_norm(&mut self, hooks: &mut Hooks, site: LnSite) -> Result<()>;

    /// `resid += attn(x)`: `attn.hook_q`, `hook_k`, `hook_v`, `hook_attn_scores`,
    /// `hook_pattern`, `hook_z`, `hook_result`, then `hook_attn_out`.
    fn attention(&mut self, hooks: &mut Hooks, layer: usize) -> Result<()>;

    /// `resid += mlp(x)`: `mlp.hook_pre`, `mlp.hook_post`, then `hook_mlp_out`.
    fn mlp(&mut self, hooks: &mut Hooks, layer: usize) -> Result<()>;

    /// `x @ W_U + b_U`: the point `logits`.
    fn unembed(&mut self, hooks: &mut Hooks) -> Result<Self::Logits>;

    /// Sets the residual stream to `resid` (`[batch, seq, d_model]` row-major, on the host):
    /// a resumed pass starts from it instead of the embedding.
    fn set_resid(&mut self, resid: &[f32]) -> Result<()>;

    /// The input of the unembedding (`ln_final`'s output) on the host, `[batch * seq * d_model]`.
    fn final_x(&mut self) -> Result<Vec<f32>>;

    /// Keeps only the residual stream's rows `rows` (flat indices into `batch * seq`, each
    /// below it): the pass goes on as `[rows.len(), 1, d_model]`. Only position-wise steps
    /// (LayerNorm, MLP) may follow, so a resumed pass whose reader needs a few rows runs the
    /// last MLP and `ln_final` on those rows alone.
    fn keep_rows(&mut self, rows: &[usize]) -> Result<()>;
}

/// Where a resumed pass starts: the residual stream given replaces the one the pass would
/// have computed up to there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResumeAt {
    /// `blocks.L.hook_resid_pre` (`L == n_layers`: the input of `ln_final`).
    Pre(usize),
    /// `blocks.L.hook_resid_mid`: the MLP of layer `L` runs next.
    Mid(usize),
}

impl ResumeAt {
    /// Whether a pass resumed here runs any layer (`Pre(n_layers)` is `ln_final`'s input:
    /// only `ln_final` follows).
    pub fn runs_layers(self, n_layers: usize) -> bool {
        !matches!(self, ResumeAt::Pre(l) if l >= n_layers)
    }
}

/// The forward pass from `at` on, with the residual stream there set to `resid` (or as the
/// backend already holds it); returns
/// `ln_final`'s output on the host (the unembedding is the caller's, so it can read only the
/// columns it needs). Layers below `at` are not run: resumed passes share them.
///
/// `rows`: the only rows (flat `batch * seq` indices) the caller reads, or `None` for all.
/// Every position's keys and values still feed the last attention, but what follows it is
/// position-wise: the last MLP and `ln_final` run on `rows` alone, and the output is
/// `[rows.len() * d_model]` in their order. (A logit difference reads one row per sequence:
/// this skips `1 - 1/seq` of the last MLP, two thirds of a layer, in every resumed pass.)
pub(crate) fn run_from<S: Steps>(
    steps: &mut S,
    hooks: &mut Hooks,
    n_layers: usize,
    at: ResumeAt,
    resid: Option<&[f32]>,
    rows: Option<&[usize]>,
) -> Result<Vec<f32>> {
    // `None`: the backend holds the residual stream already (a device tensor).
    if let Some(r) = resid {
        steps.set_resid(r)?;
    }
    // After the last attention, before the position-wise rest.
    let trim = |steps: &mut S, l: usize| match rows {
        Some(r) if l + 1 == n_layers => steps.keep_rows(r),
        _ => Ok(()),
    };
    let first = match at {
        ResumeAt::Pre(l) => l,
        ResumeAt::Mid(l) => {
            steps.resid(hooks, &block_hook(l, "hook_resid_mid"))?;
            trim(steps, l)?;
            steps.layer_norm(hooks, LnSite::Ln2(l))?;
            steps.mlp(hooks, l)?;
            steps.resid(hooks, &block_hook(l, "hook_resid_post"))?;
            l + 1
        }
    };
    for l in first..n_layers {
        steps.resid(hooks, &block_hook(l, "hook_resid_pre"))?;
        steps.layer_norm(hooks, LnSite::Ln1(l))?;
        steps.attention(hooks, l)?;
        steps.resid(hooks, &block_hook(l, "hook_resid_mid"))?;
        trim(steps, l)?;
        steps.layer_norm(hooks, LnSite::Ln2(l))?;
        steps.mlp(hooks, l)?;
        steps.resid(hooks, &block_hook(l, "hook_resid_post"))?;
    }
    if let (ResumeAt::Pre(l), Some(r)) = (at, rows) {
        if l >= n_layers {
            // Resumed at ln_final's input: no layer ran, so keep the rows here.
            steps.keep_rows(r)?;
        }
    }
    steps.layer_norm(hooks, LnSite::Final)?;
    steps.final_x()
}

/// The forward pass of an `n_layers` GPT-2 on `steps`, visiting every hook point in TL's
/// order; the unembedding (the largest matmul) only when `logits` is asked for.
pub(crate) fn run<S: Steps>(
    steps: &mut S,
    hooks: &mut Hooks,
    n_layers: usize,
    logits: bool,
) -> Result<Option<S::Logits>> {
    steps.embed(hooks)?;
    for l in 0..n_layers {
        steps.resid(hooks, &block_hook(l, "hook_resid_pre"))?;
        steps.layer_norm(hooks, LnSite::Ln1(l))?;
        steps.attention(hooks, l)?;
        steps.resid(hooks, &block_hook(l, "hook_resid_mid"))?;
        steps.layer_norm(hooks, LnSite::Ln2(l))?;
        steps.mlp(hooks, l)?;
        steps.resid(hooks, &block_hook(l, "hook_resid_post"))?;
    }
    steps.layer_norm(hooks, LnSite::Final)?;
    if !logits {
        return Ok(None);
    }
    steps.unembed(hooks).map(Some)
}
