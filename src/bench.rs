//! `runner bench`: timings of the forward pass and the 12 x 12 sweeps on a GPT-2-small-shaped
//! random checkpoint, with FLOP counts, achieved GFLOP/s against the machine's measured sgemm
//! peak, and peak memory.
//!
//! Owns: making (once, cached on disk) the random checkpoint and token files that the
//! PyTorch baseline script (`bench/transformer_lens_baseline.py`) reads too, measuring the
//! sgemm ceiling on the forward's shapes, timing each case (best of `repeats`: the machine is
//! shared, so minimums), and the ratio table against a baseline JSON measured on the same
//! machine. Must not: be called from tests (benchmarks are not timed tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::prelude::{Device, SumTo, Tensor, TryMatMul};
use ndarray::{s, Array2};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{unpadded_lengths, Dataset};
use crate::device::{with_device, DeviceKind, OnDevice};
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::metrics::{self, RunContext};
use crate::model::{self, CheckpointFiles, LoadedModel, ModelConfig, Processing};
use crate::seam::SeamDevice;

/// GPT-2 small's shape.
pub const SMALL: ModelConfig = ModelConfig {
    n_layers: 12,
    n_heads: 12,
    d_model: 768,
    d_head: 64,
    d_mlp: 3072,
    d_vocab: 50257,
    n_ctx: 1024,
    eps: 1e-5,
    bos_token_id: 50256,
};

/// Writes a random GPT-2 checkpoint of shape `cfg` in the hub layout (seeded, so every
/// run and the baseline script see the same weights).
pub fn write_random_checkpoint(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (d, m, v) = (cfg.d_model, cfg.d_mlp, cfg.d_vocab);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| center + spread * (rng.gen::<f32>() * 2.0 - 1.0))
            .collect();
        tensors.push((name, shape, data));
    };
    add("wte.weight".into(), vec![v, d], 0.0, 0.1);
    add("wpe.weight".into(), vec![cfg.n_ctx, d], 0.0, 0.02);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        for ln in ["ln_1", "ln_2"] {
            add(p(&format!("{ln}.weight")), vec![d], 1.0, 0.2);
            add(p(&format!("{ln}.bias")), vec![d], 0.0, 0.1);
        }
        add(p("attn.c_attn.weight"), vec![d, 3 * d], 0.0, 0.06);
        add(p("attn.c_attn.bias"), vec![3 * d], 0.0, 0.05);
        add(p("attn.c_proj.weight"), vec![d, d], 0.0, 0.03);
        add(p("attn.c_proj.bias"), vec![d], 0.0, 0.02);
        add(p("mlp.c_fc.weight"), vec![d, m], 0.0, 0.06);
        add(p("mlp.c_fc.bias"), vec![m], 0.0, 0.05);
        add(p("mlp.c_proj.weight"), vec![m, d], 0.0, 0.03);
        add(p("mlp.c_proj.bias"), vec![d], 0.0, 0.02);
    }
    add("ln_f.weight".into(), vec![d], 1.0, 0.2);
    add("ln_f.bias".into(), vec![d], 0.0, 0.1);
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .into_iter()
        .map(|(n, shape, data)| {
            (
                n,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                shape,
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, shape)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("sizes match");
            (n.clone(), view)
        })
        .collect();
    let st =
        safetensors::tensor::serialize(views, &None).map_err(|e| Error::Other(e.to_string()))?;
    crate::output::write_atomic(&dir.join("model.safetensors"), &st)?;
    let config = serde_json::json!({
        "model_type": "gpt2", "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_embd": d,
        "n_positions": cfg.n_ctx, "n_ctx": cfg.n_ctx, "vocab_size": v, "layer_norm_epsilon": cfg.eps,
        "activation_function": "gelu_new", "n_inner": null, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.bos_token_id, "architectures": ["GPT2LMHeadModel"]
    });
    crate::output::write_json(&dir.join("config.json"), &config)
}

/// Random token ids, BOS first, as a JSON-able list of lists.
pub fn random_tokens(n: usize, seq: usize, vocab: usize, bos: u32, seed: u64) -> Array2<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Array2::from_shape_fn((n, seq), |(_, j)| {
        if j == 0 {
            bos
        } else {
            rng.gen_range(0..vocab as u32 - 1)
        }
    })
}

/// Peak resident memory (VmHWM) in bytes, and a way to reset it between cases (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux >= 4.0); harmless elsewhere.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One measured case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Case {
    pub name: String,
    pub seconds: f64,
    pub gflop: f64,
    pub peak_mib: Option<f64>,
}

/// Multiply-adds x 2 of the forward pass: matmuls of every layer, attention, unembed.
pub fn forward_flop(cfg: &ModelConfig, b: usize, s: usize) -> f64 {
    let (n, d, m, v) = (
        (b * s) as f64,
        cfg.d_model as f64,
        cfg.d_mlp as f64,
        cfg.d_vocab as f64,
    );
    let per_layer = 2.0 * n * (4.0 * d * d + 2.0 * d * m) + 4.0 * (b * s * s) as f64 * d;
    cfg.n_layers as f64 * per_layer + 2.0 * n * d * v
}

/// FLOPs of one layer's attention half (QKV, scores, pattern x V, output projection) and
/// MLP half on `b` sequences of `s` tokens.
fn layer_halves(cfg: &ModelConfig, b: usize, s: usize) -> (f64, f64) {
    let (n, d, m) = ((b * s) as f64, cfg.d_model as f64, cfg.d_mlp as f64);
    (
        2.0 * n * 4.0 * d * d + 4.0 * (b * s * s) as f64 * d,
        2.0 * n * 2.0 * d * m,
    )
}

/// An intervention case of `runner bench`: which hook is swept, per position or not, and
/// which measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// `z` (per head) or `resid_pre` (per layer).
    pub per_head: bool,
    pub per_position: bool,
    /// `measure = ["logit_diff"]`: only the answers' unembedding columns at the last
    /// position, not the whole vocabulary at every position.
    pub logit_diff_only: bool,
}

/// FLOPs of an intervention sweep on `b x s` tokens, as done with shared prefixes (each unit
/// of layer L resumes the unchanged pass: a `z` unit runs layer L's MLP and the layers above,
/// a `resid_pre` unit layers L and above) and as TransformerLens's `patching.py` does it (a
/// whole forward pass per unit). Both count the unchanged target pass and the source (or
/// zero) pass once. Returns (with sharing, without).
pub fn intervention_flop(cfg: &ModelConfig, b: usize, s: usize, sw: Sweep) -> (f64, f64) {
    let (attn, mlp) = layer_halves(cfg, b, s);
    let layer = attn + mlp;
    let (n, d, v) = ((b * s) as f64, cfg.d_model as f64, cfg.d_vocab as f64);
    let full_unembed = 2.0 * n * d * v;
    // logit_diff alone: the two answers' columns at one position per sequence.
    let unembed = if sw.logit_diff_only {
        2.0 * b as f64 * d * 2.0
    } else {
        full_unembed
    };
    let units_per_layer =
        if sw.per_head { cfg.n_heads } else { 1 } * if sw.per_position { s } else { 1 };
    let base = 2.0 * forward_flop(cfg, b, s);
    let mut shared = base;
    let mut plain = base;
    for l in 0..cfg.n_layers {
        let above = (cfg.n_layers - l - 1) as f64 * layer;
        let rest = if sw.per_head {
            mlp + above
        } else {
            layer + above
        };
        // logit_diff alone: the last MLP on each sequence's last row only.
        let skipped = if sw.logit_diff_only {
            mlp * (1.0 - 1.0 / s as f64)
        } else {
            0.0
        };
        shared += units_per_layer as f64 * (rest - skipped + unembed);
        plain += units_per_layer as f64 * (cfg.n_layers as f64 * layer + full_unembed);
    }
    (shared, plain)
}

/// The metric-side FLOPs this implementation performs for the 144-head sweeps.
pub fn sweep_flop(cfg: &ModelConfig, kind: &str, b: usize, s: usize) -> f64 {
    let (n, d, v, dh) = (
        (b * s) as f64,
        cfg.d_model as f64,
        cfg.d_vocab as f64,
        cfg.d_head as f64,
    );
    let heads = (cfg.n_layers * cfg.n_heads) as f64;
    // shared by both: c[k] = v . (W_O @ u_k) for every head
    let coef = cfg.n_layers as f64 * 2.0 * n * d * (cfg.n_heads as f64 * dh) + heads * 2.0 * n * dh;
    match kind {
        "source_suppression" => coef + heads * 4.0 * (b * s * s) as f64,
        _ => {
            // U_tok @ W_U once; per head W_O[h] @ W_U, (pattern*coef) @ UU, z @ WOU, and
            // three log-sum-exps over the vocabulary (counted as 4 flops per element).
            coef + 2.0 * n * d * v
                + heads
                    * (2.0 * dh * d * v
                        + 2.0 * (b * s * s) as f64 * v
                        + 2.0 * n * dh * v
                        + 12.0 * n * v)
        }
    }
}

fn time_case<F: FnMut() -> Result<()>>(
    name: &str,
    gflop: f64,
    repeats: usize,
    mut f: F,
) -> Result<Case> {
    reset_peak_rss();
    let mut seconds = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        seconds = seconds.min(t.elapsed().as_secs_f64());
    }
    let case = Case {
        name: name.to_string(),
        seconds,
        gflop,
        peak_mib: peak_rss().map(|b| b as f64 / (1024.0 * 1024.0)),
    };
    eprintln!(
        "  {:<34} {:>9.3} s  {:>8.1} GFLOP/s  peak {:>7.0} MiB",
        case.name,
        case.seconds,
        case.gflop / case.seconds,
        case.peak_mib.unwrap_or(f64::NAN)
    );
    Ok(case)
}

/// Runs a metric sweep over every head of `m` on `tokens`, in batches.
fn sweep<D: SeamDevice>(
    m: &LoadedModel<D>,
    kind: &str,
    tokens: &Array2<u32>,
    batch_size: usize,
) -> Result<()> {
    with_every_head(m, |ctx| {
        let cfg = ctx.cfg;
        let ds = Dataset {
            name: "bench".into(),
            lengths: unpadded_lengths(tokens, cfg.bos_token_id),
            tokens: tokens.clone(),
            ioi: None,
            answers: None,
        };
        let mut metric = metrics::builtin(kind, &toml::Table::new())?;
        crate::engine::run_metric(&m.model, ctx, metric.as_mut(), &ds, batch_size)?;
        Ok(())
    })
}

/// Calls `f` with the run context of a sweep over every head of `m`, as `heads = "all"`
/// gives it.
fn with_every_head<D: SeamDevice, R>(m: &LoadedModel<D>, f: impl FnOnce(&RunContext) -> R) -> R {
    let cfg = m.cfg();
    let heads: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
        .collect();
    f(&RunContext {
        cfg,
        params: &m.params,
        heads: &heads,
        bos: cfg.bos_token_id,
        tokenizer: None,
    })
}

/// One intervention case, as a spec would declare it: `kind` (`ablate` with `value = "zero"`,
/// or `patch` from the source tokens) at `hook`, on the `b x s` target tokens with their
/// answers.
struct InterventionCase<'a> {
    kind: &'a str,
    hook: &'a str,
    sweep: Sweep,
}

impl InterventionCase<'_> {
    /// The case's name in the table and in the baseline (`tl <name>`).
    fn name(&self, b: usize, s: usize) -> String {
        let what = match self.kind {
            "ablate" => "ablate_zero",
            _ => "patch",
        };
        let shape = if self.sweep.per_position {
            "per-position"
        } else {
            "sweep"
        };
        let ld = if self.sweep.logit_diff_only {
            " logit_diff"
        } else {
            ""
        };
        format!("{what} {} {shape} {b}x{s}{ld}", self.hook)
    }

    /// The spec of the case, its paths relative to the bench directory.
    fn spec_text(&self, b: usize, s: usize) -> String {
        let value = if self.kind == "ablate" {
            "value = \"zero\"\n"
        } else {
            "source = \"source\"\n"
        };
        let measure = if self.sweep.logit_diff_only {
            "measure = [\"logit_diff\"]\n"
        } else {
            "measure = [\"loss\", \"kl\", \"logit_diff\"]\n"
        };
        format!(
            "name = \"bench\"\n[model]\npath = \".\"\n\
             [[dataset]]\nname = \"target\"\nkind = \"tokens\"\npath = \"tokens_{b}x{s}.json\"\nanswers = \"answers_{b}x{s}.json\"\n\
             [[dataset]]\nname = \"source\"\nkind = \"tokens\"\npath = \"tokens_{b}x{s}_source.json\"\nanswers = \"answers_{b}x{s}.json\"\n\
             [[intervention]]\nkind = \"{}\"\nhook = \"{}\"\ndataset = \"target\"\nper_position = {}\n{value}{measure}",
            self.kind, self.hook, self.sweep.per_position
        )
    }
}

/// The intervention cases on `b x s` tokens: the 144-head zero ablation and patch of `z`
/// with every measure and with `logit_diff` alone, and (on 20x16) the per-position patch of
/// `resid_pre`.
fn intervention_cases(b: usize, s: usize) -> Vec<InterventionCase<'static>> {
    let mut out = Vec::new();
    for kind in ["ablate", "patch"] {
        for logit_diff_only in [false, true] {
            out.push(InterventionCase {
                kind,
                hook: "z",
                sweep: Sweep {
                    per_head: true,
                    per_position: false,
                    logit_diff_only,
                },
            });
        }
    }
    if (b, s) == (20, 16) {
        out.push(InterventionCase {
            kind: "patch",
            hook: "resid_pre",
            sweep: Sweep {
                per_head: false,
                per_position: true,
                logit_diff_only: false,
            },
        });
    }
    out
}

/// Runs one intervention case through the engine as a run would: the datasets built and the
/// intervention planned from a spec (outside the timing), then the unchanged pass, the
/// source pass and the sweep, resumed from shared prefixes.
fn run_intervention<D: SeamDevice>(
    m: &LoadedModel<D>,
    spec: &crate::spec::LoadedSpec,
    datasets: &[Dataset],
    batch_size: usize,
) -> Result<()> {
    with_every_head(m, |ctx| {
        let plan = crate::interventions::plan(spec, ctx.cfg, ctx.heads, datasets)?
            .pop()
            .ok_or_else(|| Error::Other("the bench spec plans no intervention".into()))?;
        let seq_len = datasets[0].seq_len();
        let mut sweep =
            crate::interventions::sweep::Sweep::new(plan, datasets, batch_size, seq_len, ctx.cfg);
        crate::engine::run_metric_with_means(
            &m.model,
            ctx,
            &mut sweep,
            &datasets[0],
            datasets,
            batch_size,
        )?;
        Ok(())
    })
}

/// The forward's matmuls per layer (`[M, k] @ [k, n]`), M = tokens per batch: the fused
/// QKV, the output projection, the MLP in and out.
pub const FORWARD_SHAPES: [(usize, usize); 4] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)];

/// GFLOP/s of gemm 0.19 (the kernel the forward uses) over one layer's matmul shapes at
/// `M = m` rows, on every core: the sum of FLOPs over the sum of each shape's best time.
pub fn sgemm_gflops(m: usize, repeats: usize) -> f64 {
    let (mut flop, mut secs) = (0.0, 0.0);
    for (k, n) in FORWARD_SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut best = f64::INFINITY;
        for _ in 0..repeats + 1 {
            let t = Instant::now();
            crate::kernels::sgemm_into(m, k, n, &a, &b, &mut c, false, crate::kernels::Par::All);
            best = best.min(t.elapsed().as_secs_f64());
        }
        flop += 2.0 * (m * k * n) as f64;
        secs += best;
    }
    flop / secs / 1e9
}

/// GFLOP/s of the device's own matmul (cuBLAS through dfdx on CUDA) over one layer's shapes
/// at `M = m` rows, as [`sgemm_gflops`] measures gemm 0.19 for the CPU path. Each shape is
/// timed over `repeats` back-to-back products, then a scalar is read back: kernel launches
/// are asynchronous, so only a read-back makes the time cover the work.
pub fn device_sgemm_gflops<D: Device<f32>>(dev: &D, m: usize, repeats: usize) -> f64 {
    let (mut flop, mut secs) = (0.0, 0.0);
    for (k, n) in FORWARD_SHAPES {
        let a: Tensor<(usize, usize), f32, D> = dev.zeros_like(&(m, k)) + 0.1;
        let b: Tensor<(usize, usize), f32, D> = dev.zeros_like(&(k, n)) + 0.2;
        let run = |reps: usize| {
            let t = Instant::now();
            let mut acc = 0.0;
            for _ in 0..reps {
                let c = a.clone().matmul(b.clone());
                acc = sync_scalar(c.sum::<(), _>());
            }
            (t.elapsed().as_secs_f64(), acc)
        };
        run(1); // warm-up: cuBLAS handles and workspaces
        let reps = repeats.max(1);
        let (t, _) = run(reps);
        flop += 2.0 * (m * k * n * reps) as f64;
        secs += t;
    }
    flop / secs / 1e9
}

/// Reads a device scalar back to the host (which waits for the work queued before it).
fn sync_scalar<D: Device<f32>>(t: Tensor<(), f32, D>) -> f32 {
    t.as_vec().first().copied().unwrap_or(0.0)
}

/// Where the bench keeps its checkpoint and tokens unless told otherwise.
pub fn default_dir() -> PathBuf {
    PathBuf::from("target").join("bench-gpt2-small")
}

/// What `runner bench` runs.
pub struct Options<'a> {
    /// The checkpoint and token files (written by [`prepare`] when missing).
    pub dir: &'a Path,
    /// Sequences per forward pass (the paper-scale case uses [`PAPER_BATCH`] at most).
    pub batch_size: usize,
    /// Only the cases whose name contains this.
    pub only: Option<&'a str>,
    /// Only the intervention cases.
    pub interventions_only: bool,
    /// Each case is the best of this many runs (the long cases run once).
    pub repeats: usize,
    pub device: DeviceKind,
}

/// Runs every case whose name contains `only` (all when `None`) on `opts.device`, each the
/// best of `repeats` runs (the projection_loss sweeps and the paper-scale case once: minutes
/// each); returns them in order, after the `sgemm peak` pseudo-case (its `gflop / seconds`
/// is the GFLOP/s of the matmul the forward uses, on the forward's shapes: gemm 0.19 on the
/// CPU, the device's own elsewhere).
pub fn run(opts: &Options) -> Result<Vec<Case>> {
    prepare(opts.dir, &shapes(opts.device))?;
    with_device(opts.device, Bench(opts))
}

struct Bench<'a>(&'a Options<'a>);

impl OnDevice for Bench<'_> {
    type Output = Vec<Case>;
    fn run<D: SeamDevice>(self, dev: D) -> Result<Vec<Case>> {
        run_on(dev, self.0)
    }
}

fn run_on<D: SeamDevice>(dev: D, opts: &Options) -> Result<Vec<Case>> {
    let Options {
        dir,
        batch_size,
        only,
        interventions_only,
        repeats,
        device,
    } = *opts;
    let wanted = |name: &str| only.map_or(true, |o| name.contains(o));
    let files = CheckpointFiles::in_dir(dir)?;
    let m = model::load(dev.clone(), files, Processing::ALL, None)?;
    let cfg = m.cfg().clone();
    let load_tokens = |b: usize, s: usize| -> Result<Array2<u32>> {
        let path = dir.join(format!("tokens_{b}x{s}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let rows: Vec<Vec<u32>> =
            serde_json::from_str(&text).map_err(|e| Error::Other(e.to_string()))?;
        Array2::from_shape_vec((b, s), rows.concat()).map_err(|e| Error::Other(e.to_string()))
    };
    eprintln!(
        "device {device}; {} host threads (rayon)",
        rayon::current_num_threads()
    );
    // Warm-up: first-touch page faults on the weights, thread-pool and device start-up are
    // not what the cases measure.
    m.model.forward(
        &load_tokens(10, 30)?.slice(s![..2, ..]).to_owned(),
        &mut Hooks::default(),
    )?;
    let mut cases = Vec::new();
    let peak = [batch_size * 16, batch_size * 30, batch_size * 100]
        .into_iter()
        .map(|rows| match device {
            DeviceKind::Cpu => sgemm_gflops(rows, 5),
            _ => device_sgemm_gflops(&dev, rows, 20),
        })
        .fold(0.0, f64::max);
    match device {
        DeviceKind::Cpu => {
            eprintln!("  gemm 0.19 sgemm on the forward's shapes: {peak:.1} GFLOP/s")
        }
        _ => eprintln!("  {device} matmul (dfdx) on the forward's shapes: {peak:.1} GFLOP/s"),
    }
    cases.push(Case {
        name: SGEMM.into(),
        seconds: 1.0,
        gflop: peak,
        peak_mib: None,
    });
    for (b, s) in PATCH_SHAPES {
        for case in intervention_cases(b, s) {
            let name = case.name(b, s);
            if !wanted(&name) {
                continue;
            }
            let spec =
                crate::spec::LoadedSpec::from_str(&case.spec_text(b, s), &dir.join("bench.toml"))?;
            let dctx = crate::data::DataContext {
                tokenizer: None,
                cfg: &cfg,
                spec_dir: dir,
            };
            let datasets = crate::data::build_all(&spec, &dctx)?;
            let (flop, plain) = intervention_flop(&cfg, b, s, case.sweep);
            eprintln!(
                "  {name}: {:.1} GFLOP with shared prefixes, {:.1} GFLOP one pass per unit ({:.0}% saved)",
                flop / 1e9,
                plain / 1e9,
                100.0 * (1.0 - flop / plain)
            );
            cases.push(time_case(&name, flop / 1e9, repeats, || {
                run_intervention(&m, &spec, &datasets, batch_size.min(b))
            })?);
        }
    }
    for (b, s) in if interventions_only {
        vec![]
    } else {
        shapes(device)
    } {
        let paper = (b, s) == PAPER;
        let batch = if paper {
            batch_size.min(PAPER_BATCH)
        } else {
            batch_size
        };
        let toks = load_tokens(b, s)?;
        let name = format!("forward {b}x{s}");
        if !paper && wanted(&name) {
            cases.push(time_case(
                &name,
                forward_flop(&cfg, b, s) / 1e9,
                repeats,
                || {
                    for start in (0..b).step_by(batch) {
                        let t = toks.slice(s![start..(start + batch).min(b), ..]).to_owned();
                        let out = m.model.forward(&t, &mut Hooks::default())?;
                        if device != DeviceKind::Cpu {
                            // Wait for the device (a no-op's worth of work on the CPU).
                            sync_scalar(out.logits.sum::<(), _>());
                        }
                    }
                    Ok(())
                },
            )?);
        }
        for kind in ["source_suppression", "projection_loss"] {
            let name = format!("{kind} sweep {b}x{s}");
            if !wanted(&name) || (paper && kind != "source_suppression") {
                continue;
            }
            // source_suppression does not read the logits, so its pass skips the unembedding.
            let unembed = 2.0 * (b * s * cfg.d_model * cfg.d_vocab) as f64;
            let skipped = if kind == "source_suppression" {
                unembed
            } else {
                0.0
            };
            let flop = (forward_flop(&cfg, b, s) - skipped + sweep_flop(&cfg, kind, b, s)) / 1e9;
            let reps = if kind == "projection_loss" || paper {
                1
            } else {
                repeats
            };
            cases.push(time_case(&name, flop, reps, || {
                sweep(&m, kind, &toks, batch)
            })?);
        }
    }
    cases.extend(cspa_cases(&m, opts, &load_tokens(CSPA.0, CSPA.1)?)?);
    Ok(cases)
}

/// The CSPA case's tokens: 20 sequences of 1000 (issue 20's target: `cspa` of one head at
/// most 2x one forward pass over the same tokens).
pub const CSPA: (usize, usize) = (20, 1000);

/// Sequences per pass in the CSPA cases: the run caches the logits ([S, V] per sequence,
/// 200 MB at 1000 tokens) beside the head's hooks.
pub const CSPA_BATCH: usize = 4;

/// `forward 20x1000` (caching what `cspa` reads) and `cspa 20x1000` (the same pass plus the
/// metric of head 10.7), batches of [`CSPA_BATCH`]. The per-position mean is handed over
/// before the clock starts: a run's mean pass is a fixed cost over `mean_over`, not per
/// token of the datasets.
fn cspa_cases<D: SeamDevice>(
    m: &LoadedModel<D>,
    opts: &Options,
    toks: &Array2<u32>,
) -> Result<Vec<Case>> {
    let wanted = |name: &str| opts.only.map_or(true, |o| name.contains(o));
    let (b, s) = toks.dim();
    let (fwd_name, cspa_name) = (
        format!("forward {b}x{s} (cspa's hooks)"),
        format!("cspa 10.7 {b}x{s}"),
    );
    if !wanted(&fwd_name) && !wanted(&cspa_name) {
        return Ok(Vec::new());
    }
    let cfg = m.cfg();
    let heads = [(10usize, 7usize)];
    let ctx = RunContext {
        cfg,
        params: &m.params,
        heads: &heads,
        bos: cfg.bos_token_id,
        tokenizer: None,
    };
    let ds = Dataset {
        name: "bench".into(),
        lengths: unpadded_lengths(toks, cfg.bos_token_id),
        tokens: toks.clone(),
        ioi: None,
        answers: None,
    };
    let make = || {
        metrics::cspa::DirectPath::cspa(metrics::cspa::CspaConfig {
            heads: heads.to_vec(),
            mean_over: "bench".into(),
            mean_sequences: b,
            k_fraction: 0.05,
            only_negative: true,
            mode: metrics::cspa::Mode::Both,
            function_words: metrics::direct::PAPER_FUNCTION_WORDS.to_vec(),
        })
    };
    let batch = opts.batch_size.clamp(1, CSPA_BATCH);
    let probe = make();
    let means = crate::means::compute(
        &m.model,
        std::slice::from_ref(&ds),
        &metrics::Metric::mean_requests(&probe, &ctx),
        batch,
        cfg.bos_token_id,
    )?;
    let hooks = metrics::Metric::hooks(&probe, &ctx);
    let mut cases = Vec::new();
    let fwd = forward_flop(cfg, b, s) / 1e9;
    if wanted(&fwd_name) {
        cases.push(time_case(&fwd_name, fwd, 1, || {
            for start in (0..b).step_by(batch) {
                let t = toks.slice(s![start..(start + batch).min(b), ..]).to_owned();
                let mut h = Hooks::caching(crate::hooks::HookFilter::names(hooks.clone()));
                m.model.forward(&t, &mut h)?;
                drop(h.take_cache());
            }
            Ok(())
        })?);
    }
    if wanted(&cspa_name) {
        let (d, v) = (cfg.d_model as f64, cfg.d_vocab as f64);
        let tokens = (b * s) as f64;
        // Two unembeddings per token (ablated, CSPA) and three [S, S] x D matmuls per sequence.
        let metric = 2.0 * tokens * 2.0 * d * v + 3.0 * 2.0 * (b * s * s) as f64 * d;
        cases.push(time_case(&cspa_name, fwd + metric / 1e9, 1, || {
            let mut metric = make();
            metrics::Metric::set_means(&mut metric, &means)?;
            let mut set = crate::engine::MetricSet::new();
            set.add("cspa", Box::new(&mut metric));
            let engine = crate::engine::Engine::new(&m.model, &ctx, &set, batch)?;
            engine.run_dataset(&mut set, &ds, &mut Default::default())?;
            match set.take_first_error() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })?);
    }
    Ok(cases)
}

/// The token files' shapes (sequences x tokens) every device runs.
pub const SHAPES: [(usize, usize); 2] = [(10, 30), (60, 100)];

/// The paper's scale, 500 sequences of 1000 tokens on GPT-2 small: the source_suppression
/// sweep there runs on devices other than the CPU (hours on a 2-core host).
pub const PAPER: (usize, usize) = (500, 1000);

/// Sequences per pass at [`PAPER`] scale: the run caches every layer's pattern on the host,
/// 576 MB per 1000-token sequence for GPT-2 small, so 10 of them take ~6 GB.
pub const PAPER_BATCH: usize = 10;

/// The shapes benched on `device`.
pub fn shapes(device: DeviceKind) -> Vec<(usize, usize)> {
    let mut v = SHAPES.to_vec();
    if device != DeviceKind::Cpu {
        v.push(PAPER);
    }
    v
}

/// The intervention cases' shapes (sequences x tokens): IOI prompts' length and 100-token
/// text. Each has a target token file, a source file of the same shape (`_source`) and
/// answers (`answers_BxS.json`, random `[correct, wrong]` pairs); the same list is in
/// `bench/tl_patching.py`.
pub const PATCH_SHAPES: [(usize, usize); 2] = [(20, 16), (10, 100)];

/// Writes the random checkpoint and the token files into `dir` unless they are there.
pub fn prepare(dir: &Path, shapes: &[(usize, usize)]) -> Result<()> {
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing a random GPT-2-small-shaped checkpoint to {}",
            dir.display()
        );
        write_random_checkpoint(dir, &SMALL, 0)?;
    }
    for &(b, s) in shapes.iter().chain([CSPA].iter()) {
        let path = dir.join(format!("tokens_{b}x{s}.json"));
        if !path.is_file() {
            let t = random_tokens(
                b,
                s,
                SMALL.d_vocab,
                SMALL.bos_token_id,
                (b * 1000 + s) as u64,
            );
            let rows: Vec<Vec<u32>> = t.rows().into_iter().map(|r| r.to_vec()).collect();
            crate::output::write_json(&path, &rows)?;
        }
    }
    for (b, s) in PATCH_SHAPES {
        let seed = (b * 1000 + s) as u64;
        for (file, seed) in [
            (format!("tokens_{b}x{s}.json"), seed),
            (format!("tokens_{b}x{s}_source.json"), seed + 1),
        ] {
            let path = dir.join(file);
            if !path.is_file() {
                let t = random_tokens(b, s, SMALL.d_vocab, SMALL.bos_token_id, seed);
                let rows: Vec<Vec<u32>> = t.rows().into_iter().map(|r| r.to_vec()).collect();
                crate::output::write_json(&path, &rows)?;
            }
        }
        let path = dir.join(format!("answers_{b}x{s}.json"));
        if !path.is_file() {
            let t = random_tokens(b, 3, SMALL.d_vocab, SMALL.bos_token_id, seed + 2);
            let pairs: Vec<[u32; 2]> = t.rows().into_iter().map(|r| [r[1], r[2]]).collect();
            crate::output::write_json(&path, &pairs)?;
        }
    }
    Ok(())
}

/// The name of the pseudo-case that carries gemm 0.19's measured GFLOP/s.
pub const SGEMM: &str = "sgemm peak";

/// A baseline file written by `bench/transformer_lens_baseline.py`: case name -> seconds
/// (TL's forward as `forward AxB`, HF's as `hf forward AxB`, the one-pass PyTorch peer as
/// `peer <sweep>`, the notebook's procedure as `<sweep>`), plus MKL's `sgemm GFLOP/s`.
pub type Baseline = BTreeMap<String, f64>;

/// The results table: every case against the machine's sgemm ceiling (the faster of gemm
/// 0.19 and MKL through torch, on the forward's shapes) and against its strongest PyTorch
/// peer measured on the same machine (the faster of HF's and TL's forward; the one-pass
/// vectorised sweeps), with the notebook's procedure where it was timed.
pub fn table(cases: &[Case], baseline: Option<&Baseline>, device: DeviceKind) -> String {
    let get = |k: &str| baseline.and_then(|b| b.get(k)).copied();
    let ours = cases
        .iter()
        .find(|c| c.name == SGEMM)
        .map(|c| c.gflop / c.seconds);
    let mkl = get("sgemm GFLOP/s");
    let peak = match (ours, mkl) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let fmt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |x| format!("{x:.p$}"));
    let shapes = "[M, 768] x [768, 2304 | 768 | 3072], [M, 3072] x [3072, 768], M = batch x seq";
    // A GPU's rates read better in TFLOP/s.
    let (unit, per) = match device {
        DeviceKind::Cpu => ("GFLOP", 1.0),
        _ => ("TFLOP", 1e3),
    };
    let mut out = match device {
        DeviceKind::Cpu => format!(
            "sgemm on the forward's shapes ({shapes}): gemm 0.19 {} GFLOP/s, MKL (torch) {} \
             GFLOP/s; peak = the faster, {} GFLOP/s\n\n",
            fmt(ours, 1),
            fmt(mkl, 1),
            fmt(peak, 1)
        ),
        _ => format!(
            "device {device}: matmul (dfdx) on the forward's shapes ({shapes}): {} TFLOP/s; \
             peak MiB is host memory\n\n",
            fmt(peak.map(|p| p / per), 2),
        ),
    };
    out += &format!("| case | seconds | {unit} | {unit}/s | % of sgemm peak | peak MiB | strongest PyTorch peer | peer s | time / peer | notebook s |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for c in cases.iter().filter(|c| c.name != SGEMM) {
        let rate = c.gflop / c.seconds;
        let (peer_name, peer) = if let Some(shape) = c.name.strip_prefix("forward ") {
            match (
                get(&format!("forward {shape}")),
                get(&format!("hf forward {shape}")),
            ) {
                (Some(tl), Some(hf)) if hf <= tl => ("HF GPT2LMHeadModel forward", Some(hf)),
                (Some(tl), _) => ("TransformerLens forward", Some(tl)),
                (None, Some(hf)) => ("HF GPT2LMHeadModel forward", Some(hf)),
                (None, None) => ("-", None),
            }
        } else if let Some(tl) = get(&format!("tl {}", c.name)) {
            ("TransformerLens patching.py", Some(tl))
        } else {
            (
                "one-pass vectorised PyTorch",
                get(&format!("peer {}", c.name)),
            )
        };
        let notebook = if c.name.starts_with("forward") {
            None
        } else {
            get(&c.name)
        };
        out += &format!(
            "| {} | {:.3} | {:.1} | {:.prec$} | {} | {} | {} | {} | {} | {} |\n",
            c.name,
            c.seconds,
            c.gflop / per,
            rate / per,
            peak.map_or("-".into(), |p| format!("{:.0}%", 100.0 * rate / p)),
            c.peak_mib.map_or("-".into(), |m| format!("{m:.0}")),
            if peer.is_some() { peer_name } else { "-" },
            fmt(peer, 3),
            peer.map_or("-".into(), |p| format!("{:.2}x", c.seconds / p)),
            fmt(notebook, 1),
            prec = if per > 1.0 { 2 } else { 1 },
        );
    }
    out
}
