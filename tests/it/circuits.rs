//! The weight-based metrics (`docs/metrics.md` §3-5) against TransformerLens in float64
//! (`tests/golden/make_circuits_golden.py` writes `X_circuits.safetensors`), a planted
//! checkpoint whose heads suppress / copy / attend back by construction, and the runner
//! and `runner cache --effective-embeddings` paths a user takes.

use std::path::Path;

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::circuits::{self, rank_stats};
use hookgraph::metrics::{self, RunContext};
use hookgraph::model::{self, CheckpointFiles, LoadedModel, Processing};
use hookgraph::output::{Table, Value};
use ndarray::{ArrayD, Axis, Ix3};

fn load(ckpt: &str, processing: Processing) -> LoadedModel<Cpu> {
    let files = CheckpointFiles::in_dir(&fixture(ckpt)).unwrap();
    model::load(Cpu::default(), files, processing, None).unwrap()
}

/// Our ranks vs TL's: equal, or off by at most the number of other tokens TL found within
/// rounding of the diagonal (`near`, see the golden script's docstring). Returns how many
/// differ, for the message.
fn check_ranks(
    what: &str,
    ours: &[u32],
    gold: ndarray::ArrayView1<i64>,
    near: ndarray::ArrayView1<i64>,
) -> usize {
    let mut differ = 0;
    for (t, (&o, (&g, &n))) in ours.iter().zip(gold.iter().zip(near.iter())).enumerate() {
        let diff = (o as i64 - g).abs();
        assert!(
            diff <= n,
            "{what} token {t}: rank {o}, TransformerLens (float64) {g}, only {n} near-ties"
        );
        differ += (diff > 0) as usize;
    }
    differ
}

fn check_circuits(ckpt: &str, processing: Processing, prefix: &str) {
    let m = load(ckpt, processing);
    let cfg = m.cfg().clone();
    let file = read_tensor_file(&golden_path(&format!(
        "{ckpt_name}_circuits.safetensors",
        ckpt_name = &ckpt[5..]
    )));
    let g = |k: &str| {
        file.f32
            .get(&format!("{prefix}{k}"))
            .unwrap_or_else(|| panic!("golden lacks {prefix}{k}"))
    };
    let gi = |k: &str| {
        file.i64[&format!("{prefix}{k}")]
            .clone()
            .into_dimensionality::<Ix3>()
            .unwrap()
    };

    // §3: effective embeddings within the f32 parity tolerance.
    let emb = circuits::effective_embeddings(&m.params, &cfg);
    for (name, ours) in emb.into_named() {
        assert_close(
            &format!("{prefix}{name}"),
            &ours.into_dyn(),
            g(name),
            RTOL,
            ATOL,
        );
    }

    // §4-5: every head's per-token ranks, and the statistics of the metric tables.
    let w_ee = circuits::effective_embeddings(&m.params, &cfg).w_ee;
    let (ov_neg, ov_pos, ov_nn, ov_np) = (
        gi("ov.rank_neg"),
        gi("ov.rank_pos"),
        gi("ov.near_neg"),
        gi("ov.near_pos"),
    );
    let (qk_rank, qk_near) = (gi("qk.rank"), gi("qk.near"));
    let mut differ = 0;
    for layer in 0..cfg.n_layers {
        let heads: Vec<usize> = (0..cfg.n_heads).collect();
        let ov =
            circuits::ov_ranks(&m.params, &cfg, w_ee.view(), layer, &heads, 7, &|_| {}).unwrap();
        let qk =
            circuits::qk_ranks(&m.params, &cfg, w_ee.view(), layer, &heads, 64, &|_| {}).unwrap();
        for h in 0..cfg.n_heads {
            let at = |a: &ndarray::Array3<i64>| {
                a.index_axis(Axis(0), layer)
                    .index_axis(Axis(0), h)
                    .to_owned()
            };
            let what = format!("{ckpt} {prefix}{layer}.{h}");
            differ += check_ranks(
                &format!("{what} rank_neg"),
                &ov[h].rank_neg,
                at(&ov_neg).view(),
                at(&ov_nn).view(),
            );
            differ += check_ranks(
                &format!("{what} rank_pos"),
                &ov[h].rank_pos,
                at(&ov_pos).view(),
                at(&ov_np).view(),
            );
            differ += check_ranks(
                &format!("{what} qk rank"),
                &qk[h],
                at(&qk_rank).view(),
                at(&qk_near).view(),
            );
            // The statistics' definitions (top 10, floor(5% V), lower median) agree with the
            // script's on TL's own ranks.
            let gold_neg: Vec<u32> = at(&ov_neg).iter().map(|&r| r as u32).collect();
            let s = rank_stats(&gold_neg);
            let gs = g("ov.stats");
            assert!(
                (s.frac_top10 - gs[[layer, h, 0]] as f64).abs() < 1e-6,
                "{what}"
            );
            assert!(
                (s.frac_top5pct - gs[[layer, h, 1]] as f64).abs() < 1e-6,
                "{what}"
            );
            assert_eq!(s.median as f32, gs[[layer, h, 2]], "{what}");
            let gold_qk: Vec<u32> = at(&qk_rank).iter().map(|&r| r as u32).collect();
            let s = rank_stats(&gold_qk);
            let gs = g("qk.stats");
            assert!(
                (s.frac_top1 - gs[[layer, h, 0]] as f64).abs() < 1e-6,
                "{what}"
            );
            assert!(
                (s.frac_top10 - gs[[layer, h, 1]] as f64).abs() < 1e-6,
                "{what}"
            );
            assert_eq!(s.median as f32, gs[[layer, h, 2]], "{what}");
        }
    }
    eprintln!("{ckpt} {prefix}: {differ} ranks differ from float64 TransformerLens (all within near-ties)");
}

#[test]
fn ckpt_a_circuits_match_transformer_lens() {
    check_circuits("ckpt_a", Processing::ALL, "");
}

#[test]
fn ckpt_b_circuits_match_transformer_lens() {
    check_circuits("ckpt_b", Processing::ALL, "");
}

#[test]
fn ckpt_b_unprocessed_circuits_match_transformer_lens() {
    // LayerNorms with their affine parts: the heads' input normalisation includes them.
    check_circuits("ckpt_b", Processing::NONE, "raw.");
}

fn column(t: &Table, name: &str) -> Vec<f64> {
    let c = t
        .col(name)
        .unwrap_or_else(|| panic!("{}: no column {name}", t.name));
    t.rows.iter().map(|r| r[c].as_f64().unwrap()).collect()
}

/// The metric's table equals the statistics of TL's ranks wherever no rank differs.
#[test]
fn metric_tables_hold_the_golden_statistics() {
    let m = load("ckpt_a", Processing::ALL);
    let heads: Vec<(usize, usize)> = (0..2).flat_map(|l| (0..4).map(move |h| (l, h))).collect();
    let ctx = RunContext {
        cfg: m.cfg(),
        params: &m.params,
        heads: &heads,
        bos: m.cfg().bos_token_id,
        tokenizer: None,
    };
    let gold = read_tensor_file(&golden_path("a_circuits.safetensors"));
    let shared = metrics::WeightInputs::new();
    for (kind, cols, stats) in [
        (
            "ov_circuit",
            &[
                "frac_neg_top10",
                "frac_neg_top5pct",
                "median_rank_neg",
                "frac_pos_top10",
                "frac_pos_top5pct",
                "median_rank_pos",
            ][..],
            "ov.stats",
        ),
        (
            "qk_circuit",
            &["frac_top1", "frac_top10", "median_rank"][..],
            "qk.stats",
        ),
    ] {
        let mut metric = metrics::weight_builtin(kind, &toml::Table::new()).unwrap();
        let done = std::sync::atomic::AtomicU64::new(0);
        let tables = metric
            .compute(&ctx, &shared, &[(1, 2)], &|k| {
                done.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
        assert_eq!(
            done.into_inner(),
            metric.work(&ctx),
            "{kind}: progress adds up"
        );
        assert_eq!(tables[0].name, kind);
        assert!(tables[0].head_score.is_some());
        let g: &ArrayD<f32> = &gold.f32[stats];
        // A near-tie moves a statistic by at most one token's share (1/512) or one rank.
        for (j, c) in cols.iter().enumerate() {
            for ((&(l, h), v), row) in heads.iter().zip(column(&tables[0], c)).zip(0..) {
                let want = g[[l, h, j]] as f64;
                let tol = if c.starts_with("median") {
                    1.0
                } else {
                    1.0 / 512.0 + 1e-7
                };
                assert!(
                    (v - want).abs() <= tol,
                    "{kind} {c} head {l}.{h} (row {row}): {v} vs {want}"
                );
            }
        }
        // Per-token detail for the one head asked: every token once, with its rank.
        let per_token = &tables[1];
        assert_eq!(per_token.name, format!("{kind}_per_token"));
        assert_eq!(per_token.rows.len(), 512);
        let (l, h) = (
            per_token.col("layer").unwrap(),
            per_token.col("head").unwrap(),
        );
        assert!(per_token
            .rows
            .iter()
            .all(|r| r[l] == Value::Int(1) && r[h] == Value::Int(2)));
    }
}

/// A spec of weight metrics only, with no dataset, run as a user runs it.
fn planted_spec(dir: &Path, extra: &str) -> std::path::PathBuf {
    let spec = dir.join("planted.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "planted"
heads = "all"
[model]
path = "{}"
device = "cpu"
[[metric]]
kind = "ov_circuit"
[[metric]]
kind = "qk_circuit"
block_rows = 33
{extra}"#,
            fixture("ckpt_planted").display()
        ),
    )
    .unwrap();
    spec
}

fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let headers = r.headers().unwrap().clone();
    r.records()
        .map(|rec| {
            headers
                .iter()
                .zip(rec.unwrap().iter())
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn planted_suppressor_copier_and_attend_back_heads_come_out_as_built() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let spec = planted_spec(
        dir.path(),
        "[[view]]\nmetric = \"ov_circuit\"\nheads = [\"1.0\"]\n",
    );
    runner()
        .arg(&spec)
        .arg("--output")
        .arg(&out)
        .arg("--quiet")
        .assert()
        .success();
    let ov = read_csv(&out.join("ov_circuit.csv"));
    let qk = read_csv(&out.join("qk_circuit.csv"));
    let get = |rows: &[std::collections::HashMap<String, String>], layer: &str, col: &str| -> f64 {
        let r = rows.iter().find(|r| r["layer"] == layer).unwrap();
        assert_eq!(r["dataset"], "weights");
        r[col].parse().unwrap()
    };
    // Layer 1: OV = minus the unembedding of its input; QK attends back to the predicted token.
    assert_eq!(get(&ov, "1", "frac_neg_top10"), 1.0);
    assert_eq!(get(&ov, "1", "median_rank_neg"), 1.0);
    assert_eq!(get(&ov, "1", "frac_pos_top10"), 0.0);
    assert_eq!(get(&qk, "1", "frac_top1"), 1.0);
    // Layer 2: a copier that attends away from the predicted token.
    assert_eq!(get(&ov, "2", "frac_pos_top10"), 1.0);
    assert_eq!(get(&ov, "2", "frac_neg_top10"), 0.0);
    assert_eq!(get(&qk, "2", "frac_top1"), 0.0);
    assert_eq!(get(&qk, "2", "median_rank"), 400.0);
    // The view's head gets every token's ranks; heatmaps and the index page come along.
    let per_token = read_csv(&out.join("ov_circuit_per_token.csv"));
    assert_eq!(per_token.len(), 400);
    assert!(per_token
        .iter()
        .all(|r| r["head"] == "0" && r["rank_neg"] == "1"));
    assert!(
        !out.join("qk_circuit_per_token.csv").exists(),
        "no view asked for it"
    );
    for f in [
        "ov_circuit.svg",
        "qk_circuit.svg",
        "index.html",
        "manifest.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains("ov_circuit.svg") && index.contains("ov_circuit_per_token.csv"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["weight_metrics"].as_array().unwrap().len(), 2);
}

#[test]
fn datasets_are_needed_only_by_activation_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = planted_spec(dir.path(), "[[metric]]\nkind = \"loss\"\n");
    runner()
        .arg("validate")
        .arg(&spec)
        .assert()
        .failure()
        // Located at the metric that reads activations (planted_spec's third [[metric]]).
        .stderr(predicates::str::contains(
            "planted.toml:12:1: at least one [[dataset]] is needed",
        ));
    // A weight metric's view reads no dataset: naming one is an error, before anything runs.
    let spec = planted_spec(
        dir.path(),
        "[[view]]\nmetric = \"qk_circuit\"\nheads = [\"1.0\"]\ndataset = \"ioi\"\n",
    );
    runner()
        .arg("validate")
        .arg(&spec)
        .assert()
        .failure()
        .stderr(predicates::str::contains("takes no `dataset`"));
    let spec = planted_spec(dir.path(), "");
    runner()
        .arg("validate")
        .arg(&spec)
        .assert()
        .success()
        .stdout(predicates::str::contains(
            "metric qk_circuit (from the weights)",
        ));
}

#[test]
fn bad_circuit_options_are_spec_errors() {
    for (opt, msg) in [
        ("embedding = \"W_X\"", "use one of W_E, W_EE, W_EE0, W_EE0A"),
        ("block_rows = 0", "block_rows"),
        ("only_negative = true", "unknown option 'only_negative'"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = planted_spec(
            dir.path(),
            &format!("[[metric]]\nkind = \"ov_circuit\"\nname = \"ov2\"\n{opt}\n"),
        );
        runner()
            .arg("validate")
            .arg(&spec)
            .assert()
            .failure()
            .stderr(predicates::str::contains(msg));
    }
}

#[test]
fn cache_writes_effective_embeddings_matching_tl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.safetensors");
    runner()
        .args([
            "cache",
            "--effective-embeddings",
            "--model",
            "tests/fixtures/ckpt_a",
            "--out",
        ])
        .arg(&out)
        .assert()
        .success();
    let file = read_tensor_file(&out);
    let gold = read_tensor_file(&golden_path("a_circuits.safetensors"));
    let mut names: Vec<&String> = file.f32.keys().collect();
    names.sort();
    assert_eq!(names, ["W_E", "W_EE", "W_EE0", "W_EE0A"]);
    for (name, ours) in &file.f32 {
        assert_close(name, ours, &gold.f32[name], RTOL, ATOL);
    }
    assert_eq!(file.metadata["fold_ln"], "true");
    // Activation switches do not mix with it.
    runner()
        .args([
            "cache",
            "--effective-embeddings",
            "--model",
            "tests/fixtures/ckpt_a",
        ])
        .args(["--hooks", "logits", "--out"])
        .arg(&out)
        .assert()
        .failure();
}
