//! Interventions: ablate or patch an activation and measure what changes (`[[intervention]]`).
//!
//! Owns: the planned interventions ([`Plan`], checked against the model and the datasets
//! with `file:line:col` errors before any forward pass), the sweep of each (one
//! [`Unit`] per head, layer or (layer, position)), the write of a unit into the residual
//! stream (`write`), and the measures (`measure`). Runs as a metric
//! ([`sweep::Sweep`]): the engine's unchanged pass caches the residual streams and hook
//! points it needs, and every unit of layer `L` resumes that pass at layer `L`
//! ([`crate::model::Passes::resume_from`]), so the layers below are computed once per batch,
//! not once per unit. Must not: load models, build datasets or write files.
//!
//! Why a write is a change of the residual stream: `z` and `result` of head `h` at layer `L`
//! reach the rest of the model only through `resid_mid[L]` (`attn_out` is the sum over heads
//! of `result = z @ W_O[h]`, plus `b_O`), so a new value is `resid_mid[L] += (new - old) @
//! W_O[h]` (`z`) or `+= new - old` (`result`, `attn_out`); `mlp_out` likewise adds to
//! `resid_post[L]`; `resid_pre` and `resid_post` are the residual stream itself. TL's
//! `run_with_hooks` recomputes the layer instead; the goldens check the two agree.
//!
//! Where it runs: a stack of units' writes is one [`crate::seam::Op`]
//! ([`write::WriteOp`]), so the cache picks the body: host buffers for the host kernels, dfdx
//! tensor ops on a device, where the resumed passes then start from the written tensor.
//! What comes back to the host is `ln_final`'s output of the rows the measures read (one row
//! per sequence for a logit difference alone), never a cached activation.

pub mod measure;
pub mod sweep;
pub mod write;

use std::collections::BTreeSet;

use crate::data::Dataset;
use crate::error::Result;
use crate::model::{ModelConfig, ResumeAt};
use crate::spec::{InterventionSpec, LoadedSpec};

/// `ablate` or `patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ablate(Value),
    Patch,
}

/// What an ablation writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Zero,
    /// The mean over every non-padding (sequence, position) of `mean_over`.
    Mean,
    /// The mean at each position over the sequences of `mean_over` that reach it.
    MeanPerPosition,
}

/// The hook points an intervention writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Z,
    Result,
    AttnOut,
    MlpOut,
    ResidPre,
    ResidPost,
}

pub const KINDS: &[&str] = &["ablate", "patch"];
pub const VALUES: &[&str] = &["zero", "mean", "mean_per_position"];
pub const HOOKS: &[&str] = &[
    "z",
    "result",
    "attn_out",
    "mlp_out",
    "resid_pre",
    "resid_post",
];
pub const MEASURES: &[&str] = &["loss", "kl", "logit_diff"];

impl Hook {
    pub fn parse(s: &str) -> Option<Hook> {
        Some(match s {
            "z" => Hook::Z,
            "result" => Hook::Result,
            "attn_out" => Hook::AttnOut,
            "mlp_out" => Hook::MlpOut,
            "resid_pre" => Hook::ResidPre,
            "resid_post" => Hook::ResidPost,
            _ => return None,
        })
    }

    pub fn short(self) -> &'static str {
        HOOKS[self as usize]
    }

    /// One intervention per head (else per layer).
    pub fn per_head(self) -> bool {
        matches!(self, Hook::Z | Hook::Result)
    }

    /// The TL hook name at layer `l`.
    pub fn tl(self, l: usize) -> String {
        crate::hooks::block_hook(
            l,
            match self {
                Hook::Z => "attn.hook_z",
                Hook::Result => "attn.hook_result",
                Hook::AttnOut => "hook_attn_out",
                Hook::MlpOut => "hook_mlp_out",
                Hook::ResidPre => "hook_resid_pre",
                Hook::ResidPost => "hook_resid_post",
            },
        )
    }

    /// Where the pass resumes after a write at layer `l`, and the residual stream there.
    pub fn resume(self, l: usize) -> (ResumeAt, String) {
        match self {
            Hook::Z | Hook::Result | Hook::AttnOut => (
                ResumeAt::Mid(l),
                crate::hooks::block_hook(l, "hook_resid_mid"),
            ),
            Hook::MlpOut | Hook::ResidPost => (
                ResumeAt::Pre(l + 1),
                crate::hooks::block_hook(l, "hook_resid_post"),
            ),
            Hook::ResidPre => (
                ResumeAt::Pre(l),
                crate::hooks::block_hook(l, "hook_resid_pre"),
            ),
        }
    }
}

/// What a sweep measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measures {
    pub loss: bool,
    pub kl: bool,
    pub logit_diff: bool,
}

impl Measures {
    /// Whether any measure reads the full unembedding (all of `W_U`).
    pub fn full_vocab(self) -> bool {
        self.loss || self.kl
    }
}

/// One intervention of a sweep: the heads written together (none for a layer hook), at
/// one layer, at one position or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub layer: usize,
    pub heads: Vec<usize>,
    pub pos: Option<usize>,
}

/// One `[[intervention]]`, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The table's name.
    pub name: String,
    pub kind: Kind,
    pub hook: Hook,
    /// The datasets it changes.
    pub datasets: Vec<String>,
    /// Per target dataset: whose mean replaces (mean ablations).
    pub mean_over: Option<String>,
    pub source: Option<String>,
    pub per_position: bool,
    pub together: bool,
    /// The heads swept (z/result).
    pub heads: Vec<(usize, usize)>,
    pub measures: Measures,
    /// Each of its `[[intervention]]` keys' spans, for errors found later.
    pub index: usize,
}

impl Plan {
    /// The units over a dataset of `seq_len` positions, by layer then head then position.
    pub fn units(&self, n_layers: usize, seq_len: usize) -> Vec<Unit> {
        let positions: Vec<Option<usize>> = if self.per_position {
            (0..seq_len).map(Some).collect()
        } else {
            vec![None]
        };
        let mut out = Vec::new();
        if self.hook.per_head() {
            if self.together {
                let layers: BTreeSet<usize> = self.heads.iter().map(|h| h.0).collect();
                // `together` across layers: one unit per layer would not be one intervention.
                let l = *layers.iter().next().expect("checked: heads are not empty");
                for &p in &positions {
                    out.push(Unit {
                        layer: l,
                        heads: self.heads.iter().map(|h| h.1).collect(),
                        pos: p,
                    });
                }
            } else {
                for &(l, h) in &self.heads {
                    for &p in &positions {
                        out.push(Unit {
                            layer: l,
                            heads: vec![h],
                            pos: p,
                        });
                    }
                }
            }
        } else {
            for l in 0..n_layers {
                for &p in &positions {
                    out.push(Unit {
                        layer: l,
                        heads: vec![],
                        pos: p,
                    });
                }
            }
        }
        out
    }

    /// The mean over `target`'s run that this plan writes there (`mean_over`, else itself).
    pub fn mean_dataset<'a>(&'a self, target: &'a str) -> &'a str {
        self.mean_over.as_deref().unwrap_or(target)
    }
}

fn one_of(what: &str, got: &str, known: &[&str]) -> String {
    format!("{what} '{got}' is not one of: {}", known.join(", "))
}

/// Checks every `[[intervention]]` of `spec` against the model and the built datasets: the
/// errors point at the key (`file:line:col`), and come before any forward pass.
pub fn plan(
    spec: &LoadedSpec,
    cfg: &ModelConfig,
    run_heads: &[(usize, usize)],
    datasets: &[Dataset],
) -> Result<Vec<Plan>> {
    let mut out: Vec<Plan> = Vec::new();
    for (index, iv) in spec.spec.interventions.iter().enumerate() {
        let p = plan_one(spec, cfg, run_heads, datasets, index, iv)?;
        if out.iter().any(|q| q.name == p.name) {
            let span = iv.name.as_ref().map_or(iv.kind.span(), |n| n.span());
            return Err(spec.error_at(
                span,
                format!(
                    "two [[intervention]] entries both write the table '{}': give one a different `name`",
                    p.name
                ),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

fn plan_one(
    spec: &LoadedSpec,
    cfg: &ModelConfig,
    run_heads: &[(usize, usize)],
    datasets: &[Dataset],
    index: usize,
    iv: &InterventionSpec,
) -> Result<Plan> {
    let at = |span: std::ops::Range<usize>, msg: String| spec.error_at(span, msg);
    let dataset_named = |name: &toml::Spanned<String>, key: &str| -> Result<&Dataset> {
        datasets
            .iter()
            .find(|d| &d.name == name.get_ref())
            .ok_or_else(|| {
                let known: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
                at(
                    name.span(),
                    format!(
                        "[[intervention]] `{key}`: no dataset is named '{}' (datasets: {})",
                        name.get_ref(),
                        known.join(", ")
                    ),
                )
            })
    };
    let hook = Hook::parse(iv.hook.get_ref()).ok_or_else(|| {
        at(
            iv.hook.span(),
            one_of("[[intervention]] hook", iv.hook.get_ref(), HOOKS),
        )
    })?;
    let kind = match iv.kind.get_ref().as_str() {
        "ablate" => {
            let v = iv.value.as_ref().ok_or_else(|| {
                at(
                    iv.kind.span(),
                    "[[intervention]] kind = \"ablate\" needs `value` (zero, mean or mean_per_position)".into(),
                )
            })?;
            Kind::Ablate(match v.get_ref().as_str() {
                "zero" => Value::Zero,
                "mean" => Value::Mean,
                "mean_per_position" => Value::MeanPerPosition,
                other => {
                    return Err(at(
                        v.span(),
                        one_of("[[intervention]] value", other, VALUES),
                    ))
                }
            })
        }
        "patch" => {
            if let Some(v) = &iv.value {
                return Err(at(v.span(), "[[intervention]] `value` is for kind = \"ablate\"; a patch writes `source`'s activations".into()));
            }
            Kind::Patch
        }
        other => {
            return Err(at(
                iv.kind.span(),
                one_of("[[intervention]] kind", other, KINDS),
            ))
        }
    };
    let targets: Vec<&Dataset> = match &iv.dataset {
        Some(d) => vec![dataset_named(d, "dataset")?],
        None => datasets.iter().collect(),
    };
    let mut mean_over = None;
    if let Some(m) = &iv.mean_over {
        if !matches!(kind, Kind::Ablate(Value::Mean | Value::MeanPerPosition)) {
            return Err(at(
                m.span(),
                "[[intervention]] `mean_over` is for value = \"mean\" or \"mean_per_position\""
                    .into(),
            ));
        }
        let over = dataset_named(m, "mean_over")?;
        if matches!(kind, Kind::Ablate(Value::MeanPerPosition)) {
            for t in &targets {
                if over.seq_len() < t.seq_len() {
                    return Err(at(m.span(), format!("[[intervention]] `mean_over`: '{}' has {} positions, fewer than the {} of '{}' (a mean per position needs every position)", over.name, over.seq_len(), t.seq_len(), t.name)));
                }
            }
        }
        mean_over = Some(m.get_ref().clone());
    }
    let mut source = None;
    match (&kind, &iv.source) {
        (Kind::Patch, None) => {
            return Err(at(iv.kind.span(), "[[intervention]] kind = \"patch\" needs `source` (the dataset whose activations are written in)".into()))
        }
        (Kind::Patch, Some(s)) => {
            let src = dataset_named(s, "source")?;
            for t in &targets {
                if src.tokens.dim() != t.tokens.dim() {
                    return Err(at(s.span(), format!("[[intervention]] `source`: '{}' is {} x {} tokens but '{}' is {} x {}: a patch writes row i into row i, so the shapes must match", src.name, src.n_sequences(), src.seq_len(), t.name, t.n_sequences(), t.seq_len())));
                }
            }
            source = Some(s.get_ref().clone());
        }
        (Kind::Ablate(_), Some(s)) => {
            return Err(at(s.span(), "[[intervention]] `source` is for kind = \"patch\"".into()))
        }
        _ => {}
    }
    let per_position = iv.per_position.as_ref().is_some_and(|p| *p.get_ref());
    if let Some(p) = iv.per_position.as_ref().filter(|p| *p.get_ref()) {
        let mut lens = BTreeSet::new();
        for t in &targets {
            let l = crate::means::seq_lens(t.tokens.view(), cfg.bos_token_id);
            lens.extend(l);
        }
        if lens.len() > 1 {
            return Err(at(p.span(), format!("[[intervention]] per_position = true needs sequences of one length (a position is then the same place in each), but the lengths here are {lens:?}")));
        }
    }
    let together = iv.together.as_ref().is_some_and(|p| *p.get_ref());
    let mut heads = Vec::new();
    if hook.per_head() {
        heads = match &iv.heads {
            Some(h) => {
                let list = crate::spec::Heads::List(h.get_ref().clone());
                crate::spec::parse_heads(&list, cfg.n_layers, cfg.n_heads)
                    .map_err(|m| at(h.span(), format!("[[intervention]] heads: {m}")))?
            }
            None => run_heads.to_vec(),
        };
        if together {
            let layers: BTreeSet<usize> = heads.iter().map(|h| h.0).collect();
            if layers.len() > 1 {
                let span = iv.together.as_ref().expect("set").span();
                return Err(at(span, format!("[[intervention]] together = true writes heads of one layer in one intervention; these heads are in layers {layers:?}")));
            }
        }
    } else {
        if let Some(h) = &iv.heads {
            return Err(at(h.span(), format!("[[intervention]] `heads` is for hook = \"z\" or \"result\"; hook = \"{}\" sweeps every layer", hook.short())));
        }
        if let Some(t) = &iv.together {
            return Err(at(
                t.span(),
                "[[intervention]] `together` is for hook = \"z\" or \"result\"".into(),
            ));
        }
    }
    let mut measures = Measures::default();
    match &iv.measure {
        None => {
            measures.loss = true;
            measures.kl = true;
            measures.logit_diff = targets.iter().all(|t| t.answers.is_some());
        }
        Some(m) => {
            if m.get_ref().is_empty() {
                return Err(at(m.span(), "[[intervention]] `measure` is empty".into()));
            }
            for x in m.get_ref() {
                match x.as_str() {
                    "loss" => measures.loss = true,
                    "kl" => measures.kl = true,
                    "logit_diff" => measures.logit_diff = true,
                    other => {
                        return Err(at(
                            m.span(),
                            one_of("[[intervention]] measure", other, MEASURES),
                        ))
                    }
                }
            }
            if measures.logit_diff {
                if let Some(t) = targets.iter().find(|t| t.answers.is_none()) {
                    return Err(at(m.span(), format!("[[intervention]] measure logit_diff needs answers, and dataset '{}' has none (give it `answers = FILE`)", t.name)));
                }
            }
        }
    }
    for t in &targets {
        if let Some(a) = &t.answers {
            if a.len() != t.n_sequences() {
                return Err(at(
                    iv.kind.span(),
                    format!(
                        "dataset '{}' has {} answers for {} sequences",
                        t.name,
                        a.len(),
                        t.n_sequences()
                    ),
                ));
            }
            if let Some(bad) = a.iter().flatten().find(|&&x| x as usize >= cfg.d_vocab) {
                return Err(at(
                    iv.kind.span(),
                    format!(
                        "dataset '{}': answer token {bad} is outside the vocabulary (d_vocab = {})",
                        t.name, cfg.d_vocab
                    ),
                ));
            }
        }
    }
    let name = match &iv.name {
        Some(n) => {
            crate::spec::check_name(n.get_ref())
                .map_err(|why| at(n.span(), format!("[[intervention]] name {why}")))?;
            n.get_ref().clone()
        }
        None => match kind {
            Kind::Patch => format!("patch_{}", hook.short()),
            Kind::Ablate(v) => format!("ablate_{}_{}", VALUES[v as usize], hook.short()),
        },
    };
    Ok(Plan {
        name,
        kind,
        hook,
        datasets: targets.iter().map(|d| d.name.clone()).collect(),
        mean_over,
        source,
        per_position,
        together,
        heads,
        measures,
        index,
    })
}

/// FLOPs of a forward pass's pieces over `rows` = `b * s` token rows (matmuls only).
fn layer_flop(cfg: &ModelConfig, b: usize, s: usize) -> (f64, f64) {
    let (d, m) = (cfg.d_model as f64, cfg.d_mlp as f64);
    let rows = (b * s) as f64;
    let attn = 2.0 * rows * d * 3.0 * d
        + 2.0 * 2.0 * (b * cfg.n_heads * s * s * cfg.d_head) as f64
        + 2.0 * rows * d * d;
    let mlp = 2.0 * 2.0 * rows * d * m;
    (attn, mlp)
}

/// What a planned intervention costs on one dataset of `n` sequences of `s` tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Interventions (resumed passes, each over the whole dataset).
    pub units: usize,
    /// Passes over the dataset: the unchanged one, the source's, the mean pass, the units.
    pub passes: usize,
    /// Matmul FLOPs of the sweep as planned (resumed at the unit's layer).
    pub flop: f64,
    /// The same sweep as TransformerLens's patching.py runs it: a full pass per unit.
    pub flop_full_passes: f64,
}

impl Plan {
    /// The sweep's cost on a dataset of `n` sequences of `s` tokens.
    pub fn cost(&self, cfg: &ModelConfig, n: usize, s: usize) -> Cost {
        let (attn, mlp) = layer_flop(cfg, n, s);
        let layer = attn + mlp;
        let unembed = 2.0 * (n * s) as f64 * (cfg.d_model * cfg.d_vocab) as f64;
        let measure = if self.measures.full_vocab() {
            unembed
        } else {
            0.0
        };
        let full = cfg.n_layers as f64 * layer + unembed;
        let units = self.units(cfg.n_layers, s);
        let mut flop = full; // the unchanged pass (shared with the metrics)
        let mut passes = 1;
        if self.source.is_some() {
            flop += full - unembed;
            passes += 1;
        }
        if matches!(
            self.kind,
            Kind::Ablate(Value::Mean | Value::MeanPerPosition)
        ) {
            flop += full - unembed;
            passes += 1;
        }
        // A logit difference alone runs the last MLP on each sequence's last row only.
        let last_mlp_skipped = if self.measures.full_vocab() {
            0.0
        } else {
            mlp * (1.0 - 1.0 / s.max(1) as f64)
        };
        for u in &units {
            let (at, _) = self.hook.resume(u.layer);
            let rest = match at {
                ResumeAt::Pre(l) if l >= cfg.n_layers => 0.0,
                ResumeAt::Pre(l) => (cfg.n_layers - l) as f64 * layer - last_mlp_skipped,
                ResumeAt::Mid(l) => mlp + (cfg.n_layers - l - 1) as f64 * layer - last_mlp_skipped,
            };
            flop += rest + measure;
        }
        passes += units.len();
        Cost {
            units: units.len(),
            passes,
            flop,
            flop_full_passes: units.len() as f64 * full + full,
        }
    }
}
