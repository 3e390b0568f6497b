//! Interventions against TransformerLens (`tests/golden/make_intervention_golden.py`: one
//! `run_with_hooks` pass per intervention, the `patching.py` procedure): every kind, every
//! hook, per position and together, on two checkpoints with padded sequences, through the
//! host kernels and through dfdx's tensor ops, at several batch sizes.

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::data::{unpadded_lengths, Dataset};
use hookgraph::engine::run_metric_with_means;
use hookgraph::interventions::{self, sweep::Sweep};
use hookgraph::metrics::RunContext;
use hookgraph::model::{self, CheckpointFiles, HookedGpt2, LoadedModel, Processing};
use hookgraph::output::Table;
use hookgraph::seam::SeamDevice;
use hookgraph::spec::LoadedSpec;
use ndarray::Array2;
use serde_json::Value as J;

fn datasets(g: &J, bos: u32) -> Vec<Dataset> {
    let mut out = Vec::new();
    for (name, toks) in g["tokens"].as_object().unwrap() {
        let rows: Vec<Vec<u32>> = serde_json::from_value(toks.clone()).unwrap();
        let (n, s) = (rows.len(), rows[0].len());
        let tokens = Array2::from_shape_vec((n, s), rows.into_iter().flatten().collect()).unwrap();
        let answers: Vec<[u32; 2]> = serde_json::from_value(g["answers"][name].clone()).unwrap();
        out.push(Dataset {
            name: name.clone(),
            lengths: unpadded_lengths(&tokens, bos),
            tokens,
            ioi: None,
            answers: Some(answers),
        });
    }
    out
}

/// The spec text of one golden case (its keys as `[[intervention]]` keys).
pub fn case_toml(spec: &J, datasets: &[Dataset]) -> String {
    let mut t = String::from("name = \"t\"\n[model]\npath = \"m\"\n");
    for d in datasets {
        t += &format!(
            "[[dataset]]\nname = \"{}\"\nkind = \"tokens\"\npath = \"x.json\"\n",
            d.name
        );
    }
    t += "[[intervention]]\n";
    for (k, v) in spec.as_object().unwrap() {
        t += &format!("{k} = {v}\n");
    }
    if spec.get("dataset").is_none() {
        t += "dataset = \"clean\"\n";
    }
    t
}

fn run_case<D: SeamDevice>(
    model: &HookedGpt2<D>,
    loaded: &LoadedModel<Cpu>,
    spec: &J,
    ds: &[Dataset],
    batch_size: usize,
) -> Table {
    let text = case_toml(spec, ds);
    let loaded_spec = LoadedSpec::from_str(&text, std::path::Path::new("t.toml")).unwrap();
    let heads: Vec<(usize, usize)> = {
        let c = loaded.cfg();
        (0..c.n_layers)
            .flat_map(|l| (0..c.n_heads).map(move |h| (l, h)))
            .collect()
    };
    let ctx = RunContext::of(loaded, &heads);
    let plans = interventions::plan(&loaded_spec, loaded.cfg(), &heads, ds).unwrap();
    let plan = plans.into_iter().next().unwrap();
    let target = ds.iter().find(|d| d.name == plan.datasets[0]).unwrap();
    let mut sweep = Sweep::new(plan, ds, batch_size, target.seq_len(), loaded.cfg());
    let mut tables = run_metric_with_means(model, &ctx, &mut sweep, target, ds, batch_size)
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    tables.remove(0)
}

fn check_table(what: &str, t: &Table, rows: &[J]) {
    assert_eq!(t.rows.len(), rows.len(), "{what}: rows");
    for (r, g) in t.rows.iter().zip(rows) {
        for (k, v) in g.as_object().unwrap() {
            let c = t
                .col(k)
                .unwrap_or_else(|| panic!("{what}: no column {k} in {:?}", t.columns));
            match v {
                J::String(s) => assert_eq!(&r[c].to_string(), s, "{what}: {k}"),
                _ => {
                    let want = v.as_f64().unwrap();
                    let got = r[c].as_f64().unwrap();
                    // `increase` and `recovered` are differences: compare them through their parts
                    // (checked here) rather than relative to a small difference.
                    let tol = ATOL as f64 + RTOL as f64 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{what}: row {g}: {k} = {got}, TL {want}"
                    );
                }
            }
        }
    }
}

fn check_ckpt(ckpt: &str) {
    let files = CheckpointFiles::in_dir(&fixture(&format!("ckpt_{ckpt}"))).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let generic =
        HookedGpt2::new_generic(Cpu::default(), loaded.cfg().clone(), &loaded.params).unwrap();
    let text = std::fs::read_to_string(golden_path(&format!("interventions_{ckpt}.json"))).unwrap();
    let g: J = serde_json::from_str(&text).unwrap();
    let ds = datasets(&g, loaded.cfg().bos_token_id);
    for case in g["cases"].as_array().unwrap() {
        let rows = case["rows"].as_array().unwrap();
        let spec = &case["spec"];
        for bs in [1, 3] {
            let t = run_case(&loaded.model, &loaded, spec, &ds, bs);
            check_table(&format!("{ckpt} host bs={bs} {spec}"), &t, rows);
        }
        let t = run_case(&generic, &loaded, spec, &ds, 2);
        check_table(&format!("{ckpt} dfdx {spec}"), &t, rows);
    }
}

#[test]
fn interventions_match_transformer_lens_on_a() {
    check_ckpt("a");
}

#[test]
fn interventions_match_transformer_lens_on_b() {
    check_ckpt("b");
}
