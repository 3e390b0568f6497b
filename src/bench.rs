//! `runner bench`: timings of the forward pass and the 12 x 12 sweeps on a GPT-2-small-shaped
//! random checkpoint, with FLOP counts, achieved GFLOP/s and peak memory.
//!
//! Owns: making (once, cached on disk) the random checkpoint and token files that the
//! TransformerLens baseline script (`bench/transformer_lens_baseline.py`) reads too, timing
//! each case, and the ratio table against a baseline JSON. Must not: be called from tests
//! (benchmarks are not timed tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::prelude::Cpu;
use ndarray::{s, Array2};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{unpadded_lengths, Dataset};
use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::metrics::{self, RunContext};
use crate::model::{self, CheckpointFiles, LoadedModel, ModelConfig, Processing};

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

fn time_case<F: FnMut() -> Result<()>>(name: &str, gflop: f64, mut f: F) -> Result<Case> {
    reset_peak_rss();
    let t = Instant::now();
    f()?;
    let seconds = t.elapsed().as_secs_f64();
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
fn sweep(m: &LoadedModel<Cpu>, kind: &str, tokens: &Array2<u32>, batch_size: usize) -> Result<()> {
    let cfg = m.cfg();
    let heads: Vec<(usize, usize)> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
        .collect();
    let ctx = RunContext {
        cfg,
        params: &m.params,
        heads: &heads,
        bos: cfg.bos_token_id,
        tokenizer: None,
    };
    let ds = Dataset {
        name: "bench".into(),
        lengths: unpadded_lengths(tokens, cfg.bos_token_id),
        tokens: tokens.clone(),
        ioi: None,
    };
    let mut metric = metrics::builtin(kind, &toml::Table::new())?;
    crate::engine::run_metric(&m.model, &ctx, metric.as_mut(), &ds, batch_size)?;
    Ok(())
}

/// Where the bench keeps its checkpoint and tokens unless told otherwise.
pub fn default_dir() -> PathBuf {
    PathBuf::from("target").join("bench-gpt2-small")
}

/// Runs every case whose name contains `only` (all when `None`); returns them in order.
pub fn run(dir: &Path, batch_size: usize, only: Option<&str>) -> Result<Vec<Case>> {
    let wanted = |name: &str| only.map_or(true, |o| name.contains(o));
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "writing a random GPT-2-small-shaped checkpoint to {}",
            dir.display()
        );
        write_random_checkpoint(dir, &SMALL, 0)?;
    }
    let shapes = [(10usize, 30usize), (60, 100)];
    for (b, s) in shapes {
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
    let files = CheckpointFiles::in_dir(dir)?;
    let m = model::load(Cpu::default(), files, Processing::ALL, None)?;
    let cfg = m.cfg().clone();
    let load_tokens = |b: usize, s: usize| -> Result<Array2<u32>> {
        let path = dir.join(format!("tokens_{b}x{s}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let rows: Vec<Vec<u32>> =
            serde_json::from_str(&text).map_err(|e| Error::Other(e.to_string()))?;
        Array2::from_shape_vec((b, s), rows.concat()).map_err(|e| Error::Other(e.to_string()))
    };
    eprintln!("{} threads (rayon)", rayon::current_num_threads());
    // Warm-up: first-touch page faults on the weights and thread-pool start-up are not
    // what the cases measure.
    m.model.forward(
        &load_tokens(10, 30)?.slice(s![..2, ..]).to_owned(),
        &mut Hooks::default(),
    )?;
    let mut cases = Vec::new();
    for (b, s) in shapes {
        let toks = load_tokens(b, s)?;
        let name = format!("forward {b}x{s}");
        if wanted(&name) {
            cases.push(time_case(&name, forward_flop(&cfg, b, s) / 1e9, || {
                for start in (0..b).step_by(batch_size) {
                    let t = toks
                        .slice(s![start..(start + batch_size).min(b), ..])
                        .to_owned();
                    m.model.forward(&t, &mut Hooks::default())?;
                }
                Ok(())
            })?);
        }
        for kind in ["source_suppression", "projection_loss"] {
            let name = format!("{kind} sweep {b}x{s}");
            if !wanted(&name) {
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
            cases.push(time_case(&name, flop, || {
                sweep(&m, kind, &toks, batch_size)
            })?);
        }
    }
    Ok(cases)
}

/// A baseline file written by `bench/transformer_lens_baseline.py`: case name -> seconds.
pub type Baseline = BTreeMap<String, f64>;

/// The results table, with speed-ups against a baseline measured on the same machine.
pub fn table(cases: &[Case], baseline: Option<&Baseline>) -> String {
    let mut out = String::from(
        "| case | seconds | GFLOP | GFLOP/s | peak MiB | TransformerLens s | speed-up | HF GPT2 s | speed-up |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in cases {
        let base = baseline.and_then(|b| b.get(&c.name)).copied();
        // The plain forward is also timed in HF transformers (same weights and batches).
        let hf = baseline
            .and_then(|b| b.get(&format!("hf {}", c.name)))
            .copied();
        out += &format!(
            "| {} | {:.3} | {:.1} | {:.1} | {} | {} | {} | {} | {} |\n",
            c.name,
            c.seconds,
            c.gflop,
            c.gflop / c.seconds,
            c.peak_mib.map_or("-".into(), |m| format!("{m:.0}")),
            base.map_or("-".into(), |b| format!("{b:.3}")),
            base.map_or("-".into(), |b| format!("{:.1}x", b / c.seconds)),
            hf.map_or("-".into(), |b| format!("{b:.3}")),
            hf.map_or("-".into(), |b| format!("{:.2}x", b / c.seconds)),
        );
    }
    out
}
