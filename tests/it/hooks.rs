//! Hook points through a real forward pass: caching follows the filter, and write hooks
//! replace activations downstream (TL's hooks that return a new value).

use crate::common::*;
use dfdx::prelude::Cpu;
use hookgraph::hooks::{HookFilter, Hooks};
use hookgraph::model::{self, CheckpointFiles, Processing};
use ndarray::{s, ArrayD};

fn model() -> hookgraph::model::LoadedModel<Cpu> {
    let files = CheckpointFiles::in_dir(&fixture("ckpt_a")).unwrap();
    model::load(Cpu::default(), files, Processing::ALL, None).unwrap()
}

#[test]
fn cache_holds_exactly_the_requested_points() {
    let m = model();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let mut hooks = Hooks::caching(HookFilter::names([
        "blocks.1.attn.hook_v",
        "ln_final.hook_scale",
    ]));
    m.model.forward(&toks, &mut hooks).unwrap();
    let cache = hooks.take_cache();
    let names = cache.names();
    assert_eq!(names, ["blocks.1.attn.hook_v", "ln_final.hook_scale"]);
    assert_eq!(
        cache.get("blocks.1.attn.hook_v").unwrap().shape(),
        [3, 12, 4, 8]
    );
}

#[test]
fn identity_write_hook_changes_nothing_and_ablation_changes_logits() {
    let m = model();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let gold = load_golden("a_processed.safetensors");

    let mut hooks = Hooks::default();
    hooks.add_writer(
        "blocks.0.hook_resid_post",
        Box::new(|_a: &mut ArrayD<f32>| {}),
    );
    let logits = m.model.logits_host(&toks, &mut hooks).unwrap();
    assert_close("logits", &logits.into_dyn(), &gold["logits"], RTOL, ATOL);

    // Zero-ablate head 2 of layer 1 at hook_z: the cache shows the new value and the
    // logits move.
    let mut hooks = Hooks::caching(HookFilter::names(["blocks.1.attn.hook_z"]));
    hooks.add_writer(
        "blocks.1.attn.hook_z",
        Box::new(|z: &mut ArrayD<f32>| z.slice_mut(s![.., .., 2, ..]).fill(0.0)),
    );
    let ablated = m.model.logits_host(&toks, &mut hooks).unwrap();
    let z = hooks.take_cache();
    let z = z.get("blocks.1.attn.hook_z").unwrap();
    assert!(z.slice(s![.., .., 2, ..]).iter().all(|&x| x == 0.0));
    assert!(z.slice(s![.., .., 1, ..]).iter().any(|&x| x != 0.0));
    let diff = (&ablated.into_dyn() - &gold["logits"]).mapv(f32::abs);
    assert!(
        diff.iter().copied().fold(0.0, f32::max) > 1e-3,
        "ablation had no effect"
    );
}

#[test]
fn run_hooks_skips_only_what_nobody_reads() {
    let m = model();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let gold = load_golden("a_processed.safetensors");
    let mut hooks = Hooks::caching(HookFilter::names(["ln_final.hook_scale"]));
    m.model.run_hooks(&toks, &mut hooks).unwrap();
    let cache = hooks.take_cache();
    assert!(!cache.contains("logits"));
    assert_close(
        "scale",
        cache.get("ln_final.hook_scale").unwrap(),
        &gold["ln_final.hook_scale"],
        RTOL,
        ATOL,
    );
    let mut hooks = Hooks::caching(HookFilter::names(["logits"]));
    m.model.run_hooks(&toks, &mut hooks).unwrap();
    assert_close(
        "logits",
        hooks.take_cache().get("logits").unwrap(),
        &gold["logits"],
        RTOL,
        ATOL,
    );
}

/// Write hooks at every hook point at once (each scales its activation) give the same
/// logits and cache on the CPU's host kernels as on the device-generic dfdx path: the host
/// path's in-place writes (q, k, v inside the fused QKV buffer, scores and pattern, the
/// embeddings, the outputs that join the residual stream) are all exercised.
#[test]
fn every_write_point_agrees_between_host_and_dfdx_paths() {
    let m = model();
    let toks = load_tokens(&golden_path("tokens_a.json"));
    let generic =
        hookgraph::model::HookedGpt2::new_generic(Cpu::default(), m.cfg().clone(), &m.params)
            .unwrap();
    let names = hookgraph::hooks::hook_point_names(m.cfg().n_layers);
    let run = |model: &hookgraph::model::HookedGpt2<Cpu>| {
        let mut hooks = Hooks::caching(HookFilter::names(names.iter().cloned()));
        for (i, n) in names.iter().enumerate() {
            let f = 0.9 + 0.002 * i as f32;
            hooks.add_writer(n.clone(), Box::new(move |a: &mut ArrayD<f32>| *a *= f));
        }
        let logits = model.logits_host(&toks, &mut hooks).unwrap();
        (logits, hooks.take_cache())
    };
    let (host_logits, host_cache) = run(&m.model);
    let (dfdx_logits, dfdx_cache) = run(&generic);
    assert_close(
        "logits",
        &host_logits.clone().into_dyn(),
        &dfdx_logits.into_dyn(),
        RTOL,
        ATOL,
    );
    // The rewrite reached the logits (a write hook that did nothing would pass the above).
    let plain = m.model.logits_host(&toks, &mut Hooks::default()).unwrap();
    let diff = (&host_logits - &plain).mapv(f32::abs);
    assert!(diff.iter().copied().fold(0.0, f32::max) > 1e-3);
    for n in &names {
        assert_close(
            n,
            host_cache.get(n).unwrap(),
            dfdx_cache.get(n).unwrap(),
            RTOL,
            ATOL,
        );
    }
}
