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
    check_dir(ckpt, &fixture(&format!("ckpt_{ckpt}")), None, true);
}

/// Compares every golden case of `interventions_{golden}.json` on the checkpoint in `dir`:
/// the host kernels at batch sizes 1 and 3 and, with `dfdx`, dfdx's ops at batch size 2.
/// With `sha256`, the golden must record that hash of the checkpoint first.
fn check_dir(golden: &str, dir: &std::path::Path, sha256: Option<&str>, dfdx: bool) {
    let text = std::fs::read_to_string(golden_path(&format!("interventions_{golden}.json")))
        .unwrap_or_else(|e| {
            panic!("interventions_{golden}.json: {e} (make it with tests/golden/make_intervention_golden.py)")
        });
    let g: J = serde_json::from_str(&text).unwrap();
    if let Some(sha) = sha256 {
        assert_eq!(
            g["sha256"].as_str(),
            Some(sha),
            "the generated checkpoint '{golden}' is not the one the golden was made from: \
             the generator in tests/it/common.rs changed; rerun the golden script on its output \
             (HOOKGRAPH_GOLDEN_CKPT_DIR, see tests/golden/make_intervention_golden.py)"
        );
    }
    let files = CheckpointFiles::in_dir(dir).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let ds = datasets(&g, loaded.cfg().bos_token_id);
    let generic = dfdx.then(|| {
        HookedGpt2::new_generic(Cpu::default(), loaded.cfg().clone(), &loaded.params).unwrap()
    });
    for case in g["cases"].as_array().unwrap() {
        let rows = case["rows"].as_array().unwrap();
        let spec = &case["spec"];
        for bs in [1, 3] {
            let t = run_case(&loaded.model, &loaded, spec, &ds, bs);
            check_table(&format!("{golden} host bs={bs} {spec}"), &t, rows);
        }
        if let Some(generic) = &generic {
            let t = run_case(generic, &loaded, spec, &ds, 2);
            check_table(&format!("{golden} dfdx {spec}"), &t, rows);
        }
        // `measure = ["logit_diff"]` alone takes another path (the last MLP and ln_final on
        // each sequence's last row only): the same logit differences as TL's.
        let mut only = spec.clone();
        only["measure"] = serde_json::json!(["logit_diff"]);
        let keep = [
            "layer",
            "head",
            "pos",
            "logit_diff_orig",
            "logit_diff",
            "logit_diff_source",
            "recovered",
        ];
        let ld_rows: Vec<J> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut()
                    .unwrap()
                    .retain(|k, _| keep.contains(&k.as_str()));
                r
            })
            .collect();
        let t = run_case(&loaded.model, &loaded, &only, &ds, 3);
        assert!(t.col("loss").is_none(), "{only}: no loss column");
        check_table(
            &format!("{golden} host logit_diff only {only}"),
            &t,
            &ld_rows,
        );
        if let Some(generic) = &generic {
            let t = run_case(generic, &loaded, &only, &ds, 2);
            check_table(
                &format!("{golden} dfdx logit_diff only {only}"),
                &t,
                &ld_rows,
            );
        }
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

/// Tiny layers with GPT-2's real 50257-token vocabulary (generated, checked by sha256).
#[test]
fn interventions_match_transformer_lens_on_vocab50k() {
    let ck = vocab50k_checkpoint();
    check_dir("vocab50k", &ck.dir, Some(&ck.sha256), true);
}

/// The GPT-2-small shape (generated, ~500 MB, checked by sha256): four heads across the
/// layers, every layer hook, padded sequences; host kernels only (dfdx's path is covered
/// on the other checkpoints and would triple the time).
#[test]
fn interventions_match_transformer_lens_on_small_shape() {
    let ck = small_checkpoint();
    check_dir("small", &ck.dir, Some(&ck.sha256), false);
}

/// A write at `hook_result` reaches the model on both paths (it used to be dropped): zeroing
/// head h's result equals zeroing its z (attn_out = sum of results + b_O, TL's
/// use_attn_result), and differs from the unchanged run.
#[test]
fn result_writes_reach_attn_out_on_both_paths() {
    use hookgraph::hooks::{HookFilter, Hooks};
    use ndarray::{ArrayD, Axis};
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let m = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let generic = HookedGpt2::new_generic(Cpu::default(), m.cfg().clone(), &m.params).unwrap();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let zero_head = |point: &str| {
        let mut h = Hooks::caching(HookFilter::none());
        h.add_writer(
            point.to_string(),
            Box::new(|a: &mut ArrayD<f32>| a.index_axis_mut(Axis(2), 1).fill(0.0)),
        );
        h
    };
    for (what, model) in [("host", &m.model), ("dfdx", &generic)] {
        let by_result = model
            .logits_host(&toks, &mut zero_head("blocks.0.attn.hook_result"))
            .unwrap();
        let by_z = model
            .logits_host(&toks, &mut zero_head("blocks.0.attn.hook_z"))
            .unwrap();
        let plain = model.logits_host(&toks, &mut Hooks::default()).unwrap();
        assert_close(
            what,
            &by_result.clone().into_dyn(),
            &by_z.into_dyn(),
            RTOL,
            ATOL,
        );
        let moved = (&by_result - &plain)
            .mapv(f32::abs)
            .fold(0f32, |a, &b| a.max(b));
        assert!(
            moved > 1e-2,
            "{what}: the result write did not reach the logits ({moved})"
        );
    }
}

fn plan_error(extra: &str, ds: &[Dataset], cfg: &hookgraph::model::ModelConfig) -> String {
    let text = format!(
        "name = \"t\"\n[model]\npath = \"m\"\n[[dataset]]\nname = \"clean\"\nkind = \"tokens\"\npath = \"x.json\"\n[[intervention]]\n{extra}"
    );
    let spec = match LoadedSpec::from_str(&text, std::path::Path::new("t.toml")) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let heads = vec![(0, 0)];
    match interventions::plan(&spec, cfg, &heads, ds) {
        Ok(_) => panic!("planned without error:\n{extra}"),
        Err(e) => e.to_string(),
    }
}

/// Bad input is found at plan time, before any forward pass, with the key's line and column.
#[test]
fn bad_interventions_point_at_the_key() {
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let m = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let g: J = serde_json::from_str(
        &std::fs::read_to_string(golden_path("interventions_a.json")).unwrap(),
    )
    .unwrap();
    let ds = datasets(&g, m.cfg().bos_token_id);
    let mut no_answers = ds.clone();
    no_answers.iter_mut().for_each(|d| d.answers = None);
    let cfg = m.cfg();
    // (the [[intervention]] lines, the data, the expected location and words)
    let cases: Vec<(&str, &[Dataset], &str, &str)> = vec![
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"q\"\n", &ds, "t.toml:11:8", "not one of"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nheads = [\"2.0\"]\n", &ds, "t.toml:12:9", "heads"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nheads = [\"0.4\"]\n", &ds, "t.toml:12:9", "heads"),
        ("kind = \"patch\"\nhook = \"z\"\nsource = \"other\"\ndataset = \"clean\"\n", &ds, "t.toml:11:10", "shapes must match"),
        ("kind = \"ablate\"\nvalue = \"mean\"\nhook = \"z\"\nmean_over = \"nope\"\n", &ds, "t.toml:12:13", "no dataset is named 'nope'"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nmeasure = [\"logit_diff\"]\n", &no_answers, "t.toml:12:11", "needs answers"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"resid_pre\"\ndataset = \"clean\"\nper_position = true\n", &ds, "t.toml:13:16", "one length"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nsauce = 1\n", &ds, "t.toml:12:1", "sauce"),
        ("kind = \"ablate\"\nvalue = \"half\"\nhook = \"z\"\n", &ds, "t.toml:10:9", "not one of"),
        ("kind = \"patch\"\nhook = \"z\"\n", &ds, "t.toml:9:8", "needs `source`"),
        ("kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\nheads = [\"0.0\", \"1.1\"]\ntogether = true\n", &ds, "t.toml:13:12", "one layer"),
    ];
    for (extra, data, at, words) in cases {
        let e = plan_error(extra, data, cfg);
        assert!(
            e.contains(at) && e.contains(words),
            "{extra}\n-> {e}\n(want {at} ... {words})"
        );
    }
    // Answers of another length or outside the vocabulary.
    let mut short = ds.clone();
    short.iter_mut().for_each(|d| {
        d.answers.as_mut().unwrap().pop();
    });
    let e = plan_error(
        "kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\n",
        &short,
        cfg,
    );
    assert!(e.contains("t.toml:9:8") && e.contains("answers for"), "{e}");
    let mut big = ds.clone();
    big.iter_mut()
        .for_each(|d| d.answers.as_mut().unwrap()[0][0] = 100_000);
    let e = plan_error(
        "kind = \"ablate\"\nvalue = \"zero\"\nhook = \"z\"\n",
        &big,
        cfg,
    );
    assert!(
        e.contains("t.toml:9:8") && e.contains("outside the vocabulary"),
        "{e}"
    );
}

/// The one intervention of a golden case's spec, planned.
fn plan_of(
    spec: &J,
    ds: &[Dataset],
    cfg: &hookgraph::model::ModelConfig,
    heads: &[(usize, usize)],
) -> interventions::Plan {
    let text = case_toml(spec, ds);
    let loaded_spec = LoadedSpec::from_str(&text, std::path::Path::new("t.toml")).unwrap();
    interventions::plan(&loaded_spec, cfg, heads, ds)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .remove(0)
}

/// `ckpt_a` processed, the datasets of its intervention golden, and every head.
fn ckpt_a_with_its_golden_datasets() -> (LoadedModel<Cpu>, Vec<Dataset>, Vec<(usize, usize)>) {
    let text = std::fs::read_to_string(golden_path("interventions_a.json")).unwrap();
    let g: J = serde_json::from_str(&text).unwrap();
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    let loaded = model::load(Cpu::default(), files, Processing::ALL, None).unwrap();
    let ds = datasets(&g, loaded.cfg().bos_token_id);
    let cfg = loaded.cfg();
    let heads = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
        .collect();
    (loaded, ds, heads)
}

/// The progress bar counts passes: per batch the unchanged one, the patch's source run and
/// one per intervention (here per (layer, position), stacked into few resumed passes), and
/// ends exactly at its length. A miscount (a stacked pass counted once, or the `ln_final`
/// resumes counted) would leave it off.
#[test]
fn the_progress_bar_counts_passes() {
    use hookgraph::engine::{Engine, LoopOptions, MetricSet};
    let (loaded, ds, heads) = ckpt_a_with_its_golden_datasets();
    let cfg = loaded.cfg().clone();
    let ctx = RunContext::of(&loaded, &heads);
    for (spec, batch_size) in [
        (
            serde_json::json!({"kind": "patch", "hook": "resid_pre", "per_position": true, "source": "eq_corrupt", "dataset": "eq"}),
            2,
        ),
        (
            serde_json::json!({"kind": "ablate", "value": "zero", "hook": "z"}),
            3,
        ),
    ] {
        let plan = plan_of(&spec, &ds, &cfg, &heads);
        let target = ds.iter().find(|d| d.name == plan.datasets[0]).unwrap();
        let units = plan.units(cfg.n_layers, target.seq_len()).len();
        let source = usize::from(plan.source.is_some());
        // Stacks of about three batches: a resumed pass carries several interventions.
        let sweep = Sweep::new(plan, &ds, 3 * batch_size, target.seq_len(), &cfg);
        let mut set = MetricSet::new();
        set.add("t", Box::new(sweep));
        let engine = Engine::new(&loaded.model, &ctx, &set, batch_size).unwrap();
        engine.run_mean_passes(&mut set, &ds).unwrap();
        let pb = indicatif::ProgressBar::hidden();
        set.start_dataset(&ctx, target);
        let per_batch = set.passes_per_batch(&ctx, target);
        assert_eq!(per_batch, 1 + source + units, "{spec}");
        let batches = target.n_sequences().div_ceil(batch_size);
        let mut timings = Default::default();
        engine
            .run_batches(
                &mut set,
                target,
                0..target.n_sequences(),
                &mut timings,
                &mut LoopOptions {
                    progress: Some(&pb),
                    after_batch: None,
                },
            )
            .unwrap();
        assert!(set.failures().is_empty(), "{:?}", set.failures());
        assert_eq!(pb.position() as usize, batches * per_batch, "{spec}");
    }
}

/// On a device (dfdx's tensors; CUDA's in production) an intervention's write is its device
/// body: the stack of written residual streams is built where the activations are and the
/// resumed passes start from it, so no cached activation is copied to the host (the TL
/// goldens above check the numbers of the same path). Each kind, and a patch, whose source
/// run is a second device cache.
#[test]
fn device_writes_copy_no_activation_to_the_host() {
    use hookgraph::hooks::{HookFilter, Hooks};
    use hookgraph::metrics::{BatchView, Metric};
    let (loaded, ds, heads) = ckpt_a_with_its_golden_datasets();
    let cfg = loaded.cfg().clone();
    let generic = HookedGpt2::new_generic(Cpu::default(), cfg.clone(), &loaded.params).unwrap();
    let ctx = RunContext::of(&loaded, &heads);
    for spec in [
        serde_json::json!({"kind": "ablate", "value": "zero", "hook": "z"}),
        serde_json::json!({"kind": "ablate", "value": "zero", "hook": "result", "heads": ["1.0", "1.1"], "together": true}),
        serde_json::json!({"kind": "patch", "hook": "z", "source": "corrupt"}),
        serde_json::json!({"kind": "patch", "hook": "mlp_out", "source": "corrupt"}),
        serde_json::json!({"kind": "patch", "hook": "resid_pre", "per_position": true, "source": "eq_corrupt", "dataset": "eq"}),
        serde_json::json!({"kind": "ablate", "value": "zero", "hook": "attn_out", "measure": ["logit_diff"]}),
    ] {
        let plan = plan_of(&spec, &ds, &cfg, &heads);
        let target = ds.iter().find(|d| d.name == plan.datasets[0]).unwrap();
        let mut tables = Vec::new();
        for on_device in [false, true] {
            let mut sweep = Sweep::new(plan.clone(), &ds, 4, target.seq_len(), &cfg);
            let filter = HookFilter::checked(&sweep.hooks(&ctx), cfg.n_layers).unwrap();
            let mut hooks = Hooks::caching(filter);
            if on_device {
                generic.run_hooks(&target.tokens, &mut hooks).unwrap();
            } else {
                loaded.model.run_hooks(&target.tokens, &mut hooks).unwrap();
            }
            let cache = hooks.take_cache();
            assert_eq!(cache.on_device(), on_device);
            sweep.start_dataset(&ctx, target).unwrap();
            let model: &dyn hookgraph::model::Passes =
                if on_device { &generic } else { &loaded.model };
            sweep
                .batch(
                    &ctx,
                    &BatchView {
                        dataset: target,
                        start: 0,
                        tokens: target.tokens.view(),
                        cache: &cache,
                        model: Some(model),
                    },
                )
                .unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(
                cache.downloads(),
                0,
                "{spec}: activations copied to the host"
            );
            tables.push(sweep.finish_dataset(&ctx, target).unwrap().remove(0));
        }
        // The device body and the host body agree (both are checked against TL above).
        let (host, dev) = (&tables[0], &tables[1]);
        assert_eq!(host.columns, dev.columns);
        for (a, b) in host.rows.iter().zip(&dev.rows) {
            for (x, y) in a.iter().zip(b) {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => assert!(
                        (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                        "{spec}: host {x} vs device {y}"
                    ),
                    _ => assert_eq!(x.to_string(), y.to_string()),
                }
            }
        }
    }
}
