//! `cspa`, `direct_mean_ablation`, `direct_logit_attribution` and `logit_lens` against the
//! Copy Suppression paper's own functions and TransformerLens
//! (`tests/golden/make_cspa_golden.py` writes `cspa_{a,t}.safetensors`): ckpt_a (vocab 512,
//! the documented function-word mapping) and the tiny GPT-2 with GPT-2's vocabulary; every
//! head the paper's code reaches (layers >= 1), the three CSPA modes; the host kernels and
//! the dfdx path; batch sizes 1 and 4; shards merged from saved state.

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::data::{unpadded_lengths, Dataset};
use hookgraph::means::Means;
use hookgraph::metrics::cspa::{CspaConfig, DirectPath, Mode};
use hookgraph::metrics::direct::PAPER_FUNCTION_WORDS;
use hookgraph::metrics::{self, Metric, RunContext};
use hookgraph::model::{self, CheckpointFiles, HookedGpt2, LoadedModel, Processing};
use hookgraph::output::Table;
use hookgraph::seam::SeamDevice;
use ndarray::{ArrayD, Axis, IxDyn};

struct Case {
    m: LoadedModel<Cpu>,
    ds: Dataset,
    /// The 100 sequences of the mean pass (the paper's `result_mean`).
    mean_ds: Dataset,
    gold: std::collections::HashMap<String, ArrayD<f32>>,
    /// The generated checkpoint (kept alive while the case is).
    _generated: Option<GeneratedCheckpoint>,
}

fn case(name: &str) -> Case {
    let generated = (name == "small").then(small_checkpoint);
    let dir = match name {
        "a" => fixture("ckpt_a"),
        "small" => generated.as_ref().unwrap().dir.clone(),
        _ => root().join("experiments/checkpoints/tiny-gpt2"),
    };
    if let Some(g) = &generated {
        let meta = read_tensor_file(&golden_path(&format!("cspa_{name}.safetensors"))).metadata;
        assert_eq!(
            meta.get("sha256"),
            Some(&g.sha256),
            "the generated checkpoint '{name}' is not the one cspa_{name}.safetensors was made \
             from: the generator in tests/it/common.rs changed; rerun make_cspa_golden.py on its \
             output (HOOKGRAPH_GOLDEN_CKPT_DIR)"
        );
    }
    let files = CheckpointFiles::in_dir(&dir).unwrap();
    let m = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let bos = m.cfg().bos_token_id;
    let toks = load_tokens(&golden_path(&format!("cspa_tokens_{name}.json")));
    let answers: Vec<[u32; 2]> = serde_json::from_str(
        &std::fs::read_to_string(golden_path(&format!("cspa_answers_{name}.json"))).unwrap(),
    )
    .unwrap();
    let ds = Dataset {
        name: "eval".into(),
        lengths: unpadded_lengths(&toks, bos),
        tokens: toks,
        ioi: None,
        answers: Some(answers),
    };
    let mean_toks = load_tokens(&golden_path(&format!("cspa_mean_tokens_{name}.json")));
    let mean_ds = Dataset {
        name: "mean".into(),
        lengths: unpadded_lengths(&mean_toks, bos),
        tokens: mean_toks,
        ioi: None,
        answers: None,
    };
    let gold = load_golden(&format!("cspa_{name}.safetensors"));
    Case {
        m,
        ds,
        mean_ds,
        gold,
        _generated: generated,
    }
}

/// The engine's mean passes for `metric` over the mean dataset (what a run hands it).
fn means_for(c: &Case, x: &RunContext, metric: &dyn Metric) -> Means {
    let reqs = metric.mean_requests(x);
    hookgraph::means::compute(
        &c.m.model,
        std::slice::from_ref(&c.mean_ds),
        &reqs,
        7,
        x.bos,
    )
    .unwrap()
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

fn generic(m: &LoadedModel<Cpu>) -> HookedGpt2<Cpu> {
    HookedGpt2::new_generic(Cpu::default(), m.cfg().clone(), &m.params).unwrap()
}

fn cspa(heads: Vec<(usize, usize)>, mode: Mode) -> DirectPath {
    DirectPath::cspa(CspaConfig {
        heads,
        mean_over: "mean".into(),
        mean_sequences: 100,
        k_fraction: 0.05,
        only_negative: mode != Mode::QkOnly,
        mode,
        function_words: PAPER_FUNCTION_WORDS.to_vec(),
    })
}

fn run<D: SeamDevice>(
    model: &HookedGpt2<D>,
    c: &Case,
    heads: &[(usize, usize)],
    metric: &mut dyn Metric,
    batch_size: usize,
) -> Vec<Table> {
    let x = ctx(&c.m, heads);
    let datasets = [c.ds.clone(), c.mean_ds.clone()];
    hookgraph::engine::run_metric_with_means(model, &x, metric, &c.ds, &datasets, batch_size)
        .unwrap()
}

/// Column `col` of `t`'s rows for head (l, h), as `[B, width]` (NaN where no row).
fn per_token(t: &Table, l: usize, h: usize, col: &str, b: usize, width: usize) -> ArrayD<f32> {
    let (li, hi, si, pi, ci) = (
        t.col("layer").unwrap(),
        t.col("head"),
        t.col("seq").unwrap(),
        t.col("pos").unwrap(),
        t.col(col).unwrap(),
    );
    let mut out = ArrayD::from_elem(IxDyn(&[b, width]), f32::NAN);
    for r in &t.rows {
        let ok = r[li].as_f64().unwrap() as usize == l
            && hi.map_or(true, |hi| r[hi].as_f64().unwrap() as usize == h);
        let (s, p) = (
            r[si].as_f64().unwrap() as usize,
            r[pi].as_f64().unwrap() as usize,
        );
        if ok && p < width {
            out[[s, p]] = r[ci].as_f64().unwrap() as f32;
        }
    }
    out
}

fn summary(t: &Table, l: usize, h: usize, col: &str) -> f64 {
    let (li, hi, ci) = (
        t.col("layer").unwrap(),
        t.col("head").unwrap(),
        t.col(col).unwrap(),
    );
    t.rows
        .iter()
        .find(|r| r[li].as_f64() == Some(l as f64) && r[hi].as_f64() == Some(h as f64))
        .map(|r| r[ci].as_f64().unwrap())
        .unwrap()
}

fn check_cspa(name: &str) {
    let c = case(name);
    let heads: Vec<(usize, usize)> = all_heads(&c.m)
        .into_iter()
        .filter(|&(l, _)| l >= 1)
        .collect();
    let dfdx_path = generic(&c.m);
    check_cspa_heads(name, &c, &heads, &[(&c.m.model, 4), (&dfdx_path, 1)]);
}

/// The GPT-2-small-shaped checkpoint (generated, sha256 checked): heads 5.3, 10.7 and 11.11,
/// the three modes, the host kernels at batch sizes 1 and 3.
#[test]
fn cspa_matches_the_papers_functions_small() {
    let c = case("small");
    let heads = [(5, 3), (10, 7), (11, 11)];
    check_cspa_heads("small", &c, &heads, &[(&c.m.model, 3), (&c.m.model, 1)]);
}

fn check_cspa_heads(
    name: &str,
    c: &Case,
    heads: &[(usize, usize)],
    paths: &[(&HookedGpt2<Cpu>, usize)],
) {
    let (b, s) = c.ds.tokens.dim();
    let heads = heads.to_vec();
    for (mode, key) in [
        (Mode::Both, "both"),
        (Mode::OvOnly, "ov_only"),
        (Mode::QkOnly, "qk_only"),
    ] {
        for &(model, bs) in paths {
            let mut metric = cspa(heads.clone(), mode);
            let t = run(model, c, &heads, &mut metric, bs);
            for &(l, h) in &heads {
                let g = |k: &str| c.gold[&format!("{l}.{h}.{k}")].clone();
                let what = |x: &str| format!("{name} {l}.{h} {key} {x} (batch {bs})");
                assert_close(
                    &what("kl_cspa"),
                    &per_token(&t[1], l, h, "value", b, s),
                    &g(&format!("{key}.kl_cspa")),
                    RTOL,
                    ATOL,
                );
                assert_close(
                    &what("loss_cspa"),
                    &per_token(&t[1], l, h, "loss_cspa", b, s - 1),
                    &g(&format!("{key}.loss_cspa")),
                    RTOL,
                    ATOL,
                );
                assert_close(
                    &what("kl_ablated"),
                    &per_token(&t[1], l, h, "kl_ablated", b, s),
                    &g("kl_ablated"),
                    RTOL,
                    ATOL,
                );
                assert_close(
                    &what("loss_ablated"),
                    &per_token(&t[1], l, h, "loss_ablated", b, s - 1),
                    &g("loss_ablated"),
                    RTOL,
                    ATOL,
                );
                let ee = summary(&t[0], l, h, "effect_explained");
                let want = g(&format!("{key}.effect_explained"))[[0]] as f64;
                assert!(
                    (ee - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{}: {ee} vs the paper's {want}",
                    what("effect_explained")
                );
            }
        }
    }
}

#[test]
fn cspa_matches_the_papers_functions_ckpt_a() {
    check_cspa("a");
}

#[test]
fn direct_mean_ablation_matches_every_head() {
    for name in ["a", "t"] {
        let c = case(name);
        let (b, s) = c.ds.tokens.dim();
        let heads = all_heads(&c.m);
        let mut metric = DirectPath::mean_ablation("mean".into(), 100);
        let t = run(&c.m.model, &c, &heads, &mut metric, 3);
        let loss = c.gold["loss"].clone();
        for &(l, h) in &heads {
            let g = |k: &str| c.gold[&format!("{l}.{h}.{k}")].clone();
            assert_close(
                &format!("{name} {l}.{h} kl"),
                &per_token(&t[1], l, h, "value", b, s),
                &g("kl_ablated"),
                RTOL,
                ATOL,
            );
            assert_close(
                &format!("{name} {l}.{h} loss"),
                &per_token(&t[1], l, h, "loss", b, s - 1),
                &g("loss_ablated"),
                RTOL,
                ATOL,
            );
            let want = loss.iter().map(|&x| x as f64).sum::<f64>() / loss.len() as f64;
            let got = summary(&t[0], l, h, "loss_orig");
            assert!(
                (got - want).abs() < 1e-4 * want.abs(),
                "loss_orig {got} vs {want}"
            );
        }
    }
}

#[test]
fn direct_logit_attribution_matches_tl() {
    for name in ["a", "t"] {
        let c = case(name);
        let (b, s) = c.ds.tokens.dim();
        let heads = all_heads(&c.m);
        let dfdx_path = generic(&c.m);
        for (model, bs) in [(&c.m.model, 2), (&dfdx_path, 5)] {
            let mut metric =
                metrics::builtin("direct_logit_attribution", &toml::Table::new()).unwrap();
            let t = run(model, &c, &heads, metric.as_mut(), bs);
            for (i, &(l, h)) in heads.iter().enumerate() {
                let want = c.gold["dla"].index_axis(Axis(0), i).to_owned();
                assert_close(
                    &format!("{name} dla {l}.{h}"),
                    &per_token(&t[2], l, h, "value", b, s - 1),
                    &want,
                    RTOL,
                    ATOL,
                );
                let want = c.gold["dla_logit_diff"].index_axis(Axis(0), i).to_owned();
                let got: Vec<f32> = (0..b)
                    .map(|seq| {
                        let row = t[1].rows.iter().find(|r| {
                            r[0].as_f64() == Some(l as f64)
                                && r[1].as_f64() == Some(h as f64)
                                && r[2].as_f64() == Some(seq as f64)
                        });
                        row.unwrap()[4].as_f64().unwrap() as f32
                    })
                    .collect();
                assert_close(
                    &format!("{name} logit_diff {l}.{h}"),
                    &ArrayD::from_shape_vec(IxDyn(&[b]), got).unwrap(),
                    &want,
                    RTOL,
                    ATOL,
                );
            }
        }
    }
}

#[test]
fn logit_lens_matches_tl() {
    for name in ["a", "t"] {
        let c = case(name);
        let (b, s) = c.ds.tokens.dim();
        let heads = all_heads(&c.m);
        let mut metric = metrics::builtin("logit_lens", &toml::Table::new()).unwrap();
        let t = run(&c.m.model, &c, &heads, metric.as_mut(), 4);
        for k in 0..=c.m.cfg().n_layers {
            let got = per_token(&t[1], k, 0, "loss", b, s - 1);
            assert_close(
                &format!("{name} lens loss {k}"),
                &got,
                &c.gold["lens_loss"].index_axis(Axis(0), k).to_owned(),
                RTOL,
                ATOL,
            );
            let got = per_token(&t[1], k, 0, "rank", b, s - 1);
            assert_close(
                &format!("{name} lens rank {k}"),
                &got,
                &c.gold["lens_rank"].index_axis(Axis(0), k).to_owned(),
                0.0,
                0.0,
            );
        }
    }
}

/// Two shards' saved states merged in order give the unsharded tables bit for bit.
#[test]
fn direct_path_metrics_merge_shard_states() {
    let c = case("a");
    let heads = all_heads(&c.m);
    let x = ctx(&c.m, &heads);
    let kinds: Vec<Box<dyn Fn() -> Box<dyn Metric>>> = vec![
        Box::new(|| Box::new(cspa(vec![(1, 2)], Mode::Both))),
        Box::new(|| Box::new(DirectPath::mean_ablation("mean".into(), 100))),
        Box::new(|| metrics::builtin("direct_logit_attribution", &toml::Table::new()).unwrap()),
        Box::new(|| metrics::builtin("logit_lens", &toml::Table::new()).unwrap()),
    ];
    let n = c.ds.n_sequences();
    let part = |r: std::ops::Range<usize>| Dataset {
        name: c.ds.name.clone(),
        tokens: c.ds.tokens.slice(ndarray::s![r.clone(), ..]).to_owned(),
        lengths: c.ds.lengths[r.clone()].to_vec(),
        ioi: None,
        answers: c.ds.answers.as_ref().map(|a| a[r].to_vec()),
    };
    for make in kinds {
        let mut whole = make();
        let want = run(&c.m.model, &c, &heads, whole.as_mut(), 2);
        let mut states = Vec::new();
        for r in [0..2, 2..n] {
            let mut m = make();
            m.set_means(&means_for(&c, &x, m.as_ref())).unwrap();
            let d = part(r);
            let both = [d.clone(), c.mean_ds.clone()];
            hookgraph::engine::run_metric_with_means(&c.m.model, &x, m.as_mut(), &d, &both, 2)
                .unwrap();
            states.push(m.save_state().unwrap());
        }
        let mut merged = make();
        merged
            .set_means(&means_for(&c, &x, merged.as_ref()))
            .unwrap();
        merged.start_dataset(&x, &c.ds).unwrap();
        for st in &states {
            merged.merge_state(&x, &c.ds, st).unwrap();
        }
        let got = merged.finish_dataset(&x, &c.ds).unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.rows.len(), w.rows.len(), "{}", w.name);
            for (a, b) in g.rows.iter().zip(&w.rows) {
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}", w.name);
            }
        }
    }
}
