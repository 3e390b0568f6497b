//! Built-in metrics against the notebook's own functions run in TransformerLens
//! (`tests/golden/make_golden.py` writes `X_metrics.safetensors`): every head of every layer,
//! `only_negative` false and true, from one forward pass; and independence from batch size.

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::data::{unpadded_lengths, Dataset};
use hookgraph::hooks::{HookFilter, Hooks};
use hookgraph::metrics::projection_loss::layer_losses;
use hookgraph::metrics::source_suppression::{head_values, source_coefficients, unembed_rows};
use hookgraph::metrics::{self, BatchView, RunContext};
use hookgraph::model::{self, CheckpointFiles, HookedGpt2, LoadedModel, Processing};
use hookgraph::output::Table;
use hookgraph::seam::SeamDevice;
use ndarray::{s, Array2, ArrayD, Axis, IxDyn};

fn setup(ckpt: &str, tokens: &str) -> (LoadedModel<Cpu>, Dataset) {
    let files = CheckpointFiles::in_dir(&fixture(ckpt)).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let toks = load_tokens(&golden_path(tokens));
    let lengths = unpadded_lengths(&toks, loaded.cfg().bos_token_id);
    let ds = Dataset {
        name: "t".into(),
        tokens: toks,
        lengths,
        ioi: None,
        answers: None,
    };
    (loaded, ds)
}

fn all_heads(m: &LoadedModel<Cpu>) -> Vec<(usize, usize)> {
    let c = m.cfg();
    (0..c.n_layers)
        .flat_map(|l| (0..c.n_heads).map(move |h| (l, h)))
        .collect()
}

fn ctx<'a>(m: &'a LoadedModel<Cpu>, heads: &'a [(usize, usize)]) -> RunContext<'a> {
    RunContext {
        cfg: m.cfg(),
        params: &m.params,
        heads,
        bos: m.cfg().bos_token_id,
        tokenizer: None,
    }
}

/// Runs one forward pass over `tokens` caching what `metric` declares.
fn cache_for(
    m: &LoadedModel<Cpu>,
    hooks: Vec<String>,
    tokens: &Array2<u32>,
) -> hookgraph::hooks::ActivationCache {
    let mut h = Hooks::caching(HookFilter::names(hooks));
    m.model.forward(tokens, &mut h).unwrap();
    h.take_cache()
}

fn check_values(ckpt: &str, tokens: &str, golden: &str) {
    let (m, ds) = setup(ckpt, tokens);
    let gold = load_golden(golden);
    let heads = all_heads(&m);
    let c = ctx(&m, &heads);
    let ss = metrics::builtin("source_suppression", &toml::Table::new()).unwrap();
    let pl = metrics::builtin("projection_loss", &toml::Table::new()).unwrap();
    let mut names = ss.hooks(&c);
    names.extend(pl.hooks(&c));
    let cache = cache_for(&m, names, &ds.tokens);
    let batch = BatchView {
        dataset: &ds,
        start: 0,
        tokens: ds.tokens.view(),
        cache: &cache,
        model: None,
    };
    let cfg = m.cfg();
    let (b, s) = ds.tokens.dim();
    let u_tok = unembed_rows(m.params.w_u.view(), ds.tokens.view());
    let scale = batch.final_scale().unwrap();

    for neg in [0, 1] {
        let only_negative = neg == 1;
        let key = |k: &str| format!("source_suppression.only_negative={neg}.{k}");
        let mut per_pos = ArrayD::<f32>::zeros(IxDyn(&[cfg.n_layers, cfg.n_heads, b, s]));
        let mut per_seq = ArrayD::<f32>::zeros(IxDyn(&[cfg.n_layers, cfg.n_heads, b]));
        for l in 0..cfg.n_layers {
            let v = batch
                .activation::<ndarray::Ix4>(&format!("blocks.{l}.attn.hook_v"))
                .unwrap();
            let pattern = batch
                .activation::<ndarray::Ix4>(&format!("blocks.{l}.attn.hook_pattern"))
                .unwrap();
            let coef = source_coefficients(v, m.params.blocks[l].attn.w_o.view(), u_tok.view());
            for h in 0..cfg.n_heads {
                let (pp, ps) = head_values(
                    coef.index_axis(Axis(2), h),
                    pattern.index_axis(Axis(1), h),
                    scale,
                    ds.tokens.view(),
                    cfg.bos_token_id,
                    only_negative,
                );
                per_pos.slice_mut(s![l, h, .., ..]).assign(&pp);
                per_seq.slice_mut(s![l, h, ..]).assign(&ps);
            }
        }
        assert_close(
            &key("per_position"),
            &per_pos,
            &gold[&key("per_position")],
            RTOL,
            ATOL,
        );
        assert_close(
            &key("per_sequence"),
            &per_seq,
            &gold[&key("per_sequence")],
            RTOL,
            ATOL,
        );

        let uu = u_tok
            .dot(&m.params.w_u)
            .into_shape_with_order((b, s, cfg.d_vocab))
            .unwrap();
        let heads: Vec<usize> = (0..cfg.n_heads).collect();
        for l in 0..cfg.n_layers {
            let losses = layer_losses(
                &c,
                l,
                &heads,
                &batch,
                u_tok.view(),
                Some(&uu),
                only_negative,
            )
            .unwrap();
            // The d_model-space path (taken for sequences longer than d_model) agrees.
            let direct =
                layer_losses(&c, l, &heads, &batch, u_tok.view(), None, only_negative).unwrap();
            for (a, b) in losses.iter().zip(&direct) {
                let (a, b) = (a.clone().into_dyn(), b.clone().into_dyn());
                assert_close("U_tok @ W_U path vs d_model path", &a, &b, 1e-5, 1e-6);
            }
            for (h, loss) in losses.iter().enumerate() {
                for (k, v) in ["loss_proj", "loss_perp", "loss_ablation"]
                    .iter()
                    .enumerate()
                {
                    let key = format!("projection_loss.only_negative={neg}.{v}");
                    let g = gold[&key].slice(s![l, h, .., ..]).to_owned().into_dyn();
                    let ours = loss.index_axis(Axis(0), k).to_owned().into_dyn();
                    assert_close(&format!("{key}[{l},{h}]"), &ours, &g, RTOL, ATOL);
                }
            }
        }
    }
}

#[test]
fn ckpt_a_metric_values_match_notebook() {
    check_values("ckpt_a", "tokens_a.json", "a_metrics.safetensors");
}

#[test]
fn ckpt_b_metric_values_match_notebook() {
    check_values("ckpt_b", "tokens_b.json", "b_metrics.safetensors");
}

/// Runs a built-in through the Metric trait in batches of `batch_size`.
fn run_metric(
    kind: &str,
    neg: bool,
    m: &LoadedModel<Cpu>,
    ds: &Dataset,
    batch_size: usize,
) -> Vec<Table> {
    run_metric_on(&m.model, kind, neg, m, ds, batch_size)
}

/// [`run_metric`] with the forward pass of `model` (the host kernels or the dfdx path, on
/// any device).
fn run_metric_on<D: SeamDevice>(
    model: &HookedGpt2<D>,
    kind: &str,
    neg: bool,
    m: &LoadedModel<Cpu>,
    ds: &Dataset,
    batch_size: usize,
) -> Vec<Table> {
    let heads = all_heads(m);
    let c = ctx(m, &heads);
    let mut opts = toml::Table::new();
    if kind != "loss" {
        opts.insert("only_negative".into(), toml::Value::Boolean(neg));
    }
    let mut metric = metrics::builtin(kind, &opts).unwrap();
    hookgraph::engine::run_metric(model, &c, metric.as_mut(), ds, batch_size).unwrap()
}

/// The model as dfdx tensor ops on the CPU: the code path CUDA runs, metrics included.
fn generic(m: &LoadedModel<Cpu>) -> HookedGpt2<Cpu> {
    HookedGpt2::new_generic(Cpu::default(), m.cfg().clone(), &m.params).unwrap()
}

fn column(t: &Table, name: &str) -> Vec<f64> {
    let i = t.col(name).unwrap();
    t.rows.iter().map(|r| r[i].as_f64().unwrap()).collect()
}

#[test]
fn table_scores_match_notebook_sweep() {
    for (ckpt, tokens, golden) in [
        ("ckpt_a", "tokens_a.json", "a_metrics.safetensors"),
        ("ckpt_b", "tokens_b.json", "b_metrics.safetensors"),
    ] {
        let (m, ds) = setup(ckpt, tokens);
        let gold = load_golden(golden);
        let dfdx_path = generic(&m);
        for (model, neg) in [
            (&m.model, false),
            (&m.model, true),
            (&dfdx_path, false),
            (&dfdx_path, true),
        ] {
            let n = neg as u8;
            let t = run_metric_on(model, "source_suppression", neg, &m, &ds, 2);
            let ours = ArrayD::from_shape_vec(
                gold[&format!("source_suppression.only_negative={n}.score")].shape(),
                column(&t[0], "score").iter().map(|&x| x as f32).collect(),
            )
            .unwrap();
            assert_close(
                "score",
                &ours,
                &gold[&format!("source_suppression.only_negative={n}.score")],
                RTOL,
                ATOL,
            );

            let t = run_metric_on(model, "projection_loss", neg, &m, &ds, 2);
            let orig_mean = gold["projection_loss.loss_orig"].mean().unwrap();
            for v in ["proj", "perp", "ablation"] {
                let g = &gold[&format!("projection_loss.only_negative={n}.loss_{v}")];
                let shape = g.shape();
                let means: Vec<f32> = g
                    .to_shape((shape[0] * shape[1], shape[2] * shape[3]))
                    .unwrap()
                    .mean_axis(Axis(1))
                    .unwrap()
                    .to_vec();
                let ours = column(&t[0], &format!("loss_{v}"));
                let inc = column(&t[0], &format!("increase_{v}"));
                for (i, (&o, &g)) in ours.iter().zip(&means).enumerate() {
                    assert!(
                        (o as f32 - g).abs() <= ATOL + RTOL * g.abs(),
                        "{ckpt} loss_{v} head {i}: {o} vs {g}"
                    );
                    assert!(
                        ((inc[i] as f32) - (g - orig_mean)).abs() <= 1e-4,
                        "{ckpt} increase_{v} head {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn scores_do_not_depend_on_batch_size() {
    let (m, ds) = setup("ckpt_a", "tokens_a_long.json");
    for kind in ["source_suppression", "projection_loss"] {
        let results: Vec<Vec<Table>> = [1, 3, ds.n_sequences()]
            .iter()
            .map(|&bs| run_metric(kind, false, &m, &ds, bs))
            .collect();
        for t in 0..results[0].len() {
            let cols: Vec<&String> = results[0][t].columns.iter().collect();
            for c in cols
                .iter()
                .filter(|c| !["layer", "head", "seq", "pos", "token"].contains(&c.as_str()))
            {
                let base = column(&results[0][t], c);
                for other in &results[1..] {
                    for (a, b) in base.iter().zip(column(&other[t], c)) {
                        assert!(
                            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                            "{kind} {c}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

/// The built-in metrics' device bodies (run here on dfdx's CPU, the code CUDA runs) give
/// every table of the host bodies, per position and per token included, on a padded batch.
#[test]
fn device_bodies_match_host_bodies_on_every_table() {
    check_device_tables(Cpu::default());
}

/// Every table of every built-in, from the model as dfdx ops on `dev`, against the CPU's
/// host kernels (the `cuda` module runs this on the GPU).
pub fn check_device_tables<D: SeamDevice>(dev: D) {
    let (m, ds) = setup("ckpt_b", "tokens_b.json");
    let dfdx_path = HookedGpt2::new_generic(dev, m.cfg().clone(), &m.params).unwrap();
    for (kind, neg) in [
        ("source_suppression", false),
        ("source_suppression", true),
        ("projection_loss", true),
        ("loss", false),
    ] {
        let host = run_metric_on(&m.model, kind, neg, &m, &ds, 2);
        let dev = run_metric_on(&dfdx_path, kind, neg, &m, &ds, 2);
        assert_eq!(host.len(), dev.len(), "{kind}");
        for (a, b) in host.iter().zip(&dev) {
            assert_eq!(a.columns, b.columns, "{kind} {}", a.name);
            assert_eq!(a.rows.len(), b.rows.len(), "{kind} {}", a.name);
            let mut compared = 0;
            for c in &a.columns {
                let (x, y) = (column_or_nan(a, c), column_or_nan(b, c));
                for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                    if p.is_nan() && q.is_nan() {
                        continue;
                    }
                    assert!(
                        (p - q).abs() <= 1e-5 + 1e-4 * p.abs(),
                        "{kind} {}.{c} row {i}: host {p} vs device {q}",
                        a.name
                    );
                    compared += 1;
                }
            }
            assert!(compared > 0, "{kind} {}: nothing compared", a.name);
        }
    }
}

/// A column as floats, text cells as NaN (compared only where both are numbers).
fn column_or_nan(t: &Table, name: &str) -> Vec<f64> {
    let i = t.col(name).unwrap();
    t.rows
        .iter()
        .map(|r| r[i].as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// On the device path the activations stay where the forward pass left them: running every
/// built-in on a batch copies none of them to the host (only per-head results come back),
/// while a host reader (a plugin, `runner cache`) still gets its copy, counted.
#[test]
fn device_path_brings_no_activation_to_the_host() {
    let (m, ds) = setup("ckpt_a", "tokens_a.json");
    let dfdx_path = generic(&m);
    let heads = all_heads(&m);
    let c = ctx(&m, &heads);
    let mut all: Vec<Box<dyn metrics::Metric>> = ["source_suppression", "projection_loss", "loss"]
        .iter()
        .map(|k| metrics::builtin(k, &toml::Table::new()).unwrap())
        .collect();
    let names: Vec<String> = all.iter().flat_map(|mt| mt.hooks(&c)).collect();
    let mut hooks = Hooks::caching(HookFilter::names(names));
    dfdx_path.run_hooks(&ds.tokens, &mut hooks).unwrap();
    let cache = hooks.take_cache();
    assert!(cache.on_device());
    let batch = BatchView {
        dataset: &ds,
        start: 0,
        tokens: ds.tokens.view(),
        cache: &cache,
        model: None,
    };
    for mt in all.iter_mut() {
        mt.start_dataset(&c, &ds).unwrap();
        mt.batch(&c, &batch).unwrap();
    }
    assert_eq!(cache.downloads(), 0, "an activation was copied to the host");
    // A host reader gets the values (the host kernels' logits), copied once.
    let copied = cache.get("logits").unwrap().clone();
    let mut h = Hooks::caching(HookFilter::names(["logits"]));
    m.model.run_hooks(&ds.tokens, &mut h).unwrap();
    assert_close(
        "logits",
        &copied,
        h.cache.get("logits").unwrap(),
        RTOL,
        ATOL,
    );
    cache.get("logits").unwrap();
    assert_eq!(cache.downloads(), 1, "one copy, made once");
}
